"""Fine-tuning throughput and memory for 1, 2 and 4 ranks, measured in one run: LoRA, full
fine-tuning data-parallel and FSDP, and the reduce-scatter FSDP runs against all_sum.

    .venv/bin/python benchmarks/finetune.py --ranks 1,2,4 --iters 5                 # every table
    .venv/bin/python benchmarks/finetune.py --tables full,reduce-scatter --iters 4
    python benchmarks/finetune.py --llama3b --tokenizer .gpu/tokenizer --ranks 1,2  # on a GPU

Weak scaling: every rank takes ``--batch-size`` rows per step, so the global batch grows with
the ranks. For each rank count (and method) a fresh cluster runs ``mlx_nb.finetune`` on the
bundled data; the first ``--warmup`` steps (compile, first touches) are left out, and tokens/s
is the trained tokens of the other steps over their time (rank 0's view of the global batch).

- ``lora``: the ratio to the first rank count and the scaling efficiency (ratio / ranks).
- ``full``: full fine-tuning, data-parallel (every rank holds the model, its gradients and
  Adam's state) at every rank count and FSDP (each rank a 1/N shard) above one rank: s/step,
  tokens/s and the peak memory of the rank that held most, each against data-parallel on the
  first rank count; and the plan's estimate of that peak (``mlx_nb.train_plan.estimate``).
- ``reduce-scatter``: on each rank count above one, at the model's gradient sizes (its largest
  block and the rest: embeddings, norm, head), the median time of ``all_sum``, of the
  reduce-scatter FSDP runs (MLX's ``sum_scatter`` where the backend has one, else mlx_nb's
  ``all_sum`` + slice), and of a ring of ``send``/``recv`` hops that moves half the bytes but
  needs a second stream for its sends, which then race the other collectives of a training
  graph for the same sockets (so it is measured alone here, and FSDP does not use it).

``--llama3b`` builds benchmarks/random_llama.py's llama of about 3e9 parameters (random weights, bfloat16,
once, into ``--model-dir``) with the tokenizer in ``--tokenizer`` and fine-tunes it fully; ranks
share this machine's devices (on one GPU, 2 ranks share it over the ring backend; with a GPU per
rank, ``--backend nccl`` runs MLX's own sum_scatter). On the lent H200, with the wheels carried
as docs/carrying-wheels.md says (its last call, with this command in place of gpu.py's)::

    python3 benchmarks/finetune.py --llama3b --tokenizer .gpu/tokenizer --ranks 1,2 \
        --tables full,reduce-scatter --iters 4 --max-seq-length 128 --repeats 5
Ranks share this machine's cores: where there are fewer cores than ranks, expect no speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlx_nb import Cluster
from mlx_nb.display import Table, human_bytes
from mlx_nb.finetune import FinetuneResult, finetune
from mlx_nb.models import bundled_model

TABLES = ("lora", "full", "reduce-scatter")


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


@dataclass
class Measured:
    """One run: what trained, how fast, with what peak memory (and the plan's estimate)."""

    label: str
    ranks: int
    result: FinetuneResult
    tokens: int
    seconds: float
    steps: int
    planned: int = 0

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds

    @property
    def peak(self) -> int:
        return max(self.result.peak_memory)


def measure(label: str, n: int, args, folder: str, **options) -> Measured:
    """A fresh cluster of ``n`` ranks fine-tunes; with ``method="full"``, also the plan's peak."""
    from mlx_nb.models import prefers_dense, prepare_bundled
    from mlx_nb.train_plan import estimate

    with Cluster(n=n, backend=args.backend if n > 1 else None) as cluster:
        result = finetune(
            cluster,
            model=args.model,
            iters=args.iters,
            batch_size=args.batch_size,
            max_seq_length=args.max_seq_length,
            adapter_path=folder,
            save_every=10**6,
            **options,
        ).wait()
        # the folder and dtype the ranks trained (the bundled model's dense copy where they prefer it)
        path = Path(args.model) if args.model else prepare_bundled(cluster.ranks)
        dense = all(prefers_dense(r.device, r.blas) for r in cluster.ranks)
    tokens, seconds = throughput(result, args.warmup)
    m = Measured(label, n, result, tokens, seconds, args.iters - args.warmup)
    if options.get("method") == "full":
        m.planned = estimate(path, n, options["fsdp"], args.batch_size, args.max_seq_length, dense).total
    print(f"{label}, {n} rank(s): {tokens} tokens in {seconds:.1f} s of timed steps, peak {human_bytes(m.peak)}")
    return m


def lora_table(args, tmp: str) -> Table:
    measured = [
        measure("LoRA", n, args, os.path.join(tmp, f"lora-{n}"), num_layers=args.num_layers) for n in args.ranks
    ]
    base = measured[0]
    rows = [
        [
            m.ranks,
            m.result.global_batch,
            f"{m.seconds / m.steps:.2f}",
            f"{m.tps:.1f}",
            f"{m.tps / base.tps:.2f}x",
            f"{m.tps / base.tps / (m.ranks / base.ranks):.2f}",
            f"{m.result.seconds:.0f}",
        ]
        for m in measured
    ]
    title = (
        f"LoRA fine-tuning, {args.name}, {args.batch_size} row(s) per rank, {args.num_layers} LoRA layers, "
        f"steps {args.warmup + 1}-{args.iters} timed, {os.cpu_count()} CPU cores"
    )
    columns = ["ranks", "global batch", "s/step", "trained tok/s", f"vs {base.ranks} rank", "efficiency", "run s"]
    return Table(columns, rows, title)


def full_table(args, tmp: str) -> Table:
    measured = []
    for n in args.ranks:
        for fsdp in (False, True) if n > 1 else (False,):
            label = "FSDP" if fsdp else "data-parallel"
            measured.append(measure(label, n, args, os.path.join(tmp, f"full-{label}-{n}"), method="full", fsdp=fsdp))
    base = measured[0]
    rows = [
        [
            m.label,
            m.ranks,
            m.result.global_batch,
            f"{m.seconds / m.steps:.2f}",
            f"{m.tps:.1f}",
            f"{m.tps / base.tps:.2f}x",
            human_bytes(m.peak),
            f"{m.peak / base.peak:.2f}x",
            human_bytes(m.planned),
            f"{m.planned / m.peak:.2f}",
        ]
        for m in measured
    ]
    title = (
        f"full fine-tuning, {args.name}, {args.batch_size} row(s) per rank of at most {args.max_seq_length} tokens, "
        f"steps {args.warmup + 1}-{args.iters} timed; peak: the rank that held most; against data-parallel on "
        f"{base.ranks} rank; {os.cpu_count()} CPU cores"
    )
    columns = [
        "method",
        "ranks",
        "global batch",
        "s/step",
        "trained tok/s",
        "tok/s vs base",
        "peak memory per rank",
        "vs base",
        "planned peak",
        "planned / measured",
    ]
    return Table(columns, rows, title)


def time_collectives(sizes: list[int], dtype: str, repeats: int) -> list[dict]:
    """On every rank: median seconds of all_sum, FSDP's reduce-scatter and a send/recv ring
    reduce-scatter for each size (elements), each checked against all_sum + slice."""
    import time

    import mlx.core as mx

    from mlx_nb.rank import world
    from mlx_nb.rank.fsdp import NATIVE, sum_then_slice
    from mlx_nb.rank.session import state

    group = world()
    n, r = group.size(), group.rank()
    send_stream = mx.new_stream(mx.cpu)

    def ring(x):
        # N - 1 hops; each rank sends a running sum right while it receives one from the left
        # (sends on a stream of their own: the ring's send returns once the peer read it all)
        m = x.shape[0] // n
        block = lambda i: x[(i % n) * m : (i % n + 1) * m]  # noqa: E731
        acc = block(r - 1)
        for hop in range(1, n):
            sent = mx.distributed.send(acc, (r + 1) % n, group=group, stream=send_stream)
            got = mx.distributed.recv_like(acc, (r - 1) % n, group=group)
            acc = mx.depends(got, sent) + block(r - hop - 1)
        return acc

    def fsdp(x):
        return mx.distributed.sum_scatter(x, group=group) if state.backend in NATIVE else sum_then_slice(x, group)

    ops = {"all_sum": lambda x: mx.distributed.all_sum(x, group=group), "fsdp": fsdp}
    if state.backend == "ring" and mx.default_device() == mx.cpu:  # its send/recv, on the CPU
        ops["ring"] = ring
    rows = []
    for size in sizes:
        x = mx.random.normal((n, size // n), key=mx.random.key(r)).astype(getattr(mx, dtype))
        mx.eval(x)
        reference = sum_then_slice(x, group)
        times = {}
        for name, op in ops.items():
            out = op(x)
            mx.eval(out)
            if name != "all_sum" and not mx.allclose(out, reference, rtol=1e-2, atol=1e-2).item():
                raise AssertionError(f"{name} differs from all_sum + slice at {size} elements")
            times[name] = []
        for _ in range(repeats):  # the three take turns, so load on the machine falls on each
            for name, op in ops.items():
                t0 = time.perf_counter()
                mx.eval(op(x))
                times[name].append(time.perf_counter() - t0)
        rows.append({name: statistics.median(t) for name, t in times.items()})
    return rows


def reduce_scatter_table(args) -> Table:
    from mlx_nb.rank.fsdp import reduce_scatter_name
    from mlx_nb.train_plan import model_parameters

    if __name__ != "__main__":  # imported (as the dry runs do): the ranks cannot import this file
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = json.loads((args.model_path / "config.json").read_text())
    params = model_parameters({**config.get("text_config", {}), **config})
    itemsize = 2 if args.llama3b else 4
    units = {"largest block": max(params.blocks), "rest (embeddings, norm, head)": params.rest}
    rows = []
    for n in [k for k in args.ranks if k > 1]:
        sizes = {what: -(-count // n) * n for what, count in units.items()}  # divisible by the ranks
        with Cluster(n=n, backend=args.backend if n > 1 else None) as cluster:
            timed = cluster.call(
                time_collectives, list(sizes.values()), "bfloat16" if args.llama3b else "float32", args.repeats
            )
            fsdp_name = reduce_scatter_name(cluster.backend, n)
        worst = [{k: max(t[i][k] for t in timed) for k in timed[0][i]} for i in range(len(sizes))]
        for (what, size), t in zip(sizes.items(), worst):
            ring = [f"{t['ring'] * 1e3:.1f}", f"{t['ring'] / t['all_sum']:.2f}x"] if "ring" in t else ["-", "-"]
            rows.append(
                [
                    n,
                    what,
                    human_bytes(size * itemsize),
                    f"{t['all_sum'] * 1e3:.1f}",
                    f"{t['fsdp'] * 1e3:.1f}",
                    f"{t['fsdp'] / t['all_sum']:.2f}x",
                    *ring,
                ]
            )
    title = (
        f"reduce-scatter of FSDP's gradients ({args.name}, {args.backend} backend: {fsdp_name}) against all_sum, "
        f"median of {args.repeats}, the slowest rank; a send/recv ring measured alone"
    )
    columns = [
        "ranks",
        "gradient of",
        "size",
        "all_sum ms",
        "FSDP's ms",
        "vs all_sum",
        "send/recv ring ms",
        "vs all_sum",
    ]
    return Table(columns, rows, title)


def llama3b(args) -> Path:
    """benchmarks/random_llama.py's llama, built once into ``args.model_dir``."""
    sys.path.insert(0, str(Path(__file__).parent))
    from random_llama import write_random_llama  # benchmarks/random_llama.py

    if not (args.model_dir / "config.json").exists():
        write_random_llama(args.model_dir, args.tokenizer)
    return args.model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4", help="rank counts, comma separated; the first is the baseline")
    parser.add_argument("--tables", default=",".join(TABLES), help=f"which tables, of {', '.join(TABLES)}")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per rank per step")
    parser.add_argument("--max-seq-length", type=int, default=64, help="tokens per row at most (full fine-tuning)")
    parser.add_argument("--num-layers", type=int, default=2, help="LoRA layers")
    parser.add_argument("--repeats", type=int, default=10, help="timings per size and collective")
    parser.add_argument("--backend", default="ring", help="of the clusters above one rank (ring, mpi, nccl, ...)")
    parser.add_argument("--model", default=None, help="mlx-lm path or repo id (default: the bundled SmolLM2)")
    parser.add_argument(
        "--llama3b", action="store_true", help="benchmarks/random_llama.py's random 3e9-parameter llama"
    )
    parser.add_argument("--tokenizer", type=Path, default=Path(".gpu/tokenizer"), help="for --llama3b")
    parser.add_argument(
        "--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "mlx_nb-random-llama-3b", help="for --llama3b"
    )
    args = parser.parse_args()
    if args.iters <= args.warmup:
        parser.error("--iters must be larger than --warmup")
    args.ranks = [int(x) for x in args.ranks.split(",")]
    tables = args.tables.split(",")
    if unknown := set(tables) - set(TABLES):
        parser.error(f"--tables: {', '.join(sorted(unknown))} unknown; use {', '.join(TABLES)}")
    if args.llama3b:
        args.model = str(llama3b(args))
        args.name = "random-weight llama, about 3e9 parameters, bfloat16"
    else:
        args.name = args.model or "bundled SmolLM2-135M"
    args.model_path = Path(args.model) if args.model else bundled_model()  # its config: shapes only

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        if "lora" in tables:
            out.append(lora_table(args, tmp))
        if "full" in tables:
            out.append(full_table(args, tmp))
    if "reduce-scatter" in tables:
        out.append(reduce_scatter_table(args))
    for table in out:
        print()
        print(table)


if __name__ == "__main__":
    main()
