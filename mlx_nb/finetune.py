"""Fine-tuning on the cluster: data-parallel LoRA on mlx-lm's own tuner, or full fine-tuning,
data-parallel or fully sharded (FSDP).

Each rank reads its own slice of every global batch (``mlx_lm.tuner.trainer.iterate_batches``).
LoRA: every rank holds the whole model with LoRA layers, gradients averaged by the trainer.
``method="full"``: every weight is trained; with ``fsdp=True`` each rank holds 1/N of every
weight, gradient and Adam moment (:mod:`mlx_nb.rank.fsdp`). The notebook sees the loss, tokens/s
and every rank's peak memory of every step live, and can stop training on all ranks at the same
step. Checkpoints are written every ``save_every`` steps, at the end and when stopped, into a new
folder per run; ``resume=`` continues one; :func:`consolidate` makes a full run's shards one model.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Union

from .display import figure_png, human_bytes
from .rank import checkpoint
from .rank.finetune import load_rows, prepare, train_on_rank
from .rank.training import FinetuneConfig, FinetuneResult, TrainStep

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "FinetuneRun",
    "consolidate",
    "finetune",
    "load_rows",
    "loss_figure",
]
CONSOLIDATED = "mlx_nb_consolidated.json"  # in a consolidated folder: the run and step it joined


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
        self.per_rank: list[FinetuneResult] = []  # each rank's own account of the run, once it ended
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

    def _on_report(self, rank: int, step: TrainStep) -> None:
        import matplotlib.pyplot as plt

        self.history.append(asdict(step))  # a row as loss_figure and FinetuneResult.history hold them
        if self.stopping:
            # a stop asked for before the ranks began was cleared when the job started: again
            self.cluster.request_stop()
        fig = loss_figure(self.history, self.config.iters, _title(self.config))
        self.image.value = figure_png(fig)
        plt.close(fig)
        if step.saved:
            self.saved = f"; checkpoint of step {step.iteration} saved"
        peaks = ", ".join(human_bytes(p) for p in step.peak_memory)
        self.label.value = (
            f"training on {self.cluster.n} ranks: step {step.iteration}/{self.config.iters}{self.saved}"
            f"<br>peak memory per rank: {peaks}"
        )

    def _run(self) -> None:
        from .models import BUNDLED_NAMES, prepare_bundled

        try:
            if self.config.model is None or self.config.model.lower() in BUNDLED_NAMES:
                prepare_bundled(self.cluster.ranks)  # converted once here, not by every rank at once
            self.per_rank = self.cluster.call(
                train_on_rank, asdict(self.config), on_report=self._on_report, what="fine-tuning"
            )
            r = self.result = self.per_rank[0]
            how = f"stopped at step {r.stopped_at}" if r.stopped_at else "done"
            steps = len(r.history) - (r.resumed_from or 0)
            held = "adapters" if r.method == "lora" else "checkpoints"
            peaks = ", ".join(human_bytes(p) for p in r.peak_memory)
            self.label.value = (
                f"{how}: {steps} steps in {r.seconds:.1f} s; {held} in {r.adapter_path}"
                f"<br>peak memory per rank: {peaks}"
            )
            if self.config.consolidate:
                self._consolidate(r)
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
            if self.result is None:  # (a failed consolidation said so already)
                self.label.value = f"<span style='color:#b00'>training failed: {e}{kept}</span>"
        finally:
            self.stop_button.disabled = True
            self._done.set()

    def _consolidate(self, r: FinetuneResult) -> None:
        """The run's last checkpoint joined into one model folder (``consolidate=``), in ``r.model``."""
        done = self.label.value
        self.label.value = f"{done}<br>consolidating the shards into one model folder..."
        out = self.config.consolidate if isinstance(self.config.consolidate, str) else None
        try:
            r.model = consolidate(r.adapter_path, out)
        except Exception as e:
            self.label.value = f"{done}<br><span style='color:#b00'>consolidating failed: {e}</span>"
            raise
        self.label.value = f"{done}<br>model: {r.model}"

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
    """Fine-tune a model over the cluster's ranks, in the background: LoRA (the default) or
    ``method="full"``, data-parallel or, with ``fsdp=True``, sharded over the ranks.

    Options are those of :class:`FinetuneConfig`. Returns a :class:`FinetuneRun`
    that shows a live loss curve, every rank's peak memory and a stop button; ``.wait()``
    gives the result. Checkpoints go to a new folder per run, printed, or to
    ``adapter_path``: every ``save_every`` steps, at the end, and on Stop, an interrupt
    or ``cluster.request_stop()``. LoRA writes mlx-lm's adapter format; full fine-tuning
    each rank's shard of the weights and of Adam's state (:func:`consolidate` joins them,
    ``consolidate=True`` at the end). ``resume=folder`` continues a run from its latest
    checkpoint: weights, optimizer state, step count, data order and loss curve.

    Example::

        from mlx_nb.finetune import finetune
        run = finetune(cluster, iters=30, batch_size=2, save_every=5)
        run
        # later, or after a stop: on to step 60 from the last checkpoint
        run = finetune(cluster, resume=run.wait().adapter_path, iters=60)
        # every weight, each rank holding half of them on 2 ranks
        run = finetune(cluster, method="full", fsdp=True, iters=10, consolidate=True)
    """
    config = prepare(dict(options), choose_folder=False)  # checked before a folder is made
    if config.method == "full":
        _check_full(cluster, config)
    config = prepare(options)
    if config.resume:
        step = checkpoint.latest(config.resume)["step"]
        print(f"resuming {config.resume} at step {step} of {config.iters}; checkpoints go to {config.adapter_path}")
    else:
        print(f"checkpoints go to {config.adapter_path} (every {config.save_every} steps, at the end, and on a stop)")
    return FinetuneRun(cluster, config)


def _title(c: FinetuneConfig) -> str:
    if c.method == "lora":
        return "LoRA fine-tuning"
    return "full fine-tuning, FSDP" if c.fsdp else "full fine-tuning, data-parallel"


def _check_full(cluster, c: FinetuneConfig) -> None:
    """Before any rank runs: FSDP can shard the model over the ranks, a sharded checkpoint is
    resumed on as many ranks as wrote it; and what runs is said (the reduce-scatter, the memory)."""
    from .models import BUNDLED_NAMES, prefers_dense, prepare_bundled, resolve
    from .rank.fsdp import reduce_scatter_name
    from .rank.memory import budget
    from .train_plan import check_fits, check_shardable, estimate, model_parameters

    record = checkpoint.latest(c.resume) if c.resume else None
    if record and record.get("shards", 1) > 1 and record["shards"] != cluster.n:
        raise ValueError(
            f"the run in {c.resume} is sharded over {record['shards']} ranks and this cluster has {cluster.n}: "
            f"resume it on {record['shards']} ranks, or consolidate(...) it and fine-tune the consolidated model"
        )
    bundled = c.model is None or c.model.lower() in BUNDLED_NAMES
    path = Path(prepare_bundled(cluster.ranks) if bundled else resolve(c.model))
    if not (path / "config.json").exists():
        return  # a repo id: the ranks fetch it, and MLX's own check names a parameter that does not divide
    config = json.loads((path / "config.json").read_text())
    name = "the bundled SmolLM2" if bundled else path.name
    if c.fsdp and cluster.n > 1:
        check_shardable(model_parameters({**config.get("text_config", {}), **config}).shapes, cluster.n, name)
    dense = bool(cluster.ranks) and all(prefers_dense(r.device, r.blas) for r in cluster.ranks)
    memory = estimate(path, cluster.n, c.fsdp, c.batch_size, c.max_seq_length, dense)
    budgets = [b.bytes for b in cluster.call(budget, what="the memory budgets")]
    check_fits(memory, budgets, f"{_title(c)} of {name}")  # before any rank loads a weight
    if not c.fsdp:
        how = "every rank holds the whole model"
    elif cluster.n == 1:
        how = "one rank: FSDP has nothing to shard"
    else:
        how = f"{cluster.n} shards, gradients reduce-scattered by {reduce_scatter_name(cluster.backend, cluster.n)}"
    print(f"{_title(c)} of {name}: {how}; estimated {memory}")


def consolidate(run_folder: Union[str, Path], out: Union[str, Path, None] = None) -> str:
    """Join the latest checkpoint of a full fine-tuning run (every rank's shard) into one model
    folder in mlx-lm's format, which ``mlx_lm.load`` and ``load_model`` read; return its path.

    ``out`` defaults to ``model-<step>`` in the run's folder. The folder is written under a
    temporary name and renamed into place; consolidating the same step again returns it as is.

    Example::

        path = consolidate(run.wait().adapter_path)
        load_model(cluster, path, pipeline=True)
    """
    from .models import atomic_folder

    folder = Path(run_folder).resolve()
    config = checkpoint.read_config(folder)
    if config.get("fine_tune_type") != "full":
        raise ValueError(
            f"{folder} holds LoRA adapters: load_model(cluster, adapter_path={str(folder)!r}) fuses them "
            "into the model; consolidate joins the shards of a method='full' run"
        )
    record = checkpoint.latest(folder)
    if record is None or "shards" not in record:
        raise ValueError(f"{folder} holds no checkpoint yet (the run ended before its first save)")
    target = Path(out).resolve() if out else folder / f"model-{record['step']:07d}"
    made = {"run": str(folder), "step": record["step"]}
    if target.exists() and any(target.iterdir()):
        marker = target / CONSOLIDATED
        if marker.exists() and json.loads(marker.read_text()) == made:
            return str(target)
        raise ValueError(f"{target} already exists and holds something else: pass another out=, or remove it")
    if target.exists():
        target.rmdir()
    atomic_folder(target, lambda tmp: _join_shards(folder, record, config["base"], tmp, made))
    return str(target)


def _join_shards(folder: Path, record: dict, base: str, out: Path, made: dict) -> None:
    """Write the whole weights of ``record``'s checkpoint into ``out`` (mlx-lm's file layout),
    with the base model's config (not quantized) and tokenizer."""
    import mlx.core as mx
    from mlx_lm.utils import make_shards, save_config

    from .models import copy_model_files

    files = [name for name in record["files"] if "_weights-" in name]
    shards = [mx.load(str(folder / name)) for name in files]
    weights = {name: mx.concatenate([s[name] for s in shards], axis=0) for name in shards[0]}
    parts = make_shards(weights)
    index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())}, "weight_map": {}}
    del weights
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" if len(parts) > 1 else "model.safetensors"
        mx.save_safetensors(str(out / name), part, metadata={"format": "mlx"})
        index["weight_map"].update(dict.fromkeys(part, name))
        parts[i] = None  # written: its arrays may go
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    base_folder = _model_folder(base)
    config = json.loads((base_folder / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)  # trained dequantized
    save_config(config, out / "config.json")
    copy_model_files(base_folder, out)
    (out / CONSOLIDATED).write_text(json.dumps(made))


def _model_folder(model: str) -> Path:
    """A model's folder: the path itself, or (a repo id) its files besides the weights, fetched."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]))
