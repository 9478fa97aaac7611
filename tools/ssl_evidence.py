"""Evidence that the self-supervised pre-training learns: a short CPU run on the real sample CT, its curves and numbers.

Runs ``bundles/swin_unetr_ssl_pretrain`` through MONAI's bundle runner (overrides only) on the sample data of
``tools/sample_data.py`` (training crops from the torso CT, validation on the other patient's DICOM series), then reads
the TensorBoard scalars the bundle wrote and saves ``learning_curve.png`` and ``learning_evidence.json``.

Usage: python tools/ssl_evidence.py [--steps 200] [--val_interval 40] [--out ssl_evidence] [--docs] [--overwrite true]
(--docs also copies the figure and the numbers into bundles/swin_unetr_ssl_pretrain/docs/)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fire
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import sample_data  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from swin_unetr_kit.data import replace_output_dir  # noqa: E402
from swin_unetr_kit.settings import flag  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "swin_unetr_ssl_pretrain"
SMALL = {"feature_size": 12, "roi_size": [64, 64, 64], "batch_size": 1, "num_samples": 2, "num_workers": 0}
# a run of minutes: a larger learning rate than the paper's 4e-4 (and a warm-up of a tenth of the run), and 8 crops
# of the validation image (16 views) per validation so that its rotation accuracy is not a 4-view coin toss
SHORT_RUN = {"learning_rate": 0.001, "val_num_samples": 8}


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the TensorBoard event files of ``log_dir``: tag -> [(step, value), ...]."""
    series: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(log_dir.glob("events.out.tfevents*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(values) for tag, values in series.items()}


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def main(
    steps: int = 200,
    val_interval: int = 40,
    out: str = "ssl_evidence",
    docs: bool = False,
    overwrite: bool | str = False,
) -> None:
    """Pre-train for ``steps`` iterations, validating every ``val_interval``; write the figure and the numbers into
    ``out`` (replaced when a previous run made it; another non-empty folder only with ``--overwrite true``)."""
    out_dir = replace_output_dir(out, flag(overwrite, "overwrite"))
    data = sample_data.prepare()
    overrides = {
        **SMALL,
        **SHORT_RUN,
        "num_steps": steps,
        "warmup_steps": steps // 10,  # the bundle's 500 steps, as the reference's, would outlast a short run
        "val_interval": val_interval,
        "bundle_root": str(out_dir),
        "dataset_dir": data,
    }
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "train.json")]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    print("$ python " + " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    with open(out_dir / "train.log", "w") as log:
        subprocess.run(
            cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MALLOC_MMAP_MAX_": "0"}
        )
    seconds = time.perf_counter() - start

    scalars = read_scalars(out_dir / "eval")
    # the trainer logs its loss terms under their own names, the validator under val_*
    train = {tag: np.array([v for _, v in s]) for tag, s in scalars.items() if not tag.startswith("val_")}
    val = {tag: s for tag, s in scalars.items() if tag.startswith("val_")}
    window = max(1, steps // 10)
    first, last = slice(0, window), slice(-window, None)
    evidence = {
        "command": "python tools/ssl_evidence.py " + f"--steps {steps} --val_interval {val_interval}",
        "configuration": {k: v for k, v in overrides.items() if k not in ("bundle_root", "dataset_dir")},
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / steps, 2),
        f"train_mean_of_first_{window}_steps": {k: round(float(v[first].mean()), 4) for k, v in train.items()},
        f"train_mean_of_last_{window}_steps": {k: round(float(v[last].mean()), 4) for k, v in train.items()},
        "validation": {tag: [(int(step), round(value, 4)) for step, value in s] for tag, s in val.items()},
        "chance_rotation_accuracy": 0.25,
    }
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, name in zip(axes, ("rotation_accuracy", "rotation", "contrastive", "reconstruction"), strict=True):
        if name in train:
            ax.plot(train[name], color="0.8", label="train, per step")
            ax.plot(
                np.arange(len(_smooth(train[name], window))) + window - 1,
                _smooth(train[name], window),
                label=f"train, mean of {window} steps",
            )
        val_tag = "val_rotation_accuracy" if name == "rotation_accuracy" else f"val_{name}_loss"
        if val_tag in val:
            epochs, values = zip(*val[val_tag], strict=True)
            ax.plot([e * val_interval for e in epochs], values, "o-", label="validation (other patient)")
        if name == "rotation_accuracy":
            ax.axhline(0.25, linestyle="--", color="k", label="chance")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(f"Swin UNETR SSL pre-training on one real CT, CPU, feature_size 12, 64^3 crops ({steps} steps)")
    fig.tight_layout()
    fig.savefig(out_dir / "learning_curve.png", dpi=80)
    (out_dir / "learning_evidence.json").write_text(json.dumps(evidence, indent=2) + "\n")
    if docs:
        for name in ("learning_curve.png", "learning_evidence.json"):
            shutil.copy(out_dir / name, BUNDLE / "docs" / name)
    print(json.dumps(evidence, indent=2))


if __name__ == "__main__":
    fire.Fire(main)
