"""Per-organ HD95: millimetres from the affine, absent organs left out, missed organs scored, not infinite."""

from __future__ import annotations

import math

import torch
from monai.data import MetaTensor

from swin_unetr_kit.metrics import OrganHausdorffDistance95


def _one_hot(label: torch.Tensor, classes: int, spacing: float) -> MetaTensor:
    onehot = torch.nn.functional.one_hot(label.long(), classes).permute(3, 0, 1, 2)[None].float()
    return MetaTensor(onehot, affine=torch.diag(torch.tensor([spacing, spacing, spacing, 1.0])))


def test_hd95_per_organ():
    label = torch.zeros(20, 20, 20)
    label[5:10, 5:10, 5:10] = 1  # organ 1 present, organ 2 absent, organ 3 present
    label[12:16, 12:16, 12:16] = 3
    pred = torch.zeros(20, 20, 20)
    pred[7:12, 5:10, 5:10] = 1  # organ 1 shifted by 2 voxels; organ 3 missed entirely
    pred[1:3, 1:3, 1:3] = 2  # organ 2 predicted where the ground truth has none: not scored
    hd = OrganHausdorffDistance95()(_one_hot(pred, 4, 2.0), _one_hot(label, 4, 2.0))
    assert hd.shape == (1, 3)
    assert math.isclose(hd[0, 0].item(), 4.0, abs_tol=1e-4)  # 2 voxels x 2 mm
    assert math.isnan(hd[0, 1].item())
    assert math.isclose(hd[0, 2].item(), math.sqrt(3 * 40.0**2), rel_tol=1e-5)  # the volume's diagonal in mm
