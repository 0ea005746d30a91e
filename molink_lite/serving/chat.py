"""Chat prompts: the GGUF's Jinja2 chat template (rendered here) or a llama.cpp built-in one, and the plan of a
chat request with tools (:func:`~.tools.plan_chat`, also importable from here: prompt, grammar, tool-call
parser).

Templates are rendered with jinja2 directly, the way llama-server (minja) and transformers do: a sandboxed
``ImmutableSandboxedEnvironment`` with ``trim_blocks`` / ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``,
``strftime_now`` and a ``tojson`` that keeps non-ASCII text; variables ``messages``, ``tools``,
``add_generation_prompt``, ``bos_token``, ``eos_token``. So ``tools``, assistant ``tool_calls`` and ``role: tool``
messages reach the template as the model was trained on them. What a template cannot show is polyfilled, as minja
does: probed once per template (:func:`template_caps`), a template without tools gets a system message describing
them (the generic format, :mod:`.tools`), one without tool calls / tool results gets them as JSON text in
assistant / user messages, one without a system role gets the system text at the top of the first user message.

llama-cpp-python is imported only for a GGUF without a template (llama.cpp's built-in templates), on the first
such request: a gateway loads the native llama library only for that, never to start.
"""

from __future__ import annotations

import ctypes
import functools
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Dict, List, Optional

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tools import ChatPlan, detect_format, generic_instructions, plan_chat

# llama.cpp built-in templates to use when a GGUF carries none, by architecture.
BUILTIN_BY_ARCH: Dict[str, str] = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "phi3": "phi3", "command-r": "command-r",
    "cohere2": "command-r", "deepseek2": "deepseek3", "deepseek": "deepseek", "chatglm": "chatglm4",
    "glm4": "chatglm4", "granite": "granite", "falcon": "falcon3",
}


class ChatTemplateError(ValueError):
    """The messages could not be rendered."""


@dataclass
class ChatPrompt:
    text: str
    add_special: bool          # tokenize with BOS etc. (False when the template wrote them)
    stop: List[str]


# --------------------------------------------------------------------------- #
# Jinja2
# --------------------------------------------------------------------------- #

class _GenerationTag(jinja2.ext.Extension):
    """HuggingFace's ``{% generation %}`` ... ``{% endgeneration %}`` (training masks): passes its body through."""

    tags = {"generation"}

    def parse(self, parser):  # type: ignore[no-untyped-def]
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=tuple(separators) if separators else None,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _render(template: str, messages: List[dict], tools: Optional[List[dict]], bos: str, eos: str,
            add_generation_prompt: bool = True) -> str:
    try:
        tmpl = _compiled(template)
        return tmpl.render(messages=messages, tools=tools or None, add_generation_prompt=add_generation_prompt,
                           bos_token=bos, eos_token=eos)
    except ChatTemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - template errors come from the request's content
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


class _JsonDict(dict):
    """Tool-call arguments for a template: a mapping (``| tojson``, ``| items``) that prints as JSON (``{{ }}``)."""

    def __str__(self) -> str:
        return json.dumps(self, ensure_ascii=False)

    __repr__ = __str__


# --------------------------------------------------------------------------- #
# what a template can show
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class TemplateCaps:
    system: bool = True           # a system message shows
    tools: bool = False           # `tools` show (the template describes them to the model)
    tool_calls: bool = False      # assistant `tool_calls` show
    tool_responses: bool = False  # `role: tool` messages show


_PROBE_TOOL = {"type": "function", "function": {"name": "molink_probe_tool", "description": "probe",
                                                 "parameters": {"type": "object", "properties": {
                                                     "probe_arg": {"type": "string"}}, "required": ["probe_arg"]}}}
_PROBE_ID = "a1b2c3d4e"  # 9 letters/digits: Mistral templates check


def _probe_call() -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": _PROBE_ID, "type": "function",
         "function": {"name": "molink_probe_call", "arguments": _JsonDict(probe_arg="probe")}}]}


def _shows(template: str, messages: List[dict], needle: str, tools: Optional[List[dict]] = None,
           gen: bool = True) -> bool:
    try:
        return needle in _render(template, messages, tools, "", "", gen)
    except Exception:  # noqa: BLE001 - a template that raises cannot show it
        return False


@functools.lru_cache(maxsize=16)
def template_caps(template: str) -> TemplateCaps:
    """What ``template`` shows, found by rendering small probe conversations (as minja's capability probes)."""
    user = {"role": "user", "content": "hi"}
    system = _shows(template, [{"role": "system", "content": "MOLINK_SYS_PROBE"}, user], "MOLINK_SYS_PROBE")
    tools = "tools" in template and _shows(template, [user], "molink_probe_tool", [_PROBE_TOOL])
    probe_tools = [_PROBE_TOOL] if tools else None
    calls = _shows(template, [user, _probe_call()], "molink_probe_call", probe_tools, gen=False)
    results = _shows(template, [user, _probe_call(), {"role": "tool", "tool_call_id": _PROBE_ID,
                                                       "name": "molink_probe_call", "content": "MOLINK_TOOL_PROBE"}],
                     "MOLINK_TOOL_PROBE", probe_tools)
    return TemplateCaps(system=system, tools=tools, tool_calls=calls, tool_responses=results)


_BUILTIN_CAPS = TemplateCaps(system=True)


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            v = json.loads(raw)
        except ValueError:
            return raw
        return _JsonDict(v) if isinstance(v, dict) else raw
    return _JsonDict(raw) if isinstance(raw, dict) else raw


def _prepare(messages: List[dict], caps: TemplateCaps) -> List[dict]:
    """Messages as the template gets them: tool-call arguments as mappings (templates ``| tojson`` them), content
    never None, and what the template cannot show polyfilled (see the module doc)."""
    out: List[dict] = []
    names_by_id: Dict[str, str] = {}
    for m in messages:
        m = dict(m)
        role = m.get("role")
        if m.get("content") is None:
            m["content"] = ""
        tcs = m.get("tool_calls")
        if role == "assistant" and tcs:
            norm = []
            for tc in tcs:
                fn = tc.get("function") if isinstance(tc, dict) else None
                fn = fn if isinstance(fn, dict) else {}
                cid = tc.get("id") if isinstance(tc, dict) else None
                name = fn.get("name", "")
                if isinstance(cid, str):
                    names_by_id[cid] = name
                norm.append({"id": cid or "", "type": "function",
                             "function": {"name": name, "arguments": _arguments(fn.get("arguments"))}})
            if caps.tool_calls:
                m["tool_calls"] = norm
            else:
                del m["tool_calls"]
                calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"], "id": c["id"]}
                         for c in norm]
                text = json.dumps({"tool_calls": calls}, ensure_ascii=False, indent=2)
                m["content"] = (m["content"] + "\n\n" + text) if m["content"] else text
        elif "tool_calls" in m:
            del m["tool_calls"]
        if role == "tool" and not caps.tool_responses:
            cid = m.get("tool_call_id")
            name = m.get("name") or names_by_id.get(cid if isinstance(cid, str) else "", "")
            resp = {"tool": name, "content": m["content"]}
            if cid:
                resp["tool_call_id"] = cid
            m = {"role": "user", "content": json.dumps({"tool_response": resp}, ensure_ascii=False, indent=2)}
        out.append(m)
    if not caps.system and any(m.get("role") == "system" for m in out):
        sys_text = "\n\n".join(str(m["content"]) for m in out if m.get("role") == "system")
        out = [m for m in out if m.get("role") != "system"]
        for m in out:
            if m.get("role") == "user":
                m["content"] = sys_text + "\n\n" + str(m["content"])
                break
        else:
            out.insert(0, {"role": "user", "content": sys_text})
    return out


def _add_system(messages: List[dict], text: str) -> List[dict]:
    """``text`` appended to the leading system message, or a new one in front (minja's add_system)."""
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = (str(first.get("content") or "") + "\n\n" + text).lstrip("\n")
        return [first] + list(messages[1:])
    return [{"role": "system", "content": text}] + list(messages)


# --------------------------------------------------------------------------- #
# rendering
# --------------------------------------------------------------------------- #

def render_chat(messages: List[dict], *, template: Optional[str], arch: str, bos: str = "", eos: str = "",
                builtin: Optional[str] = None, tools: Optional[List[dict]] = None, tool_choice: str = "auto",
                parallel_tool_calls: bool = True) -> ChatPrompt:
    """Render ``messages`` with ``template`` (Jinja2) or llama.cpp's built-in template for ``arch``.

    ``tools`` (checked, :func:`~.tools.parse_tools`): given to a template that shows them; for one that does not
    (and for a built-in template, or a template whose tool-call format is unknown) the generic format's system
    message describes them and the JSON to answer with (``tool_choice`` / ``parallel_tool_calls`` shape that text)."""
    caps = template_caps(template) if template else _BUILTIN_CAPS
    if tools:
        fmt = detect_format(template) if template and caps.tools else "generic"
        if fmt == "generic":
            messages = _add_system(messages, generic_instructions(None if caps.tools else tools, tool_choice,
                                                                  parallel_tool_calls))
    msgs = _prepare(messages, caps)
    if template:
        text = _render(template, msgs, tools if caps.tools else None, bos, eos)
        return ChatPrompt(text, False, [eos] if eos else [])
    return _render_builtin(msgs, builtin or BUILTIN_BY_ARCH.get(arch, "chatml"))


def _render_builtin(messages: List[dict], name: str) -> ChatPrompt:
    import llama_cpp.llama_cpp as _llama

    keep = [(str(m.get("role", "")).encode(), str(m.get("content") or "").encode()) for m in messages]
    arr = (_llama.llama_chat_message * len(keep))(*[_llama.llama_chat_message(r, c) for r, c in keep])
    size = sum(len(r) + len(c) for r, c in keep) * 2 + 512
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = _llama.llama_chat_apply_template(name.encode(), arr, len(keep), True, buf, size)
        if n < 0:
            raise ChatTemplateError(f"llama.cpp has no built-in chat template named '{name}'")
        if n <= size:
            return ChatPrompt(buf.raw[:n].decode("utf-8", "replace"), True, [])
        size = n + 1
    raise ChatTemplateError("chat template output did not fit")


__all__ = ["BUILTIN_BY_ARCH", "ChatPlan", "ChatPrompt", "ChatTemplateError", "TemplateCaps", "plan_chat",
           "render_chat", "template_caps"]
