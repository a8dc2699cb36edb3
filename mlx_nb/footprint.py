"""What a model weighs in memory, and each rank's share of it: read from its config.json and
its safetensors headers, no weight read (a safetensors file's first 8 bytes give the length of a
JSON header that lists every tensor's dtype, shape and byte range).

What a rank holds, as mlx-lm runs the model:

- weights: tensor parallel, every rank holds its share of each layer's projections (norms and
  the biases of the layers that sum their output stay whole) and all of the embeddings and the
  head; a pipeline rank holds its layers, and every stage keeps the embeddings, the final norm
  and the head (``sharded_load`` gives each stage all of them). Sizes as stored (quantized too).
- the KV cache for ``context`` tokens at that rank's layers (a pipeline) or heads (tensor
  parallel), in mlx-lm's 256-token steps;
- activations: a prefill chunk (mlx-lm prefills 2,048 tokens at a time) through one layer's
  attention (on a CPU with its score matrix) and its MLP.

Example::

    facts = read_model(bundled_model(dense=True))
    stage_memory(facts, range(2, 30), context=1024).total      # rank 0 of pipeline [28, 1, 1]
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from .models import local_folder, read_config, supports

KV_STEP = 256  # mlx-lm's KVCache grows by this many tokens at a time
PREFILL_STEP = 2048  # mlx-lm's prefill_step_size: tokens run through the model at once
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # as sharded_load matches a tensor to its layer
_SUMMED = ("o_proj", "down_proj", "out_proj")  # sharded-to-all: their bias stays whole


# ------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ModelFacts:
    """What the planner knows of a model, from its config and its safetensors headers."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    act_bytes: int  # bytes of one activation: the hidden state's (the embedding's) dtype
    shared: int  # bytes every pipeline stage holds: embeddings, final norm, head
    layer_bytes: tuple[int, ...]  # stored bytes of each layer
    layer_split: tuple[int, ...]  # of those, the bytes tensor parallelism splits over the ranks
    quantized: bool
    max_context: Optional[int] = None  # the model's max_position_embeddings
    pipeline: bool = True  # mlx-lm can split it into a pipeline
    tensor: bool = True  # mlx-lm has tensor parallelism for it
    config: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def total(self) -> int:
        """Bytes of the whole model, as one process holds it."""
        return self.shared + sum(self.layer_bytes)

    def quantized_copy(self, bits: int = 4, group: int = 64) -> ModelFacts:
        """About what ``mlx_lm.convert -q`` (``bits``, ``group``) would make of this model."""
        per_weight = bits / 8 + 2 * self.act_bytes / group  # packed weights, a scale and a bias per group
        f = per_weight / self.act_bytes

        def scaled(n: int) -> int:
            return int(n * f)

        return replace(
            self,
            name=f"{self.name} ({bits}-bit)",
            shared=scaled(self.shared),
            layer_bytes=tuple(map(scaled, self.layer_bytes)),
            layer_split=tuple(map(scaled, self.layer_split)),
            quantized=True,
        )


def read_model(model: str | Path) -> ModelFacts:
    """A model folder's (or a repo snapshot's) facts: ``config.json`` and the headers of its
    ``model*.safetensors`` files, as mlx-lm loads them; no weight is read.

    Example::

        read_model(bundled_model()).total      # 99.5 MB as stored, 4-bit
    """
    folder = local_folder(model)
    config = read_config(folder)
    tensors = _tensors(str(model), folder)
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    tied = _tied(config)
    shared, per_layer, split = 0, [0] * layers, [0] * layers
    for key, info in tensors.items():
        size = info["data_offsets"][1] - info["data_offsets"][0]
        if "rotary_emb.inv_freq" in key or (tied and key.startswith("lm_head.")):
            continue  # the model's sanitize drops these
        m = LAYER_KEY.search(key)
        if m is None:
            shared += size
        elif int(m[1]) < layers:  # past the last layer: multi-token-prediction layers, dropped too
            per_layer[int(m[1])] += size
            if _splits(key):
                split[int(m[1])] += size
    return ModelFacts(
        name=folder.name,
        layers=layers,
        hidden=config["hidden_size"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate=config["intermediate_size"],
        vocab=config["vocab_size"],
        act_bytes=_activation_bytes(tensors),
        shared=shared,
        layer_bytes=tuple(per_layer),
        layer_split=tuple(split),
        quantized=any(k.endswith(".scales") for k in tensors),
        max_context=config.get("max_position_embeddings"),
        pipeline=supports(config, "pipeline"),
        tensor=supports(config, "shard"),
        config=config,
    )


def _tensors(model: str, folder: Path) -> dict:
    """Every tensor's header entry, from the folder's ``model*.safetensors`` files (as mlx-lm
    globs them); for a repo whose weights are not all here, from the hub's copy of the headers
    (``get_safetensors_metadata``: HTTP range requests, no weight fetched)."""
    files = sorted(folder.glob("model*.safetensors"))
    index = folder / "model.safetensors.index.json"
    listed = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else set()
    if files and listed <= {f.name for f in files}:
        return {k: v for f in files for k, v in safetensors_header(f).items() if k != "__metadata__"}
    if Path(model).exists():
        raise FileNotFoundError(
            f"{folder} has no model*.safetensors files (or not all its index lists): nothing to plan; "
            "give an mlx-lm model folder (mlx_lm.convert makes one)"
        )
    from huggingface_hub import get_safetensors_metadata

    meta = get_safetensors_metadata(model)
    return {
        name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
        for file, m in meta.files_metadata.items()
        if Path(file).name.startswith("model")
        for name, t in m.tensors.items()
    }


def safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file: every tensor's dtype, shape and byte range."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def _tied(config: dict) -> bool:
    """Whether the head is the embedding (a stored ``lm_head`` is then dropped), as the model's
    own arguments default it."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    try:
        from mlx_lm.utils import _get_classes

        return bool(getattr(_get_classes(config)[1].from_dict(config), "tie_word_embeddings", False))
    except Exception:
        return False


def _splits(key: str) -> bool:
    """Whether tensor parallelism (mlx-lm's ``shard_linear``) splits this layer tensor."""
    module, _, kind = key.rpartition(".")
    if "norm" in module.rsplit(".", 1)[-1]:
        return False
    return not (kind == "bias" and module.rsplit(".", 1)[-1] in _SUMMED)


def _activation_bytes(tensors: dict) -> int:
    """The hidden state's dtype size: the embedding's (a quantized one's scales'), else the
    most common floating dtype."""
    for key in sorted(tensors):
        if "embed_tokens" in key and key.endswith(".weight"):
            stem = key[: -len(".weight")]
            return _DTYPE_BYTES.get(tensors.get(f"{stem}.scales", tensors[key])["dtype"], 2)
    floats = [t["dtype"] for t in tensors.values() if t["dtype"] in ("F32", "F16", "BF16")]
    return _DTYPE_BYTES[max(set(floats), key=floats.count)] if floats else 2


# ------------------------------------------------------------------ memory
@dataclass(frozen=True)
class RankMemory:
    """What one rank holds in a layout, in bytes."""

    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations


def kv_bytes(facts: ModelFacts, kv_heads: float, layers: int, context: int) -> int:
    """mlx-lm's KV cache for ``context`` tokens of ``layers`` layers with ``kv_heads`` heads."""
    tokens = math.ceil(context / KV_STEP) * KV_STEP
    return int(2 * kv_heads * facts.head_dim * facts.act_bytes * tokens * layers)


def _activations(facts: ModelFacts, share: int, context: int, gpu: bool) -> int:
    """A prefill chunk through one layer (``share``: the ranks splitting the heads and the MLP),
    plus the next token's logits.

    Attention and MLP are counted as if held at once: against a CPU's peak (SmolLM2's dense copy,
    one process) that is 8% over for a 254-token prompt and 43% over for 1,024 tokens, where
    counting only the larger of the two fell 38% short at 254: the plan errs on the safe side."""
    t, b = min(context, PREFILL_STEP), facts.act_bytes
    heads, kv_heads = facts.heads / share, facts.kv_heads / share
    qkv = t * (heads + 2 * kv_heads) * facts.head_dim * b
    scores = 0 if gpu else 2 * heads * t * context * b  # a CPU's attention holds its scores and their softmax
    attention = qkv + scores + t * heads * facts.head_dim * b
    mlp = 4 * t * facts.intermediate / share * b  # gate, up, the gate's activation, their product
    carry = 2 * t * facts.hidden * b  # the residual stream and its normed copy
    kv_growth = kv_bytes(facts, kv_heads, 1, context)  # one layer's cache, copied as it grows
    return int(attention + mlp + carry + kv_growth + 2 * facts.vocab * 4)


def tensor_memory(facts: ModelFacts, ranks: int, context: int, gpu: bool = False) -> RankMemory:
    """One rank's memory when tensor parallelism splits the model over ``ranks``."""
    layers = sum(facts.layer_bytes)
    split = sum(facts.layer_split)
    weights = facts.shared + layers - split + split // ranks
    kv = kv_bytes(facts, facts.kv_heads / ranks, facts.layers, context)
    return RankMemory(weights, kv, _activations(facts, ranks, context, gpu))


def stage_memory(facts: ModelFacts, layers: range, context: int, gpu: bool = False) -> RankMemory:
    """One pipeline rank's memory, running ``layers``."""
    weights = facts.shared + sum(facts.layer_bytes[i] for i in layers)
    kv = kv_bytes(facts, facts.kv_heads, len(layers), context)
    return RankMemory(weights, kv, _activations(facts, 1, context, gpu))
