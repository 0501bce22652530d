"""OpenAI's request bodies, checked field by field: what passes becomes generation settings (Params)
and prompts; what fails is an APIError that carries OpenAI's error body and HTTP status.

Unknown fields are ignored, as OpenAI's API does; known fields we cannot honour (suffix, tools,
a JSON response_format, best_of above n, echo with logprobs) are refused with a 400 rather than
dropped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# OpenAI's own limits where it has them (n: 128, stop: 4 strings, logit_bias: [-100, 100],
# penalties: [-2, 2], temperature: [0, 2], chat top_logprobs: 20; legacy logprobs: 5, 20 here).
MAX_N = 128
MAX_STOP = 4
MAX_LOGPROBS = 20
SEED_RANGE = (-(2**63), 2**64 - 1)  # OpenAI's int64 and run.c's unsigned 64-bit seeds
ROLES = ("system", "developer", "user", "assistant")


class APIError(Exception):
    """A request that fails: HTTP status plus OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------- field readers


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    """body[name] as an int in [lo, hi]; absent or null gives the default. 2.0 is accepted as 2
    (JSON has one number type; clients sometimes send integers as floats)."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v):
        raise invalid(name, f"'{name}' must be an integer, got {_show(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise invalid(name, f"'{name}' must be {_range(lo, hi)}, got {v}")
    return v


def number(body: dict, name: str, default, lo: float | None = None, hi: float | None = None, hi_open=False):
    """body[name] as a finite float in [lo, hi] (or [lo, hi) with hi_open); absent or null: default."""
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or not math.isfinite(v):
        raise invalid(name, f"'{name}' must be a finite number, got {_show(v)}")
    if (lo is not None and v < lo) or (hi is not None and (v >= hi if hi_open else v > hi)):
        raise invalid(name, f"'{name}' must be {_range(lo, hi, hi_open)}, got {v}")
    return float(v)


def boolean(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(name, f"'{name}' must be true or false, got {_show(v)}")
    return v


def _range(lo, hi, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}{')' if hi_open else ']'}"
    return f">= {lo}" if lo is not None else f"<= {hi}"


def _show(v) -> str:
    text = repr(v) if not isinstance(v, str) else f"the string {v[:40]!r}"
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Params:
    """One request's generation settings, checked. logprobs: None = off, k = the chosen token's
    logprob and the k likeliest alternatives. max_tokens None: not given (the endpoint's default)."""

    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict = field(default_factory=dict)
    logprobs: int | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False


def check_model(body: dict, served: str) -> None:
    """`model` may be absent (curl convenience) but if given it must name the served model."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise invalid("model", f"'model' must be a string, got {_show(model)}")
    if model != served:
        raise APIError(404, f"The model '{model[:100]}' does not exist; this server serves '{served}'",
                       param="model", code="model_not_found")


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid("stop", f"'stop' must be a string or a list of strings, got {_show(v)}")
    if len(items) > MAX_STOP:
        raise invalid("stop", f"'stop' may hold at most {MAX_STOP} sequences, got {len(items)}")
    if any(s == "" for s in items):
        raise invalid("stop", "'stop' sequences must not be empty")
    return tuple(dict.fromkeys(items))


def _logit_bias(body: dict, vocab_size: int) -> dict:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise invalid("logit_bias", f"'logit_bias' must be an object of token id -> bias, got {_show(v)}")
    bias = {}
    for key, value in v.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid("logit_bias", f"'logit_bias' keys must be token ids, got {_show(key)}") from None
        if not 0 <= token < vocab_size:
            raise invalid("logit_bias", f"'logit_bias' token {token} is outside the vocabulary [0, {vocab_size})")
        if not _is_number(value) or not math.isfinite(value) or not -100 <= value <= 100:
            raise invalid("logit_bias", f"'logit_bias' values must be numbers in [-100, 100], got {_show(value)}")
        bias[token] = float(value)
    return bias


def _common(body: dict, vocab_size: int, logprobs: int | None, max_tokens, **extra) -> Params:
    for name in ("suffix",):
        if body.get(name) not in (None, ""):
            raise invalid(name, f"'{name}' (text insertion) is not supported by this server")
    for name in ("tools", "functions"):
        if body.get(name):
            raise invalid(name, f"'{name}' (tool calling) is not supported by this server")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") in (None, "text")):
        raise invalid("response_format", "only the 'text' response_format is supported by this server")
    n = integer(body, "n", 1, 1, MAX_N)
    best_of = integer(body, "best_of", n, 1, MAX_N)
    if best_of != n:
        raise invalid("best_of", f"'best_of' must equal n ({n}): ranking candidates is not supported")
    stream = boolean(body, "stream", False)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise invalid("stream_options", f"'stream_options' must be an object, got {_show(so)}")
    include_usage = boolean(so or {}, "include_usage", False)
    if so is not None and not stream:
        raise invalid("stream_options", "'stream_options' is only allowed when 'stream' is true")
    top_k = integer(body, "top_k", 0, -1, vocab_size)
    return Params(
        max_tokens=max_tokens,
        temperature=number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=max(top_k, 0),  # -1 is vLLM's "off"
        min_p=number(body, "min_p", 0.0, 0.0, 1.0, hi_open=True),
        seed=integer(body, "seed", None, *SEED_RANGE),
        stop=_stop(body),
        presence_penalty=number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=_logit_bias(body, vocab_size),
        logprobs=logprobs,
        n=n,
        stream=stream,
        include_usage=include_usage,
        **extra,
    )


# ---------------------------------------------------------------------------- /v1/completions


def completion_request(body: dict, vocab_size: int) -> tuple[list, Params]:
    """A completions body: its prompts (each a str or a list of token ids) and settings."""
    prompts = _prompts(body.get("prompt"), vocab_size)
    logprobs = integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    echo = boolean(body, "echo", False)
    if echo and logprobs is not None:
        raise invalid("echo", "'echo' with 'logprobs' (log-probabilities of the prompt) is not supported")
    max_tokens = integer(body, "max_tokens", None, 1)  # None: the server's default, capped by the context
    return prompts, _common(body, vocab_size, logprobs, max_tokens, echo=echo)


def _prompts(v, vocab_size: int) -> list:
    """OpenAI's prompt: a string, a list of token ids, or a list of either (one choice each)."""
    if v is None:
        raise invalid("prompt", "'prompt' is required")
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not v:
        raise invalid("prompt", f"'prompt' must be a string, token ids, or a non-empty list of either, got {_show(v)}")
    if all(_is_int(t) for t in v):
        return [_token_ids(v, vocab_size, "prompt")]
    if all(isinstance(p, str) for p in v):
        return list(v)
    if all(isinstance(p, list) for p in v):
        return [_token_ids(p, vocab_size, "prompt") for p in v]
    raise invalid("prompt", "'prompt' must be a string, a list of token ids, a list of strings or a list of "
                            "lists of token ids (not a mix)")


def _token_ids(v, vocab_size: int, param: str) -> list[int]:
    if not isinstance(v, list) or not v or not all(_is_int(t) for t in v):
        raise invalid(param, f"'{param}' token lists must be non-empty lists of integers")
    bad = [t for t in v if not 0 <= t < vocab_size]
    if bad:
        raise invalid(param, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return v


# ---------------------------------------------------------------------------- /v1/chat/completions


def chat_request(body: dict, vocab_size: int) -> tuple[list[dict], Params]:
    """A chat body: its messages as [{"role", "content": str}] and settings."""
    messages = _messages(body.get("messages"))
    want = boolean(body, "logprobs", False)
    top = integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise invalid("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    # max_completion_tokens is OpenAI's newer name for max_tokens
    max_tokens = integer(body, "max_completion_tokens", None, 1)
    max_tokens = integer(body, "max_tokens", max_tokens, 1)
    return messages, _common(body, vocab_size, (top or 0) if want else None, max_tokens)


def _messages(v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise invalid("messages", "'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, f"'{where}' must be an object with 'role' and 'content', got {_show(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role", f"'{where}.role' must be one of {', '.join(ROLES)}, got {_show(role)}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise invalid(f"{where}.content", f"'{where}.content' parts must all be text parts "
                                                  "({\"type\": \"text\", \"text\": ...}); this model reads text only")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise invalid(f"{where}.content", f"'{where}.content' must be a string, got {_show(content)}")
        if m.get("tool_calls"):
            raise invalid(f"{where}.tool_calls", "tool calls are not supported by this server")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


# ---------------------------------------------------------------------------- /tokenize, /detokenize


def tokenize_request(body: dict) -> tuple[str | None, list[dict] | None, bool]:
    """vLLM's /tokenize body: {"prompt": str} or {"messages": [...]}, and add_special_tokens (BOS)."""
    add_special = boolean(body, "add_special_tokens", True)
    if body.get("messages") is not None:
        return None, _messages(body["messages"]), add_special
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise invalid("prompt", "/tokenize needs 'prompt' (a string) or 'messages'")
    return prompt, None, add_special


def detokenize_request(body: dict, vocab_size: int) -> list[int]:
    tokens = body.get("tokens")
    if tokens == []:
        return []
    return _token_ids(tokens, vocab_size, "tokens")
