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
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.config import KeysCollection
from monai.transforms import LoadImage, MapTransform, Spacingd

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
DATALIST_NAMES = ("dataset_0.json", "dataset.json")
# (images, labels, test images) folders relative to dataset_dir, in the order they are looked for
FOLDER_LAYOUTS = (
    ("imagesTr", "labelsTr", "imagesTs"),
    ("RawData/Training/img", "RawData/Training/label", "RawData/Testing/img"),
    ("Training/img", "Training/label", "Testing/img"),
)
# affines of an image and its label may differ by float rounding, not by geometry (mm / direction cosines)
AFFINE_TOLERANCE = 1e-3


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


def seeded_order(cases: Sequence[dict], seed: int = 0) -> list[dict]:
    """``cases`` sorted by image path, then shuffled with ``seed``: the same order on every machine, whatever order
    the files were listed in. Every split of the collection draws from it."""
    order = sorted(cases, key=lambda c: str(c["image"]))
    random.Random(seed).shuffle(order)
    return order


def split_cases(cases: Sequence[dict], val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[dict]]:
    """Seeded split of ``cases`` into ``training`` and ``validation`` (at least one of each when there are two)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = seeded_order(cases, seed)
    n_val = round(len(order) * val_fraction)
    if val_fraction > 0 and len(order) > 1:
        n_val = min(max(n_val, 1), len(order) - 1)
    return {"training": order[n_val:], "validation": order[:n_val]}


def _resolve(entry: dict | str, base_dir: Path) -> dict:
    entry = {"image": entry} if isinstance(entry, str) else dict(entry)
    for key in ("image", "label"):
        value = entry.get(key)
        if isinstance(value, str) and not os.path.isabs(value):
            entry[key] = str(base_dir / value)
        elif isinstance(value, list):
            entry[key] = [v if os.path.isabs(v) else str(base_dir / v) for v in value]
    return entry


def read_datalist_file(path: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """Read a decathlon-style datalist, resolving relative paths against ``base_dir`` (default: its folder)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: datalist not found")
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON datalist ({exc})") from exc
    base = Path(base_dir) if base_dir else path.parent
    return {
        key: [_resolve(e, base) for e in value]
        for key, value in content.items()
        if key in ("training", "validation", "test") and isinstance(value, list)
    }


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
) -> list[dict]:
    """The cases of one ``split`` of a data set, each file checked by :func:`check_case` when ``check`` is set."""
    lists = build_datalist(dataset_dir, datalist_file, val_fraction, seed)
    cases = lists.get(split, [])
    source = datalist_file or dataset_dir
    if not cases:
        raise DataError(
            f"{source}: the '{split}' list is empty (found: {', '.join(f'{k}={len(v)}' for k, v in lists.items())})"
        )
    if check:
        for case in cases:
            check_case(case, in_channels=in_channels, num_classes=num_classes)
    logger.info("%s: %d '%s' cases", source, len(cases), split)
    return cases


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


def _ras(shape: tuple[int, ...], affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of the same grid stored in RAS axis order, so that an image and a label that cover the same
    voxels in another axis order or direction (as after DICOM to NIfTI conversion) compare equal."""
    transform = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("RAS"))
    ras_shape = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(transform):
        ras_shape[int(new_axis)] = shape[axis]
    return tuple(ras_shape), affine @ nib.orientations.inv_ornt_aff(transform, shape)


def _label_values(path: str) -> np.ndarray:
    if path.endswith((".nii", ".nii.gz")):
        return np.unique(np.asanyarray(nib.load(path).dataobj))
    return np.unique(np.asarray(LoadImage(image_only=True)(path)))


def check_case(case: dict, in_channels: int = 1, num_classes: int | None = None) -> None:
    """Check that a case's files exist and can be read, that the image has ``in_channels`` channels and that the label
    has the image's geometry and values in ``0 .. num_classes - 1``.

    Raises:
        DataError: naming the file and the problem.
    """
    image = case["image"]
    shape, affine, channels = _header(image)
    if channels != in_channels:
        raise DataError(f"{image}: has {channels} channels, the network expects {in_channels}")
    label = case.get("label")
    if label is None:
        return
    label_shape, label_affine, label_channels = _header(label)
    if label_channels != 1:
        raise DataError(f"{label}: a label map must have one channel, found {label_channels}")
    (image_shape, image_affine), (label_shape, label_affine) = _ras(shape, affine), _ras(label_shape, label_affine)
    if label_shape != image_shape:
        raise DataError(f"{label}: label shape {label_shape} differs from image shape {image_shape} ({image})")
    if not np.allclose(label_affine, image_affine, atol=AFFINE_TOLERANCE):
        raise DataError(
            f"{label}: label geometry (origin, spacing or direction) differs from the image's ({image}); "
            "resample the label onto the image"
        )
    if num_classes is not None:
        values = _label_values(label)
        bad = values[(values < 0) | (values >= num_classes) | (values != np.round(values))]
        if bad.size:
            raise DataError(
                f"{label}: label values {bad[:10].tolist()} outside the {num_classes} classes 0..{num_classes - 1}"
            )


def inference_inputs(inputs: str | os.PathLike | Sequence[str], in_channels: int = 1) -> list[dict]:
    """Cases to predict from a file, a DICOM series folder, a folder of both, a datalist json or a list of paths.

    Raises:
        DataError: nothing to predict, or an input that cannot be read or has the wrong channel count.
    """
    paths = _input_paths(Path(inputs)) if isinstance(inputs, (str, os.PathLike)) else [str(p) for p in inputs]
    if not paths:
        raise DataError(f"{inputs}: no images or DICOM series to predict")
    cases = [{"image": p} for p in paths]
    for case in cases:
        check_case(case, in_channels=in_channels)
    return cases


def _input_paths(path: Path) -> list[str]:
    if path.suffix == ".json":
        lists = read_datalist_file(path)
        return [e["image"] for e in lists.get("test") or lists.get("validation") or []]
    if not path.is_dir() or _is_dicom_series(path):
        return [str(path)]
    datalist = next((path / n for n in DATALIST_NAMES if (path / n).is_file()), None)
    if datalist is not None:  # a data set folder: predict its test cases
        return [e["image"] for e in read_datalist_file(datalist).get("test", [])]
    for _, _, test_dir in FOLDER_LAYOUTS:
        if (path / test_dir).is_dir():
            return list_images(path / test_dir)
    return [p for p in list_images(path) if not Path(p).is_dir() or _is_dicom_series(Path(p))]


def _is_dicom_series(folder: Path) -> bool:
    """A folder whose files are not images of the suffixes above (DICOM files often have no suffix at all)."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return (
        bool(files)
        and not any(p.name.endswith(IMAGE_SUFFIXES) for p in files)
        and not any(p.is_dir() for p in folder.iterdir())
    )


def find_images(source: str | os.PathLike) -> list[str]:
    """Every image in ``source`` for unlabelled use: a datalist's images (all parts), a data set's image folders
    (never its label folders), a DICOM series folder, an image file, or any folder searched recursively."""
    path = Path(source)
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
        found += find_images(item) if Path(item).is_dir() else [item]
    return found


def load_unlabeled(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    split: str = "training",
    val_fraction: float = 0.05,
    seed: int = 0,
    in_channels: int = 1,
    check: bool = True,
) -> list[dict]:
    """One split of the unlabelled images of one or many ``sources`` (see :func:`find_images`), seeded and checked."""
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    images = sorted({image for source in sources for image in find_images(source)})
    cases = split_cases([{"image": image} for image in images], val_fraction, seed).get(split, [])
    if not cases:
        raise DataError(f"{', '.join(map(str, sources))}: no images for the '{split}' split ({len(images)} found)")
    if check:
        for case in cases:
            check_case(case, in_channels=in_channels)
    logger.info("%d '%s' images from %d sources", len(cases), split, len(sources))
    return cases


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
    """``monai.transforms.Spacingd`` that leaves non-dictionary ``<key>_*`` entries alone.

    After resampling a NIfTI image, MONAI 1.6.1's ``Spacingd`` calls ``d[k].update(meta)`` on every ``<key>_*`` entry,
    taking each for a metadata dictionary; MONAI Label puts the study's path into the data as the string
    ``image_path`` (and reads it back when writing the result), so every NIfTI study failed with ``AttributeError``.
    Such entries are set aside during the call and put back unchanged.
    """

    def __call__(self, data: Mapping, lazy: bool | None = None) -> dict:
        prefixes = tuple(f"{key}_" for key in self.keys)
        aside = {k: v for k, v in data.items() if str(k).startswith(prefixes) and not isinstance(v, Mapping)}
        d = super().__call__({k: v for k, v in data.items() if k not in aside}, lazy=lazy)
        d.update(aside)
        return d


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
