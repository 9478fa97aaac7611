"""The contract MONAI Label's bundle app relies on, exercised with MONAI's own calls in the order its
``BundleInferTask`` and ``BundleTrainTask`` (monailabel 0.8) make them. monailabel itself does not install beside this
project's pins (it caps numpy below 2 through numpymaxflow and pydicom-seg, and pulls sam2): see the README."""

from __future__ import annotations

import json

import monai.bundle
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BTCV_BUNDLE, REPO, SMALL
from monai.bundle import ConfigParser
from monai.handlers import CheckpointLoader
from monai.networks.nets import SwinUNETR
from monai.transforms import Compose, LoadImaged, SaveImaged

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
    assert set(displayable) == {"sw_batch_size", "sw_overlap", "num_views"}
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
    data = {"image": str(image_path)}
    for transform in pre:
        data = transform(data)
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    for transform in post:
        data = transform(data)
    prediction = np.asarray(data["pred"]).squeeze()
    assert prediction.shape == nib.load(image_path).shape  # back in the input's geometry
    assert set(np.unique(prediction)) <= set(range(out_channels))


def test_bundle_train_task_contract(synthetic_dataset, tmp_path):
    """monailabel's single-GPU training: ``monai.bundle.run`` on train.json with its overrides: bundle_root, max epochs,
    the datastore's image/label list for training and validation, the device, and the config's own handler list with a
    CheckpointLoader for the existing model.pt put first."""
    installed = tmp_path / BTCV_BUNDLE.name
    (installed / "models").mkdir(parents=True)
    for sub in ("configs", "docs"):
        (installed / sub).symlink_to(BTCV_BUNDLE / sub)
    torch.manual_seed(0)
    start_network = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, downsample=LegacyPatchMerging)
    start = start_network.state_dict()
    torch.save({"model": start, RECORD_KEY: describe(start_network)}, installed / "models" / "model.pt")

    datalist = json.loads((synthetic_dataset / "dataset_0.json").read_text())
    records = [
        {k: str(synthetic_dataset / v) for k, v in c.items()} for c in datalist["training"] + datalist["validation"]
    ]
    config = ConfigParser()
    config.read_config(str(installed / "configs" / "train.json"))
    handlers = config.get("train#handlers", [])
    handlers.insert(
        0,
        {
            "_target_": CheckpointLoader.__name__,
            "load_path": str(installed / "models" / "model.pt"),
            "load_dict": {"model": "$@network"},
            "strict": False,
        },
    )
    overrides = {
        "bundle_root": str(installed),
        "train#trainer#max_epochs": 1,
        "train#dataset#data": records[:3],
        "device": torch.device("cpu"),
        "train#handlers": handlers,
        "validate#dataset#data": records[3:],
    }
    small = {k: v for k, v in SMALL.items() if k != "network_def#feature_size"}
    monai.bundle.run(
        run_id="run",
        init_id=None,
        final_id=None,
        meta_file=str(installed / "configs" / "metadata.json"),
        config_file=str(installed / "configs" / "train.json"),
        **overrides,
        **small,
        **{"network_def#feature_size": 12, "val_interval": 1},
    )
    latest = torch.load(installed / "models" / "latest.pt", weights_only=False)
    assert latest["trainer"]["iteration"] == latest["trainer"]["epoch_length"] == 3  # one epoch of three cases
    saved = torch.load(installed / "models" / "model.pt", weights_only=True)
    trained = saved["model"]
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # started from model.pt and trained on
    assert saved[RECORD_KEY]["patch_merging"] == "legacy"  # in the order of the model.pt it started from
