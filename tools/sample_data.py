"""Real abdominal CT with BTCV organ labels, for the demo and the tests, from a package registry only.

The source distribution of ``totalsegmentator==2.18.0`` on PyPI (Apache-2.0) ships, under ``tests/reference_files/``,
a torso CT (``example_ct.nii.gz``, 122x101x112 voxels at 3 mm) with TotalSegmentator's own organ map for it, and a
20-slice CT DICOM series of another patient with its organ map. This tool fetches that file through pip (cached,
checked against its sha256, never committed), and writes a small data set in the decathlon layout with the labels
renumbered to BTCV's 13 organs (the esophagus is not in these organ maps' field of view and stays absent):

    <out>/imagesTr/ts_torso.nii.gz            <out>/labelsTr/ts_torso.nii.gz
    <out>/imagesTs/ts_slab_dicom/  (DICOM)    <out>/labelsTs/ts_slab_dicom.nii.gz
    <out>/dataset.json   training: torso, validation: the DICOM patient, test: the DICOM series

The organ maps are a model's predictions, not manual annotation: good for smoke checks, not for benchmarks.

Usage: python tools/sample_data.py [--out DIR] [--overwrite true]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
from monai.apps.utils import check_hash

from swin_unetr_kit.data import check_output_dir
from swin_unetr_kit.settings import flag

PACKAGE = "totalsegmentator"
VERSION = "2.18.0"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
REFERENCE = f"{PACKAGE}-{VERSION}/tests/reference_files/"

BTCV_LABELS = {
    0: "background",
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal vein and splenic vein",
    11: "pancreas",
    12: "right adrenal gland",
    13: "left adrenal gland",
}
# TotalSegmentator "total" class id -> BTCV id
TOTAL_TO_BTCV = {1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 64: 10, 7: 11, 8: 12, 9: 13}


def cache_dir() -> Path:
    """Where downloads and the prepared data set live: ``$SWIN_UNETR_CACHE`` or ``~/.cache/swin_unetr_bundles``."""
    return Path(os.environ.get("SWIN_UNETR_CACHE", Path.home() / ".cache" / "swin_unetr_bundles"))


def fetch_sdist(cache: Path | None = None) -> Path:
    """The verified source distribution, downloaded with ``pip download`` on first use."""
    cache = Path(cache or cache_dir())
    target = cache / f"{PACKAGE}-{VERSION}.tar.gz"
    if target.is_file() and check_hash(str(target), SDIST_SHA256, "sha256"):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*cmd, f"{PACKAGE}=={VERSION}", "-d", tmp], check=True)
        downloaded = Path(tmp) / target.name
        if not check_hash(str(downloaded), SDIST_SHA256, "sha256"):
            raise RuntimeError(f"{downloaded}: sha256 differs from the pinned {SDIST_SHA256}; refusing to use it")
        os.replace(downloaded, target)
    return target


def remap_labels(src: Path, dst: Path) -> dict[int, int]:
    """Write ``src`` (TotalSegmentator ids) as a BTCV label map at ``dst``; return voxels per BTCV organ."""
    img = nib.load(src)
    lut = np.zeros(256, dtype=np.uint8)
    for total_id, btcv_id in TOTAL_TO_BTCV.items():
        lut[total_id] = btcv_id
    labels = lut[np.asanyarray(img.dataobj).astype(np.uint8)]
    out = nib.Nifti1Image(labels, img.affine, img.header)
    out.set_data_dtype(np.uint8)
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, dst)
    return {i: int((labels == i).sum()) for i in range(1, 14)}


def prepare(out: str | None = None, overwrite: bool | str = False) -> str:
    """Build the sample data set (idempotent) and return its folder; a non-empty ``out`` that an earlier call did
    not make is refused unless ``--overwrite true``."""
    out_dir = Path(out) if out else cache_dir() / "btcv_sample"
    marker = out_dir / ".complete"
    if marker.is_file() and marker.read_text() == VERSION:
        return str(out_dir)
    check_output_dir(out_dir, out is None or flag(overwrite, "overwrite"), marker=marker.name)  # the cache is ours
    sdist = fetch_sdist()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".partial_", dir=out_dir.parent))
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(REFERENCE) and m.isfile()]
            tar.extractall(tmp_dir / "src", members=members, filter="data")
        ref = tmp_dir / "src" / REFERENCE
        stage = tmp_dir / "dataset"
        (stage / "imagesTr").mkdir(parents=True)
        shutil.copy(ref / "example_ct.nii.gz", stage / "imagesTr" / "ts_torso.nii.gz")
        remap_labels(ref / "example_seg_fast_force_split.nii.gz", stage / "labelsTr" / "ts_torso.nii.gz")
        shutil.copytree(ref / "example_ct_dicom", stage / "imagesTs" / "ts_slab_dicom")
        remap_labels(ref / "example_seg_dicom.nii.gz", stage / "labelsTs" / "ts_slab_dicom.nii.gz")
        datalist = {
            "description": f"Real CT from {PACKAGE}=={VERSION} (PyPI sdist, Apache-2.0), labels renumbered to BTCV",
            "labels": {str(k): v for k, v in BTCV_LABELS.items()},
            "training": [{"image": "imagesTr/ts_torso.nii.gz", "label": "labelsTr/ts_torso.nii.gz"}],
            "validation": [{"image": "imagesTs/ts_slab_dicom", "label": "labelsTs/ts_slab_dicom.nii.gz"}],
            "test": [{"image": "imagesTs/ts_slab_dicom"}],
        }
        (stage / "dataset.json").write_text(json.dumps(datalist, indent=2) + "\n")
        (stage / "SOURCE.txt").write_text(__doc__ or "")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(stage, out_dir)
        marker.write_text(VERSION)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return str(out_dir)


if __name__ == "__main__":
    fire.Fire(prepare)
