"""The same collective sweep through mlx_nb's Cluster and through a plain ``mlx.launch`` script.

Both sides call ``mlx_nb.bench.sweep`` (this file is also the launched script,
with ``--rank-side``), alternating for ``--rounds`` rounds; each case's latency
is the median over rounds of the per-round medians. The table shows the ratio
mlx_nb / mlx.launch per case and for the whole sweep (sum of the medians),
and an MPI column when MLX's MPI backend and mpirun are available.

    .venv/bin/python benchmarks/collectives.py -n 4 --sizes 1KB-16MB --factor 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import mlx.core as mx

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
        cmd = [*mlx_launch(), "-n", str(n), "--backend", backend]
        if backend == "ring":
            cmd += ["-p", str(consecutive_free_ports(n))]
        cmd += ["--", sys.executable, os.path.abspath(__file__), "--rank-side", "--backend", backend,
                "--json", out, "--sizes", ",".join(map(str, sizes)), "--ops", args.ops,
                "--dtypes", args.dtypes, "--warmup", str(args.warmup), "--iters", str(args.iters)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode or not os.path.exists(out):
            raise RuntimeError(f"{' '.join(cmd[:6])} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        with open(out) as f:
            return [BenchRow(**{**r, "wrong_ranks": tuple(r["wrong_ranks"]), "times": tuple(r["times"])})
                    for r in json.load(f)]


def mpi_status() -> tuple[bool, str]:
    if not mx.distributed.is_available("mpi"):
        return False, "MPI not available: mx.distributed.is_available('mpi') is False"
    if shutil.which("mpirun") is None:
        return False, "MPI not available: no mpirun on PATH"
    return True, "MLX mpi backend via mlx.launch --backend mpi (mpirun)"


def combine(rounds: list[list[BenchRow]]) -> dict:
    """(op, dtype, size) -> median over rounds of each round's median latency."""
    out: dict = {}
    for rows in rounds:
        for r in rows:
            if not r.correct:
                raise RuntimeError(f"{r.op} {human_bytes(r.size)} {r.dtype}: wrong on ranks {r.wrong_ranks}")
            out.setdefault((r.op, r.dtype, r.size), []).append(r.median)
    return {k: statistics.median(v) for k, v in out.items()}


def us(t: float) -> str:
    return f"{t * 1e6:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=4, help="ranks (default 4)")
    add_sweep_arguments(p)
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two sides (default 3)")
    p.add_argument("--rank-side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="ring", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help=argparse.SUPPRESS)
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
    a, b = combine(nb), combine(ring)
    m = combine(mpi) if mpi else {}
    rows = []
    for key in a:
        op, dtype, size = key
        rows.append([op, dtype, human_bytes(size), us(a[key]), us(b[key]), f"{a[key] / b[key]:.3f}",
                     us(m[key]) if key in m else "n/a"])
    total_a, total_b = sum(a.values()), sum(b.values())
    geo = math.exp(statistics.fmean(math.log(a[k] / b[k]) for k in a))
    rows.append(["whole sweep", "", "(sum)", us(total_a), us(total_b), f"{total_a / total_b:.3f}",
                 us(sum(m.values())) if m else "n/a"])
    title = (f"{args.n} ranks, ring backend, median latency in µs (slowest rank; median of {args.rounds} "
             f"rounds x {args.iters} iterations); baseline: plain mlx.launch script, same sweep function")
    print(Table(["op", "dtype", "size", "mlx_nb", "mlx.launch", "ratio", "mpi"], rows, title))
    print(f"\ngeometric mean of per-case ratios: {geo:.3f}")
    ratio = total_a / total_b
    verdict = "within" if abs(ratio - 1) <= TOLERANCE else "OUTSIDE"
    print(f"whole sweep mlx_nb / mlx.launch = {ratio:.3f}: {verdict} {TOLERANCE:.0%}")
    print(mpi_note)
    print(f"({time.perf_counter() - t0:.0f} s in all; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
