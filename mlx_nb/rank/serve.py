"""Serving, the rank half: one long job that generates for every request the notebook hands in.

Requests reach rank 0's inbox (``Cluster.send``) as ``{"serve": id, "add": [Request fields]}``,
cancellations as ``{"serve": id, "cancel": [request ids]}`` and the end as ``{"serve": id,
"stop": true}``. Each step rank 0 turns what arrived into a plan that every rank applies
(:mod:`mlx_nb.rank.batch`): a request that arrives while others run joins at the next step (on
a GPU after waiting up to 50 ms for others to share its prefill: :class:`Scheduling`).
Rank 0 reports the steps' tokens and the time they took (:class:`~mlx_nb.rank.batch.Tokens`;
several steps' in one report when steps come faster than every ``REPORT_EVERY`` s; a reply's
first and last token at once), with the prompt tokens each newly admitted request found in the
prompt cache (:mod:`mlx_nb.rank.prompt_cache`). With nothing to do, rank 0 waits on its
inbox for a moment between agreements, so an idle server costs a few small collectives a second;
woken by a request, it takes those announced with it and those that follow closely into the same
plan (``gathered``), but for a conversation's next turn, which goes at once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx

from . import prompt_cache, session
from .batch import Batch, Outbox, Plan, Request, Token, Tokens, run
from .generate import Origin, loaded
from .line import Address, RankEnd

GATHER_GAP, GATHER_MOST = 0.01, 0.05  # seconds: see gathered()
# While the batch generates, a request that arrives may wait this long on a GPU for others to
# prefill with (or until prefill_batch wait): see Scheduling
GPU_GATHER = 0.05
REPORT_EVERY = 0.02  # seconds a served token may wait to share a report (first and last tokens never wait)


@dataclass(frozen=True)
class Source:
    """What the model on a rank was loaded from, with what a server needs to know of it."""

    origin: Origin
    context: Optional[int]  # max_position_embeddings (None: the config does not say)
    vocab: Optional[int]
    eos: list[int]  # the tokenizer's end-of-sequence tokens
    ranks: int


@dataclass(frozen=True)
class Ready:
    """Rank 0's first report: the ranks serve, and how they take requests in."""

    t: float
    scheduling: Optional[Scheduling] = None


@dataclass(frozen=True)
class Refusal:
    """A request the batch cannot take, and why (the client's 400)."""

    id: int
    message: str


@dataclass(frozen=True)
class Refused:
    """Rank 0's report of the requests it refused."""

    t: float
    refusals: tuple[Refusal, ...]


@dataclass(frozen=True)
class Served:
    """What a server's job did, on one rank (``serve_on_rank``)."""

    steps: int
    tokens: int


@dataclass(frozen=True)
class Scheduling:
    """How a server takes requests in while its batch generates: ``prefill_batch`` prompts at most
    in one prefill pass, and ``gather`` seconds a request that arrives meanwhile may wait for others
    to share its pass, counted from the step that first sees it (it goes once ``prefill_batch``
    wait; with nothing generating, or as a conversation's next turn, at once).

    The defaults depend on what a prefill pass costs. On a GPU a pass of many prompts costs little
    more than a pass of one (the weights are read once; a 3B model's on an H100: 49 ms for 8
    prompts, 25 ms for one), and on CUDA each new shape also pays 60-120 ms its first time: a
    server of 32 streams that prefilled each arrival as it came spent half its time in passes of
    one or two prompts (16-24 of 110 steps, 150 ms each against 10 ms for a step without; 5 such
    passes once grouped). So there a pass takes up to ``max_batch`` prompts, and arrivals wait up
    to 50 ms (5 steps of that model) for others. On a CPU a pass costs what its tokens cost:
    grouping saves little and would hold first tokens back, so prompts go as they come, up to 8
    a pass (mlx_lm.server's ``--prompt-concurrency``)."""

    prefill_batch: int
    gather: float

    def __str__(self) -> str:
        most = f"{self.gather * 1000:.3g} ms" if self.gather < 1 else f"{self.gather:g} s"
        wait = f"wait up to {most} for others" if self.gather > 0 else "go at the next step"
        return f"up to {self.prefill_batch} prompts a pass; arrivals while others generate {wait}"

    @staticmethod
    def default(max_batch: int, prefill_batch: Optional[int], gather: Optional[float]) -> Scheduling:
        """Rank 0's: what was asked, the rest from this rank's device."""
        gpu = mx.default_device().type == mx.gpu
        if prefill_batch is None:
            prefill_batch = max_batch if gpu else min(8, max_batch)
        if gather is None:
            gather = GPU_GATHER if gpu else 0.0
        return Scheduling(min(prefill_batch, max_batch), gather)


def source() -> Source:
    """What the model on this rank was loaded from (``load_model``'s arguments, and the path),
    with its context length, vocabulary size and end-of-sequence tokens."""
    from mlx_lm.utils import load_config

    m = loaded()
    config = load_config(Path(m.origin.path))
    config = {**config.get("text_config", {}), **config}
    return Source(
        m.origin,
        config.get("max_position_embeddings"),
        config.get("vocab_size"),
        sorted(m.tokenizer.eos_token_ids),
        m.group.size() if m.group else 1,
    )


def gathered(more: int, gap: float = GATHER_GAP, most: float = GATHER_MOST) -> list[dict]:
    """Rank 0, woken from idle by a request that says ``more`` others are on their way (read and
    tokenized by the notebook's HTTP threads): those, and any that follow within ``gap`` s of each
    other (``most`` s in all), so that requests sent together are prefilled together.

    Clients that send at once (8 users of one system prompt) reach the inbox milliseconds apart
    (up to 40 ms for 8 on a 2-core machine, where the first often finds none of the others
    arriving yet). Planned as they come, the first would be prefilled alone and the rest a step
    later, each prefill and each join of the running batch copying every sequence's KV cache;
    mlx_lm.server, busy tokenizing in its generation loop, takes what queued meanwhile in one
    step. A lone request waits ``gap`` s; the next turn of a conversation does not (``gap`` 0:
    its client waited for the last reply, it was not sent together with others)."""
    out: list[dict] = []
    end = time.monotonic() + most
    while (left := end - time.monotonic()) > 0:
        got = session.inbox(wait=left if more else min(gap, left))  # announced ones, then stragglers
        if not got:
            break
        out += got
        more = next((m.get("more", 0) for m in reversed(got) if m.get("add")), more)
    return out


class _Job:
    """Rank 0's account of a server's job: tokens made, what the notebook last heard, busy time."""

    def __init__(self, batch: Batch, report: Callable[[Any], None]) -> None:
        self.batch, self.report = batch, report
        self.made = 0  # tokens made
        self.shown = 0  # the batch size the notebook last heard of
        self.planned = 0.0  # when the last plan was made: a step's time runs from there to its tokens
        self.busy = 0.0  # seconds the steps not yet reported took (prefill and decode: the server's busy time)
        self.outbox = Outbox(self.send, REPORT_EVERY)

    def send(self, tokens: list[Token]) -> None:
        self.shown = len(self.batch)
        self.report(Tokens(time.time(), tuple(tokens), len(self.batch), self.busy, tuple(self.batch.admitted())))
        self.busy = 0.0

    def emit(self, tokens: list[Token]) -> None:
        self.made += len(tokens)
        self.busy += time.perf_counter() - self.planned
        self.outbox.add(tokens)


def _line_broke(error: BaseException) -> None:
    # no request comes this way any more: the ranks stop serving, and the notebook says so
    print(f"rank 0: the line from the notebook failed ({error}); the server stops", file=sys.stderr)
    session.state.stop.set()


def serve_on_rank(
    serve_id: str,
    max_batch: int,
    prefill_step: int,
    idle_wait: float = 0.1,
    line: Optional[Address] = None,
    prefill_batch: Optional[int] = None,
    gather: Optional[float] = None,
) -> Served:
    """Serve until told to stop (every rank at once); return the steps and tokens made. ``line``:
    the notebook's end of a direct line (:mod:`mlx_nb.rank.line`), which rank 0 then takes for
    the requests and its reports in place of ipyparallel's channels. ``prefill_batch`` and
    ``gather``: see :class:`Scheduling` (None: its default for rank 0's device, which every rank
    then takes: the batch's prefill passes must be alike on every rank)."""
    m = loaded()
    first = m.group is None or m.group.rank() == 0
    how = Scheduling.default(max_batch, prefill_batch, gather) if first else None
    how = prompt_cache.broadcast(how, m.group)
    batch = Batch(
        m.model,
        m.tokenizer,
        m.group,
        cache=m.cache,
        max_batch=max_batch,
        prefill_batch=how.prefill_batch,
        prefill_step=prefill_step,
    )
    end = RankEnd(line, on_broken=_line_broke) if line is not None and batch.rank == 0 else None
    job = _Job(batch, end.report if end is not None else session.report)
    waiting: list[tuple[float, Request]] = []  # arrived while the batch ran, held to join others

    def decide(batch: Batch) -> Plan:
        if len(batch) != job.shown:  # the last plan changed it: the notebook hears of it now
            job.outbox.flush()
        plan = Plan(remove=batch.ended())
        cancelled: set[int] = set()
        # idle, but for finished replies to store in the prompt cache: stored now, while their
        # clients read them, not when the next turn comes
        idle = not len(batch) and not batch.settling() and not waiting
        messages = session.inbox(wait=idle_wait if idle else 0.0)
        adds = [m for m in messages if m.get("serve") == serve_id and m.get("add")]
        if not len(batch) and adds:
            turns = all(batch.continues(r["prompt"]) for m in adds for r in m["add"])
            messages += gathered(adds[-1].get("more", 0), gap=0.0 if turns else GATHER_GAP)
        for message in messages:
            if message.get("serve") != serve_id:
                continue  # left from an earlier server
            plan.add += [Request(**r) for r in message.get("add", ())]
            cancelled.update(message.get("cancel", ()))
            plan.stop = plan.stop or bool(message.get("stop"))
        refused = tuple(Refusal(r.id, p) for r in plan.add if (p := r.problem()))
        plan.add = [r for r in plan.add if r.id not in cancelled and not r.problem()]
        if how.gather > 0:
            now = time.monotonic()
            waiting[:] = [(t, r) for t, r in [*waiting, *((now, r) for r in plan.add)] if r.id not in cancelled]
            go = not len(batch) or plan.stop or len(waiting) >= how.prefill_batch
            # a conversation's next turn goes at once, as from idle: its client waited for the reply
            go = go or any(batch.continues(r.prompt) for r in plan.add)
            if waiting and (go or now - waiting[0][0] >= how.gather):
                plan.add = [r for _, r in waiting]
                waiting.clear()
            else:
                plan.add = []
        plan.remove += sorted(cancelled)
        plan.stop = plan.stop or session.stop_requested()
        if refused:
            job.report(Refused(time.time(), refused))
        job.planned = time.perf_counter()  # the wait for work, above, is not generating
        return plan

    try:
        job.report(Ready(time.time(), how))
        steps = run(batch, decide, job.emit)
    finally:
        try:
            if batch.rank == 0 and job.outbox.tokens:
                job.outbox.flush()
            batch.close()
        finally:
            if end is not None:
                end.close()
    return Served(steps, job.made)
