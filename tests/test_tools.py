"""Tool calling on the gateway side (serving/tools.py, serving/chat.py): request checks, template rendering with
tools / tool calls / tool results, the generic fallback, tool-call grammars, and the streaming tool-call parser."""

from __future__ import annotations

import json
import random
import re

import pytest

from molink_lite.serving.chat import (ChatTemplateError, plan_chat, render_chat, template_caps)
from molink_lite.serving.grammar import GrammarError, check_gbnf
from molink_lite.serving.tools import (ToolCallParser, ToolError, detect_format, parse_tools, tool_grammar)

# Modelled on Qwen2.5-Instruct's chat template (tokenizer_config.json): tools in <tools>, calls in <tool_call>,
# tool results as <tool_response> in a user turn.
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# a chat template that knows nothing of tools: roles and contents only, user/assistant/system
PLAIN = ("{{ bos_token }}{% for m in messages %}{% if m.role in ['system', 'user', 'assistant'] %}"
         "<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}")

# one that refuses a system role (as Gemma 2's does)
NO_SYSTEM = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
    {"role": "tool", "tool_call_id": "call_abc", "content": "{\"temperature\": 21}"},
]


# --------------------------------------------------------------------------- #
# rendering
# --------------------------------------------------------------------------- #

def test_qwen_template_renders_tools_calls_and_results():
    assert template_caps(QWEN25).tools and template_caps(QWEN25).tool_calls and template_caps(QWEN25).tool_responses
    p = render_chat(CONVERSATION, template=QWEN25, arch="qwen2", eos="<|im_end|>", tools=TOOLS)
    t = p.text
    # the tools, as JSON, inside <tools>, after the request's system text
    tools_block = t[t.index("<tools>\n{"):t.index("\n</tools>")]
    assert json.dumps(WEATHER) in tools_block and json.dumps(TIME) in tools_block
    assert t.startswith("<|im_start|>system\nYou are terse.\n\n# Tools")
    # the assistant's call with its arguments as a JSON object (not a JSON string of JSON)
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris", "unit": "celsius"}}\n</tool_call><|im_end|>') in t
    # the tool's result in a user turn
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response><|im_end|>' in t
    assert t.endswith("<|im_start|>assistant\n")
    assert p.stop == ["<|im_end|>"] and p.add_special is False


def test_render_chat_keeps_its_old_signature():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    p = render_chat(msgs, template=QWEN25, arch="qwen2", bos="", eos="<|im_end|>")
    assert p.text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    p = render_chat(msgs, template=PLAIN, arch="llama", bos="<s>", eos="</s>", builtin=None)
    assert p.text == "<s><|system|>S<|end|>\n<|user|>hi<|end|>\n<|assistant|>"


def test_template_errors_and_sandbox():
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        render_chat([{"role": "user", "content": "x"}], template="{{ raise_exception('System role not supported') }}",
                    arch="llama")
    with pytest.raises(ChatTemplateError):
        render_chat([{"role": "user", "content": "x"}], template="{{ messages.__class__.__mro__ }}", arch="llama")
    with pytest.raises(ChatTemplateError):  # immutable: no list.append from a template
        render_chat([{"role": "user", "content": "x"}], template="{{ messages.append(1) }}", arch="llama")
    assert render_chat([{"role": "user", "content": "x"}], template="{{ strftime_now('%Y') | length }}",
                       arch="llama").text == "4"


def test_fallback_for_a_template_without_tools():
    caps = template_caps(PLAIN)
    assert caps.system and not caps.tools and not caps.tool_calls and not caps.tool_responses
    p = render_chat(CONVERSATION, template=PLAIN, arch="llama", bos="<s>", eos="</s>", tools=TOOLS)
    sys_turn = p.text[:p.text.index("<|end|>")]
    # llama-server's generic format: the request's system text, the tools, and the JSON to answer with
    assert sys_turn.startswith("<s><|system|>You are terse.\n\nYou can call any of the following tools")
    assert '"name": "get_weather"' in sys_turn and '"description": "Current weather of a city"' in sys_turn
    assert '{"tool_calls": [{"name": "<tool name>", "arguments": {' in sys_turn
    assert '{"response": "<your reply>"}' in sys_turn
    # the earlier call as JSON in the assistant turn, the result as a user turn
    asst = p.text[p.text.index("<|assistant|>"):]
    call = json.loads(asst[len("<|assistant|>"):asst.index("<|end|>")])
    assert call == {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"},
                                    "id": "call_abc"}]}
    user_turns = re.findall(r"<\|user\|>(.*?)<\|end\|>", p.text, re.S)
    assert json.loads(user_turns[-1]) == {"tool_response": {"tool": "get_weather", "content": '{"temperature": 21}',
                                                            "tool_call_id": "call_abc"}}


def test_template_without_system_role_gets_it_in_the_first_user_turn():
    assert not template_caps(NO_SYSTEM).system
    p = render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                    template=NO_SYSTEM, arch="gemma2")
    assert p.text == "<user>Be brief.\n\nhi</user>"


def test_arguments_print_as_json_in_templates_that_do_not_tojson_them():
    tmpl = ("{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.name }}({{ c.function.arguments }})"
            "{% for k, v in c.function.arguments | items %}[{{ k }}={{ v }}]{% endfor %}{% endfor %}{% endfor %}")
    p = render_chat(CONVERSATION[:3], template=tmpl, arch="llama")
    assert p.text == 'get_weather({"city": "Paris", "unit": "celsius"})[city=Paris][unit=celsius]'


def test_builtin_template_with_tools_uses_the_generic_fallback():
    p = render_chat(CONVERSATION, template=None, arch="llama", tools=TOOLS)  # chatml
    assert "<|im_start|>system\nYou are terse.\n\nYou can call any of the following tools" in p.text
    assert '"tool_response"' in p.text and p.add_special


# --------------------------------------------------------------------------- #
# formats
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("snippet, fmt", [
    (QWEN25, "hermes"),
    ("{%- for tool_call in message.tool_calls %}<tool_call>\n{{ tool_call | tojson }}</tool_call>", "hermes"),
    ("<tool_call>\n<function={{ tool_call.name }}>\n<parameter=x>", "generic"),  # Qwen3-Coder's XML calls
    ("{{- '<|python_tag|>' + tool_call.name + '.call(' }}", "llama3"),
    ("<|start_header_id|>ipython<|end_header_id|>{{ '{\"name\": ...' }}", "llama3"),
    ("{{- '[TOOL_CALLS][' }}{%- for tool in message.tool_calls %}", "mistral"),
    (PLAIN, "generic"),
    ("", "generic"),
])
def test_detect_format(snippet, fmt):
    assert detect_format(snippet) == fmt


# --------------------------------------------------------------------------- #
# the request
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("body, param, msg", [
    ({"tools": {"a": 1}}, "tools", "must be a list"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "'function'"),
    ({"tools": [{"type": "function"}]}, "tools[0].function", "object with a 'name'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "letters"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name", "1 to 64"),
    ({"tools": [TIME, TIME]}, "tools[1].function.name", "two tools"),
    ({"tools": [{"type": "function", "function": {"name": "a", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters", "object"),
    ({"tools": [{"type": "function", "function": {"name": "a", "parameters": []}}]},
     "tools[0].function.parameters", "object"),
    ({"tools": [{"type": "function", "function": {"name": "a", "description": 3}}]},
     "tools[0].function.description", "string"),
    ({"tools": [{"type": "function", "function": {"name": f"t{i}"}} for i in range(129)]}, "tools", "at most 128"),
    ({"tools": [{"type": "function", "function": {"name": f"t{i}", "description": "d" * 3000}} for i in range(100)]},
     "tools", "bytes"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "'none', 'auto', 'required'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "not in 'tools'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice.function.name", "string"),
    ({"tools": TOOLS, "tool_choice": {"type": "code"}}, "tool_choice", "must be"),
    ({"tool_choice": "required"}, "tool_choice", "no 'tools'"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
    ({"functions": [{"name": "a"}]}, "functions", "deprecated"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "a", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "https://x.org/s"}}}}}], "tool_choice": "required"},
     "tools[0].function.parameters", "remote"),
])
def test_tool_request_errors(body, param, msg):
    with pytest.raises(ToolError) as ei:
        plan_chat(body, [{"role": "user", "content": "hi"}], template=QWEN25, arch="qwen2", eos="<|im_end|>")
    assert ei.value.param == param, str(ei.value)
    assert msg in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_parse_tools_defaults_parameters():
    t = parse_tools({"tools": [{"type": "function", "function": {"name": "ping"}}]})
    assert t == [{"type": "function", "function": {"name": "ping", "parameters": {"type": "object",
                                                                                   "properties": {}}}}]


def test_response_format_errors_are_grammar_errors():
    with pytest.raises(GrammarError) as ei:
        plan_chat({"response_format": {"type": "xml"}}, [{"role": "user", "content": "hi"}], template=QWEN25,
                  arch="qwen2")
    assert ei.value.param == "response_format.type"


# --------------------------------------------------------------------------- #
# plans
# --------------------------------------------------------------------------- #

USER = [{"role": "user", "content": "Weather in Paris?"}]


def _plan(body, template=QWEN25):
    return plan_chat(body, USER, template=template, arch="qwen2", eos="<|im_end|>")


def test_plan_without_tools_is_the_plain_prompt():
    p = _plan({})
    assert p.parser is None and p.grammar == "" and p.triggers == ()
    assert p.prompt == render_chat(USER, template=QWEN25, arch="qwen2", eos="<|im_end|>").text
    p = _plan({"tools": TOOLS, "tool_choice": "none"})
    assert p.parser is None and p.grammar == "" and "<tools>" not in p.prompt
    p = _plan({"response_format": {"type": "json_object"}})
    assert p.grammar.startswith("root") and p.parser is None


def test_plan_auto_is_a_lazy_grammar_from_the_start_word():
    p = _plan({"tools": TOOLS})
    assert p.tool_format == "hermes" and p.triggers == ("<tool_call>",)
    assert p.parser is not None and p.parser.names == {"get_weather", "get_time"}
    check_gbnf(p.grammar)
    assert "<tools>" in p.prompt


def test_plan_required_forces_a_call():
    p = _plan({"tools": TOOLS, "tool_choice": "required"})
    assert p.triggers == ()
    rules = dict(line.split(" ::= ", 1) for line in p.grammar.splitlines() if " ::= " in line)
    assert rules["root"] == 'tool-call ("\\n" "\\n"? tool-call)*'
    assert rules["tool-call"].startswith('"<tool_call>"')
    assert '"\\"get_weather\\""' in p.grammar and '"\\"get_time\\""' in p.grammar
    p1 = _plan({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    assert dict(line.split(" ::= ", 1) for line in p1.grammar.splitlines())["root"] == "tool-call"


def test_plan_named_function_allows_only_it():
    p = _plan({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert '"\\"get_time\\""' in p.grammar and "get_weather" not in p.grammar
    assert p.parser.names == {"get_time"}


def test_plan_generic_for_a_template_without_tools():
    p = _plan({"tools": TOOLS}, template=PLAIN)
    assert p.tool_format == "generic" and p.triggers == ()  # not lazy: the answer is JSON either way
    assert '"\\"response\\""' in p.grammar and '"\\"tool_calls\\""' in p.grammar
    assert "You can call any of the following tools" in p.prompt
    p = _plan({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}, template=PLAIN)
    assert "response" not in p.grammar
    assert "Respond in JSON format with `tool_calls` (a request to call tools (one call))" in p.prompt


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral", "generic"])
@pytest.mark.parametrize("choice", ["auto", "required", "get_weather"])
def test_tool_grammars_pass_the_precheck(fmt, choice):
    tools = parse_tools({"tools": TOOLS})
    g, trig = tool_grammar(fmt, tools, choice, True)
    if fmt == "llama3" and choice == "auto":
        assert g == "" and trig == ()
        return
    check_gbnf(g)
    assert trig == (() if choice != "auto" or fmt in ("llama3", "generic") else {"hermes": ("<tool_call>",),
                                                                                "mistral": ("[TOOL_CALLS]",)}[fmt])


def test_auto_with_a_schema_the_converter_cannot_do_runs_free():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "[a-z]"}}}}}]
    p = _plan({"tools": tools})
    assert p.grammar == "" and p.parser is not None
    with pytest.raises(ToolError, match="anchored"):
        _plan({"tools": tools, "tool_choice": "required"})


# --------------------------------------------------------------------------- #
# the parser
# --------------------------------------------------------------------------- #

NAMES = ["get_weather", "get_time"]


def _parse(fmt, text, pieces=None, names=NAMES):
    p = ToolCallParser(fmt, names)
    content, calls = [], []
    for x in (pieces if pieces is not None else [text]):
        c, k = p.feed(x)
        content.append(c)
        calls += k
    c, k = p.finish()
    content.append(c)
    calls += k
    return "".join(content), [(i, c.name, json.loads(c.arguments)) for i, c in calls], [c for _, c in calls]


PARSE_CASES = [
    ("hermes", 'Let me check.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     "Let me check.", [(0, "get_weather", {"city": "Paris"}), (1, "get_time", {})]),
    ("hermes", "<think>is <tool_ a tag?</think>No call <b>here</b> 5 < 6", "<think>is <tool_ a tag?</think>No call "
               "<b>here</b> 5 < 6", []),
    ("hermes", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',  # not a listed tool: content
     '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', []),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa</tool_call>ris"}}\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa</tool_call>ris"}}\n</tool_call>', []),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',  # cut before the end tag
     "", [(0, "get_weather", {"city": "Paris"})]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>',
     "", [(0, "get_weather", {"city": "Rome"})]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "",
     [(0, "get_weather", {"city": "Paris"})]),
    ("llama3", '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Pa\\"}ris"}}; '
               '{"name": "get_time", "parameters": {}}',
     "", [(0, "get_weather", {"city": 'Pa"}ris'}), (1, "get_time", {})]),
    ("llama3", 'JSON: {"name": "Bob", "age": 3} {"a": {"b": 1}}',
     'JSON: {"name": "Bob", "age": 3} {"a": {"b": 1}}', []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}, '
                '{"name": "get_time", "arguments": {}}]',
     "", [(0, "get_weather", {"city": "Paris"}), (1, "get_time", {})]),
    ("mistral", ' [{"name": "get_weather", "arguments": {"city": "Paris"}}]',  # [TOOL_CALLS] rendered as nothing
     "", [(0, "get_weather", {"city": "Paris"})]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}', "",
     [(0, "get_weather", {"city": "Paris"}), (1, "get_time", {})]),
    ("mistral", "Lists: [1, 2] and [x] and [TOOL", "Lists: [1, 2] and [x] and [TOOL", []),
    ("generic", '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "get_time", "arguments": {}}]}',
     "", [(0, "get_weather", {"city": "Paris"}), (1, "get_time", {})]),
    ("generic", ' {"tool_call": {"name": "get_time", "arguments": {}}}', "", [(0, "get_time", {})]),
    ("generic", '{"response": "It is \\"sunny\\" \\u00e9\\ud83d\\ude00\\n"}', 'It is "sunny" é😀\n', []),
    ("generic", 'plain text {"a": 1}', 'plain text {"a": 1}', []),
    ("generic", '{"a": 1}', '{"a": 1}', []),
]


@pytest.mark.parametrize("fmt, text, content, calls", PARSE_CASES)
def test_parser_whole_and_in_pieces(fmt, text, content, calls):
    whole = _parse(fmt, text)
    assert whole[:2] == (content, calls)
    assert _parse(fmt, text, list(text))[:2] == whole[:2]  # one character at a time
    rng = random.Random(len(text))
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert _parse(fmt, text, pieces)[:2] == whole[:2], pieces


def test_parser_ids():
    _, _, calls = _parse("hermes", PARSE_CASES[0][1])
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in calls) and calls[0].id != calls[1].id
    _, _, calls = _parse("mistral", PARSE_CASES[9][1])
    assert calls[0].id == "abcDEF123" and re.fullmatch(r"[A-Za-z0-9]{9}", calls[1].id)  # Mistral's 9-char ids
    assert json.loads(calls[0].arguments) == {"city": "Paris"}


def test_parser_shows_content_as_it_comes():
    p = ToolCallParser("hermes", NAMES)
    assert p.feed("Hello ") == ("Hello", [])  # trailing whitespace waits
    assert p.feed("world <tool") == (" world", [])  # a possible start waits
    assert p.feed("box> and more") == (" <toolbox> and more", [])
    c, calls = p.feed(' \n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    assert c == "" and [(i, k.name) for i, k in calls] == [(0, "get_time")]
    assert p.finish() == ("", [])
    g = ToolCallParser("generic", NAMES)
    assert g.feed('{"response": "Hi') == ("Hi", [])
    assert g.feed(' there\\') == (" there", [])
    assert g.feed('n"}') == ("\n", [])
    assert g.finish() == ("", [])


def test_parser_rejects_unknown_format():
    with pytest.raises(ValueError):
        ToolCallParser("xml", NAMES)


# --------------------------------------------------------------------------- #
# llama.cpp compiles the tool grammars (in process, a tiny model's vocabulary)
# --------------------------------------------------------------------------- #

def test_llama_cpp_compiles_tool_grammars(compile_gbnf):
    tools = parse_tools({"tools": TOOLS + [{"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}, "filters": {"type": "array", "items": {
            "$ref": "#/$defs/F"}}}, "required": ["q"], "$defs": {"F": {"type": "object", "properties": {
                "k": {"type": "string"}, "v": {"type": ["string", "number", "null"]}}}}}}}]})
    for fmt in ("hermes", "llama3", "mistral", "generic"):
        for choice in ("auto", "required", "search"):
            for parallel in (True, False):
                g, _ = tool_grammar(fmt, tools, choice, parallel)
                if g:
                    assert compile_gbnf(g), (fmt, choice, parallel, g)
