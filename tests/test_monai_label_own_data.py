"""A model the MSD bundle trained on a data set of one's own, packaged with ``tools/zoo.py package --own_data`` and
served as MONAI Label's ``monaibundle`` app serves a bundle: its own label names, its plan and the data settings it
was trained at, with nothing of the user's data in the zip. MONAI Label's calls are made with MONAI's API, in the
order its ``BundleInferTask`` makes them (``tools/monailabel_check.py`` runs the real server)."""

from __future__ import annotations

import json
import logging
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import zoo
from conftest import REPO
from monai.bundle import ConfigParser
from monai.networks.nets import SwinUNETR
from monai.transforms import Compose, SaveImaged
from test_monai_label import label_names
from test_own_data import write_known_ct

from swin_unetr_kit.data_record import DATA_RECORD_KEY
from swin_unetr_kit.plan import plan_dataset
from swin_unetr_kit.record import RECORD_KEY, describe

TASK = "Dataset101_Known"
TRAINED_AT = {"pixdim": [2.0, 2.0, 4.2], "roi_size": [64, 64, 64]}  # a CPU run: its own spacing, 64^3 windows


def trained_run(root: Path) -> tuple[Path, Path]:
    """A run folder as MSD training leaves it for a data set of one's own (``models/<task>/<run>/``: the best
    ``model.pt`` with its records, the copy of ``plan.json``, the resumable ``latest.pt``) and the data set."""
    dataset, _ = write_known_ct(root / "data" / TASK)
    plan_file = plan_dataset(TASK, dataset, root / "runs" / TASK / "plan.json", num_folds=3)
    run = plan_file.parent / "fold0of3"
    run.mkdir()
    (run / "plan.json").write_text(plan_file.read_text())
    entry = json.loads(plan_file.read_text())[TASK]
    torch.manual_seed(0)
    network = SwinUNETR(in_channels=1, out_channels=4, feature_size=12)
    record = {**TRAINED_AT, "intensity": entry["intensity"], "labels": list(entry["labels"].values())}
    checkpoint = {"model": network.state_dict(), RECORD_KEY: describe(network), DATA_RECORD_KEY: record}
    torch.save(checkpoint, run / "model.pt")
    torch.save({**checkpoint, "trainer": {"iteration": 1}}, run / "latest.pt")
    return run, dataset


def test_own_data_bundle_packages_and_serves_with_its_label_names(tmp_path, monkeypatch, caplog):
    run, dataset = trained_run(tmp_path)
    zoo_dir = tmp_path / "zoo"
    zoo.package(str(zoo_dir), own_data={TASK: str(run)})  # tools/zoo.py package --own_data (the check runs the CLI)
    name = "swin_unetr_msd_dataset101_known"
    (zip_path,) = zoo_dir.glob(f"{name}_v*.zip")

    with zipfile.ZipFile(zip_path) as archive:  # what it carries, and nothing of the user's data
        members = set(archive.namelist())
        text = b"".join(archive.read(m) for m in members if not m.endswith(".pt"))
    assert {f"{name}/models/model.pt", f"{name}/models/{TASK}/plan.json", f"{name}/swin_unetr_kit/plan.py"} <= members
    assert not [m for m in members if Path(m).name in ("latest.pt", "datalist.json", "fingerprint.json")]
    assert str(dataset).encode() not in text and b"ct_0.nii.gz" not in text

    installed = Path(zoo.install(name, str(zoo_dir / "model_info.json"), str(tmp_path / "app" / "model")))
    # /info: MONAI Label's labels are the metadata's channel_def, named as in dataset.json
    assert label_names(installed) == {"organ": 1, "lesion": 2, "rare": 3}

    monkeypatch.setitem(sys.modules, "monailabel", type(sys)("monailabel"))  # a process MONAI Label started
    trainer = ConfigParser()  # the trainer's options, shown by /info
    trainer.read_config(str(installed / "configs" / "train.json"))
    trainer.config.update({"bundle_root": str(installed)})
    assert trainer.get_parsed_content("displayable_configs", instantiate=True)["feature_size"] == 12

    parser = ConfigParser()  # BundleInferTask: inference.json with bundle_root, the device, the served model.pt
    parser.read_config(str(installed / "configs" / "inference.json"))
    parser.config.update({"bundle_root": str(installed)})
    with caplog.at_level(logging.WARNING):
        parser.parse()
        assert parser.get_parsed_content("task_settings")["plan"] == str(installed / "models" / TASK / "plan.json")
        assert parser.get_parsed_content("pixdim") == TRAINED_AT["pixdim"]  # from the model's data record
        assert parser.get_parsed_content("roi_size") == TRAINED_AT["roi_size"]
    assert "trained with the labels" not in caplog.text  # the record's labels are the served metadata's
    parser.config.update({"device": "cpu", "cpu_runtime": "torch"})  # OpenVINO's path: test_cpu_inference.py
    network = parser.get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(torch.load(installed / "models" / "model.pt", weights_only=True)["model"])
    network.eval()
    pre = parser.get_parsed_content("preprocessing", instantiate=True)
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    post = [t for t in parser.get_parsed_content("postprocessing", instantiate=True).transforms]
    post = Compose([t for t in post if not isinstance(t, SaveImaged)])
    image = dataset / "imagesTr" / "ct_0.nii.gz"
    data = pre({"image": str(image), "image_path": str(image)})
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    prediction = np.asarray(post(data)["pred"]).squeeze()
    assert prediction.shape == nib.load(image).shape
    assert set(np.unique(prediction).tolist()) <= {0, 1, 2, 3}


def test_msd_records_and_compares_the_label_names_of_the_task_it_runs(tmp_path, caplog):
    """The MSD bundle's metadata names the default task's labels; a model of another task records that task's
    labels (MONAI Label compares them with the served bundle's), and inference compares with the task's own."""
    msd = REPO / "bundles" / "swin_unetr_msd"
    parser = ConfigParser()
    parser.read_config(str(msd / "configs" / "train.json"))
    parser.config.update({"task": "Task03_Liver", "bundle_root": str(msd)})
    assert parser.get_parsed_content("data_record").state_dict()["labels"] == ["background", "liver", "cancer"]

    network = SwinUNETR(in_channels=1, out_channels=3, feature_size=12)
    record = {"pixdim": [3.0] * 3, "roi_size": [64] * 3, "labels": ["background", "liver", "cancer"]}
    torch.save({"model": network.state_dict(), DATA_RECORD_KEY: record}, tmp_path / "model.pt")
    parser = ConfigParser()
    parser.read_config(str(msd / "configs" / "inference.json"))
    parser.config.update({"task": "Task03_Liver", "bundle_root": str(msd), "ckpt_path": str(tmp_path / "model.pt")})
    with caplog.at_level(logging.WARNING):
        assert parser.get_parsed_content("trained_settings")["labels"] == record["labels"]
    assert "trained with the labels" not in caplog.text
