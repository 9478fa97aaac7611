"""Self-supervised pre-training: proxy tasks, loss, the bundle's training, resume, and the hand-off of its weights."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from conftest import REPO, configs, released_layout, run_workflow, torchrun_bundle, write_ct_case
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.data import SmartCacheDataset
from monai.networks.nets import SwinUNETR

from swin_unetr_kit.data import DataError, WarnIfNotCTd, load_unlabeled
from swin_unetr_kit.ssl import SSLHead, SSLLoss, SSLViewsd, cutout, prepare_ssl_batch, rotate

SSL_BUNDLE = REPO / "bundles" / "swin_unetr_ssl_pretrain"
SMALL_SSL = {
    "feature_size": 12,
    "roi_size": [64, 64, 64],
    "num_samples": 1,
    "val_num_samples": 1,
    "batch_size": 2,
    "num_workers": 0,
    "val_fraction": 0.34,
}


def ssl_configs(*names: str) -> list[str]:
    return configs(*names, bundle=SSL_BUNDLE)


def test_rotation_is_a_quarter_turn_in_one_plane_and_invertible():
    volume = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 4, 5, 6)
    for k in range(4):
        turned = rotate(volume, k)
        assert torch.equal(rotate(turned, -k), volume)
        assert turned.shape[1] == volume.shape[1]  # the first spatial axis is the rotation axis
    # one quarter turn: out[y, z] = in[z, n - 1 - y], so out's first column is in's first row, reversed
    assert torch.equal(rotate(volume, 1)[:, :, :, 0], volume[:, :, 0, :].flip(-1))
    assert torch.equal(rotate(volume, 4), volume)


def test_cutout_fraction_and_noise():
    rng = np.random.RandomState(0)
    volume = torch.full((1, 64, 64, 64), -5.0)  # a value noise in [0, 1] can never take
    fractions = []
    for _ in range(50):
        masked, mask = cutout(volume, rng)
        fraction = mask.float().mean().item()
        fractions.append(fraction)
        assert torch.equal(masked[0][~mask], volume[0][~mask])  # outside the boxes: untouched
        if mask.any():
            assert masked[0][mask].min() >= 0 and masked[0][mask].max() <= 1  # inside: noise in [0, 1]
        # boxes are added until the drawn fraction (at most 0.3) is reached; the last box may overshoot by one box
        assert fraction <= 0.3 + 0.25**3 + 1e-6
    assert min(fractions) < 0.1 < 0.2 < max(fractions)  # the target fraction is drawn, not fixed


def test_views_have_their_labels_and_targets():
    views = SSLViewsd(keys="image")
    views.set_random_state(seed=3)
    crop = torch.rand(1, 64, 64, 64)
    seen = set()
    for _ in range(20):
        out = views({"image": crop})
        for i in (1, 2):
            k = int(out[f"rotation{i}"])
            seen.add(k)
            assert torch.equal(out[f"target{i}"], rotate(crop, k))  # the target is the rotated, unmasked crop
            changed = out[f"image{i}"] != out[f"target{i}"]
            assert changed.float().mean() <= 0.32
    assert seen == {0, 1, 2, 3}


def test_loss_on_known_inputs():
    loss = SSLLoss(rotation_weight=1.0, contrastive_weight=2.0, reconstruction_weight=3.0, temperature=0.5)
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    pred = {
        "rotation": torch.zeros(4, 4),  # uniform logits: CE = log 4
        "contrastive": torch.cat([z, z]),  # each view's embedding equals its pair's: the positive is the best match
        "reconstruction": torch.ones(4, 1, 2, 2, 2),
    }
    target = {"rotation": torch.tensor([0, 1, 2, 3]), "reconstruction": torch.zeros(4, 1, 2, 2, 2)}
    total = loss(pred, target)
    # NT-Xent for 2 pairs of orthogonal unit vectors, tau 0.5: -log(e^2 / (e^2 + e^0 + e^0))
    nt_xent = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert loss.terms["rotation"] == pytest.approx(math.log(4), abs=1e-5)
    assert loss.terms["contrastive"] == pytest.approx(nt_xent, abs=1e-5)
    assert loss.terms["reconstruction"] == pytest.approx(1.0)
    assert float(total) == pytest.approx(math.log(4) + 2 * nt_xent + 3 * 1.0, abs=1e-5)
    assert loss.terms["rotation_accuracy"] == pytest.approx(0.25)  # argmax of equal logits is class 0


def test_network_heads_and_batch_layout():
    net = SSLHead(feature_size=12)
    batch = {
        "image1": torch.rand(2, 1, 64, 64, 64),
        "image2": torch.rand(2, 1, 64, 64, 64),
        "target1": torch.rand(2, 1, 64, 64, 64),
        "target2": torch.rand(2, 1, 64, 64, 64),
        "rotation1": torch.tensor([0, 1]),
        "rotation2": torch.tensor([2, 3]),
    }
    inputs, targets = prepare_ssl_batch(batch)
    assert inputs.shape == (4, 1, 64, 64, 64) and targets["rotation"].tolist() == [0, 1, 2, 3]
    out = net(inputs)
    assert out["rotation"].shape == (4, 4)
    assert out["contrastive"].shape == (4, 512)
    assert out["reconstruction"].shape == inputs.shape
    # the encoder's keys are SwinUNETR's: the checkpoint needs no renaming to initialise segmentation
    seg = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)
    encoder_keys = {k for k in net.state_dict() if k.startswith("swinViT.")}
    assert encoder_keys == {k for k in seg.state_dict() if k.startswith("swinViT.")}
    with pytest.raises(ValueError, match="multiple of 12"):
        SSLHead(feature_size=16)


@pytest.fixture(scope="module")
def unlabeled_ct(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlabeled")
    for i in range(3):
        write_ct_case(root / "a", f"ct{i}", seed=10 + i)
    write_ct_case(root / "b", "small", shape=(30, 28, 24), seed=20)  # smaller than the 64^3 window: padded
    return root


def test_unlabeled_sources_and_bad_input(unlabeled_ct, tmp_path, caplog):
    sources = [str(unlabeled_ct / "a"), str(unlabeled_ct / "b")]
    train = load_unlabeled(sources, "training", val_fraction=0.25)
    val = load_unlabeled(sources, "validation", val_fraction=0.25)
    assert len(train) == 3 and len(val) == 1
    assert not any("labelsTr" in c["image"] for c in train + val)  # a data set's label maps are not images
    with pytest.raises(DataError, match="no images for the 'training' split"):
        load_unlabeled([str(tmp_path)], "training")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ct.nii.gz").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"ct\.nii\.gz: cannot be read"):
        load_unlabeled([str(broken)], "training", val_fraction=0.0)
    from monai.data import MetaTensor

    with caplog.at_level(logging.WARNING, logger="swin_unetr_kit.data"):
        WarnIfNotCTd("image")({"image": MetaTensor(torch.rand(1, 8, 8, 8), meta={"filename_or_obj": "mri.nii"})})
    assert "mri.nii: values" in caplog.text and "do not look like CT" in caplog.text


def test_pretrain_resume_and_hand_off_to_segmentation(unlabeled_ct, tmp_path):
    common = {
        **SMALL_SSL,
        "bundle_root": str(tmp_path / "ssl"),
        "dataset_dir": str(unlabeled_ct),
        "sources": [str(unlabeled_ct / "a"), str(unlabeled_ct / "b")],
        "val_interval": 1,
    }
    run_workflow(ssl_configs("train"), **common, num_steps=1)  # interrupted after one step
    models = tmp_path / "ssl" / "models"
    assert torch.load(models / "latest.pt", weights_only=False)["trainer"]["iteration"] == 1
    workflow = run_workflow(ssl_configs("train"), **common, num_steps=2)  # resumed: one more step
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 2
    assert (tmp_path / "ssl" / "eval" / "training_curves.png").is_file()
    steps = torch.load(models / "latest.pt", weights_only=False)["optimizer"]["state"][0]["step"]
    assert float(steps) == 2
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert {
        "val_loss",
        "val_rotation_loss",
        "val_contrastive_loss",
        "val_reconstruction_loss",
        "val_rotation_accuracy",
    } <= set(evaluator.state.metrics)

    pretrained = torch.load(models / "model.pt", weights_only=True)
    assert pretrained["network_record"]["patch_merging"] == "merging"  # the order it was trained in travels with it
    assert pretrained["network_record"]["network"]["feature_size"] == SMALL_SSL["feature_size"]
    encoder = {k[len("swinViT.") :]: v for k, v in pretrained["model"].items() if k.startswith("swinViT.")}
    seg = ConfigWorkflow(
        config_file=configs("train"),
        workflow_type="train",
        pretrained_ckpt=str(models / "model.pt"),
        device="$torch.device('cpu')",
        **{"network_def#feature_size": 12},
    )
    msd = ConfigWorkflow(  # and into the MSD bundle's CT tasks
        config_file=[str(REPO / "bundles" / "swin_unetr_msd" / "configs" / "train.json")],
        workflow_type="train",
        bundle_root=str(REPO / "bundles" / "swin_unetr_msd"),
        task="Task07_Pancreas",
        pretrained_ckpt=str(models / "model.pt"),
        device="$torch.device('cpu')",
        **{"network_def#feature_size": 12},
    )
    for workflow in (seg, msd):
        loaded = workflow.parser.get_parsed_content("network").swinViT.state_dict()
        assert loaded.keys() == encoder.keys() and len(loaded) == 126  # every encoder tensor accounted for
        for key, value in encoder.items():
            assert torch.equal(loaded[key], value), key


def test_smart_cache_replaces_part_of_the_cache_every_epoch(unlabeled_ct, tmp_path):
    workflow = ConfigWorkflow(
        config_file=ssl_configs("train", "smart_cache"),
        workflow_type="train",
        **{**SMALL_SSL, "batch_size": 1, "val_fraction": 0.25},
        bundle_root=str(tmp_path),
        dataset_dir=str(unlabeled_ct / "a"),
        sources=[str(unlabeled_ct / "a"), str(unlabeled_ct / "b")],
        smart_cache_num=2,
        smart_replace_rate=0.5,
        num_steps=3,
        val_interval=1,
    )
    workflow.initialize()
    dataset = workflow.parser.get_parsed_content("train#dataset")
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert isinstance(dataset, SmartCacheDataset)
    assert (len(dataset.data), dataset.cache_num, dataset._replace_num) == (3, 2, 1)  # 2 of the 3 images held
    held = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda _: held.append(dataset._start_pos))
    workflow.run()
    workflow.finalize()
    assert held == [0, 1, 2]  # one image swapped in at every epoch end (SmartCacheHandler)


def test_continue_from_released_checkpoint_layout(tmp_path):
    source = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)
    released = released_layout(source.swinViT.state_dict())
    torch.save(released, tmp_path / "model_swinvit.pt")
    workflow = ConfigWorkflow(
        config_file=ssl_configs("train"),
        workflow_type="train",
        feature_size=12,
        device="$torch.device('cpu')",
        pretrained_ckpt=str(tmp_path / "model_swinvit.pt"),
    )
    network = workflow.parser.get_parsed_content("network")
    assert workflow.parser.get_parsed_content("patch_merging") == "legacy"  # selected by the released layout
    for key, value in source.swinViT.state_dict().items():
        assert torch.equal(network.swinViT.state_dict()[key], value)


def test_metadata_and_properties(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from conftest import SCHEMA

    meta = json.loads((SSL_BUNDLE / "configs" / "metadata.json").read_text())
    if SCHEMA.is_file():
        jsonschema.validate(meta, json.loads(SCHEMA.read_text()))
    assert meta["version"] in meta["changelog"]
    workflow = ConfigWorkflow(config_file=ssl_configs("train"), workflow_type="train")
    parser = workflow.parser
    assert parser["hu_window"] == [-1000, 1000] and parser["temperature"] == 0.5
    assert parser["learning_rate"] == 4e-4 and parser["warmup_steps"] == 500


def test_torchrun_two_cpu_processes(unlabeled_ct, tmp_path):
    torchrun_bundle(
        ssl_configs("train", "multi_gpu_train"),
        port=29519,
        **{**SMALL_SSL, "batch_size": 1, "val_fraction": 0.5},
        bundle_root=str(tmp_path),
        dataset_dir=str(unlabeled_ct / "a"),
        num_steps=2,
        val_interval=1,
    )
    assert (tmp_path / "models" / "latest.pt").is_file() and (tmp_path / "models" / "model.pt").is_file()
    assert len(list((tmp_path / "eval").glob("events.out.tfevents*"))) == 2  # rank 0 alone writes


def _contrastive_on_two_processes(rank: int, port: int, z1: torch.Tensor, z2: torch.Tensor, results) -> None:
    import torch.distributed as dist

    from swin_unetr_kit.ssl import ssl_terms

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    half = z1.shape[0] // 2
    mine = slice(rank * half, (rank + 1) * half)
    local1 = z1[mine].clone().requires_grad_(True)
    pred = {
        "contrastive": torch.cat([local1, z2[mine]]),
        "rotation": torch.zeros(2 * half, 4),
        "reconstruction": torch.zeros(1),
    }
    target = {"rotation": torch.zeros(2 * half, dtype=torch.long), "reconstruction": torch.zeros(1)}
    loss = ssl_terms(pred, target, SSLLoss().contrastive)["contrastive"]
    loss.backward()
    results[rank] = (float(loss), local1.grad.clone())
    dist.destroy_process_group()


def test_contrastive_negatives_are_gathered_across_processes():
    """Two processes with half a batch each compute the loss of the whole batch, and its gradient for their rows."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    manager = torch.multiprocessing.Manager()
    results = manager.dict()
    torch.multiprocessing.spawn(_contrastive_on_two_processes, args=(29523, z1, z2, results), nprocs=2)
    full1 = z1.clone().requires_grad_(True)
    pred = {"contrastive": torch.cat([full1, z2]), "rotation": torch.zeros(16, 4), "reconstruction": torch.zeros(1)}
    target = {"rotation": torch.zeros(16, dtype=torch.long), "reconstruction": torch.zeros(1)}
    from swin_unetr_kit.ssl import ssl_terms

    expected = ssl_terms(pred, target, SSLLoss().contrastive)["contrastive"]
    expected.backward()
    for rank in (0, 1):
        loss, grad = results[rank]
        assert loss == pytest.approx(float(expected), abs=1e-5)
        # every process computes the same global loss, and all_gather's backward sums their gradients for this
        # process's rows: 2x the global gradient, which DDP's averaging over the 2 processes brings back to 1x
        rows = slice(rank * 4, (rank + 1) * 4)
        torch.testing.assert_close(grad, 2 * full1.grad[rows], atol=1e-5, rtol=1e-4)
