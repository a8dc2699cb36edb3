"""The rank half of the collective benchmarks: time all_sum, all_gather and send/recv.

:func:`sweep` takes the group, so the same code runs inside mlx_nb's ranks (through
``Cluster.call``) and in a plain ``mlx.launch`` script::

    group = mx.distributed.init(strict=True, backend="ring")
    rows = sweep(group, [1024, 1 << 20])

Every iteration starts after a barrier, ends with ``mx.eval`` on every rank, and counts the
slowest rank's time; every size's result is checked. Rows follow the nccl-tests conventions:
``size`` is the bytes each rank sends for all_sum and send/recv and the gathered output's
bytes for all_gather; bus bandwidth is algorithm bandwidth times 2(n-1)/n for all_sum and
(n-1)/n for all_gather.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx

from ..display import human_bytes
from . import session

OPS = ("all_sum", "all_gather", "send_recv")
Progress = Callable[[int, int, str], None]


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' bus bandwidth factor: 2(n-1)/n all-reduce, (n-1)/n all-gather, 1 point-to-point."""
    return {"all_sum": 2 * (n - 1) / n, "all_gather": (n - 1) / n}.get(op, 1.0)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class BenchRow:
    """One (op, size, dtype) of a sweep; times in seconds, bandwidths in bytes/s."""

    op: str
    size: int
    dtype: str
    ranks: int
    backend: str
    iters: int
    median: float
    p90: float
    algbw: float
    busbw: float
    wrong_ranks: tuple = ()
    times: tuple = field(default=(), repr=False)  # slowest rank's time per iteration

    @property
    def correct(self) -> bool:
        return not self.wrong_ranks


@dataclass(frozen=True)
class SweepProgress:
    """Rank 0's report of a sweep's progress: ``done`` of ``total`` cases, the next one named."""

    done: int
    total: int
    what: str


def make_row(
    op: str, size: int, dtype: str, ranks: int, backend: str, times: Sequence[float], wrong_ranks: Sequence[int] = ()
) -> BenchRow:
    """Statistics of one case from the slowest rank's time per iteration."""
    median = percentile(times, 50)
    algbw = size / median if median > 0 else 0.0
    return BenchRow(
        op,
        size,
        dtype,
        ranks,
        backend,
        len(times),
        median,
        percentile(times, 90),
        algbw,
        algbw * bus_factor(op, ranks),
        tuple(wrong_ranks),
        tuple(times),
    )


# ------------------------------------------------------------------ rank side
def _case(op: str, size: int, dtype, rank: int, n: int):
    """Input, message bytes, and the check of the output for one case on this rank."""
    count = max(1, size // dtype.size // (n if op == "all_gather" else 1))
    x = mx.full((count,), rank + 1, dtype=dtype)
    if op == "all_sum":
        return x, count * dtype.size, lambda y: mx.all(y == n * (n + 1) // 2).item()
    if op == "all_gather":
        want = mx.broadcast_to(mx.arange(1, n + 1, dtype=dtype)[:, None], (n, count))
        return x, n * count * dtype.size, lambda y: mx.array_equal(y.reshape(n, count), want).item()
    # send_recv: even ranks send to the next odd rank; a last odd-out rank sits the case out
    return x, count * dtype.size, lambda y: mx.all(y == rank).item() if rank % 2 else True


def _step(op: str, group, x, rank: int, n: int):
    dist = mx.distributed
    if op == "all_sum":
        return dist.all_sum(x, group=group)
    if op == "all_gather":
        return dist.all_gather(x, group=group)
    if rank % 2 == 0:
        return dist.send(x, rank + 1, group=group) if rank + 1 < n else None
    return dist.recv_like(x, rank - 1, group=group)


def slowest(group, times: Sequence[float], ok: bool = True) -> tuple[list[float], list[int]]:
    """Every rank's per-iteration times and check, gathered: (max per iteration, wrong ranks).

    Collective: every rank of ``group`` must call it with the same number of times.
    """
    mine = mx.array([*times, 1.0 if ok else 0.0], dtype=mx.float32)
    every = mx.distributed.all_gather(mine, group=group).reshape(group.size(), -1)
    mx.eval(every)
    worst = mx.max(every[:, :-1], axis=0).tolist()
    return worst, [r for r, flag in enumerate(every[:, -1].tolist()) if flag != 1.0]


def sweep(
    group,
    sizes: Sequence[int],
    ops: Sequence[str] = OPS,
    dtypes: Sequence[str] = ("float32",),
    warmup: int = 5,
    iters: int = 20,
    *,
    backend: str = "ring",
    progress: Optional[Progress] = None,
) -> list[BenchRow]:
    """Time each op at each size and dtype on ``group``; every rank gets the same rows.

    Collective: call it on every rank with the same arguments.

    Example (in an ``mlx.launch`` script)::

        rows = sweep(mx.distributed.init(), [1024, 1 << 20], ops=["all_sum"])
    """
    rank, n = group.rank(), group.size()
    cases = [(d, op, s) for d in dtypes for op in ops for s in sizes]
    rows = []
    for i, (dname, op, size) in enumerate(cases):
        if progress:
            progress(i, len(cases), f"{op} {human_bytes(size)} {dname}")
        x, nbytes, check = _case(op, size, getattr(mx, dname), rank, n)
        mx.eval(x)
        times, y = time_iters(lambda op=op, x=x: _step(op, group, x, rank, n), warmup, iters, group)
        worst, wrong = slowest(group, times, y is None or bool(check(y)))
        rows.append(make_row(op, nbytes, dname, n, backend, worst, wrong))
        x = y = None  # free the buffers before the next size
        mx.clear_cache()
    if progress:
        progress(len(cases), len(cases), "done")
    return rows


def time_iters(run: Callable[[], Any], warmup: int, iters: int, group=None) -> tuple[list[float], Any]:
    """Seconds of each timed ``mx.eval(run())`` (after ``warmup`` untimed ones), and the last output.

    With a ``group``, every iteration starts after a barrier (a one-element all_sum),
    so the ranks start together and the slowest rank's time is the collective's.
    """
    one = mx.array([1.0])
    times, out = [], None
    for it in range(warmup + iters):
        if group is not None:
            mx.eval(mx.distributed.all_sum(one, group=group))
        t0 = time.perf_counter()
        out = run()
        if out is not None:
            mx.eval(out)
        if it >= warmup:
            times.append(time.perf_counter() - t0)
    return times, out


def sweep_on_rank(sizes, ops, dtypes, warmup, iters, backend) -> Optional[list[BenchRow]]:
    """sweep() on an mlx_nb rank (``Cluster.call``); rank 0 reports progress (:class:`SweepProgress`),
    and returns the rows."""
    world = session.world()
    progress = None
    if world.rank() == 0:

        def progress(done, total, what):
            session.report(SweepProgress(done, total, what))

    rows = sweep(world, sizes, ops, dtypes, warmup, iters, backend=backend, progress=progress)
    return rows if world.rank() == 0 else None
