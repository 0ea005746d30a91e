"""Tool calling: the request's ``tools`` / ``tool_choice`` checked, the model's tool-call format, grammars that
force a call, and a streaming parser that takes the calls out of the generated text.

Formats (:func:`detect_format`, from the GGUF's chat template, as llama-server's ``common/chat`` does):

* ``hermes``: Hermes 2 Pro / Qwen 2.5 / Qwen 3: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  one block per call;
* ``llama3``: Llama 3.1 / 3.2 / 3.3: ``{"name": ..., "parameters": {...}}`` (optionally ``"type": "function"``,
  optionally after ``<|python_tag|>``);
* ``mistral``: Mistral Nemo / Small / Large: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (and the newer
  ``[TOOL_CALLS]name[ARGS]{...}``). ``[TOOL_CALLS]`` is a control token, which the stage's detokenizer renders as
  nothing, so a bare ``[{"name": ...}]`` array counts too;
* ``generic``: any other template (or one without tool support, or a llama.cpp built-in one): the model is told to
  answer ``{"tool_calls": [{"name": ..., "arguments": {...}}]}`` or ``{"response": "..."}`` and a grammar holds it
  to that (llama-server's generic format).

Grammars (:func:`tool_grammar`): ``tool_choice`` ``required`` or a named function forces a call in the format from
the first token; ``auto`` constrains a call only once the model starts one (a lazy grammar triggered by the
format's start word: ``<tool_call>``, ``[TOOL_CALLS]``); ``llama3`` has no start word, so ``auto`` runs free there
and the parser alone finds the call; ``generic`` always runs under its grammar (JSON either way).

:func:`plan_chat` puts it together for a chat request (prompt via :mod:`.chat`, grammar, parser).

Nothing here imports llama.cpp (see :mod:`.grammar`).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .grammar import GrammarError, SchemaGrammar, grammar_for_request

FORMATS = ("hermes", "llama3", "mistral", "generic")
MAX_TOOLS = 128
MAX_TOOLS_BYTES = 256 << 10  # all tool definitions, serialized
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ToolError(ValueError):
    """A request's ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` cannot be used (a 400 about ``param``)."""

    def __init__(self, message: str, param: str = "tools"):
        super().__init__(message)
        self.param = param


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object


# --------------------------------------------------------------------------- #
# the request
# --------------------------------------------------------------------------- #

def parse_tools(body: dict) -> List[dict]:
    """The request's ``tools``, checked: ``[{"type": "function", "function": {"name", "description"?,
    "parameters"?, "strict"?}}]``; ``parameters`` defaults to an object without properties. [] if none."""
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise ToolError(f"'{legacy}' (deprecated) is not supported: use 'tools' / 'tool_choice'", legacy)
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolError("'tools' must be a list of tools", "tools")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"'tools' has {len(tools)} tools: at most {MAX_TOOLS} are supported", "tools")
    try:
        size = len(json.dumps(tools, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError, RecursionError):
        raise ToolError("'tools' must be JSON", "tools") from None
    if size > MAX_TOOLS_BYTES:
        raise ToolError(f"'tools' is {size} bytes: at most {MAX_TOOLS_BYTES} are supported", "tools")
    out, seen = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function":
            raise ToolError(f"{where}.type must be 'function'", f"{where}.type")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise ToolError(f"{where}.function must be an object with a 'name'", f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ToolError(f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-'",
                            f"{where}.function.name")
        if name in seen:
            raise ToolError(f"{where}.function.name: two tools are named '{name}'", f"{where}.function.name")
        seen.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        elif not isinstance(params, dict) or params.get("type", "object") != "object":
            raise ToolError(f"{where}.function.parameters must be a JSON schema of an object",
                            f"{where}.function.parameters")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ToolError(f"{where}.function.strict must be a boolean", f"{where}.function.strict")
        f2 = {"name": name}
        if desc is not None:
            f2["description"] = desc
        f2["parameters"] = params
        if strict is not None:
            f2["strict"] = strict
        out.append({"type": "function", "function": f2})
    return out


def parse_tool_choice(body: dict, tools: List[dict]) -> str:
    """``"none"`` | ``"auto"`` | ``"required"`` | the name of the one function to call (``{"type": "function",
    "function": {"name": ...}}``). Default: ``auto`` with tools, ``none`` without."""
    tc = body.get("tool_choice")
    names = [t["function"]["name"] for t in tools]
    if tc is None:
        return "auto" if tools else "none"
    if isinstance(tc, str):
        if tc not in ("none", "auto", "required"):
            raise ToolError("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", "tool_choice")
        if tc == "required" and not tools:
            raise ToolError("'tool_choice' is 'required' but no 'tools' are given", "tool_choice")
        return tc
    if isinstance(tc, dict) and tc.get("type") == "function":
        fn = tc.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise ToolError("'tool_choice.function.name' must be a string", "tool_choice.function.name")
        if name not in names:
            raise ToolError(f"'tool_choice' names '{name[:64]}', which is not in 'tools'", "tool_choice.function.name")
        return name
    raise ToolError("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
                    "{\"name\": ...}}", "tool_choice")


def parse_parallel(body: dict) -> bool:
    v = body.get("parallel_tool_calls")
    if v is None:
        return True
    if not isinstance(v, bool):
        raise ToolError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    return v


# --------------------------------------------------------------------------- #
# formats and grammars
# --------------------------------------------------------------------------- #

def detect_format(template: Optional[str]) -> str:
    """The tool-call format a chat template's model was trained on (see the module doc); ``generic`` if unknown."""
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<tool_call>" in t and "<function=" not in t:  # Qwen3-Coder's XML calls are not JSON: generic
        return "hermes"
    if "<|python_tag|>" in t or ("<|start_header_id|>" in t and "ipython" in t):
        return "llama3"
    return "generic"


TRIGGERS = {"hermes": ("<tool_call>",), "mistral": ("[TOOL_CALLS]",)}


def generic_instructions(tools: Optional[List[dict]], choice: str, parallel: bool) -> str:
    """The system text of the generic format: the tools (when the template cannot show them) and the JSON to answer."""
    parts = []
    if tools:
        parts.append("You can call any of the following tools to satisfy the user's requests:\n"
                     + json.dumps([t["function"] for t in tools], ensure_ascii=False, indent=2))
    one = "" if parallel else " (one call)"
    call = '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments as a JSON object>}}]}'
    if choice == "auto":
        parts.append("Respond in JSON format, either with `tool_calls` (a request to call tools" + one + ") or with "
                     "`response` (your reply to the user's request):\n" + call + '\nor\n{"response": "<your reply>"}')
    elif choice == "required":
        parts.append("Respond in JSON format with `tool_calls` (a request to call tools" + one + "):\n" + call)
    else:
        parts.append(f"Respond in JSON format with `tool_calls`, calling the tool `{choice}`" + one + ":\n" + call)
    return "\n\n".join(parts)


def tool_grammar(fmt: str, tools: List[dict], choice: str, parallel: bool) -> Tuple[str, Tuple[str, ...]]:
    """GBNF and lazy trigger words for a tool call in ``fmt`` (``("", ())``: no grammar).

    ``choice``: ``auto`` (a call is optional: lazy grammar from the format's start word; generic: call or
    response), ``required`` (some call), or a tool name (that call). Raises :class:`ToolError` (the tool whose
    parameters cannot be turned into a grammar)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown tool-call format {fmt!r}")
    if choice == "none" or (fmt == "llama3" and choice == "auto"):
        return "", ()
    allowed = [(i, t["function"]) for i, t in enumerate(tools) if choice in ("auto", "required")
               or t["function"]["name"] == choice]
    g = SchemaGrammar("the tool-call grammar")
    args_key = "parameters" if fmt == "llama3" else "arguments"
    objs = []
    for i, fn in allowed:
        where = f"tools[{i}].function.parameters"
        try:
            params = g.resolve(fn["parameters"], where)
        except GrammarError as e:
            raise ToolError(str(e), where) from None
        objs.append((where, {"type": "object", "properties": {"name": {"const": fn["name"]}, args_key: params},
                             "required": ["name", args_key]}))
    if fmt == "generic":
        item = objs[0][1] if len(objs) == 1 else {"anyOf": [o for _, o in objs]}
        arr: Dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
        if not parallel:
            arr["maxItems"] = 1
        schema: Dict[str, Any] = {"type": "object", "properties": {"tool_calls": arr}, "required": ["tool_calls"]}
        if choice == "auto":
            schema = {"anyOf": [schema, {"type": "object", "properties": {"response": {"type": "string"}},
                                         "required": ["response"]}]}
        try:
            g.add(schema, "")
            return _text(g, "tools"), ()
        except GrammarError as e:
            raise ToolError(str(e), "tools") from None
    rules = []
    for where, obj in objs:
        try:
            rules.append(g.add(obj, f"{obj['properties']['name']['const']}-call"))
        except GrammarError as e:
            raise ToolError(str(e), where) from None
    call = g.rule("tool-call-object", " | ".join(rules))
    if fmt == "hermes":
        block = g.rule("tool-call", f'"<tool_call>" "\\n"? {call} "\\n"? "</tool_call>"')
        g.rule("root", f'{block} ("\\n" "\\n"? {block})*' if parallel else block)
    elif fmt == "mistral":
        many = f' ("," space {call})*' if parallel else ""
        g.rule("root", f'"[TOOL_CALLS]" " "? "[" space {call}{many} "]" space')
    else:  # llama3: one call (Llama 3.x makes one call per turn)
        g.rule("root", call)
    return _text(g, "tools"), TRIGGERS.get(fmt, ()) if choice == "auto" else ()


def _text(g: SchemaGrammar, param: str) -> str:
    try:
        return g.text()
    except GrammarError as e:
        raise ToolError(str(e), param) from None


# --------------------------------------------------------------------------- #
# the parser
# --------------------------------------------------------------------------- #

_ALNUM = string.ascii_letters + string.digits
_WS = object()  # optional whitespace in a start pattern


def new_call_id(fmt: str = "") -> str:
    """``call_`` and 24 random letters/digits (OpenAI's shape); Mistral's templates insist on 9 letters/digits."""
    if fmt == "mistral":
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def _match(s: str, i: int, seq: Sequence[Any]) -> Union[int, bool, None]:
    """Match the start pattern ``seq`` (literals, tuples of alternative literals, ``_WS``) at ``s[i:]``.

    The end index when it matches fully; True when ``s`` ends while it could still match; None when it cannot."""
    for k, el in enumerate(seq):
        if el is _WS:
            j = i
            while j < len(s) and s[j].isspace() and j - i < 32:
                j += 1
            if j == len(s):
                return True
            if s[j].isspace():
                return None
            i = j
            continue
        alts = el if isinstance(el, tuple) else (el,)
        full, partial = None, False
        for lit in alts:
            got = s[i:i + len(lit)]
            if got == lit:
                full = i + len(lit)
            elif len(got) < len(lit) and lit.startswith(got):
                partial = True
        if full is not None:
            i = full
        elif partial:
            return True
        else:
            return None
    return i


# start patterns per format: (kind, pattern)
_STARTS: Dict[str, List[Tuple[str, Sequence[Any]]]] = {
    "hermes": [("tag", ("<tool_call>",))],
    "llama3": [("tag", ("<|python_tag|>",)), ("json", ("{", _WS, ('"name"', '"type"'), _WS, ":"))],
    "mistral": [("tag", ("[TOOL_CALLS]",)), ("json", ("[", _WS, "{", _WS, '"name"', _WS, ":"))],
}
_HERMES_END = "</tool_call>"


class _Span:
    """Incremental scan for the end of the JSON object / array that starts at ``s[start]``."""

    def __init__(self, start: int):
        self.start, self.pos, self.depth, self.in_str, self.esc = start, start, 0, False, False

    def end(self, s: str) -> Optional[int]:
        for j in range(self.pos, len(s)):
            c = s[j]
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
            elif c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    self.pos = j + 1
                    return j + 1
        self.pos = len(s)
        return None


_LOW_PREFIX = re.compile(r"(\\(u[0-9a-fA-F]{0,3})?)?")
_UNESC = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/", "\\": "\\", '"': '"'}


def _decode_json_string(raw: str) -> Tuple[str, int, bool]:
    """Decode a JSON string body from its start: (text, characters consumed, closed). Stops before an incomplete
    escape (more text may complete it)."""
    out, i, n = [], 0, len(raw)
    while i < n:
        c = raw[i]
        if c == '"':
            return "".join(out), i + 1, True
        if c != "\\":
            out.append(c)
            i += 1
            continue
        if i + 1 >= n:
            break
        e = raw[i + 1]
        if e != "u":
            out.append(_UNESC.get(e, e))
            i += 2
            continue
        if i + 6 > n:
            break
        try:
            code = int(raw[i + 2:i + 6], 16)
        except ValueError:
            out.append(raw[i:i + 6])
            i += 6
            continue
        if 0xD800 <= code < 0xDC00:  # a high surrogate: wait for its low half
            rest = raw[i + 6:i + 12]
            if len(rest) < 6 and _LOW_PREFIX.fullmatch(rest):
                break
            if rest[:2] == "\\u":
                try:
                    low = int(rest[2:], 16)
                except ValueError:
                    low = 0
                if 0xDC00 <= low < 0xE000:
                    out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                    i += 12
                    continue
            out.append("\ufffd")
            i += 6
            continue
        out.append(chr(code) if not 0xDC00 <= code < 0xE000 else "\ufffd")
        i += 6
    return "".join(out), i, False


class ToolCallParser:
    """Takes the tool calls of format ``fmt`` out of generated text, piece by piece.

    :meth:`feed` returns the content that is safe to show now (a possible start of a call is held back, and so is
    trailing whitespace) and the calls completed so far, each with its index in the response; :meth:`finish`
    returns the rest. Fed piece by piece or whole, the content and the calls are the same (ids aside: random).
    A call naming a tool not in ``tool_names`` (when given), or one that is not valid JSON, stays content.
    Whitespace around calls is dropped."""

    def __init__(self, fmt: str, tool_names: Sequence[str] = ()):
        if fmt not in FORMATS:
            raise ValueError(f"unknown tool-call format {fmt!r}")
        self.fmt = fmt
        self.names = frozenset(tool_names)
        self.n_calls = 0
        self._buf = ""
        self._hold = ""          # trailing whitespace of the content, not shown yet
        self._kind: Optional[str] = None  # None: text; else the kind of call being read
        self._span: Optional[_Span] = None
        self._searched = 0       # hermes: where to look for </tool_call> next
        self._gstate = "start"   # generic: start | plain | resp | after | json
        self._finished = False
        self._after_call = False

    # -- output helpers --
    def _emit(self, out: List[str], text: str) -> None:
        if not text:
            return
        t = self._hold + text
        s = t.rstrip()
        self._hold = t[len(s):]
        if s:
            out.append(s)

    def _call(self, calls: List[Tuple[int, ToolCall]], name: str, args: Any, cid: Any = None) -> None:
        if not (self.fmt == "mistral" and isinstance(cid, str) and re.fullmatch(r"[A-Za-z0-9]{9}", cid)):
            cid = new_call_id(self.fmt)
        calls.append((self.n_calls, ToolCall(cid, name, json.dumps(args, ensure_ascii=False))))
        self.n_calls += 1
        self._after_call = True
        self._hold = ""  # whitespace before a call is not content

    def _as_call(self, obj: Any) -> Optional[Tuple[str, dict, Any]]:
        """(name, arguments, id) of one call object, or None if it is not a call to a known tool."""
        if not isinstance(obj, dict):
            return None
        if isinstance(obj.get("function"), dict) and "name" not in obj:  # OpenAI-shaped
            obj = dict(obj["function"], id=obj.get("id"))
        name = obj.get("name")
        if not isinstance(name, str) or (self.names and name not in self.names):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args, strict=False) if args.strip() else {}
            except ValueError:
                return None
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return None
        return name, args, obj.get("id")

    def _json_calls(self, text: str) -> Optional[List[Tuple[str, dict, Any]]]:
        """The calls in JSON text: one call object or a list of them (all must be calls), else None."""
        try:
            v = json.loads(text, strict=False)
        except ValueError:
            return None
        items = v if isinstance(v, list) else [v]
        got = [self._as_call(x) for x in items]
        if not got or any(c is None for c in got):
            return None
        return got  # type: ignore[return-value]

    # -- public --
    def feed(self, text: str) -> Tuple[str, List[Tuple[int, ToolCall]]]:
        if self._finished:
            raise RuntimeError("feed after finish")
        self._buf += text
        out: List[str] = []
        calls: List[Tuple[int, ToolCall]] = []
        self._scan(out, calls, final=False)
        return "".join(out), calls

    def finish(self) -> Tuple[str, List[Tuple[int, ToolCall]]]:
        if self._finished:
            return "", []
        out: List[str] = []
        calls: List[Tuple[int, ToolCall]] = []
        self._scan(out, calls, final=True)
        self._finished = True
        if self._buf:
            self._emit(out, self._buf)
            self._buf = ""
        if self.n_calls == 0 and self._hold:
            out.append(self._hold)
        self._hold = ""
        return "".join(out), calls

    # -- scanning --
    def _scan(self, out: List[str], calls: List[Tuple[int, ToolCall]], final: bool) -> None:
        if self.fmt == "generic":
            self._scan_generic(out, calls, final)
            return
        while True:
            if self._kind is None:
                if not self._scan_text(out, final):
                    return
            elif not self._scan_call(out, calls, final):
                return

    def _scan_text(self, out: List[str], final: bool) -> bool:
        """Emit text up to the next call start; True when a call starts (``_kind`` set, ``_buf`` begins with it)."""
        s = self._buf
        if self._after_call:  # Llama 3 may separate calls with ';'
            j = len(s) - len(s.lstrip())
            if j < len(s):
                self._after_call = False
                if s[j] == ";" and self.fmt == "llama3":
                    s = s[:j] + s[j + 1:]
        starts = _STARTS[self.fmt]
        firsts = {p[0][0] for _, p in starts}
        i = 0
        while i < len(s):
            if s[i] in firsts:
                for kind, pat in starts:
                    m = _match(s, i, pat)
                    if m is True and not final:
                        self._emit(out, s[:i])
                        self._buf = s[i:]
                        return False
                    if isinstance(m, int) and m is not True:
                        self._emit(out, s[:i])
                        self._buf = s[i:]
                        self._kind = kind
                        self._span = None
                        self._searched = 0
                        return True
            i += 1
        self._emit(out, s)
        self._buf = ""
        return False

    def _fail(self, out: List[str], upto: int) -> None:
        """The text up to ``upto`` was not a call after all: it is content."""
        self._emit(out, self._buf[:upto])
        self._buf = self._buf[upto:]
        self._kind = None
        self._span = None

    def _scan_call(self, out: List[str], calls: List[Tuple[int, ToolCall]], final: bool) -> bool:
        """Read the call at the start of ``_buf``; True when it is done (a call, or content after all)."""
        s, kind = self._buf, self._kind
        if self.fmt == "hermes":
            tag = "<tool_call>"
            e = s.find(_HERMES_END, max(len(tag), self._searched))
            if e < 0:
                self._searched = max(len(tag), len(s) - len(_HERMES_END) + 1)
                if not final:
                    return False
                body, used = s[len(tag):], len(s)
            else:
                body, used = s[len(tag):e], e + len(_HERMES_END)
            got = self._json_calls(body.strip())
            if got is None:  # some text before/after the JSON object?
                b = body.strip()
                k = b.find("{")
                if k >= 0:
                    sp = _Span(k)
                    end = sp.end(b)
                    if end is not None and not b[end:].strip():
                        got = self._json_calls(b[k:end])
            if got is None:
                self._fail(out, used)
                return True
            self._buf = s[used:]
            self._kind = None
            for name, args, cid in got:
                self._call(calls, name, args, cid)
            return True
        # llama3 / mistral
        j = 0
        if kind == "tag":
            tag = "<|python_tag|>" if self.fmt == "llama3" else "[TOOL_CALLS]"
            j = len(tag)
            while j < len(s) and s[j].isspace():
                j += 1
            if j == len(s):
                if final:
                    self._fail(out, len(s))
                return final
            if self.fmt == "mistral" and s[j] != "[":
                return self._mistral_named(out, calls, final, j)
            if s[j] not in "{[":
                self._fail(out, len(tag))  # e.g. Llama's python calls (builtin tools): text
                return True
        end = self._value_end(j, out, final)
        if end is None:
            return final
        got = self._json_calls(s[j:end])
        if got is None:
            self._fail(out, end)
            return True
        self._take_calls(calls, end, got)
        return True

    def _value_end(self, start: int, out: List[str], final: bool) -> Optional[int]:
        """Where the JSON value that starts at ``start`` of the buffer ends, or None while it is still open (then
        the caller returns ``final``; at the end of the output an open value is text)."""
        if self._span is None:
            self._span = _Span(start)
        end = self._span.end(self._buf)
        if end is None and final:
            self._fail(out, len(self._buf))
        return end

    def _take_calls(self, calls: List[Tuple[int, ToolCall]], end: int, got) -> None:
        """The calls parsed from the buffer up to ``end``: out, and the buffer goes on after them."""
        self._buf = self._buf[end:]
        self._kind = None
        self._span = None
        for call in got:
            self._call(calls, *call)

    def _mistral_named(self, out: List[str], calls: List[Tuple[int, ToolCall]], final: bool, j: int) -> bool:
        """``[TOOL_CALLS]name[ARGS]{...}`` (Mistral's v11 templates; ``[ARGS]`` may render as nothing)."""
        s = self._buf
        m = re.match(r"([A-Za-z0-9_-]{1,64})(\[ARGS\]|\[ARGS|\[ARG|\[AR|\[A|\[)?\s*", s[j:])
        if m is None:
            self._fail(out, j)
            return True
        k = j + m.end()
        if k == len(s) and not final:
            return False
        if k >= len(s) or s[k] != "{" or (m.group(2) not in (None, "[ARGS]")):
            self._fail(out, k if k <= len(s) else len(s))
            return True
        end = self._value_end(k, out, final)
        if end is None:
            return final
        try:
            call = self._as_call({"name": m.group(1), "arguments": json.loads(s[k:end], strict=False)})
        except ValueError:
            call = None
        if call is None:
            self._fail(out, end)
            return True
        self._take_calls(calls, end, [call])
        return True

    # -- generic: {"tool_calls": [...]} | {"response": "..."} | text --
    _RESP = ("{", _WS, '"response"', _WS, ":", _WS, '"')

    def _scan_generic(self, out: List[str], calls: List[Tuple[int, ToolCall]], final: bool) -> None:
        while True:
            st, s = self._gstate, self._buf
            if st == "plain":
                self._emit(out, s)
                self._buf = ""
                return
            if st == "after":  # the rest of {"response": "..."}: not content
                self._buf = ""
                return
            if st == "start":
                k = len(s) - len(s.lstrip())
                if k == len(s):
                    return  # only whitespace so far (finish() shows it)
                if s[k] != "{":
                    self._gstate = "plain"
                    continue
                m = _match(s, k, self._RESP)
                if m is True and not final:
                    return
                if isinstance(m, int) and m is not True:
                    self._buf = s[m:]
                    self._gstate = "resp"
                    continue
                self._buf = s[k:]
                self._span = _Span(0)
                self._gstate = "json"
                continue
            if st == "resp":
                text, used, closed = _decode_json_string(s)
                self._buf = s[used:]
                if text:
                    out.extend([self._hold, text] if self._hold else [text])
                    self._hold = ""
                if closed:
                    self._gstate = "after"
                    continue
                if final and self._buf:  # cut inside an escape: show what is left as it is
                    out.append(self._buf)
                    self._buf = ""
                return
            if st == "json":
                assert self._span is not None
                end = self._span.end(s)
                if end is None:
                    if final:
                        self._gstate = "plain"
                        continue
                    return
                try:
                    v = json.loads(s[:end], strict=False)
                except ValueError:
                    v = None
                got = None
                if isinstance(v, dict):
                    if isinstance(v.get("tool_calls"), list):
                        got = [self._as_call(x) for x in v["tool_calls"]]
                    elif isinstance(v.get("tool_call"), dict):
                        got = [self._as_call(v["tool_call"])]
                    elif "response" in v and len(v) == 1:
                        r = v["response"]
                        self._emit(out, r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
                        self._buf = s[end:]
                        self._gstate = "after"
                        continue
                if not got or any(c is None for c in got):
                    self._gstate = "plain"
                    continue
                for name, args, cid in got:  # type: ignore[misc]
                    self._call(calls, name, args, cid)
                self._buf = s[end:]
                self._gstate = "plain"


# --------------------------------------------------------------------------- #
# a chat request's plan
# --------------------------------------------------------------------------- #

@dataclass
class ChatPlan:
    prompt: str
    add_special: bool
    stop: List[str]
    grammar: str = ""                      # GBNF for the last stage ("" = none)
    triggers: Tuple[str, ...] = ()         # lazy grammar: it applies from the first of these words on
    parser: Optional[ToolCallParser] = None  # takes tool calls out of the output (None: no tools)
    tool_format: str = ""                  # hermes | llama3 | mistral | generic ("" without tools)


def plan_chat(body: dict, messages: List[dict], *, template: Optional[str], arch: str, bos: str = "",
              eos: str = "", builtin: Optional[str] = None) -> ChatPlan:
    """Prompt, grammar and tool-call parser of a chat request.

    Reads ``tools``, ``tool_choice``, ``parallel_tool_calls`` and the structured-output fields
    (``response_format`` / ``json_schema`` / ``grammar``, :func:`~.grammar.grammar_for_request`) from ``body``;
    ``messages`` are the request's messages as checked (``role``, ``content``, and ``tool_calls`` /
    ``tool_call_id`` / ``name`` where given). Raises :class:`ToolError` / :class:`.grammar.GrammarError`
    (both ValueError with a ``param``) for a bad request, :class:`.chat.ChatTemplateError` if the template fails.

    Without tools (or ``tool_choice: "none"``): the plain prompt, with the structured-output grammar if asked.
    With tools: ``required`` / a named function get a grammar that forces a call in the model's format; ``auto``
    a lazy grammar (``triggers``) where the format has a start word; ``parser`` takes the calls out of the text.
    Tools and a structured-output grammar together are refused (one grammar per sequence)."""
    tools = parse_tools(body)
    choice = parse_tool_choice(body, tools)
    parallel = parse_parallel(body)
    response_grammar = grammar_for_request(body)
    if not tools or choice == "none":
        from .chat import render_chat

        p = render_chat(messages, template=template, arch=arch, bos=bos, eos=eos, builtin=builtin)
        return ChatPlan(p.text, p.add_special, p.stop, grammar=response_grammar or "")
    if response_grammar:
        which = next(k for k in ("response_format", "json_schema", "grammar") if body.get(k) is not None)
        raise ToolError(f"'{which}' cannot be combined with 'tools' (unless tool_choice is 'none')", which)
    from .chat import _BUILTIN_CAPS, render_chat, template_caps  # chat imports this module

    caps = template_caps(template) if template else _BUILTIN_CAPS
    fmt = detect_format(template) if template and caps.tools else "generic"
    p = render_chat(messages, template=template, arch=arch, bos=bos, eos=eos, builtin=builtin, tools=tools,
                    tool_choice=choice, parallel_tool_calls=parallel)
    forced = choice != "auto"
    try:
        grammar, triggers = tool_grammar(fmt, tools, choice, parallel)
    except ToolError:
        if forced:
            raise
        grammar, triggers = "", ()  # auto: a schema the converter cannot do runs free; the parser still reads
    names = [t["function"]["name"] for t in tools]
    parser = ToolCallParser(fmt, [choice] if forced and choice != "required" else names)
    return ChatPlan(p.text, p.add_special, p.stop, grammar=grammar, triggers=triggers, parser=parser,
                    tool_format=fmt)


__all__ = ["ChatPlan", "FORMATS", "MAX_TOOLS", "MAX_TOOLS_BYTES", "TRIGGERS", "ToolCall", "ToolCallParser",
           "ToolError", "detect_format", "generic_instructions", "new_call_id", "parse_parallel", "parse_tool_choice",
           "parse_tools", "plan_chat", "tool_grammar"]
