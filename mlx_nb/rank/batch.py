"""Batched generation, the rank half: many sequences in one mlx-lm ``BatchGenerator``, alike on every rank.

A sharded model's collectives pair up across ranks only while every rank runs the same batch:
the same sequences, added and removed at the same step, in the same order. So the batch
changes only by a :class:`Plan` that rank 0 makes and every rank receives by a collective
(:func:`share`; :func:`run` lets each plan's announcement travel during a step). What depends on
a token (an end-of-sequence token, a stop string, a client that left) is decided on rank 0
alone and takes effect one step later (two on several ranks); mlx-lm's own end at
``max_tokens`` counts steps, which every rank counts alike. Sampling is seeded per request,
so every rank draws the same numbers for it and no rank needs another's tokens.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import apply_top_p
from mlx_lm.tokenizer_utils import TokenizerWrapper

from . import memory, prompt_cache, session
from .generate import Prompt, loaded, prompt_tokens
from .prompt_cache import Base, Changes, Hit, PromptCache

try:  # the finished sequences' report of mlx-lm's generator, as _last_tokens makes it (0.32)
    from mlx_lm.generate import GenerationBatch

    _RESPONSE = GenerationBatch.Response
    _RESPONSE_FIELDS = ("uid", "token", "logprobs", "finish_reason", "prompt_cache", "all_tokens")
    if tuple(f.name for f in fields(_RESPONSE)) != _RESPONSE_FIELDS:
        _RESPONSE = None
except (ImportError, AttributeError, TypeError):
    _RESPONSE = None  # another mlx-lm: ordinary steps only

from mlx_lm.models.cache import BatchKVCache, KVCache

try:  # mlx-lm 0.32's batch of prompts being prefilled, whose split copies their KV cache twice
    from mlx_lm.generate import GenerationBatch, PromptProcessingBatch
except ImportError:
    PromptProcessingBatch = None
# its per-sequence lists (a split moves or copies them); another mlx-lm's batch is left as it is
_SEQUENCE_LISTS = ("uids", "prompt_cache", "tokens", "samplers", "logits_processors", "stop_sequences", "max_tokens")
_PROMPT_BATCH_FIELDS = {*_SEQUENCE_LISTS, "model", "prefill_step_size", "fallback_sampler"}


@dataclass
class Request:
    """One sequence to generate: its prompt's token ids and how to sample it."""

    id: int
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    hit: Optional[Hit] = None  # where the prompt cache lets it start: rank 0 fills it in

    def problem(self) -> Optional[str]:
        """Why the batch cannot take it (None: it can)."""
        if not self.prompt:
            return "the prompt has no tokens"
        if self.max_tokens < 1:
            return f"max_tokens must be at least 1, got {self.max_tokens}"
        return None


@dataclass
class Plan:
    """What changes before the next step: made on rank 0, applied on every rank in this order."""

    remove: list[int] = field(default_factory=list)  # request ids
    add: list[Request] = field(default_factory=list)
    stop: bool = False
    cache: Optional[Changes] = None  # the prompt cache's: applied first

    def __bool__(self) -> bool:
        return bool(self.add or self.remove or self.stop or self.cache)


@dataclass(frozen=True)
class Token:
    """A token one step made for one request, as rank 0 sees it: what leaves the rank for it."""

    id: int  # the request's
    token: int
    text: str  # the text it completes (empty for an end-of-sequence token)
    finish: Optional[str] = None  # "stop" (end of sequence), "length" (max_tokens), None: more to come
    first: bool = False  # the first with text of the request's reply (what its client sees first)


@dataclass(frozen=True)
class Admitted:
    """A request that joined the batch, the prompt tokens it found in the prompt cache, and when
    (time.time on rank 0: its prefill starts then)."""

    id: int
    cached: int
    at: float = 0.0


@dataclass(frozen=True)
class Tokens:
    """Rank 0's report of the steps since its last: their tokens (a batch's, a server's), and for
    a server the batch's size after them, the seconds they took and the requests they admitted."""

    t: float  # when it was sent (time.time on rank 0)
    tokens: tuple[Token, ...]
    batch: int = 0
    seconds: float = 0.0
    admitted: tuple[Admitted, ...] = ()

    def __reduce__(self) -> tuple:
        # it travels as one tuple per token: cloudpickle costs about 1.5 us per object it
        # reduces, 50 us a report of 32 Tokens on rank 0's thread, against 4 us for tuples
        rows = tuple((t.id, t.token, t.text, t.finish, t.first) for t in self.tokens)
        return (_tokens, (self.t, rows, self.batch, self.seconds, tuple((a.id, a.cached, a.at) for a in self.admitted)))


def _tokens(t: float, rows: tuple, batch: int, seconds: float, admitted: tuple) -> Tokens:
    """A :class:`Tokens` report again, from what travelled."""
    return Tokens(t, tuple(Token(*r) for r in rows), batch, seconds, tuple(Admitted(*a) for a in admitted))


def sampler(temperature: float, top_p: float, seed: int) -> Optional[Callable[[mx.array], mx.array]]:
    """None for greedy (the batch then shares one argmax), else a sampler with its own random key:
    the same draws on every rank, and for a seed whatever else is in the batch.

    Example:
        >>> sample = sampler(0.7, 0.9, seed=1)
        >>> sample(mx.log(mx.array([[0.5, 0.5]]))).shape
        (1,)
    """
    if temperature <= 0:
        return None
    key = mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, now = mx.random.split(key)
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1 / temperature), key=now)

    return sample


def share(plan: Optional[Plan], group: Optional[mx.distributed.Group], stream: Any) -> Plan:
    """Rank 0's ``plan`` on every rank of ``group``: a collective, every rank calls it; only rank 0's
    plan counts. No change costs one 4-byte ``all_sum``; a change, a second one of its bytes.

    ``stream`` is the one the model's own collectives run on, so that all of them queue in one
    order on every rank.
    """
    return prompt_cache.broadcast(plan or None, group, stream) or Plan()


REPORT_EVERY = 0.25  # seconds between a batch's reports to the notebook: its live table redraws at 4 Hz, and
# each report costs the cores the step runs on (the engine's IO thread, the notebook); see benchmarks/batch.py
# A prompt that prefills at least this many tokens past the cache becomes an entry as soon as it is
# prefilled (a shorter one only when its reply ends: copying a long cached prefix for a few new
# tokens would cost more than it saves); a request waits for such a prompt's entry when it shares
# at least this many more tokens with it than the cache holds, and half of what it would prefill.
SHARE_AT_LEAST = 64
# New prompt-cache entries are views of their batch's buffers until copied (PromptCache.compact);
# while sequences wait for their first token the copies wait too, but never for more than this many
# steps (mlx-lm's generator takes 3 from a prompt that fits one prefill step to its first token), so
# that the buffers views hold are at most those of the last few steps
LOOSE_STEPS = 3
# Bytes of such copies at most: while the batch is idle, between two looks at the inbox (a request
# that arrives meanwhile waits for that much: a few ms on a 2-core CPU), and after a step (a burst
# of 8 entries of a long shared prompt, copied at once, held the next token back by 0.5 s there)
IDLE_COPY, STEP_COPY = 4 << 20, 32 << 20


def _prefills_an_entry(r: Request) -> bool:
    """Whether ``r``'s prompt becomes an entry once prefilled (every rank decides alike)."""
    return len(r.prompt) - (r.hit.tokens if r.hit is not None else 0) >= SHARE_AT_LEAST


def _last_tokens(gen: BatchGenerator) -> Optional[list]:
    """mlx-lm's generator, when each sequence it generates takes its last token (``max_tokens``)
    at this step and no prompt waits for a prefill: those tokens, without the step past them.

    ``gen.next()`` starts computing every sequence's next token before it reads this step's, so a
    batch that has just finished leaves one more step running: its results thrown away, and the
    next request (a chat's next turn, sent once the reply ended) waiting for it (tens of ms on this
    CPU, a step of the model on a GPU). The caches of sequences finished here hold every token
    but the last (the next turn prefills it). Every rank decides alike: it counts steps, not
    tokens. None: an ordinary step (also for an mlx-lm whose generator keeps other fields)."""
    g = gen._generation_batch if hasattr(gen, "_generation_batch") else None
    if _RESPONSE is None or not all(
        hasattr(g, a) for a in ("uids", "tokens", "max_tokens", "_num_tokens", "_next_tokens", "_next_logprobs")
    ):
        return None
    if not g.uids or getattr(gen, "_unprocessed_sequences", True) or getattr(gen, "_currently_processing", True):
        return None
    if any(n + 1 < most for n, most in zip(g._num_tokens, g.max_tokens)):
        return None
    with mx.stream(gen.stream):
        mx.eval(g._next_tokens, g._next_logprobs)
        tokens = g._next_tokens.tolist()
        out = [
            _RESPONSE(uid, token, logprobs, "length", g.extract_cache(i), g.tokens[i])
            for i, (uid, token, logprobs) in enumerate(zip(g.uids, tokens, g._next_logprobs))
        ]
        g.filter([])
    return out


if PromptProcessingBatch is not None:

    class _PromptBatch(PromptProcessingBatch):
        """mlx-lm's batch of prompts being prefilled, split without copying its KV cache.

        mlx-lm hands prefilled sequences to the decoding batch by ``split``: a deep copy of the
        whole batch's KV cache, then each half gathered from it (two copies). When every sequence
        moves on (a wave of requests prefilled together, a chat's one prompt) this hands the cache
        over as it is; otherwise each half gathers its rows from the one cache (the arrays are
        shared until each half's ``filter`` replaces them, as it does first). The same tokens
        come out: on this CPU a wave of 8 prompts of ~1,200 tokens of the bundled model spent
        0.55 s there, most of it the kernel's fresh pages for the copies."""

        def extend(self, batch: PromptProcessingBatch) -> None:
            super().extend(batch)
            _settle(self)

        def split(self, indices: list[int]) -> PromptProcessingBatch:
            if sorted(indices) != list(range(len(self.uids))) or not _plain(self):
                return super().split(indices)
            moved = self.__class__.__new__(self.__class__)
            moved.__dict__.update(self.__dict__)
            for name in _SEQUENCE_LISTS:
                setattr(self, name, [])
            for c in moved.prompt_cache:  # as BatchKVCache.filter leaves it: no padding all share
                if c.keys is not None and (drop := min(c.left_padding.tolist())) > 0:
                    c.keys, c.values = c.keys[..., drop:, :], c.values[..., drop:, :]
                    c._idx -= drop
                    c.left_padding = c.left_padding - drop
            return moved

        def _copy(self) -> PromptProcessingBatch:
            if not _plain(self):
                return super()._copy()
            new = self.__class__.__new__(self.__class__)
            new.__dict__.update(self.__dict__)
            for name in _SEQUENCE_LISTS:
                setattr(new, name, list(getattr(self, name)))
            new.prompt_cache = [copy.copy(c) for c in self.prompt_cache]
            return new

    class _DecodeBatch(GenerationBatch):
        """mlx-lm's decoding batch, whose cache is computed as sequences join it (see _settle)."""

        def extend(self, batch: GenerationBatch) -> None:
            super().extend(batch)
            _settle(self)

    def _settle(batch: Any) -> None:
        """Compute ``batch``'s KV cache now: the merged caches of a prefill, or those of sequences
        that began decoding (their first step with them). Left to the next step's evaluation, on
        a CPU rank the wave's buffers were allocated while other work held memory, and the heap
        grew by fresh pages (90 thousand faults, 0.8 s of a served wave's first token)."""
        mx.eval([c.state for c in batch.prompt_cache if not c.empty()])

    def _plain(batch: PromptProcessingBatch) -> bool:
        """Whether ``batch`` is as mlx-lm 0.32 makes it, every layer's cache a ``BatchKVCache``."""
        return set(vars(batch)) == _PROMPT_BATCH_FIELDS and all(type(c) is BatchKVCache for c in batch.prompt_cache)


class _Roomy(KVCache):
    """A sequence's KV cache that starts from the prompt cache and, batched with others (mlx-lm's
    ``BatchKVCache.merge``), leaves room for the tokens their prompts add.

    mlx-lm merges cached prompts into a batch cache of exactly their tokens, which the prefill of
    the new tokens at once outgrows: a second buffer, the whole batch's keys and values copied
    into it (on this CPU, 8 requests from a ~1,200-token system prompt of the bundled model:
    0.4 GB more, in fresh pages). Here the merged buffers hold ``BatchKVCache.step`` tokens more,
    as a grown one would, and prompts that add no more than that are prefilled into it."""

    @classmethod
    def merge(cls, caches: list[KVCache]) -> BatchKVCache:
        lengths = [c.size() for c in caches]
        longest = max(lengths)
        if not longest:
            return BatchKVCache([0] * len(caches))
        held = [c for c in caches if c.keys is not None]
        (_, heads, _, dk), dv, dtype = held[0].keys.shape, held[0].values.shape[3], held[0].keys.dtype
        room = longest + BatchKVCache.step
        keys = mx.zeros((len(caches), heads, room, dk), dtype=dtype)
        values = mx.zeros((len(caches), heads, room, dv), dtype=dtype)
        padding = [longest - n for n in lengths]
        for i, (p, c) in enumerate(zip(padding, caches)):
            if c.keys is not None:
                keys[i : i + 1, :, p : p + c.offset] = c.keys[..., : c.offset, :]
                values[i : i + 1, :, p : p + c.offset] = c.values[..., : c.offset, :]
        merged = BatchKVCache(padding)
        merged.keys, merged.values = keys, values
        merged.offset += longest
        merged._idx = longest
        return merged


def _roomy(cache: list[Any]) -> list[Any]:
    """``cache`` (a prompt cache's, :meth:`PromptCache.take`) whose plain layers merge roomy."""
    out = []
    for c in cache:
        if type(c) is KVCache:
            roomy = _Roomy()
            roomy.keys, roomy.values, roomy.offset = c.keys, c.values, c.offset
            c = roomy
        out.append(c)
    return out


def _lighter_splits(gen: BatchGenerator) -> None:
    """``gen``'s empty batches as :class:`_PromptBatch` and :class:`_DecodeBatch` (mlx-lm 0.32's
    fields; another mlx-lm's batches are left as they are)."""
    if PromptProcessingBatch is None:
        return
    prompts, decoding = getattr(gen, "_prompt_batch", None), getattr(gen, "_generation_batch", None)
    if type(prompts) is PromptProcessingBatch and not prompts.uids and set(vars(prompts)) == _PROMPT_BATCH_FIELDS:
        prompts.__class__ = _PromptBatch
    if type(decoding) is GenerationBatch and not decoding.uids:
        decoding.__class__ = _DecodeBatch


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Batch:
    """The sequences one rank generates together, changed only by plans (every rank applies the same).

    ``cache``: the loaded model's prompt cache (``loaded().cache``), which the batch's prompts
    start from and its finished sequences go to; None: no prompt cache.

    Example (on every rank at once)::

        batch = Batch(model, tokenizer, world())
        batch.apply(share(Plan(add=[Request(0, tokenizer.encode("Hi"), 16)]), batch.group, batch.stream))
        while len(batch):
            print(batch.step())   # rank 0: the new Tokens
            batch.apply(share(Plan(remove=batch.ended()), batch.group, batch.stream))
    """

    def __init__(
        self,
        model: Any,
        tokenizer: TokenizerWrapper,
        group: Optional[mx.distributed.Group],
        *,
        cache: Optional[PromptCache] = None,
        max_batch: int = 32,
        prefill_batch: int = 8,
        prefill_step: int = 2048,
    ) -> None:
        # no stop tokens: an end of sequence is rank 0's decision (see the module's docstring)
        self.gen = BatchGenerator(
            model,
            completion_batch_size=max_batch,
            prefill_batch_size=min(prefill_batch, max_batch),
            prefill_step_size=prefill_step,
        )
        _lighter_splits(self.gen)
        self.tokenizer, self.group = tokenizer, group
        self.rank = group.rank() if group is not None else 0
        self.eos = set(tokenizer.eos_token_ids)
        self._ids: dict[int, int] = {}  # BatchGenerator uid -> request id
        self._uids: dict[int, int] = {}  # request id -> uid
        self._asked: dict[int, int] = {}  # request id -> its prompt's tokens (a reply follows them)
        self._bases: dict[int, Base] = {}  # uid -> the prompt-cache entry its cache began from
        self._ended: set[int] = set()  # requests rank 0 ended, in the batch until the next plan
        self._detokenizers: dict[int, Any] = {}
        self._unanswered: set[int] = set()  # uids that have no token yet (every rank)
        self._unseen: set[int] = set()  # rank 0: requests whose reply has no text yet
        self._entries_at_prefill: set[int] = set()  # uids whose prompt becomes an entry once prefilled
        self.model = model
        self.cache = cache
        if self.cache is not None:
            self.cache.forget_pending()  # what an earlier batch that failed left pending
        self._complete: set = set()  # rank 0: pending keys whose cache is whole (not a cancelled request's)
        self._admitted: list[Admitted] = []  # rank 0: the requests added since asked
        self._prefilling: dict[int, list[int]] = {}  # rank 0: prompts whose prefill has no entry yet
        self.held: list[Request] = []  # rank 0: requests waiting for a prefill they share to be cached

    @property
    def stream(self) -> Any:
        return self.gen.stream

    def __len__(self) -> int:
        """Sequences in the batch: waiting, prefilling or generating."""
        return len(self._ids)

    def ended(self) -> list[int]:
        """Requests rank 0 ended at an end-of-sequence token, for the next plan to remove."""
        return sorted(self._ended)

    def prepare(self, plan: Plan) -> Plan:
        """Rank 0, before sharing ``plan``: the prompt cache's decisions go in it (which finished
        sequences and prefilled prompts become entries, what is evicted, where each new request
        starts). A request whose prompt shares a long prefix with one still being prefilled (the
        same system prompt, arrived together) waits for that prefix's entry instead of
        prefilling it again, as mlx_lm.server's prompt cache has its later arrivals do."""
        if self.cache is None or not self.cache.enabled:
            return plan
        keep = self._complete & set(self.cache.pending)
        plan.cache = self.cache.decide(keep) or plan.cache
        self._complete.clear()
        for key in self.cache.pending:
            self._prefilling.pop(key[1] if isinstance(key, tuple) else key, None)
        gone = set(plan.remove)
        for rid in gone:
            self._prefilling.pop(rid, None)
        waiting, self.held, plan.add = [*self.held, *plan.add], [], []
        for r in waiting:
            if r.id in gone or not r.prompt:
                if r.id not in gone:
                    plan.add.append(r)
                continue
            hit = self.cache.lookup(r.prompt, count=False)
            reused = hit.tokens if hit is not None else 0
            shared = max((_common(r.prompt, p) for p in self._prefilling.values()), default=0)
            if shared - reused >= max(SHARE_AT_LEAST, (len(r.prompt) - reused) // 2):
                self.held.append(r)
                continue
            r.hit = self.cache.lookup(r.prompt)  # counted now: this is where it starts
            if _prefills_an_entry(r):
                self._prefilling[r.id] = r.prompt
            plan.add.append(r)
        return plan

    def settling(self) -> bool:
        """Rank 0: sequences that finished wait for a plan to become prompt-cache entries (or go),
        or new entries to be copied (``PromptCache.compact``)."""
        return self.cache is not None and bool(self.cache.pending or self.cache.loose)

    def tidy(self, stepped: bool) -> None:
        """Copy the prompt cache's new entries where no one waits for the copies, a bounded amount
        at a time: after a step that left no sequence waiting for its first token (else those held
        ``LOOSE_STEPS`` steps); idle, a few MiB between two looks at the inbox."""
        if self.cache is None or not self.cache.loose:
            return
        if not stepped:
            self.cache.compact(budget=IDLE_COPY)
            return
        self.cache.stepped()
        self.cache.compact(aged=0 if not self._unanswered else LOOSE_STEPS, budget=STEP_COPY)

    def continues(self, prompt: list[int]) -> bool:
        """Rank 0: whether ``prompt`` goes on from a reply the prompt cache holds (a conversation's
        next turn)."""
        return self.cache is not None and self.cache.continues(prompt)

    def admitted(self) -> list[Admitted]:
        """Rank 0: the requests added since the last call, with their prompt tokens from the cache."""
        out, self._admitted = self._admitted, []
        return out

    def apply(self, plan: Plan) -> None:
        if self.cache is not None:
            self.cache.apply(plan.cache)  # the pending sequences rank 0 decided on: kept or dropped
        gone = [self._uids.pop(r) for r in dict.fromkeys(plan.remove) if r in self._uids]
        keeping = self.cache is not None and self.cache.enabled
        if gone:
            caches = self.gen.remove(gone, return_prompt_caches=keeping)
            for uid, (cache, tokens) in caches.items():
                rid = self._ids[uid]
                self.cache.finished(rid, cache, tokens, self._asked.get(rid), self._bases.get(uid))
        for uid in gone:
            self._entries_at_prefill.discard(uid)
            self._bases.pop(uid, None)
            self._unanswered.discard(uid)
            rid = self._ids.pop(uid)
            self._asked.pop(rid, None)
            if rid in self._ended:  # an end of sequence: its cache holds the whole reply
                self._complete.add(rid)
            self._ended.discard(rid)
            self._detokenizers.pop(rid, None)
            self._unseen.discard(rid)
        if plan.add:
            hits = [r.hit if keeping else None for r in plan.add]
            start = [h.tokens if h is not None else 0 for h in hits]
            uids = self.gen.insert(
                [r.prompt[n:] for r, n in zip(plan.add, start)],
                [r.max_tokens for r in plan.add],
                caches=[_roomy(self.cache.take(h, self.model)) for h in hits] if keeping else None,
                all_tokens=[r.prompt[:n] for r, n in zip(plan.add, start)],
                samplers=[sampler(r.temperature, r.top_p, r.seed) for r in plan.add],
            )
            self._unanswered.update(uids)
            for uid, h in zip(uids, hits):
                if (base := self.cache.base(h) if keeping else None) is not None:
                    self._bases[uid] = base
            for uid, r, n in zip(uids, plan.add, start):
                self._ids[uid], self._uids[r.id], self._asked[r.id] = r.id, uid, len(r.prompt)
                if keeping and _prefills_an_entry(r):
                    self._entries_at_prefill.add(uid)
                if self.rank == 0:
                    self._detokenizers[r.id] = self.tokenizer.detokenizer
                    self._admitted.append(Admitted(r.id, n, time.time()))
                    self._unseen.add(r.id)

    def step(self) -> list[Token]:
        """Every sequence one step on (a collective on a sharded model); rank 0 gets the new tokens."""
        last = _last_tokens(self.gen)
        prefills, responses = ([], last) if last is not None else self.gen.next()
        if self.cache is not None and self.cache.enabled:
            # a prompt prefilled but for its last token: an entry that later prompts can start from
            done = [r.uid for r in prefills if r.end_of_segment and not r.end_of_prompt and r.uid in self._ids]
            done = [uid for uid in done if uid in self._entries_at_prefill]
            self._entries_at_prefill.difference_update(done)
            for uid, (cache, tokens) in self.gen.extract_cache(done).items() if done else ():
                key = ("prompt", self._ids[uid])
                self.cache.finished(key, cache, tokens, base=self._bases.get(uid))
                if self.rank == 0:
                    self._complete.add(key)
        out = []
        for r in responses:
            self._unanswered.discard(r.uid)
            rid = self._ids[r.uid]
            dropped = r.finish_reason is not None  # max_tokens: every rank's generator dropped it already
            if dropped:
                del self._ids[r.uid], self._uids[rid]
                self._entries_at_prefill.discard(r.uid)
                asked = self._asked.pop(rid, None)
                base = self._bases.pop(r.uid, None)
                if self.cache is not None:
                    self.cache.finished(rid, r.prompt_cache, r.all_tokens, asked, base)
                    if self.rank == 0:
                        self._complete.add(rid)
            if self.rank == 0 and rid not in self._ended:
                out.append(self._token(rid, r.token, r.finish_reason))
            if dropped:
                self._ended.discard(rid)
                self._detokenizers.pop(rid, None)
                self._unseen.discard(rid)
        return out

    def _token(self, rid: int, token: int, finish: Optional[str]) -> Token:
        detokenizer = self._detokenizers[rid]
        if token in self.eos:
            finish = "stop"
            self._ended.add(rid)
        else:
            detokenizer.add_token(token)
        if finish is not None:
            detokenizer.finalize()
        text = detokenizer.last_segment
        # a streaming detokenizer holds a token's text back until the next completes it (a word,
        # a character of several bytes): the first token a client sees is the first with text
        first = bool(text) and rid in self._unseen
        if first:
            self._unseen.discard(rid)
        return Token(rid, token, text, finish, first)

    def close(self) -> None:
        self.gen.close()
        if self.cache is not None:
            self.cache.compact()


class Outbox:
    """Rank 0's tokens on their way to the notebook: one ``session.report`` carries every step's
    tokens since the last, sent when a reply begins or ends (its first text, its end: what a
    client waits for) and otherwise at most every ``every`` seconds. A report costs the rank
    about 0.1 ms of Python and a message; a step of a small batch on a GPU takes a few ms.

    Example (rank 0, each step)::

        outbox = Outbox(lambda tokens: session.report(Tokens(time.time(), tuple(tokens))), every=0.02)
        outbox.add(tokens)
        ...
        outbox.flush()
    """

    def __init__(self, send: Callable[[list[Token]], None], every: float) -> None:
        self.send, self.every = send, every
        self.tokens: list[Token] = []
        self.sent = time.perf_counter()

    def add(self, tokens: list[Token]) -> None:
        self.tokens += tokens
        now = any(t.first or t.finish is not None for t in tokens)
        if now or time.perf_counter() - self.sent >= self.every:
            self.flush()

    def flush(self) -> None:
        tokens, self.tokens = self.tokens, []
        self.sent = time.perf_counter()
        self.send(tokens)


def run(batch: Batch, decide: Callable[[Batch], Plan], emit: Callable[[list[Token]], None]) -> int:
    """Step ``batch`` until a plan says stop; return the steps taken. On rank 0, ``decide(batch)``
    makes each plan and ``emit(tokens)`` gets each step's tokens; other ranks follow.

    On several ranks a plan takes effect one step after rank 0 made it: the ``all_sum`` that
    announces it is queued before a step and read after that step, when it is long done. Read
    at once, it would hold every rank's Python until the step in flight finished, and the next
    step's graph could no longer be built while the last one runs (mlx-lm's overlap)."""
    steps = 0
    lagged = batch.group is not None and batch.group.size() > 1
    offered = None  # several ranks: rank 0's plan and the all_sum announcing it, in flight
    while True:
        if offered is not None:
            plan = Plan() if (got := prompt_cache.receive(*offered, batch.group, batch.stream)) is None else got
            batch.apply(plan)
            if plan.stop:
                return steps
        made = batch.prepare(decide(batch)) if batch.rank == 0 else None
        if lagged:
            offered = prompt_cache.offer(made or None, batch.group, batch.stream)
        else:
            plan = made or Plan()
            batch.apply(plan)
            if plan.stop:
                return steps
        stepped = bool(len(batch))
        if stepped:
            tokens = batch.step()
            steps += 1
            if batch.rank == 0:
                emit(tokens)
        batch.tidy(stepped)


@dataclass
class Answer:
    """One prompt's reply in a batch, as rank 0 saw it come (other ranks: empty)."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)  # generated, an end-of-sequence token included
    text: str = ""
    finish_reason: Optional[str] = None  # "stop", "length", None (stopped)
    ttft: Optional[float] = None  # seconds from the start of the batch to its first token
    cached_tokens: int = 0  # of prompt_tokens, those the prompt cache held


@dataclass
class Answers:
    """One rank's account of a batch (``generate_batch_on_rank``)."""

    answers: list[Answer]
    seconds: float  # first prefill to last token
    steps: int
    stopped: bool
    peak_memory: int


def generate_batch_on_rank(
    prompts: list[Prompt], max_tokens: int, temperature: float, top_p: float, seeds: list[int], max_batch: int
) -> Answers:
    """Generate ``prompts`` as one batch on every rank; rank 0 reports each step's tokens (:class:`Tokens`)."""
    m = loaded()
    todo = [
        Request(i, prompt_tokens(m.tokenizer, p), max_tokens, temperature, top_p, s)
        for i, (p, s) in enumerate(zip(prompts, seeds))
    ]
    for r in todo:
        if problem := r.problem():
            raise ValueError(f"prompt {r.id}: {problem}")
    batch = Batch(m.model, m.tokenizer, m.group, cache=m.cache, max_batch=max_batch)
    answers = [Answer(len(r.prompt)) for r in todo]
    t0 = time.perf_counter()

    def decide(batch: Batch) -> Plan:
        plan = Plan(remove=batch.ended(), add=todo[:])
        todo.clear()
        live = len(batch) - len(plan.remove) + len(plan.add) + len(batch.held)
        # the last removal's caches are decided on by the plan after it: stop one plan later
        plan.stop = session.stop_requested() or (live == 0 and not plan.remove)
        return plan

    def send(tokens: list[Token]) -> None:
        if shown := tuple(t for t in tokens if t.text or t.finish):
            session.report(Tokens(time.time(), shown))

    outbox = Outbox(send, REPORT_EVERY)

    def emit(tokens: list[Token]) -> None:
        now = time.perf_counter() - t0
        for a in batch.admitted():
            answers[a.id].cached_tokens = a.cached
        for t in tokens:
            answer = answers[t.id]
            answer.tokens.append(t.token)
            answer.text += t.text
            answer.finish_reason = t.finish
            answer.ttft = answer.ttft if answer.ttft is not None else now
        outbox.add(tokens)

    try:
        steps = run(batch, decide, emit)
    finally:
        batch.close()
        if batch.rank == 0:
            outbox.flush()
    return Answers(answers, time.perf_counter() - t0, steps, session.stop_requested(), memory.in_use()[1])
