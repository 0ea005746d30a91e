"""Structured output on the gateway side (serving/grammar.py): JSON schema -> GBNF with llama-cpp-python's
converter (loaded without the llama_cpp package), the request fields, the GBNF syntax pre-check, and -- with a
tiny model's vocabulary -- that llama.cpp compiles what is produced."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from molink_lite.serving.grammar import (JSON_OBJECT_GBNF, MAX_SCHEMA_DEPTH, GrammarError, check_gbnf,
                                         gbnf_literal, grammar_for_request, json_schema_to_gbnf)
from molink_lite.wire.protocol import MAX_GRAMMAR_BYTES

ROOT = Path(__file__).resolve().parent.parent

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "age": {"type": "integer"},
        "role": {"type": "string", "enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                         "pattern": "^[0-9]{5}$"}},
                    "required": ["city"]},
        "nick": {"type": ["string", "null"]},
        "born": {"type": "string", "format": "date"},
    },
    "required": ["name", "age"],
}

SCHEMAS = {
    "person": PERSON,
    "enum": {"enum": ["red", "green", 3, None]},
    "const": {"const": {"a": [1, 2]}},
    "array of objects": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"}},
                                                    "required": ["x"]}, "minItems": 1},
    "tuple": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "boolean"}]},
    "anyOf": {"anyOf": [{"type": "string"}, {"type": "object", "properties": {"v": {"type": "integer"}}}]},
    "refs": {"type": "object", "properties": {"a": {"$ref": "#/$defs/Item"}, "b": {"$ref": "#/$defs/Item"}},
             "$defs": {"Item": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}}},
    "recursive": {"$ref": "#/$defs/Node", "$defs": {"Node": {"type": "object", "properties": {
        "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}}},
    "any": {},
    "additional": {"type": "object", "additionalProperties": {"type": "integer"}},
    "nullable enum (OpenAI strict)": {"type": "object", "properties": {"u": {"type": ["string", "null"],
                                                                           "enum": ["c", "f", None]}},
                                      "required": ["u"], "additionalProperties": False},
    "integer bounds": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 150},
                                                        "t": {"type": ["integer", "null"], "exclusiveMinimum": -40},
                                                        "n": {"type": "integer", "maximum": -3}}},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                        {"type": "object", "properties": {"b": {"type": "integer"}}}]},
}


def _rules(g: str) -> dict:
    return {line.split(" ::= ")[0]: line.split(" ::= ", 1)[1] for line in g.splitlines() if " ::= " in line}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_typical_schemas_convert_and_pass_the_precheck(name):
    g = json_schema_to_gbnf(SCHEMAS[name])
    assert "root" in _rules(g)
    check_gbnf(g)
    assert len(g.encode()) <= MAX_GRAMMAR_BYTES


def test_schema_shape_is_in_the_grammar():
    r = _rules(json_schema_to_gbnf(PERSON))
    # required properties in order, enum values as literals, the nested object's own rule, the pattern
    assert r["root"].startswith('"{" space name-kv "," space age-kv')
    assert r["role"] == '"\\"admin\\"" | "\\"user\\""'
    assert "address-city-kv" in r["address"]
    assert r["address-zip-1"] == "[0-9]" and r["address-zip"].count("address-zip-1") == 5
    assert "null" in r["nick"]  # a type list keeps both types
    # the enum of a nullable field wins over its type list (OpenAI strict schemas)
    r2 = _rules(json_schema_to_gbnf(SCHEMAS["nullable enum (OpenAI strict)"]))
    assert r2["u"] == '"\\"c\\"" | "\\"f\\"" | "null"'


def test_two_tools_with_the_same_def_name_keep_their_own_rules():
    from molink_lite.serving.grammar import SchemaGrammar

    g = SchemaGrammar()
    a = g.resolve({"type": "object", "properties": {"x": {"$ref": "#/$defs/T"}},
                   "$defs": {"T": {"type": "integer"}}}, "a")
    b = g.resolve({"type": "object", "properties": {"x": {"$ref": "#/$defs/T"}},
                   "$defs": {"T": {"type": "boolean"}}}, "b")
    ra, rb = g.add(a, "a"), g.add(b, "b")
    g.rule("root", f"{ra} | {rb}")
    rules = _rules(g.text())
    assert rules["d1-ref-T"] != rules["d2-ref-T"]


@pytest.mark.parametrize("schema, msg", [
    ({"$ref": "https://example.com/s.json"}, "remote references"),
    ({"$ref": "#/$defs/Missing"}, "points to nothing"),
    ({"$ref": "other.json#/x"}, "must point into the schema"),
    ({"type": "string", "pattern": "[a-z]+"}, "anchored"),
    ({"type": "string", "pattern": "^(?=a)b$"}, "(?...)"),
    ({"type": "string", "pattern": "^a{1,100000}$"}, "at most"),
    ({"type": "string", "pattern": "^\\d+$"}, "could not be turned into a grammar"),
    ({"type": "strng"}, "type must be one of"),
    ({"type": "array", "items": False}, "'false'"),
    ({"type": "array", "minItems": 100000}, "at most"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems is larger"),
    ({"enum": []}, "non-empty"),
    ({"anyOf": "x"}, "non-empty list"),
    ({"allOf": [{"type": "string"}]}, "allOf is supported only"),
    ("not a schema", "must be a JSON schema"),
])
def test_bad_schemas_are_refused_with_a_message(schema, msg):
    with pytest.raises(GrammarError) as ei:
        json_schema_to_gbnf(schema)
    assert msg in str(ei.value)


def test_oversized_and_deep_schemas_are_refused():
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 200}
                                            for i in range(400)}}
    with pytest.raises(GrammarError, match="bytes"):
        json_schema_to_gbnf(big)
    deep: dict = {"type": "string"}
    for _ in range(MAX_SCHEMA_DEPTH):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(GrammarError, match="nested more than"):
        json_schema_to_gbnf(deep)


def test_large_max_counts_are_not_spelled_out():
    # maxLength beyond the cap is not enforced (the converter would spell it out); the grammar stays small
    g = json_schema_to_gbnf({"type": "string", "maxLength": 10_000_000})
    assert len(g) < 2000


def _as_regex(expr: str) -> "re.Pattern[str]":
    """A GBNF expression of literals, digit classes and {m,n} as a Python regex (what int_range_gbnf writes)."""
    return re.compile(re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), expr.replace(" ", "")))


@pytest.mark.parametrize("lo, hi", [(0, 150), (1, 12), (-5, 5), (-150, -7), (None, -3), (None, 0), (None, 99),
                                    (7, None), (0, None), (-41, None), (123, 4567), (-10, 10), (5, 5), (-1, -1)])
def test_integer_ranges(lo, hi):
    from molink_lite.serving.grammar import int_range_gbnf

    rx = _as_regex(int_range_gbnf(lo, hi))
    rng = random.Random(f"{lo},{hi}")
    for x in list(range(-3000, 3000)) + [rng.randint(-10 ** 12, 10 ** 12) for _ in range(2000)]:
        assert bool(rx.fullmatch(str(x))) == ((lo is None or x >= lo) and (hi is None or x <= hi)), x
    for bad in ("-0", "00", "01", "-01", "+1", "1.0"):
        assert not rx.fullmatch(bad), bad


def test_integer_bounds_in_schemas():
    r = _rules(json_schema_to_gbnf({"type": "integer", "minimum": 0, "maximum": 150}))
    assert _as_regex(r["root"].removesuffix(" space")[1:-1]).fullmatch("150")
    r = _rules(json_schema_to_gbnf({"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 4}))
    assert r["root"] == "([2-3]) space"
    r = _rules(json_schema_to_gbnf({"type": "integer", "minimum": 1, "exclusiveMinimum": True, "maximum": 3}))
    assert r["root"] == "([2-3]) space"  # draft 4's boolean exclusiveMinimum
    with pytest.raises(GrammarError, match="no integer lies between"):
        json_schema_to_gbnf({"type": "integer", "minimum": 5, "maximum": 4.5})
    with pytest.raises(GrammarError, match="must be a number"):
        json_schema_to_gbnf({"type": "integer", "minimum": "5"})


def test_json_object_grammar():
    check_gbnf(JSON_OBJECT_GBNF)
    assert JSON_OBJECT_GBNF.startswith("root   ::= object")


def test_gbnf_literal_escapes():
    assert gbnf_literal('a"b\\c\nd\x01') == '"a\\"b\\\\c\\nd\\x01"'
    check_gbnf("root ::= " + gbnf_literal('<tool_call>\n"x"\t') + "\n")


# --------------------------------------------------------------------------- #
# GBNF pre-check
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("text", [
    'root ::= "yes" | "no"\n',
    'root ::= item+\nitem ::= "- " [^\\r\\n]+ "\\n"\n',
    'root ::=\n  "{" ws (\n    "a"\n    | "b"\n  )? "}"\nws ::= | " " | "\\n" [ \\t]{0,20}\n',
    'root ::= [a-zA-Z0-9-] "x"{2} "y"{1,} "z"{0,3} . # comment\n\n# another\n',
    'root ::= "\\x41\\u00e9\\U0001F600" [^"\\\\]\r\n',
    'root ::= <[5]> !<[6]> "x"\n',
])
def test_gbnf_precheck_accepts_valid_grammars(text):
    check_gbnf(text)


@pytest.mark.parametrize("text, msg", [
    ("", "non-empty"),
    ('root ::= "abc\n', "unterminated string"),
    ("root ::= [abc\n", "unterminated character class"),
    ('root ::= ("a" | "b"\n', "expecting ')'"),
    ('root ::= "a")\n', "expecting a newline"),
    ('root ::= item\n', "rule 'item' is used but not defined"),
    ('start ::= "a"\n', "no 'root' rule"),
    ('root ::= * "a"\n', "with nothing before it"),
    ('root ::= "a"{,3}\n', "expecting a number"),
    ('root ::= "a"{1,2\n', "expecting '}'"),
    ('root ::= "a"{0,5000}\n', "repetitions"),
    ('root ::= "\\d"\n', "unknown escape"),
    ('root ::= "\\x4"\n', "hex digits"),
    ('root = "a"\n', "expecting '::='"),
    ('root ::= "a"\n  | "b"\n', "expecting a rule name"),
    ('root ::= foo_bar\nfoo_bar ::= "x"\n', "expecting a newline"),
])
def test_gbnf_precheck_refuses_broken_grammars(text, msg):
    with pytest.raises(GrammarError) as ei:
        check_gbnf(text)
    assert msg in str(ei.value)
    assert ei.value.param == "grammar"


def test_gbnf_precheck_error_says_where():
    with pytest.raises(GrammarError, match="line 2, column 11"):
        check_gbnf('root ::= a\na ::= "x" )\n')


def test_gbnf_precheck_handles_deep_nesting_without_recursion():
    check_gbnf("root ::= " + "(" * 5000 + '"a"' + ")" * 5000 + "\n")


# --------------------------------------------------------------------------- #
# the request fields
# --------------------------------------------------------------------------- #

def test_request_without_structured_output():
    assert grammar_for_request({}) is None
    assert grammar_for_request({"response_format": {"type": "text"}}) is None


def test_response_format_json_object_and_schema():
    assert grammar_for_request({"response_format": {"type": "json_object"}}) == JSON_OBJECT_GBNF
    g = grammar_for_request({"response_format": {"type": "json_schema", "json_schema": {
        "name": "person", "schema": PERSON, "strict": True}}})
    assert g == json_schema_to_gbnf(PERSON)
    # llama-server's extension: a schema inside json_object
    assert grammar_for_request({"response_format": {"type": "json_object", "schema": PERSON}}) == g
    # llama-server's fields
    assert grammar_for_request({"json_schema": PERSON}) == g
    gb = 'root ::= "yes" | "no"\n'
    assert grammar_for_request({"grammar": gb}) == gb
    # text alongside a grammar is no conflict
    assert grammar_for_request({"response_format": {"type": "text"}, "grammar": gb}) == gb


@pytest.mark.parametrize("body, param, msg", [
    ({"response_format": "json"}, "response_format", "must be an object"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "must be 'text'"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name", "letters"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "strict": "yes", "schema": {}}}},
     "response_format.json_schema.strict", "boolean"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "strng"}}}},
     "response_format.json_schema.schema", "type must be one of"),
    ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"\n'}, "grammar", "only one of"),
    ({"json_schema": {}, "grammar": 'root ::= "a"\n'}, "grammar", "only one of"),
    ({"json_schema": {"$ref": "http://x/y"}}, "json_schema", "remote"),
    ({"grammar": 5}, "grammar", "a string"),
    ({"grammar": "root ::= x\n"}, "grammar", "not defined"),
    ({"grammar": "root ::= " + '"a" ' * (MAX_GRAMMAR_BYTES // 4) + "\n"}, "grammar", "bytes"),
])
def test_request_field_errors(body, param, msg):
    with pytest.raises(GrammarError) as ei:
        grammar_for_request(body)
    assert ei.value.param == param
    assert msg in str(ei.value)
    assert isinstance(ei.value, ValueError)


# --------------------------------------------------------------------------- #
# no llama library on the gateway
# --------------------------------------------------------------------------- #

def test_grammar_and_tools_load_no_llama_library():
    """A fresh interpreter imports grammar / tools / chat and converts a schema: no llama_cpp module, no libllama."""
    code = ("import sys\n"
            "import molink_lite.serving.grammar as g, molink_lite.serving.tools, molink_lite.serving.chat\n"
            "g.json_schema_to_gbnf({'type': 'object', 'properties': {'a': {'type': 'string'}}})\n"
            "mods = [m for m in sys.modules if m.split('.')[0] == 'llama_cpp']\n"
            "maps = open('/proc/self/maps').read() if sys.platform.startswith('linux') else ''\n"
            "libs = sorted({l.split('/')[-1] for l in maps.splitlines() if 'llama' in l.split('/')[-1] "
            "or 'ggml' in l.split('/')[-1]})\n"
            "print(mods, libs); sys.exit(1 if mods or libs else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert r.returncode == 0, f"loaded the llama library: {r.stdout} {r.stderr[-2000:]}"


# --------------------------------------------------------------------------- #
# llama.cpp compiles what we produce (in process, a tiny model's vocabulary)
# --------------------------------------------------------------------------- #

def test_llama_cpp_compiles_converted_schemas(compile_gbnf):
    for name, schema in SCHEMAS.items():
        assert compile_gbnf(json_schema_to_gbnf(schema)), name
    assert compile_gbnf(JSON_OBJECT_GBNF)
    assert compile_gbnf(json_schema_to_gbnf({"type": "string", "minLength": 500, "maxLength": 500}))


def test_llama_cpp_agrees_with_the_precheck(compile_gbnf):
    for text in ['root ::= "a" | "b"\n', 'root ::= "\\d"\n', 'root ::= foo_bar\nfoo_bar ::= "x"\n',
                 'root ::= "a"\n  | "b"\n', 'root ::= x\n', 'root ::= ("a"\n', 'root ::= <[5]> "x"\n']:
        try:
            check_gbnf(text)
            ok = True
        except GrammarError:
            ok = False
        assert compile_gbnf(text) == ok, text
