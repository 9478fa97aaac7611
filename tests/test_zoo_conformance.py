"""Model-zoo conformance of the three bundles, checked with MONAI's own calls where it has them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import ignite.distributed as idist
import pytest
import torch
import yaml
from conftest import REPO, SCHEMA, SMALL, released_layout, write_msd_task
from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata, verify_net_in_out

from swin_unetr_kit.msd import task_metadata, task_settings

MSD_TASKS = REPO / "bundles" / "swin_unetr_msd" / "configs" / "tasks.json"

BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if p.is_dir())
# the sections of the model zoo's bundle README template
README_SECTIONS = (
    "Model Overview",
    "Data",
    "Training configuration",
    "Performance",
    "MONAI Bundle Commands",
    "License",
)


def test_the_three_bundles():
    assert [b.name for b in BUNDLES] == ["swin_unetr_btcv_seg", "swin_unetr_msd", "swin_unetr_ssl_pretrain"]


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_required_files_metadata_and_readme(bundle):
    for name in (
        "LICENSE",
        "configs/metadata.json",
        "configs/train.json",
        "configs/multi_gpu_train.json",
        "configs/logging.conf",
        "docs/README.md",
        "docs/data_license.txt",
    ):
        assert (bundle / name).is_file(), name
    assert (bundle / "configs" / "inference.json").is_file()  # the zoo's preferred file (SSL: what it learned)
    if bundle.name != "swin_unetr_ssl_pretrain":  # pre-training has no labels to evaluate against
        assert (bundle / "configs" / "evaluate.json").is_file()
    if not SCHEMA.is_file():
        pytest.skip(f"schema copy not found at {SCHEMA}")
    # MONAI's check; given the schema's local copy, it downloads nothing
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    headings = re.findall(r"^#+ (.+)$", (bundle / "docs" / "README.md").read_text(), flags=re.MULTILINE)
    for section in README_SECTIONS:
        assert any(h.startswith(section) for h in headings), f"{bundle.name} README lacks '{section}'"
    large = [p for p in bundle.rglob("*") if p.is_file() and p.stat().st_size > 25 * 2**20]
    assert not large, f"files over 25 MB belong in large_files.yml, not the bundle: {large}"


# the workflows each bundle's README runs, as MONAI's property check types them; train, inference and
# train + evaluate of the segmentation bundles are checked in test_btcv_bundle.py and test_msd_bundle.py
SEGMENTATION_WORKFLOWS = [
    (("train", "multi_gpu_train"), "train"),
    (("train", "swinmm"), "train"),
    (("train", "evaluate", "swinmm"), "infer"),
    (("inference", "swinmm"), "infer"),
    (("inference", "inference_trt"), "infer"),
]
WORKFLOWS = [
    *[("swin_unetr_btcv_seg", *w) for w in SEGMENTATION_WORKFLOWS],
    *[("swin_unetr_msd", *w) for w in SEGMENTATION_WORKFLOWS],
    ("swin_unetr_ssl_pretrain", ("train",), "train"),
    ("swin_unetr_ssl_pretrain", ("train", "multi_gpu_train"), "train"),
    ("swin_unetr_ssl_pretrain", ("train", "smart_cache"), "train"),
    ("swin_unetr_ssl_pretrain", ("train", "swinmm"), "train"),
    ("swin_unetr_ssl_pretrain", ("inference",), "infer"),
]


def tiny_data(bundle: str, synthetic_dataset: Path, tmp_path: Path) -> dict:
    """Overrides that point ``bundle`` at tiny data and a small network, with its outputs in ``tmp_path``."""
    small = {**SMALL, "bundle_root": str(tmp_path), "smart_cache_num": 2, "val_fraction": 0.34}
    if bundle == "swin_unetr_msd":
        task = write_msd_task(tmp_path / "data", "Task09_Spleen", task_settings("Task09_Spleen", MSD_TASKS), 5)
        small.pop("pixdim")
        return {
            **small,
            "bundle_root": str(REPO / "bundles" / bundle),
            "dataset_dir": str(task),
            "ckpt_dir": str(tmp_path / "models"),
            "output_dir": str(tmp_path / "eval"),
        }
    if bundle == "swin_unetr_ssl_pretrain":
        return {**small, "dataset_dir": str(synthetic_dataset / "imagesTr")}
    return {**small, "dataset_dir": str(synthetic_dataset)}


@pytest.mark.parametrize(
    ("bundle", "names", "workflow_type"), WORKFLOWS, ids=lambda v: "+".join(v) if isinstance(v, tuple) else v
)
def test_check_properties_of_every_workflow(bundle, names, workflow_type, synthetic_dataset, tmp_path, monkeypatch):
    if "multi_gpu_train" in names:  # a one-process group, as torchrun would give rank 0
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531", "RANK": "0", "WORLD_SIZE": "1"}.items():
            monkeypatch.setenv(key, value)
    files = [str(REPO / "bundles" / bundle / "configs" / f"{n}.json") for n in names]
    workflow = ConfigWorkflow(
        config_file=files, workflow_type=workflow_type, **tiny_data(bundle, synthetic_dataset, tmp_path)
    )
    workflow.initialize()
    try:
        assert not workflow.check_properties()
    finally:
        if "multi_gpu_train" in names:
            idist.finalize()  # ends the group, as the config's finalize would, and resets ignite's view of it


# Swin UNETR does not script: the model zoo lists its own Swin UNETR bundle in exclude_verify_torchscript_list, and
# these three go on that list too, so the zoo's full check skips its TorchScript export for them
NOT_SCRIPTABLE = {"swin_unetr_btcv_seg", "swin_unetr_msd", "swin_unetr_ssl_pretrain"}


def zoo_checkout(bundle: Path, models_path: Path, **overrides) -> Path:
    """``bundle`` as the model zoo's CI sees it, ``<models_path>/<name>/``, with stand-ins in place of the weights
    ``large_files.yml`` names (nothing downloads here): ``models/model.pt``, the state dict of the inference config's
    ``network_def``, as the zoo makes stand-in weights; any other file (the released SSL encoder), that network's
    encoder in the released layout."""
    target = models_path / bundle.name
    shutil.copytree(bundle, target, ignore=shutil.ignore_patterns("models", "eval", "logs", "__pycache__"))
    parser = ConfigParser()
    parser.read_config(f=str(target / "configs" / "inference.json"))
    parser.read_meta(f=str(target / "configs" / "metadata.json"))
    parser["bundle_root"] = str(target)
    for key, value in overrides.items():
        parser[key] = value
    (target / "models").mkdir()
    network = parser.get_parsed_content("network_def")
    torch.save(network.state_dict(), target / "models" / "model.pt")
    listing = target / "large_files.yml"
    for entry in yaml.safe_load(listing.read_text())["large_files"] if listing.is_file() else []:
        if not (target / entry["path"]).is_file():  # another release, such as the SSL encoder: its own layout
            encoder = {f"swinViT.{k}": v for k, v in network.swinViT.state_dict().items()}
            torch.save(released_layout(encoder), target / entry["path"])
    return target


def verify_like_the_zoo(bundle: Path, mode: str, **overrides) -> None:
    """The checks of the model zoo's ``ci/verify_bundle.py -m <mode>``, in its order, with the MONAI functions it
    calls; the schema is the local copy and the zoo's index (for the version check) is empty."""
    large = [bundle / f"large_files.{s}" for s in ("yml", "yaml", "json") if (bundle / f"large_files.{s}").is_file()]
    for listing in large:  # the files the zoo would download first: here the stand-ins must be in their place
        entries = (yaml.safe_load if listing.suffix != ".json" else json.loads)(listing.read_text())["large_files"]
        assert all((bundle / entry["path"]).is_file() for entry in entries), listing
    for name in ("configs/metadata.json", "LICENSE", "models/model.pt"):  # necessary, then preferred files
        assert (bundle / name).is_file(), f"{bundle.name}: necessary file {name} is not existing"
    assert any((bundle / "configs" / f"inference.{s}").is_file() for s in ("json", "yaml", "yml"))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))
    if mode == "min":
        return
    # bundle properties: checked by the zoo for bundles with supported_apps only (ours: test_check_properties_*)
    assert "supported_apps" not in meta
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        bundle_root=str(bundle),
        **overrides,
    )
    assert bundle.name in NOT_SCRIPTABLE  # else ckpt_export to TorchScript would come next


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_the_zoo_checks_min_and_full(bundle, tmp_path):
    if not SCHEMA.is_file():
        pytest.skip(f"schema copy not found at {SCHEMA}")
    checkout = zoo_checkout(bundle, tmp_path / "models")
    verify_like_the_zoo(checkout, "min")
    verify_like_the_zoo(checkout, "full")  # the bundle's own network size and patch


def test_the_zoo_full_check_with_each_msd_task_metadata(tmp_path):
    """The MSD bundle's metadata describes its default task; tools/msd_metadata.py writes it for the other nine."""
    if not SCHEMA.is_file():
        pytest.skip(f"schema copy not found at {SCHEMA}")
    small = {"network_def#feature_size": 12}
    checkout = zoo_checkout(REPO / "bundles" / "swin_unetr_msd", tmp_path / "models", **small)
    for task in (t for t in json.loads(MSD_TASKS.read_text()) if not t.startswith("_")):
        meta = task_metadata(task, checkout / "configs" / "tasks.json")
        (checkout / "configs" / "metadata.json").write_text(json.dumps(meta))
        # the task's channels through the network on a 64^3 patch (a fast stand-in for its ROI, which need only
        # divide by 32 as SwinUNETR's patch merging asks)
        assert all(s % 32 == 0 for s in meta["network_data_format"]["inputs"]["image"]["spatial_shape"]), task
        patch = {"_meta_#network_data_format#inputs#image#spatial_shape": [64, 64, 64]}
        verify_like_the_zoo(checkout, "full", task=task, **small, **patch)
