"""Write the MSD bundle's metadata (``configs/metadata.json``) for any of the ten tasks.

The bundle's metadata describes its default task (Task09_Spleen); tools that read metadata rather than configs, such as
MONAI Label (label names from ``channel_def``) and the model zoo (input channels and patch shape), need the metadata
of the task a model was trained for. Training also writes it beside the model (``models/<task>/<run>/metadata.json``).

Usage:
    python tools/msd_metadata.py Task01_BrainTumour                 # print it
    python tools/msd_metadata.py Task01_BrainTumour --out m.json    # write it (e.g. into a packaged copy)
"""

from __future__ import annotations

import json
from pathlib import Path

import fire

from swin_unetr_kit.msd import task_metadata

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "swin_unetr_msd"


def main(task: str, out: str | None = None, bundle_root: str = str(BUNDLE)) -> None:
    text = json.dumps(task_metadata(task, Path(bundle_root) / "configs" / "tasks.json"), indent=4) + "\n"
    if out:
        Path(out).write_text(text)
        print(f"metadata for {task} written to {out}")
    else:
        print(text, end="")


if __name__ == "__main__":
    fire.Fire(main)
