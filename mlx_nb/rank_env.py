"""Each rank's launch environment from a hostfile, exactly as ``mlx.launch`` sets it.

Mirrors the launch half of ``mlx._distributed_utils``: the environment variables and the files
(the ring's ``MLX_HOSTFILE``, JACCL's ``MLX_IBV_DEVICES``) each rank starts with, Open MPI's
hostfile, and free ports for the ring. Pure, as mlx_nb.hostfile is (which reads and checks
hostfiles); nothing here starts a process.

    launches = rank_launch(load("m3-ultra-jaccl.json"), "jaccl")
    print(describe(load("m3-ultra-jaccl.json")))
"""

from __future__ import annotations

import json
import random
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Union

from .hostfile import (
    NCCL_PORT,
    STARTING_PORT,
    Host,
    Hostfile,
    HostfileError,
    check_env,
    from_hosts,  # noqa: F401  (the doctests use it)
    peers,
    rdma_devices,
    validate,
)

__all__ = ["RING_PORTS", "RankLaunch", "describe", "free_ports", "mpirun_hostfile", "rank_launch"]


@dataclass
class RankLaunch:
    """What one rank needs at process start, as ``mlx.launch`` would give it.

    ``env`` is set as is; each entry of ``files`` names an environment variable
    whose value must be the path of a file holding the given content (MLX reads
    ``MLX_HOSTFILE`` and ``MLX_IBV_DEVICES`` that way; ``mlx.launch`` writes the
    content with ``echo``, so its files end with one extra newline).
    """

    rank: int
    host: str
    env: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)


def _env_dict(entries: list[str], where: str) -> dict[str, str]:
    out = {}
    for e in entries:
        check_env(e, where)
        name, _, value = e.partition("=")
        out[name] = value
    return out


def rank_launch(
    hostfile: Hostfile,
    backend: Optional[str] = None,
    *,
    starting_port: int = STARTING_PORT,
    ports: Optional[list[int]] = None,
    connections_per_ip: int = 1,
    env: Optional[Union[dict[str, str], list[str]]] = None,
    nccl_port: int = NCCL_PORT,
    repeat_hosts: int = 1,
) -> list[RankLaunch]:
    """Per-rank environment and files, exactly as ``mlx.launch --backend BACKEND`` sets them.

    Every rank gets the hostfile's ``envs`` then ``env`` (a dict or "K=V" list), then:

    - ring: ``MLX_RANK``, file ``MLX_HOSTFILE`` (per rank a list of "ip:port", one per
      IP and connection, ports counting up from ``starting_port``; empty for one rank).
    - jaccl, jaccl-ring: ``MLX_RANK``, ``MLX_JACCL_COORDINATOR`` (rank 0's first IP and
      ``starting_port``), ``MLX_JACCL_RING=1`` for jaccl-ring, file ``MLX_IBV_DEVICES``
      (the rdma matrix).
    - nccl: ``MLX_RANK``, ``NCCL_HOST_IP`` (rank 0's first IP), ``NCCL_PORT``,
      ``MLX_WORLD_SIZE``, ``CUDA_VISIBLE_DEVICES`` = rank % ``repeat_hosts``.
    - mpi: only the envs: mpirun assigns ranks, filling each host's slots in the order of
      ``mpirun_hostfile`` (ranks are listed in that order). Start the engines under
      ``mpirun --hostfile FILE -x K=V ...``; ``mlx.launch --backend mpi`` itself fails on
      Open MPI 4.1 (it passes ``--output :raw``). Where MLX should load a libmpi other
      than libmpi.so/.dylib, put ``MLX_MPI_LIBNAME`` (and on macOS ``DYLD_LIBRARY_PATH``)
      in ``env``, as mlx.launch does after probing ``ompi_info``.

    ``ports`` replaces the counted ports: ring, one per (host, IP, connection); jaccl,
    ``[coordinator port]``; nccl, ``[NCCL_PORT]``.

    >>> [l.env["MLX_RANK"] for l in rank_launch(from_hosts("127.0.0.1", 2), "ring")]
    ['0', '1']
    """
    backend = validate(hostfile, backend, repeat_hosts=repeat_hosts)
    hosts = hostfile.hosts
    extra = [f"{k}={v}" for k, v in env.items()] if isinstance(env, dict) else list(env or [])
    base = _env_dict(hostfile.envs, 'Hostfile "envs"') | _env_dict(extra, "env")
    if backend == "mpi":
        order = list(Counter(h.ssh_hostname for h in hosts))
        ranked = sorted(hosts, key=lambda h: order.index(h.ssh_hostname))
        return [RankLaunch(r, h.ssh_hostname, dict(base)) for r, h in enumerate(ranked)]
    if backend == "ring":
        common, per_rank = {}, [{} for _ in hosts]
        files = {"MLX_HOSTFILE": _ring_hostfile(hosts, ports, starting_port, connections_per_ip)}
    else:
        port = ports[0] if ports else nccl_port if backend == "nccl" else starting_port
        common, per_rank, files = _coordinated(backend, hosts, port, repeat_hosts)
    base |= common
    return [
        RankLaunch(
            r,
            h.ssh_hostname,
            {k: v for k, v in (base | per_rank[r]).items() if k not in files} | {"MLX_RANK": str(r)},
            dict(files),
        )
        for r, h in enumerate(hosts)
    ]


def _coordinated(
    backend: str, hosts: list[Host], port: int, repeat_hosts: int
) -> tuple[dict[str, str], list[dict[str, str]], dict[str, str]]:
    """nccl and jaccl (rank 0's first IP and ``port`` coordinate): what every rank's env gets,
    what each rank's own gets, and the files."""
    if backend == "nccl":
        common = {"NCCL_HOST_IP": hosts[0].ips[0], "NCCL_PORT": str(port), "MLX_WORLD_SIZE": str(len(hosts))}
        return common, [{"CUDA_VISIBLE_DEVICES": str(r % repeat_hosts)} for r in range(len(hosts))], {}
    common = {"MLX_JACCL_COORDINATOR": f"{hosts[0].ips[0]}:{port}"}
    if backend == "jaccl-ring":
        common["MLX_JACCL_RING"] = "1"
    return common, [{} for _ in hosts], {"MLX_IBV_DEVICES": json.dumps([h.rdma for h in hosts])}


def _ring_hostfile(hosts: list[Host], ports: Optional[list[int]], starting_port: int, connections_per_ip: int) -> str:
    """The ring's MLX_HOSTFILE: per rank a list of "ip:port", one per IP and connection."""
    needed = sum(len(h.ips) for h in hosts) * connections_per_ip
    it = iter(ports if ports is not None else range(starting_port, starting_port + needed))
    if ports is not None and len(ports) < needed:
        raise HostfileError(
            f"ring_launch got {len(ports)} ports but the ring needs {needed}: one per host, "
            f"IP and connection (connections_per_ip={connections_per_ip})."
        )
    ring = [[f"{ip}:{next(it)}" for ip in h.ips for _ in range(connections_per_ip)] for h in hosts]
    return json.dumps(ring) if len(ring) > 1 else ""


def mpirun_hostfile(hostfile: Hostfile) -> str:
    """The Open MPI hostfile ``mlx.launch --backend mpi`` writes: ``host slots=N`` per ssh host.

    >>> mpirun_hostfile(from_hosts("a,b", 2))
    'a slots=2\\nb slots=2\\n'
    """
    return "".join(f"{h} slots={n}\n" for h, n in Counter(h.ssh_hostname for h in hostfile.hosts).items())


# below the ranges the OS picks outgoing connections' ports from (Linux 32768-60999, macOS
# 49152-65535), so no connection, the ring's own included, takes one before the ring binds it
RING_PORTS = range(20000, 32768)


def free_ports(n: int, ip: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free on ``ip`` now, for the ring (one per rank).

    >>> len(set(free_ports(4)))
    4
    """
    ports: list[int] = []
    for port in random.sample(RING_PORTS, len(RING_PORTS)):
        if len(ports) == n:
            break
        with socket.socket() as s:
            try:
                s.bind((ip, port))
            except OSError:
                continue
        ports.append(port)
    return ports


# ------------------------------------------------------------------ describe
def describe(hostfile: Hostfile, backend: Optional[str] = None) -> str:
    """A readable account of the cluster ``hostfile`` describes (validated first).

    >>> print(describe(from_hosts("127.0.0.1", 2), "ring"))  # doctest: +ELLIPSIS
    2 ranks on 1 host, backend ring
    ...
    """
    origin = "" if backend else " (from the hostfile)" if hostfile.backend else " (mlx.launch's default)"
    backend = validate(hostfile, backend)
    hosts, n = hostfile.hosts, len(hostfile.hosts)
    nhosts = len({h.ssh_hostname for h in hosts})
    lines = [f"{n} rank{'s' * (n != 1)} on {nhosts} host{'s' * (nhosts != 1)}, backend {backend}{origin}"]
    width = max(4, *(len(h.ssh_hostname) for h in hosts))
    lines.append(f"  rank  {'host':<{width}}  ips")
    lines += [f"  {h.rank:<4}  {h.ssh_hostname:<{width}}  {', '.join(h.ips) or '-'}" for h in hosts]
    launches = rank_launch(hostfile, backend)
    env0 = launches[0].env
    if backend == "ring":
        addrs = json.loads(launches[0].files["MLX_HOSTFILE"] or "[[]]")
        order = [f"{h.ssh_hostname} ({', '.join(a)})" for h, a in zip(hosts, addrs)]
        lines.append("ring order: " + " -> ".join(order + [hosts[0].ssh_hostname]))
    elif backend in ("jaccl", "jaccl-ring"):
        lines.append(f"coordinator: {env0['MLX_JACCL_COORDINATOR']} (rank 0's first IP)")
        if backend == "jaccl-ring":
            lines.append("ring order: " + " -> ".join([h.ssh_hostname for h in hosts] + [hosts[0].ssh_hostname]))
        lines.append("links (RDMA device at each end):")
        pairs = {tuple(sorted((i, j))) for i in range(n) for j in peers(n, i, backend == "jaccl-ring")}
        for i, j in sorted(pairs):
            a, b = rdma_devices(hosts[i].rdma[j]), rdma_devices(hosts[j].rdma[i])
            lines.append(f"  {hosts[i].ssh_hostname} {','.join(a)} <-> {','.join(b)} {hosts[j].ssh_hostname}")
    elif backend == "nccl":
        lines.append(f"coordinator: {env0['NCCL_HOST_IP']}:{env0['NCCL_PORT']} (rank 0's first IP)")
        lines.append(
            "GPUs: "
            + ", ".join(f"rank {l.rank} CUDA_VISIBLE_DEVICES={l.env['CUDA_VISIBLE_DEVICES']}" for l in launches)
        )
    else:
        lines.append("mpirun hostfile: " + mpirun_hostfile(hostfile).strip().replace("\n", ", "))
        lines.append("ranks as mpirun numbers them: " + ", ".join(f"{l.rank} {l.host}" for l in launches))
    if hostfile.envs:
        lines.append("envs: " + " ".join(hostfile.envs))
    return "\n".join(lines)
