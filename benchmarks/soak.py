"""Soak: consecutive cells, each an all_sum, with a fault injected every so often.

    python benchmarks/soak.py [-n 4] [--cells 300] [--fault-every 50]

Each fault is one of the failures a notebook meets (a rank raises before a
collective, a rank's process exits mid-cell, --timeout while ranks wait, an
error inside mx.eval of a collective, an engine SIGKILLed while idle, an
interrupt of the notebook while a rank loops). Prints how long each took to give
the prompt back and whether the next cell computed the right all_sum, then the
processes and open files at the start (the baseline), the end and the peak:
a healthy run ends where it began.

One run (4 local ranks, 2-core Linux VM shared with other jobs, load average 8-10,
CPU MLX 0.32.4, ipyparallel 9.2):

    cell  fault                                    prompt back  ranks restarted  next all_sum right
    50    rank 1 raises before all_sum             2.4 s        yes              yes
    100   rank 2 calls os._exit mid-cell           2.2 s        yes              yes
    150   --timeout 2, rank 3 never joins          2.5 s        yes              yes
    200   rank 0 raises inside mx.eval of all_sum  0.1 s        no               yes
    250   rank 1 SIGKILLed while idle              2.1 s        yes              yes
    300   interrupt while rank 0 loops             2.0 s        yes              yes

    294 healthy cells and 6 faults in 39 s
    measure                                                    start (baseline)  end   peak   end / start
    processes (controller and schedulers, ranks, spare ranks)  17                17    17     1.00
    open files, notebook process                               37                37    37     1.00
    open files, controller                                     506               506   506    1.00
    median healthy cell, ms (first third / last third)         63.5              62.1  600.5  0.98

(Whether rank 0's failed eval leaves the others waiting in the all_sum, and so needs a
restart, varies from run to run: MLX may run the all_sum before the error surfaces.)
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import psutil

from mlx_nb import Cluster, DistCellError
from mlx_nb.display import Table

SUM = "mx.distributed.all_sum(mx.array([rank + 1.0])).item()"


@dataclass
class Fault:
    name: str
    code: str
    timeout: Optional[float] = None
    kill_rank: Optional[int] = None  # SIGKILL this rank's engine before the cell, while idle
    interrupt_after: Optional[float] = None  # SIGINT this process that long into the cell


FAULTS = [
    Fault("rank 1 raises before all_sum", "if rank == 1:\n    raise ValueError('soak')\n" + SUM),
    Fault("rank 2 calls os._exit mid-cell", "import os\nif rank == 2:\n    os._exit(1)\n" + SUM),
    Fault("--timeout 2, rank 3 never joins", "import time\nif rank == 3:\n    time.sleep(600)\n" + SUM, timeout=2),
    Fault(
        "rank 0 raises inside mx.eval of all_sum",
        "A = mx.zeros((2, 2)) if rank == 0 else mx.eye(2)\n"
        "mx.eval(mx.distributed.all_sum(mx.linalg.inv(A, stream=mx.cpu)))",
    ),
    Fault("rank 1 SIGKILLed while idle", SUM, kill_rank=1),
    Fault("interrupt while rank 0 loops", "while rank == 0:\n    pass\n" + SUM, interrupt_after=1.0),
]
# faults whose waiting ranks the drain releases: every process and every variable stays
DRAINED = [
    Fault("rank 1 raises before all_sum", "if rank == 1:\n    raise ValueError('soak')\n" + SUM),
    Fault(
        "rank 2 raises in step 2 of 3",
        "for k in range(3):\n    if rank == 2 and k == 1:\n        raise ValueError('soak')\n"
        "    mx.eval(mx.distributed.all_sum(mx.ones(2)))",
    ),
    Fault("ranks 1 and 3 raise", "if rank in (1, 3):\n    raise ValueError('soak')\n" + SUM),
    Fault(
        "rank 0 raises, rank 1 waits in recv",
        "if rank == 0:\n    raise ValueError('soak')\n"
        "if rank == 1:\n    mx.eval(mx.distributed.recv_like(mx.ones(2), 0))",
    ),
    Fault("--timeout 1, rank 3 sleeps", "import time\nif rank == 3:\n    time.sleep(600)\n" + SUM, timeout=1),
    Fault("interrupt while rank 0 loops", "while rank == 0:\n    pass\n" + SUM, interrupt_after=0.8),
]


@dataclass
class FaultRow:
    cell: int
    name: str
    prompt_s: float  # fault -> prompt back
    restarted: bool
    next_ok: bool


@dataclass
class Usage:
    processes: int  # every process this soak started (orphans included)
    notebook_fds: int  # open files of this process
    controller_fds: int  # open files of the controller and its schedulers

    def peak(self, other: Usage) -> Usage:
        return Usage(*(max(a, b) for a, b in zip(vars(self).values(), vars(other).values())))


@dataclass
class SoakResult:
    faults: list[FaultRow] = field(default_factory=list)
    cell_s: list[float] = field(default_factory=list)  # healthy cells, in order
    start: Optional[Usage] = None
    end: Optional[Usage] = None
    peak: Optional[Usage] = None
    wall: float = 0.0


def usage(cluster: Cluster, marker: tuple[str, str]) -> Usage:
    """Processes carrying ``marker`` (an environment variable and its value), and open files."""
    name, value = marker
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "ipyparallel" in " ".join(p.info["cmdline"] or []) and p.environ().get(name) == value:
                procs.append(p)
        except psutil.Error:
            pass
    controller = [p for p in cluster.processes() if "ipyparallel.controller" in " ".join(_cmdline(p))]
    return Usage(len(procs), psutil.Process().num_fds(), sum(_fds(p) for p in controller))


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _fds(p: psutil.Process) -> int:
    try:
        return p.num_fds()
    except psutil.Error:
        return 0


def _settle(cluster: Cluster, marker: tuple[str, str], timeout: float = 30.0) -> Usage:
    """Usage once it has not changed for 2 s: a restart leaves the spare set starting up."""
    deadline = time.monotonic() + timeout
    last, since = usage(cluster, marker), time.monotonic()
    while time.monotonic() - since < 2.0 and time.monotonic() < deadline:
        time.sleep(0.25)
        now = usage(cluster, marker)
        if now != last:
            last, since = now, time.monotonic()
    return last


def run_fault(cluster: Cluster, fault: Fault, expected: str) -> tuple[float, bool]:
    """Inject ``fault``; return (seconds until the prompt is back, whether the ranks were restarted)."""
    pids = [r.pid for r in cluster.ranks]
    if fault.kill_rank is not None:
        os.kill(cluster.ranks[fault.kill_rank].pid, signal.SIGKILL)
        time.sleep(0.5)  # idle: nobody notices until the next cell
        t0 = time.perf_counter()
        value = cluster.run(fault.code).value
        took = time.perf_counter() - t0
        assert value and value["text/plain"] == expected, value
        return took, [r.pid for r in cluster.ranks] != pids
    fired: list[float] = []
    timer = None
    if fault.interrupt_after is not None:

        def interrupt() -> None:
            fired.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)

        timer = threading.Timer(fault.interrupt_after, interrupt)
        timer.start()
    t0 = time.perf_counter()
    try:
        cluster.run(fault.code, timeout=fault.timeout, quiet=True)
    except DistCellError:
        pass
    else:
        raise AssertionError(f"{fault.name}: the cell did not fail")
    finally:
        if timer is not None:
            timer.cancel()
    end = time.perf_counter()
    start = fired[0] if fired else t0 + (fault.timeout or 0.0)
    return end - start, [r.pid for r in cluster.ranks] != pids


def soak(
    cluster: Cluster,
    marker: tuple[str, str],
    cells: int = 300,
    fault_every: int = 50,
    faults: list[Fault] = FAULTS,
    on_fault: Optional[Callable[[FaultRow], None]] = None,
) -> SoakResult:
    """Run ``cells`` cells on ``cluster``; every ``fault_every``-th injects the next fault in turn.

    Processes are counted by ``marker``, an environment variable every process of the
    cluster inherits, so that orphans count too (see :func:`mark`).
    """
    expected = repr(cluster.n * (cluster.n + 1) / 2)
    out = SoakResult()
    cluster.run(SUM)  # warm
    out.start = out.peak = _settle(cluster, marker)
    t_start = time.perf_counter()
    k = 0
    for i in range(1, cells + 1):
        if i % fault_every == 0:
            fault = faults[k % len(faults)]
            k += 1
            took, restarted = run_fault(cluster, fault, expected)
            value = cluster.run(SUM).value
            row = FaultRow(i, fault.name, took, restarted, bool(value) and value["text/plain"] == expected)
            out.faults.append(row)
            out.peak = out.peak.peak(usage(cluster, marker))
            if on_fault is not None:
                on_fault(row)
            continue
        t0 = time.perf_counter()
        value = cluster.run(SUM).value
        out.cell_s.append(time.perf_counter() - t0)
        assert value and value["text/plain"] == expected, f"cell {i}: {value}"
    out.wall = time.perf_counter() - t_start
    out.end = _settle(cluster, marker)
    out.peak = out.peak.peak(out.end)
    return out


def soak_drains(cluster: Cluster, marker: tuple[str, str], count: int = 50) -> SoakResult:
    """``count`` drainable faults in a row (:data:`DRAINED` in turn), each followed by an all_sum
    and a check that a variable set before is still there: nothing may be restarted."""
    expected = repr(cluster.n * (cluster.n + 1) / 2)
    out = SoakResult()
    cluster.run("kept = rank * 7")
    cluster.run(SUM)
    out.start = out.peak = _settle(cluster, marker)
    t_start = time.perf_counter()
    for i in range(count):
        fault = DRAINED[i % len(DRAINED)]
        took, restarted = run_fault(cluster, fault, expected)
        value = cluster.run(SUM).value
        kept = cluster.pull("kept", "all") == [r * 7 for r in range(cluster.n)]
        out.faults.append(
            FaultRow(i + 1, fault.name, took, restarted, bool(value) and value["text/plain"] == expected and kept)
        )
        out.peak = out.peak.peak(usage(cluster, marker))
    out.wall = time.perf_counter() - t_start
    out.end = _settle(cluster, marker)
    out.peak = out.peak.peak(out.end)
    return out


def mark() -> tuple[str, str]:
    """Tag every process started from now on, so the soak can count them."""
    os.environ.setdefault("MLX_NB_SOAK", uuid.uuid4().hex)
    return "MLX_NB_SOAK", os.environ["MLX_NB_SOAK"]


def tables(result: SoakResult, cells: int, fault_every: int, n: int) -> list[Table]:
    faults = Table(
        ["cell", "fault", "prompt back", "ranks restarted", "next all_sum right"],
        [
            [f.cell, f.name, f"{f.prompt_s:.1f} s", "yes" if f.restarted else "no", "yes" if f.next_ok else "NO"]
            for f in result.faults
        ],
        f"{cells} cells on {n} local ranks, a fault every {fault_every}",
    )
    rows = [
        [
            name,
            getattr(result.start, key),
            getattr(result.end, key),
            getattr(result.peak, key),
            f"{getattr(result.end, key) / max(1, getattr(result.start, key)):.2f}",
        ]
        for name, key in [
            ("processes (controller and schedulers, ranks, spare ranks)", "processes"),
            ("open files, notebook process", "notebook_fds"),
            ("open files, controller", "controller_fds"),
        ]
    ]
    if result.cell_s:
        third = max(1, len(result.cell_s) // 3)
        first, last = statistics.median(result.cell_s[:third]), statistics.median(result.cell_s[-third:])
        rows.append(
            [
                "median healthy cell, ms (first third / last third)",
                f"{first * 1e3:.1f}",
                f"{last * 1e3:.1f}",
                f"{max(result.cell_s) * 1e3:.1f}",
                f"{last / first:.2f}",
            ]
        )
    health = Table(
        ["measure", "start (baseline)", "end", "peak", "end / start"],
        rows,
        f"{len(result.cell_s)} healthy cells and {len(result.faults)} faults in {result.wall:.0f} s",
    )
    return [faults, health]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--cells", type=int, default=300)
    ap.add_argument("--fault-every", type=int, default=50)
    ap.add_argument("--drains", type=int, default=0, help="instead: this many drainable faults in a row")
    args = ap.parse_args()
    marker = mark()
    with Cluster(n=args.n) as cluster:
        cluster.on_message = lambda _text: None
        if args.drains:
            result = soak_drains(cluster, marker, args.drains)
        else:
            result = soak(
                cluster,
                marker,
                args.cells,
                args.fault_every,
                on_fault=lambda f: print(f"cell {f.cell}: {f.name}: {f.prompt_s:.1f} s", flush=True),
            )
    for table in tables(result, args.cells, args.fault_every, args.n):
        print()
        print(table)


if __name__ == "__main__":
    main()
