"""One step of batched generation: mlx_nb's ``generate_batch`` against ``mlx_lm.batch_generate``.

    python benchmarks/batch.py [-n 1] [--model PATH] [--tensor] [--prompts 1,8,32] [--tokens 128] [--rounds 3]

Equal footing: both run on the same ranks, in the same processes, on the same loaded model,
prompts and token count, greedy, taking turns (rounds alternate which goes first); every shape
is run once on both sides before timing (on a GPU, MLX compiles a kernel at its first use).
``mlx_lm.batch_generate`` runs inside the ranks as a plain script would under ``mlx.launch``,
on a copy of the model loaded as that script loads it (on every rank at once when the model is
split); ``generate_batch`` is called from the notebook
(this process), as a user calls it, and timed there and on rank 0. mlx_nb's prompt cache is
emptied before each of its runs, so that both prefill every prompt.

The table, per batch size: milliseconds per step (a step is one token for every sequence;
wall time of the whole batch, prefill included, over the longest reply's tokens) for each side, their ratio,
and where mlx_nb's step goes on rank 0: mlx-lm's generator (``BatchGenerator.next``: the
model, sampling, the tokens to Python), the plan (rank 0's decisions and, on several ranks,
the agreement every rank waits for), and the report (detokenising, the report to the notebook).
The last column is the whole call as the notebook sees it (dispatch and the result's return
included), against mlx_lm's time on the rank.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from mlx_nb.rank import blas

blas.use()  # as in the ranks, for the report of what ran

from mlx_nb import Cluster  # noqa: E402
from mlx_nb.batch import generate_batch  # noqa: E402
from mlx_nb.display import Table  # noqa: E402
from mlx_nb.generate import load_model, prompt_cache  # noqa: E402

TOPICS = ["the sea", "a lighthouse", "a mountain", "a city at night", "a forest", "the desert", "a river", "a train"]


def prompts(n: int, seed: int) -> list:
    return [
        [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]} ({seed}-{i})."}]
        for i in range(n)
    ]


def theirs(messages: list, tokens: int, path: str, pipeline: bool) -> dict:
    """On every rank: mlx_lm.batch_generate of ``messages``, as a plain script runs it: on its own
    copy of the model, loaded as such a script loads it (``mlx_lm.load`` for one rank, else
    ``sharded_load``), kept in the cell namespace for the next call."""
    import time

    import mlx.core as mx
    from mlx_lm import batch_generate
    from mlx_lm.utils import load, sharded_load

    from mlx_nb.rank import session
    from mlx_nb.rank.generate import prompt_tokens

    if session.namespace.get("_plain", (None,))[0] != path:
        group = mx.distributed.init()
        if group.size() == 1:
            model, tokenizer = load(path)
        else:
            model, tokenizer = sharded_load(path, **{"pipeline_group" if pipeline else "tensor_group": group})
        session.namespace["_plain"] = (path, model, tokenizer)
    _, model, tokenizer = session.namespace["_plain"]
    ids = [prompt_tokens(tokenizer, m) for m in messages]
    t0 = time.perf_counter()
    r = batch_generate(model, tokenizer, ids, max_tokens=tokens, return_token_ids=True)
    wall = time.perf_counter() - t0
    return {"wall": wall, "steps": max(map(len, r.token_ids)), "tokens": sum(map(len, r.token_ids))}


def split(messages: list, tokens: int, profile: bool = False) -> dict:
    """On every rank: ``generate_batch``'s rank half, with rank 0's time per part of the step
    (``profile``: and Python's profile of it, the functions that took most of their own time)."""
    import cProfile
    import io
    import pstats
    import time

    from mlx_nb.rank import batch as rank_batch

    spent = {"step": 0.0, "plan": 0.0, "emit": 0.0}
    original = rank_batch.Batch

    class Timed(original):  # the batch generate_batch makes, its parts timed on rank 0
        def step(self):
            t0 = time.perf_counter()
            try:
                return super().step()
            finally:
                spent["step"] += time.perf_counter() - t0

    real_run = rank_batch.run

    def run(batch, decide, emit):
        def timed_emit(tokens):
            t0 = time.perf_counter()
            emit(tokens)
            spent["emit"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        steps = real_run(batch, decide, timed_emit)
        spent["plan"] = time.perf_counter() - t0 - spent["step"] - spent["emit"]
        return steps

    rank_batch.Batch, rank_batch.run = Timed, run
    profiler = cProfile.Profile() if profile else None
    try:
        t0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        out = rank_batch.generate_batch_on_rank(messages, tokens, 0.0, 1.0, [0] * len(messages), 32)
        wall = time.perf_counter() - t0
    finally:
        if profiler is not None:
            profiler.disable()
        rank_batch.Batch, rank_batch.run = original, real_run
    made = [len(a.tokens) - (a.finish_reason == "stop") for a in out.answers]  # as mlx_lm counts
    text = ""
    if profiler is not None:
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(25)
        text = buffer.getvalue()
    return {"wall": wall, "steps": max(made), "tokens": sum(made), "profile": text, **spent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1, help="ranks (default 1)")
    parser.add_argument("--model", default=None, help="an mlx-lm model folder (default: the bundled SmolLM2)")
    parser.add_argument("--tensor", dest="pipeline", action="store_false", help="with -n: tensor parallel")
    parser.add_argument("--prompts", default="1,8,32", help="batch sizes")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per reply")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print rank 0's Python profile of one run per size")
    args = parser.parse_args()
    levels = [int(x) for x in args.prompts.split(",")]
    pipeline = args.pipeline and args.n > 1
    rows = []
    with Cluster(n=args.n) as cluster:
        model = load_model(cluster, args.model, pipeline=pipeline, progress=False)["model"]
        for n in levels:
            warm = prompts(n, 1000)
            cluster.call(theirs, warm, args.tokens, model, pipeline)
            generate_batch(cluster, warm, args.tokens, quiet=True)
            if args.profile:
                prompt_cache(cluster, clear=True)
                print(f"rank 0's profile, {n} prompts:\n" + cluster.call(split, warm, args.tokens, True)[0]["profile"])
            got: dict = {"mlx_lm": [], "mlx_nb": [], "notebook": []}
            for i in range(args.rounds):
                batch = prompts(n, i)
                for side in ("mlx_nb", "mlx_lm") if i % 2 == 0 else ("mlx_lm", "mlx_nb"):
                    if side == "mlx_lm":
                        got[side].append(cluster.call(theirs, batch, args.tokens, model, pipeline)[0])
                        continue
                    prompt_cache(cluster, clear=True)
                    got[side].append(cluster.call(split, batch, args.tokens)[0])
                    prompt_cache(cluster, clear=True)
                    t0 = time.perf_counter()
                    r = generate_batch(cluster, batch, args.tokens, quiet=True)
                    got["notebook"].append({"wall": time.perf_counter() - t0, "tokens": r.generation_tokens})
            ms = {side: [1e3 * r["wall"] / max(1, r["steps"]) for r in got[side]] for side in ("mlx_lm", "mlx_nb")}
            part = {k: statistics.median(1e3 * r[k] / max(1, r["steps"]) for r in got["mlx_nb"]) for k in spent_keys()}
            lm, nb = statistics.median(ms["mlx_lm"]), statistics.median(ms["mlx_nb"])
            tps_lm = statistics.median(r["tokens"] / r["wall"] for r in got["mlx_lm"])
            tps_nb = statistics.median(r["tokens"] / r["wall"] for r in got["mlx_nb"])
            tps_book = statistics.median(r["tokens"] / r["wall"] for r in got["notebook"])
            rows.append(
                [
                    n,
                    f"{lm:.2f} ({min(ms['mlx_lm']):.2f}-{max(ms['mlx_lm']):.2f})",
                    f"{nb:.2f} ({min(ms['mlx_nb']):.2f}-{max(ms['mlx_nb']):.2f})",
                    f"{lm / nb:.2f}x",
                    f"{part['step']:.2f} / {part['plan']:.2f} / {part['emit']:.2f}",
                    f"{tps_lm:.1f}",
                    f"{tps_nb:.1f} ({tps_nb / tps_lm:.2f}x)",
                    f"{tps_book:.1f} ({tps_book / tps_lm:.2f}x)",
                ]
            )
            print(rows[-1], flush=True)
    layout = ("pipeline" if pipeline else "tensor") + f" parallel on {args.n} ranks" if args.n > 1 else "1 rank"
    title = (
        f"{Path(model).name}, {layout}, {args.tokens} tokens per reply, greedy; median (range) of "
        f"{args.rounds} rounds; {blas.what_computes()}"
    )
    header = [
        "prompts",
        "mlx_lm ms/step",
        "mlx_nb ms/step",
        "speed ratio",
        "mlx_nb step: generator / plan / report (ms)",
        "mlx_lm tok/s",
        "mlx_nb tok/s on rank 0",
        "generate_batch tok/s in the notebook",
    ]
    print(Table(header, rows, title))


def spent_keys() -> tuple[str, ...]:
    return ("step", "plan", "emit")


if __name__ == "__main__":
    main()
