"""What MLflow (``--tracking mlflow``) and TensorBoard keep of a run, read back through their own readers: MLflow's
client on the bundle root's sqlite store, TensorBoard's EventAccumulator on the event files."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import preloaded_python
import pytest
from conftest import REPO, SMALL, SMALL_ROI, SSL_SMALL_ROI, configs, run_workflow, write_ct_case, write_msd_task

mlflow = pytest.importorskip("mlflow")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

SSL_BUNDLE = REPO / "bundles" / "swin_unetr_ssl_pretrain"
MSD_BUNDLE = REPO / "bundles" / "swin_unetr_msd"


def bundle_cli(bundle: Path, run_id: str, config_files: list[str], **overrides) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run <run_id> --config_file ...`` from the bundle folder, as the READMEs print it."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", json.dumps(config_files)]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    result = preloaded_python.run(cmd, cwd=bundle, timeout=600)
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
    small = {"feature_size": 12, "roi_size": SSL_SMALL_ROI, "num_samples": 1, "val_num_samples": 1, "batch_size": 2}
    result = bundle_cli(
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
    assert "run: epoch 1/2 (50.0 %)" in result.stdout and "run: epoch 2/2 (100.0 %)" in result.stdout  # time left
    runs = mlflow_runs(root, "swin_unetr_ssl_pretrain")
    assert list(runs) == ["training"]
    run, artifacts = runs["training"]
    params = run.data.params
    assert params["feature_size"] == "12" and params["roi_size"] == str(SSL_SMALL_ROI)
    assert params["learning_rate"] == "0.0004" and params["num_steps"] == "2"
    assert json.loads(params["sources"].replace("'", '"')) == [str(tmp_path / "data")]
    assert {"total", "rotation", "contrastive", "reconstruction", "lr_group_0"} <= set(run.data.metrics)
    assert {"val_loss", "val_reconstruction_loss", "val_rotation_accuracy"} <= set(run.data.metrics)
    assert {"training_curves.png", "run_settings.json"} <= artifacts
    assert any(a.startswith("config_") for a in artifacts)
    assert {"total", "reconstruction", "lr", "val_loss"} <= tensorboard_tags(root / "eval")["scalars"]


def test_btcv_training_and_evaluation_records(synthetic_dataset, tmp_path, capfd, caplog):
    """One training and one evaluation of BTCV, tracked: each its own named run in the bundle root's store, with the
    run's settings as parameters, per-organ Dice (and HD95) besides the means, the learning rate, and the reports and
    pictures as artifacts; TensorBoard has the learning rate, per-organ Dice and the evaluated case as images."""
    common = {**SMALL, "bundle_root": str(tmp_path), "dataset_dir": str(synthetic_dataset), "tracking": "mlflow"}
    one_step = {"train#trainer#max_epochs": 1, "train#trainer#epoch_length": 1, "val_interval": 1}
    run_workflow(configs("train"), **common, **one_step)
    capfd.readouterr()
    writer = logging.getLogger("monai.data.image_writer")  # MONAI's own logger, which does not propagate
    writer.addHandler(caplog.handler)
    try:
        run_workflow(configs("train", "evaluate"), workflow_type="infer", **common)
    finally:
        writer.removeHandler(caplog.handler)
    # the evaluation says where each file goes, and how far it is
    for case in ("case2", "case3"):
        assert f"writing: {tmp_path / 'eval' / 'predictions' / case}_seg.nii.gz" in caplog.text
    assert "evaluation: [2/2] 100%" in "".join(capfd.readouterr())  # ignite's bar over the cases

    runs = mlflow_runs(tmp_path, "swin_unetr_btcv_seg")
    assert set(runs) == {"training", "evaluation"}
    (training, kept), (evaluation, reports) = runs["training"], runs["evaluation"]
    for run in (training, evaluation):
        assert run.data.params["feature_size"] == "12" and run.data.params["pixdim"] == "[3.0, 3.0, 3.0]"
        assert run.data.params["dataset_dir"] == str(synthetic_dataset)
    assert training.data.params["learning_rate"] == "0.0001" and training.data.params["max_epochs"] == "1"
    assert evaluation.data.params["eval_split"] == "validation"
    assert {"train_loss", "lr_group_0", "val_mean_dice", "val_mean_dice/spleen", "val_mean_dice/liver"} <= set(
        training.data.metrics
    )
    assert {"dice", "hd95", "dice/spleen", "hd95/spleen", "dice/left adrenal gland"} <= set(evaluation.data.metrics)
    assert 0.0 <= evaluation.data.metrics["dice/spleen"] <= 1.0
    assert {"training_curves.png", "run_settings.json"} <= kept and any(a.startswith("config_") for a in kept)
    assert {"metrics.json", "dice_raw.csv", "hd95_summary.csv", "case2.png", "case3.png"} <= reports
    # the CSVs were kept after the organ names replaced MetricsSaver's class0, class1, ...
    assert "spleen" in (tmp_path / "eval" / "dice_raw.csv").read_text().splitlines()[0]

    tags = tensorboard_tags(tmp_path / "eval")
    assert {"train_loss", "lr", "val_mean_dice", "val_mean_dice/spleen", "dice/spleen", "hd95/liver"} <= tags["scalars"]
    assert {"input_0_HWD", "input_1_HWD", "output_HWD"} <= {tag.split("/")[0] for tag in tags["images"]}


def test_msd_folds_compare_in_one_store(tmp_path):
    """Two folds of an MSD task and the evaluation of one: three runs named by task, fold and workflow in the bundle
    root's one store (so that ``mlflow ui`` compares the folds), with the task and fold as parameters, per-organ Dice,
    and the overlays as artifacts; TensorBoard has the per-organ Dice of each fold."""
    from swin_unetr_kit.msd import task_settings

    root = tmp_path / "msd"
    shutil.copytree(MSD_BUNDLE / "configs", root / "configs")  # the task table, read from the bundle root
    task = "Task09_Spleen"
    dataset = write_msd_task(tmp_path / "data", task, task_settings(task, str(root / "configs" / "tasks.json")))
    msd = [str(MSD_BUNDLE / "configs" / f"{name}.json") for name in ("train", "evaluate")]
    small = {k: v for k, v in SMALL.items() if k != "pixdim"}
    common = {**small, "bundle_root": str(root), "dataset_dir": str(dataset), "tracking": "mlflow", "num_folds": 2}
    for fold in (0, 1):
        run_workflow(msd[:1], **common, fold=fold, **{"train#trainer#max_epochs": 1, "val_interval": 1})
    run_workflow(msd, workflow_type="infer", **common, fold=0)

    runs = mlflow_runs(root, "swin_unetr_msd")
    names = {"Task09_Spleen/fold0of2/training", "Task09_Spleen/fold1of2/training", "Task09_Spleen/fold0of2/evaluation"}
    assert set(runs) == names
    assert not list(root.glob("eval/*/*/mlruns.db"))  # no store per run
    for name, (run, _) in runs.items():
        assert run.data.params["task"] == task and run.data.params["fold"] == name.split("/")[1][4]
        assert run.data.params["roi_size"] == str(SMALL_ROI) and run.data.params["feature_size"] == "12"
    assert "val_mean_dice/spleen" in runs["Task09_Spleen/fold1of2/training"][0].data.metrics
    evaluation, reports = runs["Task09_Spleen/fold0of2/evaluation"]
    assert {"dice/spleen", "hd95/spleen"} <= set(evaluation.data.metrics)
    assert {"metrics.json", "dice_summary.csv"} <= reports
    assert [n for n in reports if n.endswith(".png")] in (["spleen_000.png"], ["spleen_001.png"])  # fold 0's case
    for fold in ("fold0of2", "fold1of2"):
        assert "val_mean_dice/spleen" in tensorboard_tags(root / "eval" / task / fold)["scalars"]
