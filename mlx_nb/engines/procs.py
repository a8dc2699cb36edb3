"""Processes: which run, what they started, and how they are ended (here and on other hosts).

No ipyparallel here: the watchdog (``engines.watchdog``), a small process of its own, uses
this as the notebook's side does.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import psutil

# On JACCL a SIGKILL can leave RDMA unusable until the Mac restarts: its ranks get SIGINT,
# then SIGTERM, with a wait after each, before the SIGKILL every other backend gets at once
GENTLE_BACKENDS = ("jaccl", "jaccl-ring")
GENTLE_STEPS = ((signal.SIGINT, 1.0), (signal.SIGTERM, 2.0))


def stopped_gently(backend: str) -> bool:
    """Whether the ranks of ``backend`` are asked to stop (SIGINT, SIGTERM) before a SIGKILL.

    >>> stopped_gently("jaccl"), stopped_gently("ring")
    (True, False)
    """
    return backend in GENTLE_BACKENDS


def end(
    procs: Sequence[psutil.Process],
    gentle: bool = False,
    others: Sequence[Any] = (),
    other_alive: Callable[[Any], bool] = lambda other: False,
) -> bool:
    """End the local processes ``procs`` (whole trees already), ``gentle`` ly or at once; True
    if one had to be SIGKILLed after the gentler signals. ``others`` (objects with
    ``signal(sig)``, alive while ``other_alive`` says so) get the gentle signals too; what is
    left of them is the caller's to end."""
    procs, others, killed = list(procs), list(others), gentle
    for sig, wait in GENTLE_STEPS if gentle else ():
        for p in procs:
            quietly(p.send_signal, sig)
        for other in others:
            quietly(other.signal, sig)
        procs = wait_exited(procs, timeout=wait)
        deadline = time.monotonic() + wait
        while others and time.monotonic() < deadline:
            others = [o for o in others if other_alive(o)]
            time.sleep(0.05)
        if not procs and not others:
            killed = False
            break
    for p in procs:
        quietly(p.kill)
    wait_exited(procs, timeout=5)
    return killed


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


def process_tree(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and all its descendants ([] if it is gone)."""
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


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


def started(pid: int) -> Optional[float]:
    """When process ``pid`` started (None if it is gone): with the pid, what tells it from a later process."""
    try:
        return psutil.Process(pid).create_time() if pid else None
    except psutil.Error:
        return None


def identities(pids: list[int]) -> list[tuple[int, float]]:
    """(pid, start time) of each process that still runs: what ``same_process_runs`` checks."""
    return [(pid, t) for pid in pids if (t := started(pid)) is not None]


def wait_exited(procs: list, timeout: float) -> list:
    """Wait until each process has exited; return those still running after ``timeout``.

    An exited process whose parent died stays a zombie until init reaps it (seconds,
    on some systems): it holds nothing, so it counts as gone.
    """
    deadline = time.monotonic() + timeout
    left = list(procs)
    while left:
        left = [p for p in left if running(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return left


def alive(pid: Optional[int]) -> bool:
    try:
        return bool(pid) and running(psutil.Process(pid))
    except psutil.Error:
        return False


def running(p: psutil.Process) -> bool:
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


def quietly(f: Callable, *args: Any, **kwargs: Any) -> None:
    try:
        f(*args, **kwargs)
    except Exception:
        pass
