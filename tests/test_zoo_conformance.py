"""Model-zoo conformance of the three bundles, checked with MONAI's own calls where it has them."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO, SCHEMA
from monai.bundle import verify_metadata

BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if p.is_dir())
# the sections of the model zoo's bundle README template
README_SECTIONS = (
    "Model Overview",
    "Data",
    "Training configuration",
    "Performance",
    "MONAI Bundle Commands",
    "License",
)


def test_the_three_bundles():
    assert [b.name for b in BUNDLES] == ["swin_unetr_btcv_seg", "swin_unetr_msd", "swin_unetr_ssl_pretrain"]


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_required_files_metadata_and_readme(bundle):
    for name in (
        "LICENSE",
        "configs/metadata.json",
        "configs/train.json",
        "configs/multi_gpu_train.json",
        "configs/logging.conf",
        "docs/README.md",
        "docs/data_license.txt",
    ):
        assert (bundle / name).is_file(), name
    if bundle.name != "swin_unetr_ssl_pretrain":  # pre-training has no inference: its output is an encoder
        assert (bundle / "configs" / "inference.json").is_file() and (bundle / "configs" / "evaluate.json").is_file()
    if not SCHEMA.is_file():
        pytest.skip(f"schema copy not found at {SCHEMA}")
    # MONAI's check; given the schema's local copy, it downloads nothing
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    headings = re.findall(r"^#+ (.+)$", (bundle / "docs" / "README.md").read_text(), flags=re.MULTILINE)
    for section in README_SECTIONS:
        assert any(h.startswith(section) for h in headings), f"{bundle.name} README lacks '{section}'"
    large = [p for p in bundle.rglob("*") if p.is_file() and p.stat().st_size > 25 * 2**20]
    assert not large, f"files over 25 MB belong in large_files.yml, not the bundle: {large}"
