"""What a rank sends back, as dataclasses: the wire records of one cell, and their key names.

Both sides import this module (the ranks build the records, the notebook reads them), so it
imports nothing of mlx_nb. Decisions in the notebook read these fields, never message text:
where a rank's exception says what happened (a lost peer, a port in use), the rank sets the
field once, next to the exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

# ipyparallel datapub keys and control message types, spelled once
INIT_KEY = "mlx_nb_init"  # how far a rank got in forming the group: an InitStep
TRACE_KEY = "mlx_nb_trace"  # a Trace, while a cell runs
REPORT_PREFIX = "mlx_nb_report_"  # + a sequence number: live reports (rank.session.report)
STOP_MESSAGE = "mlx_nb_stop"  # control channel: the cooperative stop flag
CANCEL_MESSAGE = "mlx_nb_cancel"  # control channel: the cell is cancelled (content: cell, why)
CANCEL_KEY = "mlx_nb_cancelled"  # datapub: a rank got the cancel of this cell id
INBOX_MESSAGE = "mlx_nb_inbox"  # control channel: data for the running job (Cluster.send, rank.session.inbox)

PENDING_KEPT = 256  # pending calls a Trace carries (what a drain can replay)
# a carriage return in rank output, as it travels: ipyparallel's client rewrites the text it has
# collected when a "\r" arrives, which would shift what the notebook already read under it
CR_MARK = "\x1b[mlx_nb-cr]"
GROUP_OPS = ("all_sum", "all_gather", "all_max", "all_min", "sum_scatter")
POINT_OPS = ("send", "recv", "recv_like")


class InitStep(Enum):
    """How far a rank got in forming the group (published under ``INIT_KEY``)."""

    STARTED = "started"  # running init_group, not yet in mx.distributed.init
    JOINING = "joining"  # in mx.distributed.init


@dataclass
class Call:
    """One ``mx.distributed`` call a rank made in the cell: its sequence number and operands."""

    seq: int
    op: str
    shape: Optional[tuple] = None
    dtype: Optional[str] = None
    peer: Optional[int] = None  # send: the destination; recv: the source

    def describe(self) -> str:
        """'all_sum #2 (shape (4,), float32)', 'send #1 (shape (2,), float32; to rank 1)'."""
        details = [f"shape {tuple(self.shape)}, {self.dtype}"] if self.shape is not None else []
        if self.peer is not None:
            details.append(f"{'to' if self.op == 'send' else 'from'} rank {self.peer}")
        return f"{self.op} #{self.seq}" + (f" ({'; '.join(details)})" if details else "")


@dataclass
class Trace:
    """Where a rank is in a running cell (published by its watch thread)."""

    cell: Optional[str] = None
    elapsed: float = 0.0
    n_calls: int = 0
    pending: list[Call] = field(default_factory=list)  # issued, not known done; [0] is waited in
    n_pending: int = 0  # pending holds the first PENDING_KEPT of them
    in_eval: bool = False
    line: Optional[int] = None
    polls_stop: bool = False
    active_memory: int = 0
    peak_memory: int = 0

    @property
    def in_collective(self) -> bool:
        """Evaluating while collectives are pending: it may be waiting for a peer."""
        return self.in_eval and bool(self.pending)


@dataclass
class RankError:
    """An exception a rank raised in the cell, formatted where it happened."""

    type: str
    message: str
    traceback: str = ""
    time: float = 0.0  # when (time.time on the rank): the first error is the root cause
    lineno: Optional[int] = None  # in the cell
    line: str = ""
    pending: list[Call] = field(default_factory=list)
    interrupted: bool = False  # a KeyboardInterrupt: the notebook's interrupt, or a timeout
    cancelled: bool = False  # raised by mlx_nb because another rank failed (CellCancelled)
    peer_lost: bool = False  # MLX raised it because another rank went away: a consequence
    port_in_use: bool = False  # forming the group: the ring could not bind its port

    @property
    def consequence(self) -> bool:
        """Caused by another rank's failure, not a cause."""
        return self.peer_lost or self.cancelled


@dataclass
class Timeline:
    """Where a rank spent the cell (``--profile``): evals as (start, end, collectives completed)."""

    start: float
    end: float
    evals: list[tuple[float, float, int]] = field(default_factory=list)
    collective_time: float = 0.0


@dataclass
class Outcome:
    """One rank's result of one cell or call."""

    rank: int
    error: Optional[RankError] = None
    value: Optional[dict] = None  # the last expression as a mime bundle (ranks that show output)
    returned: Any = None  # what a Cluster.call function returned
    pulled: Any = None
    wall: float = 0.0
    eval_time: float = 0.0
    calls: int = 0
    active_memory: int = 0
    peak_memory: int = 0
    timeline: Optional[Timeline] = None
    output_cut: int = 0  # bytes of output the rank did not send (over the cell's limit)
    # decided in the notebook, never sent by a rank
    lost: bool = False  # its engine process died
    blocked: bool = False  # still running when the cell gave up on it
    trace: Optional[Trace] = None  # where it was last seen

    @property
    def ok(self) -> bool:
        return self.error is None and not self.lost and not self.blocked


@dataclass
class Identity:
    """Who an engine is: before the group exists (rank from the launch), then its group."""

    rank: int
    set: str
    pid: int
    host: str
    python: str
    python_version: str
    mlx_nb: str
    mlx: Optional[str]
    size: int = 0
    backend: str = ""
    device: str = ""
    device_name: str = ""  # a GPU's name as MLX gives it ("NVIDIA H200"); empty on the CPU
    device_memory: int = 0  # that GPU's total memory, bytes (0: not known)
    blas: Any = None  # the BLAS its MLX runs: a rank.blas.BlasInfo (None: not known)
    active_memory: int = 0
    peak_memory: int = 0
    cache_memory: int = 0  # freed buffers MLX keeps for reuse (still held by the process)
    memory_budget: int = 0  # bytes this rank may hold (rank.memory.budget())
    memory_given: bool = False  # the budget was given (Cluster(memory=...)), not measured
    error: Optional[RankError] = None  # forming the group failed on this rank
