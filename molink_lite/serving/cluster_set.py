"""Join mode with several models: one ``/cluster`` for all of them, and which model a joining host serves.

``gateway --model A.gguf --model B.gguf``: each model has its own :class:`~.cluster.Cluster` (placement,
pipelines, replacements) and its own router; a :class:`ClusterSet` takes every join and hands the host to the
model that needs it most (:func:`pick_model`), so the hosts are shared by all models:

1. a stage that rejoins holding a model's layers goes back to that model;
2. a host goes where a pipeline lost a host and this one can hold the vacated layers (the first such model);
3. else to the first model (in ``--model`` order) with no pipeline yet whose joined hosts do not yet offer the
   memory one pipeline needs (weights, KV cache for ``--ctx``, buffers);
4. else it makes a replica for the busiest model (queued + running sequences per pipeline), then for the model
   with the fewest pipelines.

A host that cannot hold one layer of any model is refused by the model it could come closest to (with the
usual reason). Each placed stage is its own process: a host with memory for stages of two models runs
``molink-lite stage --join URL --max-memory SIZE`` twice, and each process is placed like any other host.
``molink-lite plan --model A --model B --host ...`` runs the same rule (:func:`joint_plan`) over the hosts in
the order given and prints each model's plan.

All clusters share one set of relay tokens, dial-backs, per-address relay limits and host names (a relayed
stage's tunnel and the limits do not depend on which model it serves).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import orjson
from aiohttp import web

from .cluster import CLUSTER_KEY, Cluster, accept_member, member_base
from .placement import HostSpec, ModelCost, PlacementError, Plan, plan

log = logging.getLogger(__name__)


@dataclass
class Need:
    """What one model needs of the next host, as :func:`pick_model` weighs it."""

    min_host: int            # bytes a host needs to hold one layer with its KV and buffers
    pipeline_bytes: int      # bytes one pipeline needs in all (over the hosts it would take)
    waiting: int = 0         # bytes offered by hosts that joined for it and wait to be placed
    pipelines: int = 0       # pipelines it has (up or not)
    vacated: Tuple[int, ...] = ()   # bytes each of its host-less stages needs (a host left)
    load: float = 0.0        # queued + running sequences per pipeline


def pick_model(needs: Sequence[Need], memory: int) -> int:
    """The index of the model a host offering ``memory`` bytes should serve (see the module's rule)."""
    fits = [i for i, n in enumerate(needs) if memory >= n.min_host]
    if not fits:   # refused by the model it comes closest to (its error names what is missing)
        return min(range(len(needs)), key=lambda i: needs[i].min_host)
    for i in fits:
        if any(memory >= b for b in needs[i].vacated):
            return i
    for i in fits:
        n = needs[i]
        if n.pipelines == 0 and n.waiting < n.pipeline_bytes:
            return i
    # a replica: the busiest model, then the fewest pipelines (counting one about to be placed), then in order
    return min(fits, key=lambda i: (-needs[i].load,
                                    needs[i].pipelines + (needs[i].waiting >= needs[i].pipeline_bytes), i))


def _need(cost: ModelCost, waiting_hosts: int, waiting: int, pipelines: int = 0,
          vacated: Tuple[int, ...] = (), load: float = 0.0) -> Need:
    return Need(min_host=cost.min_host_bytes(), pipeline_bytes=cost.min_total_bytes(max(1, waiting_hosts + 1)),
                waiting=waiting, pipelines=pipelines, vacated=vacated, load=load)


def joint_plan(models: Sequence[str], hosts: Sequence[HostSpec], n_ctx: int = 8192,
               n_seqs: int = 16) -> List[Tuple[str, Optional[Plan], str]]:
    """The hosts (in join order) shared out over ``models`` by :func:`pick_model`, then each model's placement:
    ``[(model path, plan or None, why not), ...]``."""
    costs = [ModelCost(m, n_ctx=n_ctx, n_seqs=n_seqs) for m in models]
    share: List[List[HostSpec]] = [[] for _ in models]
    for i, h in enumerate(hosts, 1):
        h = h if h.name else HostSpec(name=f"host{i}", backend=h.backend, memory_bytes=h.memory_bytes,
                                      address=h.address, sec_per_layer=h.sec_per_layer)
        needs = [_need(c, len(s), sum(x.memory_bytes for x in s)) for c, s in zip(costs, share)]
        share[pick_model(needs, h.memory_bytes)].append(h)
    out: List[Tuple[str, Optional[Plan], str]] = []
    for m, hs in zip(models, share):
        if not hs:
            out.append((m, None, "no host was left for it"))
            continue
        try:
            out.append((m, plan(m, hs, n_ctx=n_ctx, n_seqs=n_seqs), ""))
        except PlacementError as e:
            out.append((m, None, str(e)))
    return out


class ClusterSet:
    """The clusters of several models behind one ``/cluster``: each join goes to the model that needs it."""

    def __init__(self, clusters: Sequence[Cluster]):
        if not clusters:
            raise ValueError("a ClusterSet needs a cluster")
        self.clusters = list(clusters)
        first = self.clusters[0]
        for c in self.clusters[1:]:   # one relay, one set of limits, one name space for every model's hosts
            c.by_token, c.backs, c._setup, c._open = first.by_token, first.backs, first._setup, first._open
            c.relay_stats, c._own, c._names = first.relay_stats, first._own, first._names

    # the first cluster's relay serves every model's tunnels (shared tokens and dial-backs)
    @property
    def local_base(self) -> str:
        return self.clusters[0].local_base

    @local_base.setter
    def local_base(self, value: str) -> None:
        for c in self.clusters:
            c.local_base = value

    def routes(self, app: web.Application) -> None:
        first = self.clusters[0]
        app[CLUSTER_KEY] = self
        app.router.add_get("/cluster", self.handle)
        app.router.add_get("/relay/{token}", first.relay)
        app.router.add_get("/relay-back/{cid}", first.relay_back)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        first = self.clusters[0]
        ws, link = await accept_member(request, first.key, first.cert_fp)
        if link is None:
            return ws
        peer = request.remote
        try:
            msg = orjson.loads(await link.recv())
        except (ConnectionError, orjson.JSONDecodeError) as e:
            log.warning("stage from %s left before joining: %s", peer, e)
            await ws.close()
            return ws
        if not isinstance(msg, dict):
            msg = {}   # the chosen cluster refuses it ("expected a join message")
        c = self.clusters[self.choose(msg)]
        log.info("a host joining from %s (%s) serves %s", peer, str(msg.get("name"))[:60], c.info.name)
        await c.run_member(ws, link, peer, member_base(request), first=msg)
        return ws

    def choose(self, msg: dict) -> int:
        """Which model a join message's host serves (:func:`pick_model`; a rejoining stage: the model it holds)."""
        serving = msg.get("serving")
        if isinstance(serving, dict):
            for i, c in enumerate(self.clusters):
                if serving.get("fingerprint") == c.info.fingerprint:
                    return i
        memory = msg.get("memory_bytes")
        if isinstance(memory, bool) or not isinstance(memory, int):
            return 0   # refused there, with the reason
        return pick_model([self._need(c) for c in self.clusters], memory)

    @staticmethod
    def _need(c: Cluster) -> Need:
        waiting = [m.spec.memory_bytes for m in c.waiting if c._alive(m)] + list(c.joining.values())
        pipes = c.router.pipelines
        busy = sum(len(p.active) + len(p.waiting) for p in pipes) + c.router.queued
        return _need(c._cost_model(), len(waiting), sum(waiting), len(pipes),
                     tuple(s.est_bytes for s in c.slots if s.member is None), busy / max(1, len(pipes)))


__all__ = ["ClusterSet", "Need", "pick_model", "joint_plan"]
