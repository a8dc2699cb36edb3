"""What each stage of benchmarks/gpu.py measured, as small dataclasses, and the table built from
them: every dataclass gives its own lines of the table (``rows()``), every ratio against a baseline
measured in the same run. Pure: tests/test_gpu_rows.py builds the table from recorded results."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class Row:
    """One line of the table at the end."""

    measure: str
    value: str
    baseline: str
    baseline_value: str
    ratio: str


COLUMNS = ["measure", "mlx_nb", "baseline", "baseline value", "mlx_nb / baseline"]


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def spread(values: list[float], scale: float = 1.0) -> str:
    return f"({min(values) * scale:.1f}-{max(values) * scale:.1f})"


@dataclass
class Generation:
    """Tensor-parallel generation on ``ranks`` ranks, through mlx_nb or the plain script: the
    measured replies (their medians are what the table shows) or why it failed."""

    side: str  # "mlx_nb" or "script"
    ranks: int
    tps_all: list[float] = field(default_factory=list)
    ttft_all: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    load: float = 0.0
    peak: int = 0
    wall: float = 0.0
    ready: Optional[float] = None  # mlx_nb: seconds to a ready cluster
    delay_median: Optional[float] = None  # mlx_nb: token -> notebook
    error: Optional[str] = None

    @property
    def tps(self) -> float:
        return statistics.median(self.tps_all)

    @property
    def ttft(self) -> float:
        return statistics.median(self.ttft_all)

    def cell(self, what: str, scale: float = 1.0) -> str:
        """'median (min-max)' of the replies measured."""
        if self.error:
            return "-"
        values = self.tps_all if what == "tps" else self.ttft_all
        return f"{statistics.median(values) * scale:.1f} {spread(values, scale)}"


@dataclass
class Generations:
    """The ``generate`` stage: each side at 1 and 2 ranks."""

    runs: list[Generation] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict) -> Generations:
        return cls([Generation(**g) for g in d["runs"]])

    def get(self, side: str, ranks: int) -> Optional[Generation]:
        return next((g for g in self.runs if g.side == side and g.ranks == ranks and not g.error), None)

    def rows(self) -> list[Row]:
        rows = []
        for n in (1, 2):
            nb, sc = self.get("mlx_nb", n), self.get("script", n)
            base = "script alone (= mlx.launch -n 1)" if n == 1 else "mlx.launch -n 2 --backend ring script"
            ranks = f"{n} rank{'s' * (n > 1)}"
            if nb or sc:
                for measure, what, scale in (
                    ("generation tok/s", "tps", 1.0),
                    ("time to first token (ms)", "ttft", 1e3),
                ):
                    a, b = (getattr(g, what) if g else None for g in (nb, sc))
                    rows.append(
                        Row(
                            f"{measure}, {ranks}",
                            nb.cell(what, scale) if nb else "-",
                            base,
                            sc.cell(what, scale) if sc else "-",
                            ratio(a, b),
                        )
                    )
            for side in ("mlx_nb", "script"):
                for g in self.runs:
                    if g.side == side and g.ranks == n and g.error:
                        rows.append(Row(f"generation, {n} ranks", "FAILED", "", g.error[:80], ""))
        one, two = self.get("mlx_nb", 1), self.get("mlx_nb", 2)
        if one and two:
            rows += [
                Row(
                    "generation tok/s, mlx_nb 2 ranks / 1 rank",
                    f"{two.tps:.1f}",
                    "mlx_nb, 1 rank",
                    f"{one.tps:.1f}",
                    ratio(two.tps, one.tps),
                ),
                Row(
                    "token -> notebook delay, median (ms), mlx_nb 1 / 2 ranks",
                    f"{one.delay_median * 1e3:.1f} / {two.delay_median * 1e3:.1f}",
                    "-",
                    "-",
                    "-",
                ),
                Row(
                    "peak GPU memory per rank (GiB), mlx_nb",
                    f"{two.peak / 2**30:.2f} (2 ranks)",
                    "mlx_nb, 1 rank",
                    f"{one.peak / 2**30:.2f}",
                    ratio(two.peak, one.peak),
                ),
            ]
        return rows


@dataclass
class ProfiledCell:
    """A rank's ``%%mlx_dist --profile`` of the matmul cell, against the cell's own timer."""

    rank: int
    eval: float
    wall: float
    in_cell: float
    sync_after: float
    tflops_eval: float

    def rows(self) -> list[Row]:
        return [
            Row(
                f"profiled cell, rank {self.rank}: in mx.eval (ms)",
                f"{self.eval * 1e3:.1f}",
                "the cell's own timer",
                f"{self.in_cell * 1e3:.1f}",
                f"{ratio(self.eval, self.in_cell)} ({self.tflops_eval:.1f} TFLOP/s)",
            )
        ]


@dataclass
class HeldMemory:
    """A rank's memory after a cell that keeps 1 GiB: the status table's and nvidia-smi's."""

    rank: int
    status_active: int
    status_peak: int
    status_cache: int
    cell_active: int
    cell_peak: int
    nvidia_smi_mib: Optional[int]

    def rows(self) -> list[Row]:
        if not self.nvidia_smi_mib:
            return []
        held = (self.status_active + self.status_cache) / 2**20
        return [
            Row(
                f"rank {self.rank}: memory + cached in the status table (MiB)",
                f"{held:.0f}",
                "nvidia-smi, the rank's process",
                f"{self.nvidia_smi_mib}",
                f"{ratio(held, self.nvidia_smi_mib)} (the rest: its CUDA context)",
            )
        ]


@dataclass
class Ranks:
    """The ``ranks`` stage: what mlx_nb shows about a rank on this machine."""

    mlx: str
    default_device: str
    device_info: dict
    preflight: list[str] = field(default_factory=list)
    preflight_nccl: list[str] = field(default_factory=list)
    nccl_two_on_one: str = ""
    status_device: list[str] = field(default_factory=list)
    status_device_memory: int = 0
    idle_active: list[int] = field(default_factory=list)
    held: list[HeldMemory] = field(default_factory=list)
    profile: list[ProfiledCell] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict) -> Ranks:
        held = [HeldMemory(**h) for h in d.pop("held", [])]
        profile = [ProfiledCell(**p) for p in d.pop("profile", [])]
        return cls(**d, held=held, profile=profile)

    def rows(self) -> list[Row]:
        return [row for part in (*self.profile, *self.held) for row in part.rows()]


@dataclass
class Demo:
    """The ``demo`` stage: ``mlx-nb demo -n 4``."""

    seconds: float
    ready: Optional[float]
    all_reduce_ok: bool
    sharded_ok: bool

    def rows(self) -> list[Row]:
        if self.ready is None:
            return []
        checks = f"{'ok' if self.all_reduce_ok else 'WRONG'} / {'ok' if self.sharded_ok else 'WRONG'}"
        return [Row("mlx-nb demo -n 4: ready (s)", f"{self.ready}", "all-reduce / sharded Linear", checks, "-")]


@dataclass
class Model:
    """The ``model`` stage: the random-weight llama it wrote."""

    params: int
    bytes: int
    seconds: float
    folder: str
    vocab: int

    def rows(self) -> list[Row]:
        return []  # it is the table's title


@dataclass
class Dispatch:
    """The ``dispatch`` stage: benchmarks/dispatch.py's summary."""

    seconds: float
    n: int
    start: float
    raw_start: float
    launch_start: float
    cell_ms: float
    same_raw_ms: float
    raw_ms: float

    def rows(self) -> list[Row]:
        return [
            Row(
                "empty cell round trip (ms), 4 ranks",
                f"{self.cell_ms:.2f}",
                "DirectView.execute, same engines",
                f"{self.same_raw_ms:.2f}",
                ratio(self.cell_ms, self.same_raw_ms),
            ),
            Row(
                "start to ready (s), 4 ranks",
                f"{self.start:.2f}",
                "raw ipp.Cluster + manual init",
                f"{self.raw_start:.2f}",
                ratio(self.start, self.raw_start),
            ),
            Row(
                "start to ready (s), 4 ranks",
                f"{self.start:.2f}",
                "mlx.launch -n 4 all-reduce script",
                f"{self.launch_start:.2f}",
                ratio(self.start, self.launch_start),
            ),
        ]


@dataclass
class Collectives:
    """The ``collectives`` stage: benchmarks/collectives.py's summary."""

    seconds: float
    n: int
    ratio: float
    geo: float
    total_nb: float
    total_launch: float
    spread: dict
    rounds: int
    largest: list  # [op, bytes, mlx_nb seconds, mlx.launch seconds]

    def rows(self) -> list[Row]:
        op, size, a, b = self.largest
        return [
            Row(
                f"collective sweep, 4 ranks, sum of medians (ms); {self.rounds} rounds",
                f"{self.total_nb * 1e3:.2f}",
                "plain mlx.launch script",
                f"{self.total_launch * 1e3:.2f}",
                f"{self.ratio:.3f}x (spread {self.spread['mlx_nb']:.2f} / {self.spread['mlx.launch']:.2f})",
            ),
            Row(
                f"{op} {size / 2**20:.0f} MB, 4 ranks (ms)",
                f"{a * 1e3:.1f}",
                "plain mlx.launch script",
                f"{b * 1e3:.1f}",
                ratio(a, b),
            ),
        ]


@dataclass
class NotMeasured:
    """A stage that did not run (the time budget was spent) or failed."""

    why: str

    def rows(self) -> list[Row]:
        return []  # the table's last lines name it


TABLE = ("generate", "ranks", "demo", "dispatch", "collectives")  # the stages whose rows the table shows, in order


def summary_table(results: dict):
    """The table: each stage's rows, then the stages not measured."""
    from mlx_nb.display import Table

    rows = [row for name in TABLE if name in results for row in results[name].rows()]
    rows += [
        Row(f"stage {name}", "not measured", "", r.why, "") for name, r in results.items() if isinstance(r, NotMeasured)
    ]
    return Table(COLUMNS, [[r.measure, r.value, r.baseline, r.baseline_value, r.ratio] for r in rows])


def title(results: dict, tokens: int, replies: int) -> str:
    """The table's title: the GPU, MLX, and the model generation ran with."""
    text = "mlx_nb on one GPU, ratios against baselines measured in this run"
    ranks, model = results.get("ranks"), results.get("model")
    if isinstance(ranks, Ranks) and ranks.device_info.get("device_name"):
        text += f" ({ranks.device_info['device_name']}, MLX {ranks.mlx}, ring backend)"
    if isinstance(model, Model):
        text += (
            f"; generation: random-weight llama built on the machine, {model.params / 1e9:.2f}e9 params bf16, "
            f"tensor parallel, {tokens} tokens, median (range) of {replies} replies"
        )
    return text


def as_json(results: dict) -> str:
    """The results as gpu.json holds them: each stage's rows by name, with their kind."""
    return json.dumps(
        {name: {"kind": type(r).__name__, **asdict(r)} for name, r in results.items()}, indent=1, default=str
    )
