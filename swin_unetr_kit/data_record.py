"""The data settings a model was trained at, saved beside its weights, so that it is served at them.

Weights hold no trace of the voxel spacing, window size or intensity window they were trained with, and a model served
at others segments badly without an error (a model trained at 6 mm served at 1.5 mm: liver Dice 0.23 instead of
0.83). Training saves :class:`DataRecord` in every checkpoint (``{"model": ..., "data_record": {...}}``); inference
reads it with :func:`read` and takes each setting from it with :func:`setting`, logging both values where the config's
differs, so MONAI Label, which cannot pass overrides, serves a model at the settings it was trained at; evaluation
does the same, and :func:`warn_given` names both values where a setting given on the command line overrides the
record.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from swin_unetr_kit.record import _load

logger = logging.getLogger(__name__)

DATA_RECORD_KEY = "data_record"


def label_names(metadata_file: str | os.PathLike) -> list[str] | None:
    """The output channel names of a bundle's ``metadata.json`` (``channel_def`` of its first output), in order; None
    where the bundle folder has no metadata (a run whose ``bundle_root`` is only an output folder)."""
    if not os.path.isfile(metadata_file):
        return None
    metadata = json.loads(Path(metadata_file).read_text())
    channels = next(iter(metadata["network_data_format"]["outputs"].values()))["channel_def"]
    return [channels[k] for k in sorted(channels, key=int)]


class DataRecord:
    """The data settings of a training run as an item of a checkpoint's ``save_dict``: ignite saves its
    ``state_dict()`` beside the weights."""

    def __init__(
        self, pixdim: Sequence[float], roi_size: Sequence[int], intensity: object, labels: Sequence[str] | None
    ) -> None:
        self.settings = {"pixdim": pixdim, "roi_size": roi_size, "intensity": intensity, "labels": labels}

    def state_dict(self) -> dict:
        return _lists(self.settings)  # plain lists, dicts and numbers: what torch.load(weights_only=True) reads

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Nothing to restore: a resumed run records its own settings."""


def read(path: str, labels: Sequence[str] | None = None) -> dict:
    """The data record of the checkpoint at ``path`` ({} when there is no file or it has no record); warns, naming
    both, when the recorded label names differ from ``labels`` (the bundle's metadata, which MONAI Label shows)."""
    if not os.path.isfile(path):
        return {}
    checkpoint = _load(path)
    record = checkpoint.get(DATA_RECORD_KEY) if isinstance(checkpoint, Mapping) else None
    if not isinstance(record, Mapping):
        return {}
    if labels is not None and record.get("labels") not in (None, list(labels)):  # unknown on either side: no check
        logger.warning(
            "%s was trained with the labels %s, but the bundle names its outputs %s: check the label names shown",
            path,
            record["labels"],
            list(labels),
        )
    return dict(record)


def _lists(value: object) -> object:
    """``value`` with tuples and arrays as lists (numbers keep their type: a window size stays integer)."""
    if isinstance(value, Mapping):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        return [_lists(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    return value


def _plain(value: object) -> object:
    """``value`` with tuples as lists and integers as floats, so that equal settings compare equal."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        return [_plain(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def setting(record: Mapping, name: str, configured: object, source: str) -> object:
    """``record[name]`` when the checkpoint recorded it (logged with the config's value where they differ), else the
    config's ``configured`` value: the model is served at the settings it was trained at."""
    if name not in record:
        return configured
    trained = record[name]
    if _plain(trained) != _plain(configured):
        logger.warning("%s: %s %s, as the model was trained (the config says %s)", source, name, trained, configured)
    return trained


def warn_given(record: Mapping, source: str, **used: object) -> None:
    """Warn, naming both values, for each setting ``used`` (``pixdim=...``) that differs from what the model at
    ``source`` was trained at: :func:`setting` makes the record the default, so a difference is an explicit override
    (``--pixdim``, ``--roi_size``), which is used, but never silently."""
    for name, value in used.items():
        if name in record and _plain(record[name]) != _plain(value):
            logger.warning(
                "%s: %s %s given, but the model was trained at %s (its data record); using the given value",
                source,
                name,
                _lists(value),
                record[name],
            )


def summary(feature_size: int, roi_size: Sequence[float], pixdim: Sequence[float], intensity: object) -> str:
    """One line saying what is served, for MONAI Label's ``/info`` (the bundle's description names its defaults)."""
    window = "x".join(str(int(v)) for v in roi_size)
    voxels = "x".join(f"{float(v):g}" for v in pixdim)
    return f"feature_size {feature_size}, {window} windows, {voxels} mm voxels, intensity {_plain(intensity)}"
