"""Post-processing memory on large volumes (issue 26, item 14): the prediction is a uint8 label map before it goes back
to the input's grid, and that inverse runs slab by slab, never building a sampling grid of the whole original volume
(MONAI's single call needs ~40 bytes a voxel: 10 GB for a 512 x 512 x 1000 CT). Measurements: docs/memory.md."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, SaveImaged, Spacingd
from monai.utils import TraceKeys

from swin_unetr_kit.data import PathSafeSpacingd

BUNDLES = REPO / "bundles"


def _postprocessing(bundle: str, config: str) -> list[dict]:
    parser = ConfigParser()
    files = [BUNDLES / bundle / "configs" / "train.json"] if config == "evaluate" else []
    parser.read_config([str(f) for f in [*files, BUNDLES / bundle / "configs" / f"{config}.json"]])
    return parser["postprocessing"]["transforms"]


@pytest.mark.parametrize(
    ("bundle", "config"),
    [(b, c) for b in ("swin_unetr_btcv_seg", "swin_unetr_msd") for c in ("inference", "evaluate")],
)
def test_labels_are_uint8_before_they_are_inverted_with_nearest(bundle, config):
    """The argmax (softmax) or threshold (sigmoid) comes first, as uint8, then ``Invertd`` with ``nearest``: the
    full-resolution map is one byte a voxel, never 14 float channels (the reference test script's order, too)."""
    targets = [t.get("_target_") for t in _postprocessing(bundle, config)]
    transforms = _postprocessing(bundle, config)
    discrete, invert = targets.index("AsDiscreted"), targets.index("Invertd")
    assert discrete < invert
    assert transforms[discrete]["dtype"] == "$torch.uint8"
    assert transforms[invert]["nearest_interp"] is True
    parser = ConfigParser()
    parser.read_config(
        str(BUNDLES / bundle / "configs" / ("inference.json" if config == "inference" else "train.json"))
    )
    steps = parser["preprocessing"]["transforms"] if config == "inference" else parser["deterministic_transforms"]
    assert "swin_unetr_kit.data.PathSafeSpacingd" in [s.get("_target_") for s in steps if isinstance(s, dict)]


def _ct(path: Path, shape: tuple[int, int, int]) -> None:
    """A CT at 0.7 x 0.7 x 0.8 mm, stored flipped (LPS-like) so that Orientation has work to undo."""
    rng = np.random.default_rng(0)
    image = rng.normal(40, 30, shape).astype(np.int16)
    image[:4] = -1000  # air, cropped away by CropForeground and padded back by its inverse
    affine = np.array([[-0.7, 0, 0, 30.0], [0, -0.7, 0, 20.0], [0, 0, 0.8, -5.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(image, affine), path)


def test_the_label_map_comes_back_slab_by_slab_in_uint8_as_monai_inverts_it(tmp_path, monkeypatch):
    """The BTCV inference config's own preprocessing and post-processing (but the writer) on a small CT with a
    14-channel prediction: the label map in the input's geometry is uint8 and equal, voxel for voxel, to what MONAI's
    stock ``Spacingd`` inverse gives; no sampling grid is larger than the network's (MONAI's one call builds the whole
    original grid)."""
    shape = (120, 100, 90)
    _ct(tmp_path / "ct.nii.gz", shape)
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "swin_unetr_btcv_seg" / "configs" / "inference.json"))
    parser["ckpt_path"] = str(tmp_path / "none.pt")  # no record: the bundle's default spacing, 1.5 x 1.5 x 2 mm
    ours = parser.get_parsed_content("preprocessing")
    stock = Compose(
        [
            Spacingd(t.keys, pixdim=t.spacing_transform.pixdim, mode="bilinear")
            if isinstance(t, PathSafeSpacingd)
            else t
            for t in ours.transforms
        ]
    )
    steps = [t for t in parser.get_parsed_content("postprocessing").transforms if not isinstance(t, SaveImaged)]
    grids: list[int] = []
    affine_grid = torch.nn.functional.affine_grid

    def recording(theta, size, align_corners=None):
        grids.append(int(np.prod(size[2:])))
        return affine_grid(theta, size, align_corners=align_corners)

    monkeypatch.setattr(torch.nn.functional, "affine_grid", recording)
    results = {}
    for name, preprocessing in (("ours", ours), ("stock", stock)):
        data = preprocessing({"image": str(tmp_path / "ct.nii.gz")})
        crop = next(op for op in data["image"].applied_operations if op[TraceKeys.CLASS_NAME] == "CropForeground")
        network_grid = int(np.prod(crop[TraceKeys.ORIG_SIZE]))  # the resampled grid, before the foreground crop
        torch.manual_seed(0)
        data["pred"] = MetaTensor(
            torch.randn(14, *data["image"].shape[1:]) * 4,
            meta=data["image"].meta,
            applied_operations=list(data["image"].applied_operations),
        )
        post = [
            Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=True, to_tensor=True)
            if isinstance(t, Invertd)
            else t
            for t in steps
        ]
        grids.clear()
        results[name] = (Compose(post)(data)["pred"], max(grids))
    (label_map, largest), (monai_map, monai_largest) = results["ours"], results["stock"]
    assert label_map.dtype == torch.uint8 and tuple(label_map.shape) == (1, *shape)
    assert largest <= network_grid < np.prod(shape) <= monai_largest
    assert torch.equal(label_map.as_tensor(), monai_map.as_tensor().to(torch.uint8))
    original = nib.load(tmp_path / "ct.nii.gz").affine
    assert np.allclose(label_map.affine, original) and np.allclose(label_map.affine, monai_map.affine)
    assert len(torch.unique(label_map)) > 5  # a label map of many classes, not all background


def test_the_measurement_is_recorded():
    text = (REPO / "docs" / "memory.md").read_text()
    assert "512 x 512 x 1000" in text and "/usr/bin/time -v" in text
