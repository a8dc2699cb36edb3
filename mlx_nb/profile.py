"""Cell profiles: where each rank spent a %%mlx_dist cell's time, and its memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .display import Table, human_bytes


@dataclass
class RankProfile:
    rank: int
    wall: float  # seconds the cell ran on this rank
    eval_time: float  # inside mx.eval
    collective_time: float  # inside evals that completed mx.distributed calls
    collectives: int  # mx.distributed calls the cell made
    active_memory: int
    peak_memory: int
    start: float  # absolute (time.time) on the rank
    evals: list[tuple[float, float, int]] = field(default_factory=list)


@dataclass
class CellProfile:
    """Per-rank timings and memory of one cell (``mlx_nb.last_profile()``)."""

    ranks: list[RankProfile]

    @classmethod
    def from_outcomes(cls, outcomes: list) -> CellProfile:
        """From each rank's ``results.Outcome`` of a ``profile=True`` job."""
        rows = []
        for o in outcomes:
            t = o.timeline
            rows.append(
                RankProfile(
                    o.rank,
                    o.wall,
                    o.eval_time,
                    t.collective_time if t else 0.0,
                    o.calls,
                    o.active_memory,
                    o.peak_memory,
                    t.start if t else 0.0,
                    [tuple(e) for e in t.evals] if t else [],
                )
            )
        return cls(rows)

    def table(self) -> Table:
        return Table(
            ["rank", "wall (ms)", "in mx.eval (ms)", "in collectives (ms)", "collectives", "memory", "peak"],
            [
                [
                    p.rank,
                    f"{p.wall * 1e3:.1f}",
                    f"{p.eval_time * 1e3:.1f}",
                    f"{p.collective_time * 1e3:.1f}",
                    p.collectives,
                    human_bytes(p.active_memory),
                    human_bytes(p.peak_memory),
                ]
                for p in self.ranks
            ],
        )

    def figure(self):
        """A per-rank timeline (one bar a rank) beside a memory bar chart."""
        import matplotlib.pyplot as plt

        fig, (tl, mem) = plt.subplots(1, 2, figsize=(10, 0.6 * len(self.ranks) + 1.8), width_ratios=[3, 1])
        t0 = min(p.start for p in self.ranks)
        for p in self.ranks:
            y = p.rank
            tl.broken_barh(
                [((p.start - t0) * 1e3, p.wall * 1e3)],
                (y - 0.35, 0.7),
                color="#d9e4f5",
                label="cell" if y == 0 else None,
            )
            compute = [((s - t0) * 1e3, (e - s) * 1e3) for s, e, c in p.evals if not c]
            comm = [((s - t0) * 1e3, (e - s) * 1e3) for s, e, c in p.evals if c]
            tl.broken_barh(compute, (y - 0.25, 0.5), color="#4c72b0", label="mx.eval" if y == 0 else None)
            tl.broken_barh(comm, (y - 0.25, 0.5), color="#dd8452", label="eval with collectives" if y == 0 else None)
        tl.set_yticks([p.rank for p in self.ranks], [f"rank {p.rank}" for p in self.ranks])
        tl.invert_yaxis()
        tl.set_xlabel("ms since the first rank started the cell")
        tl.set_title("where each rank spent the cell")
        tl.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3, fontsize="small", frameon=False)
        ranks = [p.rank for p in self.ranks]
        mem.bar([r - 0.2 for r in ranks], [p.active_memory / 2**20 for p in self.ranks], 0.4, label="in use")
        mem.bar([r + 0.2 for r in ranks], [p.peak_memory / 2**20 for p in self.ranks], 0.4, label="peak")
        mem.set_xticks(ranks)
        mem.set_xlabel("rank")
        mem.set_ylabel("MB")
        mem.set_title("memory per rank")
        mem.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2, fontsize="small", frameon=False)
        fig.tight_layout()
        return fig


# the notebook process's last profiled cell, of whichever cluster ran it (mlx_nb.last_profile());
# each cell's own profile is on its result (CellResult.profile)
_last: Optional[CellProfile] = None


def last_profile() -> Optional[CellProfile]:
    """The profile of the last ``%%mlx_dist --profile`` cell (or ``Cluster.run(profile=True)``)."""
    return _last


def record(profile: CellProfile) -> None:
    global _last
    _last = profile
