"""Every case of the README's "Bad input" table through the command a user types: the run fails and the last line of
its output is the bundle's own message (MONAI's ``Failed to evaluate ConfigExpression`` wrapper and the expression came
last before :mod:`swin_unetr_kit.errors`). All runs start at once and are then awaited: each stops before training."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import preloaded_python
import pytest
import torch
from conftest import REPO, SMALL_ROI, write_ct_case, write_msd_task

from swin_unetr_kit.msd import task_settings

BUNDLES = REPO / "bundles"
TINY = {"network_def#feature_size": 12, "roi_size": SMALL_ROI, "num_samples": 1, "num_workers": 0}
TINY |= {"cache_rate": 0.0, "sw_batch_size": 1}


def _bad_volumes(root: Path) -> list[str]:
    """A datalist of one good case and one bad case per kind the data check names; the expected lines."""
    cases = {n: write_ct_case(root, n, seed=i) for i, n in enumerate(["good", "cut", "nan", "flat", "two", "shape"])}
    cases |= {n: write_ct_case(root, n, seed=9) for n in ("grid", "values", "garbage")}
    image = Path(cases["cut"]["image"])
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    img = nib.load(cases["nan"]["image"])
    voxels = np.asarray(img.dataobj, dtype=np.float32)
    voxels[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(voxels, img.affine), cases["nan"]["image"])
    flat = nib.load(cases["flat"]["image"])  # constant, on its own label's grid
    nib.save(nib.Nifti1Image(np.full(flat.shape, -1000, np.int16), flat.affine), cases["flat"]["image"])
    nib.save(nib.Nifti1Image(np.stack([voxels * 0 + 40] * 2, -1), img.affine), cases["two"]["image"])
    label = nib.load(cases["shape"]["label"])
    shape = label.shape
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[:, :, :-1], label.affine), cases["shape"]["label"])
    label = nib.load(cases["grid"]["label"])
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), label.affine * 2), cases["grid"]["label"])
    label = nib.load(cases["values"]["label"])
    nib.save(nib.Nifti1Image(np.full(label.shape, 99, np.uint8), label.affine), cases["values"]["label"])
    Path(cases["garbage"]["image"]).write_bytes(b"not an image")
    missing = {"image": str(root / "imagesTr" / "gone.nii.gz"), "label": cases["good"]["label"]}
    bad = [c for n, c in cases.items() if n != "good"] + [missing]
    (root / "dataset_0.json").write_text(json.dumps({"training": bad, "validation": [cases["good"]]}))
    return [
        "cannot be read to the end, truncated or corrupt",
        "contains NaN or infinite values",
        "every voxel is -1000 (a constant image, nothing to segment)",
        "has 2 channels, the network expects 1",
        f"label shape {(*shape[:2], shape[2] - 1)} differs from image shape {shape}",
        "label geometry (origin, spacing or direction) differs from the image's",
        "label values [99] outside the 14 classes 0..13",
        "cannot be read as NIfTI",
        "gone.nii.gz: file not found",
    ]


def _cases(root: Path) -> dict[str, tuple[str, list[str], dict, list[str]]]:
    """case -> (bundle, config files, overrides, expected fragments of the last lines, in order)."""
    bad = _bad_volumes(root / "bad")
    unlabelled = root / "unlabelled"
    for i in range(2):
        write_ct_case(unlabelled, f"case{i}", seed=i, label_name=f"other{i}")
    (root / "no_layout").mkdir()
    (root / "no_layout" / "notes.txt").write_text("hello")
    (root / "bad_json").mkdir()
    (root / "bad_json" / "dataset_0.json").write_text("{not json")
    empty_split = root / "empty_split"
    good = write_ct_case(empty_split, "a")
    (empty_split / "dataset_0.json").write_text(json.dumps({"training": [good], "validation": []}))
    (root / "empty").mkdir()
    usable = root / "good"
    pair = [write_ct_case(usable, f"case{i}", seed=i) for i in range(2)]
    (usable / "dataset_0.json").write_text(json.dumps({"training": pair[:1], "validation": pair[1:]}))
    tasks_file = BUNDLES / "swin_unetr_msd" / "configs" / "tasks.json"
    liver = write_msd_task(root / "msd", "Task03_Liver", task_settings("Task03_Liver", tasks_file), 3)
    resumed = root / "resumed"
    (resumed / "models").mkdir(parents=True)
    torch.save({}, resumed / "models" / "latest.pt")  # settings are compared before any loading
    (resumed / "models" / "run_settings.json").write_text(json.dumps({"seed": 7}))
    head = root / "head" / "head_ct.nii.gz"
    head.parent.mkdir()
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in (46, 46, 32)], indexing="ij"), -1)
    skull = (((grid - [23, 23, 16]) / [20, 22, 15]) ** 2).sum(-1) < 1
    nib.save(nib.Nifti1Image(np.where(skull, 40, -1000).astype(np.int16), np.diag([5.0, 5.0, 5.0, 1.0])), head)
    btcv, msd, train, infer = (
        "swin_unetr_btcv_seg",
        "swin_unetr_msd",
        ["configs/train.json"],
        ["configs/inference.json"],
    )
    return {
        "bad volumes": (btcv, train, {"dataset_dir": str(root / "bad")}, ["9 of 10 cases cannot be used:", *bad]),
        "images without a label": (btcv, train, {"dataset_dir": str(unlabelled)}, ["2 images have no label in"]),
        "no known layout": (btcv, train, {"dataset_dir": str(root / "no_layout")}, ["no datalist (dataset_0.json"]),
        "no data set folder": (btcv, train, {"dataset_dir": str(root / "gone")}, ["data set folder not found"]),
        "unreadable datalist": (btcv, train, {"dataset_dir": str(root / "bad_json")}, ["not a readable JSON datalist"]),
        "empty split": (btcv, train, {"dataset_dir": str(empty_split)}, ["the 'validation' list is empty"]),
        "nothing to predict": (btcv, infer, {"input": str(root / "empty")}, ["no images or DICOM series to predict"]),
        "another task's data": (msd, train, {"dataset_dir": str(liver)}, ["do not match Task09_Spleen's"]),
        "mistyped task": (
            msd,
            train,
            {"task": "Task11_Kidney"},
            ["'Task11_Kidney' is none of the MSD tasks (Task01_BrainTumour"],
        ),
        "no such fold": (msd, train, {"fold": 5, "dataset_dir": str(liver)}, ["fold 5 of 5: fold must be in 0.."]),
        "too few cases for the folds": (
            msd,
            train,
            {"task": "Task03_Liver", "dataset_dir": str(liver)},
            ["3 labelled cases cannot make 5 folds (set --num_folds)"],
        ),
        "not a boolean": (btcv, train, {"resume": "nope", "dataset_dir": str(usable)}, ["--resume 'nope': not a"]),
        "resume with other settings": (
            btcv,
            train,
            {"bundle_root": str(resumed), "dataset_dir": str(usable)},
            ["latest.pt: this run was started with other settings ("],
        ),
        "outside the domain, strict": (
            btcv,
            infer,
            {"input": str(head), "strict_domain": "true"},
            ["head_ct.nii.gz: unusual for this bundle: extent 230 x 230 x 160 mm"],
        ),
        "no pretrained checkpoint": (
            btcv,
            train,
            {"pretrained_ckpt": str(root / "gone.pt"), "dataset_dir": str(usable)},
            ["gone.pt: pretrained checkpoint not found"],
        ),
    }


@pytest.fixture(scope="module")
def failed_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, list[str]]]:
    root = tmp_path_factory.mktemp("bad_input")
    env = dict(os.environ, SWIN_UNETR_CACHE=str(root / "cache"), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    started = {}
    for name, (bundle, config_files, overrides, expected) in _cases(root).items():
        folder = root / "bundles" / name.replace(" ", "_").replace("'", "")
        shutil.copytree(BUNDLES / bundle, folder)
        args = [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in {**TINY, **overrides}.items()]
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", *config_files, *args]
        process = preloaded_python.popen(cmd, cwd=folder, env=env)
        started[name] = (process, expected)
    results = {}
    for name, (process, expected) in started.items():
        stdout, stderr = process.communicate(timeout=900)
        results[name] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), expected)
    return results


@pytest.mark.parametrize(
    "case",
    [
        "bad volumes",
        "images without a label",
        "no known layout",
        "no data set folder",
        "unreadable datalist",
        "empty split",
        "nothing to predict",
        "another task's data",
        "mistyped task",
        "no such fold",
        "too few cases for the folds",
        "not a boolean",
        "resume with other settings",
        "outside the domain, strict",
        "no pretrained checkpoint",
    ],
)
def test_the_last_lines_are_the_bundles_message(failed_runs, case):
    result, expected = failed_runs[case]
    assert result.returncode != 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    last = lines[-len(expected) :]
    assert re.match(r"[\w.]+: ", last[0]), result.stderr[-3000:]  # the error's class, then its message
    for line, fragment in zip(last, expected, strict=True):
        assert fragment in line, result.stderr[-3000:]
