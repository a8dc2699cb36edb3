"""Cluster: MLX ranks as ipyparallel engines, bound into one group, and the one way to use them.

    with Cluster(n=4) as c:
        c.run("print(mx.distributed.all_sum(mx.array([rank])))")
        c.call(my_function, 3)        # a function shipped to every rank

``run`` (a cell's code) and ``call`` (a function) both go through one ``CellRun``: a rank that
died while idle is replaced first, and a failure is explained and recovered the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import ipyparallel as ipp

from . import diagnose
from .engines import ClusterError, kept
from .engines.group import RankGroup
from .engines.hosts import check_hosts, controller_ip, refuse_on
from .engines.state import EngineState, RankInfo
from .hostfile import Hostfile
from .jobs import RankJobs
from .preflight import Finding, mlx_problem
from .rank import session
from .restart import SetupCell
from .spec import BACKENDS, ClusterSpec, check_keeping

__all__ = ["BACKENDS", "Cluster", "ClusterError", "RankInfo", "SetupCell", "controller_ip"]


class Cluster(RankJobs):
    """``n`` local MLX ranks (ipyparallel engines) bound into one ``mx.distributed`` group.

    A cluster ends with the kernel that started it, however the kernel ends. ``keep=True``
    (with a ``name``) keeps it running after its kernel: another kernel, or a new one,
    reattaches with ``Cluster.attach(name)`` to the same ranks, a model still loaded; ``idle``
    ("2h", "30m", seconds) stops it once unused that long.

    ``memory``: each rank's memory budget (``"700MB"`` for all, or one per rank:
    ``["700MB", "260MB", "260MB"]``), in place of what each measures (a Mac's recommended
    working set, a GPU's memory, a CPU host's available memory shared by its ranks); the
    planner (``mlx_nb.generate.plan``) and ``load_model`` hold each rank to it, and the prompt
    cache's default share comes from it. ``status()`` shows each rank's budget.

    Running it (``run``, ``call``, ``push``, ``pull``, ``send``) is ``RankJobs``' (mlx_nb.jobs).

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
        """
        idle_s = check_keeping(name, keep, idle)
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
        super().__init__(RankGroup(EngineState(self.spec, name=name, keep=keep, idle=idle_s)))

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
        RankJobs.__init__(cluster, RankGroup.attach(name, take))
        return cluster

    # the spec, read-only
    backend = property(lambda self: self.spec.backend)
    hostfile = property(lambda self: self.spec.hostfile)
    remote = property(lambda self: self.spec.remote)
    grace = property(lambda self: self.spec.grace)
    memory = property(lambda self: self.spec.memory, doc="each rank's given memory budget (None: measured)")
    kept_as = property(
        lambda self: self.group.state.name if self.group.state.keep else None,
        doc="the name of a kept cluster (None: it ends with its kernel)",
    )

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
        self._stop_background_job(60)
        self.group.stop()

    def restart(self, *, tell: bool = False) -> float:
        """New rank processes, a new group, and the setup cells replayed; returns the seconds
        the replay took. ``tell``: say through ``on_message`` how long it took and what was replayed.
        """
        self._require_running()
        return self.restarts.restart(tell)

    def check(self) -> list[Finding]:
        """Preflight every host of the hostfile over ssh (nothing is started): see :func:`check_hosts`."""
        return check_hosts(self.hostfile, self.backend, self.spec.python, self.spec.ssh_cmd, env=self.spec.env)

    def processes(self) -> list:
        """Every process of this cluster on this machine: controller, engines (spares too), nannies."""
        return self.group.processes()

    def signal(self, sig: int, ranks: Optional[Sequence[int]] = None) -> None:
        """Send a signal to the engine processes of ``ranks`` (default all)."""
        self.group.signal(sig, ranks)

    # ------------------------------------------------------------------ status
    def status(self) -> list[RankInfo]:
        """Each rank's host, pid, device, memory, memory budget and state (idle / busy / dead)."""
        self._require_running()
        return self.group.states(busy=self.busy)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<mlx_nb.Cluster n={self.n} backend={self.backend!r} {state}>"


def clusters() -> list[dict]:
    """The kept clusters here: name, ranks, hosts, backend, age, idle seconds, memory, holder.

    Example::

        for c in mlx_nb.clusters():
            print(c["name"], c["ranks"], c["idle"])
    """
    return kept.listing()
