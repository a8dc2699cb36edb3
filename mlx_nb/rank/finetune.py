"""Fine-tuning, the rank half: the options checked, the run chosen, and LoRA on mlx-lm's own tuner.

Every rank reads its own slice of every global batch (``mlx_lm.tuner.trainer.iterate_batches``).
With ``method="lora"`` every rank holds the whole model with LoRA layers, and gradients are
averaged by the trainer (``mlx.nn.average_gradients``); ``method="full"`` trains every weight
(:mod:`mlx_nb.rank.full_finetune`, sharded over the ranks with ``fsdp=True``). Each step is
reported to the notebook with every rank's peak memory, and a stop request ends training on
all ranks at the same step. A checkpoint (:mod:`mlx_nb.rank.checkpoint`) is written every
``save_every`` steps, at the last step and when stopped; a run resumes from the latest one.
What every method shares (the options, the result, the steps) is :mod:`mlx_nb.rank.training`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Union

from . import checkpoint, memory
from .full_finetune import FullRun
from .state import state
from .training import LORA_OPTIONS, FinetuneConfig, FinetuneResult, Steps, StoppedAt, batches_from, global_mean_loss

DATA = Path(__file__).parent.parent / "data"  # mlx_nb/data
METHODS = ("lora", "full")
# what a resumed run must share with the run it continues: the method, and LoRA's layers
FIXED = ("model", "method", "fsdp", *LORA_OPTIONS)


def load_rows(data: Union[str, list, None]) -> list[dict]:
    """Chat rows ({"messages": [...]}) from a jsonl file, a list, or the bundled set."""
    if isinstance(data, list):
        return data
    path = Path(data) if data else DATA / "mascot.jsonl"
    if path.is_dir():
        path = path / "train.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare(options: dict[str, Any], choose_folder: bool = True) -> FinetuneConfig:
    """The run's options, checked, with its folder chosen: what ``train_on_rank`` runs.

    With ``resume``, the options saved by the run it continues fill in those not given
    (``iters`` too: a stopped run goes on to its first target), and the run writes on into
    that folder unless ``adapter_path`` says otherwise. Without, ``adapter_path`` defaults
    to a new folder (made here, where ``choose_folder``), and a folder that already holds
    a run's checkpoints is refused, not overwritten.

    Example:
        >>> prepare({"iters": 5}).adapter_path  # doctest: +SKIP
        '/home/me/adapters/run-20250101-120000'
    """
    known = [f.name for f in fields(FinetuneConfig)]
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ValueError(f"unknown finetune option {', '.join(unknown)}: the options are {', '.join(known)}")
    if options.get("resume"):
        options = _resumed(options)
    c = FinetuneConfig(**options)
    check(c)
    _check_method(c, options)
    if isinstance(c.data, str):
        c.data = str(Path(c.data).resolve())
    if c.adapter_path is None:
        if not choose_folder:
            return c
        c.adapter_path = str(checkpoint.new_run_dir())
    c.adapter_path = str(Path(c.adapter_path).resolve())
    folder = Path(c.adapter_path)
    continuing = c.resume is not None and folder == Path(c.resume).resolve()
    if not continuing and ((folder / checkpoint.ADAPTERS).exists() or (folder / checkpoint.STATE).exists()):
        held = "adapters" if (folder / checkpoint.ADAPTERS).exists() else "the checkpoints"
        raise ValueError(
            f"{folder} already holds {held} of an earlier run: pass resume={str(folder)!r} "
            "to continue that run, or another adapter_path (by default each run gets a new folder)"
        )
    return c


def check(c: FinetuneConfig) -> None:
    """Every number of a run in range (ValueError, one line), before any rank loads anything.

    >>> check(FinetuneConfig(iters=0))
    Traceback (most recent call last):
    ...
    ValueError: iters=0: it takes a number of steps, 1 or more
    """
    counts = {
        "iters": "a number of steps",
        "batch_size": "a number of rows per rank",
        "lora_rank": "a rank",
        "max_seq_length": "a number of tokens",
        "save_every": "a number of steps",
    }
    for name, what in counts.items():
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: it takes {what}, 1 or more")
    if (
        isinstance(c.num_layers, bool)
        or not isinstance(c.num_layers, int)
        or not (c.num_layers >= 1 or c.num_layers == -1)
    ):
        raise ValueError(f"num_layers={c.num_layers!r}: it takes a number of blocks, 1 or more (-1: all of them)")
    for name in ("learning_rate", "lora_scale"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{name}={value!r}: it takes a positive number")
    if isinstance(c.seed, bool) or not isinstance(c.seed, int):
        raise ValueError(f"seed={c.seed!r}: it takes a whole number")


def _check_method(c: FinetuneConfig, options: dict[str, Any]) -> None:
    """The method and the options that go with it (``options``: those the user passed)."""
    if c.method not in METHODS:
        raise ValueError(f"method={c.method!r}: use 'lora' (adapters on a frozen model) or 'full' (every weight)")
    if c.method == "lora":
        full_only = {"fsdp": c.fsdp, "max_grad_norm": c.max_grad_norm, "consolidate": c.consolidate}
        for name, value in full_only.items():
            if value:
                raise ValueError(
                    f"{name}={value!r} is an option of full fine-tuning: pass method='full' with it "
                    "(LoRA keeps the whole frozen model on every rank and trains adapters)"
                )
        return
    defaults = FinetuneConfig()
    given = [
        f"{k}={options[k]!r}" for k in LORA_OPTIONS if options.get(k, getattr(defaults, k)) != getattr(defaults, k)
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)}: these configure LoRA's adapters; leave them out with method='full', "
            "which trains every weight of the model"
        )
    if c.max_grad_norm is not None and not c.max_grad_norm > 0:
        raise ValueError(f"max_grad_norm={c.max_grad_norm}: clipping needs a norm above 0 (or None: no clipping)")


def _resumed(options: dict[str, Any]) -> dict[str, Any]:
    folder = Path(options["resume"]).resolve()
    saved = checkpoint.read_config(folder).get("mlx_nb")
    if saved is None:
        raise ValueError(f"{folder} was not written by mlx_nb's finetune: it has no options to resume with")
    record = checkpoint.latest(folder)
    if record is None:
        raise ValueError(f"{folder} holds no checkpoint yet (the run ended before its first save): start a new run")
    defaults = asdict(FinetuneConfig())
    changed = {k: saved.get(k, defaults[k]) for k in FIXED if k in options and options[k] != saved.get(k, defaults[k])}
    if changed:
        what = "another method" if {"method", "fsdp"} & set(changed) else "other LoRA layers"
        raise ValueError(
            f"cannot resume {folder} with {what}: "
            f"{', '.join(f'{k}={options[k]!r} (the run has {v!r})' for k, v in changed.items())}; "
            "leave these options out to resume, or start a new run"
        )
    if isinstance(saved["data"], dict) and "data" not in options:
        raise ValueError(
            f"the run in {folder} trained on {saved['data']['rows']} rows passed as a list: "
            "pass the same data= to resume it"
        )
    merged = {**saved, **options, "resume": str(folder)}
    merged.setdefault("adapter_path", str(folder))
    if merged["iters"] <= record["step"]:
        raise ValueError(
            f"the run in {folder} already trained to step {record['step']} (iters={saved['iters']}): "
            f"pass iters= above {record['step']} to train on"
        )
    return merged


def train_on_rank(cfg: dict) -> FinetuneResult:
    """Run inside every rank (collectively): train, report each step, checkpoint.

    ``cfg`` holds :class:`FinetuneConfig` options. Returns this rank's :class:`FinetuneResult`:
    the loss history (from step 1, on a resumed run too), the step it stopped at (None: it ran
    to ``iters``), the folder, and every rank's peak memory.

    Example (in a ``%%mlx_dist`` cell)::

        trained = train_on_rank({"iters": 30, "batch_size": 1, "save_every": 5})
    """
    import mlx.core as mx

    group = mx.distributed.init()
    # LoRA: only rank 0 writes, the others need no folder; full: every rank writes, into one folder
    # that the caller names (each rank choosing one would give each its own)
    c = prepare(cfg, choose_folder=group.rank() == 0 and cfg.get("method", "lora") == "lora")
    rows = load_rows(c.data)
    global_batch = c.batch_size * group.size()
    if len(rows) < global_batch:
        raise ValueError(
            f"{len(rows)} training rows cannot fill a global batch of {global_batch} "
            f"({c.batch_size} x {group.size()} ranks)"
        )
    run: Steps = FullRun(c, group, rows, state.backend) if c.method == "full" else _Run(c, group, rows)
    stopped_at = None
    t0 = time.perf_counter()
    try:
        run.train()
    except StoppedAt as s:
        stopped_at = s.step
    result = FinetuneResult(
        history=run.history,
        adapter_path=c.adapter_path,
        stopped_at=stopped_at,
        seconds=time.perf_counter() - t0,
        ranks=group.size(),
        global_batch=global_batch,
        resumed_from=run.start or None,
        saved=run.saved,
        method=c.method,
        fsdp=c.fsdp,
        peak_memory=run.peaks,
        reduce_scatter=run.reduce_scatter,
    )
    run = None  # the model, its gradients and Adam's state go, and MLX's cache of their buffers
    mx.clear_cache()
    memory.give_back()  # and what a CPU rank keeps of them (memory.keep_freed)
    return result


class _Run(Steps):
    """One rank's share of a LoRA run: the model with its LoRA layers, the optimizer, the checkpoints."""

    def __init__(self, c: FinetuneConfig, group: Any, rows: list[dict]):
        import mlx.optimizers as optim

        super().__init__(c, group)
        self.rows = rows
        self.model, self.tokenizer = _lora_model(c)
        self.optimizer = optim.Adam(learning_rate=c.learning_rate)
        self._begin(checkpoint.CONFIG, self._adapter_config)

    def _adapter_config(self) -> dict:
        """mlx-lm's adapter_config.json, and under "mlx_nb" the options to resume with."""
        c = self.c
        return {
            "fine_tune_type": "lora",
            "num_layers": c.num_layers,
            "model": c.model,
            "lora_parameters": self.lora,
            "mlx_nb": self.options(),
        }

    @property
    def lora(self) -> dict:
        return {"rank": self.c.lora_rank, "dropout": 0.0, "scale": self.c.lora_scale}

    def _restore(self, folder: Path) -> None:
        """The LoRA weights, the optimizer state, the step and the loss history of the checkpoint."""
        from mlx.utils import tree_flatten, tree_unflatten

        record, adapters, optimizer = checkpoint.load(folder)
        expected = dict(tree_flatten(self.model.trainable_parameters()))
        if set(adapters) != set(expected) or any(adapters[k].shape != expected[k].shape for k in expected):
            raise ValueError(
                f"the checkpoint in {folder} does not fit this model's LoRA layers "
                f"(num_layers={self.c.num_layers}, lora_rank={self.c.lora_rank})"
            )
        self.model.load_weights(list(adapters.items()), strict=False)
        self.optimizer.state = tree_unflatten(list(optimizer.items()))
        self.optimizer.learning_rate = self.c.learning_rate
        self._restored(record)

    def save(self, step: int) -> str:
        """Rank 0 writes the checkpoint of ``step`` (after the step's update was evaluated)."""
        from mlx.utils import tree_flatten

        if self.rank == 0:
            adapters = dict(tree_flatten(self.model.trainable_parameters()))
            self.saved = str(
                checkpoint.save(self.folder, step, adapters, dict(tree_flatten(self.optimizer.state)), self.history)
            )
        return self.saved

    def train(self) -> None:
        import contextlib
        import io

        import numpy as np
        from mlx_lm.tuner.callbacks import TrainingCallback
        from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
        from mlx_lm.tuner.trainer import TrainingArgs, train

        c = self.c
        # mlx-lm's own last save (on rank 0), not ours
        scratch = (self.folder or Path(".")) / f".mlx_lm-trainer-{self.rank}.safetensors"
        args = TrainingArgs(
            batch_size=c.batch_size * self.size,
            iters=c.iters - self.start,
            steps_per_report=1,
            steps_per_eval=10**9,
            steps_per_save=10**9,
            max_seq_length=c.max_seq_length,
            adapter_file=str(scratch),
        )
        np.random.seed(c.seed)  # iterate_batches shuffles with numpy: the same order on every rank
        dataset = CacheDataset(ChatDataset(self.rows, self.tokenizer, mask_prompt=c.mask_prompt))
        run = self

        class Live(TrainingCallback):
            def on_train_loss_report(self, info: dict) -> None:
                run.on_step(
                    info["iteration"] + run.start,
                    train_loss=info["train_loss"],
                    tokens_per_second=info["tokens_per_second"],
                    trained_tokens=info["trained_tokens"],
                )

        quiet = io.StringIO()  # mlx-lm's console progress: the notebook draws its own
        try:
            with contextlib.redirect_stdout(quiet):
                train(
                    self.model,
                    self.optimizer,
                    dataset,
                    None,
                    args,
                    loss=global_mean_loss(self.group),
                    iterate_batches=batches_from(self.start),
                    training_callback=Live(),
                )
        finally:
            scratch.unlink(missing_ok=True)


def _lora_model(c: FinetuneConfig):
    """The base model (a dense copy of a quantized one on the CPU), frozen, with LoRA layers."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import dequantize_model

    from ..models import dense_here, resolve

    model, tokenizer = load(resolve(c.model))
    if mx.default_device() == mx.cpu and any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()
    ):
        # MLX's quantized matmul on the CPU runs at half the speed of a dense bf16 one: train
        # (QLoRA-style) on a dense copy; the adapters load back onto the quantized model.
        # float32 where an optimized BLAS runs it (about 20x bf16, whose matmuls use no BLAS)
        model = dequantize_model(model)
        model.set_dtype(mx.float32 if dense_here() else mx.bfloat16)
    model.freeze()
    mx.random.seed(c.seed)
    linear_to_lora_layers(model, c.num_layers, {"rank": c.lora_rank, "dropout": 0.0, "scale": c.lora_scale})
    return model, tokenizer
