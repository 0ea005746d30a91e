"""Constrained output: JSON schemas and GBNF grammars from a request, checked before a stage sees them.

A request may ask for structured output in three ways (at most one of them):

* OpenAI's ``response_format``: ``{"type": "text"}``, ``{"type": "json_object"}`` (any JSON object; llama-server
  also reads a ``schema`` there) or ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``;
* llama-server's ``json_schema`` (a JSON schema);
* llama-server's ``grammar`` (GBNF text, at most :data:`~molink_lite.wire.protocol.MAX_GRAMMAR_BYTES` bytes).

:func:`grammar_for_request` turns that into GBNF text for the last stage (which runs it per sequence), or None.

JSON schemas are converted with the converter llama-cpp-python maintains in ``llama_cpp/llama_grammar.py``: a
port of llama.cpp's ``json_schema_to_grammar.py``, the converter llama-server itself uses, kept up to date
upstream, so the grammars match what llama.cpp users expect. That file imports only the standard library, but
``import llama_cpp.llama_grammar`` would run ``llama_cpp/__init__.py``, which loads the native llama library --
and the gateway must never load it. So it is loaded by file path (:func:`_upstream`), without its package.

Before conversion, a schema is checked (:func:`json_schema_to_gbnf`): its size and depth are capped, remote
``$ref`` are refused, and what the converter cannot do is refused with a message a client can act on. The
converter does not enforce keywords that only narrow a value further (``minimum`` / ``maximum`` of non-integer
numbers, ``multipleOf``, ``uniqueItems``, ``not``, string formats other than date / time / date-time / uuid,
``maxItems`` / ``maxLength`` over :data:`MAX_SCHEMA_REPEAT`, ...): the output still has the schema's shape and
types. Integer ``minimum`` / ``maximum`` are enforced (:func:`int_range_gbnf`). GBNF text (given, or converted) gets a syntax check here (:func:`check_gbnf`, a port
of llama.cpp's grammar parser's syntax rules) so obvious mistakes are a 400 without a stage round trip; the last
stage compiles it for real (``grammar_check``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import threading
from types import ModuleType
from typing import Any, Dict, List, Optional, Tuple

from ..wire.protocol import MAX_GRAMMAR_BYTES

MAX_SCHEMA_BYTES = 64 << 10   # a JSON schema, serialized
MAX_SCHEMA_DEPTH = 32         # nesting of objects / arrays in a schema's JSON
MAX_SCHEMA_REPEAT = 500       # minItems / minLength / pattern {m,n}: the converter spells repetitions out
MAX_GBNF_REPEAT = 2000        # llama.cpp's MAX_REPETITION_THRESHOLD for {m,n} in GBNF

_TYPES = ("string", "number", "integer", "boolean", "object", "array", "null")


class GrammarError(ValueError):
    """A request's grammar / schema cannot be used; the message is safe to show a client.

    ``param``: the request field it is about (for the 400 answer)."""

    def __init__(self, message: str, param: str = "response_format"):
        super().__init__(message)
        self.param = param


# --------------------------------------------------------------------------- #
# the upstream converter, loaded without the llama_cpp package
# --------------------------------------------------------------------------- #

_lock = threading.Lock()
_mod: Optional[ModuleType] = None
_conv_cls: Optional[type] = None


def _upstream() -> ModuleType:
    """llama-cpp-python's ``llama_grammar.py`` as a standalone module (not ``llama_cpp.llama_grammar``).

    ``find_spec("llama_cpp")`` locates the package without executing its ``__init__`` (which would load
    libllama); the file itself imports only the standard library."""
    global _mod
    if _mod is None:
        with _lock:
            if _mod is None:
                spec = importlib.util.find_spec("llama_cpp")
                if spec is None or not spec.submodule_search_locations:
                    raise GrammarError("JSON schemas are not available: llama-cpp-python is not installed")
                path = f"{list(spec.submodule_search_locations)[0]}/llama_grammar.py"
                fspec = importlib.util.spec_from_file_location("molink_lite.serving._llama_grammar", path)
                if fspec is None or fspec.loader is None:
                    raise GrammarError("JSON schemas are not available: llama_grammar.py not found")
                mod = importlib.util.module_from_spec(fspec)
                fspec.loader.exec_module(mod)
                # llama-cpp-python 0.3.36's copy still lets a JSON string hold raw control characters (a newline
                # inside "...": not JSON); llama.cpp's converter fixed the rule: take its version
                mod.PRIMITIVE_RULES["char"] = mod.BuiltinRule(_JSON_CHAR, [])
                _mod = mod
    return _mod


# a character of a JSON string: anything but a quote, a backslash, DEL or a control character, or an escape
# (llama.cpp's common/json-schema-to-grammar.cpp)
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | [\\] (["\\bfnrt] | "u" [0-9a-fA-F]{4})'


# keys the converter dispatches on when a schema has no "type" (anything else: any JSON value)
_DISPATCH = ("$ref", "oneOf", "anyOf", "allOf", "const", "enum", "properties", "additionalProperties", "items",
             "prefixItems", "pattern")
_FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")


def _converter_class() -> type:
    """The upstream ``SchemaConverter``, amended: a schema with nothing the converter dispatches on (``{}``,
    only a description, ...) means any JSON value (upstream: any object), and ``$ref`` rules are named per
    document (several tools may each have a ``#/$defs/Item``); integers get their ``minimum`` / ``maximum``
    (:func:`int_range_gbnf`, as llama.cpp's newer converter does)."""
    global _conv_cls
    if _conv_cls is None:
        m = _upstream()

        class _Converter(m.SchemaConverter):  # type: ignore[name-defined,misc]
            def visit(self, schema, name):
                if schema.get("type") == "integer" and any(k in schema for k in _INT_BOUNDS):
                    rule_name = name + "-" if name in m.RESERVED_NAMES else name or "root"
                    lo, hi = _int_bounds(schema)
                    return self._add_rule(rule_name, f"({int_range_gbnf(lo, hi)}) space")
                if (schema.get("type") is None and not any(k in schema for k in _DISPATCH)
                        and schema.get("format") not in _FORMATS):
                    rule_name = name + "-" if name in m.RESERVED_NAMES else name or "root"
                    return self._add_rule(rule_name, self._add_primitive("value", m.PRIMITIVE_RULES["value"]))
                return super().visit(schema, name)

            def _resolve_ref(self, ref):
                base, _, frag = ref.partition("#")
                ref_name = m.INVALID_RULE_CHARS_RE.sub("-", f"{base}-ref-{frag.split('/')[-1]}" if base
                                                       else f"ref-{frag.split('/')[-1]}")
                if ref_name not in self._rules and ref not in self._refs_being_resolved:
                    self._refs_being_resolved.add(ref)
                    got = self.visit(self._refs[ref], ref_name)
                    self._refs_being_resolved.remove(ref)
                    if got != ref_name:  # a name clash renamed it: point the ref's name at it
                        self._rules[ref_name] = got
                return ref_name

        _conv_cls = _Converter
    return _conv_cls


# --------------------------------------------------------------------------- #
# integer ranges (minimum / maximum on integers: llama.cpp's newer converter does them, the one shipped does not)
# --------------------------------------------------------------------------- #

_INT_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_MAX_DIGITS = 16  # as the converter's integral-part: at most 16 digits


def _int_bounds(schema: dict) -> Tuple[Optional[int], Optional[int]]:
    """Inclusive integer bounds of an integer schema (None: unbounded; past 16 digits counts as unbounded)."""
    import math

    lo: Optional[int] = None
    hi: Optional[int] = None
    for key, v in ((k, schema.get(k)) for k in _INT_BOUNDS):
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        if key in ("minimum", "maximum") and schema.get("exclusive" + key.title()) is True:  # draft 4
            key = "exclusive" + key.title()
        if key == "minimum":
            b = math.ceil(v)
        elif key == "exclusiveMinimum":
            b = math.floor(v) + 1
        elif key == "maximum":
            b = math.floor(v)
        else:
            b = math.ceil(v) - 1
        if key in ("minimum", "exclusiveMinimum"):
            lo = b if lo is None else max(lo, b)
        else:
            hi = b if hi is None else min(hi, b)
    limit = 10 ** _MAX_DIGITS - 1
    if lo is not None and abs(lo) > limit:
        lo = None if lo < 0 else limit
    if hi is not None and abs(hi) > limit:
        hi = None if hi > 0 else -limit
    return lo, hi


def _digit_blocks(a: int, b: int) -> List[str]:
    """GBNF sequences (one per block) matching exactly the decimal numbers a..b, 0 <= a <= b, no leading zeros."""
    out: List[str] = []
    d = len(str(a))
    while a <= b:
        top = min(b, 10 ** d - 1)  # the same number of digits
        start = a
        while start <= top:
            k = 0  # the block: start's first digits, then one digit range, then k free digits
            while start % 10 ** (k + 1) == 0 and start + 10 ** (k + 1) - 1 <= top:
                k += 1
            step = 10 ** k
            end = start + step - 1
            while end + step <= top and (end + 1) % 10 ** (k + 1) != 0:
                end += step
            s, e = str(start), str(end)
            same = 0
            while same < len(s) and s[same] == e[same]:
                same += 1
            parts = [f'"{s[:same]}"'] if same else []
            parts += ["[0-9]" if (x, y) == ("0", "9") else f"[{x}-{y}]" for x, y in zip(s[same:], e[same:])]
            out.append(" ".join(parts))
            start = end + 1
        a, d = top + 1, d + 1
    return out


def _at_least(a: int) -> str:
    """Decimal numbers >= a >= 0 (up to 16 digits)."""
    d = len(str(a))
    alts = _digit_blocks(a, 10 ** d - 1)
    if d < _MAX_DIGITS:
        alts.append(f"[1-9] [0-9]{{{d},{_MAX_DIGITS - 1}}}")
    return " | ".join(alts)


def int_range_gbnf(lo: Optional[int], hi: Optional[int]) -> str:
    """A GBNF expression for the JSON integers lo..hi (either may be None: unbounded)."""
    if lo is not None and hi is not None and lo > hi:
        raise GrammarError(f"an integer's minimum ({lo}) is larger than its maximum ({hi})")
    any_pos = f"[1-9] [0-9]{{0,{_MAX_DIGITS - 1}}}"
    alts: List[str] = []
    # negative part: -x for x in [max(1, -hi), -lo]
    if lo is None or lo < 0:
        n_lo = 1 if hi is None or hi >= 0 else -hi
        if lo is None:
            alts.append(f'"-" ({_at_least(n_lo)})')
        else:
            alts.append(f'"-" ({" | ".join(_digit_blocks(n_lo, -lo))})')
    # non-negative part: [max(0, lo), hi]
    if hi is None or hi >= 0:
        p_lo = 0 if lo is None or lo < 0 else lo
        if hi is None:
            alts.append('"0" | ' + any_pos if p_lo == 0 else _at_least(p_lo))
        else:
            alts.append(" | ".join(_digit_blocks(p_lo, hi)))
    return " | ".join(alts)


def _new_converter() -> Any:
    return _converter_class()(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


# --------------------------------------------------------------------------- #
# schema checks (before the converter, which asserts -- or worse, under -O -- on what it cannot do)
# --------------------------------------------------------------------------- #

def _json_depth(v: Any) -> int:
    """Nesting depth of a JSON value, iteratively (no recursion on hostile input)."""
    depth, stack = 0, [(v, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict):
            depth = max(depth, d)
            if d <= MAX_SCHEMA_DEPTH + 1:
                stack.extend((y, d + 1) for y in x.values())
        elif isinstance(x, list):
            depth = max(depth, d)
            if d <= MAX_SCHEMA_DEPTH + 1:
                stack.extend((y, d + 1) for y in x)
    return depth


def _count(node: dict, key: str, where: str) -> Optional[int]:
    v = node.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise GrammarError(f"{where}.{key} must be a non-negative integer")
    return v


_QUANT_RE = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def _check_pattern(p: Any, where: str) -> None:
    if not isinstance(p, str):
        raise GrammarError(f"{where}.pattern must be a string")
    if not (p.startswith("^") and p.endswith("$")) or len(p) < 2:
        raise GrammarError(f"{where}.pattern must be anchored (start with '^' and end with '$') to be turned into a "
                           "grammar")
    if "(?" in p:
        raise GrammarError(f"{where}.pattern uses (?...) groups (lookarounds, non-capturing or named groups), "
                           "which cannot be turned into a grammar")
    for mo in _QUANT_RE.finditer(p):
        for n in mo.groups():
            if n and int(n) > MAX_SCHEMA_REPEAT:
                raise GrammarError(f"{where}.pattern repeats something {n} times: at most {MAX_SCHEMA_REPEAT} "
                                   "can be turned into a grammar")


def _ref_target(root: dict, ref: str, where: str) -> Any:
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", ref):
        raise GrammarError(f"{where}.$ref: remote references ({ref[:100]}) are not fetched; put the definition "
                           "in the schema's $defs")
    if not ref.startswith("#/"):
        raise GrammarError(f"{where}.$ref must point into the schema itself ('#/$defs/...'), got {ref[:100]!r}")
    target: Any = root
    for sel in ref[2:].split("/"):
        if not isinstance(target, dict) or sel not in target:
            raise GrammarError(f"{where}.$ref {ref[:100]!r} points to nothing in the schema")
        target = target[sel]
    return target


class _Norm:
    """A checked copy of a schema in the shape the converter handles (see :func:`json_schema_to_gbnf`)."""

    def __init__(self, root: dict, where: str):
        self.root = root
        self.where = where

    def sub(self, node: Any, where: str) -> dict:
        if node is True:
            return {}
        if node is False:
            raise GrammarError(f"{where} is 'false' (no value allowed), which cannot be turned into a grammar")
        if not isinstance(node, dict):
            raise GrammarError(f"{where} must be a JSON schema (an object)")
        out: Dict[str, Any] = {}
        for k, v in node.items():
            if k in ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas"):
                if not isinstance(v, dict):
                    raise GrammarError(f"{where}.{k} must be an object")
                if k in ("properties", "$defs", "definitions"):
                    out[k] = {str(pk): self.sub(pv, f"{where}.{k}.{pk}") for pk, pv in v.items()}
            elif k in ("anyOf", "oneOf", "allOf", "prefixItems"):
                if not isinstance(v, list) or not v:
                    raise GrammarError(f"{where}.{k} must be a non-empty list of schemas")
                out[k] = [self.sub(x, f"{where}.{k}[{i}]") for i, x in enumerate(v)]
            elif k == "items":
                if isinstance(v, list):  # draft-07 tuple form
                    if not v:
                        raise GrammarError(f"{where}.items must not be an empty list")
                    out["prefixItems"] = [self.sub(x, f"{where}.items[{i}]") for i, x in enumerate(v)]
                else:
                    s = self.sub(v, f"{where}.items")
                    out["items"] = s or {"description": "any"}  # the converter reads {} as "no items"
            elif k == "additionalProperties":
                if isinstance(v, bool):
                    out[k] = v
                else:
                    out[k] = self.sub(v, f"{where}.{k}")
            elif k == "$ref":
                if not isinstance(v, str):
                    raise GrammarError(f"{where}.$ref must be a string")
                _ref_target(self.root, v, where)
                out[k] = v
            elif k == "type":
                types = v if isinstance(v, list) else [v]
                if not types or not all(isinstance(t, str) and t in _TYPES for t in types):
                    raise GrammarError(f"{where}.type must be one of {', '.join(_TYPES)} (or a list of them)")
                out[k] = v if isinstance(v, str) else list(dict.fromkeys(v))
            elif k == "enum":
                if not isinstance(v, list) or not v:
                    raise GrammarError(f"{where}.enum must be a non-empty list")
                out[k] = v
            elif k == "required":
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                    raise GrammarError(f"{where}.required must be a list of property names")
                out[k] = v
            elif k == "pattern":
                t = node.get("type")
                if t in (None, "string") or (isinstance(t, list) and "string" in t):
                    _check_pattern(v, where)
                    out[k] = v
            elif k in ("minItems", "minLength"):
                n = _count(node, k, where)
                if n is not None and n > MAX_SCHEMA_REPEAT:
                    raise GrammarError(f"{where}.{k} is {n}: at most {MAX_SCHEMA_REPEAT} can be turned into a grammar")
                out[k] = n
            elif k in ("maxItems", "maxLength"):
                n = _count(node, k, where)
                if n is not None and n <= MAX_SCHEMA_REPEAT:  # larger: not enforced (the converter spells it out)
                    out[k] = n
            elif k == "format":
                if isinstance(v, str):
                    out[k] = v
            elif k in _INT_BOUNDS:
                if (isinstance(v, bool) and k.startswith("exclusive")):  # draft 4: minimum / maximum exclusive
                    out[k] = v
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise GrammarError(f"{where}.{k} must be a number")
                out[k] = v
            elif k == "nullable" or k == "not":
                continue
            else:
                out[k] = v  # annotations and keywords the converter ignores
        lo, hi = out.get("minItems"), out.get("maxItems")
        if lo is not None and hi is not None and lo > hi:
            raise GrammarError(f"{where}: minItems is larger than maxItems")
        if out.get("type") == "integer" or (isinstance(out.get("type"), list) and "integer" in out["type"]):
            lo, hi = _int_bounds(out)
            if lo is not None and hi is not None and lo > hi:
                raise GrammarError(f"{where}: no integer lies between its minimum and maximum")
        lo, hi = out.get("minLength"), out.get("maxLength")
        if lo is not None and hi is not None and lo > hi:
            raise GrammarError(f"{where}: minLength is larger than maxLength")
        if "allOf" in out:
            for i, comp in enumerate(out["allOf"]):
                tgt = _ref_target(self.root, comp["$ref"], where) if "$ref" in comp else comp
                if not isinstance(tgt, dict) or not ("properties" in tgt or "anyOf" in tgt):
                    raise GrammarError(f"{where}.allOf[{i}]: allOf is supported only to combine object schemas "
                                       "with properties")
        # precedence fixes: enum/const narrow more than a type list; a type list keeps the other keywords
        if ("enum" in out or "const" in out) and "type" in out:
            del out["type"]
        t = out.get("type")
        if isinstance(t, list):
            if len(t) == 1:
                out["type"] = t[0]
            else:
                rest = {k: v for k, v in out.items() if k != "type"}
                alts = [dict(rest, type=x) for x in t]
                out = {"anyOf": alts}
        if node.get("nullable") is True and "type" in out and out.get("type") != "null":
            out = {"anyOf": [out, {"type": "null"}]}
        return out


def _check_schema(schema: Any, where: str) -> dict:
    if isinstance(schema, bool):
        schema = {} if schema else schema
    if not isinstance(schema, dict):
        raise GrammarError(f"{where} must be a JSON schema (an object)")
    try:
        size = len(json.dumps(schema, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError, RecursionError):
        raise GrammarError(f"{where} must be a JSON schema (an object)") from None
    if size > MAX_SCHEMA_BYTES:
        raise GrammarError(f"{where} is {size} bytes: at most {MAX_SCHEMA_BYTES} are supported")
    if _json_depth(schema) > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"{where} is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    return _Norm(schema, where).sub(schema, where)


def _finish(conv: Any, where: str) -> str:
    gbnf = conv.format_grammar()
    n = len(gbnf.encode("utf-8", "surrogatepass"))
    if n > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the grammar for {where} would be {n} bytes: at most {MAX_GRAMMAR_BYTES} are supported")
    try:
        check_gbnf(gbnf)
    except GrammarError as e:
        raise GrammarError(f"{where} could not be turned into a grammar ({e})") from None
    return gbnf + "\n"


def _convert_error(e: BaseException, where: str) -> GrammarError:
    msg = str(e) or type(e).__name__
    if isinstance(e, RecursionError):
        msg = "nested too deeply"
    return GrammarError(f"{where} could not be turned into a grammar: {msg[:300]}")


def json_schema_to_gbnf(schema: dict, *, where: str = "the JSON schema") -> str:
    """GBNF (root rule ``root``) accepting the JSON text ``schema`` describes (upstream converter; see module doc).

    ``strict`` (OpenAI's flag) needs nothing: the grammar always holds. Raises :class:`GrammarError`."""
    norm = _check_schema(schema, where)
    conv = _new_converter()
    try:
        norm = conv.resolve_refs(norm, "")
        conv.visit(norm, "")
    except GrammarError:
        raise
    except Exception as e:  # noqa: BLE001 - the converter asserts / raises on what it cannot do
        raise _convert_error(e, where) from None
    return _finish(conv, where)


class SchemaGrammar:
    """Several schemas in one grammar, each a named rule, plus hand-written rules (tool-call grammars).

    ``add(schema, name)`` converts a schema (checked like :func:`json_schema_to_gbnf`) and returns its rule name;
    ``rule(name, body)`` adds a GBNF rule; ``text()`` the whole grammar (it must have a ``root`` rule)."""

    def __init__(self, where: str = "the JSON schema"):
        self.where = where
        self._conv = _new_converter()
        self._docs = 0

    def resolve(self, schema: Any, where: str) -> dict:
        """A checked copy of ``schema`` whose ``$ref`` are resolved (it can then be nested in a larger schema)."""
        norm = _check_schema(schema, where)
        self._docs += 1
        try:
            return self._conv.resolve_refs(norm, f"d{self._docs}")
        except Exception as e:  # noqa: BLE001
            raise _convert_error(e, where) from None

    def add(self, schema: dict, name: str, where: Optional[str] = None) -> str:
        """Rule name for an already :meth:`resolve`\\ d (or ref-free, checked) schema."""
        try:
            return self._conv.visit(schema, name)
        except GrammarError:
            raise
        except Exception as e:  # noqa: BLE001
            raise _convert_error(e, where or self.where) from None

    def rule(self, name: str, body: str) -> str:
        return self._conv._add_rule(name, body)

    @staticmethod
    def literal(text: str) -> str:
        """A GBNF string literal for ``text``."""
        return gbnf_literal(text)

    def text(self) -> str:
        return _finish(self._conv, self.where)


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal (llama.cpp's escapes)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


# any JSON object, whitespace bounded (llama.cpp's grammars/json.gbnf, as llama-server uses for json_object)
JSON_OBJECT_GBNF = r"""root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

ws ::= | " " | "\n" [ \t]{0,20}
"""


# --------------------------------------------------------------------------- #
# GBNF syntax check: llama.cpp's grammar parser (src/llama-grammar.cpp), syntax only, iterative
# --------------------------------------------------------------------------- #

def _is_word(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z") or ("0" <= c <= "9") or c == "-"


def _where(src: str, pos: int) -> str:
    line = src.count("\n", 0, pos) + 1
    col = pos - (src.rfind("\n", 0, pos) + 1) + 1
    near = src[pos:pos + 20].split("\n")[0]
    return f"line {line}, column {col}" + (f" (near {near!r})" if near else "")


class _Gbnf:
    def __init__(self, src: str):
        self.s = src
        self.n = len(src)
        self.defined: Dict[str, int] = {}
        self.used: Dict[str, int] = {}

    def err(self, msg: str, pos: int) -> GrammarError:
        return GrammarError(f"invalid grammar: {msg} at {_where(self.s, pos)}", "grammar")

    def space(self, pos: int, newline_ok: bool) -> int:
        s, n = self.s, self.n
        while pos < n:
            c = s[pos]
            if c == "#":
                while pos < n and s[pos] not in "\r\n":
                    pos += 1
            elif c in " \t" or (newline_ok and c in "\r\n"):
                pos += 1
            else:
                break
        return pos

    def name(self, pos: int) -> int:
        end = pos
        while end < self.n and _is_word(self.s[end]):
            end += 1
        if end == pos:
            raise self.err("expecting a rule name", pos)
        return end

    def char(self, pos: int) -> int:
        """Position after one (possibly escaped) character."""
        s = self.s
        if pos >= self.n:
            raise self.err("unexpected end of input", pos)
        if s[pos] != "\\":
            return pos + 1
        if pos + 1 >= self.n:
            raise self.err("unexpected end of input", pos)
        e = s[pos + 1]
        size = {"x": 2, "u": 4, "U": 8}.get(e)
        if size:
            end = pos + 2
            while end < min(self.n, pos + 2 + size) and s[end] in "0123456789abcdefABCDEF":
                end += 1
            if end != pos + 2 + size:
                raise self.err(f"expecting {size} hex digits after \\{e}", pos)
            return end
        if e in 'trn\\"[]':
            return pos + 2
        raise self.err(f"unknown escape \\{e}", pos)

    def integer(self, pos: int) -> Tuple[int, int]:
        end = pos
        while end < self.n and self.s[end].isdigit() and self.s[end].isascii():
            end += 1
        if end == pos:
            raise self.err("expecting a number", pos)
        return int(self.s[pos:end]), end

    def body(self, pos: int) -> int:
        """Alternates of one rule (groups nested with an explicit stack); returns the position after them."""
        s, n = self.s, self.n
        have_item = [False]  # per nesting level: is there an item a */+/?/{} may apply to
        while True:
            nested = len(have_item) > 1
            if pos >= n:
                break
            c = s[pos]
            if c == '"':
                pos += 1
                while True:
                    if pos >= n:
                        raise self.err("unterminated string literal", pos)
                    if s[pos] == '"':
                        break
                    pos = self.char(pos)
                pos = self.space(pos + 1, nested)
                have_item[-1] = True
            elif c == "[":
                start = pos
                pos += 1
                if pos < n and s[pos] == "^":
                    pos += 1
                while True:
                    if pos >= n:
                        raise self.err("unterminated character class", start)
                    if s[pos] == "]":
                        break
                    pos = self.char(pos)
                    if pos + 1 < n and s[pos] == "-" and s[pos + 1] != "]":
                        pos = self.char(pos + 1)
                pos = self.space(pos + 1, nested)
                have_item[-1] = True
            elif c in "<!":  # a token: <[id]> or <token-text>, optionally negated with !
                start = pos
                if c == "!":
                    pos += 1
                if pos >= n or s[pos] != "<":
                    raise self.err("expecting '<' after '!'", start)
                end = s.find(">", pos)
                if end < 0 or "\n" in s[pos:end]:
                    raise self.err("unterminated token", start)
                pos = self.space(end + 1, nested)
                have_item[-1] = True
            elif _is_word(c):
                end = self.name(pos)
                self.used.setdefault(s[pos:end], pos)
                pos = self.space(end, nested)
                have_item[-1] = True
            elif c == "(":
                have_item.append(False)
                pos = self.space(pos + 1, True)
            elif c == ")":
                if not nested:
                    break
                have_item.pop()
                have_item[-1] = True
                pos = self.space(pos + 1, len(have_item) > 1)
            elif c == ".":
                pos = self.space(pos + 1, nested)
                have_item[-1] = True
            elif c in "*+?":
                if not have_item[-1]:
                    raise self.err(f"'{c}' with nothing before it", pos)
                pos = self.space(pos + 1, nested)
            elif c == "{":
                if not have_item[-1]:
                    raise self.err("'{' with nothing before it", pos)
                start = pos
                pos = self.space(pos + 1, nested)
                lo, pos = self.integer(pos)
                pos = self.space(pos, nested)
                hi: Optional[int] = lo
                if pos < n and s[pos] == ",":
                    pos = self.space(pos + 1, nested)
                    hi = None
                    if pos < n and s[pos].isdigit():
                        hi, pos = self.integer(pos)
                        pos = self.space(pos, nested)
                if pos >= n or s[pos] != "}":
                    raise self.err("expecting '}'", pos)
                if lo > MAX_GBNF_REPEAT or (hi is not None and hi > MAX_GBNF_REPEAT):
                    raise self.err(f"more than {MAX_GBNF_REPEAT} repetitions", start)
                pos = self.space(pos + 1, nested)
            elif c == "|":
                have_item[-1] = False
                pos = self.space(pos + 1, True)
            else:
                break
        if len(have_item) > 1:
            raise self.err("expecting ')'", pos)
        return pos

    def parse(self) -> None:
        pos = self.space(0, True)
        while pos < self.n:
            start = pos
            end = self.name(pos)
            name = self.s[pos:end]
            pos = self.space(end, False)
            if not self.s.startswith("::=", pos):
                raise self.err("expecting '::='", pos)
            self.defined.setdefault(name, start)
            pos = self.body(self.space(pos + 3, True))
            if pos < self.n:
                if self.s[pos] == "\r":
                    pos += 2 if self.s.startswith("\r\n", pos) else 1
                elif self.s[pos] == "\n":
                    pos += 1
                else:
                    raise self.err("expecting a newline or the end", pos)
            pos = self.space(pos, True)
        for name, at in self.used.items():
            if name not in self.defined:
                raise self.err(f"rule '{name}' is used but not defined", at)
        if "root" not in self.defined:
            raise GrammarError("invalid grammar: it has no 'root' rule", "grammar")


def check_gbnf(text: str) -> None:
    """Raise :class:`GrammarError` (param ``grammar``) unless ``text`` is GBNF llama.cpp's parser accepts (syntax:
    strings, character classes, groups, repetitions, every used rule defined, a ``root`` rule)."""
    if not isinstance(text, str) or not text.strip():
        raise GrammarError("'grammar' must be non-empty GBNF text", "grammar")
    n = len(text.encode("utf-8", "surrogatepass"))
    if n > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"'grammar' is {n} bytes: at most {MAX_GRAMMAR_BYTES} are supported", "grammar")
    if "\x00" in text:
        raise GrammarError("'grammar' must not contain NUL characters", "grammar")
    _Gbnf(text).parse()


# --------------------------------------------------------------------------- #
# the request
# --------------------------------------------------------------------------- #

def _response_format(rf: Any) -> Optional[str]:
    if not isinstance(rf, dict):
        raise GrammarError("'response_format' must be an object with a 'type'")
    t = rf.get("type")
    if t == "text":
        return None
    if t == "json_object":
        schema = rf.get("schema")  # llama-server's extension
        if schema is None:
            return JSON_OBJECT_GBNF
        return json_schema_to_gbnf(schema, where="response_format.schema")
    if t == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise GrammarError("'response_format.json_schema' must be an object with a 'schema'",
                               "response_format.json_schema")
        name = js.get("name")
        if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name)):
            raise GrammarError("'response_format.json_schema.name' must be 1 to 64 letters, digits, '_' or '-'",
                               "response_format.json_schema.name")
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise GrammarError("'response_format.json_schema.strict' must be a boolean",
                               "response_format.json_schema.strict")
        schema = js.get("schema")
        if schema is None:
            return JSON_OBJECT_GBNF
        try:
            return json_schema_to_gbnf(schema, where="response_format.json_schema.schema")
        except GrammarError as e:
            e.param = "response_format.json_schema.schema"
            raise
    raise GrammarError("'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                       "response_format.type")


def grammar_for_request(body: dict) -> Optional[str]:
    """GBNF text for the request's ``response_format`` / ``json_schema`` / ``grammar``, or None (free text).

    Giving more than one of them is an error; so is a schema or grammar that cannot be used. Raises
    :class:`GrammarError` with ``param`` set to the field."""
    asked = [k for k in ("response_format", "json_schema", "grammar") if body.get(k) is not None]
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "text" and len(asked) > 1:
        asked.remove("response_format")
    if len(asked) > 1:
        raise GrammarError(f"give only one of {', '.join(repr(a) for a in asked)}", asked[1])
    if not asked:
        return None
    key = asked[0]
    if key == "response_format":
        return _response_format(rf)
    if key == "json_schema":
        try:
            return json_schema_to_gbnf(body["json_schema"], where="'json_schema'")
        except GrammarError as e:
            e.param = "json_schema"
            raise
    g = body["grammar"]
    if not isinstance(g, str):
        raise GrammarError("'grammar' must be GBNF text (a string)", "grammar")
    check_gbnf(g)
    return g


__all__ = ["GrammarError", "JSON_OBJECT_GBNF", "MAX_SCHEMA_BYTES", "MAX_SCHEMA_DEPTH", "MAX_SCHEMA_REPEAT",
           "SchemaGrammar", "check_gbnf", "gbnf_literal", "grammar_for_request", "json_schema_to_gbnf"]
