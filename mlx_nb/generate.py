"""Sharded generation from the notebook: load a model over the ranks, then stream replies.

The rank half is :mod:`mlx_nb.rank.generate` (``load`` and ``stream`` are re-exported here,
for use inside cells and ``mlx.launch`` scripts).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .display import Progress
from .models import check_split, fused_model, resolve
from .rank.generate import Prompt, generate_on_rank, load, load_on_rank, stream

__all__ = ["GenerationStats", "Prompt", "generate", "load", "load_model", "stream"]


@dataclass
class GenerationStats:
    """One reply: its text and how fast it came (rank 0's view), and memory per rank."""

    text: str
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft: float  # seconds to the first token, on rank 0
    peak_memory: list[int]  # per rank
    finish_reason: Optional[str]
    stopped: bool
    tokens: list[int] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)  # token produced on rank 0 -> notebook, s

    def summary(self) -> str:
        from .display import human_bytes

        mem = ", ".join(human_bytes(m) for m in self.peak_memory)
        how = " (stopped)" if self.stopped else ""
        return (
            f"prompt {self.prompt_tokens} tok at {self.prompt_tps:.1f} tok/s | generated {self.generation_tokens} tok "
            f"at {self.generation_tps:.1f} tok/s{how} | first token {self.ttft * 1e3:.0f} ms | peak memory per rank: {mem}"
        )


def load_model(
    cluster,
    model: Optional[str] = None,
    *,
    pipeline: bool = False,
    adapter_path: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Load ``model`` on every rank, split tensor-parallel (or ``pipeline=True``), and keep it.

    ``model``: None for the bundled SmolLM2 (or, with ``adapter_path``, the model the adapters
    were trained on), else any mlx-lm path or repo id. ``adapter_path``: LoRA adapters (a
    ``finetune`` run's folder): they are fused into the weights here, once (cached), and the
    fused model is split like any other. A split the model cannot take fails before anything
    is loaded, saying which rank counts work. The load is a setup step: it is replayed if the
    ranks are ever restarted, and a load that fails leaves the previous one in place.
    Returns load seconds, per-rank memory, and the folder the ranks loaded.

    Example::

        load_model(cluster)                       # tensor parallel over all ranks
        generate(cluster, "What is the capital of France?")
        load_model(cluster, adapter_path=run.wait().adapter_path, pipeline=True)
    """
    if adapter_path is not None and model is None:
        model = _trained_on(adapter_path)
    path = _base_path(cluster, model, progress)
    check_split(path, cluster.n, pipeline)
    target = model  # each rank resolves it (a host of its own finds its own bundled copy)
    if adapter_path is not None:
        if progress:
            print(f"fusing the adapters of {adapter_path} into {Path(path).name}...", end="", flush=True)
        t0 = time.perf_counter()
        path = target = str(fused_model(path, adapter_path))
        if progress:
            print(f" done in {time.perf_counter() - t0:.1f} s ({path})")
    if progress:
        print(f"loading on {cluster.n} ranks...", end="", flush=True)
    t0 = time.perf_counter()
    loads = cluster.call(load_on_rank, target, pipeline, setup="load_model", what="a model load")
    if progress:
        print(f" done in {time.perf_counter() - t0:.1f} s")
    return {
        "seconds": loads[0]["seconds"],
        "peak_memory": [r["peak_memory"] for r in loads],
        "active_memory": [r["active_memory"] for r in loads],
        "model": path,
    }


def _trained_on(adapter_path: str) -> Optional[str]:
    """The model named in the adapters' config (None: the bundled one)."""
    config = Path(adapter_path) / "adapter_config.json"
    return json.loads(config.read_text()).get("model") if config.exists() else None


def _base_path(cluster, model: Optional[str], progress: bool) -> str:
    """What the ranks load for ``model``: the bundled folder they prefer (converted here, once,
    with a progress line), else the path or repo id as given."""
    from .models import BUNDLED_NAMES, prepare_bundled

    if model is not None and str(model).lower() not in BUNDLED_NAMES:
        return resolve(model)
    bar: list[Progress] = []

    def converting(done: int, total: int, message: str) -> None:
        if not bar:
            bar.append(Progress("converting the bundled model", stream=sys.stdout))
        bar[0].update(done, total, message)
        if done >= total:
            bar[0].close()

    path = prepare_bundled(cluster.ranks, progress=converting if progress else None)
    if progress and "F32" in path.name:
        print(
            "the ranks load the bundled model's dense float32 copy: on a CPU with OpenBLAS it "
            "runs faster than the 4-bit one (MLX's quantized CPU kernels use no BLAS)"
        )
    return str(path)


def generate(
    cluster,
    prompt: Prompt,
    max_tokens: int = 256,
    *,
    on_text: Optional[Callable[[str], None]] = None,
    quiet: bool = False,
    timeout: Optional[float] = None,
    what: str = "generation",
) -> GenerationStats:
    """Generate with the model loaded on the cluster, streaming rank 0's text as it comes.

    Text goes to ``on_text`` (or is printed unless ``quiet``). The notebook's
    interrupt stops every rank at the same token. Greedy decoding.

    Example::

        stats = generate(cluster, [{"role": "user", "content": "Hi!"}], 64)
        print(stats.summary())
    """
    delays: list[float] = []

    def on_report(rank: int, data: dict) -> None:
        delays.append(time.time() - data["t"])
        if on_text is not None:
            on_text(data["text"])
        elif not quiet:
            print(data["text"], end="", flush=True)

    replies = cluster.call(generate_on_rank, prompt, max_tokens, on_report=on_report, timeout=timeout, what=what)
    if on_text is None and not quiet:
        print()
    r = replies[0]
    return GenerationStats(
        r["text"],
        r["prompt_tokens"],
        r["prompt_tps"],
        r["generation_tokens"],
        r["generation_tps"],
        r["ttft"],
        [x["peak_memory"] for x in replies],
        r["finish_reason"],
        r["stopped"],
        r["tokens"],
        delays,
    )
