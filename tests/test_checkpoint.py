"""Checkpoints are replaced atomically, and the fixed-name interval checkpoint always holds the newest state."""

from __future__ import annotations

import os

import pytest
import torch
from ignite.engine import Engine, Events

from swin_unetr_kit import checkpoint as ckpt


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    ckpt.atomic_torch_save({"w": torch.ones(3)}, str(target))

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_torch_save({"w": torch.zeros(3)}, str(target))
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["model.pt"]  # no temporary file left behind
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o644)


def test_interval_checkpoint_keeps_one_fixed_file(tmp_path):
    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: net.weight.data.add_(1.0))
    saver = ckpt.AtomicCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"net": net}, save_interval=1, n_saved=1, interval_filename="latest.pt"
    )
    saver.attach(engine)
    epochs_seen = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs_seen.append(e.state.epoch))
    engine.run([0, 1], max_epochs=3)
    assert os.listdir(tmp_path) == ["latest.pt"]
    saved = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert torch.equal(saved["weight"], net.weight.data)  # the newest state, after all 6 iterations


def test_resume_loader_without_a_file_starts_afresh(tmp_path, caplog):
    engine = Engine(lambda e, b: None)
    loader = ckpt.ResumeCheckpointLoader(load_path=str(tmp_path / "latest.pt"), load_dict={"trainer": engine})
    loader.attach(engine)
    engine.run([0], max_epochs=1)
    assert engine.state.epoch == 1
