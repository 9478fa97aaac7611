"""Peak memory of a bundle evaluator's run by phase: load and preprocessing, the sliding window, post-processing.

At each event the process's peak resident memory so far (``VmHWM``) is printed and reset (``/proc/self/clear_refs``, 5;
Linux), so each line is the peak of one phase. Attach it from an override file, as ``docs/memory.md`` does::

    {"run": ["$@load_module('memory_phases').attach(@evaluator)", "$@evaluator.run()"]}

with ``tools/`` on ``PYTHONPATH``. The resets hide the run's whole peak from ``/usr/bin/time -v``: measure that in a run
without this file.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from ignite.engine import Engine, Events
from monai.engines import IterationEvents

_START = time.time()


def mark(phase: str) -> dict[str, int]:
    """Print and return the peak and current resident memory (MB) since the last mark, and reset the peak."""
    status = Path("/proc/self/status").read_text()
    mb = {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) // 1024 for k in ("VmHWM", "VmRSS")}
    print(f"PHASE {phase}: peak {mb['VmHWM']} MB, now {mb['VmRSS']} MB, at {time.time() - _START:.0f} s", flush=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return mb


def attach(engine: Engine) -> Engine:
    """Mark the end of each phase of every iteration of ``engine`` (a MONAI evaluator)."""
    engine.add_event_handler(Events.ITERATION_STARTED, lambda _: mark("load+preprocessing"))
    engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, lambda _: mark("sliding window"))
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: mark("post-processing+writing"))
    return engine
