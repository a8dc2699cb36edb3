"""Linux CPU ranks: MLX's bundled reference BLAS against the optimized one mlx_nb loads (OpenBLAS).

    python benchmarks/blas.py [--ranks 1,2] [--rounds 2] [--tokens 16] [--iters 4]

For each round, BLAS (MLX_NB_BLAS=off, then the default) and rank count, a fresh
cluster measures: a float32 1024x1024 matmul on every rank at once (GFLOP/s per rank,
median of 5); prefill and decode tok/s of the bundled SmolLM2 as the 4-bit folder and
as its dense float32 copy (a pipeline over 2 ranks), after one warm-up reply; and LoRA
fine-tuning seconds per step with the model fine-tuning picks by default (from the
4-bit folder, a dense bf16 copy on the reference BLAS; the dense float32 copy with
OpenBLAS), steps after the first. Rounds alternate the two BLAS so that load on the
machine falls on both; the table shows each measure's median over the rounds, and
the ratio's lowest and highest round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from finetune import throughput  # noqa: E402  (benchmarks/finetune.py)

from mlx_nb import Cluster  # noqa: E402
from mlx_nb.display import Table  # noqa: E402
from mlx_nb.finetune import finetune  # noqa: E402
from mlx_nb.generate import generate, load_model  # noqa: E402
from mlx_nb.models import bundled_model  # noqa: E402

PROMPT = [
    {
        "role": "user",
        "content": "Write a story about a lighthouse keeper who finds a message in a bottle, "
        "and tell what the message says, who wrote it, and what the keeper does next.",
    }
]
MATMUL = """
import time
a, b = mx.random.normal((1024, 1024)), mx.random.normal((1024, 1024))
mx.eval(a, b, a @ b)
times = []
for _ in range(5):
    t0 = time.perf_counter()
    mx.eval(a @ b)
    times.append(time.perf_counter() - t0)
_gflops = 2 * 1024**3 / sorted(times)[2] / 1e9
"""
SETTINGS = {"reference": "off", "optimized": "auto"}


def measure(setting: str, n: int, tokens: int, iters: int, tmp: str) -> dict[str, float]:
    """One cluster of ``n`` ranks with MLX_NB_BLAS=``setting``: every measure once."""
    out: dict[str, float] = {}
    with Cluster(n=n, env={"MLX_NB_BLAS": setting}, spares=False) as cluster:
        out["blas"] = cluster.ranks[0].blas.name
        cluster.run(MATMUL, quiet=True)
        out["matmul"] = statistics.mean(cluster.pull("_gflops", ranks="all"))
        for name, dense in (("4-bit", False), ("dense f32", True)):
            load_model(cluster, str(bundled_model(dense=dense)), pipeline=n > 1, progress=False)
            generate(cluster, PROMPT, 4, quiet=True)
            stats = generate(cluster, PROMPT, tokens, quiet=True)
            out[f"prefill {name}"], out[f"decode {name}"] = stats.prompt_tps, stats.generation_tps
        result = finetune(
            cluster,
            iters=iters,
            batch_size=1,
            num_layers=2,
            adapter_path=tempfile.mkdtemp(prefix=f"{setting}-{n}-", dir=tmp),
        ).wait()
        trained, seconds = throughput(result, warmup=1)
        out["finetune"] = seconds / (iters - 1)
    print(
        f"{setting} BLAS ({out['blas']}), {n} rank(s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in out.items() if k != "blas"),
        flush=True,
    )
    return out


ROWS = [  # key, label, higher is better
    ("matmul", "float32 matmul 1024, GFLOP/s per rank", True),
    ("prefill 4-bit", "prefill tok/s, 4-bit model", True),
    ("prefill dense f32", "prefill tok/s, dense float32 copy", True),
    ("decode 4-bit", "decode tok/s, 4-bit model", True),
    ("decode dense f32", "decode tok/s, dense float32 copy", True),
    ("finetune", "LoRA fine-tuning s/step (default model)", False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2", help="rank counts, comma separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16, help="tokens decoded per reply")
    parser.add_argument("--iters", type=int, default=4, help="fine-tuning steps (the first is not timed)")
    args = parser.parse_args()
    if sys.platform != "linux":
        parser.error("this compares BLAS libraries that mlx_nb loads on Linux only")
    ranks = [int(x) for x in args.ranks.split(",")]
    bundled_model(dense=True)  # converted once, before any timing
    runs: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for n in ranks:
                for which, setting in SETTINGS.items():
                    runs.setdefault((which, n), []).append(measure(setting, n, args.tokens, args.iters, tmp))
    names = {which: runs[(which, ranks[0])][0]["blas"] for which in SETTINGS}
    rows = []
    for key, label, higher in ROWS:
        for n in ranks:
            ref, opt = runs[("reference", n)], runs[("optimized", n)]
            ratios = [(o[key] / r[key]) if higher else (r[key] / o[key]) for r, o in zip(ref, opt)]
            med_ref, med_opt = (statistics.median(x[key] for x in runs[(w, n)]) for w in SETTINGS)
            ratio = med_opt / med_ref if higher else med_ref / med_opt
            rows.append(
                [
                    label,
                    n,
                    f"{med_ref:.2f}",
                    f"{med_opt:.2f}",
                    f"{ratio:.1f}x",
                    f"{min(ratios):.1f}x-{max(ratios):.1f}x",
                ]
            )
    title = (
        f"{names['reference']} vs {names['optimized']}: bundled SmolLM2, {args.tokens} tokens decoded, "
        f"{args.rounds} round(s), {os.cpu_count()} CPU cores (ratio: how many times faster)"
    )
    print(Table(["measure", "ranks", "reference BLAS", "optimized BLAS", "ratio", "ratio per round"], rows, title))


if __name__ == "__main__":
    main()
