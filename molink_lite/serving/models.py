"""The models one gateway serves, and which of them a request names.

A gateway serves one or more models (``gateway --model A.gguf --model B.gguf``, ``--pipeline NAME=ws://...``,
``serve --model A --model B``). Each :class:`ServedModel` has its own :class:`~.router.Router` (its pipelines,
queue, failover and replay), its own placement when stages join (:class:`~.cluster.Cluster`) and its own
on-demand loading (:class:`~.idle.IdleUnloader`), so one model's failure, queue or placement never touches
another model's requests. :class:`ModelTable` maps the ``model`` field of a request (an id or an alias) to its
model; a request without ``model`` goes to the first one, as a one-model gateway always did.

States (``/v1/models``, ``/v1/stats``, ``status``): ``serving`` (a pipeline is up), ``placing`` (join mode:
stages are joining or being placed), ``no capacity`` (join mode: the hosts that joined cannot hold it; the
detail says why), ``down`` (pipelines exist, none is up: requests wait for one to come back), ``unloaded``
(released for being idle; the next request loads it again) and ``loading``.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

# a model id or alias: what clients send as "model" (Ollama's "qwen2.5:7b", Hugging Face's "org/name", a GGUF's own
# "Gemma 3 270m"): printable, at most 128 characters, no '=' or ',' (the command line's separators), no space at
# either end
MODEL_NAME = re.compile(r"[^\s=,\x00-\x1f\x7f](?:[^=,\x00-\x1f\x7f]{0,126}[^\s=,\x00-\x1f\x7f])?")
STATES = ("serving", "placing", "no capacity", "down", "unloaded", "loading")


class UnknownModel(KeyError):
    """A request named a model this gateway does not serve."""

    def __init__(self, name: str, served: Sequence[str]):
        super().__init__(name)
        self.name = name
        self.served = list(served)


def valid_name(name: str) -> bool:
    return bool(MODEL_NAME.fullmatch(name))


class ServedModel:
    """One model behind the gateway: its name and aliases, its router (pipelines), and what places or loads it.

    ``name`` may be empty: the model is then called what its stages report (their GGUF's name), as a one-model
    gateway without ``--model-name`` always did."""

    def __init__(self, name: str, router: Any, *, aliases: Iterable[str] = (), cluster: Any = None) -> None:
        self._name = name
        self.router = router
        self.aliases: Tuple[str, ...] = tuple(aliases)
        self.cluster: Any = cluster   # serving.cluster.Cluster in join mode
        self.idle: Any = None         # serving.idle.IdleUnloader with --idle-unload

    @property
    def name(self) -> str:
        if self._name:
            return self._name
        for p in self.router.pipelines:
            if p.infos:
                return str(p.infos[0].get("name") or "model")
        return "model"

    @property
    def pipelines(self) -> List[Any]:
        return self.router.pipelines

    def answers_to(self, name: str) -> bool:
        return name == self.name or name in self.aliases

    @property
    def state(self) -> str:
        return self.state_detail()[0]

    def state_detail(self) -> Tuple[str, str]:
        """(state, why): one of :data:`STATES` and a sentence for people."""
        if self.idle is not None and self.idle.state in ("unloaded", "loading"):
            return self.idle.state, self.idle.detail
        pipes = self.router.pipelines
        if any(p.healthy for p in pipes):
            n = sum(1 for p in pipes if p.healthy)
            return "serving", f"{n} of {len(pipes)} pipeline(s) up"
        if self.cluster is not None:
            why = self.cluster.capacity_problem
            if why:
                return "no capacity", why
            if not pipes:
                return "placing", self.cluster.placing_detail()
        if not pipes:
            return "placing", "no pipeline yet"
        errs = "; ".join(f"{p.name}: {p.error}" for p in pipes if p.error)
        return "down", errs or "no pipeline is up; requests wait for one to come back"

    def entry(self) -> Dict[str, Any]:
        """This model in ``GET /v1/models`` (OpenAI's fields, llama-server's ``meta``, and its state)."""
        state, why = self.state_detail()
        entry: Dict[str, Any] = {"id": self.name, "object": "model", "created": 0, "owned_by": "molink-lite",
                                 "state": state, "state_detail": why, "aliases": list(self.aliases)}
        ups = [p for p in self.pipelines if p.healthy and p.infos] or [p for p in self.pipelines if p.infos]
        if ups:
            p = ups[0]
            first = p.infos[0]
            meta: Dict[str, Any] = {"n_ctx": int(p.n_ctx_lane or p.n_ctx), "n_vocab": first.get("n_vocab"),
                                    "n_embd": first.get("n_embd"), "n_layer": first.get("n_layer_total"),
                                    "arch": first.get("arch")}
            if first.get("n_ctx_train"):
                meta["n_ctx_train"] = first["n_ctx_train"]
            entry["meta"] = meta
        return entry


class ModelTable:
    """The served models in order (the first is the default); looks a request's ``model`` up by id or alias."""

    def __init__(self, models: Sequence[ServedModel]) -> None:
        if not models:
            raise ValueError("a gateway serves at least one model")
        self.models: List[ServedModel] = list(models)
        self.check()

    def check(self) -> None:
        """Ids and aliases are unique over all models (raises ValueError naming the clash)."""
        seen: Dict[str, int] = {}
        for i, m in enumerate(self.models):
            for n in (m.name, *m.aliases):
                if seen.get(n, i) != i:
                    raise ValueError(f"the name {n!r} is used by two models ({self.models[seen[n]].name!r} and "
                                     f"{m.name!r}); name them with --model NAME=PATH or --pipeline NAME=URLS")
                seen[n] = i

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    @property
    def names(self) -> List[str]:
        return [m.name for m in self.models]

    def resolve(self, name: Optional[str]) -> ServedModel:
        """The model called ``name`` (an id or alias); None: the default. Raises :class:`UnknownModel`."""
        if name is None:
            return self.default
        for m in self.models:
            if m.answers_to(name):
                return m
        raise UnknownModel(name, self.names)

    def __iter__(self):
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)


def split_tagged(value: str, kind: str) -> Tuple[str, str]:
    """``NAME=REST`` -> (NAME, REST); a value without a valid ``NAME=`` prefix -> ("", value). ``kind`` says what
    REST is ("urls" or "path"): for a path, an existing file is never split (a file name may hold '=')."""
    if kind == "path":
        import os

        if os.path.exists(value):
            return "", value
    head, sep, rest = value.partition("=")
    if not sep or not valid_name(head) or (kind == "urls" and head.startswith(("ws:", "wss:"))):
        return "", value
    return head, rest


__all__ = ["ServedModel", "ModelTable", "UnknownModel", "MODEL_NAME", "STATES", "valid_name", "split_tagged"]
