"""Test helper: drive step frames through in-process stage servers (validation, trims, drafts, sampling)."""

from __future__ import annotations

import llama_cpp  # noqa: F401

from typing import Dict, List, Sequence

import numpy as np

from molink_lite.model.split import LayerRange, read_model_info, stage_gguf
from molink_lite.stage.engine import StageEngine
from molink_lite.stage.sampling import SamplingError
from molink_lite.stage.server import StageServer
from molink_lite.stage.validate import StepError, check_step
from molink_lite.wire.codec import decode_frame, encode_frame

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
        for pool in s._pools:
            pool.shutdown(wait=True)
        s.engine.close()


def run_step(servers: List[StageServer], meta: dict, arrays: Dict[str, np.ndarray]):
    """One step through every stage as the workers run it; returns (seq, tokens) or raises StepError."""
    for i, srv in enumerate(servers):
        plan = check_step(meta, arrays, srv.limits, srv._seq_len)
        if plan.drafts and srv.samplers is not None:
            try:
                srv.samplers.check_verifiable(plan.drafts, plan.start, plan.spec)
            except SamplingError as e:
                raise StepError(str(e)) from None
        fwd, out = srv._run_step(meta, plan)
        if i < len(servers) - 1:
            if out is None:
                out = encode_frame(fwd, {"seq": np.zeros(0, np.int32), "pos": np.zeros(0, np.int32)})
            meta, arrays = decode_frame(out)
        else:
            if out is None:
                return np.zeros(0, np.int32), np.zeros(0, np.int32)
            return out[0], out[1]


def kv_max_pos(srv: StageServer, seq: int) -> int:
    """Largest position the stage's KV holds for ``seq`` (-1 if none)."""
    return int(_llama.llama_memory_seq_pos_max(srv.engine._mem, seq))

