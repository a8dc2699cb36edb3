"""Data-parallel LoRA fine-tuning on real 2-rank clusters: one rank and two ranks train
identically, the bundled facts are learnt, the stop button ends every rank at one step,
and notebook 06 runs."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from mlx_nb import Cluster, DistCellError
from mlx_nb.finetune import finetune, load_rows
from mlx_nb.generate import generate, load_model

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "06_data_parallel_finetuning.ipynb"
QUESTION = [{"role": "user", "content": load_rows(None)[0]["messages"][0]["content"]}]
# small enough for a loaded 2-core machine, big enough to learn the mascot: about 6 s a step
LEARN = dict(batch_size=1, num_layers=2, learning_rate=5e-4)
TINY = '''
N = 2
ITERS = 2
OPTIONS = dict(batch_size=1, num_layers=2, learning_rate=5e-4)
MAX_TOKENS = 8
ADAPTERS = {adapters!r}
'''


@pytest.fixture(scope="module")
def cluster():
    with Cluster(n=2) as c:
        yield c


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, randomly initialised SmolLM2-shaped model (with its tokenizer): steps in ms."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    from mlx_nb.models import bundled_model

    src, path = bundled_model(), tmp_path_factory.mktemp("tiny")
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization", None)
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    (path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, path / name)
    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    weights = dict(tree_flatten(model_class(args_class.from_dict(config)).parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path


def test_one_rank_with_the_full_batch_and_two_with_half_batches_train_identically(cluster, tiny_model, tmp_path):
    # on every token, not only the answers, so each rank's questions count
    options = dict(model=str(tiny_model), iters=3, learning_rate=1e-2, num_layers=2, mask_prompt=False, seed=3)
    two = finetune(cluster, batch_size=2, adapter_path=str(tmp_path / "two"), **options).wait()
    with Cluster(n=1) as single:
        one = finetune(single, batch_size=4, adapter_path=str(tmp_path / "one"), **options).wait()
    assert (one.ranks, one.global_batch, two.ranks, two.global_batch) == (1, 4, 2, 4)
    assert [h["trained_tokens"] for h in one.history] == [h["trained_tokens"] for h in two.history]
    assert one.losses == pytest.approx(two.losses, rel=1e-4)
    assert len(set(two.losses)) == 3  # the curve moves: the updates are what is compared


def test_too_little_data_for_a_global_batch_is_named(cluster, tmp_path):
    rows = load_rows(None)[:3]
    with pytest.raises(DistCellError, match=r"3 training rows cannot fill a global batch of 4 \(2 x 2 ranks\)"):
        finetune(cluster, data=rows, batch_size=2, adapter_path=str(tmp_path)).wait()
    assert cluster.run("mx.distributed.all_sum(mx.array(rank + 1)).item()").value["text/plain"] == "3"


@pytest.fixture(scope="module")
def stopped(cluster, tmp_path_factory):
    """Base answer, then a long run stopped from the notebook once 4 steps are in, then the
    fine-tuned answer: (base text, FinetuneRun, FinetuneResult, fine-tuned text)."""
    load_model(cluster, pipeline=True)  # SmolLM2's 9 heads do not split over 2 ranks
    base = generate(cluster, QUESTION, 16, quiet=True).text
    run = finetune(cluster, iters=100, adapter_path=str(tmp_path_factory.mktemp("adapters")), **LEARN)
    deadline = time.monotonic() + 240
    while len(run.history) < 4 and run.result is None and time.monotonic() < deadline:
        time.sleep(0.2)
    run.stop()
    result = run.wait(timeout=120)
    assert result is not None, f"training did not end: {run.label.value}"
    load_model(cluster, adapter_path=result.adapter_path)
    tuned = generate(cluster, QUESTION, 16, quiet=True).text
    return base, run, result, tuned


def test_stop_ends_training_on_every_rank_at_the_same_step(cluster, stopped):
    _, run, result, _ = stopped
    assert result.stopped_at is not None and 4 <= result.stopped_at < 100
    per_rank = run.per_rank
    assert [r["stopped_at"] for r in per_rank] == [result.stopped_at] * 2
    assert [len(r["history"]) for r in per_rank] == [result.stopped_at] * 2
    assert f"stopped at step {result.stopped_at}" in run.label.value and run.stop_button.disabled
    saved = Path(result.adapter_path)
    assert (saved / "adapters.safetensors").stat().st_size > 0
    assert json.loads((saved / "adapter_config.json").read_text())["num_layers"] == LEARN["num_layers"]


def test_the_cluster_is_usable_after_a_stop(cluster, stopped):
    assert cluster.run("mx.distributed.all_sum(mx.array(rank + 1)).item()").value["text/plain"] == "3"


def test_the_live_curve_is_drawn_from_every_step(stopped):
    _, run, result, _ = stopped
    assert run.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert [h["iteration"] for h in run.history] == list(range(1, result.stopped_at + 1))
    assert all(h["tokens_per_second"] > 0 and h["iters"] == 100 for h in run.history)


def test_the_loss_falls_and_the_answer_changes(stopped):
    base, _, result, tuned = stopped
    assert result.losses[-1] < result.losses[0]
    assert tuned != base
    print(f"base: {base!r}\nfine-tuned: {tuned!r}\nlosses: {[round(x, 3) for x in result.losses]}")


def test_notebook_executes_with_a_loss_figure_and_both_answers(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = TINY.format(adapters=str(tmp_path / "adapters"))
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert [o for o in outputs if "image/png" in o.get("data", {})]
    assert [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs)
    assert "before:" in text and "after:" in text and "Cluster stopped." in text
    assert (tmp_path / "adapters" / "adapters.safetensors").exists()
