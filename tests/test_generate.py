"""Sharded generation with the bundled model: identical to one process, streamed, stoppable."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import CHAT_TURNS, KV_BYTES_PER_TOKEN, conversation, ipython_shell, wait_until
from IPython.core.error import UsageError
from lanes import starts

from mlx_nb import Cluster
from mlx_nb.batch import generate_batch
from mlx_nb.generate import generate, load_model
from mlx_nb.models import prepare_bundled
from mlx_nb.widgets import ChatWidget

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reference(pipeline_pair) -> list[int]:
    """Greedy tokens from one plain mlx-lm process, on the folder the ranks load (on CPU
    ranks with OpenBLAS, the dense copy)."""
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(prepare_bundled(pipeline_pair.ranks)))
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=10)]


@pytest.fixture(scope="module")
@starts("cluster")
def trio():
    """Three ranks: the bundled model tensor parallel (its 9 heads split over 3)."""
    with Cluster(n=3) as c:
        load_model(c, progress=False)
        yield c


def test_tensor_parallel_on_three_ranks_equals_one_process(trio, reference):
    stats = generate(trio, QUESTION, 10, quiet=True)
    assert stats.tokens == reference
    assert "Paris" in stats.text


def test_chat_turns_on_three_tensor_parallel_ranks_reuse_the_prompt_cache_and_equal_the_uncached_replies(trio):
    turns, report = conversation(trio, CHAT_TURNS[:2], n=6)
    assert [t[0].tokens for t in turns] == [t[1] for t in turns]
    assert all(after.cached_tokens >= before.prompt_tokens for (before, _, _), (after, _, _) in zip(turns, turns[1:]))
    # each rank holds its slice of every entry: a third of the heads, a third of the bytes
    assert all(r.bytes * 3 in {r.tokens * b for b in KV_BYTES_PER_TOKEN} for r in report.ranks)


def test_a_batch_on_three_tensor_parallel_ranks_equals_one_process(trio, reference):
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(prepare_bundled(trio.ranks)))
    other = [{"role": "user", "content": "Name three colors."}]
    expected = [
        r.token
        for r in stream_generate(
            model, tokenizer, tokenizer.apply_chat_template(other, add_generation_prompt=True), max_tokens=6
        )
    ]
    result = generate_batch(trio, [QUESTION, other], 6, quiet=True)  # 6 greedy tokens: no reply ends sooner
    assert [r.tokens for r in result.replies] == [reference[:6], expected]


def test_pipeline_on_two_ranks_equals_one_process(pipeline_pair, reference, capsys):
    stats = generate(pipeline_pair, QUESTION, 10)
    assert stats.tokens == reference
    out = capsys.readouterr().out
    assert "Paris" in out and out.strip() == stats.text.strip()
    assert stats.generation_tps > 0 and stats.ttft > 0 and len(stats.peak_memory) == 2
    assert all(m > 10 * 2**20 for m in stats.peak_memory)  # each rank holds its share of the weights


def test_a_split_the_model_cannot_take_fails_before_loading(pipeline_pair):
    with pytest.raises(ValueError, match=r"9 attention heads do not divide by 2.*Rank counts that work: 1, 3"):
        load_model(pipeline_pair)  # tensor parallel over 2 ranks
    # nothing was loaded or broken: the pipeline model still answers
    assert "Paris" in generate(pipeline_pair, QUESTION, 10, quiet=True).text


def test_tokens_reach_the_notebook_as_they_are_made(pipeline_pair):
    arrivals = []
    stats = generate(pipeline_pair, QUESTION, 10, on_text=lambda text: arrivals.append(time.monotonic()))
    assert len(arrivals) >= 3 and arrivals[0] < arrivals[-1]
    assert len(stats.delays) == len(arrivals)
    assert sorted(stats.delays)[len(stats.delays) // 2] < 0.5


def test_generate_magic_loads_and_streams(pipeline_pair, capsys):
    from mlx_nb import magics

    ip = ipython_shell()
    ip.run_line_magic("load_ext", "mlx_nb")
    magics.use(pipeline_pair)
    try:
        ip.run_line_magic("mlx_generate", "--load bundled --pipeline")
        assert "Loaded bundled (pipeline) on 2 ranks" in capsys.readouterr().out
        ip.run_line_magic("mlx_generate", "What is the capital of France? --max-tokens 10")
        out = capsys.readouterr().out
        assert "Paris" in out and "tok/s" in out and "peak memory per rank" in out
        with pytest.raises(UsageError, match="do not divide by 2"):
            ip.run_line_magic("mlx_generate", "--load bundled")
    finally:
        magics.use(None)


def test_chat_widget_keeps_history_and_stop_ends_every_rank(pipeline_pair):
    chat = ChatWidget(pipeline_pair, max_tokens=10)
    chat.ask("What is the capital of France?", wait=True)
    assert "Paris" in chat.transcript.value and "tok/s" in chat.transcript.value
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    # a long reply, stopped from the button's handler once text is flowing
    chat.max_tokens = 400
    chat.ask("Write a long story about a lighthouse keeper.")
    wait_until(lambda: "<b>model</b>" in chat.transcript.value.split("lighthouse")[-1], 120, every=0.05)
    chat.stop.click()
    chat._thread.join(120)
    assert not chat._thread.is_alive()
    assert "(stopped)" in chat.transcript.value
    assert len(chat.messages) == 4
    # every rank stopped at the same token: the next collective is fine
    assert (
        pipeline_pair.run("mx.distributed.all_sum(mx.array([1.0]))").value["text/plain"] == "array([2], dtype=float32)"
    )


def test_sharded_generation_tutorial_runs(execute_notebook):
    nb = execute_notebook(ROOT / "notebooks" / "04_sharded_generation.ipynb", parameters="MAX_TOKENS = 10", timeout=600)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert text.count("Paris") >= 2
    assert "9 attention heads do not divide by 2" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
