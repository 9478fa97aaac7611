"""Peak memory of a bundle evaluator's run by phase: load and preprocessing, the sliding window, post-processing.

At the end of each phase the process's peak resident memory so far (``VmHWM``, Linux) is printed, and with ``reset``
set back (``/proc/self/clear_refs``, 5), so that each line is the peak of one phase. Attach it from an override file,
as ``docs/memory.md`` does::

    {"run": ["$@load_module('memory_phases').attach(@evaluator, False)", "$@evaluator.run()"]}

with ``tools/`` on ``PYTHONPATH``. Resets hide the run's whole peak from ``/usr/bin/time -v``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from ignite.engine import Engine, Events
from monai.engines import IterationEvents

_START = time.time()


def mark(phase: str, reset: bool = True) -> dict[str, int]:
    """Print and return the peak and current resident memory (MB) (since the last reset), and reset the peak."""
    status = Path("/proc/self/status").read_text()
    mb = {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) // 1024 for k in ("VmHWM", "VmRSS")}
    print(f"PHASE {phase}: peak {mb['VmHWM']} MB, now {mb['VmRSS']} MB, at {time.time() - _START:.0f} s", flush=True)
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return mb


def attach(engine: Engine, reset: bool = True) -> Engine:
    """Mark the end of each phase of every iteration of ``engine`` (a MONAI evaluator)."""
    engine.add_event_handler(Events.ITERATION_STARTED, lambda _: mark("load+preprocessing", reset))
    engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, lambda _: mark("sliding window", reset))
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: mark("post-processing+writing", reset))
    return engine
