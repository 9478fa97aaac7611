"""Checkpoints that survive a crash and a training that picks up where it stopped.

MONAI's ``CheckpointSaver`` writes in place (ignite ``DiskSaver(atomic=False)``), so a process killed while saving
leaves a truncated ``model.pt`` behind. :class:`AtomicCheckpointSaver` writes each file beside its target and renames it
over the target, which is atomic on POSIX file systems, and can keep the interval checkpoint under one fixed name
(``latest.pt``). :class:`ResumeCheckpointLoader` loads that file when it exists and does nothing otherwise, so one
training config serves both the first run and every resumed one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

from swin_unetr_kit.record import check_record, read_record

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: object, path: str) -> None:
    """``torch.save`` to a temporary file in the target's folder, then rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; checkpoints are shared files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class AtomicDiskSaver:
    """ignite save handler: atomic writes, optionally always to the same ``filename``."""

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        self.dirname = dirname
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        atomic_torch_save(checkpoint, os.path.join(self.dirname, self.filename or filename))

    def remove(self, filename: str) -> None:
        if self.filename is not None:  # a fixed name was just overwritten by the newer checkpoint: keep it
            return
        path = os.path.join(self.dirname, filename)
        if os.path.exists(path):
            os.remove(path)


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` with atomic writes and a fixed name for the interval checkpoint.

    Args:
        interval_filename: name of the interval checkpoint (e.g. ``latest.pt``), replaced at every interval; if None,
            the interval checkpoints keep MONAI's numbered names.
        other args: as ``CheckpointSaver``.

    Under ``torch.distributed`` only rank 0 attaches, so only rank 0 writes.

    Its ``state_dict``/``load_state_dict`` carry the best key-metric score seen so far, so a resumed training does not
    replace the best model with a worse one (put this saver in the resumable checkpoint's ``save_dict``).
    """

    def __init__(self, save_dir: str, save_dict: dict, interval_filename: str | None = None, **kwargs) -> None:
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        fixed_names = {
            "_final_checkpoint": self._final_filename,
            "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
            "_interval_checkpoint": interval_filename,
        }
        for attr, filename in fixed_names.items():
            checkpoint = getattr(self, attr)
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, filename)

    def attach(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        super().attach(engine)

    def state_dict(self) -> dict:
        return self._key_metric_checkpoint.state_dict() if self._key_metric_checkpoint is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self._key_metric_checkpoint is not None and state_dict:
            self._key_metric_checkpoint.load_state_dict(state_dict)


class RecordedCheckpointLoader(CheckpointLoader):
    """``monai.handlers.CheckpointLoader`` that first compares the checkpoint's record (:mod:`swin_unetr_kit.record`)
    with the network it loads into (the first item of ``load_dict``): a checkpoint of a network with other settings
    stops with an error naming them and their values, instead of a list of mismatched tensor shapes."""

    def __call__(self, engine: Engine) -> None:
        record = read_record(self.load_path)
        if record is not None:
            check_record(next(iter(self.load_dict.values())), record, self.load_path)
        super().__call__(engine)


class ResumeCheckpointLoader(RecordedCheckpointLoader):
    """Load a resumable checkpoint (network, optimizer, scheduler, trainer state) when ``load_path`` exists.

    With ``enabled`` false, or when there is no file yet, training starts afresh; either way the log says which.
    """

    def __init__(self, load_path: str, load_dict: dict, enabled: bool = True, **kwargs) -> None:
        super().__init__(load_path=load_path, load_dict=load_dict, **kwargs)
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            logger.info("resume disabled: training starts afresh")
            return
        if not os.path.isfile(self.load_path):
            logger.info("no checkpoint at %s: training starts afresh", self.load_path)
            return
        super().attach(engine)
        engine.add_event_handler(Events.STARTED, self._report)

    def _report(self, engine: Engine) -> None:
        logger.info(
            "resumed from %s at epoch %d, iteration %d (max_epochs %d); pass --resume false to start afresh",
            self.load_path,
            engine.state.epoch,
            engine.state.iteration,
            engine.state.max_epochs,
        )
