"""Forming the group: bind a set of engines into one MLX group, check it, name what went wrong.

A part of :class:`mlx_nb.engines.group.RankGroup` (a mixin: it uses the group's controller,
engine sets and spec), kept apart because forming a group is a story of its own: wait for the
engines, refuse mismatched versions, start ``mx.distributed.init`` on every rank at once, and
explain the rank that never joins.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional

import ipyparallel as ipp

from .. import diagnose
from .. import hostfile as hostfiles
from ..display import Table
from ..rank import session
from ..rank.blas import BlasInfo
from ..results import INIT_KEY, Identity
from . import ClusterError, launch


class RankState(str, Enum):
    """What a rank is doing, as the status table shows it (a ``str``: it reads and saves as its text)."""

    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"  # its engine process exited
    LOST = "lost"  # the hub cannot account for it
    UNREACHABLE = "unreachable (controller died)"

    def __str__(self) -> str:
        return self.value


@dataclass
class RankInfo:
    rank: int
    engine_id: int
    host: str = ""
    pid: int = 0
    device: str = ""
    device_name: str = ""  # the GPU's name (MLX's device_info), empty on the CPU
    device_memory: int = 0  # the GPU's total memory, bytes
    mlx: str = ""
    blas: Optional[BlasInfo] = None  # the BLAS its MLX runs (None: not known yet)
    active_memory: int = 0
    peak_memory: int = 0
    cache_memory: int = 0  # freed buffers MLX keeps for reuse: the process holds them too
    memory_budget: int = 0  # bytes this rank may hold: measured, or given (Cluster(memory=...))
    memory_given: bool = False
    state: RankState = RankState.STARTING

    def __post_init__(self) -> None:
        # a kept cluster's file holds the text, and the BLAS as a dict
        self.state = RankState(self.state)
        if isinstance(self.blas, dict):
            self.blas = BlasInfo(**self.blas) if self.blas else None


class Forming:
    def form(self) -> None:
        """Bind a set of engines into a group: the warm spare set if there is one."""
        tag = self._spare or self._spawn()
        self._spare = None
        self._tag, self.ranks = tag, []
        found = self._wait_for_set(tag)
        self.ranks = [RankInfo(r, found[r].engine_id, found[r].host, found[r].pid) for r in range(self.spec.n)]
        self._check_versions(found)
        self._init_group(self.spec.ports or hostfiles.free_ports(self.spec.addresses_needed))
        if self.spec.spares:
            # the next restart takes these: new processes are the slow part of recovery
            self._spare = self._spawn()

    def identify_engines(self, timeout: float = 10.0) -> None:
        """Ask every engine the controller knows and we do not yet, who it is."""
        new = [eid for eid in self.client.ids if eid not in self._engines]
        if new:
            infos = self.client[new].apply_async(session.identify).get(timeout=timeout)
            for eid, info in zip(new, infos):
                info.engine_id = eid
                self._engines[eid] = info

    def _wait_for_set(self, tag: str) -> dict[int, Any]:
        deadline = time.monotonic() + self.spec.start_timeout
        while True:
            self.identify_engines(self.spec.start_timeout)
            found = {e.rank: e for eid, e in self._engines.items() if e.set == tag and eid in self.client.ids}
            if len(found) == self.spec.n:
                return found
            dead = self.dead_ranks(tag)
            if dead:
                raise ClusterError("while starting: " + self._exited(tag, dead))
            if time.monotonic() > deadline:
                missing = [r for r in range(self.spec.n) if r not in found]
                raise ClusterError(
                    f"rank(s) {diagnose.ranges(missing)} did not come up within {self.spec.start_timeout:.0f} s: "
                    "the engine process runs but never registered with the controller "
                    f"(stopped, or stuck starting up); engine logs are in {self._ipp.profile_dir}/log"
                )
            time.sleep(0.05)

    def _check_versions(self, found: dict[int, Identity]) -> None:
        """Refuse ranks whose mlx or mlx_nb differ from each other or from the notebook's."""
        from mlx_nb import __version__

        rows = [("notebook", socket.gethostname(), session.mlx_version() or "-", __version__)]
        rows += [(f"rank {r}", e.host, e.mlx or "-", e.mlx_nb) for r, e in sorted(found.items())]
        if len({row[2:] for row in rows}) > 1:
            raise ClusterError(
                "the ranks run different MLX or mlx_nb versions: install the same ones on every "
                "host (pip install mlx==... mlx_nb==...)\n" + repr(Table(["", "host", "mlx", "mlx_nb"], rows))
            )

    def _rank_files(self, ports: list[int]) -> list[dict[str, str]]:
        """What each rank's init writes to files (MLX_HOSTFILE...), and the ranks' addresses."""
        spec = self.spec
        if spec.backend == "mpi":
            self.addresses = ["mpi"] * spec.n
            return [{} for _ in range(spec.n)]
        launches = hostfiles.rank_launch(
            spec.hostfile, spec.backend, env=spec.env, ports=ports if spec.backend == "ring" else spec.ports
        )
        if spec.backend == "ring" and spec.n > 1:
            self.addresses = [",".join(a) for a in json.loads(launches[0].files["MLX_HOSTFILE"])]
        else:
            self.addresses = [launches[0].env.get("MLX_JACCL_COORDINATOR", "") for _ in launches]
        return [launch_.files for launch_ in launches]

    def _init_group(self, ports: list[int]) -> None:
        """Form the group on ``self.ranks``: mx.distributed.init is collective, so start it
        on every rank, then wait for all; the first failure, or a rank that never joins, is named."""
        spec, files = self.spec, self._rank_files(ports)
        hosts = Counter(r.host for r in self.ranks)  # ranks that share a host share its memory
        pending = {
            r.rank: self.client[r.engine_id].apply_async(
                session.init_group,
                spec.backend,
                spec.n,
                files[r.rank],
                f"{self.dir}/{self._tag}",
                spec.memory,
                hosts[r.host],
            )
            for r in self.ranks
        }
        deadline = time.monotonic() + spec.init_timeout
        while pending:
            for rank, ar in list(pending.items()):
                if ar.ready() and self._joined(rank, ar):
                    del pending[rank]
            dead = [r for r in self.dead_ranks() if r in pending]
            if dead:
                raise ClusterError("during mx.distributed.init: " + self._exited(self._tag, dead))
            if pending and time.monotonic() > deadline:
                # how far each rank got: None (not started), or an InitStep
                steps = {r: ar.metadata["data"].get(INIT_KEY) for r, ar in pending.items()}
                raise ClusterError(diagnose.init_stuck(spec.backend, spec.init_timeout, steps, self.addresses))
            time.sleep(0.02)
        values = self.cells_view().apply_async(session.check_group).get(timeout=spec.init_timeout)
        want = spec.n * (spec.n + 1) / 2
        if any(v != want for v in values):
            raise ClusterError(f"the group check failed: all_sum gave {values} (expected {want} on every rank)")

    def _joined(self, rank: int, ar: Any) -> bool:
        """A finished init: the rank joined (True), or its engine died (False: named by the caller)."""
        try:
            info = ar.get(timeout=0)
        except ipp.error.EngineError:
            return False
        except ipp.RemoteError as e:
            raise ClusterError(f"mx.distributed.init failed on rank {rank}: {e.ename}: {e.evalue}") from None
        if info.error is not None:
            raise ClusterError(diagnose.init_failed(rank, info.error, self.addresses[rank], bool(self.spec.ports)))
        r = self.ranks[rank]
        r.device, r.mlx, r.blas, r.state = info.device, info.mlx or "", info.blas, RankState.IDLE
        r.device_name, r.device_memory = info.device_name, info.device_memory
        r.memory_budget, r.memory_given = info.memory_budget, info.memory_given
        return True

    def _exited(self, tag: str, dead: list[int]) -> str:
        out = []
        for rank in dead:
            engine_set = self._ipp.engines.get(f"{tag}-mpi" if self.spec.backend == "mpi" else f"{tag}-rank{rank}")
            try:
                text = launch.engine_output(engine_set.get_output() if engine_set else "")
            except Exception:
                text = ""
            out.append(diagnose.engine_exited(rank, self.spec.host(rank), text))
        return "\n".join(out)
