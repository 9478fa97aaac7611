"""Self-supervised pre-training: proxy tasks, loss, the bundle's training, resume, and the hand-off of its weights."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import preloaded_python
import pytest
import torch
from conftest import REPO, SSL_SMALL_ROI, configs, released_layout, run_workflow, torchrun_bundle, write_ct_case
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.data import SmartCacheDataset
from monai.networks.nets import SwinUNETR

from swin_unetr_kit.data import DataError, WarnIfNotCTd, load_unlabeled
from swin_unetr_kit.ssl import SSLBatch, SSLHead, SSLLoss, SSLViewsd, cutout, drop_boxes, rotate

SSL_BUNDLE = REPO / "bundles" / "swin_unetr_ssl_pretrain"
SMALL_SSL = {
    "feature_size": 12,
    "roi_size": SSL_SMALL_ROI,
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


def _reference_drop(x: np.ndarray, rng: np.random.RandomState, donor: np.ndarray | None = None) -> None:
    """The reference's ``patch_rand_drop`` (research-contributions SwinUNETR/Pretrain/utils/ops.py), from its
    definition: boxes until their summed volumes reach U(0, 0.3) of the voxels; starts below ``dim - int(0.05 dim)``,
    sides in [int(0.05 dim), int(0.25 dim)) cut at the border; normal noise min-max scaled per box, or the donor's."""
    dims = x.shape[1:]
    tol = [int(0.05 * d) for d in dims]
    big = [int(0.25 * d) for d in dims]
    goal, total = rng.uniform(0, 0.3) * np.prod(dims), 0
    while total < goal:
        start = [rng.randint(0, d - t) for d, t in zip(dims, tol, strict=True)]
        end = [min(rng.randint(t, m) + s, d) for s, t, m, d in zip(start, tol, big, dims, strict=True)]
        box = (slice(None), *(slice(s, e) for s, e in zip(start, end, strict=True)))
        if donor is None:
            noise = rng.standard_normal(x[box].shape)
            x[box] = (noise - noise.min()) / (noise.max() - noise.min())
        else:
            x[box] = donor[box]
        total += np.prod([e - s for s, e in zip(start, end, strict=True)])


def _reference_aug_rand(batch: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """The reference's ``aug_rand``: a noise pass per view, then a pass pasting from a random view of the batch."""
    out = batch.copy()
    for i in range(len(out)):
        _reference_drop(out[i], rng)
        j = rng.randint(0, len(out))
        if j != i:
            _reference_drop(out[i], rng, out[j])
    return out


def test_cutout_masks_as_much_as_the_reference():
    """Over many batches, the fraction of voxels the masking changes matches the reference procedure's."""
    rng_data, rng_ours, rng_ref = (np.random.RandomState(s) for s in (0, 1, 2))
    generator = torch.Generator().manual_seed(0)
    ours, ref = [], []
    for _ in range(120):
        views = rng_data.uniform(0.2, 0.8, (4, 1, 48, 48, 48)).astype(np.float32)  # distinct crops: pastes show
        ours += (
            (cutout(torch.from_numpy(views), rng_ours, generator=generator).numpy() != views)
            .mean((1, 2, 3, 4))
            .tolist()
        )
        ref += (_reference_aug_rand(views, rng_ref) != views).mean((1, 2, 3, 4)).tolist()
    assert np.mean(ours) == pytest.approx(np.mean(ref), abs=0.015)
    assert np.std(ours) == pytest.approx(np.std(ref), abs=0.015)
    assert np.mean(ref) > 0.2  # two passes: well above the 0.15 that one pass of unique voxels masks on average


def test_cutout_boxes_noise_and_pastes():
    rng = np.random.RandomState(0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        volume = torch.full((2, 64, 64, 64), -5.0)  # a value the scaled noise can never take
        drop_boxes(volume, rng, max_fraction=1e-6, generator=generator)  # the first box already reaches the goal
        box = volume != -5.0
        values = volume[box]
        # one box over both channels, sides in [3, 16) voxels (5 % and 25 % of 64), noise min-max scaled to [0, 1]
        nonzero = box[0].nonzero()
        sides = nonzero.max(0).values - nonzero.min(0).values + 1
        assert int(box[0].sum()) == int(sides.prod()) and bool((sides >= 1).all()) and bool((sides < 16).all())
        assert torch.equal(box[0], box[1])
        assert float(values.min()) == 0.0 and float(values.max()) == 1.0
    # normal, not uniform, noise: most of it lies in the middle half of [0, 1]
    volume = torch.full((1, 64, 64, 64), -5.0)
    drop_boxes(volume, rng, max_fraction=0.3, generator=generator)
    noise = volume[volume != -5.0]
    assert ((noise > 0.25) & (noise < 0.75)).float().mean() > 0.8
    # the second pass pastes the donor's voxels where it draws its boxes
    volume, donor = torch.zeros(1, 64, 64, 64), torch.ones(1, 64, 64, 64)
    drop_boxes(volume, rng, donor, max_fraction=0.3)
    assert set(volume.unique().tolist()) <= {0.0, 1.0} and volume.mean() > 0


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
        "target1": torch.rand(2, 1, 64, 64, 64),
        "target2": torch.rand(2, 1, 64, 64, 64),
        "rotation1": torch.tensor([0, 1]),
        "rotation2": torch.tensor([2, 3]),
    }
    prepare = SSLBatch().set_random_state(seed=0)
    inputs, targets = prepare(batch)
    assert inputs.shape == (4, 1, 64, 64, 64) and targets["rotation"].tolist() == [0, 1, 2, 3]
    assert torch.equal(targets["reconstruction"], torch.cat([batch["target1"], batch["target2"]]))
    # each view batch is masked on its own: a view only takes boxes from its own view's crops or noise
    masked = inputs != targets["reconstruction"]
    assert 0 < masked.float().mean() < 0.9
    assert torch.equal(prepare.set_random_state(seed=0)(batch)[0], inputs)  # seeded: the same masks again
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
    write_ct_case(root / "b", "small", shape=(30, 28, 24), seed=20)  # smaller than the window: padded
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


def test_seeded_validation_leaves_training_unchanged(unlabeled_ct, tmp_path):
    """Validation re-seeds its own crops, views and masks (the reference draws new ones each time): a deterministic
    score for choosing the best checkpoint, drawn from random states training never reads, so the trained weights are
    those of a run validating as the reference does."""
    common = {**SMALL_SSL, "batch_size": 1, "dataset_dir": str(unlabeled_ct / "a"), "num_steps": 2, "val_interval": 1}
    common |= {"learning_rate": 0.01, "warmup_steps": 1}  # step 2, after a validation, moves the weights visibly
    run = json.loads((SSL_BUNDLE / "configs" / "train.json").read_text())["run"]
    # the re-seeding handler, replaced by one that only builds the evaluator (building order decides the loaders' seeds)
    reseed = next(i for i, step in enumerate(run) if "set_random_state" in step)
    unseeded_run = [*run[:reseed], "$@validate#evaluator", *run[reseed + 1 :]]
    workflows = {
        "seeded": run_workflow(ssl_configs("train"), **common, bundle_root=str(tmp_path / "seeded")),
        "unseeded": run_workflow(ssl_configs("train"), **common, bundle_root=str(tmp_path / "new"), run=unseeded_run),
    }
    # the same training inputs give the same loss and weights, up to the CPU kernels' rounding (~1e-7; a different
    # training batch or mask at step 2 moves the weights by ~1e-2)
    losses = [w.parser.get_parsed_content("train#trainer").state.output["loss"] for w in workflows.values()]
    assert float(losses[0]) == float(losses[1])
    weights = {name: w.parser.get_parsed_content("network").state_dict() for name, w in workflows.items()}
    for key, value in weights["seeded"].items():
        torch.testing.assert_close(value, weights["unseeded"][key], rtol=1e-5, atol=1e-5, msg=key)
    metrics = {name: w.parser.get_parsed_content("validate#evaluator").state.metrics for name, w in workflows.items()}
    assert metrics["seeded"]["val_loss"] != metrics["unseeded"]["val_loss"]  # yet the validations differed


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
    # the reference's defaults: --batch_size 2 volumes x --sw_batch_size 2 crops per GPU, no gradient clipping
    assert parser["batch_size"] * parser["num_samples"] == 4 and parser["grad_clip"] == 0


def _reference_warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """The reference's ``WarmupCosineSchedule`` factor (research-contributions SwinUNETR/Pretrain/optimizers/
    lr_scheduler.py), from its definition: linear from 0 over ``warmup_steps``, then half a cosine to 0 at the end."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))


def test_schedule_and_best_checkpoint_follow_the_reference():
    """The warm-up is the reference's --warmup_steps whatever the length (no cap at a tenth of training), and the best
    model is chosen by the validation reconstruction loss, as the reference's model_bestValRMSE.pt."""
    workflow = ConfigWorkflow(
        config_file=ssl_configs("train"), workflow_type="train", feature_size=12, num_steps=1000, warmup_steps=500
    )
    scheduler = workflow.parser.get_parsed_content("lr_scheduler")
    rates = []
    for _ in range(1000):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    expected = [4e-4 * _reference_warmup_cosine(step, 500, 1000) for step in range(1000)]
    np.testing.assert_allclose(rates, expected, rtol=1e-9, atol=1e-12)
    assert rates.index(max(rates)) == 500 and max(rates) == 4e-4  # the full rate half-way (a cap would give step 100)

    key_metric = workflow.parser.get_parsed_content("validate#key_metric")
    additional = workflow.parser.get_parsed_content("validate#additional_metrics")
    assert list(key_metric) == ["val_reconstruction_loss"] and "val_loss" in additional
    assert key_metric["val_reconstruction_loss"] is additional["val_reconstruction_loss"]  # computed once
    total = ConfigWorkflow(config_file=ssl_configs("train"), workflow_type="train", best_metric="val_loss")
    assert list(total.parser.get_parsed_content("validate#key_metric")) == ["val_loss"]  # the one-line override


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


def _reference_nt_xent(x1: torch.Tensor, x2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """The reference's ``Contrast`` (research-contributions SwinUNETR/Pretrain/losses/loss.py), from its definition:
    over the 2B unit embeddings of one batch, each row's positive is its other view, its denominator every other row;
    the summed -log ratios divided by 2B."""
    z = torch.nn.functional.normalize(torch.cat([x1, x2]), dim=1)
    n = x1.shape[0]
    logits = z @ z.T / temperature
    positives = torch.cat([logits.diagonal(n), logits.diagonal(-n)])
    others = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return (others.logsumexp(1) - positives).sum() / (2 * n)


def _contrastive_terms(z1: torch.Tensor, z2: torch.Tensor, gather_negatives: bool) -> torch.Tensor:
    from swin_unetr_kit.ssl import ssl_terms

    rows = z1.shape[0]
    pred = {"contrastive": torch.cat([z1, z2]), "rotation": torch.zeros(2 * rows, 4), "reconstruction": torch.zeros(1)}
    target = {"rotation": torch.zeros(2 * rows, dtype=torch.long), "reconstruction": torch.zeros(1)}
    return ssl_terms(pred, target, SSLLoss().contrastive, gather_negatives)["contrastive"]


def _contrastive_on_two_processes(rank: int, port: int, z1: torch.Tensor, z2: torch.Tensor, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    half = z1.shape[0] // 2
    mine = slice(rank * half, (rank + 1) * half)
    for gather in (False, True):
        local1 = z1[mine].clone().requires_grad_(True)
        loss = _contrastive_terms(local1, z2[mine], gather)
        loss.backward()
        results[rank, gather] = (float(loss), local1.grad.clone())
    dist.destroy_process_group()


def test_contrastive_negatives_per_process_by_default_or_gathered():
    """Two processes with half a batch each: by default each computes the reference's loss on its own half (the
    reference's per-GPU Contrast); with ``gather_negatives`` both compute the loss of the whole batch."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    manager = torch.multiprocessing.Manager()
    results = manager.dict()
    torch.multiprocessing.spawn(_contrastive_on_two_processes, args=(29523, z1, z2, results), nprocs=2)
    full1 = z1.clone().requires_grad_(True)
    whole = _contrastive_terms(full1, z2, gather_negatives=False)
    whole.backward()
    assert float(whole) == pytest.approx(float(_reference_nt_xent(z1, z2)), abs=1e-5)
    assert SSLLoss().gather_negatives is False
    for rank in (0, 1):
        rows = slice(rank * 4, (rank + 1) * 4)
        own1 = z1[rows].clone().requires_grad_(True)
        reference = _reference_nt_xent(own1, z2[rows])
        reference.backward()
        loss, grad = results[rank, False]
        assert loss == pytest.approx(float(reference), abs=1e-5)
        torch.testing.assert_close(grad, own1.grad, atol=1e-5, rtol=1e-4)
        loss, grad = results[rank, True]
        assert loss == pytest.approx(float(whole), abs=1e-5)
        # every process computes the same global loss, and all_gather's backward sums their gradients for this
        # process's rows: 2x the global gradient, which DDP's averaging over the 2 processes brings back to 1x
        torch.testing.assert_close(grad, 2 * full1.grad[rows], atol=1e-5, rtol=1e-4)


def test_inference_shows_the_view_its_reconstruction_and_the_rotation(tmp_path):
    """``run evaluating`` and bare ``run`` of configs/inference.json, as the README prints them, from the bundle
    folder: for each CT the masked rotated view, its reconstruction and target (NIfTI, PNG) and the rotation."""
    import sys

    import nibabel as nib

    write_ct_case(tmp_path / "data", "ct0", shape=(70, 66, 60), seed=0)
    torch.manual_seed(0)
    state = SSLHead(feature_size=12).state_dict()
    state["rotation_head.bias"] = torch.tensor([0.0, 0.0, 50.0, 0.0])  # a checkpoint that always answers 180°
    (tmp_path / "models").mkdir()
    torch.save(state, tmp_path / "models" / "model.pt")
    answers = []
    for run_id in (["evaluating"], []):
        out = tmp_path / f"out_{'_'.join(run_id) or 'run'}"
        cmd = [sys.executable, "-m", "monai.bundle", "run", *run_id, "--config_file", "configs/inference.json"]
        cmd += ["--bundle_root", str(tmp_path), "--input", str(tmp_path / "data" / "imagesTr"), "--feature_size", "12"]
        cmd += ["--roi_size", json.dumps(SSL_SMALL_ROI), "--output_dir", str(out), "--progress", "false"]
        result = preloaded_python.run(cmd, cwd=SSL_BUNDLE, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        for kind in ("view", "reconstruction", "target"):
            assert nib.load(out / f"ct0_{kind}.nii.gz").shape == tuple(SSL_SMALL_ROI)
        assert (out / "ct0_ssl.png").stat().st_size > 10_000
        answer = json.loads((out / "ct0_rotation.json").read_text())
        assert answer["rotation_predicted_degrees"] == 180  # the checkpoint was loaded
        assert answer["rotation_applied_degrees"] in (0, 90, 180, 270)
        assert sum(answer["rotation_probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
        view, target = (nib.load(out / f"ct0_{kind}.nii.gz").get_fdata() for kind in ("view", "target"))
        assert target.min() >= -1000 - 1e-3 and target.max() <= 1000 + 1e-3  # back in Hounsfield units
        assert answer["masked_view_l1"] == pytest.approx(np.abs(view - target).mean() / 2000, rel=1e-3)
        answers.append(answer)
    assert answers[0] == answers[1]  # seeded: the same view and answer every run
