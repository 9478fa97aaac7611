"""Evaluation and inference use the data settings a model was trained at (its checkpoint's data record), as MONAI
Label does; a setting given on the command line that differs from the record is used, and logged with both values.
Through ``python -m monai.bundle run`` from the bundle folders, as the READMEs print it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import preloaded_python
import pytest
import torch
from conftest import BTCV_BUNDLE, REPO, write_msd_task
from monai.networks.nets import SwinUNETR

from swin_unetr_kit.data_record import DATA_RECORD_KEY
from swin_unetr_kit.msd import task_settings
from swin_unetr_kit.record import RECORD_KEY, describe

MSD_BUNDLE = REPO / "bundles" / "swin_unetr_msd"
TRAINED_AT = {"pixdim": [4.0, 4.0, 4.0], "roi_size": [64, 64, 64]}  # the record; the configs say 96^3 windows
GIVEN_PIXDIM = [3.0, 3.0, 3.0]  # --pixdim on the command line
CHEAP = {"num_workers": 0, "sw_batch_size": 2, "sw_overlap": 0.25, "cpu_runtime": "torch", "progress": False}


def trained_model(path: Path, out_channels: int, intensity: object, labels: list[str]) -> Path:
    """A feature_size 12 model saved as training saves it: weights, network record, data record."""
    torch.manual_seed(0)
    network = SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=12)
    record = {**TRAINED_AT, "intensity": intensity, "labels": labels}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": network.state_dict(), RECORD_KEY: describe(network), DATA_RECORD_KEY: record}, path)
    return path


def run(bundle: Path, run_id: str, configs: list[str], **overrides) -> str:
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", json.dumps(configs)]
    cmd += [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = preloaded_python.run(cmd, cwd=bundle, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def assert_record_used_and_override_named(log: str, model: Path, configured_roi: str) -> None:
    """The record's window size used (the config's named), the given spacing used and the record's named."""
    assert f"{model}: roi_size [64, 64, 64], as the model was trained (the config says {configured_roi})" in log
    given = f"{model}: pixdim {GIVEN_PIXDIM} given, but the model was trained at {TRAINED_AT['pixdim']}"
    assert given + " (its data record); using the given value" in log


@pytest.mark.parametrize("workflow", ["evaluate", "inference"])
def test_btcv_uses_the_record_and_names_a_given_spacing(workflow, synthetic_dataset, tmp_path):
    labels = json.loads((BTCV_BUNDLE / "configs" / "metadata.json").read_text())
    labels = labels["network_data_format"]["outputs"]["pred"]["channel_def"]
    model = trained_model(tmp_path / "models" / "model.pt", 14, [-175, 250], [labels[str(i)] for i in range(14)])
    common = {**CHEAP, "bundle_root": str(tmp_path), "pixdim": GIVEN_PIXDIM}
    if workflow == "evaluate":
        log = run(
            BTCV_BUNDLE,
            "evaluating",
            ["configs/train.json", "configs/evaluate.json"],
            **common,
            dataset_dir=str(synthetic_dataset),
            datalist=str(synthetic_dataset / "dataset_0.json"),
            cache_rate=0.0,
        )
        assert (tmp_path / "eval" / "metrics.json").is_file()
    else:
        log = run(
            BTCV_BUNDLE, "evaluating", ["configs/inference.json"], **common, input=str(synthetic_dataset / "imagesTs")
        )
    assert_record_used_and_override_named(log, model, "[96, 96, 96]")


@pytest.mark.parametrize("workflow", ["evaluate", "inference"])
def test_msd_uses_the_record_and_names_a_given_spacing(workflow, tmp_path):
    task = "Task09_Spleen"
    settings = task_settings(task, MSD_BUNDLE / "configs" / "tasks.json")
    dataset = write_msd_task(tmp_path / "data", task, settings, num_cases=2)
    run_dir = tmp_path / "runs" / "models" / task / "fold0of2"
    model = trained_model(run_dir / "model.pt", 2, settings["intensity"], ["background", "spleen"])
    common = {**CHEAP, "bundle_root": str(tmp_path / "runs"), "task": task, "num_folds": 2, "pixdim": GIVEN_PIXDIM}
    if workflow == "evaluate":
        configs = ["configs/train.json", "configs/evaluate.json"]
        log = run(MSD_BUNDLE, "evaluating", configs, **common, dataset_dir=str(dataset), cache_rate=0.0)
        assert (tmp_path / "runs" / "eval" / task / "fold0of2" / "metrics.json").is_file()
    else:
        log = run(MSD_BUNDLE, "evaluating", ["configs/inference.json"], **common, input=str(dataset / "imagesTs"))
    assert_record_used_and_override_named(log, model, "[96, 96, 96]")
