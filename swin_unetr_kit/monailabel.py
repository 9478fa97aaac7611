"""Training from MONAI Label's UI as its users expect it (monailabel 0.8's ``monaibundle`` app).

MONAI Label runs ``train.json`` with its own overrides and puts a ``CheckpointLoader`` of the served
``models/model.pt`` first in ``train#handlers``. Its users expect every ``/train`` to fine-tune that model for the
epochs they ask, with the options they pick: not to resume an earlier run (a finished run would train nothing, and a
changed option would stop with advice about command-line flags they cannot pass), and to start afresh, not to fail on
mismatched tensor shapes, when they pick another network size.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import torch
from monai.handlers import CheckpointLoader

from swin_unetr_kit.record import RECORD_KEY, _load, describe

logger = logging.getLogger(__name__)


def in_monai_label() -> bool:
    """Whether this process was started by MONAI Label (its server, or the training process it spawns): the
    bundles then fine-tune the served model at each ``/train`` instead of resuming ``latest.pt``."""
    return "monailabel" in sys.modules


def _unfitting(network: torch.nn.Module, path: str) -> str:
    """Why the weights at ``path`` cannot be loaded into ``network`` ("" when they can): the recorded network
    settings that differ, else the first tensor whose shape differs."""
    checkpoint = _load(path)
    record = checkpoint.get(RECORD_KEY) if isinstance(checkpoint, dict) else None
    built = describe(network)["network"]
    if isinstance(record, dict):
        differ = [
            f"{k} {v} (asked: {built[k]})" for k, v in record.get("network", {}).items() if k in built and built[k] != v
        ]
        if differ:
            return ", ".join(differ)
    weights = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else {}
    own = getattr(network, "module", network).state_dict()
    for key, tensor in weights.items():
        if isinstance(tensor, torch.Tensor) and key in own and own[key].shape != tensor.shape:
            return f"{key} {list(tensor.shape)} (asked: {list(own[key].shape)})"
    return ""


def fine_tune_handlers(handlers: Sequence, network: torch.nn.Module) -> list:
    """``handlers`` with every ``CheckpointLoader`` whose weights do not fit ``network`` left out, logged.

    MONAI Label loads the served model with ``strict_shape`` on, so a network size picked in its training options
    (``feature_size``) would stop at the first mismatched tensor; the run starts afresh at the size asked instead, and
    its validation writes the new ``models/model.pt`` (served at its size once the server restarts).
    """
    kept = []
    for handler in handlers:
        why = _unfitting(network, handler.load_path) if isinstance(handler, CheckpointLoader) else ""
        if why:
            logger.warning(
                "%s does not fit the network asked (%s): training starts afresh at the asked size; restart MONAI "
                "Label after training to serve the new model",
                handler.load_path,
                why,
            )
            continue
        kept.append(handler)
    return kept
