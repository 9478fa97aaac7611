"""Datalists for the bundles: find the cases in the layouts CT data sets come in, split them, and check every file
before training starts, so that bad input is an error naming the file, not a stack trace an hour into a run.

Layouts read by :func:`load_datalist` (first match wins):

1. an explicit decathlon-style datalist json (BTCV's ``dataset_0.json``: ``training``/``validation``/``test`` lists of
   ``{"image": ..., "label": ...}`` with paths relative to ``dataset_dir``);
2. ``dataset_dir/dataset_0.json`` or ``dataset_dir/dataset.json`` (the MSD layout) when present;
3. ``imagesTr``/``labelsTr`` (and ``imagesTs``) folders;
4. BTCV as distributed: ``RawData/Training/img/img0001.nii.gz`` with ``RawData/Training/label/label0001.nii.gz``
   (and ``RawData/Testing/img``).

Lists without a ``validation`` part get a seeded split of ``training`` (:func:`split_cases`).
An image may be one file (several channels as a 4D NIfTI) or a list of one file per channel (nnU-Net's raw layout,
``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``: :func:`group_channel_files` groups them for inference).

:func:`check_cases` reads every voxel of every file once (:func:`scan_volume`, cached by file size and modification
time) and reports all unusable cases in one error; it also compares each image with the bundle's expected domain
(physical extent, spacing, intensities) and warns about what is unusual.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import ignite.distributed as idist
import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import DistributedSampler, MetaTensor, load_decathlon_datalist, partition_dataset
from monai.data.utils import affine_to_spacing, create_file_basename
from monai.transforms import LoadImage, MapTransform, SaveImaged, Spacingd
from monai.transforms.utils import create_translate
from monai.utils import TraceKeys
from monai.utils.type_conversion import get_torch_dtype_from_string

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
DATALIST_NAMES = ("dataset_0.json", "dataset.json")
# (images, labels, test images) folders relative to dataset_dir, in the order they are looked for
FOLDER_LAYOUTS = (
    ("imagesTr", "labelsTr", "imagesTs"),
    ("RawData/Training/img", "RawData/Training/label", "RawData/Testing/img"),
    ("Training/img", "Training/label", "Testing/img"),
)
# nnU-Net's raw layout: one file per channel, <case>_<4-digit channel>.nii.gz
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# affines of an image and its label may differ by float rounding, not by geometry (mm / direction cosines)
AFFINE_TOLERANCE = 1e-3
_WARNED: set[str] = set()  # domain warnings already logged by this process
OUTPUT_MARKER = ".swin_unetr_output"  # in every --out folder the tools make: a folder they may replace on a rerun


class DataError(ValueError):
    """Bad input data; the message names the file (or datalist) and the problem."""


def case_id(path: str | os.PathLike) -> str:
    """Name of a case without folder and image suffix (``img0001.nii.gz`` -> ``img0001``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _label_key(image_name: str) -> str:
    """Key under which an image's label is found: BTCV pairs img0001 with label0001, nnU-Net drops a ``_0000``."""
    name = case_id(image_name)
    if name.startswith("img"):
        name = name[len("img") :]
    if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        name = name[:-5]
    return name


def _label_file_key(label_name: str) -> str:
    name = case_id(label_name)
    return name[len("label") :] if name.startswith("label") else name


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files and DICOM series folders directly inside ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    items = [
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and (p.is_dir() or any(p.name.endswith(s) for s in IMAGE_SUFFIXES))
    ]
    return [str(p) for p in sorted(items)]


def find_cases(dataset_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """Pair images with labels in the first folder layout found under ``dataset_dir``.

    Returns ``{"training": [{"image", "label"}...], "test": [{"image"}...]}``; images without a label are an error
    (a silently dropped case is a data set that differs from what the user thinks it is).
    """
    root = Path(dataset_dir)
    for images_dir, labels_dir, test_dir in FOLDER_LAYOUTS:
        if not (root / images_dir).is_dir() or not (root / labels_dir).is_dir():
            continue
        labels = {_label_file_key(p): p for p in list_images(root / labels_dir)}
        training, unlabelled = [], []
        for image in list_images(root / images_dir):
            label = labels.get(_label_key(image))
            if label is None:
                unlabelled.append(image)
            else:
                training.append({"image": image, "label": label})
        if unlabelled:
            raise DataError(
                f"{root / images_dir}: {len(unlabelled)} images have no label in {root / labels_dir} "
                f"(first: {unlabelled[0]})"
            )
        return {"training": training, "test": [{"image": p} for p in list_images(root / test_dir)]}
    layouts = ", ".join(f"{i}/ + {lab}/" for i, lab, _ in FOLDER_LAYOUTS)
    raise DataError(f"{dataset_dir}: no datalist ({' or '.join(DATALIST_NAMES)}) and none of the layouts {layouts}")


def seeded_split(cases: Sequence[dict], first: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The first ``first`` cases of ``cases``' seeded order, and the rest. The order is ``cases`` sorted by image path
    (the same on every machine, whatever order the files were listed in), shuffled by MONAI's ``partition_dataset``
    with ``seed``; every split of the collection draws from it, so smaller parts are subsets of larger ones."""
    if not cases:
        return [], []
    ordered = sorted(cases, key=lambda c: str(c["image"]))
    # ratios equal to the counts give exactly those counts (partition_dataset rounds each part's share)
    head, rest = partition_dataset(ordered, ratios=[first, len(ordered) - first], shuffle=True, seed=seed)
    return head, rest


def split_cases(cases: Sequence[dict], val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[dict]]:
    """Seeded split of ``cases`` into ``training`` and ``validation`` (at least one of each when there are two)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(len(cases) * val_fraction)
    if val_fraction > 0 and len(cases) > 1:
        n_val = min(max(n_val, 1), len(cases) - 1)
    validation, training = seeded_split(cases, n_val, seed)
    return {"training": training, "validation": validation}


def read_datalist_file(path: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """Read a decathlon-style datalist with MONAI's ``load_decathlon_datalist``, relative paths resolved against
    ``base_dir`` (default: its folder); a missing or unreadable file is a :class:`DataError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: datalist not found")
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON datalist ({exc})") from exc
    if not isinstance(content, dict):
        raise DataError(
            f"{path}: a datalist is a JSON object of 'training'/'validation'/'test' lists, not a "
            f"{type(content).__name__}"
        )
    base = Path(base_dir) if base_dir else path.parent
    lists = {  # (MONAI's reader indexes a list's first entry, so an empty list is read here)
        key: load_decathlon_datalist(path, True, key, base) if content[key] else []
        for key in ("training", "validation", "test")
        if isinstance(content.get(key), list)
    }
    _require(lists, "image", ("training", "validation", "test"), path)
    return lists


def _require(lists: Mapping[str, Sequence[dict]], key: str, parts: Sequence[str], source: str | os.PathLike) -> None:
    """Raise :class:`DataError` naming ``source`` and the first entry of ``parts`` without ``key``."""
    for part in parts:
        for number, entry in enumerate(lists.get(part, []), 1):
            if key not in entry:
                raise DataError(f"{source}: entry {number} of '{part}' has no '{key}' ({json.dumps(entry)})")


def build_datalist(
    dataset_dir: str | os.PathLike, datalist_file: str | None = None, val_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[dict]]:
    """The ``training``/``validation``/``test`` lists of a data set in any of the layouts in this module's docstring."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(f"{root}: data set folder not found (set --dataset_dir)")
    if datalist_file:
        lists = read_datalist_file(datalist_file, base_dir=root)
    else:
        found = next((root / n for n in DATALIST_NAMES if (root / n).is_file()), None)
        lists = read_datalist_file(found, base_dir=root) if found else find_cases(root)
    if "validation" not in lists:
        lists.update(split_cases(lists.get("training", []), val_fraction, seed))
    return lists


def load_datalist(
    dataset_dir: str | os.PathLike,
    split: str = "training",
    datalist_file: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    in_channels: int = 1,
    num_classes: int | None = None,
    check: bool = True,
    domain: Mapping | None = None,
    strict_domain: bool = False,
    allow_overlap: bool = False,
) -> list[dict]:
    """The cases of one ``split`` of a data set, checked by :func:`check_cases` when ``check`` is set; a datalist with
    a case twice, or in both training and validation, refused unless ``allow_overlap`` (:func:`refuse_overlap`)."""
    lists = build_datalist(dataset_dir, datalist_file, val_fraction, seed)
    cases = lists.get(split, [])
    source = datalist_file or dataset_dir
    _require(lists, "label", ("training", "validation"), source)
    refuse_overlap(lists, source, allow_overlap)
    if not cases:
        raise DataError(
            f"{source}: the '{split}' list is empty (found: {', '.join(f'{k}={len(v)}' for k, v in lists.items())})"
        )
    if check:  # every labelled case at once, so that one error lists all the bad ones (the second split: cached)
        labelled = lists.get("training", []) + lists.get("validation", [])
        checked = labelled if split in ("training", "validation") else cases
        check_cases(
            checked, in_channels=in_channels, num_classes=num_classes, domain=domain, strict_domain=strict_domain
        )
        if split != "training":
            cases = _with_foreground(cases, source, split)
    logger.info("%s: %d '%s' cases", source, len(cases), split)
    return cases


def _with_foreground(cases: Sequence[dict], source: str | os.PathLike, split: str) -> list[dict]:
    """``cases`` without those whose label holds no foreground (every voxel 0), each left out with a warning: their
    Dice is 0 or undefined and their HD95 meaningless, so a score over them is wrong (read from the check's cache).

    Raises:
        DataError: no case of ``split`` has foreground.
    """
    kept = []
    for case in cases:
        label = case.get("label")
        if label is not None and not any(scan_volume(label, values=True)["values"]):
            logger.warning("%s: no foreground (every voxel 0), left out of the '%s' cases", label, split)
            continue
        kept.append(case)
    if not kept:
        raise DataError(f"{source}: no '{split}' case has foreground in its label")
    return kept


def overlap_problems(lists: Mapping[str, Sequence[dict]]) -> list[str]:
    """What a user would not knowingly put in a datalist: an image listed twice in one part, or in both
    ``training`` and ``validation`` (the validation score is then not of unseen data), one phrase each."""
    images = {part: [os.path.realpath(str(c["image"])) for c in lists.get(part, [])] for part in lists}
    problems = []
    for part, paths in images.items():
        repeated = sorted(p for p, n in Counter(paths).items() if n > 1)
        if repeated:
            problems.append(f"{len(repeated)} images listed twice or more in '{part}' (first: {repeated[0]})")
    shared = sorted(set(images.get("training", [])) & set(images.get("validation", [])))
    if shared:
        problems.append(
            f"{len(shared)} cases in both 'training' and 'validation' (first: {shared[0]}), so the validation score "
            "is not of unseen data"
        )
    return problems


def refuse_overlap(lists: Mapping[str, Sequence[dict]], source: str | os.PathLike, allow: bool = False) -> None:
    """Raise :class:`DataError` naming ``source`` and its :func:`overlap_problems`, with the way on; with ``allow``
    (``--allow_datalist_overlap true``: a smoke run on one case, a benchmark) warn once per process instead.

    Raises:
        DataError: ``source`` repeats a case, and ``allow`` is not set.
    """
    problems = overlap_problems(lists)
    if not problems:
        return
    line = f"{source}: {'; '.join(problems)}"
    if not allow:
        raise DataError(f"{line}; list each case once, or pass --allow_datalist_overlap true if this is meant")
    if line not in _WARNED:  # once per process: training reads its data set for each split
        _WARNED.add(line)
        logger.warning("%s (--allow_datalist_overlap true: the run goes on)", line)


def _header(path: str) -> tuple[tuple[int, ...], np.ndarray, int]:
    """Spatial shape, affine and channel count of an image, reading only its header where the format allows."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if path.endswith((".nii", ".nii.gz")):
        try:
            img = nib.load(path)
            shape = tuple(int(s) for s in img.shape)
            affine = np.asarray(img.affine)
        except Exception as exc:
            raise DataError(f"{path}: cannot be read as NIfTI ({exc})") from exc
        if len(shape) < 3:
            raise DataError(f"{path}: expected a 3D volume, found shape {shape}")
        channels = int(np.prod(shape[3:])) if len(shape) > 3 else 1
        return shape[:3], affine, channels
    # DICOM series and other formats: read through MONAI (ITK)
    try:
        data = LoadImage(image_only=True, ensure_channel_first=True)(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as an image ({exc})") from exc
    return tuple(int(s) for s in data.shape[1:]), np.asarray(data.affine), int(data.shape[0])


def _ras(shape: tuple[int, ...], affine: np.ndarray, path: str = "the image") -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of the same grid stored in RAS axis order, so that an image and a label that cover the same
    voxels in another axis order or direction (as after DICOM to NIfTI conversion) compare equal.

    Raises:
        DataError: a singular affine (a zero spacing or two parallel axes): no geometry to resample.
    """
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{path}: its affine (voxel-to-world matrix) is singular or not finite: no usable geometry")
    transform = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("RAS"))
    ras_shape = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(transform):
        ras_shape[int(new_axis)] = shape[axis]
    return tuple(ras_shape), affine @ nib.orientations.inv_ornt_aff(transform, shape)


def scan_cache_file() -> Path | None:
    """Where :func:`scan_volume` keeps what it read across runs: ``$SWIN_UNETR_CACHE/volume_scans.json``; None (no file
    is written, a run checks its data afresh) unless the user names that folder: bundles write nothing outside their
    own folder by default."""
    root = os.environ.get("SWIN_UNETR_CACHE")
    return Path(root) / "volume_scans.json" if root else None


def _file_signature(path: str) -> str:
    """Path, size and modification time of a file, or of every file in a DICOM series folder: a change to any of
    them makes a new cache entry."""
    target = Path(path).resolve()
    files = sorted(p for p in target.iterdir() if p.is_file()) if target.is_dir() else [target]
    stats = [p.stat() for p in files]
    return f"{target}|{sum(st.st_size for st in stats)}|{max((st.st_mtime_ns for st in stats), default=0)}"


def _read_cache() -> dict:
    path = scan_cache_file()
    if path is None:
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_cache(entries: dict) -> None:
    """Merge ``entries`` into the cache file (written beside it, then renamed: readers never see half a file)."""
    path = scan_cache_file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read_cache(), **entries}
        fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: the check still works, only without its cache
        logger.debug("volume scan cache not written (%s)", exc)


def _read_voxels(path: str) -> tuple[np.ndarray, float, float]:
    """Every voxel of an image, with its intensity scaling (slope, intercept) returned for the caller to apply to
    min and max rather than applied, so that an int16 CT stays int16 in memory."""
    if path.endswith((".nii", ".nii.gz")):
        img = nib.load(path)
        voxels = np.asanyarray(img.dataobj.get_unscaled()) if hasattr(img.dataobj, "get_unscaled") else img.get_fdata()
        slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
        return voxels, float(slope), float(inter)
    return np.asarray(LoadImage(image_only=True)(path)), 1.0, 0.0


def scan_volume(path: str, values: bool = False, cache: dict | None = None) -> dict:
    """Read every voxel of ``path`` once and return what the checks need: ``min``, ``max`` (of the finite voxels),
    ``finite`` (no NaN/Inf) and, with ``values``, the sorted distinct values (for label maps).

    Results are cached by path, size and modification time, so a second check of an unchanged data set is instant:
    in ``cache`` when given (the caller writes it back with :func:`_write_cache`), else in the cache file directly.

    Raises:
        DataError: the file is truncated or cannot be decoded.
    """
    key = _file_signature(path) + ("|values" if values else "")
    cached = (_read_cache() if cache is None else cache).get(key)
    if cached is not None:
        return cached
    try:
        voxels, slope, inter = _read_voxels(path)
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
        raise DataError(f"{path}: cannot be read to the end, truncated or corrupt ({problem})") from exc
    return remember_scan(path, voxels, values=values, cache=cache, slope=slope, inter=inter)


def remember_scan(
    path: str,
    voxels: np.ndarray,
    values: bool = False,
    cache: dict | None = None,
    slope: float = 1.0,
    inter: float = 0.0,
) -> dict:
    """The :func:`scan_volume` statistics of ``voxels`` already read from ``path`` (by another reader, such as the
    data set fingerprint), stored under ``path``'s cache key so that the checks do not read the file again."""
    finite_voxels = np.isfinite(voxels) if np.issubdtype(voxels.dtype, np.floating) else None
    finite = finite_voxels is None or bool(finite_voxels.all())
    usable = voxels if finite else voxels[finite_voxels]
    low, high = (float(usable.min()), float(usable.max())) if usable.size else (float("nan"), float("nan"))
    low, high = sorted((low * slope + inter, high * slope + inter))
    stats = {"min": low, "max": high, "finite": finite}
    if values:
        distinct = np.unique(usable)
        stats["values"] = (distinct if (slope, inter) == (1.0, 0.0) else distinct * slope + inter).tolist()[:1000]
    key = _file_signature(path) + ("|values" if values else "")
    if cache is None:
        _write_cache({key: stats})
    else:
        cache[key] = stats
    return stats


def check_dicom_series(folder: str | os.PathLike) -> None:
    """Check that the slices of a DICOM series folder are whole and evenly spaced along the slice normal: ITK reads a
    series with a missing or a repeated slice onto a regular grid of the wrong spacing (it says so only on stderr)
    and fills a truncated slice's missing pixels.

    Raises:
        DataError: naming the folder and the file or the position of the truncated, repeated or missing slice.
    """
    import pydicom  # only where DICOM is read

    positions = []
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            position = np.asarray(ds.ImagePositionPatient, dtype=float)
            orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
            expected = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * int(ds.BitsAllocated) // 8
        except Exception as exc:  # not a DICOM image slice: the ITK read names what it cannot read
            logger.debug("%s: no slice geometry read (%s)", path, exc)
            continue
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise DataError(f"{folder}: slice {path.name} is truncated or corrupt ({exc})") from exc
        if "PixelData" not in ds:  # pydicom stops at a cut pixel data element and leaves it out
            raise DataError(f"{folder}: slice {path.name} is truncated (its pixel data ends early)")
        stored = expected if ds.file_meta.TransferSyntaxUID.is_compressed else len(ds.PixelData)
        if stored < expected:
            raise DataError(f"{folder}: slice {path.name} is truncated ({stored} of {expected} pixel bytes)")
        positions.append((float(position @ np.cross(orientation[:3], orientation[3:])), path.name))
    if len(positions) < 3:
        return
    positions.sort()
    steps = np.diff([z for z, _ in positions])
    spacing = float(np.median(steps))
    for (z, name), step in zip(positions[1:], steps, strict=True):
        if step < 1e-3 * max(spacing, 1e-3):
            raise DataError(f"{folder}: slice {name} repeats the position {z:.2f} mm of another slice")
        if abs(step - spacing) > 0.1 * spacing:
            raise DataError(
                f"{folder}: {step:.2f} mm between the slices at {z - step:.2f} and {z:.2f} mm where the series has "
                f"{spacing:.2f} mm: a slice is missing"
            )


def channel_files(image: str | os.PathLike | Sequence[str]) -> list[str]:
    """The files of an image: one (3D, or 4D with the channels last), or one per channel (nnU-Net's raw layout)."""
    return [str(image)] if isinstance(image, (str, os.PathLike)) else [str(f) for f in image]


def image_header(image: str | os.PathLike | Sequence[str]) -> tuple[tuple[int, ...], np.ndarray, int]:
    """Spatial shape, affine and channel count of an image given as one file or one file per channel; the channel
    files must share one grid."""
    files = channel_files(image)
    shape, affine, channels = _header(files[0])
    for other in files[1:]:
        other_shape, other_affine, other_channels = _header(other)
        (ras_shape, ras_affine), (o_shape, o_affine) = (
            _ras(shape, affine, files[0]),
            _ras(other_shape, other_affine, other),
        )
        if o_shape != ras_shape or not np.allclose(o_affine, ras_affine, atol=AFFINE_TOLERANCE):
            raise DataError(f"{other}: channel file geometry differs from {files[0]}'s (shape {other_shape}, {shape})")
        channels += other_channels
    return shape, affine, channels


def check_case(
    case: dict, in_channels: int = 1, num_classes: int | None = None, cache: dict | None = None, scan: bool = True
) -> dict:
    """Check that a case's files exist and can be read to the last voxel, that the image (one file, or one file per
    channel) has ``in_channels`` channels, holds no NaN/Inf and is not constant, and that the label has the image's
    geometry and values in ``0 .. num_classes - 1``. Returns the image's :func:`scan_volume` statistics, with its
    ``shape`` and ``spacing`` in patient axis order (x, y, z). ``scan`` false checks the headers only.

    Raises:
        DataError: naming the file and the problem.
    """
    files = channel_files(case["image"])
    if len(files) == 1 and os.path.isdir(files[0]):
        check_dicom_series(files[0])
    shape, affine, channels = image_header(files)
    image = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} channel files)"
    if channels != in_channels:
        raise DataError(f"{image}: has {channels} channels, the network expects {in_channels}")
    label = case.get("label")
    if label is not None:
        label_shape, label_affine, label_channels = _header(label)
        if label_channels != 1:
            raise DataError(f"{label}: a label map must have one channel, found {label_channels}")
        image_shape, image_affine = _ras(shape, affine, image)
        label_shape, label_affine = _ras(label_shape, label_affine, label)
        if label_shape != image_shape:
            raise DataError(f"{label}: label shape {label_shape} differs from image shape {image_shape} ({image})")
        if not np.allclose(label_affine, image_affine, atol=AFFINE_TOLERANCE):
            raise DataError(
                f"{label}: label geometry (origin, spacing or direction) differs from the image's ({image}); "
                "resample the label onto the image"
            )
    ras_shape, ras_affine = _ras(
        shape, affine, image
    )  # extent and spacing per patient axis (x, y, z) for the domain check
    spacing = affine_to_spacing(ras_affine, r=3).round(4).tolist()
    if not scan:
        return {"shape": list(ras_shape), "spacing": spacing}
    scans = [scan_volume(f, cache=cache) for f in files]
    stats = {
        "min": min(s["min"] for s in scans),
        "max": max(s["max"] for s in scans),
        "finite": all(s["finite"] for s in scans),
    }
    if not stats["finite"]:
        raise DataError(f"{image}: contains NaN or infinite values")
    if stats["min"] == stats["max"]:
        raise DataError(f"{image}: every voxel is {stats['min']:g} (a constant image, nothing to segment)")
    stats = {**stats, "shape": list(ras_shape), "spacing": spacing}
    if label is None:
        return stats
    label_stats = scan_volume(label, values=True, cache=cache)
    if not label_stats["finite"]:
        raise DataError(f"{label}: contains NaN or infinite values")
    if num_classes is not None:
        values = np.asarray(label_stats["values"])
        bad = values[(values < 0) | (values >= num_classes) | (values != np.round(values))]
        if bad.size:
            raise DataError(
                f"{label}: label values {bad[:10].tolist()} outside the {num_classes} classes 0..{num_classes - 1}"
            )
    return stats


def domain_problems(stats: Mapping, domain: Mapping) -> list[str]:
    """What is unusual about an image (its :func:`check_case` statistics) for a bundle's ``domain``, each problem
    with what the bundle expects. ``domain`` keys, all optional: ``extent_mm`` ([low, high] per axis, physical size of
    the volume), ``spacing_mm`` ([low, high] for every axis), ``intensity`` (``"CT"``: Hounsfield units with air and
    soft tissue; ``"MRI"``: non-negative magnitudes)."""
    problems = []
    spacing = np.asarray(stats["spacing"][:3], dtype=float)
    extent = spacing * np.asarray(stats["shape"][:3], dtype=float)
    if "extent_mm" in domain:
        expected = np.asarray(domain["extent_mm"], dtype=float)
        if ((extent < expected[:, 0]) | (extent > expected[:, 1])).any():
            shown = " x ".join(f"{lo:g}-{hi:g}" for lo, hi in expected)
            problems.append(f"extent {' x '.join(f'{e:.0f}' for e in extent)} mm, expected about {shown} mm")
    if "spacing_mm" in domain:
        low, high = domain["spacing_mm"]
        if (spacing < low).any() or (spacing > high).any():
            problems.append(f"spacing {' x '.join(f'{s:g}' for s in spacing)} mm, expected {low:g}-{high:g} mm")
    modality = domain.get("intensity")
    if modality == "CT" and (stats["min"] > -500 or stats["max"] < 100):
        problems.append(
            f"values {stats['min']:g}..{stats['max']:g}, expected CT in Hounsfield units (air near -1000, "
            "tissue above 0)"
        )
    if modality == "MRI" and stats["min"] < -1:
        problems.append(f"values {stats['min']:g}..{stats['max']:g}, expected non-negative MRI magnitudes")
    return problems


def check_cases(
    cases: Sequence[dict],
    in_channels: int = 1,
    num_classes: int | None = None,
    domain: Mapping | None = None,
    strict_domain: bool = False,
) -> None:
    """:func:`check_case` on every case, then all the unusable ones in one error; images outside ``domain`` (see
    :func:`domain_problems`) are a warning each, or part of the error with ``strict_domain``.

    Raises:
        DataError: every unusable case (and, with ``strict_domain``, every case outside the domain), one per line.
    """
    errors, unusual, cache = [], [], _read_cache()
    scanned = len(cache)
    for case in cases:
        try:
            stats = check_case(case, in_channels=in_channels, num_classes=num_classes, cache=cache)
        except DataError as exc:
            errors.append(str(exc))
            continue
        problems = domain_problems(stats, domain) if domain else []
        if problems:
            unusual.append(f"{case['image']}: unusual for this bundle: {'; '.join(problems)}")
    if len(cache) > scanned:
        _write_cache(cache)
    if strict_domain:
        errors += unusual
    else:
        for line in unusual:
            if line not in _WARNED:  # once per process: training checks its data set for each split
                _WARNED.add(line)
                logger.warning("%s (the run goes on; --strict_domain true makes this an error)", line)
    if len(errors) == 1:
        raise DataError(errors[0])
    if errors:
        raise DataError(f"{len(errors)} of {len(cases)} cases cannot be used:\n" + "\n".join(errors))


def inference_inputs(
    inputs: str | os.PathLike | Sequence[str],
    in_channels: int = 1,
    domain: Mapping | None = None,
    strict_domain: bool = False,
    output_dir: str | os.PathLike | None = None,
    postfix: str = "seg",
) -> list[dict]:
    """Cases to predict from a file, a DICOM series folder, a folder of both, a datalist json or a list of paths,
    every one checked by :func:`check_cases` before anything is predicted or written, and, given the ``output_dir``
    of a ``SaveImaged`` rooted at :func:`input_root` (with ``postfix``), each with an output file of its own that is
    not an input (:func:`output_root`).

    Raises:
        DataError: nothing to predict, or inputs that cannot be read, hold NaN/Inf, are constant or have the wrong
            channel count (all of them in one message), or outputs that would collide or replace an input.
    """
    paths = _inference_paths(inputs)
    if in_channels > 1:
        paths = group_channel_files(paths)
    if not paths:
        raise DataError(f"{inputs}: no images or DICOM series to predict")
    cases = [{"image": p} for p in paths]
    check_cases(cases, in_channels=in_channels, domain=domain, strict_domain=strict_domain)
    if output_dir is not None:
        output_root(cases, output_dir, postfix)
    return cases


def input_root(inputs: str | os.PathLike | Sequence[str]) -> str:
    """The folder the images of :func:`inference_inputs` have in common: the ``data_root_dir`` of the bundles'
    ``SaveImaged``. Reads only file names; "" where the inputs cannot be listed (``inference_inputs`` says why)."""
    try:
        paths = _inference_paths(inputs)
    except DataError:
        return ""
    return os.path.commonpath([os.path.dirname(os.path.abspath(channel_files(p)[0])) for p in paths]) if paths else ""


def _inference_paths(inputs: str | os.PathLike | Sequence[str]) -> list:
    """The paths :func:`inference_inputs` predicts: files or DICOM folders, or lists of channel files."""
    if isinstance(inputs, (str, os.PathLike)):
        return _input_paths(Path(inputs))
    return [p if isinstance(p, (list, tuple)) else str(p) for p in inputs]


def output_root(
    cases: Sequence[Mapping], output_dir: str | os.PathLike, postfix: str = "seg", suffix: str = ".nii.gz"
) -> str:
    """The ``data_root_dir`` for ``SaveImaged`` (with ``separate_folder=False``) that gives each case of ``cases`` its
    own output file under ``output_dir``: the folder the images have in common, so that ``p1/img.nii.gz`` and
    ``p2/img.nii.gz`` are written to ``p1/img_seg.nii.gz`` and ``p2/img_seg.nii.gz`` rather than one over the other.

    Raises:
        DataError: two inputs that would still be written to the same file (``img.nii`` and ``img.nii.gz``), or an
            output that would replace one of the inputs (images or labels), before anything is predicted.
    """
    images = [os.path.abspath(channel_files(case["image"])[0]) for case in cases]  # SaveImaged names by the first
    root = os.path.commonpath([os.path.dirname(image) for image in images]) if images else ""
    inputs = {
        os.path.realpath(f)
        for case in cases
        for key in ("image", "label")
        if case.get(key)
        for f in channel_files(case[key])
    }
    written: dict[str, str] = {}
    for image in images:
        base = create_file_basename(postfix, image, os.path.abspath(output_dir), root, False, makedirs=False)
        target = base + suffix
        if target in written:
            raise DataError(f"{image}: would be written to {target} like {written[target]}; rename one of them")
        if os.path.realpath(target) in inputs:
            raise DataError(
                f"{target}: is an input and would be replaced by the prediction of {image}; choose another --output_dir"
            )
        written[target] = image
    check_output_space(output_dir, images)
    return root


def check_output_space(output_dir: str | os.PathLike, images: Sequence[str]) -> None:
    """Before the network runs: ``output_dir`` (or the folder it will be made in) is writable and its file system has
    room for a uint8 label map of each of ``images`` before compression, so that a full disk or a read-only folder is
    an error naming the folder, not a run that ends with a truncated label map or none.

    Raises:
        DataError: naming the folder and the cause (with the free and the needed space).
    """
    folder = Path(output_dir).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{folder}: cannot write there ({existing} is not a writable folder)")
    needed = sum(int(np.prod(_header(image)[0])) for image in images)
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise DataError(
            f"{folder}: {free / 2**20:.2f} MB free, the label maps need up to {needed / 2**20:.2f} MB; free some space"
        )


def _input_paths(path: Path) -> list[str]:
    if path.suffix == ".json":
        lists = read_datalist_file(path)
        return [e["image"] for e in lists.get("test") or lists.get("validation") or []]
    if not path.is_dir() or _is_dicom_series(path):
        return [str(path)]
    datalist = next((path / n for n in DATALIST_NAMES if (path / n).is_file()), None)
    tests = read_datalist_file(datalist).get("test") if datalist is not None else None
    if tests:  # a data set folder: predict its test cases (nnU-Net's dataset.json lists none: its imagesTs below)
        return [e["image"] for e in tests]
    for _, _, test_dir in FOLDER_LAYOUTS:
        if (path / test_dir).is_dir():
            return list_images(path / test_dir)
    return [p for p in list_images(path) if not Path(p).is_dir() or _is_dicom_series(Path(p))]


def group_channel_files(paths: Sequence[str | Sequence[str]]) -> list[str | list[str]]:
    """Group the files nnU-Net's raw layout stores one per channel (``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``)
    into one image per case, channels in order; other paths pass unchanged."""
    groups: dict[str, list] = {}
    for path in paths:
        match = None if not isinstance(path, str) or Path(path).is_dir() else _CHANNEL_FILE.match(case_id(path))
        key = str(Path(path).parent / match["case"]) if match else str(path)
        groups.setdefault(key, []).append(path)
    return [sorted(group) if len(group) > 1 else group[0] for group in groups.values()]


def _is_dicom_series(folder: Path) -> bool:
    """A folder whose files are not images of the suffixes above (DICOM files often have no suffix at all)."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return (
        bool(files)
        and not any(p.name.endswith(IMAGE_SUFFIXES) for p in files)
        and not any(p.is_dir() for p in folder.iterdir())
    )


def find_images(source: str | os.PathLike, _visited: set[str] | None = None) -> list[str]:
    """Every image in ``source`` for unlabelled use: a datalist's images (all parts), a data set's image folders
    (never its label folders), a DICOM series folder, an image file, or any folder searched recursively (each
    folder once, however many symbolic links lead to it, so a link loop cannot count one CT many times)."""
    path = Path(source)
    visited = set() if _visited is None else _visited
    if path.is_dir():
        if os.path.realpath(path) in visited:
            return []
        visited.add(os.path.realpath(path))
    if not path.exists():
        raise DataError(f"{path}: not found")
    if path.suffix == ".json":
        return [e["image"] for entries in read_datalist_file(path).values() for e in entries]
    if path.is_file() or _is_dicom_series(path):
        return [str(path)]
    datalist = next((path / n for n in DATALIST_NAMES if (path / n).is_file()), None)
    if datalist is not None:
        return find_images(datalist)
    for images_dir, _, test_dir in FOLDER_LAYOUTS:
        if (path / images_dir).is_dir():
            return list_images(path / images_dir) + list_images(path / test_dir)
    found = []
    for item in list_images(path):
        found += find_images(item, visited) if Path(item).is_dir() else [item]
    return found


def load_unlabeled(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    split: str = "training",
    val_fraction: float = 0.05,
    seed: int = 0,
    in_channels: int = 1,
    check: bool = True,
    domain: Mapping | None = None,
    strict_domain: bool = False,
) -> list[dict]:
    """One split of the unlabelled images of one or many ``sources`` (see :func:`find_images`), seeded and checked."""
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    found = {os.path.realpath(image): image for source in sources for image in find_images(source)}
    images = sorted(found.values())  # one entry per file, whatever links lead to it
    cases = split_cases([{"image": image} for image in images], val_fraction, seed).get(split, [])
    if not cases:
        raise DataError(f"{', '.join(map(str, sources))}: no images for the '{split}' split ({len(images)} found)")
    if check:  # every image at once, so that one error lists all the bad ones (the second split: cached)
        check_cases(
            [{"image": image} for image in images], in_channels=in_channels, domain=domain, strict_domain=strict_domain
        )
    logger.info("%d '%s' images from %d sources", len(cases), split, len(sources))
    return cases


def check_output_dir(path: str | os.PathLike, overwrite: bool = False, marker: str = OUTPUT_MARKER) -> Path:
    """Refuse to replace the folder ``path`` (a tool's ``--out``) unless it is absent or empty, was made by one of the
    project's tools (it holds ``marker``) or ``overwrite`` is set; never one that holds the current folder or a git
    checkout. Returns its absolute path.

    Raises:
        DataError: naming the folder and what would be lost.
    """
    folder = Path(path).resolve()
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: is a file, not an output folder; choose another --out")
    if not folder.is_dir() or not any(folder.iterdir()) or (folder / marker).is_file():
        return folder
    if Path.cwd().resolve().is_relative_to(folder) or (folder / ".git").exists():
        raise DataError(f"{folder}: holds the current folder or a git checkout; choose another --out")
    if not overwrite:
        raise DataError(f"{folder}: not empty and not made by this tool; pass --overwrite true or choose another --out")
    return folder


def replace_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Empty the output folder ``path`` (after :func:`check_output_dir`) and mark it as the project's own."""
    folder = check_output_dir(path, overwrite)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / OUTPUT_MARKER).write_text("made by a swin_unetr_kit tool; replaced when the tool runs again\n")
    return folder


class WarnIfNotCTd(MapTransform):
    """Log a warning, once per file, for an image whose values do not look like CT in Hounsfield units (no air below
    -500, or nothing denser than water, as for MRI or an already normalised volume): the HU window would flatten it."""

    def __init__(self, keys: KeysCollection = "image") -> None:
        super().__init__(keys)
        self._warned: set[str] = set()

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            low, high = float(image.min()), float(image.max())
            if low > -500 or high < 100:
                name = str(getattr(image, "meta", {}).get("filename_or_obj", key))
                if name not in self._warned:
                    self._warned.add(name)
                    logger.warning(
                        "%s: values %.1f..%.1f do not look like CT in Hounsfield units; check the modality",
                        name,
                        low,
                        high,
                    )
        return d


class PathSafeSpacingd(Spacingd):
    """``monai.transforms.Spacingd`` that leaves non-dictionary ``<key>_*`` entries alone, and whose inverse resamples
    a 3D volume back slab by slab.

    After resampling a NIfTI image, MONAI 1.6.1's ``Spacingd`` calls ``d[k].update(meta)`` on every ``<key>_*`` entry,
    taking each for a metadata dictionary; MONAI Label puts the study's path into the data as the string
    ``image_path`` (and reads it back when writing the result), so every NIfTI study failed with ``AttributeError``.
    Such entries are set aside during the call and put back unchanged.

    The inverse (what ``Invertd`` runs to bring a prediction back to the input's grid) is MONAI's own resampling, run on
    slabs of the output grid of at most as many voxels as the input has: MONAI's single call builds a float64 sampling
    grid of the whole original volume (about 40 bytes a voxel, 10 GB for a 512 x 512 x 1000 CT) while the network ran
    on a grid about ten times smaller. A label map (an integer tensor resampled with ``nearest``) keeps its dtype, so a
    uint8 prediction stays one byte a voxel; other tensors come back float32, as from MONAI.
    """

    def __call__(self, data: Mapping, lazy: bool | None = None) -> dict:
        prefixes = tuple(f"{key}_" for key in self.keys)
        aside = {k: v for k, v in data.items() if str(k).startswith(prefixes) and not isinstance(v, Mapping)}
        d = super().__call__({k: v for k, v in data.items() if k not in aside}, lazy=lazy)
        d.update(aside)
        return d

    def inverse(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._invert_by_slabs(d[key]) if d[key].ndim == 4 else self.spacing_transform.inverse(d[key])
        return d

    def _invert_by_slabs(self, img: MetaTensor) -> MetaTensor:
        """``SpatialResample.inverse`` of ``img`` (channel-first 3D), computed over slabs of the last axis."""
        resample = self.spacing_transform.sp_resample
        transform = resample.pop_transform(img)
        info = transform[TraceKeys.EXTRA_INFO]
        affine = info["src_affine"]  # the grid before Spacing: where the inverse goes back to
        size = [int(s) for s in transform[TraceKeys.ORIG_SIZE]]
        mode = info["mode"]
        label_map = mode in ("nearest", 0) and not img.is_floating_point()
        out = torch.empty((img.shape[0], *size), dtype=img.dtype if label_map else torch.float32, device=img.device)
        step = max(1, min(size[2], int(np.prod(img.shape[1:])) // (size[0] * size[1])))
        options = {
            "mode": mode,
            "padding_mode": info["padding_mode"],
            "align_corners": False if info["align_corners"] == TraceKeys.NONE else info["align_corners"],
            "dtype": get_torch_dtype_from_string(info["dtype"]),
        }
        with resample.trace_transform(False):
            for start in range(0, size[2], step):
                stop = min(size[2], start + step)
                slab_affine = affine @ torch.tensor(create_translate(3, (0, 0, start)), dtype=affine.dtype)
                slab = resample(img, dst_affine=slab_affine, spatial_size=(size[0], size[1], stop - start), **options)
                out[..., start:stop] = slab.as_tensor()
        result = MetaTensor(out, meta=dict(img.meta), applied_operations=img.applied_operations)
        result.affine = affine
        return result


class WholeFileSaveImaged(SaveImaged):
    """``monai.transforms.SaveImaged`` that leaves no partial file: where writing fails (a disk that fills during the
    run, a folder made read-only), the file this call began is removed and the error names it and its cause in one
    line. MONAI's ``SaveImage`` tries its next writer and then raises "cannot find a suitable writer ... install the
    writer libraries", leaving the truncated file behind; ITK's NIfTI writer can even report success on a full disk
    (it prints "NWAD: wrote only 0 of ... bytes"), so a written ``.gz`` is read through once (its length and CRC).
    """

    def _targets(self, data: Mapping) -> dict[str, int | None]:
        """The file each key would be written to, with its modification time now (None: not there)."""
        saver = self.saver
        targets = {}
        for key in self.key_iterator(dict(data)):
            path = saver.folder_layout.filename(**saver.fname_formatter(getattr(data[key], "meta", {}), saver))
            targets[path] = os.stat(path).st_mtime_ns if os.path.exists(path) else None
        return targets

    def __call__(self, data: Mapping) -> dict:
        before = self._targets(data)
        try:
            written = super().__call__(data)
            for path in before:
                if path.endswith(".gz"):
                    with gzip.open(path) as stream:
                        while stream.read(1 << 24):
                            pass
            return written
        except Exception as error:
            reasons = [line.strip() for line in str(error).splitlines() if "Error" in line]
            reason = reasons[-1] if reasons else f"{type(error).__name__}: {error}"
            if isinstance(error, (EOFError, gzip.BadGzipFile)):
                free = shutil.disk_usage(os.path.dirname(next(iter(before)))).free
                reason = f"the written file is truncated, {free / 2**20:.2f} MB free: {type(error).__name__}: {error}"
            removed = [p for p, mtime in before.items() if os.path.exists(p) and os.stat(p).st_mtime_ns != mtime]
            for path in removed:
                os.remove(path)
            names = ", ".join(removed or before)
            raise OSError(f"{names}: could not be written ({reason}); no partial file is left") from error


class CheckLabeld(MapTransform):
    """Check a loaded label map as :func:`check_case` checks files: one channel, the image's spatial shape and whole
    values in ``0 .. num_classes - 1``; raise :class:`DataError` naming the file otherwise.

    The datalist functions check files before training starts; this transform checks the cases that arrive another
    way, such as the image/label lists MONAI Label passes in for ``train#dataset#data``.
    """

    def __init__(self, keys: KeysCollection, num_classes: int, image_key: str = "image") -> None:
        super().__init__(keys)
        self.num_classes = num_classes
        self.image_key = image_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            name = str(getattr(label, "meta", {}).get("filename_or_obj", key))
            if label.shape[0] != 1:
                raise DataError(f"{name}: a label map must have one channel, found {label.shape[0]}")
            image = d.get(self.image_key)
            if image is not None and tuple(image.shape[1:]) != tuple(label.shape[1:]):
                raise DataError(
                    f"{name}: label shape {tuple(label.shape[1:])} differs from image shape {tuple(image.shape[1:])}"
                )
            low, high = float(label.min()), float(label.max())
            fractional = label.is_floating_point() and bool((label != label.round()).any())
            if low < 0 or high >= self.num_classes or fractional:
                values = np.unique(np.asarray(label))
                bad = values[(values < 0) | (values >= self.num_classes) | (values != np.round(values))]
                shown = [int(v) if v == round(v) else float(v) for v in bad[:10]]
                raise DataError(
                    f"{name}: label values {shown} outside the {self.num_classes} classes 0..{self.num_classes - 1}"
                )
        return d


def validation_sampler(dataset: Sequence, shuffle: bool = False) -> DistributedSampler:
    """MONAI's ``DistributedSampler`` over the validation cases, each scored once (``even_divisible`` false, so no case
    is repeated and the metrics stay those of the split). Every process must hold a case for the metrics' gathering,
    so fewer cases than processes is an error saying what to do rather than MONAI's "dataset length is less than the
    number of participating ranks"."""
    processes = idist.get_world_size()
    if len(dataset) < processes:
        raise DataError(
            f"{len(dataset)} validation case(s) for {processes} processes, and each process scores at least one: run "
            f"torchrun with --nproc_per_node {max(len(dataset), 1)} or fewer, or make the validation split larger"
        )
    return DistributedSampler(dataset, even_divisible=False, shuffle=shuffle)
