"""A rank's memory budget: what its host can give it, or what it was told it has.

The one home of that number. ``budget()`` is what this rank may hold in all (model, KV caches,
activations, prompt cache); ``free()`` is what is left of it now. Measured, a budget is:

- on a Mac, MLX's recommended working set (``mx.device_info()``), shared by the ranks on that Mac;
- on CUDA, the GPU's memory, shared by the ranks on it (a host's ranks all run on its GPU 0,
  unless the nccl backend gives each a GPU of its own);
- on a Linux CPU, the host's available memory shared by the ranks on that host, plus what this
  process holds already (a model it would give up for the next one counts as its own).

``Cluster(..., memory=["700MB", "260MB"])`` (``%mlx_cluster start --memory``) overrides it per
rank: to leave room for other programs, or to try a mixed cluster on one machine. The override
and the ranks sharing this host live in the rank's state (:mod:`.state`), set when the group forms.

Example (in a cell)::

    from mlx_nb.rank import memory
    memory.budget()          # Budget(rank=0, bytes=734003200, source=<BudgetSource.GIVEN: 'given'>, ...)
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Optional

from .state import state

# A Linux CPU rank's freed memory. MLX's CPU backend allocates with malloc and keeps no freed
# buffers for reuse (its Metal and CUDA backends keep a cache of them); glibc hands freed memory
# back to the system as soon as its thresholds allow, so the next batch's KV cache waits for the
# kernel's fresh pages (a wave of 8 prompts of 1,400 tokens: ~70 thousand page faults, 0.2-0.3 s of
# its prefill on a 2-core VM). keep_freed() has glibc keep up to KEEP_FREED of it, as MLX's GPU
# cache keeps buffers; give_back() returns it where mlx_nb already lets go of memory. What is kept
# serves every thread only in one arena: a rank starts with MALLOC_ARENA_MAX=1 (engines/sets.py).
KEEP_FREED = 1 << 30  # freed bytes at the heap's top kept for the next allocations
HEAP_UP_TO = 32 << 20  # arrays up to this size come from the heap, not a mapping of their own
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h


class BudgetSource(str, Enum):
    """Where a rank's budget comes from."""

    GIVEN = "given"  # Cluster(memory=...), %mlx_cluster start --memory
    WORKING_SET = "recommended working set"  # a Mac's GPU (Metal)
    GPU = "GPU memory"  # CUDA
    HOST = "available host memory"  # a CPU rank


@dataclass(frozen=True)
class Budget:
    """One rank's memory budget, in bytes, where it comes from, and the device it is for."""

    rank: int
    bytes: int
    source: BudgetSource
    shared_by: int = 1  # ranks on this host that share the measured memory
    gpu: bool = False  # the rank computes on a GPU (fused attention: no score matrix is held)

    def __str__(self) -> str:
        from ..display import human_bytes

        shared = f", shared by {self.shared_by} ranks" if self.shared_by > 1 else ""
        return f"{human_bytes(self.bytes)} ({self.source.value}{shared})"


def configure(given: Optional[list[int]], local_ranks: int = 1) -> None:
    """Set, as the group forms, every rank's override (``given[rank]``; None: measure) and how
    many ranks share this rank's host."""
    state.memory = None if given is None else int(given[state.rank])
    state.local_ranks = max(1, int(local_ranks))


def budget() -> Budget:
    """This rank's budget now (see the module's docstring).

    Example::

        cluster.call(budget)     # one Budget per rank
    """
    import mlx.core as mx

    rank, local = state.rank, state.local_ranks
    gpu = mx.default_device().type == mx.gpu
    if state.memory is not None:
        return Budget(max(rank, 0), state.memory, BudgetSource.GIVEN, gpu=gpu)
    if gpu:
        info = mx.device_info()
        if mx.cuda.is_available():
            total = info.get("total_memory") or info.get("memory_size") or 0
            # nccl gives each rank a GPU of its own; otherwise a host's ranks all run on its GPU 0
            shared = 1 if state.backend == "nccl" else local
            return Budget(rank, int(total) // shared, BudgetSource.GPU, shared, gpu=True)
        total = info.get("max_recommended_working_set_size") or info.get("memory_size") or 0
        return Budget(rank, int(total) // local, BudgetSource.WORKING_SET, local, gpu=True)
    give_back()  # what glibc keeps for this rank (keep_freed) counts as the host's, not as held
    held = mx.get_active_memory() + mx.get_cache_memory()
    return Budget(rank, host_available() // local + held, BudgetSource.HOST, local)


def in_use() -> tuple[int, int]:
    """(in use, peak) bytes; the peak since the cell began, which counts what it started with."""
    import mlx.core as mx

    active = mx.get_active_memory()
    return active, max(active, mx.get_peak_memory())


def free() -> int:
    """Bytes this rank may still take: its budget less what it holds now."""
    import mlx.core as mx

    return max(0, budget().bytes - mx.get_active_memory())


def host_available() -> int:
    """The host's available memory: Linux's ``MemAvailable`` (free pages and what the page cache
    would give back), else the free pages (the whole memory where not even those are known)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    pages = "SC_AVPHYS_PAGES" if "SC_AVPHYS_PAGES" in os.sysconf_names else "SC_PHYS_PAGES"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf(pages)


def _glibc() -> Optional[ctypes.CDLL]:
    """This process's C library where it is glibc (its malloc is what :func:`keep_freed` tunes)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc has it; musl does not)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed() -> bool:
    """On a CPU rank with glibc, keep freed memory in the process for the allocations that follow
    (see ``KEEP_FREED``); whether it applies (not on a GPU rank, whose MLX keeps its own cache)."""
    import mlx.core as mx

    libc = _glibc()
    if libc is None or mx.default_device().type == mx.gpu:
        return False
    options = ((_M_TRIM_THRESHOLD, KEEP_FREED), (_M_MMAP_THRESHOLD, HEAP_UP_TO), (_M_TOP_PAD, 64 << 20))
    return all([libc.mallopt(option, value) == 1 for option, value in options])  # each, whatever the others


def give_back() -> None:
    """Return the freed memory this process keeps to the system (glibc's ``malloc_trim``): where
    mlx_nb empties MLX's cache of buffers (a model going, the prompt cache emptied)."""
    libc = _glibc()
    if libc is not None:  # every arena's free pages (the rank generates on the engine's main thread)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim(0)
