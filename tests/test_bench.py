"""Collective benchmarks, the sharding lab and notebook 05, on real 2-rank clusters."""

from __future__ import annotations

from pathlib import Path

import ipyparallel as ipp
import pytest

from mlx_nb import DistCellError
from mlx_nb.bench import (
    BenchResult,
    as_reference,
    bench_main,
    bus_factor,
    make_row,
    parse_sizes,
    percentile,
    run_bench,
)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_collectives_and_sharding.ipynb"
TINY = 'N = 2\nSIZES = "1KB,16KB"\nFACTOR = 4\nITERS, WARMUP = 3, 1\nDIMS = (64, 128, 64)\nCOUNTS = (1, 2)'


# ----------------------------------------------------------------- rows
def test_bus_bandwidth_uses_ring_factors_of_nccl_tests():
    assert bus_factor("all_sum", 4) == pytest.approx(1.5)  # 2(n-1)/n
    assert bus_factor("all_gather", 4) == pytest.approx(0.75)  # (n-1)/n
    assert bus_factor("send_recv", 4) == 1.0
    row = make_row("all_sum", 1 << 20, "float32", 4, "ring", [0.001] * 5)
    assert row.algbw == pytest.approx((1 << 20) / 0.001)
    assert row.busbw == pytest.approx(row.algbw * 1.5)
    gather = make_row("all_gather", 1 << 20, "float32", 4, "ring", [0.001] * 5)
    assert gather.busbw == pytest.approx(gather.algbw * 0.75)


def test_median_and_p90_interpolate_between_iterations():
    times = [0.010, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009]
    row = make_row("all_sum", 1024, "float32", 2, "ring", times)
    assert row.median == pytest.approx(0.0055)  # numpy.percentile(times, 50)
    assert row.p90 == pytest.approx(0.0091)  # numpy.percentile(times, 90)
    assert percentile([3.0], 90) == 3.0
    assert row.iters == 10 and row.correct


def test_sizes_parse_ranges_lists_and_reject_nonsense():
    assert parse_sizes("1KB-16KB", factor=4) == [1024, 4096, 16384]
    assert parse_sizes("4KB,1MB,4KB") == [4096, 1 << 20]
    assert parse_sizes("1KB-256MB")[-1] == 256 << 20
    for bad in ("", "12XB", "1MB-1KB"):
        with pytest.raises(ValueError):
            parse_sizes(bad)


def test_reference_is_a_link_speed_or_a_measured_copy():
    assert as_reference("tb5").bandwidth == pytest.approx(10e9)  # 80 Gb/s
    assert as_reference(80).bandwidth == as_reference("80Gb/s").bandwidth == pytest.approx(10e9)
    assert as_reference("memcpy").bandwidth > 0
    with pytest.raises(ValueError, match="memcpy"):
        as_reference("warp drive")


def test_plot_has_log_log_latency_and_bandwidth_with_reference_line():
    rows = [
        make_row(op, s, "float32", 2, "ring", [1e-5 + s / 1e9] * 3)
        for op in ("all_sum", "send_recv")
        for s in (1024, 1 << 16, 1 << 20)
    ]
    result = BenchResult(rows, 2, "ring", as_reference("tb5"))
    fig = result.plot()
    lat, bw = fig.axes
    for ax in (lat, bw):
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "latency" in lat.get_ylabel() and "bandwidth" in bw.get_ylabel()
    assert any("Thunderbolt 5" in line.get_label() for line in bw.get_lines())
    a, b, crossover = result.crossover("all_sum")
    assert a == pytest.approx(rows[0].median) and crossover == pytest.approx(a * b)


# ------------------------------------------------------- on real ranks
def test_sweep_on_two_ranks_returns_checked_rows(two_ranks):
    result = run_bench(two_ranks, "1KB,64KB", warmup=1, iters=3, progress=False)
    assert [(r.op, r.size) for r in result.rows] == [
        (op, s) for op in ("all_sum", "all_gather", "send_recv") for s in (1024, 65536)
    ]
    for r in result.rows:
        assert r.correct and r.ranks == 2 and r.iters == 3 and len(r.times) == 3
        assert 0 < r.median <= r.p90
        assert r.busbw == pytest.approx(r.algbw * bus_factor(r.op, 2))
    text = repr(result)
    assert "all_gather" in text and "WRONG" not in text


def test_every_rank_time_and_check_is_gathered(two_ranks):
    @ipp.interactive  # run in the engine's namespace: this test module is not importable there
    def on_rank():
        from mlx_nb.bench import slowest
        from mlx_nb.rank import world

        r = world().rank()
        return slowest(world(), [0.1 * (r + 1), 0.5 - 0.1 * r], ok=r != 1)

    (worst0, wrong0), (worst1, wrong1) = two_ranks.call(on_rank)
    assert worst0 == worst1 == pytest.approx([0.2, 0.5])  # per-iteration max over ranks
    assert wrong0 == wrong1 == [1]


def test_rank_error_mid_collective_names_the_rank_and_recovers(two_ranks):
    @ipp.interactive  # run in the engine's namespace: this test module is not importable there
    def on_rank():
        import mlx.core as mx

        from mlx_nb.rank import world

        if world().rank() == 1:
            raise MemoryError("no room for the buffer")
        mx.eval(mx.distributed.all_sum(mx.ones(1), group=world()))  # rank 0 waits forever

    with pytest.raises(DistCellError, match=r"Root cause: rank 1 raised MemoryError: no room") as e:
        two_ranks.call(on_rank)
    assert "rank 0: cancelled; it waited in all_sum #1" in str(e.value)
    assert "No rank was restarted" in str(e.value)
    assert run_bench(two_ranks, "1KB", ops="all_sum", warmup=0, iters=1, progress=False).rows[0].correct


def test_sharding_lab_matches_the_unsharded_model(two_ranks):
    from mlx_nb.sharding import sharding_lab

    for method in ("shard_linear", "shard_inplace"):
        mlp = sharding_lab(two_ranks, (64, 128, 32), method, iters=2)
        assert mlp.max_error < 1e-5
        shapes = {p.name: p.shape for p in mlp.params if p.rank == 1}
        assert shapes["up.weight"] == (64, 64) and shapes["down.weight"] == (32, 64)
        assert shapes["down.bias"] == (32,)  # sharded-to-all keeps the whole bias
    s2a = sharding_lab(two_ranks, (64, 32), "shard_inplace", "sharded-to-all", iters=2)
    assert s2a.max_error < 1e-5 and s2a.bytes_per_rank() == [(32 * 32 + 32) * 4] * 2
    with pytest.raises(ValueError, match="multiple of 2"):
        sharding_lab(two_ranks, (64, 33), "shard_linear", "all-to-sharded")


@pytest.mark.cluster
def test_cli_writes_a_png(tmp_path, capsys):
    out = tmp_path / "plot.png"
    code = bench_main(
        [
            "-n",
            "2",
            "--sizes",
            "1KB,4KB",
            "--ops",
            "all_sum,send_recv",
            "--warmup",
            "0",
            "--iters",
            "2",
            "--reference",
            "tb5",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "busbw GB/s" in printed and "latency-bound" in printed
    assert bench_main(["--sizes", "nonsense"]) == 2


def test_notebook_executes_with_its_figures(execute_notebook):
    nb = execute_notebook(NOTEBOOK, parameters=TINY)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 4  # %mlx_bench, run_bench vs memcpy, memory per rank, scaling
    text = "".join(o.get("text", "") for o in outputs)
    assert "latency-bound" in text and "Cluster stopped." in text
