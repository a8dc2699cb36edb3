"""Sharded generation, the rank half: load a model split over a group, then stream.

Every rank calls the same functions with the same arguments, in the same
order: the model's collectives pair up across ranks, so a rank that skips a
call or stops iterating early leaves the others waiting. The loaded model is
kept in the rank's state (:class:`Loaded`), apart from the user's cell namespace.
"""

from __future__ import annotations

import gc
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse, generation_stream, stream_generate
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load as load_whole

from ..footprint import LAYER_KEY
from ..models import check_split, resolve
from . import memory, prompt_cache, session
from .prompt_cache import PromptCache
from .state import state

Prompt = Union[str, list[dict[str, Any]], list[int]]


def load(
    model: Optional[str],
    group: mx.distributed.Group,
    pipeline: bool = False,
    split: Optional[list[int]] = None,
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load ``model`` split over ``group``: tensor parallel, or a pipeline of layers.

    ``model`` is a path or repo id for mlx-lm, or ``None`` for the bundled
    SmolLM2. ``split``: a pipeline's layers per rank, rank 0 first (rank 0 runs the
    last layers, as mlx-lm counts); None splits evenly. A split the model cannot
    take raises ``ValueError`` before any weight is read.

    Example:
        >>> model, tokenizer = load(None, mx.distributed.init(), pipeline=True, split=[20, 5, 5])
    """
    path = resolve(model)
    check_split(path, group.size(), pipeline)
    if group.size() == 1:
        # whole, as mlx_lm.load loads it: sharded over one rank, every layer would still call
        # its collectives (on a GPU with the ring backend, each a round trip through the host)
        return load_whole(path)
    return _sharded_load(path, group, pipeline, split)


# what sharded_load fetches of a repo before it knows which weights a stage needs
_NOT_WEIGHTS = ["*.json", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt", "*.jsonl", "*.jinja"]


def _sharded_load(
    path: str, group: mx.distributed.Group, pipeline: bool, split: Optional[list[int]]
) -> tuple[nn.Module, TokenizerWrapper]:
    """mlx-lm's ``sharded_load``, step for step, but for two things:

    - a pipeline's layers per rank can be given: mlx-lm's ``PipelineMixin.pipeline`` takes
      ``split``, and ``sharded_load`` never passes one (None: its even split);
    - the weights are read one layer at a time: all at once (``sharded_load``), a rank cutting its
      tensor-parallel share of SmolLM2's dense copy peaked 40 MB (16%) over the 243 MB it keeps;
      layer by layer it never holds more than its share, as the planner counts.

    As there, a pipeline rank fetches and reads only its own layers' files (and every stage the
    embeddings, the final norm and the head)."""
    from mlx_lm.utils import _download, load_model, load_tokenizer

    model_path = _download(path, allow_patterns=_NOT_WEIGHTS)
    model, config = load_model(model_path, lazy=True, strict=False)
    files = None  # every weight file, tensor parallel
    if pipeline:
        layers = len(model.model.layers)
        model.model.pipeline(group, split)
        files = _stage_files(model_path, layers, model.model.start_idx, model.model.end_idx)
    _download(path, allow_patterns=files)
    tokenizer = load_tokenizer(model_path, {"trust_remote_code": True}, eos_token_ids=config.get("eos_token_id"))
    model, _ = load_model(model_path, lazy=True, strict=False)  # now with the weights fetched
    if pipeline:
        model.model.pipeline(group, split)
    else:
        model.shard(group)
    for layer in getattr(model, "layers", []):
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))  # as sharded_load: none times out waiting
    return model, tokenizer


def _stage_files(model_path, layers: int, start: int, end: int) -> list[str]:
    """The weight files that hold layers ``start`` to ``end`` and every tensor of no layer."""
    import json

    index = model_path / "model.safetensors.index.json"
    if not index.exists():  # one file holds everything
        return [p.name for p in model_path.glob("model*.safetensors")] or ["model*.safetensors"]
    files, found = set(), set()
    for key, file in json.loads(index.read_text())["weight_map"].items():
        m = LAYER_KEY.search(key)
        if m is None or start <= int(m[1]) < end:
            files.add(file)
        if m is not None:
            found.add(int(m[1]))
    if missing := set(range(layers)) - found:
        raise ValueError(
            f"The checkpoint has no weights for layers {sorted(missing)}. Convert the model with mlx_lm.convert first."
        )
    return sorted(files)


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
    votes: Optional[mx.array] = None
    for n, response in enumerate(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs), 1):
        yield response
        if response.finish_reason is not None or n % stop_every:
            continue
        stop = should_stop is not None and should_stop()
        if shared:
            # The previous check's votes are counted by now, so reading them costs
            # no wait; the new ones queue on the generation stream behind the
            # model's own collectives, in the same order on every rank.
            if votes is not None and session.stop_agreed(votes):
                return
            votes = session.vote_to_stop(group, stop, stream=generation_stream)
        elif stop:
            return


@dataclass(frozen=True)
class Origin:
    """What the model on a rank was loaded from: ``load_model``'s model (None: the bundled one),
    the path the rank read, and the layout."""

    model: Optional[str]
    path: str
    pipeline: bool = False
    split: Optional[list[int]] = None  # a pipeline's layers per rank (None: an even split)


@dataclass
class Loaded:
    """The model ``load_model`` left on a rank (``state.loaded``): every call that generates uses it."""

    model: nn.Module
    tokenizer: TokenizerWrapper
    group: mx.distributed.Group
    origin: Origin
    cache: Optional[PromptCache] = None  # its prompt cache: the entries are this model's


@dataclass
class LoadResult:
    """One rank's load (``load_on_rank``): how long, what it holds, which layers it runs."""

    rank: int
    seconds: float
    active_memory: int  # bytes held after the load: the weights
    peak_memory: int  # the most held while loading
    cache: prompt_cache.CacheStatus
    layers: tuple[int, int]  # the layers this rank runs, [start, end): all of them, tensor parallel
    budget: memory.Budget


def load_on_rank(
    model: Optional[str], pipeline: bool, cache_limit: Optional[int] = None, split: Optional[list[int]] = None
) -> LoadResult:
    """Load the model split over the group on this rank (every rank at once), keep it with a new,
    empty prompt cache (``cache_limit`` bytes per rank; None: the default share of what is left of
    the rank's budget), and say how long it took and what it holds.

    The model loaded before goes first: a rank's budget is for one model, not two side by side."""
    t0 = time.perf_counter()
    path = resolve(model)
    if path.startswith("/") and not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is not on this rank's host ({socket.gethostname()}): a fused model is written "
            "on the notebook's machine, and leaves its cache when newer ones come; "
            "load_model(cluster, adapter_path=...) makes it again (on other hosts, share the folder)"
        )
    state.loaded = None  # its prompt cache with it: the entries are the old model's
    gc.collect()
    mx.clear_cache()
    memory.give_back()
    mx.reset_peak_memory()
    group = session.world()
    model_, tokenizer = load(path, group, pipeline, split)
    inner = model_.model if pipeline else None
    layers = (inner.start_idx, inner.end_idx) if inner is not None else (0, len(model_.layers))
    cache = prompt_cache.setup(model_, group, cache_limit)
    memory.keep_freed()  # a CPU rank: the next batch's KV cache reuses the last one's pages
    state.loaded = Loaded(model_, tokenizer, group, Origin(model, path, pipeline, split), cache)
    active, peak = memory.in_use()
    return LoadResult(state.rank, time.perf_counter() - t0, active, peak, cache.status(), layers, memory.budget())


def loaded() -> Loaded:
    """The model ``load_model`` left on this rank."""
    if state.loaded is None:
        raise RuntimeError("no model is loaded on the ranks: call mlx_nb.generate.load_model(cluster) first")
    return state.loaded


def cache_on_rank(clear: bool, set_limit: bool, limit: Optional[int]) -> prompt_cache.CacheStatus:
    """The prompt cache's state on this rank; first emptied (``clear``) or given a new ``limit``
    (``set_limit``; None: the default share), alike on every rank (every rank at once)."""
    m = loaded()
    if clear:
        m.cache.clear()
        memory.give_back()
    if set_limit:
        prompt_cache.set_limit(m.cache, limit, m.group)
        memory.give_back()  # a lower limit evicted entries
    return m.cache.status()


def prompt_tokens(tokenizer: TokenizerWrapper, prompt: Prompt) -> list[int]:
    """Token ids for text, chat messages (through the chat template) or ids, as ``stream`` makes them."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
    if isinstance(prompt, str):
        # as mlx_lm.stream_generate encodes text: no second BOS where the text has one
        special = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
        return list(tokenizer.encode(prompt, add_special_tokens=special))
    return list(prompt)


@dataclass(frozen=True)
class Text:
    """A piece of a reply's text, reported by rank 0 as it comes (``t``: when, ``time.time``)."""

    text: str
    t: float


@dataclass
class Generated:
    """One rank's account of a reply (``generate_on_rank``): the text and tokens as rank 0 saw
    them, how fast they came, and this rank's peak memory."""

    text: str
    tokens: list[int]
    prompt_tokens: int  # the whole prompt, cached_tokens included
    cached_tokens: int  # of them, those the prompt cache held
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft: float  # seconds to the first token
    finish_reason: Optional[str]
    stopped: bool
    peak_memory: int = 0


def generate_on_rank(prompt: Prompt, max_tokens: int) -> Generated:
    """Generate on every rank; rank 0 reports each piece of text (:class:`Text`) as it comes.

    The prompt starts from the prompt cache's longest match (rank 0 decides, every rank takes
    the same entry), and what it leaves in its KV cache becomes an entry for the next turn."""
    m = loaded()
    rank, pc = state.rank, m.cache
    ids = prompt_tokens(m.tokenizer, prompt)
    if not ids:
        raise ValueError("the prompt has no tokens")
    hit = None
    if pc is not None:
        pc.forget_pending()  # what an earlier call that failed left pending
        hit = prompt_cache.broadcast(pc.lookup(ids) if rank == 0 else None, m.group)
    cached = hit.tokens if hit is not None else 0
    base = pc.base(hit) if pc is not None else None
    cache = pc.take(hit, m.model) if pc is not None else None
    t0, ttft, pieces, tokens, last = time.perf_counter(), None, [], [], None
    for r in stream(
        m.model, m.tokenizer, ids[cached:], max_tokens, m.group, should_stop=session.stop_requested, prompt_cache=cache
    ):
        if ttft is None:
            ttft = time.perf_counter() - t0
        if rank == 0 and r.text:
            session.report(Text(r.text, time.time()))
        pieces.append(r.text)
        tokens.append(r.token)
        last = r
    if pc is not None:
        pc.finished("stream", cache, ids + tokens, asked=len(ids), base=base)
        pc.apply(prompt_cache.broadcast(pc.decide() if rank == 0 else None, m.group))
        pc.compact()
    return Generated(
        text="".join(pieces),
        tokens=tokens,
        prompt_tokens=len(ids),
        cached_tokens=cached,
        prompt_tps=last.prompt_tps,
        generation_tokens=last.generation_tokens,
        generation_tps=last.generation_tps,
        ttft=ttft or 0.0,
        finish_reason=last.finish_reason,
        stopped=session.stop_requested(),
        peak_memory=memory.in_use()[1],
    )
