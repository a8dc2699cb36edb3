"""Sharded generation: mlx_nb against a plain mlx.launch script and one process.

    python benchmarks/generate.py [-n 2] [--pipeline] [--tokens 32]

Same model (the bundled SmolLM2), prompt, rank count and token count for every
column; one table, ratios against the plain script measured in this run. The
script's ranks and this process load the BLAS that mlx_nb's ranks load (OpenBLAS on
Linux where installed; MLX_NB_BLAS=off for none), so every column runs the same
BLAS and the same folder (on such a CPU, the bundled model's dense copy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mlx_nb.rank import blas

blas.use()  # before anything imports mlx.core, as in the ranks

from mlx_nb import Cluster  # noqa: E402
from mlx_nb.display import Table  # noqa: E402
from mlx_nb.generate import generate, load_model  # noqa: E402
from mlx_nb.models import resolve  # noqa: E402

PROMPT = [{"role": "user", "content": "Write three sentences about the sea."}]

SCRIPT = """
import json, sys, time
from mlx_nb.rank import blas
blas.use()
import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.utils import sharded_load
group = mx.distributed.init(strict=True, backend="ring")
path, pipeline, tokens, prompt = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), json.loads(sys.argv[4])
model, tokenizer = sharded_load(path, pipeline_group=group if pipeline else None, tensor_group=None if pipeline else group)
prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
t0, ttft = time.perf_counter(), None
for r in stream_generate(model, tokenizer, prompt, max_tokens=tokens):
    ttft = ttft or time.perf_counter() - t0
if group.rank() == 0:
    print(json.dumps({"tps": r.generation_tps, "ttft": ttft, "tokens": r.generation_tokens}))
"""


def single_process(tokens: int) -> dict:
    import time

    from mlx_lm import load, stream_generate

    model, tokenizer = load(resolve(None))
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    t0, ttft = time.perf_counter(), None
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=tokens):  # noqa: B007 (the last row counts)
        ttft = ttft or time.perf_counter() - t0
    return {"tps": last.generation_tps, "ttft": ttft, "tokens": last.generation_tokens}


def plain_script(n: int, pipeline: bool, tokens: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(SCRIPT)
    launcher = str(Path(sys.executable).parent / "mlx.launch")
    out = subprocess.run(
        [
            launcher,
            "-n",
            str(n),
            "--backend",
            "ring",
            "--",
            sys.executable,
            f.name,
            resolve(None),
            "1" if pipeline else "0",
            str(tokens),
            json.dumps(PROMPT),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
        env={**os.environ, blas.RANKS_ENV: str(n)},
    )
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2)
    parser.add_argument("--pipeline", action="store_true", help="pipeline parallel (default tensor)")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    one = single_process(args.tokens)
    script = plain_script(args.n, args.pipeline, args.tokens)
    with Cluster(n=args.n) as cluster:
        load_model(cluster, pipeline=args.pipeline)
        generate(cluster, PROMPT, 4, quiet=True)  # warm, as the script's first call is
        stats = generate(cluster, PROMPT, args.tokens, quiet=True)
    delays = sorted(stats.delays)
    p90 = delays[int(0.9 * (len(delays) - 1))]
    layout = "pipeline" if args.pipeline else "tensor"
    rows = [
        [
            "generation tok/s",
            f"{stats.generation_tps:.2f}",
            f"{script['tps']:.2f}",
            f"{one['tps']:.2f}",
            f"{stats.generation_tps / script['tps']:.2f}x",
        ],
        [
            "time to first token (ms)",
            f"{stats.ttft * 1e3:.0f}",
            f"{script['ttft'] * 1e3:.0f}",
            f"{one['ttft'] * 1e3:.0f}",
            f"{stats.ttft / script['ttft']:.2f}x",
        ],
        ["token -> notebook delay, median (ms)", f"{statistics.median(delays) * 1e3:.1f}", "-", "-", "-"],
        ["token -> notebook delay, p90 (ms)", f"{p90 * 1e3:.1f}", "-", "-", "-"],
    ]
    title = f"bundled SmolLM2 ({Path(resolve(None)).name}), {layout} parallel on {args.n} ranks, {args.tokens} tokens, {blas.current()}"
    print(Table(["measure", "mlx_nb", f"mlx.launch -n {args.n} script", "one process", "mlx_nb / script"], rows, title))


if __name__ == "__main__":
    main()
