"""What a valid OpenAI request is: every field of /v1/completions and /v1/chat/completions checked at
the edge, before anything reaches a pipeline, with errors in OpenAI's shape (:class:`ApiError`).

Numbers are type- and range-checked (clamped where OpenAI allows a value llama.cpp cannot take),
content parts, tool calls in messages and ``stream_options`` validated, and features that are not implemented
(``best_of`` > 1, ``suffix``, ``logit_bias``, the deprecated ``functions``, non-text content ...) refused with a
400 instead of silently ignored. Grammars (``response_format``, ``grammar``, ``json_schema``) and tools are
checked by :mod:`.grammar` and :mod:`.tools`; what is parsed here is what shapes the answer
(:class:`OutputOptions`: ``n``, logprobs, ``echo``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import orjson
from aiohttp import web

from ..wire.protocol import (MAX_LOGPROBS, MIN_REPETITION_PENALTY, MIN_TEMPERATURE, MIN_TOP_P, SAMPLING_RANGES,
                              SamplingError, SamplingParams)
from .images import MAX_IMAGES, MEDIA_MARKER

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
MAX_N = 16                              # choices per request (n); they share one prefill
MAX_TOOL_CALLS = 128                    # tool calls in one message of the history


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


def parse_max_tokens(body: dict, default: int, lo: int = 1) -> int:
    """``max_completion_tokens`` (preferred) or ``max_tokens``: an integer in lo..2^31-1 (``lo`` 0: a completion
    with ``echo`` may only score its prompt)."""
    v = None
    for key in ("max_tokens", "max_completion_tokens"):
        got = _integer(body, key, None, 0, INT32_MAX)
        if got is not None and got < lo:
            raise _invalid(f"'{key}' must be in 1..{INT32_MAX} (0 only with 'echo': true, to score the prompt), "
                           f"got {got}", key)
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


@dataclass(frozen=True)
class OutputOptions:
    """What shapes the answer: ``n`` choices (one shared prefill), each token's logprob with ``logprobs`` top
    alternatives (-1: no logprobs), and ``echo`` (completions: the prompt, and its logprobs, come first)."""

    n: int = 1
    logprobs: int = -1
    echo: bool = False


def parse_n(body: dict) -> int:
    """``n``: how many choices, 1..MAX_N (streamed ones carry their ``index``)."""
    n = _integer(body, "n", 1, 1, MAX_N)
    assert n is not None
    return n


def parse_completion_output(body: dict) -> OutputOptions:
    """/v1/completions: ``n``, ``logprobs`` (an integer 0..20: top alternatives per token) and ``echo``."""
    lp = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    return OutputOptions(parse_n(body), -1 if lp is None else lp, _boolean(body, "echo", False))


def parse_chat_output(body: dict) -> OutputOptions:
    """/v1/chat/completions: ``n``, ``logprobs`` (a boolean) and ``top_logprobs`` (0..20, with ``logprobs``)."""
    lp = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top and not lp:
        raise _invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return OutputOptions(parse_n(body), (top or 0) if lp else -1, False)


def check_common(body: dict) -> None:
    """Features this server does not have, on both endpoints (400, not ignored)."""
    lb = body.get("logit_bias")
    if lb is not None:
        if not isinstance(lb, dict):
            raise _invalid("'logit_bias' must be an object", "logit_bias")
        if lb:
            raise _unsupported("'logit_bias' is not supported", "logit_bias")
    v = body.get("functions")
    if v is not None and v != []:
        raise _unsupported("'functions' (deprecated by OpenAI) is not supported: use 'tools'", "functions")
    v = body.get("function_call")
    if v is not None and v != "none":
        raise _unsupported("'function_call' (deprecated by OpenAI) is not supported: use 'tool_choice'",
                           "function_call")
    for key in ("audio", "prediction", "web_search_options"):
        if body.get(key) is not None:
            raise _unsupported(f"'{key}' is not supported", key)
    mod = body.get("modalities")
    if mod is not None and mod != ["text"]:
        raise _unsupported("only 'modalities': ['text'] is supported", "modalities")


def _tool_calls(v: Any, where: str) -> List[dict]:
    """An assistant message's ``tool_calls``: [{id, type: "function", function: {name, arguments}}]."""
    if not isinstance(v, list) or len(v) > MAX_TOOL_CALLS:
        raise _invalid(f"{where} must be a list of at most {MAX_TOOL_CALLS} tool calls", where)
    out = []
    for j, c in enumerate(v):
        w = f"{where}[{j}]"
        if not isinstance(c, dict):
            raise _invalid(f"{w} must be an object with 'id', 'type' and 'function'", w)
        if c.get("type", "function") != "function":
            raise _unsupported(f"{w}.type: only 'function' tool calls are supported", f"{w}.type")
        cid = c.get("id", "")
        if not isinstance(cid, str):
            raise _invalid(f"{w}.id must be a string", f"{w}.id")
        fn = c.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _invalid(f"{w}.function must be an object with a 'name'", f"{w}.function")
        args = fn.get("arguments", "")
        if not isinstance(args, (str, dict)):
            raise _invalid(f"{w}.function.arguments must be a JSON string", f"{w}.function.arguments")
        out.append({"id": cid, "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def parse_messages(body: dict, images: Optional[List[Tuple[str, str]]] = None) -> List[dict]:
    """Chat messages as ``{"role", "content": str | None[, "name"][, "tool_calls"][, "tool_call_id"]}`` for the
    template; text parts, and with ``images`` (a list) ``image_url`` parts too: each becomes the media marker in
    the text and (its URL, where it is) is appended to ``images``. ``content`` is None only for an assistant message with
    ``tool_calls``."""
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
        if m.get("function_call"):
            raise _unsupported(f"{where}.function_call (deprecated by OpenAI) is not supported: use 'tool_calls'",
                               f"{where}.function_call")
        calls = None
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise _invalid(f"{where}.tool_calls: only assistant messages carry tool calls", f"{where}.tool_calls")
            calls = _tool_calls(m["tool_calls"], f"{where}.tool_calls") or None
        c = m.get("content")
        if isinstance(c, list):
            texts = []
            for j, part in enumerate(c):
                pw = f"{where}.content[{j}]"
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise _invalid(f"{pw} must be an object with a 'type'", pw)
                if part["type"] == "image_url" and images is not None:
                    iu = part.get("image_url")
                    url = iu.get("url") if isinstance(iu, dict) else iu
                    if not isinstance(url, str) or not url:
                        raise _invalid(f"{pw}.image_url must be an object with a 'url' string", f"{pw}.image_url")
                    if role != "user":
                        raise _invalid(f"{pw}: images go in user messages", f"{pw}.type")
                    if len(images) >= MAX_IMAGES:
                        raise _invalid(f"at most {MAX_IMAGES} images in one request", f"{pw}.image_url")
                    images.append((url, pw))
                    texts.append(MEDIA_MARKER)
                    continue
                if part["type"] != "text":
                    raise _unsupported(f"{pw}: content type '{_short(part['type'])}' is not supported "
                                       f"(only 'text'{' and image_url' if images is not None else ''})",
                                       f"{pw}.type")
                if not isinstance(part.get("text"), str):
                    raise _invalid(f"{pw}.text must be a string", f"{pw}.text")
                texts.append(part["text"])
            c = "".join(texts)
        elif c is None and calls:
            pass
        elif not isinstance(c, str):
            raise _invalid(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        msg: Dict[str, Any] = {"role": role, "content": c}
        name = m.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise _invalid(f"{where}.name must be a string", f"{where}.name")
            msg["name"] = name
        if calls:
            msg["tool_calls"] = calls
        tcid = m.get("tool_call_id")
        if tcid is not None:
            if role != "tool" or not isinstance(tcid, str):
                raise _invalid(f"{where}.tool_call_id must be a string, on a tool message", f"{where}.tool_call_id")
            msg["tool_call_id"] = tcid
        out.append(msg)
    return out


def check_completion_only(body: dict) -> None:
    """What /v1/completions refuses: ``suffix``, ``best_of`` > 1 and tools (a chat feature)."""
    if body.get("suffix") not in (None, ""):
        raise _unsupported("'suffix' (fill-in-the-middle) is not supported", "suffix")
    bo = body.get("best_of")
    if bo is not None:
        if isinstance(bo, bool) or not isinstance(bo, (int, float)):
            raise _invalid("'best_of' must be an integer", "best_of")
        if bo != 1:
            raise _unsupported("only best_of=1 is supported (use 'n' for several choices; ranking them by "
                               "likelihood is not implemented)", "best_of")
    for key in ("tools", "tool_choice", "parallel_tool_calls"):
        v = body.get(key)
        if v is not None and v != [] and v != "none":
            raise _unsupported(f"'{key}' is a /v1/chat/completions field", key)


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
