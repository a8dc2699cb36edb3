"""Recovery tiers: each fault once with the drain (tier 1) and once with kill-and-restart only.

    python benchmarks/recovery.py [-n 4]

For every fault: which tier recovered it, the seconds from the fault (or the deadline, or
the interrupt) to the prompt back, how many rank processes were replaced, and whether a
variable set before the fault (not in a setup cell) is still there. Then the case that
matters most: the bundled model loaded on 2 ranks (pipeline), a failing cell, then the
next generation: the seconds from asking to its first token, after a drain and after a
restart that replays the model load.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from soak import DRAINED, run_fault  # noqa: E402  (benchmarks/soak.py)

from mlx_nb import Cluster, DistCellError  # noqa: E402
from mlx_nb.display import Table  # noqa: E402
from mlx_nb.generate import generate, load_model  # noqa: E402

SUM = "mx.distributed.all_sum(mx.array([rank + 1.0])).item()"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def faults(n: int, drain: bool) -> list[list]:
    rows = []
    with Cluster(n=n, drain=drain) as c:
        c.on_message = lambda _text: None
        expected = repr(n * (n + 1) / 2)
        for fault in DRAINED:
            c.run("kept = rank * 7")
            pids = [r.pid for r in c.ranks]
            took, _ = run_fault(c, fault, expected)
            replaced = sum(a != b for a, b in zip(pids, [r.pid for r in c.ranks]))
            try:
                kept = c.pull("kept", "all") == [r * 7 for r in range(n)]
            except DistCellError:
                kept = False
            assert c.run(SUM).value["text/plain"] == expected
            tier = "drain" if not replaced else "restart"
            rows.append([fault.name, tier, f"{took:.2f}", replaced, "yes" if kept else "no"])
    return rows


def first_token_after_failure(drain: bool) -> tuple[float, float]:
    """(seconds from the failing cell's start to the prompt back, from asking to the first token)."""
    with Cluster(n=2, drain=drain) as c:
        c.on_message = lambda _text: None
        load_model(c, pipeline=True, progress=False)
        generate(c, QUESTION, 4, quiet=True)  # warm
        t0 = time.perf_counter()
        try:
            c.run("if rank == 1:\n    raise ValueError('typo')\nmx.eval(mx.distributed.all_sum(mx.ones(2)))")
        except DistCellError:
            pass
        back = time.perf_counter() - t0
        first: list[float] = []
        t1 = time.perf_counter()
        generate(c, QUESTION, 4, on_text=lambda _t: first or first.append(time.perf_counter() - t1))
        return back, first[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=4)
    args = ap.parse_args()
    drained, restarted = faults(args.n, True), faults(args.n, False)
    rows = [d[:1] + d[1:] + r[1:] for d, r in zip(drained, restarted)]
    print(
        Table(
            [
                "fault",
                "tier",
                "prompt back (s)",
                "processes replaced",
                "variable kept",
                "kill-and-restart: tier",
                "prompt back (s)",
                "processes replaced",
                "variable kept",
            ],
            rows,
            f"{args.n} local ranks, each fault with the drain and with drain=False",
        )
    )
    (db, dt), (rb, rt) = first_token_after_failure(True), first_token_after_failure(False)
    print()
    print(
        Table(
            ["bundled model, 2 ranks (pipeline)", "after a drain", "after restart + replay", "restart / drain"],
            [
                ["failing cell: prompt back (s)", f"{db:.2f}", f"{rb:.2f}", f"{rb / db:.1f}x"],
                ["next %mlx_generate: first token (s)", f"{dt:.2f}", f"{rt:.2f}", f"{rt / dt:.1f}x"],
                [
                    "failing cell to the next first token (s)",
                    f"{db + dt:.2f}",
                    f"{rb + rt:.2f}",
                    f"{(rb + rt) / (db + dt):.1f}x",
                ],
            ],
            "a rank raises before an all_sum, then the next generation",
        )
    )


if __name__ == "__main__":
    main()
