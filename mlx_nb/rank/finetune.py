"""Fine-tuning, the rank half: the options, the run's steps, and LoRA on mlx-lm's own tuner.

Every rank reads its own slice of every global batch (``mlx_lm.tuner.trainer.iterate_batches``).
With ``method="lora"`` every rank holds the whole model with LoRA layers, and gradients are
averaged by the trainer (``mlx.nn.average_gradients``); ``method="full"`` trains every weight
(:mod:`mlx_nb.rank.full_finetune`, sharded over the ranks with ``fsdp=True``). Each step is
reported to the notebook with every rank's peak memory, and a stop request ends training on
all ranks at the same step. A checkpoint (:mod:`mlx_nb.rank.checkpoint`) is written every
``save_every`` steps, at the last step and when stopped; a run resumes from the latest one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

from . import checkpoint

DATA = Path(__file__).parent.parent / "data"  # mlx_nb/data
METHODS = ("lora", "full")
LORA_OPTIONS = ("num_layers", "lora_rank", "lora_scale")
# what a resumed run must share with the run it continues: the method, and LoRA's layers
FIXED = ("model", "method", "fsdp", *LORA_OPTIONS)


@dataclass
class FinetuneConfig:
    model: Optional[str] = None  # None: the bundled SmolLM2; else any mlx-lm path or repo id
    data: Union[str, list, None] = None  # jsonl path or chat rows; None: the bundled mascot facts
    iters: int = 30  # the step to train to (a resumed run counts the steps it continues from)
    batch_size: int = 2  # per rank: the global batch is batch_size x ranks
    learning_rate: float = 2e-4
    num_layers: int = 8  # LoRA on the last num_layers blocks
    lora_rank: int = 8
    lora_scale: float = 20.0
    max_seq_length: int = 256
    mask_prompt: bool = True  # learn the answers only, not the system prompt and question
    seed: int = 0
    save_every: int = 10  # steps between checkpoints (also at the last step and on a stop)
    adapter_path: Optional[str] = None  # None: a new folder per run, adapters/run-YYYYmmdd-HHMMSS
    resume: Optional[str] = None  # a run folder: continue from its latest checkpoint
    method: str = "lora"  # "lora": adapters on a frozen model; "full": every weight is trained
    fsdp: bool = False  # with method="full": each rank holds 1/N of the weights, gradients, Adam state
    max_grad_norm: Optional[float] = None  # method="full": clip the gradients' global norm to this
    consolidate: Union[bool, str] = False  # method="full": at the end, a whole model folder (True: in the run's)


@dataclass
class FinetuneResult:
    """What a run did, as every rank saw it (``FinetuneRun.wait()`` gives rank 0's)."""

    history: list[dict]
    adapter_path: str  # the run's folder: adapters (LoRA) or the weights' checkpoints (full)
    stopped_at: Optional[int]
    seconds: float
    ranks: int
    global_batch: int
    resumed_from: Optional[int] = None  # the step of the checkpoint this run continued from
    saved: Optional[str] = None  # the last checkpoint's file (rank 0's)
    method: str = "lora"  # "lora" or "full"
    fsdp: bool = False  # full fine-tuning sharded over the ranks (else every rank held everything)
    peak_memory: list[int] = field(default_factory=list)  # bytes, per rank, the run's peak
    reduce_scatter: str = ""  # FSDP: which reduce-scatter ran (MLX's sum_scatter or mlx_nb's)
    model: Optional[str] = None  # the folder consolidate() wrote, where the run asked for one

    @property
    def losses(self) -> list[float]:
        return [h["train_loss"] for h in self.history]


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

    from .session import state

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
    if c.method == "full":
        from .full_finetune import FullRun

        run: Steps = FullRun(c, group, rows, state.backend)
    else:
        run = _Run(c, group, rows)
    stopped_at = None
    t0 = time.perf_counter()
    try:
        run.train()
    except _Stopped as s:
        stopped_at = s.args[0]
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
    return result


class Steps:
    """What a run does after each step, on every rank, whatever it trains: record the step, agree
    on stopping, checkpoint (``save``, the subclass's), report to the notebook."""

    reduce_scatter = ""

    def __init__(self, c: FinetuneConfig, group: Any):
        self.c, self.group = c, group
        self.rank, self.size = group.rank(), group.size()
        self.folder = Path(c.adapter_path) if c.adapter_path else None
        self.start, self.history, self.saved = 0, [], None
        self.tokens_before = 0  # tokens trained before this run resumed
        self.peaks: list[int] = []  # every rank's peak memory, as of the latest step

    def _agree(self) -> None:
        import mlx.core as mx

        mx.eval(mx.distributed.all_sum(mx.array(1), stream=mx.cpu, group=self.group))

    def save(self, step: int) -> Optional[str]:
        raise NotImplementedError

    def _restore(self, folder: Path) -> None:
        raise NotImplementedError

    def _begin(self, config_name: str, config: Callable[[], dict]) -> None:
        """Restore the checkpoint a resumed run continues; then, every rank having checked the
        folder (``prepare``), rank 0 writes the run's config into it."""
        if self.c.resume:
            self._restore(Path(self.c.resume))
        self._agree()
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            checkpoint.write_json(self.folder / config_name, config())

    def _restored(self, record: dict) -> None:
        self.start, self.history = record["step"], record["history"]
        self.tokens_before = self.history[-1]["trained_tokens"] if self.history else 0

    def options(self) -> dict:
        """The options a resumed run takes up again (list data: only its length)."""
        options = {k: v for k, v in asdict(self.c).items() if k not in ("adapter_path", "resume")}
        if isinstance(self.c.data, list):
            options["data"] = {"rows": len(self.c.data)}  # not copied: resuming asks for them again
        return options

    def _poll(self) -> tuple[bool, list[int]]:
        """(did the notebook ask any rank to stop, every rank's peak memory): one all_gather."""
        import mlx.core as mx

        from .session import memory, stop_requested

        mine = mx.array([[int(stop_requested()), memory()[1]]], dtype=mx.int64)
        every = mx.distributed.all_gather(mine, stream=mx.cpu, group=self.group).tolist()
        return any(stop for stop, _ in every), [peak for _, peak in every]

    def on_step(self, step: int, **measured: Any) -> None:
        """After step ``step`` (on every rank): record it, agree on stopping, checkpoint, report.

        ``measured``: train_loss, tokens_per_second, trained_tokens (this run's), and anything else
        the method measures (grad_norm)."""
        from .session import report

        stop, self.peaks = self._poll()
        row = {
            "iteration": step,
            **measured,
            "trained_tokens": measured["trained_tokens"] + self.tokens_before,
            "peak_memory": self.peaks,
        }
        self.history.append(row)
        if stop or step % self.c.save_every == 0 or step == self.c.iters:
            self.save(step)
            if self.rank == 0:
                row = {**row, "saved": self.saved}
        if self.rank == 0:
            report(**row, iters=self.c.iters)
        if stop and step < self.c.iters:
            raise _Stopped(step)


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


def global_mean_loss(group: Any):
    """The mean over the *global* batch's tokens, so 1 rank x 4 rows and 2 ranks x 2 rows train
    identically (mlx-lm's default averages per rank)."""
    import mlx.core as mx
    from mlx.nn import losses as nn_losses

    size = group.size()

    def loss(model, batch, lengths):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
        ce = (nn_losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum()
        ntoks = mask.sum()
        total = mx.stop_gradient(mx.distributed.all_sum(ntoks, group=group))
        return ce * size / total, ntoks

    return loss


def batches_from(skip: int):
    """mlx-lm's batches from the ``skip``-th on (a resumed run takes the batches the whole run
    would have), cut to their longest row."""
    from mlx_lm.tuner.trainer import iterate_batches

    def batches(**kwargs):
        for n, (batch, lengths) in enumerate(iterate_batches(**kwargs)):
            if n < skip:
                continue
            # mlx-lm pads every batch to a multiple of 32 tokens plus one; beyond the one target
            # after each row that its loss mask takes in, padding only costs time: cut it
            yield batch[:, : int(lengths[:, 1].max()) + 1], lengths

    return batches
