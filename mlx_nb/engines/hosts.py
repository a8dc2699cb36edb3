"""The hosts of a cluster, seen from the notebook: addresses, preflight over ssh, remote commands."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from .. import rank_env
from ..display import Table
from ..hostfile import Hostfile, is_local
from ..preflight import Finding, Severity, check_cluster, gather_command
from ..rank import blas
from ..rank.session import mlx_version
from . import ClusterError
from .launch import ssh_run


def _ssh_address(host: str, ssh_cmd: Sequence[str]) -> str:
    """The address ``ssh_cmd host`` connects to (ssh config aliases resolved), else ``host``."""
    try:
        out = subprocess.run(
            [*ssh_cmd, "-G", "--", host], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return host
    return next((line.split()[1] for line in out.splitlines() if line.startswith("hostname ")), host)


def controller_ip(hostfile: Hostfile, ssh_cmd: Sequence[str] = ("ssh",)) -> str:
    """The address of this machine that the hostfile's other hosts reach it on (127.0.0.1 if none).

    The local end of the route to the first remote host (a UDP connect sends nothing).
    """
    remote = [h for h in hostfile.hosts if not is_local(h.ssh_hostname)]
    if not remote:
        return "127.0.0.1"
    target = _ssh_address(remote[0].ssh_hostname, ssh_cmd)
    try:
        addr = socket.getaddrinfo(target, 22, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except OSError:
        if not remote[0].ips:
            raise ClusterError(
                f"cannot resolve host {remote[0].ssh_hostname!r} (rank {remote[0].rank}): "
                'check the name, or give its IP in the hostfile\'s "ips"'
            ) from None
        addr = remote[0].ips[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((addr, 9))
        except OSError as e:
            raise ClusterError(f"no route to host {remote[0].ssh_hostname} ({addr}): {e}") from None
        return s.getsockname()[0]


def on_hosts(
    hosts: Sequence[str], cmd: str, ssh_cmd: Sequence[str], timeout: float = 15.0
) -> dict[str, tuple[int, str]]:
    """Run ``cmd`` on every host of ``hosts`` at once; each host's (exit code, output)."""
    names = list(dict.fromkeys(hosts))
    if not names:
        return {}
    with ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(lambda h: ssh_run(h, cmd, list(ssh_cmd), timeout), names)))


def check_hosts(
    hostfile: Hostfile,
    backend: Optional[str] = None,
    python: Optional[str] = None,
    ssh_cmd: Sequence[str] = ("ssh",),
    timeout: float = 30.0,
    env: Optional[dict[str, str]] = None,
) -> list[Finding]:
    """Preflight findings for every host of ``hostfile``, gathered over ssh in parallel.

    One round trip per host (``preflight.gather_command``); an unreachable host is a
    ``fail`` finding of check ``ssh`` within about 5 s. Local entries are gathered here.
    ``env`` is what the ranks get on top of the hostfile's "envs" (its ``MLX_NB_BLAS`` counts).

    >>> for f in check_hosts(hostfiles.load("hosts.json")): print(f)  # doctest: +SKIP
    """
    from mlx_nb import __version__

    python = python or sys.executable
    ranks_env = dict(e.partition("=")[::2] for e in hostfile.envs) | dict(env or {})  # as the ranks get it
    cmd = gather_command(python, ranks_env.get(blas.ENV))
    names = list(dict.fromkeys(h.ssh_hostname for h in hostfile.hosts))

    def gather(host: str) -> tuple[int, str]:
        if is_local(host):
            p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
            return p.returncode, p.stdout + p.stderr
        return ssh_run(host, cmd, list(ssh_cmd), timeout)

    with ThreadPoolExecutor(len(names)) as pool:
        results = dict(zip(names, pool.map(gather, names)))
    unreachable = [
        Finding(h, "ssh", Severity.FAIL, out.strip()) for h, (rc, out) in results.items() if rc in (124, 255, 127)
    ]
    outputs = {h: out for h, (rc, out) in results.items() if rc not in (124, 255, 127)}
    here = {"python": ".".join(map(str, sys.version_info[:3])), "mlx": mlx_version() or "-", "mlx_nb": __version__}
    try:  # what the launch sets per rank (CUDA_VISIBLE_DEVICES for nccl): which GPU each rank gets
        envs = {r.rank: r.env for r in rank_env.rank_launch(hostfile, backend, env=env)}
    except ValueError:  # HostfileError too
        envs = {}
    found = check_cluster(hostfile, outputs, backend, here, envs)
    failed = {f.host for f in unreachable}
    return unreachable + [f for f in found if f.host not in failed]


def refuse_on(findings: list[Finding]) -> None:
    """Raise ClusterError, with every host's findings, if any host fails or mlx / mlx_nb differ."""
    bad = [f for f in findings if f.status is Severity.FAIL or f.refuses_start]
    if bad:
        hosts = ", ".join(dict.fromkeys(f.host for f in bad))
        table = Table(
            ["host", "check", "status", "message"], [(f.host, f.check, f.status, f.message) for f in findings]
        )
        raise ClusterError(f"preflight failed on {hosts}; nothing was started:\n{table!r}")
