"""Fine-tuning checkpoints: one folder per run, in mlx-lm's adapter format, written atomically.

A run folder holds what ``mlx_lm.load(model, adapter_path=folder)`` and
``mlx_nb.generate.load_model(cluster, adapter_path=folder)`` read, and what resuming needs::

    adapter_config.json              mlx-lm's adapter config, plus the run's options ("mlx_nb")
    adapters.safetensors             the LoRA weights of the latest checkpoint
    0000010_adapters.safetensors     the LoRA weights at step 10 (mlx-lm's naming), one per checkpoint
    0000010_optimizer.safetensors    the optimizer state at step 10 (the latest checkpoint's only)
    checkpoint.json                  the latest checkpoint: its step, files and loss history

A full fine-tuning run (``method="full"``) keeps its weights instead, one file per shard::

    run_config.json                          the run's options ("mlx_nb") and its base model
    0000010_weights-0-of-2.safetensors       rank 0's shard of every weight at step 10 (FSDP: 1/2 of
                                             each along axis 0; data-parallel: one shard, whole)
    0000010_optimizer-0-of-2.safetensors     rank 0's shard of Adam's state at step 10
    checkpoint.json                          the latest checkpoint: step, shards, loss history

Only the latest full checkpoint is kept (each is the size of the model, three times over).
``mlx_nb.finetune.consolidate`` joins the shards into a model folder.

Every file is written under a hidden temporary name in the folder, flushed to disk and
renamed over the old one, so a reader (or a run stopped mid-write) never sees a partial
file. ``checkpoint.json`` is written last (for shards: once every rank has written its own):
a checkpoint it names is complete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

CONFIG = "adapter_config.json"
FULL_CONFIG = "run_config.json"
ADAPTERS = "adapters.safetensors"
STATE = "checkpoint.json"


def new_run_dir(root: str | Path = "adapters") -> Path:
    """A new, empty folder for a run: ``root/run-YYYYmmdd-HHMMSS`` (absolute; ``-2``... added
    when that is taken, so two runs never share one).

    Example:
        >>> new_run_dir().name  # doctest: +SKIP
        'run-20250101-120000'
    """
    base = Path(root).resolve() / time.strftime("run-%Y%m%d-%H%M%S")
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{base} and 998 more like it exist: pass adapter_path= to choose a folder")


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(temporary)``, then rename the temporary file over ``path``.

    The temporary file sits next to ``path`` (a rename within a folder is atomic) and
    keeps its suffix (``mx.save_safetensors`` adds ``.safetensors`` to names without
    it). If ``write`` fails, ``path`` is left as it was and the temporary file removed.

    Example:
        >>> atomic_write(Path("a.json"), lambda tmp: tmp.write_text("{}"))  # doctest: +SKIP
    """
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # on disk before it gets the name: a crash leaves old or new
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _sync_dir(path.parent)
    return path


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> Path:
    """``data`` as indented JSON at ``path``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2)))


def save_arrays(path: Path, arrays: dict) -> Path:
    """A flat ``{name: mx.array}`` as a safetensors file at ``path``, atomically."""
    import mlx.core as mx

    return atomic_write(path, lambda tmp: mx.save_safetensors(str(tmp), arrays))


def save(folder: Path, step: int, adapters: dict, optimizer: dict, history: list[dict]) -> Path:
    """Write the checkpoint of ``step``; return its adapter file.

    ``adapters`` and ``optimizer`` are flat (``tree_flatten``). The previous checkpoint's
    optimizer state is removed once this one is complete; its adapters stay.
    """
    previous = latest(folder)
    name = f"{step:07d}_adapters.safetensors"
    optimizer_name = f"{step:07d}_optimizer.safetensors"
    save_arrays(folder / name, adapters)
    save_arrays(folder / optimizer_name, optimizer)
    save_arrays(folder / ADAPTERS, adapters)
    state = {"step": step, "adapters": name, "optimizer": optimizer_name, "history": history, "time": time.time()}
    write_json(folder / STATE, state)
    if previous and previous["optimizer"] != optimizer_name:
        (folder / previous["optimizer"]).unlink(missing_ok=True)
    return folder / name


def latest(folder: Path) -> Optional[dict]:
    """The latest checkpoint's record (``checkpoint.json``), or None if the folder has none."""
    path = Path(folder) / STATE
    return json.loads(path.read_text()) if path.exists() else None


def load(folder: Path) -> tuple[dict, dict, dict]:
    """The latest checkpoint in ``folder``: its record, adapter weights and optimizer state (flat)."""
    import mlx.core as mx

    record = latest(folder)
    if record is None:
        raise FileNotFoundError(
            f"{folder} holds no checkpoint ({STATE} is missing): resume takes the "
            "folder of an earlier finetune run (it prints it when it starts)"
        )
    return record, mx.load(str(Path(folder) / record["adapters"])), mx.load(str(Path(folder) / record["optimizer"]))


def read_config(folder: Path) -> dict:
    """The run's ``adapter_config.json`` (LoRA) or ``run_config.json`` (full fine-tuning)."""
    path = Path(folder) / CONFIG
    if not path.exists() and (Path(folder) / FULL_CONFIG).exists():
        path = Path(folder) / FULL_CONFIG
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: resume and adapter_path take a folder that "
            "finetune wrote (it holds adapter_config.json and adapters.safetensors, "
            f"or {FULL_CONFIG} and the weights' shards for method='full')"
        )
    return json.loads(path.read_text())


def shard_files(step: int, rank: int, shards: int) -> tuple[str, str]:
    """The names of a full checkpoint's weights and optimizer files for one shard.

    Example:
        >>> shard_files(10, 0, 2)
        ('0000010_weights-0-of-2.safetensors', '0000010_optimizer-0-of-2.safetensors')
    """
    tail = f"-{rank}-of-{shards}.safetensors"
    return f"{step:07d}_weights{tail}", f"{step:07d}_optimizer{tail}"


def save_shard(folder: Path, step: int, rank: int, shards: int, weights: dict, optimizer: dict) -> Path:
    """Write one rank's shard of the checkpoint of ``step`` (flat dicts); return its weights file."""
    names = shard_files(step, rank, shards)
    save_arrays(folder / names[1], optimizer)
    return save_arrays(folder / names[0], weights)


def commit_shards(folder: Path, step: int, shards: int, history: list[dict]) -> None:
    """Name the checkpoint of ``step`` complete (once every shard is written), then remove the
    previous checkpoint's shards."""
    previous = latest(folder)
    files = [name for rank in range(shards) for name in shard_files(step, rank, shards)]
    write_json(
        folder / STATE, {"step": step, "shards": shards, "files": files, "history": history, "time": time.time()}
    )
    if previous and previous["step"] != step:
        for name in previous.get("files", []):
            (folder / name).unlink(missing_ok=True)


def load_shard(folder: Path, rank: int) -> tuple[dict, dict, dict]:
    """The latest full checkpoint in ``folder``: its record and ``rank``'s weights and optimizer
    state (flat)."""
    import mlx.core as mx

    record = latest(folder)
    if record is None or "shards" not in record:
        raise FileNotFoundError(f"{folder} holds no checkpoint of full fine-tuning ({STATE} names no shards)")
    weights, optimizer = shard_files(record["step"], rank, record["shards"])
    return record, mx.load(str(Path(folder) / weights)), mx.load(str(Path(folder) / optimizer))
