"""Request state: what a request asks for (:class:`GenRequest`), how far it got (:class:`SeqState`),
and what its client receives (:class:`Event`). The scheduler's policy reads and updates these
records; the gateway reads events from them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from ..stage.sampling import SamplingParams


@dataclass
class GenRequest:
    """Tokens in, sampling settings, and when to stop."""

    prompt: np.ndarray
    params: SamplingParams
    max_tokens: int
    stop: Sequence[str] = ()
    ignore_eos: bool = False


@dataclass
class Event:
    kind: str              # "text", "done" or "error"
    text: str = ""
    finish_reason: Optional[str] = None
    message: str = ""


@dataclass
class SeqState:
    req: GenRequest
    events: "asyncio.Queue[Event]"
    slot: int = -1
    prefilled: int = 0
    generated: List[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    in_flight: bool = False
    started: bool = False
    finished: bool = False
    cancelled: bool = False
    last_sent: int = 0
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: Optional[float] = None
    t_last: Optional[float] = None

    @property
    def need(self) -> int:
        return int(self.req.prompt.shape[0]) + self.req.max_tokens

    @property
    def prefilling(self) -> bool:
        return self.prefilled < self.req.prompt.shape[0]
