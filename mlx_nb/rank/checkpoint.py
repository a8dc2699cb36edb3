"""Fine-tuning checkpoints: one folder per run, in mlx-lm's adapter format, written atomically.

A run folder holds what ``mlx_lm.load(model, adapter_path=folder)`` and
``mlx_nb.generate.load_model(cluster, adapter_path=folder)`` read, and what resuming needs::

    adapter_config.json              mlx-lm's adapter config, plus the run's options ("mlx_nb")
    adapters.safetensors             the LoRA weights of the latest checkpoint
    0000010_adapters.safetensors     the LoRA weights at step 10 (mlx-lm's naming), one per checkpoint
    0000010_optimizer.safetensors    the optimizer state at step 10 (the latest checkpoint's only)
    checkpoint.json                  the latest checkpoint: its step, files and loss history

Every file is written under a hidden temporary name in the folder, flushed to disk and
renamed over the old one, so a reader (or a run stopped mid-write) never sees a partial
file. ``checkpoint.json`` is written last: a checkpoint it names is complete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

CONFIG = "adapter_config.json"
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
    """The run's ``adapter_config.json``."""
    path = Path(folder) / CONFIG
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: resume and adapter_path take a folder that "
            "finetune wrote (it holds adapter_config.json and adapters.safetensors)"
        )
    return json.loads(path.read_text())
