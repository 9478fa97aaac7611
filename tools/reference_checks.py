"""Measurements behind rows of the bundles' "Differences from the reference code" tables (docs/reference_checks.md).

    python tools/reference_checks.py brain_crops
    python tools/reference_checks.py test_time_preprocessing IMAGE LABEL CKPT [--pixdim 6] [--feature_size 12]

``brain_crops``: the share of head voxels in BrainTumour's 128^3 training crops, drawn as the BRATS21 reference does
(foreground box grown to multiples of the window, zero-padded) and from the tight foreground box, on an ellipsoid head
of BraTS size (240 x 240 x 155 voxels, about 140 x 174 x 140 of head).

``test_time_preprocessing``: the BTCV bundle's ``inference.json`` on IMAGE as stored and re-stored in two other
orientations (data and affine permuted together: the same anatomy), with its preprocessing, without the foreground
crop, without ``Orientationd``, and without both (the reference BTCV ``test_transform``). Each label map is put back on
IMAGE's voxel grid and compared with the bundle's on IMAGE as stored (share of voxels with the same label) and with
LABEL (mean Dice over the organs present).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigWorkflow
from monai.transforms import CropForeground, RandSpatialCrop, SpatialPad

BTCV = Path(__file__).resolve().parents[1] / "bundles" / "swin_unetr_btcv_seg"
# inference.json's preprocessing: 1 Orientationd, 4 CropForegroundd
VARIANTS = {"bundle": [], "no_crop": [4], "no_orientation": [1], "reference": [1, 4]}


def brain_crops(draws: int = 300, seed: int = 0) -> dict[str, float]:
    """Mean share of head voxels in a random 128^3 crop, BRATS21's way and from the tight foreground box."""
    shape, centre, axes = (240, 240, 155), np.array([120, 120, 77]), np.array([70, 87, 70])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    head = torch.from_numpy(((((grid - centre) / axes) ** 2).sum(-1) < 1)[None].astype(np.float32))
    roi = [128, 128, 128]
    shares = {}
    for name, box in {"brats21": CropForeground(k_divisible=roi), "tight": CropForeground()}.items():
        volume = SpatialPad(roi)(box(head))
        crop = RandSpatialCrop(roi, random_size=False)
        crop.set_random_state(seed)
        shares[name] = float(np.mean([float(crop(volume).mean()) for _ in range(draws)]))
    print(json.dumps(shares))
    return shares


def _dice(pred: np.ndarray, label: np.ndarray) -> float:
    organs = [c for c in np.unique(label) if c > 0]
    return float(
        np.mean([2 * ((pred == c) & (label == c)).sum() / ((pred == c).sum() + (label == c).sum()) for c in organs])
    )


def test_time_preprocessing(image: str, label: str, ckpt: str, pixdim: float = 6.0, feature_size: int = 12) -> list:
    """Label agreement and Dice of each test-time preprocessing variant, for IMAGE stored three ways."""
    work = Path(tempfile.mkdtemp(prefix="reference_checks_"))
    original = nib.load(image)
    truth = np.asarray(nib.load(label).dataobj)
    stored = "".join(nib.aff2axcodes(original.affine))
    rows, base = [], None
    for codes in (stored, "LPS", "PIR"):
        to_codes = nib.orientations.ornt_transform(
            nib.io_orientation(original.affine), nib.orientations.axcodes2ornt(tuple(codes))
        )
        path = work / f"{codes}.nii.gz"
        nib.save(original.as_reoriented(to_codes), path)
        back = nib.orientations.ornt_transform(
            nib.orientations.axcodes2ornt(tuple(codes)), nib.io_orientation(original.affine)
        )
        for name, dropped in VARIANTS.items():
            out = work / f"{codes}_{name}"
            workflow = ConfigWorkflow(
                config_file=str(BTCV / "configs" / "inference.json"),
                workflow_type="infer",
                bundle_root=str(BTCV),
                ckpt_path=ckpt,
                input=str(path),
                output_dir=str(out),
                cpu_runtime="torch",
                progress=False,
                **{"network_def#feature_size": feature_size, "roi_size": [64, 64, 64], "pixdim": [pixdim] * 3},
                **{f"preprocessing#transforms#{i}#_disabled_": True for i in dropped},
            )
            workflow.initialize()
            workflow.run()
            workflow.finalize()
            (seg,) = out.glob("*.nii.gz")
            pred = nib.orientations.apply_orientation(np.asarray(nib.load(seg).dataobj), back)
            base = pred if base is None else base
            rows.append(
                {
                    "stored": codes,
                    "variant": name,
                    "same_label": float((pred == base).mean()),
                    "dice": _dice(pred, truth),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    fire.Fire({"brain_crops": brain_crops, "test_time_preprocessing": test_time_preprocessing})
