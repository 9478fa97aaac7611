"""Reading the bundles' settings as the user meant them.

``python -m monai.bundle run --resume false`` hands the config the *string* ``'false'`` (fire turns only Python's
``False`` into a bool), and a non-empty string is true. The configs therefore read every boolean setting through
:func:`flag`, which accepts the spellings people type and refuses anything else by name; the network's own switches,
set inside the component (``--network_def#use_checkpoint false``), through :func:`network_flags`.
"""

from __future__ import annotations

import ast
import difflib
import glob
import logging
import os
import sys
from collections.abc import Sequence

import torch
from monai.bundle import ConfigParser

logger = logging.getLogger(__name__)

# the arguments of ``python -m monai.bundle run`` that are not config settings
BUNDLE_RUN_ARGUMENTS = ("config_file", "meta_file", "logging_file", "run_id", "init_id", "final_id", "workflow_type")
BUNDLE_RUN_ARGUMENTS += ("properties_path", "args_file", "tracking")
# SwinUNETR's switches that its modules keep as attributes and read only when they run
NETWORK_FLAGS = ("use_checkpoint", "use_flash_attention")

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def flag(value: object, name: str) -> bool:
    """``value`` of the boolean setting ``name`` as a bool: ``True``/``False``, ``1``/``0`` and the words
    true/false, yes/no, on/off, 1/0 in any case (as the command line and override files give them).

    Raises:
        ValueError: any other value, naming the setting and what it accepts.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ValueError(
        f"--{name} {value!r}: not a boolean; use one of {'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)} (any case)"
    )


def optional_flag(value: object, name: str) -> bool | None:
    """:func:`flag` for a setting whose unset value, ``None`` (``null``/``none`` on the command line), means "decide
    from elsewhere", such as ``legacy_patch_merging`` following the weights' record."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none")):
        return None
    return flag(value, name)


def network_flags(network: torch.nn.Module, component: str = "network_def") -> torch.nn.Module:
    """``network`` with the switches of :data:`NETWORK_FLAGS` that reached its modules as strings (``'false'`` is a
    true string) read through :func:`flag`, so that ``--network_def#use_checkpoint false`` turns checkpointing off."""
    for module in network.modules():
        for name in NETWORK_FLAGS:
            value = getattr(module, name, None)
            if isinstance(value, str):
                setattr(module, name, flag(value, f"{component}#{name}"))
    return network


def unknown_settings(argv: Sequence[str] | None = None, allow: bool = False) -> list[str]:
    """Check each ``--name`` of a ``python -m monai.bundle run`` command line (``argv``, default ``sys.argv``) whose
    top-level part is no setting of its config files: MONAI adds such an override as a new, unused entry, so
    ``--learning_rat 1e-3`` or ``--num_epochs 5`` would change nothing without a word.

    A name that no config of the bundle knows (the ``*.json`` beside the first config file) is a typo: refused, with
    the closest known setting, unless ``allow`` (``--allow_unknown_settings true``). A setting of another of the
    bundle's configs (``--num_samples`` given to inference, as one command line may serve training and inference) is
    warned about only. Returns the warnings.

    Raises:
        ValueError: unknown names and not ``allow``: one line naming them, the config files and the way on.
    """
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or not argv[0].endswith(os.path.join("monai", "bundle", "__main__.py")) or argv[1] != "run":
        return []
    names = [a[2:].split("=", 1)[0] for a in argv[2:] if a.startswith("--") and len(a) > 2]
    values = {a[2:].split("=", 1)[0]: a.split("=", 1)[1] for a in argv[2:] if a.startswith("--") and "=" in a}
    for index, arg in enumerate(argv[:-1]):
        if arg.startswith("--") and "=" not in arg:
            values.setdefault(arg[2:], argv[index + 1])
    files = values.get("config_file", "")
    files = ast.literal_eval(files) if files.strip().startswith("[") else [files]
    known = set(ConfigParser.load_config_files(files))
    siblings = sorted(set(glob.glob(os.path.join(os.path.dirname(files[0]), "*.json"))) - set(files))
    elsewhere = {
        key.split("#", 1)[0]
        for sibling in siblings
        if os.path.basename(sibling) != "metadata.json"
        for key in ConfigParser.load_config_file(sibling)
    }
    warnings, typos = [], []
    for name in names:
        top = name.split("#", 1)[0]
        if top in known or top in BUNDLE_RUN_ARGUMENTS:
            continue
        if top in elsewhere:
            warnings.append(f"--{name}: a setting of another of the bundle's configs, not of {', '.join(files)}")
            logger.warning(warnings[-1])
            continue
        close = difflib.get_close_matches(top, known, n=1, cutoff=0.7)
        typos.append(f"--{name}" + (f" (did you mean --{close[0]}?)" if close else ""))
    if typos and not allow:
        raise ValueError(
            f"{', '.join(typos)}: no such setting in {', '.join(files)}; correct the name, or pass "
            "--allow_unknown_settings true to run with it ignored"
        )
    for typo in typos:
        warnings.append(f"{typo}: no such setting in {', '.join(files)}; it changes nothing (--allow_unknown_settings)")
        logger.warning(warnings[-1])
    return warnings


WINDOW_MULTIPLE = 32  # SwinUNETR halves its input five times
SMALLEST_TRAINING_WINDOW = 64  # at 32 the deepest features are one voxel, which instance norm cannot train on


def window_edge(value: object, name: str = "roi_edge") -> int:
    """The edge of a cubic training crop, checked before any data is read: SwinUNETR takes only multiples of 32 (five
    halvings), and trains only from 64 (a 32^3 crop leaves one voxel at the bottleneck, where instance norm fails).

    Raises:
        ValueError: not a multiple of 32 of at least 64, naming the setting and the nearest sizes it takes.
    """
    try:
        edge = int(value)
        exact = edge == float(value)
    except (TypeError, ValueError):
        edge, exact = 0, False
    if not exact or edge < SMALLEST_TRAINING_WINDOW or edge % WINDOW_MULTIPLE:
        below = max(SMALLEST_TRAINING_WINDOW, edge // WINDOW_MULTIPLE * WINDOW_MULTIPLE)
        raise ValueError(
            f"{name} {value!r}: the window's edge must be a multiple of {WINDOW_MULTIPLE} (SwinUNETR halves it five "
            f"times) of at least {SMALLEST_TRAINING_WINDOW}, e.g. {below} or {below + WINDOW_MULTIPLE}"
        )
    return edge
