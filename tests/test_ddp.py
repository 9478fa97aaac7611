"""multi_gpu_train.json under torchrun: two CPU processes with gloo, each drawing its own crops, rank 0 alone writes."""

from __future__ import annotations

import json
import shutil
import sys

import preloaded_python
import torch
from conftest import (
    BTCV_BUNDLE,
    ONE_STEP,
    SMALL,
    assert_own_crops,
    configs,
    crops_probe,
    torchrun_bundle,
    write_ct_case,
)
from test_commands import fresh_copy


def test_torchrun_two_cpu_processes(tmp_path):
    """One training case, which the sampler pads to two: both ranks get it, yet each draws its own random crops (the
    ranks are seeded with seed + rank, as the SSL bundle and any DDP recipe do, not all with one augmentation stream).
    Two epochs: rank 0 alone logs and writes, at the learning rate of one process."""
    case = write_ct_case(tmp_path / "data", "case0", shape=(48, 44, 40))  # room for the crop to move
    other = write_ct_case(tmp_path / "data", "case1", seed=1)  # each process scores a validation case of its own
    (tmp_path / "data" / "one_case.json").write_text(json.dumps({"training": [case], "validation": [case, other]}))
    run = tmp_path / "run"
    result = torchrun_bundle(
        [*configs("train", "multi_gpu_train"), crops_probe(BTCV_BUNDLE, tmp_path)],
        port=29517,
        **SMALL,
        bundle_root=str(run),
        dataset_dir=str(tmp_path / "data"),
        datalist=str(tmp_path / "data" / "one_case.json"),
        allow_datalist_overlap=True,  # the one case in both parts, meant
        **{"train#trainer#max_epochs": 2, "val_interval": 1},
    )
    assert_own_crops(tmp_path)
    log = result.stdout + result.stderr
    assert (run / "models" / "latest.pt").is_file() and (run / "models" / "model.pt").is_file()
    assert len(list((run / "eval").glob("events.out.tfevents*"))) == 2  # rank 0 only: train and validate
    assert log.count("Epoch: 2/2") == 1  # the loss is logged once, by rank 0
    # two processes train at the learning rate of one, as the reference and the model zoo do (no scaling by 2)
    latest = torch.load(run / "models" / "latest.pt", weights_only=False)
    assert latest["lr_scheduler"]["base_lrs"] == [1e-4]


def test_torchrun_with_more_processes_than_validation_cases_says_what_to_do(synthetic_dataset, tmp_path):
    """``torchrun --nproc_per_node 2`` over one validation case (the sample data's split): every process must score a
    case, so the run stops at once with the bundle's message, which says what to change, as its last line."""
    data = json.loads((synthetic_dataset / "dataset_0.json").read_text())
    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset, root)
    (root / "dataset_0.json").write_text(
        json.dumps({"training": data["training"], "validation": data["validation"][:1]})
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29620"]
    cmd += [
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "['configs/train.json','configs/multi_gpu_train.json']",
    ]
    cmd += [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in {**SMALL, **ONE_STEP}.items()]
    cmd += ["--dataset_dir", str(root)]
    result = preloaded_python.run(cmd, cwd=fresh_copy(BTCV_BUNDLE, tmp_path), timeout=600)
    assert result.returncode != 0
    message = (
        "swin_unetr_kit.data.DataError: 1 validation case(s) for 2 processes, and each process scores at least one: "
        "run torchrun with --nproc_per_node 1 or fewer, or make the validation split larger"
    )
    for rank in (0, 1):  # torchrun prefixes each process's lines: the message is the last of both
        lines = [line for line in result.stderr.splitlines() if line.startswith(f"[rank{rank}]:") and line[8:].strip()]
        assert lines[-1] == f"[rank{rank}]: {message}", result.stderr[-3000:]
