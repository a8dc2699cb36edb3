"""Linux CPU ranks run an optimized BLAS (Debian's OpenBLAS), not the mlx[cpu] wheel's reference
BLAS: each rank says which one it runs, the cores are shared out between the ranks, and greedy
tokens and fine-tuning losses are the same with either BLAS."""

from __future__ import annotations

import os
import sys

import pytest

from mlx_nb import Cluster
from mlx_nb.display import status_table
from mlx_nb.finetune import finetune
from mlx_nb.generate import generate, load_model
from mlx_nb.models import bundled_model
from mlx_nb.rank import blas

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(sys.platform != "linux", reason="mlx_nb loads a BLAS on Linux only"),
    pytest.mark.skipif(
        sys.platform == "linux" and not blas.probe()["optimized"],
        reason=f"no OpenBLAS on this machine: {blas.INSTALL}",
    ),
]
STORY = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
TOKENS = 16
# what a rank reports about itself: the library holding the cblas_sgemm that MLX calls
WHICH = """
from mlx_nb.rank import blas
_which = {"current": blas.current(), "cblas_sgemm": blas._global_symbol_library("cblas_sgemm"),
          "mapped": blas._mapped()}
"""


def ranks_report(cluster: Cluster) -> list[dict]:
    cluster.run(WHICH, quiet=True)
    return cluster.pull("_which", ranks="all")


def cluster_with(env: dict[str, str], lines: list[str], n: int = 2) -> Cluster:
    """A cluster (not started) whose messages at start go to ``lines``."""
    cluster = Cluster(n=n, env=env, spares=False)
    cluster.on_message = lines.append
    return cluster


@pytest.fixture(scope="module")
def dense() -> str:
    """The dense float32 copy of the bundled model: its matmuls are the BLAS's."""
    return str(bundled_model(dense=True))


@pytest.fixture(scope="module")
def fast():
    """Two ranks as mlx_nb starts them by default, and what start printed."""
    lines: list[str] = []
    with cluster_with({}, lines) as c:
        yield c, lines


@pytest.fixture(scope="module")
def reference():
    """Two ranks that keep MLX's bundled reference BLAS (MLX_NB_BLAS=off)."""
    lines: list[str] = []
    with cluster_with({"MLX_NB_BLAS": "off"}, lines) as c:
        yield c, lines


def test_every_rank_runs_openblas_with_the_cores_shared_out_and_says_so(fast):
    cluster, lines = fast
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    for rank, seen in zip(cluster.ranks, ranks_report(cluster)):
        assert rank.blas.name.startswith("OpenBLAS") and rank.blas.threads == threads
        assert seen["cblas_sgemm"] == rank.blas.path == blas.probe()["path"] and rank.blas.path in seen["mapped"]
        assert seen["current"] == rank.blas
    table = repr(status_table(cluster))
    assert "blas" in table.splitlines()[1].split()
    assert table.count("OpenBLAS") == 2 and f"{threads} thread" in table
    assert lines == []  # nothing to say when the ranks run OpenBLAS
    (finding,) = [f for f in cluster.check() if f.check == "blas"]
    assert (
        finding.status == "ok" and f"{threads} thread" in finding.message and "2 ranks on this host" in finding.message
    )


def test_blas_off_keeps_the_reference_blas_without_a_note(reference):
    cluster, lines = reference
    for rank, seen in zip(cluster.ranks, ranks_report(cluster)):
        assert rank.blas.name == blas.REFERENCE and not rank.blas.optimized
        assert seen["cblas_sgemm"] is None and blas.probe()["path"] not in seen["mapped"]
    assert "reference BLAS (bundled with mlx)" in repr(status_table(cluster))
    assert lines == []


def test_a_blas_that_cannot_be_loaded_is_named_in_one_line_at_start():
    lines: list[str] = []
    with cluster_with({"MLX_NB_BLAS": "/nonexistent/libblas.so.3"}, lines, n=1) as cluster:
        assert cluster.ranks[0].blas.name == blas.REFERENCE
        assert cluster.run("mx.distributed.all_sum(mx.array(rank + 1)).item()").value["text/plain"] == "1"
    (line,) = lines
    assert line.startswith("rank(s) 0 on ") and "run MLX's bundled reference BLAS" in line
    assert "MLX_NB_BLAS=/nonexistent/libblas.so.3 could not be loaded" in line and "restart the cluster" in line


def test_greedy_tokens_are_the_same_with_openblas_and_the_reference_blas(fast, reference, dense):
    replies = []
    for cluster, _ in (fast, reference):
        load_model(cluster, dense, pipeline=True, progress=False)  # SmolLM2's 9 heads: no 2-way tensor split
        replies.append(generate(cluster, STORY, TOKENS, quiet=True))
    with_openblas, with_reference = replies
    assert with_openblas.generation_tokens == TOKENS
    assert with_openblas.tokens == with_reference.tokens
    print(f"{with_openblas.text!r}: prefill {with_openblas.prompt_tps:.1f} vs {with_reference.prompt_tps:.1f} tok/s")


def test_finetuning_losses_are_the_same_with_openblas_and_the_reference_blas(fast, reference, dense, tmp_path):
    losses = []
    for name, (cluster, _) in (("openblas", fast), ("reference", reference)):
        run = finetune(cluster, model=dense, iters=2, batch_size=1, num_layers=2, adapter_path=str(tmp_path / name))
        losses.append(run.wait().losses)
    with_openblas, with_reference = losses
    assert len(with_openblas) == 2  # the second loss comes after an update made from the first gradients
    assert with_openblas == pytest.approx(with_reference, abs=1e-5)
