"""Data-parallel LoRA fine-tuning throughput for 1, 2 and 4 ranks, measured in one run.

Weak scaling: every rank takes ``--batch-size`` rows per step, so the global batch
grows with the ranks and ideal throughput grows with them too. For each rank count
a fresh cluster runs ``mlx_nb.finetune`` on the bundled data; the first ``--warmup``
steps (compile, first touches) are left out, and tokens/s is the trained tokens of
the other steps over their time (rank 0's view of the global batch). The table gives
the ratio to 1 rank and the scaling efficiency (ratio / ranks; 1.0 is ideal). Ranks
share this machine's cores: where there are fewer cores than ranks, expect none.

    .venv/bin/python benchmarks/finetune.py --ranks 1,2,4 --iters 5
"""

from __future__ import annotations

import argparse
import os
import tempfile

from mlx_nb import Cluster
from mlx_nb.display import Table
from mlx_nb.finetune import FinetuneResult, finetune


def throughput(result: FinetuneResult, warmup: int) -> tuple[int, float]:
    """Trained tokens and seconds of the steps after ``warmup``."""
    tokens = seconds = 0.0
    previous = 0
    for h in result.history:
        step_tokens = h["trained_tokens"] - previous
        previous = h["trained_tokens"]
        if h["iteration"] > warmup:
            tokens += step_tokens
            seconds += step_tokens / h["tokens_per_second"]
    return int(tokens), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4", help="rank counts, comma separated; the first is the baseline")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per rank per step")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--model", default=None, help="mlx-lm path or repo id (default: the bundled SmolLM2)")
    args = parser.parse_args()
    if args.iters <= args.warmup:
        parser.error("--iters must be larger than --warmup")

    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.ranks.split(",")]:
            with Cluster(n=n) as cluster:
                result = finetune(
                    cluster,
                    model=args.model,
                    iters=args.iters,
                    batch_size=args.batch_size,
                    num_layers=args.num_layers,
                    adapter_path=os.path.join(tmp, str(n)),
                ).wait()
            tokens, seconds = throughput(result, args.warmup)
            measured.append((n, result, tokens, seconds))
            print(f"{n} rank(s): {tokens} tokens in {seconds:.1f} s of timed steps", flush=True)

    base_n, _, base_tokens, base_seconds = measured[0]
    base_tps = base_tokens / base_seconds
    rows = []
    for n, result, tokens, seconds in measured:
        tps = tokens / seconds
        ratio = tps / base_tps
        rows.append(
            [
                n,
                result.global_batch,
                f"{seconds / (args.iters - args.warmup):.2f}",
                f"{tps:.1f}",
                f"{ratio:.2f}x",
                f"{ratio / (n / base_n):.2f}",
                f"{result.seconds:.0f}",
            ]
        )
    title = (
        f"LoRA fine-tuning, {args.model or 'bundled SmolLM2-135M'}, {args.batch_size} row(s) per rank, "
        f"{args.num_layers} LoRA layers, steps {args.warmup + 1}-{args.iters} timed, {os.cpu_count()} CPU cores"
    )
    print(
        Table(
            ["ranks", "global batch", "s/step", "trained tok/s", f"vs {base_n} rank", "efficiency", "run s"],
            rows,
            title,
        )
    )


if __name__ == "__main__":
    main()
