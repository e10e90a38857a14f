"""Continuous batching in the model thread: requests join and leave the running batch every step.

Each running request owns one KV-cache row (rows 0..n-1, kept dense: a finished row is refilled
by moving the last one into it) and one pinned adapter slot. A step is: take new requests and
cancellations, admit at most one waiting request (FIFO, skipping those whose adapter finds no
free slot), run one prefill chunk of it (<= `prefill_chunk` tokens, into its own row), then one
decode token for every running row in a single batched forward. Finished requests (EOS, stop
string, max_tokens) and cancelled ones leave at the next step. Knows the runtime interface,
the slot table and protocol events; nothing about HTTP or asyncio (events go to a `sink`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from .adapter_registry import AdapterHandle
from .adapter_slots import SlotTable
from .detokenize import TextStream
from .protocol import GenerationFailed, GenerationRequest, PromptLogprobs, QueueFull, TokenOutput
from .runtime import KVCache, step_index
from .runtime.sampling import RowSampling, make_generator, sample_row, token_logprobs

log = logging.getLogger(__name__)

Event = PromptLogprobs | TokenOutput | Exception | None  # None = end of stream
NON_FINITE = "the model produced non-finite logits (NaN or inf) for this request"


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch: int = 8
    max_queue: int = 64
    prefill_chunk: int = 256
    idle_wait_s: float = 0.05


class Sequence:
    """One request's state in the model thread."""

    def __init__(self, request: GenerationRequest, handle: AdapterHandle | None, sink, text):
        p = request.params
        self.request, self.params, self.handle = request, p, handle
        self.sink: Callable[[Event], None] = sink
        self.prompt = list(request.prompt_ids)
        self.tokens = list(self.prompt)
        self.cached = 0  # tokens whose keys/values are in the cache
        self.generated = 0
        self.slot = -1
        self.row = -1
        self.sampling = RowSampling(p.temperature, p.top_p, p.top_k)
        self.generator = make_generator(p.seed)
        self.text: TextStream = text
        self.prompt_lp: list[float | None] = [None]
        self.prompt_top: list[dict[str, float] | None] = [None]
        self.cancelled = False  # set from the consumer's thread
        self.done = False
        self.poisoned = False  # failed on non-finite values: its cache row is zeroed on leaving

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    def __init__(self, runtime, cache: KVCache, slots: SlotTable, tokenizer, eos_ids, config,
                 observer=None, device: str = "cpu"):  # fmt: skip
        self.runtime, self.cache, self.slots = runtime, cache, slots
        self.tokenizer, self.eos_ids = tokenizer, frozenset(eos_ids)
        self.config: SchedulerConfig = config
        self.observer, self.device = observer, device
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index = cache row
        self.prefilling: list[Sequence] = []  # rows len(running) .. len(running)+P
        self._queued = 0
        self._lock = threading.Lock()
        self._token_str = lru_cache(maxsize=65536)(self._decode_one)
        self.steps = 0

    # any thread -------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self._lock:
            if self._queued >= self.config.max_queue:
                raise QueueFull(f"the queue is full ({self.config.max_queue} waiting requests)")
            self._queued += 1
        self.inbox.put(seq)

    @property
    def queued(self) -> int:
        return self._queued

    def wake(self) -> None:
        self.inbox.put(None)

    # model thread -----------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    def wait_for_work(self) -> None:
        try:
            self._take(self.inbox.get(timeout=self.config.idle_wait_s))
        except queue.Empty:
            pass

    def step(self) -> None:
        self._drain_inbox()
        self._drop_cancelled()
        self._admit()
        if self.prefilling:
            self._timed("prefill", self._prefill, self.prefilling)
            self._remove_rows(lambda s: s.done)
        if self.running:
            self._timed("decode", self._decode, self.running)
            self._remove_rows(lambda s: s.done)
        self.steps += 1
        self.report()

    def _timed(self, phase: str, run: Callable[[list[Sequence]], None], seqs) -> None:
        """run(seqs), reported to the observer as one `phase` on this many distinct adapters."""
        adapters = adapter_count(seqs)
        start = time.perf_counter()
        run(seqs)
        self._observe("on_phase", phase, adapters, time.perf_counter() - start)

    def report(self) -> None:
        self._observe("on_step", len(self.running) + len(self.prefilling), self._queued)

    def _observe(self, hook: str, *args) -> None:
        """observer.hook(*args), if there is an observer; metrics must not stop the model."""
        if self.observer is not None:
            try:
                getattr(self.observer, hook)(*args)
            except Exception:
                log.exception("observer.%s failed", hook)

    def fail_all(self, error: Exception, include_waiting: bool = False) -> None:
        """End every admitted request (and the waiting ones) with `error`."""
        victims = self.running + self.prefilling
        self.running, self.prefilling = [], []
        if include_waiting:
            self._drain_inbox()
            victims += list(self.waiting)
            with self._lock:
                self._queued -= len(self.waiting)
            self.waiting.clear()
        for seq in victims:
            if seq.slot >= 0:
                self.slots.release(seq.slot)
                seq.slot = -1
            seq.sink(error)
        if victims:  # the failed step may have left anything in the cache
            self.cache.zero()

    # queue ------------------------------------------------------------------------------
    def _take(self, item) -> None:
        if item is not None:
            self.waiting.append(item)

    def _drain_inbox(self) -> None:
        while True:
            try:
                self._take(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _drop_cancelled(self) -> None:
        gone = [s for s in self.waiting if s.cancelled]
        for seq in gone:
            self.waiting.remove(seq)
            self._finish(seq)
        with self._lock:
            self._queued -= len(gone)
        if any(s.cancelled for s in self.prefilling):  # only a lone long prompt spans steps
            for seq in self.prefilling:
                self._finish(seq)
            self.prefilling = []
        self._remove_rows(lambda s: s.cancelled)

    def _admit(self) -> None:
        """Start prefilling the next waiting requests (FIFO, skipping those whose adapter finds
        no free slot): one long prompt, or several short ones that fit in one chunk together."""
        if self.prefilling:
            return
        free = self.config.max_batch - len(self.running)
        for seq in list(self.waiting):
            if len(self.prefilling) >= free or not self._fits(seq):
                break
            slot = self.slots.acquire(seq.handle)
            if slot is None:
                continue  # every slot is pinned by other adapters: wait for one
            self.waiting.remove(seq)
            with self._lock:
                self._queued -= 1
            seq.slot, seq.row = slot, len(self.running) + len(self.prefilling)
            self.prefilling.append(seq)

    def _fits(self, seq: Sequence) -> bool:
        """Whether `seq` joins the prefill group: P prompts, each <= chunk/P, none scored."""
        group = self.prefilling
        if not group:
            return True
        if any(_scored(s) for s in (*group, seq)):
            return False
        longest = max(len(s.prompt) for s in (*group, seq))
        return (len(group) + 1) * longest <= self.config.prefill_chunk

    def _remove_rows(self, leaving: Callable[[Sequence], bool]) -> None:
        """Drop leaving rows; the last running row moves into each hole (cache rows stay dense)."""
        for i in reversed(range(len(self.running))):
            if not leaving(self.running[i]):
                continue
            if self.running[i].poisoned:
                self.cache.zero(i)
            self._finish(self.running[i])
            last = self.running.pop()
            if i < len(self.running):
                self.cache.move_row(len(self.running), i, last.cached)
                last.row = i
                self.running[i] = last

    def _finish(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self.slots.release(seq.slot)
            seq.slot = -1
        seq.done = True
        seq.sink(None)

    # compute ----------------------------------------------------------------------------
    def _slots_tensor(self, seqs: list[Sequence]) -> torch.Tensor | None:
        if all(s.slot == 0 for s in seqs):
            return None  # base only: the weak part is one plain product
        return torch.tensor([s.slot for s in seqs], device=self.device)

    def _prefill(self, group: list[Sequence]) -> None:
        """One forward over the group's next chunks, padded to [P, T]; a multi-request group
        always finishes here (its prompts fit in one chunk), a lone long prompt may not."""
        t = min(self.config.prefill_chunk, max(len(s.prompt) - s.cached for s in group))
        chunks = [s.prompt[s.cached : s.cached + t] for s in group]
        tokens = torch.zeros(len(group), t, dtype=torch.long)
        for i, chunk in enumerate(chunks):
            tokens[i, : len(chunk)] = torch.tensor(chunk)
        starts = torch.tensor([[s.cached] for s in group])
        positions = (starts + torch.arange(t)).clamp(max=self.cache.shape.max_context - 1)
        scored = any(_scored(s) for s in group)  # prompt logprobs: the exact fp32 path
        step = step_index(
            self.cache.shape, group[0].row, positions.to(self.device), fast=not scored
        )
        which = self._which_logits(group, chunks)
        logits = self.runtime(tokens.to(self.device), step, self.cache,
                              self._slots_tensor(group), which)  # fmt: skip
        for seq, chunk in zip(group, chunks, strict=True):
            seq.cached += len(chunk)
        if len(group) == 1 and _scored(group[0]):
            self._score_prompt(
                group[0], logits[0], group[0].cached - len(chunks[0]), group[0].cached
            )
            logits = logits[:, -1]
            if group[0].done:  # its prompt gave non-finite logits
                self.cache.zero(group[0].row)
                self._finish(group[0])
                self.prefilling = []
                return
        if group[0].cached < len(group[0].prompt):
            return  # a long prompt: more chunks next step
        self.prefilling = []
        joined = [i for i, seq in enumerate(group) if self._start_decoding(seq)]
        if joined:
            self._emit([group[i] for i in joined], logits[joined])

    def _which_logits(self, group: list[Sequence], chunks: list[list[int]]):
        if len(group) > 1:
            return torch.tensor([len(c) - 1 for c in chunks], device=self.device)
        seq = group[0]
        if _scored(seq):
            return "all"
        return "last" if seq.cached + len(chunks[0]) == len(seq.prompt) else "none"

    def _start_decoding(self, seq: Sequence) -> bool:
        """Prompt done: echo it, then join the running rows (False if it ends right here)."""
        if seq.params.echo:
            seq.sink(self._prompt_event(seq))
        if seq.params.max_tokens == 0:
            self._finish(seq)
            return False
        row = len(self.running)
        if seq.row != row:  # rows left while it was prefilling
            self.cache.move_row(seq.row, row, seq.cached)
            seq.row = row
        self.running.append(seq)
        return True

    def _decode(self, seqs: list[Sequence]) -> None:
        tokens = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        positions = torch.tensor([[s.cached] for s in seqs], device=self.device)
        step = step_index(self.cache.shape, 0, positions, decode=True)
        logits = self.runtime(tokens, step, self.cache, self._slots_tensor(seqs), "last")
        for s in seqs:
            s.cached += 1
        self._emit(seqs, logits)

    # outputs ----------------------------------------------------------------------------
    def _emit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """logits: [B, V] for the next token of each of `seqs`. A row whose logits are not
        finite, or whose draw fails, ends alone with GenerationFailed; the others go on."""
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        chosen = torch.argmax(logits, dim=-1).tolist()
        for i, seq in enumerate(seqs):
            if not finite[i]:
                self._fail(seq, GenerationFailed(NON_FINITE))
            elif seq.sampling.temperature > 0.0:
                chosen[i] = self._draw(seq, logits[i])
        live = [i for i, seq in enumerate(seqs) if not seq.done]
        wanted = [seqs[i].params.logprobs for i in live if seqs[i].params.logprobs is not None]
        lp = None
        if wanted:
            picked = torch.tensor([chosen[i] for i in live], device=logits.device)
            whole = len(live) == len(seqs)  # every row lives: no copy of the logits
            rows = logits if whole else logits[torch.tensor(live, device=logits.device)]
            lp = token_logprobs(rows, picked, max(wanted))
        for j, i in enumerate(live):
            seq, n = seqs[i], seqs[i].params.logprobs
            if n is None or lp is None:
                self._append(seq, chosen[i], None, None)
                continue
            top = self._top_dict(lp.top_ids[j][:n], lp.top_values[j][:n])
            self._append(seq, chosen[i], lp.chosen[j], top)

    def _draw(self, seq: Sequence, logits: torch.Tensor) -> int:
        """One sampled token of `seq` from its own generator; -1 after failing it alone."""
        try:
            return sample_row(logits, seq.sampling, seq.generator)
        except (ValueError, RuntimeError) as e:
            log.warning("request %s: sampling failed: %s", seq.request.request_id, e)
            self._fail(seq, GenerationFailed(f"sampling failed for this request: {e}"))
            return -1

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """End `seq` alone with `error`; its cache row is zeroed when it leaves (a NaN left in
        it would reach the next occupant through attention, even masked: 0 * NaN = NaN)."""
        seq.sink(error)
        seq.done = seq.poisoned = True

    def _append(self, seq: Sequence, token: int, logprob, top) -> None:
        seq.tokens.append(token)
        seq.generated += 1
        finish = None
        if token in self.eos_ids and not seq.params.ignore_eos:
            finish, text = "stop", seq.text.flush()
        else:
            piece = seq.text.push(token)
            text = piece.text
            if piece.stopped:
                finish = "stop"
            elif seq.generated >= seq.params.max_tokens or self._context_full(seq):
                finish, text = "length", text + seq.text.flush()
        seq.sink(TokenOutput(token, text, logprob, top, finish))
        if finish is not None:
            seq.done = True

    def _context_full(self, seq: Sequence) -> bool:
        return len(seq.tokens) >= self.cache.shape.max_context

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor, start: int, end: int) -> None:
        """logits: [T, V] of prompt positions start..end-1, each predicting the next token."""
        stop = min(end, len(seq.prompt) - 1)
        if stop <= start:
            return
        if not bool(torch.isfinite(logits[: stop - start]).all()):
            self._fail(seq, GenerationFailed(NON_FINITE))
            return
        targets = torch.tensor(seq.prompt[start + 1 : stop + 1], device=logits.device)
        lp = token_logprobs(logits[: stop - start], targets, seq.params.logprobs or 0)
        seq.prompt_lp += lp.chosen
        pairs = zip(lp.top_ids, lp.top_values, strict=True)
        seq.prompt_top += [self._top_dict(i, v) for i, v in pairs]

    def _prompt_event(self, seq: Sequence) -> PromptLogprobs:
        n = len(seq.prompt)
        scored = seq.params.logprobs is not None
        return PromptLogprobs(
            token_ids=list(seq.prompt),
            tokens=[self._token_str(t) for t in seq.prompt],
            logprobs=seq.prompt_lp if scored else [None] * n,
            top_logprobs=seq.prompt_top if scored else [None] * n,
        )

    def _top_dict(self, ids: list[int], values: list[float]) -> dict[str, float]:
        return {self._token_str(i): v for i, v in zip(ids, values, strict=True)}

    def _decode_one(self, token: int) -> str:
        return self.tokenizer.decode([token])


def adapter_count(seqs: list[Sequence]) -> str:
    """How many distinct adapters the rows are on, as a metric label: "0", "1" or "2+"."""
    n = len({s.slot for s in seqs if s.slot > 0})
    return str(n) if n < 2 else "2+"


def _scored(seq: Sequence) -> bool:
    """Prompt logprobs wanted: the prefill keeps the logits of every position."""
    return seq.params.echo and seq.params.logprobs is not None
