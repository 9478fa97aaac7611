"""SSL inference's outputs (issue 26, item 2 for the SSL bundle): cases of the same name in two folders get an output
set each, as the segmentation bundles' ``SaveImaged`` keeps them apart; inputs that would still share one are refused
before the network runs. Through the README's command, from the bundle folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import torch
from conftest import REPO, write_ct_case

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
    cmd += ["--roi_size", "[64, 64, 64]", "--output_dir", str(out), "--progress", "false"]
    return subprocess.run(cmd, cwd=SSL_BUNDLE, capture_output=True, text=True, timeout=300)


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
