"""Batched generation from the notebook: several prompts as one batch over the sharded model.

The rank half is :mod:`mlx_nb.rank.batch` (mlx-lm's ``BatchGenerator``, changed only by plans
that every rank applies alike); serving (:mod:`mlx_nb.serve`) runs the same batch.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from .display import Table, human_bytes
from .generate import check_max_tokens
from .rank.batch import Tokens, generate_batch_on_rank
from .rank.generate import Prompt

__all__ = ["BatchResult", "Reply", "generate_batch"]


@dataclass
class Reply:
    """One prompt's answer in a batch."""

    prompt: Prompt
    text: str
    tokens: list[int]  # generated, an end-of-sequence token included
    prompt_tokens: int
    finish_reason: Optional[str]  # "stop" (end of sequence), "length" (max_tokens), None (stopped)
    ttft: float  # seconds from the start of the batch to its first token, on rank 0
    cached_tokens: int = 0  # of prompt_tokens, those the ranks' prompt cache held (not prefilled)


@dataclass
class BatchResult:
    """The replies of ``generate_batch``, in the order of the prompts, and how fast they came."""

    replies: list[Reply]
    seconds: float  # the batch on rank 0, first prefill to last token
    stopped: bool
    peak_memory: list[int]  # per rank

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.replies]

    @property
    def generation_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.replies)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens of every reply together, per second of the batch."""
        return self.generation_tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        ttfts = sorted(r.ttft for r in self.replies)
        how = " (stopped)" if self.stopped else ""
        mem = ", ".join(human_bytes(m) for m in self.peak_memory)
        cached = sum(r.cached_tokens for r in self.replies)
        prompt = sum(r.prompt_tokens for r in self.replies)
        return (
            f"{len(self.replies)} prompts, {self.generation_tokens} tokens in {self.seconds:.1f} s{how}: "
            f"{self.tokens_per_second:.1f} tok/s in all | prompt {prompt} tok ({cached} cached) | "
            f"first token {ttfts[0]:.2f}-{ttfts[-1]:.2f} s | "
            f"peak memory per rank: {mem}"
        )

    def table(self) -> Table:
        rows = [
            [i, _short(r.prompt), _one_line(r.text), len(r.tokens), r.finish_reason or "stopped", f"{r.ttft:.2f}"]
            for i, r in enumerate(self.replies)
        ]
        return Table(["#", "prompt", "reply", "tokens", "finish", "first token (s)"], rows, self.summary())

    def __repr__(self) -> str:
        return repr(self.table())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


def generate_batch(
    cluster,
    prompts: Sequence[Prompt],
    max_tokens: int = 256,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    max_batch: int = 32,
    on_text: Optional[Callable[[int, str], None]] = None,
    quiet: bool = False,
    timeout: Optional[float] = None,
) -> BatchResult:
    """Generate every prompt at once, as one batch over the model loaded on the cluster.

    Prompts are text, chat messages or token ids, as for ``generate``. Each reply's text goes to
    ``on_text(index, text)`` as it comes (else a live table, unless ``quiet``). Greedy unless
    ``temperature`` > 0; ``seed`` makes sampled replies repeatable (prompt i draws with seed + i).
    The live table goes when the batch ends: the returned result is the table of the replies.
    At most ``max_batch`` sequences decode together; the rest wait their turn. The notebook's
    interrupt stops every rank at the same step.

    Example::

        result = generate_batch(cluster, ["What is the capital of France?", "Name a colour."], 32)
        result.texts        # ['The capital of France is Paris.', 'Blue.']
    """
    prompts = _checked(list(prompts), max_tokens, temperature, top_p, seed, max_batch)
    seeds = [random.getrandbits(31) if seed is None else seed + i for i in range(len(prompts))]
    live = None if on_text is not None or quiet else _Live(prompts)

    def on_report(rank: int, report: Tokens) -> None:
        for t in report.tokens:
            if on_text is not None:
                on_text(t.id, t.text)
            elif live is not None:
                live.add(t.id, t.text, t.finish)

    try:
        out = cluster.call(
            generate_batch_on_rank,
            prompts,
            max_tokens,
            temperature,
            top_p,
            seeds,
            max_batch,
            on_report=on_report,
            timeout=timeout,
        )
    finally:
        if live is not None:
            live.close()
    r = out[0]
    replies = [
        Reply(p, a.text, a.tokens, a.prompt_tokens, a.finish_reason, a.ttft or 0.0, a.cached_tokens)
        for p, a in zip(prompts, r.answers)
    ]
    return BatchResult(replies, r.seconds, r.stopped, [x.peak_memory for x in out])


def _checked(prompts: list, max_tokens: Any, temperature: Any, top_p: Any, seed: Any, max_batch: Any) -> list:
    """``generate_batch``'s arguments, checked before any rank runs; the prompts."""
    if not prompts:
        raise ValueError("generate_batch needs at least one prompt")
    check_max_tokens(max_tokens)
    check_sampling(temperature, top_p, seed)
    check_max_batch(max_batch)
    return prompts


def check_max_batch(max_batch: Any, name: str = "max_batch") -> None:
    """How many sequences decode (or prefill) together (``generate_batch``, the server): 1 or more.

    >>> check_max_batch(0)
    Traceback (most recent call last):
    ...
    ValueError: max_batch must be at least 1, got 0
    """
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"{name} must be at least 1, got {max_batch!r}")


def check_sampling(temperature: Any, top_p: Any = 1.0, seed: Any = None) -> None:
    """Sampling options as the server takes them: ``temperature`` in [0, 2] (0: greedy), ``top_p``
    in (0, 1], ``seed`` a whole number or None. ValueError, one line, before any rank runs.

    >>> check_sampling(9)
    Traceback (most recent call last):
    ...
    ValueError: --temperature must be in [0, 2], got 9
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ValueError(f"--temperature must be in [0, 2], got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"--seed must be a whole number, got {seed!r}")


def _short(prompt: Any, width: int = 40) -> str:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        prompt = prompt[-1].get("content", "")
    text = str(prompt)
    return text if len(text) <= width else text[: width - 1] + "…"


def _one_line(text: str) -> str:
    return text.strip().replace("\n", " ⏎ ")


class _Live:
    """The replies so far: a table redrawn in place in a notebook (removed at the end: the result
    shows itself), else each reply printed as it ends."""

    EVERY = 0.25  # seconds between redraws

    def __init__(self, prompts: list[Prompt]) -> None:
        from IPython import get_ipython

        self.prompts, self.texts, self.drawn = prompts, [""] * len(prompts), 0.0
        self.done = [False] * len(prompts)
        self.handle = None
        if getattr(get_ipython(), "kernel", None) is not None:
            from IPython.display import display

            self.handle = display(self._table(), display_id=True)

    def _table(self) -> Table:
        rows = [
            [i, _short(p), _one_line(t) + ("" if d else " …")]
            for i, (p, t, d) in enumerate(zip(self.prompts, self.texts, self.done))
        ]
        return Table(["#", "prompt", "reply"], rows)

    def add(self, i: int, text: str, finish: Optional[str]) -> None:
        self.texts[i] += text
        self.done[i] = finish is not None
        if self.handle is None:
            if finish is not None:
                print(f"[{i}] {self.texts[i]}", flush=True)
        elif time.monotonic() - self.drawn > self.EVERY:
            self.drawn = time.monotonic()
            self.handle.update(self._table())

    def close(self) -> None:
        if self.handle is not None:
            self.handle.update({"text/plain": ""}, raw=True)
