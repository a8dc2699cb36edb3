"""Collective benchmarks, the notebook half: options, the sweep on the cluster, tables and plots.

The measuring is :func:`mlx_nb.rank.bench.sweep` (re-exported here), run on every rank
through ``Cluster.call`` by :func:`run_bench` (``%mlx_bench``, ``mlx-nb bench``), or in a
plain ``mlx.launch`` script::

    group = mx.distributed.init(strict=True, backend="ring")
    rows = sweep(group, parse_sizes("1KB-16MB", factor=4))
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional, Union

import mlx.core as mx

from . import display
from .display import Progress, Table, human_bytes
from .rank.bench import OPS, BenchRow, bus_factor, make_row, percentile, slowest, sweep, sweep_on_rank, time_iters

__all__ = [
    "BenchError",
    "BenchResult",
    "BenchRow",
    "OPS",
    "Reference",
    "bus_factor",
    "make_row",
    "percentile",
    "run_bench",
    "slowest",
    "sweep",
    "time_iters",
]

if TYPE_CHECKING:
    from .cluster import Cluster

DEFAULT_SIZES = "1KB-64MB"
DEFAULT_FACTOR = 4
# link speeds in Gb/s for --reference
LINKS = {
    "tb5": ("Thunderbolt 5", 80.0),
    "tb4": ("Thunderbolt 4", 40.0),
    "10gbe": ("10 GbE", 10.0),
    "100gbe": ("100 GbE", 100.0),
}


class BenchError(RuntimeError):
    """A sweep gave wrong results or could not finish; the message says where."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows the message, not a traceback through mlx_nb's frames
        return [f"BenchError: {line}" if i == 0 else line for i, line in enumerate(str(self).splitlines())]


# ------------------------------------------------------------------- arguments
def parse_size(text: str) -> int:
    """'256MB' -> 268435456 (binary units, as nccl-tests prints them)."""
    try:
        size = display.parse_size(text)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use bytes or KB / MB / GB, e.g. 64KB)") from None
    if size < 1:
        raise ValueError(f"a message size must be at least 1 byte, got {text!r}")
    return size


def parse_sizes(spec: Union[str, Sequence[int]], factor: int = 2) -> list[int]:
    """'1KB-1MB' (every ``factor``-th power between), '4KB,1MB', or a list of bytes.

    Example::

        parse_sizes("1KB-16KB", factor=4)  # [1024, 4096, 16384]
    """
    if not isinstance(spec, str):
        sizes = [int(s) for s in spec]
    else:
        if factor < 2:
            raise ValueError(f"the size factor must be 2 or more, got {factor}")
        sizes = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            lo, _, hi = item.partition("-")
            s, end = parse_size(lo), parse_size(hi) if hi else parse_size(lo)
            if end < s:
                raise ValueError(f"size range {item!r} ends below its start")
            while s <= end:
                sizes.append(s)
                s *= factor
    if not sizes or min(sizes) < 1:
        raise ValueError(f"no message sizes in {spec!r}")
    return sorted(set(sizes))


def check_sweep_memory(sizes: Sequence[int], ranks_here: int, available: Optional[int] = None) -> None:
    """Refuse a sweep whose largest message does not fit the memory of this machine.

    Each rank holds a message's input and output at once, so the ``ranks_here`` ranks on
    this machine need twice the largest size each; ``available`` defaults to what psutil
    says is available now.

    >>> check_sweep_memory([1 << 10, 1 << 40], 2, available=16 << 30)
    Traceback (most recent call last):
    ...
    ValueError: --sizes up to 1.0 TB need 4.0 TB of memory on this machine: each of its 2 ranks holds a message's input and output at once, and 16.0 GB is available; use sizes up to 4.0 GB
    """
    if ranks_here < 1:
        return
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    largest = max(sizes)
    need = 2 * largest * ranks_here
    if need > available:
        per_message = available // (2 * ranks_here)
        fit = 1 << (per_message.bit_length() - 1) if per_message else 0
        raise ValueError(
            f"--sizes up to {human_bytes(largest)} need {human_bytes(need)} of memory on this machine: "
            f"each of its {ranks_here} ranks holds a message's input and output at once, and "
            f"{human_bytes(available)} is available; use sizes up to {human_bytes(fit)}"
        )


def parse_names(spec: Union[str, Sequence[str]], known: Sequence[str], what: str) -> list[str]:
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ValueError(f"unknown {what} {', '.join(bad) or spec!r}: choose from {', '.join(known)}")
    return names


def check_dtypes(spec: Union[str, Sequence[str]]) -> list[str]:
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    bad = [n for n in names if not isinstance(getattr(mx, n, None), mx.Dtype)]
    if bad or not names:
        raise ValueError(f"unknown dtype {', '.join(bad) or spec!r}: use MLX names like float32, bfloat16")
    return names


# ------------------------------------------------------------------------ rows
# -------------------------------------------------------------- notebook side
@dataclass
class Reference:
    """A bandwidth to draw against the measurements: a link speed or a measured copy."""

    label: str
    bandwidth: float  # bytes/s


def measure_memcpy(size: int = 64 << 20, iters: int = 10) -> Reference:
    """Single-process memory copy bandwidth (numpy copyto: one read, one write of ``size``)."""
    import numpy as np

    src, dst = np.ones(size, dtype=np.uint8), np.empty(size, dtype=np.uint8)
    times = []
    for _ in range(iters + 2):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return Reference(f"memory copy ({human_bytes(size)}, one process)", size / percentile(times[2:], 50))


def as_reference(spec: Union[None, str, float, Reference]) -> Optional[Reference]:
    """None, a Reference, a link speed in Gb/s (80 or '80Gb/s'), 'tb5' / 'tb4' / '10gbe', or 'memcpy'."""
    if spec is None or isinstance(spec, Reference):
        return spec
    if isinstance(spec, (int, float)):
        gbps, label = float(spec), f"{float(spec):g} Gb/s link"
    else:
        key = spec.strip().lower()
        if key == "memcpy":
            return measure_memcpy()
        if key in LINKS:
            label, gbps = LINKS[key]
            label = f"{label} ({gbps:g} Gb/s)"
        else:
            m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gb/s|gbps|gbit/s)?", key)
            if not m:
                raise ValueError(
                    f"--reference {spec!r}: give a link speed in Gb/s (80), one of {', '.join(LINKS)}, or memcpy"
                )
            gbps, label = float(m.group(1)), f"{float(m.group(1)):g} Gb/s link"
    return Reference(label, gbps * 1e9 / 8)


def _seconds(t: float) -> str:
    return f"{t * 1e6:.1f} µs" if t < 1e-3 else f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"


@dataclass
class BenchResult:
    """The rows of one sweep, with the table, the plot and the reading of them."""

    rows: list[BenchRow]
    ranks: int
    backend: str
    reference: Optional[Reference] = None
    wall: float = 0.0

    def table(self) -> Table:
        out = [
            [
                r.op,
                r.dtype,
                human_bytes(r.size),
                _seconds(r.median),
                _seconds(r.p90),
                f"{r.algbw / 1e9:.3f}",
                f"{r.busbw / 1e9:.3f}",
                "ok" if r.correct else f"WRONG on {list(r.wrong_ranks)}",
            ]
            for r in self.rows
        ]
        title = f"{self.ranks} ranks, {self.backend} backend, slowest rank per iteration"
        return Table(["op", "dtype", "size", "median", "p90", "algbw GB/s", "busbw GB/s", "check"], out, title)

    def crossover(self, op: str, dtype: Optional[str] = None) -> Optional[tuple[float, float, float]]:
        """(latency a, peak algbw b, size a*b) of the model t = a + size/b, or None.

        Below a*b bytes a message costs mostly the fixed latency; above it, mostly
        bandwidth. a is the lowest median latency of any size (a noisy small size
        cannot inflate it), b the highest algorithm bandwidth.
        """
        rows = [r for r in self.rows if r.op == op and (dtype is None or r.dtype == dtype)]
        if len({r.size for r in rows}) < 2:
            return None
        a, b = min(r.median for r in rows), max(r.algbw for r in rows)
        return a, b, a * b

    def reading(self) -> str:
        """Where latency ends and bandwidth begins, per op, in words."""
        lines = []
        for op in dict.fromkeys(r.op for r in self.rows):
            c = self.crossover(op)
            if c is None:
                continue
            a, b, s = c
            peak = max(r.busbw for r in self.rows if r.op == op)
            lines.append(
                f"{op}: about {_seconds(a)} fixed cost; below ~{human_bytes(s)} a message is "
                f"latency-bound, above it bandwidth-bound (peak busbw {peak / 1e9:.2f} GB/s)"
            )
        if self.reference is not None:
            lines.append(f"reference: {self.reference.label} = {self.reference.bandwidth / 1e9:.2f} GB/s")
        return "\n".join(lines)

    def plot(self, path: Optional[str] = None, title: Optional[str] = None):
        """Log-log latency and bandwidth against size (a matplotlib Figure); saved to ``path`` if given."""
        from .plots import plot_bench

        fig = plot_bench(
            self.rows,
            reference=self.reference,
            title=title or self.table().title,
            crossovers={op: self.crossover(op) for op in {r.op for r in self.rows}},
        )
        if path:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        return fig

    def to_json(self) -> dict:
        return {
            "ranks": self.ranks,
            "backend": self.backend,
            "wall": self.wall,
            "reference": asdict(self.reference) if self.reference else None,
            "rows": [asdict(r) for r in self.rows],
        }

    def __repr__(self) -> str:
        return repr(self.table())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


def run_bench(
    cluster: Cluster,
    sizes: Union[str, Sequence[int]] = DEFAULT_SIZES,
    ops: Union[str, Sequence[str]] = OPS,
    dtypes: Union[str, Sequence[str]] = ("float32",),
    warmup: int = 5,
    iters: int = 20,
    *,
    factor: int = DEFAULT_FACTOR,
    reference: Union[None, str, float, Reference] = None,
    progress: bool = True,
    timeout: Optional[float] = None,
) -> BenchResult:
    """Run :func:`sweep` on every rank of ``cluster``; raise BenchError if any result was wrong.

    Example::

        with Cluster(n=4) as c:
            res = run_bench(c, "1KB-16MB", ops="all_sum", reference="tb5")
            res.plot("bench.png")
    """
    sizes = parse_sizes(sizes, factor)
    check_sweep_memory(sizes, cluster.n - len(cluster.remote))
    ops = parse_names(ops, OPS, "op")
    dtypes = check_dtypes(dtypes)
    if warmup < 0 or iters < 1:
        raise ValueError(f"need warmup >= 0 and iters >= 1, got {warmup} and {iters}")
    ref = as_reference(reference)
    bar = Progress("sweep", progress)
    t0 = time.perf_counter()
    try:
        rows = cluster.call(
            sweep_on_rank,
            sizes,
            ops,
            dtypes,
            warmup,
            iters,
            cluster.backend,
            timeout=timeout,
            on_report=lambda rank, p: bar.update(p.done, p.total, p.what),
        )[0]
    finally:
        bar.close()
    result = BenchResult(rows, cluster.n, cluster.backend, ref, time.perf_counter() - t0)
    wrong = [r for r in rows if not r.correct]
    if wrong:
        raise BenchError(
            "wrong results:\n"
            + "\n".join(
                f"  {r.op} of {human_bytes(r.size)} {r.dtype}: wrong on rank(s) {list(r.wrong_ranks)}" for r in wrong
            )
        )
    return result


# ------------------------------------------------------------------------- CLI
def bench_parser(prog: str = "mlx-nb bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Benchmark MLX collectives on local ranks.")
    p.add_argument("-n", type=int, default=4, help="number of ranks (default 4)")
    add_sweep_arguments(p)
    p.add_argument("--out", default=None, help="save the latency/bandwidth plot here (PNG)")
    p.add_argument("--json", default=None, help="save the rows here as JSON")
    return p


SWEEP_ARGUMENTS = [
    (
        ("--sizes",),
        dict(
            default=DEFAULT_SIZES,
            help=f"message sizes: a range like 1KB-256MB or a list like 4KB,1MB (default {DEFAULT_SIZES})",
        ),
    ),
    (
        ("--factor",),
        dict(type=int, default=DEFAULT_FACTOR, help=f"step between the sizes of a range (default {DEFAULT_FACTOR})"),
    ),
    (("--ops",), dict(default=",".join(OPS), help=f"collectives to time (default {','.join(OPS)})")),
    (("--dtypes",), dict(default="float32", help="MLX dtypes, e.g. float32,bfloat16 (default float32)")),
    (("--warmup",), dict(type=int, default=5, help="untimed iterations per case (default 5)")),
    (("--iters",), dict(type=int, default=20, help="timed iterations per case (default 20)")),
    (
        ("--reference",),
        dict(default=None, help="a reference line: a link speed in Gb/s (80), tb5, tb4, 10gbe, 100gbe, or memcpy"),
    ),
]


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep's options on an argparse parser (the CLI, the benchmark script)."""
    for args, kwargs in SWEEP_ARGUMENTS:
        parser.add_argument(*args, **kwargs)


def sweep_arguments(func):
    """The same options as IPython magic_arguments, for %mlx_bench."""
    from IPython.core.magic_arguments import argument

    for args, kwargs in reversed(SWEEP_ARGUMENTS):
        func = argument(*args, **kwargs)(func)
    return func


def sweep_values(args) -> dict:
    """run_bench keyword arguments as the options gave them (run_bench checks them)."""
    return {names[0][2:]: getattr(args, names[0][2:]) for names, _ in SWEEP_ARGUMENTS}


def sweep_options(args) -> dict:
    """run_bench keyword arguments from parsed options; ValueError with one line if they are bad."""
    return dict(
        sizes=parse_sizes(args.sizes, args.factor),
        ops=parse_names(args.ops, OPS, "op"),
        dtypes=check_dtypes(args.dtypes),
        warmup=args.warmup,
        iters=args.iters,
        reference=as_reference(args.reference),
    )


def bench_main(argv: Optional[Sequence[str]] = None) -> int:
    """``mlx-nb bench -n 4 --out plot.png``: start n ranks, sweep, print the table, save the plot."""
    from .cell import DistCellError
    from .cluster import Cluster, ClusterError

    parser = bench_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        options = sweep_options(args)
        check_sweep_memory(options["sizes"], args.n)
        cluster = Cluster(n=args.n)
    except ValueError as e:
        parser.print_usage(sys.stderr)
        print(f"mlx-nb bench: error: {e}", file=sys.stderr)
        return 2
    print(f"Starting {args.n} MLX ranks...", file=sys.stderr, flush=True)
    try:
        with cluster:
            result = run_bench(cluster, **options, progress=sys.stderr.isatty())
    except (ClusterError, BenchError, DistCellError) as e:
        print(f"mlx-nb bench: {e}", file=sys.stderr)
        return 1
    print(result.table())
    print()
    print(result.reading())
    if args.out:
        result.plot(args.out)
        print(f"plot saved to {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_json(), f, indent=1)
        print(f"rows saved to {args.json}")
    return 0
