"""Checks of a Cluster's arguments, made before anything starts: each raises ValueError with one line.

Pure (the machine's core count aside): the Cluster calls them in ``__init__`` and the magics
turn their ValueError into a one-line UsageError.

    check_env({"MY_FLAG": "1"})                        # fine
    check_ranks_per_host(hostfile.local(4), spares=True)  # fine on any machine
    check_timeout(float("nan"))                         # ValueError
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from typing import Mapping, Optional

from .hostfile import Hostfile

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
# engine processes (ranks and their warm spares) one machine runs per core, and at least
PROCESSES_PER_CORE, MIN_PROCESSES = 8, 16
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_local(host: str) -> bool:
    """Whether an ssh host name means this machine (no ssh needed).

    >>> is_local("127.0.0.1"), is_local("mac2")
    (True, False)
    """
    return host in LOCAL_HOSTS or host.startswith("127.")


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


def check_timeout(timeout: Optional[float], what: str = "--timeout") -> None:
    """``timeout`` is None or a finite, positive number of seconds.

    >>> check_timeout(30); check_timeout(None)
    >>> check_timeout(float("inf"))
    Traceback (most recent call last):
    ...
    ValueError: --timeout must be a finite number of seconds, got inf
    """
    if timeout is None:
        return
    if not math.isfinite(timeout):
        raise ValueError(f"{what} must be a finite number of seconds, got {timeout:g}")
    if timeout <= 0:
        raise ValueError(f"{what} must be positive seconds, got {timeout:g}")
