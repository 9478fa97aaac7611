"""A data set of one's own in the MSD bundle: planned from its fingerprint, trained, evaluated and inferred through
the commands of the README, and every bad input a clear message naming the file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import preloaded_python
import pytest
import torch
from conftest import REPO, SMALL

from swin_unetr_kit.data import check_cases
from swin_unetr_kit.plan import plan_dataset
from swin_unetr_kit.ssl import SSLHead

MSD_BUNDLE = REPO / "bundles" / "swin_unetr_msd"
# the sample torso's organs kept, renumbered 1..3 (BTCV value in the sample -> new value)
TORSO_ORGANS = {"spleen": 1, "liver": 6, "right kidney": 2}
TINY = {k: v for k, v in SMALL.items() if k != "pixdim"}  # the plan's own spacing is kept


def bundle_run(run_id: str, configs: list[str], cwd: Path = MSD_BUNDLE, **overrides) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run <run_id>`` from the MSD bundle folder (or a copy of it), as the README shows it."""
    files = configs[0] if len(configs) == 1 else json.dumps(configs)
    args = [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", files, *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return preloaded_python.run(cmd, cwd=cwd, timeout=900, env=env)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


def write_torso_nnunet(root: Path, sample: Path) -> Path:
    """Three organs of the sample torso, renumbered 1..3, in nnU-Net v2's raw layout: three training crops along the
    last axis and one test crop, one ``_0000`` file each."""
    image = nib.load(sample / "imagesTr" / "ts_torso.nii.gz")
    voxels = np.asarray(image.dataobj).astype(np.int16)
    original = np.asarray(nib.load(sample / "labelsTr" / "ts_torso.nii.gz").dataobj)
    label = np.zeros(original.shape, np.uint8)
    for new, old in enumerate(TORSO_ORGANS.values(), 1):
        label[original == old] = new
    crops = {"torso_000": (0, 112), "torso_001": (0, 80), "torso_002": (24, 112), "torso_003": (10, 90)}
    for i, (name, (start, stop)) in enumerate(crops.items()):
        affine = image.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, start], [0, 0, 0, 1]])
        folder = "imagesTs" if i == 3 else "imagesTr"
        save(root / folder / f"{name}_0000.nii.gz", voxels[..., start:stop], affine)
        if i < 3:
            save(root / "labelsTr" / f"{name}.nii.gz", label[..., start:stop], affine)
    labels = {"background": 0, **{organ: i for i, organ in enumerate(TORSO_ORGANS, 1)}}
    description = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 3, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(description, indent=4))
    return root


def mri_case(shape: tuple[int, int, int], seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Two positive MRI-like channels on a zero background, and a label map with two nested structures."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    distance = np.sqrt((((grid - np.array(shape) / 2) / (np.array(shape) / 2)) ** 2).sum(-1))
    label = np.where(distance < 0.3, 2, np.where(distance < 0.55, 1, 0)).astype(np.uint8)
    body = distance < 0.9
    channels = [np.where(body, 200.0 + 80 * label * (c + 1) + rng.normal(0, 5, shape), 0.0) for c in range(2)]
    return [c.astype(np.float32) for c in channels], label


def write_mri_nnunet(root: Path) -> Path:
    """A two-channel non-CT data set in nnU-Net v2's raw layout (``_0000`` T2, ``_0001`` ADC); the last training case
    stored flipped (LAS) at another spacing, to be named in the warnings."""
    geometry = [((40, 44, 36), (1.2, 1.2, 2.0))] * 3 + [((40, 44, 14), (1.2, 1.2, 5.0))]
    for i, (shape, spacing) in enumerate(geometry + [((40, 44, 36), (1.2, 1.2, 2.0))]):
        channels, label = mri_case(shape, i)
        affine = np.diag([*spacing, 1.0])
        if i == 3:
            affine[0, 0] = -spacing[0]
        folder = "imagesTs" if i == len(geometry) else "imagesTr"
        for c, voxels in enumerate(channels):
            save(root / folder / f"prostate_{i:03d}_{c:04d}.nii.gz", voxels, affine)
        if folder == "imagesTr":
            save(root / "labelsTr" / f"prostate_{i:03d}.nii.gz", label, affine)
    description = {
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "outer": 1, "inner": 2},
        "numTraining": len(geometry),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(description, indent=4))
    return root


# a synthetic CT set in the Decathlon layout with known spacings and foreground intensities: (shape, spacing)
KNOWN = [((128, 90, 12), (0.8, 0.8, 5.0)), ((120, 84, 10), (0.7, 0.7, 4.0)), ((140, 100, 14), (0.9, 0.9, 6.0))]


def write_known_ct(root: Path) -> tuple[Path, list[np.ndarray]]:
    """Air around a body, labels 1 and 2 (3 is declared but in no case) with known foreground intensities."""
    foregrounds, training = [], []
    for i, (shape, spacing) in enumerate(KNOWN):
        rng = np.random.default_rng(i)
        image = np.full(shape, -1000.0, np.float32)
        label = np.zeros(shape, np.uint8)
        label[10:40, 10:40, 2:8] = 1
        label[50:70, 30:60, 3:9] = 2
        image[label > 0] = rng.uniform(-100 + 20 * i, 300 - 10 * i, int((label > 0).sum())).astype(np.float32)
        foregrounds.append(image[label > 0])
        affine = np.diag([*spacing, 1.0])
        save(root / "imagesTr" / f"ct_{i}.nii.gz", image, affine)
        save(root / "labelsTr" / f"ct_{i}.nii.gz", label, affine)
        training.append({"image": f"./imagesTr/ct_{i}.nii.gz", "label": f"./labelsTr/ct_{i}.nii.gz"})
    description = {
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "organ", "2": "lesion", "3": "rare"},
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(description))
    return root, foregrounds


def test_plan_equals_the_hand_computation_and_reads_each_file_once(tmp_path, monkeypatch):
    dataset, foregrounds = write_known_ct(tmp_path / "Dataset101_Known")
    monkeypatch.setenv("SWIN_UNETR_CACHE", str(tmp_path / "cache"))
    reads = Counter()
    read = nib.arrayproxy.ArrayProxy._get_unscaled

    def counted(self, slicer):
        reads[str(self.file_like)] += 1
        return read(self, slicer)

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "_get_unscaled", counted)
    plan_file = plan_dataset("Dataset101_Known", dataset, tmp_path / "models" / "plan.json", num_folds=3)
    plan = json.loads(plan_file.read_text())
    cases = [{"image": str(p), "label": str(dataset / "labelsTr" / p.name)} for p in (dataset / "imagesTr").iterdir()]
    check_cases(cases, in_channels=1, num_classes=4)  # the training's data check: from the fingerprint's read
    files = [str(f) for f in (dataset / "imagesTr").iterdir()] + [str(f) for f in (dataset / "labelsTr").iterdir()]
    assert dict(reads) == dict.fromkeys(files, 1)

    entry = plan["Dataset101_Known"]
    spacings = np.array([s for _, s in KNOWN])
    shapes = np.array([s for s, _ in KNOWN], dtype=float)
    # z: 5.0 > 3 x 0.8 mm and 12 x 3 < 90 voxels: anisotropic, so nnU-Net's 10th percentile of 4, 5, 6 mm = 4.2
    spacing = [0.8, 0.8, round(float(np.percentile(spacings[:, 2], 10)), 2)]
    assert entry["spacing"] == spacing == [0.8, 0.8, 4.2]
    median_shape = np.median(shapes * spacings / np.array(spacing), axis=0)  # 128, 90, 14.3
    assert entry["roi_size"] == [96, 64, 64] == [max(64, min(96, 32 * int(s // 32))) for s in median_shape]
    low = np.mean([np.percentile(f, 0.5) for f in foregrounds])
    high = np.mean([np.percentile(f, 99.5) for f in foregrounds])
    assert entry["intensity"] == {"window": [round(low), round(high)]}
    assert entry["crop_ratios"] == [1, 1, 1, 0]  # "rare" is in no case
    assert (entry["modality"], entry["in_channels"], entry["ssl_init"]) == ("CT", 1, True)
    assert entry["labels"] == {"0": "background", "1": "organ", "2": "lesion", "3": "rare"}
    assert entry["schedule"] == {"iterations": 120000}
    assert "anisotropic" in plan["_plan"]["why"]["spacing"]


@pytest.fixture(scope="module")
def ssl_checkpoint(tmp_path_factory) -> Path:
    """An encoder checkpoint as the SSL bundle writes it (feature size 12)."""
    path = tmp_path_factory.mktemp("ssl") / "model.pt"
    torch.save(SSLHead(in_channels=1, feature_size=12).state_dict(), path)
    return path


def test_own_ct_data_nnunet_layout_plans_trains_evaluates_and_infers(tmp_path, sample_dataset, ssl_checkpoint):
    """The README's three commands, from a copy of the bundle folder (outputs in their default places)."""
    task = "Dataset042_Torso"
    dataset = write_torso_nnunet(tmp_path / task, sample_dataset)
    bundle = Path(shutil.copytree(MSD_BUNDLE, tmp_path / "swin_unetr_msd"))
    # the plan's spacing (3 mm) overridden by 6 mm to keep the run short: every entry stays an override
    common = {**TINY, "task": task, "dataset_dir": str(dataset), "num_folds": 3, "pixdim": [6.0] * 3}
    log = ok(
        bundle_run(
            "training",
            ["configs/train.json"],
            cwd=bundle,
            **common,
            pretrained_ckpt=str(ssl_checkpoint),
            **{"train#trainer#max_epochs": 1, "train#trainer#epoch_length": 1, "val_interval": 1},
        )
    )
    assert "plan for Dataset042_Torso" in log and "fingerprint of 3 cases" in log
    assert "loaded 126 of 126 encoder tensors" in log  # CT: from the SSL encoder
    runs = bundle / "models" / task
    plan = json.loads((runs / "plan.json").read_text())[task]
    assert plan["intensity"]["window"][0] < 0 < plan["intensity"]["window"][1] and plan["ssl_init"]
    assert plan["spacing"] == [3.0, 3.0, 3.0] and plan["in_channels"] == 1 and plan["crop_ratios"] == [1, 1, 1, 1]
    meta = json.loads((runs / "fold0of3" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background",
        "1": "spleen",
        "2": "liver",
        "3": "right kidney",
    }
    assert json.loads((runs / "fold0of3" / "plan.json").read_text())[task] == plan  # travels with the model
    planned = (runs / "plan.json").stat().st_mtime_ns

    log = ok(bundle_run("evaluating", ["configs/train.json", "configs/evaluate.json"], cwd=bundle, **common))
    assert "fingerprint of" not in log and "reusing the plan" in log
    report = json.loads((bundle / "eval" / task / "fold0of3" / "metrics.json").read_text())
    assert set(report["summary"]["dice"]) == {"spleen", "liver", "right kidney", "mean"}

    inference = {k: v for k, v in common.items() if k not in ("num_samples", "cache_rate", "dataset_dir")}
    log = ok(
        bundle_run("evaluating", ["configs/inference.json"], cwd=bundle, **inference, input=str(dataset / "imagesTs"))
    )
    assert "fingerprint of" not in log and (runs / "plan.json").stat().st_mtime_ns == planned
    (prediction,) = (bundle / "predictions" / task / "fold0of3").iterdir()
    assert nib.load(prediction).shape == nib.load(dataset / "imagesTs" / "torso_003_0000.nii.gz").shape
    assert set(np.unique(np.asarray(nib.load(prediction).dataobj)).tolist()) <= {0, 1, 2, 3}


def test_own_two_channel_mri_nnunet_layout_trains_and_infers(tmp_path):
    task = "Dataset043_TwoChannel"
    dataset = write_mri_nnunet(tmp_path / task)
    runs = tmp_path / "runs"
    common = {**TINY, "task": task, "bundle_root": str(MSD_BUNDLE), "plan_file": str(runs / "plan.json")}
    log = ok(
        bundle_run(
            "training",
            ["configs/train.json"],
            **common,
            dataset_dir=str(dataset),
            ckpt_dir=str(runs / "fold0"),
            served_model=str(runs / "model.pt"),
            output_dir=str(runs / "eval"),
            num_folds=2,
            pixdim=[2.4, 2.4, 4.0],
            **{"train#trainer#max_epochs": 1, "train#trainer#epoch_length": 1, "val_interval": 1},
        )
    )
    plan = json.loads((runs / "plan.json").read_text())[task]
    assert (plan["in_channels"], plan["channels"], plan["modality"]) == (2, ["T2", "ADC"], "MRI")
    assert plan["intensity"] == {"zscore": "nonzero"} and not plan["ssl_init"] and plan["spacing"] == [1.2, 1.2, 2.0]
    # the odd case named: flipped, and 5 mm slices among 2 mm ones
    assert "orientation unlike most cases (RAS" in log and "prostate_003_0000.nii.gz (LAS)" in log
    assert "spacing far from the median" in log and "prostate_003_0000.nii.gz (1.2 x 1.2 x 5 mm)" in log
    assert (runs / "fold0" / "model.pt").is_file()

    ok(
        bundle_run(
            "evaluating",
            ["configs/inference.json"],
            **{k: v for k, v in common.items() if k not in ("num_samples", "cache_rate")},
            dataset_dir=str(dataset),  # the default input: its imagesTs/, two channel files a case
            ckpt_path=str(runs / "fold0" / "model.pt"),
            output_dir=str(runs / "predictions"),
            pixdim=[2.4, 2.4, 4.0],
        )
    )
    (prediction,) = (runs / "predictions").iterdir()
    assert nib.load(prediction).shape == (40, 44, 36)


def _undeclared_label(root: Path) -> str:
    path = root / "labelsTr" / "prostate_001.nii.gz"
    label = nib.load(path)
    voxels = np.asarray(label.dataobj).copy()
    voxels[0, 0, 0] = 5
    save(path, voxels, label.affine)
    return f"{path}: label values [5] are not declared in {root / 'dataset.json'}"


def _two_dimensional(root: Path) -> str:
    for path in [*root.glob("imagesTr/prostate_000_*.nii.gz"), root / "labelsTr" / "prostate_000.nii.gz"]:
        volume = nib.load(path)
        save(path, np.asarray(volume.dataobj)[:, :, 18:19], volume.affine)
    return f"{root / 'imagesTr' / 'prostate_000_0000.nii.gz'}: a 2D image (shape (40, 44, 1))"


BAD_INPUTS = {
    "dataset_json_missing": lambda root: (root / "dataset.json").unlink() or f"{root / 'dataset.json'}: not found",
    "dataset_json_invalid": lambda root: (
        (root / "dataset.json").write_text('{"labels": ') and f"{root / 'dataset.json'}: not a readable dataset.json"
    ),
    "dataset_json_without_labels": lambda root: (
        (root / "dataset.json").write_text('{"channel_names": {"0": "T2"}}') and f"{root / 'dataset.json'}: no 'labels'"
    ),
    "undeclared_label_values": _undeclared_label,
    "channel_file_missing": lambda root: (
        (root / "imagesTr" / "prostate_001_0001.nii.gz").unlink()
        or f"{root / 'imagesTr' / 'prostate_001_0001.nii.gz'}: missing (case prostate_001; dataset.json declares 2"
    ),
    "two_dimensional_images": _two_dimensional,
    "fewer_cases_than_folds": lambda root: f"{root / 'dataset.json'}: 4 labelled cases cannot make 5 folds",
}


@pytest.mark.parametrize("problem", BAD_INPUTS)
def test_bad_own_data_is_a_clear_error_naming_the_file(problem, tmp_path):
    dataset = write_mri_nnunet(tmp_path / "Dataset044_Bad")
    expected = BAD_INPUTS[problem](dataset)
    result = bundle_run(
        "training",
        ["configs/train.json"],
        **TINY,
        task="Dataset044_Bad",
        dataset_dir=str(dataset),
        bundle_root=str(tmp_path / "bundle"),
        tasks_file=str(MSD_BUNDLE / "configs" / "tasks.json"),
        num_folds=5 if problem == "fewer_cases_than_folds" else 2,
    )
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr
    assert not (tmp_path / "bundle" / "models" / "Dataset044_Bad" / "plan.json").exists()
