"""Weights compute what they were trained to compute: the network is built in the patch-merging order its checkpoint
was trained in, for every source of weights (our records, the released SSL layout, the zoo's bare state dict, any other
file), and every checkpoint the bundles write carries that record. "Trained" weights are made here under each order."""

from __future__ import annotations

import hashlib
import json
import logging
import sys

import preloaded_python
import pytest
import torch
import yaml
from conftest import BTCV_BUNDLE, REPO, SSL_SMALL_ROI, configs, released_layout
from ignite.engine import Engine
from monai.bundle import ConfigWorkflow
from monai.networks.nets import SwinUNETR

from swin_unetr_kit.pretrained import LegacyPatchMerging
from swin_unetr_kit.record import (
    RECORD_KEY,
    NetworkRecord,
    RecordError,
    describe,
    patch_merging_order,
    resolve_patch_merging,
)

SSL_BUNDLE = REPO / "bundles" / "swin_unetr_ssl_pretrain"
SMALL_NET = {"network_def#feature_size": 12, "device": "$torch.device('cpu')"}
# the smallest input the whole network runs at (the encoder alone runs at 32^3)
IMAGE = torch.rand(1, 1, 64, 32, 32, generator=torch.Generator().manual_seed(0))


SAME = {"rtol": 1e-4, "atol": 1e-5}  # float noise of other attention kernels; another order differs by ~1e-1


def trained(order: str, seed: int = 1) -> SwinUNETR:
    """A small BTCV network "trained" (randomly initialised) in ``order``."""
    torch.manual_seed(seed)
    downsample = LegacyPatchMerging if order == "legacy" else "merging"
    network = SwinUNETR(
        in_channels=1, out_channels=14, feature_size=12, downsample=downsample, use_flash_attention=True
    )
    return network.eval()


def outputs(network: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return network.eval()(IMAGE)


def encoder_features(network: torch.nn.Module) -> torch.Tensor:
    """The bottleneck features: every patch merging is behind them (the encoder alone runs at 32^3)."""
    with torch.no_grad():
        return network.swinViT(IMAGE[..., :32, :, :])[4]


def with_weights_of(network: SwinUNETR, order: str) -> SwinUNETR:
    """The same weights in a network of ``order``: what a wrong guess would compute."""
    other = trained(order, seed=99)
    other.load_state_dict(network.state_dict())
    return other


def recorded(network: SwinUNETR) -> dict:
    """A checkpoint as the bundles write model.pt."""
    return {"model": network.state_dict(), RECORD_KEY: NetworkRecord(network).state_dict()}


def network_of(workflow: ConfigWorkflow, load: bool = True) -> tuple[torch.nn.Module, list[str]]:
    """The workflow's network, with its weights loaded by the config's own CheckpointLoader (``load``), and what the
    record module logged while it was built (the bundle's logging.conf replaces pytest's capture, hence a handler)."""
    logged = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: logged.append(record.getMessage())
    logger = logging.getLogger("swin_unetr_kit.record")
    logger.addHandler(handler)
    try:
        network = workflow.parser.get_parsed_content("network")
    finally:
        logger.removeHandler(handler)
    if load:
        workflow.parser.get_parsed_content("handlers#0")(Engine(lambda engine, batch: None))  # the loader alone
    return network, logged


def inference_network(ckpt_path, **overrides) -> tuple[torch.nn.Module, list[str]]:
    return network_of(
        ConfigWorkflow(
            config_file=configs("inference"), workflow_type="infer", ckpt_path=str(ckpt_path), **SMALL_NET, **overrides
        )
    )


def test_our_checkpoints_run_in_their_recorded_order(tmp_path):
    order = "legacy"  # the current order is the one followed without a record: see the unrecorded case below
    source = trained(order)
    torch.save(recorded(source), tmp_path / "model.pt")
    network, logged = inference_network(tmp_path / "model.pt")
    assert patch_merging_order(network) == order
    torch.testing.assert_close(outputs(network), outputs(source), **SAME)
    wrong_order = with_weights_of(source, "merging")  # what the same weights compute in the other order
    assert not torch.allclose(encoder_features(wrong_order), encoder_features(source), **SAME)
    assert logged == [f"patch merging: {order} for {tmp_path / 'model.pt'}: as its record says"]


def test_released_ssl_layout_selects_the_legacy_order(tmp_path):
    source = trained("legacy")
    torch.save(released_layout(source.swinViT.state_dict()), tmp_path / "model_swinvit.pt")
    workflow = ConfigWorkflow(
        config_file=configs("train"),
        workflow_type="train",
        pretrained_ckpt=str(tmp_path / "model_swinvit.pt"),
        bundle_root=str(tmp_path),
        **SMALL_NET,
    )
    network, logged = network_of(workflow, load=False)
    assert patch_merging_order(network) == "legacy"
    torch.testing.assert_close(encoder_features(network), encoder_features(source), **SAME)
    assert "released self-supervised layout" in logged[0]
    # the SSL bundle continues pre-training from the released file in its order too
    ssl = ConfigWorkflow(
        config_file=[str(SSL_BUNDLE / "configs" / "train.json")],
        workflow_type="train",
        feature_size=12,
        bundle_root=str(tmp_path),
        device="$torch.device('cpu')",
        pretrained_ckpt=str(tmp_path / "model_swinvit.pt"),
    ).parser.get_parsed_content("network")
    torch.testing.assert_close(encoder_features(ssl), encoder_features(source), **SAME)


def test_zoo_weights_run_in_the_order_the_bundle_lists_for_them(tmp_path):
    """A bare state dict (the zoo's layout) whose md5 is in ``known_weights`` runs legacy; the bundle lists the md5 of
    the weights its large_files.yml names."""
    source = trained("legacy")
    torch.save(source.state_dict(), tmp_path / "model.pt")
    digest = hashlib.md5((tmp_path / "model.pt").read_bytes()).hexdigest()
    network, logged = inference_network(tmp_path / "model.pt", known_weights={digest: "legacy"})
    torch.testing.assert_close(outputs(network), outputs(source), **SAME)
    assert f"md5 {digest}" in logged[0]

    (entry,) = yaml.safe_load((BTCV_BUNDLE / "large_files.yml").read_text())["large_files"]
    assert entry["path"] == "models/model.pt" and entry["hash_type"] == "md5"
    for name in ("train", "inference"):
        parser = ConfigWorkflow(config_file=configs(name), workflow_type="infer").parser
        assert parser["known_weights"] == {entry["hash_val"]: "legacy"}


def test_other_unrecorded_checkpoints_say_what_they_assume(tmp_path):
    fixed, legacy = trained("merging"), trained("legacy", seed=2)
    torch.save(fixed.state_dict(), tmp_path / "fixed.pt")
    torch.save(legacy.state_dict(), tmp_path / "legacy.pt")
    network, logged = inference_network(tmp_path / "fixed.pt")
    torch.testing.assert_close(outputs(network), outputs(fixed), **SAME)
    (line,) = logged
    assert "fixed.pt has no record" in line and "'merging'" in line and "--legacy_patch_merging true" in line
    network, logged = inference_network(tmp_path / "legacy.pt", legacy_patch_merging=True)  # the override it names
    torch.testing.assert_close(outputs(network), outputs(legacy), **SAME)
    assert logged == ["patch merging: legacy (legacy_patch_merging true)"]


def test_resume_and_evaluation_follow_the_record(tmp_path):
    source = trained("legacy")
    (tmp_path / "models").mkdir()
    torch.save({"network": source.state_dict(), RECORD_KEY: describe(source)}, tmp_path / "models" / "latest.pt")
    train = ConfigWorkflow(config_file=configs("train"), workflow_type="train", bundle_root=str(tmp_path), **SMALL_NET)
    assert patch_merging_order(train.parser.get_parsed_content("network")) == "legacy"
    fresh = ConfigWorkflow(
        config_file=configs("train"), workflow_type="train", bundle_root=str(tmp_path), resume=False, **SMALL_NET
    )
    assert patch_merging_order(fresh.parser.get_parsed_content("network")) == "merging"  # latest.pt is not used

    torch.save(recorded(source), tmp_path / "models" / "model.pt")
    evaluation = ConfigWorkflow(
        config_file=configs("train", "evaluate"), workflow_type="infer", bundle_root=str(tmp_path), **SMALL_NET
    )
    network, _ = network_of(evaluation)
    torch.testing.assert_close(outputs(network), outputs(source), **SAME)


def test_the_record_describes_the_network():
    record = describe(torch.nn.parallel.DataParallel(trained("legacy")))
    assert record == {
        "patch_merging": "legacy",
        "network": {
            "class": "SwinUNETR",
            "spatial_dims": 3,
            "in_channels": 1,
            "feature_size": 12,
            "depths": [2, 2, 2, 2],
            "num_heads": [3, 6, 12, 24],
            "use_v2": False,
            "out_channels": 14,
        },
    }


def test_a_checkpoint_of_other_settings_is_an_error_naming_them(tmp_path):
    torch.manual_seed(0)
    wider = SwinUNETR(in_channels=1, out_channels=14, feature_size=24)
    torch.save(recorded(wider), tmp_path / "model.pt")
    with pytest.raises(
        RecordError, match=r"model\.pt holds the weights of another network: feature_size 24 \(network: 12\)"
    ):
        inference_network(tmp_path / "model.pt")


def test_a_subclass_holds_the_weights_of_its_recorded_base_and_nothing_else():
    from swin_unetr_kit.record import check_record
    from swin_unetr_kit.ssl import SSLHead, SSLPredictor

    head = describe(SSLHead(feature_size=12))
    check_record(SSLPredictor(feature_size=12), head, "model.pt")  # inference's network, training's record
    with pytest.raises(RecordError, match=r"class SSLHead \(network: SwinUNETR\)"):
        check_record(SwinUNETR(in_channels=1, out_channels=14, feature_size=12), head, "model.pt")


def test_the_override_as_the_command_line_passes_it(tmp_path):
    source = trained("legacy")
    torch.save(recorded(source), tmp_path / "model.pt")
    assert resolve_patch_merging("false", [str(tmp_path / "model.pt")]) == "merging"  # forced, whatever the record
    assert resolve_patch_merging("true", []) == "legacy"
    assert resolve_patch_merging("null", [str(tmp_path / "model.pt")]) == "legacy"
    assert resolve_patch_merging("No", []) == "merging"  # every spelling of swin_unetr_kit.settings.flag
    with pytest.raises(ValueError, match="--legacy_patch_merging 'maybe': not a boolean"):
        resolve_patch_merging("maybe", [])


def test_ssl_inference_on_the_released_encoder_says_what_it_is(synthetic_dataset, tmp_path):
    """The SSL bundle's models/model.pt, as its large_files.yml fetches it, is the released encoder alone: its
    inference command says so and what to do, instead of listing the heads' missing tensors."""
    from swin_unetr_kit.ssl import SSLPredictor

    network = SSLPredictor(in_channels=1, feature_size=12)
    (tmp_path / "models").mkdir()
    encoder = {f"swinViT.{k}": v for k, v in network.swinViT.state_dict().items()}
    torch.save(released_layout(encoder), tmp_path / "models" / "model.pt")
    bundle = REPO / "bundles" / "swin_unetr_ssl_pretrain"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    cmd += ["--bundle_root", str(tmp_path), "--input", str(synthetic_dataset / "imagesTs"), "--progress", "false"]
    cmd += ["--feature_size", "12", "--roi_size", json.dumps(SSL_SMALL_ROI)]
    result = preloaded_python.run(cmd, cwd=bundle, timeout=600)
    assert result.returncode != 0
    assert "holds the released self-supervised encoder alone, not the whole SSLPredictor" in result.stderr
    assert "--pretrained_ckpt" in result.stderr
