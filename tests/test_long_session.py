"""A long session stays flat: what the notebook's ipyparallel client keeps per job does not
grow with the number of cells run (benchmarks/session.py measures the memory)."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_nb import Cluster, DistCellError


def client_records(cluster: Cluster) -> dict[str, int]:
    client = cluster.client
    return {
        "history": len(client.history),
        "results": len(client.results),
        "metadata": len(client.metadata),
        "futures": len(client._futures) + len(client._output_futures),
        "outstanding": len(client.outstanding),
    }


def a_block_of_cells(cluster: Cluster) -> None:
    """Cells of every kind: empty, printing, a value, push, pull, a call, a failing cell."""
    cluster.run("pass")
    cluster.run("print('hello from', rank)", ranks="all", quiet=True)
    cluster.run("mx.distributed.all_sum(mx.array([rank]))")
    cluster.push({"a": np.ones(1000)})
    cluster.pull("a", ranks="all")
    cluster.call(sum, [1, 2])
    with pytest.raises(DistCellError):
        cluster.run("raise ValueError('every rank fails here')")


def test_the_clients_records_do_not_grow_with_the_cells_run(two_ranks):
    a_block_of_cells(two_ranks)
    before = client_records(two_ranks)
    for _ in range(30):
        a_block_of_cells(two_ranks)
    assert client_records(two_ranks) == before
