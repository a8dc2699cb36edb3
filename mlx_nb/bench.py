"""Collective benchmarks: all_sum, all_gather and send/recv over a sweep of message sizes.

One rank-side function, :func:`sweep`, does the measuring. It takes the group,
so the same code runs inside mlx_nb's ranks (:func:`run_bench`, ``%mlx_bench``,
``mlx-nb bench``) and in a plain ``mlx.launch`` script::

    group = mx.distributed.init(strict=True, backend="ring")
    rows = sweep(group, parse_sizes("1KB-16MB", factor=4))

Every iteration starts after a barrier, ends with ``mx.eval`` on every rank,
and counts the slowest rank's time; every size's result is checked. Rows follow
the nccl-tests conventions: ``size`` is the bytes each rank sends for all_sum
and send/recv and the gathered output's bytes for all_gather; bus bandwidth is
algorithm bandwidth times 2(n-1)/n for all_sum and (n-1)/n for all_gather.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import mlx.core as mx

from .display import Table, human_bytes

if TYPE_CHECKING:
    from .cluster import Cluster

OPS = ("all_sum", "all_gather", "send_recv")
DEFAULT_SIZES = "1KB-64MB"
DEFAULT_FACTOR = 4
# link speeds in Gb/s for --reference
LINKS = {
    "tb5": ("Thunderbolt 5", 80.0),
    "tb4": ("Thunderbolt 4", 40.0),
    "10gbe": ("10 GbE", 10.0),
    "100gbe": ("100 GbE", 100.0),
}
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30,
          "T": 1 << 40, "TB": 1 << 40}

Progress = Callable[[int, int, str], None]


class BenchError(RuntimeError):
    """A sweep gave wrong results or could not finish; the message says where."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows the message, not a traceback through mlx_nb's frames
        return [f"BenchError: {line}" if i == 0 else line for i, line in enumerate(str(self).splitlines())]


# ------------------------------------------------------------------- arguments
def parse_size(text: str) -> int:
    """'256MB' -> 268435456 (binary units, as nccl-tests prints them)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r} (use bytes or KB / MB / GB, e.g. 64KB)")
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
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
def bus_factor(op: str, n: int) -> float:
    """nccl-tests' bus bandwidth factor: 2(n-1)/n all-reduce, (n-1)/n all-gather, 1 point-to-point."""
    return {"all_sum": 2 * (n - 1) / n, "all_gather": (n - 1) / n}.get(op, 1.0)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class BenchRow:
    """One (op, size, dtype) of a sweep; times in seconds, bandwidths in bytes/s."""

    op: str
    size: int
    dtype: str
    ranks: int
    backend: str
    iters: int
    median: float
    p90: float
    algbw: float
    busbw: float
    wrong_ranks: tuple = ()
    times: tuple = field(default=(), repr=False)  # slowest rank's time per iteration

    @property
    def correct(self) -> bool:
        return not self.wrong_ranks


def make_row(op: str, size: int, dtype: str, ranks: int, backend: str,
             times: Sequence[float], wrong_ranks: Sequence[int] = ()) -> BenchRow:
    """Statistics of one case from the slowest rank's time per iteration."""
    median = percentile(times, 50)
    algbw = size / median if median > 0 else 0.0
    return BenchRow(op, size, dtype, ranks, backend, len(times), median, percentile(times, 90),
                    algbw, algbw * bus_factor(op, ranks), tuple(wrong_ranks), tuple(times))


# ------------------------------------------------------------------ rank side
def _case(op: str, size: int, dtype, rank: int, n: int):
    """Input, message bytes, and the check of the output for one case on this rank."""
    count = max(1, size // dtype.size // (n if op == "all_gather" else 1))
    x = mx.full((count,), rank + 1, dtype=dtype)
    if op == "all_sum":
        return x, count * dtype.size, lambda y: mx.all(y == n * (n + 1) // 2).item()
    if op == "all_gather":
        want = mx.broadcast_to(mx.arange(1, n + 1, dtype=dtype)[:, None], (n, count))
        return x, n * count * dtype.size, lambda y: mx.array_equal(y.reshape(n, count), want).item()
    # send_recv: even ranks send to the next odd rank; a last odd-out rank sits the case out
    return x, count * dtype.size, lambda y: mx.all(y == rank).item() if rank % 2 else True


def _step(op: str, group, x, rank: int, n: int):
    dist = mx.distributed
    if op == "all_sum":
        return dist.all_sum(x, group=group)
    if op == "all_gather":
        return dist.all_gather(x, group=group)
    if rank % 2 == 0:
        return dist.send(x, rank + 1, group=group) if rank + 1 < n else None
    return dist.recv_like(x, rank - 1, group=group)


def slowest(group, times: Sequence[float], ok: bool = True) -> tuple[list[float], list[int]]:
    """Every rank's per-iteration times and check, gathered: (max per iteration, wrong ranks).

    Collective: every rank of ``group`` must call it with the same number of times.
    """
    mine = mx.array([*times, 1.0 if ok else 0.0], dtype=mx.float32)
    every = mx.distributed.all_gather(mine, group=group).reshape(group.size(), -1)
    mx.eval(every)
    worst = mx.max(every[:, :-1], axis=0).tolist()
    return worst, [r for r, flag in enumerate(every[:, -1].tolist()) if flag != 1.0]


def sweep(group, sizes: Sequence[int], ops: Sequence[str] = OPS, dtypes: Sequence[str] = ("float32",),
          warmup: int = 5, iters: int = 20, *, backend: str = "ring",
          progress: Optional[Progress] = None) -> list[BenchRow]:
    """Time each op at each size and dtype on ``group``; every rank gets the same rows.

    Collective: call it on every rank with the same arguments.

    Example (in an ``mlx.launch`` script)::

        rows = sweep(mx.distributed.init(), [1024, 1 << 20], ops=["all_sum"])
    """
    rank, n = group.rank(), group.size()
    cases = [(d, op, s) for d in dtypes for op in ops for s in sizes]
    rows = []
    for i, (dname, op, size) in enumerate(cases):
        if progress:
            progress(i, len(cases), f"{op} {human_bytes(size)} {dname}")
        x, nbytes, check = _case(op, size, getattr(mx, dname), rank, n)
        mx.eval(x)
        times, y = time_iters(lambda: _step(op, group, x, rank, n), warmup, iters, group)
        worst, wrong = slowest(group, times, y is None or bool(check(y)))
        rows.append(make_row(op, nbytes, dname, n, backend, worst, wrong))
        del x, y
        mx.clear_cache()
    if progress:
        progress(len(cases), len(cases), "done")
    return rows


def time_iters(run: Callable[[], Any], warmup: int, iters: int, group=None) -> tuple[list[float], Any]:
    """Seconds of each timed ``mx.eval(run())`` (after ``warmup`` untimed ones), and the last output.

    With a ``group``, every iteration starts after a barrier (a one-element all_sum),
    so the ranks start together and the slowest rank's time is the collective's.
    """
    one = mx.array([1.0])
    times, out = [], None
    for it in range(warmup + iters):
        if group is not None:
            mx.eval(mx.distributed.all_sum(one, group=group))
        t0 = time.perf_counter()
        out = run()
        if out is not None:
            mx.eval(out)
        if it >= warmup:
            times.append(time.perf_counter() - t0)
    return times, out


def _on_rank(sizes, ops, dtypes, warmup, iters, backend):
    """sweep() on an mlx_nb rank; rank 0 publishes progress to the notebook."""
    from ipyparallel.datapub import publish_data

    from . import engine

    world = engine.namespace["world"]
    progress = None
    if world.rank() == 0:
        def progress(done, total, what):
            publish_data({"mlx_nb_bench": (done, total, what)})
    rows = sweep(world, sizes, ops, dtypes, warmup, iters, backend=backend, progress=progress)
    return rows if world.rank() == 0 else None


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
                    f"--reference {spec!r}: give a link speed in Gb/s (80), one of "
                    f"{', '.join(LINKS)}, or memcpy"
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
            [r.op, r.dtype, human_bytes(r.size), _seconds(r.median), _seconds(r.p90),
             f"{r.algbw / 1e9:.3f}", f"{r.busbw / 1e9:.3f}", "ok" if r.correct else f"WRONG on {list(r.wrong_ranks)}"]
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

        fig = plot_bench(self.rows, reference=self.reference, title=title or self.table().title,
                         crossovers={op: self.crossover(op) for op in {r.op for r in self.rows}})
        if path:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        return fig

    def to_json(self) -> dict:
        return {"ranks": self.ranks, "backend": self.backend, "wall": self.wall,
                "reference": asdict(self.reference) if self.reference else None,
                "rows": [asdict(r) for r in self.rows]}

    def __repr__(self) -> str:
        return repr(self.table())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


class _Bar:
    """A progress bar: an ipywidget in a notebook kernel, a line of text elsewhere."""

    def __init__(self, show: bool = True):
        self.widget = None
        self.show = show
        if not show:
            return
        try:
            from IPython import get_ipython

            if type(get_ipython()).__name__ == "ZMQInteractiveShell":
                import ipywidgets as w
                from IPython.display import display

                self.widget = w.IntProgress(min=0, max=1, description="sweep")
                self.label = w.Label()
                display(w.HBox([self.widget, self.label]))
        except ImportError:
            pass

    def update(self, done: int, total: int, what: str) -> None:
        if not self.show:
            return
        if self.widget is not None:
            self.widget.max, self.widget.value = total, done
            self.label.value = f"{done}/{total} {what}"
        else:
            sys.stderr.write(f"\rsweep {done}/{total} {what:<40}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.show and self.widget is None:
            sys.stderr.write("\n")
        elif self.widget is not None:
            self.widget.bar_style = "success"


def apply_collective(cluster: "Cluster", fn: Callable, *args, what: str = "the call",
                     timeout: Optional[float] = None, on_data: Optional[Progress] = None) -> list:
    """``fn(*args)`` on every rank at once (it may use the group); results in rank order.

    ``on_data`` gets what rank 0 publishes as ``{"mlx_nb_bench": (done, total, what)}``.
    A rank that raises leaves the others inside a collective, as do a timeout and an
    interrupt: the ranks are restarted and BenchError says what happened.
    """
    t0 = time.perf_counter()
    ars = [cluster.client[r.engine_id].apply_async(fn, *args) for r in cluster.ranks]
    failed_at, why = None, None
    try:
        while not all(a.ready() for a in ars):
            now = time.perf_counter()
            if failed_at is None and any(a.ready() and not a.successful() for a in ars):
                failed_at = now
            if failed_at is not None and now - failed_at > cluster.grace:
                why = "the other ranks were left waiting"
            elif timeout is not None and now - t0 > timeout:
                why = f"not done within {timeout:g} s"
            if why:
                break
            state = (ars[0].data or {}).get("mlx_nb_bench")
            if state and on_data:
                on_data(*state)
            next((a for a in ars if not a.ready()), ars[0]).wait(0.5)
    except KeyboardInterrupt:
        why = "interrupted"
    errors = [(r, a.exception()) for r, a in enumerate(ars) if a.ready() and not a.successful()]
    if not errors and not why:
        return [a.get() for a in ars]
    lines = [f"{what} failed" + (f": {why}" if why else "")]
    for r, e in errors[:1]:
        lines.append(f"rank {r} raised {getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}")
    if why:
        cluster.restart(reason=why)
        lines.append(f"the {cluster.n} ranks were restarted; the cluster is ready again")
    raise BenchError("\n".join(lines))


def run_bench(cluster: "Cluster", sizes: Union[str, Sequence[int]] = DEFAULT_SIZES,
              ops: Union[str, Sequence[str]] = OPS, dtypes: Union[str, Sequence[str]] = ("float32",),
              warmup: int = 5, iters: int = 20, *, factor: int = DEFAULT_FACTOR,
              reference: Union[None, str, float, Reference] = None, progress: bool = True,
              timeout: Optional[float] = None) -> BenchResult:
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
    bar = _Bar(progress)
    t0 = time.perf_counter()
    try:
        rows = apply_collective(cluster, _on_rank, sizes, ops, dtypes, warmup, iters, cluster.backend,
                                what="the sweep", timeout=timeout, on_data=bar.update)[0]
    finally:
        bar.close()
    result = BenchResult(rows, cluster.n, cluster.backend, ref, time.perf_counter() - t0)
    wrong = [r for r in rows if not r.correct]
    if wrong:
        raise BenchError("wrong results:\n" + "\n".join(
            f"  {r.op} of {human_bytes(r.size)} {r.dtype}: wrong on rank(s) {list(r.wrong_ranks)}"
            for r in wrong))
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
    (("--sizes",), dict(default=DEFAULT_SIZES, help="message sizes: a range like 1KB-256MB or a list like "
                        f"4KB,1MB (default {DEFAULT_SIZES})")),
    (("--factor",), dict(type=int, default=DEFAULT_FACTOR, help=f"step between the sizes of a range (default {DEFAULT_FACTOR})")),
    (("--ops",), dict(default=",".join(OPS), help=f"collectives to time (default {','.join(OPS)})")),
    (("--dtypes",), dict(default="float32", help="MLX dtypes, e.g. float32,bfloat16 (default float32)")),
    (("--warmup",), dict(type=int, default=5, help="untimed iterations per case (default 5)")),
    (("--iters",), dict(type=int, default=20, help="timed iterations per case (default 20)")),
    (("--reference",), dict(default=None, help="a reference line: a link speed in Gb/s (80), tb5, tb4, 10gbe, 100gbe, or memcpy")),
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


def sweep_options(args) -> dict:
    """run_bench keyword arguments from parsed options; ValueError with one line if they are bad."""
    return dict(sizes=parse_sizes(args.sizes, args.factor), ops=parse_names(args.ops, OPS, "op"),
                dtypes=check_dtypes(args.dtypes), warmup=args.warmup, iters=args.iters,
                reference=as_reference(args.reference))


def bench_main(argv: Optional[Sequence[str]] = None) -> int:
    """``mlx-nb bench -n 4 --out plot.png``: start n ranks, sweep, print the table, save the plot."""
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
    except (ClusterError, BenchError) as e:
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
