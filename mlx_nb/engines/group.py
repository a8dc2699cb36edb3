"""RankGroup: an ipyparallel controller, one engine set per rank, bound into one MLX group.

The group keeps a warm spare set of engines: new processes are the slow part of a restart,
so the next restart binds the spares (seconds) while a new spare set starts behind it.
"""

from __future__ import annotations

import atexit
import json
import shutil
import signal as signals
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import ipyparallel as ipp
import psutil

from .. import diagnose
from .. import hostfile as hostfiles
from ..display import Table
from ..rank import blas, session
from ..results import INIT_KEY, Identity
from . import ClusterError, launch
from .hosts import controller_ip, on_hosts

if TYPE_CHECKING:
    from ..spec import ClusterSpec

# what every local engine gets on top of the notebook's environment
ENGINE_ENV = {"MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
# no nanny process per local engine: the group watches the engine processes itself and
# signals them directly, and half the processes start (and restart) a set markedly faster.
# Engines on other hosts keep theirs: it tells the controller at once that its engine died,
# and it is how signals reach them
# Every engine imports MLX as it starts, before it serves requests: a warm spare set then forms
# a group without paying for the import
ENGINE_ARGS = ["--IPEngine.enable_nanny=False", "--IPEngine.startup_command=from mlx_nb.rank import session; session.warm()"]
# the controller admits a new engine at its next heartbeat: every 0.5 s rather than 3 s makes
# a (re)start seconds faster; 60 misses keep its patience with a busy engine at 30 s. No task
# database: the hub would keep every pushed and pulled buffer (up to 1 GB) for nobody
CONTROLLER_ARGS = [
    "--HeartMonitor.period=500", "--HeartMonitor.max_heartmonitor_misses=60", "--IPController.db_class=NoDB",
]


@dataclass
class RankInfo:
    rank: int
    engine_id: int
    host: str = ""
    pid: int = 0
    device: str = ""
    mlx: str = ""
    blas: dict = field(default_factory=dict)  # rank.blas.BlasInfo.to_dict(): the BLAS its MLX runs
    active_memory: int = 0
    peak_memory: int = 0
    state: str = "starting"


class RankGroup:
    """The processes behind a cluster: start, bind, watch, signal and end them."""

    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        self.ranks: list[RankInfo] = []
        self.client: Optional[ipp.Client] = None
        self.addresses: list[str] = []  # each rank's ring address(es), for error messages
        # this cluster's files on every host (removed at stop): the engines' IPython profile on
        # other hosts, and each engine set's MLX_HOSTFILE / MLX_IBV_DEVICES files under <tag>/
        self.dir = f"/tmp/mlx_nb-{uuid.uuid4().hex[:12]}"
        self._ipp: Optional[ipp.Cluster] = None
        self._engines: dict[int, Identity] = {}  # engine id -> identify() of every engine seen
        self._generation = 0
        self._tag: Optional[str] = None  # engine set tag of the ranks in use
        self._spare: Optional[str] = None  # tag of the warm spare set
        self._cells: Optional[tuple[list[int], ipp.DirectView]] = None

    @property
    def running(self) -> bool:
        return self._ipp is not None

    @property
    def controller_ip(self) -> Optional[str]:
        """The address the controller listens on (127.0.0.1 unless ranks run on other hosts)."""
        return self._ipp.controller_ip if self._ipp is not None else None

    @property
    def formed(self) -> bool:
        return len(self.ranks) == self.spec.n

    # ------------------------------------------------------------ controller
    def start(self) -> None:
        """The controller, then the ranks (formed and checked); nothing is left on failure."""
        # killed engines cannot remove their files: this process does (on stop, or at exit)
        atexit.register(shutil.rmtree, self.dir, True)
        ip = controller_ip(self.spec.hostfile, self.spec.ssh_cmd)
        # off loopback, whoever reaches the controller could read every rank's output: encrypt
        curve = [] if hostfiles.is_local(ip) else ["--IPController.enable_curve=True"]
        self._ipp = ipp.Cluster(
            n=0, controller_ip=ip, log_level=40, shutdown_atexit=True, controller_args=CONTROLLER_ARGS + curve,
        )
        try:
            self._ipp.start_controller_sync()
            self.client = self._ipp.connect_client_sync()
            self.form()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Every engine and the controller; returns once their processes are gone."""
        if self._ipp is None:
            return
        if self.client is not None:
            self.client.close()
            self.client = None
        self.kill()
        if self._spare:
            self._tag, self._spare = self._spare, None
            self.kill()
        procs = launch.process_tree(self._ipp.controller.pid) if self._ipp.controller is not None else []
        try:
            self._stop_sets(list(self._ipp.engines))
            self._ipp.stop_cluster_sync()
        finally:
            self._ipp = None
            self.ranks, self._tag, self._spare, self._engines, self._cells = [], None, None, {}, None
            # the controller's schedulers exit a moment after it
            for p in launch.wait_exited(procs, timeout=5):
                p.kill()
            self.on_hosts(f"rm -rf {self.dir}")
            shutil.rmtree(self.dir, ignore_errors=True)

    def on_hosts(self, cmd: str) -> dict[str, tuple[int, str]]:
        """Run ``cmd`` on every other host of the cluster at once."""
        return on_hosts([self.spec.host(r) for r in sorted(self.spec.remote)], cmd, self.spec.ssh_cmd)

    def processes(self) -> list[psutil.Process]:
        """Every process of the cluster on this machine: controller, engines (spares too), nannies."""
        if self._ipp is None:
            return []
        pids = [
            el.pid for es in self._ipp.engines.values() for el in launch.set_launchers(es) if not launch.is_ssh(el)
        ]
        if self._ipp.controller is not None:
            pids.append(self._ipp.controller.pid)
        return [p for pid in pids for p in launch.process_tree(pid)]

    # ------------------------------------------------------------ engine sets
    def _spawn(self) -> str:
        """Start one engine process per rank (not yet a group); return the set's tag."""
        self._generation += 1
        tag, spec = f"g{self._generation}", self.spec
        # BLAS threads per rank are the host's cores over the ranks on it (rank.blas)
        on_host = Counter(spec.host(h.rank) for h in spec.hostfile.hosts)
        if spec.backend == "mpi":
            env = {**ENGINE_ENV, **spec.env, "MLX_NB_SET": tag, blas.RANKS_ENV: str(spec.n)}
            self._start_set(f"{tag}-mpi", "mpi", launch.mpi_engine_launcher_kwargs(spec.n, spec.python, env))
            return tag
        # the ports of the ring are in MLX_HOSTFILE, written at init; jaccl's and nccl's are in env
        ports = None if spec.backend == "ring" else spec.ports
        for rank in hostfiles.rank_launch(spec.hostfile, spec.backend, env=spec.env, ports=ports):
            env = {**ENGINE_ENV, **rank.env, "MLX_NB_SET": tag, blas.RANKS_ENV: str(on_host[spec.host(rank.rank)])}
            if rank.rank in spec.remote:
                ssh = [*spec.ssh_cmd, *launch.SSH_OPTIONS]
                kwargs = launch.ssh_engine_launcher_kwargs(rank.host, spec.python, ssh, env)
                kwargs["remote_profile_dir"] = self.dir
                self._start_set(f"{tag}-rank{rank.rank}", "ssh", kwargs, rank.host)
            else:
                kwargs = {"n": 1, "environment": env, "engine_args": ENGINE_ARGS}
                if spec.python != sys.executable:
                    kwargs["engine_cmd"] = [spec.python, "-m", "ipyparallel.engine"]
                self._start_set(f"{tag}-rank{rank.rank}", "local", kwargs)
        return tag

    def _start_set(self, set_id: str, kind: str, kwargs: dict, host: str = "this machine") -> None:
        self._ipp.engine_launcher_class = kind
        try:
            self._ipp.start_engines_sync(engine_set_id=set_id, **kwargs)
        except Exception as e:
            # a set that never started cannot be stopped: forget it, or stop_cluster fails on it
            self._ipp.engines.pop(set_id, None)
            raise ClusterError(
                f"could not start the engine of {set_id.split('-', 1)[1]} on {host}: "
                f"{type(e).__name__}: {str(e).strip()[-600:]}"
            ) from None

    def _launchers(self, rank: int, tag: Optional[str] = None) -> list:
        if self._ipp is None:
            return []
        tag = tag or self._tag
        set_id = f"{tag}-mpi" if self.spec.backend == "mpi" else f"{tag}-rank{rank}"
        return launch.set_launchers(self._ipp.engines.get(set_id))

    def _stop_sets(self, set_ids: list[str]) -> None:
        # one at a time: a set whose host is gone fails to stop, and must not stop the others
        for set_id in set_ids:
            try:
                self._ipp.stop_engines_sync(set_id)
            except Exception:
                self._ipp.engines.pop(set_id, None)

    # ------------------------------------------------------------ forming the group
    def form(self) -> None:
        """Bind a set of engines into a group: the warm spare set if there is one."""
        tag = self._spare or self._spawn()
        self._spare = None
        self._tag, self.ranks = tag, []
        found = self._wait_for_set(tag)
        self.ranks = [RankInfo(r, found[r].engine_id, found[r].host, found[r].pid) for r in range(self.spec.n)]
        self._check_versions(found)
        self._init_group(self.spec.ports or hostfiles.free_ports(self.spec.addresses_needed))
        if self.spec.spares:
            # the next restart takes these: new processes are the slow part of recovery
            self._spare = self._spawn()

    def _wait_for_set(self, tag: str) -> dict[int, Any]:
        deadline = time.monotonic() + self.spec.start_timeout
        while True:
            new = [eid for eid in self.client.ids if eid not in self._engines]
            if new:
                infos = self.client[new].apply_async(session.identify).get(timeout=self.spec.start_timeout)
                for eid, info in zip(new, infos):
                    info.engine_id = eid
                    self._engines[eid] = info
            found = {e.rank: e for eid, e in self._engines.items() if e.set == tag and eid in self.client.ids}
            if len(found) == self.spec.n:
                return found
            dead = self.dead_ranks(tag)
            if dead:
                raise ClusterError("while starting: " + self._exited(tag, dead))
            if time.monotonic() > deadline:
                missing = [r for r in range(self.spec.n) if r not in found]
                raise ClusterError(
                    f"rank(s) {diagnose.ranges(missing)} did not come up within {self.spec.start_timeout:.0f} s: "
                    "the engine process runs but never registered with the controller "
                    f"(stopped, or stuck starting up); engine logs are in {self._ipp.profile_dir}/log"
                )
            time.sleep(0.05)

    def _check_versions(self, found: dict[int, Identity]) -> None:
        """Refuse ranks whose mlx or mlx_nb differ from each other or from the notebook's."""
        from mlx_nb import __version__

        rows = [("notebook", socket.gethostname(), session.mlx_version() or "-", __version__)]
        rows += [(f"rank {r}", e.host, e.mlx or "-", e.mlx_nb) for r, e in sorted(found.items())]
        if len({row[2:] for row in rows}) > 1:
            raise ClusterError(
                "the ranks run different MLX or mlx_nb versions: install the same ones on every "
                "host (pip install mlx==... mlx_nb==...)\n" + repr(Table(["", "host", "mlx", "mlx_nb"], rows))
            )

    def _rank_files(self, ports: list[int]) -> list[dict[str, str]]:
        """What each rank's init writes to files (MLX_HOSTFILE...), and the ranks' addresses."""
        spec = self.spec
        if spec.backend == "mpi":
            self.addresses = ["mpi"] * spec.n
            return [{} for _ in range(spec.n)]
        launches = hostfiles.rank_launch(
            spec.hostfile, spec.backend, env=spec.env, ports=ports if spec.backend == "ring" else spec.ports
        )
        if spec.backend == "ring" and spec.n > 1:
            self.addresses = [",".join(a) for a in json.loads(launches[0].files["MLX_HOSTFILE"])]
        else:
            self.addresses = [launches[0].env.get("MLX_JACCL_COORDINATOR", "") for _ in launches]
        return [launch_.files for launch_ in launches]

    def _init_group(self, ports: list[int]) -> None:
        """Form the group on ``self.ranks``: mx.distributed.init is collective, so start it
        on every rank, then wait for all; the first failure, or a rank that never joins, is named."""
        spec, files = self.spec, self._rank_files(ports)
        pending = {
            r.rank: self.client[r.engine_id].apply_async(
                session.init_group, spec.backend, spec.n, files[r.rank], f"{self.dir}/{self._tag}"
            )
            for r in self.ranks
        }
        deadline = time.monotonic() + spec.init_timeout
        while pending:
            for rank, ar in list(pending.items()):
                if ar.ready() and self._joined(rank, ar):
                    del pending[rank]
            dead = [r for r in self.dead_ranks() if r in pending]
            if dead:
                raise ClusterError("during mx.distributed.init: " + self._exited(self._tag, dead))
            if pending and time.monotonic() > deadline:
                # how far each rank got: None, "started" (running init_group), "joining" (in the call)
                steps = {r: ar.metadata["data"].get(INIT_KEY) for r, ar in pending.items()}
                raise ClusterError(diagnose.init_stuck(spec.backend, spec.init_timeout, steps, self.addresses))
            time.sleep(0.02)
        values = self.cells_view().apply_async(session.check_group).get(timeout=spec.init_timeout)
        want = spec.n * (spec.n + 1) / 2
        if any(v != want for v in values):
            raise ClusterError(f"the group check failed: all_sum gave {values} (expected {want} on every rank)")

    def _joined(self, rank: int, ar: Any) -> bool:
        """A finished init: the rank joined (True), or its engine died (False: named by the caller)."""
        try:
            info = ar.get(timeout=0)
        except ipp.error.EngineError:
            return False
        except ipp.RemoteError as e:
            raise ClusterError(f"mx.distributed.init failed on rank {rank}: {e.ename}: {e.evalue}") from None
        if info.error is not None:
            raise ClusterError(diagnose.init_failed(rank, info.error, self.addresses[rank], bool(self.spec.ports)))
        r = self.ranks[rank]
        r.device, r.mlx, r.blas, r.state = info.device, info.mlx or "", info.blas, "idle"
        return True

    def _exited(self, tag: str, dead: list[int]) -> str:
        out = []
        for rank in dead:
            engine_set = self._ipp.engines.get(f"{tag}-mpi" if self.spec.backend == "mpi" else f"{tag}-rank{rank}")
            try:
                text = launch.engine_output(engine_set.get_output() if engine_set else "")
            except Exception:
                text = ""
            out.append(diagnose.engine_exited(rank, self.spec.host(rank), text))
        return "\n".join(out)

    # ------------------------------------------------------------ watching, signalling, ending
    def dead_ranks(self, tag: Optional[str] = None) -> list[int]:
        """Ranks whose engine process has exited, or that the controller has dropped."""
        # the launchers' own state is updated on an event loop that only runs during
        # ipyparallel's *_sync calls, so look at the processes themselves (here), or at
        # the ssh launcher's thread waiting on the remote process
        in_use = (tag or self._tag) == self._tag and self.formed
        ids = set(self.client.ids) if in_use and self.client is not None else set()
        dead = []
        for rank in range(self.spec.n):
            launchers = self._launchers(rank, tag)
            if not launchers or not all(map(launch.launcher_alive, launchers)):
                dead.append(rank)
            elif in_use and self.ranks[rank].engine_id not in ids:
                dead.append(rank)
            elif in_use and self.spec.backend == "mpi" and not launch.alive(self.ranks[rank].pid):
                dead.append(rank)
        return dead

    def kill(self) -> None:
        """Kill the ranks' processes (and any they started) and forget their engine sets."""
        # a rank blocked in a native collective ignores SIGTERM: kill outright
        if self._ipp is None or self._tag is None:
            return
        procs: dict[int, psutil.Process] = {}
        for rank in range(self.spec.n):
            for el in self._launchers(rank):
                if launch.is_ssh(el):
                    launch.quietly(el.signal, signals.SIGKILL)  # its nanny tells the controller
                else:
                    procs.update((p.pid, p) for p in launch.process_tree(el.pid))
        for p in procs.values():
            launch.quietly(p.kill)
        launch.wait_exited(list(procs.values()), timeout=5)
        sets = [k for k in self._ipp.engines if k.startswith(f"{self._tag}-")]
        for set_id in sets:
            # killed already: stopping would signal them again over ssh, in vain and loudly
            if any(map(launch.is_ssh, launch.set_launchers(self._ipp.engines[set_id]))):
                self._ipp.engines.pop(set_id)
        self._stop_sets([k for k in sets if k in self._ipp.engines])
        # their hostfiles (here; other hosts' go with the whole directory at stop)
        shutil.rmtree(f"{self.dir}/{self._tag}", ignore_errors=True)
        self._tag, self.ranks, self._cells = None, [], None

    def signal(self, sig: int, ranks: Optional[Sequence[int]] = None) -> None:
        """Send a signal to the engine processes of ``ranks`` (default all)."""
        for rank in ranks if ranks is not None else range(self.spec.n):
            if self.spec.backend == "mpi":  # the launcher is mpirun, whose signals end the whole job
                if rank < len(self.ranks):
                    launch.quietly(lambda pid=self.ranks[rank].pid: psutil.Process(pid).send_signal(sig))
                continue
            for el in self._launchers(rank):
                launch.quietly(el.signal, sig)  # it has exited meanwhile: the caller finds it dead

    def send_control(self, msg_type: str, content: Optional[dict] = None, ranks: Optional[Sequence[int]] = None) -> None:
        """A message on the ranks' control channel, which their kernels serve while a cell runs."""
        for r in ranks if ranks is not None else range(len(self.ranks)):
            ident = self.client._engines[self.ranks[r].engine_id]
            self.client.session.send(
                self.client._control_socket, msg_type, content=content or {}, ident=[ident.encode()]
            )

    # ------------------------------------------------------------ views
    @property
    def view(self) -> ipp.DirectView:
        """A DirectView on every rank, in rank order."""
        return self.client[[r.engine_id for r in self.ranks]]

    def cells_view(self, ranks: Optional[Sequence[int]] = None) -> ipp.DirectView:
        """The view jobs go through: one per set of ranks (a new DirectView costs ~0.1 ms),
        private so that nobody retargets it."""
        ids = [self.ranks[r].engine_id for r in (ranks if ranks is not None else range(len(self.ranks)))]
        if self._cells is None or self._cells[0] != ids or self._cells[1].client is not self.client:
            self._cells = (ids, self.client[ids])
        view = self._cells[1]
        view.history.clear()  # it would grow by a message id per rank per cell
        return view

    def busy_ranks(self) -> tuple[set[int], set[int]]:
        """(ranks the hub has work of others queued for, ranks the hub cannot account for)."""
        queues = self.client.queue_status(verbose=True)
        ours = set(self.client.history)
        busy, lost = set(), set()
        for r in self.ranks:
            q = queues.get(r.engine_id, {})
            if not isinstance(q, dict):
                lost.add(r.rank)
            # the hub's queue lags replies the notebook already has: of our own messages
            # only those still without a reply count; another client's work counts
            elif [m for m in q.get("queue", []) if m in self.client.outstanding or m not in ours]:
                busy.add(r.rank)
        return busy, lost
