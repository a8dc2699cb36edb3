"""Local ranks under mpirun (--backend mpi): one engine set, one job, restarted together."""

from __future__ import annotations

import psutil
import pytest
from conftest import magic_cluster, wait_until
from testhosts import TestHostsError, require_mpi

from mlx_nb import magics
from mlx_nb.engines.launch import mpi_available

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def ip():
    try:
        require_mpi()
    except TestHostsError as e:
        pytest.fail(f"{e} ({mpi_available()[1]})", pytrace=False)
    with magic_cluster("-n 2 --backend mpi") as shell:
        yield shell


def _all_sum(ip) -> str:
    return ip.run_cell_magic("mlx_dist", "", "mx.distributed.all_sum(mx.array([rank + 1.0]), group=world)").value[
        "text/plain"
    ]


def test_mpi_ranks_run_cells(ip):
    cluster = magics.current()
    assert cluster.backend == "mpi" and [r.rank for r in cluster.status()] == [0, 1]
    assert _all_sum(ip) == "array([3], dtype=float32)"
    ip.run_cell_magic("mlx_dist", "--ranks all --pull b", "b = (world.size(), type(world).__name__, rank)")
    assert [x[0] for x in ip.user_ns["b"]] == [2, 2]
    assert magics.status_note(cluster) is None


def test_mpi_ranks_listen_only_on_loopback(ip):
    cluster = magics.current()
    _all_sum(ip)  # MPI_Init has opened its transports
    listening = {
        (p.name(), c.laddr.ip)
        for p in cluster.processes()
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }
    # mpirun's own out-of-band port binds every interface: Open MPI 4.1 has no setting for it
    assert {addr for name, addr in listening if name != "mpirun"} == {"127.0.0.1"}, listening


def test_restart_replaces_the_whole_mpirun_job(ip):
    cluster = magics.current()
    old = {r.pid for r in cluster.ranks}
    ip.run_line_magic("mlx_cluster", "restart")
    assert not old & {r.pid for r in cluster.ranks}
    assert not [pid for pid in old if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert _all_sum(ip) == "array([3], dtype=float32)"


def test_fsdp_trains_on_mpi_as_data_parallel_full_fine_tuning_does(ip, tiny_model, tmp_path):
    from mlx_nb.finetune import finetune

    cluster = magics.current()
    options = dict(
        model=str(tiny_model), method="full", iters=3, batch_size=1, learning_rate=1e-2, mask_prompt=False, seed=3
    )
    whole = finetune(cluster, adapter_path=str(tmp_path / "whole"), **options).wait()
    sharded = finetune(cluster, adapter_path=str(tmp_path / "sharded"), fsdp=True, **options).wait()
    # MPI has no sum_scatter either ("[mpi] sum_scatter not yet implemented"): mlx_nb's runs
    assert sharded.reduce_scatter == "mlx_nb's all_sum + slice (the mpi backend has no sum_scatter)"
    assert sharded.losses == pytest.approx(whole.losses, rel=1e-4) and len(set(whole.losses)) == 3


def test_a_dead_mpi_rank_is_noticed_and_the_job_restarts(ip):
    cluster = magics.current()
    psutil.Process(cluster.ranks[1].pid).kill()
    wait_until(lambda: 1 in cluster.group.dead_ranks(), 20)
    assert 1 in cluster.group.dead_ranks()
    cluster.restart()
    assert _all_sum(ip) == "array([3], dtype=float32)"


def test_stop_leaves_no_mpirun_or_engines(ip):
    cluster = magics.current()
    procs = cluster.processes()
    assert any("mpirun" in " ".join(p.cmdline()) for p in procs)
    ip.run_line_magic("mlx_cluster", "stop")
    _, alive = psutil.wait_procs(procs, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_local_ring_status_suggests_mpi_where_it_is_available():
    from mlx_nb import Cluster

    with Cluster(n=2, spares=False) as c:
        note = magics.status_note(c) or ""
    assert ("MPI is available here" in note) == mpi_available()[0]
