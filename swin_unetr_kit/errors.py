"""The bundles' own error message as the last line of a failed run.

MONAI's config parser wraps every error raised while evaluating a ``$`` expression in ``RuntimeError: Failed to evaluate
ConfigExpression`` and prints the expression after it, so the message a bundle raised for the user ("data set folder
not found (set --dataset_dir)") ends up 30-45 lines above the end of the traceback. :func:`excepthook` prints the
traceback as Python does, then, when an exception in its chain was raised by this package's code and is not already
the last one printed, that exception's ``Type: message`` again as the last lines. It applies to every error this
package raises, of any class, with no list to keep.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from types import TracebackType

_PACKAGE = Path(__file__).resolve().parent


def _raised_here(error: BaseException) -> bool:
    """Whether ``error`` was raised by a ``raise`` in this package (the last frame of its traceback is ours)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)


def own_error(error: BaseException) -> BaseException | None:
    """The outermost exception in the chain of ``error`` (causes and contexts) that this package raised, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if _raised_here(error):
            return error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None


def excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook``: Python's traceback, then this package's message last when a wrapper (MONAI's) hid it."""
    _previous(kind, error, tb)
    own = own_error(error)
    if own is not None and own is not error:
        print(f"\n{''.join(traceback.format_exception_only(type(own), own)).rstrip()}", file=sys.stderr, flush=True)


_previous = sys.excepthook


def install() -> None:
    """Make :func:`excepthook` the interpreter's (once; the hook it replaces prints the traceback)."""
    global _previous
    if sys.excepthook is not excepthook:
        _previous, sys.excepthook = sys.excepthook, excepthook
