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
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import psutil

from .procs import end, identities, process_tree, quietly, same_process_runs, tree_command

POLL = 0.5  # seconds between looks


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
    end(list(procs.values()), state.get("gentle", False))
    on_host: dict[tuple, list[int]] = {}
    for r in state.get("remote", []):
        on_host.setdefault((r["host"], *r["ssh"]), []).append(r["pid"])
    with ThreadPoolExecutor(max(len(on_host), 1)) as pool:
        for (host, *ssh), pids in on_host.items():
            cmd = f"{tree_command(pids)}; rm -rf {state['dir']}"
            argv = [*ssh, "--", host, f"exec sh -c {shlex.quote(cmd)}"]  # whatever the login shell is
            quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
            pool.submit(quietly, subprocess.run, argv, timeout=10, **quiet)
    if state.get("dir"):
        shutil.rmtree(state["dir"], ignore_errors=True)
    for path in state.get("files", []):  # ipyparallel's cluster file
        quietly(os.remove, path)


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
                    quietly(os.remove, leftover)
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


def write_state(
    path: str,
    *,
    keep: bool,
    created: float,
    idle: Optional[float],
    folder: str,
    gentle: bool,
    local: list[int],
    remote: list[dict],
    files: list[str],
) -> None:
    """What the watchdog must end, written atomically to ``path``: every process of the cluster
    (``local`` pids here, ``remote`` engines: host, pid and ssh command), its ``folder`` and
    ``files``; ``gentle``: its ranks get SIGINT and SIGTERM before SIGKILL (procs.end)."""
    me = psutil.Process()
    state = {
        # a kept cluster has no owner: it outlives its kernel, until its idle limit
        "owner_pid": None if keep else me.pid,
        "owner_started": me.create_time(),
        "created": created,
        "idle": idle,
        "local": identities(local),
        "remote": remote,
        "dir": folder,
        "files": files,
        "gentle": gentle,
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


if __name__ == "__main__":
    watch(sys.argv[1])
