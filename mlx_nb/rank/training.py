"""What every fine-tuning method shares, on the rank: the options, the result, what a run does
after each step (record it, agree on stopping, checkpoint, report), its loss and its batches.

LoRA (:mod:`mlx_nb.rank.finetune`) and full fine-tuning (:mod:`mlx_nb.rank.full_finetune`) are
each a :class:`Steps`; ``finetune.train_on_rank`` chooses one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

from . import checkpoint

LORA_OPTIONS = ("num_layers", "lora_rank", "lora_scale")


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


class StoppedAt(Exception):
    """The ranks agreed to stop after ``step`` (its checkpoint is saved)."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


@dataclass(frozen=True)
class TrainStep:
    """Rank 0's report after each step: the step's numbers (averaged over the ranks; the peak
    memory per rank), the step the run trains to, and the checkpoint written at it, if any."""

    iteration: int
    train_loss: float
    tokens_per_second: float
    trained_tokens: int  # from the run's first step (a resumed run counts the steps before)
    peak_memory: list[int]  # bytes, per rank, as of this step
    iters: int
    grad_norm: Optional[float] = None  # full fine-tuning: the gradients' global norm, before clipping
    saved: Optional[str] = None  # the checkpoint written after this step (rank 0's file)

    def row(self) -> dict:
        """The step as a run's history keeps it (``FinetuneResult.history``, the checkpoints)."""
        row = {"iteration": self.iteration, "train_loss": self.train_loss}
        row |= {"tokens_per_second": self.tokens_per_second, "trained_tokens": self.trained_tokens}
        if self.grad_norm is not None:
            row["grad_norm"] = self.grad_norm
        return {**row, "peak_memory": self.peak_memory}


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
        """(did the notebook ask any rank to stop, every rank's peak memory): one collective."""
        from .memory import in_use
        from .session import stop_agreed, stop_requested, vote_to_stop

        votes = vote_to_stop(self.group, stop_requested(), share=in_use()[1])
        return stop_agreed(votes), votes[1:].tolist()

    def on_step(
        self,
        step: int,
        train_loss: float,
        tokens_per_second: float,
        trained_tokens: int,
        grad_norm: Optional[float] = None,
    ) -> None:
        """After step ``step`` (on every rank): record it, agree on stopping, checkpoint, report.

        ``trained_tokens``: this run's; ``grad_norm``: where the method measures it (full)."""
        from .session import report

        stop, self.peaks = self._poll()
        done = TrainStep(
            step,
            train_loss,
            tokens_per_second,
            trained_tokens + self.tokens_before,
            self.peaks,
            self.c.iters,
            grad_norm,
        )
        self.history.append(done.row())
        if stop or step % self.c.save_every == 0 or step == self.c.iters:
            self.save(step)
            if self.rank == 0:
                done = replace(done, saved=self.saved)
        if self.rank == 0:
            report(done)
        if stop and step < self.c.iters:
            raise StoppedAt(step)


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
