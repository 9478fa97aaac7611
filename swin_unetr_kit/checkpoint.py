"""Checkpoints that survive a crash and a training that picks up where it stopped.

MONAI's ``CheckpointSaver`` writes in place (ignite ``DiskSaver(atomic=False)``), so a process killed while saving
leaves a truncated ``model.pt`` behind. :class:`AtomicCheckpointSaver` writes each file beside its target and renames it
over the target, which is atomic on POSIX file systems, and can keep the interval checkpoint under one fixed name
(``latest.pt``). :class:`ResumeCheckpointLoader` loads that file when it exists and does nothing otherwise, so one
training config serves both the first run and every resumed one.

A run is the folder its checkpoints live in. :class:`AtomicCheckpointSaver` writes the settings that define the run
(data, split, seed, network) to ``run_settings.json`` beside the interval checkpoint each time it saves it, so the
record always describes the checkpoint there (a run stopped before its first save leaves the previous run's record and
checkpoint together), and :class:`ResumeCheckpointLoader` resumes only a run whose settings equal the new command's; it
also removes the partial files (``.tmp_*.pt``) a process killed while saving left in that folder.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

from swin_unetr_kit.record import RecordError, check_record, is_released_encoder, read_record

logger = logging.getLogger(__name__)

TMP_PREFIX, TMP_SUFFIX = ".tmp_", ".pt"  # the partial files atomic_torch_save writes before renaming them
RUN_SETTINGS_FILE = "run_settings.json"


class RunSettingsError(RuntimeError):
    """A checkpoint to resume whose run was started with other settings than the new command's."""


def remove_partial_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Delete the partial checkpoint files (``.tmp_*.pt``, this module's own naming) directly inside ``folder``, left
    by a process killed while saving; log and return them. Nothing else is touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = sorted(p for p in folder.glob(f"{TMP_PREFIX}*{TMP_SUFFIX}") if p.is_file())
    for path in removed:
        path.unlink(missing_ok=True)
        logger.warning("removed %s, a partial checkpoint left by an interrupted save", path)
    return removed


def _comparable(settings: Mapping) -> dict:
    """``settings`` as they read back from JSON (tuples as lists, paths and dtypes as strings)."""
    return json.loads(json.dumps(dict(settings), default=str))


def write_run_settings(folder: str | os.PathLike, settings: Mapping) -> Path:
    """Record ``settings`` in ``folder/run_settings.json`` (atomically: written beside it, then renamed)."""
    path = Path(folder) / RUN_SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{RUN_SETTINGS_FILE}")
    tmp.write_text(json.dumps(_comparable(settings), indent=4) + "\n")
    os.replace(tmp, path)
    return path


def read_run_settings(folder: str | os.PathLike) -> dict | None:
    """The settings recorded in ``folder/run_settings.json``, or None where there is no readable record."""
    path = Path(folder) / RUN_SETTINGS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def changed_settings(saved: Mapping, current: Mapping) -> dict[str, tuple]:
    """``{name: (saved value, current value)}`` for every setting that differs between two records; a setting the
    saved record lacks (one written before the setting was recorded) is not compared."""
    saved, current = _comparable(saved), _comparable(current)
    names = sorted(set(saved))
    return {k: (saved.get(k), current.get(k)) for k in names if saved.get(k) != current.get(k)}


def atomic_torch_save(obj: object, path: str) -> None:
    """``torch.save`` to a temporary file in the target's folder, then rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=folder)
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
    """ignite save handler: atomic writes, optionally always to the same ``filename``, followed by the
    ``run_settings`` that describe the checkpoint (:func:`write_run_settings`) where given."""

    def __init__(
        self,
        dirname: str,
        filename: str | None = None,
        copy_to: str | None = None,
        run_settings: Mapping | None = None,
    ) -> None:
        self.dirname = dirname
        self.filename = filename
        self.copy_to = copy_to
        self.run_settings = run_settings

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        atomic_torch_save(checkpoint, os.path.join(self.dirname, self.filename or filename))
        if self.copy_to:
            atomic_torch_save(checkpoint, self.copy_to)
        if self.run_settings is not None:
            write_run_settings(self.dirname, self.run_settings)

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
        key_metric_copy: a second path the best model is written to at the same time, such as the ``models/model.pt``
            that MONAI Label serves when the bundle keeps its own per-task folders; None for none.
        run_settings: the settings that define the run, written to ``run_settings.json`` after every interval
            checkpoint (what :class:`ResumeCheckpointLoader` compares before resuming it); None for none.
        other args: as ``CheckpointSaver``.

    Under ``torch.distributed`` only rank 0 attaches, so only rank 0 writes.

    Its ``state_dict``/``load_state_dict`` carry the best key-metric score seen so far, so a resumed training does not
    replace the best model with a worse one (put this saver in the resumable checkpoint's ``save_dict``).
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        interval_filename: str | None = None,
        key_metric_copy: str | None = None,
        run_settings: Mapping | None = None,
        **kwargs,
    ) -> None:
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        fixed_names = {
            "_final_checkpoint": self._final_filename,
            "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
            "_interval_checkpoint": interval_filename,
        }
        for attr, filename in fixed_names.items():
            checkpoint = getattr(self, attr)
            if checkpoint is not None:
                copy_to = key_metric_copy if attr == "_key_metric_checkpoint" else None
                settings = run_settings if attr == "_interval_checkpoint" else None
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, filename, copy_to, settings)

    def attach(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
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
        network = next(iter(self.load_dict.values()))
        if record is not None:
            check_record(network, record, self.load_path)
        elif is_released_encoder(self.load_path):
            raise RecordError(
                f"{self.load_path}: holds the released self-supervised encoder alone, not the whole "
                f"{type(getattr(network, 'module', network)).__name__}; give it as --pretrained_ckpt to a training, "
                "or point --ckpt_path at a checkpoint a training wrote"
            )
        super().__call__(engine)


class ResumeCheckpointLoader(RecordedCheckpointLoader):
    """Load a resumable checkpoint (network, optimizer, scheduler, trainer state) when ``load_path`` exists, and only
    when it belongs to the same run.

    Args:
        load_path: the interval checkpoint; its folder is the run's folder.
        load_dict: the objects to restore.
        enabled: False starts afresh whatever is in the folder.
        settings: what defines the run (data, split, seeds, network): compared with the ``run_settings.json`` that
            :class:`AtomicCheckpointSaver` wrote with the checkpoint before resuming it.
        resume_despite_changes: resume although the recorded settings differ from ``settings`` (logged).
        kwargs: as ``CheckpointLoader``.

    At every start it removes partial checkpoint files left in the folder by a killed save. With ``enabled`` false, or
    when there is no file yet, training starts afresh; either way the log says which.

    Raises:
        RunSettingsError: (at ``attach``) the checkpoint's run was started with other settings.
    """

    def __init__(
        self,
        load_path: str,
        load_dict: dict,
        enabled: bool = True,
        settings: Mapping | None = None,
        resume_despite_changes: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(load_path=load_path, load_dict=load_dict, **kwargs)
        self.enabled = enabled
        self.settings = settings
        self.resume_despite_changes = resume_despite_changes

    def attach(self, engine: Engine) -> None:
        folder = os.path.dirname(os.path.abspath(self.load_path))
        if idist.get_rank() == 0:
            remove_partial_checkpoints(folder)
        if not self.enabled:
            logger.info("resume disabled: training starts afresh in %s", folder)
        elif not os.path.isfile(self.load_path):
            logger.info("no checkpoint at %s: training starts afresh", self.load_path)
        else:
            self._check_same_run(folder)
            super().attach(engine)
            engine.add_event_handler(Events.STARTED, self._report)

    def _check_same_run(self, folder: str) -> None:
        saved = read_run_settings(folder)
        if self.settings is None or saved is None:
            return
        changes = changed_settings(saved, self.settings)
        if not changes:
            return
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        if self.resume_despite_changes:
            logger.warning("resuming %s although its settings changed (%s)", self.load_path, listed)
            return
        raise RunSettingsError(
            f"{self.load_path}: this run was started with other settings ({listed}); pass --resume false to start "
            "afresh in this folder (its checkpoints are replaced), --resume_despite_changes true to continue it, or "
            "change the output folder (--bundle_root)"
        )

    def _report(self, engine: Engine) -> None:
        logger.info(
            "resumed from %s at epoch %d, iteration %d (max_epochs %d); pass --resume false to start afresh",
            self.load_path,
            engine.state.epoch,
            engine.state.iteration,
            engine.state.max_epochs,
        )
