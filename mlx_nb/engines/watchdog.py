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
from typing import TYPE_CHECKING, Optional

import psutil

from .procs import end, identities, process_tree, quietly, same_process_runs, stopped_gently, tree_command

if TYPE_CHECKING:
    from .state import EngineState

POLL = 0.5  # seconds between looks


def owner_alive(state: dict) -> bool:
    """Whether the process that owns the cluster still runs (the same process: pid and start time)."""
    pid, started = state.get("owner_pid"), state.get("owner_started")
    return same_process_runs(pid, started) if pid else True


def idle_for(path: str) -> float:
    """Seconds since the cluster was last used (the ``.used`` stamp, touched when it is ready and
    after every job); 0 while it starts."""
    used = last_used(os.path.dirname(path))
    return 0.0 if used is None else time.time() - used


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
            elif state.get("idle") and idle_for(path) > state["idle"]:
                why = f"idle for more than {state['idle']:.0f} s"
            else:
                why = ""
            if why:
                end_everything(state)
                for leftover in (path, path + ".used"):
                    quietly(os.remove, leftover)
                return why
        time.sleep(POLL)


# ------------------------------------------------------------ the notebook's side
def state_path(folder: str) -> str:
    """The watchdog's state file of the cluster whose folder is ``folder``."""
    return os.path.join(folder, "watch.json")


def start(folder: str) -> subprocess.Popen:
    """Start a watchdog for the cluster whose folder is ``folder``, in a session of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "mlx_nb.engines.watchdog", state_path(folder)],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )


def write_state(state: EngineState, local: list[int], remote: list[dict], files: list[str]) -> None:
    """What the watchdog of the cluster ``state`` describes must end, written atomically: every
    process (``local`` pids here, ``remote`` engines: host, pid and ssh command), its folder and
    ``files``. A kept cluster has no owner: it outlives its kernel, until its idle limit."""
    me = psutil.Process()
    watched = {
        "owner_pid": None if state.keep else me.pid,
        "owner_started": me.create_time(),
        "created": state.created,
        "idle": state.idle,
        "local": identities(local),
        "remote": remote,
        "dir": state.folder,
        "files": files,
        "gentle": stopped_gently(state.spec.backend),
    }
    path = state_path(state.folder)
    with open(path + ".tmp", "w") as f:
        json.dump(watched, f)
    os.replace(path + ".tmp", path)


def touch(folder: str) -> None:
    """The cluster was used now (a kept cluster's idle limit counts from here)."""
    used = state_path(folder) + ".used"
    try:
        os.utime(used)
    except FileNotFoundError:
        # never touched yet; or the folder is gone (removed by hand): the stamp is not worth
        # failing the user's cell for
        quietly(lambda: open(used, "w").close())
    except OSError:
        pass


def last_used(folder: str) -> Optional[float]:
    """When the cluster was last used (``touch``); None if it never was."""
    try:
        return os.stat(state_path(folder) + ".used").st_mtime
    except OSError:
        return None


if __name__ == "__main__":
    watch(sys.argv[1])
