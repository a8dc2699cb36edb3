"""Kept clusters: found again by name, through ipyparallel's own cluster file.

ipyparallel writes a cluster file for every cluster (``<profile>/security/cluster-<id>.json``:
the controller's and each engine set's launcher state) and ``Cluster.from_file`` reconnects
to the same processes. mlx_nb adds its own part to that file, under ``"mlx_nb"``: the spec,
the ranks, the setup cells, who holds the cluster, and each engine set's launcher class (one
cluster mixes local and ssh sets; ipyparallel records one class for all). No other registry.
The files are readable by their user only: they hold the controller's keys.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import re
import time
from dataclasses import asdict
from functools import partial
from typing import Optional

import cloudpickle
import ipyparallel as ipp
import psutil
from ipyparallel.cluster import launcher

from .. import hostfile as hostfiles
from . import ClusterError, watchdog
from .watchdog import same_process_runs

PREFIX = "mlx_nb-"  # cluster ids of mlx_nb's clusters
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def check_name(name: str) -> str:
    """A kept cluster's name: letters, digits, ``_ . -``, at most 64 characters."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"cluster name {name!r}: use letters, digits, _ . - (e.g. llama-70b), at most 64")
    return name


def parse_idle(spec) -> Optional[float]:
    """'2h' / '30m' / '90s' / '1d' / seconds -> seconds; None: no limit.

    >>> parse_idle("2h"), parse_idle(90), parse_idle(None)
    (7200.0, 90.0, None)
    """
    if spec is None:
        return None
    if isinstance(spec, (int, float)):
        seconds = float(spec)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(spec).lower())
        if not m:
            raise ValueError(f"idle {spec!r}: give a duration like 90s, 30m, 2h or 1d")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not seconds > 0:
        raise ValueError(f"idle {spec!r}: give a positive duration like 30m")
    return seconds


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


def me() -> dict:
    """This process, as a holder: pid, start time, host."""
    p = psutil.Process()
    return {"pid": p.pid, "started": p.create_time(), "host": os.uname().nodename, "since": time.time()}


def holder_alive(holder: Optional[dict]) -> bool:
    if not holder or holder.get("host") != os.uname().nodename:
        return bool(holder)  # on another machine: assume it holds on
    return same_process_runs(holder["pid"], holder["started"])


def controller_runs(d: dict) -> bool:
    """Whether the controller of a cluster file's content ``d`` still runs (the same process, not
    a zombie): without it nothing reaches the ranks, and the cluster is dead."""
    pid = ((d.get("controller") or {}).get("state") or {}).get("pid")
    return bool(pid) and same_process_runs(pid, (d.get("mlx_nb") or {}).get("controller_started"))


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
    folder = (d.get("mlx_nb") or {}).get("dir")
    state = watchdog.read(os.path.join(folder, "watch.json")) if folder else None
    if state:
        watchdog.end_everything(state)  # its watchdog exits once the state file is gone
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


def encode(obj) -> str:
    return base64.b64encode(cloudpickle.dumps(obj)).decode()


def decode(text: str):
    return cloudpickle.loads(base64.b64decode(text))


def spec_state(spec) -> dict:
    d = asdict(spec)
    d["hostfile"] = spec.hostfile.to_json()
    return d


def spec_from_state(d: dict):
    from ..spec import ClusterSpec

    d = dict(d)
    d["hostfile"] = hostfiles.loads(json.dumps(d["hostfile"]))
    return ClusterSpec(**d)


def cluster_files(profile_dir: Optional[str] = None) -> list[str]:
    """Every mlx_nb cluster file of the profile (default: IPython's default profile)."""
    profile_dir = profile_dir or ipp.Cluster().profile_dir
    return sorted(glob.glob(os.path.join(profile_dir, "security", f"cluster-{PREFIX}*.json")))


def load(name: str) -> IppCluster:
    """The kept cluster ``name``, its processes reattached; ClusterError if there is none."""
    path = IppCluster(cluster_id=PREFIX + check_name(name)).cluster_file
    if not os.path.exists(path):
        names = [os.path.basename(f)[len("cluster-" + PREFIX) : -5] for f in cluster_files()]
        known = f": kept clusters here are {', '.join(names)}" if names else ": none is kept here"
        raise ClusterError(f"no kept cluster named {name!r}{known} (%mlx_cluster list)")
    d = watchdog.read(path) or {}
    if not controller_runs(d):
        forget(path, d)
        spec = (d.get("mlx_nb") or {}).get("spec") or {}
        local = all(hostfiles.is_local(h["ssh"]) for h in (spec.get("hostfile") or {}).get("hosts", []))
        how = f"-n {spec['n']}" if local and spec.get("n") else "--hostfile HOSTFILE"
        raise ClusterError(
            f"cluster {name!r} is gone: its controller no longer runs (the machine restarted, or its "
            f"processes were killed), and what its ranks held went with it; its files are removed: "
            f"start it anew with %mlx_cluster start {how} --name {name} --keep"
        )
    return IppCluster.from_dict(d, cluster_file=path, shutdown_atexit=False, log_level=40)


def listing() -> list[dict]:
    """Every kept cluster here: name, ranks, hosts, backend, age, idle time, memory, holder."""
    rows = []
    for path in cluster_files():
        d = watchdog.read(path)
        state = (d or {}).get("mlx_nb") or {}
        if not state.get("spec"):
            continue  # gone meanwhile, or starting
        if not controller_runs(d):
            forget(path, d)  # its processes are gone (the machine restarted, say): nothing to attach
            continue
        pids = [r["pid"] for r in state.get("ranks", [])]
        memory = 0
        for pid in pids:
            try:
                memory += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        try:
            used = os.stat(os.path.join(state["dir"], "watch.json.used")).st_mtime
        except OSError:
            used = state.get("created", time.time())
        hosts = sorted({h["ssh"] for h in state["spec"]["hostfile"]["hosts"]})
        rows.append(
            {
                "name": state["name"],
                "ranks": len(state.get("ranks", [])),
                "hosts": hosts,
                "backend": state["spec"]["backend"],
                "age": time.time() - state.get("created", time.time()),
                "idle": time.time() - used,
                "idle_limit": state.get("idle"),
                "memory": memory,
                "holder": state.get("holder") if holder_alive(state.get("holder")) else None,
            }
        )
    return rows


def publish(group) -> None:
    """A kept cluster's part of ipyparallel's cluster file: what a kernel needs to attach."""
    if not group.keep or group._ipp is None:
        return
    group._ipp.mlx_nb = {
        "name": group.name,
        "spec": spec_state(group.spec),
        "ranks": [asdict(r) for r in group.ranks],
        "tag": group._tag,
        "spare": group._spare,
        "generation": group._generation,
        "dir": group.dir,
        "created": group.created,
        "idle": group.idle,
        "holder": group.holder,
        "setup": group.setup_state,
        "controller_started": group.controller_started,
    }
    group._ipp.update_cluster_file()


def check_holder(group) -> None:
    """A kept cluster taken over by another kernel runs no more jobs from this one."""
    if not group.keep or group._ipp is None:
        return
    try:
        mtime = os.stat(group._ipp.cluster_file).st_mtime
    except OSError:
        return
    if mtime != getattr(group, "_holder_mtime", None):
        group._holder_mtime = mtime
        with open(group._ipp.cluster_file) as f:
            holder = (json.load(f).get("mlx_nb") or {}).get("holder") or {}
        if holder.get("pid") not in (None, group.holder["pid"]) or holder.get("host") != group.holder["host"]:
            group._taken = holder
    if getattr(group, "_taken", None):
        h = group._taken
        raise ClusterError(
            f"cluster {group.name!r} was taken over by the kernel pid {h['pid']} on {h['host']}: "
            f"%mlx_cluster attach {group.name} --take to take it back"
        )
