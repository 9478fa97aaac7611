"""Never lose a user's file, never report success on a wrong result (issue 26), through the commands a user types:
outputs that would land on inputs or on each other are refused before the network runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import test_zoo
import torch
import zoo
from conftest import REPO, write_ct_case
from monai.networks.nets import SwinUNETR
from test_robustness import TINY, bundle_copy, bundle_run, output


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
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


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
