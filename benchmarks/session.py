"""A long session: memory of the notebook, the controller and the ranks over thousands of cells.

    python benchmarks/session.py [-n 2] [--cells 2000] [--mb 4] [--collectives 2000]

The cells cycle through what a working session does: empty cells, cells that print,
a push and a pull of a few-MB array, an all_sum, and every 100 cells a training-loop
cell of thousands of collectives. Memory (RSS) is read at the start (after a first
block of cells has warmed everything up), in the middle and at the end, after a
``gc.collect()`` here; with it, the entries of ipyparallel's Client caches, which
hold a record per message sent. A session that stays flat ends where it started.

One run (2 local ranks, 2-core Linux VM shared with other jobs, load average 2.7 at the
start, CPU MLX 0.32.4, ipyparallel 9.2): see README.md, "Measured here".
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time

import numpy as np
import psutil

from mlx_nb import Cluster
from mlx_nb.display import Table, human_bytes

PRINTS = "for i in range(10):\n    print(i, 'x' * 80)"
SUM = "mx.distributed.all_sum(mx.array([rank + 1.0])).item()"


class Sink:
    """Where the cells' printed output goes (counted, not kept)."""

    def __init__(self) -> None:
        self.chars = 0

    def write(self, text: str) -> int:
        self.chars += len(text)
        return len(text)

    def flush(self) -> None:
        pass


def cell(cluster: Cluster, i: int, array: np.ndarray, collectives: int) -> None:
    """Cell ``i`` of the mix: 10 kinds in turn, a training loop every 100th."""
    kind = i % 10
    if i % 100 == 99:
        cluster.run(f"for _ in range({collectives}):\n    mx.eval(mx.distributed.all_sum(mx.array([1.0])))")
    elif kind < 4:
        cluster.run("pass")
    elif kind < 7:
        cluster.run(PRINTS)
    elif kind == 7:
        cluster.push({"pushed": array})
    elif kind == 8:
        cluster.run(f"pulled = mx.ones(({array.size},))")
        cluster.pull("pulled")
    else:
        cluster.run(SUM)


def rss(processes: list[psutil.Process]) -> int:
    total = 0
    for p in processes:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def measure(cluster: Cluster) -> dict[str, int]:
    """RSS of each part, and the size of the client's per-message caches."""
    gc.collect()
    controller = psutil.Process(cluster.group.controller_pid)
    client = cluster.client
    return {
        "notebook process RSS": psutil.Process().memory_info().rss,
        "controller RSS (and its children)": rss([controller, *controller.children(recursive=True)]),
        "ranks RSS (all engines)": rss([psutil.Process(r.pid) for r in cluster.ranks]),
        "client.history entries": len(client.history),
        "client.results + metadata entries": len(client.results) + len(client.metadata),
        "client futures (reply + output)": len(client._futures) + len(client._output_futures),
        "client.outstanding entries": len(client.outstanding) + sum(map(len, client._outstanding_dict.values())),
        # signatures of messages received, kept against replays: capped at digest_history_size
        "client.session digests": len(client.session.digest_history),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2, help="ranks")
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--mb", type=float, default=4.0, help="size of the pushed and pulled arrays")
    parser.add_argument("--collectives", type=int, default=2000, help="all_sums in each training-loop cell")
    parser.add_argument("--every", type=int, default=250, help="cells between the progress lines")
    args = parser.parse_args()
    array = np.ones(int(args.mb * 2**20 / 4), np.float32)
    warmup = 100
    points = {"start": warmup, "middle": (warmup + args.cells) // 2, "end": args.cells}
    seen: dict[str, dict[str, int]] = {}
    sink = Sink()
    t0 = time.perf_counter()
    with Cluster(n=args.n) as cluster:
        cluster.on_message = lambda text: None
        for i in range(args.cells):
            with contextlib.redirect_stdout(sink):
                cell(cluster, i, array, args.collectives)
            if (i + 1) % args.every == 0 or i + 1 in points.values():
                now = measure(cluster)
                for name, at in points.items():
                    if i + 1 == at:
                        seen[name] = now
                print(
                    f"cell {i + 1}, {time.perf_counter() - t0:.0f} s: "
                    + ", ".join(f"{k} {human_bytes(v) if 'RSS' in k else v}" for k, v in now.items()),
                    flush=True,
                )
    rows = []
    for key in seen["start"]:
        values = [seen[p][key] for p in points]
        shown = [human_bytes(v) if "RSS" in key else str(v) for v in values]
        ratios = [f"{values[-1] / v:.2f}" if v else "-" for v in values[:2]]
        rows.append([key, *shown, *ratios])
    title = (
        f"{args.cells} cells on {args.n} ranks in {time.perf_counter() - t0:.0f} s ({args.mb:g} MB push/pull, "
        f"training loops of {args.collectives} all_sums, {sink.chars} characters printed)"
    )
    columns = ["measure", *(f"{p} (cell {at})" for p, at in points.items()), "end / start", "end / middle"]
    print(Table(columns, rows, title))


if __name__ == "__main__":
    main()
