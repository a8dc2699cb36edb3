"""The `mlx-nb` command: demo, bench, hostfile check."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Optional

DEMO_SHARDING = """
import mlx.nn as nn
mx.random.seed(0)  # the same full layer on every rank
full = nn.Linear(256, 512)
x = mx.random.normal((4, 256))
sharded = nn.layers.distributed.shard_linear(full, "all-to-sharded", group=world)
# every rank holds 512 / size output features; gather them back to compare
y = mx.distributed.all_gather(sharded(x).T, group=world).T
err = mx.abs(y - full(x)).max().item()
print(f"sharded nn.Linear(256, 512): rank weight {tuple(sharded.weight.shape)}, max error vs unsharded {err:.2e}")
assert err < 1e-4, err
"""


def demo(n: int = 4) -> int:
    """Start n local ranks, show them, all-reduce, check a sharded nn.Linear, stop."""
    from .cluster import Cluster
    from .display import status_table

    print(f"Starting {n} local MLX ranks (ring backend on 127.0.0.1)...", flush=True)
    t0 = time.perf_counter()
    with Cluster(n=n) as cluster:
        print(f"Ready in {time.perf_counter() - t0:.1f} s\n")
        print(status_table(cluster), "\n")
        cluster.run(
            "import os, socket\nprint(f'rank {rank} of {size}: pid {os.getpid()} on "
            "{socket.gethostname()}, {mx.default_device()}, MLX {mx.__version__}')",
            ranks="all",
        )
        result = cluster.run(
            "total = mx.distributed.all_sum(mx.array([float(rank)]), group=world).item()\n"
            "print(f'all_sum of the ranks 0..{size - 1} = {total:g}')\ntotal",
            ranks="all",
        )
        want = n * (n - 1) / 2
        got = float(result.value["text/plain"])
        print(f"all-reduce result {got:g} (expected {want:g}): {'ok' if got == want else 'WRONG'}")
        cluster.run(DEMO_SHARDING)
        print("\nStopping the cluster...")
    print("Stopped: no engine left running.")
    return 0 if got == want else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mlx-nb", description="Distributed MLX from the notebook.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="start local ranks, all-reduce, shard a layer, stop")
    p.add_argument("-n", type=int, default=4, help="number of ranks (default 4)")
    sub.add_parser("bench", help="collective benchmark sweep (mlx-nb bench --help)", add_help=False)
    p = sub.add_parser("hostfile", help="MLX hostfile tools")
    hsub = p.add_subparsers(dest="hostfile_command", required=True)
    c = hsub.add_parser("check", help="validate a hostfile and print the cluster it describes")
    c.add_argument("file")
    c.add_argument("--backend", default=None, help="check for this backend (default: the file's, else ring)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from .bench import bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.n < 1:
            parser.error("-n must be at least 1")
        return demo(args.n)
    if args.command == "hostfile":
        return check_hostfile(args.file, args.backend)
    return 2


def check_hostfile(path: str, backend: Optional[str] = None) -> int:
    """``mlx-nb hostfile check PATH``: print the cluster and warnings and return 0, or the error and 2."""
    from .hostfile import HostfileError, load
    from .preflight import warnings
    from .rank_env import describe

    try:
        hf = load(path)
        text = describe(hf, backend)
        notes = warnings(hf)
    except HostfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    for note in notes:
        print(f"warning: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
