"""What runs inside a rank: group init, the cell namespace, capture, timing, memory.

Every function here is called on the engines through ipyparallel's ``apply``;
nothing in this module runs in the notebook kernel.
"""

from __future__ import annotations

import ast
import atexit
import linecache
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Optional

from .rank import blas

# the namespace every %%mlx_dist cell runs in (mx, nn, world, rank, size + user names)
namespace: dict[str, Any] = {}

_COLLECTIVES = ("all_sum", "all_gather", "all_max", "all_min", "sum_scatter", "send", "recv", "recv_like")


class _Trace:
    """Per-cell record of the mx.distributed calls a rank made, and where it is now."""

    def __init__(self) -> None:
        self.cell: Optional[str] = None
        self.started = 0.0
        self.calls: list[dict] = []  # seq, op, shape, dtype, peer
        self.done = 0  # calls[:done] are known to have completed (an eval returned after them)
        self.in_eval = False
        self.eval_time = 0.0
        self.polls_stop = False
        self.evals: list[tuple[float, float, int]] = []
        self.version = 0

    def begin(self, cell: str) -> None:
        self.cell, self.started = cell, time.time()
        self.calls, self.done, self.in_eval, self.eval_time = [], 0, False, 0.0
        self.polls_stop = False
        self.evals: list[tuple[float, float, int]] = []
        self.version += 1

    def end(self) -> None:
        self.cell = None
        self.version += 1

    def snapshot(self) -> dict:
        pending = self.calls[self.done :]
        return {
            "cell": self.cell,
            "elapsed": time.time() - self.started if self.cell else 0.0,
            "n_calls": len(self.calls),
            "pending": pending[:3],  # the first is the one an eval waits in
            "n_pending": len(pending),
            "in_eval": self.in_eval,
            "line": self.line(),
            "polls_stop": self.polls_stop,
            "active_memory": _memory()[0],
            "peak_memory": _memory()[1],
        }


    def line(self) -> Optional[int]:
        """The cell line the main thread is at (read from another thread)."""
        frame = sys._current_frames().get(threading.main_thread().ident)
        while frame is not None and frame.f_code.co_filename != self.cell:
            frame = frame.f_back
        return frame.f_lineno if frame is not None else None


def _memory() -> tuple[int, int]:
    mx = namespace.get("mx")
    return (mx.get_active_memory(), mx.get_peak_memory()) if mx else (0, 0)


trace = _Trace()
_state: dict[str, Any] = {"files": []}


def identify() -> dict:
    """Who this engine is, before any MLX group exists."""
    import mlx_nb

    return {
        "rank": int(os.environ.get("MLX_RANK", "-1")),
        "set": os.environ.get("MLX_NB_SET", ""),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "python": sys.executable,
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "mlx_nb": mlx_nb.__version__,
        "mlx": _mlx_version(),
    }


def _mlx_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("mlx")
    except Exception:
        return None


def _write_files(files: dict[str, str], where: Optional[str] = None) -> None:
    # mlx.launch writes MLX_HOSTFILE / MLX_IBV_DEVICES to a temp file and exports its path;
    # ``where`` is the cluster's directory, removed by the notebook even if this engine is killed
    if where:
        os.makedirs(where, exist_ok=True)
    for var, content in files.items():
        fd, path = tempfile.mkstemp(prefix=f"mlx_nb-{var.lower()}-", suffix=".json", dir=where)
        with os.fdopen(fd, "w") as f:
            f.write(content + "\n")
        os.environ[var] = path
        _state["files"].append(path)
    atexit.register(_remove_files)


def _remove_files() -> None:
    for path in _state["files"]:
        try:
            os.remove(path)
        except OSError:
            pass


def init_group(backend: str, size: int, files: dict[str, str], files_dir: Optional[str] = None) -> dict:
    """Form the mx.distributed group (collective: every rank calls it at once)."""
    from ipyparallel.datapub import publish_data

    def progress(step: str) -> None:
        # so the notebook can name a rank that never gets to the call; flush waits until
        # the IOPub thread has sent it, since init holds the GIL
        publish_data({"mlx_nb_init": step})
        sys.stdout.flush()

    progress("started")
    # before anything imports mlx.core: MLX binds its BLAS calls when it loads
    blas.use()
    if size > 1:  # a group of one reads no hostfile (and MLX rejects an empty one)
        _write_files(files, files_dir)
    import mlx.core as mx
    import mlx.nn as nn

    progress("joining")
    if size == 1:
        world = mx.distributed.init()  # a group of one needs no backend (MLX's ring rejects it)
    else:
        world = mx.distributed.init(strict=True, backend=backend)
    expected = int(os.environ.get("MLX_RANK", world.rank()))
    if world.size() != size or world.rank() != expected:
        raise RuntimeError(
            f"mx.distributed.init(backend={backend!r}) gave rank {world.rank()} of "
            f"{world.size()}, expected rank {expected} of {size}"
        )
    _install_recorder(mx)
    namespace.update(mx=mx, nn=nn, world=world, rank=world.rank(), size=world.size())
    _state.update(backend=backend, world=world)
    _install_stop_handler()
    threading.Thread(target=_watch, name="mlx_nb-watch", daemon=True).start()
    return describe()


def describe() -> dict:
    """Identity and memory of this rank (after init_group)."""
    import mlx.core as mx

    world = _state["world"]
    return {
        **identify(),
        "rank": world.rank(),
        "size": world.size(),
        "backend": _state["backend"],
        "device": str(mx.default_device()),
        "blas": blas.current().to_dict(),
        "active_memory": mx.get_active_memory(),
        "peak_memory": mx.get_peak_memory(),
    }


def check_group() -> float:
    """One all_sum of (rank + 1): every rank must get n (n + 1) / 2."""
    mx = namespace["mx"]
    x = mx.distributed.all_sum(mx.array([namespace["rank"] + 1.0]), group=namespace["world"])
    return x.item()


def _install_recorder(mx) -> None:
    dist = mx.distributed
    if getattr(dist, "_mlx_nb_recorded", False):
        return

    def record(op, fn):
        def recorded(x=None, *args, **kwargs):
            if trace.cell is not None:
                call = {"seq": len(trace.calls) + 1, "op": op}
                if hasattr(x, "shape"):
                    call.update(shape=tuple(x.shape), dtype=str(x.dtype).replace("mlx.core.", ""))
                if op in ("send", "recv", "recv_like"):
                    peer = kwargs.get("dst", kwargs.get("src", args[0] if args else None))
                    call["peer"] = peer
                trace.calls.append(call)
                trace.version += 1
            return fn(x, *args, **kwargs)

        recorded.__name__ = recorded.__qualname__ = op
        recorded.__doc__ = fn.__doc__
        return recorded

    for op in _COLLECTIVES:
        setattr(dist, op, record(op, getattr(dist, op)))

    real_eval = mx.eval

    def eval(*args, **kwargs):
        if trace.cell is None:
            return real_eval(*args, **kwargs)
        trace.in_eval, n, t0 = True, len(trace.calls), time.time()
        trace.version += 1
        try:
            return real_eval(*args, **kwargs)
        finally:
            t1 = time.time()
            trace.eval_time += t1 - t0
            if len(trace.evals) < 10000:
                # (start, end, collectives this eval completed)
                trace.evals.append((t0, t1, n - trace.done))
            trace.in_eval, trace.done = False, max(trace.done, n)
            trace.version += 1

    eval.__doc__ = real_eval.__doc__
    mx.eval = eval
    for name in _EVALUATING:
        setattr(mx.array, name, _evaluating(getattr(mx.array, name)))
    dist._mlx_nb_recorded = True


# array methods that evaluate: a rank waiting in one may be waiting in a collective
_EVALUATING = (
    "item", "tolist", "__repr__", "__str__", "__format__", "__bool__", "__int__", "__float__",
    "__index__", "__array__",
)


def _evaluating(method):
    def evaluating(self, *args, **kwargs):
        if trace.cell is None or trace.in_eval:
            return method(self, *args, **kwargs)
        trace.in_eval, n = True, len(trace.calls)
        trace.version += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            trace.in_eval, trace.done = False, max(trace.done, n)
            trace.version += 1

    evaluating.__name__ = evaluating.__qualname__ = method.__name__
    evaluating.__doc__ = method.__doc__
    return evaluating


def _watch() -> None:
    """Publish where a long-running cell is, so a hang can be explained.

    The main thread may sit in MLX's native wait (which releases the GIL), so
    this thread is what tells the notebook which collective a rank waits in.
    """
    from ipyparallel.datapub import publish_data

    published = None
    while True:
        time.sleep(0.2)
        if trace.cell is None or time.time() - trace.started < 0.4:
            continue
        where = (trace.version, trace.line(), _memory()[0] >> 20)
        if where == published:
            continue
        published = where
        try:
            publish_data({"mlx_nb_trace": trace.snapshot()})
        except Exception:
            pass


_stop = threading.Event()
_reports = [0]


def _install_stop_handler() -> None:
    # the control channel is served by its own thread, so this arrives while a cell runs
    from IPython import get_ipython

    kernel = get_ipython().kernel
    kernel.control_handlers["mlx_nb_stop"] = lambda stream, ident, parent: _stop.set()


def stop_requested() -> bool:
    """True once the notebook asked this cell to stop (Cluster.request_stop, the stop buttons).

    Only a flag: ranks must agree on when to stop (e.g. an all_sum of it every
    step), since a rank that stops alone leaves the others in a collective.
    """
    if not trace.polls_stop:
        trace.polls_stop = True
        trace.version += 1
    return _stop.is_set()


def report(**data: Any) -> None:
    """Send ``data`` to the notebook now, while the cell runs (``Cluster.run(on_report=...)``)."""
    from ipyparallel.datapub import publish_data

    _reports[0] += 1
    publish_data({f"mlx_nb_report_{_reports[0]:09d}": data})


def push(values: dict) -> None:
    namespace.update(values)


def pull(name: str) -> Any:
    """A value of the cell namespace, as it can travel (mx.array pickles itself)."""
    if name not in namespace:
        raise NameError(f"name {name!r} is not defined on rank {namespace.get('rank')}")
    return namespace[name]


def _split_last_expression(code: str, filename: str):
    tree = ast.parse(code, filename=filename)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    body = compile(tree, filename, "exec")
    return body, (compile(last, filename, "eval") if last is not None else None)


def _format_error(exc: BaseException, filename: str) -> dict:
    tb = traceback.extract_tb(exc.__traceback__)
    # drop our own frames: start at the first frame of the cell
    for i, frame in enumerate(tb):
        if frame.filename == filename:
            tb = tb[i:]
            break
    # and the recorder's wrappers (mx.eval, array methods) between the cell and MLX
    tb = traceback.StackSummary.from_list([f for f in tb if f.filename != __file__])
    lineno = next((f.lineno for f in reversed(tb) if f.filename == filename), None)
    if isinstance(exc, SyntaxError) and exc.filename == filename:
        lineno = exc.lineno
    lines = traceback.format_list(tb) + traceback.format_exception_only(type(exc), exc)
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "lineno": lineno,
        "line": (linecache.getline(filename, lineno).strip() if lineno else ""),
        "traceback": "".join(lines),
        "time": time.time(),
    }


def _display_figures(rank_shows: bool) -> None:
    if "matplotlib.pyplot" not in sys.modules:
        return
    import matplotlib.pyplot as plt

    if rank_shows:
        from .display import show_figure

        for num in plt.get_fignums():
            show_figure(plt.figure(num))
    plt.close("all")


def _mimebundle(value: Any) -> dict:
    try:
        from IPython import get_ipython

        data, _ = get_ipython().display_formatter.format(value)
        return data
    except Exception:
        return {"text/plain": repr(value)}


def run_cell(
    code: str,
    cell_id: int,
    show_ranks: list[int],
    pull_name: Optional[str],
    pull_ranks: list[int],
    profile: bool = False,
) -> dict:
    """Run one %%mlx_dist cell on this rank and report what happened.

    Errors are returned, not raised, so the notebook sees every rank's outcome.
    """
    import mlx.core as mx

    show = namespace.get("rank") in show_ranks
    if namespace.get("rank") not in pull_ranks:
        pull_name = None

    filename = f"<mlx_dist cell {cell_id}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    result: dict[str, Any] = {"rank": namespace.get("rank"), "error": None, "value": None}
    mx.reset_peak_memory()
    trace.begin(filename)
    _stop.clear()
    t0 = time.perf_counter()
    try:
        body, last = _split_last_expression(code, filename)
        exec(body, namespace)
        if last is not None:
            value = eval(last, namespace)
            if value is not None:
                # format on every rank: a lazy collective in the value must be evaluated everywhere
                bundle = _mimebundle(value)
                result["value"] = bundle if show else None
                namespace["_"] = value
        _display_figures(show)
        if pull_name is not None:
            result["pulled"] = pull(pull_name)
    except BaseException as exc:  # KeyboardInterrupt too: report it as this rank's outcome
        result["error"] = _format_error(exc, filename)
        result["error"]["pending"] = trace.calls[trace.done :][-3:]
    finally:
        result["wall"] = time.perf_counter() - t0
        result["eval_time"] = trace.eval_time
        result["calls"] = len(trace.calls)
        # no flush here: ipyparallel flushes stdout/stderr before it sends the reply, and
        # each flush is a round trip to the IOPub thread
        trace.end()
    result["active_memory"] = mx.get_active_memory()
    result["peak_memory"] = mx.get_peak_memory()
    if profile:
        result["profile"] = {
            "start": trace.started,
            "end": trace.started + result["wall"],
            "evals": trace.evals,
            "collective_time": sum(e - s for s, e, c in trace.evals if c),
        }
    return result


