"""What went wrong, in words: the root-cause rank, the stuck ranks, one line per other rank.

Pure functions of the ranks' outcomes and traces (``mlx_nb.results``), so that every rule here
has fast unit tests without a cluster. The cell run decides *when* to ask; this module only
says *what* happened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Optional

from .results import GROUP_OPS, POINT_OPS, Call, InitStep, Outcome, RankError, Trace


class Stop(Enum):
    """Why a cell stopped waiting before every rank reported."""

    RANK_FAILED = "a rank failed"
    TIMEOUT = "--timeout expired"
    CONTROLLER_DIED = "the controller died"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class Stopped:
    """A cell's early stop: why, and for a timeout, after how many seconds.

    >>> str(Stopped(Stop.TIMEOUT, timeout=2))
    '--timeout 2 s expired'
    """

    why: Stop
    timeout: float = 0.0

    def __str__(self) -> str:
        return f"--timeout {self.timeout:g} s expired" if self.why is Stop.TIMEOUT else self.why.value


def ranges(ranks: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'"""
    ranks = sorted(set(ranks))
    out, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(out)


def label(ranks: Sequence[int]) -> str:
    """'[rank 2]' or '[ranks 0-3]'."""
    return f"[rank {ranks[0]}]" if len(ranks) == 1 else f"[ranks {ranges(ranks)}]"


def stuck(n: int, finished: Mapping[int, object], traces: Mapping[int, Trace]) -> list[int]:
    """Unfinished ranks waiting in a collective that can no longer complete.

    Such a rank evaluates a pending collective whose other side has stopped: a
    group-wide one once any rank has stopped, or a send/recv whose peer has. It
    sits in MLX's native wait, where SIGINT does not reach it.
    """
    out = []
    for r in range(n):
        t = traces.get(r)
        if r in finished or t is None or not t.in_collective:
            continue
        peer = t.pending[0].peer
        if (peer is None and finished) or (peer is not None and peer in finished):
            out.append(r)
    return out


def collective(trace: Trace) -> str:
    """'all_sum #2 (shape (4,), float32)': the first pending call, the one an eval waits in."""
    text = trace.pending[0].describe()
    more = trace.n_pending - 1
    return text + (f", {more} more pending after it" if more > 0 else "")


def same_error(a: Optional[RankError], b: Optional[RankError]) -> bool:
    return bool(a and b) and (a.type, a.message, a.lineno) == (b.type, b.message, b.lineno)


def root_cause(outcomes: Sequence[Outcome]) -> Optional[int]:
    """The rank that failed first: lost, else the earliest real error, else a straggler."""
    lost = [o.rank for o in outcomes if o.lost]
    if lost:
        return lost[0]
    errors = [(o.error.time, o.rank) for o in outcomes if o.error and not (o.error.interrupted or o.error.cancelled)]
    causes = [
        (o.error.time, o.rank) for o in outcomes if o.error and not o.error.interrupted and not o.error.consequence
    ]
    if causes:
        return min(causes)[1]
    # stopped by an interrupt or --timeout while others waited in a collective: it held them up
    if any(o.blocked or (o.error and o.error.cancelled) for o in outcomes):
        late = [o.rank for o in outcomes if o.error and o.error.interrupted]
        if late:
            return late[0]
    return min(errors)[1] if errors else None


def describe_rank(o: Outcome) -> str:
    """One line for a rank that is not the root cause."""
    t = o.trace
    at = f" at line {t.line}" if t and t.line else ""
    if o.lost:
        return f"lost: its engine process died{f' (last seen at line {t.line})' if t and t.line else ''}"
    if o.blocked:
        if t and t.in_collective:
            return f"blocked in a collective: {collective(t)}{at}"
        return f"still running{at}, not in a collective; stopped by the restart"
    e = o.error
    if e and e.cancelled:
        if t and t.in_collective:
            return f"cancelled; it waited in {collective(t)}{at}"
        return f"cancelled{f' at line {e.lineno}' if e.lineno else ''}"
    if e:
        where = f" at line {e.lineno}" if e.lineno else ""
        if e.interrupted:
            return f"interrupted{where}" + (f": {e.line}" if e.line else "")
        return f"raised {e.type}: {e.message}{where}"
    return "finished"


def replayed(titles: Sequence[str], took: float) -> str:
    """'Replayed 2 setup cell(s) on the new ranks in 1.2 s: w = ...; load_model(...)'."""
    firsts = [(t.strip().splitlines() or [""])[0] for t in titles]  # a cell's first line names it
    shown = "; ".join(f if len(f) <= 50 else f[:47] + "..." for f in firsts)
    return f"Replayed {len(titles)} setup cell(s) on the new ranks in {took:.1f} s: {shown}"


@dataclass
class Recovery:
    """What the cell run did about a failure, for the report."""

    restarted: bool = False
    seconds: float = 0.0  # the restart, replay included
    replay: float = 0.0
    setup: Sequence[str] = ()  # titles of the setup cells replayed
    error: Optional[str] = None  # the restart failed: why
    ranks: int = 0  # how many ranks the cluster has
    drained_by: Sequence[int] = ()  # the ranks that made their peers' collectives (no restart)
    why: str = ""  # why the ranks could not be kept, when they were restarted
    killed: bool = False  # a rank had to be ended with SIGKILL (JACCL: RDMA may need a reboot)


def _root_lines(outcomes: Sequence[Outcome], root: int) -> tuple[list[str], list[int]]:
    """The root-cause line(s), and the ranks they cover."""
    o = next(x for x in outcomes if x.rank == root)
    if o.lost:
        seen = f", last seen at line {o.trace.line}" if o.trace and o.trace.line else ""
        return [f"Root cause: rank {root} was lost (its engine process died mid-cell{seen})."], [root]
    e = o.error
    if e.interrupted:
        where = f" line {e.lineno}: {e.line}" if e.lineno else " Python code"
        return [
            f"Root cause: rank {root} had not reached the collective the others wait in: "
            f"it was running{where} when interrupted."
        ], [root]
    # ranks that raised the very same error share the root-cause line
    same = [x.rank for x in outcomes if x.error and not x.error.interrupted and same_error(x.error, e)]
    where = f", line {e.lineno}: {e.line}" if e.lineno else ""
    who = f"rank {root}" if len(same) == 1 else f"ranks {ranges(same)}"
    return [f"Root cause: {who} raised {e.type}: {e.message}{where}", e.traceback.rstrip()], same


def cell_report(
    outcomes: Sequence[Outcome], failure: Optional[Stopped] = None, recovery: Optional[Recovery] = None
) -> tuple[str, Optional[int]]:
    """The text a failed cell shows, root cause first, and the root-cause rank.

    ``failure``: why the cell stopped waiting (None: every rank reported), ``recovery``: what
    was done about it (None: nothing was needed, the ranks and their state are kept).
    """
    errors = [o.error for o in outcomes]
    if failure is None and all(errors) and all(same_error(e, errors[0]) for e in errors):
        e = errors[0]
        return "\n".join(
            [
                f"{label([o.rank for o in outcomes])} all raised {e.type}: {e.message}",
                e.traceback.rstrip(),
                "Every rank failed the same way; no restart was needed: the ranks and their state are kept.",
            ]
        ), outcomes[0].rank
    root = root_cause(outcomes)
    lines = [f"%%mlx_dist: {failure}."] if failure is not None and failure.why is not Stop.RANK_FAILED else []
    covered = [] if root is None else _root_lines(outcomes, root)[1]
    if root is not None:
        lines += _root_lines(outcomes, root)[0]
    lines += [f"  rank {o.rank}: {describe_rank(o)}" for o in outcomes if o.rank not in covered]
    lines += _recovery_lines(recovery)
    return "\n".join(lines), root


def _recovery_lines(recovery: Optional[Recovery]) -> list[str]:
    if recovery is not None and recovery.drained_by:
        return [
            f"Released: rank(s) {ranges(recovery.drained_by)} made the collectives the others waited in "
            f"(with zeros), and the cell was cancelled on every rank ({recovery.seconds:.1f} s). "
            "No rank was restarted: the ranks and their state are kept."
        ]
    if recovery is None or not (recovery.restarted or recovery.error):
        return ["No restart was needed: the ranks and their state are kept."]
    lines = [f"Not drained: {recovery.why}."] if recovery.why else []
    if recovery.killed:
        lines.append("A rank had to be killed (SIGKILL): on JACCL, RDMA may not work again until those Macs restart.")
    if recovery.error:
        return lines + [
            f"Restarting the cluster failed: {recovery.error}\nThe next cell tries again (or %mlx_cluster restart now)."
        ]
    lines += [
        f"The group could not go on, so all {recovery.ranks} ranks were restarted ({recovery.seconds:.1f} s); "
        "the cluster is ready for the next cell."
    ]
    if recovery.setup:
        lines.append(replayed(recovery.setup, recovery.replay) + ".")
    return lines


# ------------------------------------------------------------------ draining
def drain_plan(
    outcomes: Mapping[int, Outcome], traces: Mapping[int, Trace], waiting: Sequence[int]
) -> tuple[dict[int, list[Call]], str]:
    """What each finished rank must call so that the ``waiting`` ranks' collectives return.

    Returns ``(plan, "")``: per finished rank, the calls to make in order (a group collective
    to join; the peer's ``send`` to it, to receive; the peer's ``recv`` from it, to send to);
    or ``({}, why)`` when draining cannot free them: the ranks disagree about the collective
    they wait in, one waits on another waiting rank, or more is pending than a trace holds.
    """
    free = sorted(r for r, o in outcomes.items() if not o.lost and not o.blocked)
    if not free:
        return {}, "every rank left in the cell waits in a collective: none can answer"
    steps: dict[int, list[tuple[int, int, Call]]] = {f: [] for f in free}
    group: Optional[tuple[int, list[Call]]] = None  # the first waiting rank's group calls
    for r in waiting:
        t = traces.get(r)
        if t is None or not t.in_collective:
            return {}, f"rank {r} is not waiting in a collective"
        if t.n_pending > len(t.pending):
            return {}, f"rank {r} has {t.n_pending} collectives pending, more than a drain replays"
        calls = [c for c in t.pending if c.op in GROUP_OPS]
        if group is None:
            group = (r, calls)
        elif [(c.op, c.shape, c.dtype) for c in calls] != [(c.op, c.shape, c.dtype) for c in group[1]]:
            first = traces[group[0]].pending[0].describe()
            return {}, (
                f"the ranks disagree about the collective they wait in: rank {group[0]} in {first}, "
                f"rank {r} in {t.pending[0].describe()}"
            )
        for c in t.pending:
            if c.op not in POINT_OPS:
                continue
            if c.peer not in steps:
                return {}, f"rank {r} waits in {c.describe()}, and rank {c.peer} cannot answer it"
            steps[c.peer].append((c.seq, r, Call(c.seq, c.op, c.shape, c.dtype, peer=r)))
    for f in free:
        steps[f] += [(c.seq, -1, c) for c in group[1]]
    return {f: [c for _, _, c in sorted(s, key=lambda x: x[:2])] for f, s in steps.items() if s}, ""


def blas_notes(ranks: Sequence) -> list[str]:
    """One line per reason where ranks (``RankInfo``) run MLX's reference BLAS unasked.

    Ranks on a GPU are left out: their matmuls run on the GPU, not in the CPU BLAS.
    """
    notes: dict[str, list] = {}
    for r in ranks:
        if "gpu" in getattr(r, "device", ""):
            continue
        if r.blas and not r.blas.optimized and r.blas.note and not r.blas.note.endswith("=off"):
            notes.setdefault(r.blas.note, []).append(r)
    return [
        f"rank(s) {ranges([r.rank for r in rs])} on {', '.join(dict.fromkeys(r.host for r in rs))} run MLX's "
        f"bundled reference BLAS (float32 matmuls about 30x slower): {note}; then restart the cluster "
        "(MLX_NB_BLAS=off keeps the reference BLAS without this note)"
        for note, rs in notes.items()
    ]


# ------------------------------------------------------------------ forming the group
def init_failed(rank: int, error: RankError, address: str, ports_given: bool) -> str:
    """mx.distributed.init raised on ``rank``; ``address`` is its ring address ('ip:port')."""
    text = f"mx.distributed.init failed on rank {rank}: {error.type}: {error.message}"
    if error.port_in_use:
        ip, _, port = address.split(",")[0].rpartition(":")
        fix = (
            "pass other ports= or free it"
            if ports_given
            else "it was free a moment before; start again to pick new ports"
        )
        text += f"\nport {port} on {ip}, rank {rank}'s address in the ring, is in use by another process: {fix}."
    return text


def init_stuck(backend: str, timeout: float, steps: Mapping[int, Optional[InitStep]], addresses: Sequence[str]) -> str:
    """The group did not form in time: which ranks never called init, or could not connect.

    ``steps``: for each rank still waiting, how far it got (None: not even started).
    """
    head = f"mx.distributed.init(backend={backend!r}) did not complete within {timeout:.0f} s"
    waiting = sorted(steps)
    absent = [r for r in waiting if steps[r] is not InitStep.JOINING]
    if absent:
        quiet = [r for r in absent if steps[r] is None]
        why = "its engine is not responding" if quiet == absent else "it is stuck before the call, e.g. importing mlx"
        rest = [r for r in waiting if steps[r] is InitStep.JOINING]
        tail = f"; rank(s) {ranges(rest)} waited for it in the ring" if rest else ""
        return f"{head}: rank(s) {ranges(absent)} never called it ({why}){tail}."
    addrs = ", ".join(f"rank {r} {addresses[r]}" for r in waiting)
    return (
        f"{head} on rank(s) {ranges(waiting)}: every one of them is in the call, but they "
        f"could not connect to each other ({addrs}): is a port blocked?"
    )


def engine_exited(rank: int, host: Optional[str], output: str) -> str:
    """A rank's engine process exited; ``output`` is the tail of what it printed."""
    where = f" on {host}" if host else ""
    return f"rank {rank}'s engine process{where} exited" + (f"; its output:\n{output}" if output else " (no output)")
