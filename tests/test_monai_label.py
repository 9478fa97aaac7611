"""The contract MONAI Label's bundle app relies on, exercised with MONAI's own calls in the order its
``BundleInferTask`` and ``BundleTrainTask`` (monailabel 0.8) make them. monailabel itself does not install beside this
project's pins (it caps numpy below 2 through numpymaxflow and pydicom-seg, and pulls sam2): see the README."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import types
from pathlib import Path

import monai.bundle
import nibabel as nib
import numpy as np
import preloaded_python
import pytest
import torch
from conftest import BTCV_BUNDLE, REPO
from monai.bundle import ConfigParser
from monai.handlers import CheckpointLoader
from monai.networks.nets import SwinUNETR
from monai.transforms import Compose, LoadImaged, SaveImaged, ScaleIntensityRanged, Spacingd

from swin_unetr_kit.data import DataError, PathSafeSpacingd
from swin_unetr_kit.data_record import DATA_RECORD_KEY
from swin_unetr_kit.pretrained import LegacyPatchMerging
from swin_unetr_kit.record import RECORD_KEY, describe, patch_merging_order

MSD_BUNDLE = REPO / "bundles" / "swin_unetr_msd"
CPU_SIZES = {"roi_size": [64, 64, 64], "pixdim": [3.0, 3.0, 3.0]}  # not MONAI Label's: this machine's


def label_names(bundle) -> dict[str, int]:
    """MONAI Label's labels: the first output's channel_def without the background."""
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    inputs, outputs = metadata["network_data_format"]["inputs"], metadata["network_data_format"]["outputs"]
    assert next(iter(inputs)) == "image" and next(iter(outputs)) == "pred"
    channels = next(iter(outputs.values()))["channel_def"]
    return {v.lower(): int(k) for k, v in channels.items() if v.lower() != "background"}


def test_spacing_keeps_monai_label_image_path(synthetic_dataset):
    """MONAI Label's data carries the study's path as the string ``image_path``; MONAI 1.6.1's Spacingd takes every
    ``image_*`` entry of a NIfTI image for a metadata dictionary and calls ``update`` on it."""
    image_path = str(synthetic_dataset / "imagesTs" / "test0.nii.gz")
    load = LoadImaged("image", ensure_channel_first=True, image_only=False)
    data = load({"image": image_path, "image_path": image_path})
    with pytest.raises(AttributeError, match="update"):
        Spacingd("image", pixdim=(3.0, 3.0, 3.0))(data)
    resampled = PathSafeSpacingd("image", pixdim=(3.0, 3.0, 3.0))(data)
    assert resampled["image_path"] == image_path  # MONAI Label's writer reads it back
    assert resampled["image"].pixdim.tolist() == [3.0, 3.0, 3.0]
    assert resampled["image_meta_dict"]["filename_or_obj"] == image_path  # real metadata still updated


@pytest.mark.parametrize(("bundle", "num_labels"), [(BTCV_BUNDLE, 13), (MSD_BUNDLE, 1)])
def test_bundle_infer_task_contract(bundle, num_labels, synthetic_dataset, tmp_path):
    installed = tmp_path / bundle.name  # MONAI Label serves a copy in its app's model folder
    (installed / "models").mkdir(parents=True)
    for sub in ("configs", "docs"):
        (installed / sub).symlink_to(bundle / sub)
    labels = label_names(installed)
    assert len(labels) == num_labels and "background" not in labels

    parser = ConfigParser()
    parser.read_config(str(installed / "configs" / "inference.json"))
    parser.config.update({"bundle_root": str(installed)})
    parser.config.update(CPU_SIZES)
    parser["network_def"]["feature_size"] = 12
    torch.manual_seed(0)
    out_channels = num_labels + 1
    # weights trained in the legacy patch-merging order, saved as the bundles save model.pt: with their record
    trained = SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=12, downsample=LegacyPatchMerging)
    torch.save({"model": trained.state_dict(), RECORD_KEY: describe(trained)}, installed / "models" / "model.pt")
    network = parser.get_parsed_content("network_def", instantiate=True)
    checkpoint = torch.load(installed / "models" / "model.pt", weights_only=True)
    network.load_state_dict(checkpoint.get("model", checkpoint))  # MONAI Label's model_state_dict="model"
    network.eval()
    assert patch_merging_order(network) == "legacy"  # built in the order the record names

    displayable = parser.get_parsed_content("displayable_configs", instantiate=True)
    assert set(displayable) == {
        "sw_batch_size",
        "sw_overlap",
        "num_views",
        "result_extension",
        "result_dtype",
        "served",
    }
    # BasicInferTask starts every request from these: a DICOM series (a folder, no extension to copy) is written as
    # NIfTI, and label maps as uint8, unless the client asks otherwise
    assert (displayable["result_extension"], displayable["result_dtype"]) == (".nii.gz", "uint8")
    parser["displayable_configs"].update({"sw_batch_size": 1, "sw_overlap": 0.25, "num_views": 2})  # the user's
    parser.parse()
    parser.config.update({"device": "cpu"})  # MONAI Label's device option, a string

    pre = parser.get_parsed_content("preprocessing", instantiate=True)
    pre = list(pre.transforms) if isinstance(pre, Compose) else pre
    assert isinstance(pre[0], LoadImaged)  # replaced by MONAI Label's tensor-or-file loader, with the same keys
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    assert (inferer.sw_batch_size, inferer.overlap, len(inferer.views)) == (1, 0.25, 2)
    post = parser.get_parsed_content("postprocessing", instantiate=True)
    post = [t for t in (post.transforms if isinstance(post, Compose) else post) if not isinstance(t, SaveImaged)]

    image_path = synthetic_dataset / "imagesTs" / "test0.nii.gz"
    data = {"image": str(image_path), "image_path": str(image_path)}  # BasicInferTask adds the study's path
    for transform in pre:
        data = transform(data)
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    for transform in post:
        data = transform(data)
    prediction = np.asarray(data["pred"]).squeeze()
    assert prediction.shape == nib.load(image_path).shape  # back in the input's geometry
    assert set(np.unique(prediction)) <= set(range(out_channels))


TRAIN_DISPLAYABLE = {"num_samples", "num_workers", "cache_rate", "roi_edge", "feature_size", "val_interval"}
# what a CPU user picks in MONAI Label's training options
CPU_TRAINING = {"num_samples": 1, "num_workers": 0, "cache_rate": 0.0, "roi_edge": 64, "feature_size": 12}


@pytest.mark.parametrize("bundle", [BTCV_BUNDLE, MSD_BUNDLE])
def test_train_options_shown_in_monai_label(bundle, tmp_path):
    """MONAI Label shows train.json's displayable_configs and passes the user's values back as that whole dictionary;
    they size the crops, loaders, cache, window and network; the network size defaults to the served model's."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.config.update({"bundle_root": str(tmp_path), "tasks_file": str(MSD_BUNDLE / "configs" / "tasks.json")})
    shown = parser.get_parsed_content("displayable_configs", instantiate=True)
    assert set(shown) == TRAIN_DISPLAYABLE
    assert (shown["roi_edge"], shown["feature_size"], shown["num_samples"]) == (96, 48, 4)

    (tmp_path / "models").mkdir()
    torch.save(
        SwinUNETR(in_channels=1, out_channels=14, feature_size=24).state_dict(), tmp_path / "models" / "model.pt"
    )
    parser.parse()
    assert parser.get_parsed_content("displayable_configs#feature_size") == 24  # the served model's size

    parser["displayable_configs"] = {**shown, **CPU_TRAINING, "val_interval": 100}
    parser["train#trainer#max_epochs"] = 1
    parser.parse()
    assert parser.get_parsed_content("roi_size") == [64, 64, 64]
    assert parser.get_parsed_content("network_def").swinViT.embed_dim == 12
    assert parser.get_parsed_content("val_interval") == 1  # a run shorter than val_interval still validates at its end
    assert (parser.get_parsed_content("num_samples"), parser.get_parsed_content("cache_rate")) == (1, 0.0)


def test_inference_builds_the_network_of_the_served_model(tmp_path):
    """A model trained smaller from MONAI Label's UI is served: inference.json sizes the network from model.pt."""
    for bundle in (BTCV_BUNDLE, MSD_BUNDLE):
        (tmp_path / bundle.name / "models").mkdir(parents=True)
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser.config.update({"bundle_root": str(tmp_path / bundle.name)})
        parser.config.update({"tasks_file": str(MSD_BUNDLE / "configs" / "tasks.json")})
        assert parser.get_parsed_content("network_def").swinViT.embed_dim == 48  # no model yet: the paper's size
        out_channels = parser.get_parsed_content("network_def").out.conv.conv.out_channels
        weights = SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=12).state_dict()
        torch.save(weights, tmp_path / bundle.name / "models" / "model.pt")  # where MONAI Label loads it from
        parser.parse()
        parser.get_parsed_content("network_def").load_state_dict(weights)


def test_labels_passed_in_are_checked(synthetic_dataset, tmp_path):
    """MONAI Label replaces train#dataset#data with its own image/label list, past the datalist checks: the training
    transforms check each label as it is loaded and name the file."""
    datalist = json.loads((synthetic_dataset / "dataset_0.json").read_text())
    case = {k: str(synthetic_dataset / v) for k, v in datalist["training"][0].items()}
    label = nib.load(case["label"])
    bad = tmp_path / "bad_label.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj).astype(np.uint8) + 20, label.affine), bad)
    parser = ConfigParser()
    parser.read_config(str(BTCV_BUNDLE / "configs" / "train.json"))
    transforms = Compose(parser.get_parsed_content("deterministic_transforms", instantiate=True))
    assert transforms(case)["label"].max() < 14
    with pytest.raises(RuntimeError) as raised:  # MONAI's transform chain wraps the error, ours is the cause
        transforms({**case, "label": str(bad)})
    assert isinstance(raised.value.__cause__, DataError)
    assert re.search(r"bad_label.nii.gz: label values \[20, .*outside the 14 classes", str(raised.value.__cause__))


class MonaiLabelTrainer:
    """monailabel 0.8.5's ``BundleTrainTask`` for one bundle, call for call: the config is read once (at the server's
    start) and kept; each ``/train`` puts a ``CheckpointLoader`` of the served model.pt first in the config's handler
    list (once: the kept list already holds it afterwards), takes every ``displayable_configs`` option from the
    request, and runs ``monai.bundle.run`` on train.json with its overrides, in a process where ``monailabel`` is
    imported."""

    def __init__(self, installed: Path) -> None:
        self.installed = installed
        self.config = ConfigParser()
        self.config.read_config(str(installed / "configs" / "train.json"))
        self.config.config.update({"bundle_root": str(installed)})

    def options(self) -> dict:
        """``config()``: the training options shown in the UI (the bundle's displayable_configs among them)."""
        return self.config.get_parsed_content("displayable_configs", instantiate=True)

    def train(self, request: dict, records: list[dict]) -> None:
        handlers = self.config.get("train#handlers", [])
        model_pt = self.installed / "models" / "model.pt"
        if model_pt.exists() and not [h for h in handlers if h.get("_target_") == CheckpointLoader.__name__]:
            loader = {"load_path": str(model_pt), "load_dict": {"model": "$@network"}, "strict": False}
            handlers.insert(0, {"_target_": CheckpointLoader.__name__, **loader})
        overrides = {
            "bundle_root": str(self.installed),
            "train#trainer#max_epochs": request["max_epochs"],
            "train#dataset#data": records[:-1],
            "device": torch.device("cpu"),
            "train#handlers": handlers,
            "displayable_configs": {c: request[c] for c in self.options()},
            "validate#dataset#data": records[-1:],
        }
        monai.bundle.run(
            run_id="run",
            init_id=None,
            final_id=None,
            meta_file=str(self.installed / "configs" / "metadata.json"),
            config_file=str(self.installed / "configs" / "train.json"),
            **overrides,
            **{"pixdim": [3.0, 3.0, 3.0], "sw_batch_size": 2, "sw_overlap": 0.25},  # not UI options: this machine's
        )


@pytest.fixture
def monai_label_process(monkeypatch):
    """A process MONAI Label started (its server or training process): ``monailabel`` is imported."""
    monkeypatch.setitem(sys.modules, "monailabel", types.ModuleType("monailabel"))


def install_for_monai_label(bundle: Path, tmp_path: Path, feature_size: int | None = 12) -> Path:
    """The bundle as MONAI Label serves it from its app's model folder; with a served model.pt (legacy patch-merging
    order, saved with its record as the bundles save it) unless ``feature_size`` is None."""
    installed = tmp_path / bundle.name
    (installed / "models").mkdir(parents=True)
    for sub in ("configs", "docs"):
        (installed / sub).symlink_to(bundle / sub)
    if feature_size is not None:
        torch.manual_seed(0)
        out_channels = 14 if bundle == BTCV_BUNDLE else 2
        network = SwinUNETR(
            in_channels=1, out_channels=out_channels, feature_size=feature_size, downsample=LegacyPatchMerging
        )
        torch.save({"model": network.state_dict(), RECORD_KEY: describe(network)}, installed / "models" / "model.pt")
    return installed


def training_records(bundle: Path, synthetic_dataset: Path, tmp_path: Path) -> list[dict]:
    """The datastore's image/label list MONAI Label passes: one case to train on, one to validate (the least that
    trains and validates; each step in a 64^3 window, MONAI Label's smallest edge)."""
    datalist = json.loads((synthetic_dataset / "dataset_0.json").read_text())
    cases = datalist["training"][:1] + datalist["validation"][:1]
    records = [{k: str(synthetic_dataset / v) for k, v in c.items()} for c in cases]
    if bundle == MSD_BUNDLE:  # spleen labels: organ 1 of BTCV's
        for record in records:
            label = nib.load(record["label"])
            spleen = tmp_path / Path(record["label"]).name
            nib.save(nib.Nifti1Image((np.asarray(label.dataobj) == 1).astype(np.uint8), label.affine), spleen)
            record["label"] = str(spleen)
    return records


def served_weights(installed: Path) -> dict:
    return torch.load(installed / "models" / "model.pt", weights_only=True)


@pytest.mark.parametrize("bundle", [BTCV_BUNDLE, MSD_BUNDLE])
def test_bundle_train_task_contract(bundle, synthetic_dataset, tmp_path, monai_label_process):
    """monailabel's single-GPU training: ``monai.bundle.run`` on train.json with its overrides: bundle_root, max epochs,
    the datastore's image/label list for training and validation, the device, the user's displayable_configs, and the
    config's own handler list with a CheckpointLoader for the existing model.pt put first. One epoch writes the model
    MONAI Label serves, ``models/model.pt`` (the MSD bundle's per-task folder keeps its own copy)."""
    installed = install_for_monai_label(bundle, tmp_path)
    start = served_weights(installed)["model"]
    trainer = MonaiLabelTrainer(installed)
    shown = trainer.options()
    assert shown["feature_size"] == 12  # the served model's
    trainer.train({**shown, **CPU_TRAINING, "max_epochs": 1}, training_records(bundle, synthetic_dataset, tmp_path))
    ckpt_dir = installed / "models" / ("" if bundle == BTCV_BUNDLE else "Task09_Spleen/fold0of5")
    latest = torch.load(ckpt_dir / "latest.pt", weights_only=False)
    assert latest["trainer"]["iteration"] == latest["trainer"]["epoch_length"] == 1  # one epoch of the one case
    saved = served_weights(installed)
    trained = saved["model"]
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # started from model.pt and trained on
    assert saved[RECORD_KEY]["patch_merging"] == "legacy"  # in the order of the model.pt it started from
    # and the data settings it was trained at, to be served at them
    assert saved[DATA_RECORD_KEY]["pixdim"] == [3.0, 3.0, 3.0] and saved[DATA_RECORD_KEY]["roi_size"] == [64] * 3
    assert all(isinstance(v, int) for v in saved[DATA_RECORD_KEY]["roi_size"])  # window sizes stay integers
    assert saved[DATA_RECORD_KEY]["labels"] == ["background", *label_names(installed)]
    if bundle == MSD_BUNDLE:
        own = torch.load(ckpt_dir / "model.pt", weights_only=True)["model"]
        assert all(torch.equal(own[k], trained[k]) for k in own)


def test_each_train_from_monai_label_fine_tunes_the_served_model(synthetic_dataset, tmp_path, monai_label_process):
    """A second ``/train`` with the same epochs trains again from the served model.pt (no resume of ``latest.pt``,
    which a finished run would make a no-op and a changed option an error); a newly copied model.pt is what is
    fine-tuned, never a stale latest.pt; another network size starts afresh at that size."""
    installed = install_for_monai_label(BTCV_BUNDLE, tmp_path)
    records = training_records(BTCV_BUNDLE, synthetic_dataset, tmp_path)
    trainer = MonaiLabelTrainer(installed)
    request = {**trainer.options(), **CPU_TRAINING, "max_epochs": 1}
    trainer.train(request, records)
    first = served_weights(installed)["model"]

    torch.manual_seed(1)  # the user copies in other weights of the same network over the trained ones
    copied = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, downsample=LegacyPatchMerging)
    torch.save({"model": copied.state_dict(), RECORD_KEY: describe(copied)}, installed / "models" / "model.pt")
    trainer.train({**request, "num_samples": 2}, records)  # the same epochs, another option
    latest = torch.load(installed / "models" / "latest.pt", weights_only=False)
    assert latest["trainer"]["iteration"] == latest["trainer"]["epoch_length"] == 1  # one epoch, afresh, not resumed
    second = served_weights(installed)["model"]
    key = "swinViT.patch_embed.proj.weight"
    # fine-tuned from the copied weights (one epoch moves them by far less than they differ from the first run's)
    moved, apart = (second[key] - copied.state_dict()[key]).abs().mean(), (second[key] - first[key]).abs().mean()
    assert 0 < moved < apart / 2

    trainer.train({**request, "feature_size": 24}, records)  # another network size: afresh at that size
    assert served_weights(installed)[RECORD_KEY]["network"]["feature_size"] == 24


@pytest.mark.parametrize("bundle", [BTCV_BUNDLE, MSD_BUNDLE])
def test_a_window_edge_the_network_cannot_take_is_refused_by_name(bundle, tmp_path, monai_label_process):
    installed = install_for_monai_label(bundle, tmp_path)
    trainer = MonaiLabelTrainer(installed)
    trainer.config["displayable_configs"] = {**trainer.options(), "roi_edge": 80}
    trainer.config.parse()
    with pytest.raises(RuntimeError) as raised:
        trainer.config.get_parsed_content("roi_size")
    assert "roi_edge 80: the window's edge must be a multiple of 32" in str(raised.value.__cause__)
    assert "e.g. 64 or 96" in str(raised.value.__cause__)


# swin_unetr_kit importable only from the folders on sys.path, never from this checkout's editable install: what a
# MONAI Label environment without this repository has
KIT_FROM_SYS_PATH_ONLY = """
import importlib.machinery, json, sys

class KitFromSysPathOnly:
    def find_spec(self, name, path=None, target=None):
        if name != "swin_unetr_kit":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, sys.path)
        if spec is None:
            raise ImportError("swin_unetr_kit is on no folder of sys.path")
        return spec

sys.meta_path.insert(0, KitFromSysPathOnly())
from monai.bundle import ConfigParser

parser = ConfigParser()
parser.read_config(sys.argv[1])
parser.config.update({"bundle_root": sys.argv[2]})
print(json.dumps(parser.get_parsed_content("displayable_configs", instantiate=True)))
"""


@pytest.mark.parametrize("served", [False, True])
@pytest.mark.parametrize("bundle", [BTCV_BUNDLE, MSD_BUNDLE])
def test_training_options_evaluate_before_monai_label_puts_the_bundle_on_sys_path(bundle, served, tmp_path):
    """``/info`` evaluates the trainer's displayable_configs before MONAI Label puts the bundle folder on sys.path
    (and, with no models/model.pt, nothing imported the kit before): the zip's own copy of swin_unetr_kit is found
    from the bundle folder whatever the import order."""
    installed = install_for_monai_label(bundle, tmp_path, 24 if served else None)
    shutil.copytree(REPO / "swin_unetr_kit", installed / "swin_unetr_kit")  # as tools/zoo.py packs it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-c", KIT_FROM_SYS_PATH_ONLY, str(installed / "configs" / "train.json"), str(installed)]
    result = preloaded_python.run(cmd, cwd="/", env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    options = json.loads(result.stdout.strip().splitlines()[-1])
    assert options["feature_size"] == (24 if served else 48)


@pytest.mark.parametrize("bundle", [BTCV_BUNDLE, MSD_BUNDLE])
def test_a_model_is_served_at_the_settings_it_was_trained_at(bundle, tmp_path, caplog, monai_label_process):
    """Weights trained at 6 mm in 64^3 windows with another intensity window (the demo's, say) copied in as
    models/model.pt: MONAI Label's inference config resamples, windows and normalises as they were trained, and the
    log names both values."""
    installed = install_for_monai_label(bundle, tmp_path)
    checkpoint = served_weights(installed)
    trained = {"pixdim": [6.0, 6.0, 6.0], "roi_size": [64] * 3, "labels": ["background", "x"]}
    trained["intensity"] = [-100.0, 200.0] if bundle == BTCV_BUNDLE else {"window": [-100.0, 200.0]}
    torch.save({**checkpoint, DATA_RECORD_KEY: trained}, installed / "models" / "model.pt")
    parser = ConfigParser()
    parser.read_config(str(installed / "configs" / "inference.json"))
    parser.config.update({"bundle_root": str(installed)})
    with caplog.at_level(logging.WARNING):
        assert parser.get_parsed_content("pixdim") == [6.0, 6.0, 6.0]
        assert parser.get_parsed_content("roi_size") == [64] * 3
        pre = parser.get_parsed_content("preprocessing", instantiate=True).transforms
    window = next(t for t in pre if isinstance(t, ScaleIntensityRanged)).scaler
    assert (window.a_min, window.a_max) == (-100.0, 200.0)
    configured = "[1.5, 1.5, 2.0]" if bundle == BTCV_BUNDLE else "[0.79, 0.79, 1.6]"
    assert f"pixdim [6.0, 6.0, 6.0], as the model was trained (the config says {configured})" in caplog.text
    assert "trained with the labels ['background', 'x']" in caplog.text
    # /info shows the infer task's options, displayable_configs among them: what is served, not the defaults
    served = parser.get_parsed_content("displayable_configs", instantiate=True)["served"]
    assert served == "feature_size 12, 64x64x64 windows, 6x6x6 mm voxels, intensity " + str(trained["intensity"])
