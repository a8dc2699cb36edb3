"""RankGroup: an ipyparallel controller, one engine set per rank, bound into one MLX group.

The group keeps a warm spare set of engines: new processes are the slow part of a restart,
so the next restart binds the spares (seconds) while a new spare set starts behind it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import ipyparallel as ipp
import psutil
from ipyparallel.serialize.canning import use_cloudpickle

from .. import hostfile as hostfiles
from ..rank import blas, session
from ..results import Identity
from . import ClusterError, kept, launch, tasks, watchdog
from .form import Forming, RankInfo, RankState
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
ENGINE_ARGS = [
    "--IPEngine.enable_nanny=False",
    "--IPEngine.startup_command=from mlx_nb.rank import session; session.warm()",
]
# the controller admits a new engine at its next heartbeat: every 0.5 s rather than 3 s makes
# a (re)start seconds faster; 60 misses keep its patience with a busy engine at 30 s. No task
# database: the hub would keep every pushed and pulled buffer (up to 1 GB) for nobody
CONTROLLER_ARGS = [
    "--HeartMonitor.period=500",
    "--HeartMonitor.max_heartmonitor_misses=60",
    "--IPController.db_class=NoDB",
]


class RankGroup(Forming):
    """The processes behind a cluster: start, bind, watch, signal and end them."""

    def __init__(self, spec: ClusterSpec, name: Optional[str] = None, keep: bool = False, idle: Optional[float] = None):
        self.spec, self.name, self.keep, self.idle = spec, name, keep, idle
        self.created = time.time()
        self.holder: dict = kept.me()  # who may run jobs on a kept cluster
        self.setup_state = ""  # the setup cells, for a kernel that attaches (kept.encode)
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
        self.killed = False  # the last kill came to SIGKILL on a backend where that does harm
        self._watchdog = None
        self._controller_tree: list[psutil.Process] = []

    @classmethod
    def attach(cls, name: str, take: bool = False) -> RankGroup:
        """The group of the kept cluster ``name``, connected, its ranks as they are.

        Refused (ClusterError, one line) while another live kernel holds it, unless ``take``.
        """
        ipc = kept.load(name)
        state = ipc.mlx_nb
        holder = state.get("holder")
        if holder and kept.holder_alive(holder) and holder.get("pid") != os.getpid() and not take:
            since = time.strftime("%H:%M", time.localtime(holder.get("since", 0)))
            raise ClusterError(
                f"cluster {name!r} is attached to another kernel (pid {holder['pid']} on {holder['host']}, "
                f"since {since}): %mlx_cluster attach {name} --take to take it over"
            )
        group = cls(kept.spec_from_state(state["spec"]), name=name, keep=True, idle=state.get("idle"))
        group._ipp, group.dir, group.created = ipc, state["dir"], state.get("created", time.time())
        group._tag, group._spare, group._generation = state["tag"], state["spare"], state["generation"]
        group.ranks = [RankInfo(**r) for r in state["ranks"]]
        group.setup_state = state.get("setup", "")
        try:
            group.client = ipc.connect_client_sync()
            group.client.wait_for_engines(len(group.ranks), timeout=10)
        except Exception as e:
            raise ClusterError(f"cluster {name!r}: its controller does not answer ({type(e).__name__}: {e})") from None
        group.identify_engines()
        group.holder = kept.me()
        group.save_state()
        return group

    @property
    def running(self) -> bool:
        return self._ipp is not None

    @property
    def controller_ip(self) -> Optional[str]:
        """The address the controller listens on (127.0.0.1 unless ranks run on other hosts)."""
        return self._ipp.controller_ip if self._ipp is not None else None

    @property
    def controller_started(self) -> Optional[float]:
        """When the controller's process started: with its pid, what tells it from a later process."""
        try:
            return psutil.Process(self._ipp.controller.pid).create_time()
        except (AttributeError, psutil.Error):
            return None

    @property
    def client_file(self) -> Optional[str]:
        """The controller's connection file for clients (its keys when encrypted): user-readable only."""
        if self._ipp is None:
            return None
        return os.path.join(self._ipp.profile_dir, "security", f"ipcontroller-{self._ipp.cluster_id}-client.json")

    def spares_ready(self) -> bool:
        """The warm spare set has registered (a restart now takes seconds)."""
        return self._spare is None or len(self.client.ids) >= 2 * self.spec.n

    @property
    def formed(self) -> bool:
        return len(self.ranks) == self.spec.n

    # ------------------------------------------------------------ controller
    def start(self) -> None:
        """The controller, then the ranks (formed and checked); nothing is left on failure."""
        # killed engines cannot remove their files: this process does (on stop, or at exit)
        if not self.keep:
            atexit.register(shutil.rmtree, self.dir, True)
        # values of classes, functions and lambdas defined in the notebook travel too (the
        # engines switch at start: rank.session.warm)
        use_cloudpickle()
        ip = controller_ip(self.spec.hostfile, self.spec.ssh_cmd)
        # off loopback, whoever reaches the controller could read every rank's output: encrypt
        curve = [] if hostfiles.is_local(ip) else ["--IPController.enable_curve=True"]
        named = {"cluster_id": kept.PREFIX + self.name} if self.name else {}
        if self.name:
            kept.claim(self.name)  # refused while it runs; a dead one's files are removed
        self._ipp = kept.IppCluster(
            n=0,
            controller_ip=ip,
            log_level=40,
            shutdown_atexit=not self.keep,
            controller_args=CONTROLLER_ARGS + curve,
            **named,
        )
        try:
            self._ipp.start_controller_sync()
            self._watch()
            self.client = self._ipp.connect_client_sync()
            # its schedulers, by now: a controller that dies leaves them orphaned
            self._controller_tree = launch.process_tree(self._ipp.controller.pid)
            self.save_state()
            self.form()
            self.touch()  # ready: a kept cluster's idle time counts from here
        except BaseException:
            self.stop()
            raise

    # ------------------------------------------------------------ the watchdog
    @property
    def state_file(self) -> str:
        return os.path.join(self.dir, "watch.json")

    def _watch(self) -> None:
        """Start the watchdog that ends the cluster if this process dies (engines.watchdog)."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.save_state()
        self._watchdog = watchdog.start(self.state_file)

    def save_state(self) -> None:
        """What the watchdog must end (every process of the cluster), and a kept cluster's part
        of its cluster file: written at every change."""
        watchdog.write_state(self)
        kept.publish(self)

    def check_holder(self) -> None:
        """A kept cluster taken over by another kernel runs no more jobs from this one."""
        kept.check_holder(self)

    def touch(self) -> None:
        """The cluster was used now (a kept cluster's idle limit counts from here)."""
        try:
            os.utime(self.state_file + ".used")
        except FileNotFoundError:
            open(self.state_file + ".used", "w").close()
        except OSError:
            pass

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
        procs += [p for p in self._controller_tree if p.pid not in {q.pid for q in procs}]
        if not self.controller_alive():  # its orphaned schedulers wait for nothing
            for p in procs:
                launch.quietly(p.kill)
        try:
            self._stop_sets(list(self._ipp.engines))
            self._ipp.stop_cluster_sync()
        finally:
            self._ipp = None
            self.ranks, self._tag, self._spare, self._engines, self._cells = [], None, None, {}, None
            self._controller_tree = []
            # the controller's schedulers exit a moment after it
            for p in launch.wait_exited(procs, timeout=5):
                p.kill()
            self.on_hosts(f"rm -rf {self.dir}")
            shutil.rmtree(self.dir, ignore_errors=True)  # the state file with it: the watchdog exits
            if self._watchdog is not None:
                launch.wait_exited([psutil.Process(self._watchdog.pid)] if self._watchdog.poll() is None else [], 5)
                self._watchdog.poll()
                self._watchdog = None
        self._controller_tree: list[psutil.Process] = []

    def on_hosts(self, cmd: str) -> dict[str, tuple[int, str]]:
        """Run ``cmd`` on every other host of the cluster at once."""
        return on_hosts([self.spec.host(r) for r in sorted(self.spec.remote)], cmd, self.spec.ssh_cmd)

    def processes(self) -> list[psutil.Process]:
        """Every process of the cluster on this machine: controller, engines (spares too), watchdog."""
        if self._ipp is None:
            return []
        pids = [el.pid for es in self._ipp.engines.values() for el in launch.set_launchers(es) if not launch.is_ssh(el)]
        if self._ipp.controller is not None:
            pids.append(self._ipp.controller.pid)
        if self._watchdog is not None and self._watchdog.poll() is None:
            pids.append(self._watchdog.pid)
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
            self.save_state()
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
        self.save_state()
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
        """Kill the ranks' processes (and any they started) and forget their engine sets.

        A rank blocked in a native collective ignores SIGTERM: the ring and MPI are killed
        outright. On JACCL a SIGKILL can leave RDMA unusable until the Mac restarts, so there it
        is SIGINT, then SIGTERM, then SIGKILL, with waits between; ``killed`` says if it came to that.
        """
        self.killed = False
        if self._ipp is None or self._tag is None:
            return
        procs: dict[int, psutil.Process] = {}
        remote = []
        for rank in range(self.spec.n):
            for el in self._launchers(rank):
                if launch.is_ssh(el):
                    remote.append(el)  # its nanny tells the controller
                else:
                    procs.update((p.pid, p) for p in launch.process_tree(el.pid))
        gentle = self.spec.backend in ("jaccl", "jaccl-ring")
        self.killed = launch.end(list(procs.values()), remote, gentle)
        sets = [k for k in self._ipp.engines if k.startswith(f"{self._tag}-")]
        for set_id in sets:
            # killed already: stopping would signal them again over ssh, in vain and loudly
            if any(map(launch.is_ssh, launch.set_launchers(self._ipp.engines[set_id]))):
                self._ipp.engines.pop(set_id)
        self._stop_sets([k for k in sets if k in self._ipp.engines])
        # their hostfiles (here; other hosts' go with the whole directory at stop)
        shutil.rmtree(f"{self.dir}/{self._tag}", ignore_errors=True)
        self._tag, self.ranks, self._cells = None, [], None
        self.save_state()

    def signal(self, sig: int, ranks: Optional[Sequence[int]] = None) -> None:
        """Send a signal to the engine processes of ``ranks`` (default all)."""
        for rank in ranks if ranks is not None else range(self.spec.n):
            if self.spec.backend == "mpi":  # the launcher is mpirun, whose signals end the whole job
                if rank < len(self.ranks):
                    launch.quietly(lambda pid=self.ranks[rank].pid: psutil.Process(pid).send_signal(sig))
                continue
            for el in self._launchers(rank):
                launch.quietly(el.signal, sig)  # it has exited meanwhile: the caller finds it dead

    def send_control(
        self, msg_type: str, content: Optional[dict] = None, ranks: Optional[Sequence[int]] = None
    ) -> None:
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

    def controller_alive(self) -> bool:
        """Whether the controller's process still runs (its launcher's wait thread says)."""
        c = self._ipp.controller if self._ipp is not None else None
        return c is not None and launch.launcher_alive(c)

    def states(self, busy: bool) -> list[RankInfo]:
        """The ranks with their state (idle / busy / dead / lost), and their memory when idle;
        within seconds whatever the hub does."""
        dead = set(self.dead_ranks())
        if not self.controller_alive():
            for r in self.ranks:
                r.state = RankState.UNREACHABLE
            return self.ranks
        try:
            queued, lost = self.busy_ranks()
        except ClusterError:
            queued, lost = set(), {r.rank for r in self.ranks}
        for r in self.ranks:
            r.state = (
                RankState.DEAD
                if r.rank in dead
                else RankState.LOST
                if r.rank in lost
                else RankState.BUSY
                if busy or r.rank in queued
                else RankState.IDLE
            )
        if self.ranks and all(r.state is RankState.IDLE for r in self.ranks):
            try:
                ar = self.view.apply_async(session.describe)
                for r, info in zip(self.ranks, ar.get(timeout=5)):
                    r.active_memory, r.peak_memory = info.active_memory, info.peak_memory
                    r.cache_memory = info.cache_memory
                    r.memory_budget, r.memory_given = info.memory_budget, info.memory_given
                tasks.forget_messages(self.client, ar.msg_ids)
            except Exception:  # memory is a nicety: the states stand without it
                pass
        return self.ranks

    def busy_ranks(self, timeout: float = 3.0) -> tuple[set[int], set[int]]:
        """(ranks the hub has work of others queued for, ranks the hub cannot account for).

        Within ``timeout`` whatever state the hub is in: ClusterError if it does not answer.
        """
        from ipyparallel import util

        query = self.client._send(
            self.client._query_stream, "queue_request", content={"targets": None, "verbose": True}
        )
        if not query.wait(timeout):
            raise ClusterError(f"the controller did not answer within {timeout:g} s")
        queues = util.int_keys({k: v for k, v in query.result()["content"].items() if k != "status"})
        ours = set(self.client.history) | set(tasks.recently_forgotten(self.client))
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
