"""Sharded generation from the notebook: load a model over the ranks, then stream replies.

The rank half is :mod:`mlx_nb.rank.generate` (``load`` and ``stream`` are re-exported here,
for use inside cells and ``mlx.launch`` scripts).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .display import Progress, Table, parse_bytes
from .footprint import read_model
from .models import check_adapters, check_split, fused_model, resolve
from .planner import Layout, Plan, check_context, check_ownership, make_plan
from .rank import memory
from .rank.generate import LoadResult, Prompt, Text, cache_on_rank, generate_on_rank, load, load_on_rank, stream
from .rank.prompt_cache import CacheStatus

__all__ = [
    "CacheReport",
    "GenerationStats",
    "LoadedModel",
    "Prompt",
    "generate",
    "load",
    "load_model",
    "plan",
    "prompt_cache",
    "stream",
]


def check_max_tokens(max_tokens: Any, name: str = "--max-tokens") -> None:
    """A reply's token budget: a whole number, 1 or more. The one check behind ``generate``,
    ``generate_batch``, the chat box, the server's default and the magics, made before any
    rank runs; ``name`` is how the message calls it.

    >>> check_max_tokens(0)
    Traceback (most recent call last):
    ...
    ValueError: --max-tokens must be at least 1, got 0
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ValueError(f"{name} must be a whole number of tokens, got {max_tokens!r}")
    if max_tokens < 1:
        raise ValueError(f"{name} must be at least 1, got {max_tokens}")


@dataclass
class GenerationStats:
    """One reply: its text and how fast it came (rank 0's view), and memory per rank."""

    text: str
    prompt_tokens: int  # the whole prompt, cached_tokens included
    prompt_tps: float  # of the tokens prefilled (prompt_tokens - cached_tokens)
    generation_tokens: int
    generation_tps: float
    ttft: float  # seconds to the first token, on rank 0
    peak_memory: list[int]  # per rank
    finish_reason: Optional[str]
    stopped: bool
    tokens: list[int] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)  # token produced on rank 0 -> notebook, s
    cached_tokens: int = 0  # prompt tokens that came from the ranks' prompt cache, not prefilled

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    def summary(self) -> str:
        from .display import human_bytes

        mem = ", ".join(human_bytes(m) for m in self.peak_memory)
        how = " (stopped)" if self.stopped else ""
        prompt = f"prompt {self.prompt_tokens} tok"
        if self.cached_tokens:
            prompt += f" ({self.cached_tokens} cached, {self.prefilled_tokens} prefilled)"
        return (
            f"{prompt} at {self.prompt_tps:.1f} tok/s | generated {self.generation_tokens} tok "
            f"at {self.generation_tps:.1f} tok/s{how} | first token {self.ttft * 1e3:.0f} ms | peak memory per rank: {mem}"
        )


def plan(cluster, model: Optional[str] = None, context: int = 4096, *, progress: bool = True) -> Plan:
    """Which layouts ``model`` allows over the cluster's ranks, and whether each fits their memory.

    Reads only the model's ``config.json`` and safetensors headers (no weight is loaded) and
    asks every rank for its memory budget (:func:`mlx_nb.rank.memory.budget`: measured, or
    ``Cluster(memory=...)``). Lists tensor parallelism over all ranks, a pipeline split evenly
    and a pipeline split by the budgets, each with its memory per rank (weights, the KV cache
    for ``context`` tokens, activations) and whether it fits; recommends, of those that fit, the
    one that sends the fewest bytes per token. Where nothing fits it says by how much, and what
    would (a shorter context, more ranks, a quantized copy). See :mod:`mlx_nb.planner`.

    Example::

        p = plan(cluster, context=1024)      # shows as a table
        load_model(cluster, pipeline=True, split=p.recommended.split)
    """
    check_context(context)  # before anything runs
    return _plan(cluster, _base_path(cluster, model, progress), context)


def _plan(cluster, path: str, context: int) -> Plan:
    budgets = cluster.call(memory.budget, what="the memory budgets")
    return make_plan(read_model(path), budgets, context)


def _checked_load(
    pipeline: bool, split: Any, context: int, adapter_path: Optional[str], cache_limit: Any
) -> Optional[int]:
    """``load_model``'s arguments checked before anything runs; the cache limit in bytes."""
    limit = None if cache_limit is None else parse_bytes(cache_limit, "cache_limit")
    if split is not None and not pipeline:
        raise ValueError("split= gives the layers of each pipeline stage: add pipeline=True (%mlx_generate --pipeline)")
    check_context(context)
    if adapter_path is not None:
        check_adapters(adapter_path)
    return limit


def _load_on_ranks(cluster, args: tuple, layout: Optional[str]) -> list:
    """``load_on_rank(*args)`` on every rank, as a setup step; with ``layout``, said and timed."""
    if layout is not None:
        print(f"loading on {cluster.n} ranks ({layout})...", end="", flush=True)
    t0 = time.perf_counter()
    loads = cluster.call(load_on_rank, *args, setup="load_model", what="a model load")
    if layout is not None:
        print(f" done in {time.perf_counter() - t0:.1f} s")
    return loads


def load_model(
    cluster,
    model: Optional[str] = None,
    *,
    pipeline: bool = False,
    split: Union[str, list[int], None] = None,
    context: int = 4096,
    adapter_path: Optional[str] = None,
    progress: bool = True,
    cache_limit: Optional[Union[int, str]] = None,
) -> LoadedModel:
    """Load ``model`` on every rank, split tensor-parallel (or ``pipeline=True``), and keep it.

    ``model``: None for the bundled SmolLM2 (or, with ``adapter_path``, the model the adapters
    were trained on), else any mlx-lm path or repo id. ``split`` (with ``pipeline=True``): the
    layers per rank, rank 0 first (rank 0 runs the last layers, as mlx-lm counts), or
    ``"auto"``: split by the ranks' memory budgets (:func:`plan`); None splits evenly. Each
    rank reads only its own layers' files. ``adapter_path``: LoRA adapters (a ``finetune``
    run's folder): they are fused into the weights here, once (cached), and the fused model is
    split like any other.

    Before any weight is read, the layout is planned: a split the model cannot take fails
    saying which rank counts work, and one that does not fit the ranks' budgets with
    ``context`` tokens raises :class:`~mlx_nb.planner.DoesNotFit` with the plan's numbers (the
    model loaded before stays). After the load every layer is checked to be on exactly one rank.
    The load is a setup step: it is replayed if the ranks are ever restarted. Each rank lets go
    of the previous model first, so a load that fails on the ranks leaves none.
    Returns a :class:`LoadedModel`: the memory each rank holds beside the plan's, per rank.

    Every rank keeps a prompt cache for the model (KV caches of earlier prompts, reused by the
    prompts that extend them: the next chat turn, a shared system prompt), emptied by the next
    load. ``cache_limit``: the bytes each rank's slice may take (``"2GB"``; 0 turns it off;
    default a quarter of what is left of the rank's memory budget after the load); see
    :func:`prompt_cache`.

    Example::

        load_model(cluster)                       # tensor parallel over all ranks
        generate(cluster, "What is the capital of France?")
        load_model(cluster, pipeline=True, split="auto", context=1024)
        load_model(cluster, adapter_path=run.wait().adapter_path, pipeline=True)
    """
    limit = _checked_load(pipeline, split, context, adapter_path, cache_limit)
    if adapter_path is not None:
        model = _trained_on(adapter_path) if model is None else model
    path = _base_path(cluster, model, progress)
    check_split(path, cluster.n, pipeline)
    planned = _plan(cluster, path, context)
    layout = planned.choose(pipeline, split)  # DoesNotFit before any weight is read
    stages = layout.split if pipeline and split is not None else None  # None: mlx-lm's own even split
    target = model  # each rank resolves it (a host of its own finds its own bundled copy)
    if adapter_path is not None:
        path = target = _fused(path, adapter_path, progress)
    loads = _load_on_ranks(cluster, (target, pipeline, limit, stages), layout.describe() if progress else None)
    if pipeline:  # every layer on exactly one rank, as the plan split them
        check_ownership([range(*r.layers) for r in loads], planned.model.layers, layout.split)
    return LoadedModel(path, layout, planned, loads)


def _layers(start: int, end: int) -> str:
    return f"{start}" if end - start == 1 else f"{start}-{end - 1}"


def _fused(path: str, adapter_path: str, progress: bool) -> str:
    if progress:
        print(f"fusing the adapters of {adapter_path} into {Path(path).name}...", end="", flush=True)
    t0 = time.perf_counter()
    fused = str(fused_model(path, adapter_path))
    if progress:
        print(f" done in {time.perf_counter() - t0:.1f} s ({fused})")
    return fused


@dataclass
class LoadedModel:
    """``load_model``'s result: the folder the ranks loaded, the plan's layout, and each rank's
    load (:class:`~mlx_nb.rank.generate.LoadResult`). Shows the memory each rank holds beside
    the plan's, as a table. ``loaded["active_memory"]`` still reads as it did when load_model
    returned a dict."""

    model: str
    layout: Layout
    plan: Plan
    ranks: list[LoadResult]

    seconds = property(lambda self: max(r.seconds for r in self.ranks), doc="the slowest rank's load")
    active_memory = property(lambda self: [r.active_memory for r in self.ranks])
    peak_memory = property(lambda self: [r.peak_memory for r in self.ranks])
    cache = property(lambda self: [r.cache for r in self.ranks])

    def __getitem__(self, key: str):
        return getattr(self, key)

    def table(self) -> Table:
        from .display import human_bytes

        rows = []
        for r, planned in zip(self.ranks, self.layout.memory):
            start, end = r.layers
            rows.append(
                [
                    r.rank,
                    _layers(start, end) if self.layout.split is not None else "all (a share of each)",
                    human_bytes(planned.weights),
                    human_bytes(r.active_memory),
                    human_bytes(r.peak_memory),
                    human_bytes(planned.total),
                    human_bytes(r.budget.bytes),
                ]
            )
        title = f"{Path(self.model).name}: {self.layout.describe()}, loaded in {self.seconds:.1f} s"
        columns = [
            "rank",
            "layers",
            "planned weights",
            "held",
            "peak",
            f"planned at {self.plan.context} tokens",
            "budget",
        ]
        return Table(columns, rows, title)

    def __repr__(self) -> str:
        return repr(self.table())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


def prompt_cache(cluster, *, clear: bool = False, limit: Optional[Union[int, str]] = None) -> CacheReport:
    """The ranks' prompt cache: entries, tokens and bytes per rank, hits; ``clear=True`` empties
    it, ``limit`` sets each rank's bytes (``"1GB"``; ``"auto"``: the default share), evicting the
    least recently used entries that no longer fit.

    Example::

        prompt_cache(cluster)                 # a table: one row per rank
        prompt_cache(cluster, clear=True)
        prompt_cache(cluster, limit="512MB")
    """
    new = None if limit is None or limit == "auto" else parse_bytes(limit, "limit")
    # ValueError here, before any rank is asked
    rows = cluster.call(cache_on_rank, clear, limit is not None, new, what="the prompt cache")
    return CacheReport(rows)


@dataclass
class CacheReport:
    """``prompt_cache(cluster)``: every rank's :class:`~mlx_nb.rank.prompt_cache.CacheStatus`."""

    ranks: list[CacheStatus]

    def table(self) -> Table:
        from .display import human_bytes

        r0 = self.ranks[0]
        if not r0.enabled:
            return Table(["prompt cache"], [[f"off: {r0.why_off}"]])
        rows = [[s.rank, s.entries, s.tokens, human_bytes(s.bytes), human_bytes(s.limit)] for s in self.ranks]
        share = f"{r0.cached_tokens / r0.prompt_tokens:.0%}" if r0.prompt_tokens else "-"
        title = (
            f"prompt cache: {r0.hits} hits in {r0.lookups} prompts; {r0.cached_tokens} of "
            f"{r0.prompt_tokens} prompt tokens came from it ({share})"
        )
        return Table(["rank", "entries", "tokens", "bytes", "limit"], rows, title)

    def __repr__(self) -> str:
        return repr(self.table())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


def _trained_on(adapter_path: str) -> Optional[str]:
    """The model named in the adapters' config (None: the bundled one)."""
    config = Path(adapter_path) / "adapter_config.json"
    return json.loads(config.read_text()).get("model") if config.exists() else None


def _base_path(cluster, model: Optional[str], progress: bool) -> str:
    """What the ranks load for ``model``: the bundled folder they prefer (converted here, once,
    with a progress line), else the path or repo id as given."""
    from .models import BUNDLED_NAMES, prepare_bundled

    if model is not None and str(model).lower() not in BUNDLED_NAMES:
        return resolve(model)
    bar: list[Progress] = []

    def converting(done: int, total: int, message: str) -> None:
        if not bar:
            bar.append(Progress("converting the bundled model", stream=sys.stdout))
        bar[0].update(done, total, message)
        if done >= total:
            bar[0].close()

    path = prepare_bundled(cluster.ranks, progress=converting if progress else None)
    if progress and "F32" in path.name:
        print(
            "the ranks load the bundled model's dense float32 copy: on a CPU with OpenBLAS it "
            "runs faster than the 4-bit one (MLX's quantized CPU kernels use no BLAS)"
        )
    return str(path)


def generate(
    cluster,
    prompt: Prompt,
    max_tokens: int = 256,
    *,
    on_text: Optional[Callable[[str], None]] = None,
    quiet: bool = False,
    timeout: Optional[float] = None,
    what: str = "generation",
) -> GenerationStats:
    """Generate with the model loaded on the cluster, streaming rank 0's text as it comes.

    Text goes to ``on_text`` (or is printed unless ``quiet``). The notebook's
    interrupt stops every rank at the same token. Greedy decoding.

    Example::

        stats = generate(cluster, [{"role": "user", "content": "Hi!"}], 64)
        print(stats.summary())
    """
    check_max_tokens(max_tokens)
    delays: list[float] = []

    def on_report(rank: int, piece: Text) -> None:
        delays.append(time.time() - piece.t)
        if on_text is not None:
            on_text(piece.text)
        elif not quiet:
            print(piece.text, end="", flush=True)

    replies = cluster.call(generate_on_rank, prompt, max_tokens, on_report=on_report, timeout=timeout, what=what)
    if on_text is None and not quiet:
        print()
    r = replies[0]
    return GenerationStats(
        r.text,
        r.prompt_tokens,
        r.prompt_tps,
        r.generation_tokens,
        r.generation_tps,
        r.ttft,
        [x.peak_memory for x in replies],
        r.finish_reason,
        r.stopped,
        r.tokens,
        delays,
        r.cached_tokens,
    )
