"""The bundled SmolLM2: conversion, loading with mlx-lm, splitting checks, and sharded
generation that matches one process token for token."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_nb import models

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 6  # rank 0 stops the second reply at its 3rd token: every rank ends at the 4th

# Runs in every rank under mlx.launch: a full greedy answer, then one that rank 0
# asks to stop at its 3rd token (all ranks end one check later, at the 4th),
# then prints what this rank saw.
RANK_SCRIPT = f"""
import json, sys
import mlx.core as mx
from mlx_nb.generate import load, stream

question = json.loads(sys.argv[2])
group = mx.distributed.init()
model, tokenizer = load(None, group, pipeline=sys.argv[1] == "pipeline")
full = [r.token for r in stream(model, tokenizer, question, {MAX_TOKENS}, group)]
seen = []
stop = (lambda: len(seen) >= 3) if group.rank() == 0 else None
for r in stream(model, tokenizer, question, {MAX_TOKENS}, group, should_stop=stop):
    seen.append(r.token)
print("RESULT " + json.dumps({{"rank": group.rank(), "full": full, "stopped": seen}}), flush=True)
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A fresh model cache for this module, inherited by the ranks it launches."""
    path = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLX_NB_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def steps(cache) -> list[tuple[int, int, str]]:
    """The progress calls of the module's one conversion."""
    seen: list[tuple[int, int, str]] = []
    models.bundled_model(progress=lambda *step: seen.append(step))
    return seen


@pytest.fixture(scope="module")
def bundled(steps) -> Path:
    return models.bundled_model()


@pytest.fixture(scope="module")
def single_tokens(bundled) -> list[int]:
    """Greedy tokens for QUESTION in this one process, through plain mlx-lm."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(bundled))
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, MAX_TOKENS)]


def free_port_run(n: int) -> int:
    """The first of ``n`` consecutive free local ports (mlx.launch's ring takes a run)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            start = s.getsockname()[1]
        with contextlib.ExitStack() as stack:
            try:
                for port in range(start, start + n):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return start


def launch(tmp_path: Path, n: int, mode: str) -> dict[int, dict]:
    """Run RANK_SCRIPT on ``n`` local ring ranks; each rank's RESULT by rank."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    launcher = Path(sys.executable).parent / "mlx.launch"
    cmd = [
        str(launcher),
        "-n",
        str(n),
        "--backend",
        "ring",
        "--python",
        sys.executable,
        "--starting-port",
        str(free_port_run(n)),
        str(script),
        mode,
        json.dumps(QUESTION),
    ]
    # A new session, so that on timeout the launcher and every rank die together.
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    assert proc.returncode == 0, out + err
    rows = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    return {row["rank"]: row for row in rows}


def test_conversion_reports_progress_to_the_end(steps):
    assert steps[0][0] == 0 and steps[-1][0] == steps[-1][1]
    assert [done for done, _, _ in steps] == sorted(done for done, _, _ in steps)


def test_bundled_folder_is_an_ordinary_mlx_lm_folder_and_reused(bundled, cache):
    names = {p.name for p in bundled.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    config = json.loads((bundled / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    stamp = (bundled / "model.safetensors").stat().st_mtime_ns
    assert models.bundled_model() == bundled
    assert (bundled / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == [bundled.name], "no temp folder left behind"


def test_concurrent_conversions_leave_one_complete_folder(tmp_path):
    code = "from mlx_nb.models import bundled_model; print(bundled_model())"
    env = {**os.environ, "MLX_NB_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    (folder,) = outs
    assert [p.name for p in tmp_path.iterdir()] == [Path(folder).name]
    assert (Path(folder) / "model.safetensors").exists()


def test_resolve_names_the_bundled_model_and_passes_others_through(bundled):
    assert models.resolve(None) == models.resolve("SmolLM2") == str(bundled)
    assert models.resolve("mlx-community/Qwen3-0.6B-4bit") == "mlx-community/Qwen3-0.6B-4bit"
    assert models.resolve("/some/model/folder") == "/some/model/folder"


def test_tokenizer_round_trips_and_splits_digits(bundled):
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(bundled)
    text = "Héllo wörld, 2024 <|im_end|>"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_end|>") == [2] == sorted(tokenizer.eos_token_ids)
    assert len(tokenizer.encode("2024")) == 4


def test_greedy_answer_in_one_process_names_paris(bundled, single_tokens):
    from mlx_lm.utils import load_tokenizer

    assert "Paris" in load_tokenizer(bundled).decode(single_tokens)


def test_tensor_split_over_two_ranks_says_why_and_what_works(bundled):
    with pytest.raises(ValueError) as error:
        models.check_split(bundled, 2, pipeline=False)
    message = str(error.value)
    assert "9 attention heads" in message and "3 key/value heads" in message
    assert "Rank counts that work: 1, 3" in message and "pipeline=True" in message
    models.check_split(bundled, 3, pipeline=False)


def test_pipeline_needs_a_layer_per_rank(bundled):
    models.check_split(bundled, 30, pipeline=True)
    with pytest.raises(ValueError, match="only 30 layers"):
        models.check_split(bundled, 31, pipeline=True)


def test_pipeline_refused_for_models_mlx_lm_cannot_pipeline(bundled, tmp_path):
    config = json.loads((bundled / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="into a pipeline"):
        models.check_split(tmp_path, 2, pipeline=True)


@pytest.mark.cluster
@pytest.mark.parametrize("mode,n", [("tensor", 3), ("pipeline", 2)])
def test_sharded_greedy_matches_one_process_and_stops_together(mode, n, tmp_path, single_tokens):
    results = launch(tmp_path, n, mode)
    assert sorted(results) == list(range(n))
    for row in results.values():
        assert row["full"] == single_tokens
        assert row["stopped"] == single_tokens[:4]
