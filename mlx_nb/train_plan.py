"""What a full fine-tuning run needs before any rank starts: whether FSDP can shard the model
over the ranks, and the memory each rank will hold.

Pure: it reads ``config.json`` (and one safetensors header for the weights' dtype) and builds
the mlx-lm model class lazily for its parameter shapes; no weight is read or computed.

The memory of a rank (bytes), with P the model's parameters, b the bytes of one, N the ranks:

- data-parallel (every rank holds everything): weights P b, gradients P b, Adam's two moments
  2 P b, and the activations of every block kept for the backward pass;
- FSDP: each of those over N, plus the layers gathered whole at once (the rest of the model,
  embeddings, norm and head, for the whole step, and the largest block while it runs, each with
  its whole gradient before the reduce-scatter), and the activations of a checkpointed run (each
  block's input, one block's activations at a time).

Activations count every row as ``max_seq_length`` tokens long: an upper bound.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import planner
from .display import human_bytes

DIVISORS_SHOWN = 64  # rank counts listed as dividing every parameter, at most up to this
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelParameters:
    """A model's parameter shapes by name, and the parameters of each FSDP unit."""

    shapes: dict[str, tuple[int, ...]]
    blocks: list[int]  # parameters of each transformer block
    rest: int  # parameters outside the blocks: embeddings, final norm, head

    @property
    def total(self) -> int:
        return sum(self.blocks) + self.rest


@dataclass(frozen=True)
class TrainingMemory:
    """The memory one rank holds at its peak while training, by what it holds (bytes)."""

    ranks: int
    fsdp: bool
    weights: int
    gradients: int
    optimizer: int  # Adam's two moments
    gathered: int  # FSDP: layers gathered whole at once, and their gradients before the reduce-scatter
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations

    def __str__(self) -> str:
        parts = [
            f"weights {human_bytes(self.weights)}",
            f"gradients {human_bytes(self.gradients)}",
            f"Adam {human_bytes(self.optimizer)}",
        ]
        if self.fsdp:
            parts.append(f"gathered layers {human_bytes(self.gathered)}")
        parts.append(f"activations {human_bytes(self.activations)}")
        return f"{human_bytes(self.total)} per rank ({', '.join(parts)})"


def model_parameters(config: dict) -> ModelParameters:
    """The parameters of the mlx-lm model that ``config`` describes (built lazily: no weight is
    made), as a full fine-tuning run trains them (a quantized model dequantized).

    Example:
        >>> model_parameters(json.loads(open(bundled_model() / "config.json").read())).total  # doctest: +SKIP
        134515008
    """
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    blocks = [sum(math.prod(a.shape) for _, a in tree_flatten(b.parameters())) for b in model.layers]
    return ModelParameters(shapes, blocks, sum(math.prod(s) for s in shapes.values()) - sum(blocks))


def check_shardable(shapes: dict[str, tuple[int, ...]], ranks: int, model: str = "the model") -> None:
    """Raise ``ValueError`` unless FSDP can shard every parameter over ``ranks`` (each rank keeps
    1/N of every parameter along its first axis), naming the first one that cannot and the rank
    counts that would divide them all.

    Example:
        >>> check_shardable({"w": (6, 4), "b": (6,)}, 4)
        Traceback (most recent call last):
        ValueError: FSDP cannot shard the model over 4 ranks: w has shape (6, 4), and its first axis (6) does not divide by 4 ...
    """
    for name, shape in shapes.items():
        if not shape:
            raise ValueError(
                f"FSDP cannot shard {model}: {name} is a scalar (FSDP splits every parameter along its "
                "first axis); fsdp=False trains it with every weight whole on every rank"
            )
        if shape[0] % ranks:
            raise ValueError(
                f"FSDP cannot shard {model} over {ranks} ranks: {name} has shape {shape}, and its first "
                f"axis ({shape[0]}) does not divide by {ranks} (each rank keeps 1/{ranks} of every parameter "
                f"along its first axis). Rank counts that divide every parameter: {_dividing(shapes)}; "
                "or fsdp=False, every weight whole on every rank"
            )


def _dividing(shapes: dict[str, tuple[int, ...]]) -> str:
    common = math.gcd(*(shape[0] for shape in shapes.values()))
    counts = [n for n in range(1, min(common, DIVISORS_SHOWN) + 1) if common % n == 0]
    more = (
        " and more"
        if common > DIVISORS_SHOWN and any(common % n == 0 for n in range(DIVISORS_SHOWN + 1, common + 1))
        else ""
    )
    return ", ".join(map(str, counts)) + more


def activation_bytes(config: dict, tokens: int, seq: int, bytes_per_value: int, checkpointed: bool) -> int:
    """The activations a training step keeps for its backward pass (bytes), for ``tokens`` tokens
    in rows of ``seq``: a block's matmul and norm inputs, its MLP's, and attention's scores and
    probabilities; the float32 logits with their softmax and gradient. ``checkpointed``: each
    block keeps only its input, and one block's activations (with their gradients) exist at a time.

    Example:
        >>> activation_bytes({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        ...                   "num_attention_heads": 4, "vocab_size": 100}, 10, 10, 4, False)
        110560
    """
    h, i = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    block = tokens * ((8 * h + 2 * kv + 4 * i) * bytes_per_value + heads * seq * 2 * bytes_per_value)
    logits = tokens * config["vocab_size"] * 4 * 3
    layers = config["num_hidden_layers"]
    if checkpointed:
        return layers * tokens * h * bytes_per_value + 2 * block + logits
    return layers * block + logits


def training_memory(
    params: ModelParameters,
    bytes_per_param: int,
    ranks: int,
    fsdp: bool,
    activations: int,
) -> TrainingMemory:
    """One rank's memory at its peak (see the module's formula).

    Example:
        >>> m = training_memory(ModelParameters({}, [100, 100], 200), 4, 2, True, 0)
        >>> m.weights, m.optimizer, m.gathered
        (800, 1600, 2400)
    """
    sharded = fsdp and ranks > 1
    share = math.ceil(params.total / ranks) if sharded else params.total
    # weights and whole gradient (all_sum, where it stands in for sum_scatter, reuses its input)
    gathered = 2 * (params.rest + max(params.blocks, default=0)) * bytes_per_param if sharded else 0
    return TrainingMemory(
        ranks=ranks,
        fsdp=sharded,
        weights=share * bytes_per_param,
        gradients=share * bytes_per_param,
        optimizer=2 * share * bytes_per_param,
        gathered=gathered,
        activations=activations,
    )


def estimate(
    model_path: str | Path,
    ranks: int,
    fsdp: bool,
    batch_size: int,
    max_seq_length: int,
    dense_float32: bool = True,
) -> TrainingMemory:
    """The memory per rank of full fine-tuning the model folder ``model_path`` (its ``config.json``
    and a safetensors header); ``batch_size`` rows per rank. A quantized model trains dequantized:
    float32 where ``dense_float32`` (a Linux CPU with an optimized BLAS), else bfloat16.

    Example:
        >>> print(estimate(bundled_model(dense=True), 2, True, 1, 64))  # doctest: +SKIP
        1.4 GB per rank (weights 256.6 MB, gradients 256.6 MB, Adam 513.2 MB, ...)
    """
    path = Path(model_path)
    config = json.loads((path / "config.json").read_text())
    config = {**config.get("text_config", {}), **config}
    params = model_parameters(config)
    if "quantization" in config:
        b = 4 if dense_float32 else 2
    else:
        b = stored_bytes_per_param(path) or DTYPE_BYTES.get(str(config.get("torch_dtype")), 2)
    tokens = batch_size * max_seq_length
    activations = activation_bytes(config, tokens, max_seq_length, b, checkpointed=fsdp and ranks > 1)
    return training_memory(params, b, ranks, fsdp, activations)


def stored_bytes_per_param(folder: Path) -> Optional[int]:
    """The bytes of one value of the first floating-point tensor in the folder's safetensors files
    (read from the file's header), or None where there is none."""
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__" and entry["dtype"] in DTYPE_BYTES:
                return DTYPE_BYTES[entry["dtype"]]
    return None


def check_fits(memory: TrainingMemory, budgets: Sequence[int], what: str = "this run") -> None:
    """Raise the planner's :class:`~mlx_nb.planner.DoesNotFit` (a ``ValueError``) with the numbers
    when a rank's share of ``memory`` is over its budget, as a load that does not fit is refused.

    Example:
        >>> check_fits(training_memory(ModelParameters({}, [100], 0), 4, 1, False, 0), [1000])
        Traceback (most recent call last):
        mlx_nb.planner.DoesNotFit: ... rank 0 needs 1.6 KB, has 1000 B. It needs ...
    """
    hint = (
        "more ranks (each holds 1/N), a shorter max_seq_length or batch_size"
        if memory.fsdp
        else "fsdp=True (each rank holds 1/N of the weights, gradients and Adam state), or a smaller model"
    )
    planner.check_fits(what, [memory.total] * len(budgets), budgets, f"It needs {memory}. Try {hint}.")
