"""A data set of one's own as an MSD task: its task-table entry planned from the data.

A ``--task`` name that is not in the MSD bundle's table (``configs/tasks.json``) is planned from the data set in
``--dataset_dir``, laid out as the Medical Segmentation Decathlon ships it (``dataset.json`` with ``modality`` and
``labels``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``) or as nnU-Net v2's raw format (``dataset.json`` with
``channel_names``, ``labels`` name -> value and ``file_ending``; ``imagesTr/<case>_0000.nii.gz``, one file per
channel). The training cases are fingerprinted once with MONAI's own analyser
(:class:`monai.apps.auto3dseg.DataAnalyzer`), and the entry is derived with the rules the ten tasks' values follow
(:func:`derive_plan`). The plan is written as a one-task table (``plan.json``, readable as ``--tasks_file``) beside the
runs of the task and read again, never re-fingerprinted, by evaluation and inference.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.apps.auto3dseg import DataAnalyzer
from monai.apps.auto3dseg.transforms import EnsureSameShaped
from monai.transforms import EnsureTyped, LoadImage, MapTransform, Orientationd

from swin_unetr_kit.data import (
    DataError,
    _read_cache,
    _write_cache,
    channel_files,
    check_case,
    find_cases,
    image_header,
    read_datalist_file,
    remember_scan,
)
from swin_unetr_kit.msd import UnknownTaskError, entry_settings, read_task_table, task_settings

logger = logging.getLogger(__name__)

ROI_EDGE, ROI_STEP, ROI_MIN = 96, 32, 64  # the paper's 96^3; sides a multiple of 32; 32 fails inside SwinUNETR
ANISOTROPY = 3.0  # nnU-Net's threshold for an anisotropic axis (spacing and voxel count)
SCHEDULE = {"iterations": 120000}  # the ten tasks' rule (tasks.json): the BTCV reference's 5000 epochs x 24 cases
SPACING_OUTLIER = 2.0  # a case whose spacing differs from the median by this factor on an axis is named in a warning


def read_description(dataset_dir: str | os.PathLike) -> dict:
    """``dataset_dir/dataset.json`` in either layout, as ``layout``, ``channels`` (names in channel order),
    ``labels`` (``{"0": "background", "1": ...}``), ``file_ending`` (nnU-Net) and ``file``.

    Raises:
        DataError: the file is missing, not JSON, or lacks channels or labels numbered 0..N-1.
    """
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; a data set of one's own needs its dataset.json")
    try:
        described = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable dataset.json ({exc})") from exc
    if not isinstance(described, Mapping):
        raise DataError(f"{path}: expected a JSON object with channel names and labels")
    nnunet = "channel_names" in described
    channels, labels = described.get("channel_names", described.get("modality")), described.get("labels")
    if not isinstance(channels, Mapping) or not channels:
        raise DataError(f"{path}: no 'channel_names' (nnU-Net v2) or 'modality' (Decathlon): channel index -> name")
    if not isinstance(labels, Mapping) or not labels:
        raise DataError(f"{path}: no 'labels' (nnU-Net v2: name -> value; Decathlon: value -> name)")
    if nnunet:
        regions = {name: value for name, value in labels.items() if not isinstance(value, int)}
        if regions:
            raise DataError(f"{path}: labels {regions} are not single integer values (region-based labels)")
        labels = {str(value): name for name, value in labels.items()}
    try:
        values = sorted(int(v) for v in labels)
        order = sorted(int(c) for c in channels)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: label values and channel indices must be integers ({exc})") from exc
    if values != list(range(len(values))):
        raise DataError(f"{path}: label values {values} must be 0 (background), 1, ... without gaps")
    if order != list(range(len(order))):
        raise DataError(f"{path}: channel indices {order} must be 0, 1, ... without gaps")
    return {
        "file": str(path),
        "layout": "nnU-Net v2" if nnunet else "Decathlon",
        "channels": [str(channels[str(c)]) for c in order],
        "labels": {str(v): str(labels[str(v)]) for v in values},
        "file_ending": described.get("file_ending", ".nii.gz"),
    }


def _nnunet_cases(folder: Path, labels_folder: Path | None, ending: str, channels: int) -> list[dict]:
    """The cases of an nnU-Net raw folder: one file per channel (``<case>_0000<ending>`` ...), a label per case."""
    names = sorted({p.name[: -len(ending)][:-5] for p in folder.glob(f"*_[0-9][0-9][0-9][0-9]{ending}")})
    if labels_folder is not None:
        labelled = sorted(p.name[: -len(ending)] for p in labels_folder.glob(f"*{ending}"))
        unlabelled = sorted(set(names) - set(labelled))
        if unlabelled:
            raise DataError(f"{folder}: {len(unlabelled)} cases have no label in {labels_folder} ({unlabelled[:5]})")
        names = labelled
    cases, missing = [], []
    for name in names:
        files = [folder / f"{name}_{c:04d}{ending}" for c in range(channels)]
        absent = [f for f in files if not f.is_file()]
        missing += [f"{f}: missing (case {name}; dataset.json declares {channels} channels)" for f in absent]
        case = {"image": str(files[0]) if channels == 1 else [str(f) for f in files]}
        if labels_folder is not None:
            case["label"] = str(labels_folder / f"{name}{ending}")
        cases.append(case)
    if missing:
        raise DataError(missing[0] if len(missing) == 1 else f"{len(missing)} channel files:\n" + "\n".join(missing))
    return cases


def find_own_cases(dataset_dir: str | os.PathLike, description: Mapping) -> dict[str, list[dict]]:
    """``training`` (every labelled case) and ``test`` cases of a data set in either layout."""
    root = Path(dataset_dir)
    if description["layout"] == "Decathlon":
        listed = read_datalist_file(description["file"], base_dir=root)
        lists = listed if listed.get("training") else find_cases(root)
        return {"training": lists.get("training", []) + lists.get("validation", []), "test": lists.get("test", [])}
    ending, channels = description["file_ending"], len(description["channels"])
    if not (root / "imagesTr").is_dir() or not (root / "labelsTr").is_dir():
        raise DataError(f"{root}: nnU-Net raw layout without imagesTr/ and labelsTr/")
    training = _nnunet_cases(root / "imagesTr", root / "labelsTr", ending, channels)
    test = _nnunet_cases(root / "imagesTs", None, ending, channels) if (root / "imagesTs").is_dir() else []
    return {"training": training, "test": test}


class _LoadAndRemember(MapTransform):
    """``LoadImaged`` that also stores each file's data-check statistics (:func:`swin_unetr_kit.data.remember_scan`),
    so that the fingerprint's one read serves the checks as well."""

    def __init__(self, cache: dict) -> None:
        super().__init__(["image", "label"])
        self.cache = cache
        self.loader = LoadImage(image_only=True, ensure_channel_first=True)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            files = channel_files(d[key])
            d[key] = self.loader(files if len(files) > 1 else files[0])
            voxels = d[key].numpy()
            for index, file in enumerate(files):
                remember_scan(file, voxels if len(files) == 1 else voxels[index], key == "label", self.cache)
        return d


def fingerprint(cases: Sequence[dict], device: str | torch.device = "cpu") -> dict:
    """MONAI's data set fingerprint (:class:`monai.apps.auto3dseg.DataAnalyzer`, per channel) of ``cases``; every file
    is read once, and what the data checks need is cached from that read.

    Raises:
        DataError: a case the analyser could not process.
    """
    cache = _read_cache()
    transforms = [
        _LoadAndRemember(cache),
        EnsureTyped(keys=["image", "label"], data_type="tensor", dtype=torch.float),
        Orientationd(keys=["image", "label"], axcodes="RAS"),
        EnsureSameShaped(keys="label", source_key="image"),
    ]
    # worker 0: the cache entries are filled in this process
    analyser = DataAnalyzer({"training": list(cases)}, "", output_path="", average=False, device=device, worker=0)
    result = analyser.get_all_case_stats("training", transforms)
    _write_cache(cache)
    done = {str(c["image_filepath"]) for c in result["stats_by_cases"]}
    skipped = [c["image"] for c in cases if str(channel_files(c["image"])[0]) not in done]
    if skipped:
        raise DataError(f"{skipped[0]}: the fingerprint could not process this case ({len(skipped)} in all)")
    return result


def target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[list[float], str]:
    """nnU-Net's rule: the median spacing per axis; where one axis is both anisotropic in spacing (more than 3x the
    others) and in voxels (fewer than a third of the others), its 10th percentile instead (at least the others')."""
    target = np.percentile(spacings, 50, axis=0)
    median_shape = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    reason = f"median of {len(spacings)} cases"
    anisotropic_spacing = target[worst] > ANISOTROPY * max(target[others])
    if anisotropic_spacing and median_shape[worst] * ANISOTROPY < min(median_shape[others]):
        tenth = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(tenth, float(max(target[others])))
        reason += f"; axis {worst} anisotropic: its 10th percentile (nnU-Net's rule)"
    return [round(float(s), 2) for s in target], reason


def roi_side(size: float) -> int:
    """96 voxels (the paper's window) where the median shape allows, else the largest multiple of 32 within it, at
    least 64 (smaller volumes are padded to the window)."""
    return int(max(ROI_MIN, min(ROI_EDGE, ROI_STEP * math.floor(size / ROI_STEP))))


def derive_plan(description: Mapping, stats: Mapping) -> tuple[dict, dict[str, str]]:
    """The task-table entry (and the reason for each value) from ``dataset.json`` and the fingerprint ``stats``."""
    cases = stats["stats_by_cases"]
    spacings = np.array([c["image_stats"]["spacing"] for c in cases], dtype=float)
    shapes = np.array([c["image_stats"]["shape"][0] for c in cases], dtype=float)
    spacing, spacing_reason = target_spacing(spacings, shapes)
    resampled = np.median(shapes * spacings / np.asarray(spacing), axis=0)
    channels, labels = description["channels"], description["labels"]
    ct = all(name.strip().upper() == "CT" for name in channels)
    if ct:
        foreground = stats["stats_summary"]["image_foreground_stats"]["intensity"]
        foreground = foreground[0] if isinstance(foreground, list) else foreground
        window = [round(float(foreground["percentile_00_5"])), round(float(foreground["percentile_99_5"]))]
        intensity = {"window": window}
        intensity_reason = "CT: foreground (label > 0) 0.5-99.5 percentile HU, mean of cases"
    else:
        intensity, intensity_reason = {"zscore": "nonzero"}, "not CT: z-score on non-zero voxels, per channel"
    present = {int(v) for c in cases for v in c["label_stats"]["labels"]}
    extents = np.array([c["image_stats"]["sizemm"] for c in cases], dtype=float)
    entry = {
        "modality": "CT" if ct else "MRI" if _is_mri(channels) else "other",
        "channels": list(channels),
        "in_channels": len(channels),
        "labels": dict(labels),
        "spacing": spacing,
        "intensity": intensity,
        "roi_size": [roi_side(s) for s in resampled],
        "crop_ratios": [1 if v in present else 0 for v in range(len(labels))],
        "domain": {
            "extent_mm": [
                [math.floor(lo / 2), math.ceil(hi * 2)] for lo, hi in zip(extents.min(0), extents.max(0), strict=True)
            ],
            "spacing_mm": [round(float(spacings.min()) / 2, 2), round(float(spacings.max()) * 2, 2)],
        },
        "ssl_init": ct,
        "schedule": dict(SCHEDULE),
    }
    absent = [labels[str(v)] for v in range(len(labels)) if v not in present]
    reasons = {
        "channels": f"dataset.json ({description['layout']})",
        "labels": "dataset.json",
        "spacing": spacing_reason,
        "intensity": intensity_reason,
        "roi_size": f"median shape {' x '.join(f'{s:.0f}' for s in resampled)} at that spacing: 96, or the multiple "
        "of 32 within it (at least 64)",
        "crop_ratios": "one per label" + (f"; 0 for labels in no case: {', '.join(absent)}" if absent else ""),
        "ssl_init": "CT: the SSL encoder was pre-trained on CT"
        if ct
        else "not CT: from scratch (the paper's MRI tasks)",
        "schedule": "120,000 iterations / training cases, as the ten tasks",
    }
    return entry, reasons


def _is_mri(channels: Sequence[str]) -> bool:
    words = ("MR", "T1", "T2", "FLAIR", "ADC", "DWI", "PD")
    return any(word in name.upper() for name in channels for word in words)


def _check_headers(cases: Sequence[dict], description: Mapping) -> None:
    """Every case's headers (no voxel read): files present and 3D, channel counts, label geometry; all bad cases in one
    error. Then a warning naming the cases stored in an orientation unlike most."""
    errors, codes = [], {}
    for case in cases:
        try:
            shape, affine, _ = image_header(case["image"])
            if min(shape) < 2:
                raise DataError(f"{channel_files(case['image'])[0]}: a 2D image (shape {shape}); this bundle needs 3D")
            check_case(case, len(description["channels"]), len(description["labels"]), scan=False)
        except DataError as exc:
            errors.append(str(exc))
            continue
        codes[channel_files(case["image"])[0]] = "".join(nib.aff2axcodes(affine))
    if errors:
        raise DataError(errors[0] if len(errors) == 1 else f"{len(errors)} cases cannot be used:\n" + "\n".join(errors))
    usual = Counter(codes.values()).most_common(1)[0][0]
    unusual = [f"{image} ({code})" for image, code in codes.items() if code != usual]
    if unusual:
        logger.warning("orientation unlike most cases (%s; all are resampled to RAS): %s", usual, ", ".join(unusual))


def _check_fingerprint(cases: Sequence[dict], stats: Mapping, description: Mapping) -> None:
    """Label values that ``dataset.json`` does not declare are an error naming the label files; spacings far from the
    median a warning naming the images."""
    declared = {int(v) for v in description["labels"]}
    bad = []
    for case in stats["stats_by_cases"]:
        extra = sorted({int(v) for v in case["label_stats"]["labels"]} - declared)
        if extra:
            bad.append(f"{case['label_filepath']}: label values {extra} are not declared in {description['file']}")
    if bad:
        raise DataError(bad[0] if len(bad) == 1 else f"{len(bad)} label files:\n" + "\n".join(bad))
    spacings = np.array([c["image_stats"]["spacing"] for c in stats["stats_by_cases"]], dtype=float)
    median = np.median(spacings, axis=0)
    ratio = np.maximum(spacings / median, median / spacings).max(1)
    far = [
        f"{c['image_filepath']} ({' x '.join(f'{s:g}' for s in sp)} mm)"
        for c, sp, r in zip(stats["stats_by_cases"], spacings, ratio, strict=True)
        if r > SPACING_OUTLIER
    ]
    if far:
        shown = " x ".join(f"{s:g}" for s in median)
        logger.warning("spacing far from the median %s mm (the same kind of scan?): %s", shown, ", ".join(far))


def _write_json(path: Path, content: Mapping) -> None:
    """Write beside, then rename: a reader never sees half a plan (two ranks may plan at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(content, f, indent=4)
        f.write("\n")
    os.replace(tmp, path)


def plan_dataset(task: str, dataset_dir: str | os.PathLike, plan_file: str | os.PathLike, num_folds: int = 5) -> Path:
    """Fingerprint the training cases of ``dataset_dir`` and write ``task``'s plan to ``plan_file`` (a one-task table
    whose ``_plan`` says where each value came from), its datalist (paths relative to ``dataset_dir``) and the
    fingerprint beside it.

    Raises:
        DataError: a bad ``dataset.json``, a case with missing channel files, 2D images, label values that
            ``dataset.json`` does not declare, or fewer labelled cases than ``num_folds``.
    """
    root, plan_file = Path(dataset_dir).resolve(), Path(plan_file)
    description = read_description(root)
    lists = find_own_cases(root, description)
    cases = lists["training"]
    if len(cases) < num_folds:
        raise DataError(
            f"{description['file']}: {len(cases)} labelled cases cannot make {num_folds} folds (set --num_folds)"
        )
    _check_headers(cases, description)
    start = time.perf_counter()
    stats = fingerprint(cases, "cuda" if torch.cuda.is_available() else "cpu")
    seconds = time.perf_counter() - start
    logger.info("%s: fingerprint of %d cases in %.1f s (each file read once)", task, len(cases), seconds)
    _check_fingerprint(cases, stats, description)
    entry, reasons = derive_plan(description, stats)

    def relative(case: dict) -> dict:
        return {
            k: [os.path.relpath(f, root) for f in v] if isinstance(v, list) else os.path.relpath(v, root)
            for k, v in case.items()
        }

    _write_json(plan_file.parent / "datalist.json", {k: [relative(c) for c in v] for k, v in lists.items()})
    _write_json(plan_file.parent / "fingerprint.json", {k: stats[k] for k in ("stats_summary", "stats_by_cases")})
    details = {
        "dataset_dir": str(root),
        "dataset_json": description["file"],
        "layout": description["layout"],
        "training_cases": len(cases),
        "fingerprint": "fingerprint.json",
        "fingerprint_seconds": round(seconds, 2),
        "why": reasons,
    }
    _write_json(plan_file, {"_plan": details, task: {**entry, "datalist": "datalist.json"}})
    return plan_file


def plan_table(task: str, entry: Mapping, reasons: Mapping[str, str]) -> str:
    """The plan as a table: setting, value, why."""
    shown = {
        "channels": f"{entry['in_channels']}: {', '.join(entry['channels'])} ({entry['modality']})",
        "labels": ", ".join(f"{k} {v}" for k, v in entry["labels"].items()),
        "spacing": " x ".join(f"{s:g}" for s in entry["spacing"]) + " mm",
        "intensity": (
            "clip HU {} .. {}, scale to [0, 1]".format(*entry["intensity"]["window"])
            if "window" in entry["intensity"]
            else "z-score, non-zero voxels, per channel"
        ),
        "roi_size": " x ".join(str(s) for s in entry["roi_size"]),
        "crop_ratios": str(entry["crop_ratios"]),
        "ssl_init": str(entry["ssl_init"]).lower(),
        "schedule": ", ".join(f"{k} {v}" for k, v in entry["schedule"].items()),
    }
    width = max(len(v) for v in shown.values())
    lines = [f"plan for {task}:", f"  {'setting':<12} {'value':<{width}}  why"]
    lines += [f"  {k:<12} {v:<{width}}  {reasons.get(k, '')}" for k, v in shown.items()]
    return "\n".join(lines)


def planned_settings(
    task: str,
    tasks_file: str | os.PathLike,
    plan_file: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    num_folds: int = 5,
) -> dict:
    """The settings of ``task``: the table's for the ten MSD tasks; for any other name the plan in ``plan_file``,
    made from ``dataset_dir`` first when it does not exist yet (training), else read as it is (evaluation and
    inference never re-fingerprint). The plan is printed as a table when it is used for training.

    Raises:
        UnknownTaskError: not in the table, no plan, and no ``dataset.json`` to plan from.
    """
    table = read_task_table(tasks_file)
    if task in table:
        return task_settings(task, tasks_file)
    plan_file = Path(plan_file)
    if not plan_file.is_file():
        described = Path(dataset_dir) / "dataset.json" if dataset_dir is not None else None
        if described is None or not described.is_file():
            raise UnknownTaskError(
                f"{described or plan_file}: not found: '{task}' is none of the MSD tasks ({', '.join(table)}), and a "
                "data set of one's own is planned from its dataset.json when training (--dataset_dir)"
            )
        plan_dataset(task, dataset_dir, plan_file, num_folds)
    elif dataset_dir is not None:
        logger.info("%s: reusing the plan %s (delete it to plan again)", task, plan_file)
    plan = json.loads(plan_file.read_text())
    if task not in plan:
        planned = ", ".join(k for k in plan if not k.startswith("_"))
        raise UnknownTaskError(f"{plan_file}: a plan for {planned}, not {task}")
    settings = entry_settings(task, plan[task], plan_file)
    settings["plan"] = str(plan_file)
    # a packaged plan (tools/zoo.py) has no datalist: the case list stays with the data, found from --dataset_dir
    listed = plan[task].get("datalist")
    settings["datalist"] = str(plan_file.parent / listed) if listed else None
    if dataset_dir is not None:
        logger.info("%s", plan_table(task, plan[task], plan.get("_plan", {}).get("why", {})))
    return settings
