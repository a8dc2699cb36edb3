"""Serving, the rank half: one long job that generates for every request the notebook hands in.

Requests reach rank 0's inbox (``Cluster.send``) as ``{"serve": id, "add": [Request fields]}``,
cancellations as ``{"serve": id, "cancel": [request ids]}`` and the end as ``{"serve": id,
"stop": true}``. Each step rank 0 turns what arrived into a plan that every rank applies
(:mod:`mlx_nb.rank.batch`): a request that arrives while others run joins at the next step.
Rank 0 reports the steps' tokens and the time they took (several steps' in one ``report``
when steps come faster than every ``REPORT_EVERY`` s; a reply's first and last token at once),
with the prompt tokens each newly admitted request found in the prompt cache
(:mod:`mlx_nb.rank.prompt_cache`). With nothing to do, rank 0 waits on its
inbox for a moment between agreements, so an idle server costs a few small collectives a second.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import session
from .batch import Batch, Outbox, Plan, Request, Token, run
from .generate import loaded, loaded_from

GATHER_GAP, GATHER_MOST = 0.01, 0.05  # seconds: see gathered()
REPORT_EVERY = 0.02  # seconds a served token may wait to share a report (first and last tokens never wait)


def source() -> dict:
    """What the model on this rank was loaded from (``load_model``'s arguments, and the path),
    with its context length, vocabulary size and end-of-sequence tokens."""
    from mlx_lm.utils import load_config

    _, tokenizer, group = loaded()
    origin = loaded_from()
    config = load_config(Path(origin["path"]))
    config = {**config.get("text_config", {}), **config}
    return {
        **origin,
        "context": config.get("max_position_embeddings"),
        "vocab": config.get("vocab_size"),
        "eos": sorted(tokenizer.eos_token_ids),
        "ranks": group.size() if group else 1,
    }


def gathered(gap: float = GATHER_GAP, most: float = GATHER_MOST) -> list[dict]:
    """Rank 0, woken from idle by a request: those that follow within ``gap`` s of each other
    (``most`` s in all), so that requests sent together are prefilled together.

    Clients that send at once (8 users of one system prompt) reach the inbox a few milliseconds
    apart (each is read and tokenized by its own HTTP thread). Planned as they come, the first
    would be prefilled alone and the rest a step later, each prefill and each join of the running
    batch copying every sequence's KV cache; mlx_lm.server, busy tokenizing in its generation
    loop, takes what queued meanwhile in one step. A lone request waits ``gap`` s more."""
    out: list[dict] = []
    end = time.monotonic() + most
    while (left := end - time.monotonic()) > 0 and (more := session.inbox(wait=min(gap, left))):
        out += more
    return out


def serve_on_rank(serve_id: str, max_batch: int, prefill_step: int, idle_wait: float = 0.1) -> dict:
    """Serve until told to stop (every rank at once); return the steps and tokens made."""
    model, tokenizer, group = loaded()
    batch = Batch(model, tokenizer, group, max_batch=max_batch, prefill_step=prefill_step)
    made, shown = [0], [0]  # tokens made; the batch size the notebook last heard of
    planned = [0.0]  # when the last plan was made: a step's time runs from there to its tokens
    busy = [0.0]  # seconds the steps not yet reported took (prefill and decode: the server's busy time)

    def send(tokens: list[Token]) -> None:
        shown[0] = len(batch)
        report = {"cached": cached} if (cached := batch.admitted()) else {}
        rows = [(t.id, t.token, t.text, t.finish) for t in tokens]
        session.report(t=time.time(), batch=len(batch), tokens=rows, seconds=busy[0], **report)
        busy[0] = 0.0

    outbox = Outbox(send, REPORT_EVERY)

    def decide(batch: Batch) -> Plan:
        if len(batch) != shown[0]:  # the last plan changed it: the notebook hears of it now
            outbox.flush()
        plan = Plan(remove=batch.ended())
        cancelled: set[int] = set()
        messages = session.inbox(wait=0.0 if len(batch) else idle_wait)
        if messages and not len(batch):
            messages += gathered()
        for message in messages:
            if message.get("serve") != serve_id:
                continue  # left from an earlier server
            plan.add += [Request(**r) for r in message.get("add", ())]
            cancelled.update(message.get("cancel", ()))
            plan.stop = plan.stop or bool(message.get("stop"))
        rejected = [(r.id, p) for r in plan.add if (p := r.problem())]
        plan.add = [r for r in plan.add if r.id not in cancelled and not r.problem()]
        plan.remove += sorted(cancelled)
        plan.stop = plan.stop or session.stop_requested()
        if rejected:
            session.report(t=time.time(), rejected=rejected)
        planned[0] = time.perf_counter()  # the wait for work, above, is not generating
        return plan

    def emit(tokens: list[Token]) -> None:
        made[0] += len(tokens)
        busy[0] += time.perf_counter() - planned[0]
        outbox.add(tokens)

    session.report(t=time.time(), ready=True)
    try:
        steps = run(batch, decide, emit)
    finally:
        batch.close()
        if batch.rank == 0 and outbox.tokens:
            outbox.flush()
    return {"steps": steps, "tokens": made[0]}
