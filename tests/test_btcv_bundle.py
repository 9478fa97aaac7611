"""The BTCV bundle's workflows end to end through MONAI's bundle machinery, with small overrides."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BTCV_BUNDLE, SCHEMA, SMALL, configs, copy_run, run_workflow, write_ct_case
from monai.bundle import ConfigWorkflow, verify_net_in_out
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from monai.transforms import Spacing


def test_metadata_is_valid_against_monai_schema():
    jsonschema = pytest.importorskip("jsonschema")
    if not SCHEMA.is_file():
        pytest.skip(f"schema copy not found at {SCHEMA}")
    meta = json.loads((BTCV_BUNDLE / "configs" / "metadata.json").read_text())
    jsonschema.validate(meta, json.loads(SCHEMA.read_text()))
    assert meta["version"] in meta["changelog"]
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert len(channel_def) == meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 14
    assert channel_def["1"] == "spleen" and channel_def["13"] == "left adrenal gland"
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1


@pytest.mark.parametrize(
    ("names", "workflow_type"), [(("train",), "train"), (("inference",), "infer"), (("train", "evaluate"), "infer")]
)
def test_check_properties(names, workflow_type, synthetic_dataset):
    workflow = ConfigWorkflow(
        config_file=configs(*names), workflow_type=workflow_type, dataset_dir=str(synthetic_dataset)
    )
    workflow.initialize()
    assert not workflow.check_properties()


def test_paper_defaults_and_overrides():
    workflow = ConfigWorkflow(config_file=configs("train"), workflow_type="train", **{"network_def#feature_size": 24})
    parser = workflow.parser
    assert parser.get_parsed_content("roi_size") == [96, 96, 96]
    assert parser["pixdim"] == [1.5, 1.5, 2.0]
    assert parser["hu_window"] == [-175, 250]
    assert parser.get_parsed_content("num_samples") == 4
    assert parser["learning_rate"] == 1e-4 and parser["weight_decay"] == 1e-5
    net = parser.get_parsed_content("network_def")
    assert net.swinViT.embed_dim == 24  # the override reached the network


def test_default_loss_is_the_reference_plain_dice_ce():
    """The reference's default loss is ``DiceCELoss(to_onehot_y=True, softmax=True)``; squared Dice (with its
    smoothing 0 / 1e-6) is its ``--squared_dice`` option, here ``--squared_dice true``."""
    torch.manual_seed(0)
    logits, label = torch.randn(2, 14, 8, 8, 8), torch.randint(0, 14, (2, 1, 8, 8, 8))
    plain = DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    squared = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)
    for override, expected in (({}, plain), ({"squared_dice": True}, squared(logits, label))):
        loss = ConfigWorkflow(
            config_file=configs("train"), workflow_type="train", **override
        ).parser.get_parsed_content("loss")
        torch.testing.assert_close(loss(logits, label), expected)
    assert not torch.isclose(plain, squared(logits, label))


def test_verify_net_in_out():
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(BTCV_BUNDLE / "configs" / "metadata.json"),
        config_file=configs("inference"),
        n=1,
        any=1,
        **{"network_def#feature_size": 12},
    )


def test_train_evaluate_infer_on_synthetic_cases(btcv_trained_run, synthetic_dataset, tmp_path):
    copy_run(btcv_trained_run, tmp_path)  # trained two epochs, validated every epoch (conftest)
    common = {**SMALL, "bundle_root": str(tmp_path), "dataset_dir": str(synthetic_dataset)}
    models = tmp_path / "models"
    assert (models / "model.pt").is_file() and (models / "latest.pt").is_file()
    latest = torch.load(models / "latest.pt", weights_only=False)
    assert latest["trainer"]["iteration"] == 2 * latest["trainer"]["epoch_length"]  # two epochs done
    assert set(latest) >= {"network", "optimizer", "lr_scheduler", "trainer", "best_model_saver"}
    assert (tmp_path / "eval" / "training_curves.png").stat().st_size > 0  # loss and validation Dice curves

    run_workflow(configs("train", "evaluate"), workflow_type="infer", **common)
    overlays = sorted(p.name for p in (tmp_path / "eval" / "overlays").glob("*.png"))
    assert overlays == ["case2.png", "case3.png"]  # one per evaluated case, up to num_overlays
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert len(report["per_case"]) == 2
    organs = report["summary"]["dice"]
    assert "spleen" in organs and "background" not in organs
    for case in report["per_case"].values():
        dice = [v for v in case["dice"].values() if v is not None]
        assert dice and all(0.0 <= v <= 1.0 for v in dice)
    # predictions are written in the geometry of the input volume
    validation = json.loads((synthetic_dataset / "dataset_0.json").read_text())["validation"]
    for case in validation:
        src = nib.load(synthetic_dataset / case["image"])
        name = (synthetic_dataset / case["image"]).name.replace(".nii.gz", "_seg.nii.gz")
        pred = nib.load(tmp_path / "eval" / "predictions" / name)
        assert pred.shape == src.shape
        np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)

    run_workflow(configs("inference"), workflow_type="infer", **common, input=str(synthetic_dataset / "imagesTs"))
    out = nib.load(tmp_path / "eval" / "test0_seg.nii.gz")
    src = nib.load(synthetic_dataset / "imagesTs" / "test0.nii.gz")
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(out.dataobj))) <= set(range(14))


class _IntensityClassifier(torch.nn.Module):
    """Labels each voxel by its scaled intensity: organ ``o`` of :func:`write_ct_case` has HU -150 + 25 o, i.e.
    (25 + 25 o) / 425 after the -175..250 window; background where no organ's value is within about 0.03."""

    def __init__(self) -> None:
        super().__init__()
        self.centres = torch.nn.Parameter(
            torch.tensor([(25 + 25 * o) / 425 for o in range(1, 14)]).view(1, 13, 1, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        organs = -(((x - self.centres) / 0.02) ** 2)
        return torch.cat([torch.full_like(x, -2.25), organs], 1)


@pytest.mark.parametrize("score_pixdim", [None, [1.5, 1.5, 1.5]])
def test_evaluation_scores_on_the_original_label_grid(score_pixdim, tmp_path):
    """Cases at 2 mm evaluated by a network working at 3 mm: Dice and HD95 are those of the saved prediction (on the
    original grid) against the label file, as the reference test script scores, not those of the 3 mm grid. With
    ``score_pixdim``, both are first resampled (nearest) to that grid, as the released SwinMM test (``WORD/
    test_parallel.py``) does to 1 mm."""
    data = tmp_path / "data"
    cases = [write_ct_case(data, f"fine{i}", shape=(48, 44, 40), spacing=2.0, seed=40 + i) for i in range(2)]
    (data / "dataset_0.json").write_text(json.dumps({"training": cases[:1], "validation": cases}))
    small = {k: v for k, v in SMALL.items() if not k.startswith("network_def")}
    common = {**small, "bundle_root": str(tmp_path / "run"), "dataset_dir": str(data), "num_overlays": 0}
    common["allow_datalist_overlap"] = True  # fine0 in both parts, meant: only the scoring is tested
    common["mlflow_run#params"] = {}  # the run's settings name a Swin UNETR's feature size, which this network lacks
    workflow = ConfigWorkflow(
        config_file=configs("train", "evaluate"),
        workflow_type="infer",
        network_def=_IntensityClassifier(),
        score_pixdim=score_pixdim,
        **common,
    )
    workflow.initialize()
    (tmp_path / "run" / "models").mkdir(parents=True)
    torch.save(workflow.parser.get_parsed_content("network").state_dict(), tmp_path / "run" / "models" / "model.pt")
    workflow.run()
    workflow.finalize()
    report = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    organs = [
        name
        for _, name in sorted(
            workflow.parser["_meta_"]["network_data_format"]["outputs"]["pred"]["channel_def"].items(),
            key=lambda kv: int(kv[0]),
        )
    ][1:]
    scored = 0
    for case in cases:
        label = np.asarray(nib.load(case["label"]).dataobj)
        name = case["image"].split("/")[-1].replace(".nii.gz", "_seg.nii.gz")
        pred = np.asarray(nib.load(tmp_path / "run" / "eval" / "predictions" / name).dataobj)
        assert pred.shape == label.shape  # the prediction lies on the label's own 2 mm grid
        if score_pixdim:  # the released SwinMM test: Spacing(pixdim, mode="nearest") of label and prediction
            resample = Spacing(score_pixdim, mode="nearest")
            affine = nib.load(case["label"]).affine
            label, pred = (resample(MetaTensor(a[None], affine=affine))[0].numpy() for a in (label, pred))
            assert label.shape == (64, 58, 53)  # 48 x 44 x 40 voxels of 2 mm at 1.5 mm
        key = next(k for k in report["per_case"] if case["image"].split("/")[-1].split(".")[0] in k)
        for organ, name in enumerate(organs, start=1):
            reported = report["per_case"][key]["dice"][name]
            if not (label == organ).any():
                assert reported is None  # absent organs are left out (the reference scores them 0)
                continue
            # the reference test script's dice(): 2 |P ∩ G| / (|P| + |G|) on the original grid
            expected = 2 * ((pred == organ) & (label == organ)).sum() / ((pred == organ).sum() + (label == organ).sum())
            assert reported == pytest.approx(expected, abs=1e-5)
            scored += 1
    assert scored >= 13


def test_resume_continues_epochs_and_best_metric(btcv_trained_run, synthetic_dataset, tmp_path):
    """The shared run stopped after epoch 2 of 2; asked for 3 epochs, it continues (one more), not restarts."""
    copy_run(btcv_trained_run, tmp_path)
    common = {**SMALL, "bundle_root": str(tmp_path), "dataset_dir": str(synthetic_dataset), "val_interval": 1}
    first = torch.load(tmp_path / "models" / "latest.pt", weights_only=False)
    per_epoch = first["trainer"]["epoch_length"]
    assert first["trainer"]["iteration"] == 2 * per_epoch
    best_after_first = first["best_model_saver"]["_saved"]

    workflow = run_workflow(configs("train"), **common, **{"train#trainer#max_epochs": 3})
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 3
    assert trainer.state.iteration == 3 * per_epoch  # continued, not restarted
    second = torch.load(tmp_path / "models" / "latest.pt", weights_only=False)
    assert second["trainer"]["iteration"] == 3 * per_epoch
    # the optimizer carried on: AdamW's step count covers both runs
    steps = [s["step"] for s in second["optimizer"]["state"].values()]
    assert float(steps[0]) == 3 * per_epoch
    assert second["lr_scheduler"]["last_epoch"] == 3
    # the best score known before the interruption was restored, not forgotten
    assert second["best_model_saver"]["_saved"][0][0] >= best_after_first[0][0]

    # resume false starts afresh (one step is enough to show it)
    fresh = {"train#trainer#max_epochs": 1, "train#trainer#epoch_length": 1, "resume": False}
    assert run_workflow(configs("train"), **common, **fresh).parser.get_parsed_content("train#trainer").state.epoch == 1
