"""What mlx_nb knows of a cluster's engines beyond ipyparallel's own record: ``EngineState``.

One per cluster, owned by its ``RankGroup`` (engines.group), which changes it as the engines
change. The watchdog's state file (engines.watchdog: what to end, and when) is written from it,
and so is a kept cluster's part of ipyparallel's cluster file (engines.kept), which a kernel
that attaches reads back (``EngineState.from_json``). Its own module, not group.py's: kept.py
reads it from the files of clusters no group holds (a name claimed, a cluster found dead), and
group.py imports kept.py.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Optional

import psutil

from ..rank.blas import BlasInfo
from ..spec import ClusterSpec
from .procs import same_process_runs


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


@dataclass
class Holder:
    """The process that may run jobs on a kept cluster: the kernel that started or attached it."""

    pid: int
    started: float  # its start time: with the pid, what tells it from a later process
    host: str
    since: float  # when it took the cluster

    @classmethod
    def me(cls) -> Holder:
        p = psutil.Process()
        return cls(p.pid, p.create_time(), os.uname().nodename, time.time())

    def alive(self) -> bool:
        """Whether it still runs (a zombie does not); one on another machine is assumed to."""
        return self.host != os.uname().nodename or same_process_runs(self.pid, self.started)

    def is_me(self) -> bool:
        return self.pid == os.getpid() and self.host == os.uname().nodename


def new_folder() -> str:
    return f"/tmp/mlx_nb-{uuid.uuid4().hex[:12]}"


@dataclass
class EngineState:
    """A cluster's engines as mlx_nb sees them: which engine set serves as the ranks (``tag``),
    which waits warm for the next restart (``spare``), the ranks themselves, and, for a kept
    cluster, its name, idle limit, holder and setup cells."""

    spec: ClusterSpec
    name: Optional[str] = None  # a kept cluster's name, to attach it by
    keep: bool = False  # it outlives the kernel that started it
    idle: Optional[float] = None  # a kept cluster stops once unused this long (seconds)
    # this cluster's files on every host (removed at stop): the engines' IPython profile on
    # other hosts, and each engine set's MLX_HOSTFILE / MLX_IBV_DEVICES files under <tag>/
    folder: str = field(default_factory=new_folder)
    created: float = field(default_factory=time.time)
    holder: Holder = field(default_factory=Holder.me)  # who may run jobs on a kept cluster
    generation: int = 0  # engine sets started so far: the next one is tagged g<generation + 1>
    tag: Optional[str] = None  # the engine set of the ranks in use
    spare: Optional[str] = None  # the warm spare set
    ranks: list[RankInfo] = field(default_factory=list)
    setup: str = ""  # the setup cells, for a kernel that attaches (mlx_nb.setup)
    controller_started: Optional[float] = None  # with its pid, what tells the controller from a later process

    def next_tag(self) -> str:
        """The tag of a new engine set (``g1``, ``g2``...): its engines report it (MLX_NB_SET)."""
        self.generation += 1
        return f"g{self.generation}"

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(spec=self.spec.to_json(), holder=asdict(self.holder), ranks=[asdict(r) for r in self.ranks])
        return d

    @classmethod
    def from_json(cls, d: dict) -> EngineState:
        d = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        d.update(spec=ClusterSpec.from_json(d["spec"]), holder=Holder(**d["holder"]))
        d["ranks"] = [RankInfo(**r) for r in d.get("ranks", [])]
        return cls(**d)
