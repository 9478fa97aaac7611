"""Outputs (issue 26, items 2 and 6): SSL inference gives cases of the same name in two folders an output set each,
as the segmentation bundles' ``SaveImaged`` keeps them apart, and refuses inputs that would still share one before the
network runs (through the README's command, from the bundle folder); a label map whose writing fails leaves no file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import preloaded_python
import torch
from conftest import REPO, SSL_SMALL_ROI, write_ct_case

from swin_unetr_kit.ssl import SSLHead

SSL_BUNDLE = REPO / "bundles" / "swin_unetr_ssl_pretrain"
KINDS = ("view", "reconstruction", "target")


def ssl_inference(tmp_path: Path, inputs: Path, out: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file configs/inference.json`` with a small (feature_size 12) model."""
    if not (tmp_path / "models" / "model.pt").exists():
        (tmp_path / "models").mkdir()
        torch.manual_seed(0)
        torch.save(SSLHead(feature_size=12).state_dict(), tmp_path / "models" / "model.pt")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    cmd += ["--bundle_root", str(tmp_path), "--input", str(inputs), "--feature_size", "12"]
    cmd += ["--roi_size", json.dumps(SSL_SMALL_ROI), "--output_dir", str(out), "--progress", "false"]
    return preloaded_python.run(cmd, cwd=SSL_BUNDLE, timeout=300)


def test_ssl_cases_of_the_same_name_in_two_folders_get_an_output_set_each(tmp_path):
    data = tmp_path / "data"
    for patient, seed in (("p1", 0), ("p2", 1)):
        (data / patient).mkdir(parents=True)
        case = write_ct_case(tmp_path / f"gen{seed}", "img", shape=(70, 66, 60), seed=seed)
        shutil.copy(case["image"], data / patient / "img.nii.gz")
    datalist = tmp_path / "list.json"
    datalist.write_text('{"test": [{"image": "data/p1/img.nii.gz"}, {"image": "data/p2/img.nii.gz"}]}')
    out = tmp_path / "out"
    result = ssl_inference(tmp_path, datalist, out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    expected = [f"{p}/img_{k}.nii.gz" for p in ("p1", "p2") for k in KINDS]
    expected += [f"{p}/img_{k}" for p in ("p1", "p2") for k in ("rotation.json", "ssl.png")]
    assert written == sorted(expected)
    targets = [nib.load(out / p / "img_target.nii.gz").get_fdata() for p in ("p1", "p2")]
    assert abs(targets[0] - targets[1]).max() > 0  # each its own case's crop


def test_ssl_inputs_that_would_share_an_output_are_refused_before_the_network(tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    case = write_ct_case(tmp_path / "gen", "img", shape=(70, 66, 60))
    shutil.copy(case["image"], folder / "img.nii.gz")
    nib.save(nib.load(case["image"]), folder / "img.nii")
    out = tmp_path / "out"
    result = ssl_inference(tmp_path, folder, out)
    assert result.returncode != 0
    last = (result.stdout + result.stderr).rstrip().splitlines()[-1]
    assert last == (
        f"swin_unetr_kit.data.DataError: {folder / 'img.nii.gz'}: would be written to {out / 'img_view.nii.gz'} like "
        f"{folder / 'img.nii'}; rename one of them"
    )
    assert not out.exists()


def test_a_write_that_fails_midway_leaves_no_partial_file(tmp_path):
    """A disk that fills while the label map is written (MONAI's SaveImaged left the truncated file and blamed the
    "writer libraries"): the file is removed and the error names it and the cause in its last line."""
    import subprocess as sp

    import numpy as np
    import pytest
    from monai.data import MetaTensor

    from swin_unetr_kit.data import WholeFileSaveImaged

    disk = tmp_path / "small"
    disk.mkdir()
    if sp.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        noise = np.random.default_rng(0).integers(0, 256, (1, 160, 160, 160), dtype=np.uint8)  # 4 MB of noise
        pred = MetaTensor(torch.as_tensor(noise), meta={"filename_or_obj": str(tmp_path / "ct.nii.gz")})
        options = {"output_dir": str(disk), "output_postfix": "seg", "output_dtype": np.uint8, "separate_folder": False}
        with pytest.raises(OSError) as raised:
            WholeFileSaveImaged("pred", **options)({"pred": pred})
        target = disk / "ct_seg.nii.gz"
        assert str(raised.value).startswith(f"{target}: could not be written (the written file is truncated, 0.00 MB")
        assert str(raised.value).endswith("no partial file is left")
        assert list(disk.iterdir()) == []
        WholeFileSaveImaged("pred", **options)({"pred": pred[:, :40]})  # what fits is written and kept
        assert nib.load(disk / "ct_seg.nii.gz").shape == (40, 160, 160)
    finally:
        sp.run(["umount", str(disk)], check=True)
