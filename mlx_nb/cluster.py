"""Cluster: MLX ranks as ipyparallel engines, bound into one group, and the one way to use them.

    with Cluster(n=4) as c:
        c.run("print(mx.distributed.all_sum(mx.array([rank])))")
        c.call(my_function, 3)        # a function shipped to every rank

``run`` (a cell's code) and ``call`` (a function) both go through one ``CellRun``: a rank that
died while idle is replaced first, and a failure is explained and recovered the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import ipyparallel as ipp

from . import diagnose
from .cell import CellResult, CellRun, DistCellError, Job, RunOptions, parse_ranks
from .diagnose import Recovery
from .engines import ClusterError, kept
from .engines.group import RankGroup, RankInfo
from .engines.hosts import check_hosts, controller_ip, refuse_on
from .hostfile import Hostfile
from .jobs import JobSlot
from .preflight import Finding, mlx_problem
from .rank import session
from .results import INBOX_MESSAGE, STOP_MESSAGE
from .spec import BACKENDS, ClusterSpec, check_timeout

__all__ = ["BACKENDS", "Cluster", "ClusterError", "RankInfo", "SetupCell", "controller_ip"]


@dataclass
class SetupCell:
    """A job replayed on new ranks after any restart (``%%mlx_dist --setup``, ``load_model``)."""

    code: str  # the cell's code, or how the call is named
    push: dict = field(default_factory=dict)
    job: Optional[Job] = None  # a function call (None: run ``code``)
    key: Optional[str] = None  # a later setup with the same key replaces this one


class Cluster:
    """``n`` local MLX ranks (ipyparallel engines) bound into one ``mx.distributed`` group.

    Example::

        c = Cluster(n=4).start()
        c.run("x = mx.distributed.all_sum(mx.array([rank]))\\nx")
        c.stop()
    """

    def __init__(
        self,
        n: Optional[int] = None,
        backend: Optional[str] = None,
        *,
        hostfile: Union[str, Path, Hostfile, None] = None,
        hosts: Optional[str] = None,
        python: Optional[str] = None,
        ssh_cmd: Optional[Sequence[str]] = None,
        env: Optional[dict[str, str]] = None,
        start_timeout: float = 60.0,
        init_timeout: float = 60.0,
        grace: float = 3.0,
        spares: bool = True,
        ports: Optional[Sequence[int]] = None,
        preflight: bool = True,
        drain: bool = True,
        name: Optional[str] = None,
        keep: bool = False,
        idle: Union[str, float, None] = None,
        memory: Union[int, str, Sequence[Union[int, str]], None] = None,
    ) -> None:
        """``n`` local ranks, or one rank per entry of ``hostfile`` (a path or a Hostfile),
        or ``n`` ranks on each host of ``hosts`` ("h1,h2", as ``mlx.launch --hosts``).

        Ranks on other hosts start over ``ssh_cmd`` (default ``ssh``) with the Python
        ``python`` there (default this one's path); entries on 127.0.0.1 / localhost run here.

        When a cell fails while other ranks wait in a collective, the ranks that are free make
        that collective (with zeros) and the cell is cancelled everywhere: nothing is restarted
        and the ranks keep their state. ``drain=False`` restarts the ranks instead (as before).

        A cluster ends with the kernel that started it, however the kernel ends. ``keep=True``
        (with a ``name``) keeps it running after its kernel: another kernel, or a new one,
        reattaches with ``Cluster.attach(name)`` to the same ranks, a model still loaded; ``idle``
        ("2h", "30m", seconds) stops it once unused that long.

        ``memory``: each rank's memory budget (``"700MB"`` for all, or one per rank:
        ``["700MB", "260MB", "260MB"]``), in place of what each measures (a Mac's recommended
        working set, a GPU's memory, a CPU host's available memory shared by its ranks); the
        planner (``mlx_nb.generate.plan``) and ``load_model`` hold each rank to it, and the prompt
        cache's default share comes from it. ``status()`` shows each rank's budget.
        """
        if keep and not name:
            raise ValueError("a kept cluster needs a name, to attach it by: Cluster(..., name='llm', keep=True)")
        if name is not None:
            kept.check_name(name)
        idle_s = kept.parse_idle(idle)
        if idle_s is not None and not keep:
            raise ValueError("idle= is for kept clusters (keep=True): an owned cluster ends with its kernel")
        self.spec = ClusterSpec.build(
            n,
            backend,
            hostfile=hostfile,
            hosts=hosts,
            python=python,
            ssh_cmd=ssh_cmd,
            env=env,
            ports=ports,
            start_timeout=start_timeout,
            init_timeout=init_timeout,
            grace=grace,
            spares=spares,
            preflight=preflight,
            drain=drain,
            memory=memory,
        )
        self._init(RankGroup(self.spec, name=name, keep=keep, idle=idle_s))

    def _init(self, group: RankGroup) -> None:
        self.spec, self.group = group.spec, group
        self.setup_cells: list[SetupCell] = []
        self.on_message: Callable[[str], None] = print
        self.job: Optional[CellRun] = None  # the job running now
        self.jobs = JobSlot()  # one job at a time on the ranks
        self._cell_count = 0

    @classmethod
    def attach(cls, name: str, take: bool = False) -> Cluster:
        """The kept cluster ``name`` (``Cluster(name=..., keep=True)``), from this kernel: the same
        rank processes, their namespace (a loaded model) and setup cells. Refused while another
        live kernel holds it, unless ``take``.

        Example::

            c = Cluster.attach("llm")
            c.run("print(model_name)")
        """
        cluster = cls.__new__(cls)
        group = RankGroup.attach(name, take)
        cluster._init(group)
        if group.setup_state:
            cluster.setup_cells[:] = kept.decode(group.setup_state)
        return cluster

    # the spec, read-only
    n = property(lambda self: self.spec.n)
    backend = property(lambda self: self.spec.backend)
    hostfile = property(lambda self: self.spec.hostfile)
    remote = property(lambda self: self.spec.remote)
    grace = property(lambda self: self.spec.grace)
    memory = property(lambda self: self.spec.memory, doc="each rank's given memory budget (None: measured)")

    @property
    def ports(self) -> Optional[list[int]]:
        """The ring's port per rank and IP, used at every (re)start; None: free ones each time."""
        return self.spec.ports

    @ports.setter
    def ports(self, ports: Optional[Sequence[int]]) -> None:
        self.spec.ports = list(ports) if ports is not None else None
        self.spec.check()

    @property
    def ranks(self) -> list[RankInfo]:
        return self.group.ranks

    @property
    def client(self) -> Optional[ipp.Client]:
        return self.group.client

    @property
    def running(self) -> bool:
        return self.group.running

    @property
    def busy(self) -> bool:
        """A job is running on the ranks."""
        return self.job is not None

    @property
    def view(self) -> ipp.DirectView:
        """A DirectView on every rank, in rank order (raw ipyparallel, outside mlx_nb's care)."""
        self._require_running()
        return self.group.view

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> Cluster:
        """Start the controller and the ranks, form the group and check it."""
        if self.running:
            raise ClusterError("this cluster is already running: stop() it first")
        if problem := mlx_problem(session.mlx_version()):  # the ranks must run the notebook's MLX
            raise ClusterError(f"{problem}; nothing was started")
        if self.remote and self.spec.preflight:
            refuse_on(self.check())
        self.group.start()
        for note in diagnose.blas_notes(self.ranks):
            self.on_message(note)
        return self

    def stop(self) -> None:
        """Stop every engine and the controller; nothing is left running.

        A job running in the background (fine-tuning, a chat reply) is asked to stop first and
        given up to a minute to end where the ranks agree (fine-tuning saves its adapters).
        """
        running = self.jobs.what
        if running is not None and not self.jobs.mine and self.group.formed:
            self.on_message(f"Stopping {running} first (every rank stops at the same step)...")
            self.request_stop()
            if not self.jobs.wait_idle(60):
                self.on_message(f"{running} did not stop within 60 s: stopping the cluster under it")
        self.group.stop()

    def restart(self) -> float:
        """New rank processes, a new group, and the setup cells replayed.

        Returns the seconds the replay took.
        """
        self._require_running()
        if not self.group.controller_alive():  # nothing can reach the ranks: start over
            self.group.stop()
            self.group.start()
            return self.replay_setup()
        self.group.kill()
        try:
            self.group.form()
            return self.replay_setup()
        except BaseException:
            # a half-formed group, or one without its setup, is of no use: leave none, so
            # the next cell starts afresh (and replays the setup cells again)
            self.group.kill()
            raise

    def heal(self) -> None:
        """A rank that died while idle (or a failed restart) means new ranks, before the next job;
        a dead controller means a new cluster (a kept one says so, and restart makes it)."""
        if not self.group.controller_alive():
            if self.group.keep:
                raise ClusterError(
                    f"the controller of the kept cluster {self.group.name!r} died, so its ranks cannot be "
                    "reached: %mlx_cluster restart starts it anew (what the ranks held is lost)"
                )
            self.on_message("The controller died; restarting the cluster (controller and ranks)...")
            t0 = time.perf_counter()
            took = self.restart()
            self.on_message(f"Restarted the cluster in {time.perf_counter() - t0:.1f} s.")
            if self.setup_cells:
                self.on_message(diagnose.replayed([c.code for c in self.setup_cells], took) + ".")
            return
        dead = self.group.dead_ranks()
        if not dead:
            return
        if self.group.ranks:
            why = f"{diagnose.label(dead)} lost: engine process exited while idle"
        else:
            why = "no ranks are running (the last restart failed)"
        self.on_message(f"{why}; restarting the cluster...")
        t0 = time.perf_counter()
        took = self.restart()
        self.on_message(f"Restarted {self.n} ranks in {time.perf_counter() - t0:.1f} s.")
        if self.setup_cells:
            self.on_message(diagnose.replayed([c.code for c in self.setup_cells], took) + ".")

    def _restart_for_cell(self, why: str = "") -> Recovery:
        t0 = time.perf_counter()
        try:
            replay = self.restart()
        except (ClusterError, ipp.error.TimeoutError) as e:
            return Recovery(error=str(e), ranks=self.n, why=why, killed=self.group.killed)
        return Recovery(
            restarted=True,
            seconds=time.perf_counter() - t0,
            replay=replay,
            setup=[c.code for c in self.setup_cells],
            ranks=self.n,
            why=why,
            killed=self.group.killed,
        )

    def check(self) -> list[Finding]:
        """Preflight every host of the hostfile over ssh (nothing is started): see :func:`check_hosts`."""
        return check_hosts(self.hostfile, self.backend, self.spec.python, self.spec.ssh_cmd, env=self.spec.env)

    def processes(self) -> list:
        """Every process of this cluster on this machine: controller, engines (spares too), nannies."""
        return self.group.processes()

    def signal(self, sig: int, ranks: Optional[Sequence[int]] = None) -> None:
        """Send a signal to the engine processes of ``ranks`` (default all)."""
        self.group.signal(sig, ranks)

    def _require_running(self) -> None:
        if not self.running:
            raise ClusterError("the cluster is not running: start it first (%mlx_cluster start)")

    # ------------------------------------------------------------------- jobs
    def _run_job(self, job: Job, options: RunOptions, what: str = "a %%mlx_dist cell") -> CellResult:
        self._require_running()
        if not self.jobs.mine:
            self.group.check_holder()
        with self.jobs.hold(what, self.on_message):
            self.heal()
            self._cell_count += 1
            outer = self.job  # a job's restart replays the setup jobs inside it
            self.job = CellRun(self.group, job, self._cell_count, options, self._restart_for_cell, self.on_message)
            try:
                return self.job.run()
            finally:
                self.job = outer
                self.group.touch()

    @property
    def running_job(self) -> Optional[str]:
        """What runs on the ranks now ("a %%mlx_dist cell", "fine-tuning", "serving"...), or None."""
        return self.jobs.what

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
        register: bool = True,
        on_report: Optional[Callable[[int, dict], None]] = None,
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
        if setup and register:
            self.setup_cells.append(SetupCell(code, dict(push or {})))
            self._setup_changed()
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
            self.setup_cells[:] = [c for c in self.setup_cells if c.key != setup]
            self.setup_cells.append(SetupCell(job.title, job=job, key=setup))
            self._setup_changed()
        return values[0] if isinstance(ranks, int) else values

    def request_stop(self) -> None:
        """Ask the running job to stop: ``mlx_nb.rank.stop_requested()`` turns true on every rank."""
        self._require_running()
        self.group.send_control(STOP_MESSAGE)

    def send(self, content: dict, ranks: Sequence[int] = (0,)) -> None:
        """Hand ``content`` (JSON-able) to the job running on ``ranks``: it arrives in their
        ``mlx_nb.rank.inbox()`` while the job runs. Safe from any thread; messages arrive in order.

        Example::

            cluster.send({"text": "hello"})   # rank 0's inbox() returns [{"text": "hello"}]
        """
        self._require_running()
        # ipyparallel's IO thread owns the client's sockets: a send from another thread (an
        # HTTP handler's, say) is handed to it, in order
        self.client._io_loop.add_callback(self.group.send_control, INBOX_MESSAGE, content, list(ranks))

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
        n = len(self.setup_cells)
        self.setup_cells.clear()
        self._setup_changed()
        return n

    def _setup_changed(self) -> None:
        if self.group.keep:  # a kernel that attaches gets them
            self.group.setup_state = kept.encode(self.setup_cells)
            self.group.save_state()

    def replay_setup(self) -> float:
        """Run the registered setup cells again, in order; return the seconds it took."""
        t0 = time.perf_counter()
        for i, cell in enumerate(self.setup_cells):
            try:
                if cell.job is not None:
                    self._run_job(cell.job, RunOptions())
                else:
                    self.run(cell.code, push=cell.push, quiet=True, register=False)
            except DistCellError as e:
                raise ClusterError(
                    f"replaying setup cell {i + 1} of {len(self.setup_cells)} failed:\n{e.report}\n"
                    "(%mlx_cluster forget-setup drops the setup cells)"
                ) from None
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ status
    def status(self) -> list[RankInfo]:
        """Each rank's host, pid, device, memory, memory budget and state (idle / busy / dead)."""
        self._require_running()
        return self.group.states(busy=self.busy)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<mlx_nb.Cluster n={self.n} backend={self.backend!r} {state}>"


def _cannot_travel(values: dict, error: Exception) -> Exception:
    """The value that cannot be sent to the ranks, named in one line (ValueError)."""
    import cloudpickle

    for name, value in values.items():
        try:
            cloudpickle.dumps(value)
        except Exception as e:
            return ValueError(f"{name} ({type(value).__name__}) cannot be sent to the ranks: {type(e).__name__}: {e}")
    return error


def clusters() -> list[dict]:
    """The kept clusters here: name, ranks, hosts, backend, age, idle seconds, memory, holder.

    Example::

        for c in mlx_nb.clusters():
            print(c["name"], c["ranks"], c["idle"])
    """
    return kept.listing()
