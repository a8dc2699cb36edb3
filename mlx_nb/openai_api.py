"""The OpenAI API as mlx_nb's server speaks it: a request checked into one ``Completion``, the
replies, the stream chunks and the errors, in the shapes of OpenAI's API (and mlx_lm.server's).

Every check happens here, in the notebook, before anything reaches the ranks: a bad request
is an ``ApiError`` (an HTTP status and an OpenAI error body), never a traceback or a rank.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

ROLES = ("system", "developer", "user", "assistant")
MAX_STOPS = 4  # as OpenAI


class ApiError(Exception):
    """A request the server refuses: ``status`` and an OpenAI-style error body.

    Example:
        >>> ApiError(404, "no such model", code="model_not_found").body()["error"]["code"]
        'model_not_found'
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ServedModel:
    """The model the ranks hold, as the API names it, with the notebook's copy of its tokenizer."""

    id: str
    tokenizer: Any
    context: Optional[int]  # tokens (prompt and reply) the model takes; None: not known
    vocab: Optional[int] = None  # token ids run 0..vocab-1; None: not known
    names: set[str] = field(default_factory=set)  # what else a request may call it (its path...)
    created: int = field(default_factory=lambda: int(time.time()))

    def card(self) -> dict:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "mlx_nb"}

    def check(self, name: Any) -> None:
        if name is not None and name != self.id and name not in self.names:
            raise ApiError(
                404,
                f"The model {name!r} does not exist: this server serves {self.id!r} (GET /v1/models lists it).",
                "model",
                "model_not_found",
            )


@dataclass
class Completion:
    """A checked request: the prompt's token ids and how to generate."""

    chat: bool
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object (400 otherwise)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"The request body is not valid JSON ({e}); send a JSON object.") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object, not {type(body).__name__}.")
    return body


def completion(body: dict, model: ServedModel, chat: bool, default_max_tokens: int = 512) -> Completion:
    """``body`` of ``POST /v1/chat/completions`` (``chat``) or ``/v1/completions``, checked.

    Example:
        >>> completion({"model": "gpt-4", "messages": []}, ServedModel("smollm2", None, 8192), chat=True)
        Traceback (most recent call last):
        mlx_nb.openai_api.ApiError: The model 'gpt-4' does not exist: this server serves 'smollm2' (GET /v1/models lists it).
    """
    model.check(body.get("model"))
    if body.get("n", 1) != 1:
        raise ApiError(400, "Only n=1 is supported: send one request per reply.", "n")
    if body.get("tools"):
        raise ApiError(400, "Tool calling is not supported by this server.", "tools")
    prompt = _chat_prompt(body, model.tokenizer) if chat else _text_prompt(body, model.tokenizer, model.vocab)
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    asked = _integer(body, key, None, low=1)
    room = model.context - len(prompt) if model.context else None
    if room is not None and (room < 1 or (asked is not None and asked > room)):
        raise ApiError(
            400,
            f"This model's maximum context length is {model.context} tokens. However, you requested "
            f"{len(prompt) + (asked or 1)} tokens ({len(prompt)} in the prompt, {asked or 1} for the "
            "completion). Please reduce the length of the prompt or of max_tokens.",
            "messages" if chat else "prompt",
            "context_length_exceeded",
        )
    max_tokens = asked if asked is not None else min(default_max_tokens, room or default_max_tokens)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object.", "stream_options")
    return Completion(
        chat,
        prompt,
        max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        seed=_integer(body, "seed", None),
        stop=_stops(body.get("stop")),
        stream=_flag(body, "stream"),
        include_usage=bool(options.get("include_usage")),
    )


def _chat_prompt(body: dict, tokenizer: Any) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects.", "messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with a role and a content.", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            also = " (this server has no tool calling)" if role in ("tool", "function") else ""
            raise ApiError(
                400,
                f"messages[{i}].role is {role!r}: it must be one of {', '.join(ROLES)}{also}.",
                f"messages[{i}].role",
            )
        turns.append({"role": "system" if role == "developer" else role, "content": _content(m.get("content"), i)})
    try:
        return list(tokenizer.apply_chat_template(turns, add_generation_prompt=True))
    except Exception as e:  # a template that refuses the turns (roles out of order, say)
        raise ApiError(400, f"The model's chat template refused the messages: {e}", "messages") from None


def _content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported.", f"messages[{i}].content")
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts.", f"messages[{i}].content")


def _text_prompt(body: dict, tokenizer: Any, vocab: Optional[int]) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        special = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
        return list(tokenizer.encode(prompt, add_special_tokens=special))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if vocab and not all(0 <= t < vocab for t in prompt):
            raise ApiError(400, f"prompt: token ids must lie in 0..{vocab - 1}.", "prompt")
        return prompt
    raise ApiError(400, "prompt must be a non-empty string (or a list of token ids); one prompt per request.", "prompt")


def _integer(body: dict, name: str, default: Optional[int], low: Optional[int] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
        least = f" of at least {low}" if low is not None else ""
        raise ApiError(400, f"{name} must be an integer{least}, got {value!r}.", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    bad = not isinstance(value, (int, float)) or isinstance(value, bool)
    if bad or value > high or value < low or (open_low and value == low):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise ApiError(400, f"{name} must be a number in {interval}, got {value!r}.", name)
    return float(value)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise ApiError(400, f"{name} must be true or false, got {value!r}.", name)
    return bool(value)


def _stops(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them.", "stop")
    return stops


class StopText:
    """The reply's text with ``stop`` strings applied: what may begin a stop string is held back,
    and the text ends before the first one (which is not part of it, as in OpenAI's API).

    Example:
        >>> s = StopText(["\\n\\n"])
        >>> s.feed("Paris.\\n"), s.feed("\\nMore"), s.stopped
        ('Paris.', '', True)
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.held, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        """The text that can be sent now, of what came so far."""
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        text, self.held = self.held + text, ""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        if keep:
            text, self.held = text[:-keep], text[-keep:]
        return text

    def flush(self) -> str:
        """What is held back, at the end of the reply."""
        held, self.held = ("" if self.stopped else self.held), ""
        return held


def reply(chat: bool, rid: str, model: str, text: str, finish: Optional[str], usage: dict) -> dict:
    """A whole (not streamed) reply."""
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "mlx_nb",
        "choices": [choice],
        "usage": usage,
    }


def chunk(
    chat: bool,
    rid: str,
    model: str,
    text: Optional[str] = None,
    finish: Optional[str] = None,
    usage: Optional[dict] = None,
) -> dict:
    """One event of a streamed reply: a piece of text, the end (``finish``), or the usage alone."""
    if chat:
        delta = {"role": "assistant", "content": text} if text is not None else {}
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    out = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "mlx_nb",
        "choices": [] if usage is not None else choices,
    }
    if usage is not None:
        out["usage"] = usage
    return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; ``cached_tokens``: the prompt's tokens the ranks' prompt cache held."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
