"""The stage's step runner: runs checked step frames on the engine, in order per lane.

:meth:`StepRunner.submit` queues a step frame (raw meta and arrays, as it arrived) on its lane: the lane is read
loosely for routing, and a bad one is rejected by the check like any other field. Each lane has one worker (a
queue and one llama.cpp thread), so a lane's steps run in arrival order while lanes run side by side, each in
its own llama.cpp context. A worker checks the frame (:meth:`StepRunner.check`), then runs it in its thread
(:meth:`StepRunner.run`): the last stage first builds the samplers of the sequences that start (grammars
compiled, a replayed sequence's earlier tokens fed to them: a refusal rejects the step with nothing applied),
then frees, trims, forks (``llama_memory_seq_cp``: a child takes its parent's KV), sampler starts, the forward
pass, and then either the step for the next stage, encoded (``frame.forward(hidden).encode(codec)``), or, on
the last stage, the sampled tokens as a :class:`~molink_lite.wire.protocol.ResultFrame` (with logprobs for the
sequences that asked, and prompt scores for ``score`` rows). The server delivers either (``deliver``) and hears
of every failure (``report``).

The runner owns where each sequence stands on this stage (``seq_len``: positions held), the samplers and the
detokenizer. A frame that fails the check is reported and nothing of it is applied; a step that fails while
running is reported and its sequences are forgotten here, so a half-written KV entry cannot outlive it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Deque, Dict, List, Optional, Tuple, Union

import numpy as np

from ..model.vocab import Detokenizer, Vocab
from ..wire.protocol import FrameLimits, ResultFrame, StepError, StepFrame, lane_of
from .engine import EngineError, StageEngine, last_row_of_each_seq
from .grammar import GrammarSandbox
from .ring import RingGate, RingTurn
from .sampling import SamplerPool, SamplingError, SequenceSampler, log_softmax_top
from .validate import check_step
from .vision import MediaStore

log = logging.getLogger(__name__)

Deliver = Callable[[StepFrame, Union[bytes, ResultFrame]], None]  # a step's outcome: to the next stage or the head
Report = Callable[[Optional[int], str], None]                      # (step id, why it failed)
RingOut = Callable[[StepFrame], None]                              # the last stage's next ring round, to the first

#: the runner's counters in the stage's ``stats``
COUNTERS = ("steps", "rows", "max_seqs_in_step", "max_queued", "max_in_flight", "errors", "frees", "busy_s",
            "rejected_frames", "trims", "drafted", "accepted", "ring_rounds", "inline_steps")

#: A step runs on the event loop's own thread (no hand-off to the lane's llama thread and back) when the stage has one
#: lane, the step has at most this many rows, the lane's previous step took at most INLINE_MAX_S, the stage sat idle
#: before the step's frame came (INLINE_IDLE_S), and no other step waits once the loop has read what its sockets
#: hold. Frames that come back to back (micro-batches, a flood) keep the thread, so the loop goes on reading them
#: while llama.cpp runs: a flood of frames is read, and answered, before a new upstream takes over. The two thread
#: hand-offs (a queue wake-up there, ``call_soon_threadsafe``'s self-pipe back) are the largest cost outside
#: llama.cpp of a small step on a busy host: on 2 cores a round of 16 sequences through two stages fell from 17.3 to
#: 9.5-12.2 ms (BENCHMARKS_GPU.md, issue 28, session 8); on a 16-core GPU host it changed nothing measurable.
#: Larger steps keep the thread, where the loop decodes and checks the next micro-batch's frame while llama.cpp runs
#: this one; long steps (prefill chunks, CPU decode of a big model) keep it too, so the loop never
#: stalls for long: its pings, stats and other connections wait at most about INLINE_MAX_S. ``MOLINK_INLINE_STEPS=0``
#: turns it off.
INLINE_MAX_ROWS = 16
INLINE_MAX_S = 0.025
#: ... and the step's frame arrived at least this long after the lane last finished a frame (run or rejected): the
#: stage was waiting for it (one sequence going round the stages), not working through frames that came back to back
INLINE_IDLE_S = 0.0003


def frame_limits(engine: StageEngine) -> FrameLimits:
    """What this stage accepts in a step frame."""
    i = engine.info
    return FrameLimits(n_seq_max=engine.n_seq_max, n_ctx=engine.n_ctx, max_rows=max(engine.n_batch, engine.n_seq_max),
                       n_vocab=i.n_vocab, n_embd_inp=i.n_embd_inp, is_first=i.is_first, is_last=i.is_last,
                       lanes=engine.lanes, mrope=bool(getattr(engine, "mrope", False)))


def step_of(meta: dict) -> Optional[int]:
    """A frame's step id if it names one (for its error report), else None."""
    step = meta.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class StepRunner:
    """Runs step frames on one :class:`StageEngine`; one worker (queue + llama thread) per engine lane."""

    def __init__(self, engine: StageEngine, vocab: Optional[Vocab], stats: Dict[str, float], *, codec: str,
                 deliver: Deliver, report: Report, ring_out: Optional[RingOut] = None,
                 ring_ready: Callable[[], bool] = lambda: False):
        self.engine = engine
        self.info = engine.info
        self.codec = codec  # how hidden states travel to the next stage (the gateway's configure sets it)
        self.limits = frame_limits(engine)
        self.lanes = engine.lanes
        self.stats = stats
        stats.update({k: 0 for k in COUNTERS if k not in stats})
        stats["busy_s"] = float(stats["busy_s"])
        self.seq_len = np.zeros(engine.n_seq_max, dtype=np.int64)  # positions each sequence holds here
        self.whole_only = getattr(engine, "prefix_reuse", "any") == "whole"  # forks copy all a sequence holds
        self.vocab = vocab
        # grammars compile in a sandbox process first (GrammarSandbox): shared with the server's grammar_check
        self.grammar_sandbox = GrammarSandbox.for_model(self.info.path) if self.info.is_last and vocab else None
        self.samplers = (SamplerPool(self.info.n_vocab, on_greedy=engine.set_device_greedy, vocab=vocab,
                                     sandbox=self.grammar_sandbox) if self.info.is_last else None)
        self.detok = Detokenizer(vocab) if self.info.is_last and vocab else None
        self._deliver, self._report = deliver, report
        # closing the ring (stage/ring.py): the first stage's grants, the last stage's turn and where rounds go
        self.gate = RingGate(engine.n_seq_max) if self.info.is_first else None
        self.turn = RingTurn() if self.info.is_last else None
        self._ring_out, self._ring_ready = ring_out, ring_ready
        self.media: Optional[MediaStore] = None   # a first stage with a vision projector: encoded images by id
        self._next_round: Dict[int, StepFrame] = {}   # lane -> the round the last step sampled (the lane's worker)
        self._queues: List[asyncio.Queue] = [asyncio.Queue() for _ in range(self.lanes)]
        self._pools = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama{i}") for i in range(self.lanes)]
        self._workers: List[asyncio.Task] = []
        self.in_flight = 0  # steps received and not yet finished here
        self.inline = self.lanes == 1 and os.environ.get("MOLINK_INLINE_STEPS", "1") != "0"
        self._last_run_s = [1.0] * self.lanes   # each lane's previous step (the first one runs in the thread)
        self._done_at = [0.0] * self.lanes      # when each lane last finished a frame, run or rejected (perf_counter)
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

    async def stop(self) -> None:
        """:meth:`close` from the event loop: the workers are cancelled here, the llama threads waited for in a
        worker thread (a step still running finishes first)."""
        for w in self._workers:
            w.cancel()
        await asyncio.get_running_loop().run_in_executor(None, lambda: [p.shutdown(wait=True) for p in self._pools])

    def submit(self, meta: dict, arrays: Dict[str, np.ndarray], ring: bool = False) -> None:
        """Queue a step frame on its lane (read loosely here: the check rejects a bad lane); ``ring``: a round
        from the ring link (the first stage checks it against the gateway's grants)."""
        lane = meta.get("lane", 0)
        q = self._queues[lane if type(lane) is int and 0 <= lane < self.lanes else 0]
        self.in_flight += 1
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.in_flight)
        q.put_nowait((meta, arrays, ring, time.perf_counter()))
        self.stats["max_queued"] = max(self.stats["max_queued"], q.qsize())

    def reset_all(self) -> None:
        """Forget every sequence (the pipeline head changed); each lane does so after the steps queued before."""
        for q in self._queues:
            q.put_nowait(None)

    async def _work(self, lane: int) -> None:
        loop = asyncio.get_running_loop()
        queue, pool = self._queues[lane], self._pools[lane]
        delivered = False   # a frame was delivered since this loop last let other tasks run
        while True:
            item = await queue.get()
            if item is None:
                await loop.run_in_executor(pool, self.reset, lane)
                continue
            meta, arrays, ring, t_in = item
            frame: Optional[StepFrame] = None
            try:
                frame = self.check(meta, arrays, ring)
                inline = (self.inline and frame.n <= INLINE_MAX_ROWS and self._last_run_s[lane] <= INLINE_MAX_S
                          and t_in - self._done_at[lane] >= INLINE_IDLE_S)
                if inline or delivered:
                    # the send tasks write what the previous step delivered before this one starts (a queued step
                    # would otherwise reach the llama thread, or run here, first); and a step runs here only with
                    # nothing else to do: frames already in the socket reach the queue first, and a backlog
                    # (micro-batches, a flood) keeps the thread, so the loop goes on reading them
                    await asyncio.sleep(0)
                    delivered = False
                    inline = inline and queue.empty()
                t0 = time.perf_counter()
                if inline:
                    self.stats["inline_steps"] += 1
                    out = self.run(frame)
                else:
                    out = await loop.run_in_executor(pool, self.run, frame)
                t1 = time.perf_counter()
                self._last_run_s[lane] = t1 - t0
                self.stats["busy_s"] += t1 - t0
                self.timeline.append((frame.step, t0, t1))
                nxt = self._next_round.pop(lane, None)
                if nxt is not None and self._ring_out is not None:  # the next round first: it is the critical path
                    self._ring_out(nxt)
                self._deliver(frame, out)
                delivered = True
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
                self._done_at[lane] = time.perf_counter()   # any frame, run or rejected: the lane was busy

    # ------------------------------------------------------------------ one step
    def check(self, meta: dict, arrays: Dict[str, np.ndarray], ring: bool = False) -> StepFrame:
        """The checked step (:func:`~molink_lite.stage.validate.check_step`, and drafts only for sequences whose
        sampler can verify them; on the first stage, ring rounds only from the ring link and within the gateway's
        grants); :class:`StepError` otherwise, with nothing applied."""
        frame = check_step(meta, arrays, self.limits, self.seq_len, self.whole_only)
        if frame.drafts and self.samplers is not None:
            try:
                self.samplers.check_verifiable(frame.drafts, frame.start, frame.spec)
            except SamplingError as e:
                raise StepError(str(e)) from None
        if frame.media:   # before the ring's grants change: a rejected step applies nothing
            self._check_media(frame)
        if frame.ring and self.turn is not None and (self._ring_out is None or not self._ring_ready()):
            raise StepError("this stage has no ring link to the first stage: a step may not ring")
        if self.gate is not None:
            if ring:
                self.gate.check_round(frame)
                self.gate.spend(frame)
            elif frame.round:
                raise StepError("ring rounds come only from the last stage's ring link")
            else:
                self.gate.from_gateway(frame)
        elif ring:
            raise StepError("only the first stage takes ring rounds")
        return frame

    def _check_media(self, frame: StepFrame) -> None:
        """Every image a step names is stored here and fills exactly its sequence's rows of token id -1."""
        if self.media is None:
            raise StepError("this stage has no vision projector (start it with --mmproj): a step may not carry "
                            "images")
        starts, ends = frame.runs()
        rows_of = {int(s): (int(a), int(b) + 1) for s, a, b in zip(frame.seq[starts].tolist(), starts, ends)}
        for s, ids in frame.media.items():
            if s not in rows_of:
                raise StepError(f"'media' names sequence {s}, which has no rows in this step")
            a, b = rows_of[s]
            want = 0
            for mid in ids:
                lay = self.media.layout(mid)
                if lay is None:
                    raise StepError(f"image {mid} is not on this stage (never sent, or evicted): send it again")
                want += lay.rows
            have = int(np.count_nonzero(frame.tokens[a:b] < 0))
            if have != want:
                raise StepError(f"sequence {s} has {have} image rows in this step; its images take {want}")

    def run(self, frame: StepFrame) -> Union[bytes, ResultFrame]:
        """Runs in the lane's llama thread (``frame`` is checked): the step for the next stage, encoded, or (last
        stage) the sampled tokens. :class:`StepError` (nothing applied) if a sequence's sampler cannot start."""
        self._apply_changes(frame, self._prepare(frame))
        if frame.n == 0:  # only frees, trims, forks and starts: forwarded as they are
            return ResultFrame(frame.step) if self.info.is_last else frame.encode(self.codec)
        starts, ends = frame.runs()
        self.stats["steps"] += 1
        self.stats["rows"] += frame.n
        self.stats["max_seqs_in_step"] = max(self.stats["max_seqs_in_step"], int(starts.shape[0]))
        if frame.mpos is not None or frame.media or frame.noncausal:
            res = self._forward_media(frame)
        else:
            res = self.engine.forward(frame.seq, frame.pos, tokens=frame.tokens, hidden=frame.hidden,
                                      output_rows=frame.out)
        self.seq_len[frame.seq[ends]] = frame.pos[ends] + 1
        if not self.info.is_last:
            return frame.forward(res).encode(self.codec)
        return self._sample(frame, res)

    def _forward_media(self, frame: StepFrame) -> np.ndarray:
        """A step with images or M-RoPE positions (``mpos``). Later stages: one batch of hidden rows, each with its
        4 positions. The first stage: runs of token rows and each image's rows (from :class:`MediaStore`) in
        their own batches, in row order, as llama.cpp's mtmd helper decodes a prompt's chunks."""
        mpos = frame.mpos
        pos = frame.pos if mpos is None else np.ascontiguousarray(mpos[:, 0])
        out = last_row_of_each_seq(frame.seq) if frame.out is None else frame.out
        causal = not frame.noncausal
        if not self.info.is_first:
            return self.engine.forward(frame.seq, pos, hidden=frame.hidden, output_rows=out, pos4=mpos, causal=causal)
        img = frame.tokens < 0
        if not img.any():
            return self.engine.forward(frame.seq, pos, tokens=frame.tokens, output_rows=out)
        # segments: [a, b) of token rows, or one image's rows (the ids of each sequence, in order)
        queue = {s: list(ids) for s, ids in frame.media.items()}
        parts = []
        a, n = 0, frame.n
        while a < n:
            if img[a]:
                s = int(frame.seq[a])
                mid = queue[s].pop(0)
                rows = self.media.rows(mid) if self.media is not None else None
                if rows is None:
                    raise EngineError(f"image {mid} left this stage's store before its step ran")
                b = a + int(rows.shape[0])
                parts.append(self.engine.forward(frame.seq[a:b], pos[a:b], embeddings=rows, output_rows=out[a:b],
                                                 pos4=None if mpos is None else mpos[a:b], causal=causal))
            else:
                b = a + 1
                while b < n and not img[b]:
                    b += 1
                parts.append(self.engine.forward(frame.seq[a:b], pos[a:b], tokens=frame.tokens[a:b],
                                                 output_rows=out[a:b]))
            a = b
        if self.info.is_last:   # logits of the output rows, in row order; no device-sampled tokens across batches
            self.engine.forget_sampled()
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _prepare(self, frame: StepFrame) -> Dict[int, SequenceSampler]:
        """The samplers of the sequences this step starts (last stage), built before anything is applied: a
        grammar llama.cpp refuses, or a history the grammar refuses, rejects the step (:class:`StepError`)."""
        if self.samplers is None or not frame.start:
            return {}
        ready: Dict[int, SequenceSampler] = {}
        try:
            for s, st in frame.start.items():  # history: a replayed sequence's earlier tokens
                ready[s] = self.samplers.prepare(st)
        except SamplingError as e:
            for sm in ready.values():
                sm.close()
            raise StepError(f"sequence {s}: {e}") from None
        return ready

    def _apply_changes(self, frame: StepFrame, ready: Dict[int, SequenceSampler]) -> None:
        """Frees, trims (rejected speculative drafts leave the KV before anything runs), forks and sampler
        starts (``ready``: from :meth:`_prepare`)."""
        for s in frame.free:
            self.free(s)
            self.stats["frees"] += 1
        for s, p in frame.trim.items():
            if p < self.seq_len[s]:
                self.engine.trim(s, p)
                self.seq_len[s] = p
                self.stats["trims"] += 1
        for child, (parent, n) in frame.fork.items():  # the check made sure each child holds nothing
            if n:
                self.engine.copy_seq(parent, child, n if n < self.seq_len[parent] else -1)
            self.seq_len[child] = n
        if self.samplers is not None:
            for s, sm in ready.items():
                self.samplers.install(s, sm)
                self.detok.start(s, frame.start[s].history)
            for s in frame.score:  # scored rows are read from the raw logits
                self.samplers.need_logits(s)

    def _sample(self, frame: StepFrame, logits: np.ndarray) -> ResultFrame:
        """One token per output row (1..k+1 for a sequence verifying k drafts), whether it ends generation, and
        its text; rows named by ``score`` are scored instead of sampled, and sequences that asked get logprobs."""
        mask = last_row_of_each_seq(frame.seq) if frame.out is None else frame.out
        seqs, pos = frame.seq[mask], frame.pos[mask]  # one per row of ``logits``
        device = self.engine.last_sampled
        scored = self._score_rows(frame, seqs) if frame.score else None
        if scored is not None:  # sample only the rows not scored (a copy of those few rows)
            idx = np.flatnonzero(~scored[0])
            s_seqs, s_pos, s_logits = seqs[idx], pos[idx], logits[idx]
            s_device = None if device is None else device[idx]
        else:
            idx, s_seqs, s_pos, s_logits, s_device = None, seqs, pos, logits, device
        if frame.drafts:
            out_seq, tokens, rows = self.samplers.sample_verify(s_seqs, s_logits, frame.drafts, s_pos, s_device)
            k = sum(int(d.shape[0]) for d in frame.drafts.values())
            self.stats["drafted"] += k
            # a sequence with k drafts has k+1 output rows and gets acc+1 tokens
            self.stats["accepted"] += int(tokens.shape[0]) - int(s_seqs.shape[0]) + k
        else:
            tokens = self.samplers.sample(s_seqs, s_logits, s_pos, s_device)
            out_seq, rows = s_seqs, np.arange(s_seqs.shape[0])
        eog = self.vocab.is_eog(tokens)
        ended = self.samplers.ended(out_seq)
        if ended is not None:  # the grammar could not go on: the sequence ends here
            for s in np.unique(out_seq[ended]).tolist():
                log.warning("sequence %d ends: %s", s, self.samplers._by_seq[s].ended)
            eog = eog | ended
        res = ResultFrame(frame.step, out_seq, tokens, eog, self.detok.pieces(out_seq, tokens, eog))
        self._logprobs(res, logits, rows if idx is None else idx[rows], seqs, scored)
        if frame.ring:   # closing the ring: who goes on to the next round (sent to the first stage first)
            nxt, res.ring_left, res.ring_end = self.turn.turn(frame, out_seq, s_pos, tokens, eog)
            if nxt is not None:
                self._next_round[frame.lane] = nxt
        if frame.round:
            res.round = frame.round
            self.stats["ring_rounds"] += 1
        return res

    def _score_rows(self, frame: StepFrame, seqs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(which output rows are scored, the target token of each of them) for ``frame.score``: a sequence's
        first len(targets) output rows."""
        scored = np.zeros(seqs.shape[0], dtype=bool)
        targets = np.zeros(seqs.shape[0], dtype=np.int32)
        uniq, first = np.unique(seqs, return_index=True)
        first_of = dict(zip(uniq.tolist(), first.tolist()))
        for s, t in frame.score.items():
            a = first_of[s]
            scored[a:a + t.shape[0]] = True
            targets[a:a + t.shape[0]] = t
        return scored, targets

    def _logprobs(self, res: ResultFrame, logits: np.ndarray, rows: np.ndarray, seqs: np.ndarray,
                  scored: Optional[Tuple[np.ndarray, np.ndarray]]) -> None:
        """Fill the result's logprob and score arrays: one vectorized pass over the rows that need them."""
        lp_of = self.samplers.logprobs_of
        tok_k = np.fromiter((lp_of(s) for s in res.seq.tolist()), dtype=np.int64, count=res.seq.shape[0])
        ask = np.flatnonzero(tok_k >= 0)
        sc_rows = np.flatnonzero(scored[0]) if scored is not None else np.zeros(0, np.int64)
        if not ask.size and not sc_rows.size:
            return
        sc_k = np.fromiter((max(0, lp_of(s)) for s in seqs[sc_rows].tolist()), dtype=np.int64, count=sc_rows.size)
        k = int(max(tok_k[ask].max(initial=0), sc_k.max(initial=0)))
        all_rows = np.concatenate([rows[ask], sc_rows])
        targets = np.concatenate([res.tokens[ask], scored[1][sc_rows] if scored is not None else sc_rows])
        lp, top_ids, top_lp = log_softmax_top(logits, all_rows, targets, np.concatenate([tok_k[ask], sc_k]), k)
        hexes = self.vocab.token_hex
        if ask.size:
            m = res.seq.shape[0]
            res.logprob = np.full(m, np.nan, dtype=np.float32)
            res.top_ids = np.full((m, k), -1, dtype=np.int32)
            res.top_logprobs = np.full((m, k), -np.inf, dtype=np.float32)
            na = ask.size
            res.logprob[ask], res.top_ids[ask], res.top_logprobs[ask] = lp[:na], top_ids[:na], top_lp[:na]
            res.token_bytes = hexes(np.where(tok_k >= 0, res.tokens, -1))
            res.top_bytes = hexes(res.top_ids)
        if sc_rows.size:
            na = ask.size
            res.score_seq = seqs[sc_rows].astype(np.int32)
            res.score_logprob, res.score_top_ids, res.score_top_logprobs = lp[na:], top_ids[na:], top_lp[na:]
            res.score_bytes = hexes(targets[na:])
            res.score_top_bytes = hexes(top_ids[na:])

    # ------------------------------------------------------------------ sequences held here
    def free(self, s: int) -> None:
        self.engine.free(s)
        self.seq_len[s] = 0
        if self.gate is not None:
            self.gate.forget([s])
        if self.samplers is not None:
            self.samplers.drop(s)
            self.detok.drop(s)

    def forget(self, frame: Optional[StepFrame]) -> None:
        """After a failed step: drop its sequences here, so a half-written KV entry cannot outlive it."""
        if frame is not None:
            for s in set(np.unique(frame.seq).tolist()) | set(frame.fork):
                self.free(int(s))

    def reset(self, lane: int = 0) -> None:
        """Forget every sequence of a lane (the pipeline head went away)."""
        self.engine.clear(lane)
        in_lane = lane_of(np.arange(self.seq_len.shape[0]), self.lanes) == lane
        self.seq_len[in_lane] = 0
        if self.gate is not None:
            self.gate.forget(np.flatnonzero(in_lane).tolist())
        if self.turn is not None:
            self.turn.forget_all()
        if self.samplers is not None:
            for s in list(self.samplers._by_seq):
                if lane_of(s, self.lanes) == lane:
                    self.samplers.drop(s)

    def kv_usage(self) -> Tuple[int, int]:
        """(sequences holding KV here, KV positions they hold)."""
        seq_len = self.seq_len.copy()
        return int(np.count_nonzero(seq_len)), int(seq_len.sum())


__all__ = ["StepRunner", "COUNTERS", "frame_limits", "step_of"]
