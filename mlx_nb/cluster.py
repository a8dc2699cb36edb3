"""Cluster: an ipyparallel controller plus one engine per MLX rank, bound into one group.

    with Cluster(n=4) as c:
        c.run("print(mx.distributed.all_sum(mx.array([rank])))")
"""

from __future__ import annotations

import random
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import ipyparallel as ipp
import psutil

from . import engine, hostfile

BACKENDS = ("ring", "jaccl", "jaccl-ring", "mpi", "nccl")
# what every local engine gets on top of the notebook's environment
ENGINE_ENV = {"MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
# no nanny process per engine: the cluster watches the engine processes itself and signals
# them directly, and half the processes start (and restart) a set markedly faster
ENGINE_ARGS = ["--IPEngine.enable_nanny=False"]
# the controller admits a new engine at its next heartbeat: every 0.5 s rather than 3 s makes
# a (re)start seconds faster; 60 misses keep its patience with a busy engine at 30 s
CONTROLLER_ARGS = ["--HeartMonitor.period=500", "--HeartMonitor.max_heartmonitor_misses=60"]


class ClusterError(RuntimeError):
    """The cluster could not start, or a rank is not usable; the message says which and why."""


@dataclass
class RankInfo:
    rank: int
    engine_id: int
    host: str = ""
    pid: int = 0
    device: str = ""
    mlx: str = ""
    active_memory: int = 0
    peak_memory: int = 0
    state: str = "starting"


@dataclass
class SetupCell:
    code: str
    push: dict = field(default_factory=dict)


class Cluster:
    """``n`` local MLX ranks (ipyparallel engines) bound into one ``mx.distributed`` group.

    Example::

        c = Cluster(n=4).start()
        c.run("x = mx.distributed.all_sum(mx.array([rank]))\\nx")
        c.stop()
    """

    def __init__(
        self,
        n: int = 4,
        backend: str = "ring",
        *,
        env: Optional[dict[str, str]] = None,
        start_timeout: float = 60.0,
        init_timeout: float = 60.0,
        grace: float = 3.0,
        spares: bool = True,
        ports: Optional[Sequence[int]] = None,
    ) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive number of ranks, got {n!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if backend != "ring":
            raise ValueError(
                f"backend {backend!r} needs a hostfile; a local cluster runs the ring backend"
            )
        if ports is not None and len(ports) != n:
            raise ValueError(f"ports: the ring needs one port per rank ({n}), got {len(ports)}")
        self.n, self.backend = n, backend
        # the ring's TCP port of each rank on 127.0.0.1; None: free ones, picked at every (re)start
        self.ports = list(ports) if ports is not None else None
        self.env = dict(env or {})
        self.start_timeout, self.init_timeout, self.grace = start_timeout, init_timeout, grace
        self.ranks: list[RankInfo] = []
        self.setup_cells: list[SetupCell] = []
        self.spares = spares
        self.busy = False  # a cell is running
        self.live: dict[int, dict] = {}  # while a cell runs: each rank's latest whereabouts and memory
        self.client: Optional[ipp.Client] = None
        self._engines: dict[int, dict] = {}  # engine id -> identify() of every engine seen
        self._generation = 0
        self._tag: Optional[str] = None  # engine set tag of the ranks in use
        self._spare: Optional[str] = None  # tag of the warm spare set
        self._ipp: Optional[ipp.Cluster] = None
        self._cell_count = 0
        self.on_message: Callable[[str], None] = print

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._ipp is not None

    def start(self) -> "Cluster":
        """Start the controller and the ranks, form the group and check it."""
        if self.running:
            raise ClusterError("this cluster is already running: stop() it first")
        self._ipp = ipp.Cluster(
            n=0, controller_ip="127.0.0.1", log_level=40, shutdown_atexit=True,
            controller_args=CONTROLLER_ARGS,
        )
        try:
            self._ipp.start_controller_sync()
            self.client = self._ipp.connect_client_sync()
            self._start_ranks()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every engine and the controller; nothing is left running."""
        if self._ipp is None:
            return
        if self.client is not None:
            self.client.close()
            self.client = None
        self._kill_ranks()
        if self._spare:
            self._tag, self._spare = self._spare, None
            self._kill_ranks()
        procs = []
        if self._ipp.controller is not None:
            procs += _process_tree(self._ipp.controller.pid)
        try:
            self._ipp.stop_cluster_sync()
        finally:
            self._ipp = None
            self.ranks, self._tag, self._spare, self._engines = [], None, None, {}
            # engines' nannies and the controller's schedulers exit a moment after their parents
            for p in _wait_exited(procs, timeout=5):
                p.kill()

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: controller, engines (spares too), nannies."""
        if self._ipp is None:
            return []
        pids = [el.pid for es in self._ipp.engines.values() for el in es.launchers.values()]
        if self._ipp.controller is not None:
            pids.append(self._ipp.controller.pid)
        return [p for pid in pids for p in _process_tree(pid)]

    def restart(self, reason: str = "restart requested") -> float:
        """New rank processes, a new group, and the setup cells replayed.

        Returns the seconds the replay took.
        """
        self._require_running()
        self._kill_ranks()
        try:
            self._start_ranks()
        except BaseException:
            # a half-formed group is of no use: leave none, so the next cell starts afresh
            self._kill_ranks()
            raise
        return self.replay_setup()

    # ------------------------------------------------------------------- ranks
    def _require_running(self) -> None:
        if not self.running:
            raise ClusterError("the cluster is not running: start it first (%mlx_cluster start)")

    def _spawn(self) -> str:
        """Start one engine process per rank (not yet a group); return the set's tag."""
        self._generation += 1
        tag = f"g{self._generation}"
        for rank in range(self.n):
            env = {**ENGINE_ENV, **self.env, "MLX_RANK": str(rank), "MLX_NB_SET": tag}
            self._ipp.start_engines_sync(
                n=1, engine_set_id=f"{tag}-rank{rank}", environment=env, engine_args=ENGINE_ARGS
            )
        return tag

    def _start_ranks(self) -> None:
        """Bind a set of engines into a group: the warm spare set if there is one."""
        tag = self._spare or self._spawn()
        self._spare = None
        self._tag, self.ranks = tag, []
        found = self._wait_for_set(tag)
        self.ranks = [
            RankInfo(r, found[r]["engine_id"], found[r]["host"], found[r]["pid"]) for r in range(self.n)
        ]
        self._init_group(self.ports or ring_ports(self.n))
        if self.spares:
            # the next restart takes these: new processes are the slow part of recovery
            self._spare = self._spawn()

    def _wait_for_set(self, tag: str) -> dict[int, dict]:
        deadline = time.monotonic() + self.start_timeout
        while True:
            new = [eid for eid in self.client.ids if eid not in self._engines]
            if new:
                infos = self.client[new].apply_async(engine.identify).get(timeout=self.start_timeout)
                for eid, info in zip(new, infos):
                    self._engines[eid] = {**info, "engine_id": eid}
            found = {
                e["rank"]: e for eid, e in self._engines.items()
                if e["set"] == tag and eid in self.client.ids
            }
            if len(found) == self.n:
                return found
            dead = self._dead_ranks(tag)
            if dead:
                raise ClusterError("while starting: " + self._engine_failed_message(tag, dead))
            if time.monotonic() > deadline:
                missing = [r for r in range(self.n) if r not in found]
                raise ClusterError(
                    f"rank(s) {_ranges(missing)} did not come up within {self.start_timeout:.0f} s: "
                    "the engine process runs but never registered with the controller "
                    f"(stopped, or stuck starting up); engine logs are in {self._ipp.profile_dir}/log"
                )
            time.sleep(0.05)

    def _init_group(self, ports: list[int]) -> None:
        """Form the group on ``self.ranks``: mx.distributed.init is collective, so start it
        on every rank, then wait for all; the first failure, or a rank that never joins, is named."""
        launches = hostfile.ring_launch(hostfile.local(self.n), ports)
        ars = {
            r.rank: self.client[r.engine_id].apply_async(
                engine.init_group, self.backend, self.n, launches[r.rank].files
            )
            for r in self.ranks
        }
        deadline = time.monotonic() + self.init_timeout
        pending = dict(ars)
        while pending:
            for rank, ar in list(pending.items()):
                if not ar.ready():
                    continue
                del pending[rank]
                try:
                    info = ar.get(timeout=0)
                except ipp.error.EngineError:
                    pending[rank] = ar  # reported below, with the engine's output
                    break
                except ipp.RemoteError as e:
                    raise ClusterError(self._init_failed(rank, e, ports)) from None
                r = self.ranks[rank]
                r.device, r.mlx, r.state = info["device"], info["mlx"], "idle"
            dead = [r for r in self._dead_ranks() if r in pending]
            if dead:
                raise ClusterError(
                    "during mx.distributed.init: " + self._engine_failed_message(self._tag, dead)
                )
            if pending and time.monotonic() > deadline:
                # how far each rank got: None, "started" (running init_group), "joining" (in the call)
                steps = {r: ar.metadata["data"].get("mlx_nb_init") for r, ar in pending.items()}
                raise ClusterError(self._init_stuck(steps, ports))
            time.sleep(0.02)
        values = self.client[[r.engine_id for r in self.ranks]].apply_async(
            engine.check_group
        ).get(timeout=self.init_timeout)
        want = self.n * (self.n + 1) / 2
        wrong = [r for r, v in enumerate(values) if v != want]
        if wrong:
            raise ClusterError(
                f"the group check failed: all_sum gave {values} (expected {want} on every rank)"
            )

    def _init_failed(self, rank: int, e: Exception, ports: list[int]) -> str:
        text = f"mx.distributed.init failed on rank {rank}: {e.ename}: {e.evalue}"
        if "bind" in str(e.evalue):
            fix = (
                "pass other ports= or free it" if self.ports else
                "it was free a moment before; start again to pick new ports"
            )
            text += (
                f"\nport {ports[rank]} on 127.0.0.1, rank {rank}'s address in the ring, is in use "
                f"by another process: {fix}."
            )
        return text

    def _init_stuck(self, steps: dict[int, Optional[str]], ports: list[int]) -> str:
        head = (
            f"mx.distributed.init(backend={self.backend!r}) did not complete within "
            f"{self.init_timeout:.0f} s"
        )
        waiting = sorted(steps)
        absent = [r for r in waiting if steps[r] != "joining"]
        if absent:
            quiet = [r for r in absent if steps[r] is None]
            why = (
                "its engine is not responding" if quiet == absent else
                "it is stuck before the call, e.g. importing mlx"
            )
            rest = [r for r in waiting if steps[r] == "joining"]
            tail = f"; rank(s) {_ranges(rest)} waited for it in the ring" if rest else ""
            return f"{head}: rank(s) {_ranges(absent)} never called it ({why}){tail}."
        addrs = ", ".join(f"rank {r} 127.0.0.1:{ports[r]}" for r in waiting)
        return (
            f"{head} on rank(s) {_ranges(waiting)}: every one of them is in the call, but they "
            f"could not connect to each other ({addrs}): is a port blocked?"
        )

    def _launchers(self, rank: int, tag: Optional[str] = None) -> list:
        engine_set = self._ipp.engines.get(f"{tag or self._tag}-rank{rank}") if self._ipp else None
        return list(engine_set.launchers.values()) if engine_set else []

    def _dead_ranks(self, tag: Optional[str] = None) -> list[int]:
        """Ranks whose engine process has exited, or that the controller has dropped."""
        # the launchers' own state is updated on an event loop that only runs during
        # ipyparallel's *_sync calls, so look at the processes themselves
        in_use = (tag or self._tag) == self._tag and len(self.ranks) == self.n
        ids = set(self.client.ids) if in_use and self.client is not None else set()
        dead = []
        for rank in range(self.n):
            launchers = self._launchers(rank, tag)
            if not launchers or not all(_alive(el.pid) for el in launchers):
                dead.append(rank)
            elif in_use and self.ranks[rank].engine_id not in ids:
                dead.append(rank)
        return dead

    def _engine_failed_message(self, tag: str, dead: list[int]) -> str:
        out = []
        for rank in dead:
            engine_set = self._ipp.engines.get(f"{tag}-rank{rank}")
            text = _engine_output(engine_set.get_output() if engine_set else "")
            out.append(
                f"rank {rank}'s engine process exited"
                + (f"; its output:\n{text}" if text else " (no output)")
            )
        return "\n".join(out)

    def _kill_ranks(self) -> None:
        """Kill the ranks' processes (and any they started) and forget their engine sets."""
        # a rank blocked in a native collective ignores SIGTERM: kill outright
        if self._ipp is None or self._tag is None:
            return
        procs = []
        for rank in range(self.n):
            for el in self._launchers(rank):
                procs.extend(_process_tree(el.pid))
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        _wait_exited(procs, timeout=5)
        for rank in range(self.n):
            set_id = f"{self._tag}-rank{rank}"
            if set_id in self._ipp.engines:
                self._ipp.stop_engines_sync(set_id)
        self._tag, self.ranks = None, []

    def signal(self, sig: int, ranks: Optional[Sequence[int]] = None) -> None:
        """Send a signal to the engine processes of ``ranks`` (default all)."""
        for rank in ranks if ranks is not None else range(self.n):
            for el in self._launchers(rank):
                try:
                    el.signal(sig)
                except psutil.Error:
                    pass  # it has exited meanwhile: the caller finds it dead

    # ------------------------------------------------------------------- cells
    @property
    def view(self) -> ipp.DirectView:
        """A DirectView on every rank, in rank order."""
        self._require_running()
        return self.client[[r.engine_id for r in self.ranks]]

    def run(self, code: str, **kwargs) -> "Any":
        """Run ``code`` SPMD on every rank; see :func:`mlx_nb.run.run_cell`."""
        from .run import run_cell

        self.busy = True
        try:
            return run_cell(self, code, **kwargs)
        finally:
            self.busy = False

    def request_stop(self) -> None:
        """Ask the running cell to stop: ``mlx_nb.engine.stop_requested()`` turns true on every rank."""
        self._require_running()
        for r in self.ranks:
            ident = self.client._engines[r.engine_id]
            self.client.session.send(
                self.client._control_socket, "mlx_nb_stop", content={}, ident=[ident.encode()]
            )

    def next_cell_id(self) -> int:
        self._cell_count += 1
        return self._cell_count

    def push(self, values: dict, ranks: Optional[Sequence[int]] = None) -> None:
        """Send ``values`` into the cell namespace of every rank (or of ``ranks``)."""
        self._require_running()
        targets = [self.ranks[r].engine_id for r in (ranks if ranks is not None else range(self.n))]
        self.client[targets].apply_sync(engine.push, values)

    def pull(self, name: str, ranks: Union[int, Sequence[int], str] = 0) -> Any:
        """A rank's value of ``name`` (rank 0 by default); a list for several ranks."""
        self._require_running()
        if isinstance(ranks, int):
            return self.client[self.ranks[ranks].engine_id].apply_sync(engine.pull, name)
        targets = range(self.n) if ranks == "all" else ranks
        return self.client[[self.ranks[r].engine_id for r in targets]].apply_sync(
            engine.pull, name
        )

    def replay_setup(self) -> float:
        """Run the registered setup cells again, in order; return the seconds it took."""
        t0 = time.perf_counter()
        for i, cell in enumerate(self.setup_cells):
            result = self.run(cell.code, push=cell.push, quiet=True, register=False)
            if not result.ok:
                raise ClusterError(
                    f"replaying setup cell {i + 1} of {len(self.setup_cells)} failed:\n"
                    + result.error_text()
                )
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ status
    def status(self) -> list[RankInfo]:
        """Each rank's host, pid, device, memory and state (idle / busy / dead)."""
        self._require_running()
        dead = set(self._dead_ranks())
        queues = self.client.queue_status()
        idle = []
        for r in self.ranks:
            q = queues.get(r.engine_id, {})
            if r.rank in dead:
                r.state = "dead"
            elif not isinstance(q, dict):
                r.state = "lost"
            else:
                r.state = "busy" if q.get("tasks", 0) or q.get("queue", 0) else "idle"
                if r.state == "idle":
                    idle.append(r)
        if idle and len(idle) == len(self.ranks):
            try:
                infos = self.client[[r.engine_id for r in idle]].apply_async(engine.describe).get(
                    timeout=5
                )
                for r, info in zip(idle, infos):
                    r.active_memory, r.peak_memory = info["active_memory"], info["peak_memory"]
            except Exception:
                pass
        return self.ranks

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<mlx_nb.Cluster n={self.n} backend={self.backend!r} {state}>"


# below the ranges the OS picks outgoing connections' ports from (Linux 32768-60999, macOS
# 49152-65535), so no connection, the ring's own included, takes one before the ring binds it
RING_PORTS = range(20000, 32768)


def ring_ports(n: int, ip: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free on ``ip`` now, for the ring (one per rank).

    >>> len(set(ring_ports(4)))
    4
    """
    ports: list[int] = []
    for port in random.sample(RING_PORTS, len(RING_PORTS)):
        if len(ports) == n:
            break
        with socket.socket() as s:
            try:
                s.bind((ip, port))
            except OSError:
                continue
        ports.append(port)
    return ports


def _engine_output(text: str, lines: int = 20) -> str:
    """The tail of an engine's output, without ipyparallel's log lines and MLX ring noise."""
    keep = [
        line.strip() for line in text.splitlines()
        if line.strip() and not line.startswith("Output for ")
        and not re.search(r"\[(IPEngine|KernelNanny)[.\]]|^\s*\[ring\]", line)
    ]
    return "\n".join("  " + line for line in keep[-lines:])


def _wait_exited(procs: list, timeout: float) -> list:
    """Wait until each process has exited; return those still running after ``timeout``.

    An exited process whose parent died stays a zombie until init reaps it (seconds,
    on some systems): it holds nothing, so it counts as gone.
    """
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while alive:
        alive = [p for p in alive if _running(p)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return alive


def _alive(pid: Optional[int]) -> bool:
    try:
        return bool(pid) and _running(psutil.Process(pid))
    except psutil.Error:
        return False


def _running(p: psutil.Process) -> bool:
    try:
        if p.status() == psutil.STATUS_ZOMBIE:
            try:
                p.wait(0)  # reap our own children
            except (psutil.Error, ChildProcessError):
                pass
            return False
        return True
    except psutil.Error:
        return False


def _process_tree(pid: int) -> list:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


def _ranges(ranks: Sequence[int]) -> str:
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
