"""Per-organ metrics scored the way the Swin UNETR papers mean them.

The reference code scores an organ that is absent from a case's ground truth as 0 and counts the background in the
mean Dice; both distort the numbers. MONAI's ``DiceMetric(ignore_empty=True)`` already leaves absent organs out (NaN,
skipped by MetricsSaver's nan-aware means). :class:`OrganHausdorffDistance95` does the same for HD95, measures in
millimetres from each case's own voxel spacing, and scores an organ that is present but not predicted at all with the
diagonal of the volume (MONAI gives ``inf`` or ``nan``, which spoils or hides it in every mean).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.metrics import HausdorffDistanceMetric
from monai.transforms import LoadImage, MapTransform

logger = logging.getLogger(__name__)


def _spacing_mm(y: torch.Tensor, index: int) -> list[float] | None:
    affine = getattr(y, "affine", None)
    if affine is None:
        return None
    affine = affine[index] if affine.ndim == 3 else affine
    return torch.linalg.norm(affine[:3, :3].double(), dim=0).tolist()


class OrganHausdorffDistance95(HausdorffDistanceMetric):
    """95th-percentile Hausdorff distance (mm) per case and organ; NaN for organs absent from the ground truth.

    Args:
        include_background: score channel 0 too.
        other args: as ``HausdorffDistanceMetric`` (``percentile`` defaults to 95).
    """

    def __init__(self, include_background: bool = False, percentile: float = 95.0, **kwargs) -> None:
        super().__init__(include_background=include_background, percentile=percentile, **kwargs)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:  # type: ignore[override]
        first = 0 if self.include_background else 1
        rows = []
        for b in range(y.shape[0]):
            spacing = kwargs.get("spacing") or _spacing_mm(y, b)
            hd = super()._compute_tensor(y_pred[b : b + 1], y[b : b + 1], spacing=spacing)[0]
            extent = torch.tensor(y.shape[2:], dtype=torch.float64) * torch.tensor(spacing or [1.0] * (y.ndim - 2))
            absent = (y[b, first:].flatten(1).sum(-1) == 0).to(hd.device)
            missed = ~torch.isfinite(hd) & ~absent  # present but not predicted: MONAI gives inf or nan
            hd = torch.where(missed, torch.linalg.norm(extent).to(hd), hd)
            rows.append(torch.where(absent, torch.full_like(hd, float("nan")), hd))
        return torch.stack(rows)


class OriginalLabeld(MapTransform):
    """Load each key's label again from the file it came from (``meta["filename_or_obj"]``), as it is on disk, into
    ``<key>_original_geometry``: the grid that the reference test script scores on (it resamples the prediction back
    to the original label's shape), where the training grid's resampling has not changed small organs."""

    def __init__(self, keys: KeysCollection = "label", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadImage(image_only=True, ensure_channel_first=True)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = getattr(d[key], "meta", {}).get("filename_or_obj")
            if not path:
                raise ValueError(f"'{key}' has no source file in its metadata: cannot score on the original grid")
            d[f"{key}_original_geometry"] = self.loader(path)
        return d


def _read_csv(path: Path) -> list[list[str]]:
    """Rows of a MetricsSaver file: its first column (a case's file name) is written unquoted, so a comma in a file
    name is told apart from the separators by the header's column count."""
    lines = path.read_text().splitlines()
    columns = len(lines[0].split(",")) if lines else 0
    return [line.rsplit(",", columns - 1) for line in lines if line]


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _number(text: str) -> float | None:
    value = float(text)
    return None if math.isnan(value) else value


def write_organ_report(eval_dir: str, metric_names: Sequence[str], class_names: Sequence[str]) -> dict:
    """Name the classes in MetricsSaver's ``<metric>_raw.csv`` / ``<metric>_summary.csv`` (it writes class0, class1,
    ...) and gather both into ``metrics.json``: per case and organ, and the summary. Absent organs are ``null``.

    Returns the ``metrics.json`` content.
    """
    folder = Path(eval_dir)
    rename = {f"class{i}": name for i, name in enumerate(class_names)}
    report: dict = {"per_case": {}, "summary": {}}
    for metric in metric_names:
        raw_path, summary_path = folder / f"{metric}_raw.csv", folder / f"{metric}_summary.csv"
        raw = _read_csv(raw_path)
        raw[0] = [rename.get(c, c) for c in raw[0]]
        _write_csv(raw_path, raw)
        for row in raw[1:]:
            case = report["per_case"].setdefault(row[0], {})
            case[metric] = {name: _number(v) for name, v in zip(raw[0][1:], row[1:], strict=True)}
        summary = _read_csv(summary_path)
        for row in summary[1:]:
            row[0] = rename.get(row[0], row[0])
        _write_csv(summary_path, summary)
        report["summary"][metric] = {
            row[0]: {op: _number(v) for op, v in zip(summary[0][1:], row[1:], strict=True)} for row in summary[1:]
        }
    with open(folder / "metrics.json", "w") as f:
        json.dump(report, f, indent=2)
    for metric, per_class in report["summary"].items():
        logger.info(
            "%s per organ (mean over cases where the organ is present): %s",
            metric,
            ", ".join(
                f"{name} {row['mean']:.3f}" if row["mean"] is not None else f"{name} n/a"
                for name, row in per_class.items()
            ),
        )
    return report


class OrganMetrics:
    """Per-organ means of an evaluator's metrics, as ``<metric>/<organ>`` in ``engine.state.metrics``, where the
    stats, TensorBoard and MLflow handlers that follow it in the handler list log them; and, with ``report_dir``, the
    organ report of :func:`write_organ_report` when the evaluator completes (before MLflow keeps it as an artifact).

    The means are over the cases where the organ is present (the metric's details, ``save_details=True``); an organ
    absent from every case is left out.

    Args:
        metric_names: the evaluator's metrics to break down.
        class_names: the names of the scored channels, in order.
        report_dir: MetricsSaver's folder, whose CSVs get the organ names and ``metrics.json``; None: no report.
    """

    def __init__(self, metric_names: Sequence[str], class_names: Sequence[str], report_dir: str | None = None) -> None:
        self.metric_names = list(metric_names)
        self.class_names = list(class_names)
        self.report_dir = report_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.per_organ)
        if self.report_dir is not None:
            engine.add_event_handler(Events.COMPLETED, self.report)

    def per_organ(self, engine: Engine) -> None:
        details = getattr(engine.state, "metric_details", None) or {}
        for metric in self.metric_names:
            if metric not in details:
                continue
            values = torch.as_tensor(details[metric]).double()
            values = values.reshape(-1, values.shape[-1])  # [cases, channels]
            for index, mean in enumerate(values.nanmean(0).tolist()):
                if not math.isnan(mean):
                    name = self.class_names[index] if index < len(self.class_names) else f"class{index}"
                    engine.state.metrics[f"{metric}/{name}"] = mean

    def report(self, engine: Engine) -> None:
        write_organ_report(str(self.report_dir), self.metric_names, self.class_names)
