"""The Medical Segmentation Decathlon tasks as data: the task table, k-fold and label-fraction splits, per-task
intensity normalisation, training recipe and schedule, the SSL initialisation decision, and the BrainTumour label <->
nested-region conversion.

The table itself lives in the MSD bundle (``configs/tasks.json``); this module reads it, derives what the configs need
(output channels, class names) and checks a data set's own ``dataset.json`` against it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import torch
from monai.config import KeysCollection
from monai.data import partition_dataset
from monai.transforms import (
    Compose,
    CropForegroundd,
    MapTransform,
    NormalizeIntensityd,
    RandCropByLabelClassesd,
    RandSpatialCropd,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
)
from monai.utils import convert_to_dst_type

from swin_unetr_kit.data import DataError, build_datalist, check_cases, refuse_overlap, seeded_split

logger = logging.getLogger(__name__)


# the BTCV reference's fine-tuning recipe, used by every task whose table entry has no ``recipe`` of its own
BTCV_RECIPE = {
    "ce_weight": 1.0,  # DiceCE; 0 is the Dice loss alone
    "crop": "label_classes",  # crop centres drawn per label class (``crop_ratios``); "random": see crop_transform
    "num_samples": 4,
    "flip_prob": 0.2,
    "rotate90_prob": 0.2,
    "intensity_prob": 0.1,
    "zscore_crops": False,  # z-score each training crop again, on its own statistics (BRATS21)
    "val_interval": 100,  # epochs between validations (the selection of model.pt)
}


class UnknownTaskError(ValueError):
    """A task name that is not in the task table; the message lists the known ones."""


# where the MSD bundle's own files are, seen from this package: a zoo zip carries a copy of it in the bundle folder,
# a checkout keeps the one source at the repository root
_BUNDLE_FOLDERS = (
    Path(__file__).resolve().parents[1],
    Path(__file__).resolve().parents[1] / "bundles" / "swin_unetr_msd",
)


def default_tasks_file(bundle_root: str | os.PathLike) -> str:
    """The task table a run reads unless ``--tasks_file`` names one: ``<bundle_root>/configs/tasks.json`` when
    ``bundle_root`` is the bundle folder (the default, MONAI Label), else the table of the MSD bundle this package
    ships with, so that ``--bundle_root runs/msd`` moves only the outputs, as it does for the other bundles."""
    candidates = [
        Path(bundle_root) / "configs" / "tasks.json",
        *(b / "configs" / "tasks.json" for b in _BUNDLE_FOLDERS),
    ]
    found = next((path for path in candidates if path.is_file()), candidates[0])  # else read_task_table names it
    if found != candidates[0]:
        logger.info("task table: %s (none under --bundle_root %s)", found, bundle_root)
    return str(found)


def read_task_table(tasks_file: str | os.PathLike) -> dict[str, dict]:
    """The task table (task name -> settings) in ``tasks_file``, without its ``_comment`` entries."""
    path = Path(tasks_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: task table not found (set --tasks_file or --bundle_root)")
    table = json.loads(path.read_text())
    return {name: settings for name, settings in table.items() if not name.startswith("_")}


def task_settings(task: str, tasks_file: str | os.PathLike) -> dict:
    """The settings of ``task`` from the table, with the derived ``num_labels``, ``out_channels``, ``sigmoid`` and
    ``class_names`` (the scored output channels: the regions, or the labels without background).

    Raises:
        UnknownTaskError: ``task`` is not in the table.
    """
    table = read_task_table(tasks_file)
    if task not in table:
        raise UnknownTaskError(f"unknown MSD task '{task}'; choose one of: {', '.join(table)}")
    return entry_settings(task, table[task], tasks_file)


def entry_settings(task: str, entry: Mapping, source: str | os.PathLike) -> dict:
    """The settings of a task-table ``entry`` (from the table, or a plan made from a data set, ``source``) with the
    derived ``recipe``, ``domain``, ``num_labels``, ``out_channels``, ``sigmoid`` and ``class_names``."""
    settings = dict(entry, task=task)
    settings["recipe"] = {**BTCV_RECIPE, **settings.get("recipe", {})}
    labels = settings["labels"]
    if sorted(int(k) for k in labels) != list(range(len(labels))):
        raise ValueError(f"{source}: {task} labels must be numbered 0..{len(labels) - 1}, found {list(labels)}")
    regions = settings.get("regions")
    settings["domain"] = {**settings.get("domain", {}), "intensity": settings["modality"]}
    settings["num_labels"] = len(labels)
    settings["sigmoid"] = bool(regions)
    settings["out_channels"] = len(regions) if regions else len(labels)
    settings["class_names"] = list(regions) if regions else [labels[str(i)] for i in range(1, len(labels))]
    if regions:
        region_label_values(regions)  # fails early on regions that cannot be turned back into labels
    return settings


def max_epochs(settings: Mapping, num_training_cases: int) -> int:
    """Epochs of the task's ``schedule``: its ``epochs``, or its ``iterations`` (one case per iteration, as both
    references train at batch size 1) divided by the training cases, so that small tasks get more epochs and large ones
    fewer rather than one epoch count for all."""
    schedule = settings["schedule"]
    if "epochs" in schedule:
        epochs = int(schedule["epochs"])
        rule = "the task's epochs"
    else:
        epochs = max(1, math.ceil(schedule["iterations"] / max(1, num_training_cases)))
        rule = f"{schedule['iterations']} iterations / {num_training_cases} training cases"
    logger.info("%s: %d epochs (%s)", settings["task"], epochs, rule)
    return epochs


def ssl_checkpoint(settings: Mapping, pretrained_ckpt: str | None, ssl_init: bool) -> str | None:
    """The encoder checkpoint to initialise ``settings``' task from, following the table's ``ssl_init`` column (the
    paper fine-tuned its CT tasks from the SSL encoder, pre-trained on CT, and trained the MRI tasks from scratch).

    A checkpoint given for a task where ``ssl_init`` is false is not loaded, with a warning saying so (``ssl_init``
    true overrides); a task where it is true but no checkpoint was given starts from scratch, with a note saying how
    to do as the paper did.
    """
    task = settings["task"]
    if pretrained_ckpt and not ssl_init:
        logger.warning(
            "%s: NOT loading %s: the paper trained this task from scratch (ssl_init false in tasks.json; the SSL "
            "encoder was pre-trained on CT); --ssl_init true loads it anyway",
            task,
            pretrained_ckpt,
        )
        return None
    if not pretrained_ckpt and ssl_init:
        logger.info(
            "%s: no --pretrained_ckpt; the paper initialised this task from the SSL encoder (ssl_init true in "
            "tasks.json): --pretrained_ckpt model_swinvit.pt --legacy_patch_merging true does the same",
            task,
        )
    return pretrained_ckpt or None


def crop_transform(
    settings: Mapping, roi_size: Sequence[int], num_samples: int, ratios: Sequence[float] | None = None
) -> MapTransform | Compose:
    """The training crop of the task's recipe, applied to the normalised, foreground-cropped volume.

    ``label_classes`` (BTCV recipe): centres drawn per label class with ``ratios``. ``random`` (BRATS21 recipe, its
    ``utils/data_utils.py``): the foreground box grown to a multiple of the window, zero-padded, and windows drawn
    anywhere in it, so that they hold as much background as the reference's; with the recipe's ``zscore_crops`` each
    window is then z-scored on its own non-zero voxels as the reference does (a z-score of the z-scored volume is
    that of the raw crop: the statistics of a crop, not of the volume)."""
    keys = ["image", "label"]
    recipe = settings["recipe"]
    if recipe["crop"] != "random":
        return RandCropByLabelClassesd(
            keys,
            label_key="label",
            spatial_size=roi_size,
            num_classes=settings["num_labels"],
            ratios=ratios,
            num_samples=num_samples,
            warn=False,
        )
    # normalised volumes keep their background at exactly 0 (CT at the window's lower bound, MRI outside the body)
    grow = CropForegroundd(keys, source_key="image", select_fn=lambda x: x != 0, k_divisible=roi_size)
    if num_samples == 1:  # the reference's transform, so that one seed draws the reference's window
        crop = RandSpatialCropd(keys, roi_size=roi_size, random_size=False)
    else:
        crop = RandSpatialCropSamplesd(keys, roi_size=roi_size, num_samples=num_samples, random_size=False)
    if not recipe["zscore_crops"]:
        return Compose([grow, crop])
    if settings["intensity"].get("zscore") != "nonzero":
        raise ValueError(f"{settings['task']}: zscore_crops needs the 'zscore': 'nonzero' intensity normalisation")
    return Compose([grow, crop, intensity_transform(settings)])


def channel_def(settings: Mapping) -> dict[str, str]:
    """The network output channels as metadata's ``channel_def`` (MONAI Label reads label names from it)."""
    if settings["sigmoid"]:
        return {str(i): name for i, name in enumerate(settings["class_names"])}
    return {str(i): settings["labels"][str(i)] for i in range(settings["num_labels"])}


def task_metadata(
    task: str, tasks_file: str | os.PathLike, metadata: Mapping | None = None, settings: Mapping | None = None
) -> dict:
    """The MSD bundle's metadata (``metadata``, the run's ``@_meta_``, which describes the default task; when empty,
    the ``metadata.json`` beside ``tasks_file``) with its task-dependent fields (name, channels, classes, ROI) set for
    ``task`` (its ``settings`` when given: a task planned from a data set of one's own is in no table; else the table
    in ``tasks_file``)."""
    settings = settings or task_settings(task, tasks_file)
    meta = (
        json.loads(json.dumps(metadata))
        if metadata
        else json.loads(Path(tasks_file).with_name("metadata.json").read_text())
    )
    ct = settings["modality"] == "CT"
    labels = ", ".join(f"{k} {v}" for k, v in settings["labels"].items())
    outputs = channel_def(settings)
    if ct:
        low, high = settings["intensity"]["window"]
        image_classes = f"single-channel CT in Hounsfield units, clipped to {low}..{high} and scaled to [0, 1]"
    else:
        image_classes = (
            f"{settings['in_channels']}-channel {settings['modality']} ({', '.join(settings['channels'])}), "
            "each channel z-scored on its non-zero voxels"
        )
    meta.update(
        name=f"Swin UNETR MSD {task}",
        task=f"{'' if 'plan' in settings else 'Medical Segmentation Decathlon '}{task}: "
        f"{', '.join(settings['class_names'])} from {settings['modality']}",
        image_classes=image_classes,
        label_classes=labels,
        pred_classes=(
            f"{settings['out_channels']} sigmoid channels, one per nested region "
            + ", ".join(f"{n} = labels {v}" for n, v in settings["regions"].items())
            if settings["sigmoid"]
            else f"{settings['out_channels']} softmax channels, one per class of label_classes"
        ),
    )
    image = meta["network_data_format"]["inputs"]["image"]
    image.update(
        format="hounsfield" if ct else "magnitude",
        modality=settings["modality"],
        num_channels=settings["in_channels"],
        spatial_shape=settings["roi_size"],
        value_range=[0, 1] if ct else [],
        channel_def={str(i): name for i, name in enumerate(settings["channels"])},
    )
    pred = meta["network_data_format"]["outputs"]["pred"]
    pred.update(num_channels=settings["out_channels"], spatial_shape=settings["roi_size"], channel_def=outputs)
    return meta


def save_task_metadata(
    task: str,
    folder: str | os.PathLike,
    tasks_file: str | os.PathLike,
    metadata: Mapping | None = None,
    settings: Mapping | None = None,
) -> Path:
    """Write ``task``'s metadata (:func:`task_metadata`) to ``folder/metadata.json``, beside the model trained for it,
    so that the label names and channels travel with the weights; a task planned from its data set also gets its plan
    there (``plan.json``)."""
    metadata = task_metadata(task, tasks_file, metadata, settings)  # first: an unknown task leaves no folder behind
    path = Path(folder) / "metadata.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metadata, indent=4) + "\n")
    if settings and "plan" in settings:
        (path.parent / "plan.json").write_text(Path(settings["plan"]).read_text())
    return path


def check_dataset_json(dataset_dir: str | os.PathLike, settings: Mapping) -> None:
    """Compare the labels and channel count in ``dataset_dir/dataset.json`` (as MSD distributes it) with the table's,
    so that a data set of another task, or a relabelled one, is an error before training rather than a wrong model."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        return
    try:
        described = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable dataset.json ({exc})") from exc
    labels, modality = described.get("labels"), described.get("modality", described.get("channel_names"))
    if isinstance(labels, Mapping) and labels and all(isinstance(v, int) for v in labels.values()):
        labels = {str(v): name for name, v in labels.items()}  # nnU-Net v2: name -> value
    if isinstance(modality, Mapping) and len(modality) != settings["in_channels"]:
        raise DataError(
            f"{path}: {len(modality)} input channels {dict(modality)}, {settings['task']} expects "
            f"{settings['in_channels']} (wrong --task?)"
        )
    if isinstance(labels, Mapping) and sorted(labels, key=int) != sorted(settings["labels"], key=int):
        raise DataError(
            f"{path}: labels {dict(labels)} do not match {settings['task']}'s {settings['labels']} (wrong --task?)"
        )


def kfold_split(cases: Sequence[dict], num_folds: int = 5, fold: int = 0, seed: int = 0) -> dict[str, list[dict]]:
    """Seeded k-fold split: fold ``fold`` of ``num_folds`` is ``validation``, the others ``training``.

    The folds are disjoint and together hold every case; the same seed gives the same folds on every machine.
    """
    if num_folds < 2:
        raise ValueError(f"num_folds must be at least 2, got {num_folds}")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in 0..{num_folds - 1}, got {fold}")
    if len(cases) < num_folds:
        raise DataError(f"{len(cases)} labelled cases cannot make {num_folds} folds (set --num_folds)")
    # MONAI's partition_dataset deals the seeded order into the folds; CrossValidation wraps the same call around a
    # Dataset class, where the bundles need the case lists themselves
    ordered = sorted(cases, key=lambda c: str(c["image"]))
    folds = partition_dataset(ordered, num_partitions=num_folds, shuffle=True, seed=seed, even_divisible=False)
    return {"training": [c for i, part in enumerate(folds) if i != fold for c in part], "validation": folds[fold]}


def run_name(fold: int = 0, num_folds: int = 5, label_fraction: float = 1.0, split_seed: int = 0) -> str:
    """The name of a run's folder under ``models/<task>/`` and ``eval/<task>/``: what selects its data, so that
    two folds, two label fractions or two splits never share (and never resume) each other's checkpoints:
    ``fold0of5``, ``fold1of5_frac0.25``, ``fold0of5_split3``.

    Raises:
        ValueError: a fold or fraction that names no run (checked here, before any folder is made).
    """
    for name, value in (("fold", fold), ("num_folds", num_folds)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"--{name} {value!r}: not a whole number")
    if num_folds < 2 or not 0 <= fold < num_folds:
        raise ValueError(f"fold {fold} of {num_folds}: fold must be in 0..num_folds - 1 and num_folds at least 2")
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    name = f"fold{fold}of{num_folds}"
    if label_fraction < 1.0:
        name += f"_frac{label_fraction:g}"
    if split_seed != 0:
        name += f"_split{split_seed}"
    return name


def keep_fraction(cases: Sequence[dict], fraction: float, seed: int = 0) -> list[dict]:
    """A seeded ``fraction`` of ``cases`` (at least one), for data-efficiency experiments.

    Smaller fractions are subsets of larger ones with the same seed (10 % within 25 % within 50 %), so that the
    curves of an experiment differ only in the amount of data.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    return seeded_split(cases, max(1, round(len(cases) * fraction)), seed)[0]


def load_task_datalist(
    dataset_dir: str | os.PathLike,
    split: str,
    settings: Mapping,
    datalist_file: str | None = None,
    num_folds: int = 5,
    fold: int = 0,
    seed: int = 0,
    label_fraction: float = 1.0,
    check: bool = True,
    strict_domain: bool = False,
    allow_overlap: bool = False,
) -> list[dict]:
    """One split of an MSD data set: ``training``/``validation`` from the seeded k-fold split of the labelled cases
    (``training`` cut to ``label_fraction``), or ``test``; every file checked against the task when ``check`` is set
    (:func:`swin_unetr_kit.data.check_cases`, with the task's ``domain``). A case listed twice (it could land in both
    folds' parts) is refused unless ``allow_overlap`` (:func:`swin_unetr_kit.data.refuse_overlap`)."""
    check_dataset_json(dataset_dir, settings)
    lists = build_datalist(dataset_dir, datalist_file, val_fraction=0.0, seed=seed)
    refuse_overlap(lists, datalist_file or Path(dataset_dir) / "dataset.json", allow_overlap)
    labelled = lists.get("training", []) + lists.get("validation", [])
    if split in ("training", "validation"):
        if len(labelled) < num_folds:
            source = datalist_file or Path(dataset_dir) / "dataset.json"
            raise DataError(f"{source}: {len(labelled)} labelled cases cannot make {num_folds} folds (set --num_folds)")
        cases = kfold_split(labelled, num_folds, fold, seed)[split]
        if split == "training" and label_fraction < 1.0:
            cases = keep_fraction(cases, label_fraction, seed)
    else:
        cases = lists.get(split, [])
    if not cases:
        raise DataError(f"{datalist_file or dataset_dir}: the '{split}' list of {settings['task']} is empty")
    if check:  # every case of the data set at once, so that one error lists all the bad ones (the second split: cached)
        check_cases(
            labelled if split in ("training", "validation") else cases,
            in_channels=settings["in_channels"],
            num_classes=settings["num_labels"],
            domain=settings.get("domain"),
            strict_domain=strict_domain,
        )
    logger.info(
        "%s: %d '%s' cases (fold %d of %d, label fraction %g)",
        settings["task"],
        len(cases),
        split,
        fold,
        num_folds,
        label_fraction if split == "training" else 1.0,
    )
    return cases


def intensity_transform(settings: Mapping, keys: KeysCollection = "image") -> MapTransform:
    """The task's intensity normalisation: CT clipped to its HU ``window`` and scaled to [0, 1]; MRI z-scored per
    channel on its non-zero voxels (the background outside the head or body stays 0)."""
    normalisation = settings["intensity"]
    if "window" in normalisation:
        low, high = normalisation["window"]
        return ScaleIntensityRanged(keys, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    if normalisation.get("zscore") == "nonzero":
        return NormalizeIntensityd(keys, nonzero=True, channel_wise=True)
    raise ValueError(f"{settings['task']}: unknown intensity normalisation {dict(normalisation)}")


def foreground(settings: Mapping) -> Callable[[torch.Tensor], torch.Tensor]:
    """Voxels that belong to the body (for ``CropForegroundd`` before normalisation): CT above the window's lower
    bound, MRI non-zero."""
    window = settings["intensity"].get("window")
    threshold = float(window[0]) if window else 0.0
    return lambda image: image > threshold


def region_label_values(regions: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """For nested regions (BrainTumour: WT ⊃ TC ⊃ ET), the one label value each region adds to the regions inside it,
    i.e. the value a voxel gets when that region is the innermost one predicted."""
    values = {}
    for name, labels in regions.items():
        inner = set().union(*(set(o) for n, o in regions.items() if n != name and set(o) < set(labels)))
        own = set(labels) - inner
        if len(own) != 1:
            raise ValueError(f"region {name} {list(labels)} must add exactly one label to the regions inside it")
        values[name] = own.pop()
    return values


class _RegionsTransformd(MapTransform):
    """Base of the label <-> region conversions: applies :meth:`convert` to each key; identity without regions, so
    that a config can apply it to every task."""

    def __init__(self, keys: KeysCollection, regions: Mapping[str, Sequence[int]] | None) -> None:
        super().__init__(keys)
        self.regions = dict(regions or {})

    def convert(self, tensor: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        if self.regions:
            for key in self.key_iterator(d):
                d[key] = self.convert(d[key])
        return d


class LabelsToRegionsd(_RegionsTransformd):
    """Turn a one-channel label map into one binary float channel per region (``{"TC": [2, 3], "WT": [1, 2, 3],
    "ET": [3]}``), the targets of a sigmoid loss."""

    def convert(self, tensor: torch.Tensor) -> torch.Tensor:
        regions = torch.stack([torch.isin(tensor[0], torch.as_tensor(v)) for v in self.regions.values()])
        return convert_to_dst_type(regions, tensor, dtype=torch.float32)[0]


class RegionsToLabelsd(_RegionsTransformd):
    """Turn binary region channels back into label values, the innermost predicted region winning (an enhancing
    tumour voxel becomes 3 even where the whole-tumour channel missed it)."""

    def __init__(self, keys: KeysCollection, regions: Mapping[str, Sequence[int]] | None) -> None:
        super().__init__(keys, regions)
        values = region_label_values(self.regions) if self.regions else {}
        names = list(self.regions)
        # (channel, label value), outermost region first so that inner ones overwrite it
        self.paint_order = [(names.index(n), values[n]) for n in sorted(names, key=lambda n: -len(self.regions[n]))]

    def convert(self, tensor: torch.Tensor) -> torch.Tensor:
        labels = torch.zeros_like(tensor[:1])
        for channel, value in self.paint_order:
            labels[0][tensor[channel] > 0] = value
        return labels
