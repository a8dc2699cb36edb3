"""benchmarks/gpu.py's table, built from the rows its stages return (recorded numbers here: the
stages themselves need the lent GPU machine), and those rows read back as the run reads them."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu  # noqa: E402
from gpu_rows import (  # noqa: E402
    Collectives,
    Demo,
    Dispatch,
    Generation,
    Generations,
    HeldMemory,
    Model,
    NotMeasured,
    ProfiledCell,
    Ranks,
    as_json,
    summary_table,
    title,
)


def generation(side: str, ranks: int, tps: list[float], ttft: list[float], **more) -> Generation:
    return Generation(
        side, ranks, tps, ttft, tokens=128, prompt_tokens=300, prompt_tps=5e3, load=2.5, peak=2**32, **more
    )


@pytest.fixture
def measured() -> dict:
    """A run's results as the stages return them (the README's H200 run, in part)."""
    return {
        "ranks": Ranks(
            mlx="0.32.4",
            default_device="Device(gpu, 0)",
            device_info={"device_name": "NVIDIA H200"},
            held=[HeldMemory(0, 2**30, 3 * 2**30, 2**31, 2**30, 3 * 2**30, 3600), HeldMemory(1, 0, 0, 0, 0, 0, None)],
            profile=[ProfiledCell(0, eval=0.1614, wall=0.2, in_cell=0.1616, sync_after=1e-4, tflops_eval=13.6)],
        ),
        "demo": Demo(seconds=20.0, ready=4.2, all_reduce_ok=True, sharded_ok=True),
        "model": Model(params=2_970_000_000, bytes=5_940_000_000, seconds=40.0, folder="/tmp/m", vocab=49152),
        "generate": Generations(
            [
                generation("script", 1, [252.3, 180.6, 266.4], [0.0223, 0.0220, 0.0281]),
                generation("mlx_nb", 1, [237.0, 225.3, 241.4], [0.0237, 0.0234, 0.0243], delay_median=0.0023),
                generation("script", 2, [13.8, 13.6, 13.9], [0.3994, 0.3926, 0.4062]),
                Generation("mlx_nb", 2, error="RuntimeError: the ranks ran out of memory"),
            ]
        ),
        "dispatch": Dispatch(
            50.0, 4, start=3.1, raw_start=2.5, launch_start=1.9, cell_ms=1.5, same_raw_ms=1.2, raw_ms=1.1
        ),
        "collectives": NotMeasured("time budget"),
    }


def lines(results: dict) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.split("  ") if cell.strip()]
        for line in repr(summary_table(results)).splitlines()[2:]
    ]


def test_the_table_is_each_stages_rows_in_order_with_ratios_against_the_same_runs_baseline(measured):
    assert lines(measured) == [
        [
            "generation tok/s, 1 rank",
            "237.0 (225.3-241.4)",
            "script alone (= mlx.launch -n 1)",
            "252.3 (180.6-266.4)",
            "0.94x",
        ],
        [
            "time to first token (ms), 1 rank",
            "23.7 (23.4-24.3)",
            "script alone (= mlx.launch -n 1)",
            "22.3 (22.0-28.1)",
            "1.06x",
        ],
        ["generation tok/s, 2 ranks", "-", "mlx.launch -n 2 --backend ring script", "13.8 (13.6-13.9)", "-"],
        ["time to first token (ms), 2 ranks", "-", "mlx.launch -n 2 --backend ring script", "399.4 (392.6-406.2)", "-"],
        ["generation, 2 ranks", "FAILED", "RuntimeError: the ranks ran out of memory"],
        ["profiled cell, rank 0: in mx.eval (ms)", "161.4", "the cell's own timer", "161.6", "1.00x (13.6 TFLOP/s)"],
        [
            "rank 0: memory + cached in the status table (MiB)",
            "3072",
            "nvidia-smi, the rank's process",
            "3600",
            "0.85x (the rest: its CUDA context)",
        ],
        ["mlx-nb demo -n 4: ready (s)", "4.2", "all-reduce / sharded Linear", "ok / ok", "-"],
        ["empty cell round trip (ms), 4 ranks", "1.50", "DirectView.execute, same engines", "1.20", "1.25x"],
        ["start to ready (s), 4 ranks", "3.10", "raw ipp.Cluster + manual init", "2.50", "1.24x"],
        ["start to ready (s), 4 ranks", "3.10", "mlx.launch -n 4 all-reduce script", "1.90", "1.63x"],
        ["stage collectives", "not measured", "time budget"],
    ]
    assert title(measured, 128, 3) == (
        "mlx_nb on one GPU, ratios against baselines measured in this run (NVIDIA H200, MLX 0.32.4, ring backend); "
        "generation: random-weight llama built on the machine, 2.97e9 params bf16, tensor parallel, 128 tokens, "
        "median (range) of 3 replies"
    )


def test_each_stages_rows_come_back_whole_from_the_file_its_process_writes(measured):
    measured["collectives"] = Collectives(
        90.0, 4, 1.02, 1.01, 0.1234, 0.121, {"mlx_nb": 0.05, "mlx.launch": 0.04}, 5, ["all_sum", 2**26, 0.05, 0.049]
    )
    for name, result in measured.items():
        assert gpu.STAGES[name].read(json.loads(json.dumps(asdict(result)))) == result
    assert {name: kind["kind"] for name, kind in json.loads(as_json(measured)).items()} == {
        name: type(r).__name__ for name, r in measured.items()
    }
    assert lines(measured)[-1] == ["all_sum 64 MB, 4 ranks (ms)", "50.0", "plain mlx.launch script", "49.0", "1.02x"]
