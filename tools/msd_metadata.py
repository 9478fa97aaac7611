"""Write the MSD bundle's metadata (``configs/metadata.json``) for any of the ten tasks.

The bundle's metadata describes its default task (Task09_Spleen); tools that read metadata rather than configs, such as
MONAI Label (label names from ``channel_def``) and the model zoo (input channels and patch shape), need the metadata
of the task a model was trained for. This writes it from the task table, keeping every task-independent field.

Usage:
    python tools/msd_metadata.py Task01_BrainTumour                 # print it
    python tools/msd_metadata.py Task01_BrainTumour --out m.json    # write it (e.g. into a packaged copy)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import fire

from swin_unetr_kit.msd import channel_def, task_settings

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "swin_unetr_msd"


def task_metadata(task: str, bundle_dir: str | Path = BUNDLE) -> dict:
    """The bundle's metadata with its task-dependent fields set for ``task``."""
    configs = Path(bundle_dir) / "configs"
    settings = task_settings(task, configs / "tasks.json")
    meta = copy.deepcopy(json.loads((configs / "metadata.json").read_text()))
    ct = settings["modality"] == "CT"
    labels = ", ".join(f"{k} {v}" for k, v in settings["labels"].items())
    outputs = channel_def(settings)
    if ct:
        low, high = settings["intensity"]["window"]
        image_classes = f"single-channel CT in Hounsfield units, clipped to {low}..{high} and scaled to [0, 1]"
    else:
        image_classes = (
            f"{settings['in_channels']}-channel MRI ({', '.join(settings['channels'])}), each channel z-scored on its "
            "non-zero voxels"
        )
    meta.update(
        name=f"Swin UNETR MSD {task}",
        task=f"Medical Segmentation Decathlon {task}: {', '.join(settings['class_names'])} from {settings['modality']}",
        image_classes=image_classes,
        label_classes=labels,
        pred_classes=(
            f"{settings['out_channels']} sigmoid channels, one per nested region "
            + ", ".join(f"{n} = labels {v}" for n, v in settings["regions"].items())
            if settings["sigmoid"]
            else f"{settings['out_channels']} softmax channels, one per class of label_classes"
        ),
    )
    image = meta["network_data_format"]["inputs"]["image"]
    image.update(
        format="hounsfield" if ct else "magnitude",
        modality=settings["modality"],
        num_channels=settings["in_channels"],
        spatial_shape=settings["roi_size"],
        value_range=[0, 1] if ct else [],
        channel_def={str(i): name for i, name in enumerate(settings["channels"])},
    )
    pred = meta["network_data_format"]["outputs"]["pred"]
    pred.update(num_channels=settings["out_channels"], spatial_shape=settings["roi_size"], channel_def=outputs)
    return meta


def main(task: str, out: str | None = None) -> None:
    text = json.dumps(task_metadata(task), indent=4) + "\n"
    if out:
        Path(out).write_text(text)
        print(f"metadata for {task} written to {out}")
    else:
        print(text, end="")


if __name__ == "__main__":
    fire.Fire(main)
