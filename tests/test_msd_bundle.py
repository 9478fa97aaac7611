"""The MSD bundle: every task one override away, its splits, the BrainTumour regions, and SSL weights for CT tasks."""

from __future__ import annotations

import json
import logging
import math

import jsonschema
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    ONE_STEP,
    REPO,
    SCHEMA,
    SMALL,
    assert_own_crops,
    crops_probe,
    run_workflow,
    torchrun_bundle,
    write_msd_task,
)
from monai.bundle import ConfigWorkflow
from monai.losses import DiceCELoss, DiceLoss
from monai.transforms import (
    Compose,
    CropForegroundd,
    LoadImaged,
    NormalizeIntensityd,
    RandCropByLabelClassesd,
    RandFlipd,
    RandSpatialCropd,
)
from test_commands import assert_recorded, bundle_run, msd_spleen

from swin_unetr_kit.data import DataError
from swin_unetr_kit.msd import (
    LabelsToRegionsd,
    RegionsToLabelsd,
    UnknownTaskError,
    channel_def,
    crop_transform,
    keep_fraction,
    kfold_split,
    max_epochs,
    task_metadata,
    task_settings,
)
from swin_unetr_kit.ssl import SSLHead

MSD_BUNDLE = REPO / "bundles" / "swin_unetr_msd"
TASKS_FILE = MSD_BUNDLE / "configs" / "tasks.json"
TASKS = [t for t in json.loads(TASKS_FILE.read_text()) if not t.startswith("_")]
# the tasks' own spacing is kept (the generated cases are small at it), the rest of the small test configuration used
MSD_SMALL = {k: v for k, v in SMALL.items() if k != "pixdim"}


def msd_configs(*names: str) -> list[str]:
    return [str(MSD_BUNDLE / "configs" / f"{n}.json") for n in names]


def parse(config_files: list[str], **overrides) -> ConfigWorkflow:
    """A bundle workflow whose items are parsed on demand, without running it."""
    return ConfigWorkflow(config_file=config_files, workflow_type="train", **overrides)


def outputs(tmp_path) -> dict:
    """Outputs in tmp_path while the bundle's own files (tasks.json) are read from the bundle."""
    return {
        "bundle_root": str(MSD_BUNDLE),
        "ckpt_dir": str(tmp_path / "models"),
        "served_model": str(tmp_path / "models" / "model.pt"),
        "output_dir": str(tmp_path / "eval"),
    }


def test_the_ten_tasks():
    assert TASKS == [
        "Task01_BrainTumour",
        "Task02_Heart",
        "Task03_Liver",
        "Task04_Hippocampus",
        "Task05_Prostate",
        "Task06_Lung",
        "Task07_Pancreas",
        "Task08_HepaticVessel",
        "Task09_Spleen",
        "Task10_Colon",
    ]
    brain = task_settings("Task01_BrainTumour", TASKS_FILE)
    assert (brain["in_channels"], brain["out_channels"], brain["sigmoid"]) == (4, 3, True)
    assert brain["class_names"] == ["TC", "WT", "ET"] and brain["roi_size"] == [128, 128, 128]
    prostate = task_settings("Task05_Prostate", TASKS_FILE)
    assert (prostate["in_channels"], prostate["out_channels"], prostate["sigmoid"]) == (2, 3, False)
    liver = task_settings("Task03_Liver", TASKS_FILE)
    assert liver["class_names"] == ["liver", "cancer"] and liver["ssl_init"]
    assert [t for t in TASKS if task_settings(t, TASKS_FILE)["ssl_init"]] == [
        t for t in TASKS if task_settings(t, TASKS_FILE)["modality"] == "CT"
    ]


def test_schedule_scales_with_the_training_cases():
    """Each task's epochs come from the table: the BTCV reference's 120,000 iterations (5000 epochs x 24 cases)
    spread over the task's training cases, and BRATS21's 300 epochs for BrainTumour; not 5000 epochs for every task."""
    spleen, brain = (task_settings(t, TASKS_FILE) for t in ("Task09_Spleen", "Task01_BrainTumour"))
    assert max_epochs(spleen, 24) == 5000 and max_epochs(spleen, 33) == math.ceil(120000 / 33)
    assert max_epochs(brain, 387) == 300
    assert all("iterations" in task_settings(t, TASKS_FILE)["schedule"] for t in TASKS if t != "Task01_BrainTumour")


def test_task_recipes_brain_tumour_follows_brats21(tmp_path):
    dataset = write_msd_task(tmp_path / "data", "Task09_Spleen", task_settings("Task09_Spleen", TASKS_FILE), 5)
    spleen = parse(msd_configs("train"), **outputs(tmp_path), task="Task09_Spleen", dataset_dir=str(dataset))
    assert spleen.parser.get_parsed_content("train#trainer#max_epochs") == math.ceil(120000 / 4)  # 4 of 5 folds
    brain = parse(msd_configs("train"), **outputs(tmp_path), task="Task01_BrainTumour")
    torch.manual_seed(0)
    logits, regions = torch.randn(2, 3, 8, 8, 8), (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    # the BRATS21 reference: DiceLoss(to_onehot_y=False, sigmoid=True), no cross-entropy
    torch.testing.assert_close(
        brain.parser.get_parsed_content("loss")(logits, regions), DiceLoss(sigmoid=True)(logits, regions)
    )
    crop = brain.parser.get_parsed_content("train#random_transforms#1").transforms[1]
    assert isinstance(crop, RandSpatialCropd) and crop.cropper.roi_size == [128, 128, 128]  # one random 128^3 crop
    flips = [t for t in brain.parser.get_parsed_content("train#random_transforms") if isinstance(t, RandFlipd)]
    assert [t.prob for t in flips] == [0.5, 0.5, 0.5]
    # BRATS21 README's commands: --val_every=5; main.py: 50 warm-up epochs of 300
    brain300 = parse(
        msd_configs("train"),
        bundle_root=str(MSD_BUNDLE),
        task="Task01_BrainTumour",
        **{"train#trainer#max_epochs": 300},
    )
    assert brain300.parser.get_parsed_content("val_interval") == 5
    assert brain300.parser.get_parsed_content("lr_scheduler#warmup_steps") == 50
    # SwinMM mode keeps the recipe's Dice-only loss (each view's Dice, plus the consistency term)
    swinmm = parse(msd_configs("train", "swinmm"), **outputs(tmp_path), task="Task01_BrainTumour", consistency_weight=0)
    two_views = torch.cat([logits, logits.flip(0)], 1)
    expected = (DiceLoss(sigmoid=True)(logits, regions) + DiceLoss(sigmoid=True)(logits.flip(0), regions)) / 2
    torch.testing.assert_close(swinmm.parser.get_parsed_content("loss")(two_views, regions), expected)
    labels = torch.randint(0, 2, (2, 1, 8, 8, 8))
    spleen_logits = torch.randn(2, 2, 8, 8, 8)
    torch.testing.assert_close(
        spleen.parser.get_parsed_content("loss")(spleen_logits, labels),
        DiceCELoss(to_onehot_y=True, softmax=True)(spleen_logits, labels),
    )
    crop = spleen.parser.get_parsed_content("train#random_transforms#1")
    assert isinstance(crop, RandCropByLabelClassesd) and crop.cropper.num_samples == 4


def test_brain_tumour_crops_are_the_brats21_crops(tmp_path):
    """BRATS21's ``utils/data_utils.py`` train transform, rebuilt: the foreground box grown to multiples of the window
    (``CropForegroundd(k_divisible=roi)``, zero-padded), one random window in it, then a channel-wise z-score of that
    window's non-zero voxels. The bundle normalises and crops the volume first (cached), then crops as that: with the
    same seed it draws the reference's windows, with the reference's values."""
    task = "Task01_BrainTumour"
    dataset = write_msd_task(tmp_path / "data", task, task_settings(task, TASKS_FILE))
    roi = [32, 32, 32]  # the generated head is 48 x 56 x 40: its box grows to 64^3, where a 32^3 window moves
    # the window itself, not the training option: the data pipeline is compared here, and roi_edge takes 64 and up
    brain = parse(msd_configs("train"), **outputs(tmp_path), task=task, roi_size=roi)
    assert brain.parser.get_parsed_content("roi_size") == roi
    ours = brain.parser.get_parsed_content("train#random_transforms")
    prepare = Compose([*brain.parser.get_parsed_content("deterministic_transforms"), ours[0]])
    reference = Compose(
        [
            LoadImaged(["image", "label"], ensure_channel_first=True),
            CropForegroundd(["image", "label"], source_key="image", k_divisible=roi, allow_smaller=True),
            RandSpatialCropd(["image", "label"], roi_size=roi, random_size=False),
            NormalizeIntensityd("image", nonzero=True, channel_wise=True),
        ]
    )
    case = {k: str(dataset / v) for k, v in json.loads((dataset / "dataset.json").read_text())["training"][0].items()}
    prepared = prepare(dict(case))
    ours[1].transforms[1].set_random_state(seed=7)
    reference.transforms[2].set_random_state(seed=7)
    starts = set()
    for _ in range(8):
        mine, theirs = ours[1](dict(prepared)), reference(dict(case))
        assert mine["image"].shape == theirs["image"].shape == (4, *roi)
        torch.testing.assert_close(mine["image"].as_tensor(), theirs["image"].as_tensor(), rtol=1e-4, atol=1e-4)
        assert torch.equal(mine["label"].as_tensor().to(torch.uint8), theirs["label"].as_tensor().to(torch.uint8))
        starts.add(tuple(theirs["image"].meta["affine"][:3, 3].tolist()))
    assert len(starts) > 1  # the windows moved, and followed the reference's each time
    spleen = task_settings("Task09_Spleen", TASKS_FILE)
    spleen["recipe"] |= {"crop": "random", "zscore_crops": True}
    with pytest.raises(ValueError, match="zscore_crops needs"):  # a CT window cannot be re-applied to a crop
        crop_transform(spleen, roi, 1)
    # validation: the reference z-scores the whole volume; the bundle its foreground box, whose outside is all zeros
    # that the non-zero z-score leaves out, so the same values on the box that the network sees
    load, zscore = (
        LoadImaged("image", ensure_channel_first=True),
        NormalizeIntensityd("image", nonzero=True, channel_wise=True),
    )
    whole = Compose([load, zscore])
    box = CropForegroundd("image", source_key="image", select_fn=lambda x: x != 0)(whole({"image": case["image"]}))
    validation = brain.parser.get_parsed_content("validate#preprocessing")(dict(case))
    torch.testing.assert_close(validation["image"].as_tensor(), box["image"].as_tensor(), rtol=1e-5, atol=1e-5)


def test_unknown_task_is_an_error_listing_the_ten(tmp_path):
    with pytest.raises(UnknownTaskError) as error:
        task_settings("Task11_Kidney", TASKS_FILE)
    assert all(task in str(error.value) for task in TASKS)
    with pytest.raises(RuntimeError) as error:  # through the bundle, as a user meets it
        run_workflow(msd_configs("train"), task="Task11_Kidney", **outputs(tmp_path), dataset_dir=str(tmp_path))
    chain = [error.value]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    assert any(isinstance(e, UnknownTaskError) for e in chain)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_trains_and_infers(task, tmp_path):
    settings = task_settings(task, TASKS_FILE)
    dataset = write_msd_task(tmp_path / "data", task, settings)
    common = {**MSD_SMALL, **outputs(tmp_path), "task": task, "dataset_dir": str(dataset)}
    workflow = run_workflow(
        msd_configs("train"), **common, num_folds=2, **{"train#trainer#max_epochs": 1, "val_interval": 1}
    )
    network = workflow.parser.get_parsed_content("network")
    assert network.swinViT.patch_embed.proj.in_channels == settings["in_channels"]
    assert network.out.conv.conv.out_channels == settings["out_channels"]
    assert "val_mean_dice" in workflow.parser.get_parsed_content("validate#evaluator").state.metrics
    assert (tmp_path / "models" / "model.pt").is_file()
    saved = json.loads((tmp_path / "models" / "metadata.json").read_text())  # the label names travel with the model
    assert saved["network_data_format"]["outputs"]["pred"]["channel_def"] == channel_def(settings)

    predictions = tmp_path / "predictions"
    inference = {k: v for k, v in common.items() if k not in ("num_samples", "cache_rate", "ckpt_dir")}
    inference.update(ckpt_path=str(tmp_path / "models" / "model.pt"), output_dir=str(predictions))
    run_workflow(msd_configs("inference"), **inference)
    (image_file,) = (dataset / "imagesTs").iterdir()
    (prediction_file,) = predictions.iterdir()
    image, prediction = nib.load(image_file), nib.load(prediction_file)
    # labels in the original geometry: Hippocampus (smaller than the window) padded and cropped back
    assert prediction.shape == image.shape[:3]
    np.testing.assert_allclose(prediction.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(prediction.dataobj)).tolist()) <= set(range(settings["num_labels"]))


def test_brain_tumour_regions_and_back():
    regions = task_settings("Task01_BrainTumour", TASKS_FILE)["regions"]
    label = torch.tensor([0, 1, 2, 3, 1, 3]).reshape(1, 6, 1, 1)
    channels = LabelsToRegionsd("label", regions)({"label": label})["label"]
    # TC = non-enhancing + enhancing, WT = all tumour, ET = enhancing (MSD labels 1 edema, 2 non-enhancing, 3 enhancing)
    assert channels[:, :, 0, 0].tolist() == [[0, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 1]]
    assert torch.equal(RegionsToLabelsd("pred", regions)({"pred": channels})["pred"], label)
    # the innermost predicted region wins where the predicted regions are not nested
    only_et = torch.tensor([0, 0, 1]).reshape(3, 1, 1, 1)
    assert RegionsToLabelsd("pred", regions)({"pred": only_et})["pred"].item() == 3
    # other tasks pass unchanged
    assert LabelsToRegionsd("label", None)({"label": label})["label"] is label


def test_kfold_and_label_fraction_splits():
    cases = [{"image": f"case{i:02d}.nii.gz"} for i in range(23)]
    folds = [kfold_split(cases, num_folds=5, fold=f, seed=3) for f in range(5)]
    validation = [c["image"] for split in folds for c in split["validation"]]
    assert sorted(validation) == sorted(c["image"] for c in cases)  # complete and disjoint
    for split in folds:
        assert not {c["image"] for c in split["training"]} & {c["image"] for c in split["validation"]}
        assert len(split["training"]) + len(split["validation"]) == 23
    assert kfold_split(cases, 5, 2, seed=3) == folds[2]  # seeded
    assert kfold_split(cases, 5, 2, seed=4) != folds[2]
    training = folds[0]["training"]
    fractions = {f: keep_fraction(training, f, seed=3) for f in (0.1, 0.25, 0.5, 1.0)}
    assert [len(v) for v in fractions.values()] == [2, 4, 9, 18]
    names = {f: {c["image"] for c in v} for f, v in fractions.items()}
    assert names[0.1] < names[0.25] < names[0.5] < names[1.0]  # nested: only the amount of data differs
    with pytest.raises(ValueError, match="fold must be"):
        kfold_split(cases, 5, 5)
    with pytest.raises(DataError, match="cannot make 5 folds"):
        kfold_split(cases[:3], 5, 0)
    with pytest.raises(ValueError, match="label_fraction"):
        keep_fraction(cases, 0.0)


def test_fraction_of_the_training_cases_through_the_bundle(tmp_path):
    settings = task_settings("Task09_Spleen", TASKS_FILE)
    dataset = write_msd_task(tmp_path / "data", "Task09_Spleen", settings, num_cases=8)
    workflow = parse(
        msd_configs("train"),
        **MSD_SMALL,
        **outputs(tmp_path),
        dataset_dir=str(dataset),
        num_folds=4,
        fold=1,
        label_fraction=0.5,
    )
    training = workflow.parser.get_parsed_content("train#dataset").data
    validation = workflow.parser.get_parsed_content("validate#dataset").data
    assert (len(training), len(validation)) == (3, 2)  # half of the 6 training cases of fold 1
    assert not {c["image"] for c in training} & {c["image"] for c in validation}


def test_data_set_of_another_task_is_an_error(tmp_path):
    spleen = write_msd_task(tmp_path / "data", "Task09_Spleen", task_settings("Task09_Spleen", TASKS_FILE))
    with pytest.raises(RuntimeError) as error:
        run_workflow(
            msd_configs("train"), **MSD_SMALL, **outputs(tmp_path), task="Task03_Liver", dataset_dir=str(spleen)
        )
    assert f"{spleen / 'dataset.json'}: labels" in str(error.value.__cause__)
    with pytest.raises(RuntimeError) as error:
        run_workflow(
            msd_configs("train"), **MSD_SMALL, **outputs(tmp_path), task="Task01_BrainTumour", dataset_dir=str(spleen)
        )
    assert "input channels" in str(error.value.__cause__)


def test_evaluate_brain_tumour_regions_per_case_and_summary(tmp_path):
    task = "Task01_BrainTumour"
    dataset = write_msd_task(tmp_path / "data", task, task_settings(task, TASKS_FILE), num_cases=2)
    common = {**MSD_SMALL, **outputs(tmp_path), "task": task, "dataset_dir": str(dataset), "num_folds": 2}
    run_workflow(msd_configs("train"), **common, **{"train#trainer#max_epochs": 1, "val_interval": 1})
    run_workflow(msd_configs("train", "evaluate"), workflow_type="eval", **common)
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(report["summary"]["dice"]) == set(report["summary"]["hd95"]) == {"TC", "WT", "ET", "mean"}
    assert len(report["per_case"]) == 1 and set(next(iter(report["per_case"].values()))["dice"]) == {
        "TC",
        "WT",
        "ET",
        "mean",
    }
    (prediction,) = (tmp_path / "eval" / "predictions").iterdir()
    values = set(np.unique(np.asarray(nib.load(prediction).dataobj)).tolist())
    assert values <= {0, 1, 2, 3}  # written back as MSD labels, not regions
    # scored on the original grid: the written label map against the label file, both as TC / WT / ET regions
    pred = np.asarray(nib.load(prediction).dataobj)
    (case,) = report["per_case"].values()
    label = np.asarray(nib.load(dataset / "labelsTr" / prediction.name.replace("_seg", "")).dataobj)
    for name, values in task_settings(task, TASKS_FILE)["regions"].items():
        p, g = np.isin(pred, values), np.isin(label, values)
        assert case["dice"][name] == pytest.approx(2 * (p & g).sum() / (p.sum() + g.sum()), abs=1e-5)
    assert len(list((tmp_path / "eval" / "overlays").glob("*.png"))) == 1  # regions drawn too


def _ssl_checkpoint(path, in_channels: int = 1) -> dict:
    """An encoder checkpoint as the SSL bundle writes it (its network's state dict: swinViT.* plus heads)."""
    state = SSLHead(in_channels=in_channels, feature_size=12).state_dict()
    torch.save(state, path)
    return {k[len("swinViT.") :]: v for k, v in state.items() if k.startswith("swinViT.")}


class _Messages(logging.Handler):
    """Collects the messages of a logger (a bundle's logging.conf replaces the root handlers pytest's caplog uses)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text += record.getMessage() + "\n"


def _load_network(workflow: ConfigWorkflow) -> tuple[torch.nn.Module, str]:
    """The workflow's network and what the pretrained loader logged while building it."""
    messages = _Messages()
    loggers = [logging.getLogger(name) for name in ("swin_unetr_kit.pretrained", "swin_unetr_kit.msd")]
    for logger in loggers:
        logger.addHandler(messages)
    try:
        return workflow.parser.get_parsed_content("network"), messages.text
    finally:
        for logger in loggers:
            logger.removeHandler(messages)


def test_ssl_weights_into_a_ct_task_and_adapted_for_multichannel_mri(tmp_path):
    encoder = _ssl_checkpoint(tmp_path / "ssl.pt")
    common = {**outputs(tmp_path), "pretrained_ckpt": str(tmp_path / "ssl.pt"), "network_def#feature_size": 12}
    network, log = _load_network(parse(msd_configs("train"), task="Task03_Liver", **common))
    loaded = network.swinViT.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in encoder.items()) and len(encoder) == 126
    assert "loaded 126 of 126 encoder tensors" in log

    # the paper trained the MRI tasks from scratch (ssl_init false): the checkpoint is refused, with a warning
    network, log = _load_network(parse(msd_configs("train"), task="Task01_BrainTumour", **common))
    assert "NOT loading" in log and "--ssl_init true loads it anyway" in log and "encoder tensors" not in log
    assert not torch.equal(
        network.swinViT.layers1[0].blocks[0].attn.qkv.weight, encoder["layers1.0.blocks.0.attn.qkv.weight"]
    )
    # and without a checkpoint a CT task says how to start as the paper did
    _, log = _load_network(parse(msd_configs("train"), task="Task03_Liver", **{**common, "pretrained_ckpt": None}))
    assert "the paper initialised this task from the SSL encoder" in log

    network, log = _load_network(parse(msd_configs("train"), task="Task01_BrainTumour", ssl_init=True, **common))
    weight = network.swinViT.patch_embed.proj.weight
    assert weight.shape[1] == 4
    torch.testing.assert_close(weight.sum(1), encoder["patch_embed.proj.weight"].sum(1))
    assert "1 input channels, the network 4: patch embedding adapted" in log and "loaded 126 of 126" in log

    workflow = parse(msd_configs("train"), task="Task01_BrainTumour", ssl_init=True, adapt_in_channels=False, **common)
    _, log = _load_network(workflow)
    assert "patch embedding skipped" in log and "loaded 125 of 126" in log


@pytest.mark.parametrize("task", TASKS)
def test_metadata_of_every_task_is_valid(task):
    schema = json.loads(SCHEMA.read_text())
    meta = task_metadata(task, TASKS_FILE)
    jsonschema.validate(meta, schema)
    settings = task_settings(task, TASKS_FILE)
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == settings["in_channels"]
    assert len(meta["network_data_format"]["outputs"]["pred"]["channel_def"]) == settings["out_channels"]
    if task == "Task09_Spleen":  # the bundle's own metadata describes its default task
        assert meta == json.loads((MSD_BUNDLE / "configs" / "metadata.json").read_text())


def test_torchrun_two_cpu_processes_multichannel(tmp_path):
    """Two channels under torchrun, one training case for two ranks: each draws its own crops of it (seed + rank)."""
    task = "Task05_Prostate"
    dataset = write_msd_task(tmp_path / "data", task, task_settings(task, TASKS_FILE), num_cases=4)
    torchrun_bundle(
        [*msd_configs("train", "multi_gpu_train"), crops_probe(MSD_BUNDLE, tmp_path)],
        port=29531,
        **MSD_SMALL,
        **outputs(tmp_path),
        task=task,
        dataset_dir=str(dataset),
        num_folds=2,
        label_fraction=0.5,  # one of the fold's two training cases; two validation cases, one per process
        **{"train#trainer#max_epochs": 1, "val_interval": 1},
    )
    assert_own_crops(tmp_path, channels=2)
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "latest.pt").is_file()
    latest = torch.load(tmp_path / "models" / "latest.pt", weights_only=False)
    assert latest["lr_scheduler"]["base_lrs"] == [1e-4]  # not scaled by the number of processes


@pytest.mark.parametrize(
    ("names", "workflow_type"), [(("train",), "train"), (("inference",), "infer"), (("train", "evaluate"), "infer")]
)
def test_check_properties(names, workflow_type, tmp_path):
    dataset = write_msd_task(tmp_path / "data", "Task09_Spleen", task_settings("Task09_Spleen", TASKS_FILE), 5)
    workflow = ConfigWorkflow(
        config_file=msd_configs(*names),
        workflow_type=workflow_type,
        **outputs(tmp_path),
        dataset_dir=str(dataset),
        cache_rate=0.0,
    )
    workflow.initialize()
    assert not workflow.check_properties()


def test_msd_from_the_repository_root_with_bundle_root_elsewhere(tmp_path):
    """The MSD bundle run as the BTCV and SSL bundles are in the repository README: from the repository root, with
    ``--bundle_root runs/msd``: outputs there, the task table still the bundle's."""
    task, small = msd_spleen(tmp_path)
    configs = "bundles/swin_unetr_msd/configs/"
    bundle_run(
        tmp_path, "training", "--config_file", configs + "train.json", bundle_root="runs/msd", **small, **ONE_STEP
    )
    run = tmp_path / "runs" / "msd" / "models" / task / "fold0of3"
    assert_recorded(run / "model.pt")
    assert json.loads((run / "metadata.json").read_text())["name"] == f"Swin UNETR MSD {task}"
    evaluate = f"['{configs}train.json','{configs}evaluate.json']"
    bundle_run(tmp_path, "evaluating", "--config_file", evaluate, bundle_root="runs/msd", **small)
    assert (tmp_path / "runs" / "msd" / "eval" / task / "fold0of3" / "metrics.json").is_file()
    inference = {k: v for k, v in small.items() if k not in ("num_samples", "cache_rate")}
    bundle_run(tmp_path, "evaluating", "--config_file", configs + "inference.json", bundle_root="runs/msd", **inference)
    assert list((tmp_path / "runs" / "msd" / "predictions" / task / "fold0of3").rglob("*.nii.gz"))
    assert not (tmp_path / "bundles" / MSD_BUNDLE.name / "models").exists()  # nothing written in the bundle
