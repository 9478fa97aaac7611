"""The demo: fine-tune a small Swin UNETR on real CT, predict a DICOM series, and write a report, on a CPU in minutes.

Every step is the BTCV bundle's own config run by MONAI's bundle runner with command-line overrides, exactly as a user
would type it (the commands are printed). The data is the real sample CT of ``tools/sample_data.py``: one torso CT to
train on, and a 20-slice DICOM series of another patient to predict. The organ labels of both are TotalSegmentator
predictions, and a few minutes of CPU training on one volume is a smoke check that the pipeline works end to end on
real data, not a validation of the model: the report says so.

Usage: python tools/demo.py [--out demo_output] [--epochs 120]
"""

from __future__ import annotations

import json
import os
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

from swin_unetr_kit.runtime import tcmalloc_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "swin_unetr_btcv_seg" / "configs"
# the small configuration: feature_size 12, 64^3 windows at 4 mm (covering most of an abdomen), one crop a step
SMALL = {
    "network_def#feature_size": 12,
    "roi_size": [64, 64, 64],
    "pixdim": [4.0, 4.0, 4.0],
    "num_samples": 1,
    "num_workers": 0,
    "sw_overlap": 0.25,
}
# for a run of minutes instead of days: a larger learning rate without warm-up, and MONAI's default Dice smoothing
# (the paper's smooth_nr 0 with squared predictions learns the small organs later); measured here, 120 epochs took
# the training CT's liver Dice to 0.70 where the paper's loss at lr 1e-3 reached 0.55 after 80 epochs
SHORT_RUN = {
    "learning_rate": 0.003,
    "warmup_epochs": 0,
    "loss#squared_pred": False,
    "loss#smooth_nr": 1e-05,
    "loss#smooth_dr": 1e-05,
}


def bundle_run(configs: list[str], **overrides) -> float:
    """Run ``python -m monai.bundle run`` with ``overrides``; print the command and return its wall time."""
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
    shown = " ".join(f"'{c}'" if any(ch in c for ch in "[] ,") else c for c in cmd[1:])
    print(f"\n$ python {shown}", flush=True)
    start = time.perf_counter()
    log = Path(overrides["bundle_root"]) / "logs" / f"{'_'.join(configs)}_{int(start)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **tcmalloc_env()})
    if result.returncode:
        sys.exit(f"the bundle run failed (exit {result.returncode}); its log: {log}\n" + log.read_text()[-4000:])
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


def main(out: str = "demo_output", epochs: int = 120) -> None:
    """Run the demo into ``out`` (replaced) and print where the report is."""
    started = time.perf_counter()
    out_dir = Path(out).resolve()
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    data = Path(sample_data.prepare())
    print(f"sample CT ready in {data}")
    common = {**SMALL, "bundle_root": str(out_dir), "dataset_dir": str(data)}
    timings = {
        "train": bundle_run(
            ["train"],
            **common,
            **SHORT_RUN,
            **{"train#trainer#max_epochs": epochs, "val_interval": epochs},
        )
    }
    for split, name in (("training", "eval_seen"), ("validation", "eval_unseen")):
        timings[f"evaluate {split}"] = bundle_run(
            ["train", "evaluate"], **common, eval_split=split, output_dir=str(out_dir / name)
        )
    dicom = data / "imagesTs" / "ts_slab_dicom"
    timings["inference (DICOM in)"] = bundle_run(
        ["inference"],
        **{k: v for k, v in common.items() if k != "num_samples"},
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

    lines = [
        "# Swin UNETR BTCV demo report",
        "",
        f"Small configuration (feature_size 12, 64^3 windows at 4 mm) trained for {epochs} epochs on one real CT,",
        "on this machine's CPU. **The Dice below is a smoke check on two real volumes, not a validation**: the",
        "reference labels are TotalSegmentator predictions, one volume was used for training, and minutes of CPU",
        "training are far from the paper's schedule (BTCV validation Dice 0.82 needs feature_size 48 and a GPU).",
        "",
        "| organ | Dice, training CT (seen) | Dice, other patient (unseen) |",
        "|---|---|---|",
    ]
    for organ in dice["seen"]:
        cells = [f"{dice[k][organ]:.3f}" if dice[k].get(organ) is not None else "absent" for k in ("seen", "unseen")]
        lines.append(f"| {organ} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "Organs marked absent are not in that volume's reference and are left out of its mean. The unseen patient's",
        "series is a 40 mm contrast-enhanced slab, unlike the one non-contrast torso the network was trained on.",
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
    print("\n".join(lines[6:]))
    print(f"\nreport: {report / 'report.md'}")


if __name__ == "__main__":
    fire.Fire(main)
