"""Sharded generation, run inside every rank: load a model split over a group, then stream.

Every rank calls the same functions with the same arguments, in the same
order: the model's collectives pair up across ranks, so a rank that skips a
call or stops iterating early leaves the others waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse, generation_stream, stream_generate
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import sharded_load

from .models import check_split, resolve

Prompt = Union[str, list[dict[str, Any]], list[int]]


def load(
    model: Optional[str],
    group: mx.distributed.Group,
    pipeline: bool = False,
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load ``model`` split over ``group``: tensor parallel, or a pipeline of layers.

    ``model`` is a path or repo id for mlx-lm, or ``None`` for the bundled
    SmolLM2. A split the model cannot take raises ``ValueError`` before any
    weight is read.

    Example:
        >>> model, tokenizer = load(None, mx.distributed.init(), pipeline=True)
    """
    path = resolve(model)
    check_split(path, group.size(), pipeline)
    if pipeline:
        return sharded_load(path, pipeline_group=group)
    return sharded_load(path, tensor_group=group)


def stream(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: Prompt,
    max_tokens: int = 256,
    group: Optional[mx.distributed.Group] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    *,
    stop_every: int = 1,
    **kwargs: Any,
) -> Iterator[GenerationResponse]:
    """Stream mlx-lm ``GenerationResponse`` rows for ``prompt``, greedy unless a sampler is given.

    ``prompt`` is text, token ids, or chat messages (``[{"role": "user",
    "content": ...}]``, which go through the chat template). ``kwargs`` go to
    ``mlx_lm.stream_generate`` (``sampler``, ``prefill_step_size``...).

    Stopping: a signal cannot interrupt MLX's native waits, so a sharded model
    stops on a flag. Every ``stop_every`` tokens the ranks of ``group`` sum
    their ``should_stop()`` (typically only rank 0 passes one); once any rank
    says stop, every rank ends at the same token, one check later so that the
    sum never stalls generation (a single process stops at once). Iterate to
    the end on every rank.

    Example:
        >>> for r in stream(model, tokenizer, [{"role": "user", "content": "Hi"}], 32, group):
        ...     print(r.text, end="")
    """
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    shared = group is not None and group.size() > 1
    agreed: Optional[mx.array] = None
    for n, response in enumerate(
        stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs), 1
    ):
        yield response
        if response.finish_reason is not None or n % stop_every:
            continue
        stop = should_stop is not None and should_stop()
        if shared:
            # The previous check's sum is ready by now, so reading it costs no
            # wait; the new one queues on the generation stream behind the
            # model's own collectives, in the same order on every rank.
            if agreed is not None and agreed.item() > 0:
                return
            with mx.stream(generation_stream):
                agreed = mx.distributed.all_sum(mx.array(int(stop)), group=group)
            mx.async_eval(agreed)
        elif stop:
            return


# ----------------------------------------------------------- rank side, for the notebook
def _rank_load(model: Optional[str], pipeline: bool, adapter_path: Optional[str]) -> dict:
    """Load the model into this rank's cell namespace (every rank at once)."""
    import time

    from mlx_lm import load as load_full

    from .engine import namespace

    world = namespace["world"]
    t0 = time.perf_counter()
    mx.reset_peak_memory()
    if adapter_path:
        # LoRA adapters wrap unsharded layers: every rank holds the whole adapted model
        model_, tokenizer = load_full(resolve(model), adapter_path=adapter_path)
        group = None
    else:
        model_, tokenizer = load(model, world, pipeline)
        group = world
    namespace["_mlx_nb_llm"] = (model_, tokenizer, group)
    return {"seconds": time.perf_counter() - t0, "active_memory": mx.get_active_memory(), "peak_memory": mx.get_peak_memory()}


def _rank_generate(prompt: Prompt, max_tokens: int) -> dict:
    """Generate on every rank; rank 0 reports each piece of text to the notebook as it comes."""
    import time

    from .engine import namespace, report, stop_requested

    if "_mlx_nb_llm" not in namespace:
        raise RuntimeError("no model is loaded on the ranks: call mlx_nb.generate.load_model(cluster) first")
    model, tokenizer, group = namespace["_mlx_nb_llm"]
    rank = namespace["rank"]
    t0, ttft, pieces, tokens, last = time.perf_counter(), None, [], [], None
    for r in stream(model, tokenizer, prompt, max_tokens, group, should_stop=stop_requested):
        if ttft is None:
            ttft = time.perf_counter() - t0
        if rank == 0 and r.text:
            report(text=r.text, t=time.time())
        pieces.append(r.text)
        tokens.append(r.token)
        last = r
    return {
        "text": "".join(pieces), "tokens": tokens, "prompt_tokens": last.prompt_tokens, "prompt_tps": last.prompt_tps,
        "generation_tokens": last.generation_tokens, "generation_tps": last.generation_tps,
        "ttft": ttft or 0.0, "finish_reason": last.finish_reason, "stopped": stop_requested(),
    }


# ------------------------------------------------------------------- notebook side
@dataclass
class GenerationStats:
    """One reply: its text and how fast it came (rank 0's view), and memory per rank."""

    text: str
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft: float  # seconds to the first token, on rank 0
    peak_memory: list[int]  # per rank
    finish_reason: Optional[str]
    stopped: bool
    tokens: list[int] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)  # token produced on rank 0 -> notebook, s

    def summary(self) -> str:
        from .display import human_bytes

        mem = ", ".join(human_bytes(m) for m in self.peak_memory)
        how = " (stopped)" if self.stopped else ""
        return (
            f"prompt {self.prompt_tokens} tok at {self.prompt_tps:.1f} tok/s | generated {self.generation_tokens} tok "
            f"at {self.generation_tps:.1f} tok/s{how} | first token {self.ttft * 1e3:.0f} ms | peak memory per rank: {mem}"
        )


_LOAD = "from mlx_nb.generate import _rank_load\n_mlx_nb_loaded = _rank_load(_mlx_nb_model, _mlx_nb_pipeline, _mlx_nb_adapter)"


def _progress_line(done: int, total: int, message: str) -> None:
    bar = "#" * (20 * done // max(total, 1))
    print(f"\rconverting the bundled model [{bar:<20}] {done}/{total} {message:<40}", end="", flush=True)
    if done >= total:
        print()


def load_model(
    cluster,
    model: Optional[str] = None,
    *,
    pipeline: bool = False,
    adapter_path: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Load ``model`` on every rank, split tensor-parallel (or ``pipeline=True``), and keep it.

    ``model``: None for the bundled SmolLM2, else any mlx-lm path or repo id.
    A split the model cannot take fails before anything is loaded, saying which
    rank counts work. The load is a setup cell: it is replayed if the ranks are
    ever restarted. Returns load seconds and per-rank memory.

    Example::

        load_model(cluster)                       # tensor parallel over all ranks
        generate(cluster, "What is the capital of France?")
    """
    import time

    from .models import prepare_bundled

    if model is None or str(model).lower() in ("smollm2", "bundled"):
        # converted here, once, with a progress line: the ranks then only read it
        path = prepare_bundled(cluster.ranks, progress=_progress_line if progress else None)
        if progress and "F32" in path.name:
            print("the ranks load the bundled model's dense float32 copy: on a CPU with OpenBLAS it "
                  "runs faster than the 4-bit one (MLX's quantized CPU kernels use no BLAS)")
    if adapter_path is None:
        check_split(resolve(model), cluster.n, pipeline)
    if progress:
        print(f"loading on {cluster.n} ranks...", end="", flush=True)
    t0 = time.perf_counter()
    cluster.setup_cells[:] = [c for c in cluster.setup_cells if c.code != _LOAD]  # the latest load replaces earlier ones
    cell = cluster.run(
        _LOAD, push={"_mlx_nb_model": model, "_mlx_nb_pipeline": pipeline, "_mlx_nb_adapter": adapter_path},
        quiet=True, pull="_mlx_nb_loaded", setup=True,
    )
    if progress:
        print(f" done in {time.perf_counter() - t0:.1f} s")
    return {**cell.pulled, "peak_memory": [r["peak_memory"] for r in cell.results],
            "active_memory": [r["active_memory"] for r in cell.results]}


def generate(
    cluster,
    prompt: Prompt,
    max_tokens: int = 256,
    *,
    on_text: Optional[Callable[[str], None]] = None,
    quiet: bool = False,
    timeout: Optional[float] = None,
) -> GenerationStats:
    """Generate with the model loaded on the cluster, streaming rank 0's text as it comes.

    Text goes to ``on_text`` (or is printed unless ``quiet``). The notebook's
    interrupt stops every rank at the same token. Greedy decoding.

    Example::

        stats = generate(cluster, [{"role": "user", "content": "Hi!"}], 64)
        print(stats.summary())
    """
    import time

    delays: list[float] = []

    def on_report(rank: int, data: dict) -> None:
        delays.append(time.time() - data["t"])
        if on_text is not None:
            on_text(data["text"])
        elif not quiet:
            print(data["text"], end="", flush=True)

    cell = cluster.run(
        "from mlx_nb.generate import _rank_generate\n_mlx_nb_reply = _rank_generate(_mlx_nb_prompt, _mlx_nb_max_tokens)",
        push={"_mlx_nb_prompt": prompt, "_mlx_nb_max_tokens": max_tokens},
        quiet=True, pull="_mlx_nb_reply", on_report=on_report, timeout=timeout,
    )
    if on_text is None and not quiet:
        print()
    r = cell.pulled
    return GenerationStats(
        r["text"], r["prompt_tokens"], r["prompt_tps"], r["generation_tokens"], r["generation_tps"], r["ttft"],
        [res["peak_memory"] for res in cell.results], r["finish_reason"], r["stopped"], r["tokens"], delays,
    )
