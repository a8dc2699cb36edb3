"""Fully sharded data parallelism on every backend: MLX's ``fully_shard``, with a reduce-scatter
where the backend has none.

MLX 0.32's ``nn.fully_shard`` keeps a 1/N shard of every parameter on each rank, gathers a
module's weights (``all_gather``) for its forward pass and reduce-scatters their gradients
(``mx.distributed.sum_scatter``) in its backward pass. JACCL and NCCL have ``sum_scatter``; the
ring and MPI do not (``[ring] sum_scatter not supported``). There, :func:`sum_then_slice` stands
in: an ``all_sum`` of the gradients, then this rank's block of the sum. It moves about twice the
bytes of a ring reduce-scatter, but it is one collective, which every rank meets at the same
point of the graph. A reduce-scatter of ``send``/``recv`` hops needs each rank to send and
receive at once (the ring's ``send`` returns only once the peer has read it all), hence a
second stream for the sends; that stream's sends then race the other collectives of the same
graph for the same sockets, whose queues must match the peer's order. ``benchmarks/finetune.py``
measures both against ``all_sum`` (one collective alone, where no race can happen).

MLX's gather has no argument for the reduce-scatter (its backward pass calls
``mx.distributed.sum_scatter`` by name), so :class:`Sharded` rebuilds the gather of its own
instances with the stand-in, rather than replacing ``mx.distributed.sum_scatter`` for the whole
process. Each transformer block's forward pass is also checkpointed (recomputed, gather
included, in the backward pass): without it the gathered weights of every block stay alive
from the forward pass until the backward pass reaches them, which is the whole model again.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# backends whose MLX has sum_scatter (0.32.4); elsewhere sum_then_slice runs
NATIVE = ("jaccl", "nccl")
ReduceScatter = Callable[[mx.array, Any], mx.array]


def reduce_scatter_name(backend: str, size: int) -> str:
    """Which reduce-scatter a group of ``size`` ranks on ``backend`` runs (shown to the user).

    Example:
        >>> reduce_scatter_name("ring", 2)
        "mlx_nb's all_sum + slice (the ring backend has no sum_scatter)"
        >>> reduce_scatter_name("nccl", 2)
        "MLX's sum_scatter (nccl)"
    """
    if size == 1:
        return "none (one rank)"
    if backend in NATIVE:
        return f"MLX's sum_scatter ({backend})"
    return f"mlx_nb's all_sum + slice (the {backend} backend has no sum_scatter)"


def sum_then_slice(x: mx.array, group: Any) -> mx.array:
    """``sum_scatter`` where the backend has none: the sum over ranks of ``x``, cut along axis 0
    into one block per rank, rank r getting block r.

    Example (on 2 ranks)::

        sum_then_slice(mx.ones((4, 3)), group)   # shape (2, 3), every value 2.0
    """
    n, r = group.size(), group.rank()
    if x.ndim == 0 or x.shape[0] % n:
        raise ValueError(f"a reduce-scatter over {n} ranks needs axis 0 divisible by {n}, got shape {x.shape}")
    m = x.shape[0] // n
    return mx.distributed.all_sum(x, group=group)[r * m : (r + 1) * m]


def _gather_fn(group: Any, full_shapes: list, shard_sizes: list, reduce_scatter: ReduceScatter):
    """MLX's ``_make_gather_fn`` (0.32.4, without ``compute_dtype``) with ``reduce_scatter`` in its
    backward pass."""
    n = group.size()
    split = reduce(lambda acc, w: acc + [acc[-1] + w], shard_sizes, [0])[1:-1]
    shard_shapes = [(shape[0] // n,) + tuple(shape[1:]) for shape in full_shapes]

    @mx.custom_function
    def gather(shards):
        full = mx.distributed.all_gather(mx.concatenate([s.reshape(1, -1) for s in shards], axis=1), group=group)
        return [p.reshape(shape) for p, shape in zip(mx.split(full, split, axis=1), full_shapes)]

    @gather.vjp
    def gather_vjp(shards, cotangents, _):
        local = mx.concatenate([c.reshape(n, -1) for c in cotangents], axis=1)
        mine = reduce_scatter(local, group) / n
        return [
            p.reshape(shape).astype(s.dtype) for p, shape, s in zip(mx.split(mine, split, axis=1), shard_shapes, shards)
        ]

    return gather


class Sharded(nn.FullyShardedModule):
    """MLX's ``FullyShardedModule`` with a reduce-scatter of mlx_nb's where ``reduce_scatter`` is
    given, and a forward pass recomputed in the backward pass where ``checkpoint``."""

    def __init__(
        self, module: nn.Module, group: Any, reduce_scatter: Optional[ReduceScatter] = None, checkpoint: bool = True
    ):
        super().__init__(module, group=group)
        self._checkpoint = checkpoint
        if reduce_scatter is not None:
            shards = [a for _, a in tree_flatten(module.filter_and_map(_own))]
            n = group.size()
            shapes = [(a.shape[0] * n,) + tuple(a.shape[1:]) for a in shards]
            self._gather_fn = _gather_fn(group, shapes, [a.size for a in shards], reduce_scatter)

    def __getattr__(self, key: str):
        # what the model's code reads of a block besides calling it (llama's ``layer.use_sliding``)
        # comes from the wrapped module
        try:
            return super().__getattr__(key)
        except AttributeError:
            if key.startswith("__") or "module" not in self:
                raise
            return getattr(self["module"], key)

    def __call__(self, *args, **kwargs):
        if not (self.training and self._checkpoint):
            return super().__call__(*args, **kwargs)

        def inner(shards, *args, **kwargs):
            self.module.update(shards)
            return self._gathered_call(self.module, *args, **kwargs)

        return mx.checkpoint(inner)(self.module.filter_and_map(_own), *args, **kwargs)


def _own(module: nn.Module, key: str, value: Any) -> bool:
    """The parameters a wrapper shards: its module's, not those of wrappers inside it
    (MLX's own filter, ``_maybe_shard``)."""
    return not isinstance(value, nn.FullyShardedModule) and nn.Module.valid_parameter_filter(module, key, value)


def shard_model(model: nn.Module, group: Any, backend: str, evaluate: bool = True) -> nn.Module:
    """Wrap every transformer block of an mlx-lm model, then the rest (embeddings, norm, head),
    each rank keeping 1/N of every parameter; returns the wrapped model (``model`` itself on one rank).

    With ``evaluate``, each block's shard is computed as it is wrapped, so a lazily loaded model
    never holds more than one block whole.

    Example (in a rank)::

        model, tokenizer = mlx_lm.load(path, lazy=True)
        model = shard_model(model, world, "ring")
    """
    if group.size() == 1:
        return model
    rs = None if backend in NATIVE else sum_then_slice
    for parent, index, block in _blocks(model):
        parent[index] = Sharded(block, group, rs)
        if evaluate:
            mx.eval(parent[index].parameters())
    # not checkpointed: recomputing the whole model would recompute every block a second time
    root = Sharded(model, group, rs, checkpoint=False)
    if evaluate:
        mx.eval(root.parameters())
    return root


def _blocks(model: nn.Module) -> list[tuple[list, int, nn.Module]]:
    """Each transformer block of an mlx-lm model with the list that holds it and its index there.

    ``model.layers`` gives the blocks, but some models return a copy of the list (qwen2's
    ``pipeline_layers``): the list to change is found by the block's name in the model.
    """
    names = {id(m): name for name, m in model.named_modules()}
    found = []
    for block in model.layers:
        path, index = names[id(block)].rsplit(".", 1)
        parent: Any = model
        for part in path.split("."):
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        found.append((parent, int(index), block))
    return found


def plain_names(model: nn.Module) -> Callable[[str], str]:
    """A function from a wrapped model's parameter names to those of the model it wraps
    (``module.model.layers.0.module.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj.weight``).

    Example:
        >>> plain = plain_names(shard_model(model, world, "ring"))  # doctest: +SKIP
    """
    wrappers = sorted(
        (name for name, m in model.named_modules() if isinstance(m, nn.FullyShardedModule)), key=len, reverse=True
    )

    def plain(key: str) -> str:
        for w in wrappers:  # innermost first: its prefix still holds the outer wrappers' "module."
            inner = f"{w}.module." if w else "module."
            if key.startswith(inner):
                key = (f"{w}." if w else "") + key[len(inner) :]
        return key

    return plain
