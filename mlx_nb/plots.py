"""matplotlib figures from benchmark rows and sharding reports.

Figures are made with pyplot and closed before they are returned, so a
notebook shows each once (as the cell's value) and scripts can ``savefig``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional

from .display import human_bytes


def _figure(ncols: int = 1, width: float = 5.5, height: float = 4.0):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    plt.close(fig)
    return fig, list(axes[0])


def _size_ticks(ax, sizes: Sequence[int]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ticks = sorted(set(sizes))
    step = max(1, len(ticks) // 8)
    ax.xaxis.set_major_locator(FixedLocator(ticks[::step]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human_bytes(x).replace(".0 ", " ")))
    ax.set_xlabel("message size")


def plot_bench(
    rows: Sequence, reference=None, title: str = "", crossovers: Optional[Mapping[str, Optional[tuple]]] = None
):
    """Latency (median, p90 shaded) and bus bandwidth against size, both log-log.

    ``reference`` (a bench.Reference) adds its bandwidth as a line on the right
    and the time to move each size at that speed on the left; ``crossovers``
    ({op: (a, b, a*b)}) marks where each op turns from latency- to bandwidth-bound.

    Example::

        fig = plot_bench(result.rows, reference=as_reference("tb5"))
    """
    fig, (lat, bw) = _figure(2)
    colors = {}
    for key in dict.fromkeys((r.op, r.dtype) for r in rows):
        sel = sorted((r for r in rows if (r.op, r.dtype) == key), key=lambda r: r.size)
        sizes = [r.size for r in sel]
        label = key[0] if len({r.dtype for r in rows}) == 1 else f"{key[0]} {key[1]}"
        (line,) = lat.plot(sizes, [r.median for r in sel], "o-", ms=4, label=label)
        colors.setdefault(key[0], line.get_color())
        lat.fill_between(sizes, [r.median for r in sel], [r.p90 for r in sel], color=line.get_color(), alpha=0.2)
        bw.plot(sizes, [r.busbw / 1e9 for r in sel], "o-", ms=4, color=line.get_color(), label=label)
    all_sizes = [r.size for r in rows]
    if reference is not None and all_sizes:
        gbs = reference.bandwidth / 1e9
        bw.axhline(gbs, color="k", ls="--", lw=1, label=reference.label)
        span = [min(all_sizes), max(all_sizes)]
        lat.plot(span, [s / reference.bandwidth for s in span], "k--", lw=1, label=f"size / {reference.label}")
    for op, c in (crossovers or {}).items():
        if c is not None and min(all_sizes) <= c[2] <= max(all_sizes):
            for ax in (lat, bw):
                ax.axvline(c[2], color=colors.get(op, "gray"), ls=":", lw=1)
    lat.set(xscale="log", yscale="log", ylabel="latency (s), slowest rank", title="latency")
    bw.set(xscale="log", yscale="log", ylabel="bus bandwidth (GB/s)", title="bandwidth")
    for ax in (lat, bw):
        if all_sizes:
            _size_ticks(ax, all_sizes)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    if crossovers:
        lat.annotate(
            "dotted: latency | bandwidth crossover",
            (0.02, 0.97),
            xycoords="axes fraction",
            va="top",
            fontsize="x-small",
            color="gray",
        )
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_memory(
    per_rank: Mapping[str, Sequence[int]], title: str = "weight memory per rank", ylabel: str = "weight bytes"
):
    """Grouped bars: bytes held by each rank under each layout (``ylabel``: what the bytes are).

    The hook for any model: ``per_rank`` maps a layout name to one byte count
    per rank, e.g. ``{"unsharded": [b] * n, "tensor": tensor_bytes, "pipeline": pipe_bytes}``.
    """
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    ranks = max(len(v) for v in per_rank.values())
    fig, (ax,) = _figure(1, width=max(5.0, 1.2 * ranks + 3), height=4.5)
    width = 0.8 / max(1, len(per_rank))
    for i, (name, counts) in enumerate(per_rank.items()):
        xs = [r + (i - (len(per_rank) - 1) / 2) * width for r in range(len(counts))]
        bars = ax.bar(xs, counts, width, label=name)
        ax.bar_label(bars, [human_bytes(c) for c in counts], fontsize="x-small", padding=2)
    top = max(max(v) for v in per_rank.values())
    power = max(0, min(4, int(math.log(max(top, 1), 1024))))
    unit, name = 1024**power, ("B", "KB", "MB", "GB", "TB")[power]
    step = next(s for s in (0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if top / unit / s <= 6)
    ax.yaxis.set_major_locator(MultipleLocator(unit * step))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y / unit:g} {name}"))
    ax.set_xticks(range(ranks), [f"rank {r}" for r in range(ranks)])
    ax.set_ylabel(ylabel)
    ax.margins(y=0.12)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(3, len(per_rank)))
    fig.tight_layout()
    return fig


def plot_scaling(rows: Sequence, title: str = "forward time against rank count"):
    """Forward time (median, p90 as error bar) against the number of ranks, from sharding ScaleRows."""
    fig, (ax,) = _figure(1)
    for label in dict.fromkeys(r.label for r in rows):
        sel = sorted((r for r in rows if r.label == label), key=lambda r: r.ranks)
        xs = [r.ranks for r in sel]
        med = [r.median * 1e3 for r in sel]
        err = [(r.p90 - r.median) * 1e3 for r in sel]
        ax.errorbar(xs, med, yerr=[[0] * len(err), err], fmt="o-", capsize=3, label=label)
    ax.set_xticks(sorted({r.ranks for r in rows}))
    ax.set(xlabel="ranks", ylabel="forward time (ms), slowest rank", title=title)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
