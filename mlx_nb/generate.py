"""Sharded generation, run inside every rank: load a model split over a group, then stream.

Every rank calls the same functions with the same arguments, in the same
order: the model's collectives pair up across ranks, so a rank that skips a
call or stops iterating early leaves the others waiting.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse, generation_stream, stream_generate
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import sharded_load

from .models import check_split, resolve

Prompt = Union[str, list[dict[str, Any]], list[int]]


def load(
    model: Optional[str],
    group: mx.distributed.Group,
    pipeline: bool = False,
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load ``model`` split over ``group``: tensor parallel, or a pipeline of layers.

    ``model`` is a path or repo id for mlx-lm, or ``None`` for the bundled
    SmolLM2. A split the model cannot take raises ``ValueError`` before any
    weight is read.

    Example:
        >>> model, tokenizer = load(None, mx.distributed.init(), pipeline=True)
    """
    path = resolve(model)
    check_split(path, group.size(), pipeline)
    if pipeline:
        return sharded_load(path, pipeline_group=group)
    return sharded_load(path, tensor_group=group)


def stream(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: Prompt,
    max_tokens: int = 256,
    group: Optional[mx.distributed.Group] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    *,
    stop_every: int = 1,
    **kwargs: Any,
) -> Iterator[GenerationResponse]:
    """Stream mlx-lm ``GenerationResponse`` rows for ``prompt``, greedy unless a sampler is given.

    ``prompt`` is text, token ids, or chat messages (``[{"role": "user",
    "content": ...}]``, which go through the chat template). Every
    ``stop_every`` tokens the ranks of ``group`` agree on stopping: generation
    ends on every rank at the same token as soon as ``should_stop()`` is true
    on any rank (typically only rank 0 passes one). A signal cannot interrupt
    MLX's native waits, so this flag is the way to stop a sharded model.
    ``kwargs`` go to ``mlx_lm.stream_generate`` (``sampler``, ``prefill_step_size``...).

    Example:
        >>> for r in stream(model, tokenizer, [{"role": "user", "content": "Hi"}], 32, group):
        ...     print(r.text, end="")
    """
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    shared = group is not None and group.size() > 1
    agreed: Optional[mx.array] = None
    for n, response in enumerate(
        stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs), 1
    ):
        yield response
        if response.finish_reason is not None or n % stop_every:
            continue
        stop = should_stop is not None and should_stop()
        if not shared:
            if stop:
                return
            continue
        # The previous check's sum is ready by now, so reading it costs no
        # wait; the new one queues on the generation stream behind the model's
        # own collectives, in the same order on every rank.
        if agreed is not None and agreed.item() > 0:
            return
        with mx.stream(generation_stream):
            agreed = mx.distributed.all_sum(mx.array(int(stop)), group=group)
        mx.async_eval(agreed)
