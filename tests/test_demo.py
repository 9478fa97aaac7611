"""The README's demo command, shortened to one epoch: every step through MONAI's bundle runner, and a full report."""

from __future__ import annotations

import json
import sys

import nibabel as nib
import numpy as np
import preloaded_python
import pytest
from conftest import REPO

# the README's main job on the real sample CT, a minute and a half: no cheaper run shows it works end to end
pytestmark = pytest.mark.slow


def test_demo_writes_a_complete_report(sample_dataset, tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, str(REPO / "tools" / "demo.py"), "--out", str(out), "--epochs", "1"]
    result = preloaded_python.run(cmd, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("$ python -m monai.bundle run") == 4  # train, 2 evaluations, inference
    # progress on the terminal while each run logs to its file, then the report: the picture, then the table
    assert "  training: epoch 1/1, iteration 1/1, loss " in result.stdout
    assert "  evaluation (training CT): " in result.stdout and "  inference (DICOM series): " in result.stdout
    assert result.stdout.index("picture: ") < result.stdout.index("| organ | Dice")
    report = out / "report"
    text = (report / "report.md").read_text()
    assert text.index("![") < text.index("| organ |")
    assert "fits the one CT it trained on" in text and "not a" in text and "validation" in text
    dice = json.loads((report / "dice.json").read_text())
    assert dice["seen"]["esophagus"] is None  # absent from the reference: left out, not scored 0
    assert all(v is None or 0.0 <= v <= 1.0 for case in dice.values() for v in case.values())
    for name in ("overlay_seen.png", "overlay_unseen.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the other patient's DICOM series, labelled in its own geometry
    from monai.transforms import LoadImage

    series = LoadImage(image_only=True)(str(sample_dataset / "imagesTs" / "ts_slab_dicom"))
    labels = nib.load(out / "predictions" / "ts_slab_dicom_seg.nii.gz")
    assert labels.shape == tuple(series.shape) == (512, 512, 20)
    np.testing.assert_allclose(labels.affine, series.affine.numpy(), atol=1e-3)
    assert (out / "eval_seen" / "predictions" / "ts_torso_seg.nii.gz").is_file()


def test_demo_trials_record_the_fit_of_the_training_ct(sample_dataset, tmp_path):
    out = tmp_path / "trials"
    cmd = [sys.executable, str(REPO / "tools" / "demo_trials.py"), "--trials", "demo", "--iterations", "1"]
    result = preloaded_python.run([*cmd, "--every", "1", "--out", str(out)], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = [json.loads(line) for line in (out / "demo.jsonl").read_text().splitlines()]
    assert row["iteration"] == 1 and len(row["dice"]) == 12  # the 12 organs of the training CT (no esophagus)
    assert 0.0 <= row["mean_dice"] <= 1.0 and row["organs_at_0.7"] <= 12


def test_progress_line_shows_the_bundles_time_left(capsys):
    """The demo's status line takes the time left from the bundle's own estimate (TimeLeft), not from its clock."""
    import demo

    progress = demo.Progress("training", every=0.0)
    progress.tty = False
    progress.update(
        "2026-12-06 - ignite.engine.engine.SupervisedTrainer - INFO - Epoch: 1/4, Iter: 1/1 -- train_loss: 1.2"
    )
    progress.update(
        "2026-12-06 - swin_unetr_kit.visual - INFO - run: epoch 1/4 (25.0 %), 00:00:09 elapsed, about 00:00:27 left"
    )
    progress.update(
        "2026-12-06 - ignite.engine.engine.SupervisedTrainer - INFO - Epoch: 2/4, Iter: 1/1 -- train_loss: 0.9"
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("  training: epoch 1/4, iteration 1/1, loss 1.2000, left ~? (elapsed")
    assert lines[1].startswith("  training: epoch 2/4, iteration 1/1, loss 0.9000, left ~00:00:27 (elapsed")
