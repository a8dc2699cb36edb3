"""ClusterSpec: what a cluster is made of (ranks, hosts, backend, ports), validated once.

Every check on a ``Cluster(...)``'s arguments happens here, before anything starts; what
does not describe a cluster raises ``ValueError`` (``HostfileError`` for hostfiles) with
one line saying why.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from . import hostfile as hostfiles
from .engines.launch import mpi_available
from .hostfile import Hostfile, is_local

BACKENDS = ("ring", "jaccl", "jaccl-ring", "mpi", "nccl")


@dataclass
class ClusterSpec:
    """The validated description of a cluster; see :meth:`build`."""

    n: int
    backend: str
    hostfile: Hostfile
    python: str = sys.executable
    ssh_cmd: list[str] = field(default_factory=lambda: ["ssh"])
    env: dict[str, str] = field(default_factory=dict)
    ports: Optional[list[int]] = None  # the ring's port per rank and IP; None: free ones at each start
    start_timeout: float = 60.0
    init_timeout: float = 60.0
    grace: float = 3.0
    spares: bool = True
    preflight: bool = True

    @property
    def remote(self) -> set[int]:
        """Ranks that run on other hosts, over ssh."""
        return {h.rank for h in self.hostfile.hosts if not is_local(h.ssh_hostname)}

    @property
    def addresses_needed(self) -> int:
        """The ring's ports: one per rank and IP."""
        return sum(len(h.ips) for h in self.hostfile.hosts)

    def host(self, rank: int) -> Optional[str]:
        """The host a remote rank runs on (None for ranks on this machine)."""
        return self.hostfile.hosts[rank].ssh_hostname if rank in self.remote else None

    @classmethod
    def build(
        cls,
        n: Optional[int] = None,
        backend: Optional[str] = None,
        *,
        hostfile: Union[str, Path, Hostfile, None] = None,
        hosts: Optional[str] = None,
        python: Optional[str] = None,
        ssh_cmd: Optional[Sequence[str]] = None,
        env: Optional[dict[str, str]] = None,
        ports: Optional[Sequence[int]] = None,
        **options,
    ) -> ClusterSpec:
        """Check a Cluster's arguments and resolve them: local ``n``, a hostfile, or ``hosts``."""
        if hostfile is not None and hosts is not None:
            raise ValueError("give either hostfile= or hosts=, not both")
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(f"n must be a positive number of ranks, got {n!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if hosts is not None:
            hostfile = hostfiles.from_hosts(hosts, n or 1)
        elif isinstance(hostfile, (str, Path)):
            hostfile = hostfiles.load(hostfile)
        if hostfile is None:
            n, backend = n or 4, backend or "ring"
            if backend not in ("ring", "mpi"):
                raise ValueError(f"backend {backend!r} needs a hostfile; a local cluster runs the ring or mpi backend")
            hostfile = hostfiles.local(n)
        else:
            backend = hostfiles.validate(hostfile, backend)  # HostfileError (a ValueError) says why not
            n = len(hostfile.hosts)
        spec = cls(
            n, backend, hostfile, python=python or sys.executable, ssh_cmd=list(ssh_cmd or ["ssh"]),
            env=dict(env or {}), ports=list(ports) if ports is not None else None, **options,
        )
        spec.check()
        return spec

    def check(self) -> None:
        """Raise ValueError if the spec cannot describe a cluster."""
        if self.backend == "mpi" and self.remote:
            raise ValueError(
                "backend 'mpi' runs the ranks of this machine only (one mpirun job): "
                "for several hosts use ring (or jaccl over Thunderbolt RDMA)"
            )
        if self.backend == "mpi":
            ok, why = mpi_available()
            if not ok:
                raise ValueError(f"backend 'mpi': {why}")
        needed = self.addresses_needed if self.backend == "ring" else 1
        if self.ports is not None and len(self.ports) != needed:
            raise ValueError(f"ports: the ring needs one port per rank and IP ({needed}), got {len(self.ports)}")
