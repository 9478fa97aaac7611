"""Reading the bundles' settings as the user meant them.

``python -m monai.bundle run --resume false`` hands the config the *string* ``'false'`` (fire turns only Python's
``False`` into a bool), and a non-empty string is true. The configs therefore read every boolean setting through
:func:`flag`, which accepts the spellings people type and refuses anything else by name.
"""

from __future__ import annotations

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
