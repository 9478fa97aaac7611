"""multi_gpu_train.json under torchrun: two CPU processes with gloo, rank 0 alone writes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BTCV_BUNDLE, SMALL, SMALL_ROI, configs, torchrun_bundle, write_ct_case, write_msd_task

from swin_unetr_kit.msd import task_settings


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


MSD_BUNDLE = BTCV_BUNDLE.parent / "swin_unetr_msd"


@pytest.mark.parametrize("bundle", ["btcv", "msd"])
def test_each_rank_draws_its_own_crops(bundle, tmp_path):
    """Both ranks get the one training case (the sampler pads it to two), yet each draws its own random crops: the
    ranks are seeded with seed + rank, as the SSL bundle and any DDP recipe do, not all with one augmentation stream."""
    if bundle == "btcv":
        case = write_ct_case(tmp_path / "data", "case0", shape=(48, 44, 40))
        (tmp_path / "data" / "one_case.json").write_text(json.dumps({"training": [case], "validation": [case]}))
        files = configs("train", "multi_gpu_train")
        overrides = {"dataset_dir": str(tmp_path / "data"), "datalist": str(tmp_path / "data" / "one_case.json")}
        overrides["allow_datalist_overlap"] = True  # the one case in both parts, meant
        overrides["pixdim"] = [1.5, 1.5, 1.5]  # 96 x 88 x 80 voxels: room for the crop to move on every axis
    else:
        task = "Task09_Spleen"
        dataset = write_msd_task(tmp_path / "data", task, task_settings(task, MSD_BUNDLE / "configs" / "tasks.json"))
        files = configs("train", "multi_gpu_train", bundle=MSD_BUNDLE)
        overrides = {"bundle_root": str(MSD_BUNDLE), "task": task, "dataset_dir": str(dataset), "num_folds": 2}
        overrides["pixdim"] = [0.5, 0.5, 0.8]  # 88 x 88 x 72 voxels
        overrides["ckpt_dir"] = str(tmp_path / "models")
    # instead of training, each rank saves its crops of three epochs (after the setup: process group, seed + rank)
    probe = tmp_path / "probe.json"
    crops = "[b['image'].as_tensor() for _ in range(3) for b in @train#dataloader]"
    save = f"torch.save({crops}, '{tmp_path}/crops' + str(dist.get_rank()) + '.pt')"
    probe.write_text(json.dumps({"run": ["@setup", f"${save}"]}))
    torchrun_bundle([*files, str(probe)], port=29610 if bundle == "btcv" else 29611, **{**SMALL, **overrides})
    rank0, rank1 = (torch.load(tmp_path / f"crops{rank}.pt") for rank in (0, 1))
    assert [c.shape for c in rank0] == [c.shape for c in rank1] == [torch.Size([1, 1, *SMALL_ROI])] * 3
    assert all(not torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True))
