"""Kept clusters: found again by name, through ipyparallel's own cluster file.

ipyparallel writes a cluster file for every cluster (``<profile>/security/cluster-<id>.json``:
the controller's and each engine set's launcher state) and ``Cluster.from_file`` reconnects
to the same processes. mlx_nb adds its own part to that file, under ``"mlx_nb"``: the spec,
the ranks, the setup cells, who holds the cluster, and each engine set's launcher class (one
cluster mixes local and ssh sets; ipyparallel records one class for all). No other registry.
The files are readable by their user only: they hold the controller's keys.
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Optional

import ipyparallel as ipp
import psutil
from ipyparallel.cluster import launcher

from ..spec import check_name
from . import ClusterError, launch, watchdog
from .procs import same_process_runs
from .state import EngineState, Holder

PREFIX = "mlx_nb-"  # cluster ids of mlx_nb's clusters


class IppCluster(ipp.Cluster):
    """ipyparallel's Cluster, whose cluster file carries mlx_nb's part and each set's class."""

    mlx_nb: dict = {}

    def to_dict(self) -> dict:
        d = super().to_dict()
        classes = {sid: launcher.abbreviate_launcher_class(type(es)) for sid, es in self.engines.items()}
        d["mlx_nb"] = {**self.mlx_nb, "set_classes": classes}
        return d

    @classmethod
    def from_dict(cls, d: dict, **kwargs) -> IppCluster:
        engines = d.get("engines") or {"class": "local", "sets": {}}
        self = super().from_dict({**d, "engines": {"class": engines["class"], "sets": {}}}, **kwargs)
        self.mlx_nb = dict(d.get("mlx_nb") or {})
        classes = self.mlx_nb.pop("set_classes", {})
        for set_id, state in engines.get("sets", {}).items():
            self.engine_launcher_class = classes.get(set_id, engines["class"])
            try:
                es = self.engine_launcher_class.from_dict(state, engine_set_id=set_id, parent=self)
            except launcher.NotRunning:
                continue  # it died meanwhile: the group finds the rank dead and replaces it
            self.engines[set_id] = es
            es.on_stop(partial(self._engines_stopped, set_id))
        self.update_cluster_file()
        return self

    def write_cluster_file(self) -> None:
        super().write_cluster_file()
        os.chmod(self.cluster_file, 0o600)

    @property
    def controller_pid(self) -> Optional[int]:
        return self.controller.pid if self.controller is not None else None

    def controller_alive(self) -> bool:
        """Whether the controller's process still runs (its launcher's wait thread says)."""
        return self.controller is not None and launch.launcher_alive(self.controller)

    @property
    def client_file(self) -> str:
        """The controller's connection file for clients (its keys when encrypted): user-readable only."""
        return files(self.cluster_file)[1]


def state_of(d: dict) -> Optional[EngineState]:
    """mlx_nb's part of a cluster file's content ``d``; None before the cluster first wrote it."""
    try:
        return EngineState.from_json(d["mlx_nb"])
    except (KeyError, TypeError):
        return None


def controller_runs(d: dict) -> bool:
    """Whether the controller of a cluster file's content ``d`` still runs (the same process, not
    a zombie): without it nothing reaches the ranks, and the cluster is dead."""
    pid = ((d.get("controller") or {}).get("state") or {}).get("pid")
    state = state_of(d)
    return bool(pid) and same_process_runs(pid, state.controller_started if state else None)


def files(path: str) -> list[str]:
    """A cluster file and the controller's connection files beside it (``ipcontroller-<id>-*.json``)."""
    folder, base = os.path.split(path)
    cluster_id = base[len("cluster-") : -len(".json")]
    return [path, *(os.path.join(folder, f"ipcontroller-{cluster_id}-{who}.json") for who in ("client", "engine"))]


def forget(path: str, d: dict) -> None:
    """A kept cluster whose controller is gone: end what is left of it (engines here and on the other
    hosts, its watchdog) and remove its files, so that its name starts a new cluster.

    Its connection files must go too: a new controller of the same id would otherwise be read
    at the dead one's ports (``TimeoutError: Hub connection request timed out``)."""
    state = state_of(d)
    watched = watchdog.read(watchdog.state_path(state.folder)) if state else None
    if watched:
        watchdog.end_everything(watched)  # its watchdog exits once the state file is gone
    for f in files(path):
        try:
            os.remove(f)
        except FileNotFoundError:
            pass


def claim(name: str) -> None:
    """The name ``name`` for a new kept cluster: refused (ClusterError) while a cluster of that name
    runs; a dead one's leftovers are removed first."""
    path = IppCluster(cluster_id=PREFIX + check_name(name)).cluster_file
    d = watchdog.read(path)
    if d is not None and controller_runs(d):
        raise ClusterError(
            f"a kept cluster named {name!r} exists: attach it (%mlx_cluster attach {name}) or stop it first"
        )
    forget(path, d or {})


def cluster_files(profile_dir: Optional[str] = None) -> list[str]:
    """Every mlx_nb cluster file of the profile (default: IPython's default profile)."""
    profile_dir = profile_dir or ipp.Cluster().profile_dir
    return sorted(glob.glob(os.path.join(profile_dir, "security", f"cluster-{PREFIX}*.json")))


def load(name: str) -> tuple[IppCluster, EngineState]:
    """The kept cluster ``name``, its processes reattached, and its state; ClusterError if there is none."""
    path = IppCluster(cluster_id=PREFIX + check_name(name)).cluster_file
    if not os.path.exists(path):
        names = [os.path.basename(f)[len("cluster-" + PREFIX) : -5] for f in cluster_files()]
        known = f": kept clusters here are {', '.join(names)}" if names else ": none is kept here"
        raise ClusterError(f"no kept cluster named {name!r}{known} (%mlx_cluster list)")
    d = watchdog.read(path) or {}
    state = state_of(d)
    if state is None or not controller_runs(d):
        forget(path, d)
        how = f"-n {state.spec.n}" if state and not state.spec.remote else "--hostfile HOSTFILE"
        raise ClusterError(
            f"cluster {name!r} is gone: its controller no longer runs (the machine restarted, or its "
            f"processes were killed), and what its ranks held went with it; its files are removed: "
            f"start it anew with %mlx_cluster start {how} --name {name} --keep"
        )
    return IppCluster.from_dict(d, cluster_file=path, shutdown_atexit=False, log_level=40), state


def listing() -> list[dict]:
    """Every kept cluster here: name, ranks, hosts, backend, age, idle time, memory, holder."""
    rows = []
    for path in cluster_files():
        d = watchdog.read(path)
        state = state_of(d or {})
        if state is None:
            continue  # gone meanwhile, or starting
        if not controller_runs(d):
            forget(path, d)  # its processes are gone (the machine restarted, say): nothing to attach
            continue
        memory = 0
        for r in state.ranks:
            try:
                memory += psutil.Process(r.pid).memory_info().rss
            except psutil.Error:
                pass
        used = watchdog.last_used(state.folder) or state.created
        rows.append(
            {
                "name": state.name,
                "ranks": len(state.ranks),
                "hosts": sorted({h.ssh_hostname for h in state.spec.hostfile.hosts}),
                "backend": state.spec.backend,
                "age": time.time() - state.created,
                "idle": time.time() - used,
                "idle_limit": state.idle,
                "memory": memory,
                "holder": asdict(state.holder) if state.holder.alive() else None,
            }
        )
    return rows


def publish(ipc: IppCluster, state: EngineState) -> None:
    """A kept cluster's part of ipyparallel's cluster file: what a kernel needs to attach."""
    if state.keep:
        ipc.mlx_nb = state.to_json()
        ipc.update_cluster_file()


def refuse_held(name: str, holder: Holder, take: bool) -> None:
    """Attaching is refused (ClusterError, one line) while another live kernel holds the cluster, unless ``take``."""
    if holder.alive() and not holder.is_me() and not take:
        since = time.strftime("%H:%M", time.localtime(holder.since))
        raise ClusterError(
            f"cluster {name!r} is attached to another kernel (pid {holder.pid} on {holder.host}, "
            f"since {since}): %mlx_cluster attach {name} --take to take it over"
        )


@dataclass
class Holding:
    """Whether this kernel still holds a kept cluster: another kernel that takes it over
    (``attach --take``) writes itself into the cluster file, read again only when it changed."""

    path: str  # the cluster file
    holder: Holder  # this kernel
    mtime: Optional[float] = None
    taken_by: Optional[Holder] = None

    def check(self, name: str) -> None:
        """ClusterError (one line) once another kernel took the cluster over: it runs no more jobs from this one."""
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            return
        state = state_of(watchdog.read(self.path) or {}) if mtime != self.mtime else None
        if state is not None:  # changed, and not being rewritten
            self.mtime = mtime
            if (state.holder.pid, state.holder.host) != (self.holder.pid, self.holder.host):
                self.taken_by = state.holder
        if self.taken_by is not None:
            h = self.taken_by
            raise ClusterError(
                f"cluster {name!r} was taken over by the kernel pid {h.pid} on {h.host}: "
                f"%mlx_cluster attach {name} --take to take it back"
            )
