"""One rank's session: its identity, the group, the cell namespace, and running a cell or a call.

Every function here runs inside an engine (called through ipyparallel's ``apply``). mlx_nb's own
state (rank, group, files, the notebook's signals) lives in ``state`` (:mod:`.state`), apart from
the user's cell namespace: a cell may set ``rank = 8`` or ``import numpy as mx`` without breaking
mlx_nb. In the namespace, ``mx``, ``nn``, ``world``, ``rank`` and ``size`` are only conveniences.

Cells can use ``stop_requested()`` and ``report()`` (``from mlx_nb.rank import ...``).
"""

from __future__ import annotations

import ast
import atexit
import linecache
import os
import queue
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from importlib.metadata import version
from typing import Any, Optional

from ..results import (
    CANCEL_KEY,
    CANCEL_MESSAGE,
    GROUP_OPS,
    INBOX_MESSAGE,
    INIT_KEY,
    REPORT_PREFIX,
    STOP_MESSAGE,
    Call,
    Identity,
    InitStep,
    Outcome,
    RankError,
)
from . import blas, memory, trace
from .output import limited_output
from .state import state

namespace: dict[str, Any] = {}  # the user's cell namespace


class CellCancelled(Exception):
    """Raised in a rank's cell once the notebook cancelled it because another rank failed."""


def world():
    """This rank's ``mx.distributed`` group (for functions shipped with ``Cluster.call``)."""
    return state.world


# ------------------------------------------------------------------ identity and group
def identify() -> Identity:
    """Who this engine is, before any MLX group exists."""
    from mlx_nb import __version__

    return Identity(
        rank=int(os.environ.get("MLX_RANK", "-1")),
        set=os.environ.get("MLX_NB_SET", ""),
        pid=os.getpid(),
        host=socket.gethostname(),
        python=sys.executable,
        python_version=".".join(map(str, sys.version_info[:3])),
        mlx_nb=__version__,
        mlx=mlx_version(),
    )


def mlx_version() -> Optional[str]:
    try:
        return version("mlx")
    except Exception:
        return None


def warm() -> None:
    """Import MLX ahead of time (every engine, as it starts), so that forming a group is fast.

    In a thread: the engine answers at once, and an import that hangs shows up where it
    always did, as a rank that never gets to ``mx.distributed.init``.
    Values travel with cloudpickle both ways (classes and functions defined in a notebook).
    """
    from ipyparallel.serialize.canning import use_cloudpickle

    use_cloudpickle()

    def imports() -> None:
        blas.use()  # before MLX loads: it binds its BLAS calls then
        import mlx.core  # noqa: F401
        import mlx.nn  # noqa: F401

    threading.Thread(target=imports, name="mlx_nb-warm", daemon=True).start()


def init_group(
    backend: str,
    size: int,
    files: dict[str, str],
    files_dir: Optional[str] = None,
    budgets: Optional[list[int]] = None,
    local_ranks: int = 1,
) -> Identity:
    """Form the mx.distributed group (collective: every rank calls it at once).

    ``budgets``: every rank's memory budget in bytes (None: each measures its own), and
    ``local_ranks`` the ranks on this host (they share what it measures): see :mod:`.memory`.
    A failure comes back in ``Identity.error``, with ``port_in_use`` set where the ring could
    not bind its port.
    """
    from ipyparallel.datapub import publish_data

    def progress(step: InitStep) -> None:
        # so the notebook can name a rank that never gets to the call; flush waits until
        # the IOPub thread has sent it, since init holds the GIL
        publish_data({INIT_KEY: step})
        sys.stdout.flush()

    progress(InitStep.STARTED)
    blas.use()  # before anything imports mlx.core (a no-op once the warm thread did it)
    if size > 1:  # a group of one reads no hostfile (and MLX rejects an empty one)
        _write_files(files, files_dir)
    import mlx.core as mx
    import mlx.nn as nn

    progress(InitStep.JOINING)
    try:
        group = _join(mx, backend, size)
    except Exception as exc:
        ident = identify()
        ident.error = RankError(type(exc).__name__, str(exc), time=time.time(), port_in_use="bind" in str(exc).lower())
        return ident
    trace.install(mx)
    state.rank, state.size, state.backend, state.world = group.rank(), group.size(), backend, group
    memory.configure(budgets, local_ranks)
    namespace.update(mx=mx, nn=nn, world=group, rank=state.rank, size=state.size)
    _install_control_handlers()
    threading.Thread(target=trace.watch, args=(memory.in_use,), name="mlx_nb-watch", daemon=True).start()
    return describe()


def _join(mx, backend: str, size: int):
    if size == 1:
        group = mx.distributed.init()  # a group of one needs no backend (MLX's ring rejects it)
    else:
        group = mx.distributed.init(strict=True, backend=backend)
    expected = int(os.environ.get("MLX_RANK", group.rank()))
    if group.size() != size or group.rank() != expected:
        raise RuntimeError(
            f"mx.distributed.init(backend={backend!r}) gave rank {group.rank()} of "
            f"{group.size()}, expected rank {expected} of {size}"
        )
    return group


def describe() -> Identity:
    """Identity, group, device, memory and memory budget of this rank (after init_group)."""
    import mlx.core as mx

    ident = identify()
    ident.rank, ident.size, ident.backend = state.rank, state.size, state.backend
    ident.device, ident.device_name, ident.device_memory = device(mx)
    ident.blas = blas.current()
    ident.active_memory, ident.peak_memory = memory.in_use()
    ident.cache_memory = mx.get_cache_memory()
    budget = memory.budget()
    ident.memory_budget, ident.memory_given = budget.bytes, budget.source == memory.BudgetSource.GIVEN
    return ident


def device(mx) -> tuple[str, str, int]:
    """(``str(mx.default_device())``, the GPU's name, its total memory in bytes) for this rank.

    The name and memory come from ``mx.device_info`` (CUDA: "NVIDIA H200" and the card's
    memory; Metal: the chip), for a GPU only: a CPU rank gets ``("Device(cpu, 0)", "", 0)``.
    """
    d = mx.default_device()
    if d.type != mx.gpu:
        return str(d), "", 0
    try:
        info = mx.device_info(d)
    except Exception:  # an MLX without device_info: the device alone
        return str(d), "", 0
    total = info.get("total_memory") or info.get("memory_size") or 0
    return str(d), str(info.get("device_name", "")), int(total) if isinstance(total, int) else 0


def check_group() -> float:
    """One all_sum of (rank + 1): every rank must get n (n + 1) / 2."""
    import mlx.core as mx

    return mx.distributed.all_sum(mx.array([state.rank + 1.0]), group=state.world).item()


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
        state.files.append(path)
    atexit.register(_remove_files)


def _remove_files() -> None:
    for path in state.files:
        try:
            os.remove(path)
        except OSError:
            pass


# ------------------------------------------------------------------ values
def push(values: dict) -> None:
    """Put ``values`` into the cell namespace."""
    namespace.update(values)


def pull(name: str) -> Any:
    """A value of the cell namespace, as it can travel (mx.array pickles itself)."""
    if name not in namespace:
        raise NameError(f"name {name!r} is not defined on rank {state.rank}")
    value = namespace[name]
    if not isinstance(value, (int, float, str, bytes, bool, type(None))) and type(value).__name__ not in (
        "array",
        "ndarray",
    ):
        import cloudpickle

        try:
            cloudpickle.dumps(value)
        except Exception as e:  # said here, by name, rather than as a failed reply
            raise TypeError(
                f"{name} on rank {state.rank} ({type(value).__name__}) cannot travel to the notebook: "
                f"{type(e).__name__}: {e}"
            ) from None
    return value


# ------------------------------------------------------------------ running
def run_code(
    code: str,
    cell_id: int,
    show_ranks: list[int],
    pull_name: Optional[str],
    pull_ranks: list[int],
    profile: bool = False,
    output_limit: int = 0,
) -> Outcome:
    """Run one %%mlx_dist cell on this rank and report what happened.

    Errors are returned, not raised, so the notebook sees every rank's outcome.
    """
    filename = f"<mlx_dist cell {cell_id}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    if len(state.cells) == state.cells.maxlen:
        linecache.cache.pop(state.cells[0], None)
    state.cells.append(filename)
    show = state.rank in show_ranks

    def body(out: Outcome) -> None:
        tree = ast.parse(code, filename=filename)
        last = ast.Expression(tree.body.pop().value) if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, filename, "exec"), namespace)
        value = eval(compile(last, filename, "eval"), namespace) if last is not None else None
        if value is not None:
            # format on every rank: a lazy collective in the value must be evaluated everywhere
            bundle = _mimebundle(value)
            namespace["_"] = value
            if show and not _is_figure(value):
                out.value = bundle
        _display_figures(show, value)
        if pull_name is not None and state.rank in pull_ranks:
            out.pulled = pull(pull_name)

    return _execute(filename, cell_id, body, show, profile, output_limit)


def call(
    fn: Callable,
    args: tuple,
    kwargs: dict,
    cell_id: int,
    show_ranks: list[int],
    profile: bool = False,
    output_limit: int = 0,
) -> Outcome:
    """Run ``fn(*args, **kwargs)`` on this rank (``Cluster.call``); its value in ``returned``."""
    name = f"<mlx_nb call {cell_id}: {getattr(fn, '__qualname__', repr(fn))}>"

    def body(out: Outcome) -> None:
        out.returned = fn(*args, **kwargs)

    return _execute(name, cell_id, body, state.rank in show_ranks, profile, output_limit)


def _execute(
    name: str, cell_id: int, body: Callable[[Outcome], None], show: bool, profile: bool, output_limit: int
) -> Outcome:
    import mlx.core as mx

    out = Outcome(rank=state.rank)
    mx.reset_peak_memory()
    trace.recorder.begin(name, cell_id)
    state.stop.clear()
    t0 = time.perf_counter()
    with limited_output(show, output_limit) as cut:
        try:
            body(out)
            _refuse_if_cancelled()  # the end of a cancelled cell is no success
        except BaseException as exc:  # KeyboardInterrupt too: report it as this rank's outcome
            out.error = format_error(exc, name)
        finally:
            out.wall = time.perf_counter() - t0
            out.eval_time, out.calls = trace.recorder.eval_time, trace.recorder.n_calls
            # no flush here: ipyparallel flushes stdout/stderr before it sends the reply, and
            # each flush is a round trip to the IOPub thread
            trace.recorder.end()
    out.output_cut = cut.bytes
    out.active_memory, out.peak_memory = memory.in_use()
    if profile:
        out.timeline = trace.recorder.timeline(out.wall)
    return out


def format_error(exc: BaseException, filename: str) -> RankError:
    """The rank's exception as a record: the traceback from the cell's first frame, without ours."""
    tb = traceback.extract_tb(exc.__traceback__)
    for i, frame in enumerate(tb):
        if frame.filename == filename:  # a cell: start at its first frame
            tb = tb[i:]
            break
    # and our own frames (this module, the recorder's wrappers between the cell and MLX)
    ours = (__file__, trace.__file__)
    tb = traceback.StackSummary.from_list([f for f in tb if f.filename not in ours])
    lineno = next((f.lineno for f in reversed(tb) if f.filename == filename), None)
    if isinstance(exc, SyntaxError) and exc.filename == filename:
        lineno = exc.lineno
    lines = traceback.format_list(tb) + traceback.format_exception_only(type(exc), exc)
    return RankError(
        type=type(exc).__name__,
        message=str(exc),
        traceback="".join(lines),
        time=time.time(),
        lineno=lineno,
        line=linecache.getline(filename, lineno).strip() if lineno else "",
        pending=trace.recorder.pending[-3:],
        interrupted=isinstance(exc, KeyboardInterrupt),
        cancelled=isinstance(exc, CellCancelled),
        peer_lost="peer was lost" in str(exc),  # MLX's ring, when another rank went away
    )


# ------------------------------------------------------------------ display
def _is_figure(value: Any) -> bool:
    mpl = sys.modules.get("matplotlib.figure")
    return mpl is not None and isinstance(value, mpl.Figure)


def _display_figures(rank_shows: bool, value: Any = None) -> None:
    """Show the figures the cell left open (and a returned one) as PNG, once, then close them."""
    if "matplotlib.pyplot" not in sys.modules:
        return
    import matplotlib.pyplot as plt

    figures = [plt.figure(num) for num in plt.get_fignums()]
    if _is_figure(value) and value not in figures:
        figures.append(value)
    if rank_shows:
        from ..display import show_figure

        for fig in figures:
            show_figure(fig)
    plt.close("all")


def _mimebundle(value: Any) -> dict:
    try:
        from IPython import get_ipython

        data, _ = get_ipython().display_formatter.format(value)
        return data
    except Exception:
        return {"text/plain": repr(value)}


# ------------------------------------------------------------------ the notebook's signals
def _install_control_handlers() -> None:
    # the control channel is served by its own thread, so these arrive while a cell runs
    from IPython import get_ipython

    kernel = get_ipython().kernel
    kernel.control_handlers[STOP_MESSAGE] = lambda stream, ident, parent: state.stop.set()
    kernel.control_handlers[CANCEL_MESSAGE] = _on_cancel
    kernel.control_handlers[INBOX_MESSAGE] = lambda stream, ident, parent: state.inbox.put(parent["content"])
    trace.recorder.before_call = _refuse_if_cancelled


def _on_cancel(stream, ident, parent) -> None:
    from ipyparallel.datapub import publish_data

    content = parent["content"]
    state.cancelled.clear()  # only the latest cell can be running
    state.cancelled[content["cell"]] = content["why"]
    publish_data({CANCEL_KEY: content["cell"]})  # the notebook drains only once every rank knows


def _refuse_if_cancelled(op: str = "") -> None:
    """A cancelled cell goes no further: its next distributed call (or its end) raises."""
    why = state.cancelled.get(trace.recorder.cell_id)
    if why is not None and trace.recorder.cell is not None:
        raise CellCancelled(f"the cell was cancelled: {why}")


def drain(calls: list[Call]) -> int:
    """Make the calls that this rank's peers wait in, with zeros, so that their evaluations return.

    ``calls`` are the peers' pending calls this rank must answer, in order: a group collective
    to join, a ``send`` to this rank (receive it), a ``recv`` from this rank (send to it).
    Runs outside any cell (the recorder records nothing). Returns how many it made.
    """
    import mlx.core as mx

    group = state.world
    for c in calls:
        dtype = getattr(mx, c.dtype)
        if c.op in GROUP_OPS:
            out = getattr(mx.distributed, c.op)(mx.zeros(c.shape, dtype), group=group)
        elif c.op == "send":  # the peer sends to us
            out = mx.distributed.recv(c.shape, dtype, c.peer, group=group)
        else:  # the peer receives from us
            out = mx.distributed.send(mx.zeros(c.shape, dtype), c.peer, group=group)
        mx.eval(out)
    return len(calls)


def inbox(wait: float = 0.0) -> list[dict]:
    """What the notebook sent this rank with ``Cluster.send`` since the last call, oldest first.

    Waits up to ``wait`` seconds for a first message when none is there. Messages are not
    cleared when a job starts (one sent just after a job was dispatched may arrive before
    the job begins): a job that needs its own tells them apart by their content.

    Example (in a job run with ``Cluster.call``)::

        for message in inbox(wait=0.1):
            print(message["text"])
    """
    try:
        messages = [state.inbox.get(timeout=wait)] if wait > 0 else []
    except queue.Empty:
        return []
    while True:
        try:
            messages.append(state.inbox.get_nowait())
        except queue.Empty:
            return messages


def stop_requested() -> bool:
    """True once the notebook asked this cell to stop (Cluster.request_stop, the stop buttons).

    Only a flag: ranks must agree on when to stop (:func:`vote_to_stop` every step), since a
    rank that stops alone leaves the others in a collective.

    Example (in a cell)::

        from mlx_nb.rank import stop_requested
        for step in range(1000):
            ...
            if mx.distributed.all_sum(mx.array(int(stop_requested()))).item():
                break
    """
    if not trace.recorder.polls_stop:
        trace.recorder.polls_stop = True
        trace.recorder.version += 1
    return state.stop.is_set()


def vote_to_stop(group: Any, stop: bool, share: Optional[int] = None, stream: Any = None) -> Any:
    """The one way ranks agree on stopping: every rank's ``stop`` summed over ``group``. A
    collective (every rank calls it at the same point), queued on ``stream`` (default the CPU)
    and started, not waited for. Every rank reads the same count (:func:`stop_agreed`), so once
    any rank says stop, all stop at the same step: a rank that stopped alone would leave the
    others waiting in the next collective.

    ``share``: a number each rank adds in a slot of its own (its peak memory), carried by the same
    collective: ``votes[1 + r]`` is rank r's.

    Example (every step, on every rank)::

        votes = vote_to_stop(world(), stop_requested())
        if stop_agreed(votes):
            break
    """
    import mlx.core as mx

    if share is None:
        mine = mx.array([int(stop)])
    else:
        values = [int(stop)] + [0] * group.size()
        values[1 + group.rank()] = int(share)
        mine = mx.array(values, dtype=mx.int64)
    with mx.stream(stream if stream is not None else mx.cpu):
        votes = mx.distributed.all_sum(mine, group=group)
    mx.async_eval(votes)
    return votes


def stop_agreed(votes: Any) -> bool:
    """Whether any rank voted to stop (``votes``: :func:`vote_to_stop`'s; it waits for the sum)."""
    return votes[0].item() > 0


def report(payload: Any = None, /, **data: Any) -> None:
    """Send ``data`` to the notebook now, while the cell runs (``Cluster.run(on_report=...)``
    gets it as a dict); or ``payload``, an object as it is (mlx_nb's own reports are frozen
    dataclasses, read in the notebook by attribute).

    Example (in a cell)::

        from mlx_nb.rank import report
        report(step=3, loss=0.25)
    """
    from ipyparallel.datapub import publish_data

    state.reports += 1
    publish_data({f"{REPORT_PREFIX}{state.reports:09d}": data if payload is None else payload})
