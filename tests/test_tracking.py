"""What MLflow (``--tracking mlflow``) and TensorBoard keep of a run, read back through their own readers: MLflow's
client on the bundle root's sqlite store, TensorBoard's EventAccumulator on the event files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_ct_case

mlflow = pytest.importorskip("mlflow")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

SSL_BUNDLE = REPO / "bundles" / "swin_unetr_ssl_pretrain"


def bundle_cli(bundle: Path, run_id: str, config_files: list[str], **overrides) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run <run_id> --config_file ...`` from the bundle folder, as the READMEs print it."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", json.dumps(config_files)]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    result = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def mlflow_runs(bundle_root: Path, experiment: str) -> dict:
    """The runs of ``experiment`` in the bundle root's one store, by name, with their artifacts' paths."""
    from monai.utils import path_to_sqlite_uri

    client = mlflow.MlflowClient(tracking_uri=path_to_sqlite_uri(str(bundle_root / "eval" / "mlruns.db")))
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {r.info.run_name: (r, {a.path for a in client.list_artifacts(r.info.run_id)}) for r in runs}


def tensorboard_tags(folder: Path) -> dict[str, set[str]]:
    """The scalar and image tags of every event file in ``folder``."""
    tags: dict[str, set[str]] = {"scalars": set(), "images": set()}
    for events in folder.glob("events.out.tfevents.*"):
        accumulator = event_accumulator.EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        for kind in tags:
            tags[kind] |= set(accumulator.Tags()[kind])
    return tags


def test_ssl_pretraining_tracked_by_mlflow_from_the_cli(tmp_path):
    """``--tracking mlflow`` on SSL pre-training (it stopped at iteration 1 on the loss terms' tuple): the run is named,
    has the run's settings as parameters, every loss term and the learning rate per iteration, the validation
    metrics, and the curves and settings as artifacts; TensorBoard has the terms and the learning rate."""
    for i in range(3):
        write_ct_case(tmp_path / "data", f"ct{i}", seed=10 + i)
    root = tmp_path / "root"
    small = {"feature_size": 12, "roi_size": [64, 64, 64], "num_samples": 1, "val_num_samples": 1, "batch_size": 2}
    bundle_cli(
        SSL_BUNDLE,
        "training",
        ["configs/train.json"],
        bundle_root=str(root),
        sources=[str(tmp_path / "data")],
        tracking="mlflow",
        num_workers=0,
        val_fraction=0.34,
        num_steps=2,
        val_interval=1,
        progress="false",
        **small,
    )
    runs = mlflow_runs(root, "swin_unetr_ssl_pretrain")
    assert list(runs) == ["training"]
    run, artifacts = runs["training"]
    params = run.data.params
    assert params["feature_size"] == "12" and params["roi_size"] == "[64, 64, 64]"
    assert params["learning_rate"] == "0.0004" and params["num_steps"] == "2"
    assert json.loads(params["sources"].replace("'", '"')) == [str(tmp_path / "data")]
    assert {"total", "rotation", "contrastive", "reconstruction", "lr_group_0"} <= set(run.data.metrics)
    assert {"val_loss", "val_reconstruction_loss", "val_rotation_accuracy"} <= set(run.data.metrics)
    assert {"training_curves.png", "run_settings.json"} <= artifacts
    assert any(a.startswith("config_") for a in artifacts)
    assert {"total", "reconstruction", "lr", "val_loss"} <= tensorboard_tags(root / "eval")["scalars"]
