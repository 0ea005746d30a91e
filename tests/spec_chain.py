"""Test helper: drive step frames through in-process stage servers (validation, trims, drafts, sampling)."""

from __future__ import annotations

import llama_cpp  # noqa: F401

from typing import Dict, List, Sequence

import numpy as np

from molink_lite.model.split import LayerRange, read_model_info, stage_gguf
from molink_lite.stage.engine import StageEngine
from molink_lite.stage.server import StageServer
from molink_lite.wire.codec import decode_frame

import llama_cpp.llama_cpp as _llama


def servers_for(path: str, cuts: Sequence[int], n_ctx: int = 1024, n_seq_max: int = 8,
                threads: int = 1, device_sampling: bool = False) -> List[StageServer]:
    info = read_model_info(path)
    bounds = [0, *cuts, info.n_layer]
    return [StageServer(StageEngine(stage_gguf(path, LayerRange(a, b)), n_ctx=n_ctx, n_seq_max=n_seq_max,
                                    n_threads=threads, flash_attn=False, device_sampling=device_sampling),
                        codec="f32")
            for a, b in zip(bounds, bounds[1:])]


def close(servers: List[StageServer]) -> None:
    for s in servers:
        s.runner.close()
        s.engine.close()


def run_step(servers: List[StageServer], meta: dict, arrays: Dict[str, np.ndarray]):
    """One step through every stage as the workers run it; returns (seq, tokens) or raises StepError."""
    for i, srv in enumerate(servers):
        out = srv.runner.run(srv.runner.check(meta, arrays))
        if i < len(servers) - 1:
            meta, arrays = decode_frame(out)  # the forwarded step, as the next stage receives it
        else:
            return out.seq, out.tokens


def kv_max_pos(srv: StageServer, seq: int) -> int:
    """Largest position the stage's KV holds for ``seq`` (-1 if none)."""
    return int(_llama.llama_memory_seq_pos_max(srv.engine._mem, seq))

