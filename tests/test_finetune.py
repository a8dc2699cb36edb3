"""Data-parallel LoRA fine-tuning on real 2-rank clusters: one rank and two ranks train
identically, the bundled facts are learnt, the stop button ends every rank at one step,
checkpoints are written while training (atomically, and on a stop or an interrupt), a run
resumes where it stopped, the adapters serve fused and sharded, and notebook 06 runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest
from conftest import steps_in

from mlx_nb import Cluster, DistCellError
from mlx_nb.finetune import finetune, load_rows, prepare, train_on_rank
from mlx_nb.generate import generate, load_model
from mlx_nb.rank.checkpoint import atomic_write, save_arrays

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "06_data_parallel_finetuning.ipynb"
QUESTION = [{"role": "user", "content": load_rows(None)[0]["messages"][0]["content"]}]
# small enough for a loaded 2-core machine, big enough to learn the mascot: about 6 s a step
LEARN = dict(batch_size=1, num_layers=2, learning_rate=5e-4)
TINY = """
N = 2
ITERS = 2
SAVE_EVERY = 1
MORE = 1
OPTIONS = dict(batch_size=1, num_layers=2, learning_rate=5e-4)
MAX_TOKENS = 8
ADAPTERS = {adapters!r}
"""


def test_one_rank_with_the_full_batch_and_two_with_half_batches_train_identically(two_ranks, tiny_model, tmp_path):
    # on every token, not only the answers, so each rank's questions count
    options = dict(model=str(tiny_model), iters=3, learning_rate=1e-2, num_layers=2, mask_prompt=False, seed=3)
    two = finetune(two_ranks, batch_size=2, adapter_path=str(tmp_path / "two"), **options).wait()
    with Cluster(n=1) as single:
        one = finetune(single, batch_size=4, adapter_path=str(tmp_path / "one"), **options).wait()
    assert (one.ranks, one.global_batch, two.ranks, two.global_batch) == (1, 4, 2, 4)
    assert [h["trained_tokens"] for h in one.history] == [h["trained_tokens"] for h in two.history]
    assert one.losses == pytest.approx(two.losses, rel=1e-4)
    assert len(set(two.losses)) == 3  # the curve moves: the updates are what is compared


def test_too_little_data_for_a_global_batch_is_named(two_ranks, tmp_path):
    rows = load_rows(None)[:3]
    with pytest.raises(DistCellError, match=r"3 training rows cannot fill a global batch of 4 \(2 x 2 ranks\)"):
        finetune(two_ranks, data=rows, batch_size=2, adapter_path=str(tmp_path)).wait()
    assert two_ranks.run("mx.distributed.all_sum(mx.array(rank + 1)).item()").value["text/plain"] == "3"


def loads_whole(data: bytes, tmp_path: Path) -> dict:
    """The arrays of a safetensors file's bytes (mx.load raises on a truncated one)."""
    path = tmp_path / "copy.safetensors"
    path.write_bytes(data)
    return mx.load(str(path))


@pytest.fixture(scope="module")
def stopped(two_ranks, tmp_path_factory):
    """Base answer; a long run checkpointing every 2 steps, looked at as its step 2 comes in
    (a reader opens its adapters then), stopped from the notebook once 4 steps are in; then
    the answer of the adapters fused into the model and split as a pipeline over 2 ranks."""
    load_model(two_ranks, pipeline=True)  # SmolLM2's 9 heads do not split over 2 ranks
    base = generate(two_ranks, QUESTION, 16, quiet=True).text
    folder = tmp_path_factory.mktemp("adapters") / "run"
    run = finetune(two_ranks, iters=100, adapter_path=str(folder), save_every=2, **LEARN)
    steps_in(run, 2)
    reader = open(folder / "adapters.safetensors", "rb")
    early = {
        "training": run.result is None and run.error is None,
        "files": sorted(os.listdir(folder)),
        "bytes": reader.read(),
    }
    steps_in(run, 4)
    run.stop()
    result = run.wait(timeout=120)
    assert result is not None, f"training did not end: {run.label.value}"
    loaded = load_model(two_ranks, adapter_path=result.adapter_path, pipeline=True)
    tuned = generate(two_ranks, QUESTION, 16, quiet=True).text
    yield SimpleNamespace(base=base, run=run, result=result, tuned=tuned, early=early, reader=reader, loaded=loaded)
    reader.close()


def test_stop_ends_training_on_every_rank_at_the_same_step_and_saves_it(two_ranks, stopped):
    run, result = stopped.run, stopped.result
    assert result.stopped_at is not None and 4 <= result.stopped_at < 100
    assert [r.stopped_at for r in run.per_rank] == [result.stopped_at] * 2
    assert [len(r.history) for r in run.per_rank] == [result.stopped_at] * 2
    assert f"stopped at step {result.stopped_at}" in run.label.value and run.stop_button.disabled
    saved = Path(result.adapter_path)
    state = json.loads((saved / "checkpoint.json").read_text())
    assert state["step"] == result.stopped_at and len(state["history"]) == result.stopped_at
    last = saved / f"{result.stopped_at:07d}_adapters.safetensors"
    assert result.saved == str(last) and last.read_bytes() == (saved / "adapters.safetensors").read_bytes()
    assert json.loads((saved / "adapter_config.json").read_text())["num_layers"] == LEARN["num_layers"]


def test_checkpoints_are_written_every_n_steps_while_training(stopped):
    early, result = stopped.early, stopped.result
    assert early["training"]
    assert {
        "0000002_adapters.safetensors",
        "0000002_optimizer.safetensors",
        "adapters.safetensors",
        "checkpoint.json",
        "adapter_config.json",
    } <= set(early["files"])
    files = sorted(os.listdir(result.adapter_path))
    steps = sorted({*range(2, result.stopped_at + 1, 2), result.stopped_at})
    assert [f for f in files if f.endswith("_adapters.safetensors")] == [f"{s:07d}_adapters.safetensors" for s in steps]
    # the optimizer state is kept for the latest checkpoint only; no temporary file is left
    assert [f for f in files if f.endswith("_optimizer.safetensors")] == [
        f"{result.stopped_at:07d}_optimizer.safetensors"
    ]
    assert not [f for f in files if f.startswith(".")]


def test_a_reader_of_the_adapters_never_sees_them_change_under_it(stopped, tmp_path):
    # the reader opened adapters.safetensors at step 2; later checkpoints replaced the file by
    # renaming a new one over it, so the open file is the whole step-2 file still
    stopped.reader.seek(0)
    again = stopped.reader.read()
    assert again == stopped.early["bytes"]
    assert set(loads_whole(again, tmp_path)) == set(
        mx.load(str(Path(stopped.result.adapter_path) / "adapters.safetensors"))
    )
    assert (Path(stopped.result.adapter_path) / "adapters.safetensors").read_bytes() != again


def test_the_cluster_is_usable_after_a_stop(two_ranks, stopped):
    assert two_ranks.run("mx.distributed.all_sum(mx.array(rank + 1)).item()").value["text/plain"] == "3"


def test_the_live_curve_is_drawn_from_every_step(stopped):
    run, result = stopped.run, stopped.result
    assert run.image.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert [h["iteration"] for h in run.history] == list(range(1, result.stopped_at + 1))
    assert all(h["tokens_per_second"] > 0 and h["iters"] == 100 for h in run.history)
    assert [h["iteration"] for h in run.history if h.get("saved")] == sorted(
        {*range(2, result.stopped_at + 1, 2), result.stopped_at}
    )


def test_the_loss_falls_and_the_answer_changes(stopped):
    assert stopped.result.losses[-1] < stopped.result.losses[0]
    assert stopped.tuned != stopped.base
    print(
        f"base: {stopped.base!r}\nfine-tuned: {stopped.tuned!r}\nlosses: {[round(x, 3) for x in stopped.result.losses]}"
    )


def test_fused_adapters_split_as_a_pipeline_give_the_fine_tuned_answer(two_ranks, stopped):
    from mlx_lm import generate as one_process
    from mlx_lm import load

    from mlx_nb.models import cache_dir, prepare_bundled

    fused = Path(stopped.loaded["model"])
    assert fused.parent == cache_dir() / "fused"
    # the answer of mlx-lm's own unfused adapters, in one process, on the base the ranks load
    model, tokenizer = load(str(prepare_bundled(two_ranks.ranks)), adapter_path=stopped.result.adapter_path)
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert stopped.tuned == one_process(model, tokenizer, prompt, max_tokens=16)
    # each rank holds its share of the weights, not the whole model
    whole = sum(f.stat().st_size for f in fused.glob("*.safetensors"))
    assert all(10 * 2**20 < m < 0.8 * whole for m in stopped.loaded["active_memory"]), (stopped.loaded, whole)


def test_the_fused_model_is_made_once_per_adapters_and_base(two_ranks, stopped):
    from mlx_nb.models import fused_model, prepare_bundled

    fused = Path(stopped.loaded["model"])
    made = (fused / "config.json").stat().st_mtime_ns
    assert fused_model(prepare_bundled(two_ranks.ranks), stopped.result.adapter_path) == fused
    assert (fused / "config.json").stat().st_mtime_ns == made


def interrupt_main() -> None:
    """What the notebook's interrupt button does: SIGINT to the kernel's main thread."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def interrupt_at(run, step: int) -> None:
    try:
        steps_in(run, step)
    finally:
        interrupt_main()  # always: the run would go on for hours


def test_an_interrupt_of_a_training_call_stops_every_rank_and_saves_that_step(two_ranks, tiny_model, tmp_path):
    folder = tmp_path / "run"
    config = dict(
        model=str(tiny_model), iters=10**5, save_every=10**5, batch_size=1, num_layers=2, adapter_path=str(folder)
    )
    steps = []

    def on_report(rank: int, step) -> None:
        steps.append(step.iteration)
        if len(steps) == 3:
            interrupt_main()

    per_rank = two_ranks.call(train_on_rank, config, on_report=on_report, timeout=300)
    stopped_at = per_rank[0].stopped_at
    assert stopped_at is not None and 3 <= stopped_at < 10**5
    assert [r.stopped_at for r in per_rank] == [stopped_at] * 2
    assert json.loads((folder / "checkpoint.json").read_text())["step"] == stopped_at
    assert (folder / f"{stopped_at:07d}_adapters.safetensors").exists()


def test_an_interrupt_while_waiting_for_a_run_stops_it_and_saves_that_step(two_ranks, tiny_model, tmp_path):
    run = finetune(
        two_ranks,
        model=str(tiny_model),
        iters=10**5,
        save_every=10**5,
        batch_size=1,
        num_layers=2,
        adapter_path=str(tmp_path / "run"),
    )
    interrupter = threading.Thread(target=interrupt_at, args=(run, 3))
    interrupter.start()
    result = run.wait()
    interrupter.join()
    assert result.stopped_at is not None and 3 <= result.stopped_at < 10**5
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["step"] == result.stopped_at


@pytest.fixture(scope="module")
def resumed(two_ranks, tiny_model, tmp_path_factory):
    """(6 steps in one run, 3 steps then resumed to 6, the FinetuneRun of the resumed part)."""
    root = tmp_path_factory.mktemp("resume")
    options = dict(
        model=str(tiny_model), learning_rate=1e-2, num_layers=2, mask_prompt=False, seed=3, batch_size=2, save_every=3
    )
    whole = finetune(two_ranks, iters=6, adapter_path=str(root / "whole"), **options).wait()
    finetune(two_ranks, iters=3, adapter_path=str(root / "part"), **options).wait()
    run = finetune(two_ranks, resume=str(root / "part"), iters=6)
    return whole, run.wait(), run


def test_a_resumed_run_continues_the_step_count_and_the_loss_curve(resumed):
    whole, part, run = resumed
    assert part.resumed_from == 3
    assert [h["iteration"] for h in part.history] == [1, 2, 3, 4, 5, 6]
    assert [h["iteration"] for h in run.history] == [1, 2, 3, 4, 5, 6]  # the live curve too
    # steps 4-6 equal the uninterrupted run's: the LoRA weights, the optimizer's moments and the
    # data order were restored (fresh Adam moments would take another step 4)
    assert part.losses == pytest.approx(whole.losses, rel=1e-5)
    assert [h["trained_tokens"] for h in part.history] == [h["trained_tokens"] for h in whole.history]
    files = sorted(os.listdir(part.adapter_path))
    assert [f for f in files if "_" in f and f.endswith("safetensors")] == [
        "0000003_adapters.safetensors",
        "0000006_adapters.safetensors",
        "0000006_optimizer.safetensors",
    ]


def test_resume_and_adapter_path_mistakes_are_explained(resumed):
    whole, part, _ = resumed
    with pytest.raises(ValueError, match=r"already trained to step 6 \(iters=6\): pass iters= above 6"):
        prepare({"resume": part.adapter_path})
    with pytest.raises(ValueError, match=r"cannot resume .* other LoRA layers: num_layers=4 \(the run has 2\)"):
        prepare({"resume": part.adapter_path, "iters": 9, "num_layers": 4})
    with pytest.raises(ValueError, match=r"already holds adapters of an earlier run: pass resume="):
        prepare({"adapter_path": whole.adapter_path})
    with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
        prepare({"resume": str(Path(part.adapter_path).parent)})


def test_the_cache_keeps_the_latest_fused_models_only(resumed, tiny_model, tmp_path, monkeypatch):
    from mlx_nb.models import FUSED_KEPT, fused_model

    monkeypatch.setenv("MLX_NB_CACHE", str(tmp_path / "cache"))
    trained = Path(resumed[0].adapter_path)
    made = []
    for k in range(FUSED_KEPT + 1):  # adapters of their own each: their weights scaled
        adapters = tmp_path / f"adapters-{k}"
        adapters.mkdir()
        shutil.copy(trained / "adapter_config.json", adapters)
        mx.save_safetensors(
            str(adapters / "adapters.safetensors"),
            {name: w * (k + 1) for name, w in mx.load(str(trained / "adapters.safetensors")).items()},
        )
        made.append(fused_model(tiny_model, adapters))
    assert len(set(made)) == FUSED_KEPT + 1
    assert sorted((tmp_path / "cache" / "fused").iterdir()) == sorted(made[1:])


def test_each_run_gets_a_new_folder_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = prepare({}).adapter_path, prepare({}).adapter_path
    assert first != second
    assert [Path(p).parent for p in (first, second)] == [tmp_path / "adapters"] * 2
    assert all(Path(p).name.startswith("run-") and Path(p).is_dir() for p in (first, second))


def test_a_checkpoint_file_is_replaced_whole_never_rewritten_in_place(tmp_path):
    target = tmp_path / "adapters.safetensors"
    save_arrays(target, {"a": mx.zeros(4)})
    seen = []

    def write(tmp: Path) -> None:
        # while the new file is written, under another name, the old one is whole and in place
        seen.append((tmp.parent, tmp.name.startswith("."), mx.load(str(target))["a"].tolist()))
        mx.save_safetensors(str(tmp), {"a": mx.ones(4)})

    atomic_write(target, write)
    assert seen == [(tmp_path, True, [0.0] * 4)]
    assert mx.load(str(target))["a"].tolist() == [1.0] * 4

    def fails_half_way(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, fails_half_way)
    assert mx.load(str(target))["a"].tolist() == [1.0] * 4
    assert os.listdir(tmp_path) == ["adapters.safetensors"]


def test_notebook_executes_with_a_loss_figure_and_both_answers(execute_notebook, tmp_path):
    nb = execute_notebook(NOTEBOOK, parameters=TINY.format(adapters=str(tmp_path / "adapters")))
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert [o for o in outputs if "image/png" in o.get("data", {})]
    assert [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs)
    assert "before:" in text and "after:" in text and "Cluster stopped." in text
    assert "0000002_adapters.safetensors" in text and "resumed at step 2: steps [3]" in text
    assert json.loads((tmp_path / "adapters" / "checkpoint.json").read_text())["step"] == 3
