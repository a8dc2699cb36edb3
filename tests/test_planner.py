"""Fit before load: memory budgets, the plan of a model over unequal ranks, uneven pipeline loads,
and refusals before any weight is read."""

from __future__ import annotations

import doctest
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ipython_shell, magics_on, project_processes
from IPython.core.error import UsageError
from lanes import starts

from mlx_nb import Cluster, display, footprint, planner
from mlx_nb.finetune import finetune
from mlx_nb.footprint import read_model, safetensors_header
from mlx_nb.generate import generate, load_model, plan, prompt_cache
from mlx_nb.models import bundled_model
from mlx_nb.planner import DoesNotFit, Kind, check_ownership, even_split, make_plan, stage_layers
from mlx_nb.rank.memory import Budget, BudgetSource

MB = 1 << 20
BUDGETS = ["700MB", "260MB", "260MB"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
RANDOM_SPLIT = [1, 2, 4]  # the random model's 7 layers, rank 0 first


def given(*sizes: int) -> list[Budget]:
    return [Budget(r, s, BudgetSource.GIVEN) for r, s in enumerate(sizes)]


@pytest.fixture(scope="module")
def dense() -> Path:
    return bundled_model(dense=True)


@pytest.fixture(scope="module")
@starts("cluster")
def mixed():
    """Three local ranks told they have 700 MB, 260 MB and 260 MB: one big machine and two small."""
    with Cluster(n=3, memory=BUDGETS) as c:
        yield c


@pytest.fixture(scope="module")
def random_model(tmp_path_factory, dense) -> Path:
    """A random-weight qwen2 of another shape: 7 layers, bfloat16, a head of its own (untied)."""
    import mlx.core as mx
    from mlx_lm.models import qwen2
    from mlx_lm.utils import save_config, save_model

    config = {
        "model_type": "qwen2",
        "hidden_size": 384,
        "num_hidden_layers": 7,
        "intermediate_size": 1152,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-6,
        "vocab_size": 8000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }
    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    out = tmp_path_factory.mktemp("random-qwen2")
    save_model(out, model)
    save_config(config, out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(dense / name, out / name)
    return out


def rchar(cluster) -> list[int]:
    """Bytes each rank process has read (read() and pread(): files, pipes) since it started."""
    out = []
    for r in cluster.ranks:
        with open(f"/proc/{r.pid}/io") as f:
            out.append(next(int(line.split()[1]) for line in f if line.startswith("rchar:")))
    return out


def reference_tokens(path: Path, n: int) -> list[int]:
    """Greedy tokens of one plain mlx-lm process (with the ranks' BLAS) on ``path``."""
    code = (
        "import json, sys\n"
        "from mlx_nb.rank import blas; blas.use()\n"
        "from mlx_lm import load, stream_generate\n"
        "model, tok = load(sys.argv[1])\n"
        "prompt = tok.apply_chat_template(json.loads(sys.argv[2]), add_generation_prompt=True)\n"
        "print(json.dumps([r.token for r in stream_generate(model, tok, prompt, max_tokens=int(sys.argv[3]))]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path), json.dumps(QUESTION), str(n)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.splitlines()[-1])


def within(planned: int, held: int, share: float = 0.10) -> bool:
    return abs(planned - held) <= share * held


# ------------------------------------------------------------- pure: no ranks
def test_the_docstring_examples_of_the_planner_run():
    for module in (planner, footprint, display):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0, module.__name__


def test_the_plan_reads_the_headers_and_no_weight(dense, tmp_path):
    # the folder with every weight cut off after the header plans the same as the whole one
    stub = tmp_path / dense.name
    stub.mkdir()
    shutil.copy(dense / "config.json", stub / "config.json")
    with open(dense / "model.safetensors", "rb") as f:
        head = f.read(8)
        (stub / "model.safetensors").write_bytes(head + f.read(int.from_bytes(head, "little")))
    assert read_model(stub) == read_model(dense)
    facts = read_model(dense)
    header = safetensors_header(dense / "model.safetensors")
    assert facts.total == sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k[0] != "_")
    assert (facts.layers, facts.heads, facts.kv_heads, facts.act_bytes, facts.quantized) == (30, 9, 3, 4, False)
    assert round(facts.shared / MB) == 108  # the tied embeddings every pipeline stage keeps
    assert read_model(bundled_model()).quantized and read_model(bundled_model()).total < facts.total / 4


def test_a_model_that_is_not_there_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        read_model(str(tmp_path / "typo"))
    with pytest.raises(FileNotFoundError, match="^nobody/no-such-model-here is no folder here") as info:
        read_model("nobody/no-such-model-here")  # offline here; on line, the hub has no such repo
    assert "\n" not in str(info.value)
    (tmp_path / "config.json").write_text((bundled_model() / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"has no model\*\.safetensors files"):
        read_model(tmp_path)


def test_a_mixed_cluster_is_planned_as_an_uneven_pipeline(dense):
    p = make_plan(read_model(dense), given(700 * MB, 260 * MB, 260 * MB), context=1024)
    kinds = {(x.kind, x.by_budgets): x for x in p.layouts}
    tensor, even, auto = kinds[Kind.TENSOR, False], kinds[Kind.PIPELINE, False], kinds[Kind.PIPELINE, True]
    assert not tensor.fits and not even.fits and auto.fits
    assert even.split == [10, 10, 10] and [s.rank for s in even.shortfalls] == [1, 2]
    assert p.recommended is auto and auto.split[0] > auto.split[1] == auto.split[2] >= 1 and sum(auto.split) == 30
    assert all(m <= b for m, b in zip(auto.memory_per_rank, auto.budgets))
    text = repr(p)
    assert "recommended" in text and "over by" in text and "1/3 of every layer" in text


def test_equal_budgets_split_evenly_and_a_lone_rank_holds_everything(dense):
    facts = read_model(dense)
    p = make_plan(facts, given(*[4 << 30] * 3), context=1024)
    assert [x.split for x in p.layouts if x.kind is Kind.PIPELINE] == [[10, 10, 10]]
    assert p.recommended.kind is Kind.PIPELINE  # fits, and sends less per token than tensor parallel
    lone = make_plan(facts, given(4 << 30), context=1024)
    assert [x.kind for x in lone.layouts] == [Kind.TENSOR] and lone.recommended.memory[0].weights == facts.total
    assert lone.choose(pipeline=True) is lone.choose(pipeline=False) is lone.recommended


def test_nothing_fitting_says_by_how_much_and_what_would(dense):
    facts = read_model(dense)
    p = make_plan(facts, given(100 * MB, 100 * MB), context=256)
    assert p.recommended is None and not any(x.fits for x in p.layouts)
    notes = " | ".join(p.notes)
    assert "9 attention heads do not divide by 2" in notes
    assert "MB short" in notes and "the weights alone are over the budgets" in notes
    with pytest.raises(DoesNotFit, match=r"pipeline \[15, 15\] .* rank 0 needs .*, has 100.0 MB; rank 1") as info:
        p.choose(pipeline=True)
    assert [s.rank for s in info.value.shortfalls] == [0, 1] and "\n" not in str(info.value)
    # a quantized copy, a shorter context and more ranks are named where they would fit
    assert any(n.startswith("a 4-bit copy (mlx_lm.convert -q, about ") for n in p.notes), p.notes
    tight = make_plan(facts, given(700 * MB, 260 * MB, 260 * MB), context=4096)
    assert tight.recommended is None
    assert any(n.startswith("a context of ") for n in tight.notes), tight.notes
    more = make_plan(read_model(bundled_model()), given(150 * MB, 150 * MB), context=1024)
    assert any(n.endswith("ranks of 150.0 MB would fit") for n in more.notes), more.notes


def test_every_layer_is_owned_once_in_every_split_the_tests_use():
    for split in ([10, 10, 10], [28, 1, 1], [26, 2, 2], [15, 15], RANDOM_SPLIT, even_split(7, 3), even_split(30, 4)):
        check_ownership([stage_layers(split, r) for r in range(len(split))], sum(split))
    assert stage_layers([26, 2, 2], 0) == range(4, 30)  # rank 0 runs the last layers, as mlx-lm counts
    with pytest.raises(RuntimeError, match="layer 0 by none, layer 5 by 2 ranks"):
        check_ownership([range(5, 10), range(1, 6)], 10)
    with pytest.raises(RuntimeError, match=r"other layers than the plan's split \[5, 5\] \(rank 0: 0-4, rank 1: 5-9\)"):
        check_ownership([range(0, 5), range(5, 10)], 10, [5, 5])  # the first layers on rank 0: not mlx-lm's order


def test_bad_splits_and_contexts_are_one_line_errors(dense):
    p = make_plan(read_model(dense), given(*[4 << 30] * 3), context=1024)
    for split, message in (
        ([10, 10], "has 2 entries for 3 ranks"),
        ([30, 0, 0], "gives a rank no layer"),
        ([10, 10, 11], "gives 31 layers: the model has 30"),
        ("10,10,10", "a list of ints"),
    ):
        with pytest.raises(ValueError, match=message):
            p.choose(pipeline=True, split=split)
    for context in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="context must be a positive number of tokens"):
            make_plan(read_model(dense), given(MB), context)
    with pytest.raises(ValueError, match=r"split= gives the layers of each pipeline stage: add pipeline=True"):
        load_model(None, split=[10, 10, 10])  # refused before a cluster is asked anything


def test_memory_values_are_checked_before_anything_starts():
    for memory, message in (
        (
            "700MB,260MB",
            "memory: 2 values for 3 ranks: give one for all ranks (700MB) or one per rank (700MB,260MB,260MB)",
        ),
        ("lots", "memory: not a size: 'lots' (use bytes or KB / MB / GB, e.g. 700MB)"),
        (["700MB", 0, "1GB"], "memory must be at least 1.0 MB, got 0"),
        (2.5, "memory must be a size like '700MB' or one per rank, got 2.5"),
    ):
        with pytest.raises(ValueError) as info:
            Cluster(n=3, memory=memory)
        assert str(info.value) == message
    assert Cluster(n=2, memory="1GB").memory == [1 << 30, 1 << 30]
    # a kept cluster's spec, as a kernel that attaches reads it back, keeps the budgets
    spec = Cluster(n=3, memory=BUDGETS).spec
    assert spec.from_json(json.loads(json.dumps(spec.to_json()))).memory == [700 * MB, 260 * MB, 260 * MB]
    shell = ipython_shell()
    shell.run_line_magic("load_ext", "mlx_nb")
    with pytest.raises(UsageError, match="^memory: 2 values for 3 ranks") as info:
        shell.run_line_magic("mlx_cluster", "start -n 3 --memory 700MB,260MB")
    assert "\n" not in str(info.value) and project_processes() == []


# ------------------------------------------------------------- on real ranks
@pytest.fixture
def shell(mixed):
    """The test IPython shell, its magics on the mixed cluster."""
    with magics_on(mixed) as shell:
        yield shell


def test_status_shows_each_ranks_budget(mixed, shell):
    table = shell.run_line_magic("mlx_cluster", "status")
    assert table.columns[-1] == "budget"
    assert [row[-1] for row in table.rows] == ["700.0 MB (given)", "260.0 MB (given)", "260.0 MB (given)"]
    assert [r.memory_budget for r in mixed.status()] == [700 * MB, 260 * MB, 260 * MB]


def test_the_plan_magic_recommends_the_uneven_pipeline_and_refuses_the_even_one_before_reading(mixed, shell):
    shown = shell.run_line_magic("mlx_plan", "--context 1024")
    before, said = rchar(mixed), []
    for line, refused in (
        ("--load bundled --pipeline --context 1024", r"pipeline \[10, 10, 10\] .* does not fit"),
        ("--load bundled --context 1024", "tensor parallel over 3 ranks .* does not fit"),
        ("--load bundled --pipeline --split 10,10 --context 1024", "has 2 entries for 3 ranks"),
        ("--load bundled --pipeline --split ten", "--split takes layers per rank like 20,5,5"),
    ):
        with pytest.raises(UsageError, match=refused) as info:
            shell.run_line_magic("mlx_generate", line)
        said.append(str(info.value))
    with pytest.raises(UsageError, match="context must be a positive number of tokens, got 0"):
        shell.run_line_magic("mlx_plan", "--context 0")
    assert shown.recommended.kind is Kind.PIPELINE and shown.recommended.by_budgets
    assert not any("\n" in text for text in said)
    assert f"pipeline {shown.recommended.split} fits (split='auto')" in said[0]
    assert "rank 1 needs" in said[0] and "has 260.0 MB" in said[0] and "rank 0" not in said[0]
    assert all(after - b < MB for after, b in zip(rchar(mixed), before)), "a refused load read the model"


def test_the_uneven_split_loads_within_each_budget_and_answers_as_one_process(mixed, dense):
    p = plan(mixed, context=1024, progress=False)
    loaded = load_model(mixed, pipeline=True, split="auto", context=1024, progress=False)
    assert loaded.layout.split == p.recommended.split and Path(loaded.model) == dense
    check_ownership([range(*r.layers) for r in loaded.ranks], 30)
    assert [range(*r.layers) for r in loaded.ranks] == [stage_layers(loaded.layout.split, r) for r in range(3)]
    for r, planned in zip(loaded.ranks, loaded.layout.memory):
        assert within(planned.weights, r.active_memory), (r.rank, planned, r.active_memory)
    stats = generate(mixed, QUESTION, 10, quiet=True)
    assert stats.tokens == reference_tokens(dense, 10)
    budgets = [700 * MB, 260 * MB, 260 * MB]
    assert all(peak <= b for peak, b in zip(stats.peak_memory + loaded.peak_memory, budgets * 2))
    # the prompt cache's default share comes from what is left of the budget, not the host's memory
    for status, r, b in zip(prompt_cache(mixed).ranks, loaded.ranks, budgets):
        assert 0 < status.limit <= (b - r.active_memory) // 4 + MB
    assert "planned weights" in repr(loaded) and loaded["active_memory"] == loaded.active_memory


@pytest.mark.parametrize(
    "which, pipeline, split, context",
    [
        ("dense", False, None, 16),  # tensor parallel fits 260 MB only with a short context
        ("4-bit", False, None, 1024),
        ("4-bit", True, None, 1024),
        ("random", False, None, 1024),
        ("random", True, RANDOM_SPLIT, 1024),
    ],
)
def test_the_plan_agrees_with_what_each_rank_holds(mixed, random_model, which, pipeline, split, context):
    path = {"dense": bundled_model(dense=True), "4-bit": bundled_model(), "random": random_model}[which]
    loaded = load_model(mixed, str(path), pipeline=pipeline, split=split, context=context, progress=False)
    assert loaded.layout.kind is (Kind.PIPELINE if pipeline else Kind.TENSOR)
    for r, planned in zip(loaded.ranks, loaded.layout.memory):
        assert within(planned.weights, r.active_memory), (which, r.rank, planned, r.active_memory)
        assert r.peak_memory <= r.budget.bytes
    held = [range(*r.layers) for r in loaded.ranks]
    if pipeline:
        check_ownership(held, loaded.plan.model.layers)
        assert split is None or held == [stage_layers(split, r) for r in range(3)]
    else:
        assert held == [range(loaded.plan.model.layers)] * 3


@pytest.mark.cluster
def test_a_model_over_every_budget_is_refused_before_any_weight_is_read(dense):
    with Cluster(n=2, memory="100MB", spares=False) as c:
        before = rchar(c)
        with pytest.raises(DoesNotFit, match=r"pipeline \[15, 15\] .* rank 0 needs .*, has 100.0 MB") as info:
            load_model(c, str(dense), pipeline=True, context=1024, progress=False)
        assert [s.rank for s in info.value.shortfalls] == [0, 1]
        assert "Nothing fits" in str(info.value) and "\n" not in str(info.value)
        assert all(after - b < MB for after, b in zip(rchar(c), before)), "the refused load read the model"
        # full fine-tuning is refused the same way, before a rank reads a weight
        with pytest.raises(DoesNotFit, match=r"full fine-tuning, FSDP of the bundled SmolLM2 .* has 100.0 MB"):
            finetune(c, method="full", fsdp=True, iters=1, max_seq_length=64)
        assert all(after - b < MB for after, b in zip(rchar(c), before)), "the refused run read the model"
        assert all(r.active_memory < MB for r in c.status())  # nothing was loaded
