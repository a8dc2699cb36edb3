"""CellRun: one job on the ranks, from dispatch to result or explained failure.

Everything mlx_nb runs on the ranks goes through here, a ``%%mlx_dist`` cell as much as a
function shipped by ``Cluster.call`` (benchmarks, generation, fine-tuning, push and pull): one
dispatch, live output, rank liveness, stuck-collective detection, the interrupt, the timeout,
the cooperative stop, and recovery. It is the only code that waits on ranks.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

from . import diagnose
from .diagnose import Recovery, Stop, Stopped
from .engines.tasks import RankTask, forget
from .output import Printer, write_stream
from .rank import session
from .results import CANCEL_KEY, CANCEL_MESSAGE, REPORT_PREFIX, STOP_MESSAGE, TRACE_KEY, Outcome, RankError, Trace

if TYPE_CHECKING:
    from .engines.group import RankGroup

SETTLE = 0.5  # seconds after a failure before a rank's trace can say it is stuck
OUTPUT_WAIT = 5.0  # seconds a rank's end of output may lag its reply before we stop waiting
CHECK_EVERY = 0.25  # seconds between looks at the ranks' processes while a cell runs
DRAIN_BOUND = 2.0  # seconds the drain may take to free the waiting ranks before they are restarted
OUTPUT_LIMIT = 4 << 20  # characters of output a shown rank sends per cell


def parse_ranks(spec: Union[int, str, Sequence[int]], n: int) -> list[int]:
    """'0' / 'all' / '0,2' / 1 / [0, 2] -> sorted rank list, checked against n."""
    if isinstance(spec, int):
        ranks = [spec]
    elif isinstance(spec, str):
        if spec.strip() == "all":
            return list(range(n))
        try:
            ranks = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--ranks takes 'all' or rank numbers like 0,2; got {spec!r}") from None
    else:
        ranks = list(spec)
    bad = [r for r in ranks if not 0 <= r < n]
    if bad or not ranks:
        raise ValueError(f"--ranks {spec!r}: this cluster has ranks 0-{n - 1}")
    return sorted(set(ranks))


@dataclass
class Job:
    """What runs on the ranks: a cell's code, or ``fn(*args, **kwargs)``."""

    code: Optional[str] = None
    fn: Optional[Callable] = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        """The first line of the code, or the function's name: how a replayed setup is named."""
        if self.code is not None:
            return (self.code.strip().splitlines() or [""])[0]
        return f"{getattr(self.fn, '__qualname__', repr(self.fn))}(...)"


@dataclass
class RunOptions:
    """How to run a job (``Cluster.run`` / ``Cluster.call`` arguments, checked)."""

    show: list[int] = field(default_factory=list)  # ranks whose output the notebook shows
    targets: Optional[list[int]] = None  # ranks the job runs on (None: all)
    timeout: Optional[float] = None
    pull: Optional[str] = None
    pull_from: list[int] = field(default_factory=lambda: [0])
    profile: bool = False
    on_report: Optional[Callable[[int, Any], None]] = None  # (rank, what it reported: a dict, or a report record)
    output_limit: int = OUTPUT_LIMIT


@dataclass
class CellResult:
    """What a job produced: each rank's outcome, rank 0's value, pulled and returned values."""

    results: list[Outcome]
    value: Optional[dict] = None
    pulled: Any = None
    wall: float = 0.0
    notes: list[str] = field(default_factory=list)
    profile: Any = None  # a CellProfile with profile=True

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.value

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def returned(self) -> list:
        """What a ``Cluster.call`` function returned on each rank it ran on."""
        return [r.returned for r in self.results]


class DistCellError(Exception):
    """A job on the ranks failed; the message leads with the root-cause rank."""

    def __init__(self, report: str, root: Optional[Outcome] = None, result: Optional[CellResult] = None):
        super().__init__(report)
        self.report, self.root, self.result = report, root, result

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback through mlx_nb's own frames
        return self.report.splitlines()


class _Finished:
    """Which ranks have finished: their reply *and* their last output have arrived.

    Both arrive on ipyparallel's I/O thread. The notebook's thread is woken for a
    rank that failed (the others may now be stuck), for the last rank, or for every
    rank once ``every`` is set (while stopping); otherwise it reads ``new()`` when
    it wakes anyway. One wake-up per healthy cell instead of one per message.
    """

    def __init__(self, tasks: dict[int, RankTask], events: queue.Queue):
        self.tasks, self.events = tasks, events
        self.lock = threading.Lock()
        self.ranks: list[int] = []
        self.every = False
        self.replied: dict[int, float] = {}  # rank -> when its reply came, its output not yet complete
        self.forced: set[int] = set()
        for rank, task in tasks.items():
            task.on_progress(lambda rank=rank: self._check(rank))

    def _check(self, rank: int) -> None:
        task = self.tasks[rank]
        if not task.replied:
            return
        failed = task.reply_failed()
        # a failed rank may send no end-of-output (a dead engine): outcome() waits briefly
        if not (failed or task.output_done):
            with self.lock:
                self.replied.setdefault(rank, time.monotonic())
            return
        with self.lock:
            if rank in self.ranks:
                return
            self.ranks.append(rank)
            last = len(self.ranks) == len(self.tasks)
        if failed or last or self.every:
            self.events.put(("done", rank))

    def new(self, results: dict) -> list[int]:
        now = time.monotonic()
        with self.lock:
            for r, at in self.replied.items():
                # its end-of-output message never came (the controller's relay can drop
                # messages under a flood): take the rank as finished rather than wait forever
                if r not in self.ranks and now - at > OUTPUT_WAIT:
                    self.ranks.append(r)
                    self.forced.add(r)
            return [r for r in self.ranks if r not in results]

    def wait(self, rank: int) -> float:
        """How long outcome() may still wait for the rank's output."""
        return 0.0 if rank in self.forced else OUTPUT_WAIT


class _Inbox:
    """What each rank has sent so far: output to the printer, reports, traces."""

    def __init__(self, tasks: dict[int, RankTask], events: queue.Queue, printer: Printer, on_report=None):
        self.tasks, self.printer, self.on_report = tasks, printer, on_report
        self.traces: dict[int, Trace] = {}
        self.seen = {(r, s): 0 for r in tasks for s in ("stdout", "stderr", "outputs")}
        for r, task in tasks.items():
            task.on_message(lambda r=r: events.put(("poke", r)))
        for r in tasks:
            self.drain(r)

    def drain(self, rank: int) -> None:
        task = self.tasks[rank]
        for name in ("stdout", "stderr"):
            text, k = getattr(task, name), (rank, name)
            if len(text) > self.seen[k]:
                self.printer.feed(rank, name, text[self.seen[k] :])
                self.seen[k] = len(text)
        outputs, k = task.outputs, (rank, "outputs")
        for content in outputs[self.seen[k] :]:
            if rank in self.printer.show:
                if not self.printer.single:
                    write_stream("stdout", diagnose.label([rank]) + "\n")
                _display(content)
        self.seen[k] = len(outputs)
        data = task.data
        for key in sorted(k for k in list(data) if k.startswith(REPORT_PREFIX)):
            report = data.pop(key)  # read once: a long job's reports must not pile up here
            if self.on_report is not None:
                self.on_report(rank, report)
        if TRACE_KEY in data:
            self.traces[rank] = data[TRACE_KEY]


def _display(content: dict) -> None:
    from IPython.display import publish_display_data

    publish_display_data(content.get("data", {}), content.get("metadata", {}))


class CellRun:
    """One job on the ranks: ``CellRun(group, job, cell_id, options, restart).run()``.

    ``restart(why)`` is the cluster's: new ranks and the setup replayed, as a ``Recovery``.
    """

    def __init__(
        self,
        group: RankGroup,
        job: Job,
        cell_id: int,
        options: RunOptions,
        restart: Callable[[str], Recovery],
        on_message: Callable[[str], None] = print,
    ):
        self.group, self.job, self.cell_id, self.options = group, job, cell_id, options
        self.restart, self.on_message = restart, on_message
        self.n = group.spec.n
        self.targets = options.targets if options.targets is not None else list(range(self.n))
        self.outcomes: dict[int, Outcome] = {}
        self.printer = Printer(options.show)
        self.events: queue.Queue[tuple] = queue.Queue()
        self.t0 = 0.0

    @property
    def traces(self) -> dict[int, Trace]:
        """Where each rank is, while the job runs (the status panel reads it)."""
        return self.inbox.traces if hasattr(self, "inbox") else {}

    def run(self) -> CellResult:
        """Dispatch, wait, and return the result; raise DistCellError (root cause first) if any
        rank failed, after restarting the ranks where the group cannot go on."""
        self._dispatch()
        try:
            failure = self._wait()
            wall = time.perf_counter() - self.t0
            if failure is None and any(o.lost for o in self.outcomes.values()):
                failure = Stopped(Stop.RANK_FAILED)  # every rank has reported, but a group that lost one cannot go on
            if failure is not None:
                raise self._recover(failure, wall)
            return self._result(wall)
        finally:
            forget(self.tasks.values())  # else the client keeps a record per rank per job

    # ------------------------------------------------------------------ dispatch and wait
    def _dispatch(self) -> None:
        o, job = self.options, self.job
        self.t0 = time.perf_counter()
        if job.code is not None:
            pull_from = o.pull_from if o.pull else []
            args = (session.run_code, job.code, self.cell_id, o.show, o.pull, pull_from, o.profile, o.output_limit)
        else:
            args = (session.call, job.fn, job.args, job.kwargs, self.cell_id, o.show, o.profile, o.output_limit)
        self.tasks = self.group.dispatch(self.targets, *args)
        self.finished = _Finished(self.tasks, self.events)
        self.inbox = _Inbox(self.tasks, self.events, self.printer, o.on_report)

    def _collect(self) -> list[int]:
        """Record the ranks that finished since the last look; return them."""
        new = self.finished.new(self.outcomes)
        for rank in new:
            outcome = self.tasks[rank].outcome(self.finished.wait(rank))
            outcome.rank = rank
            self.outcomes[rank] = outcome
            self.inbox.drain(rank)
            self.printer.finish(rank)
            if outcome.output_cut and rank in self.printer.show:
                self._note_cut(rank, outcome.output_cut)
        return new

    def _note_cut(self, rank: int, cut: int) -> None:
        from .display import human_bytes

        who = "" if self.printer.single else f"{diagnose.label([rank])} "
        write_stream(
            "stderr",
            f"{who}output cut: {human_bytes(cut)} more not shown (a rank sends at most "
            f"{human_bytes(self.options.output_limit)} of output per cell; write more to a file)\n",
        )

    def _tick(self) -> float:
        due = self.printer.due_in()
        return 0.25 if due is None else min(0.25, max(due, 0.01))

    def _wait(self) -> Optional[Stopped]:
        """Wait for every target rank; return why we stopped waiting early, or None."""
        timeout, first_error_at, checked = self.options.timeout, None, self.t0
        try:
            while len(self.outcomes) < len(self.targets):
                try:
                    kind, rank = self.events.get(timeout=self._tick())
                except queue.Empty:
                    kind = None
                if kind == "poke":
                    self.inbox.drain(rank)
                self.printer.flush_due()
                for rank in self._collect():
                    if not self.outcomes[rank].ok and first_error_at is None:
                        first_error_at = time.perf_counter()
                now = time.perf_counter()
                # not after every message (a stream of output would pay it per line)
                if kind is None or first_error_at is not None or now - checked > CHECK_EVERY:
                    checked = now
                    if not self.group.controller_alive():
                        return Stopped(Stop.CONTROLLER_DIED)
                    lost = [r for r in self.group.dead_ranks() if r in self.tasks and r not in self.outcomes]
                    for r in lost:
                        self.outcomes[r] = Outcome(r, lost=True)
                    if lost and first_error_at is None:
                        first_error_at = now
                if timeout is not None and now - self.t0 > timeout and len(self.outcomes) < len(self.targets):
                    return Stopped(Stop.TIMEOUT, timeout)
                if first_error_at is not None and (
                    now - first_error_at > self.group.spec.grace
                    # a trace is a moment old: give the ranks time to report leaving a collective
                    or (now - first_error_at > SETTLE and self._stuck())
                ):
                    return Stopped(Stop.RANK_FAILED)
        except KeyboardInterrupt:
            return self._stop_cooperatively()
        return None

    def _stuck(self) -> list[int]:
        return diagnose.stuck(self.n, self.outcomes, self.inbox.traces)

    def _finishing(self, deadline: float, give_up: Callable[[], bool]):
        """Yield each rank that finishes before ``deadline`` (or until ``give_up()``), recording it."""
        self.finished.every = True  # each rank that finishes now matters at once
        while len(self.outcomes) < len(self.targets) and time.perf_counter() < deadline and not give_up():
            try:
                _, rank = self.events.get(timeout=0.1)
                self.inbox.drain(rank)
            except queue.Empty:
                pass
            yield from self._collect()

    def _stop_cooperatively(self) -> Optional[Stopped]:
        """First interrupt: ask the ranks to stop at a point they agree on, and wait.

        Returns None when every rank finished (the job ends normally), else why not.
        """
        if not any(t.polls_stop for t in self.inbox.traces.values()):
            return Stopped(Stop.INTERRUPTED)  # the job never looks at the stop flag: interrupt the ranks
        self.on_message("Interrupt: asking every rank to stop (interrupt again to force)...")
        self.group.send_control(STOP_MESSAGE, ranks=self.targets)
        try:
            for _ in self._finishing(time.perf_counter() + self.group.spec.grace, lambda: False):
                pass
        except KeyboardInterrupt:
            pass
        return None if len(self.outcomes) == len(self.targets) else Stopped(Stop.INTERRUPTED)

    # ------------------------------------------------------------------ endings
    def _ordered(self) -> list[Outcome]:
        for o in self.outcomes.values():
            o.trace = o.trace or self.inbox.traces.get(o.rank)
        return [self.outcomes[r] for r in self.targets]

    def _waits(self, rank: int) -> bool:
        t = self.inbox.traces.get(rank)
        return t is not None and t.in_collective

    def _recover(self, failure: Stopped, wall: float) -> DistCellError:
        """Stop waiting: interrupt what runs in Python, then keep the ranks if the ones left
        waiting in collectives can be released (tier 1), else restart them (tier 2)."""
        drain = self.group.spec.drain and self.group.controller_alive()
        running = [r for r in self.targets if r not in self.outcomes]
        if running and drain:
            # which of them wait in a collective (the drain's) and which run Python (the
            # interrupt's): a rank's first trace comes 0.4 s into the cell
            known = lambda: all(r in self.outcomes or r in self.inbox.traces for r in running)  # noqa: E731
            for rank in self._finishing(time.perf_counter() + SETTLE, known):
                running.remove(rank)
        if running:
            # a rank in Python stops at once; one in MLX's native wait only when (if) it returns,
            # and then the interrupt would fire late: those are the drain's
            self.group.signal(signal.SIGINT, [r for r in running if not (drain and self._waits(r))])
            # after a rank failed, the others have had the grace period already
            grace = self.group.spec.grace
            wait = grace if failure.why is not Stop.RANK_FAILED else min(grace, 1.0)
            give_up = lambda: set(running) <= set(self._stuck())  # noqa: E731
            for rank in self._finishing(time.perf_counter() + wait, give_up):
                running.remove(rank)
        recovery, why = None, ""
        lost = [o.rank for o in self.outcomes.values() if o.lost]
        busy = [r for r in running if not self._waits(r)]
        if busy and not lost and drain:
            t = self.inbox.traces.get(busy[0])
            at = f" (at line {t.line})" if t and t.line else ""
            why = f"rank {busy[0]} did not stop at the interrupt{at}: busy in native code, not in a collective"
        elif running and not lost and drain:
            recovery, why = self._release(running, failure)
            running = [r for r in running if r not in self.outcomes]
        elif lost:
            why = f"rank {lost[0]} was lost, and a group cannot go on without it"
        elif not self.group.controller_alive():
            why, running = "the controller died", running or list(self.targets)
        for r in self.printer.show:
            self.printer.finish(r)
        for r in running:
            self.outcomes[r] = Outcome(r, blocked=True)
        if recovery is None and (running or lost):
            try:
                recovery = self.restart(why)
            except KeyboardInterrupt:
                # a second interrupt: keep the explanation of the first failure, and what is left
                # (no half-formed group: restart() removed it) is repaired by the next cell
                recovery = Recovery(error="interrupted before the new ranks were ready", ranks=self.n, why=why)
        outcomes = self._ordered()
        text, root = diagnose.cell_report(outcomes, failure, recovery)
        cell = CellResult(outcomes, wall=wall, notes=[str(failure)])
        return DistCellError(text, root=self.outcomes[root] if root is not None else None, result=cell)

    def _release(self, waiting: list[int], failure: Stopped) -> tuple[Optional[Recovery], str]:
        """Tier 1: the finished ranks make the collectives the ``waiting`` ones wait in (with
        zeros), and every rank is told the cell is cancelled; nothing is restarted.

        Returns the recovery, or why the ranks could not be released that way.
        """
        t0 = time.perf_counter()
        plan, why = diagnose.drain_plan(self.outcomes, self.inbox.traces, waiting)
        if why:
            return None, why
        waited = {r: self.inbox.traces[r] for r in waiting}
        root = diagnose.root_cause(list(self.outcomes.values()))
        reason = f"rank {root} failed" if failure.why is Stop.RANK_FAILED and root is not None else str(failure)
        self.group.send_control(CANCEL_MESSAGE, {"cell": self.cell_id, "why": reason}, ranks=self.targets)
        # a released rank must know first, or it may finish its cell, or go on to its next
        # collective, as if nothing happened
        deadline = time.perf_counter() + SETTLE
        while time.perf_counter() < deadline and not all(
            self.tasks[r].data.get(CANCEL_KEY) == self.cell_id for r in waiting
        ):
            time.sleep(0.002)
        drains = [self.group.dispatch([f], session.drain, calls)[f] for f, calls in plan.items()]
        left = list(waiting)
        for rank in self._finishing(time.perf_counter() + DRAIN_BOUND, lambda: False):
            left.remove(rank)
        if left and not any(self._waits(r) for r in left):
            # released, but busy in Python: stop them as any running rank
            self.group.signal(signal.SIGINT, left)
            for rank in self._finishing(time.perf_counter() + self.group.spec.grace, lambda: False):
                left.remove(rank)
        forget(drains)
        for r in waiting:
            if r in self.outcomes:
                o = self.outcomes[r]
                o.trace = waited[r]  # where it waited, for the report
                if o.error is None:  # it ended its cell on the drain's zeros: that is no success
                    o.error = RankError("CellCancelled", f"the cell was cancelled: {reason}", cancelled=True)
        if left or not all(d.succeeded(wait=max(0.0, t0 + DRAIN_BOUND - time.perf_counter())) for d in drains):
            stuck = f"rank(s) {diagnose.ranges(left)}" if left else "the drain"
            return None, f"draining did not free {stuck} within {DRAIN_BOUND:g} s"
        return Recovery(drained_by=sorted(plan), seconds=time.perf_counter() - t0, ranks=self.n), ""

    def _result(self, wall: float) -> CellResult:
        for r in self.printer.show:
            self.printer.finish(r)
        for r, o in self.outcomes.items():
            self.group.ranks[r].active_memory, self.group.ranks[r].peak_memory = o.active_memory, o.peak_memory
        outcomes, o = self._ordered(), self.options
        shown = [x for x in outcomes if x.rank in o.show and x.value]
        cell = CellResult(outcomes, value=shown[0].value if shown else None, wall=wall)
        if o.pull is not None:
            by_rank = {x.rank: x.pulled for x in outcomes}
            cell.pulled = [by_rank[r] for r in o.pull_from] if len(o.pull_from) > 1 else by_rank[o.pull_from[0]]
        if o.profile:
            from .profile import CellProfile, record

            cell.profile = CellProfile.from_outcomes(outcomes)
            record(cell.profile)
        if not cell.ok:
            text, root = diagnose.cell_report(outcomes)
            raise DistCellError(text, root=self.outcomes[root] if root is not None else None, result=cell)
        return cell
