"""Pretrained encoder initialisation in both checkpoint layouts, with exact counts, and the legacy merge order."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import configs, released_layout
from monai.bundle import ConfigWorkflow
from monai.networks.nets import SwinUNETR

from swin_unetr_kit.pretrained import (
    LegacyPatchMerging,
    PretrainedWeightsError,
    load_encoder_weights,
    load_pretrained_encoder,
)


def _net(feature_size: int = 12, seed: int = 0, **kwargs) -> SwinUNETR:
    torch.manual_seed(seed)
    return SwinUNETR(in_channels=1, out_channels=14, feature_size=feature_size, **kwargs)


def _released_layout(encoder_state: dict) -> dict:
    """The released layout with the heads the file also carries (rotation, contrastive, reconstruction)."""
    checkpoint = released_layout(encoder_state)
    checkpoint["state_dict"]["module.rotation_head.weight"] = torch.randn(4, 192)
    checkpoint["state_dict"]["module.contrastive_head.weight"] = torch.randn(512, 192)
    checkpoint["state_dict"]["module.conv.0.weight"] = torch.randn(96, 192, 3, 3, 3)
    checkpoint["epoch"] = 100
    return checkpoint


def _assert_encoders_equal(a: SwinUNETR, b: SwinUNETR) -> None:
    sa, sb = a.swinViT.state_dict(), b.swinViT.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_released_ssl_layout_loads_every_encoder_tensor(tmp_path, caplog):
    source = _net(seed=1)
    path = tmp_path / "model_swinvit.pt"
    torch.save(_released_layout(source.swinViT.state_dict()), path)
    target = _net(seed=2)
    n_encoder = len(target.swinViT.state_dict())
    with caplog.at_level(logging.INFO, logger="swin_unetr_kit.pretrained"):
        assert load_encoder_weights(target.swinViT, str(path)) == n_encoder
    assert f"loaded {n_encoder} of {n_encoder} encoder tensors" in caplog.text
    assert "3 other tensors in the file ignored" in caplog.text
    _assert_encoders_equal(source, target)
    # the same result as MONAI's own loader for this layout
    via_monai = _net(seed=3)
    via_monai.load_from(torch.load(path, weights_only=True))
    _assert_encoders_equal(via_monai, target)


@pytest.mark.parametrize("layout", ["bare", "swinViT-prefixed", "full model.pt", "ddp-wrapped"])
def test_our_layouts_load_every_encoder_tensor(tmp_path, layout):
    source = _net(seed=1)
    encoder_state = source.swinViT.state_dict()
    checkpoint = {
        "bare": encoder_state,
        "swinViT-prefixed": {"state_dict": {f"swinViT.{k}": v for k, v in encoder_state.items()}},
        "full model.pt": source.state_dict(),
        "ddp-wrapped": {"network": {f"module.{k}": v for k, v in source.state_dict().items()}},
    }[layout]
    path = tmp_path / "encoder.pt"
    torch.save(checkpoint, path)
    target = _net(seed=2)
    assert load_encoder_weights(target.swinViT, str(path)) == len(encoder_state)
    _assert_encoders_equal(source, target)


def test_wrong_architecture_is_an_error(tmp_path):
    path = tmp_path / "f24.pt"
    torch.save(_released_layout(_net(feature_size=24).swinViT.state_dict()), path)
    with pytest.raises(PretrainedWeightsError, match=r"f24\.pt: \d+ encoder tensors have another shape"):
        load_pretrained_encoder(_net(feature_size=12), str(path))


def test_checkpoint_matching_nothing_is_an_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"backbone.conv1.weight": torch.zeros(3)}}, path)
    with pytest.raises(PretrainedWeightsError, match=r"other\.pt: none of its 1 tensors match"):
        load_pretrained_encoder(_net(), str(path))


def test_missing_or_corrupt_checkpoint_is_an_error(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="not found"):
        load_pretrained_encoder(_net(), str(tmp_path / "nope.pt"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(PretrainedWeightsError, match=r"corrupt\.pt: cannot be read"):
        load_pretrained_encoder(_net(), str(corrupt))


def test_no_checkpoint_leaves_the_network_alone():
    net = _net(seed=5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert load_pretrained_encoder(net, None) is net
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_bundle_override_initialises_the_encoder(tmp_path):
    source = _net(seed=1)
    path = tmp_path / "model_swinvit.pt"
    torch.save(_released_layout(source.swinViT.state_dict()), path)
    workflow = ConfigWorkflow(
        config_file=configs("train"),
        workflow_type="train",
        pretrained_ckpt=str(path),
        device="$torch.device('cpu')",
        **{"network_def#feature_size": 12},
    )
    network = workflow.parser.get_parsed_content("network")
    _assert_encoders_equal(source, network)


# MONAI < 1.5 (v0.9 to 1.4) concatenated the 2x2x2 sub-voxels of 3D "merging" in this (depth, height, width) order,
# copied from its source; MONAI >= 1.5 uses each sub-voxel once.
OLD_MONAI_ORDER = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)]
NEW_MONAI_ORDER = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]


def _concatenation_order(merging: torch.nn.Module) -> list[tuple[int, int, int]]:
    merging.norm, merging.reduction = torch.nn.Identity(), torch.nn.Identity()
    d, h, w = torch.meshgrid(torch.arange(4), torch.arange(4), torch.arange(4), indexing="ij")
    code = (100 * d + 10 * h + w).float()[None, ..., None]  # B, D, H, W, C=1, value encodes its position
    merged = merging(code)[0, 1, 1, 1]  # the merged voxel covering (2..3, 2..3, 2..3)
    return [((int(v) // 100) - 2, (int(v) // 10 % 10) - 2, (int(v) % 10) - 2) for v in merged]


def test_legacy_merging_reproduces_the_old_order():
    assert _concatenation_order(LegacyPatchMerging(dim=1)) == OLD_MONAI_ORDER
    from monai.networks.nets.swin_unetr import PatchMerging

    assert _concatenation_order(PatchMerging(dim=1)) == NEW_MONAI_ORDER  # why the legacy class is needed


def test_legacy_merging_is_a_config_switch():
    workflow = ConfigWorkflow(
        config_file=configs("train"),
        workflow_type="train",
        legacy_patch_merging=True,
        **{"network_def#feature_size": 12},
    )
    net = workflow.parser.get_parsed_content("network_def")
    merges = [m for m in net.modules() if "PatchMerging" in type(m).__name__]
    assert merges and all(isinstance(m, LegacyPatchMerging) for m in merges)
    # same parameter names and shapes as the default network: the same checkpoints load into either
    default = _net(feature_size=12)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}
