"""The demo: fine-tune a small Swin UNETR on real CT, predict a DICOM series, and write a report, on a CPU in minutes.

Every step is the BTCV bundle's own config run by MONAI's bundle runner with command-line overrides, exactly as a user
would type it (the commands are printed). The data is the real sample CT of ``tools/sample_data.py``: one torso CT to
train on, and a 20-slice DICOM series of another patient to predict. The organ labels of both are TotalSegmentator
predictions, and a few minutes of CPU training on one volume is a smoke check that the pipeline works end to end on
real data, not a validation of the model: the report says so.

Usage: python tools/demo.py [--out demo_output] [--epochs 200] [--overwrite true]
"""

from __future__ import annotations

import json
import os
import re
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
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation  # noqa: E402

from swin_unetr_kit.data import replace_output_dir  # noqa: E402
from swin_unetr_kit.runtime import tcmalloc_env  # noqa: E402
from swin_unetr_kit.settings import flag  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "swin_unetr_btcv_seg" / "configs"
# the small configuration: feature_size 12, 64^3 windows at PIXDIM_MM, one crop a step. At 6 mm the padded torso
# fits one 64^3 window, so every step sees every organ, at the cost per step of any 64^3 window
PIXDIM_MM = 6.0
SMALL = {
    "network_def#feature_size": 12,
    "roi_size": [64, 64, 64],
    "pixdim": [PIXDIM_MM] * 3,
    "num_samples": 1,
    "num_workers": 0,
    "sw_overlap": 0.25,
}
# the background's weight in the loss (the 13 organs weigh 1): the torso is non-contrast CT, where the organs share
# one soft-tissue range of HU and differ by place and shape; at full weight the background (96 % of the voxels)
# saturates the softmax and the organs come one at a time, liver first (docs/demo.md)
BACKGROUND_WEIGHT = 0.03


def background_weight(weight: float) -> dict:
    """The override that weighs the background ``weight`` and each organ 1 in the bundle's Dice-CE."""
    return {"loss#weight": f"$torch.tensor([{weight}] + [1.0] * (@num_classes - 1))"}


DEMO_DESCRIPTION = f"feature_size 12, 64^3 windows at {PIXDIM_MM:g} mm, background weighted {BACKGROUND_WEIGHT:g}"
# for a run of minutes instead of days: a larger learning rate without warm-up; the background's share of the
# bundle's Dice-CE cut; crops centred on each organ in turn (MONAI's RandCropByLabelClassesd, equal ratios over the
# 13 organs) instead of half on the foreground and half anywhere, and no flips or rotations (they swap left and right
# organs, which one short run cannot untangle). The trials behind these choices are in docs/demo.md ("The demo's
# settings").
SHORT_RUN = {
    "learning_rate": 0.003,
    "warmup_epochs": 0,
    **background_weight(BACKGROUND_WEIGHT),
    "train#random_transforms": [
        {"_target_": "SpatialPadd", "keys": ["image", "label"], "spatial_size": "@roi_size"},
        {
            "_target_": "RandCropByLabelClassesd",
            "keys": ["image", "label"],
            "label_key": "label",
            "spatial_size": "@roi_size",
            "num_classes": "@num_classes",
            "ratios": "$[0] + [1] * (@num_classes - 1)",
            "num_samples": "@num_samples",
            "image_key": "image",
            "image_threshold": 0,
            "warn": False,
        },
    ],
}
EPOCHS = 200
# evaluation and inference: at PIXDIM_MM each volume is one window, so exporting the network to the CPU default
# runtime (OpenVINO, about 10 s at this size) would cost more than it saves; PyTorch runs it
ONE_WINDOW = {"cpu_runtime": "torch"}


# a StatsHandler iteration line ("Epoch: 3/120, Iter: 1/1 -- train_loss: 0.7345"), the time left of the whole run
# that the bundles' TimeLeft handler logs after every epoch, and a progress bar's counts and times ("9/20 [00:03<00:04")
STATS_LINE = re.compile(r"Epoch: (\d+)/(\d+), Iter: (\d+)/(\d+) -- \w*loss\w*: ([\d.eE+-]+)")
TIME_LEFT_LINE = re.compile(r"run: epoch \d+/\d+ .* about (.+) left")
BAR_LINE = re.compile(r"(\d+)/(\d+) \[(\d[\d:]*)<(\d[\d:]*)")


class Progress:
    """One status line on the terminal for a bundle run whose output goes to a log: the epoch and iteration with the
    training loss and the time left (the bundle's estimate, logged after every epoch), or the counts and time left of
    the run's progress bar (sliding windows of evaluation and inference). Rewritten in place on a terminal; elsewhere
    (a pipe, a CI log) printed as a new line every ``every`` seconds."""

    def __init__(self, stage: str, every: float = 20.0) -> None:
        self.stage, self.every = stage, every
        self.tty = sys.stdout.isatty()
        self.started = time.perf_counter()
        self.left, self.trained = "?", False
        self.shown, self.last = "", 0.0

    def _clock(self, seconds: float) -> str:
        return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"

    def update(self, segment: str) -> None:
        elapsed = time.perf_counter() - self.started
        if match := TIME_LEFT_LINE.search(segment):
            self.left = match.group(1)
            return
        if match := STATS_LINE.search(segment):
            epoch, epochs, iteration, iterations, loss = match.groups()
            first, self.trained = not self.trained, True
            text = (
                f"epoch {epoch}/{epochs}, iteration {iteration}/{iterations}, loss {float(loss):.4f}, left ~{self.left}"
            )
        elif match := BAR_LINE.search(segment):
            count, total, _, remaining = match.groups()
            text, first = f"sliding window {count}/{total} of a volume, left {remaining}", False
        else:
            return
        # the first training line always shows, so a log with one line per interval never hides the training's loss
        self.show(f"  {self.stage}: {text} (elapsed {self._clock(elapsed)})", force=first)

    def show(self, text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            print("\r" + text[:width].ljust(min(width, len(self.shown))), end="", flush=True)
        elif force or now - self.last >= self.every:
            print(text, flush=True)
            self.last = now
        self.shown = text

    def close(self) -> None:
        if self.tty and self.shown:
            print(flush=True)


def bundle_run(stage: str, configs: list[str], **overrides) -> float:
    """Run ``python -m monai.bundle run`` with ``overrides``; print the command, then a progress line while it runs
    (its whole output goes to a log file); return its wall time."""
    files = [str(CONFIGS / f"{name}.json") for name in configs]
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        json.dumps(files) if len(files) > 1 else files[0],
    ]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    shown = " ".join(f"'{c}'" if any(ch in c for ch in '[] ,{}"') else c for c in cmd[1:])
    print(f"\n$ python {shown}", flush=True)
    start = time.perf_counter()
    log = Path(overrides["bundle_root"]) / "logs" / f"{'_'.join(configs)}_{int(start)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    progress = Progress(stage)
    env = {**os.environ, **tcmalloc_env(), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as run:
        pending = b""
        while chunk := run.stdout.read1(65536):
            f.write(chunk)
            f.flush()
            *segments, pending = re.split(rb"[\r\n]", pending + chunk)
            for segment in segments:
                progress.update(segment.decode(errors="replace"))
        returncode = run.wait()
    progress.close()
    if returncode:
        sys.exit(f"the bundle run failed (exit {returncode}); its log: {log}\n" + log.read_text()[-4000:])
    seconds = time.perf_counter() - start
    print(f"  done in {seconds:.0f} s (log: {log})", flush=True)
    return seconds


def _ras(path: str | Path) -> np.ndarray:
    return Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation("RAS")])(str(path))


def _radiological(plane: np.ndarray) -> np.ndarray:
    """A RAS-ordered slice as radiologists view it: anterior (or superior) up, the patient's right on the left."""
    return np.fliplr(np.rot90(plane))


def overlay_png(image: str | Path, reference: str | Path, prediction: str | Path, out: Path, title: str) -> None:
    """Axial and coronal slices through the labelled organs: CT with the reference and the predicted labels."""
    ct, ref, pred = (_ras(p) for p in (image, reference, prediction))
    spacing = [float(s) for s in ct.pixdim]
    ct, ref, pred = (np.asarray(a[0]) for a in (ct, ref, pred))
    z = int(np.argmax((ref > 0).sum((0, 1))))
    y = int(np.argmax((ref > 0).sum((0, 2))))
    cmap = plt.get_cmap("tab20", 14)
    fig, axes = plt.subplots(2, 2, figsize=(10, 9))
    for row, (cut, aspect, name) in enumerate(
        [
            (lambda a: a[:, :, z], spacing[1] / spacing[0], f"axial slice {z}"),
            (lambda a: a[:, y, :], spacing[2] / spacing[0], f"coronal slice {y}"),
        ]
    ):
        for col, (labels, label_name) in enumerate([(ref, "reference"), (pred, "prediction")]):
            ax = axes[row, col]
            ax.imshow(_radiological(cut(ct)), cmap="gray", vmin=-175, vmax=250, aspect=aspect)
            masked = np.ma.masked_equal(_radiological(cut(labels)), 0)
            ax.imshow(masked, cmap=cmap, vmin=0, vmax=13, alpha=0.5, interpolation="nearest", aspect=aspect)
            ax.set_title(f"{label_name}, {name}")
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _dice_rows(metrics_json: Path) -> dict[str, float | None]:
    summary = json.loads(metrics_json.read_text())["summary"]["dice"]
    return {organ: row["mean"] for organ, row in summary.items()}


def main(out: str = "demo_output", epochs: int = EPOCHS, overwrite: bool | str = False) -> None:
    """Run the demo into ``out`` (replaced when a previous demo made it; another non-empty folder only with
    ``--overwrite true``) and print where the report is."""
    started = time.perf_counter()
    out_dir = replace_output_dir(out, flag(overwrite, "overwrite"))
    data = Path(sample_data.prepare())
    print(f"sample CT ready in {data}")
    common = {**SMALL, "bundle_root": str(out_dir), "dataset_dir": str(data)}
    timings = {
        "train": bundle_run(
            "training",
            ["train"],
            **common,
            **SHORT_RUN,
            **{"train#trainer#max_epochs": epochs, "val_interval": epochs},
        )
    }
    for split, name in (("training", "eval_seen"), ("validation", "eval_unseen")):
        timings[f"evaluate {split}"] = bundle_run(
            f"evaluation ({split} CT)",
            ["train", "evaluate"],
            **common,
            **ONE_WINDOW,
            **{"validate#inferer#progress": True},
            eval_split=split,
            output_dir=str(out_dir / name),
        )
    dicom = data / "imagesTs" / "ts_slab_dicom"
    timings["inference (DICOM in)"] = bundle_run(
        "inference (DICOM series)",
        ["inference"],
        **{k: v for k, v in common.items() if k != "num_samples"},
        **ONE_WINDOW,
        input=str(dicom),
        output_dir=str(out_dir / "predictions"),
    )

    report = out_dir / "report"
    report.mkdir()
    cases = [
        (
            "seen",
            "the training CT (seen in training)",
            data / "imagesTr" / "ts_torso.nii.gz",
            data / "labelsTr" / "ts_torso.nii.gz",
            out_dir / "eval_seen" / "predictions" / "ts_torso_seg.nii.gz",
        ),
        (
            "unseen",
            "another patient's DICOM series (not seen in training)",
            dicom,
            data / "labelsTs" / "ts_slab_dicom.nii.gz",
            out_dir / "predictions" / "ts_slab_dicom_seg.nii.gz",
        ),
    ]
    dice = {key: _dice_rows(out_dir / f"eval_{key}" / "metrics.json") for key, *_ in cases}
    for key, title, image, reference, prediction in cases:
        overlay_png(image, reference, prediction, report / f"overlay_{key}.png", f"Swin UNETR demo: {title}")
    total = time.perf_counter() - started

    table = [
        "| organ | Dice, training CT (seen) | Dice, other patient (unseen) |",
        "|---|---|---|",
    ]
    for organ in dice["seen"]:
        cells = [f"{dice[k][organ]:.3f}" if dice[k].get(organ) is not None else "absent" for k in ("seen", "unseen")]
        table.append(f"| {organ} | {cells[0]} | {cells[1]} |")
    lines = [
        "# Swin UNETR BTCV demo report",
        "",
        "![the training CT: reference and prediction](overlay_seen.png)",
        "",
        "![another patient: reference and prediction](overlay_unseen.png)",
        "",
        *table,
        "",
        f"Small configuration ({DEMO_DESCRIPTION}) trained for {epochs} iterations on one real CT, on this",
        "machine's CPU. **The seen column measures how well the network fits the one CT it trained on; it is not a",
        "validation**: the reference labels are TotalSegmentator predictions, and minutes of CPU training on one",
        "volume are far from the paper's schedule (BTCV validation Dice 0.82 needs feature_size 48, 24 CTs and a GPU).",
        "The unseen column is another patient's 40 mm contrast-enhanced slab, unlike the non-contrast torso trained",
        "on: what one CT teaches about a new patient, which is little.",
        "",
        "Organs marked absent are not in that volume's reference and are left out of its mean.",
        "",
        "Predicted label maps (NIfTI, in each input's own geometry):",
        f"- {cases[0][4]}",
        f"- {cases[1][4]} (from the DICOM series)",
        "",
        "Overlays: overlay_seen.png, overlay_unseen.png (left: reference, right: prediction).",
        "",
        "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; whole demo {total:.0f} s.",
    ]
    (report / "report.md").write_text("\n".join(lines) + "\n")
    (report / "dice.json").write_text(json.dumps(dice, indent=2) + "\n")
    print(f"\npicture: {report / 'overlay_seen.png'} (and overlay_unseen.png)\n")
    print("\n".join(table + [""] + lines[len(table) + 7 :]))
    print(f"\nreport: {report / 'report.md'}")


if __name__ == "__main__":
    fire.Fire(main)
