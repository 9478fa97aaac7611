"""Write a decathlon-style datalist (``training``/``validation``/``test``) for a CT data set, with a seeded split.

Reads the layouts the bundles read (``imagesTr``/``labelsTr``/``imagesTs``, BTCV's ``RawData/Training/img`` with
``RawData/Training/label``, or an existing datalist without a validation part), checks every file, and writes paths
relative to the data set folder, so the file can travel with the data. The other keys of a datalist it reads
(``name``, ``labels``, ``modality``, ``licence``, ...) are kept; an existing output file is replaced only with
``--overwrite true``.

Usage:
    python tools/datalist.py /data/BTCV --out /data/BTCV/dataset_0.json --val_fraction 0.2 --seed 0
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import fire

from swin_unetr_kit.data import DATALIST_NAMES, DataError, build_datalist, check_cases
from swin_unetr_kit.settings import flag


def _relative(entry: dict, root: Path) -> dict:
    return {k: os.path.relpath(v, root) if k in ("image", "label") else v for k, v in entry.items()}


def make_datalist(
    dataset_dir: str,
    out: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    in_channels: int = 1,
    num_classes: int | None = 14,
    check: bool | str = True,
    overwrite: bool | str = False,
) -> str:
    """Write the datalist (default ``<dataset_dir>/dataset_0.json``) and return its path.

    Raises:
        DataError: the output file exists and ``overwrite`` is not set, or (with ``check``) unusable cases.
    """
    root = Path(dataset_dir).resolve()
    out_path = Path(out) if out else root / "dataset_0.json"
    if out_path.exists() and not flag(overwrite, "overwrite"):
        raise DataError(f"{out_path}: exists; pass --overwrite true to replace it (its other keys are kept)")
    lists = build_datalist(root, val_fraction=val_fraction, seed=seed)
    if flag(check, "check"):
        labelled = lists.get("training", []) + lists.get("validation", [])
        check_cases(labelled, in_channels=in_channels, num_classes=num_classes)
    source = next((root / name for name in DATALIST_NAMES if (root / name).is_file()), None)
    kept = json.loads(source.read_text()) if source else {}
    content = {
        **{k: v for k, v in kept.items() if k not in lists},
        "description": kept.get(
            "description", f"datalist of {root.name}: seeded split (seed {seed}, validation fraction {val_fraction})"
        ),
        **{part: [_relative(e, root) for e in entries] for part, entries in lists.items()},
    }
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=out_path.parent)
    with os.fdopen(fd, "w") as f:  # written beside it, then renamed: never half a datalist
        f.write(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, out_path)
    print(f"{out_path}: " + ", ".join(f"{part} {len(entries)}" for part, entries in lists.items()))
    return str(out_path)


if __name__ == "__main__":
    fire.Fire(make_datalist)
