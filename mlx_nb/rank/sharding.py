"""The rank half of the sharding lab: build a Linear or an MLP, shard it over the group, time it.

Each rank builds the same unsharded model (same seed), shards it with ``shard_linear`` (new
layers that communicate themselves) or ``shard_inplace`` (the weights are split; the forward
writes the all_sum), and reports its weight shapes and bytes, the largest error of its output
against the unsharded reference, and the forward time (slowest rank per iteration).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear
from mlx.utils import tree_flatten

from . import session
from .bench import slowest, time_iters

METHODS = ("shard_linear", "shard_inplace")
STRATEGIES = ("all-to-sharded", "sharded-to-all")
MLP_STRATEGY = "all-to-sharded, sharded-to-all"


class MLP(nn.Module):
    def __init__(self, dims: int, hidden: int, out: int):
        super().__init__()
        self.up = nn.Linear(dims, hidden)
        self.down = nn.Linear(hidden, out)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down(nn.gelu(self.up(x)))


def build(dims: Sequence[int], seed: int = 0, dtype: str = "float32") -> nn.Module:
    """The unsharded model: nn.Linear for (in, out), MLP for (in, hidden, out); same weights for a seed."""
    mx.random.seed(seed)
    model = nn.Linear(*dims) if len(dims) == 2 else MLP(*dims)
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model


def check(dims: Sequence[int], n: int, method: str, strategy: Optional[str]) -> str:
    """The strategy to use; ValueError with one line if the layout cannot be sharded over n ranks."""
    if len(dims) not in (2, 3):
        raise ValueError(f"dims {tuple(dims)}: give (in, out) for a Linear or (in, hidden, out) for an MLP")
    if method not in METHODS:
        raise ValueError(f"method {method!r}: choose {' or '.join(METHODS)}")
    if len(dims) == 3:
        split = {"hidden": dims[1]}
        strategy = MLP_STRATEGY
    else:
        strategy = strategy or STRATEGIES[0]
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r}: choose {' or '.join(STRATEGIES)}")
        split = {"out": dims[1]} if strategy == "all-to-sharded" else {"in": dims[0]}
    for name, d in split.items():
        if d % n:
            raise ValueError(f"{strategy} splits the {name} features ({d}) over {n} ranks: make it a multiple of {n}")
    return strategy


def _part(x: mx.array, r: int, n: int) -> mx.array:
    k = x.shape[-1] // n
    return x[..., r * k : (r + 1) * k]


def shard(model: nn.Module, method: str, strategy: str, group):
    """(sharded module, forward(x), which part of the unsharded output it must equal).

    ``model`` is changed in place by shard_inplace; shard_linear leaves it alone for a Linear.
    """
    n, r = group.size(), group.rank()
    whole = lambda y: y  # noqa: E731
    if isinstance(model, MLP):
        if method == "shard_linear":
            model.up = shard_linear(model.up, "all-to-sharded", group=group)
            model.down = shard_linear(model.down, "sharded-to-all", group=group)
            return model, model, whole
        shard_inplace(model.up, "all-to-sharded", group=group)
        shard_inplace(model.down, "sharded-to-all", group=group)
        # the down bias stays whole: add it once, after the sum of the partial products
        return (
            model,
            lambda x: mx.distributed.all_sum(nn.gelu(model.up(x)) @ model.down.weight.T, group=group) + model.down.bias,
            whole,
        )
    if method == "shard_linear":
        layer = shard_linear(model, strategy, group=group)
    else:
        shard_inplace(model, strategy, group=group)
        layer = model
    if strategy == "all-to-sharded":
        return layer, layer, lambda y: _part(y, r, n)
    if method == "shard_linear":
        return layer, lambda x: layer(_part(x, r, n)), whole
    return layer, lambda x: mx.distributed.all_sum(_part(x, r, n) @ layer.weight.T, group=group) + layer.bias, whole


@dataclass(frozen=True)
class Param:
    """One sharded parameter on one rank."""

    rank: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int


@dataclass(frozen=True)
class LabResult:
    """One rank's part of the lab: its parameters, the output's error, the forward's times."""

    rank: int
    params: tuple[Param, ...]
    error: float  # max |sharded - unsharded| on this rank
    errors: list[float]  # every rank's
    times: list[float]  # seconds per iteration, the slowest rank's
    strategy: str


def lab(
    group,
    dims: Sequence[int] = (1024, 4096, 1024),
    method: str = "shard_linear",
    strategy: Optional[str] = None,
    batch: int = 8,
    warmup: int = 3,
    iters: int = 20,
    seed: int = 0,
    dtype: str = "float32",
) -> LabResult:
    """This rank's part of the lab (collective: every rank calls it with the same arguments)."""
    strategy = check(dims, group.size(), method, strategy)
    model = build(dims, seed, dtype)
    x = mx.random.normal((batch, dims[0])).astype(getattr(mx, dtype))
    reference = model(x)
    mx.eval(x, reference)
    module, forward, part = shard(model, method, strategy, group)
    mx.eval(module.parameters())
    times, y = time_iters(lambda: forward(x), warmup, iters, group)
    error = mx.max(mx.abs(y.astype(mx.float32) - part(reference).astype(mx.float32))).item()
    worst, _ = slowest(group, times)
    errors = mx.distributed.all_gather(mx.array([error]), group=group)
    params = tuple(
        Param(group.rank(), name, tuple(p.shape), str(p.dtype).replace("mlx.core.", ""), p.nbytes)
        for name, p in tree_flatten(module.parameters())
    )
    return LabResult(group.rank(), params, error, errors.tolist(), worst, strategy)


def lab_on_rank(*args) -> LabResult:
    """lab() on an mlx_nb rank (``Cluster.call``)."""
    return lab(session.world(), *args)
