"""Real-data robustness (issue 14), through the commands a user types from a bundle folder: boolean settings that mean
what they say, MSD folds that never share a run, bad volumes named in one error, partial checkpoints cleaned up, no
folder for an invalid task, and a warning for inputs outside a bundle's domain."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import preloaded_python
import pytest
import torch
from conftest import REPO, SMALL_ROI, SSL_SMALL_ROI, write_ct_case, write_msd_task

from swin_unetr_kit import checkpoint, data
from swin_unetr_kit.data import DataError, check_cases, scan_volume
from swin_unetr_kit.msd import task_settings
from swin_unetr_kit.settings import flag
from swin_unetr_kit.ssl import SSLHead

BUNDLES = REPO / "bundles"
TASKS_FILE = BUNDLES / "swin_unetr_msd" / "configs" / "tasks.json"
TINY = {
    "network_def#feature_size": 12,
    "roi_size": SMALL_ROI,
    "num_samples": 1,
    "num_workers": 0,
    "cache_rate": 0.0,
    "sw_batch_size": 1,
}


@pytest.fixture(autouse=True)
def _private_scan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SWIN_UNETR_CACHE", str(tmp_path / "cache"))


def bundle_copy(name: str, tmp_path: Path) -> Path:
    """A copy of a bundle folder, to run commands from as the README says (``bundle_root`` "."), outputs inside it."""
    return Path(shutil.copytree(BUNDLES / name, tmp_path / name, ignore=shutil.ignore_patterns("models", "eval")))


def bundle_command(config_files: list[str], **overrides) -> tuple[list[str], dict[str, str]]:
    """``python -m monai.bundle run --config_file ... --key value ...`` and its environment: 1 thread, glibc as it
    comes (no preloaded allocator), this checkout's swin_unetr_kit."""
    args = [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
    files = config_files[0] if len(config_files) == 1 else json.dumps(config_files)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, *args], env


def bundle_start(folder: Path, config_files: list[str], **overrides):
    """Start :func:`bundle_command` from ``folder`` (a process forked from the pre-imported Python where it can)."""
    cmd, env = bundle_command(config_files, **overrides)
    return preloaded_python.popen(cmd, cwd=folder, env=env)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def bundle_run(folder: Path, config_files: list[str], **overrides) -> subprocess.CompletedProcess:
    """:func:`bundle_start` and wait for it."""
    return finish(bundle_start(folder, config_files, **overrides))


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def effects(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, output(result)[-4000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("EFFECTS ")]
    return ast.literal_eval(line[len("EFFECTS ") :])


def probe(tmp_path: Path, name: str, report: str, **settings) -> str:
    """An override file whose ``run`` prints what the settings did (``report``: a Python dict expression over the
    config's items) after the bundle's ``setup`` instead of training or evaluating; ``settings`` go into the same
    file, as in a user's override file."""
    path = tmp_path / f"{name}.json"
    run = ["@setup", f"$print('EFFECTS', repr({report}))"]
    path.write_text(json.dumps({**settings, "run": run, "finalize": []}))
    return str(path)


# --- 1. boolean settings -------------------------------------------------------------------------------------------


def test_flag_reads_the_spellings_people_type_and_names_the_setting_otherwise():
    for word in ("true", "True", "TRUE", "1", "yes", "Yes", "on", 1, True):
        assert flag(word, "x") is True
    for word in ("false", "False", "FALSE", "0", "no", "NO", "off", 0, False):
        assert flag(word, "x") is False
    for bad in ("maybe", "", "2", 2, None, 0.5):
        with pytest.raises(ValueError, match=r"--resume .*not a boolean"):
            flag(bad, "resume")


# settings that are true, false or unset (null: decided elsewhere), read by their resolver through optional_flag
OPTIONAL_FLAGS = {"legacy_patch_merging": "swin_unetr_kit.record.resolve_patch_merging("}


def _boolean_settings(config: Path) -> set[str]:
    return {
        k
        for k, v in json.loads(config.read_text()).items()
        if isinstance(v, bool) or v == "$torch.cuda.is_available()" or k in OPTIONAL_FLAGS
    }


def test_every_boolean_setting_is_read_through_flag():
    """Every reference to a top-level boolean setting in every config goes through swin_unetr_kit.settings.flag."""
    names = set().union(*(_boolean_settings(p) for p in BUNDLES.glob("*/configs/*.json")))
    assert {"resume", "progress", "check_data", "amp", "legacy_patch_merging", "strict_domain"} <= names
    for config in BUNDLES.glob("*/configs/*.json"):
        text = config.read_text()
        for name in names:
            reader = re.escape(OPTIONAL_FLAGS.get(name, "flag("))
            bare = re.findall(rf"(?<!{reader})(?<!flag\()@{name}(?![\w#])", text)
            assert not bare, f"{config}: @{name} used without swin_unetr_kit.settings.flag"


def _write_bad_label(case: dict, value: int) -> None:
    label = nib.load(case["label"])
    voxels = np.asarray(label.dataobj).copy()
    voxels[1, 1, 1] = value
    nib.save(nib.Nifti1Image(voxels, label.affine), case["label"])


LOWER_CASE_FALSE = {"progress": "false", "amp": "false", "legacy_patch_merging": "false", "resume": "false"}
LOWER_CASE_FALSE.update(cpu_keep_freed_memory="false", check_data="false", strict_domain="false")
TRAINER_EFFECTS = (
    "'progress_bar': any(type(h).__name__ == 'ProgressBar' for h in @train#handlers), 'amp': @train#trainer.amp, "
    "'downsample': type(@network.swinViT.layers1[0].downsample).__name__, "
    "'resumes': (@train#resume_loader.attach(@train#trainer), "
    "@train#trainer.has_event_handler(@train#resume_loader))[1]"
)
INFERENCE_EFFECTS = (
    "'inputs': len(@dataset.data), 'progress_bar': @inferer.progress, 'amp': @evaluator.amp, "
    "'downsample': type(@network.swinViT.layers1[0].downsample).__name__"
)
GLIBC_AS_IT_COMES = "CPU allocator: the C library's malloc"


def _assert_all_off(found: dict, log: str) -> None:
    assert found["progress_bar"] is False and found["amp"] is False
    assert found["downsample"] == "PatchMerging"  # not the legacy order
    assert found.get("resumes", False) is False
    assert GLIBC_AS_IT_COMES in log  # freed memory not kept


def test_lower_case_false_turns_every_boolean_setting_off(tmp_path):
    """Each bundle's train(+evaluate) and inference command with every boolean setting given as lower-case false
    (the SSL bundle's in an override file, in other spellings); the five commands run side by side."""
    runs = {}
    infer_flags = {k: LOWER_CASE_FALSE[k] for k in ("progress", "amp", "legacy_patch_merging", "cpu_keep_freed_memory")}
    train_report = "{'cases': len(@train#dataset.data) + len(@validate#dataset.data), 'eval_amp': @evaluator.amp, "
    # BTCV: a case with a bad label (loadable only with check_data false); all cases smaller than an abdomen (loadable
    # with strict_domain false only as a warning); a checkpoint to resume (resume false: not attached)
    btcv_data = tmp_path / "btcv"
    cases = [write_ct_case(btcv_data, f"case{i}", seed=i) for i in range(3)]
    _write_bad_label(cases[0], 99)
    btcv = bundle_copy("swin_unetr_btcv_seg", tmp_path)
    (btcv / "models").mkdir()
    torch.save({}, btcv / "models" / "latest.pt")
    configs = [
        "configs/train.json",
        "configs/evaluate.json",
        probe(tmp_path, "btcv", train_report + TRAINER_EFFECTS + "}"),
    ]
    runs["btcv train"] = bundle_start(btcv, configs, dataset_dir=str(btcv_data), **TINY, **LOWER_CASE_FALSE)
    configs = ["configs/inference.json", probe(tmp_path, "btcv_infer", "{" + INFERENCE_EFFECTS + "}")]
    runs["btcv inference"] = bundle_start(
        btcv, configs, input=str(btcv_data / "imagesTr"), **TINY, **infer_flags, strict_domain="false"
    )

    # MSD, BrainTumour: four channels, so a 1-channel pretrained encoder meets adapt_in_channels
    task = "Task01_BrainTumour"
    dataset = write_msd_task(tmp_path / "msd", task, task_settings(task, TASKS_FILE))
    _write_bad_label({"label": str(next((dataset / "labelsTr").iterdir()))}, 9)
    torch.save(SSLHead(in_channels=1, feature_size=12).state_dict(), tmp_path / "ssl.pt")
    msd = bundle_copy("swin_unetr_msd", tmp_path)
    run_folder = msd / "models" / task / "fold0of2"
    run_folder.mkdir(parents=True)
    torch.save({}, run_folder / "latest.pt")
    msd_common = {"task": task, "dataset_dir": str(dataset), "num_folds": 2, **TINY}
    configs = [
        "configs/train.json",
        "configs/evaluate.json",
        probe(tmp_path, "msd", train_report + TRAINER_EFFECTS + "}"),
    ]
    runs["msd train"] = bundle_start(
        msd,
        configs,
        **msd_common,
        pretrained_ckpt=str(tmp_path / "ssl.pt"),
        ssl_init="true",  # BrainTumour's table says false (MRI): load the CT encoder anyway, to meet adapt_in_channels
        adapt_in_channels="false",
        **LOWER_CASE_FALSE,
    )
    configs = ["configs/inference.json", probe(tmp_path, "msd_infer", "{" + INFERENCE_EFFECTS + "}")]
    runs["msd inference"] = bundle_start(msd, configs, **msd_common, **infer_flags, strict_domain="false")

    # SSL: the settings in an override file, as strings in other spellings; an unreadable image (check_data off)
    unlabeled = tmp_path / "unlabeled"
    for i in range(3):
        write_ct_case(unlabeled, f"ct{i}", seed=i)
    (unlabeled / "imagesTr" / "broken.nii.gz").write_bytes(b"not an image")
    ssl = bundle_copy("swin_unetr_ssl_pretrain", tmp_path)
    (ssl / "models").mkdir()
    torch.save({}, ssl / "models" / "latest.pt")
    spelled = {"progress": "No", "amp": "FALSE", "legacy_patch_merging": "off", "resume": "0"}
    spelled.update(cpu_keep_freed_memory="no", check_data="False")
    report = "{'cases': len(@train#data) + len(@validate#dataset#data), " + TRAINER_EFFECTS + "}"
    ssl_small = {"feature_size": 12, "roi_size": SSL_SMALL_ROI, "num_workers": 0, "batch_size": 1, "val_fraction": 0.25}
    configs = ["configs/train.json", probe(tmp_path, "ssl", report, **spelled)]
    runs["ssl train"] = bundle_start(ssl, configs, dataset_dir=str(unlabeled / "imagesTr"), **ssl_small)

    results = {name: finish(process) for name, process in runs.items()}
    found = {name: effects(result) for name, result in results.items()}
    for name, result in results.items():
        _assert_all_off(found[name], output(result))
    assert found["btcv train"]["cases"] == 3 and found["btcv train"]["eval_amp"] is False
    assert found["btcv inference"]["inputs"] == 3
    assert found["msd train"]["cases"] == 2 and found["msd train"]["eval_amp"] is False
    assert "patch embedding skipped" in output(results["msd train"])
    assert found["msd inference"]["inputs"] == 1
    assert found["ssl train"]["cases"] == 4


def test_a_value_that_is_not_a_boolean_is_an_error_naming_the_setting(tmp_path):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(BUNDLES / "swin_unetr_btcv_seg" / "configs" / "train.json"),
        workflow_type="train",
        resume="nope",
    )
    with pytest.raises(Exception) as error:
        workflow.parser.get_parsed_content("train#resume_loader#enabled")
    assert "--resume 'nope': not a boolean; use one of true/1/yes/on or false/0/no/off (any case)" in str(
        error.value.__cause__ or error.value
    )


# --- 2 and 5. runs kept apart; partial checkpoints removed ---------------------------------------------------------

STALLED_SAVE = """
import sys, time, torch
from swin_unetr_kit.checkpoint import atomic_torch_save
class Stall:
    def __reduce__(self):
        print("saving", flush=True)
        time.sleep(120)
        return (int, (0,))
atomic_torch_save({"weights": torch.zeros(2**20), "stall": Stall()}, sys.argv[1])
"""


def kill_during_save(target: Path) -> Path:
    """Start a checkpoint save of ``target`` in a subprocess and SIGKILL it half-way; return the partial file left."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-c", STALLED_SAVE, str(target)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout.readline().strip() == "saving"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    (partial,) = target.parent.glob(".tmp_*.pt")
    return partial


def test_a_partial_checkpoint_of_a_killed_save_is_removed_at_the_next_start(tmp_path):
    from ignite.engine import Engine

    folder = tmp_path / "models"
    folder.mkdir()
    torch.save({"epoch": 1}, folder / "latest.pt")
    (folder / ".tmp_notes.txt").write_text("not ours")
    partial = kill_during_save(folder / "latest.pt")
    assert torch.load(folder / "latest.pt")["epoch"] == 1  # the previous checkpoint is intact
    loader = checkpoint.ResumeCheckpointLoader(str(folder / "latest.pt"), {"net": torch.nn.Linear(1, 1)}, enabled=False)
    loader.attach(Engine(lambda engine, batch: None))
    assert not partial.exists()
    assert sorted(p.name for p in folder.iterdir()) == [".tmp_notes.txt", "latest.pt"]


def test_msd_folds_never_share_a_run(tmp_path):
    """fold 0, then fold 1, then fold 0 again, then fold 0 with another seed, through the README's command."""
    task = "Task09_Spleen"
    dataset = write_msd_task(tmp_path / "data", task, task_settings(task, TASKS_FILE))
    msd = bundle_copy("swin_unetr_msd", tmp_path)
    common = {"task": task, "dataset_dir": str(dataset), "num_folds": 2, **TINY, "progress": "false"}
    common.update({"train#trainer#max_epochs": 1, "val_interval": 10})
    runs = msd / "models" / task

    first = bundle_run(msd, ["configs/train.json"], **common, fold=0)
    assert first.returncode == 0, output(first)[-3000:]
    fold0 = (runs / "fold0of2" / "latest.pt").read_bytes()
    assert json.loads((runs / "fold0of2" / "run_settings.json").read_text())["fold"] == 0

    second = bundle_run(msd, ["configs/train.json"], **common, fold=1)
    assert second.returncode == 0, output(second)[-3000:]
    assert "no checkpoint at ./models/Task09_Spleen/fold1of2/latest.pt: training starts afresh" in output(second)
    assert (runs / "fold1of2" / "latest.pt").is_file() and (runs / "fold0of2" / "latest.pt").read_bytes() == fold0
    assert sorted(p.name for p in runs.iterdir()) == ["fold0of2", "fold1of2"]
    assert sorted(p.name for p in (msd / "eval" / task).iterdir()) == ["fold0of2", "fold1of2"]

    partial = kill_during_save(runs / "fold0of2" / "latest.pt")  # a save of fold 0 killed half-way
    third = bundle_run(msd, ["configs/train.json"], **common, fold=0)
    assert third.returncode == 0, output(third)[-3000:]
    assert "resumed from ./models/Task09_Spleen/fold0of2/latest.pt at epoch 1" in output(third)
    assert not partial.exists() and "a partial checkpoint left by an interrupted save" in output(third)

    changed = bundle_run(msd, ["configs/train.json"], **common, fold=0, seed=7, resume_despite_changes="false")
    assert changed.returncode != 0
    assert (
        "./models/Task09_Spleen/fold0of2/latest.pt: this run was started with other settings (seed: 123 -> 7); pass "
        "--resume false to start afresh in this folder (its checkpoints are replaced), --resume_despite_changes true "
        "to continue it, or change the output folder (--bundle_root)"
    ) in output(changed)
    told = bundle_run(msd, ["configs/train.json"], **common, fold=0, seed=7, resume_despite_changes="true")
    assert told.returncode == 0 and "although its settings changed (seed: 123 -> 7)" in output(told)


def test_run_names():
    from swin_unetr_kit.msd import run_name

    assert run_name() == "fold0of5"
    assert run_name(1, 5, 0.25) == "fold1of5_frac0.25"
    assert run_name(2, 10, 1.0, 3) == "fold2of10_split3"
    with pytest.raises(ValueError, match="fold 5 of 5"):
        run_name(5, 5)


# --- 3 and 4. every voxel read, every bad case named in one error --------------------------------------------------


def _bad_cases(folder: Path) -> dict[str, Path]:
    """Good and bad CT cases in imagesTr/labelsTr: truncated, NaN, Inf, constant."""
    cases = {name: write_ct_case(folder, name, seed=i) for i, name in enumerate(["good0", "good1", "cut", "nan"])}
    cases.update({name: write_ct_case(folder, name, seed=9) for name in ("inf", "flat")})
    image = Path(cases["cut"]["image"])
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        img = nib.load(cases[name]["image"])
        voxels = np.asarray(img.dataobj, dtype=np.float32)
        voxels[3, 3, 3] = value
        nib.save(nib.Nifti1Image(voxels, img.affine), cases[name]["image"])
    img = nib.load(cases["flat"]["image"])
    nib.save(nib.Nifti1Image(np.full(img.shape, -1000, np.int16), img.affine), cases["flat"]["image"])
    return {name: Path(case["image"]) for name, case in cases.items()}


BAD_CASE_MESSAGES = {
    "cut": ": cannot be read to the end, truncated or corrupt (EOFError: Compressed file ended before the "
    "end-of-stream marker was reached)",
    "nan": ": contains NaN or infinite values",
    "inf": ": contains NaN or infinite values",
    "flat": ": every voxel is -1000 (a constant image, nothing to segment)",
}


def test_training_and_inference_name_every_bad_volume_in_one_error(tmp_path):
    images = _bad_cases(tmp_path / "data")
    btcv = bundle_copy("swin_unetr_btcv_seg", tmp_path)
    training = bundle_start(btcv, ["configs/train.json"], dataset_dir=str(tmp_path / "data"), **TINY)
    inference = bundle_start(btcv, ["configs/inference.json"], input=str(tmp_path / "data" / "imagesTr"), **TINY)
    for result in (finish(training), finish(inference)):
        assert result.returncode != 0
        assert "4 of 6 cases cannot be used:" in output(result)
        for name, message in BAD_CASE_MESSAGES.items():
            assert f"{images[name]}{message}" in output(result)
    # nothing written
    assert sorted(p.name for p in btcv.iterdir()) == ["LICENSE", "configs", "docs", "large_files.yml", "swin_unetr_kit"]


def test_the_voxel_check_is_cached_by_size_and_modification_time(tmp_path, monkeypatch):
    case = write_ct_case(tmp_path, "a")
    first = scan_volume(case["image"])
    check_cases([case])

    def no_reading(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(data, "_read_voxels", no_reading)
    assert scan_volume(case["image"]) == first
    check_cases([case])  # image and label from the cache
    os.utime(case["image"], ns=(0, 0))  # modified: read again
    with pytest.raises(DataError, match="read again"):
        scan_volume(case["image"])


def test_the_voxel_check_writes_no_cache_unless_asked(tmp_path, monkeypatch):
    """By default a run writes nothing outside the bundle's folder: the cross-run cache is kept only in the folder
    ``$SWIN_UNETR_CACHE`` names."""
    monkeypatch.delenv("SWIN_UNETR_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    case = write_ct_case(tmp_path, "a")
    check_cases([case])
    scan_volume(case["image"])
    assert not (tmp_path / "home").exists()


# --- 6. no folder for an invalid task or run -----------------------------------------------------------------------


def test_an_invalid_task_or_fold_leaves_no_folder(tmp_path):
    msd = bundle_copy("swin_unetr_msd", tmp_path)
    typo = bundle_start(msd, ["configs/train.json"], task="Task11_Kidney", dataset_dir=str(tmp_path))
    fold = bundle_start(msd, ["configs/train.json"], fold=5, dataset_dir=str(tmp_path))
    typo, fold = finish(typo), finish(fold)
    assert typo.returncode != 0 and "'Task11_Kidney' is none of the MSD tasks (Task01_BrainTumour" in output(typo)
    assert fold.returncode != 0 and "fold 5 of 5: fold must be in 0..num_folds - 1" in output(fold)
    assert sorted(p.name for p in msd.iterdir()) == ["LICENSE", "configs", "docs", "swin_unetr_kit"]


# --- 7. domain check -----------------------------------------------------------------------------------------------


def test_a_whole_brain_through_hippocampus_is_a_warning_or_with_strict_domain_an_error(tmp_path, caplog):
    settings = task_settings("Task04_Hippocampus", TASKS_FILE)
    brain = tmp_path / "brain.nii.gz"
    voxels = np.random.default_rng(0).uniform(0, 500, (90, 110, 90)).astype(np.float32)
    nib.save(nib.Nifti1Image(voxels, np.diag([2.0, 2.0, 2.0, 1.0])), brain)
    expected = f"{brain}: unusual for this bundle: extent 180 x 220 x 180 mm, expected about 20-90 x 20-90 x 20-90 mm"
    with caplog.at_level("WARNING", logger="swin_unetr_kit.data"):
        check_cases([{"image": str(brain)}], domain=settings["domain"])
    assert expected in caplog.text and "the run goes on; --strict_domain true makes this an error" in caplog.text
    with pytest.raises(DataError, match=re.escape(expected)):
        check_cases([{"image": str(brain)}], domain=settings["domain"], strict_domain=True)


def test_a_head_ct_through_btcv_inference_with_strict_domain_stops_before_writing(tmp_path):
    head = tmp_path / "head" / "head_ct.nii.gz"
    head.parent.mkdir()
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in (46, 46, 32)], indexing="ij"), -1)
    skull = (((grid - [23, 23, 16]) / [20, 22, 15]) ** 2).sum(-1) < 1
    nib.save(nib.Nifti1Image(np.where(skull, 40, -1000).astype(np.int16), np.diag([5.0, 5.0, 5.0, 1.0])), head)
    btcv = bundle_copy("swin_unetr_btcv_seg", tmp_path)
    result = bundle_run(btcv, ["configs/inference.json"], input=str(head), strict_domain="true", **TINY)
    assert result.returncode != 0
    assert (
        f"{head}: unusual for this bundle: extent 230 x 230 x 160 mm, expected about 240-600 x 240-600 x 30-1200 mm"
        in output(result)
    )
    assert sorted(p.name for p in btcv.iterdir()) == ["LICENSE", "configs", "docs", "large_files.yml", "swin_unetr_kit"]
