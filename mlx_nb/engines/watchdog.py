"""The watchdog: a small process beside every cluster that ends it when nobody owns it any more.

A cluster's processes must not outlive the kernel that started them, however the kernel ends:
``atexit`` does not run after SIGKILL or the OOM killer, and an engine blocked in a native
collective serves no event loop that could notice. So each cluster starts this process in a
session of its own (Jupyter's kill of the kernel's process group does not reach it); it reads
the cluster's state file every half second and ends every process listed there (locally, and
over ssh on the other hosts) when

- the owning process is gone (an owned cluster), or
- the cluster was kept and has been idle past its limit (a kept cluster outlives its kernel),

then removes the cluster's files and exits. It also exits, doing nothing, once the state file
is gone: the cluster was stopped the ordinary way.

    python -m mlx_nb.engines.watchdog STATE_FILE
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import psutil

POLL = 0.5  # seconds between looks


def same_process_runs(pid: int, started: Optional[float]) -> bool:
    """Whether process ``pid``, started at ``started``, still runs: not another process that took
    its pid, and not a zombie (a killed kernel stays one until its parent reaps it). A start time
    of None is not checked."""
    try:
        p = psutil.Process(pid)
        same = started is None or abs(p.create_time() - started) < 1.0
        return same and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tree_command(pids: list[int], sig: str = "KILL") -> str:
    """A shell line (POSIX sh, on Linux and macOS) that sends ``sig`` to each engine of ``pids``,
    to everything it started (its descendants, found with ``pgrep -P``) and to its process group.

    An engine on another host is the leader of a session of its own (ipyparallel's ssh launcher
    starts it so): what its children left behind, reparented to init, is still in its group. The
    descendants are found before anything is signalled, while their parents still run. A pid
    that runs something other than an ipyparallel engine (the host restarted since) is left
    alone; a pid that is gone leaves its group, if any is left, to be ended.

    >>> print(tree_command([42]))  # doctest: +ELLIPSIS
    t=''; g=''; for p in 42; do case "$(ps -o args= -p $p 2>/dev/null)" in *ipyparallel*) ...; true
    """
    roots = " ".join(str(int(pid)) for pid in pids)
    return (
        f"t=''; g=''; for p in {roots}; do case \"$(ps -o args= -p $p 2>/dev/null)\" in "
        '*ipyparallel*) t="$t $p"; g="$g $p";; "") g="$g $p";; esac; done; all=$t; '
        'while [ -n "$t" ]; do t=$(for p in $t; do pgrep -P "$p"; done); all="$all $t"; done; '
        f'for p in $g; do kill -s {sig} -- -$p 2>/dev/null; done; [ -z "$all" ] || kill -s {sig} $all 2>/dev/null; true'
    )


def owner_alive(state: dict) -> bool:
    """Whether the process that owns the cluster still runs (the same process: pid and start time)."""
    pid, started = state.get("owner_pid"), state.get("owner_started")
    return same_process_runs(pid, started) if pid else True


def idle_for(state: dict, path: str) -> float:
    """Seconds since the cluster was last used (the ``.used`` stamp, touched when it is ready and
    after every job); 0 while it starts."""
    try:
        return time.time() - os.stat(path + ".used").st_mtime
    except OSError:
        return 0.0


def end_everything(state: dict) -> None:
    """Kill every listed process tree, here and on the other hosts (all at once); remove the files.

    A listed process here is ended only if it is the same process (pid and start time): a
    cluster found dead long after may have had its pids taken by others."""
    procs: dict[int, psutil.Process] = {}
    for pid, started in state.get("local", []):
        if same_process_runs(pid, started):
            procs.update((p.pid, p) for p in process_tree(pid))
    gentle = state.get("gentle", False)
    steps = [(signal.SIGINT, 1.0), (signal.SIGTERM, 2.0)] if gentle else []
    left = list(procs.values())
    for sig, wait in steps:
        for p in left:
            _quietly(p.send_signal, sig)
        _, left = psutil.wait_procs(left, timeout=wait)
    for p in left:
        _quietly(p.kill)
    psutil.wait_procs(left, timeout=5)
    on_host: dict[tuple, list[int]] = {}
    for r in state.get("remote", []):
        on_host.setdefault((r["host"], *r["ssh"]), []).append(r["pid"])
    with ThreadPoolExecutor(max(len(on_host), 1)) as pool:
        for (host, *ssh), pids in on_host.items():
            cmd = f"{tree_command(pids)}; rm -rf {state['dir']}"
            argv = [*ssh, "--", host, f"exec sh -c {shlex.quote(cmd)}"]  # whatever the login shell is
            quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
            pool.submit(_quietly, subprocess.run, argv, timeout=10, **quiet)
    if state.get("dir"):
        shutil.rmtree(state["dir"], ignore_errors=True)
    for path in state.get("files", []):  # ipyparallel's cluster file
        _quietly(os.remove, path)


def process_tree(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and all its descendants ([] if it is gone)."""
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


def _identities(pids: list[int]) -> list[tuple[int, float]]:
    """(pid, start time) of each process that still runs: what ``same_process_runs`` checks."""
    found = []
    for pid in pids:
        try:
            found.append((pid, psutil.Process(pid).create_time()))
        except psutil.Error:
            pass
    return found


def _quietly(f, *args, **kwargs) -> None:
    try:
        f(*args, **kwargs)
    except Exception:
        pass


def read(path: str) -> Optional[dict]:
    """A JSON file's content (a state file, a cluster file); None if there is none, {} if it
    cannot be read (being rewritten: look again next time)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def watch(path: str) -> str:
    """Watch ``path`` until the cluster stops or must be ended; say which."""
    while True:
        state = read(path)
        if state is None:
            return "stopped"
        if state:
            if not owner_alive(state):
                why = "its owner is gone"
            elif state.get("idle") and idle_for(state, path) > state["idle"]:
                why = f"idle for more than {state['idle']:.0f} s"
            else:
                why = ""
            if why:
                end_everything(state)
                for leftover in (path, path + ".used"):
                    _quietly(os.remove, leftover)
                return why
        time.sleep(POLL)


def start(path: str) -> subprocess.Popen:
    """Start a watchdog for the state file ``path``, in a session of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "mlx_nb.engines.watchdog", path],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )


def write_state(group) -> None:
    """What the watchdog of ``group`` (a RankGroup) must end, written atomically: every process."""
    from . import launch  # the notebook's side only: the watchdog itself stays light

    if group._ipp is None or not os.path.isdir(group.dir):
        return
    local, remote = [p.pid for p in group._controller_tree], []
    if group._ipp.controller is not None:
        local.append(group._ipp.controller.pid)
    for es in group._ipp.engines.values():
        for el in launch.set_launchers(es):
            if launch.is_ssh(el):
                remote.append({"host": el.location, "pid": el.pid, "ssh": [*el.ssh_cmd, *el.ssh_args]})
            elif el.pid:
                local.append(el.pid)
    me = psutil.Process()
    state = {
        # a kept cluster has no owner: it outlives its kernel, until its idle limit
        "owner_pid": None if group.keep else me.pid,
        "owner_started": me.create_time(),
        "created": group.created,
        "idle": group.idle,
        "local": _identities(local),
        "remote": remote,
        "dir": group.dir,
        "files": [
            group._ipp.cluster_file,
            group.client_file,
            group.client_file.replace("-client.json", "-engine.json"),
        ],
        "gentle": group.spec.backend in ("jaccl", "jaccl-ring"),
    }
    tmp = group.state_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, group.state_file)


if __name__ == "__main__":
    watch(sys.argv[1])
