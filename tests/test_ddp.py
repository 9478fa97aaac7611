"""multi_gpu_train.json under torchrun: two CPU processes with gloo, rank 0 alone writes."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import SMALL, configs


def test_torchrun_two_cpu_processes(synthetic_dataset, tmp_path):
    overrides = {**SMALL, "train#trainer#max_epochs": 2, "val_interval": 1}
    args = [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        json.dumps(configs("train", "multi_gpu_train")),
        "--bundle_root",
        str(tmp_path),
        "--dataset_dir",
        str(synthetic_dataset),
        *args,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert (tmp_path / "models" / "latest.pt").is_file() and (tmp_path / "models" / "model.pt").is_file()
    assert len(list((tmp_path / "eval").glob("events.out.tfevents*"))) == 2  # rank 0 only: train and validate
    assert log.count("Epoch: 2/2") == 1  # the loss is logged once, by rank 0
    assert "[rank1]" not in log or "Error" not in log
