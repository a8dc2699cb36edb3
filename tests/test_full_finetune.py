"""Full fine-tuning on real clusters: FSDP on 2 ranks (the bundled dense model) and on 4 (a random
model of half its compute) trains as one rank with the whole batch does, in at most 0.65x and 0.5x
its peak memory per rank; the reduce-scatter
that stands in for the ring's missing sum_scatter gives FSDP the gradients all_sum would; a
stopped run resumes with the losses of one that never stopped; the consolidated model loads in
mlx-lm and on the ranks and answers; bad options are refused before any rank runs; notebook 09."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import cloudpickle
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import random_model, steps_in
from lanes import starts
from mlx.utils import tree_flatten

from mlx_nb import Cluster
from mlx_nb.finetune import consolidate, finetune, load_rows
from mlx_nb.generate import generate, load_model
from mlx_nb.models import bundled_model
from mlx_nb.train_plan import estimate

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "09_full_finetuning.ipynb"
QUESTION = [{"role": "user", "content": load_rows(None)[0]["messages"][0]["content"]}]
# every token counts (rows cut at 32 tokens would leave some without an answer to learn)
BUNDLED = dict(
    method="full", learning_rate=1e-4, max_grad_norm=1.0, mask_prompt=False, seed=3, max_seq_length=32, save_every=100
)
TINY = """
N = 2
ITERS = 2
MORE = 1
MAX_SEQ_LENGTH = 32
MAX_TOKENS = 6
MODEL = {model!r}
RUNS = {runs!r}
"""


@pytest.fixture(scope="module")
@starts("cluster")
def one_rank():
    with Cluster(n=1) as c:
        yield c


@pytest.fixture(scope="module")
def bundled_runs(one_rank, two_ranks, tmp_path_factory):
    """3 steps of the bundled dense model: one rank with a batch of 2, FSDP on 2 ranks with 1 each."""
    root, model = tmp_path_factory.mktemp("bundled"), str(bundled_model(dense=True))
    one = finetune(one_rank, model=model, batch_size=2, iters=3, adapter_path=str(root / "one"), **BUNDLED).wait()
    run = finetune(two_ranks, model=model, batch_size=1, iters=3, fsdp=True, adapter_path=str(root / "two"), **BUNDLED)
    return SimpleNamespace(one=one, two=run.wait(), run=run)


def test_fsdp_on_two_ranks_trains_as_one_rank_with_the_whole_batch(bundled_runs):
    one, two = bundled_runs.one, bundled_runs.two
    assert (one.ranks, one.global_batch, two.ranks, two.global_batch) == (1, 2, 2, 2)
    assert [h["trained_tokens"] for h in one.history] == [h["trained_tokens"] for h in two.history]
    assert two.losses == pytest.approx(one.losses, rel=2e-3)
    # the sharded norm (summed over both shards) is the whole gradient's, and clipping acted on it
    norms = [h["grad_norm"] for h in one.history]
    assert [h["grad_norm"] for h in two.history] == pytest.approx(norms, rel=2e-3) and min(norms) > 1.0
    assert len(set(one.losses)) == 3  # the curve moves: the updates are what is compared
    print(f"losses one rank {one.losses}, FSDP on 2 ranks {two.losses}")


def test_fsdp_on_two_ranks_holds_at_most_065_of_one_ranks_peak_memory(bundled_runs):
    one, two, run = bundled_runs.one, bundled_runs.two, bundled_runs.run
    assert (one.method, one.fsdp, two.method, two.fsdp) == ("full", False, "full", True)
    assert two.reduce_scatter == "mlx_nb's all_sum + slice (the ring backend has no sum_scatter)"
    assert len(one.peak_memory) == 1 and len(two.peak_memory) == 2
    assert max(two.peak_memory) <= 0.65 * one.peak_memory[0], (two.peak_memory, one.peak_memory)
    # every step carries every rank's peak; the panel shows the latest
    assert [len(h["peak_memory"]) for h in two.history] == [2, 2, 2]
    assert (
        run.label.value.count(" MB") + run.label.value.count(" GB") >= 2 and "peak memory per rank" in run.label.value
    )
    # the plan's estimate is near what the ranks measured
    model = bundled_model(dense=True)
    for result, planned in ((one, estimate(model, 1, False, 2, 32)), (two, estimate(model, 2, True, 1, 32))):
        assert planned.total == pytest.approx(max(result.peak_memory), rel=0.2), (str(planned), result.peak_memory)
    print(f"peak memory per rank: one rank {one.peak_memory}, FSDP on 2 ranks {two.peak_memory}")


# the ranks receive this module's functions whole (by name they would import it, and cannot)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def everyone(x: mx.array, group) -> np.ndarray:
    """Every rank's ``x``, (n, *x.shape) in rank order, as float64."""
    return np.asarray(mx.distributed.all_gather(x[None], group=group).astype(mx.float32), dtype=np.float64)


def reduce_scatter_differs(group) -> list[str]:
    """mlx_nb's reduce-scatter against all_gather and a numpy sum: odd sizes, four dtypes."""
    from mlx_nb.rank.fsdp import sum_then_slice

    n, r, differ = group.size(), group.rank(), []
    for dtype in (mx.float32, mx.bfloat16, mx.float16, mx.int32):
        for shape in ((n, 1), (3 * n, 7), (5 * n, 3, 11)):
            # small integers: exact in every dtype, so any two orders of summing agree exactly
            x = mx.array(np.random.default_rng(10 * r + len(shape)).integers(-8, 9, shape)).astype(dtype)
            m = shape[0] // n
            expected = everyone(x, group).sum(0)[r * m : (r + 1) * m]
            if not np.array_equal(np.asarray(sum_then_slice(x, group).astype(mx.float32)), expected):
                differ.append(f"reduce-scatter {dtype} {shape}")
    return differ


class Odd(nn.Module):
    """Parameters of odd sizes over ``n`` ranks: (3n, 5), a bias of 3n, (n, 3n)."""

    def __init__(self, n: int):
        super().__init__()
        self.a = nn.Linear(5, 3 * n)
        self.b = nn.Linear(3 * n, n, bias=False)

    def __call__(self, x):
        return self.b(nn.gelu(self.a(x)))


def squares(model, x):
    return (model(x).astype(mx.float32) ** 2).sum()


def gradients_differ(group) -> list[str]:
    """The gradients of a module sharded with mlx_nb's reduce-scatter against each rank's whole
    gradients averaged (all_gather and numpy), sliced to this rank's shard: three dtypes."""
    from mlx_nb.rank.fsdp import Sharded, sum_then_slice

    n, r, differ = group.size(), group.rank(), []
    x = mx.random.normal((4, 5), key=mx.random.key(r))  # each rank its own rows
    for dtype, rel in ((mx.float32, 1e-5), (mx.bfloat16, 3e-2), (mx.float16, 3e-3)):
        made = []
        for _ in range(2):
            mx.random.seed(0)  # the same weights on every rank, and for both copies
            made.append(Odd(n))
            made[-1].set_dtype(dtype)
        whole, sharded = made[0], Sharded(made[1], group, sum_then_slice)
        sharded.train()
        _, grads = nn.value_and_grad(whole, squares)(whole, x.astype(dtype))
        _, shards = nn.value_and_grad(sharded, squares)(sharded, x.astype(dtype))
        shards = {k.removeprefix("module."): v for k, v in tree_flatten(shards)}
        for name, g in tree_flatten(grads):
            m = g.shape[0] // n
            expected = everyone(g, group).mean(0)[r * m : (r + 1) * m]
            got = np.asarray(shards[name].astype(mx.float32))
            if not np.allclose(got, expected, rtol=rel, atol=rel * np.abs(expected).max()):
                differ.append(f"gradient of {name} {dtype}: {np.abs(got - expected).max()}")
    return differ


def fsdp_against_all_sum() -> tuple[list[str], str]:
    """On every rank: what differed of the two checks above, and the error MLX's own fully_shard
    gives on this backend."""
    from mlx_nb.rank import world

    group = world()
    plain = nn.fully_shard(Odd(group.size()), group=group)
    try:
        mx.eval(nn.value_and_grad(plain, squares)(plain, mx.ones((4, 5))))
        native = ""
    except RuntimeError as e:
        native = str(e)
    return reduce_scatter_differs(group) + gradients_differ(group), native


def test_the_reduce_scatter_gives_fsdp_the_gradients_all_sum_would_on_two_ranks(two_ranks):
    for differ, native in two_ranks.call(fsdp_against_all_sum):
        assert differ == []
        assert "[ring] sum_scatter not supported" in native  # what it stands in for


@pytest.fixture(scope="module")
@starts("cluster")
def four_ranks_runs(one_rank, tmp_path_factory):
    """2 steps of a random SmolLM2-shaped model of 72 million parameters (the bundled model's
    vocabulary, 12 layers of 512: half its compute; the 2-rank runs train the bundled model
    itself): one rank with a batch of 4, FSDP on 4 ranks with 1 each; and the reduce-scatter's
    check on the 4 ranks."""
    root = tmp_path_factory.mktemp("four")
    shape = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
    model = str(random_model(root / "model", num_key_value_heads=4, **shape))
    one = finetune(one_rank, model=model, batch_size=4, iters=2, adapter_path=str(root / "one"), **BUNDLED).wait()
    with Cluster(n=4) as four:
        fsdp = finetune(
            four, model=model, batch_size=1, iters=2, fsdp=True, adapter_path=str(root / "four"), **BUNDLED
        ).wait()
        checks = four.call(fsdp_against_all_sum)
    shutil.rmtree(root)  # the checkpoints (weights and Adam's state) no test reads
    return one, fsdp, checks


def test_fsdp_on_four_ranks_trains_as_one_rank_with_the_whole_batch(four_ranks_runs):
    one, four, _ = four_ranks_runs
    assert (one.global_batch, four.global_batch, four.ranks) == (4, 4, 4)
    assert four.losses == pytest.approx(one.losses, rel=2e-3)
    assert [h["grad_norm"] for h in four.history] == pytest.approx([h["grad_norm"] for h in one.history], rel=2e-3)
    assert max(four.peak_memory) < 0.5 * one.peak_memory[0], (four.peak_memory, one.peak_memory)


def test_the_reduce_scatter_gives_fsdp_the_gradients_all_sum_would_on_four_ranks(four_ranks_runs):
    for differ, native in four_ranks_runs[2]:
        assert differ == [] and "[ring] sum_scatter not supported" in native


@pytest.fixture(scope="module")
def stopped_and_resumed(two_ranks, tiny_model, tmp_path_factory):
    """12 steps of FSDP in one run; the same run stopped from the notebook once 3 steps are in,
    then resumed to step 12."""
    root = tmp_path_factory.mktemp("resume")
    options = dict(
        model=str(tiny_model),
        method="full",
        fsdp=True,
        learning_rate=1e-2,
        max_grad_norm=1.0,
        mask_prompt=False,
        seed=3,
        batch_size=1,
        save_every=100,
        iters=12,
    )
    whole = finetune(two_ranks, adapter_path=str(root / "whole"), **options).wait()
    run = finetune(two_ranks, adapter_path=str(root / "part"), **options)
    steps_in(run, 3)
    run.stop()
    stopped = run.wait(timeout=120)
    files = sorted(os.listdir(root / "part"))
    state = json.loads((root / "part" / "checkpoint.json").read_text())
    resumed = finetune(two_ranks, resume=str(root / "part"), consolidate=True).wait()
    return SimpleNamespace(whole=whole, stopped=stopped, files=files, state=state, resumed=resumed)


def test_a_stopped_fsdp_run_saves_every_ranks_shard_of_that_step(stopped_and_resumed):
    stopped, files, state = stopped_and_resumed.stopped, stopped_and_resumed.files, stopped_and_resumed.state
    at = stopped.stopped_at
    assert at is not None and 3 <= at < 12
    shards = [f"{at:07d}_{what}-{r}-of-2.safetensors" for r in (0, 1) for what in ("optimizer", "weights")]
    assert files == sorted(["checkpoint.json", "run_config.json", *shards])
    assert (state["step"], state["shards"], len(state["history"])) == (at, 2, at)


def test_a_resumed_fsdp_run_goes_on_with_the_losses_of_one_that_never_stopped(stopped_and_resumed):
    whole, stopped, resumed = stopped_and_resumed.whole, stopped_and_resumed.stopped, stopped_and_resumed.resumed
    assert resumed.resumed_from == stopped.stopped_at and resumed.stopped_at is None
    assert [h["iteration"] for h in resumed.history] == list(range(1, 13))
    # the weights' shards, Adam's moments and the data order were restored: the same steps after
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
    assert [h["grad_norm"] for h in resumed.history] == pytest.approx([h["grad_norm"] for h in whole.history], rel=1e-5)
    assert [h["trained_tokens"] for h in resumed.history] == [h["trained_tokens"] for h in whole.history]
    # consolidate=True: the last checkpoint joined into a model folder at the end
    assert resumed.model == str(Path(resumed.adapter_path) / "model-0000012")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(resumed.model))
    # only the latest checkpoint is kept: the stop's shards went once step 12's were complete
    assert sorted(f for f in os.listdir(resumed.adapter_path) if f.endswith(".safetensors")) == sorted(
        f"0000012_{what}-{r}-of-2.safetensors" for r in (0, 1) for what in ("optimizer", "weights")
    )


def test_fsdp_trains_a_llama_whose_code_reads_attributes_of_its_blocks(two_ranks, tmp_path):
    # mlx-lm's llama asks each block for ``use_sliding`` while it runs them: the wrapper passes it on
    llama = random_model(
        tmp_path / "llama",
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    options = dict(model=str(llama), method="full", iters=2, batch_size=1, learning_rate=1e-2, mask_prompt=False)
    whole = finetune(two_ranks, adapter_path=str(tmp_path / "whole"), **options).wait()
    sharded = finetune(two_ranks, adapter_path=str(tmp_path / "sharded"), fsdp=True, **options).wait()
    assert sharded.losses == pytest.approx(whole.losses, rel=1e-4)


def test_the_consolidated_model_loads_in_mlx_lm_and_through_load_model_and_answers(two_ranks, bundled_runs):
    from mlx_lm import generate as one_process
    from mlx_lm import load

    one, two = bundled_runs.one, bundled_runs.two
    path = consolidate(two.adapter_path)
    assert Path(path) == Path(two.adapter_path) / "model-0000003"
    assert consolidate(two.adapter_path) == path  # the same step again: as it is
    # the two shards joined are the weights the one-rank run trained
    joined, alone = mx.load(str(Path(path) / "model.safetensors")), mx.load(one.saved)
    assert set(joined) == set(alone)
    assert all(joined[k].shape == alone[k].shape and mx.allclose(joined[k], alone[k], atol=1e-3) for k in alone)
    model, tokenizer = load(path)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    expected = one_process(model, tokenizer, prompt, max_tokens=8)
    load_model(two_ranks, path, pipeline=True)
    assert generate(two_ranks, QUESTION, 8, quiet=True).text == expected and expected.strip()


def test_bad_full_finetuning_options_are_refused_before_any_rank_runs(
    two_ranks, one_rank, stopped_and_resumed, tmp_path
):
    odd = random_model(
        tmp_path / "odd",
        hidden_size=81,
        intermediate_size=243,
        num_hidden_layers=1,
        num_attention_heads=3,
        num_key_value_heads=3,
    )
    folder = tmp_path / "run"
    cases = [
        (dict(method="qlora"), r"method='qlora': use 'lora' \(adapters on a frozen model\) or 'full'"),
        (dict(fsdp=True), r"fsdp=True is an option of full fine-tuning: pass method='full' with it"),
        (dict(method="full", num_layers=4), r"num_layers=4: these configure LoRA's adapters; leave them out"),
        (dict(max_grad_norm=1.0), r"max_grad_norm=1.0 is an option of full fine-tuning"),
        (dict(method="full", max_grad_norm=0), r"max_grad_norm=0: clipping needs a norm above 0"),
        (
            dict(method="full", fsdp=True, model=str(odd)),
            r"FSDP cannot shard odd over 2 ranks: model\.layers\.0\.self_attn\.q_proj\.weight has shape \(81, 81\), "
            r"and its first axis \(81\) does not divide by 2 .* divide every parameter: 1, 3; or fsdp=False",
        ),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            finetune(two_ranks, adapter_path=str(folder), **options)
    assert not folder.exists()
    sharded = stopped_and_resumed.resumed.adapter_path
    with pytest.raises(ValueError, match=r"sharded over 2 ranks and this cluster has 1: resume it on 2 ranks"):
        finetune(one_rank, resume=sharded, iters=20)
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora"}))
    with pytest.raises(ValueError, match=r"holds LoRA adapters: load_model\(cluster, adapter_path="):
        consolidate(tmp_path / "lora")
    with pytest.raises(ValueError, match=r"already exists and holds something else: pass another out="):
        consolidate(sharded, out=tmp_path)
    assert two_ranks.run("mx.distributed.all_sum(mx.array(rank + 1)).item()").value["text/plain"] == "3"


def test_notebook_09_executes_with_memory_stop_resume_consolidate_and_serve(execute_notebook, tiny_model, tmp_path):
    parameters = TINY.format(model=str(tiny_model), runs=str(tmp_path / "runs"))
    nb = execute_notebook(NOTEBOOK, parameters=parameters, timeout=600)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert [o for o in outputs if "image/png" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs) + "".join(
        o.get("data", {}).get("text/plain", "") for o in outputs
    )
    for seen in (
        "peak memory per rank",
        "FSDP / data-parallel",
        "resumed at step",
        "model-",
        "served:",
        "Cluster stopped.",
    ):
        assert seen in text, seen
