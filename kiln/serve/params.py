"""Request bodies checked field by field: a wrong type or range is a 400 naming the parameter.
Unknown fields are ignored (clients send `user`, `n=1`, ...); fields this server cannot honour
(`logprobs`, `n` > 1, `echo`, `best_of` > 1, `suffix`, tools) are refused rather than ignored."""

from __future__ import annotations

import dataclasses
import json
import math
import secrets

from kiln.serve.errors import invalid

MAX_STOPS = 4


@dataclasses.dataclass
class Sampling:
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    stream: bool
    priority: int
    include_usage: bool
    return_token_ids: bool
    ignore_eos: bool  # an extension (vLLM, llama.cpp): generate max_tokens even past end-of-sequence


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"the body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object", code="invalid_json")
    return body


def model_name(body: dict, served: dict) -> str:
    name = body.get("model")
    if name is None and len(served) == 1:
        return next(iter(served))
    if not isinstance(name, str):
        raise invalid("`model` must be a string naming a served model (GET /v1/models)", "model")
    if name not in served:
        raise invalid(f"the model '{name[:100]}' is not served here (GET /v1/models lists them)", "model",
                      "model_not_found")
    return name


def _number(body, key, default, lo, hi, integer=False):
    value = body.get(key, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or (not integer and not math.isfinite(value)):
        raise invalid(f"`{key}` must be {'an integer' if integer else 'a number'}", key)
    if not lo <= value <= hi:
        raise invalid(f"`{key}` must be between {lo} and {hi}; got {value}", key)
    return value


def _flag(body, key, default=False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"`{key}` must be true or false", key)
    return value


def sampling(body: dict, chat: bool) -> Sampling:
    for key, ok in (("n", lambda v: v in (None, 1)), ("best_of", lambda v: v in (None, 1)),
                    ("echo", lambda v: v in (None, False)), ("suffix", lambda v: v is None),
                    ("logprobs", lambda v: v in (None, False, 0)), ("top_logprobs", lambda v: v in (None, 0)),
                    ("tools", lambda v: v in (None, [])), ("functions", lambda v: v in (None, []))):
        if key in body and not ok(body[key]):
            raise invalid(f"`{key}` is not supported by this server", key, "unsupported_parameter")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, None, 1, 1 << 20, integer=True)
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if top_p <= 0.0:
        raise invalid("`top_p` must be greater than 0", "top_p")
    seed = body.get("seed")
    seed = secrets.randbits(63) if seed is None else _number(body, "seed", 0, -(1 << 63), (1 << 64) - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > MAX_STOPS:
        raise invalid(f"`stop` must be a string or a list of at most {MAX_STOPS} strings", "stop")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("`stream_options` must be an object", "stream_options")
    return Sampling(max_tokens, temperature, top_p, seed % (1 << 63), stop, _flag(body, "stream"),
                    _number(body, "priority", 0, -1000, 1000, integer=True),
                    _flag(options or {}, "include_usage"), _flag(body, "return_token_ids"), _flag(body, "ignore_eos"))


def prompt(body: dict) -> str | list[int]:
    value = body.get("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        if not value:
            raise invalid("`prompt` is empty", "prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    raise invalid("`prompt` must be a non-empty string or a list of token ids (one prompt per request)", "prompt")


def messages(body: dict) -> list[dict]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise invalid("`messages` must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise invalid(f"`messages[{i}]` must be an object with a string `role`", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise invalid(f"`messages[{i}].content` may only hold text parts", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise invalid(f"`messages[{i}].content` must be a string", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def embedding_input(body: dict) -> list[str]:
    value = body.get("input")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t for t in value):
        raise invalid("`input` must be a non-empty string or a list of non-empty strings", "input")
    if len(value) > 2048:
        raise invalid("`input` holds more than 2048 texts", "input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64", None):
        raise invalid("`encoding_format` must be 'float' or 'base64'", "encoding_format")
    return value
