"""Data-parallel LoRA fine-tuning, the rank half, built on mlx-lm's own tuner.

Every rank holds the whole model with LoRA layers; each reads its own slice of
every global batch (``mlx_lm.tuner.trainer.iterate_batches``), and gradients
are averaged by the trainer (``mlx.nn.average_gradients``). Each step is
reported to the notebook, and a stop request ends training on all ranks at
the same step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

DATA = Path(__file__).parent.parent / "data"  # mlx_nb/data


@dataclass
class FinetuneConfig:
    model: Optional[str] = None  # None: the bundled SmolLM2; else any mlx-lm path or repo id
    data: Union[str, list, None] = None  # jsonl path or chat rows; None: the bundled mascot facts
    iters: int = 30
    batch_size: int = 2  # per rank: the global batch is batch_size x ranks
    learning_rate: float = 2e-4
    num_layers: int = 8  # LoRA on the last num_layers blocks
    lora_rank: int = 8
    lora_scale: float = 20.0
    max_seq_length: int = 256
    mask_prompt: bool = True  # learn the answers only, not the system prompt and question
    seed: int = 0
    adapter_path: str = "adapters"


class _Stopped(Exception):
    pass


def load_rows(data: Union[str, list, None]) -> list[dict]:
    """Chat rows ({"messages": [...]}) from a jsonl file, a list, or the bundled set."""
    if isinstance(data, list):
        return data
    path = Path(data) if data else DATA / "mascot.jsonl"
    if path.is_dir():
        path = path / "train.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_on_rank(cfg: dict) -> dict:
    """Run inside every rank (collectively): LoRA-train, report each step, save on rank 0."""
    import contextlib
    import io

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.nn import losses as nn_losses
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import dequantize_model

    from ..models import dense_here, resolve
    from .session import report, stop_requested

    c = FinetuneConfig(**cfg)
    world = mx.distributed.init()
    size, rank = world.size(), world.rank()
    global_batch = c.batch_size * size
    rows = load_rows(c.data)
    if len(rows) < global_batch:
        raise ValueError(f"{len(rows)} training rows cannot fill a global batch of {global_batch} ({c.batch_size} x {size} ranks)")

    model, tokenizer = load(resolve(c.model))
    if mx.default_device() == mx.cpu and any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        # MLX's quantized matmul on the CPU runs at half the speed of a dense bf16 one: train
        # (QLoRA-style) on a dense copy; the adapters load back onto the quantized model.
        # float32 where an optimized BLAS runs it (about 20x bf16, whose matmuls use no BLAS)
        model = dequantize_model(model)
        model.set_dtype(mx.float32 if dense_here() else mx.bfloat16)
    model.freeze()
    lora = {"rank": c.lora_rank, "dropout": 0.0, "scale": c.lora_scale}
    mx.random.seed(c.seed)
    linear_to_lora_layers(model, c.num_layers, lora)
    np.random.seed(c.seed)  # iterate_batches shuffles with numpy: the same order on every rank

    def loss(model, batch, lengths):
        # the mean over the *global* batch's tokens, so 1 rank x 4 rows and
        # 2 ranks x 2 rows train identically (mlx-lm's default averages per rank)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
        ce = (nn_losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum()
        ntoks = mask.sum()
        total = mx.stop_gradient(mx.distributed.all_sum(ntoks, group=world))
        return ce * size / total, ntoks

    def batches(**kwargs):
        # mlx-lm pads every batch to a multiple of 32 tokens plus one; beyond the one target
        # after each row that its loss mask takes in, padding only costs time: cut it
        for batch, lengths in iterate_batches(**kwargs):
            yield batch[:, : int(lengths[:, 1].max()) + 1], lengths

    history: list[dict] = []

    class Live(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            row = {k: info[k] for k in ("iteration", "train_loss", "tokens_per_second", "trained_tokens")}
            history.append(row)
            if rank == 0:
                report(**row, iters=c.iters)
            stop = mx.distributed.all_sum(mx.array(int(stop_requested())), stream=mx.cpu, group=world)
            if stop.item():
                raise _Stopped(info["iteration"])

    adapter_dir = Path(c.adapter_path)
    args = TrainingArgs(
        batch_size=global_batch, iters=c.iters, steps_per_report=1, steps_per_eval=10**9,
        steps_per_save=10**9, max_seq_length=c.max_seq_length,
        adapter_file=str(adapter_dir / "adapters.safetensors"),
    )
    if rank == 0:
        adapter_dir.mkdir(parents=True, exist_ok=True)
    stopped_at = None
    t0 = time.perf_counter()
    quiet = io.StringIO()  # mlx-lm's console progress: the notebook draws its own
    try:
        with contextlib.redirect_stdout(quiet):
            train(model, optim.Adam(learning_rate=c.learning_rate), CacheDataset(ChatDataset(rows, tokenizer, mask_prompt=c.mask_prompt)),
                  None, args, loss=loss, iterate_batches=batches, training_callback=Live())
    except _Stopped as s:
        stopped_at = s.args[0]
        if rank == 0:
            mx.save_safetensors(args.adapter_file, dict(tree_flatten(model.trainable_parameters())))
    if rank == 0:
        config = {"fine_tune_type": "lora", "num_layers": c.num_layers, "lora_parameters": lora, "model": c.model}
        (adapter_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return {"history": history, "stopped_at": stopped_at, "seconds": time.perf_counter() - t0,
            "adapter_path": str(adapter_dir.resolve()), "ranks": size, "global_batch": global_batch}


