"""The OpenAI request and response shapes the server speaks: parsing with one-line errors, and
the JSON bodies and stream chunks of /v1/completions and /v1/chat/completions."""
from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

MAX_STOP = 4  # as OpenAI


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, type, and the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (status, message, param,
                                                                        type_, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass
class Sampling:
    """Defaults for omitted sampling fields (the model's generation_config.json, as vLLM)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclasses.dataclass
class Parsed:
    """A validated request."""

    chat: bool
    prompt_text: str | None  # None when the prompt came as token ids
    prompt_ids: list[int] | None
    messages: list[dict[str, str]] | None
    max_tokens: int | None  # None: as many as the cache holds
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    enable_thinking: bool


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param)


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"'{name}' must be an integer, got {type(v).__name__}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise _bad(f"'{name}' must be {rng}, got {v}", name)
    return v


def _float(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"'{name}' must be a number, got {type(v).__name__}", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise _bad(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(f"'{name}' must be a boolean, got {type(v).__name__}", name)
    return v


def _prompt(body: dict, vocab_size: int) -> tuple[str | None, list[int] | None]:
    if "prompt" not in body:
        raise _bad("'prompt' is required", "prompt")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p:
            raise _bad("'prompt' must not be empty", "prompt")
        return p, None
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in p):
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise _bad(f"'prompt' token id {bad[0]} is outside the vocabulary "
                       f"(0..{vocab_size - 1})", "prompt")
        return None, list(p)
    if isinstance(p, list) and len(p) > 1:
        raise _bad("'prompt' must be one prompt (a string or a list of token ids); batches of "
                   "several prompts are not supported", "prompt")
    raise _bad("'prompt' must be a non-empty string or a non-empty list of token ids", "prompt")


def _messages(body: dict) -> list[dict[str, str]]:
    m = body.get("messages")
    if not isinstance(m, list) or not m:
        raise _bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, msg in enumerate(m):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise _bad(f"'messages[{i}]' must be an object with a string 'role'", "messages")
        content = msg.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text"
                       and isinstance(c.get("text"), str) for c in content):
                raise _bad(f"'messages[{i}].content' parts must be text parts", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise _bad(f"'messages[{i}].content' must be a string", "messages")
        out.append({"role": msg["role"], "content": content})
    return out


def parse(body: Any, *, chat: bool, model_name: str, vocab_size: int, defaults: Sampling,
          top_k_cap: int) -> Parsed:
    """Validate a request body; raises APIError (400, or 404 for an unknown model)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)  # type: ignore[arg-type]
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("'model' is required and must be a string", "model")
    if model != model_name:
        raise APIError(404, f"The model '{model}' does not exist (this server serves "
                            f"'{model_name}')", "model", code="model_not_found")
    n = _int(body, "n", 1)
    if n is not None and n != 1:
        raise _bad(f"'n' must be 1 (one choice per request), got {n}", "n")
    best_of = _int(body, "best_of", 1)
    if best_of is not None and best_of != 1:
        raise _bad(f"'best_of' must be 1, got {best_of}", "best_of")
    if chat:
        messages, text, ids = _messages(body), None, None
        max_tokens = _int(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens", 1)
    else:
        messages = None
        text, ids = _prompt(body, vocab_size)
        max_tokens = _int(body, "max_tokens", 1)
        if "max_tokens" not in body:
            max_tokens = 16  # OpenAI's default for completions
    temperature = _float(body, "temperature", 0.0, 2.0)
    top_p = _float(body, "top_p", 0.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", -1)
    if top_k is not None and top_k > top_k_cap:
        raise _bad(f"'top_k' must be at most {top_k_cap} on this server (-1 or 0 = off), got "
                   f"{top_k}", "top_k")
    seed = _int(body, "seed")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise _bad("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise _bad(f"'stop' takes at most {MAX_STOP} non-empty strings", "stop")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    include_usage = _bool(opts or {}, "include_usage")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise _bad("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    return Parsed(
        chat=chat, prompt_text=text, prompt_ids=ids, messages=messages, max_tokens=max_tokens,
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        top_k=max(defaults.top_k if top_k is None else top_k, 0), seed=seed, stop=stops,
        stream=stream, include_usage=include_usage,
        enable_thinking=bool(kwargs.get("enable_thinking", False)))


class StopChecker:
    """Finds the first stop string in the growing text; holds back a tail that may still
    become one, so a stream never sends text that a stop string later cuts."""

    def __init__(self, stops: list[str]):
        self.stops, self.hold = stops, max((len(s) for s in stops), default=1) - 1

    def check(self, text: str) -> tuple[str, bool]:
        """(text safe to send so far, whether a stop string was found)."""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], True
        return (text[: len(text) - self.hold] if self.hold else text), False


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(chat: bool, rid: str, model: str, text: str, finish: str, use: dict) -> dict:
    created = int(time.time())
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [choice], "usage": use}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [choice], "usage": use}


def chunk(chat: bool, rid: str, model: str, text: str | None, finish: str | None,
          role: bool = False, use: dict | None = None, no_choice: bool = False) -> dict:
    """One stream chunk; no_choice gives the final usage-only chunk (choices [])."""
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    out: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model}
    if no_choice:
        out["choices"] = []
    elif chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        out["choices"] = [{"index": 0, "text": text or "", "logprobs": None,
                           "finish_reason": finish}]
    if use is not None or no_choice:
        out["usage"] = use
    return out
