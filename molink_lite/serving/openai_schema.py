"""What a valid OpenAI request is: every field of /v1/completions and /v1/chat/completions checked at
the edge, before anything reaches a pipeline, with errors in OpenAI's shape (:class:`ApiError`).

Numbers are type- and range-checked (clamped where OpenAI allows a value llama.cpp cannot take),
content parts and ``stream_options`` validated, and features that are not implemented (``tools``,
``response_format`` json, ``n > 1``, logprobs ...) refused with a 400 instead of silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import orjson
from aiohttp import web

from ..wire.protocol import (MIN_REPETITION_PENALTY, MIN_TEMPERATURE, MIN_TOP_P, SAMPLING_RANGES, SamplingError,
                              SamplingParams)

DEFAULT_COMPLETION_MAX_TOKENS = 16     # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 1024         # chat: until the model stops, capped (OpenAI: unlimited)
MAX_BODY_BYTES = 8 * 1024 * 1024

INT32_MAX = 2**31 - 1
MAX_STOP = 16                           # stop strings per request
MAX_STOP_CHARS = 1024                   # characters per stop string
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
# Sampling ranges are the protocol's (wire/protocol.py: SAMPLING_RANGES), one per field. The edge maps what
# OpenAI allows and llama.cpp's float32 samplers cannot take: a temperature or repetition penalty below
# MIN_TEMPERATURE (the choice is already the top token), and top_p 0 (keeps only the most likely token).
SEED_MOD = 2**32 - 1                   # llama.cpp seeds are uint32; 0xFFFFFFFF means "random"
# No vocabulary entry is this long (Gemma 3's longest: 48 bytes), so a text longer than this many
# bytes per context token cannot fit and is refused before stage 0 spends seconds tokenizing it.
MAX_BYTES_PER_TOKEN = 128


class ApiError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, etype: str = "invalid_request_error",
                 param: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.etype = status, message, code, etype
        self.param, self.headers = param, headers

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.etype, "code": self.code, "param": self.param}}
        return web.Response(status=self.status, body=orjson.dumps(body), content_type="application/json",
                            headers=self.headers)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _short(v: Any, n: int = 64) -> str:
    """A client's value, shortened for an error message."""
    s = v if isinstance(v, str) else repr(v)
    return s if len(s) <= n else s[:n] + "..."


# ---------------------------------------------------------------------- field validation
def _invalid(message: str, param: Optional[str]) -> ApiError:
    return ApiError(400, message, "invalid_value", param=param)


def _unsupported(message: str, param: str) -> ApiError:
    return ApiError(400, message, "unsupported_parameter", param=param)


def _number(body: dict, key: str, default: Optional[float], lo: float, hi: float) -> Optional[float]:
    """A JSON number in [lo, hi] (booleans, strings, non-finite values refused)."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _invalid(f"'{key}' must be a number", key)
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f) or not lo <= f <= hi:
        raise _invalid(f"'{key}' must be between {lo:g} and {hi:g}, got {_short(v)}", key)
    return f


def _integer(body: dict, key: str, default: Optional[int], lo: int, hi: int) -> Optional[int]:
    """A JSON integer in [lo, hi]; an integral float (40.0) counts, booleans do not."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _invalid(f"'{key}' must be an integer", key)
    if isinstance(v, float):
        if not math.isfinite(v) or not v.is_integer():
            raise _invalid(f"'{key}' must be an integer, got {_short(v)}", key)
        if not lo <= v <= hi:
            raise _invalid(f"'{key}' must be in {lo}..{hi}, got {_short(v)}", key)
        v = int(v)
    if not lo <= v <= hi:
        raise _invalid(f"'{key}' must be in {lo}..{hi}, got {_short(v)}", key)
    return v


def _boolean(body: dict, key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _invalid(f"'{key}' must be a boolean", key)
    return v


def _range(key: str) -> Tuple[float, float]:
    lo, hi, _ = SAMPLING_RANGES[key]
    return lo, hi


def parse_sampling(body: dict) -> SamplingParams:
    """OpenAI's sampling fields (plus llama.cpp's top_k, min_p, repeat penalty), mapped to :class:`SamplingParams`,
    which checks each against its one range (a 400 naming the field otherwise)."""
    temperature = _number(body, "temperature", 1.0, *_range("temperature"))
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)  # OpenAI allows 0: mapped below
    top_k = _integer(body, "top_k", 0, *_range("top_k"))
    min_p = _number(body, "min_p", 0.0, *_range("min_p"))
    presence = _number(body, "presence_penalty", 0.0, *_range("presence_penalty"))
    frequency = _number(body, "frequency_penalty", 0.0, *_range("frequency_penalty"))
    rep = None
    for key in ("repetition_penalty", "repeat_penalty"):
        r = _number(body, key, None, *_range("repetition_penalty"))
        if r is not None and r <= 0.0:
            raise _invalid(f"'{key}' must be in (0, {_range('repetition_penalty')[1]:g}], got {_short(body[key])}", key)
        rep = r if rep is None else rep
    seed = _integer(body, "seed", None, -2**63, 2**64 - 1)
    assert temperature is not None and top_p is not None and min_p is not None
    if 0.0 < temperature < MIN_TEMPERATURE:
        temperature = MIN_TEMPERATURE
    try:
        return SamplingParams(
            temperature=float(temperature), top_p=float(max(top_p, MIN_TOP_P)), top_k=int(top_k or 0),
            min_p=float(min_p), presence_penalty=float(presence or 0.0), frequency_penalty=float(frequency or 0.0),
            repetition_penalty=1.0 if rep is None else float(max(rep, MIN_REPETITION_PENALTY)),
            seed=None if seed is None else seed % SEED_MOD,
        )
    except SamplingError as e:
        raise _invalid(str(e), e.field) from None


def parse_max_tokens(body: dict, default: int) -> int:
    """``max_completion_tokens`` (preferred) or ``max_tokens``: an integer in 1..2^31-1."""
    v = None
    for key in ("max_tokens", "max_completion_tokens"):
        got = _integer(body, key, None, 1, INT32_MAX)
        v = got if got is not None else v
    return default if v is None else v


def parse_stop(body: dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    msg = (f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them, each at most "
           f"{MAX_STOP_CHARS} characters")
    if not isinstance(stop, list) or len(stop) > MAX_STOP:
        raise _invalid(msg, "stop")
    for s in stop:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            raise _invalid(msg, "stop")
    return stop


@dataclass
class StreamOptions:
    stream: bool
    include_usage: bool


def parse_stream(body: dict) -> StreamOptions:
    stream = _boolean(body, "stream", False)
    opts = body.get("stream_options")
    if opts is None:
        return StreamOptions(stream, False)
    if not isinstance(opts, dict):
        raise _invalid("'stream_options' must be an object or null", "stream_options")
    if not stream:
        raise _invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    inc = opts.get("include_usage")
    if inc is not None and not isinstance(inc, bool):
        raise _invalid("'stream_options.include_usage' must be a boolean", "stream_options.include_usage")
    return StreamOptions(stream, bool(inc))


def check_common(body: dict) -> None:
    """Fields both endpoints share: ``n`` and features this server does not have (400, not ignored)."""
    n = body.get("n")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, float)):
            raise _invalid("'n' must be an integer", "n")
        if n != 1:
            raise _unsupported("only n=1 is supported", "n")
    lb = body.get("logit_bias")
    if lb is not None:
        if not isinstance(lb, dict):
            raise _invalid("'logit_bias' must be an object", "logit_bias")
        if lb:
            raise _unsupported("'logit_bias' is not supported", "logit_bias")
    for key in ("tools", "functions"):
        v = body.get(key)
        if v is not None and v != []:
            raise _unsupported(f"'{key}' (tool / function calling) is not supported", key)
    for key in ("tool_choice", "function_call"):
        v = body.get(key)
        if v is not None and v != "none":
            raise _unsupported(f"'{key}' (tool / function calling) is not supported", key)
    if body.get("parallel_tool_calls") is not None:
        raise _unsupported("'parallel_tool_calls' (tool calling) is not supported", "parallel_tool_calls")
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
            raise _invalid("'response_format' must be an object with a 'type'", "response_format")
        if rf["type"] != "text":
            raise _unsupported(f"response_format type '{_short(rf['type'])}' is not supported (only 'text')",
                               "response_format")
    for key in ("audio", "prediction", "web_search_options"):
        if body.get(key) is not None:
            raise _unsupported(f"'{key}' is not supported", key)
    mod = body.get("modalities")
    if mod is not None and mod != ["text"]:
        raise _unsupported("only 'modalities': ['text'] is supported", "modalities")


def parse_messages(body: dict) -> List[dict]:
    """Chat messages as ``{"role", "content": str[, "name"]}`` for the template; text parts only."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _invalid(f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise _invalid(f"{where}.role must be one of {', '.join(CHAT_ROLES)}", f"{where}.role")
        c = m.get("content")
        if isinstance(c, list):
            texts = []
            for j, part in enumerate(c):
                pw = f"{where}.content[{j}]"
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise _invalid(f"{pw} must be an object with a 'type'", pw)
                if part["type"] != "text":
                    raise _unsupported(f"{pw}: content type '{_short(part['type'])}' is not supported "
                                       "(only 'text')", f"{pw}.type")
                if not isinstance(part.get("text"), str):
                    raise _invalid(f"{pw}.text must be a string", f"{pw}.text")
                texts.append(part["text"])
            c = "".join(texts)
        elif not isinstance(c, str):
            raise _invalid(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        for key in ("tool_calls", "function_call"):
            if m.get(key):
                raise _unsupported(f"{where}.{key}: tool / function calling is not supported", f"{where}.{key}")
        msg = {"role": role, "content": c}
        name = m.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise _invalid(f"{where}.name must be a string", f"{where}.name")
            msg["name"] = name
        out.append(msg)
    return out


def check_chat_only(body: dict) -> None:
    lp = body.get("logprobs")
    if lp is not None:
        if not isinstance(lp, bool):
            raise _invalid("'logprobs' must be a boolean", "logprobs")
        if lp:
            raise _unsupported("'logprobs' is not supported", "logprobs")
    if body.get("top_logprobs") not in (None, 0) or isinstance(body.get("top_logprobs"), bool):
        raise _unsupported("'top_logprobs' is not supported", "top_logprobs")


def check_completion_only(body: dict) -> None:
    lp = body.get("logprobs")
    if lp is not None and (isinstance(lp, bool) or lp != 0):
        raise _unsupported("'logprobs' is not supported", "logprobs")
    if body.get("echo") not in (None, False):
        raise _unsupported("'echo' is not supported", "echo")
    if body.get("suffix") not in (None, ""):
        raise _unsupported("'suffix' is not supported", "suffix")
    bo = body.get("best_of")
    if bo is not None:
        if isinstance(bo, bool) or not isinstance(bo, (int, float)):
            raise _invalid("'best_of' must be an integer", "best_of")
        if bo != 1:
            raise _unsupported("only best_of=1 is supported", "best_of")


def parse_prompt(body: dict) -> Any:
    """A completion prompt: a non-empty string, or a non-empty list of token ids (range checked later)."""
    prompt = body.get("prompt")
    msg = "'prompt' must be a string, a list with one string, or a list of token ids"
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise _invalid("'prompt' is empty", "prompt")
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise _invalid(msg, "prompt")
    if all(isinstance(t, (str, list)) for t in prompt):
        raise _unsupported("batched prompts (several prompts in one request) are not supported", "prompt")
    for t in prompt:
        if isinstance(t, bool) or not isinstance(t, int):
            raise _invalid(msg, "prompt")
    return prompt
