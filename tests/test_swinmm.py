"""SwinMM: view transforms, grid mask, pre-training loss, cross-view network and loss, multi-view inference, and the
bundles' SwinMM workflows (pre-train → cross-view fine-tune → evaluate and infer with several views)."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, SMALL, configs, run_workflow, write_ct_case
from monai.bundle import ConfigWorkflow
from monai.data import list_data_collate
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import SwinUNETR
from torch import nn

from swin_unetr_kit.pretrained import load_pretrained_encoder
from swin_unetr_kit.ssl import SSLHead, decay_param_groups
from swin_unetr_kit.swinmm import (
    INFERENCE_VIEWS,
    ORDERINGS,
    CrossViewFusion,
    CrossViewLoss,
    CrossViewSwinUNETR,
    MultiViewSlidingWindowInferer,
    SwinMMLoss,
    SwinMMViewsd,
    View,
    grid_mask,
    prepare_swinmm_batch,
)

SSL_BUNDLE = REPO / "bundles" / "swin_unetr_ssl_pretrain"


def all_views() -> list[View]:
    permutations = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    return [View(p, k) for p in permutations for k in range(-1, 5)]


def test_every_view_and_its_inverse_round_trip_exactly():
    x = torch.randn(2, 3, 4, 5, 6)  # batch, channels and three different spatial sizes
    for view in all_views():
        assert torch.equal(view.invert(view.apply(x)), x), view
        assert torch.equal(view.invert(view.apply(x[0])), x[0]), view  # unbatched [C, X, Y, Z] too
    assert View((2, 1, 0)).apply(x).shape == (2, 3, 6, 5, 4)
    assert torch.equal(View((0, 1, 2), 1).apply(x[0]), torch.rot90(x[0], 1, (2, 3)))  # the SSL rotation plane
    with pytest.raises(ValueError, match="permutation"):
        View((0, 0, 1))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("cell", [8, 16])
def test_grid_mask_hides_exactly_the_ratio_asked_in_whole_cells(ratio, cell):
    mask = grid_mask((64, 64, 64), cell, ratio, np.random.RandomState(0))
    assert mask.dtype == torch.bool and mask.shape == (64, 64, 64)
    assert mask.float().mean().item() == ratio  # not 1 - ratio, as the released SwinMM code does
    cells = mask.reshape(64 // cell, cell, 64 // cell, cell, 64 // cell, cell)
    assert bool((cells.all(dim=(1, 3, 5)) | ~cells.any(dim=(1, 3, 5))).all())  # every cell wholly in or out
    with pytest.raises(ValueError, match="not divisible"):
        grid_mask((64, 64, 60), 16, ratio, np.random.RandomState(0))


def test_views_share_one_mask_and_map_back_to_the_masked_crop():
    transform = SwinMMViewsd(mask_ratio=0.5, cell_size=16)
    transform.set_random_state(3)
    crop = torch.rand(1, 64, 64, 64) + 0.1  # no zeros of its own, so zeros mark the mask
    d = transform({"image": crop})
    mask = d["mask"].bool()
    assert d["mask"].mean().item() == 0.5
    assert torch.equal(d["target"], crop)
    masked = crop * ~mask
    for view_input, order, turns in zip(d["views"], d["permutation"], d["rotation"], strict=True):
        view = View(tuple(order.tolist()), int(turns))
        assert torch.equal(view.invert(view_input), masked)  # the same masked volume behind every view
    assert d["rotation"][0] == d["rotation"][2] and d["rotation"][1] == d["rotation"][3]
    assert [tuple(p.tolist()) for p in d["permutation"][:2]] == [(0, 1, 2)] * 2
    assert all(tuple(p.tolist()) in ORDERINGS[1:] for p in d["permutation"][2:])
    with pytest.raises(ValueError, match="cubic"):
        transform({"image": torch.rand(1, 64, 64, 32)})
    with pytest.raises(ValueError, match="mask_ratio"):
        SwinMMViewsd(mask_ratio=1.0)


def swinmm_batch(batch_size: int = 2, size: int = 32):
    transform = SwinMMViewsd(mask_ratio=0.5, cell_size=8)
    transform.set_random_state(0)
    samples = [transform({"image": torch.rand(1, size, size, size)}) for _ in range(batch_size)]
    return prepare_swinmm_batch(list_data_collate(samples))


def predictions_from(volumes: torch.Tensor, target: dict) -> dict:
    """Head outputs whose reconstructions are ``volumes`` ([V, B, C, ...], original frame) seen through each row's
    view, so that mapping them back gives ``volumes``."""
    views = [View(tuple(p.tolist()), int(k)) for p, k in zip(target["permutation"], target["rotation"], strict=True)]
    rows = [view.apply(v) for view, v in zip(views, volumes.flatten(0, 1), strict=True)]
    n = len(rows)
    return {"reconstruction": torch.stack(rows), "rotation": torch.zeros(n, 4), "contrastive": torch.randn(n, 8)}


def test_swinmm_loss_masked_reconstruction_and_mutual_term():
    inputs, target = swinmm_batch()
    assert inputs.shape == (8, 1, 32, 32, 32)  # four views of two samples, view-major
    loss = SwinMMLoss()
    crop, mask = target["reconstruction"], target["mask"]

    perfect = loss.compute_terms(predictions_from(crop.expand(4, *crop.shape).clone(), target), target)
    assert perfect["reconstruction"] == 0 and perfect["mutual"] == 0

    same_everywhere = crop + 0.3 * (1 - mask)  # wrong only where nothing was masked: neither term sees it
    terms = loss.compute_terms(predictions_from(same_everywhere.expand(4, *crop.shape).clone(), target), target)
    assert terms["reconstruction"] == 0 and terms["mutual"] == 0

    agreeing = crop + 0.2 * mask  # all views agree, all off by 0.2 on the masked voxels
    terms = loss.compute_terms(predictions_from(agreeing.expand(4, *crop.shape).clone(), target), target)
    assert terms["mutual"] == 0
    assert terms["reconstruction"].item() == pytest.approx(0.04, rel=1e-5)  # MSE over masked voxels = 0.2²

    volumes = crop.expand(4, *crop.shape).clone()
    volumes[2] += 0.5 * mask  # view 3 disagrees on the masked region
    terms = loss.compute_terms(predictions_from(volumes, target), target)
    # 3 of the 6 view pairs include view 3, each with masked MSE 0.25
    assert terms["mutual"].item() == pytest.approx(0.25 * 3 / 6, rel=1e-5)
    assert terms["reconstruction"].item() == pytest.approx(0.25 / 4, rel=1e-5)


def test_swinmm_loss_trains_the_ssl_head_and_logs_every_term():
    inputs, target = swinmm_batch(batch_size=1, size=64)
    network = SSLHead(feature_size=12)
    loss = SwinMMLoss(mutual_weight=2.0)
    value = loss(network(inputs), target)
    value.backward()
    assert set(loss.terms) == {"rotation", "contrastive", "reconstruction", "mutual", "rotation_accuracy", "total"}
    expected = sum(w * loss.terms[k] for k, w in {**loss.weights}.items())
    assert loss.terms["total"] == pytest.approx(expected, rel=1e-5) and loss.weights["mutual"] == 2.0
    assert network.swinViT.patch_embed.proj.weight.grad.abs().sum() > 0


def test_weight_decay_skips_norms_biases_and_relative_position_tables():
    network = SSLHead(feature_size=12)
    decay, no_decay = decay_param_groups(network, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in network.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert skipped | decayed == set(names.values()) and not skipped & decayed
    assert any("relative_position_bias_table" in n for n in skipped)
    assert all(n.endswith(("bias", "weight")) for n in skipped if "relative_position" not in n)
    assert all(network.get_parameter(n).ndim > 1 and "relative_position" not in n for n in decayed)
    assert all(network.get_parameter(n).ndim == 1 for n in skipped if "relative_position" not in n)


def test_cross_view_fusion_shapes_and_exchange():
    fusion = CrossViewFusion(dim=48, num_tokens=8, num_heads=4)
    a, b = torch.randn(2, 48, 2, 2, 2), torch.randn(2, 48, 2, 2, 2)
    fused_a, fused_b = fusion(a, b)
    assert fused_a.shape == a.shape and fused_b.shape == b.shape
    other_a, _ = fusion(a, torch.randn_like(b))
    assert not torch.allclose(fused_a, other_a)  # view a's output depends on view b
    with pytest.raises(ValueError, match="roi_size"):
        fusion(torch.randn(1, 48, 3, 3, 3), torch.randn(1, 48, 3, 3, 3))


def test_cross_view_network_outputs_fusion_and_weight_loading(tmp_path, caplog):
    torch.manual_seed(0)
    net = CrossViewSwinUNETR(roi_size=(64, 64, 64), in_channels=1, out_channels=3, feature_size=12)
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        train_out = net(x)
        net.eval()
        fused = net(x)
        assert train_out.shape == (1, 6, 64, 64, 64) and fused.shape == (1, 3, 64, 64, 64)
        views = train_out.chunk(2, 1)
        expected = torch.stack([v.softmax(1) for v in views]).mean(0)
        torch.testing.assert_close(fused.softmax(1), expected)  # eval output: the mean of the two views' softmax
        net.fusion.attention.out_proj.weight.zero_()
        net.fusion.attention.out_proj.bias.zero_()
        assert not torch.allclose(net(x), fused, atol=1e-4)  # the cross-attention changes the prediction
    with pytest.raises(ValueError, match="roi_size"):
        net(torch.rand(1, 1, 96, 96, 96))
    with pytest.raises(ValueError, match="shape of the window"):
        CrossViewSwinUNETR(
            roi_size=(64, 64, 96), in_channels=1, out_channels=3, feature_size=12, second_view_permutation=(0, 2, 1)
        )
    thin = CrossViewSwinUNETR(roi_size=(128, 128, 32), in_channels=2, out_channels=3, feature_size=12)
    assert thin.view.permutation == (1, 0, 2)  # the default second view keeps a non-cubic window's shape
    with pytest.raises(ValueError, match="no axis re-ordering"):
        CrossViewSwinUNETR(roi_size=(64, 96, 128), in_channels=1, out_channels=3, feature_size=12)

    encoder = SSLHead(feature_size=12).swinViT.state_dict()
    torch.save({f"swinViT.{k}": v for k, v in encoder.items()}, tmp_path / "ssl.pt")
    fresh = CrossViewSwinUNETR(roi_size=(64, 64, 64), in_channels=1, out_channels=3, feature_size=12)
    with caplog.at_level(logging.INFO, logger="swin_unetr_kit.pretrained"):
        load_pretrained_encoder(fresh, str(tmp_path / "ssl.pt"))
    assert "loaded 126 of 126 encoder tensors" in caplog.text
    for key, value in encoder.items():
        assert torch.equal(fresh.swinViT.state_dict()[key], value)


@pytest.mark.parametrize("sigmoid", [False, True])
def test_cross_view_loss_consistency(sigmoid):
    torch.manual_seed(0)
    loss = CrossViewLoss(consistency_weight=0.5, sigmoid=sigmoid)
    label = (torch.rand(2, 3, 8, 8, 8) > 0.5).float() if sigmoid else torch.randint(0, 3, (2, 1, 8, 8, 8))
    logits = torch.randn(2, 3, 8, 8, 8)
    same = loss(torch.cat([logits, logits], 1), label)
    assert loss.terms["consistency"] == pytest.approx(0.0, abs=1e-6)
    assert same.item() == pytest.approx(loss.terms["segmentation"], rel=1e-6)
    different = loss(torch.cat([logits, torch.randn_like(logits)], 1), label)
    assert loss.terms["consistency"] > 0.1
    assert different.item() == pytest.approx(loss.terms["segmentation"] + 0.5 * loss.terms["consistency"], rel=1e-5)
    with pytest.raises(ValueError, match="2 views"):
        loss(torch.randn(2, 3, 8, 8, 8), label)


class Pointwise(nn.Module):
    """A 1×1×1 convolution: commutes with every axis ordering and turn, so every view predicts the same."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 5


def test_multi_view_inference():
    torch.manual_seed(0)
    volume = torch.rand(1, 1, 40, 36, 30)
    common = {"roi_size": (16, 16, 16), "sw_batch_size": 2, "overlap": 0.5, "mode": "gaussian"}
    plain = SlidingWindowInferer(**common)
    local = nn.Conv3d(1, 4, 3, padding=1)  # not view-invariant
    with torch.no_grad():
        single = plain(volume, local)
        identity = MultiViewSlidingWindowInferer(num_views=1, **common)(volume, local)
        torch.testing.assert_close(identity.softmax(1), single.softmax(1), atol=1e-5, rtol=1e-5)
        disagree = identity.argmax(1) != single.argmax(1)  # only at float-rounding ties of the top two classes
        top2 = single.softmax(1).topk(2, dim=1).values
        assert disagree.float().mean() < 1e-3 and bool(((top2[:, 0] - top2[:, 1])[disagree] < 1e-5).all())

        pointwise = Pointwise()
        every_view = MultiViewSlidingWindowInferer(num_views=len(INFERENCE_VIEWS), **common)(volume, pointwise)
        torch.testing.assert_close(every_view.softmax(1), plain(volume, pointwise).softmax(1), atol=1e-5, rtol=1e-5)

        three = MultiViewSlidingWindowInferer(num_views=3, **common)(volume, local)
        assert not torch.allclose(three.softmax(1), single.softmax(1), atol=1e-3)  # the views are really taken
        sigmoid = MultiViewSlidingWindowInferer(num_views=1, activation="sigmoid", **common)(volume, local)
        torch.testing.assert_close(sigmoid.sigmoid(), single.sigmoid(), atol=1e-5, rtol=1e-5)

    for bad, message in [
        ({"num_views": 0}, "num_views"),
        ({"num_views": len(INFERENCE_VIEWS) + 1}, "num_views"),
        ({"num_views": 4, "roi_size": (16, 16, 32)}, "1 to 3"),  # identity, half turn, swap of the equal axes
        ({"views": [View((2, 1, 0))], "roi_size": (16, 16, 32)}, "change the shape"),
        ({"activation": "relu"}, "activation"),
    ]:
        with pytest.raises(ValueError, match=message):
            MultiViewSlidingWindowInferer(**{**common, **bad})


def test_swinmm_pretrain_then_cross_view_finetune_evaluate_and_infer(synthetic_dataset, tmp_path):
    """Both SwinMM workflows from the bundles with overrides only, the pre-trained weights flowing into fine-tuning."""
    for i in range(2):
        write_ct_case(tmp_path / "unlabeled", f"ct{i}", shape=(64, 64, 64), seed=30 + i)
    ssl = run_workflow(
        configs("train", "swinmm", bundle=SSL_BUNDLE),
        bundle_root=str(tmp_path / "ssl"),
        dataset_dir=str(tmp_path / "unlabeled"),
        feature_size=12,
        num_samples=1,
        val_num_samples=1,
        batch_size=1,
        num_workers=0,
        val_fraction=0.5,
        num_steps=1,
        val_interval=1,
    )
    pretrained = tmp_path / "ssl" / "models" / "swinmm" / "model.pt"
    assert pretrained.is_file() and (tmp_path / "ssl" / "models" / "swinmm" / "latest.pt").is_file()
    parser = ssl.parser
    assert parser["roi_size"] == [64, 64, 64] and parser["mask_ratio"] == 0.5 and parser["weight_decay"] == 0.1
    metrics = parser.get_parsed_content("validate#evaluator").state.metrics
    assert {"val_loss", "val_reconstruction_loss", "val_mutual_loss", "val_rotation_loss"} <= set(metrics)
    assert set(parser.get_parsed_content("loss").terms) >= {"rotation", "contrastive", "reconstruction", "mutual"}
    groups = parser.get_parsed_content("optimizer").param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert set(torch.load(pretrained, weights_only=True)) == set(SSLHead(feature_size=12).state_dict())

    common = {**SMALL, "bundle_root": str(tmp_path / "seg"), "dataset_dir": str(synthetic_dataset)}
    seg = ConfigWorkflow(
        config_file=configs("train", "swinmm"),
        workflow_type="train",
        **common,
        pretrained_ckpt=str(pretrained),
        **{"train#trainer#max_epochs": 1, "val_interval": 1},
    )
    seg.initialize()
    network = seg.parser.get_parsed_content("network")
    assert isinstance(network, CrossViewSwinUNETR)
    encoder = {k[len("swinViT.") :]: v for k, v in torch.load(pretrained, weights_only=True).items() if "swinViT." in k}
    loaded = network.swinViT.state_dict()
    assert loaded.keys() == encoder.keys() and all(torch.equal(loaded[k], v) for k, v in encoder.items())
    seg.run()
    seg.finalize()
    assert 0.0 <= seg.parser.get_parsed_content("validate#evaluator").state.best_metric <= 1.0
    models = tmp_path / "seg" / "models" / "swinmm"
    assert (models / "model.pt").is_file() and (models / "latest.pt").is_file()
    saved = torch.load(models / "model.pt", weights_only=True)
    assert any(k.startswith("fusion.") for k in saved["model"])
    assert saved["network_record"]["network"]["class"] == "CrossViewSwinUNETR"

    run_workflow(configs("train", "evaluate", "swinmm"), workflow_type="infer", **common, num_views=2)
    report = json.loads((tmp_path / "seg" / "eval" / "metrics.json").read_text())
    assert len(report["per_case"]) == 2
    inference = run_workflow(
        configs("inference", "swinmm"),
        workflow_type="infer",
        **common,
        input=str(synthetic_dataset / "imagesTs"),
        num_views=3,
    )
    assert len(inference.parser.get_parsed_content("inferer").views) == 3
    out = nib.load(tmp_path / "seg" / "eval" / "test0_seg.nii.gz")
    assert out.shape == nib.load(synthetic_dataset / "imagesTs" / "test0.nii.gz").shape
    assert set(np.unique(np.asarray(out.dataobj))) <= set(range(14))


def test_msd_cross_view_variant_builds_for_sigmoid_and_softmax_tasks():
    msd = REPO / "bundles" / "swin_unetr_msd"
    for task, activation in [("Task01_BrainTumour", "sigmoid"), ("Task05_Prostate", "softmax")]:
        workflow = ConfigWorkflow(
            config_file=configs("train", "swinmm", bundle=msd),
            workflow_type="train",
            bundle_root=str(msd),
            task=task,
            **{"network_def#feature_size": 12},
        )
        parser = workflow.parser
        network = parser.get_parsed_content("network_def")
        assert isinstance(network, CrossViewSwinUNETR) and isinstance(network, SwinUNETR)
        assert network.activation == activation
        assert parser.get_parsed_content("loss").sigmoid == (activation == "sigmoid")
        assert parser.get_parsed_content("ckpt_dir").endswith(f"models/{task}/swinmm")
        inference = ConfigWorkflow(
            config_file=configs("inference", "swinmm", bundle=msd),
            workflow_type="infer",
            bundle_root=str(msd),
            task=task,
            num_views=3,
        )
        assert len(inference.parser.get_parsed_content("inferer").views) == 3
