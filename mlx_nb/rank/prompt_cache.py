"""The prompt cache, the rank half: KV caches of earlier prompts, reused by the prompts that extend them.

Every rank holds its own slice of every entry (a pipeline rank its layers, a tensor-parallel
rank its heads), stored under an id. Which entry a prompt reuses, which finished sequence
becomes an entry and which entries are evicted is decided on rank 0 alone (its :class:`Index`
of the entries' token ids) and reaches every rank in the same step, inside a batch's plan or
by :func:`broadcast`: a rank never decides from what it alone sees, so no rank diverges and no
collective goes unpaired.

As mlx-lm's ``LRUPromptCache``: a prompt reuses the entry with the longest common prefix (an
entry is trimmed to it, and at least one token is always prefilled, for the logits); a new entry
replaces the entries that are its prefixes; the least recently used go first when a rank's
limit in bytes is passed. Unlike it, the bytes are counted per rank (tokens times each rank's KV
bytes per token, measured at load), so that rank 0 keeps every rank within its own limit.
An entry whose sequence began from part of another entry (a conversation that starts with a
system prompt the cache holds) shares those tokens' keys and values with it: each layer of an entry
is a list of :class:`Piece` s, and 8 conversations of one system prompt hold it once, not 8 times
(rank 0's byte count still counts it in each, so the limit errs towards less). Without that, each
wave of them grew a rank by a copy per conversation, and on a CPU the kernel's fresh pages for
that growth were most of what the next wave's prefill waited for.

Only models whose every layer keeps a plain ``KVCache`` are cached (a sliding window or a
recurrent state cannot be trimmed to a prefix); for the others the cache says why it is off.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import KVCache, make_prompt_cache

from . import memory

MAX_ENTRIES = 256  # entries rank 0 compares a prompt with, whatever their bytes
ZERO_LIMIT = "its limit is 0 bytes"
DEFAULT_SHARE = 4  # the default limit: this fraction (1/4) of what is left of a rank's budget after the load
# An entry shares the tokens its sequence began from with the entry they came from (one copy of a
# system prompt for every conversation that starts with it) when they are at least this many, and
# the pieces of a layer it would take are at most MAX_PIECES (more: it gets a copy of its own)
SHARE_FROM, MAX_PIECES = 64, 8


def broadcast(obj: Any, group: Optional[mx.distributed.Group], stream: Any = generation_stream) -> Any:
    """Rank 0's ``obj`` on every rank of ``group`` (a collective: every rank calls it; only rank 0's
    ``obj`` counts; None stays None). Nothing to send costs one 4-byte ``all_sum``; something, a
    second one of its pickled bytes. ``stream``: the one the model's collectives run on, so that
    all of them queue in one order on every rank."""
    if group is None or group.size() == 1:
        return obj
    return receive(*offer(obj, group, stream), group, stream)


def offer(obj: Any, group: mx.distributed.Group, stream: Any) -> tuple[bytes, mx.array]:
    """The first half of :func:`broadcast`: rank 0's ``obj`` pickled, and the ``all_sum`` of its
    size queued on ``stream`` and started, not waited for (:func:`receive` reads it)."""
    data = pickle.dumps(obj) if group.rank() == 0 and obj is not None else b""
    with mx.stream(stream):
        size = mx.distributed.all_sum(mx.array([len(data)], dtype=mx.int32), group=group)
    mx.async_eval(size)
    return data, size


def receive(data: bytes, size: mx.array, group: mx.distributed.Group, stream: Any) -> Any:
    """The second half of :func:`broadcast`: the object :func:`offer` announced (None: none)."""
    n = size.item()
    if not n:
        return None
    with mx.stream(stream):
        mine = mx.array(np.frombuffer(data, dtype=np.uint8)) if data else mx.zeros((n,), dtype=mx.uint8)
        data = np.array(mx.distributed.all_sum(mine, group=group)).tobytes()
    return pickle.loads(data)


@dataclass(frozen=True)
class Hit:
    """Rank 0's word for one prompt: start from ``tokens`` tokens of entry ``entry``."""

    entry: int
    tokens: int


class Piece:
    """Some consecutive tokens of one layer of an entry: their keys and values. ``owned``: a copy
    the cache made (else a view of a finished sequence's cache, until :meth:`PromptCache.compact`).
    Entries that begin alike hold the same pieces for those tokens."""

    __slots__ = ("keys", "values", "owned")

    def __init__(self, keys: mx.array, values: mx.array, owned: bool) -> None:
        self.keys, self.values, self.owned = keys, values, owned

    @property
    def tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass(frozen=True)
class Base:
    """Where a sequence's KV cache began: the first ``tokens`` tokens of entry ``entry``, whose
    ``layers`` (its own list of each layer's pieces) it holds even if the entry goes meanwhile."""

    entry: int
    layers: list
    tokens: int


@dataclass
class Changes:
    """What rank 0 decided about the entries; every rank applies it in the same step."""

    keep: dict = field(default_factory=dict)  # a finished sequence's key -> the id of its new entry
    evict: list[int] = field(default_factory=list)
    clear: bool = False  # every entry goes (before ``keep``)
    decided: list = field(default_factory=list)  # the pending sequences decided on (kept or not): they go

    def __bool__(self) -> bool:
        return bool(self.keep or self.evict or self.clear or self.decided)


@dataclass
class CacheStatus:
    """One rank's prompt cache: ``prompt_cache(cluster)``, ``%mlx_cluster cache``."""

    rank: int
    enabled: bool
    why_off: Optional[str]
    entries: int
    tokens: int  # tokens held, every entry together
    bytes: int  # this rank's slice of them
    limit: int  # bytes this rank may hold
    lookups: int = 0  # prompts rank 0 looked up (rank 0 only)
    hits: int = 0
    cached_tokens: int = 0  # prompt tokens that came from the cache instead of a prefill
    prompt_tokens: int = 0  # every looked-up prompt's tokens


class Index:
    """Rank 0's view of the entries: their token ids, in least-recently-used order, and what each
    costs every rank. Pure Python: it decides, the ranks' :class:`PromptCache` stores.

    Example:
        >>> index = Index(per_token=[10, 10], limits=[100, 100])
        >>> index.add([1, 2, 3])
        (0, [])
        >>> index.lookup([1, 2, 3, 4])
        Hit(entry=0, tokens=3)
        >>> index.add([1, 2, 3, 4, 5, 6, 7, 8, 9])  # the first is its prefix: replaced
        (1, [0])
        >>> index.add(list(range(20)))  # 20 tokens x 10 bytes: over either rank's 100
        (None, [])
        >>> index.add([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], asked=9)  # a reply of 1 token to a prompt of 9
        (2, [1])
        >>> index.continues([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]), index.continues([1, 2, 3, 4, 5, 9])
        (True, False)
    """

    def __init__(self, per_token: list[int], limits: list[int]) -> None:
        self.per_token, self.limits = per_token, limits
        self.entries: OrderedDict[int, np.ndarray] = OrderedDict()  # id -> tokens; oldest first
        self.asked: dict[int, int] = {}  # id of an entry that holds a reply -> its prompt's tokens
        self._next = 0
        self.lookups = self.hits = self.cached_tokens = self.prompt_tokens = 0

    def tokens(self) -> int:
        return sum(len(t) for t in self.entries.values())

    def bytes(self) -> list[int]:
        """What the entries cost each rank."""
        n = self.tokens()
        return [n * p for p in self.per_token]

    def lookup(self, tokens: list[int], count: bool = True) -> Optional[Hit]:
        """The entry with the longest common prefix with ``tokens`` (the newest of equals), and how
        much of it to reuse: all of that prefix but ``tokens``' last token. None: no entry helps.
        ``count``: a prompt that starts there (its hit is counted, the entry made the newest);
        else only a look."""
        if count:
            self.lookups += 1
            self.prompt_tokens += len(tokens)
        want = np.asarray(tokens, dtype=np.int64)
        best, best_n = None, 0
        for eid, have in reversed(self.entries.items()):
            n = _common_prefix(have, want)
            if n > best_n:
                best, best_n = eid, n
        reuse = min(best_n, len(tokens) - 1)
        if best is None or reuse < 1:
            return None
        if count:
            self.entries.move_to_end(best)
            self.hits += 1
            self.cached_tokens += reuse
        return Hit(best, reuse)

    def continues(self, tokens: list[int]) -> bool:
        """Whether ``tokens`` go on from a reply an entry holds, past its prompt: a conversation's
        next turn, sent by a client that waited for that reply."""
        want = np.asarray(tokens, dtype=np.int64)
        return any(_common_prefix(self.entries[eid], want) > n for eid, n in self.asked.items())

    def add(self, tokens: list[int], asked: Optional[int] = None) -> tuple[Optional[int], list[int]]:
        """Enter ``tokens`` (a finished sequence; ``asked``: its prompt's tokens, a reply after
        them): (its new id, or None if it is not kept, and the ids evicted). An entry that
        ``tokens`` extends goes; ``tokens`` that an entry already holds (a prefix of it) only make
        that entry the most recent."""
        new = np.asarray(tokens, dtype=np.int64)
        if not len(new):
            return None, []
        evict = []
        for eid, have in list(self.entries.items()):
            n = _common_prefix(have, new)
            if n == len(new):  # already held
                self.entries.move_to_end(eid)
                return None, []
            if n == len(have):
                evict.append(eid)
        for eid in evict:
            self._drop(eid)
        if any(len(new) * p > limit for p, limit in zip(self.per_token, self.limits)):
            return None, evict  # alone over a rank's limit
        eid, self._next = self._next, self._next + 1
        self.entries[eid] = new
        if asked is not None and asked < len(new):
            self.asked[eid] = asked
        while len(self.entries) > MAX_ENTRIES or any(b > lim for b, lim in zip(self.bytes(), self.limits)):
            evict.append(self._drop(next(iter(self.entries))))
        return eid, evict

    def fit(self) -> list[int]:
        """Evict the oldest entries until every rank is within its limit; the ids evicted."""
        evict = []
        while self.entries and any(b > lim for b, lim in zip(self.bytes(), self.limits)):
            evict.append(self._drop(next(iter(self.entries))))
        return evict

    def _drop(self, eid: int) -> int:
        del self.entries[eid]
        self.asked.pop(eid, None)
        return eid

    def clear(self) -> None:
        self.entries.clear()
        self.asked.clear()


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if not n:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PromptCache:
    """One rank's entries (its slice of each), the sequences that finished since rank 0 last
    decided (``pending``), and on rank 0 the :class:`Index` that decides."""

    def __init__(
        self,
        rank: int,
        per_token: list[int],
        limits: list[int],
        why_off: Optional[str] = None,
    ) -> None:
        self.rank, self.why_off = rank, why_off
        self.limit = limits[rank]
        self.index = Index(per_token, limits) if rank == 0 else None
        # id -> each layer's pieces, in token order (None: a layer another pipeline rank holds)
        self.entries: dict[int, list[Optional[list[Piece]]]] = {}
        # key -> (cache, tokens, asked, where its cache began)
        self.pending: dict[Any, tuple[list[Any], list[int], Optional[int], Optional[Base]]] = {}
        self.bases: dict[int, Base] = {}  # a loose entry -> what it will share (see compact)
        self.loose: dict[int, int] = {}  # entries still views of a batch's buffers -> steps since; oldest first
        self._copied: dict[int, int] = {}  # a loose entry partly copied -> the layers copied

    @property
    def enabled(self) -> bool:
        return self.why_off is None

    # ------------------------------------------------------------- rank 0 decides
    def lookup(self, tokens: list[int], count: bool = True) -> Optional[Hit]:
        """Rank 0: which entry ``tokens`` starts from (None: none, or the cache is off)."""
        return self.index.lookup(tokens, count) if self.enabled and self.index is not None else None

    def continues(self, tokens: list[int]) -> bool:
        """Rank 0: whether ``tokens`` go on from a reply the cache holds (:meth:`Index.continues`)
        or one that finished since rank 0 last decided (a next turn can arrive first)."""
        if not self.enabled or self.index is None:
            return False
        if self.index.continues(tokens):
            return True
        want = np.asarray(tokens, dtype=np.int64)
        return any(
            asked is not None and _common_prefix(np.asarray(held[: _offset(cache)], dtype=np.int64), want) > asked
            for cache, held, asked, _ in self.pending.values()
        )

    def decide(self, keep: Any = None) -> Changes:
        """Rank 0: which pending sequences become entries (``keep``: their keys; None: all)."""
        changes = Changes()
        if not self.enabled or self.index is None:
            return changes
        for key, (cache, tokens, asked, _) in self.pending.items():
            changes.decided.append(key)
            if keep is not None and key not in keep:
                continue
            eid, evicted = self.index.add(tokens[: _offset(cache)], asked)
            changes.evict += evicted
            if eid is not None:
                changes.keep[key] = eid
        return changes

    # ---------------------------------------------------------- every rank applies
    def apply(self, changes: Optional[Changes]) -> None:
        """Rank 0's ``changes`` here; the pending sequences they decided on are dropped after (those
        that finished since rank 0 decided wait for its next decision)."""
        if not changes:
            return
        if changes.clear:
            self.entries.clear()
            self.loose.clear()
            self._copied.clear()
            self.bases.clear()
            if self.index is not None:
                self.index.clear()
        for eid in changes.evict:
            self.entries.pop(eid, None)
            self.loose.pop(eid, None)
            self._copied.pop(eid, None)
            self.bases.pop(eid, None)
        for key, eid in changes.keep.items():
            cache, tokens, _, base = self.pending[key]
            self._put(eid, cache, len(tokens[: _offset(cache)]), base)
        for key in changes.decided:
            self.pending.pop(key, None)

    def forget_pending(self) -> None:
        """Drop what an earlier batch or call that failed left pending (every rank alike)."""
        self.pending.clear()

    def finished(
        self, key: Any, cache: list[Any], tokens: list[int], asked: Optional[int] = None, base: Optional[Base] = None
    ) -> None:
        """A sequence ended, ``cache`` holding (a prefix of) ``tokens`` (``asked``: its prompt's
        tokens, a reply after them; ``base``: where its cache began, :meth:`base`): rank 0
        decides next about it."""
        if self.enabled:
            self.pending[key] = (cache, list(tokens), asked, base)

    def base(self, hit: Optional[Hit]) -> Optional[Base]:
        """Where a sequence that starts at ``hit`` (:meth:`take`) begins, for its entry to share;
        None where it would share nothing: too few tokens, or the whole entry (a conversation's
        next turn, which replaces it). A base holds the entry's pieces until the sequence's own
        entry is copied, so only those that will share get one."""
        if hit is None or hit.entry not in self.entries:
            return None
        layers = self.entries[hit.entry]
        if not SHARE_FROM <= hit.tokens < _entry_tokens(layers) - 1:
            return None
        return Base(hit.entry, layers, hit.tokens)

    def take(self, hit: Optional[Hit], model: Any) -> list[Any]:
        """A fresh prompt cache for a new sequence: ``hit``'s tokens of its entry (they stay in the
        cache: the arrays are shared, never written), else an empty one."""
        cache = make_prompt_cache(model)
        if hit is None:
            return cache
        for c, pieces in zip(cache, self.entries[hit.entry]):
            if pieces is not None:
                c.state = (*_first(pieces, hit.tokens), hit.tokens)
        return cache

    def _put(self, eid: int, cache: list[Any], n: int, base: Optional[Base]) -> None:
        # a view of the sequence's n tokens for now; :meth:`compact` copies it
        self.entries[eid] = [
            None if c.keys is None else [Piece(c.keys[..., :n, :], c.values[..., :n, :], False)] for c in cache
        ]
        self.loose[eid] = 0
        if base is not None and base.tokens <= n:  # it shares the tokens it began from (see base())
            self.bases[eid] = base

    def stepped(self) -> None:
        """A step went by: the loose entries are a step older (``compact``'s ``aged``)."""
        for eid in self.loose:
            self.loose[eid] += 1

    def compact(self, most: Optional[int] = None, aged: int = 0, budget: Optional[int] = None) -> int:
        """Copy the oldest ``most`` loose entries (None: all) held at least ``aged`` steps to
        exactly their tokens, layer by layer, until ``budget`` bytes are copied (None: no bound; at
        least one layer a call); how many entries are whole copies now.

        A new entry is first mlx-lm's extraction of the finished sequence's KV cache from its
        batch's: not yet computed, it keeps the whole batch's buffers alive (every sequence's
        tokens, rounded up to mlx-lm's step) and would make the byte limit untrue; its copy is
        what the limit counts. The copies wait so that no request waits for them: 8 entries of
        1,400 tokens of the bundled model are ~0.5 GB, ~0.5 s on a 2-core CPU (most of it the
        kernel handing out fresh pages), which a request arriving as a batch ended had waited
        for before its prefill, one entry at a time (0.2 s). So ``run`` copies a few MiB while
        the batch is idle and a bounded amount after each step (a request that arrives meanwhile
        waits for that much at most: a prompt that starts from an entry not yet copied computes
        the copy in its prefill, as mlx_lm.server's do). Each rank copies its own slice in its
        own time: no collective is involved."""
        done = spent = 0
        copies: list[mx.array] = []
        for eid in [eid for eid, steps in self.loose.items() if steps >= aged][:most]:
            entry = self.entries.get(eid)
            layer = self._copied.pop(eid, 0)
            while entry is not None and layer < len(entry) and (budget is None or not copies or spent < budget):
                if entry[layer] is not None:
                    entry[layer], made = self._settle(eid, layer, entry[layer][0])
                    copies += [a for p in made for a in (p.keys, p.values)]
                    spent += sum(p.nbytes for p in made)
                layer += 1
            if entry is not None and layer < len(entry):
                self._copied[eid] = layer  # the budget is spent: the rest at the next call
                break
            del self.loose[eid]
            self.bases.pop(eid, None)
            done += 1
        mx.eval(copies)
        return done

    def _settle(self, eid: int, layer: int, view: Piece) -> tuple[list[Piece], list[Piece]]:
        """One layer of a loose entry as pieces the cache owns: those of the tokens its sequence
        began from, shared with the entry they came from (cut where they end, once), then a
        copy of the rest; and the pieces copied."""
        base = self.bases.get(eid)
        shared, made = self._share(base, layer) if base is not None else ([], [])
        start = sum(p.tokens for p in shared)
        if start >= view.tokens:
            return shared, made
        rest = view if not start else Piece(view.keys[..., start:, :], view.values[..., start:, :], False)
        own = Piece(mx.contiguous(rest.keys), mx.contiguous(rest.values), True)
        return [*shared, own], [*made, own]

    def _share(self, base: Base, layer: int) -> tuple[list[Piece], list[Piece]]:
        """The owned pieces of ``base``'s first tokens at ``layer`` (none if some are not owned yet,
        or too many), the one they end inside cut in two where they end (every entry holding it
        then holds the two halves), and the pieces that cut made."""
        pieces = base.layers[layer]
        out, made, t = [], [], 0
        for p in list(pieces or ()):  # _replace cuts the list itself
            if t >= base.tokens or not p.owned or len(out) >= MAX_PIECES - 1:
                break
            if t + p.tokens > base.tokens:
                k = base.tokens - t
                made = [Piece(mx.contiguous(p.keys[..., :k, :]), mx.contiguous(p.values[..., :k, :]), True)]
                # the rest: a copy where an entry holds it; where only bases of entries gone do
                # (they go once their sharers are copied), a view, not worth a copy
                if any(any(q is p for q in e[layer] or ()) for e in self.entries.values()):
                    rest = Piece(mx.contiguous(p.keys[..., k:, :]), mx.contiguous(p.values[..., k:, :]), True)
                else:
                    rest = Piece(p.keys[..., k:, :], p.values[..., k:, :], False)
                self._replace(layer, p, [made[0], rest], base.layers)
                made += [rest] if rest.owned else []
                p = made[0]
            out.append(p)
            t += p.tokens
        return (out, made) if t == base.tokens else ([], [])

    def _replace(self, layer: int, piece: Piece, halves: list[Piece], *more: list) -> None:
        """``halves`` for ``piece`` at ``layer`` in every entry (and in ``more`` lists of layers)."""
        lists = {id(x): x for x in [*self.entries.values(), *(b.layers for b in self.bases.values()), *more]}
        for layers in lists.values():
            pieces = layers[layer]
            for i, p in enumerate(pieces or ()):
                if p is piece:
                    pieces[i : i + 1] = halves
                    break

    def clear(self) -> None:
        self.apply(Changes(clear=True, decided=list(self.pending)))

    def status(self) -> CacheStatus:
        pieces = {id(p): p for e in self.entries.values() for layer in e if layer is not None for p in layer}
        held = sum(p.nbytes for p in pieces.values())  # a piece entries share, once
        tokens = sum(_entry_tokens(e) for e in self.entries.values())
        s = CacheStatus(self.rank, self.enabled, self.why_off, len(self.entries), tokens, held, self.limit)
        if self.index is not None:
            i = self.index
            s.lookups, s.hits, s.cached_tokens, s.prompt_tokens = i.lookups, i.hits, i.cached_tokens, i.prompt_tokens
        return s


def _offset(cache: list[Any]) -> int:
    """Tokens a prompt cache holds (its layers agree; a pipeline rank's other layers hold none)."""
    return max((c.offset for c in cache if getattr(c, "keys", None) is not None), default=0)


def _entry_tokens(entry: list) -> int:
    return max((sum(p.tokens for p in layer) for layer in entry if layer is not None), default=0)


def _first(pieces: list[Piece], n: int) -> tuple[mx.array, mx.array]:
    """The keys and values of a layer's first ``n`` tokens: a view of its first piece, or the
    pieces joined (a copy; a prompt's prefill copies them again into its batch's cache)."""
    keys, values, t = [], [], 0
    for p in pieces:
        if t >= n:
            break
        k = min(p.tokens, n - t)
        keys.append(p.keys[..., :k, :])
        values.append(p.values[..., :k, :])
        t += k
    if len(keys) == 1:
        return keys[0], values[0]
    return mx.concatenate(keys, axis=2), mx.concatenate(values, axis=2)


# ------------------------------------------------------------------ one per loaded model
def setup(model: Any, group: Optional[mx.distributed.Group], limit: Optional[int] = None) -> PromptCache:
    """A new, empty cache for ``model`` on every rank of ``group`` (a collective: every rank calls
    it, right after the load). ``limit``: bytes per rank (None: 1/4 of what is left of the rank's
    memory budget, :func:`mlx_nb.rank.memory.free`; 0: no cache). It runs the model on one token to measure the rank's KV bytes per token.
    The cache lives with the model it holds entries of (``rank.generate.Loaded``)."""
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    probe = make_prompt_cache(model)
    why_off = None
    if not all(type(c) is KVCache for c in probe):
        kinds = sorted({type(c).__name__ for c in probe} - {"KVCache"})
        why_off = f"this model keeps {', '.join(kinds)} (not a plain KV cache), which cannot be cut to a prefix"
    per_token = 0
    if why_off is None:
        with mx.stream(generation_stream):
            model(mx.array([[0]]), cache=probe)
        real = [c for c in probe if c.keys is not None]
        mx.eval([c.keys for c in real] + [c.values for c in real])
        per_token = sum((c.keys.nbytes + c.values.nbytes) // c.keys.shape[2] for c in real)
    del probe
    if limit is None:
        limit = memory.free() // DEFAULT_SHARE
    elif limit == 0:
        why_off = why_off or ZERO_LIMIT
    # in MiB, so that a limit of terabytes fits an int32
    rows = _gather([per_token, min(limit >> 20, 2**31 - 1), int(why_off is not None)], rank, size, group)
    per_tokens = [r[0] for r in rows]
    limits = [r[1] << 20 for r in rows]
    if why_off is None and any(r[2] for r in rows):
        why_off = "another rank cannot cache this model"
    cache = PromptCache(rank, per_tokens, limits, why_off)
    cache.limit = limit  # this rank's own, in bytes
    return cache


def set_limit(pc: PromptCache, limit: Optional[int], group: Optional[mx.distributed.Group]) -> None:
    """A new limit in bytes for every rank (None: the default share); rank 0 evicts what no longer
    fits, on every rank alike (a collective: every rank calls it)."""
    rank, size = (group.rank(), group.size()) if group is not None else (0, 1)
    if limit is None:
        limit = memory.free() // DEFAULT_SHARE
    rows = _gather([min(limit >> 20, 2**31 - 1)], rank, size, group)
    pc.limit = limit
    if pc.why_off in (None, ZERO_LIMIT):  # every rank sees the same rows: they agree on this
        pc.why_off = ZERO_LIMIT if any(r[0] == 0 for r in rows) else None
    changes = None
    if pc.index is not None:
        pc.index.limits = [r[0] << 20 for r in rows]
        changes = Changes(evict=pc.index.fit())
    pc.apply(broadcast(changes, group))


def _gather(values: list[int], rank: int, size: int, group: Optional[mx.distributed.Group]) -> list[list[int]]:
    """Every rank's ``values`` (int32s), in rank order (a collective)."""
    if size == 1:
        return [values]
    rows = np.zeros((size, len(values)), dtype=np.int32)
    rows[rank] = values
    with mx.stream(generation_stream):
        out = mx.distributed.all_sum(mx.array(rows), group=group)
    return np.array(out).tolist()
