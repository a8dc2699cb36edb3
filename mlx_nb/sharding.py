"""Sharding lab: an nn.Linear or a two-layer MLP sharded over the ranks.

Each rank builds the same unsharded model (same seed), shards it with
``shard_linear`` (new layers that communicate themselves) or ``shard_inplace``
(the weights are split; the cell writes the all_sum), and reports its weight
shapes and bytes, the largest error of its output against the unsharded
reference, and the forward time (slowest rank per iteration)::

    with Cluster(n=4) as c:
        report = sharding_lab(c, dims=(1024, 4096, 1024), method="shard_inplace")
        report.table(); report.plot_memory()

A Linear (``dims=(in, out)``) takes a ``strategy``: "all-to-sharded" splits its
output features (full input, each rank gets a slice of the output), and
"sharded-to-all" splits its input features (each rank gets a slice of the
input, all ranks get the full output after an all_sum). An MLP
(``dims=(in, hidden, out)``) uses both, Megatron style: up all-to-sharded,
down sharded-to-all, one all_sum per forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace, shard_linear
from mlx.utils import tree_flatten

from .bench import apply_collective, percentile, slowest, time_iters
from .display import Table, human_bytes

if TYPE_CHECKING:
    from .cluster import Cluster

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
    return x[..., r * k:(r + 1) * k]


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
        return model, lambda x: mx.distributed.all_sum(
            nn.gelu(model.up(x)) @ model.down.weight.T, group=group) + model.down.bias, whole
    if method == "shard_linear":
        layer = shard_linear(model, strategy, group=group)
    else:
        shard_inplace(model, strategy, group=group)
        layer = model
    if strategy == "all-to-sharded":
        return layer, layer, lambda y: _part(y, r, n)
    if method == "shard_linear":
        return layer, lambda x: layer(_part(x, r, n)), whole
    return layer, lambda x: mx.distributed.all_sum(
        _part(x, r, n) @ layer.weight.T, group=group) + layer.bias, whole


def lab(group, dims: Sequence[int] = (1024, 4096, 1024), method: str = "shard_linear",
        strategy: Optional[str] = None, batch: int = 8, warmup: int = 3, iters: int = 20,
        seed: int = 0, dtype: str = "float32") -> dict:
    """This rank's part of the lab (collective: every rank calls it with the same arguments).

    Returns {rank, params: [(name, shape, dtype, bytes)], error, errors (every rank's), times
    (slowest rank per iteration)}.
    """
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
    params = [(name, tuple(p.shape), str(p.dtype).replace("mlx.core.", ""), p.nbytes)
              for name, p in tree_flatten(module.parameters())]
    return {"rank": group.rank(), "params": params, "error": error, "errors": errors.tolist(),
            "times": worst, "strategy": strategy}


def _lab_on_rank(*args) -> dict:
    from . import engine

    return lab(engine.namespace["world"], *args)


@dataclass
class ShardReport:
    """Every rank's weights, the sharded output's error, and the forward time."""

    dims: tuple
    method: str
    strategy: str
    ranks: int
    params: list  # (rank, name, shape, dtype, bytes)
    errors: list  # max |sharded - unsharded| per rank
    median: float
    p90: float
    unsharded_bytes: int

    @property
    def max_error(self) -> float:
        return max(self.errors)

    def bytes_per_rank(self) -> list[int]:
        return [sum(p[4] for p in self.params if p[0] == r) for r in range(self.ranks)]

    def table(self) -> Table:
        rows = [[r, name, "x".join(map(str, shape)), dt, human_bytes(b)]
                for r, name, shape, dt, b in self.params]
        title = (f"{'Linear' if len(self.dims) == 2 else 'MLP'} {self.dims} over {self.ranks} ranks, "
                 f"{self.method} ({self.strategy}): max error {self.max_error:.2e}, "
                 f"forward {self.median * 1e3:.3f} ms median (p90 {self.p90 * 1e3:.3f} ms)")
        return Table(["rank", "parameter", "shape", "dtype", "bytes"], rows, title)

    def plot_memory(self):
        """Bars of weight bytes per rank, against the unsharded model on every rank."""
        from .plots import plot_memory

        return plot_memory({"unsharded": [self.unsharded_bytes] * self.ranks,
                            f"{self.method} ({self.strategy})": self.bytes_per_rank()})

    def __repr__(self) -> str:
        return repr(self.table())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


def sharding_lab(cluster: "Cluster", dims: Sequence[int] = (1024, 4096, 1024), method: str = "shard_linear",
                 strategy: Optional[str] = None, *, batch: int = 8, warmup: int = 3, iters: int = 20,
                 seed: int = 0, dtype: str = "float32") -> ShardReport:
    """Shard the model over every rank of ``cluster`` and report; see the module docstring.

    Example::

        sharding_lab(c, dims=(1024, 1024), strategy="sharded-to-all", method="shard_inplace")
    """
    dims = tuple(dims)
    strategy = check(dims, cluster.n, method, strategy)
    out = apply_collective(cluster, _lab_on_rank, dims, method, strategy, batch, warmup, iters, seed, dtype,
                           what="the sharding lab")
    params = [(o["rank"], *p) for o in out for p in o["params"]]
    unsharded = sum(p.nbytes for _, p in tree_flatten(build(dims, seed, dtype).parameters()))
    times = out[0]["times"]
    return ShardReport(dims, method, strategy, cluster.n, params, out[0]["errors"],
                       percentile(times, 50), percentile(times, 90), unsharded)


@dataclass
class ScaleRow:
    label: str
    ranks: int
    median: float
    p90: float
    bytes_per_rank: int


def unsharded_forward(dims: Sequence[int], batch: int = 8, warmup: int = 3, iters: int = 20,
                      seed: int = 0, dtype: str = "float32") -> list[float]:
    """Seconds per forward of the unsharded model in this process: the one-rank point."""
    model = build(dims, seed, dtype)
    x = mx.random.normal((batch, dims[0])).astype(getattr(mx, dtype))
    mx.eval(x)
    return time_iters(lambda: model(x), warmup, iters)[0]


def forward_scaling(counts: Sequence[int] = (1, 2, 4), dims: Sequence[int] = (1024, 4096, 1024),
                    method: str = "shard_linear", strategy: Optional[str] = None, *,
                    cluster: Optional["Cluster"] = None, batch: int = 8, warmup: int = 3,
                    iters: int = 20, dtype: str = "float32") -> list[ScaleRow]:
    """Forward time against rank count: 1 is the unsharded model in this process; a count equal to
    ``cluster.n`` uses ``cluster``; any other count starts (and stops) a cluster of that size.

    Example::

        plot_scaling(forward_scaling((1, 2, 4), cluster=c))
    """
    from .cluster import Cluster

    rows = []
    label = f"{method} {'Linear' if len(dims) == 2 else 'MLP'} {tuple(dims)}"
    for k in counts:
        if k == 1:
            times = unsharded_forward(dims, batch, warmup, iters, dtype=dtype)
            size = sum(p.nbytes for _, p in tree_flatten(build(dims, dtype=dtype).parameters()))
            rows.append(ScaleRow(label, 1, percentile(times, 50), percentile(times, 90), size))
            continue
        if cluster is not None and cluster.n == k:
            rep = sharding_lab(cluster, dims, method, strategy, batch=batch, warmup=warmup, iters=iters, dtype=dtype)
        else:
            with Cluster(n=k, spares=False) as c:
                rep = sharding_lab(c, dims, method, strategy, batch=batch, warmup=warmup, iters=iters, dtype=dtype)
        rows.append(ScaleRow(label, k, rep.median, rep.p90, max(rep.bytes_per_rank())))
    return rows


def scaling_table(rows: Sequence[ScaleRow]) -> Table:
    base = {r.label: r.median for r in rows if r.ranks == 1}
    out = [[r.label, r.ranks, f"{r.median * 1e3:.3f}", f"{r.p90 * 1e3:.3f}",
            f"{base[r.label] / r.median:.2f}x" if r.label in base else "", human_bytes(r.bytes_per_rank)]
           for r in rows]
    return Table(["model", "ranks", "median ms", "p90 ms", "speed-up vs 1", "weights per rank"], out,
                 "forward time (slowest rank) against rank count")
