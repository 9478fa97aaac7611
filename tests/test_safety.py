"""Never lose a user's file, never report success on a wrong result (issue 26), through the commands a user types:
outputs that would land on inputs or on each other are refused before the network runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import preloaded_python
import pytest
import test_zoo
import torch
import zoo
from conftest import REPO, write_ct_case, write_msd_task
from monai.networks.nets import SwinUNETR
from test_robustness import TASKS_FILE, TINY, bundle_command, bundle_copy, bundle_run, effects, output, probe

from swin_unetr_kit.msd import task_settings


@pytest.fixture(autouse=True)
def _private_scan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SWIN_UNETR_CACHE", str(tmp_path / "cache"))


local_zoo = test_zoo.local_zoo  # the zoo of every bundle, packaged once per module


def btcv_with_model(tmp_path: Path) -> Path:
    """A copy of the BTCV bundle with a small (feature_size 12) untrained ``models/model.pt``."""
    bundle = bundle_copy("swin_unetr_btcv_seg", tmp_path)
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    torch.save(SwinUNETR(in_channels=1, out_channels=14, feature_size=12).state_dict(), bundle / "models" / "model.pt")
    return bundle


INFER = {**TINY, "cpu_runtime": "torch", "progress": "false"}


# --- 1. inference never writes over its inputs ------------------------------------------------------------------------


def test_inference_into_the_input_folder_refuses_to_replace_an_input(tmp_path):
    bundle = btcv_with_model(tmp_path)
    folder = tmp_path / "cases"
    folder.mkdir()
    case = write_ct_case(tmp_path / "gen", "x")
    shutil.copy(case["image"], folder / "x.nii.gz")
    shutil.copy(case["image"], folder / "x_seg.nii.gz")  # the user's own file of that name
    before = (folder / "x_seg.nii.gz").read_bytes()
    result = bundle_run(bundle, ["configs/inference.json"], input=str(folder), output_dir=str(folder), **INFER)
    assert result.returncode != 0
    assert f"{folder / 'x_seg.nii.gz'}: is an input and would be replaced by the prediction of" in output(result)
    assert (folder / "x_seg.nii.gz").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["x.nii.gz", "x_seg.nii.gz"]


# --- 2. cases of the same name get one output each --------------------------------------------------------------------


def test_cases_of_the_same_name_in_two_folders_get_an_output_each(tmp_path):
    bundle = btcv_with_model(tmp_path)
    data = tmp_path / "data"
    for patient, seed in (("p1", 0), ("p2", 1)):
        (data / patient).mkdir(parents=True)
        case = write_ct_case(tmp_path / f"gen{seed}", "img", seed=seed)
        shutil.copy(case["image"], data / patient / "img.nii.gz")
    datalist = tmp_path / "list.json"
    datalist.write_text('{"test": [{"image": "data/p1/img.nii.gz"}, {"image": "data/p2/img.nii.gz"}]}')
    out = tmp_path / "out"
    result = bundle_run(bundle, ["configs/inference.json"], input=str(datalist), output_dir=str(out), **INFER)
    assert result.returncode == 0, output(result)[-3000:]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.nii.gz"))
    assert written == ["p1/img_seg.nii.gz", "p2/img_seg.nii.gz"]
    for patient in ("p1", "p2"):  # each in its own input's geometry
        pred, src = nib.load(out / patient / "img_seg.nii.gz"), nib.load(data / patient / "img.nii.gz")
        assert pred.shape == src.shape and np.allclose(pred.affine, src.affine, atol=1e-4)


def test_two_inputs_that_would_share_one_output_are_refused(tmp_path):
    bundle = btcv_with_model(tmp_path)
    folder = tmp_path / "cases"
    folder.mkdir()
    case = write_ct_case(tmp_path / "gen", "img")
    shutil.copy(case["image"], folder / "img.nii.gz")
    nib.save(nib.load(case["image"]), folder / "img.nii")
    out = tmp_path / "out"
    result = bundle_run(bundle, ["configs/inference.json"], input=str(folder), output_dir=str(out), **INFER)
    assert result.returncode != 0
    assert f"{folder / 'img.nii.gz'}: would be written to {out / 'img_seg.nii.gz'} like {folder / 'img.nii'}" in output(
        result
    )
    assert not out.exists()


# --- 3. tools/zoo.py install leaves an existing install alone ---------------------------------------------------------


def zoo_install(*args: str) -> subprocess.CompletedProcess:
    """``python tools/zoo.py install ...`` as the README types it."""
    cmd = [sys.executable, str(REPO / "tools" / "zoo.py"), "install", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return preloaded_python.run(cmd, timeout=300, env=env)


def test_zoo_install_over_an_existing_install_keeps_the_trained_model(local_zoo, tmp_path):
    index = str(local_zoo / "model_info.json")
    first = zoo_install("swin_unetr_btcv_seg", "--index", index, "--bundle_dir", str(tmp_path))
    assert first.returncode == 0, first.stderr[-2000:]
    trained = tmp_path / "swin_unetr_btcv_seg" / "models" / "model.pt"
    trained.write_bytes(b"the user's trained weights")
    again = zoo_install("swin_unetr_btcv_seg", "--index", index, "--bundle_dir", str(tmp_path))
    assert again.returncode != 0
    expected = f"{tmp_path / 'swin_unetr_btcv_seg'}: already installed (not empty); pass --overwrite true to replace it"
    assert expected in again.stderr
    assert trained.read_bytes() == b"the user's trained weights"
    forced = zoo_install("swin_unetr_btcv_seg", "--index", index, "--bundle_dir", str(tmp_path), "--overwrite", "true")
    assert forced.returncode == 0 and trained.read_bytes() != b"the user's trained weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swin_unetr_btcv_seg"]  # no staging folder left


def _zoo_of(tmp_path: Path, key: str, members: dict[str, str]) -> str:
    archive_path = tmp_path / f"{key}.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        for arcname, text in members.items():
            archive.writestr(arcname, text)
    index = tmp_path / "model_info.json"
    index.write_text(json.dumps({key: {"checksum": zoo.sha256(archive_path), "source": archive_path.as_uri()}}))
    return str(index)


def test_zoo_install_of_a_zip_with_another_top_folder_or_an_unsafe_member_installs_nothing(tmp_path):
    index = _zoo_of(tmp_path, "mine_v0.1.0", {"other/configs/metadata.json": "{}"})
    result = zoo_install("mine", "--index", index, "--bundle_dir", str(tmp_path / "dest"))
    assert result.returncode != 0 and "holds ['other'], expected one folder mine/; nothing installed" in result.stderr
    assert list((tmp_path / "dest").iterdir()) == []

    index = _zoo_of(tmp_path, "evil_v0.1.0", {"evil/configs/metadata.json": "{}", "../outside.txt": "escaped"})
    result = zoo_install("evil", "--index", index, "--bundle_dir", str(tmp_path / "dest"))
    assert result.returncode != 0 and "Unsafe path" in result.stderr
    assert list((tmp_path / "dest").iterdir()) == [] and not (tmp_path / "outside.txt").exists()


def test_zoo_versions_with_a_pre_release_tag_are_ordered(tmp_path):
    _zoo_of(tmp_path, "mine_v0.6.0rc1", {"mine/configs/metadata.json": "{}"})
    index = tmp_path / "model_info.json"
    entries = json.loads(index.read_text())
    entries["mine_v0.5.2"] = entries["mine_v0.6.0rc1"]
    index.write_text(json.dumps(entries))
    assert zoo.lookup(str(index), "mine")[0] == "mine_v0.6.0rc1"
    result = zoo_install("mine", "--index", str(index), "--bundle_dir", str(tmp_path / "dest"))
    assert result.returncode == 0, result.stderr[-2000:]


# --- 4. a tool's --out never deletes a folder it did not make ---------------------------------------------------------


def run_tool(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python tools/<script> ...`` as a user types it, from ``cwd``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return preloaded_python.run([sys.executable, str(REPO / "tools" / script), *args], cwd=cwd, env=env)


@pytest.mark.parametrize("script", ["sample_data.py", "demo.py", "ssl_evidence.py"])
def test_a_tools_out_refuses_a_folder_of_the_users(script, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    result = run_tool(script, "--out", str(mine), cwd=tmp_path)
    assert result.returncode != 0
    assert f"{mine}: not empty and not made by this tool; pass --overwrite true or choose another --out" in (
        result.stderr
    )
    assert (mine / "notes.txt").read_text() == "the user's"
    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    result = run_tool(script, "--out", ".", "--overwrite", "true", cwd=checkout)
    assert result.returncode != 0
    assert f"{checkout}: holds the current folder or a git checkout; choose another --out" in result.stderr
    assert (checkout / ".git").is_dir()


# --- 5. tools/datalist.py keeps an existing datalist ------------------------------------------------------------------


def test_datalist_tool_keeps_an_existing_datalist_and_its_keys(tmp_path):
    data = tmp_path / "BTCV"
    cases = [write_ct_case(data, f"case{i}", seed=i) for i in range(3)]
    relative = [{k: os.path.relpath(v, data) for k, v in case.items()} for case in cases]
    original = {"name": "BTCV", "labels": {"0": "background", "1": "spleen"}, "licence": "CC-BY-4.0"}
    original |= {"modality": {"0": "CT"}, "numTraining": 3, "training": relative}
    (data / "dataset_0.json").write_text(json.dumps(original))
    before = (data / "dataset_0.json").read_text()
    result = run_tool("datalist.py", str(data), cwd=tmp_path)
    assert result.returncode != 0
    assert f"{data / 'dataset_0.json'}: exists; pass --overwrite true to replace it (its other keys are kept)" in (
        result.stderr
    )
    assert (data / "dataset_0.json").read_text() == before
    result = run_tool("datalist.py", str(data), "--overwrite", "true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((data / "dataset_0.json").read_text())
    assert {k: written[k] for k in ("name", "labels", "licence", "modality", "numTraining")} == {
        k: original[k] for k in ("name", "labels", "licence", "modality", "numTraining")
    }
    assert len(written["training"]) + len(written["validation"]) == 3


def test_datalist_tool_check_false_does_not_check(tmp_path):
    data = tmp_path / "data"
    case = [write_ct_case(data, f"case{i}", seed=i) for i in range(2)][0]
    bad = np.full(nib.load(case["image"]).shape, 99, np.uint8)
    nib.save(nib.Nifti1Image(bad, nib.load(case["image"]).affine), case["label"])
    checked = run_tool("datalist.py", str(data), "--out", str(tmp_path / "a.json"), cwd=tmp_path)
    assert checked.returncode != 0 and "label values [99] outside the 14 classes" in checked.stderr
    unchecked = run_tool("datalist.py", str(data), "--out", str(tmp_path / "b.json"), "--check", "false", cwd=tmp_path)
    assert unchecked.returncode == 0, unchecked.stderr[-2000:]


# --- 7. the resume guard holds after a run stopped before its first save ----------------------------------------------


def test_a_run_stopped_before_its_first_save_does_not_vouch_for_the_previous_checkpoint(tmp_path):
    """seed 123 trains and saves; ``--seed 7 --resume false`` is stopped before it saves; ``--seed 7`` again must not
    resume the seed-123 checkpoint as its own."""
    task = "Task09_Spleen"
    dataset = write_msd_task(tmp_path / "data", task, task_settings(task, TASKS_FILE))
    msd = bundle_copy("swin_unetr_msd", tmp_path)
    common = {"task": task, "dataset_dir": str(dataset), "num_folds": 2, "fold": 0, **TINY, "progress": "false"}
    common.update({"train#trainer#max_epochs": 1, "val_interval": 10})
    first = bundle_run(msd, ["configs/train.json"], **common)
    assert first.returncode == 0, output(first)[-3000:]

    cmd, env = bundle_command(["configs/train.json"], **common, seed=7, resume="false")
    stopped = subprocess.Popen(cmd, cwd=msd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in stopped.stdout:  # the loader has attached: stop the run there, before any save
        if "resume disabled: training starts afresh" in line:
            stopped.kill()
            break
    stopped.communicate()
    assert stopped.returncode == -signal.SIGKILL

    again = bundle_run(msd, ["configs/train.json"], **common, seed=7)
    assert again.returncode != 0
    assert "latest.pt: this run was started with other settings (seed: 123 -> 7)" in output(again)
    # 13: a new learning rate would be replaced by the checkpoint's optimizer state without a word
    faster = bundle_run(msd, ["configs/train.json"], **common, learning_rate=0.001)
    assert faster.returncode != 0
    assert "latest.pt: this run was started with other settings (learning_rate: 0.0001 -> 0.001)" in output(faster)


# --- 8. a fresh training builds the bundle's network, not that of the weights lying in the folder --------------------


def test_a_fresh_training_does_not_take_the_feature_size_of_an_old_model(tmp_path):
    data = tmp_path / "data"
    for i in range(2):
        write_ct_case(data, f"case{i}", seed=i)
    bundle = btcv_with_model(tmp_path)  # an earlier run's feature_size 12 model.pt
    report = probe(tmp_path, "size", "{'feature_size': @network_def#feature_size}")
    configs = ["configs/train.json", report]
    fresh = bundle_run(bundle, configs, dataset_dir=str(data), resume="false")
    assert effects(fresh) == {"feature_size": 48}
    continued = bundle_run(bundle, configs, dataset_dir=str(data))  # MONAI Label trains on from model.pt
    assert effects(continued) == {"feature_size": 12}
    assert "feature_size 12, that of ./models/model.pt (the bundle's is 48)" in output(continued)


# --- 9. lower-case booleans inside the network component -------------------------------------------------------------

SWITCHES = (
    "sorted({(n, getattr(m, n)) for m in @network.modules() "
    "for n in ('use_checkpoint', 'use_flash_attention') if hasattr(m, n)})"
)


@pytest.mark.parametrize("config", ["train", "inference"])
def test_lower_case_false_inside_the_network_component_turns_the_switch_off(config, tmp_path):
    data = tmp_path / "data"
    for i in range(2):
        write_ct_case(data, f"case{i}", seed=i)
    bundle = bundle_copy("swin_unetr_btcv_seg", tmp_path)
    report = probe(tmp_path, "switches", "{'switches': " + SWITCHES + "}")
    switches = {"network_def#use_checkpoint": "false", "network_def#use_flash_attention": "false"}
    result = bundle_run(bundle, [f"configs/{config}.json", report], dataset_dir=str(data), **switches)
    assert effects(result) == {"switches": [("use_checkpoint", False), ("use_flash_attention", False)]}
    if config == "inference":  # the same network_flags reads the switches in both configs: one misspelling is enough
        return
    result = bundle_run(
        bundle, [f"configs/{config}.json", report], dataset_dir=str(data), **{"network_def#use_checkpoint": "nope"}
    )
    assert result.returncode != 0 and "--network_def#use_checkpoint 'nope': not a boolean" in output(result)


# --- 12. a validation label without foreground is left out, not scored ----------------------------------------------


def test_a_validation_label_without_foreground_is_left_out_by_name(tmp_path):
    data = tmp_path / "data"
    cases = [write_ct_case(data, f"case{i}", seed=i) for i in range(3)]
    empty = nib.load(cases[2]["label"])
    nib.save(nib.Nifti1Image(np.zeros(empty.shape, np.uint8), empty.affine), cases[2]["label"])
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": cases[:1], "validation": cases[1:]}))
    bundle = bundle_copy("swin_unetr_btcv_seg", tmp_path)
    report = probe(tmp_path, "cases", "{'validation': [c['label'] for c in @validate#dataset.data]}")
    settings = {"dataset_dir": str(data), "datalist": str(datalist)}
    result = bundle_run(bundle, ["configs/train.json", report], **settings)
    assert effects(result) == {"validation": [cases[1]["label"]]}
    assert f"{cases[2]['label']}: no foreground (every voxel 0), left out of the 'validation' cases" in output(result)
    evaluation = probe(tmp_path, "eval", "{'evaluated': [c['label'] for c in @validate#dataset.data]}")
    result = bundle_run(bundle, ["configs/train.json", "configs/evaluate.json", evaluation], **settings)
    assert effects(result) == {"evaluated": [cases[1]["label"]]}


# --- 11. SSL image discovery counts each CT once ----------------------------------------------------------------------


def test_ssl_discovery_counts_each_ct_once_through_a_symlink_loop(tmp_path):
    data = tmp_path / "unlabeled"
    (data / "scans").mkdir(parents=True)
    for i in range(2):
        case = write_ct_case(tmp_path / "gen", f"ct{i}", seed=i)
        shutil.copy(case["image"], data / "scans" / f"ct{i}.nii.gz")
    (data / "scans" / "loop").symlink_to(data)  # a link back up: a loop
    (data / "again.nii.gz").symlink_to(data / "scans" / "ct0.nii.gz")
    bundle = bundle_copy("swin_unetr_ssl_pretrain", tmp_path)
    report = probe(tmp_path, "images", "{'images': [c['image'] for c in @train#dataset.data + @validate#dataset.data]}")
    result = bundle_run(bundle, ["configs/train.json", report], dataset_dir=str(data))
    found = effects(result)["images"]
    expected = [os.path.realpath(data / "scans" / f"ct{i}.nii.gz") for i in range(2)]
    assert len(found) == 2 and sorted(os.path.realpath(p) for p in found) == expected


# --- 13. settings and datalists that were silently ignored ------------------------------------------------------------


def test_a_datalist_with_a_case_twice_or_in_both_parts_is_refused_unless_meant(tmp_path):
    data = tmp_path / "data"
    cases = [write_ct_case(data, f"case{i}", seed=i) for i in range(2)]
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [cases[0], cases[0], cases[1]], "validation": [cases[1]]}))
    bundle = bundle_copy("swin_unetr_btcv_seg", tmp_path)
    report = probe(tmp_path, "cases", "{'training': len(@train#dataset.data)}")
    refused = bundle_run(bundle, ["configs/train.json", report], dataset_dir=str(data), datalist=str(datalist))
    assert refused.returncode != 0
    assert output(refused).rstrip().splitlines()[-1] == (
        f"swin_unetr_kit.data.DataError: {datalist}: 1 images listed twice or more in 'training' (first: "
        f"{cases[0]['image']}); 1 cases in both 'training' and 'validation' (first: {cases[1]['image']}), so the "
        "validation score is not of unseen data; list each case once, or pass --allow_datalist_overlap true if this "
        "is meant"
    )
    meant = {"dataset_dir": str(data), "datalist": str(datalist), "allow_datalist_overlap": "true"}
    result = bundle_run(bundle, ["configs/train.json", report], **meant)
    assert effects(result) == {"training": 3}
    assert f"{datalist}: 1 images listed twice or more in 'training'" in output(result)


def test_msd_datalist_with_a_case_twice_is_refused(tmp_path):
    task = "Task09_Spleen"
    dataset = write_msd_task(tmp_path / "data", task, task_settings(task, TASKS_FILE), num_cases=3)
    description = json.loads((dataset / "dataset.json").read_text())
    description["training"].append(description["training"][0])  # a case twice: k-fold could split it across parts
    (dataset / "dataset.json").write_text(json.dumps(description))
    bundle = bundle_copy("swin_unetr_msd", tmp_path)
    report = probe(tmp_path, "cases", "{'training': len(@train#dataset.data)}")
    result = bundle_run(bundle, ["configs/train.json", report], task=task, dataset_dir=str(dataset), num_folds=2)
    assert result.returncode != 0
    last = output(result).rstrip().splitlines()[-1]
    assert last.startswith(f"swin_unetr_kit.data.DataError: {dataset / 'dataset.json'}: 1 images listed twice or more")
    assert last.endswith("list each case once, or pass --allow_datalist_overlap true if this is meant")


def test_a_mistyped_setting_is_refused_with_the_setting_meant(tmp_path):
    bundle = bundle_copy("swin_unetr_btcv_seg", tmp_path)
    report = probe(tmp_path, "nothing", "{}")
    typos = {"learning_rat": 0.001, "num_epochs": 5, "resum": "false", "seed": 3}
    result = bundle_run(bundle, ["configs/train.json", report], **typos)
    assert result.returncode != 0 and "EFFECTS" not in result.stdout
    assert output(result).rstrip().splitlines()[-1] == (
        "ValueError: --learning_rat (did you mean --learning_rate?), --num_epochs, --resum (did you mean --resume?): "
        f"no such setting in configs/train.json, {report}; correct the name, or pass --allow_unknown_settings true to "
        "run with it ignored"
    )
    allowed = bundle_run(bundle, ["configs/train.json", report], **typos, allow_unknown_settings="true")
    assert effects(allowed) == {}
    assert "--num_epochs: no such setting in" in output(allowed)
    assert "--seed" not in output(allowed)


def test_a_setting_of_another_config_is_warned_about_not_refused(tmp_path):
    """One command line may serve training and inference: a setting of the bundle's training config given to
    inference changes nothing there, and says so."""
    bundle = bundle_copy("swin_unetr_btcv_seg", tmp_path)
    report = probe(tmp_path, "nothing", "{}")
    result = bundle_run(bundle, ["configs/inference.json", report], num_samples=1, learning_rate=0.001)
    assert effects(result) == {}
    files = f"configs/inference.json, {report}"
    assert f"--num_samples: a setting of another of the bundle's configs, not of {files}" in output(result)
    assert f"--learning_rate: a setting of another of the bundle's configs, not of {files}" in output(result)


# --- 6. a full disk or a read-only folder stops inference before the network runs ------------------------------------


@pytest.fixture
def small_file_system(tmp_path):
    """A 1 MB tmpfs (root only; skipped elsewhere), unmounted afterwards."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)]).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_inference_onto_a_full_or_read_only_disk_stops_before_the_network(small_file_system, tmp_path):
    bundle = btcv_with_model(tmp_path)
    case = write_ct_case(tmp_path / "gen", "x", shape=(48, 44, 40))  # 0.08 MB of label map
    filler = small_file_system / "filler"
    filler.write_bytes(b"0" * (1024 * 1024 - 8192))  # about one page left
    out = small_file_system / "out"
    result = bundle_run(bundle, ["configs/inference.json"], input=case["image"], output_dir=str(out), **INFER)
    assert result.returncode != 0
    assert re.search(rf"{out}: 0\.0\d MB free, the label maps need up to 0\.08 MB; free some space", output(result))
    assert not out.exists()
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_file_system)], check=True)
    result = bundle_run(bundle, ["configs/inference.json"], input=case["image"], output_dir=str(out), **INFER)
    assert result.returncode != 0
    assert f"{out}: cannot write there ({small_file_system} is not a writable folder)" in output(result)


# --- 15. errors that named no file or the wrong cause -----------------------------------------------------------------


def test_bad_datalists_and_a_singular_affine_are_named_before_training(tmp_path):
    data = tmp_path / "data"
    cases = [write_ct_case(data, f"case{i}", seed=i) for i in range(2)]
    bundle = bundle_copy("swin_unetr_btcv_seg", tmp_path)
    report = probe(tmp_path, "cases", "{'training': len(@train#dataset.data)}")
    as_list, unlabelled = tmp_path / "list.json", tmp_path / "unlabelled.json"
    as_list.write_text(json.dumps(cases))
    unlabelled.write_text(json.dumps({"training": [{"image": cases[0]["image"]}], "validation": cases[1:]}))
    expected = {
        as_list: f"{as_list}: a datalist is a JSON object of 'training'/'validation'/'test' lists, not a list",
        unlabelled: f"""{unlabelled}: entry 1 of 'training' has no 'label' ({{"image": "{cases[0]["image"]}"}})""",
    }
    for datalist, message in expected.items():
        result = bundle_run(bundle, ["configs/train.json", report], dataset_dir=str(data), datalist=str(datalist))
        assert result.returncode != 0 and message in output(result)
    image = nib.load(cases[0]["image"])
    flat = image.affine.copy()
    flat[:3, 2] = flat[:3, 0]  # the third axis along the first: no volume
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), flat), cases[0]["image"])
    result = bundle_run(bundle, ["configs/train.json", report], dataset_dir=str(data))
    assert result.returncode != 0
    assert f"{cases[0]['image']}: its affine (voxel-to-world matrix) is singular or not finite" in output(result)


@pytest.mark.parametrize("content", [b"", b"\x8f random bytes \x00\x17"])
def test_an_empty_or_random_model_is_named(content, tmp_path):
    """The network's size is read from ``models/model.pt`` (see item 8) before anything else looks at the file."""
    bundle = btcv_with_model(tmp_path)
    (bundle / "models" / "model.pt").write_bytes(content)
    report = probe(tmp_path, "size", "{'feature_size': @network_def#feature_size}")
    result = bundle_run(bundle, ["configs/train.json", report])
    assert result.returncode != 0
    assert "./models/model.pt: cannot be read as a PyTorch checkpoint (" in output(result)
    assert "mmap can only be used" not in output(result)


# --- 10. a DICOM series with a missing, repeated or truncated slice is named ------------------------------------------


def _drop(series: Path) -> str:
    sorted(series.iterdir())[10].unlink()
    return "mm where the series has 2.00 mm: a slice is missing"


def _repeat(series: Path) -> str:
    shutil.copy(sorted(series.iterdir())[5], series / "copy")
    return "slice copy repeats the position"


def _truncate(series: Path) -> str:
    victim = sorted(series.iterdir())[7]
    victim.write_bytes(victim.read_bytes()[:-5000])
    return f"slice {victim.name} is truncated (its pixel data ends early)"


@pytest.mark.parametrize("damage", [_drop, _repeat, _truncate])
def test_a_damaged_dicom_series_is_named_before_inference(damage, sample_dataset, tmp_path):
    bundle = btcv_with_model(tmp_path)
    series = Path(shutil.copytree(sample_dataset / "imagesTs" / "ts_slab_dicom", tmp_path / "series"))
    message = damage(series)
    out = tmp_path / "out"
    result = bundle_run(bundle, ["configs/inference.json"], input=str(series), output_dir=str(out), **INFER)
    assert result.returncode != 0
    assert f"{series}: " in output(result) and message in output(result)
    assert not out.exists()


def test_a_fold_that_is_not_a_number_is_named(tmp_path):
    msd = bundle_copy("swin_unetr_msd", tmp_path)
    report = probe(tmp_path, "run", "{'run': @run_name}")
    result = bundle_run(msd, ["configs/train.json", report], task="Task09_Spleen", fold="one")
    assert result.returncode != 0 and "--fold 'one': not a whole number" in output(result)


def test_evaluation_of_a_file_with_a_comma_in_its_name_completes(tmp_path):
    data = tmp_path / "data"
    cases = [write_ct_case(data, "case0"), write_ct_case(data, "a,b", seed=1)]
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": cases[:1], "validation": cases[1:]}))
    bundle = btcv_with_model(tmp_path)
    settings = {"dataset_dir": str(data), "datalist": str(datalist), "num_overlays": 0, **INFER}
    result = bundle_run(bundle, ["configs/train.json", "configs/evaluate.json"], **settings)
    assert result.returncode == 0, output(result)[-3000:]
    report = json.loads((bundle / "eval" / "metrics.json").read_text())
    (case,) = report["per_case"]
    assert case.endswith("a,b.nii.gz") and report["per_case"][case]["dice"]
    assert (bundle / "eval" / "predictions" / "a,b_seg.nii.gz").is_file()
