"""Forming the group: bind a set of engines into one MLX group, check it, name what went wrong.

``form_group(...)`` is a story of its own: wait for the engines of one generation, refuse
mismatched versions, start ``mx.distributed.init`` on every rank at once, and explain the rank
that never joins. It takes what it needs by name and returns the ranks; the group
(engines.group) keeps them.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ipyparallel as ipp

from .. import diagnose, rank_env
from ..display import Table
from ..rank import session
from ..results import INIT_KEY, Identity
from . import ClusterError
from .state import RankInfo, RankState

if TYPE_CHECKING:
    from ..spec import ClusterSpec
    from .sets import EngineSets


@dataclass
class Formed:
    """A formed group: its ranks, and each rank's ring address(es) (or coordinator), for error messages."""

    ranks: list[RankInfo]
    addresses: list[str]


def form_group(
    spec: ClusterSpec, client: ipp.Client, sets: EngineSets, tag: str, folder: str, known: dict[int, Identity]
) -> Formed:
    """Bind the engines of generation ``tag`` (of ``sets``, registered with ``client``) into the
    group ``spec`` describes, and check it; ClusterError names what went wrong.

    ``folder``: where each rank's init writes its files (MLX_HOSTFILE...); ``known``: every
    engine's identity seen so far, by engine id (grows by the new ones).
    """
    found = _wait_for_set(spec, client, sets, tag, known)
    ranks = [RankInfo(r, found[r].engine_id, found[r].host, found[r].pid) for r in range(spec.n)]
    _check_versions(found)
    addresses, files = _rank_files(spec, spec.ports or rank_env.free_ports(spec.addresses_needed))
    joining = _Joining(spec, client, sets, tag, ranks, addresses)
    joining.init(files, folder)
    values = client[[r.engine_id for r in ranks]].apply_async(session.check_group).get(timeout=spec.init_timeout)
    want = spec.n * (spec.n + 1) / 2
    if any(v != want for v in values):
        raise ClusterError(f"the group check failed: all_sum gave {values} (expected {want} on every rank)")
    return Formed(ranks, addresses)


def identify(client: ipp.Client, known: dict[int, Identity], timeout: float = 10.0) -> None:
    """Ask every engine the controller knows and ``known`` does not yet, who it is."""
    new = [eid for eid in client.ids if eid not in known]
    if new:
        infos = client[new].apply_async(session.identify).get(timeout=timeout)
        for eid, info in zip(new, infos):
            info.engine_id = eid
            known[eid] = info


def _wait_for_set(
    spec: ClusterSpec, client: ipp.Client, sets: EngineSets, tag: str, known: dict[int, Identity]
) -> dict[int, Identity]:
    deadline = time.monotonic() + spec.start_timeout
    while True:
        identify(client, known, spec.start_timeout)
        found = {e.rank: e for eid, e in known.items() if e.set == tag and eid in client.ids}
        if len(found) == spec.n:
            return found
        dead = sets.dead(tag)
        if dead:
            raise ClusterError("while starting: " + _exited(spec, sets, tag, dead))
        if time.monotonic() > deadline:
            missing = [r for r in range(spec.n) if r not in found]
            raise ClusterError(
                f"rank(s) {diagnose.ranges(missing)} did not come up within {spec.start_timeout:.0f} s: "
                "the engine process runs but never registered with the controller "
                f"(stopped, or stuck starting up); engine logs are in {sets.ipc.profile_dir}/log"
            )
        time.sleep(0.05)


def _check_versions(found: dict[int, Identity]) -> None:
    """Refuse ranks whose mlx or mlx_nb differ from each other or from the notebook's."""
    from mlx_nb import __version__

    rows = [("notebook", socket.gethostname(), session.mlx_version() or "-", __version__)]
    rows += [(f"rank {r}", e.host, e.mlx or "-", e.mlx_nb) for r, e in sorted(found.items())]
    if len({row[2:] for row in rows}) > 1:
        raise ClusterError(
            "the ranks run different MLX or mlx_nb versions: install the same ones on every "
            "host (pip install mlx==... mlx_nb==...)\n" + repr(Table(["", "host", "mlx", "mlx_nb"], rows))
        )


def _rank_files(spec: ClusterSpec, ports: list[int]) -> tuple[list[str], list[dict[str, str]]]:
    """The ranks' addresses, and what each rank's init writes to files (MLX_HOSTFILE...)."""
    if spec.backend == "mpi":
        return ["mpi"] * spec.n, [{} for _ in range(spec.n)]
    launches = rank_env.rank_launch(
        spec.hostfile, spec.backend, env=spec.env, ports=ports if spec.backend == "ring" else spec.ports
    )
    if spec.backend == "ring" and spec.n > 1:
        addresses = [",".join(a) for a in json.loads(launches[0].files["MLX_HOSTFILE"])]
    else:
        addresses = [launches[0].env.get("MLX_JACCL_COORDINATOR", "") for _ in launches]
    return addresses, [launch_.files for launch_ in launches]


def _exited(spec: ClusterSpec, sets: EngineSets, tag: str, dead: list[int]) -> str:
    return "\n".join(diagnose.engine_exited(rank, spec.host(rank), sets.output(tag, rank)) for rank in dead)


@dataclass
class _Joining:
    """``mx.distributed.init`` on every rank at once, watched until all joined."""

    spec: ClusterSpec
    client: ipp.Client
    sets: EngineSets
    tag: str
    ranks: list[RankInfo]
    addresses: list[str]

    def init(self, files: list[dict[str, str]], folder: str) -> None:
        """mx.distributed.init is collective, so start it on every rank, then wait for all;
        the first failure, or a rank that never joins, is named."""
        spec = self.spec
        hosts = Counter(r.host for r in self.ranks)  # ranks that share a host share its memory
        pending = {
            r.rank: self.client[r.engine_id].apply_async(
                session.init_group, spec.backend, spec.n, files[r.rank], folder, spec.memory, hosts[r.host]
            )
            for r in self.ranks
        }
        deadline = time.monotonic() + spec.init_timeout
        while pending:
            for rank, ar in list(pending.items()):
                if ar.ready() and self._joined(rank, ar):
                    del pending[rank]
            dead = [r for r in self.sets.dead(self.tag, self.ranks, set(self.client.ids)) if r in pending]
            if dead:
                raise ClusterError("during mx.distributed.init: " + _exited(spec, self.sets, self.tag, dead))
            if pending and time.monotonic() > deadline:
                # how far each rank got: None (not started), or an InitStep
                steps = {r: ar.metadata["data"].get(INIT_KEY) for r, ar in pending.items()}
                raise ClusterError(diagnose.init_stuck(spec.backend, spec.init_timeout, steps, self.addresses))
            time.sleep(0.02)

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
