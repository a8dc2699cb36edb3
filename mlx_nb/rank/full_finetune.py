"""Full fine-tuning, the rank half: every weight trained, data-parallel or fully sharded (FSDP).

Data-parallel (``fsdp=False``): every rank holds the whole model, its gradients and Adam's two
moments, and gradients are averaged over the ranks (``nn.average_gradients``); rank 0 writes the
checkpoints. FSDP (``fsdp=True``): each rank holds 1/N of every weight, of its gradient and of
Adam's state (:mod:`mlx_nb.rank.fsdp`), a block's weights are gathered whole only while it runs,
and each rank writes its own shard of the checkpoints. The model is loaded lazily and sharded
block by block, so no rank ever holds the whole model. Both read the same batches as LoRA
(``batches_from``), with the same loss (the mean over the global batch's tokens), so one rank
with a batch of 2 and two ranks with a batch of 1 each train alike.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any

from . import checkpoint
from .training import LORA_OPTIONS, FinetuneConfig, Steps, batches_from, global_mean_loss


class FullRun(Steps):
    """One rank's share of a full fine-tuning run: the model (or its shard), Adam, the checkpoints."""

    def __init__(self, c: FinetuneConfig, group: Any, rows: list[dict], backend: str):
        import mlx.core as mx
        import mlx.optimizers as optim

        from .fsdp import plain_names, reduce_scatter_name, shard_model

        super().__init__(c, group)
        if self.folder is None:
            raise ValueError("full fine-tuning writes a checkpoint on every rank: pass adapter_path= (a folder)")
        self.rows, self.fsdp = rows, c.fsdp and self.size > 1
        self.reduce_scatter = reduce_scatter_name(backend, self.size) if c.fsdp else ""
        model, self.tokenizer = full_model(c)
        if self.fsdp:
            # a resumed run's weights come from its checkpoint: the base's are never read
            model = shard_model(model, group, backend, evaluate=not c.resume)
        elif not c.resume:
            mx.eval(model.parameters())
        self.model, self.plain = model, plain_names(model)
        self.optimizer = optim.Adam(learning_rate=c.learning_rate)
        self._begin(
            checkpoint.FULL_CONFIG, lambda: {"fine_tune_type": "full", "base": _base(c), "mlx_nb": self.options()}
        )

    def options(self) -> dict:
        return {k: v for k, v in super().options().items() if k not in LORA_OPTIONS}

    def _restore(self, folder: Path) -> None:
        """This rank's shard of the weights and of Adam's state, the step and the loss history."""
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_unflatten

        record = checkpoint.latest(folder)
        shards = record.get("shards") if record else None
        if shards not in (1, self.size if self.fsdp else 1):
            raise ValueError(
                f"the checkpoint in {folder} is sharded over {shards} ranks and this run has {self.size}: "
                f"resume it on {shards} ranks, or consolidate it and fine-tune the consolidated model"
            )
        record, weights, optimizer = checkpoint.load_shard(folder, self.rank if shards > 1 else 0)
        names = {self.plain(k): k for k, _ in tree_flatten(self.model.parameters())}
        if set(weights) != set(names):
            raise ValueError(f"the checkpoint in {folder} does not hold this model's weights (model={self.c.model!r})")
        self.model.load_weights([(names[k], w) for k, w in weights.items()])
        self.optimizer.state = tree_unflatten(list(optimizer.items()))
        self.optimizer.learning_rate = self.c.learning_rate
        mx.eval(self.model.parameters(), self.optimizer.state)
        self._restored(record)

    def save(self, step: int) -> str:
        """Each rank writes its shard (data-parallel: rank 0 the whole); rank 0 then names it complete."""
        from mlx.utils import tree_flatten

        shards = self.size if self.fsdp else 1
        if self.rank < shards:
            weights = {self.plain(k): w for k, w in tree_flatten(self.model.parameters())}
            optimizer = dict(tree_flatten(self.optimizer.state))
            written = checkpoint.save_shard(self.folder, step, self.rank, shards, weights, optimizer)
            self.saved = str(written) if self.rank == 0 else None
        self._agree()  # every shard is on disk
        if self.rank == 0:
            checkpoint.commit_shards(self.folder, step, shards, self.history)
        return self.saved

    def train(self) -> None:
        import mlx.core as mx
        import mlx.nn as nn
        import numpy as np
        from mlx_lm.tuner.datasets import CacheDataset, ChatDataset

        c = self.c
        np.random.seed(c.seed)  # iterate_batches shuffles with numpy: the same order on every rank
        dataset = CacheDataset(ChatDataset(self.rows, self.tokenizer, mask_prompt=c.mask_prompt))
        batches = batches_from(self.start)(
            dataset=dataset,
            batch_size=c.batch_size * self.size,
            max_seq_length=c.max_seq_length,
            loop=True,
            comm_group=self.group,
        )
        loss_and_grad = nn.value_and_grad(self.model, global_mean_loss(self.group))
        self.model.train()
        trained = 0
        quiet = io.StringIO()  # mlx-lm's warnings about long rows: the notebook shows its own
        for step in range(self.start + 1, c.iters + 1):
            with contextlib.redirect_stdout(quiet):
                batch, lengths = next(batches)
            tic = time.perf_counter()
            (loss, tokens), grads = loss_and_grad(self.model, batch, lengths)
            grads, norm = self._clipped(grads)
            self.optimizer.update(self.model, grads)
            mx.eval(self.model.parameters(), self.optimizer.state, loss, tokens, norm)
            del grads  # not held through the next step: that would be another copy of the (sharded) weights
            seconds = time.perf_counter() - tic
            both = mx.distributed.all_sum(mx.stack([loss, tokens.astype(loss.dtype)]), stream=mx.cpu, group=self.group)
            loss_sum, step_tokens = both.tolist()
            trained += int(step_tokens)
            self.on_step(
                step,
                train_loss=loss_sum / self.size,
                tokens_per_second=step_tokens / seconds,
                trained_tokens=trained,
                grad_norm=norm.item(),
            )

    def _clipped(self, grads: Any) -> tuple[Any, Any]:
        """The gradients averaged over the ranks, clipped to ``max_grad_norm`` (if set), and their
        global norm: FSDP's are each rank's shard, already averaged, their norm summed over shards."""
        import mlx.nn as nn
        import mlx.optimizers as optim
        from mlx.nn.utils import clip_grad_norm_sharded

        limit = self.c.max_grad_norm or float("inf")
        if self.fsdp:
            return clip_grad_norm_sharded(grads, limit, group=self.group)
        if self.size > 1:
            grads = nn.average_gradients(grads, group=self.group)
        return optim.clip_grad_norm(grads, limit)


def full_model(c: FinetuneConfig):
    """The model, lazily loaded (no weight is read until it is evaluated), every weight trainable;
    a quantized model dequantized (float32 where an optimized BLAS runs it, else bfloat16)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    from ..models import dense_here, resolve

    model, tokenizer = load(resolve(c.model), lazy=True)
    if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        model = dequantize_model(model)
        model.set_dtype(mx.float32 if dense_here() else mx.bfloat16)
    model.unfreeze()
    return model, tokenizer


def _base(c: FinetuneConfig) -> str:
    """The model the run started from, as a folder where it is one (consolidate copies its files)."""
    from ..models import resolve

    base = resolve(c.model)
    return str(Path(base).resolve()) if Path(base).exists() else base
