"""Fit before load: the layouts a model allows over a cluster, what each rank then holds, and
whether it fits the ranks' memory budgets.

Pure: it takes a model's :class:`~mlx_nb.footprint.ModelFacts` (its config.json and safetensors
headers: no weight is read) and the ranks' budgets (:class:`mlx_nb.rank.memory.Budget`).
``mlx_nb.generate.plan(cluster)`` asks the ranks for their budgets and calls :func:`make_plan`;
``load_model`` refuses, with the plan's numbers, a layout that does not fit.

Pipelines count as mlx-lm does (``PipelineMixin.pipeline``): ``split[r]`` is rank r's number of
layers, and rank 0 runs the *last* layers, rank n-1 the first ones.

Example::

    budgets = [Budget(0, 700 << 20, BudgetSource.GIVEN), Budget(1, 260 << 20, BudgetSource.GIVEN), ...]
    plan = make_plan(read_model(bundled_model(dense=True)), budgets, context=1024)
    plan.recommended.split        # [28, 1, 1]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Optional

from .display import Table, human_bytes
from .footprint import ModelFacts, RankMemory, kv_bytes, stage_memory, tensor_memory
from .models import tensor_blockers
from .rank.memory import Budget


# ----------------------------------------------------------- splits and ownership
def even_split(layers: int, ranks: int) -> list[int]:
    """mlx-lm's even pipeline split (``PipelineMixin.pipeline`` without ``split``): the low
    ranks get the extra layers.

    >>> even_split(30, 4)
    [8, 8, 7, 7]
    """
    base, extra = divmod(layers, ranks)
    return [base + (r < extra) for r in range(ranks)]


def stage_layers(split: Sequence[int], rank: int) -> range:
    """The layers rank ``rank`` runs in a pipeline of ``split``: after those of ranks
    rank+1 ... n-1, as mlx-lm counts (rank 0 runs the last layers).

    >>> stage_layers([20, 5, 5], 0), stage_layers([20, 5, 5], 2)
    (range(10, 30), range(0, 5))
    """
    start = sum(split[rank + 1 :])
    return range(start, start + split[rank])


def check_split_layers(split: Sequence[int], layers: int, ranks: int) -> list[int]:
    """``split`` as a list of layers per rank, if it gives each of ``ranks`` ranks at least one
    of ``layers`` layers and every layer to one rank; else a one-line ValueError.

    >>> check_split_layers([20, 5, 4], 30, 3)
    Traceback (most recent call last):
    ...
    ValueError: split [20, 5, 4] gives 29 layers: the model has 30 (split='auto' splits by the ranks' memory)
    """
    if isinstance(split, (str, bytes)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in split):
        raise ValueError(f"split takes layers per rank (a list of ints, rank 0 first) or 'auto', got {split!r}")
    split = list(split)
    if len(split) != ranks:
        raise ValueError(f"split {split} has {len(split)} entries for {ranks} ranks: give one per rank, rank 0 first")
    if min(split) < 1:
        raise ValueError(f"split {split} gives a rank no layer: every pipeline rank needs at least one")
    if sum(split) != layers:
        raise ValueError(
            f"split {split} gives {sum(split)} layers: the model has {layers} (split='auto' splits by the ranks' memory)"
        )
    return split


def check_ownership(held: Sequence[range], layers: int, planned: Optional[Sequence[int]] = None) -> None:
    """Every layer is run by exactly one rank (``held[r]``: the layers rank r loaded), and
    each rank runs the layers of the ``planned`` split; else a RuntimeError naming the layers no
    rank or several ranks hold, or the split the ranks made.

    >>> check_ownership([range(10, 30), range(5, 10), range(0, 5)], 30)
    >>> check_ownership([range(10, 30), range(4, 10), range(0, 4)], 31)
    Traceback (most recent call last):
    ...
    RuntimeError: the ranks hold layers that no rank or several ranks run: layer 30 by none
    """
    count = [0] * layers
    for r in held:
        for i in r:
            if i < layers:
                count[i] += 1
    wrong = [f"layer {i} by {'none' if c == 0 else f'{c} ranks'}" for i, c in enumerate(count) if c != 1]
    if wrong:
        raise RuntimeError(f"the ranks hold layers that no rank or several ranks run: {', '.join(wrong)}")
    if planned is not None and list(held) != [stage_layers(planned, r) for r in range(len(planned))]:
        ran = ", ".join(f"rank {r}: {h.start}-{h.stop - 1}" for r, h in enumerate(held))
        raise RuntimeError(
            f"the ranks run other layers than the plan's split {list(planned)} ({ran}): their memory "
            "differs from the plan's (is mlx-lm's PipelineMixin the one the planner knows?)"
        )


# ------------------------------------------------------------- not fitting
@dataclass(frozen=True)
class Shortfall:
    """A rank whose share does not fit its memory budget."""

    rank: int
    needs: int
    has: int

    def __str__(self) -> str:
        return f"rank {self.rank} needs {human_bytes(self.needs)}, has {human_bytes(self.has)}"


class DoesNotFit(ValueError):
    """Work that does not fit the ranks' memory budgets, refused before it starts: ``shortfalls``
    names each rank over its budget, and the message says what would fit.

    Example::

        check_fits("fine-tuning with batch 8", needs=[...], budgets=[b.bytes for b in budgets])
    """

    def __init__(self, what: str, shortfalls: Sequence[Shortfall], advice: str = ""):
        self.what, self.shortfalls, self.advice = what, list(shortfalls), advice
        over = "; ".join(map(str, self.shortfalls))
        super().__init__(f"{what} does not fit the ranks' memory: {over}" + (f". {advice}" if advice else ""))


def shortfalls(needs: Sequence[int], budgets: Sequence[int]) -> list[Shortfall]:
    """The ranks that need more than their budget.

    >>> shortfalls([400 << 20, 271 << 20], [700 << 20, 260 << 20])
    [Shortfall(rank=1, needs=284164096, has=272629760)]
    """
    return [Shortfall(r, need, has) for r, (need, has) in enumerate(zip(needs, budgets)) if need > has]


def check_fits(what: str, needs: Sequence[int], budgets: Sequence[int], advice: str = "") -> None:
    """Raise :class:`DoesNotFit` (a ValueError, one line) if any rank needs more than its budget.

    >>> check_fits("the even split", [271 << 20, 271 << 20], [700 << 20, 260 << 20], "try split='auto'")
    Traceback (most recent call last):
    ...
    mlx_nb.planner.DoesNotFit: the even split does not fit the ranks' memory: rank 1 needs 271.0 MB, has 260.0 MB. try split='auto'
    """
    if over := shortfalls(needs, budgets):
        raise DoesNotFit(what, over, advice)


# ------------------------------------------------------------------ layouts
class Kind(str, Enum):
    TENSOR = "tensor"
    PIPELINE = "pipeline"


@dataclass
class Layout:
    """One way to split the model over the ranks, and what each rank then holds.

    ``split``: a pipeline's layers per rank, rank 0 first, as mlx-lm counts (rank 0 runs the
    last layers); None for tensor parallelism (every rank a share of every layer)."""

    kind: Kind
    split: Optional[list[int]]
    memory: list[RankMemory]
    budgets: list[int]
    bytes_per_token: int  # bytes the ranks send each other per generated token, all together
    by_budgets: bool = False  # a pipeline split by the ranks' budgets (split="auto")

    @property
    def ranks(self) -> int:
        return len(self.memory)

    @property
    def memory_per_rank(self) -> list[int]:
        return [m.total for m in self.memory]

    @property
    def fits(self) -> bool:
        return not self.shortfalls

    @property
    def shortfalls(self) -> list[Shortfall]:
        return shortfalls(self.memory_per_rank, self.budgets)

    @property
    def fullest(self) -> float:
        """The largest share of a budget that a rank needs (over 1: it does not fit)."""
        return max(m / max(b, 1) for m, b in zip(self.memory_per_rank, self.budgets))

    def layers(self, rank: int, total: int) -> range:
        """The layers ``rank`` runs (a pipeline), or all ``total`` of them (tensor parallel)."""
        return stage_layers(self.split, rank) if self.split is not None else range(total)

    @property
    def name(self) -> str:
        if self.kind is Kind.TENSOR:
            return "tensor parallel"
        return "pipeline, by the budgets" if self.by_budgets else "pipeline, even split"

    def describe(self) -> str:
        """``pipeline [20, 5, 5]``, ``tensor parallel over 3 ranks``."""
        return f"pipeline {self.split}" if self.split is not None else f"tensor parallel over {self.ranks} ranks"


def tensor_layout(facts: ModelFacts, budgets: Sequence[Budget], context: int) -> Layout:
    n = len(budgets)
    memory = [tensor_memory(facts, n, context, b.gpu) for b in budgets]
    moved = 4 * (n - 1) * facts.layers * facts.hidden * facts.act_bytes  # 2 all_sums a layer
    return Layout(Kind.TENSOR, None, memory, [b.bytes for b in budgets], moved)


def pipeline_layout(
    facts: ModelFacts, budgets: Sequence[Budget], split: Sequence[int], context: int, by_budgets: bool = False
) -> Layout:
    n = len(budgets)
    memory = [stage_memory(facts, stage_layers(split, r), context, b.gpu) for r, b in enumerate(budgets)]
    moved = (n - 1) * (n + 1) * facts.hidden * facts.act_bytes  # a send per stage, then one all_gather
    return Layout(Kind.PIPELINE, list(split), memory, [b.bytes for b in budgets], moved, by_budgets)


def budget_split(facts: ModelFacts, budgets: Sequence[Budget], context: int) -> list[int]:
    """Layers per rank (rank 0 first) that leave the fullest rank as empty as they can: the
    smallest largest share of a budget any rank needs, with each rank one layer at least."""
    n, layers = len(budgets), facts.layers
    fixed = [stage_memory(facts, range(0), context, b.gpu).total for b in budgets]
    cost = [facts.layer_bytes[i] + kv_bytes(facts, facts.kv_heads, 1, context) for i in range(layers)]

    def fill(share: float) -> Optional[list[int]]:
        """Give each rank, from rank n-1 (the first layers) down, as many layers as fit in
        ``share`` of its budget: None if some rank's layers do not fit."""
        split, at = [0] * n, 0
        for r in reversed(range(n)):
            room, take = share * max(budgets[r].bytes, 1) - fixed[r], 0
            most = layers - at - r  # leave one for each rank after it
            while take < most and (r == 0 or room >= cost[at + take]):
                room -= cost[at + take]
                take += 1
            if take < 1 or room < 0:
                return None
            split[r], at = take, at + take
        return split

    low, high = 0.0, max((f + sum(cost)) / max(b.bytes, 1) for f, b in zip(fixed, budgets))
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (low, mid) if fill(mid) is not None else (mid, high)
    return fill(high) or even_split(layers, n)


def layouts(facts: ModelFacts, budgets: Sequence[Budget], context: int) -> tuple[list[Layout], list[str]]:
    """Every layout mlx-lm can make of the model over these ranks, and why the others cannot be."""
    n, out, notes = len(budgets), [], []
    if not facts.tensor:
        notes.append(f"tensor parallel: mlx-lm has none for {facts.name}")
    elif why := tensor_blockers(facts.config, n):
        notes.append(f"tensor parallel over {n} ranks: not possible: {'; '.join(why)}")
    else:
        out.append(tensor_layout(facts, budgets, context))
    if not facts.pipeline:
        notes.append(f"pipeline: mlx-lm cannot split {facts.name} into one")
    elif n > facts.layers:
        notes.append(f"pipeline over {n} ranks: not possible: it has {facts.layers} layers, one a rank at least")
    elif n > 1 or not out:
        even = pipeline_layout(facts, budgets, even_split(facts.layers, n), context)
        out.append(even)
        split = budget_split(facts, budgets, context)
        if split != even.split:
            out.append(pipeline_layout(facts, budgets, split, context, by_budgets=True))
    return out, notes


def recommend(candidates: Sequence[Layout]) -> Optional[Layout]:
    """Of the layouts that fit, the one that moves the fewest bytes per token (then the one
    whose fullest rank is emptiest); None if none fits."""
    fitting = [layout for layout in candidates if layout.fits]
    return min(fitting, key=lambda x: (x.bytes_per_token, x.fullest)) if fitting else None


# --------------------------------------------------------------------- plan
@dataclass
class Plan:
    """``plan(cluster)``: every layout the model and the ranks allow, each with its memory per
    rank, whether it fits, and the one recommended. Shows as a table in the notebook.

    Example::

        p = plan(cluster, context=1024)
        p.recommended.split              # [28, 1, 1]
        [x.fits for x in p.layouts]      # [False, False, True]
    """

    model: ModelFacts
    context: int
    budgets: list[Budget]
    layouts: list[Layout]
    recommended: Optional[Layout]
    notes: list[str] = field(default_factory=list)  # layouts that cannot be, and what would fit

    def choose(self, pipeline: bool, split=None) -> Layout:
        """The layout ``load_model(pipeline=..., split=...)`` loads: tensor parallel, the even
        pipeline (``split`` None), the pipeline split by the budgets (``"auto"``) or ``split``
        itself; ValueError where the model cannot take it, :class:`DoesNotFit` where it does
        not fit the budgets."""
        kind = Kind.PIPELINE if pipeline else Kind.TENSOR
        mine = [x for x in self.layouts if x.kind is kind]
        if not mine and len(self.budgets) == 1:
            mine = self.layouts  # one rank holds the whole model either way
        if not mine:
            why = [n for n in self.notes if n.startswith("tensor" if kind is Kind.TENSOR else "pipeline")]
            raise ValueError(f"{self.model.name}: {why[0] if why else 'no such layout'}")
        if not pipeline:
            layout = mine[0]
        elif split is None:
            layout = next(x for x in mine if not x.by_budgets)
        elif isinstance(split, str) and split == "auto":
            layout = recommend(mine) or min(mine, key=lambda x: x.fullest)
        else:
            split = check_split_layers(split, self.model.layers, len(self.budgets))
            layout = pipeline_layout(self.model, self.budgets, split, self.context)
        if not layout.fits:
            what = f"{layout.describe()} of {self.model.name} at a context of {self.context} tokens"
            raise DoesNotFit(what, layout.shortfalls, self._instead(layout))
        return layout

    def _instead(self, layout: Layout) -> str:
        best = self.recommended
        if best is None:
            return "Nothing fits: " + "; ".join(self.notes[-3:]) if self.notes else "Nothing fits"
        how = "split='auto'" if best.by_budgets else "pipeline=True" if best.kind is Kind.PIPELINE else "pipeline=False"
        return f"{best.describe()} fits ({how}); plan(cluster) lists every layout"

    def table(self) -> Table:
        n = len(self.budgets)
        rows = []
        for x in self.layouts:
            cells = [
                human_bytes(m) + ("" if m <= b else f" (over by {human_bytes(m - b)})")
                for m, b in zip(x.memory_per_rank, x.budgets)
            ]
            mark = "recommended" if x is self.recommended else ""
            split = ", ".join(map(str, x.split)) if x.split is not None else f"1/{n} of every layer"
            rows.append([x.name, split, *cells, "yes" if x.fits else "no", human_bytes(x.bytes_per_token), mark])
        budgets = ", ".join(human_bytes(b.bytes) for b in self.budgets)
        title = (
            f"{self.model.name}: {human_bytes(self.model.total)} in {self.model.layers} layers; "
            f"context {self.context} tokens; {n} ranks with {budgets}"
        )
        columns = ["layout", "layers per rank", *[f"rank {r}" for r in range(n)], "fits", "sent per token", ""]
        return Table(columns, rows, title)

    def __repr__(self) -> str:
        return "\n".join([repr(self.table()), *self.notes])

    def _repr_html_(self) -> str:
        import html

        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return self.table()._repr_html_() + (f"<ul>{notes}</ul>" if notes else "")


def check_context(context: int) -> None:
    """``context`` is a positive number of tokens; else a one-line ValueError.

    >>> check_context(0)
    Traceback (most recent call last):
    ...
    ValueError: context must be a positive number of tokens, got 0
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive number of tokens, got {context!r}")


def make_plan(facts: ModelFacts, budgets: Sequence[Budget], context: int = 4096) -> Plan:
    """The :class:`Plan` of ``facts`` over ranks with ``budgets`` for ``context`` tokens."""
    check_context(context)
    notes = []
    if facts.max_context and context > facts.max_context:
        notes.append(f"{facts.name} takes at most {facts.max_context} tokens: planned for that, not {context}")
        context = facts.max_context
    found, why_not = layouts(facts, budgets, context)
    best = recommend(found)
    plan = Plan(facts, context, list(budgets), found, best, notes + why_not)
    if best is None and found:
        plan.notes += nothing_fits(plan)
    return plan


def nothing_fits(plan: Plan) -> list[str]:
    """Where no layout fits: by how much (the closest), and what would: a shorter context,
    more ranks, a quantized copy."""
    facts, budgets, context = plan.model, plan.budgets, plan.context
    closest = min(plan.layouts, key=lambda x: x.fullest)
    worst = max(closest.shortfalls, key=lambda s: s.needs - s.has)
    out = [f"nothing fits; the closest, {closest.describe()}: {worst} ({human_bytes(worst.needs - worst.has)} short)"]
    shorter = _longest_context(facts, budgets, context - 1)
    if shorter:
        out.append(f"a context of {shorter} tokens would fit")
    elif context > 1:
        out.append("no shorter context would: the weights alone are over the budgets")
    smallest = min(budgets, key=lambda b: b.bytes)
    for n in range(len(budgets) + 1, max(facts.layers, len(budgets)) + 1):
        more = [replace(smallest, rank=r) for r in range(n)]
        if any(x.fits for x in layouts(facts, more, context)[0]):
            out.append(f"{n} ranks of {human_bytes(smallest.bytes)} would fit")
            break
    if not facts.quantized:
        small = facts.quantized_copy()
        if fit := recommend(layouts(small, budgets, context)[0]):
            out.append(
                f"a 4-bit copy (mlx_lm.convert -q, about {human_bytes(small.total)}) would fit as {fit.describe()}"
            )
    return out


def _longest_context(facts: ModelFacts, budgets: Sequence[Budget], most: int) -> int:
    """The longest context up to ``most`` tokens at which some layout fits (0: none does)."""

    def fits(context: int) -> bool:
        return any(x.fits for x in layouts(facts, budgets, context)[0])

    if most < 1 or not fits(1):
        return 0
    low, high = 1, most
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low
