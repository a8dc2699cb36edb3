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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .display import Table, human_bytes
from .rank.bench import percentile, time_iters
from .rank.sharding import (
    METHODS,
    MLP,
    MLP_STRATEGY,
    STRATEGIES,
    LabResult,
    Param,
    build,
    check,
    lab,
    lab_on_rank,
    shard,
)

if TYPE_CHECKING:
    from .cluster import Cluster

__all__ = [
    "METHODS",
    "MLP",
    "MLP_STRATEGY",
    "STRATEGIES",
    "LabResult",
    "Param",
    "ScaleRow",
    "ShardReport",
    "build",
    "check",
    "forward_scaling",
    "lab",
    "scaling_table",
    "shard",
    "sharding_lab",
    "unsharded_forward",
]


@dataclass
class ShardReport:
    """Every rank's weights, the sharded output's error, and the forward time."""

    dims: tuple
    method: str
    strategy: str
    ranks: int
    params: list[Param]  # every rank's
    errors: list  # max |sharded - unsharded| per rank
    median: float
    p90: float
    unsharded_bytes: int

    @property
    def max_error(self) -> float:
        return max(self.errors)

    def bytes_per_rank(self) -> list[int]:
        return [sum(p.bytes for p in self.params if p.rank == r) for r in range(self.ranks)]

    def table(self) -> Table:
        rows = [[p.rank, p.name, "x".join(map(str, p.shape)), p.dtype, human_bytes(p.bytes)] for p in self.params]
        title = (
            f"{'Linear' if len(self.dims) == 2 else 'MLP'} {self.dims} over {self.ranks} ranks, "
            f"{self.method} ({self.strategy}): max error {self.max_error:.2e}, "
            f"forward {self.median * 1e3:.3f} ms median (p90 {self.p90 * 1e3:.3f} ms)"
        )
        return Table(["rank", "parameter", "shape", "dtype", "bytes"], rows, title)

    def plot_memory(self):
        """Bars of weight bytes per rank, against the unsharded model on every rank."""
        from .plots import plot_memory

        return plot_memory(
            {
                "unsharded": [self.unsharded_bytes] * self.ranks,
                f"{self.method} ({self.strategy})": self.bytes_per_rank(),
            }
        )

    def __repr__(self) -> str:
        return repr(self.table())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


def sharding_lab(
    cluster: Cluster,
    dims: Sequence[int] = (1024, 4096, 1024),
    method: str = "shard_linear",
    strategy: Optional[str] = None,
    *,
    batch: int = 8,
    warmup: int = 3,
    iters: int = 20,
    seed: int = 0,
    dtype: str = "float32",
) -> ShardReport:
    """Shard the model over every rank of ``cluster`` and report; see the module docstring.

    Example::

        sharding_lab(c, dims=(1024, 1024), strategy="sharded-to-all", method="shard_inplace")
    """
    dims = tuple(dims)
    strategy = check(dims, cluster.n, method, strategy)
    out: list[LabResult] = cluster.call(lab_on_rank, dims, method, strategy, batch, warmup, iters, seed, dtype)
    params = [p for o in out for p in o.params]
    unsharded = sum(p.nbytes for _, p in tree_flatten(build(dims, seed, dtype).parameters()))
    times = out[0].times
    return ShardReport(
        dims,
        method,
        strategy,
        cluster.n,
        params,
        out[0].errors,
        percentile(times, 50),
        percentile(times, 90),
        unsharded,
    )


@dataclass
class ScaleRow:
    label: str
    ranks: int
    median: float
    p90: float
    bytes_per_rank: int


def unsharded_forward(
    dims: Sequence[int], batch: int = 8, warmup: int = 3, iters: int = 20, seed: int = 0, dtype: str = "float32"
) -> list[float]:
    """Seconds per forward of the unsharded model in this process: the one-rank point."""
    model = build(dims, seed, dtype)
    x = mx.random.normal((batch, dims[0])).astype(getattr(mx, dtype))
    mx.eval(x)
    return time_iters(lambda: model(x), warmup, iters)[0]


def forward_scaling(
    counts: Sequence[int] = (1, 2, 4),
    dims: Sequence[int] = (1024, 4096, 1024),
    method: str = "shard_linear",
    strategy: Optional[str] = None,
    *,
    cluster: Optional[Cluster] = None,
    batch: int = 8,
    warmup: int = 3,
    iters: int = 20,
    dtype: str = "float32",
) -> list[ScaleRow]:
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
    out = [
        [
            r.label,
            r.ranks,
            f"{r.median * 1e3:.3f}",
            f"{r.p90 * 1e3:.3f}",
            f"{base[r.label] / r.median:.2f}x" if r.label in base else "",
            human_bytes(r.bytes_per_rank),
        ]
        for r in rows
    ]
    return Table(
        ["model", "ranks", "median ms", "p90 ms", "speed-up vs 1", "weights per rank"],
        out,
        "forward time (slowest rank) against rank count",
    )
