"""RankGroup: an ipyparallel controller, one engine set per rank, bound into one MLX group.

The group keeps a warm spare set of engines: new processes are the slow part of a restart,
so the next restart binds the spares (seconds) while a new spare set starts behind it. What
it knows of its engines is one ``EngineState`` (engines.state), which it changes as they change
and writes where the watchdog and a kernel that attaches read it (``save_state``).
"""

from __future__ import annotations

import atexit
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any, Optional

import ipyparallel as ipp
import psutil
from ipyparallel.serialize.canning import use_cloudpickle

from .. import hostfile as hostfiles
from ..rank import session
from ..results import Identity
from . import ClusterError, kept, procs, tasks, watchdog
from .form import form_group, identify
from .hosts import controller_ip, on_hosts
from .sets import EngineSets
from .state import EngineState, Holder, RankInfo, RankState

# the controller admits a new engine at its next heartbeat: every 0.5 s rather than 3 s makes
# a (re)start seconds faster; 60 misses keep its patience with a busy engine at 30 s. No task
# database: the hub would keep every pushed and pulled buffer (up to 1 GB) for nobody
CONTROLLER_ARGS = [
    "--HeartMonitor.period=500",
    "--HeartMonitor.max_heartmonitor_misses=60",
    "--IPController.db_class=NoDB",
]


class RankGroup:
    """The processes behind a cluster: start, bind, watch, signal and end them."""

    def __init__(self, state: EngineState, ipc: Optional[kept.IppCluster] = None):
        self.state, self.spec = state, state.spec
        self.client: Optional[ipp.Client] = None
        self.addresses: list[str] = []  # each rank's ring address(es), for error messages
        self.killed = False  # the last kill came to SIGKILL on a backend where that does harm
        self._ipc = ipc
        self._sets = EngineSets(ipc, state.spec) if ipc is not None else None
        self._known: dict[int, Identity] = {}  # engine id -> identify() of every engine seen
        self._watchdog = None
        self._controller_tree: list[psutil.Process] = []
        self._holding: Optional[kept.Holding] = None
        self._messages: Optional[tasks.Messages] = None  # what we sent through the client

    @classmethod
    def attach(cls, name: str, take: bool = False) -> RankGroup:
        """The group of the kept cluster ``name``, connected, its ranks as they are.

        Refused (ClusterError, one line) while another live kernel holds it, unless ``take``.
        """
        ipc, state = kept.load(name)
        kept.refuse_held(name, state.holder, take)
        group = cls(state, ipc)
        try:
            group._connect()
            group.client.wait_for_engines(len(state.ranks), timeout=10)
        except Exception as e:
            raise ClusterError(f"cluster {name!r}: its controller does not answer ({type(e).__name__}: {e})") from None
        identify(group.client, group._known)
        state.holder = Holder.me()
        group._holding = kept.Holding(ipc.cluster_file, state.holder)
        group.save_state()
        return group

    @property
    def ranks(self) -> list[RankInfo]:
        return self.state.ranks

    @property
    def running(self) -> bool:
        return self._ipc is not None

    @property
    def formed(self) -> bool:
        return len(self.ranks) == self.spec.n

    @property
    def controller_ip(self) -> Optional[str]:
        """The address the controller listens on (127.0.0.1 unless ranks run on other hosts)."""
        return self._ipc.controller_ip if self._ipc is not None else None

    @property
    def controller_pid(self) -> Optional[int]:
        return self._ipc.controller_pid if self._ipc is not None else None

    @property
    def client_file(self) -> Optional[str]:
        """The controller's connection file for clients (its keys when encrypted): user-readable only."""
        return self._ipc.client_file if self._ipc is not None else None

    def spares_ready(self) -> bool:
        """The warm spare set has registered (a restart now takes seconds)."""
        return self.state.spare is None or len(self.client.ids) >= 2 * self.spec.n

    # ------------------------------------------------------------ controller
    def start(self) -> None:
        """The controller, then the ranks (formed and checked); nothing is left on failure."""
        state = self.state
        # killed engines cannot remove their files: this process does (on stop, or at exit)
        if not state.keep:
            atexit.register(shutil.rmtree, state.folder, True)
        # values of classes, functions and lambdas defined in the notebook travel too (the
        # engines switch at start: rank.session.warm)
        use_cloudpickle()
        ip = controller_ip(self.spec.hostfile, self.spec.ssh_cmd)
        # off loopback, whoever reaches the controller could read every rank's output: encrypt
        curve = [] if hostfiles.is_local(ip) else ["--IPController.enable_curve=True"]
        named = {"cluster_id": kept.PREFIX + state.name} if state.name else {}
        if state.name:
            kept.claim(state.name)  # refused while it runs; a dead one's files are removed
        self._ipc = kept.IppCluster(
            n=0,
            controller_ip=ip,
            log_level=40,
            shutdown_atexit=not state.keep,
            controller_args=CONTROLLER_ARGS + curve,
            **named,
        )
        self._sets = EngineSets(self._ipc, self.spec)
        try:
            self._ipc.start_controller_sync()
            state.controller_started = procs.started(self.controller_pid)
            # the watchdog ends the cluster if this process dies (engines.watchdog)
            os.makedirs(state.folder, mode=0o700, exist_ok=True)
            self.save_state()
            self._watchdog = watchdog.start(state.folder)
            self._connect()
            # its schedulers, by now: a controller that dies leaves them orphaned
            self._controller_tree = procs.process_tree(self.controller_pid)
            if state.keep:
                self._holding = kept.Holding(self._ipc.cluster_file, state.holder)
            self.save_state()
            self.form()
            self.touch()  # ready: a kept cluster's idle time counts from here
        except BaseException:
            self.stop()
            raise

    def _connect(self) -> None:
        self.client = self._ipc.connect_client_sync()
        self._messages = tasks.Messages(self.client)

    def save_state(self) -> None:
        """What the watchdog must end (every process of the cluster), and a kept cluster's part
        of its cluster file: written at every change."""
        if self._ipc is None:
            return
        if os.path.isdir(self.state.folder):
            local, remote = self._sets.processes()
            local += [p.pid for p in self._controller_tree]
            watchdog.write_state(self.state, local, remote, kept.files(self._ipc.cluster_file))
        kept.publish(self._ipc, self.state)

    def check_holder(self) -> None:
        """A kept cluster taken over by another kernel runs no more jobs from this one."""
        if self._holding is not None:
            self._holding.check(self.state.name)

    def touch(self) -> None:
        """The cluster was used now (a kept cluster's idle limit counts from here)."""
        watchdog.touch(self.state.folder)

    def stop(self) -> None:
        """Every engine and the controller; returns once their processes are gone."""
        if self._ipc is None:
            return
        state = self.state
        if self.client is not None:
            self.client.close()
            self.client = self._messages = None
        self.kill()
        if state.spare:
            state.tag, state.spare = state.spare, None
            self.kill()
        tree = procs.process_tree(self.controller_pid) if self.controller_pid else []
        tree += [p for p in self._controller_tree if p.pid not in {q.pid for q in tree}]
        if not self.controller_alive():  # its orphaned schedulers wait for nothing
            for p in tree:
                procs.quietly(p.kill)
        try:
            self._sets.stop()
            self._ipc.stop_cluster_sync()
        finally:
            self._ipc = self._sets = None
            state.ranks, state.tag, state.spare = [], None, None
            self._known, self._controller_tree = {}, []
            # the controller's schedulers exit a moment after it
            for p in procs.wait_exited(tree, timeout=5):
                p.kill()
            self.on_hosts(f"rm -rf {state.folder}")
            shutil.rmtree(state.folder, ignore_errors=True)  # the state file with it: the watchdog exits
            if self._watchdog is not None:
                procs.wait_exited([psutil.Process(self._watchdog.pid)] if self._watchdog.poll() is None else [], 5)
                self._watchdog.poll()
                self._watchdog = None

    def on_hosts(self, cmd: str) -> dict[str, tuple[int, str]]:
        """Run ``cmd`` on every other host of the cluster at once."""
        return on_hosts([self.spec.host(r) for r in sorted(self.spec.remote)], cmd, self.spec.ssh_cmd)

    def processes(self) -> list[psutil.Process]:
        """Every process of the cluster on this machine: controller, engines (spares too), watchdog."""
        if self._ipc is None:
            return []
        pids = self._sets.processes()[0]
        if self.controller_pid:
            pids.append(self.controller_pid)
        if self._watchdog is not None and self._watchdog.poll() is None:
            pids.append(self._watchdog.pid)
        return [p for pid in pids for p in procs.process_tree(pid)]

    # ------------------------------------------------------------ the ranks
    def form(self) -> None:
        """Bind a set of engines into a group: the warm spare set if there is one."""
        state = self.state
        tag = state.spare or self._spawn()
        state.spare = None
        state.tag, state.ranks = tag, []
        formed = form_group(self.spec, self.client, self._sets, tag, f"{state.folder}/{tag}", self._known)
        state.ranks, self.addresses = formed.ranks, formed.addresses
        if self.spec.spares:
            # the next restart takes these: new processes are the slow part of recovery
            state.spare = self._spawn()
        self.save_state()

    def _spawn(self) -> str:
        """Start one engine process per rank (not yet a group); return the set's tag."""
        tag = self.state.next_tag()
        try:
            self._sets.spawn(tag, self.state.folder)
        finally:
            self.save_state()  # what did start, the watchdog must know
        return tag

    def dead_ranks(self, tag: Optional[str] = None) -> list[int]:
        """Ranks whose engine process has exited, or that the controller has dropped."""
        tag = tag or self.state.tag
        if self._sets is None:
            return list(range(self.spec.n))
        bound = self.ranks if tag == self.state.tag and self.formed else []
        ids = set(self.client.ids) if bound and self.client is not None else set()
        return self._sets.dead(tag, bound, ids)

    def kill(self) -> None:
        """Kill the ranks' processes (and any they started) and forget their engine sets.

        A rank blocked in a native collective ignores SIGTERM: the ring and MPI are killed
        outright. On JACCL a SIGKILL can leave RDMA unusable until the Mac restarts, so there it
        is SIGINT, then SIGTERM, then SIGKILL, with waits between; ``killed`` says if it came to that.
        """
        self.killed = False
        if self._sets is None or self.state.tag is None:
            return
        self.killed = self._sets.end(self.state.tag, self.state.folder)
        self.state.tag, self.state.ranks = None, []
        self.save_state()

    def signal(self, sig: int, ranks: Optional[Sequence[int]] = None) -> None:
        """Send a signal to the engine processes of ``ranks`` (default all)."""
        if self._sets is not None:
            self._sets.signal(sig, self.state.tag, ranks if ranks is not None else range(self.spec.n), self.ranks)

    def send_control(
        self, msg_type: str, content: Optional[dict] = None, ranks: Optional[Sequence[int]] = None
    ) -> None:
        """A message on the ranks' control channel, which their kernels serve while a cell runs."""
        ranks = ranks if ranks is not None else range(len(self.ranks))
        self._messages.send_control([self.ranks[r].engine_id for r in ranks], msg_type, content)

    def dispatch(self, ranks: Sequence[int], fn: Callable, *args: Any) -> dict[int, tasks.RankTask]:
        """``fn(*args)`` on each of ``ranks`` in one apply (the cost of a raw DirectView call);
        ``tasks.forget`` them once done."""
        return self._messages.dispatch({r: self.ranks[r].engine_id for r in ranks}, fn, *args)

    # ------------------------------------------------------------ views
    @property
    def view(self) -> ipp.DirectView:
        """A DirectView on every rank, in rank order."""
        return self.client[[r.engine_id for r in self.ranks]]

    def controller_alive(self) -> bool:
        """Whether the controller's process still runs."""
        return self._ipc is not None and self._ipc.controller_alive()

    def states(self, busy: bool) -> list[RankInfo]:
        """The ranks with their state (idle / busy / dead / lost), and their memory when idle;
        within seconds whatever the hub does."""
        dead = set(self.dead_ranks())
        if not self.controller_alive():
            for r in self.ranks:
                r.state = RankState.UNREACHABLE
            return self.ranks
        try:
            queued, lost = self._messages.queued({r.rank: r.engine_id for r in self.ranks})
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
                self._messages.forget(ar.msg_ids)
            except Exception:  # memory is a nicety: the states stand without it
                pass
        return self.ranks
