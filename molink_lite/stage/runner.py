"""The stage's step runner: runs checked step frames on the engine, in order per lane.

:meth:`StepRunner.submit` queues a step frame (raw meta and arrays, as it arrived) on its lane: the lane is read
loosely for routing, and a bad one is rejected by the check like any other field. Each lane has one worker (a
queue and one llama.cpp thread), so a lane's steps run in arrival order while lanes run side by side, each in
its own llama.cpp context. A worker checks the frame (:meth:`StepRunner.check`), then runs it in its thread
(:meth:`StepRunner.run`): frees, trims, sampler starts (with a replayed sequence's earlier tokens), the forward
pass, and then either the step for the next stage, encoded (``frame.forward(hidden).encode(codec)``), or, on
the last stage, the sampled tokens as a :class:`~molink_lite.wire.protocol.ResultFrame`. The server delivers
either (``deliver``) and hears of every failure (``report``).

The runner owns where each sequence stands on this stage (``seq_len``: positions held), the samplers and the
detokenizer. A frame that fails the check is reported and nothing of it is applied; a step that fails while
running is reported and its sequences are forgotten here, so a half-written KV entry cannot outlive it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Deque, Dict, List, Optional, Tuple, Union

import numpy as np

from ..model.vocab import Detokenizer, Vocab
from ..wire.protocol import FrameLimits, ResultFrame, StepError, StepFrame, lane_of
from .engine import EngineError, StageEngine, last_row_of_each_seq
from .sampling import SamplerPool, SamplingError
from .validate import check_step

log = logging.getLogger(__name__)

Deliver = Callable[[StepFrame, Union[bytes, ResultFrame]], None]  # a step's outcome: to the next stage or the head
Report = Callable[[Optional[int], str], None]                      # (step id, why it failed)

#: the runner's counters in the stage's ``stats``
COUNTERS = ("steps", "rows", "max_seqs_in_step", "max_queued", "max_in_flight", "errors", "frees", "busy_s",
            "rejected_frames", "trims", "drafted", "accepted")


def frame_limits(engine: StageEngine) -> FrameLimits:
    """What this stage accepts in a step frame."""
    i = engine.info
    return FrameLimits(n_seq_max=engine.n_seq_max, n_ctx=engine.n_ctx, max_rows=max(engine.n_batch, engine.n_seq_max),
                       n_vocab=i.n_vocab, n_embd_inp=i.n_embd_inp, is_first=i.is_first, is_last=i.is_last,
                       lanes=engine.lanes)


def step_of(meta: dict) -> Optional[int]:
    """A frame's step id if it names one (for its error report), else None."""
    step = meta.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class StepRunner:
    """Runs step frames on one :class:`StageEngine`; one worker (queue + llama thread) per engine lane."""

    def __init__(self, engine: StageEngine, vocab: Optional[Vocab], stats: Dict[str, float], *, codec: str,
                 deliver: Deliver, report: Report):
        self.engine = engine
        self.info = engine.info
        self.codec = codec  # how hidden states travel to the next stage (the gateway's configure sets it)
        self.limits = frame_limits(engine)
        self.lanes = engine.lanes
        self.stats = stats
        stats.update({k: 0 for k in COUNTERS if k not in stats})
        stats["busy_s"] = float(stats["busy_s"])
        self.seq_len = np.zeros(engine.n_seq_max, dtype=np.int64)  # positions each sequence holds here
        self.vocab = vocab
        self.samplers = (SamplerPool(self.info.n_vocab, on_greedy=engine.set_device_greedy)
                         if self.info.is_last else None)
        self.detok = Detokenizer(vocab) if self.info.is_last and vocab else None
        self._deliver, self._report = deliver, report
        self._queues: List[asyncio.Queue] = [asyncio.Queue() for _ in range(self.lanes)]
        self._pools = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama{i}") for i in range(self.lanes)]
        self._workers: List[asyncio.Task] = []
        self.in_flight = 0  # steps received and not yet finished here
        # (step id, start, end) of the latest steps; perf_counter is a system-wide monotonic clock, so
        # timelines of stages on one host can be compared (tests prove micro-batches overlap with it)
        self.timeline: Deque[Tuple[object, float, float]] = deque(maxlen=512)

    # ------------------------------------------------------------------ workers
    def start(self) -> None:
        self._workers = [asyncio.ensure_future(self._work(i)) for i in range(self.lanes)]

    def close(self) -> None:
        """Stop the workers; waits for a step running in a llama thread."""
        for w in self._workers:
            w.cancel()
        for pool in self._pools:
            pool.shutdown(wait=True)

    def submit(self, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        """Queue a step frame on its lane (read loosely here: the check rejects a bad lane)."""
        lane = meta.get("lane", 0)
        q = self._queues[lane if type(lane) is int and 0 <= lane < self.lanes else 0]
        self.in_flight += 1
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.in_flight)
        q.put_nowait((meta, arrays))
        self.stats["max_queued"] = max(self.stats["max_queued"], q.qsize())

    def reset_all(self) -> None:
        """Forget every sequence (the pipeline head changed); each lane does so after the steps queued before."""
        for q in self._queues:
            q.put_nowait(None)

    async def _work(self, lane: int) -> None:
        loop = asyncio.get_running_loop()
        queue, pool = self._queues[lane], self._pools[lane]
        while True:
            item = await queue.get()
            if item is None:
                await loop.run_in_executor(pool, self.reset, lane)
                continue
            meta, arrays = item
            frame: Optional[StepFrame] = None
            try:
                frame = self.check(meta, arrays)
                t0 = time.perf_counter()
                out = await loop.run_in_executor(pool, self.run, frame)
                t1 = time.perf_counter()
                self.stats["busy_s"] += t1 - t0
                self.timeline.append((frame.step, t0, t1))
                self._deliver(frame, out)
            except StepError as e:  # rejected before anything was applied
                self.stats["rejected_frames"] += 1
                self._report(step_of(meta), f"rejected step: {e}")
            except (EngineError, SamplingError) as e:
                self.stats["errors"] += 1
                await loop.run_in_executor(pool, self.forget, frame)
                self._report(step_of(meta), str(e))
            except Exception as e:  # noqa: BLE001 - never lose a step silently
                self.stats["errors"] += 1
                log.exception("step %s failed", step_of(meta))
                await loop.run_in_executor(pool, self.forget, frame)
                self._report(step_of(meta), f"internal error in stage {self.info.layer_start}-"
                                            f"{self.info.layer_stop - 1}: {e}")
            finally:
                self.in_flight -= 1

    # ------------------------------------------------------------------ one step
    def check(self, meta: dict, arrays: Dict[str, np.ndarray]) -> StepFrame:
        """The checked step (:func:`~molink_lite.stage.validate.check_step`, and drafts only for sequences whose
        sampler can verify them); :class:`StepError` otherwise, with nothing applied."""
        frame = check_step(meta, arrays, self.limits, self.seq_len)
        if frame.drafts and self.samplers is not None:
            try:
                self.samplers.check_verifiable(frame.drafts, frame.start, frame.spec)
            except SamplingError as e:
                raise StepError(str(e)) from None
        return frame

    def run(self, frame: StepFrame) -> Union[bytes, ResultFrame]:
        """Runs in the lane's llama thread (``frame`` is checked): the step for the next stage, encoded, or (last
        stage) the sampled tokens."""
        self._apply_changes(frame)
        if frame.n == 0:  # only frees, trims and starts: forwarded as they are
            return ResultFrame(frame.step) if self.info.is_last else frame.encode(self.codec)
        starts, ends = frame.runs()
        self.stats["steps"] += 1
        self.stats["rows"] += frame.n
        self.stats["max_seqs_in_step"] = max(self.stats["max_seqs_in_step"], int(starts.shape[0]))
        res = self.engine.forward(frame.seq, frame.pos, tokens=frame.tokens, hidden=frame.hidden,
                                  output_rows=frame.out)
        self.seq_len[frame.seq[ends]] = frame.pos[ends] + 1
        if not self.info.is_last:
            return frame.forward(res).encode(self.codec)
        return self._sample(frame, res)

    def _apply_changes(self, frame: StepFrame) -> None:
        """Frees, trims (rejected speculative drafts leave the KV before anything runs) and sampler starts."""
        for s in frame.free:
            self.free(s)
            self.stats["frees"] += 1
        for s, p in frame.trim.items():
            if p < self.seq_len[s]:
                self.engine.trim(s, p)
                self.seq_len[s] = p
                self.stats["trims"] += 1
        if self.samplers is not None:
            for s, st in frame.start.items():  # history: a replayed sequence's earlier tokens
                self.samplers.start(s, st.params, st.history, spec=st.spec)
                self.detok.start(s, st.history)

    def _sample(self, frame: StepFrame, logits: np.ndarray) -> ResultFrame:
        """One token per output row (1..k+1 for a sequence verifying k drafts), whether it ends generation, and
        its text."""
        mask = last_row_of_each_seq(frame.seq) if frame.out is None else frame.out
        seqs, pos = frame.seq[mask], frame.pos[mask]
        if frame.drafts:
            seqs, tokens = self.samplers.sample_verify(seqs, logits, frame.drafts, pos, self.engine.last_sampled)
            k = sum(int(d.shape[0]) for d in frame.drafts.values())
            self.stats["drafted"] += k
            # a sequence with k drafts has k+1 output rows and gets acc+1 tokens
            self.stats["accepted"] += int(tokens.shape[0]) - int(mask.sum()) + k
        else:
            tokens = self.samplers.sample(seqs, logits, pos, self.engine.last_sampled)
        eog = self.vocab.is_eog(tokens)
        return ResultFrame(frame.step, seqs, tokens, eog, self.detok.pieces(seqs, tokens, eog))

    # ------------------------------------------------------------------ sequences held here
    def free(self, s: int) -> None:
        self.engine.free(s)
        self.seq_len[s] = 0
        if self.samplers is not None:
            self.samplers.drop(s)
            self.detok.drop(s)

    def forget(self, frame: Optional[StepFrame]) -> None:
        """After a failed step: drop its sequences here, so a half-written KV entry cannot outlive it."""
        if frame is not None and frame.n:
            for s in np.unique(frame.seq).tolist():
                self.free(int(s))

    def reset(self, lane: int = 0) -> None:
        """Forget every sequence of a lane (the pipeline head went away)."""
        self.engine.clear(lane)
        self.seq_len[lane_of(np.arange(self.seq_len.shape[0]), self.lanes) == lane] = 0
        if self.samplers is not None:
            for s in list(self.samplers._by_seq):
                if lane_of(s, self.lanes) == lane:
                    self.samplers.drop(s)

    def kv_usage(self) -> Tuple[int, int]:
        """(sequences holding KV here, KV positions they hold)."""
        seq_len = self.seq_len.copy()
        return int(np.count_nonzero(seq_len)), int(seq_len.sum())


__all__ = ["StepRunner", "COUNTERS", "frame_limits", "step_of"]
