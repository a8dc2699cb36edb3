"""Cluster start and cell round trip: mlx_nb against raw ipyparallel and mlx.launch.

    python benchmarks/dispatch.py [-n 4] [--cells 300] [--summary FILE]

Prints one table measured in this run; ratios are against the baselines measured here
(``--summary`` also writes its numbers as JSON, for benchmarks/gpu.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ipyparallel as ipp
from IPython.testing.globalipapp import start_ipython

from mlx_nb import Cluster, hostfile, rank_env
from mlx_nb.display import Table

ALL_REDUCE = "import mlx.core as mx\ng = mx.distributed.init(strict=True, backend='ring')\nmx.eval(mx.distributed.all_sum(mx.ones(4), group=g))\n"


def _init_ranks(rank_env: dict, backend: str, size: int) -> int:
    import os

    os.environ.update(rank_env)
    import mlx.core as mx

    g = mx.distributed.init(strict=True, backend=backend)
    assert g.size() == size
    return g.rank()


def raw_ipyparallel_start(n: int) -> tuple[float, ipp.Cluster, ipp.Client]:
    """ipp.Cluster(n).start_and_connect_sync() plus a hand-written ring init."""
    t0 = time.perf_counter()
    cluster = ipp.Cluster(n=n, log_level=40)
    client = cluster.start_and_connect_sync()
    launches = rank_env.rank_launch(hostfile.local(n), "ring", ports=rank_env.free_ports(n))
    files = []
    ars = []
    for eid, launch in zip(sorted(client.ids), launches):
        f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        f.write(launch.files["MLX_HOSTFILE"])
        f.close()
        files.append(f.name)
        ars.append(client[eid].apply_async(_init_ranks, {**launch.env, "MLX_HOSTFILE": f.name}, "ring", n))
    [ar.get() for ar in ars]
    took = time.perf_counter() - t0
    for name in files:
        os.remove(name)
    return took, cluster, client


def mlx_launch(n: int) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(ALL_REDUCE)
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists():  # installed elsewhere (pip install --target): the one on PATH
        launcher = Path(shutil.which("mlx.launch") or launcher)
    t0 = time.perf_counter()
    subprocess.run([str(launcher), "-n", str(n), "--backend", "ring", "--", sys.executable, f.name], check=True)
    took = time.perf_counter() - t0
    os.remove(f.name)
    return took


def settle(cluster: Cluster, timeout: float = 60) -> None:
    """Wait for the warm spare engines that start() launches in the background to register.

    Until then their start-up (imports, kernel) competes for the CPU with the cells measured.
    """
    deadline = time.monotonic() + timeout
    while len(cluster.client.ids) < 2 * cluster.n and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # their first heartbeats and registration traffic


def interleaved(fns: list, count: int, rounds: int = 30) -> list[float]:
    """Median (ms) of each of fns, measured in blocks that take turns, so drift hits all alike."""
    for fn in fns:
        fn()  # warm
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        order = list(enumerate(fns))
        order = order[r % len(fns) :] + order[: r % len(fns)]
        for i, fn in order:
            for _ in range(max(1, count // rounds)):
                t0 = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=4)
    parser.add_argument("--cells", type=int, default=300)
    parser.add_argument("--summary", default=None, help="also write the measured numbers to this JSON file")
    args = parser.parse_args()
    n = args.n

    raw_start, raw_cluster, raw_client = raw_ipyparallel_start(n)
    raw_view = raw_client[:]
    launch = mlx_launch(n)

    t0 = time.perf_counter()
    cluster = Cluster(n=n).start()
    nb_start = time.perf_counter() - t0
    shell = start_ipython()
    shell.run_line_magic("load_ext", "mlx_nb")
    from mlx_nb import magics

    magics.use(cluster)
    settle(cluster)
    same_view = cluster.client[[r.engine_id for r in cluster.ranks]]
    # the raw cluster stays up (idle) so that all three are measured under the same conditions
    nb_cell, same_raw, raw_cell = interleaved(
        [
            lambda: shell.run_cell_magic("mlx_dist", "", "pass"),
            lambda: same_view.execute("pass", block=True),
            lambda: raw_view.execute("pass", block=True),
        ],
        args.cells,
    )
    cluster.stop()
    raw_cluster.stop_cluster_sync()

    rows = [
        [
            "start to ready (s)",
            "mlx_nb Cluster(n).start()",
            f"{nb_start:.2f}",
            "raw ipp.Cluster + manual init",
            f"{raw_start:.2f}",
            f"{nb_start / raw_start:.2f}x",
        ],
        [
            "start to ready (s)",
            "mlx_nb Cluster(n).start()",
            f"{nb_start:.2f}",
            f"mlx.launch -n {n} all-reduce script",
            f"{launch:.2f}",
            f"{nb_start / launch:.2f}x",
        ],
        [
            "empty cell round trip (ms, median)",
            "%%mlx_dist",
            f"{nb_cell:.2f}",
            "DirectView.execute('pass'), same engines",
            f"{same_raw:.2f}",
            f"{nb_cell / same_raw:.2f}x",
        ],
        [
            "empty cell round trip (ms, median)",
            "%%mlx_dist",
            f"{nb_cell:.2f}",
            "DirectView.execute('pass'), raw ipp cluster",
            f"{raw_cell:.2f}",
            f"{nb_cell / raw_cell:.2f}x",
        ],
    ]
    print(Table(["measure", "mlx_nb", "value", "baseline", "value", "ratio"], rows, f"{n} local ranks, ring backend"))
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(
                {
                    "n": n,
                    "start": nb_start,
                    "raw_start": raw_start,
                    "launch_start": launch,
                    "cell_ms": nb_cell,
                    "same_raw_ms": same_raw,
                    "raw_ms": raw_cell,
                },
                f,
            )


if __name__ == "__main__":
    main()
