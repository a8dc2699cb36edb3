"""Jobs on a cluster's ranks, one at a time: a foreground cell, a chat reply, fine-tuning, a server.

``RankJobs`` is the half of ``Cluster`` that uses running ranks: ``run`` (a cell's code),
``call`` (a function), ``push``/``pull``, ``send`` to the running job, ``request_stop``. Each job
goes through one ``CellRun``; a rank that died while idle is replaced first, and the setup
cells are replayed on new ranks.

A second job started meanwhile says at once what runs and for how long, and waits for it
(the interrupt gives up waiting); behind a server, which runs until stopped, it is refused.
Inside a job (a restart that replays the setup cells) nothing waits for itself.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

from .cell import CellResult, CellRun, DistCellError, Job, RunOptions, parse_ranks
from .engines import ClusterError
from .rank import session
from .restart import Restarts, SetupCell, SetupCells
from .results import INBOX_MESSAGE, STOP_MESSAGE
from .spec import check_timeout

if TYPE_CHECKING:
    from .engines.group import RankGroup

SERVING = "serving"  # the job name of a server: it runs until stopped, so nothing waits for it


class JobSlot:
    """The ranks' one job: who holds them, what it is, since when.

    Example::

        slot = JobSlot()
        with slot.hold("fine-tuning", print):
            ...  # the ranks are ours
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: Optional[int] = None  # the thread whose job runs
        self.what: Optional[str] = None
        self.since = 0.0

    @property
    def mine(self) -> bool:
        return self._owner == threading.get_ident()

    @contextlib.contextmanager
    def hold(self, what: str, say: Callable[[str], None]) -> Iterator[None]:
        if self.mine:
            yield
            return
        if not self._lock.acquire(blocking=False):
            running, took = self.what, time.monotonic() - self.since
            if running == SERVING:
                raise ClusterError(f"the ranks are serving (for {took:.0f} s): stop the server first (%mlx_serve stop)")
            say(f"Waiting for {running} to finish (running for {took:.0f} s); interrupt to give up...")
            try:
                while not self._lock.acquire(timeout=0.2):
                    pass
            except KeyboardInterrupt:
                raise ClusterError(f"gave up waiting: {running} still runs on the ranks") from None
        self._owner, self.what, self.since = threading.get_ident(), what, time.monotonic()
        try:
            yield
        finally:
            self._owner = self.what = None
            self._lock.release()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job runs (``timeout`` s at most); whether none does."""
        if self.mine or not self._lock.acquire(timeout=timeout):
            return self.what is None
        self._lock.release()
        return True


class RankJobs:
    """The ranks of one group, used: one job at a time (``jobs``), the setup cells (``setup``)
    replayed by ``restarts`` on new ranks, what the user is told through ``on_message``.
    ``Cluster`` is one; everything used here is set here."""

    def __init__(self, group: RankGroup) -> None:
        self.spec, self.group = group.spec, group
        self.on_message: Callable[[str], None] = print
        self.setup = SetupCells(group.state, group.save_state)
        self.restarts = Restarts(group, self.setup, self._replay, lambda text: self.on_message(text))
        self.job: Optional[CellRun] = None  # the job running now
        self.jobs = JobSlot()  # one job at a time on the ranks
        self._cell_count = 0

    @property
    def n(self) -> int:
        return self.spec.n

    @property
    def running(self) -> bool:
        return self.group.running

    @property
    def busy(self) -> bool:
        """A job is running on the ranks."""
        return self.job is not None

    @property
    def running_job(self) -> Optional[str]:
        """What runs on the ranks now ("a %%mlx_dist cell", "fine-tuning", "serving"...), or None."""
        return self.jobs.what

    @property
    def setup_cells(self) -> list[SetupCell]:
        """What a restart replays, in order (``%%mlx_dist --setup`` cells, ``load_model``)."""
        return self.setup.cells

    def heal(self) -> None:
        """A rank that died while idle (or a failed restart) means new ranks, before the next job;
        a dead controller means a new cluster (a kept one says so, and restart makes it)."""
        self.restarts.heal()

    def _require_running(self) -> None:
        if not self.running:
            raise ClusterError("the cluster is not running: start it first (%mlx_cluster start)")

    def _run_job(self, job: Job, options: RunOptions, what: str = "a %%mlx_dist cell") -> CellResult:
        self._require_running()
        if not self.jobs.mine:
            self.group.check_holder()
        with self.jobs.hold(what, self.on_message):
            self.heal()
            self._cell_count += 1
            outer = self.job  # a job's restart replays the setup jobs inside it
            self.job = CellRun(self.group, job, self._cell_count, options, self.restarts.for_cell, self.on_message)
            try:
                return self.job.run()
            finally:
                self.job = outer
                self.group.touch()

    def run(
        self,
        code: str,
        *,
        ranks: Union[int, str, Sequence[int]] = 0,
        timeout: Optional[float] = None,
        push: Optional[dict] = None,
        pull: Optional[str] = None,
        setup: bool = False,
        quiet: bool = False,
        on_report: Optional[Callable[[int, Any], None]] = None,
        profile: bool = False,
    ) -> CellResult:
        """Run ``code`` on every rank at once, streaming the output of ``ranks`` live.

        Raises DistCellError (root cause first) if any rank fails; a cluster left
        unusable by the failure is restarted, and its setup cells replayed, first.

        Example::

            cluster.run("x = mx.distributed.all_sum(mx.array([rank]))\\nx")
        """
        self._require_running()
        check_timeout(timeout)
        show = [] if quiet else parse_ranks(ranks, self.n)
        if push:
            self.push(push)
        options = RunOptions(
            show=show, timeout=timeout, pull=pull, pull_from=show or [0], profile=profile, on_report=on_report
        )
        cell = self._run_job(Job(code=code), options)
        if setup:
            self.setup.add(SetupCell(code, dict(push or {})))
        return cell

    def call(
        self,
        fn: Callable,
        *args: Any,
        kwargs: Optional[dict] = None,
        ranks: Union[int, str, Sequence[int]] = "all",
        timeout: Optional[float] = None,
        show: Sequence[int] = (),
        on_report: Optional[Callable[[int, Any], None]] = None,
        setup: Optional[str] = None,
        profile: bool = False,
        what: Optional[str] = None,
    ) -> Any:
        """``fn(*args, **kwargs)`` on every rank of ``ranks`` (a list of values, rank order; one
        value for an int). Same liveness, interrupt, timeout and recovery as ``run``.

        ``fn`` may use the group (``mlx_nb.rank.world()``): every rank calls it at once.
        ``show``: ranks whose printed output is shown. ``setup``: a name; the call is replayed
        on new ranks after a restart, replacing an earlier setup of that name (once it succeeded).
        ``what`` names the job for whoever waits for it ("fine-tuning"; default the function's name).

        Example::

            def norm(scale):
                return mx.distributed.all_sum(mx.array([scale * rank])).item()
            cluster.call(norm, 2.0)   # [12.0, 12.0, 12.0, 12.0] on 4 ranks
        """
        self._require_running()
        check_timeout(timeout)
        targets = parse_ranks(ranks, self.n)
        job = Job(fn=fn, args=args, kwargs=dict(kwargs or {}))
        options = RunOptions(
            show=list(show),
            targets=None if len(targets) == self.n else targets,
            timeout=timeout,
            on_report=on_report,
            profile=profile,
        )
        values = self._run_job(job, options, what or f"{job.title[:-5]}()").returned
        if setup is not None:
            self.setup.add(SetupCell(job.title, job=job, key=setup))
        return values[0] if isinstance(ranks, int) else values

    def request_stop(self) -> None:
        """Ask the running job to stop: ``mlx_nb.rank.stop_requested()`` turns true on every rank."""
        self._require_running()
        self.group.send_control(STOP_MESSAGE)

    def _stop_background_job(self, patience: float) -> None:
        """Ask a job another thread runs (fine-tuning, a chat reply) to stop, and wait for it
        (``patience`` s at most): the ranks stop it at the same step."""
        running = self.jobs.what
        if running is not None and not self.jobs.mine and self.group.formed:
            self.on_message(f"Stopping {running} first (every rank stops at the same step)...")
            self.request_stop()
            if not self.jobs.wait_idle(patience):
                self.on_message(f"{running} did not stop within {patience:.0f} s: stopping the cluster under it")

    def send(self, content: dict, ranks: Sequence[int] = (0,)) -> None:
        """Hand ``content`` (JSON-able) to the job running on ``ranks``: it arrives in their
        ``mlx_nb.rank.inbox()`` while the job runs. Safe from any thread; messages arrive in order.

        Example::

            cluster.send({"text": "hello"})   # rank 0's inbox() returns [{"text": "hello"}]
        """
        self._require_running()
        # ipyparallel's IO thread owns the client's sockets: a send from another thread (an
        # HTTP handler's, say) is handed to it, in order
        self.group.client._io_loop.add_callback(self.group.send_control, INBOX_MESSAGE, content, list(ranks))

    def push(self, values: dict, ranks: Optional[Sequence[int]] = None) -> None:
        """Send ``values`` into the cell namespace of every rank (or of ``ranks``)."""
        try:
            self.call(session.push, values, ranks="all" if ranks is None else list(ranks))
        except DistCellError:
            raise
        except Exception as e:
            raise _cannot_travel(values, e) from None

    def pull(self, name: str, ranks: Union[int, Sequence[int], str] = 0) -> Any:
        """A rank's value of ``name`` (rank 0 by default); a list for several ranks."""
        return self.call(session.pull, name, ranks=ranks)

    def forget_setup(self) -> int:
        """Forget the setup cells (a restart then replays none); how many there were."""
        return self.setup.forget()

    def replay_setup(self) -> float:
        """Run the registered setup cells again, in order; return the seconds it took."""
        return self.setup.replay(self._replay)

    def _replay(self, cell: SetupCell) -> None:
        if cell.push:
            self.push(cell.push)
        self._run_job(cell.job or Job(code=cell.code), RunOptions())


def _cannot_travel(values: dict, error: Exception) -> Exception:
    """The value that cannot be sent to the ranks, named in one line (ValueError)."""
    import cloudpickle

    for name, value in values.items():
        try:
            cloudpickle.dumps(value)
        except Exception as e:
            return ValueError(f"{name} ({type(value).__name__}) cannot be sent to the ranks: {type(e).__name__}: {e}")
    return error
