"""SwinMM: view transforms, grid mask, pre-training loss, cross-view network and loss, multi-view inference, and the
bundles' SwinMM workflows (pre-train → cross-view fine-tune → evaluate and infer with several views)."""

from __future__ import annotations

import json
import logging
import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, SMALL, configs, run_workflow, write_ct_case
from monai.bundle import ConfigWorkflow
from monai.data import list_data_collate
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.networks.blocks import UnetrBasicBlock, UnetResBlock
from monai.networks.nets import SwinUNETR
from torch import nn

from swin_unetr_kit.pretrained import load_pretrained_encoder
from swin_unetr_kit.ssl import SSLHead, decay_param_groups
from swin_unetr_kit.swinmm import (
    INFERENCE_VIEWS,
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


def test_rotated_views_masked_independently_and_permuted_views_keep_their_source_mask():
    transform = SwinMMViewsd(mask_ratio=0.5, cell_size=16)
    transform.set_random_state(3)
    crop = torch.rand(1, 64, 64, 64) + 0.1  # no zeros of its own, so zeros mark the mask
    d = transform({"image": crop})
    assert d["views"].shape == (4, 1, 64, 64, 64) and d["mask"].shape == (2, 1, 64, 64, 64)
    mask1, mask2 = d["mask"].bool()
    assert d["mask"][0].mean().item() == d["mask"][1].mean().item() == 0.5
    assert not torch.equal(mask1, mask2)  # drawn independently
    orderings = [tuple(p.tolist()) for p in d["permutation"]]
    assert all(order in {(1, 0, 2), (2, 1, 0)} for order in orderings)  # the released code's non-identity orderings
    for i, mask in enumerate((mask1, mask2)):
        rotated = torch.rot90(crop, int(d["rotation"][i]), (2, 3))  # the Swin UNETR pre-training's rotation plane
        assert torch.equal(d["target"][i], rotated)  # the target: the rotated view before masking
        assert torch.equal(d["views"][i], rotated * ~mask)  # masked in its own frame
        permuted = View(orderings[i]).invert(d["views"][2 + i])
        assert torch.equal(permuted, d["views"][i])  # view 3 (4) is masked view 1 (2), permuted
        assert torch.equal(permuted == 0, mask)  # so it keeps its source's mask

    draws, small = [], SwinMMViewsd(mask_ratio=0.5, cell_size=8)
    for seed in range(40):
        small.set_random_state(seed)
        d = small({"image": crop[:, :16, :16, :16]})
        draws.append((tuple(d["rotation"].tolist()), tuple(map(tuple, d["permutation"].tolist()))))
    assert {r for rotations, _ in draws for r in rotations} == {0, 1, 2, 3}
    assert any(r[0] != r[1] for r, _ in draws) and any(r[0] == r[1] for r, _ in draws)  # independent turns
    assert any(p[0] == p[1] for _, p in draws) and any(p[0] != p[1] for _, p in draws)  # independent orderings
    with pytest.raises(ValueError, match="cubic"):
        transform({"image": torch.rand(1, 64, 64, 32)})
    with pytest.raises(ValueError, match="mask_ratio"):
        SwinMMViewsd(mask_ratio=1.0)


def swinmm_batch(batch_size: int = 2, size: int = 32):
    transform = SwinMMViewsd(mask_ratio=0.5, cell_size=8)
    transform.set_random_state(0)
    samples = [transform({"image": torch.rand(1, size, size, size)}) for _ in range(batch_size)]
    return prepare_swinmm_batch(list_data_collate(samples))


def reference_pretraining_loss(pred: dict, batch: dict, norm_pix_loss: bool, ratio: float = 0.5) -> torch.Tensor:
    """The released SwinMM ``Pretrain/main.py`` + ``losses/loss.py`` loss, written out on the sample-major batch of
    :class:`SwinMMViewsd` outputs (``batch``) and head outputs for the view-major rows ``pred``."""
    size = batch["views"].shape[0]
    rows = lambda name, view: pred[name][view * size : (view + 1) * size]  # noqa: E731
    imgs = batch["target"][:, :, 0]  # [B, 2, X, Y, Z]: views 1 and 2 on the channel axis, as the reference stacks them
    mask = batch["mask"][:, :, 0]  # [B, 2, X, Y, Z]
    if norm_pix_loss:
        flat = imgs.flatten(2)
        imgs = ((flat - flat.mean(-1, keepdim=True)) / (flat.var(-1, keepdim=True) + 1e-6) ** 0.5).reshape(imgs.shape)

    def recon(output: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output * mask, imgs * mask) / ratio

    def back(view: int) -> torch.Tensor:  # permuted view 3 or 4, mapped back sample by sample
        orders = batch["permutation"][:, view - 2].tolist()
        return torch.cat(
            [View(tuple(o)).invert(r[None]) for o, r in zip(orders, rows("reconstruction", view), strict=True)]
        )

    z1, z2 = (F.normalize(rows("contrastive", v), dim=1) for v in (0, 1))
    z = torch.cat([z1, z2])
    sim = F.cosine_similarity(z[:, None], z[None], dim=2)
    positives = torch.cat([torch.diag(sim, size), torch.diag(sim, -size)])
    denominator = ((~torch.eye(2 * size, dtype=bool)).float() * torch.exp(sim / 0.5)).sum(1)
    contrastive = (-torch.log(torch.exp(positives / 0.5) / denominator)).sum() / (2 * size)
    rotation = F.cross_entropy(torch.cat([rows("rotation", 0), rows("rotation", 1)]), batch["rotation"].T.flatten())
    loss1 = rotation + contrastive + recon(torch.cat([rows("reconstruction", 0), rows("reconstruction", 1)], 1))
    loss2 = recon(torch.cat([back(2), back(3)], 1))
    m1 = mask[:, :1]
    mutual = F.mse_loss(back(2) * m1, rows("reconstruction", 0) * m1) / ratio
    return loss1 + loss2 + mutual


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_swinmm_loss_is_the_reference_loss(norm_pix_loss):
    transform = SwinMMViewsd(mask_ratio=0.5, cell_size=8)
    transform.set_random_state(0)
    batch = list_data_collate([transform({"image": torch.rand(1, 32, 32, 32) * (i + 1)}) for i in range(3)])
    _, target = prepare_swinmm_batch(batch)
    torch.manual_seed(0)
    pred = {
        "reconstruction": torch.randn(12, 1, 32, 32, 32),
        "rotation": torch.randn(12, 4),
        "contrastive": torch.randn(12, 8),
    }
    loss = SwinMMLoss(norm_pix_loss=norm_pix_loss)
    value = loss(pred, target)
    expected = reference_pretraining_loss(pred, batch, norm_pix_loss)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(loss.terms) == {
        "rotation",
        "contrastive",
        "reconstruction",
        "permuted_reconstruction",
        "mutual",
        "rotation_accuracy",
        "total",
    }
    # only views 1 and 2 feed the rotation and contrastive heads' losses
    changed = {**pred, "rotation": pred["rotation"].clone(), "contrastive": pred["contrastive"].clone()}
    changed["rotation"][6:] += 5.0
    changed["contrastive"][6:] = torch.randn(6, 8)
    assert loss(changed, target).item() == pytest.approx(value.item(), rel=1e-6)


def test_swinmm_loss_norm_pix_target_and_mutual_term():
    inputs, target = swinmm_batch()
    assert inputs.shape == (8, 1, 32, 32, 32)  # four views of two samples, view-major
    crop, mask = target["reconstruction"], target["mask"]  # views 1 and 2 of both samples: [4, 1, ...]
    normalised = (crop - crop.mean((2, 3, 4), keepdim=True)) / crop.flatten(2).var(-1)[..., None, None, None].add(
        1e-6
    ).sqrt()

    def predictions(rotated: torch.Tensor, permuted_back: torch.Tensor) -> dict:
        orders = [tuple(p.tolist()) for p in target["permutation"]]
        rows = torch.cat(
            [rotated, torch.cat([View(o).apply(r[None]) for o, r in zip(orders, permuted_back, strict=True)])]
        )
        return {"reconstruction": rows, "rotation": torch.zeros(8, 4), "contrastive": torch.randn(8, 8)}

    terms = SwinMMLoss().compute_terms(predictions(normalised, normalised), target)
    assert terms["reconstruction"].item() == pytest.approx(0, abs=1e-8) and terms["mutual"].item() == 0
    terms = SwinMMLoss(norm_pix_loss=False).compute_terms(predictions(crop, crop + 0.3 * (1 - mask)), target)
    assert terms["permuted_reconstruction"].item() == 0 and terms["mutual"] == 0  # off the mask: not seen
    off = crop.clone()
    off[2:] += 0.5 * mask[2:]  # view 4 (of both samples) wrong on its mask: a reconstruction error, not mutual
    off[:1] += 0.2 * mask[:1]  # view 3 of sample 1 off by 0.2 on mask 1: both terms see it
    terms = SwinMMLoss(norm_pix_loss=False).compute_terms(predictions(crop, off), target)
    assert terms["permuted_reconstruction"].item() == pytest.approx((0.25 * 2 + 0.04) / 4, rel=1e-5)
    assert terms["mutual"].item() == pytest.approx(0.04 / 2, rel=1e-5)


def test_swinmm_loss_trains_the_ssl_head_and_logs_every_term():
    inputs, target = swinmm_batch(batch_size=1, size=64)
    network = SSLHead(feature_size=12)
    loss = SwinMMLoss(mutual_weight=2.0)
    value = loss(network(inputs), target)
    value.backward()
    assert loss.weights["mutual"] == 2.0
    expected = sum(w * loss.terms[k] for k, w in loss.weights.items())
    assert loss.terms["total"] == pytest.approx(expected, rel=1e-5)
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


def reference_fusion(fusion: CrossViewFusion, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The released ``TransFusion`` with one ``Block`` (``WORD/models/cross_attention.py``), on ``fusion``'s weights."""
    attention, heads = fusion.attention, fusion.attention.num_heads

    def tokens(x: torch.Tensor) -> torch.Tensor:
        return fusion.norm(fusion.embed(x).flatten(2).transpose(1, 2) + fusion.position)

    def split(x: torch.Tensor) -> torch.Tensor:  # B, N, D -> B, heads, N, D / heads
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)

    def attend(query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = split(attention.to_q(query)), split(attention.to_k(context)), split(attention.to_v(context))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        return fusion.out_norm(attention.out_proj((scores @ v).transpose(1, 2).flatten(2)))  # no residual

    ta, tb = tokens(a), tokens(b)
    return tuple(attend(q, c).transpose(1, 2).reshape(a.shape) for q, c in ((ta, tb), (tb, ta)))


def test_cross_view_fusion_is_the_reference_transfusion():
    torch.manual_seed(0)
    fusion = CrossViewFusion(dim=48, num_tokens=8, num_heads=4)
    nn.init.normal_(fusion.position)  # the reference starts it at zero, as here; a non-zero one is checked too
    a, b = torch.randn(2, 48, 2, 2, 2), torch.randn(2, 48, 2, 2, 2)
    with torch.no_grad():
        for got, expected in zip(fusion(a, b), reference_fusion(fusion, a, b), strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        other_a, _ = fusion(a, torch.randn_like(b))
        assert not torch.allclose(fusion(a, b)[0], other_a)  # view a's output depends on view b
    with pytest.raises(ValueError, match="roi_size"):
        fusion(torch.randn(1, 48, 3, 3, 3), torch.randn(1, 48, 3, 3, 3))


def test_cross_view_network_fuses_after_encoder10_with_a_residual_block_on_the_4th_hidden_state():
    torch.manual_seed(0)
    net = CrossViewSwinUNETR(roi_size=(64, 64, 64), in_channels=1, out_channels=3, feature_size=12)
    assert isinstance(net.encoder5, UnetrBasicBlock) and isinstance(net.encoder5.layer, UnetResBlock)  # residual
    assert [v.permutation for v in net.orderings] == [(0, 1, 2), (1, 0, 2), (2, 1, 0)]
    assert net.view_pairs == [(0, 1), (1, 2), (2, 0)]  # the released test script's view pairs
    seen = {}

    def keep(name: str):
        return lambda module, args, output: seen.update({name: (args, output)})

    for name in ("swinViT", "encoder5", "encoder10", "fusion", "decoder5"):
        getattr(net, name).register_forward_hook(keep(name))
    x = torch.rand(1, 1, 64, 64, 64)
    first, second = net.orderings[1], net.orderings[2]
    with torch.no_grad():
        outputs = net.forward_views(x, (1, 2))
    hidden, enc4, bottleneck = seen["swinViT"][1], seen["encoder5"][1], seen["encoder10"][1]
    assert torch.equal(seen["encoder5"][0][0], hidden[3])  # encoder5 on the 4th hidden state
    assert torch.equal(seen["encoder10"][0][0], hidden[4])
    fusion_in, (fused_a, fused_b) = seen["fusion"]
    assert torch.equal(fusion_in[0], bottleneck[:1])  # fused after encoder10, in the first view's frame
    assert torch.equal(fusion_in[1], first.apply(second.invert(bottleneck[1:])))
    dec_in = seen["decoder5"][0]
    assert torch.equal(dec_in[1], enc4)  # the decoder's skip is encoder5's output, not the raw hidden state
    assert torch.equal(dec_in[0][:1], fused_a)  # the fused features replace the bottleneck: no residual add
    assert torch.equal(dec_in[0][1:], second.apply(first.invert(fused_b)))
    assert [o.shape for o in outputs] == [(1, 3, 64, 64, 64)] * 2
    assert set(net.state_dict()) - set(SwinUNETR(in_channels=1, out_channels=3, feature_size=12).state_dict()) == {
        k for k in net.state_dict() if k.startswith(("encoder5.", "fusion."))
    }


def test_cross_view_network_draws_two_distinct_random_views_per_training_step_and_fuses_all_pairs_in_eval():
    net = CrossViewSwinUNETR(roi_size=(64, 64, 64), in_channels=1, out_channels=3, feature_size=12)
    pairs = []

    def fake_views(x: torch.Tensor, pair) -> list[torch.Tensor]:
        pairs.append(tuple(pair))
        return [torch.full((1, 3, 64, 64, 64), float(i)) for i in pair]

    net.forward_views = fake_views
    x = torch.rand(1, 1, 64, 64, 64)
    torch.manual_seed(0)
    for _ in range(60):
        out = net(x)
    assert out.shape == (1, 6, 64, 64, 64)
    assert all(a != b for a, b in pairs)  # two distinct orderings every step
    assert set(pairs) == {(a, b) for a in range(3) for b in range(3) if a != b}  # drawn at random, in either order
    pairs.clear()
    net.eval()
    fused = net(x)
    assert pairs == net.view_pairs and fused.shape == (1, 3, 64, 64, 64)
    expected = torch.stack([torch.full((3,), float(i)).softmax(0) for pair in pairs for i in pair]).mean(0)
    torch.testing.assert_close(fused[0, :, 0, 0, 0].softmax(0), expected)  # the mean of the six softmax outputs
    thin = CrossViewSwinUNETR(roi_size=(128, 128, 32), in_channels=2, out_channels=3, feature_size=12)
    assert [v.permutation for v in thin.orderings] == [(0, 1, 2), (1, 0, 2)] and thin.view_pairs == [(0, 1), (1, 0)]
    with pytest.raises(ValueError, match="cross-view fine-tuning needs two"):
        CrossViewSwinUNETR(roi_size=(64, 96, 128), in_channels=1, out_channels=3, feature_size=12)


def test_cross_view_network_takes_a_pretrained_encoder(tmp_path, caplog):
    encoder = SSLHead(feature_size=12).swinViT.state_dict()
    torch.save({f"swinViT.{k}": v for k, v in encoder.items()}, tmp_path / "ssl.pt")
    fresh = CrossViewSwinUNETR(roi_size=(64, 64, 64), in_channels=1, out_channels=3, feature_size=12)
    with caplog.at_level(logging.INFO, logger="swin_unetr_kit.pretrained"):
        load_pretrained_encoder(fresh, str(tmp_path / "ssl.pt"))
    assert "loaded 126 of 126 encoder tensors" in caplog.text
    for key, value in encoder.items():
        assert torch.equal(fresh.swinViT.state_dict()[key], value)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # the reference's own KLDivLoss(reduction='mean')
def test_cross_view_loss_is_the_reference_dice_ce_plus_mean_kl():
    torch.manual_seed(0)
    label = torch.randint(0, 14, (2, 1, 8, 8, 8))
    a, b = torch.randn(2, 14, 8, 8, 8), torch.randn(2, 14, 8, 8, 8)
    loss = CrossViewLoss()
    value = loss(torch.cat([a, b], 1), label)
    dice_ce, kl = DiceCELoss(to_onehot_y=True, softmax=True), torch.nn.KLDivLoss(reduction="mean")
    outputs = [a, b]
    expected = 0.0
    for i, out in enumerate(outputs):  # the released WORD/trainer.py loop
        mutual = sum(kl(F.log_softmax(out, 1), F.softmax(o, 1)) for j, o in enumerate(outputs) if j != i)
        expected = expected + (dice_ce(out, label) + mutual / (len(outputs) - 1)) / len(outputs)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    reference_kl = (kl(F.log_softmax(a, 1), F.softmax(b, 1)) + kl(F.log_softmax(b, 1), F.softmax(a, 1))) / 2
    assert loss.terms["consistency"] == pytest.approx(reference_kl.item(), rel=1e-5)
    summed_over_classes = F.kl_div(F.log_softmax(a, 1), F.softmax(b, 1), reduction="none").sum(1).mean()
    assert summed_over_classes.item() == pytest.approx(14 * kl(F.log_softmax(a, 1), F.softmax(b, 1)).item(), rel=1e-5)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("sigmoid", [False, True])
def test_cross_view_loss_consistency(sigmoid):
    torch.manual_seed(0)
    loss = CrossViewLoss(consistency_weight=0.5, sigmoid=sigmoid)
    label = (torch.rand(2, 3, 8, 8, 8) > 0.5).float() if sigmoid else torch.randint(0, 3, (2, 1, 8, 8, 8))
    logits = torch.randn(2, 3, 8, 8, 8)
    same = loss(torch.cat([logits, logits], 1), label)
    assert loss.terms["consistency"] == pytest.approx(0.0, abs=1e-6)
    assert same.item() == pytest.approx(loss.terms["segmentation"], rel=1e-6)
    other = torch.randn_like(logits)
    different = loss(torch.cat([logits, other], 1), label)
    assert loss.terms["consistency"] > 0.01
    assert different.item() == pytest.approx(loss.terms["segmentation"] + 0.5 * loss.terms["consistency"], rel=1e-5)
    if sigmoid:  # each channel's Bernoulli [p, 1 - p], averaged over every element like KLDivLoss(reduction='mean')
        p, q = (torch.stack([x.sigmoid(), 1 - x.sigmoid()], -1) for x in (logits, other))
        kl = torch.nn.KLDivLoss(reduction="mean")
        expected = (kl(p.log(), q) + kl(q.log(), p)) / 2
        assert loss.terms["consistency"] == pytest.approx(expected.item(), rel=1e-4)
    with pytest.raises(ValueError, match="2 views"):
        loss(torch.randn(2, 3, 8, 8, 8), label)


class FakeCrossView(CrossViewSwinUNETR):
    """A cross-view network whose views are cheap and view-dependent: a 3×3×3 convolution (not invariant to axis
    orderings) of each view's input, mapped back, shifted by the pair's first index (so pairs differ too)."""

    def __init__(self) -> None:
        super().__init__(roi_size=(32, 32, 32), in_channels=1, out_channels=4, feature_size=12)
        self.local = nn.Conv3d(1, 4, 3, padding=1)

    def forward_views(self, x: torch.Tensor, pair) -> list[torch.Tensor]:
        views = [self.orderings[i] for i in pair]
        return [view.invert(self.local(view.apply(x))) * 3 + 0.5 * pair[0] for view in views]


def test_multi_view_inference_of_a_cross_view_network_is_the_reference_procedure():
    torch.manual_seed(0)
    volume = torch.rand(1, 1, 40, 36, 30)
    common = {"roi_size": (32, 32, 32), "sw_batch_size": 2, "overlap": 0.7, "mode": "gaussian"}
    network = FakeCrossView().eval()
    with torch.no_grad():
        fused = MultiViewSlidingWindowInferer(**common)(volume, network)
        # the released test.py: for each view pair, a two-view sliding window (Gaussian blending of each view's
        # logits), then softmax of each of the two stitched outputs, all six summed
        total = 0
        for pair in [(0, 1), (1, 2), (2, 0)]:
            for k in range(2):
                stitched = SlidingWindowInferer(**common)(volume, lambda w, k=k, p=pair: network.forward_views(w, p)[k])
                total = total + stitched.softmax(1)
        torch.testing.assert_close(fused.softmax(1), total / 6, atol=1e-5, rtol=1e-5)
        assert torch.equal(fused.argmax(1), total.argmax(1))
    with pytest.raises(ValueError, match="num_views 1"):
        MultiViewSlidingWindowInferer(num_views=2, **common)(volume, network)


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
        tracking="mlflow",
    )
    pretrained = tmp_path / "ssl" / "models" / "swinmm" / "model.pt"
    assert pretrained.is_file() and (tmp_path / "ssl" / "models" / "swinmm" / "latest.pt").is_file()
    parser = ssl.parser
    assert parser["roi_size"] == [64, 64, 64] and parser["mask_ratio"] == 0.5 and parser["weight_decay"] == 0.1
    metrics = parser.get_parsed_content("validate#evaluator").state.metrics
    assert {"val_loss", "val_reconstruction_loss", "val_mutual_loss", "val_rotation_loss"} <= set(metrics)
    assert set(parser.get_parsed_content("loss").terms) >= {"rotation", "contrastive", "reconstruction", "mutual"}
    from monai.utils import path_to_sqlite_uri

    mlflow = pytest.importorskip("mlflow")  # --tracking mlflow logs every term of the SwinMM loss too
    client = mlflow.MlflowClient(path_to_sqlite_uri(str(tmp_path / "ssl" / "eval" / "mlruns.db")))
    (run,) = client.search_runs([client.get_experiment_by_name("swin_unetr_ssl_pretrain").experiment_id])
    assert run.info.run_name == "swinmm training" and {"mutual", "reconstruction", "val_mutual_loss"} <= set(
        run.data.metrics
    )
    groups = parser.get_parsed_content("optimizer").param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    pretrained_weights = torch.load(pretrained, weights_only=True)["model"]  # beside its record
    assert set(pretrained_weights) == set(SSLHead(feature_size=12).state_dict())

    common = {**SMALL, "bundle_root": str(tmp_path / "seg"), "dataset_dir": str(synthetic_dataset)}
    seg = ConfigWorkflow(
        config_file=configs("train", "swinmm"),
        workflow_type="train",
        **common,
        pretrained_ckpt=str(pretrained),
        **{"train#trainer#max_epochs": 1, "train#trainer#epoch_length": 1, "val_interval": 1},
    )
    seg.initialize()
    network = seg.parser.get_parsed_content("network")
    assert isinstance(network, CrossViewSwinUNETR)
    encoder = {k[len("swinViT.") :]: v for k, v in pretrained_weights.items() if "swinViT." in k}
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

    run_workflow(configs("train", "evaluate", "swinmm"), workflow_type="infer", **common)
    report = json.loads((tmp_path / "seg" / "eval" / "swinmm" / "metrics.json").read_text())
    assert len(report["per_case"]) == 2
    inference = run_workflow(
        configs("inference", "swinmm"),
        workflow_type="infer",
        **common,
        input=str(synthetic_dataset / "imagesTs"),
    )
    parser = inference.parser
    assert isinstance(parser.get_parsed_content("inferer"), MultiViewSlidingWindowInferer)
    # SMALL_ROI keeps its shape under two axis orderings: two views (a cube has three: tested above)
    assert parser.get_parsed_content("network").view_pairs == [(0, 1), (1, 0)]
    out = nib.load(tmp_path / "seg" / "eval" / "swinmm" / "test0_seg.nii.gz")
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
        assert parser.get_parsed_content("ckpt_dir").endswith(f"models/{task}/fold0of5/swinmm")
        inference = ConfigWorkflow(
            config_file=configs("inference", "swinmm", bundle=msd),
            workflow_type="infer",
            bundle_root=str(msd),
            task=task,
        )
        assert inference.parser["inferer"]["mode"] == "gaussian"
        assert isinstance(inference.parser.get_parsed_content("inferer"), MultiViewSlidingWindowInferer)


def test_swinmm_defaults_follow_the_reference_runs():
    """The released run scripts' settings, as the bundles' SwinMM configs parse them (nothing is run)."""
    ssl = ConfigWorkflow(config_file=configs("train", "swinmm", bundle=SSL_BUNDLE), workflow_type="train").parser
    # Pretrain/run.sh: --batch_size 2 (volumes; 2 crops each), --lr 5e-4 scaled by batch / 2, --norm_pix_loss, no clip
    assert (ssl.get_parsed_content("batch_size"), ssl.get_parsed_content("num_samples")) == (2, 2)
    assert ssl.get_parsed_content("learning_rate") == pytest.approx(5e-4)
    assert ssl.get_parsed_content("grad_clip") == 0.0 and ssl.get_parsed_content("num_steps") == 30000
    loss = ssl.get_parsed_content("loss")
    assert loss.norm_pix_loss and loss.weights["permuted_reconstruction"] == loss.weights["reconstruction"] == 1.0
    btcv = ConfigWorkflow(config_file=configs("train", "swinmm"), workflow_type="train").parser
    assert btcv.get_parsed_content("roi_size") == [64, 64, 64]  # WORD/main.py's window
    dice_ce = btcv.get_parsed_content("loss").dice_ce  # WORD/main.py's default: plain DiceCE
    assert not dice_ce.dice.squared_pred and dice_ce.dice.smooth_nr == 1e-5 and dice_ce.lambda_dice == 1.0
