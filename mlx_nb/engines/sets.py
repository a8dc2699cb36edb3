"""Engine sets: the rank processes of one generation, started together, watched and ended.

An engine set is what one ipyparallel launcher starts: here one engine per rank (each on its
host, with its own environment), or all ranks under one ``mpirun``. A generation's sets share a
tag (``g1``, ``g2``...) that each engine reports (``MLX_NB_SET``, read by rank.session.identify):
the ranks in use are one generation, a warm spare set the next.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Optional

import ipyparallel as ipp
import psutil

from .. import rank_env
from ..rank import blas
from . import ClusterError, launch, procs

if TYPE_CHECKING:
    from ..spec import ClusterSpec
    from .state import RankInfo

# what every local engine gets on top of the notebook's environment
ENGINE_ENV = {"MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
# One malloc arena per rank process (glibc reads it as the process starts; other C libraries ignore
# it), unless the notebook's environment or the hostfile's says otherwise. MLX's CPU streams run on
# threads of their own, each with an arena of its own by glibc's default, and memory freed into one
# arena does not serve another's allocations: on a CPU rank, a served wave's batch cache then
# took fresh pages from the kernel (15 thousand faults in one run without it, none with it; the
# first token 1.46 against 1.54 s, within noise; rank.memory.keep_freed keeps what the arena frees)
ARENAS = "MALLOC_ARENA_MAX"
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


def set_id(tag: str, rank: int, backend: str) -> str:
    """The id of the engine set of ``rank`` in generation ``tag``: one per rank, one for all under MPI.

    >>> set_id("g2", 1, "ring"), set_id("g2", 1, "mpi")
    ('g2-rank1', 'g2-mpi')
    """
    return f"{tag}-mpi" if backend == "mpi" else f"{tag}-rank{rank}"


def _engine_env() -> dict[str, str]:
    """What every engine gets on top of the notebook's environment (the hostfile's ``env`` after)."""
    return {**ENGINE_ENV, ARENAS: os.environ.get(ARENAS, "1")}


class EngineSets:
    """The engine sets of one controller (an ``ipp.Cluster``), for the ranks of ``spec``."""

    def __init__(self, ipc: ipp.Cluster, spec: ClusterSpec):
        self.ipc, self.spec = ipc, spec

    def spawn(self, tag: str, folder: str) -> None:
        """Start one engine process per rank, tagged ``tag`` (not yet a group); ``folder`` is
        the cluster's folder on every host (the engines' IPython profile on other hosts)."""
        spec = self.spec
        # BLAS threads per rank are the host's cores over the ranks on it (rank.blas)
        on_host = Counter(spec.host(h.rank) for h in spec.hostfile.hosts)
        if spec.backend == "mpi":
            env = {**_engine_env(), **spec.env, "MLX_NB_SET": tag, blas.RANKS_ENV: str(spec.n)}
            self._start(set_id(tag, 0, "mpi"), "mpi", launch.mpi_engine_launcher_kwargs(spec.n, spec.python, env))
            return
        # the ports of the ring are in MLX_HOSTFILE, written at init; jaccl's and nccl's are in env
        ports = None if spec.backend == "ring" else spec.ports
        for rank in rank_env.rank_launch(spec.hostfile, spec.backend, env=spec.env, ports=ports):
            env = {**_engine_env(), **rank.env, "MLX_NB_SET": tag, blas.RANKS_ENV: str(on_host[spec.host(rank.rank)])}
            if rank.rank in spec.remote:
                ssh = [*spec.ssh_cmd, *launch.SSH_OPTIONS]
                kwargs = launch.ssh_engine_launcher_kwargs(rank.host, spec.python, ssh, env)
                kwargs["remote_profile_dir"] = folder
                self._start(set_id(tag, rank.rank, spec.backend), "ssh", kwargs, rank.host)
            else:
                kwargs = {"n": 1, "environment": env, "engine_args": ENGINE_ARGS}
                if spec.python != sys.executable:
                    kwargs["engine_cmd"] = [spec.python, "-m", "ipyparallel.engine"]
                self._start(set_id(tag, rank.rank, spec.backend), "local", kwargs)

    def _start(self, sid: str, kind: str, kwargs: dict, host: str = "this machine") -> None:
        self.ipc.engine_launcher_class = kind
        try:
            self.ipc.start_engines_sync(engine_set_id=sid, **kwargs)
        except Exception as e:
            # a set that never started cannot be stopped: forget it, or stop_cluster fails on it
            self.ipc.engines.pop(sid, None)
            raise ClusterError(
                f"could not start the engine of {sid.split('-', 1)[1]} on {host}: "
                f"{type(e).__name__}: {str(e).strip()[-600:]}"
            ) from None

    def launchers(self, tag: str, rank: int) -> list:
        return launch.set_launchers(self.ipc.engines.get(set_id(tag, rank, self.spec.backend)))

    def dead(self, tag: str, bound: Sequence[RankInfo] = (), ids: AbstractSet[int] = frozenset()) -> list[int]:
        """Ranks of generation ``tag`` whose engine process has exited; of the ranks ``bound``
        into a group, also those the controller (its engine ``ids``) has dropped."""
        # the launchers' own state is updated on an event loop that only runs during
        # ipyparallel's *_sync calls, so look at the processes themselves (here), or at
        # the ssh launcher's thread waiting on the remote process
        dead = []
        for rank in range(self.spec.n):
            launchers = self.launchers(tag, rank)
            if not launchers or not all(map(launch.launcher_alive, launchers)):
                dead.append(rank)
            elif bound and bound[rank].engine_id not in ids:
                dead.append(rank)
            elif bound and self.spec.backend == "mpi" and not procs.alive(bound[rank].pid):
                dead.append(rank)
        return dead

    def output(self, tag: str, rank: int) -> str:
        """The tail of what the engine of ``rank`` printed (why it exited, say)."""
        engine_set = self.ipc.engines.get(set_id(tag, rank, self.spec.backend))
        try:
            return launch.engine_output(engine_set.get_output() if engine_set else "")
        except Exception:
            return ""

    def end(self, tag: str, folder: str) -> bool:
        """Kill the processes of generation ``tag`` (and any they started) and forget its sets;
        True if a gentle stop came to SIGKILL (``procs.stopped_gently``)."""
        found: dict[int, psutil.Process] = {}
        remote = []
        for rank in range(self.spec.n):
            for el in self.launchers(tag, rank):
                if launch.is_ssh(el):
                    remote.append(el)  # its nanny tells the controller
                else:
                    found.update((p.pid, p) for p in procs.process_tree(el.pid))
        killed = launch.end(list(found.values()), remote, procs.stopped_gently(self.spec.backend))
        sets = [k for k in self.ipc.engines if k.startswith(f"{tag}-")]
        for sid in sets:
            # killed already: stopping would signal them again over ssh, in vain and loudly
            if any(map(launch.is_ssh, launch.set_launchers(self.ipc.engines[sid]))):
                self.ipc.engines.pop(sid)
        self.stop([k for k in sets if k in self.ipc.engines])
        # their hostfiles (here; other hosts' go with the whole folder at stop)
        shutil.rmtree(f"{folder}/{tag}", ignore_errors=True)
        return killed

    def stop(self, set_ids: Optional[list[str]] = None) -> None:
        """Stop the sets ``set_ids`` (default every set)."""
        # one at a time: a set whose host is gone fails to stop, and must not stop the others
        for sid in set_ids if set_ids is not None else list(self.ipc.engines):
            try:
                self.ipc.stop_engines_sync(sid)
            except Exception:
                self.ipc.engines.pop(sid, None)

    def signal(self, sig: int, tag: str, ranks: Iterable[int], bound: Sequence[RankInfo]) -> None:
        """Send ``sig`` to the engines of ``ranks`` in generation ``tag`` (``bound``: its ranks)."""
        for rank in ranks:
            if self.spec.backend == "mpi":  # the launcher is mpirun, whose signals end the whole job
                if rank < len(bound):
                    procs.quietly(lambda pid=bound[rank].pid: psutil.Process(pid).send_signal(sig))
                continue
            for el in self.launchers(tag, rank):
                procs.quietly(el.signal, sig)  # it has exited meanwhile: the caller finds it dead

    def processes(self) -> tuple[list[int], list[dict]]:
        """Every engine of every set: (pids here, engines on other hosts as host, pid, ssh command)."""
        local, remote = [], []
        for es in self.ipc.engines.values():
            for el in launch.set_launchers(es):
                if launch.is_ssh(el):
                    remote.append({"host": el.location, "pid": el.pid, "ssh": [*el.ssh_cmd, *el.ssh_args]})
                elif el.pid:
                    local.append(el.pid)
        return local, remote
