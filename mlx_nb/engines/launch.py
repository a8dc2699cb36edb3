"""How rank processes start (locally, over ssh, under MPI), and how they are watched and ended.

Each ``*_launcher_kwargs`` returns the keyword arguments (``n`` included) of one engine
set, for ``ipp.Cluster.start_engines`` with the matching ``engine_launcher_class``:

    c = ipp.Cluster(n=0, controller_ip="10.0.0.1")
    c.engine_launcher_class = "ssh"
    c.start_engines_sync(engine_set_id="rank1",
                         **ssh_engine_launcher_kwargs("mac2", "/opt/venv/bin/python", ["ssh"], {"MLX_RANK": "1"}))

    c.engine_launcher_class = "mpi"
    c.start_engines_sync(engine_set_id="mpi", **mpi_engine_launcher_kwargs(2, sys.executable, {}))
"""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from ipyparallel.cluster.launcher import SSHLauncher

from . import procs
from .procs import tree_command

# a host that does not answer fails in seconds, not after the TCP timeout
SSH_OPTIONS = ["-o", "ConnectTimeout=5", "-o", "BatchMode=yes"]
_SSH_FAILED = re.compile(
    r"^(ssh: .*|.*Permission denied.*|Host key verification failed.*|kex_exchange_identification.*|"
    r"Connection (closed|reset|timed out).*)$",
    re.MULTILINE,
)
_PGID = re.compile(r"^__mlx_nb_pgid=(\d+)__\n", re.MULTILINE)

# Run as the engine command under mpirun: rank from Open MPI, and without ipyparallel's
# --mpi flag, which imports mpi4py (or dies without it); mpi4py's MPI_Init makes MLX's own
# MPI_Init abort with "MPI_Init invoked multiple times".
MPI_ENGINE = (
    'export MLX_RANK="${OMPI_COMM_WORLD_RANK:?this engine was not started by Open MPI mpirun}"; '
    'for a; do shift; [ "$a" = --mpi ] || set -- "$@" "$a"; done; exec "$0" "$@"'
)
# Debian's Open MPI refuses root without --allow-run-as-root, and more ranks than cores
# without --oversubscribe; its default core binding would pin each engine to one core
MPI_ARGS = ["--oversubscribe", "--bind-to", "none"]
MPI_ROOT_ARGS = ["--allow-run-as-root"]


def local_mpi_args(version: str) -> list[str]:
    """The ranks of a job on this machine talk over shared memory only.

    Open MPI's TCP transport listens on every interface (its ``btl_tcp_if_include`` picks
    the addresses it advertises, not the one it binds); its shared-memory transport is
    ``vader`` up to 4.x and ``sm`` from 5.0. ``version`` is ``mpirun --version``'s first line.

    >>> local_mpi_args("mpirun (Open MPI) 4.1.4")
    ['--mca', 'btl', 'self,vader']
    """
    major = re.search(r"Open MPI\)? (\d+)\.", version)
    return ["--mca", "btl", "self,sm" if major and int(major.group(1)) >= 5 else "self,vader"]


def scp_command(ssh_cmd: list[str]) -> list[str]:
    """The scp matching an ssh command (same config, key and options; ``-p PORT`` becomes ``-P``).

    >>> scp_command(["ssh", "-F", "cfg", "-p", "2222"])
    ['scp', '-F', 'cfg', '-P', '2222']
    """
    return ["scp"] + ["-P" if a == "-p" else a for a in ssh_cmd[1:]]


def ssh_engine_launcher_kwargs(host: str, python: str, ssh_cmd: list[str], env: dict[str, str]) -> dict:
    """``start_engines`` kwargs for one engine on ``host`` over ssh, with ``env`` set in it.

    For ``engine_launcher_class = "ssh"`` (``SSHEngineSetLauncher``). ``host`` is what
    ``ssh`` takes (alias, name or ``user@host``), ``python`` the engine's interpreter there.
    ``env`` reaches the engine: the launcher sends the set's ``environment`` (with the
    controller's ``IPP_CONNECTION_INFO``) to ``ipyparallel.cluster.shellcmd`` on the host,
    which sets it before starting the engine (a value of "" unsets the variable there).
    Nothing is copied over scp: the engine reads its connection info from that variable.

    Keep the engine's nanny (no ``--IPEngine.enable_nanny=False``) for remote engines: it
    tells the controller within about a second that its engine died (without it, heartbeats
    take ``period * max_heartmonitor_misses``), and it is how ``Client.send_signal`` reaches
    an engine on another host; the launcher's ``pid`` is a process id on that host.
    """
    return {
        "n": 1,
        "engines": {host: {"n": 1, "to_send": []}},
        "ssh_cmd": list(ssh_cmd),
        "scp_cmd": scp_command(ssh_cmd),
        # the launcher puts remote_python into ssh's command line, which the host's shell
        # splits, but starts engine_cmd there as an argv list: a path with a space needs both
        "remote_python": shlex.quote(python),
        "engine_cmd": [python, "-m", "ipyparallel.engine"],
        "environment": dict(env),
    }


def ssh_run(host: str, cmd: str, ssh_cmd: list[str], timeout: float = 30.0) -> tuple[int, str]:
    """Run the shell line ``cmd`` on ``host``; ``(exit code, stdout and stderr)``.

    Bounded: a host that does not answer returns ``(255, "cannot reach ...")`` within
    about 5 s, and a command that runs past ``timeout`` returns ``(124, ...)`` and is
    killed on the host too (with all it started).

    >>> ssh_run("mac2", "uname -m", ["ssh"])  # doctest: +SKIP
    (0, 'arm64\\n')
    """
    # sshd runs each command in a session of its own, so the shell's pid is its process group
    remote = f"echo __mlx_nb_pgid=$$__ >&2; exec sh -c {shlex.quote(cmd)}"
    # "--": a host that begins with "-" must not become an ssh option (-oProxyCommand=... runs locally)
    argv = [*ssh_cmd, *SSH_OPTIONS, "--", host, remote]
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out, err = (x.decode(errors="replace") if x else "" for x in (e.stdout, e.stderr))
        group = _PGID.search(err)
        if group:
            subprocess.run(
                [*ssh_cmd, *SSH_OPTIONS, "--", host, f"kill -TERM -- -{group.group(1)}"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=10,
            )
        return 124, out + _PGID.sub("", err) + f"\n`{cmd}` on {host} did not finish within {timeout:g} s"
    except FileNotFoundError:
        return 127, f"{ssh_cmd[0]} not found: install an OpenSSH client"
    out, err = p.stdout.decode(errors="replace"), _PGID.sub("", p.stderr.decode(errors="replace"))
    # 255 is ssh's own failure, unless the command itself exited 255 (then ssh printed nothing)
    failed = _SSH_FAILED.search(err) if p.returncode == 255 else None
    if failed:
        return 255, (
            f"cannot reach {host} over ssh ({failed.group(0).strip()}): check the host name, that sshd "
            f"runs there, and that `{shlex.join([*ssh_cmd, host, 'true'])}` works without a password"
        )
    return p.returncode, out + err


# ---------------------------------------------------------------------- MPI
# what MLX dlopens (MLX_MPI_LIBNAME overrides it), then where else Open MPI's libmpi may be
_LIBMPI = (
    ("libmpi.dylib", "/opt/homebrew/lib/libmpi.dylib", "/usr/local/lib/libmpi.dylib")
    if sys.platform == "darwin"
    else ("libmpi.so", "libmpi.so.40")  # .so.40 without libopenmpi-dev, which adds libmpi.so
)


def _loads(name: str) -> bool:
    try:
        ctypes.CDLL(name)
        return True
    except OSError:
        return False


def libmpi() -> Optional[str]:
    """The libmpi MLX should load: ``$MLX_MPI_LIBNAME``, MLX's default, or another found; None if none loads."""
    if "MLX_MPI_LIBNAME" in os.environ:
        name = os.environ["MLX_MPI_LIBNAME"]
        return name if name and _loads(name) else None
    return next((name for name in _LIBMPI if _loads(name)), None)


def mpi_available() -> tuple[bool, str]:
    """Whether ranks can start under MPI here, and why not.

    MLX's mpi backend needs Open MPI (it refuses MPICH), ``mpirun`` on PATH, and libmpi.

    >>> mpi_available()  # doctest: +SKIP
    (False, 'mpirun not found: install Open MPI (apt-get install openmpi-bin, brew install open-mpi)')
    """
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        return False, "mpirun not found: install Open MPI (apt-get install openmpi-bin, brew install open-mpi)"
    try:
        version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"`{mpirun} --version` failed: {e}"
    if "Open MPI" not in version:
        first = version.strip().splitlines()[0] if version.strip() else "an unknown MPI"
        return False, f"{mpirun} is {first}, but MLX's mpi backend needs Open MPI: install it (openmpi-bin)"
    if libmpi() is None:
        which = os.environ.get("MLX_MPI_LIBNAME") or " or ".join(_LIBMPI)
        return False, (
            f"mpirun is Open MPI, but its library {which} cannot be loaded: install libopenmpi-dev "
            "(or set MLX_MPI_LIBNAME to the path of libmpi)"
        )
    return True, version.strip().splitlines()[0]


def mpi_engine_launcher_kwargs(n: int, python: str, env: dict[str, str]) -> dict:
    """``start_engines`` kwargs for ``n`` engines on this machine under ``mpirun``, one per rank.

    For ``engine_launcher_class = "mpi"`` (``MPIEngineSetLauncher``). Each engine gets
    ``env`` plus ``MLX_RANK``, its MPI rank, and joins the group with
    ``mx.distributed.init(backend="mpi")``. No mpi4py is needed (nor wanted: see ``MPI_ENGINE``).

    >>> c.start_engines_sync(engine_set_id="mpi", **mpi_engine_launcher_kwargs(2, sys.executable, {}))  # doctest: +SKIP
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of ranks, got {n!r}")
    env = dict(env)
    lib = libmpi()
    if lib and lib != _LIBMPI[0] and "MLX_MPI_LIBNAME" not in env:
        env["MLX_MPI_LIBNAME"] = lib
    return {
        "n": n,
        "mpi_cmd": [shutil.which("mpirun") or "mpirun"],
        "mpi_args": (MPI_ROOT_ARGS if os.geteuid() == 0 else []) + MPI_ARGS + local_mpi_args(mpi_available()[1]),
        "engine_cmd": ["sh", "-c", MPI_ENGINE, python, "-m", "ipyparallel.engine"],
        "environment": env,
    }


# ---------------------------------------------------------------------- processes
def set_launchers(engine_set: Any) -> list:
    """The launchers of one engine set: one per engine, or the set itself (mpirun's)."""
    if engine_set is None:
        return []
    return list(engine_set.launchers.values()) if hasattr(engine_set, "launchers") else [engine_set]


def is_ssh(launcher: Any) -> bool:
    return isinstance(launcher, SSHLauncher)


def launcher_alive(launcher: Any) -> bool:
    """Whether a launcher's process still runs."""
    # ipyparallel's launchers keep a thread waiting for their process to exit: asking it
    # costs microseconds (a process table lookup costs ~0.1 ms, and this runs before every cell)
    thread = getattr(launcher, "_wait_thread", None)
    if thread is not None:
        return thread.is_alive()
    # not waited on yet: an ssh launcher's pid is on the other host, so only the thread would know
    return is_ssh(launcher) or procs.alive(launcher.pid)


def engine_output(text: str, lines: int = 20) -> str:
    """The tail of an engine's output, without ipyparallel's log lines and MLX ring noise."""
    keep = [
        line.strip()
        for line in text.splitlines()
        if line.strip()
        and not line.startswith("Output for ")
        and not re.search(r"\[(IPEngine|KernelNanny)[.\]]|^\s*\[ring\]", line)
    ]
    return "\n".join("  " + line for line in keep[-lines:])


def end(local: list, remote: list, gentle: bool = False) -> bool:
    """End local processes and ssh launchers' remote engines with all they started; True if one
    had to be SIGKILLed after gentler signals (``gentle``: procs.GENTLE_STEPS; else SIGKILL at
    once). ``local`` are whole trees already; a remote engine's tree is found on its host."""
    killed = procs.end(local, gentle, remote, launcher_alive)
    # what the remote engines started outlives them unless it is ended too (their engines
    # themselves, when a gentler signal ended them already)
    end_remote(remote)
    return killed


def end_remote(launchers: list, sig: str = "KILL") -> None:
    """Send ``sig`` to each ssh launcher's engine on its host and to everything it started:
    one ssh per host, all hosts at once, each bounded by ``ssh_run``'s timeout."""
    by_host: dict[tuple, list[int]] = {}
    for el in launchers:
        if el.pid:
            by_host.setdefault((el.location, *el.ssh_cmd, *el.ssh_args), []).append(el.pid)
    if not by_host:
        return
    with ThreadPoolExecutor(len(by_host)) as pool:
        for (host, *ssh), pids in by_host.items():
            pool.submit(ssh_run, host, tree_command(pids, sig), ssh, 10.0)
