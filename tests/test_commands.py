"""The command lines the READMEs print, run as subprocesses from a copy of each bundle folder (what a fresh clone
has): ``run training``, ``run evaluating`` over train+evaluate and over inference, with ``--meta_file`` and
``--logging_file``, and small overrides. Every checkpoint written carries the record of its patch-merging order, and
the evaluation and inference that load it say that they followed it. (``torchrun ... run training``: the bundles'
torchrun tests.)"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import preloaded_python
import torch
from conftest import BTCV_BUNDLE, ONE_STEP, REPO, SMALL, SSL_SMALL_ROI, write_ct_case, write_msd_task

from swin_unetr_kit.msd import task_settings
from swin_unetr_kit.record import RECORD_KEY

MSD_BUNDLE = REPO / "bundles" / "swin_unetr_msd"
SSL_BUNDLE = REPO / "bundles" / "swin_unetr_ssl_pretrain"
TRAIN_AND_EVALUATE = "['configs/train.json','configs/evaluate.json']"  # as typed, quotes included, in the READMEs


def fresh_copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / bundle.name))


def monai_bundle(folder: Path, *args: str, **overrides) -> str:
    """``python -m monai.bundle <args> --meta_file ... --logging_file ... --key value ...`` in ``folder``; its log."""
    cmd = [sys.executable, "-m", "monai.bundle", *args]
    cmd += ["--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]
    cmd += [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
    result = preloaded_python.run(cmd, cwd=folder, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)}:\n{log[-4000:]}"
    return log


def assert_recorded(checkpoint: Path, feature_size: int = 12) -> None:
    record = torch.load(checkpoint, weights_only=True)[RECORD_KEY]
    assert record["patch_merging"] == "merging" and record["network"]["feature_size"] == feature_size


def test_btcv_commands(synthetic_dataset, tmp_path):
    folder = fresh_copy(BTCV_BUNDLE, tmp_path)
    small = {**SMALL, "dataset_dir": str(synthetic_dataset)}
    monai_bundle(folder, "run", "training", "--config_file", "configs/train.json", **small, **ONE_STEP)
    for name in ("model.pt", "latest.pt"):
        assert_recorded(folder / "models" / name)

    log = monai_bundle(folder, "run", "evaluating", "--config_file", TRAIN_AND_EVALUATE, **small)
    assert "patch merging: merging for ./models/model.pt: as its record says" in log
    assert len(json.loads((folder / "eval" / "metrics.json").read_text())["per_case"]) == 2

    inference = {k: v for k, v in small.items() if k not in ("num_samples", "cache_rate")}
    log = monai_bundle(folder, "run", "evaluating", "--config_file", "configs/inference.json", **inference)
    assert "as its record says" in log and (folder / "eval" / "test0_seg.nii.gz").is_file()


def test_ssl_commands(tmp_path):
    folder = fresh_copy(SSL_BUNDLE, tmp_path)
    for i in range(3):
        write_ct_case(tmp_path / "ct", f"ct{i}", seed=i)
    small = {
        "dataset_dir": str(tmp_path / "ct"),
        "feature_size": 12,
        "roi_size": SSL_SMALL_ROI,
        "num_samples": 1,
        "val_num_samples": 1,
        "batch_size": 1,
        "num_workers": 0,
        "val_fraction": 0.34,
        "num_steps": 1,
        "val_interval": 1,
    }
    monai_bundle(folder, "run", "training", "--config_file", "configs/train.json", **small)
    for name in ("model.pt", "latest.pt"):
        assert_recorded(folder / "models" / name)

    # inference builds SSLPredictor (SSLHead with a one-tensor answer) and loads the SSLHead training recorded
    inference = {"input": str(tmp_path / "ct" / "imagesTr" / "ct0.nii.gz"), "progress": False}
    inference |= {k: small[k] for k in ("feature_size", "roi_size", "num_workers")}
    log = monai_bundle(folder, "run", "evaluating", "--config_file", "configs/inference.json", **inference)
    assert "as its record says" in log
    answer = json.loads((folder / "eval" / "inference" / "ct0_rotation.json").read_text())
    assert answer["rotation_predicted_degrees"] in (0, 90, 180, 270)


def bundle_run(cwd: Path, *args: str, **overrides) -> str:
    """``python -m monai.bundle run <args> --key value ...`` in ``cwd``, as typed (no --meta_file); its log."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    cmd += [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
    result = preloaded_python.run(cmd, cwd=cwd, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)}:\n{log[-4000:]}"
    return log


def msd_spleen(tmp_path: Path) -> tuple[str, dict]:
    """A copy of the MSD bundle under tmp_path/bundles, generated spleen cases, and the small settings over them."""
    shutil.copytree(MSD_BUNDLE, tmp_path / "bundles" / MSD_BUNDLE.name)
    task = "Task09_Spleen"
    dataset = write_msd_task(tmp_path / "data", task, task_settings(task, MSD_BUNDLE / "configs" / "tasks.json"), 3)
    return task, {k: v for k, v in SMALL.items() if k != "pixdim"} | {"dataset_dir": str(dataset), "num_folds": 3}


def test_msd_commands_over_a_task_table_of_ones_own(tmp_path):
    """The README's three commands from the bundle folder (with ``--meta_file`` and ``--logging_file``), over a task
    table of one's own (``--tasks_file``, the spleen renamed), read by every step: it names the classes of the model
    and of the metadata written beside it."""
    task, small = msd_spleen(tmp_path)
    table = json.loads((MSD_BUNDLE / "configs" / "tasks.json").read_text())
    table[task]["labels"]["1"] = "milt"
    (tmp_path / "my_tasks.json").write_text(json.dumps(table))
    folder = tmp_path / "bundles" / MSD_BUNDLE.name
    small["tasks_file"] = str(tmp_path / "my_tasks.json")
    monai_bundle(folder, "run", "training", "--config_file", "configs/train.json", **small, **ONE_STEP)
    for name in ("model.pt", "latest.pt"):
        assert_recorded(folder / "models" / task / "fold0of3" / name)  # the run's own folder
    assert_recorded(folder / "models" / "model.pt")  # the copy MONAI Label serves
    meta = json.loads((folder / "models" / task / "fold0of3" / "metadata.json").read_text())
    assert meta["name"] == f"Swin UNETR MSD {task}"
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["1"] == "milt"

    log = monai_bundle(folder, "run", "evaluating", "--config_file", TRAIN_AND_EVALUATE, **small)
    assert "as its record says" in log
    assert "milt" in json.loads((folder / "eval" / task / "fold0of3" / "metrics.json").read_text())["summary"]["dice"]
    inference = {k: v for k, v in small.items() if k not in ("num_samples", "cache_rate")}
    log = monai_bundle(folder, "run", "evaluating", "--config_file", "configs/inference.json", **inference)
    assert "as its record says" in log
    assert list((folder / "predictions" / task / "fold0of3").rglob("*.nii.gz"))


def test_swinmm_runs_write_to_folders_of_their_own(synthetic_dataset, tmp_path):
    """The README's SwinMM commands (``configs/swinmm.json`` over training and inference) in the BTCV and MSD bundle
    folders: TensorBoard events, curves, evaluation and predictions go to folders of their own, nothing to the plain
    run's (whose files a SwinMM run would otherwise replace or mix with its own), nor to the model MONAI Label
    serves."""
    btcv = fresh_copy(BTCV_BUNDLE, tmp_path)
    small = {**SMALL, "dataset_dir": str(synthetic_dataset)}
    inference = {k: v for k, v in small.items() if k not in ("num_samples", "cache_rate")}
    bundle_run(btcv, "training", "--config_file", "['configs/train.json','configs/swinmm.json']", **small, **ONE_STEP)
    bundle_run(btcv, "evaluating", "--config_file", "['configs/inference.json','configs/swinmm.json']", **inference)
    assert sorted(p.name for p in (btcv / "eval").iterdir()) == ["swinmm"]  # the plain run's folder stays empty
    own = btcv / "eval" / "swinmm"
    assert list(own.glob("events.out.tfevents*")) and (own / "training_curves.png").is_file()
    assert (own / "test0_seg.nii.gz").is_file()

    msd = fresh_copy(MSD_BUNDLE, tmp_path)
    task = "Task09_Spleen"
    dataset = write_msd_task(tmp_path / "msd", task, task_settings(task, MSD_BUNDLE / "configs" / "tasks.json"), 3)
    small = {k: v for k, v in SMALL.items() if k != "pixdim"} | {"dataset_dir": str(dataset), "num_folds": 3}
    inference = {k: v for k, v in small.items() if k not in ("num_samples", "cache_rate")}
    bundle_run(msd, "training", "--config_file", "['configs/train.json','configs/swinmm.json']", **small, **ONE_STEP)
    bundle_run(msd, "evaluating", "--config_file", "['configs/inference.json','configs/swinmm.json']", **inference)
    for kind in ("models", "eval", "predictions"):  # each holds the SwinMM run's folder only
        assert sorted(p.relative_to(msd / kind).as_posix() for p in (msd / kind).glob("*/*/*") if p.is_dir()) == [
            f"{task}/fold0of3/swinmm"
        ], kind
    assert not (msd / "models" / "model.pt").exists()  # MONAI Label serves plain SwinUNETR weights from there
    own = msd / "eval" / task / "fold0of3" / "swinmm"
    assert list(own.glob("events.out.tfevents*")) and (own / "training_curves.png").is_file()
    assert list((msd / "predictions" / task / "fold0of3" / "swinmm").rglob("*.nii.gz"))
