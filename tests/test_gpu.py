"""On a machine with a GPU (MLX's CUDA or Metal backend): every rank of a local cluster runs on it,
computes there, and the status names it. Skipped where MLX has no GPU (the ``gpu`` marker)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


def test_every_rank_runs_on_the_gpu_and_the_status_names_it(two_ranks):
    ranks = two_ranks.status()
    assert [r.device for r in ranks] == ["Device(gpu, 0)"] * 2
    assert all(r.device_name for r in ranks), [r.device_name for r in ranks]
    result = two_ranks.run("mx.distributed.all_sum(mx.ones(4) * (rank + 1), group=world)")
    assert result.value["text/plain"] == "array([3, 3, 3, 3], dtype=float32)"
