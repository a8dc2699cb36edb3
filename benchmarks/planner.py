"""The planner against the ranks: planned and measured memory per rank, side by side.

    python benchmarks/planner.py [-n 3] [--memory 700MB,260MB,260MB] [--contexts 256,1024] [--model PATH]

For each layout the plan lists (tensor parallel, the even pipeline, the pipeline split by the
budgets given with --memory: default 700MB,260MB,260MB for 3 ranks), the model is loaded with
that layout on ranks without budgets (so that every layout loads, fitting or not), and for each
context a prompt is prefilled and one token generated, the KV cache then holding that many tokens
(the prompt, the token and the one mlx-lm computes ahead; prompt cache off).
Per rank: the plan's weights against what the rank holds after the load, and the plan's total
(weights, KV cache, activations) against the rank's peak during the prompt; the ratio is
planned / measured (above 1: the plan is on the safe side).
"""

from __future__ import annotations

import argparse

from mlx_nb.rank import blas

blas.use()  # before anything imports mlx.core, as in the ranks

from mlx_nb import Cluster  # noqa: E402
from mlx_nb.display import Table, human_bytes  # noqa: E402
from mlx_nb.footprint import read_model  # noqa: E402
from mlx_nb.generate import generate, load_model  # noqa: E402
from mlx_nb.models import bundled_model  # noqa: E402
from mlx_nb.planner import Kind, make_plan, pipeline_layout, tensor_layout  # noqa: E402
from mlx_nb.rank.memory import Budget, BudgetSource, budget  # noqa: E402
from mlx_nb.spec import parse_memory  # noqa: E402


def measure(cluster: Cluster, path: str, layout, contexts: list[int], facts) -> list[list]:
    """Load ``layout`` and prefill each context: one table row per context and rank."""
    pipeline = layout.kind is Kind.PIPELINE
    loaded = load_model(
        cluster,
        path,
        pipeline=pipeline,
        split=layout.split if pipeline else None,
        context=max(contexts),
        cache_limit=0,
        progress=False,
    )
    rows = []
    for context in contexts:
        # context tokens in all: mlx-lm runs one token ahead, so the cache holds the prompt and two more
        prompt = [100 + i % 1000 for i in range(context - 2)]
        stats = generate(cluster, prompt, 1, quiet=True)
        budgets = [Budget(r, 1 << 50, BudgetSource.GIVEN, gpu=loaded.ranks[r].budget.gpu) for r in range(cluster.n)]
        planned = (
            pipeline_layout(facts, budgets, layout.split, context)
            if pipeline
            else tensor_layout(facts, budgets, context)
        )
        for r, (plan, held, peak) in enumerate(zip(planned.memory, loaded.active_memory, stats.peak_memory)):
            rows.append(
                [
                    layout.describe(),
                    context,
                    r,
                    human_bytes(plan.weights),
                    human_bytes(held),
                    f"{plan.weights / held:.2f}",
                    human_bytes(plan.total),
                    human_bytes(peak),
                    f"{plan.total / peak:.2f}",
                ]
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=3, help="local ranks (default 3)")
    parser.add_argument("--memory", default=None, help="budgets the plan splits by (default 700MB,260MB,260MB)")
    parser.add_argument("--contexts", default="256,1024", help="prompt lengths in tokens (default 256,1024)")
    parser.add_argument("--model", default=None, help="an mlx-lm folder (default the bundled dense float32 copy)")
    args = parser.parse_args()
    path = args.model or str(bundled_model(dense=True))
    contexts = [int(c) for c in args.contexts.split(",")]
    sizes = parse_memory(args.memory or ",".join(["700MB"] + ["260MB"] * (args.n - 1)), args.n)
    facts = read_model(path)
    rows = []
    with Cluster(n=args.n) as cluster:
        gpu = cluster.call(budget)[0].gpu
        given = [Budget(r, s, BudgetSource.GIVEN, gpu=gpu) for r, s in enumerate(sizes)]
        layouts = make_plan(facts, given, max(contexts)).layouts
        for layout in layouts:
            rows += measure(cluster, path, layout, contexts, facts)
    columns = ["layout", "context", "rank", "planned weights", "held", "ratio", "planned", "peak", "ratio"]
    device = "GPU" if gpu else "CPU"
    title = (
        f"{facts.name} on {args.n} local ranks ({device}); layouts planned for budgets "
        f"{', '.join(human_bytes(s) for s in sizes)}; ratio = planned / measured"
    )
    print(Table(columns, rows, title))


if __name__ == "__main__":
    main()
