"""The same collective sweep through mlx_nb's Cluster and through a plain ``mlx.launch`` script.

Both sides call ``mlx_nb.bench.sweep`` (this file is also the launched script,
with ``--rank-side``), alternating for ``--rounds`` rounds; each case's latency
is the median over rounds of the per-round medians. The table shows the ratio
mlx_nb / mlx.launch per case and for the whole sweep (sum of the medians), each
side's round-to-round spread (the noise floor to read the ratio against), and
an MPI column (the same sweep over MLX's mpi backend under mpirun) where MLX
can load libmpi and mpirun is on PATH.

    .venv/bin/python benchmarks/collectives.py -n 4 --sizes 1KB-16MB --factor 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import mlx.core as mx
import psutil

from mlx_nb import Cluster
from mlx_nb.bench import BenchRow, add_sweep_arguments, run_bench, sweep, sweep_options
from mlx_nb.display import Table, human_bytes

TOLERANCE = 0.05


def rank_side(args) -> int:
    group = mx.distributed.init(strict=True, backend=args.backend)
    o = sweep_options(args)
    rows = sweep(group, o["sizes"], o["ops"], o["dtypes"], o["warmup"], o["iters"], backend=args.backend)
    if group.rank() == 0:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in rows], f)
    return 0


def consecutive_free_ports(n: int) -> int:
    """A port p with p .. p+n-1 all free (mlx.launch numbers the ring's ports from one start)."""
    for _ in range(100):
        base = random.randint(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports found")


def mlx_launch() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    return [exe] if os.path.exists(exe) else [shutil.which("mlx.launch") or "mlx.launch"]


def launched(n: int, backend: str, sizes: list[int], args) -> list[BenchRow]:
    """Run the sweep in n processes started by mlx.launch; rank 0's rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        if backend == "ring":
            cmd = [*mlx_launch(), "-n", str(n), "--backend", "ring", "-p", str(consecutive_free_ports(n)), "--"]
        else:
            # mpirun itself: mlx.launch passes options (--output) that Open MPI 4 does not know
            cmd = ["mpirun", "-np", str(n), "--oversubscribe", "--bind-to", "none"]
            cmd += ["--allow-run-as-root"] if os.geteuid() == 0 else []
        cmd += [
            sys.executable,
            os.path.abspath(__file__),
            "--rank-side",
            "--backend",
            backend,
            "--json",
            out,
            "--sizes",
            ",".join(map(str, sizes)),
            "--ops",
            args.ops,
            "--dtypes",
            args.dtypes,
            "--warmup",
            str(args.warmup),
            "--iters",
            str(args.iters),
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if backend == "ring" and args.pause_launcher:
            pause_while_ranks_run(proc, n)
        _, err = proc.communicate(timeout=1800)
        if proc.returncode or not os.path.exists(out):
            raise RuntimeError(f"{' '.join(cmd[:5])} failed ({proc.returncode}):\n{err[-2000:]}")
        with open(out) as f:
            return [
                BenchRow(**{**r, "wrong_ranks": tuple(r["wrong_ranks"]), "times": tuple(r["times"])})
                for r in json.load(f)
            ]


def pause_while_ranks_run(launcher: subprocess.Popen, n: int, timeout: float = 1800) -> None:
    """Stop mlx.launch itself (not its ranks) until the ranks have exited.

    mlx.launch's per-rank I/O threads busy-wait (select() on the ranks' stdin
    pipes, which are always writable): about one core, taken from the ranks
    when ranks + launcher outnumber the cores. The ranks write their rows to a
    file and print nothing, so nothing waits on the stopped launcher.
    """
    parent = psutil.Process(launcher.pid)
    deadline = time.monotonic() + timeout
    ranks: list = []
    while len(ranks) < n and launcher.poll() is None and time.monotonic() < deadline:
        ranks = [p for p in parent.children(recursive=True) if "--rank-side" in " ".join(_cmdline(p))]
        time.sleep(0.01)
    if launcher.poll() is not None:
        return
    launcher.send_signal(signal.SIGSTOP)
    try:
        while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks):
            time.sleep(0.02)
    except psutil.NoSuchProcess:
        pass
    finally:
        launcher.send_signal(signal.SIGCONT)


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def mpi_status() -> tuple[bool, str]:
    if not mx.distributed.is_available("mpi"):
        return False, "MPI not available: mx.distributed.is_available('mpi') is False"
    if shutil.which("mpirun") is None:
        return False, "MPI not available: no mpirun on PATH"
    return True, "mpi: the same sweep over MLX's mpi backend, started by mpirun -np N"


def per_case(rounds: list[list[BenchRow]]) -> dict:
    """(op, dtype, size) -> each round's median latency; a wrong result stops the benchmark."""
    out: dict = {}
    for rows in rounds:
        for r in rows:
            if not r.correct:
                raise RuntimeError(f"{r.op} {human_bytes(r.size)} {r.dtype}: wrong on ranks {r.wrong_ranks}")
            out.setdefault((r.op, r.dtype, r.size), []).append(r.median)
    return out


def us(t: float) -> str:
    return f"{t * 1e6:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=4, help="ranks (default 4)")
    add_sweep_arguments(p)
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two sides (default 3)")
    p.add_argument(
        "--launcher-as-is",
        dest="pause_launcher",
        action="store_false",
        help="leave mlx.launch running while its ranks run (by default it is paused: it busy-waits)",
    )
    p.add_argument("--rank-side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="ring", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--summary", default=None, help="also write the whole-sweep numbers to this JSON file")
    args = p.parse_args(argv)
    if args.rank_side:
        return rank_side(args)

    sizes = sweep_options(args)["sizes"]
    opts = dict(sizes=sizes, ops=args.ops, dtypes=args.dtypes, warmup=args.warmup, iters=args.iters)
    mpi_ok, mpi_note = mpi_status()
    nb, ring, mpi = [], [], []
    t0 = time.perf_counter()
    with Cluster(n=args.n, spares=False) as c:
        for i in range(args.rounds):
            print(f"round {i + 1}/{args.rounds}: mlx_nb Cluster ...", file=sys.stderr, flush=True)
            nb.append(run_bench(c, **opts, progress=False).rows)
            print(f"round {i + 1}/{args.rounds}: mlx.launch --backend ring ...", file=sys.stderr, flush=True)
            ring.append(launched(args.n, "ring", sizes, args))
            if mpi_ok:
                mpi.append(launched(args.n, "mpi", sizes, args))
    a, b, m = per_case(nb), per_case(ring), per_case(mpi)
    med = {k: (statistics.median(a[k]), statistics.median(b[k])) for k in a}
    rows = []
    for (op, dtype, size), (x, y) in med.items():
        rows.append(
            [
                op,
                dtype,
                human_bytes(size),
                us(x),
                us(y),
                f"{x / y:.3f}",
                us(statistics.median(m[op, dtype, size])) if m else "n/a",
            ]
        )
    total_a, total_b = sum(x for x, _ in med.values()), sum(y for _, y in med.values())
    rows.append(
        [
            "whole sweep",
            "",
            "(sum)",
            us(total_a),
            us(total_b),
            f"{total_a / total_b:.3f}",
            us(sum(statistics.median(v) for v in m.values())) if m else "n/a",
        ]
    )
    title = (
        f"{args.n} ranks, ring backend, latency in µs: slowest rank, median of {args.iters} iterations, "
        f"median over {args.rounds} alternating rounds; ratio = mlx_nb / plain mlx.launch script "
        "(the same sweep function)"
    )
    print(Table(["op", "dtype", "size", "mlx_nb", "mlx.launch", "ratio", "mpi"], rows, title))
    geo = math.exp(statistics.fmean(math.log(x / y) for x, y in med.values()))
    print(f"\ngeometric mean of per-case ratios: {geo:.3f}")
    ratio = total_a / total_b
    verdict = "within" if abs(ratio - 1) <= TOLERANCE else "OUTSIDE"
    print(f"whole sweep mlx_nb / mlx.launch = {ratio:.3f}: {verdict} {TOLERANCE:.0%}")
    # the noise floor: how much one side's whole sweep varies from round to round
    for name, d in (("mlx_nb", a), ("mlx.launch", b)):
        totals = [sum(v[i] for v in d.values()) for i in range(args.rounds)]
        print(
            f"{name} whole sweep per round (µs): {', '.join(us(t) for t in totals)} "
            f"(max/min {max(totals) / min(totals):.2f})"
        )
    spread = {}
    for name, d in (("mlx_nb", a), ("mlx.launch", b)):
        totals = [sum(v[i] for v in d.values()) for i in range(args.rounds)]
        spread[name] = max(totals) / min(totals)
    if args.summary:
        # the headline case: the largest all_sum (else the largest of any op)
        big = max((k for k in med if k[0] == "all_sum"), key=lambda k: k[2], default=max(med, key=lambda k: k[2]))
        with open(args.summary, "w") as f:
            json.dump(
                {
                    "n": args.n,
                    "ratio": ratio,
                    "geo": geo,
                    "total_nb": total_a,
                    "total_launch": total_b,
                    "spread": spread,
                    "rounds": args.rounds,
                    "largest": [big[0], big[2], *med[big]],
                },
                f,
            )
    print(mpi_note)
    print(f"({time.perf_counter() - t0:.0f} s in all; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
