"""Cluster: an ipyparallel controller plus one engine per MLX rank, bound into one group.

    with Cluster(n=4) as c:
        c.run("print(mx.distributed.all_sum(mx.array([rank])))")
"""

from __future__ import annotations

import atexit
import json
import re
import shutil
import signal as signals
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import ipyparallel as ipp
import psutil
from ipyparallel.cluster.launcher import SSHLauncher

from . import engine, launchers
from .rank import blas
from . import hostfile as hostfiles
from .hostfile import Hostfile
from .preflight import Finding, check_cluster, gather_command

BACKENDS = ("ring", "jaccl", "jaccl-ring", "mpi", "nccl")
# what every local engine gets on top of the notebook's environment
ENGINE_ENV = {"MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
# no nanny process per local engine: the cluster watches the engine processes itself and
# signals them directly, and half the processes start (and restart) a set markedly faster.
# Engines on other hosts keep theirs: it tells the controller at once that its engine died,
# and it is how signals reach them
ENGINE_ARGS = ["--IPEngine.enable_nanny=False"]
# the controller admits a new engine at its next heartbeat: every 0.5 s rather than 3 s makes
# a (re)start seconds faster; 60 misses keep its patience with a busy engine at 30 s
CONTROLLER_ARGS = ["--HeartMonitor.period=500", "--HeartMonitor.max_heartmonitor_misses=60"]
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


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
    blas: dict = field(default_factory=dict)  # rank.blas.BlasInfo.to_dict(): the BLAS its MLX runs


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
    ) -> None:
        """``n`` local ranks, or one rank per entry of ``hostfile`` (a path or a Hostfile),
        or ``n`` ranks on each host of ``hosts`` ("h1,h2", as ``mlx.launch --hosts``).

        Ranks on other hosts start over ``ssh_cmd`` (default ``ssh``) with the Python
        ``python`` there (default this one's path); entries on 127.0.0.1 / localhost run here.
        """
        if hostfile is not None and hosts is not None:
            raise ValueError("give either hostfile= or hosts=, not both")
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(f"n must be a positive number of ranks, got {n!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if hosts is not None:
            hostfile = hostfiles.from_hosts(hosts, n or 1)
        elif isinstance(hostfile, (str, Path)):
            hostfile = hostfiles.load(hostfile)
        if hostfile is None:
            n, backend = n or 4, backend or "ring"
            if backend not in ("ring", "mpi"):
                raise ValueError(
                    f"backend {backend!r} needs a hostfile; a local cluster runs the ring or mpi backend"
                )
            hostfile = hostfiles.local(n)
        else:
            backend = hostfiles.validate(hostfile, backend)  # HostfileError (a ValueError) says why not
            n = len(hostfile.hosts)
        remote = [h.rank for h in hostfile.hosts if not _is_local(h.ssh_hostname)]
        if backend == "mpi" and remote:
            raise ValueError(
                "backend 'mpi' runs the ranks of this machine only (one mpirun job): "
                "for several hosts use ring (or jaccl over Thunderbolt RDMA)"
            )
        if backend == "mpi" and not launchers.mpi_available()[0]:
            raise ValueError(f"backend 'mpi': {launchers.mpi_available()[1]}")
        needed = sum(len(h.ips) for h in hostfile.hosts) if backend == "ring" else 1
        if ports is not None and len(ports) != needed:
            raise ValueError(f"ports: the ring needs one port per rank and IP ({needed}), got {len(ports)}")
        self.n, self.backend, self.hostfile = n, backend, hostfile
        self.remote = set(remote)  # ranks that run on other hosts, over ssh
        self.python = python or sys.executable
        self.ssh_cmd = list(ssh_cmd or ["ssh"])
        self.preflight = preflight
        # the ring's TCP port of each rank and IP; None: free ones, picked at every (re)start
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
        self._addrs: list[str] = []  # each rank's ring address(es), for error messages
        # this cluster's files on every host (removed at stop): the engines' IPython profile on
        # other hosts, and each engine set's MLX_HOSTFILE / MLX_IBV_DEVICES files under <tag>/
        self._remote_dir = f"/tmp/mlx_nb-{uuid.uuid4().hex[:12]}"
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
        if self.remote and self.preflight:
            refuse_on(self.check())
        # killed engines cannot remove their files: this process does (on stop, or at exit)
        atexit.register(shutil.rmtree, self._remote_dir, True)
        self._ipp = ipp.Cluster(
            n=0, controller_ip=controller_ip(self.hostfile, self.ssh_cmd), log_level=40,
            shutdown_atexit=True, controller_args=CONTROLLER_ARGS,
        )
        try:
            self._ipp.start_controller_sync()
            self.client = self._ipp.connect_client_sync()
            self._start_ranks()
        except BaseException:
            self.stop()
            raise
        self._blas_note()
        return self

    def _blas_note(self) -> None:
        """One line per reason where ranks run MLX's reference BLAS although nobody asked for it."""
        notes: dict[str, list[RankInfo]] = {}
        for r in self.ranks:
            if r.blas and not r.blas["optimized"] and r.blas["note"] and not r.blas["note"].endswith("=off"):
                notes.setdefault(r.blas["note"], []).append(r)
        for note, ranks in notes.items():
            hosts = ", ".join(dict.fromkeys(r.host for r in ranks))
            self.on_message(
                f"rank(s) {_ranges([r.rank for r in ranks])} on {hosts} run MLX's bundled reference BLAS "
                f"(float32 matmuls about 30x slower): {note}; then restart the cluster "
                f"({blas.ENV}=off keeps the reference BLAS without this note)"
            )

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
            self._stop_sets(list(self._ipp.engines))
            self._ipp.stop_cluster_sync()
        finally:
            self._ipp = None
            self.ranks, self._tag, self._spare, self._engines = [], None, None, {}
            # engines' nannies and the controller's schedulers exit a moment after their parents
            for p in _wait_exited(procs, timeout=5):
                p.kill()
            self._on_hosts(f"rm -rf {self._remote_dir}")
            shutil.rmtree(self._remote_dir, ignore_errors=True)

    def check(self) -> list[Finding]:
        """Preflight every host of the hostfile over ssh (nothing is started): see :func:`check_hosts`."""
        return check_hosts(self.hostfile, self.backend, self.python, self.ssh_cmd, env=self.env)

    def _on_hosts(self, cmd: str, timeout: float = 15.0) -> dict[str, tuple[int, str]]:
        """Run ``cmd`` on every other host at once; each host's (exit code, output)."""
        names = list(dict.fromkeys(self.hostfile.hosts[r].ssh_hostname for r in sorted(self.remote)))
        if not names:
            return {}
        with ThreadPoolExecutor(len(names)) as pool:
            runs = pool.map(lambda h: launchers.ssh_run(h, cmd, self.ssh_cmd, timeout), names)
            return dict(zip(names, runs))

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster on this machine: controller, engines (spares too), nannies."""
        if self._ipp is None:
            return []
        pids = [el.pid for es in self._ipp.engines.values() for el in _set_launchers(es) if not _is_ssh(el)]
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
            return self.replay_setup()
        except BaseException:
            # a half-formed group, or one without its setup, is of no use: leave none, so
            # the next cell starts afresh (and replays the setup cells again)
            self._kill_ranks()
            raise

    # ------------------------------------------------------------------- ranks
    def _require_running(self) -> None:
        if not self.running:
            raise ClusterError("the cluster is not running: start it first (%mlx_cluster start)")

    def _spawn(self) -> str:
        """Start one engine process per rank (not yet a group); return the set's tag."""
        self._generation += 1
        tag = f"g{self._generation}"
        # BLAS threads per rank are the host's cores over the ranks on it (rank.blas)
        on_host = Counter(_host_key(h.ssh_hostname) for h in self.hostfile.hosts)
        if self.backend == "mpi":
            env = {**ENGINE_ENV, **self.env, "MLX_NB_SET": tag, blas.RANKS_ENV: str(self.n)}
            self._start_set(f"{tag}-mpi", "mpi", launchers.mpi_engine_launcher_kwargs(self.n, self.python, env))
            return tag
        # the ports of the ring are in MLX_HOSTFILE, written at init; jaccl's and nccl's are in env
        for launch in hostfiles.rank_launch(self.hostfile, self.backend, env=self.env, ports=self._env_ports()):
            env = {**ENGINE_ENV, **launch.env, "MLX_NB_SET": tag, blas.RANKS_ENV: str(on_host[_host_key(launch.host)])}
            if launch.rank in self.remote:
                ssh = [*self.ssh_cmd, *launchers.SSH_OPTIONS]
                kwargs = launchers.ssh_engine_launcher_kwargs(launch.host, self.python, ssh, env)
                kwargs["remote_profile_dir"] = self._remote_dir
                self._start_set(f"{tag}-rank{launch.rank}", "ssh", kwargs, launch.host)
            else:
                kwargs = {"n": 1, "environment": env, "engine_args": ENGINE_ARGS}
                if self.python != sys.executable:
                    kwargs["engine_cmd"] = [self.python, "-m", "ipyparallel.engine"]
                self._start_set(f"{tag}-rank{launch.rank}", "local", kwargs)
        return tag

    def _env_ports(self) -> Optional[list[int]]:
        return None if self.backend == "ring" else self.ports

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

    def _start_ranks(self) -> None:
        """Bind a set of engines into a group: the warm spare set if there is one."""
        tag = self._spare or self._spawn()
        self._spare = None
        self._tag, self.ranks = tag, []
        found = self._wait_for_set(tag)
        self.ranks = [
            RankInfo(r, found[r]["engine_id"], found[r]["host"], found[r]["pid"]) for r in range(self.n)
        ]
        self._check_versions(found)
        needed = sum(len(h.ips) for h in self.hostfile.hosts)
        self._init_group(self.ports or hostfiles.free_ports(needed))
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

    def _check_versions(self, found: dict[int, dict]) -> None:
        """Refuse ranks whose mlx or mlx_nb differ from each other or from the notebook's."""
        import mlx_nb

        rows = [("notebook", socket.gethostname(), engine._mlx_version() or "-", mlx_nb.__version__)]
        rows += [(f"rank {r}", e["host"], e["mlx"] or "-", e["mlx_nb"]) for r, e in sorted(found.items())]
        if len({row[2:] for row in rows}) > 1:
            raise ClusterError(
                "the ranks run different MLX or mlx_nb versions: install the same ones on every "
                "host (pip install mlx==... mlx_nb==...)\n" + _text_table(["", "host", "mlx", "mlx_nb"], rows)
            )

    def _init_group(self, ports: list[int]) -> None:
        """Form the group on ``self.ranks``: mx.distributed.init is collective, so start it
        on every rank, then wait for all; the first failure, or a rank that never joins, is named."""
        if self.backend == "mpi":
            files = [{} for _ in range(self.n)]
            self._addrs = ["mpi"] * self.n
        else:
            launches = hostfiles.rank_launch(
                self.hostfile, self.backend, env=self.env, ports=ports if self.backend == "ring" else self.ports
            )
            files = [launch.files for launch in launches]
            if self.backend == "ring" and self.n > 1:
                self._addrs = [",".join(a) for a in json.loads(files[0]["MLX_HOSTFILE"])]
            else:
                self._addrs = [launches[0].env.get("MLX_JACCL_COORDINATOR", "") for _ in launches]
        ars = {
            r.rank: self.client[r.engine_id].apply_async(
                engine.init_group, self.backend, self.n, files[r.rank], f"{self._remote_dir}/{self._tag}"
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
                    raise ClusterError(self._init_failed(rank, e)) from None
                r = self.ranks[rank]
                r.device, r.mlx, r.state, r.blas = info["device"], info["mlx"], "idle", info["blas"]
            dead = [r for r in self._dead_ranks() if r in pending]
            if dead:
                raise ClusterError(
                    "during mx.distributed.init: " + self._engine_failed_message(self._tag, dead)
                )
            if pending and time.monotonic() > deadline:
                # how far each rank got: None, "started" (running init_group), "joining" (in the call)
                steps = {r: ar.metadata["data"].get("mlx_nb_init") for r, ar in pending.items()}
                raise ClusterError(self._init_stuck(steps))
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

    def _init_failed(self, rank: int, e: Exception) -> str:
        text = f"mx.distributed.init failed on rank {rank}: {e.ename}: {e.evalue}"
        if "bind" in str(e.evalue):
            ip, _, port = self._addrs[rank].split(",")[0].rpartition(":")
            fix = (
                "pass other ports= or free it" if self.ports else
                "it was free a moment before; start again to pick new ports"
            )
            text += (
                f"\nport {port} on {ip}, rank {rank}'s address in the ring, is in use "
                f"by another process: {fix}."
            )
        return text

    def _init_stuck(self, steps: dict[int, Optional[str]]) -> str:
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
        addrs = ", ".join(f"rank {r} {self._addrs[r]}" for r in waiting)
        return (
            f"{head} on rank(s) {_ranges(waiting)}: every one of them is in the call, but they "
            f"could not connect to each other ({addrs}): is a port blocked?"
        )

    def _launchers(self, rank: int, tag: Optional[str] = None) -> list:
        if self._ipp is None:
            return []
        tag = tag or self._tag
        set_id = f"{tag}-mpi" if self.backend == "mpi" else f"{tag}-rank{rank}"
        return _set_launchers(self._ipp.engines.get(set_id))

    def _dead_ranks(self, tag: Optional[str] = None) -> list[int]:
        """Ranks whose engine process has exited, or that the controller has dropped."""
        # the launchers' own state is updated on an event loop that only runs during
        # ipyparallel's *_sync calls, so look at the processes themselves (here), or at
        # the ssh launcher's thread waiting on the remote process
        in_use = (tag or self._tag) == self._tag and len(self.ranks) == self.n
        ids = set(self.client.ids) if in_use and self.client is not None else set()
        dead = []
        for rank in range(self.n):
            launchers_ = self._launchers(rank, tag)
            if not launchers_ or not all(map(_launcher_alive, launchers_)):
                dead.append(rank)
            elif in_use and self.ranks[rank].engine_id not in ids:
                dead.append(rank)
            elif in_use and self.backend == "mpi" and not _alive(self.ranks[rank].pid):
                dead.append(rank)
        return dead

    def _engine_failed_message(self, tag: str, dead: list[int]) -> str:
        out = []
        for rank in dead:
            engine_set = self._ipp.engines.get(f"{tag}-mpi" if self.backend == "mpi" else f"{tag}-rank{rank}")
            try:
                text = _engine_output(engine_set.get_output() if engine_set else "")
            except Exception:
                text = ""
            where = f" on {self.hostfile.hosts[rank].ssh_hostname}" if rank in self.remote else ""
            out.append(
                f"rank {rank}'s engine process{where} exited"
                + (f"; its output:\n{text}" if text else " (no output)")
            )
        return "\n".join(out)

    def _kill_ranks(self) -> None:
        """Kill the ranks' processes (and any they started) and forget their engine sets."""
        # a rank blocked in a native collective ignores SIGTERM: kill outright
        if self._ipp is None or self._tag is None:
            return
        procs: dict[int, psutil.Process] = {}
        for rank in range(self.n):
            for el in self._launchers(rank):
                if _is_ssh(el):
                    _quietly(el.signal, signals.SIGKILL)  # its nanny tells the controller
                else:
                    procs.update((p.pid, p) for p in _process_tree(el.pid))
        for p in procs.values():
            _quietly(p.kill)
        _wait_exited(list(procs.values()), timeout=5)
        sets = [k for k in self._ipp.engines if k.startswith(f"{self._tag}-")]
        for set_id in sets:
            # killed already: stopping would signal them again over ssh, in vain and loudly
            if any(map(_is_ssh, _set_launchers(self._ipp.engines[set_id]))):
                self._ipp.engines.pop(set_id)
        self._stop_sets([k for k in sets if k in self._ipp.engines])
        # their hostfiles (here; other hosts' go with the whole directory at stop)
        shutil.rmtree(f"{self._remote_dir}/{self._tag}", ignore_errors=True)
        self._tag, self.ranks = None, []

    def _stop_sets(self, set_ids: list[str]) -> None:
        # one at a time: a set whose host is gone fails to stop, and must not stop the others
        for set_id in set_ids:
            try:
                self._ipp.stop_engines_sync(set_id)
            except Exception:
                self._ipp.engines.pop(set_id, None)

    def signal(self, sig: int, ranks: Optional[Sequence[int]] = None) -> None:
        """Send a signal to the engine processes of ``ranks`` (default all)."""
        for rank in ranks if ranks is not None else range(self.n):
            if self.backend == "mpi":  # the launcher is mpirun, whose signals end the whole job
                if rank < len(self.ranks):
                    _quietly(lambda: psutil.Process(self.ranks[rank].pid).send_signal(sig))
                continue
            for el in self._launchers(rank):
                _quietly(el.signal, sig)  # it has exited meanwhile: the caller finds it dead

    # ------------------------------------------------------------------- cells
    @property
    def view(self) -> ipp.DirectView:
        """A DirectView on every rank, in rank order."""
        self._require_running()
        return self.client[[r.engine_id for r in self.ranks]]

    def _cells_view(self) -> ipp.DirectView:
        """The view cells go through: one per set of ranks (a new DirectView costs ~0.1 ms),
        private so that nobody retargets it."""
        self._require_running()
        ids = [r.engine_id for r in self.ranks]
        cached = self.__dict__.get("_cells")
        if cached is None or cached[0] != ids or cached[1].client is not self.client:
            self._cells = (ids, self.client[ids])
        view = self._cells[1]
        view.history.clear()  # it would grow by a message id per rank per cell
        return view

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
        from .run import DistCellError

        t0 = time.perf_counter()
        for i, cell in enumerate(self.setup_cells):
            try:
                self.run(cell.code, push=cell.push, quiet=True, register=False)
            except DistCellError as e:
                raise ClusterError(
                    f"replaying setup cell {i + 1} of {len(self.setup_cells)} failed:\n{e.report}\n"
                    "(%mlx_cluster forget-setup drops the setup cells)"
                ) from None
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ status
    def status(self) -> list[RankInfo]:
        """Each rank's host, pid, device, memory and state (idle / busy / dead)."""
        self._require_running()
        dead = set(self._dead_ranks())
        queues = self.client.queue_status(verbose=True)
        ours = set(self.client.history)
        idle = []
        for r in self.ranks:
            q = queues.get(r.engine_id, {})
            if r.rank in dead:
                r.state = "dead"
            elif not isinstance(q, dict):
                r.state = "lost"
            else:
                # the hub's queue lags replies the notebook already has: of our own messages
                # only those still without a reply count; another client's work counts
                queued = [m for m in q.get("queue", []) if m in self.client.outstanding or m not in ours]
                r.state = "busy" if self.busy or queued else "idle"
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


# ------------------------------------------------------------------ hosts
def _is_local(host: str) -> bool:
    return host in LOCAL_HOSTS or host.startswith("127.")


def _host_key(host: str) -> str:
    return "this machine" if _is_local(host) else host


def _ssh_address(host: str, ssh_cmd: Sequence[str]) -> str:
    """The address ``ssh_cmd host`` connects to (ssh config aliases resolved), else ``host``."""
    try:
        out = subprocess.run(
            [*ssh_cmd, "-G", host], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return host
    return next((l.split()[1] for l in out.splitlines() if l.startswith("hostname ")), host)


def controller_ip(hostfile: Hostfile, ssh_cmd: Sequence[str] = ("ssh",)) -> str:
    """The address of this machine that the hostfile's other hosts reach it on (127.0.0.1 if none).

    The local end of the route to the first remote host (a UDP connect sends nothing).
    """
    remote = [h for h in hostfile.hosts if not _is_local(h.ssh_hostname)]
    if not remote:
        return "127.0.0.1"
    target = _ssh_address(remote[0].ssh_hostname, ssh_cmd)
    try:
        addr = socket.getaddrinfo(target, 22, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except OSError:
        if not remote[0].ips:
            raise ClusterError(
                f"cannot resolve host {remote[0].ssh_hostname!r} (rank {remote[0].rank}): "
                "check the name, or give its IP in the hostfile's \"ips\""
            ) from None
        addr = remote[0].ips[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((addr, 9))
        except OSError as e:
            raise ClusterError(f"no route to host {remote[0].ssh_hostname} ({addr}): {e}") from None
        return s.getsockname()[0]


def check_hosts(
    hostfile: Hostfile, backend: Optional[str] = None, python: Optional[str] = None,
    ssh_cmd: Sequence[str] = ("ssh",), timeout: float = 30.0, env: Optional[dict[str, str]] = None,
) -> list[Finding]:
    """Preflight findings for every host of ``hostfile``, gathered over ssh in parallel.

    One round trip per host (``preflight.gather_command``); an unreachable host is a
    ``fail`` finding of check ``ssh`` within about 5 s. Local entries are gathered here.
    ``env`` is what the ranks get on top of the hostfile's "envs" (its ``MLX_NB_BLAS`` counts).

    >>> for f in check_hosts(hostfiles.load("hosts.json")): print(f)  # doctest: +SKIP
    """
    python = python or sys.executable
    ranks_env = dict(e.partition("=")[::2] for e in hostfile.envs) | dict(env or {})  # as the ranks get it
    cmd = gather_command(python, ranks_env.get(blas.ENV))
    names = list(dict.fromkeys(h.ssh_hostname for h in hostfile.hosts))

    def gather(host: str) -> tuple[int, str]:
        if _is_local(host):
            p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
            return p.returncode, p.stdout + p.stderr
        return launchers.ssh_run(host, cmd, list(ssh_cmd), timeout)

    with ThreadPoolExecutor(len(names)) as pool:
        results = dict(zip(names, pool.map(gather, names)))
    unreachable = [Finding(h, "ssh", "fail", out.strip()) for h, (rc, out) in results.items() if rc in (124, 255, 127)]
    outputs = {h: out for h, (rc, out) in results.items() if rc not in (124, 255, 127)}
    import mlx_nb

    here = {"python": ".".join(map(str, sys.version_info[:3])), "mlx": engine._mlx_version() or "-",
            "mlx_nb": mlx_nb.__version__}
    found = check_cluster(hostfile, outputs, backend, here)
    failed = {f.host for f in unreachable}
    return unreachable + [f for f in found if f.host not in failed]


def refuse_on(findings: list[Finding]) -> None:
    """Raise ClusterError, with every host's findings, if any host fails or mlx / mlx_nb differ."""
    bad = [
        f for f in findings
        if f.status == "fail" or (f.check == "versions" and f.status == "warn" and not f.message.startswith("python"))
    ]
    if bad:
        hosts = ", ".join(dict.fromkeys(f.host for f in bad))
        raise ClusterError(
            f"preflight failed on {hosts}; nothing was started:\n"
            + _text_table(["host", "check", "status", "message"], [(f.host, f.check, f.status, f.message) for f in findings])
        )


def _text_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    from .display import Table

    return repr(Table(columns, rows))


def _set_launchers(engine_set: Any) -> list:
    """The launchers of one engine set: one per engine, or the set itself (mpirun's)."""
    if engine_set is None:
        return []
    return list(engine_set.launchers.values()) if hasattr(engine_set, "launchers") else [engine_set]


def _is_ssh(launcher: Any) -> bool:
    return isinstance(launcher, SSHLauncher)


def _launcher_alive(launcher: Any) -> bool:
    # ipyparallel's launchers keep a thread waiting for their process to exit: asking it
    # costs microseconds (a process table lookup costs ~0.1 ms, and this runs before every cell)
    thread = getattr(launcher, "_wait_thread", None)
    if thread is not None:
        return thread.is_alive()
    # not waited on yet: an ssh launcher's pid is on the other host, so only the thread would know
    return _is_ssh(launcher) or _alive(launcher.pid)


def _quietly(f: Callable, *args: Any) -> None:
    try:
        f(*args)
    except Exception:
        pass


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
