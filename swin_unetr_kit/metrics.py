"""Per-organ metrics scored the way the Swin UNETR papers mean them.

The reference code scores an organ that is absent from a case's ground truth as 0 and counts the background in the
mean Dice; both distort the numbers. MONAI's ``DiceMetric(ignore_empty=True)`` already leaves absent organs out (NaN,
skipped by MetricsSaver's nan-aware means). :class:`OrganHausdorffDistance95` does the same for HD95, measures in
millimetres from each case's own voxel spacing, and scores an organ that is present but not predicted at all with the
diagonal of the volume (MONAI would give ``inf``, which turns every mean into ``inf``).
"""

from __future__ import annotations

import torch
from monai.metrics import HausdorffDistanceMetric


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
            hd = torch.where(torch.isinf(hd), torch.linalg.norm(extent).to(hd), hd)
            absent = y[b, first:].flatten(1).sum(-1) == 0
            rows.append(torch.where(absent.to(hd.device), torch.full_like(hd, float("nan")), hd))
        return torch.stack(rows)
