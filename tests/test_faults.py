"""A failing rank never hangs the notebook: every fault on real engines, recovery, replayed setup.

Each test injects one real fault and checks the error text (the root-cause rank and
its exception first), the bound on the time until the prompt is back, that the next
cell computes a correct all_sum, that the --setup cell was replayed where the ranks
were restarted, and that no process is left behind.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import processes_left, project_processes, wait_until

from mlx_nb import Cluster, ClusterError, DistCellError
from mlx_nb.rank_env import free_ports

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parent.parent
BOUND = 10.0  # seconds from a fault to the prompt back
SUM = "mx.distributed.all_sum(mx.array([rank + 1.0])).item()"
SETUP = "base = 100 + rank"


def _load_soak():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ helpers
def _fail(cluster: Cluster, code: str, **kwargs) -> tuple[str, float]:
    t0 = time.perf_counter()
    with pytest.raises(DistCellError) as info:
        cluster.run(code, **kwargs)
    return info.value.report, time.perf_counter() - t0


def _fail_interrupted(cluster: Cluster, code: str, after: float = 1.5) -> tuple[str, float]:
    """Run ``code`` and send this process a real SIGINT ``after`` seconds in, as the
    notebook's interrupt does; return the report and the seconds from the SIGINT."""
    fired: list[float] = []

    def interrupt() -> None:
        fired.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(after, interrupt)
    timer.start()
    try:
        report, _ = _fail(cluster, code)
    finally:
        timer.cancel()
    return report, time.perf_counter() - fired[0]


def _assert_restarted(report: str) -> None:
    """The ranks were replaced, and the setup cell replayed before the error was shown."""
    assert "The group could not go on, so all 4 ranks were restarted" in report
    replayed = rf"\nReplayed 1 setup cell\(s\) on the new ranks in \d+\.\d s: {re.escape(SETUP)}\.$"
    assert re.search(replayed, report), report


def _assert_released(report: str, by: str) -> None:
    """Nothing was restarted: the free ranks answered the collective the others waited in."""
    assert report.splitlines()[-1] == (
        f"Released: rank(s) {by} made the collectives the others waited in (with zeros), and the cell was "
        f"cancelled on every rank ({report.rsplit('every rank (', 1)[1].split(')')[0]}). "
        "No rank was restarted: the ranks and their state are kept."
    ), report
    assert "Replayed" not in report


def _assert_cancelled(lines: list[str], ranks: tuple[int, ...], where: str) -> None:
    for r in ranks:
        line = next((x for x in lines if x.startswith(f"  rank {r}: ")), "")
        # the line number comes from the rank's last trace, which may predate its reaching it
        assert (
            line.removesuffix(" at line " + where.rsplit(" at line ", 1)[-1])
            == (f"  rank {r}: cancelled; it waited in {where.rsplit(' at line ', 1)[0]}")
            or line == f"  rank {r}: cancelled; it waited in {where}"
        ), lines


def _assert_blocked(lines: list[str], ranks: tuple[int, ...], where: str) -> None:
    for r in ranks:
        assert f"  rank {r}: blocked in a collective: {where}" in lines, lines


def _within_bound(took: float) -> None:
    print(f"fault -> prompt back: {took:.2f} s")  # shown with pytest -rP
    assert took < BOUND


def _assert_healthy(cluster: Cluster, restarted: bool, before: list[int]) -> None:
    """The next cell's all_sum is right, the setup state is there, nothing is left over."""
    assert cluster.run(SUM).value["text/plain"] == "10.0"
    assert cluster.pull("base", "all") == [100, 101, 102, 103]
    pids = [r.pid for r in cluster.ranks]
    assert (set(pids).isdisjoint(before)) if restarted else (pids == before)
    assert not processes_left(keep={p.pid for p in cluster.processes()})


def _assert_quiet(capfd) -> None:
    out, err = capfd.readouterr()
    assert "[ring]" not in out + err, "MLX ring noise reached the notebook"


@pytest.fixture(scope="module")
def faulty(four_ranks):
    """The module's four ranks, with one --setup cell registered."""
    four_ranks.setup_cells.clear()
    four_ranks.run(SETUP, setup=True)
    assert [c.code for c in four_ranks.setup_cells] == [SETUP]
    return four_ranks


# ------------------------------------------------------- start-up faults (own clusters)
def test_port_taken_names_the_rank_and_leaves_nothing_running():
    keep = {p.pid for p in project_processes()}
    ports = free_ports(4)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[2]))
        holder.listen()
        with pytest.raises(ClusterError) as info:
            Cluster(n=4, ports=ports, spares=False).start()
    text = str(info.value)
    assert text.startswith("mx.distributed.init failed on rank 2: RuntimeError: [ring] Couldn't bind socket")
    assert f"port {ports[2]} on 127.0.0.1, rank 2's address in the ring, is in use" in text
    assert not processes_left(keep=keep)


def _start_failure(tmp_path: Path, sitecustomize: str, **kwargs) -> str:
    """Start a cluster whose engines run ``sitecustomize`` first; return its ClusterError text."""
    keep = {p.pid for p in project_processes()}
    (tmp_path / "sitecustomize.py").write_text(sitecustomize)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    with pytest.raises(ClusterError) as info:
        Cluster(n=4, env={"PYTHONPATH": path}, spares=False, **kwargs).start()
    assert time.perf_counter() - t0 < 60
    assert not processes_left(keep=keep)
    return str(info.value)


def test_engine_that_crashes_at_start_is_named_with_its_output(tmp_path):
    text = _start_failure(
        tmp_path,
        "import os, sys\n"
        "if os.environ.get('MLX_RANK') == '2':\n"
        "    sys.stderr.write('rank 2 found a broken environment\\n')\n"
        "    sys.stderr.flush()\n"
        "    os._exit(3)\n",
    )
    assert text == "while starting: rank 2's engine process exited; its output:\n  rank 2 found a broken environment"


def test_init_that_never_completes_names_the_rank(tmp_path):
    # rank 2's `import mlx.core` never returns, so it never joins the ring
    text = _start_failure(
        tmp_path,
        "import importlib.util, os, sys, time\n"
        "if os.environ.get('MLX_RANK') == '2':\n"
        "    class Hang:\n"  # mlx.core's initialisation never returns (as a hung driver would)
        "        def find_spec(self, name, path=None, target=None):\n"
        "            if name == 'mlx.core':\n"
        "                return importlib.util.spec_from_loader(name, self)\n"
        "        def create_module(self, spec):\n"
        "            return None\n"
        "        def exec_module(self, module):\n"
        "            time.sleep(3600)\n"
        "    sys.meta_path.insert(0, Hang())\n",
        init_timeout=5,
    )
    assert text.startswith(
        "mx.distributed.init(backend='ring') did not complete within 5 s: rank(s) 2 never called it "
        "(it is stuck before the call, e.g. importing mlx)"
    ), text


# ------------------------------------------------------------- faults in a cell
def test_rank_error_before_all_sum_costs_one_cell_not_the_ranks(faulty, capfd):
    faulty.run("kept = rank * 5  # not a setup cell: only a drain keeps it")
    before = [r.pid for r in faulty.ranks]
    report, took = _fail(
        faulty,
        "x = mx.ones(3)\nif rank == 1:\n    raise ValueError('rank 1 gives up')\n"
        "y = mx.distributed.all_sum(x)\nmx.eval(y)",
    )
    lines = report.splitlines()
    assert (
        lines[0] == "Root cause: rank 1 raised ValueError: rank 1 gives up, line 3: raise ValueError('rank 1 gives up')"
    )
    _assert_cancelled(lines, (0, 2, 3), "all_sum #1 (shape (3,), float32) at line 5")
    _assert_released(report, "1")
    _assert_quiet(capfd)
    _within_bound(took)
    _assert_healthy(faulty, restarted=False, before=before)
    assert faulty.pull("kept", "all") == [0, 5, 10, 15]


def test_a_raise_partway_through_collectives_is_drained(faulty):
    before = [r.pid for r in faulty.ranks]
    report, _ = _fail(
        faulty,
        "for k in range(4):\n    if rank == 2 and k == 2:\n        raise RuntimeError('bad batch')\n"
        "    mx.eval(mx.distributed.all_sum(mx.ones(2) * k))",
    )
    lines = report.splitlines()
    assert lines[0].startswith("Root cause: rank 2 raised RuntimeError: bad batch, line 3")
    _assert_cancelled(lines, (0, 1, 3), "all_sum #3 (shape (2,), float32) at line 4")
    _assert_released(report, "2")
    _assert_healthy(faulty, restarted=False, before=before)


def test_several_failing_ranks_drain_together(faulty):
    before = [r.pid for r in faulty.ranks]
    report, _ = _fail(
        faulty, "if rank in (1, 3):\n    raise ValueError(f'no {rank}')\nmx.eval(mx.distributed.all_sum(mx.ones(2)))"
    )
    lines = report.splitlines()
    assert lines[0].startswith("Root cause: rank ") and "raised ValueError: no " in lines[0]
    _assert_cancelled(lines, (0, 2), "all_sum #1 (shape (2,), float32) at line 3")
    _assert_released(report, "1,3")
    _assert_healthy(faulty, restarted=False, before=before)


def test_a_recv_from_a_failed_rank_is_drained(faulty):
    before = [r.pid for r in faulty.ranks]
    code = (
        "x = mx.ones((3,)) * rank\n"
        "if rank == 0:\n    raise ValueError('stage 0 failed')\n"
        "if rank == 1:\n    mx.eval(mx.distributed.recv_like(x, 0))\n"
        "if rank == 2:\n    mx.eval(mx.distributed.send(x, 3))\n"
        "if rank == 3:\n    mx.eval(mx.distributed.recv_like(x, 2))\n"
    )
    report, _ = _fail(faulty, code)
    lines = report.splitlines()
    assert lines[0].startswith("Root cause: rank 0 raised ValueError: stage 0 failed")
    _assert_cancelled(lines, (1,), "recv_like #1 (shape (3,), float32; from rank 0) at line 5")
    assert "  rank 2: finished" in lines or "  rank 2: cancelled" in "\n".join(lines)
    _assert_released(report, "0")
    _assert_healthy(faulty, restarted=False, before=before)


def test_ranks_that_disagree_about_the_collective_are_restarted_and_say_why(faulty):
    before = [r.pid for r in faulty.ranks]
    code = (
        "if rank == 0:\n    raise ValueError('no')\n"
        "if rank == 1:\n    mx.eval(mx.distributed.all_gather(mx.ones(2)))\n"
        "else:\n    mx.eval(mx.distributed.all_sum(mx.ones(2)))"
    )
    report, _ = _fail(faulty, code)
    assert "Not drained: the ranks disagree about the collective they wait in: rank 1 in all_gather #1" in report
    _assert_restarted(report)
    _assert_healthy(faulty, restarted=True, before=before)


def test_same_error_on_every_rank_keeps_the_ranks_and_their_state(faulty):
    faulty.run("kept = rank * 2")
    before = [r.pid for r in faulty.ranks]
    report, took = _fail(faulty, "kept += 1\nraise ValueError('same everywhere')")
    assert report.splitlines()[0] == "[ranks 0-3] all raised ValueError: same everywhere"
    assert report.endswith("no restart was needed: the ranks and their state are kept.")
    _within_bound(took)
    assert faulty.pull("kept", "all") == [1, 3, 5, 7]
    _assert_healthy(faulty, restarted=False, before=before)


def test_rank_exit_mid_cell_is_reported_lost_and_recovers(faulty, capfd):
    before = [r.pid for r in faulty.ranks]
    report, took = _fail(
        faulty,
        "import os\nx = mx.distributed.all_sum(mx.ones(2))\nmx.eval(x)\n"
        "if rank == 2:\n    os._exit(7)\ny = mx.distributed.all_sum(x)\nmx.eval(y)",
        ranks="all",
    )
    lines = report.splitlines()
    assert lines[0].startswith("Root cause: rank 2 was lost (its engine process died mid-cell")
    for r in (0, 1, 3):
        line = next(x for x in lines if x.startswith(f"  rank {r}: "))
        assert line.endswith(
            (
                "raised RuntimeError: [ring] connection to a peer was lost at line 7",
                "blocked in a collective: all_sum #2 (shape (2,), float32) at line 7",
            )
        ), line
    _assert_restarted(report)
    _assert_quiet(capfd)
    _within_bound(took)
    _assert_healthy(faulty, restarted=True, before=before)


def test_engine_killed_while_idle_is_replaced_by_the_next_cell(faulty, capsys):
    before = [r.pid for r in faulty.ranks]
    os.kill(before[1], signal.SIGKILL)
    wait_until(lambda: 1 in faulty.group.dead_ranks(), 5)  # the launcher's wait thread sees the exit
    t0 = time.perf_counter()
    value = faulty.run(SUM).value
    took = time.perf_counter() - t0
    assert value["text/plain"] == "10.0"
    out = capsys.readouterr().out
    assert "[rank 1] lost: engine process exited while idle; restarting the cluster..." in out
    assert "Replayed 1 setup cell(s) on the new ranks in" in out
    _within_bound(took)
    _assert_healthy(faulty, restarted=True, before=before)


def test_interrupt_stops_looping_ranks_and_keeps_their_state(faulty):
    faulty.run("kept = rank * 3")
    before = [r.pid for r in faulty.ranks]
    report, took = _fail_interrupted(faulty, "i = 0\nwhile True:\n    i += 1")
    lines = report.splitlines()
    assert lines[0] == "%%mlx_dist: interrupted."
    assert all(any(x.startswith(f"  rank {r}: interrupted at line") for x in lines) for r in range(4))
    assert lines[-1] == "No restart was needed: the ranks and their state are kept."
    _within_bound(took)
    assert faulty.pull("kept", "all") == [0, 3, 6, 9]
    _assert_healthy(faulty, restarted=False, before=before)


def test_interrupt_of_a_rank_the_others_wait_for_is_drained(faulty):
    before = [r.pid for r in faulty.ranks]
    report, took = _fail_interrupted(
        faulty,
        "import time\nif rank == 0:\n    while True:\n        time.sleep(0.01)\n"
        "mx.eval(mx.distributed.all_sum(mx.ones(2)))",
    )
    lines = report.splitlines()
    assert lines[0] == "%%mlx_dist: interrupted."
    assert lines[1] == (
        "Root cause: rank 0 had not reached the collective the others wait in: "
        "it was running line 4: time.sleep(0.01) when interrupted."
    )
    _assert_cancelled(lines, (1, 2, 3), "all_sum #1 (shape (2,), float32) at line 5")
    _assert_released(report, "0")
    _within_bound(took)
    _assert_healthy(faulty, restarted=False, before=before)


def test_timeout_while_ranks_wait_in_a_collective_recovers(faulty, capfd):
    before = [r.pid for r in faulty.ranks]
    report, took = _fail(
        faulty,
        "import time\nif rank == 3:\n    time.sleep(600)\ny = mx.distributed.all_sum(mx.ones((2, 3)))\nprint(y)",
        timeout=2,
    )
    lines = report.splitlines()
    assert lines[0] == "%%mlx_dist: --timeout 2 s expired."
    assert lines[1] == (
        "Root cause: rank 3 had not reached the collective the others wait in: "
        "it was running line 3: time.sleep(600) when interrupted."
    )
    # print(y) evaluates y: the ranks wait in the all_sum
    _assert_cancelled(lines, (0, 1, 2), "all_sum #1 (shape (2, 3), float32) at line 5")
    _assert_released(report, "3")
    _assert_quiet(capfd)
    _within_bound(took - 2)
    _assert_healthy(faulty, restarted=False, before=before)


def test_error_inside_eval_of_a_collective_names_the_rank(faulty):
    before = [r.pid for r in faulty.ranks]
    report, took = _fail(
        faulty,
        "A = mx.zeros((2, 2)) if rank == 2 else mx.eye(2)\n"
        "y = mx.distributed.all_sum(mx.linalg.inv(A, stream=mx.cpu))\nmx.eval(y)",
    )
    assert report.splitlines()[0] == (
        "Root cause: rank 2 raised RuntimeError: [Inverse::eval_cpu] LU factorization failed "
        "with error code 1, line 3: mx.eval(y)"
    )
    assert "mlx_nb/rank" not in report  # the recorder's wrappers are not the user's concern
    _within_bound(took)
    # the others either wait in the all_sum (released by rank 2) or got through it
    assert "were restarted" not in report
    assert ("cancelled; it waited in all_sum #1 (shape (2, 2), float32)" in report) == ("Released:" in report)
    _assert_healthy(faulty, restarted=False, before=before)


def test_rank_out_of_memory_is_reported_and_recovers(faulty):
    before = [r.pid for r in faulty.ranks]
    # 1 PiB: no allocator can provide it, so nothing is actually used; MLX's CPU
    # allocator then crashes the rank, as a real OOM kill would
    report, took = _fail(
        faulty,
        "x = mx.ones((1 << 24, 1 << 24)) if rank == 1 else mx.ones((4,))\n"
        "y = mx.distributed.all_sum(x.sum())\nmx.eval(y)",
    )
    first = report.splitlines()[0]
    assert first.startswith(("Root cause: rank 1 was lost", "Root cause: rank 1 raised")), first
    _assert_restarted(report)
    _within_bound(took)
    _assert_healthy(faulty, restarted=True, before=before)


def test_failed_restart_is_retried_by_the_next_cell(faulty):
    """A restart that fails leaves no half-formed group: the next cell starts one afresh."""
    faulty.ports = free_ports(4)
    before = [r.pid for r in faulty.ranks]
    try:
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", faulty.ports[1]))
            holder.listen()
            with pytest.raises(ClusterError, match="failed on rank 1"):
                faulty.restart()
        assert faulty.ranks == []
    finally:
        faulty.ports = None
    assert faulty.run(SUM).value["text/plain"] == "10.0"
    _assert_healthy(faulty, restarted=True, before=before)


def test_interrupt_during_the_recovery_restart_keeps_the_report(faulty, capsys):
    """A second interrupt while a failed cell's ranks are being replaced: the first failure is
    still explained, and the next cell finishes the repair."""
    before = [r.pid for r in faulty.ranks]
    cell_started = threading.Event()

    def interrupt_the_restart() -> None:
        cell_started.wait()
        # new rank processes are in place, their group is being formed
        wait_until(lambda: faulty.ranks and faulty.ranks[0].pid not in before, 30, every=0.002)
        os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt_the_restart)
    watcher.start()
    cell_started.set()
    try:
        report, _ = _fail(
            faulty, "import os\nif rank == 3:\n    os._exit(3)\nmx.eval(mx.distributed.all_sum(mx.ones(2)))"
        )
    finally:
        watcher.join()
    lines = report.splitlines()
    assert lines[0].startswith("Root cause: rank 3 was lost (its engine process died mid-cell")
    assert "Restarting the cluster failed: interrupted before the new ranks were ready" in lines
    assert lines[-1] == "The next cell tries again (or %mlx_cluster restart now)."
    capsys.readouterr()
    assert faulty.run(SUM).value["text/plain"] == "10.0"
    assert "no ranks are running (the last restart failed); restarting the cluster..." in capsys.readouterr().out
    _assert_healthy(faulty, restarted=True, before=before)


# ------------------------------------------- every way to the ranks finds a rank lost while idle
# seconds from the call to its result, the replacement of the ranks included: about 3 s on a quiet
# 2-core machine, 5-8 s when it is loaded; what this rules out is ipyparallel's own 30 s wait for a
# dead engine ending in a CompositeError (how long it takes is benchmarks' business, not a test's)
IDLE_BOUND = 15.0


@pytest.fixture
def magics_on(faulty):
    import conftest

    with conftest.magics_on(faulty) as shell:
        yield shell


def _kill_idle_rank(cluster: Cluster, rank: int = 2) -> list[int]:
    # idle a while, as a notebook is: the spares that the last restart started are up
    wait_until(cluster.group.spares_ready, 60)
    before = [r.pid for r in cluster.ranks]
    os.kill(before[rank], signal.SIGKILL)
    wait_until(lambda: rank in cluster.group.dead_ranks(), 5, every=0.05)  # the launcher's wait thread sees the exit
    return before


def _replaced_in_time(capsys, took: float, before: list[int], cluster: Cluster) -> None:
    out = capsys.readouterr().out
    assert "[rank 2] lost: engine process exited while idle; restarting the cluster..." in out
    assert "Traceback" not in out and "CompositeError" not in out
    print(f"idle rank lost -> result: {took:.2f} s")
    assert took < IDLE_BOUND
    assert set(r.pid for r in cluster.ranks).isdisjoint(before)


def test_push_magic_replaces_a_rank_lost_while_idle(faulty, magics_on, capsys):
    before = _kill_idle_rank(faulty)
    magics_on.user_ns["gift"] = 41
    t0 = time.perf_counter()
    magics_on.run_line_magic("mlx_push", "gift")
    _replaced_in_time(capsys, time.perf_counter() - t0, before, faulty)
    assert faulty.pull("gift", "all") == [41] * 4


def test_pull_magic_replaces_a_rank_lost_while_idle(faulty, magics_on, capsys):
    before = _kill_idle_rank(faulty)
    t0 = time.perf_counter()
    assert magics_on.run_line_magic("mlx_pull", "base --ranks all") == [100, 101, 102, 103]  # replayed setup
    _replaced_in_time(capsys, time.perf_counter() - t0, before, faulty)


def test_bench_magic_replaces_a_rank_lost_while_idle(faulty, magics_on, capsys):
    before = _kill_idle_rank(faulty)
    t0 = time.perf_counter()
    result = magics_on.run_line_magic("mlx_bench", "--sizes 1KB --ops all_sum --warmup 0 --iters 1 --no-plot")
    _replaced_in_time(capsys, time.perf_counter() - t0, before, faulty)
    assert result.rows[0].correct


def test_sharding_lab_replaces_a_rank_lost_while_idle(faulty, capsys):
    from mlx_nb.sharding import sharding_lab

    before = _kill_idle_rank(faulty)
    t0 = time.perf_counter()
    report = sharding_lab(faulty, (16, 32, 16), iters=1, warmup=0)
    _replaced_in_time(capsys, time.perf_counter() - t0, before, faulty)
    assert report.max_error < 1e-5


# ------------------------------------------- the user's names are the user's
def test_a_cell_that_sets_rank_keeps_pulls_working(faulty, magics_on):
    faulty.run("rank = 8  # a LoRA rank, say")
    try:
        magics_on.run_cell_magic("mlx_dist", "--ranks all --pull y", "y = rank + 1")
        assert magics_on.user_ns["y"] == [9, 9, 9, 9]
        assert faulty.pull("base", "all") == [100, 101, 102, 103]
    finally:
        faulty.run("rank = world.rank()")


def test_import_numpy_as_mx_keeps_hang_diagnosis(faulty):
    faulty.run("import numpy as mx")
    report, _ = _fail(
        faulty,
        "import mlx.core as m\nimport time\ntime.sleep(1)\nif world.rank() == 0:\n"
        "    m.eval(m.distributed.all_sum(m.ones(2)))",
        timeout=4,
    )
    assert "  rank 0: cancelled; it waited in all_sum #1 (shape (2,), float32) at line 5" in report.splitlines()
    faulty.run("import mlx.core as mx")
    assert faulty.run(SUM).value["text/plain"] == "10.0"


def test_soak_300_cells_with_a_fault_every_50_ends_healthy(faulty):
    soak = _load_soak()
    faulty.on_message = lambda _text: None
    try:
        marker = ("MLX_NB_TEST_SESSION", os.environ["MLX_NB_TEST_SESSION"])
        result = soak.soak(faulty, marker, cells=300, fault_every=50)
    finally:
        faulty.on_message = print
    for table in soak.tables(result, 300, 50, faulty.n):
        print(table)
    assert len(result.faults) == 6 and len(result.cell_s) == 294
    assert all(f.next_ok for f in result.faults)
    assert all(f.prompt_s < BOUND for f in result.faults), result.faults
    assert result.end.processes == result.start.processes
    assert result.end.notebook_fds - result.start.notebook_fds <= 4
    assert result.end.controller_fds - result.start.controller_fds <= 16
    _assert_healthy(faulty, restarted=True, before=[])


def test_twenty_drained_faults_in_a_row_keep_answers_right_and_counts_flat(faulty):
    """benchmarks/soak.py --drains 50 is the long soak (its table is in the README)."""
    soak = _load_soak()
    faulty.on_message = lambda _text: None
    try:
        marker = ("MLX_NB_TEST_SESSION", os.environ["MLX_NB_TEST_SESSION"])
        result = soak.soak_drains(faulty, marker, count=20)
    finally:
        faulty.on_message = print
    for table in soak.tables(result, 20, 1, faulty.n):
        print(table)
    assert len(result.faults) == 20
    assert not [f for f in result.faults if f.restarted or not f.next_ok], result.faults
    assert result.end.processes == result.start.processes
    assert result.end.notebook_fds - result.start.notebook_fds <= 4
    assert result.end.controller_fds - result.start.controller_fds <= 16


# ------------------------------------------------------------------ tutorial
def test_tutorial_notebook_shows_each_fault_and_recovers(execute_notebook):
    keep = {p.pid for p in project_processes()}
    # cells tagged raises-exception fail on purpose; any other error fails the test
    nb = execute_notebook(ROOT / "notebooks" / "02_when_a_rank_fails.ipynb")
    errors = [
        "\n".join(o.get("traceback", []))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "error"
    ]
    tagged = [c for c in nb.cells if "raises-exception" in c.metadata.get("tags", [])]
    assert len(errors) == len(tagged) >= 6
    text = "\n".join(
        o.get("text", "") + o.get("data", {}).get("text/plain", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert "Root cause: rank 1 raised ValueError" in "\n".join(errors)
    assert "Replayed 1 setup cell(s)" in "\n".join(errors)
    assert "lost: engine process exited" in text
    assert "the kernel is the same process, and its variables are intact" in text
    assert not processes_left(keep=keep)
