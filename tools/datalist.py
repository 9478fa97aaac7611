"""Write a decathlon-style datalist (``training``/``validation``/``test``) for a CT data set, with a seeded split.

Reads the layouts the bundles read (``imagesTr``/``labelsTr``/``imagesTs``, BTCV's ``RawData/Training/img`` with
``RawData/Training/label``, or an existing datalist without a validation part), checks every file, and writes paths
relative to the data set folder, so the file can travel with the data.

Usage:
    python tools/datalist.py /data/BTCV --out /data/BTCV/dataset_0.json --val_fraction 0.2 --seed 0
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import fire

from swin_unetr_kit.data import build_datalist, check_cases


def _relative(entry: dict, root: Path) -> dict:
    return {k: os.path.relpath(v, root) if k in ("image", "label") else v for k, v in entry.items()}


def make_datalist(
    dataset_dir: str,
    out: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    in_channels: int = 1,
    num_classes: int | None = 14,
    check: bool = True,
) -> str:
    """Write the datalist (default ``<dataset_dir>/dataset_0.json``) and return its path."""
    root = Path(dataset_dir).resolve()
    lists = build_datalist(root, val_fraction=val_fraction, seed=seed)
    if check:
        labelled = lists.get("training", []) + lists.get("validation", [])
        check_cases(labelled, in_channels=in_channels, num_classes=num_classes)
    content = {
        "description": f"datalist of {root.name}: seeded split (seed {seed}, validation fraction {val_fraction})",
        **{part: [_relative(e, root) for e in entries] for part, entries in lists.items()},
    }
    out_path = Path(out) if out else root / "dataset_0.json"
    out_path.write_text(json.dumps(content, indent=2) + "\n")
    print(f"{out_path}: " + ", ".join(f"{part} {len(entries)}" for part, entries in lists.items()))
    return str(out_path)


if __name__ == "__main__":
    fire.Fire(make_datalist)
