"""multi_gpu_train.json under torchrun: two CPU processes with gloo, rank 0 alone writes."""

from __future__ import annotations

import torch
from conftest import SMALL, configs, torchrun_bundle


def test_torchrun_two_cpu_processes(synthetic_dataset, tmp_path):
    result = torchrun_bundle(
        configs("train", "multi_gpu_train"),
        port=29517,
        **SMALL,
        bundle_root=str(tmp_path),
        dataset_dir=str(synthetic_dataset),
        **{"train#trainer#max_epochs": 2, "val_interval": 1},
    )
    log = result.stdout + result.stderr
    assert (tmp_path / "models" / "latest.pt").is_file() and (tmp_path / "models" / "model.pt").is_file()
    assert len(list((tmp_path / "eval").glob("events.out.tfevents*"))) == 2  # rank 0 only: train and validate
    assert log.count("Epoch: 2/2") == 1  # the loss is logged once, by rank 0
    # two processes train at the learning rate of one, as the reference and the model zoo do (no scaling by 2)
    latest = torch.load(tmp_path / "models" / "latest.pt", weights_only=False)
    assert latest["lr_scheduler"]["base_lrs"] == [1e-4]
