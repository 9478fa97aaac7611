"""CPU memory-allocator settings for the bundles' runs, measured with ``tools/benchmark.py``.

Swin UNETR allocates the same large activations again for every sliding window and training step. glibc's malloc
serves large blocks (over a threshold that grows to at most 32 MB) with fresh ``mmap`` pages and gives them back on
``free``, so the kernel hands out and zeroes new pages for every window: about half of the CPU time on 2 cores. Two
remedies, both measured in docs/performance.md:

* tcmalloc (Debian/Ubuntu ``libtcmalloc-minimal4``, conda ``gperftools``), preloaded before Python starts with
  ``LD_PRELOAD=libtcmalloc_minimal.so.4``: the fastest here, and memory close to glibc's;
* glibc kept, with large blocks served from the heap and kept after ``free`` (``mallopt(M_MMAP_MAX, 0)``, the same as
  ``MALLOC_MMAP_MAX_=0``): faster than glibc's default, at the price of memory, most in training.

A process cannot change its allocator once started, so the bundles call :func:`tune_cpu_allocator` at start: it does
the second, only on the CPU and only where no faster allocator is loaded, and says which allocator runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

M_MMAP_MAX = -4  # glibc's mallopt parameter: how many blocks may be served by mmap (0: none)
PRELOADED_ALLOCATORS = ("libtcmalloc", "libjemalloc")
TCMALLOC = "libtcmalloc_minimal.so.4"
TCMALLOC_HINT = f"LD_PRELOAD={TCMALLOC} (package libtcmalloc-minimal4)"


def preloaded_allocator() -> str | None:
    """The tcmalloc or jemalloc library loaded into this process, or None where glibc's malloc runs."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return None
    for line in maps.read_text().splitlines():
        name = line.rsplit("/", 1)[-1]
        if name.startswith(PRELOADED_ALLOCATORS):
            return name
    return None


def tune_cpu_allocator(device: torch.device | str, keep_freed_memory: bool = True) -> str:
    """Set up the CPU allocator for a run on ``device`` and return what runs: ``"cuda"`` (nothing to do), the
    preloaded library's name, ``"glibc, freed memory kept"`` or ``"malloc"`` (left as it is).

    Args:
        device: the run's device; on a GPU the host allocator matters little and is left alone.
        keep_freed_memory: with glibc, serve large blocks from the heap and keep them after ``free``: faster, more
            memory. ``False`` leaves glibc as it is, for machines where memory is tight.
    """
    if torch.device(device).type != "cpu":
        return torch.device(device).type
    preloaded = preloaded_allocator()
    if preloaded:
        logger.info(f"CPU allocator: {preloaded}")
        return preloaded
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's; absent from other C libraries
    if keep_freed_memory and mallopt is not None and mallopt(M_MMAP_MAX, 0) == 1:
        logger.info(f"CPU allocator: glibc, freed memory kept (faster, more memory); faster still: {TCMALLOC_HINT}")
        return "glibc, freed memory kept"
    logger.info(f"CPU allocator: the C library's malloc; faster: {TCMALLOC_HINT}")
    return "malloc"


def tcmalloc_env() -> dict[str, str]:
    """The environment that preloads tcmalloc into a child process, where it is installed; ``{}`` elsewhere."""
    return {"LD_PRELOAD": TCMALLOC} if ctypes.util.find_library("tcmalloc_minimal") else {}
