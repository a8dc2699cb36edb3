"""Small display objects: a table that renders as text and as HTML, and the tables the magics show
(a cluster's ranks, preflight findings, the kept clusters), built from data."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any, Union

# binary units, as human_bytes prints them (and nccl-tests reads them)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def parse_size(text: str) -> int:
    """Bytes from a size as people write it: '700MB', '1.5 GB', '64K', '4096'.

    >>> parse_size("700MB"), parse_size("2g")
    (734003200, 2147483648)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_bytes(value: Union[int, str], name: str, example: str = "2GB", minimum: int = 0) -> int:
    """``value`` (bytes, or a size like ``'700MB'``) in bytes, at least ``minimum``; else a
    one-line ValueError that names ``name``.

    >>> parse_bytes("1KB", "limit")
    1024
    >>> parse_bytes("lots", "limit")
    Traceback (most recent call last):
    ...
    ValueError: limit: not a size: 'lots' (use bytes or KB / MB / GB, e.g. 2GB)
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name} must be bytes or a size like {example!r}, got {value!r}")
    size = value
    if isinstance(value, str):
        try:
            size = parse_size(value)
        except ValueError:
            raise ValueError(f"{name}: not a size: {value!r} (use bytes or KB / MB / GB, e.g. {example})") from None
    if size < minimum:
        least = "0 bytes" if minimum == 0 else human_bytes(minimum)
        raise ValueError(f"{name} must be at least {least}, got {value}")
    return size


class Table:
    """Rows of plain values, shown as an aligned text table or an HTML table."""

    def __init__(self, columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str = ""):
        self.columns, self.rows, self.title = list(columns), [list(r) for r in rows], title

    def __repr__(self) -> str:
        cells = [self.columns] + [[str(c) for c in row] for row in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(([self.title] if self.title else []) + lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in self.rows)
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def status_table(cluster) -> Table:
    """A cluster's ranks (a ``Cluster``'s ``status()``), one row each, under a title that says
    what the cluster is and what runs on it."""
    rows = [
        [
            r.rank,
            r.host,
            r.pid,
            device_label(r),
            memory_label(r),
            human_bytes(r.peak_memory),
            r.state,
            blas_label(r),
            budget_label(r),
        ]
        for r in cluster.status()
    ]
    title = f"{cluster.n} ranks, backend {cluster.backend}, {len(cluster.setup_cells)} setup cell(s)"
    if (job := cluster.running_job) is not None:
        title += f"; running: {job}"
    return Table(["rank", "host", "pid", "device", "memory", "peak", "state", "blas", "budget"], rows, title)


def budget_label(r) -> str:
    """A rank's memory budget for the status table: ``700.0 MB (given)`` where it was given
    (``--memory``), else what the rank measured."""
    if not r.memory_budget:
        return "-"
    return human_bytes(r.memory_budget) + (" (given)" if r.memory_given else "")


def device_label(r) -> str:
    """A rank's device for the status table: ``Device(gpu, 0) NVIDIA H200, 140.4 GB`` on a GPU
    (its name and memory from MLX's ``device_info``), ``Device(cpu, 0)`` on the CPU."""
    if not r.device_name:
        return r.device
    return f"{r.device} {r.device_name}" + (f", {human_bytes(r.device_memory)}" if r.device_memory else "")


def memory_label(r) -> str:
    """Memory in use, and the freed buffers MLX keeps for reuse where they pass 1 MB: the
    process holds both (on a GPU, ``nvidia-smi`` shows their sum plus the CUDA context)."""
    cached = getattr(r, "cache_memory", 0)
    return human_bytes(r.active_memory) + (f" (+{human_bytes(cached)} cached)" if cached >= 2**20 else "")


def blas_label(r) -> str:
    """A rank's BLAS for the status table; on a Linux GPU (CUDA) matmuls run in cuBLAS, and
    the CPU BLAS serves only work put on the CPU."""
    if r.blas is None:
        return "-"
    if "gpu" in r.device and r.blas.system == "Linux":
        return f"cuBLAS (GPU); on the CPU: {r.blas}"
    return str(r.blas)


def findings_table(findings: Sequence) -> Table:
    """Preflight findings (``Cluster.check()``), one row each, under which hosts have problems."""
    failed = sorted({f.host for f in findings if f.status == "fail"})
    title = f"preflight: {'problems on ' + ', '.join(failed) if failed else 'every host is ready'}"
    return Table(
        ["host", "check", "status", "message"], [[f.host, f.check, f.status, f.message] for f in findings], title
    )


def clusters_table(clusters: Sequence[dict]) -> Table:
    """The kept clusters (``mlx_nb.clusters()``), one row each."""

    def ago(seconds: float) -> str:
        return (
            f"{seconds / 3600:.1f} h"
            if seconds >= 3600
            else f"{seconds / 60:.0f} min"
            if seconds >= 60
            else f"{seconds:.0f} s"
        )

    rows = [
        [
            c["name"],
            c["ranks"],
            ", ".join(c["hosts"]),
            c["backend"],
            ago(c["age"]),
            ago(c["idle"]) + (f" (stops at {ago(c['idle_limit'])})" if c["idle_limit"] else ""),
            human_bytes(c["memory"]),
            f"pid {c['holder']['pid']}" if c["holder"] else "no",
        ]
        for c in clusters
    ]
    title = f"{len(rows)} kept cluster(s)" if rows else "no kept cluster here"
    return Table(["name", "ranks", "hosts", "backend", "age", "idle", "memory", "attached"], rows, title)


def figure_png(fig, **savefig) -> bytes:
    """A matplotlib figure as PNG bytes, whatever the matplotlib backend."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    return buf.getvalue()


def show_figure(fig) -> None:
    """Publish a matplotlib figure as PNG, whatever the matplotlib backend, then close it."""
    import base64

    import matplotlib.pyplot as plt
    from IPython.display import publish_display_data

    png = figure_png(fig, bbox_inches="tight")
    publish_display_data({"image/png": base64.b64encode(png).decode(), "text/plain": repr(fig)})
    plt.close(fig)


class Progress:
    """One progress style for long work: an ipywidgets bar in a notebook kernel, a line of text
    (rewritten in place) elsewhere.

    Example::

        bar = Progress("sweep")
        for i in range(10):
            bar.update(i, 10, f"case {i}")
        bar.close()
    """

    def __init__(self, what: str, show: bool = True, stream=None):
        import sys

        self.what, self.show, self.stream, self.widget = what, show, stream or sys.stderr, None
        if not show:
            return
        try:
            from IPython import get_ipython

            if type(get_ipython()).__name__ == "ZMQInteractiveShell":
                import ipywidgets as w
                from IPython.display import display

                self.widget, self.label = w.IntProgress(min=0, max=1, description=what), w.Label()
                display(w.HBox([self.widget, self.label]))
        except ImportError:
            pass

    def update(self, done: int, total: int, message: str = "") -> None:
        if not self.show:
            return
        if self.widget is not None:
            self.widget.max, self.widget.value = max(total, 1), done
            self.label.value = f"{done}/{total} {message}"
            return
        bar = "#" * (20 * done // max(total, 1))
        self.stream.write(f"\r{self.what} [{bar:<20}] {done}/{total} {message:<40}")
        self.stream.flush()

    def close(self) -> None:
        if self.show and self.widget is None:
            self.stream.write("\n")
            self.stream.flush()
        elif self.widget is not None:
            self.widget.bar_style = "success"
