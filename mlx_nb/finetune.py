"""Data-parallel LoRA fine-tuning on the cluster, built on mlx-lm's own tuner.

Every rank holds the whole model with LoRA layers; each reads its own slice of
every global batch (``mlx_lm.tuner.trainer.iterate_batches``), and gradients
are averaged by the trainer (``mlx.nn.average_gradients``). The notebook sees
the loss and tokens/s of every step live, and can stop training on all ranks
at the same step. Rank 0 checkpoints the adapters every ``save_every`` steps, at
the end and when stopped, into a new folder per run; ``resume=`` continues one.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any, Optional

from .display import figure_png
from .rank import checkpoint
from .rank.finetune import FinetuneConfig, load_rows, prepare, train_on_rank

__all__ = ["FinetuneConfig", "FinetuneResult", "FinetuneRun", "finetune", "load_rows", "loss_figure"]


@dataclass
class FinetuneResult:
    history: list[dict]
    adapter_path: str
    stopped_at: Optional[int]
    seconds: float
    ranks: int
    global_batch: int
    resumed_from: Optional[int] = None  # the step of the checkpoint this run continued from
    saved: Optional[str] = None  # the last checkpoint's adapter file

    @property
    def losses(self) -> list[float]:
        return [h["train_loss"] for h in self.history]


def loss_figure(history: list[dict], iters: int, title: str = "LoRA fine-tuning"):
    """Loss per step and tokens/s, rank 0's view of the averaged numbers."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3))
    steps = [h["iteration"] for h in history]
    ax.plot(steps, [h["train_loss"] for h in history], marker=".", color="#4c72b0")
    ax.set_xlim(0, max(iters, 1))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="#4c72b0")
    speed = ax.twinx()
    speed.plot(steps, [h["tokens_per_second"] for h in history], marker=".", color="#999999", linewidth=1)
    speed.set_ylabel("tokens/s", color="#777777")
    speed.set_ylim(bottom=0)
    if history:
        last = history[-1]
        title += (
            f" | step {last['iteration']}/{iters}, loss {last['train_loss']:.3f}, {last['tokens_per_second']:.0f} tok/s"
        )
    ax.set_title(title, fontsize="small")
    fig.tight_layout()
    return fig


class FinetuneRun:
    """A training run in the background: a live loss curve, a stop button, ``wait()``.

    Example::

        run = mlx_nb.finetune.finetune(cluster, iters=30)   # shows the live panel
        result = run.wait()                                   # FinetuneResult
    """

    def __init__(self, cluster, config: FinetuneConfig):
        import ipywidgets as widgets

        self.cluster, self.config = cluster, config
        # a resumed run's curve starts with the steps it continues from
        record = checkpoint.latest(config.resume) if config.resume else None
        self.history: list[dict] = list(record["history"]) if record else []
        self.per_rank: list[dict] = []  # each rank's own account of the run, once it ended
        self.result: Optional[FinetuneResult] = None
        self.error: Optional[BaseException] = None
        self.saved = ""
        self.stopping = False
        self.image = widgets.Image(format="png")
        self.label = widgets.HTML("starting: loading the model on every rank...")
        self.stop_button = widgets.Button(description="Stop", button_style="warning")
        self.stop_button.on_click(lambda _: self.stop())
        self.panel = widgets.VBox([self.label, self.image, self.stop_button])
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlx_nb-finetune", daemon=True)
        self._thread.start()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.panel)

    def _on_report(self, rank: int, row: dict) -> None:
        import matplotlib.pyplot as plt

        self.history.append(row)
        if self.stopping:
            # a stop asked for before the ranks began was cleared when the job started: again
            self.cluster.request_stop()
        fig = loss_figure(self.history, self.config.iters)
        self.image.value = figure_png(fig)
        plt.close(fig)
        if row.get("saved"):
            self.saved = f"; checkpoint of step {row['iteration']} saved"
        self.label.value = (
            f"training on {self.cluster.n} ranks: step {row['iteration']}/{self.config.iters}{self.saved}"
        )

    def _run(self) -> None:
        from .models import BUNDLED_NAMES, prepare_bundled

        try:
            if self.config.model is None or self.config.model.lower() in BUNDLED_NAMES:
                prepare_bundled(self.cluster.ranks)  # converted once here, not by every rank at once
            self.per_rank = self.cluster.call(
                train_on_rank, asdict(self.config), on_report=self._on_report, what="fine-tuning"
            )
            r = self.per_rank[0]
            self.result = FinetuneResult(
                r["history"],
                r["adapter_path"],
                r["stopped_at"],
                r["seconds"],
                r["ranks"],
                r["global_batch"],
                r["resumed_from"],
                r["saved"],
            )
            how = f"stopped at step {r['stopped_at']}" if r["stopped_at"] else "done"
            steps = len(r["history"]) - (r["resumed_from"] or 0)
            self.label.value = f"{how}: {steps} steps in {r['seconds']:.1f} s; adapters in {r['adapter_path']}"
        except BaseException as e:
            self.error = e
            record = checkpoint.latest(self.config.adapter_path) if self.config.adapter_path else None
            kept = (
                (
                    f"; the checkpoint of step {record['step']} is kept: finetune(cluster, "
                    f"resume={self.config.adapter_path!r}) continues from it"
                )
                if record
                else ""
            )
            self.label.value = f"<span style='color:#b00'>training failed: {e}{kept}</span>"
        finally:
            self.stop_button.disabled = True
            self._done.set()

    def stop(self) -> None:
        """End training on every rank at the same step; rank 0 saves a checkpoint of it first."""
        self.stopping = True
        self.cluster.request_stop()

    def wait(self, timeout: Optional[float] = None) -> FinetuneResult:
        """Block until training ends; an interrupt stops it cleanly first (and it saves)."""
        # an Event, not Thread.join: an interrupted join (Python 3.11) marks the thread as ended
        try:
            self._done.wait(timeout)
        except KeyboardInterrupt:
            self.stop()
            self._done.wait()
        if self.error is not None:
            raise self.error
        return self.result


def finetune(cluster, **options: Any) -> FinetuneRun:
    """LoRA-fine-tune a model data-parallel over the cluster's ranks, in the background.

    Options are those of :class:`FinetuneConfig`. Returns a :class:`FinetuneRun`
    that shows a live loss curve and a stop button; ``.wait()`` gives the result.
    Checkpoints (mlx-lm's adapter format) go to a new folder per run, printed, or to
    ``adapter_path``: every ``save_every`` steps, at the end, and on Stop, an interrupt
    or ``cluster.request_stop()``. ``resume=folder`` continues a run from its latest
    checkpoint: LoRA weights, optimizer state, step count, data order and loss curve.

    Example::

        from mlx_nb.finetune import finetune
        run = finetune(cluster, iters=30, batch_size=2, save_every=5)
        run
        # later, or after a stop: on to step 60 from the last checkpoint
        run = finetune(cluster, resume=run.wait().adapter_path, iters=60)
    """
    config = prepare(options)
    if config.resume:
        step = checkpoint.latest(config.resume)["step"]
        print(f"resuming {config.resume} at step {step} of {config.iters}; checkpoints go to {config.adapter_path}")
    else:
        print(f"checkpoints go to {config.adapter_path} (every {config.save_every} steps, at the end, and on a stop)")
    return FinetuneRun(cluster, config)
