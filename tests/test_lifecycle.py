"""The ranks' lifetime: nothing outlives its kernel unless kept, a kept cluster is attached again,
a dead controller is found, and the ranks run one job at a time.

Kernels here are real ones, through jupyter_client: a kernel's death is what the tests cause.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import psutil
import pytest
from conftest import Kernel, processes_left, project_processes, wait_for, wait_until

from mlx_nb import Cluster, ClusterError, clusters
from mlx_nb.engines import kept

pytestmark = pytest.mark.cluster
GONE_WITHIN = 10.0  # seconds from a kernel's death to none of its cluster's processes left


@pytest.fixture
def mark():
    m = uuid.uuid4().hex
    yield m
    for p in project_processes(m):  # a failed test must not leave its cluster behind
        p.kill()


@pytest.mark.kernel
def test_a_killed_kernel_takes_its_cluster_with_it(mark):
    k = Kernel(mark)
    try:
        out, err = k.run("%load_ext mlx_nb\n%mlx_cluster start -n 2")
        assert not err and "Cluster ready" in out
        assert len(project_processes(mark)) >= 4  # controller, ranks, spares
        k.kill()
        left = processes_left(mark, timeout=GONE_WITHIN)
        assert left == [], [p.cmdline() for p in left]
    finally:
        k.close()


@pytest.mark.kernel
def test_a_kernel_killed_while_its_ranks_wait_in_a_collective_takes_them_with_it(mark):
    k = Kernel(mark)
    try:
        k.run("%load_ext mlx_nb\n%mlx_cluster start -n 2")
        # rank 0 waits in an all_sum rank 1 never makes: blocked in native code
        k.kc.execute(
            "%%mlx_dist\nif rank == 0:\n    print('in all_sum', flush=True)\n    mx.eval(mx.distributed.all_sum(mx.ones(2)))\n"
            "else:\n    import time; time.sleep(600)"
        )
        k.wait_for_output("in all_sum")  # rank 0's line, streamed as it enters the collective
        k.km.restart_kernel(now=True)  # what Jupyter does to a kernel whose cell will not stop
        left = processes_left(mark, timeout=GONE_WITHIN)
        assert left == [], [p.cmdline() for p in left]
    finally:
        k.close()


def _kill_all_of(mark: str) -> None:
    """SIGKILL every engine and controller of the clusters marked ``mark`` (not the watchdog), as
    the OOM killer or a restart of the machine would: nothing of theirs gets to clean up."""
    procs = [p for p in project_processes(mark) if "watchdog" not in " ".join(p.cmdline())]
    procs += [c for p in procs for c in p.children(recursive=True)]
    for p in procs:
        p.kill()
    psutil.wait_procs(procs, timeout=10)


@pytest.mark.kernel
def test_a_kept_cluster_outlives_its_kernel_and_when_every_process_dies_its_name_is_free(mark):
    name = f"t-{mark[:8]}"
    a, b, c = Kernel(mark), Kernel(mark), Kernel(mark)
    try:
        out, err = a.run(f"%load_ext mlx_nb\n%mlx_cluster start -n 2 --name {name} --keep")
        assert not err and f"kept as {name!r}" in out
        a.run("%%mlx_dist --setup\nbase = 100 + rank")
        a.run("%%mlx_dist\nsecret = 41 + rank")
        pids = a.run("from mlx_nb.magics import current\nprint([r.pid for r in current().ranks])")[0]
        a.kill(reap=False)  # a zombie until its kernel manager waits for it: gone all the same
        assert [k["name"] for k in clusters() if k["name"] == name] == [name]
        out, err = b.run(f"%load_ext mlx_nb\n%mlx_cluster attach {name}")
        assert not err and f"Attached {name!r}: 2 ranks" in out and "1 setup cell(s) kept" in out
        assert psutil.Process(a.pid).status() == psutil.STATUS_ZOMBIE
        assert b.run("from mlx_nb.magics import current\nprint([r.pid for r in current().ranks])")[0] == pids
        assert b.run("v = %mlx_pull secret --ranks all\nprint(v)")[0] == "[41, 42]"
        assert b.run("%%mlx_dist\nprint(mx.distributed.all_sum(mx.array([rank + 1.0])).item())")[0] == "3.0"

        # every process of it dies at once; its files stay, and are met three ways in a new kernel
        b.kill()
        _kill_all_of(mark)
        files = {f: open(f).read() for f in kept.files(kept.IppCluster(cluster_id=kept.PREFIX + name).cluster_file)}
        out, err = c.run("%load_ext mlx_nb\n%mlx_cluster list")
        assert not err and name not in out
        for f, text in files.items():  # as found after the death again
            open(f, "w").write(text)
        _, err = c.run(f"%mlx_cluster attach {name}")
        assert f"UsageError: cluster {name!r} is gone: its controller no longer runs" in err
        assert f"start it anew with %mlx_cluster start -n 2 --name {name} --keep" in err
        for f, text in files.items():
            open(f, "w").write(text)
        out, err = c.run(f"%mlx_cluster start -n 2 --name {name} --keep")
        assert not err and f"kept as {name!r}" in out
        assert c.run("%%mlx_dist\nprint(mx.distributed.all_sum(mx.array([rank + 1.0])).item())")[0] == "3.0"
        out, err = c.run("%mlx_cluster stop")
        assert "Cluster stopped." in out
        assert processes_left(mark, timeout=GONE_WITHIN) == [] and name not in [k["name"] for k in clusters()]
    finally:
        for k in (a, b, c):
            k.close()


@pytest.mark.kernel
def test_a_second_kernel_is_refused_until_it_takes_the_cluster_over(mark):
    name = f"t-{mark[:8]}"
    a, b = Kernel(mark), Kernel(mark)
    try:
        a.run(f"%load_ext mlx_nb\n%mlx_cluster start -n 2 --name {name} --keep")
        _, err = b.run(f"%load_ext mlx_nb\n%mlx_cluster attach {name}")
        assert f"cluster {name!r} is attached to another kernel (pid {a.pid}" in err and "--take" in err
        out, err = b.run(f"%mlx_cluster attach {name} --take")
        assert not err and f"Attached {name!r}" in out
        _, err = a.run("%%mlx_dist\nx = 1")
        assert f"cluster {name!r} was taken over by the kernel pid {b.pid}" in err
        assert "Traceback" not in err
        b.run("%mlx_cluster stop")
        assert processes_left(mark, timeout=GONE_WITHIN) == []
    finally:
        a.close()
        b.close()


def test_a_kept_cluster_idle_past_its_limit_stops_itself(mark):
    os.environ["MLX_NB_TEST_SESSION"], old = mark, os.environ["MLX_NB_TEST_SESSION"]
    try:
        c = Cluster(n=2, name=f"t-{mark[:8]}", keep=True, idle=3, spares=False).start()
    finally:
        os.environ["MLX_NB_TEST_SESSION"] = old
    c.run("x = 1")
    assert processes_left(mark, timeout=3 + GONE_WITHIN) == []
    assert f"t-{mark[:8]}" not in [k["name"] for k in clusters()]


# ------------------------------------------------------------------ the controller
@pytest.fixture
def owned():
    with Cluster(n=2, spares=False) as c:
        c.run("base = 1", setup=True)
        yield c


def _controller(cluster: Cluster) -> psutil.Process:
    return next(p for p in cluster.processes() if "ipyparallel.controller" in " ".join(p.cmdline()))


def test_a_dead_controller_is_found_by_the_next_cell_and_the_cluster_restarts(owned, capsys):
    _controller(owned).kill()
    wait_until(lambda: not owned.group.controller_alive(), 10)  # its launcher's wait thread sees it exit
    t0 = time.perf_counter()
    statuses = owned.status()  # answers at once, whatever the hub
    assert time.perf_counter() - t0 < 5 and {r.state for r in statuses} == {"unreachable (controller died)"}
    assert owned.run("mx.distributed.all_sum(mx.array([base + 0.0])).item()").value["text/plain"] == "2.0"
    out = capsys.readouterr().out
    assert "The controller died; restarting the cluster (controller and ranks)..." in out
    assert "Replayed 1 setup cell(s)" in out


# ------------------------------------------------------------------ one job at a time
def test_a_foreground_cell_waits_visibly_for_a_background_job_which_goes_on_unharmed(owned, capsys):
    done: list = []

    def slow() -> int:
        import time

        from mlx_nb.rank import world

        time.sleep(3)
        return world().rank()

    job = threading.Thread(target=lambda: done.append(owned.call(slow, what="a chat reply")))
    job.start()
    wait_for(lambda: owned.running_job is not None, 30, "the background job to take the ranks", every=0.01)
    t0 = time.perf_counter()
    value = owned.run("mx.distributed.all_sum(mx.array([1.0])).item()", timeout=2).value
    job.join(30)
    assert value["text/plain"] == "2.0"  # its timeout counted from when it ran, not from waiting
    assert done == [[0, 1]]
    out = capsys.readouterr().out
    assert "Waiting for a chat reply to finish (running for 0 s); interrupt to give up..." in out
    assert "restart" not in out and time.perf_counter() - t0 > 2


def test_nothing_waits_behind_a_server_it_is_refused_at_once(owned):
    from mlx_nb.jobs import SERVING

    def serve_a_while() -> None:
        import time

        time.sleep(3)

    job = threading.Thread(target=lambda: owned.call(serve_a_while, what=SERVING))
    job.start()
    wait_for(lambda: owned.running_job == SERVING, 30, "the server to take the ranks", every=0.01)
    t0 = time.perf_counter()
    with pytest.raises(ClusterError, match=r"the ranks are serving \(for 0 s\): stop the server first"):
        owned.run("x = 1")
    assert time.perf_counter() - t0 < 1
    job.join(30)


def test_the_keep_and_attach_tutorial_answers_at_once_after_a_kernel_restart(execute_notebook):
    from pathlib import Path

    keep = {p.pid for p in project_processes()}
    path = Path(__file__).resolve().parent.parent / "notebooks" / "08_keep_and_attach.ipynb"
    nb = execute_notebook(path, timeout=600, restart_at="new-kernel")
    cells = [c for c in nb.cells if c.cell_type == "code"]
    texts = ["".join(o.get("text", "") for o in c.outputs) for c in cells]
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert "kept as 'tutorial-llm'" in texts[0]
    assert "Paris" in texts[2] and "Attached 'tutorial-llm': 2 ranks" in texts[4]
    assert "Paris" in texts[5] and "without loading anything" in texts[5]
    assert "tutorial-llm" not in [c["name"] for c in clusters()]
    processes_left(keep=keep, timeout=GONE_WITHIN)  # the watchdog leaves half a second after the stop
    assert [p.cmdline() for p in project_processes() if p.pid not in keep] == []


def test_stopping_the_cluster_during_fine_tuning_stops_it_at_a_step_and_saves_first(tmp_path, capsys):
    import json

    from mlx_nb.finetune import finetune

    c = Cluster(n=2, spares=False).start()
    try:
        run = finetune(c, iters=100, batch_size=1, num_layers=1, save_every=1000, adapter_path=str(tmp_path / "run"))
        wait_until(lambda: len(run.history) >= 2 or run.error is not None, 240, every=0.2)
        assert len(run.history) >= 2, run.label.value
    finally:
        procs = c.processes()
        c.stop()  # from the notebook's thread, while the background run trains
    result = run.wait(timeout=60)
    assert "Stopping fine-tuning first (every rank stops at the same step)..." in capsys.readouterr().out
    assert result.stopped_at is not None and result.stopped_at < 100
    saved = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert saved["step"] == result.stopped_at  # saved at the step it stopped, not only at the last save_every
    assert [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []


def test_ending_an_engines_tree_on_a_host_spares_a_pid_that_now_runs_something_else():
    import subprocess

    from mlx_nb.engines.procs import tree_command

    # an engine (its command names ipyparallel) with a child, a child in a session of its own,
    # and an orphan left in its process group; and a process that took a listed pid since
    engine = subprocess.Popen(
        ["sh", "-c", "sleep 300 & setsid sleep 300 & sh -c 'sleep 300 &'; wait", "ipyparallel.engine"],
        start_new_session=True,
    )
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)

    def sleepers() -> list[psutil.Process]:
        procs = psutil.process_iter(["cmdline", "ppid"])
        return [p for p in procs if p.info["cmdline"] == ["sleep", "300"] and engine.pid in (p.info["ppid"], _pgid(p))]

    wait_until(lambda: len(sleepers()) >= 3, 10, every=0.02)
    started = sleepers()
    assert len(started) == 3
    try:
        subprocess.run(["sh", "-c", tree_command([engine.pid, other.pid])], check=True, timeout=10)
        engine.wait(10)
        assert psutil.wait_procs(started, timeout=10)[1] == [] and other.poll() is None
    finally:
        other.kill()
        other.wait()


def _pgid(p: psutil.Process) -> int:
    try:
        return os.getpgid(p.pid)
    except OSError:
        return -1
