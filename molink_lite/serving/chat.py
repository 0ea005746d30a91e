"""Chat prompts: the GGUF's Jinja2 template (llama-cpp-python's formatter) or a llama.cpp built-in one.

llama-cpp-python is imported on the first chat request, not with this module: a gateway loads the native llama
library only to render a chat template, never to start.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Dict, List, Optional

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


def render_chat(messages: List[dict], *, template: Optional[str], arch: str, bos: str = "", eos: str = "",
                builtin: Optional[str] = None) -> ChatPrompt:
    """Render ``messages`` with ``template`` (Jinja2) or llama.cpp's built-in template for ``arch``."""
    if template:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        try:
            res = Jinja2ChatFormatter(template, eos, bos)(messages=messages)
        except Exception as e:  # noqa: BLE001 - template errors come from the request's content
            raise ChatTemplateError(f"chat template failed: {e}") from None
        stop = res.stop if isinstance(res.stop, list) else [res.stop] if res.stop else []
        return ChatPrompt(res.prompt, not res.added_special, [s for s in stop if s])
    import llama_cpp.llama_cpp as _llama

    name = builtin or BUILTIN_BY_ARCH.get(arch, "chatml")
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
