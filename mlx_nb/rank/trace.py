"""The collective recorder: which mx.distributed calls a rank made, and where it waits.

Installed once per rank when the group forms. Every ``mx.distributed`` collective, ``mx.eval``
and the array methods that evaluate are wrapped, so that while a cell runs the rank knows its
calls, which are still pending, and whether its main thread is inside an evaluation. The
watch thread publishes that to the notebook: the main thread may sit in MLX's native wait
(which releases the GIL), and the notebook must be able to say which collective it waits in.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Optional

from ..results import GROUP_OPS, PENDING_KEPT, POINT_OPS, TRACE_KEY, Call, Timeline, Trace

COLLECTIVES = GROUP_OPS + POINT_OPS
# array methods that evaluate: a rank waiting in one may be waiting in a collective
EVALUATING = (
    "item",
    "tolist",
    "__repr__",
    "__str__",
    "__format__",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "__array__",
)
MAX_EVALS = 10000  # evals a profile keeps per cell


class Recorder:
    """Per-cell record of the mx.distributed calls a rank made, and where it is now.

    Only calls not known to be done are kept (an eval that returns completes every call
    issued before it), so a long training loop holds a few calls, not millions.
    """

    def __init__(self) -> None:
        self.cell: Optional[str] = None
        self.cell_id = 0
        self.started = 0.0
        self.n_calls = 0
        self.pending: list[Call] = []
        self.done = 0  # calls up to this seq are known to have completed
        self.in_eval = False
        self.eval_time = 0.0
        self.polls_stop = False
        self.evals: list[tuple[float, float, int]] = []
        self.version = 0  # bumped on every change, so the watch thread publishes only news
        self.before_call: Optional[Callable[[str], None]] = None  # raises to refuse a call
        self.installed = False  # MLX's functions are wrapped (install)

    def begin(self, cell: str, cell_id: int = 0) -> None:
        self.cell, self.cell_id, self.started = cell, cell_id, time.time()
        self.n_calls, self.pending, self.done = 0, [], 0
        self.in_eval, self.eval_time, self.polls_stop, self.evals = False, 0.0, False, []
        self.version += 1

    def end(self) -> None:
        self.cell = None
        self.version += 1

    def record(self, call: Call) -> None:
        self.n_calls = call.seq
        self.pending.append(call)
        self.version += 1

    def completed(self, upto: int) -> None:
        """An evaluation started after call ``upto`` returned: every call up to it is done."""
        if upto > self.done:
            self.done = upto
            self.pending = [c for c in self.pending if c.seq > upto]
        self.version += 1

    def snapshot(self, memory: tuple[int, int]) -> Trace:
        return Trace(
            cell=self.cell,
            elapsed=time.time() - self.started if self.cell else 0.0,
            n_calls=self.n_calls,
            pending=list(self.pending[:PENDING_KEPT]),
            n_pending=len(self.pending),
            in_eval=self.in_eval,
            line=self.line(),
            polls_stop=self.polls_stop,
            active_memory=memory[0],
            peak_memory=memory[1],
        )

    def timeline(self, wall: float) -> Timeline:
        return Timeline(
            self.started,
            self.started + wall,
            list(self.evals),
            sum(e - s for s, e, c in self.evals if c),
        )

    def line(self) -> Optional[int]:
        """The cell line the main thread is at (read from another thread)."""
        frame = sys._current_frames().get(threading.main_thread().ident)
        while frame is not None and frame.f_code.co_filename != self.cell:
            frame = frame.f_back
        return frame.f_lineno if frame is not None else None


recorder = Recorder()


def install(mx) -> None:
    """Wrap mx.distributed's collectives, mx.eval and the evaluating array methods (once)."""
    if recorder.installed:
        return
    dist = mx.distributed
    for op in COLLECTIVES:
        setattr(dist, op, _recorded(op, getattr(dist, op)))
    mx.eval = _timed_eval(mx.eval)
    for name in EVALUATING:
        setattr(mx.array, name, _evaluating(getattr(mx.array, name)))
    recorder.installed = True


def _recorded(op: str, fn):
    def recorded(x=None, *args, **kwargs):
        if recorder.cell is not None:
            if recorder.before_call is not None:
                recorder.before_call(op)
            recorder.record(_call(op, recorder.n_calls + 1, x, args, kwargs))
        return fn(x, *args, **kwargs)

    recorded.__name__ = recorded.__qualname__ = op
    recorded.__doc__ = fn.__doc__
    return recorded


def _call(op: str, seq: int, x, args: tuple, kwargs: dict) -> Call:
    """The record of one call: send(x, dst), recv(shape, dtype, src), recv_like(x, src), op(x)."""
    call = Call(seq, op)
    if op == "recv":
        shape = x if x is not None else kwargs.get("shape")
        dtype = args[0] if args else kwargs.get("dtype")
        call.shape, call.dtype = tuple(shape or ()), str(dtype).replace("mlx.core.", "")
        call.peer = args[1] if len(args) > 1 else kwargs.get("src")
        return call
    if hasattr(x, "shape"):
        call.shape, call.dtype = tuple(x.shape), str(x.dtype).replace("mlx.core.", "")
    if op in POINT_OPS:
        call.peer = args[0] if args else kwargs.get("dst", kwargs.get("src"))
    return call


def _timed_eval(real_eval):
    def eval(*args, **kwargs):
        if recorder.cell is None:
            return real_eval(*args, **kwargs)
        recorder.in_eval, n, t0 = True, recorder.n_calls, time.time()
        recorder.version += 1
        try:
            return real_eval(*args, **kwargs)
        finally:
            t1 = time.time()
            recorder.eval_time += t1 - t0
            if len(recorder.evals) < MAX_EVALS:
                recorder.evals.append((t0, t1, n - recorder.done))  # collectives it completed
            recorder.in_eval = False
            recorder.completed(n)

    eval.__doc__ = real_eval.__doc__
    return eval


def _evaluating(method):
    def evaluating(self, *args, **kwargs):
        if recorder.cell is None or recorder.in_eval:
            return method(self, *args, **kwargs)
        recorder.in_eval, n = True, recorder.n_calls
        recorder.version += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            recorder.in_eval = False
            recorder.completed(n)

    evaluating.__name__ = evaluating.__qualname__ = method.__name__
    evaluating.__doc__ = method.__doc__
    return evaluating


def watch(memory: Callable[[], tuple[int, int]]) -> None:
    """Publish where a long-running cell is, every 0.2 s while it changes (a daemon thread)."""
    from ipyparallel.datapub import publish_data

    published = None
    while True:
        time.sleep(0.2)
        if recorder.cell is None or time.time() - recorder.started < 0.4:
            continue
        try:
            mem = memory()
            where = (recorder.version, recorder.line(), mem[0] >> 20)
            if where != published:
                published = where
                publish_data({TRACE_KEY: recorder.snapshot(mem)})
        except Exception:  # a thread that dies stops naming hangs: never let it
            pass
