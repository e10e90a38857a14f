"""The engine behind the HTTP layer: one model thread, an asyncio front, adapters by name.

`Engine.from_checkpoint(dir, EngineConfig(...), adapters_dir=...)` reads an owq checkpoint once,
builds the own runtime from its tensors (`runtime/`; no transformers model), a fixed KV cache of
`max_batch` rows and a slot table of `num_slots` adapter slots, and implements protocol's
`Engine`: `generate` validates a request (context, adapter, queue), hands it to the scheduler's
thread and streams its events back through an asyncio queue; closing the stream cancels the
request at the next step. Knows nothing about HTTP, JSON or auth.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch

from owq.kernels import OWQLinear
from owq.kernels.checkpoint import checkpoint_name, read_checkpoint, stored_fingerprint
from owq.kernels.families import family_of

from .adapter_registry import AdapterRegistry
from .adapter_slots import SlotTable
from .detokenize import TextStream
from .protocol import (
    DEFAULT_MAX_LOADED,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    ContextTooLong,
    EngineError,
    EngineNotReady,
    EngineObserver,
    GenerationRequest,
    InvalidRequest,
    PromptLogprobs,
    QueueFull,
    TokenOutput,
    temperature_ok,
)
from .runtime import KVCache, build_runtime, step_index
from .runtime.heap import available_bytes, trim_heap
from .scheduler import Scheduler, SchedulerConfig, Sequence

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8
    max_queue: int = 64
    num_slots: int | None = None  # adapter slots besides the base; None = max_batch
    max_context: int = 2048  # capped by the model's own limit
    prefill_chunk: int = 256
    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: float32 on the CPU, float16 on CUDA
    packed_decode: bool = True  # CPU: the 4-bit kernel for decode steps (kernels.cpu_ops)
    resident_dense: bool = False  # CPU: keep a dequantized fp32 copy of every layer for prefill
    max_loaded_adapters: int = DEFAULT_MAX_LOADED  # in host memory; least recently used go

    @property
    def slots(self) -> int:
        return self.max_batch if self.num_slots is None else self.num_slots

    @property
    def compute_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return torch.float16 if str(self.device).startswith("cuda") else torch.float32


def owq_layers(model: torch.nn.Module) -> dict[str, OWQLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, OWQLinear)}


def eos_ids(config, tokenizer) -> set[int]:
    found: set[int] = set()
    for source in (config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        found.update(value if isinstance(value, list | tuple) else [value])
    return {int(v) for v in found if v is not None}


def adapter_shapes(targets: dict) -> dict[str, tuple[int, int]]:
    """Stored layer name -> (k, out) of every layer with weak columns: what an adapter may hold."""
    shapes = {}
    for name, (layer, part) in targets.items():
        p = layer.parts[part]
        if p.rows.numel():
            shapes[name] = (p.rows.numel(), p.out_features)
    return shapes


class Engine:
    """protocol.Engine over one quantized checkpoint."""

    def __init__(
        self,
        runtime,
        tokenizer,
        eos: set[int],
        fingerprint: str,
        config: EngineConfig,
        adapters_dir=None,
        observer=None,
        model_name: str = "model",
    ):
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.config = config
        self.runtime = runtime
        self.max_context = runtime.max_context
        self.vocab_size = runtime.vocab.size
        self.cache = KVCache(runtime.cache_shape(config.max_batch))
        warn_if_cache_outgrows_memory(self.cache)
        self.slots = SlotTable(runtime.targets, config.slots)
        self.adapters = AdapterRegistry(
            adapters_dir, fingerprint, adapter_shapes(runtime.targets), model_name, observer,
            config.max_loaded_adapters,
        )  # fmt: skip
        sched = SchedulerConfig(config.max_batch, config.max_queue, config.prefill_chunk)
        self.scheduler = Scheduler(
            runtime, self.cache, self.slots, tokenizer, eos, sched, observer, config.device
        )
        self._thread: threading.Thread | None = None
        self._running = threading.Event()  # a thread is inside run_forever
        self._stopped = threading.Event()
        self._stopped.set()
        self._stopping = threading.Event()
        self._ready = threading.Event()

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_dir: str | Path,
        config: EngineConfig | None = None,
        adapters_dir: str | Path | None = None,
        observer: EngineObserver | None = None,
        model_name: str | None = None,
    ) -> Engine:
        """Read the checkpoint once and build its runtime from the stored tensors."""
        from transformers import AutoTokenizer

        config = config or EngineConfig()
        stored = read_checkpoint(ckpt_dir)
        runtime = build_runtime(
            stored.config, stored.tensors, config.max_context, num_slots=config.slots,
            dtype=config.compute_dtype, device=config.device,
        )  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
        fingerprint = stored_fingerprint(stored.tensors, family_of(stored.config))
        name = model_name or checkpoint_name(ckpt_dir)
        eos = eos_ids(stored.config, tokenizer)
        return cls(runtime, tokenizer, eos, fingerprint, config, adapters_dir, observer, name)

    # lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Run the model loop in a new thread (tests, embedding). `owq serve` calls
        `run_forever` on the main thread instead: MKL runs its GEMMs single-threaded in threads
        other than the first ones that used it, which halves batch-1 decode speed."""
        if self._thread is not None or self._running.is_set():
            return
        self._stopping.clear()
        self._stopped.clear()
        threads = torch.get_num_threads()

        def model_loop() -> None:
            # OpenMP's count is per thread, and a new thread takes torch's process-wide one,
            # which a helper thread's `single_thread` may hold at 1 at that moment: set it.
            torch.set_num_threads(threads)
            self.run_forever()

        self._thread = threading.Thread(target=model_loop, name="owq-model", daemon=True)
        self._thread.start()

    def run_forever(self) -> None:
        """The model loop, in the calling thread, until `request_stop()` or `stop()` (also one
        that came before it started: it then returns right after the warm-up)."""
        if self._running.is_set():
            raise RuntimeError("the model loop is already running")
        self._stopped.clear()
        self._running.set()
        try:
            self._run()
        finally:
            self._ready.clear()
            self._running.clear()
            self._stopped.set()

    def request_stop(self) -> None:
        """Ask the model loop to end (from any thread); it fails what is left and returns."""
        self._stopping.set()
        self.scheduler.wake()

    async def stop(self) -> None:
        if self._thread is None and not self._running.is_set():
            return
        self.request_stop()
        await asyncio.to_thread(self._stopped.wait)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def ready(self) -> bool:
        running = self._running.is_set() and not self._stopping.is_set()
        return self._ready.is_set() and running

    @property
    def max_queue(self) -> int:
        return self.config.max_queue

    def set_observer(self, observer: EngineObserver | None) -> None:
        """Attach the metrics hooks after construction (the app may build them later)."""
        self.scheduler.observer = observer
        self.adapters.observer = observer

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    # requests ---------------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> AsyncIterator[PromptLogprobs | TokenOutput]:
        """Validates now (raises before any event); the request is queued on the first
        `__anext__`, where QueueFull can still be raised if the queue filled up meanwhile."""
        if not self.ready():
            raise EngineNotReady("the model is not loaded yet")
        self.check_request(request)
        if self.scheduler.queued >= self.config.max_queue:
            raise QueueFull(f"the queue is full ({self.config.max_queue} waiting requests)")
        return self._stream(request, request.adapter)

    def check_request(self, request: GenerationRequest) -> None:
        p, ids = request.params, request.prompt_ids
        if not ids:
            raise InvalidRequest("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise InvalidRequest(f"prompt token ids must lie in [0, {self.vocab_size})")
        check_params(p)
        if len(ids) + p.max_tokens > self.max_context:
            raise ContextTooLong(
                f"this model's context is {self.max_context} tokens; the prompt has {len(ids)} "
                f"tokens and max_tokens is {p.max_tokens} ({len(ids) + p.max_tokens} in all)"
            )

    async def _stream(self, request, handle) -> AsyncIterator[PromptLogprobs | TokenOutput]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass

        text = TextStream(self.tokenizer, request.prompt_ids, request.params.stop)
        seq = Sequence(request, handle, sink, text)
        self.scheduler.submit(seq)
        self.adapters.pin(handle)  # not evicted from host memory while this request runs
        try:
            while True:
                event = await events.get()
                if event is None:
                    return
                if isinstance(event, Exception):
                    raise event
                yield event
        finally:
            seq.cancel()  # a no-op once finished; otherwise frees the row at the next step
            self.adapters.unpin(handle)

    # model thread -----------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            self._warm_up()
            self._ready.set()
            log.info("engine ready: %s, max_context %d", self.model_name, self.max_context)
            while not self._stopping.is_set():
                if not self.scheduler.has_work():
                    self.scheduler.wait_for_work()
                    if not self.scheduler.has_work():
                        continue
                self._step()
            self.scheduler.fail_all(EngineNotReady("the engine stopped"), include_waiting=True)

    def _step(self) -> None:
        try:
            self.scheduler.step()
        except Exception as e:  # a bug or an allocation failure: end this batch, keep serving
            log.exception("engine step failed")
            self.scheduler.fail_all(EngineError(f"internal engine error: {type(e).__name__}"))
        if not self.scheduler.has_work():
            self.scheduler.report()

    def _warm_up(self) -> None:
        """Build the runtime's fused weights and run one token, before reporting ready: a fast
        step, as serving runs (only prompts that are scored take the exact kernels, whose
        transient dense layers would set the process's peak memory here for nothing)."""
        self.runtime.prepare(self.config.packed_decode, self.config.resident_dense)
        device = self.config.device
        positions = torch.zeros(1, 1, dtype=torch.long, device=device)
        step = step_index(self.cache.shape, 0, positions, fast=True)
        self.runtime(positions, step, self.cache, None, "last")
        trim_heap()  # what building the runtime freed


def warn_if_cache_outgrows_memory(cache: KVCache) -> None:
    """A lazily committed cache lets a server start that cannot hold every row at full context:
    say so at start-up, not when long requests run the machine out of memory."""
    available = available_bytes()
    if not cache.lazy or available is None or cache.nbytes <= available:
        return
    s = cache.shape
    log.warning(
        "the KV cache can grow to %.1f GiB (%d rows x %d positions), more than the %.1f GiB "
        "this machine has available now; it becomes resident as it is used, so long requests "
        "may run out of memory: lower --max-batch",
        cache.nbytes / 2**30, s.rows, s.max_context, available / 2**30,
    )  # fmt: skip


def check_params(p) -> None:
    """InvalidRequest naming the first sampling value out of range."""
    problems = [
        (p.max_tokens < 0, f"max_tokens must be >= 0, got {p.max_tokens}"),
        (
            not temperature_ok(p.temperature),
            f"temperature must be 0 or lie in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
            f"got {p.temperature}",
        ),
        (not 0 < p.top_p <= 1, f"top_p must lie in (0, 1], got {p.top_p}"),
        (p.top_k < 0, f"top_k must be >= 0, got {p.top_k}"),
        (
            p.logprobs is not None and not 0 <= p.logprobs <= MAX_LOGPROBS,
            f"logprobs must lie in [0, {MAX_LOGPROBS}], got {p.logprobs}",
        ),
    ]
    for bad, message in problems:
        if bad:
            raise InvalidRequest(message)
