"""ClusterSpec: what a cluster is made of (ranks, hosts, backend, ports), validated once.

Every check on a ``Cluster(...)``'s arguments happens here, before anything starts; what
does not describe a cluster raises ``ValueError`` (``HostfileError`` for hostfiles) with
one line saying why. The magics turn it into a one-line UsageError.

    check_env({"MY_FLAG": "1"})                           # fine
    check_ranks_per_host(hostfile.local(4), spares=True)  # fine on any machine
    check_timeout(float("nan"))                           # ValueError
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

from . import hostfile as hostfiles
from .display import parse_bytes
from .engines.launch import mpi_available
from .hostfile import BACKENDS, Hostfile, is_local

# engine processes (ranks and their warm spares) one machine runs per core, and at least
PROCESSES_PER_CORE, MIN_PROCESSES = 8, 16
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


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
    drain: bool = True  # release ranks left in a collective by a failed cell, instead of restarting them
    memory: Optional[list[int]] = None  # each rank's memory budget in bytes; None: each measures its own

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
        memory: Union[int, str, Sequence[Union[int, str]], None] = None,
        **options,
    ) -> ClusterSpec:
        """Check a Cluster's arguments and resolve them: local ``n``, a hostfile, or ``hosts``."""
        if hostfile is not None and hosts is not None:
            raise ValueError("give either --hostfile or --hosts, not both")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"-n must be a positive number of ranks, got {n!r}")
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
            n,
            backend,
            hostfile,
            python=python or sys.executable,
            ssh_cmd=list(ssh_cmd or ["ssh"]),
            env=dict(env or {}),
            ports=list(ports) if ports is not None else None,
            memory=parse_memory(memory, n),
            **options,
        )
        spec.check()
        return spec

    def to_json(self) -> dict:
        """The spec as JSON values (a kept cluster's file holds it): :meth:`from_json` reads it back."""
        d = asdict(self)
        d["hostfile"] = self.hostfile.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict) -> ClusterSpec:
        return cls(**{**d, "hostfile": hostfiles.loads(json.dumps(d["hostfile"]))})

    def check(self) -> None:
        """Raise ValueError if the spec cannot describe a cluster."""
        check_ranks_per_host(self.hostfile, self.spares)
        check_env(self.env)
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


def check_keeping(name: Optional[str], keep: bool, idle: Union[str, float, None]) -> Optional[float]:
    """A kept cluster's arguments: its name, and its idle limit in seconds (None: none)."""
    if keep and not name:
        raise ValueError("a kept cluster needs a name, to attach it by: Cluster(..., name='llm', keep=True)")
    if name is not None:
        check_name(name)
    idle_s = parse_idle(idle)
    if idle_s is not None and not keep:
        raise ValueError("idle= is for kept clusters (keep=True): an owned cluster ends with its kernel")
    return idle_s


def parse_memory(memory: Union[int, str, Sequence[Union[int, str]], None], n: int) -> Optional[list[int]]:
    """Each of ``n`` ranks' memory budget in bytes, from one value for all or one per rank
    (bytes, or sizes like ``'700MB'``; a string may list them: ``'700MB,260MB,260MB'``).

    >>> parse_memory("700MB,260MB,260MB", 3) == [700 << 20, 260 << 20, 260 << 20]
    True
    >>> parse_memory("1GB", 2)
    [1073741824, 1073741824]
    >>> parse_memory("700MB,260MB", 3)
    Traceback (most recent call last):
    ...
    ValueError: memory: 2 values for 3 ranks: give one for all ranks (700MB) or one per rank (700MB,260MB,260MB)
    """
    if memory is None:
        return None
    if isinstance(memory, str):
        values: list = [v.strip() for v in memory.split(",")]
    elif isinstance(memory, (int, bool)):
        values = [memory]
    elif isinstance(memory, Sequence):
        values = list(memory)
    else:
        raise ValueError(f"memory must be a size like '700MB' or one per rank, got {memory!r}")
    if len(values) not in (1, n):
        raise ValueError(
            f"memory: {len(values)} values for {n} ranks: give one for all ranks (700MB) or one per rank "
            f"({','.join(['700MB'] + ['260MB'] * (n - 1))})"
        )
    sizes = [parse_bytes(v, "memory", example="700MB", minimum=1 << 20) for v in values]
    return sizes * n if len(sizes) == 1 else sizes


def check_env(env: Mapping[str, str]) -> None:
    """Every name a valid environment variable name, every value a string.

    >>> check_env({"BAD-NAME": "1"})
    Traceback (most recent call last):
    ...
    ValueError: 'BAD-NAME' is not a valid environment variable name: use letters, digits and _, not starting with a digit (e.g. MY_FLAG=1)
    """
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ValueError(
                f"{name!r} is not a valid environment variable name: use letters, digits and _, "
                "not starting with a digit (e.g. MY_FLAG=1)"
            )
        if not isinstance(value, str):
            raise ValueError(f"the value of environment variable {name} is {value!r}: give it as a string")


def process_limit(cores: Optional[int] = None) -> int:
    """How many engine processes one machine with ``cores`` cores (default: this one's) may run."""
    return max(MIN_PROCESSES, PROCESSES_PER_CORE * (cores or os.cpu_count() or 1))


def check_ranks_per_host(hostfile: Hostfile, spares: bool = True, cores: Optional[int] = None) -> None:
    """No host gets more engine processes than ``process_limit`` (a rank is one, its warm spare another).

    Other hosts are measured against this machine's core count: the only one known here.

    >>> from mlx_nb.hostfile import local
    >>> check_ranks_per_host(local(9), cores=2)
    Traceback (most recent call last):
    ...
    ValueError: 9 ranks on this machine are too many: each rank is an engine process plus a warm spare (18 processes), and at most 16 fit (2 cores, 8 per core, at least 16). Use 8 ranks or fewer per machine, or spread them over machines with --hosts.
    """
    limit, per_rank = process_limit(cores), 2 if spares else 1
    host, n = Counter(h.ssh_hostname for h in hostfile.hosts).most_common(1)[0]
    if n * per_rank <= limit:
        return
    where = "on this machine" if is_local(host) else f"on host {host!r}"
    each = "an engine process plus a warm spare" if spares else "an engine process"
    cores = cores or os.cpu_count() or 1
    raise ValueError(
        f"{n} ranks {where} are too many: each rank is {each} ({n * per_rank} processes), and at most "
        f"{limit} fit ({cores} cores, {PROCESSES_PER_CORE} per core, at least {MIN_PROCESSES}). "
        f"Use {limit // per_rank} ranks or fewer per machine, or spread them over machines with --hosts."
    )


def check_timeout(timeout: Optional[float]) -> None:
    """``timeout`` is None or a finite, positive number of seconds.

    >>> check_timeout(30); check_timeout(None)
    >>> check_timeout(float("inf"))
    Traceback (most recent call last):
    ...
    ValueError: --timeout must be a finite number of seconds, got inf
    """
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"--timeout must be a number of seconds, got {timeout!r}")
    if not math.isfinite(timeout):
        raise ValueError(f"--timeout must be a finite number of seconds, got {timeout:g}")
    if timeout <= 0:
        raise ValueError(f"--timeout must be positive seconds, got {timeout:g}")
