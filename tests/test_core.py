"""The core: a local cluster, SPMD cells, live output, magics, the demo and a real notebook."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import ipython_shell, processes_left, project_processes, wait_until
from IPython.core.error import UsageError

from mlx_nb import Cluster, DistCellError

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ Python API
def test_start_reports_every_rank_and_checks_the_group(four_ranks):
    ranks = four_ranks.status()
    assert [r.rank for r in ranks] == [0, 1, 2, 3]
    assert len({r.pid for r in ranks}) == 4
    assert all(r.device.startswith("Device(cpu") and r.mlx and r.state == "idle" for r in ranks)
    import mlx.core as mx

    assert ranks[0].mlx == mx.__version__


def test_all_sum_value_is_the_cell_result(four_ranks):
    result = four_ranks.run("mx.distributed.all_sum(mx.array([float(rank)]), group=world)")
    assert result.value["text/plain"] == "array([6], dtype=float32)"


def test_ranks_listen_only_on_loopback(four_ranks):
    procs = four_ranks.processes()  # the controller and its schedulers, ranks and spares
    listening = [c.laddr for q in procs for c in q.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening, "expected the controller and the ring to listen somewhere"
    assert {addr.ip for addr in listening} == {"127.0.0.1"}


def test_push_and_pull_move_values_both_ways(four_ranks):
    four_ranks.push({"scale": 10})
    four_ranks.run("y = (rank + 1) * scale")
    assert four_ranks.pull("y") == 10
    assert four_ranks.pull("y", "all") == [10, 20, 30, 40]
    result = four_ranks.run("z = mx.array([rank, size])", pull="z", ranks="all")
    assert [a.tolist() for a in result.pulled] == [[0, 4], [1, 4], [2, 4], [3, 4]]


def test_first_line_arrives_while_the_cell_still_runs(four_ranks, capsys):
    # rank 0 prints, then all ranks wait on a collective that rank 0 only enters
    # once the notebook has seen the line: the cell cannot end before it arrives
    arrived = threading.Event()

    class Watch(io.StringIO):
        def write(self, text):
            if "first line" in text:
                arrived.set()
            return super().write(text)

    done_at = []
    out = Watch()
    old, sys.stdout = sys.stdout, out
    try:
        t = threading.Thread(
            target=lambda: (
                four_ranks.run("print('first line', flush=True)\nimport time\ntime.sleep(2)"),
                done_at.append(time.monotonic()),
            )
        )
        t.start()
        assert arrived.wait(30), "rank 0's first line never reached the notebook"
        seen_at = time.monotonic()
        t.join(60)
    finally:
        sys.stdout = old
    assert done_at and seen_at < done_at[0]


def test_ranks_all_labels_lines_and_merges_identical_ones(four_ranks, capsys):
    four_ranks.run("print('same everywhere')\nprint(f'mine is {rank}')", ranks="all")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[ranks 0-3] same everywhere"
    assert out[1:] == [f"[rank {r}] mine is {r}" for r in range(4)]


def test_a_rank_error_shows_its_traceback_at_the_cell_line(four_ranks):
    with pytest.raises(DistCellError) as info:
        four_ranks.run("x = 1\ny = [1, 2][rank]\n")
    text = "\n".join(info.value._render_traceback_())
    assert "Root cause: ranks 2-3 raised IndexError: list index out of range, line 2: y = [1, 2][rank]" in text
    assert "<mlx_dist cell" in text and "ipyparallel" not in text and "mlx_nb/rank" not in text
    # the ranks that finished say so, and the group is still usable
    assert "rank 0: finished" in text
    assert four_ranks.run("mx.distributed.all_sum(mx.array([1.0]))").value["text/plain"] == "array([4], dtype=float32)"


def test_timeout_gives_the_prompt_back_and_the_cluster_works_after(four_ranks):
    t0 = time.monotonic()
    with pytest.raises(DistCellError) as info:
        four_ranks.run("if rank == 0:\n    mx.eval(mx.distributed.all_sum(mx.ones(2)))", timeout=2)
    assert time.monotonic() - t0 < 15
    assert "--timeout 2 s expired" in str(info.value)
    assert "rank 0: cancelled; it waited in all_sum #1 (shape (2,), float32)" in str(info.value)
    assert "Released: rank(s) 1-3 made the collectives the others waited in" in str(info.value)
    assert four_ranks.run("mx.distributed.all_sum(mx.array([2.0]))").value["text/plain"] == "array([8], dtype=float32)"


def _hostfiles(c: Cluster) -> list[str]:
    return c.run("import os\nhf = os.environ['MLX_HOSTFILE']", ranks="all", pull="hf").pulled


@pytest.mark.cluster
def test_stop_leaves_no_process_or_file_behind():
    c = Cluster(n=2).start()
    try:
        first = _hostfiles(c)
        assert len(set(first)) == 2 and all(os.path.exists(f) for f in first)
        c.restart()  # kills the ranks: they cannot remove their own hostfiles
        second = _hostfiles(c)
        assert all(os.path.exists(f) for f in second)
        assert [f for f in first if os.path.exists(f)] == []
    except BaseException:
        c.stop()
        raise
    procs = c.processes()
    assert len(procs) >= 1 + 2 * 2  # controller, 2 ranks and 2 spares (with their nannies)
    c.stop()
    # stop() returns once every engine, nanny and controller process is gone
    assert [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert [f for f in second if os.path.exists(f)] == []


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="positive number of ranks"):
        Cluster(n=0)
    with pytest.raises(ValueError, match="unknown backend 'gloo'"):
        Cluster(n=2, backend="gloo")


# ---------------------------------------------------------------------- magics
@pytest.fixture(scope="module")
def ip(four_ranks):
    from mlx_nb import magics

    shell = ipython_shell()
    shell.run_line_magic("load_ext", "mlx_nb")
    magics.use(four_ranks)  # the magics drive the module's cluster
    yield shell
    magics.use(None)


def test_magic_cell_push_pull_and_result(ip, capsys):
    ip.user_ns["a"] = 7
    result = ip.run_cell_magic("mlx_dist", "--push a --pull y", "y = a + rank\nprint('y is', y)\ny * 2")
    assert capsys.readouterr().out == "y is 7\n"
    assert ip.user_ns["y"] == 7
    assert result._repr_mimebundle_() == {"text/plain": "14"}
    ip.run_cell_magic("mlx_dist", "--ranks all --pull y", "y = rank * a")
    assert ip.user_ns["y"] == [0, 7, 14, 21]
    ip.run_line_magic("mlx_push", "a")
    assert ip.run_line_magic("mlx_pull", "a --ranks 1,3") == [7, 7]


def test_magic_status_table_lists_every_rank(ip):
    table = ip.run_line_magic("mlx_cluster", "status")
    text = repr(table)
    for column in ("rank", "host", "pid", "device", "memory", "peak", "state"):
        assert column in text.splitlines()[1]
    assert len(table.rows) == 4 and all(row[6] == "idle" for row in table.rows)
    assert "<table>" in table._repr_html_()


@pytest.mark.parametrize(
    "magic, line, message",
    [
        ("mlx_cluster", "bogus", "invalid choice: 'bogus'"),
        ("mlx_cluster", "start", "already running"),
        ("mlx_pull", "x --ranks 9", "this cluster has ranks 0-3"),
        ("mlx_push", "not_defined_here", "not defined in the notebook: not_defined_here"),
    ],
)
def test_magic_usage_errors_are_one_line(ip, magic, line, message):
    with pytest.raises(UsageError, match=message) as info:
        ip.run_line_magic(magic, line)
    assert "\n" not in str(info.value)


def test_cell_magic_usage_errors(ip):
    with pytest.raises(UsageError, match="this cluster has ranks 0-3"):
        ip.run_cell_magic("mlx_dist", "--ranks 5", "pass")
    with pytest.raises(UsageError, match="--timeout must be positive"):
        ip.run_cell_magic("mlx_dist", "--timeout -1", "pass")


def test_magic_help_is_complete(ip):
    doc = ip.find_cell_magic("mlx_dist").__doc__
    for option in ("--ranks", "--timeout", "--push", "--pull", "--setup"):
        assert option in doc


# ------------------------------------------------------- notebook, demo, tutorial
def _outputs(cell) -> tuple[str, dict]:
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    data = {}
    for o in cell.outputs:
        data.update(o.get("data", {}))
    return text, data


def test_a_real_notebook_runs_end_to_end(execute_notebook):
    nb = execute_notebook(ROOT / "tests" / "notebooks" / "core.ipynb")
    cells = nb.cells
    assert "Cluster ready" in _outputs(cells[0])[0]
    assert _outputs(cells[1])[0] == "hello from rank 0 of 2\n"
    assert _outputs(cells[2])[0] == "all_sum = 3.0\n"
    assert _outputs(cells[3])[1]["text/plain"] == "array([0, 2, 4], dtype=int32)"
    assert "image/png" in _outputs(cells[4])[1]
    assert "Cluster stopped." in _outputs(cells[5])[0]


def test_quickstart_tutorial_runs(execute_notebook):
    nb = execute_notebook(ROOT / "notebooks" / "01_quickstart.ipynb")
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "\n".join(_outputs(c)[0] for c in code)
    assert "rank 0 sees array([6, 6, 6, 6], dtype=float32)" in text
    assert "[ranks 0-3] sum on this rank: [6.0, 6.0, 6.0, 6.0]" in text
    assert any("image/png" in _outputs(c)[1] for c in code)
    assert any(_outputs(c)[1].get("text/plain") == "[10, 20, 30, 40]" for c in code)


@pytest.mark.cluster
def test_demo_command_runs_and_stops_cleanly():
    mark = uuid.uuid4().hex
    out = subprocess.run(
        [str(Path(sys.executable).parent / "mlx-nb"), "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLX_NB_TEST_SESSION": mark},
    )
    assert out.returncode == 0, out.stderr
    assert "all-reduce result 6 (expected 6): ok" in out.stdout
    assert "max error vs unsharded" in out.stdout
    assert "Stopped" in out.stdout
    assert project_processes(mark) == []


def test_profile_shows_per_rank_timeline_and_memory(ip):
    from IPython.core.interactiveshell import InteractiveShell

    import mlx_nb

    shown = []
    pub = InteractiveShell.instance().display_pub
    old = pub.publish
    pub.publish = lambda data, *a, **k: shown.append(data)
    try:
        ip.run_cell_magic(
            "mlx_dist",
            "--profile",
            "x = mx.random.normal((256, 256))\nfor _ in range(3):\n    mx.eval(mx.distributed.all_sum(x @ x, group=world))",
        )
    finally:
        pub.publish = old
    profile = mlx_nb.last_profile()
    assert [p.rank for p in profile.ranks] == [0, 1, 2, 3]
    for p in profile.ranks:
        assert p.collectives == 3 and len(p.evals) == 3
        assert 0 < p.collective_time <= p.eval_time <= p.wall
        assert p.peak_memory >= 256 * 256 * 4
    assert any("image/png" in d for d in shown), "the timeline figure is shown under the cell"
    assert any("in collectives (ms)" in d.get("text/plain", "") for d in shown)


def test_status_widget_shows_live_state_while_a_cell_runs(four_ranks):
    from mlx_nb.widgets import StatusWidget

    panel = StatusWidget(four_ranks, interval=0.1)
    done = threading.Event()
    worker = threading.Thread(
        target=lambda: (
            four_ranks.run("import time\nbig = mx.ones((1024, 1024)); mx.eval(big)\ntime.sleep(3)"),
            done.set(),
        )
    )
    worker.start()
    wait_until(lambda: "busy" in panel.value or done.is_set(), 20, every=0.05)
    assert "busy" in panel.value, panel.value
    worker.join(60)
    panel.refresh()
    assert "busy" not in panel.value and "idle" in panel.value
    # each rank's memory column now counts the 4 MB array the cell left behind
    import re

    memory = [float(m) for m in re.findall(r"<td>([\d.]+) MB</td><td>[\d.]+ MB</td><td>idle", panel.value)]
    assert len(memory) == 4 and all(m >= 4.0 for m in memory)
    panel.close()


def test_a_status_panel_run_again_replaces_the_last_whose_watcher_ends(ip):
    def watchers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "mlx_nb-status"]

    before = watchers()
    panels = [ip.run_line_magic("mlx_cluster", "status --watch") for _ in range(10)]
    wait_until(lambda: len(watchers()) <= len(before) + 1, 10, every=0.05)
    assert len(watchers()) == len(before) + 1  # ten runs of the cell, one watcher
    assert all("replaced by a newer panel" in p.value for p in panels[:-1])
    assert "idle" in panels[-1].value
    panels[-1].close()


@pytest.mark.cluster
def test_interpreter_exit_without_stop_leaves_nothing_running():
    mark = uuid.uuid4().hex
    script = (
        "from mlx_nb import Cluster\nc = Cluster(n=2).start()\nprint(c.run('rank').value['text/plain'])\n"
        "print(c.run('import os\\nhf = os.environ[\"MLX_HOSTFILE\"]', pull='hf').pulled)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLX_NB_TEST_SESSION": mark},
    )
    assert out.returncode == 0, out.stderr
    rank, hostfile = out.stdout.split()
    assert rank == "0"
    alive = processes_left(mark)
    assert alive == []
    assert not os.path.exists(hostfile)


@pytest.mark.cluster
def test_a_cluster_of_one_rank_works():
    with Cluster(n=1) as c:
        assert (
            c.run("mx.distributed.all_sum(mx.array([5.0]), group=world)").value["text/plain"]
            == "array([5], dtype=float32)"
        )
