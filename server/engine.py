"""The serving engine: continuous batching of many requests over many adapters.

One thread owns the model. Each iteration it
  1. takes new requests and cancellations from other threads,
  2. drops requests that were cancelled or whose deadline passed (their cache row and adapter
     slot are free for this very step),
  3. admits waiting requests while cache rows and adapter slots allow (adapters still on disk
     load on a background thread meanwhile; they never hold up the step),
  4. runs ONE forward over the prompt chunks and decode tokens of all running requests, whatever
     their adapters, and samples one token for each request that is due one,
  5. hands text and tokens to each request's sink and retires finished requests.

A request never waits for another to finish: it joins at the next step and leaves when done.
Requests are laid out in the batch grouped by adapter slot, which is what makes the LoRA ops
cheap (lorad.kernels). Errors in one request end that request, never the loop, and never
another request: a row that cannot be sampled (non-finite logits) fails alone, a request that
leaves zeroes the cache positions it wrote (so no NaN of a hostile adapter meets a later
occupant of the row through a masked attention product), and an adapter whose files changed
on disk is read again rather than served from a stale copy.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable

import torch

from lorad.adapter_format import shorten
from lorad.base_model import LoadedBase
from lorad.cpu_features import default_threads, host_memory_bytes
from lorad.errors import (
    DeadlineExceededError,
    EngineStoppedError,
    InvalidAdapterError,
    InvalidRequestError,
    LoradError,
    QueueFullError,
)
from lorad.geometry import ModelGeometry
from lorad.kernels import build_lora_meta

from lorad.server.adapter_manager import AdapterManager, AdapterStatus
from lorad.server.adapter_store import AdapterStore
from lorad.server.config import HOST_CACHE_SHARE, SAVED_COPIES_BY_DEFAULT, EngineConfig
from lorad.server.detokenizer import IncrementalDetokenizer
from lorad.server.kv_cache import KVCache, rows_for_budget
from lorad.server.lora_slots import LoRASlotPool
from lorad.server.model_runner import LlamaRunner, SeqChunk, StepBatch
from lorad.server.model_thread import ModelThread
from lorad.server.observer import EngineObserver
from lorad.server.residency import AdapterResidency
from lorad.server.requests import Event, Probe, Request
from lorad.server.sampling import SamplingParams, finite_rows, make_generator, sample_tokens

log = logging.getLogger(__name__)

FINISH_LENGTH, FINISH_EOS, FINISH_STOP, FINISH_CANCELLED = "length", "eos", "stop", "cancelled"
DEFAULT_MAX_SEQ_LEN_CAP = 2048


class Engine:
    def __init__(
        self,
        base: LoadedBase,
        config: EngineConfig,
        adapters_dir: str | None = None,
        observer: EngineObserver | None = None,
    ):
        self.base = base
        self.config = config
        self.tokenizer = base.tokenizer
        self.observer = observer or EngineObserver()
        self.geometry = ModelGeometry.from_hf_config(base.model.config)
        self.device = base.device
        dtype = base.compute_dtype
        self.max_seq_len = config.max_seq_len or min(self.geometry.max_position_embeddings, DEFAULT_MAX_SEQ_LEN_CAP)
        if config.kv_cache_memory is None:  # sized from the base: max_batch_size full-length rows
            fit = config.max_batch_size
        else:
            fit = rows_for_budget(self.geometry, self.max_seq_len, dtype, config.kv_cache_memory)
        rows = min(config.max_batch_size, fit)
        if rows < config.max_batch_size:
            log.warning(
                "kv cache: %d bytes hold %d sequences of %d tokens; running at most %d requests at once "
                "(raise --kv-cache-memory or lower --max-seq-len for more)",
                config.kv_cache_memory, fit, self.max_seq_len, max(rows, 0),
            )
        self.kv = KVCache(self.geometry, rows, self.max_seq_len, dtype, self.device)
        saved_budget = config.saved_modules_memory
        if saved_budget is None:  # [vocab, hidden] copies in the compute dtype
            g = self.geometry
            saved_budget = SAVED_COPIES_BY_DEFAULT * g.vocab_size * g.hidden_size * dtype.itemsize
        self.pool = LoRASlotPool(self.geometry, config.max_loras, config.max_lora_rank, dtype, self.device,
                                 saved_budget=saved_budget)
        self.store = AdapterStore(adapters_dir, self.geometry, config.max_lora_rank)
        host_bytes = config.max_cpu_lora_memory
        if host_bytes is None and (memory := host_memory_bytes()) is not None:
            host_bytes = int(HOST_CACHE_SHARE * memory)
        self.adapters = AdapterManager(self.store, self.pool, config.max_cpu_loras, self.observer,
                                       post=self.post, fail_waiting=self._fail_waiting, host_bytes=host_bytes)
        self.threads = config.threads or default_threads()
        torch.set_num_threads(self.threads)  # again on the loop's thread: OpenMP's setting is per thread
        self.runner = LlamaRunner(base.model, self.geometry, self.kv, self.pool, config.lora_backend,
                                  dequant_memory=config.dequant_memory, nf4_kernel_rows=config.nf4_kernel_rows)
        self.eos_ids = self._eos_ids()

        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._inbox: deque[Request] = deque()
        self._cancels: set[int] = set()
        self._messages: deque = deque()  # adapter commands and loader results, for the model thread
        self._waiting: deque[Request] = deque()
        self._num_waiting = 0  # len(_waiting), published under _cv for submit's queue limit
        self._num_running = 0  # len(_running), likewise
        self._running: list[Request] = []  # index = cache row
        self._max_token_chars: int | None = None
        self._stop = False
        self._running_loop = None  # the Thread or Future running _loop
        self.on_exit: Callable[[], None] | None = None  # called (on the loop's thread) once the loop has ended
        self.steps = 0

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, model_thread: ModelThread | None = None) -> "Engine":
        """Run the loop on model_thread (the thread that built the engine, ideally: see
        lorad.server.model_thread), or on a new thread."""
        assert self._running_loop is None, "engine already started"
        if model_thread is not None:
            self._running_loop = model_thread.submit(self._loop)
        else:
            thread = threading.Thread(target=self._loop, name="lorad-engine", daemon=True)
            thread.start()
            self._running_loop = thread
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        loop = self._running_loop
        if isinstance(loop, threading.Thread):
            loop.join(timeout)
        elif loop is not None:
            loop.result(timeout)
        self.adapters.close()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def max_running(self) -> int:
        return self.kv.rows

    # --- submission (any thread) ------------------------------------------------------------

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        """Token ids of a raw prompt, or of chat messages through the base's chat template."""
        if bool(prompt) == bool(messages):
            raise InvalidRequestError("give exactly one of prompt or messages")
        if messages:
            for i, m in enumerate(messages):
                if m.get("role") not in ("system", "user", "assistant"):
                    raise InvalidRequestError(
                        f"messages[{i}].role: {shorten(m.get('role'))} is not system, user or assistant")
        self._check_text_fits(prompt or "".join(str(m.get("content", "")) for m in messages))
        if messages:
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise InvalidRequestError("this base has no chat template; send a raw prompt instead")
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(prompt)["input_ids"])

    def _check_text_fits(self, text: str) -> None:
        """Refuse text that cannot fit the context before tokenizing it (a 4 MB prompt costs
        seconds and hundreds of MB to tokenize). No token stands for more input characters than
        its own string in the vocabulary has, so a text longer than (context + 1) times the
        longest token string holds more tokens than the context; a normalizer may shorten the
        text first, hence the margin of 4 when the tokenizer has one."""
        if len(text) <= 16 * self.max_seq_len:  # cheap: most prompts stop here
            return
        if self._max_token_chars is None:
            longest = max(map(len, self.tokenizer.get_vocab()), default=1)
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            normalizes = backend is None or backend.normalizer is not None
            self._max_token_chars = longest * (4 if normalizes else 1)
        limit = (self.max_seq_len + 1) * self._max_token_chars
        if len(text) > limit:
            raise InvalidRequestError(
                f"prompt: {len(text)} characters cannot fit this server's context of {self.max_seq_len} tokens "
                f"(anything over {limit} characters is refused before tokenizing)"
            )

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: Callable[[Event], None],
        adapter_id: str | None = None,
        timeout: float | None = None,
    ) -> int:
        """Queue a request; returns its id. Raises a LoradError for anything wrong with it."""
        if not prompt_ids:
            raise InvalidRequestError("prompt: is empty")
        vocab = self.geometry.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InvalidRequestError(f"prompt: token ids must lie in [0, {vocab})")
        if len(prompt_ids) >= self.max_seq_len:
            raise InvalidRequestError(
                f"prompt: {len(prompt_ids)} tokens do not fit this server's context of {self.max_seq_len} tokens "
                "(the prompt must leave room for at least one generated token)"
            )
        if params.max_new_tokens > self.config.max_new_tokens_limit:
            raise InvalidRequestError(
                f"max_new_tokens: {params.max_new_tokens} is above this server's limit of {self.config.max_new_tokens_limit}"
            )
        if adapter_id:
            self.adapters.check_servable(adapter_id)  # NOT_FOUND / INVALID_ARGUMENT before queueing
        now = time.monotonic()
        request = Request(
            id=next(self._ids),
            prompt_ids=list(prompt_ids),
            adapter_id=adapter_id or None,
            params=params,
            sink=sink,
            detok=IncrementalDetokenizer(self.tokenizer, params.stop),
            arrival=now,
            deadline=now + timeout if timeout is not None else None,
            generator=make_generator(params),
            seen=set(prompt_ids) if params.repetition_penalty != 1.0 else None,
        )
        with self._cv:
            if self._stop:
                raise EngineStoppedError("the engine is shutting down")
            # _waiting and _running belong to the engine thread; _num_waiting / _num_running are
            # their sizes as of the last loop iteration, kept under the lock. Requests not yet
            # running may fill the free batch rows and then max_queue places beyond them.
            free_rows = self.kv.rows - self._num_running
            if self._num_waiting + len(self._inbox) >= self.config.max_queue + free_rows:
                raise QueueFullError(
                    f"the request queue is full ({self.config.max_queue} waiting); retry later"
                )
            self._inbox.append(request)
            self._cv.notify()
        self.observer.request_queued()
        return request.id

    def cancel(self, request_id: int) -> None:
        """Stop a request; its batch slot is freed at the next step."""
        with self._cv:
            self._cancels.add(request_id)
            self._cv.notify()

    def generate(self, prompt_ids: list[int], params: SamplingParams, adapter_id: str | None = None,
                 timeout: float | None = None) -> Event:
        """Blocking convenience: submit and wait for the final event (raises its error)."""
        done = threading.Event()
        result: list[Event] = []

        def sink(event: Event) -> None:
            if event.kind != "chunk":
                result.append(event)
                done.set()

        self.submit(prompt_ids, params, sink, adapter_id=adapter_id, timeout=timeout)
        done.wait()
        if result[0].kind == "error":
            raise result[0].error
        return result[0]

    # --- adapters ---------------------------------------------------------------------------

    def post(self, message) -> None:
        """Hand a message to the model thread (any thread): an adapter command
        (lorad.server.adapter_manager) or a loader result; it is handled between two steps.
        Raises EngineStoppedError once the loop has stopped (or died): nobody would answer it."""
        with self._cv:
            if self._stop:
                raise EngineStoppedError("the engine is shutting down")
            self._messages.append(message)
            self._cv.notify()

    def probe(self, fn: Callable[["Engine"], object]) -> Future:
        """Run fn(engine) on the model thread at the end of a loop iteration (any thread; tests)."""
        probe = Probe(fn)
        self.post(probe)
        return probe.done

    def _answer(self, probes: list[Probe]) -> None:
        for probe in probes:
            if probe.done.done():
                continue
            try:
                probe.done.set_result(probe.fn(self))
            except BaseException as exc:  # noqa: BLE001 - the caller gets it (an AssertionError, say)
                probe.done.set_exception(exc)

    def list_adapters(self) -> list[AdapterStatus]:
        """Every adapter folder with its state (any thread; see AdapterManager.list_adapters)."""
        return self.adapters.list_adapters()

    def _fail_waiting(self, adapter_id: str, error: LoradError) -> None:
        """Fail the queued requests of one adapter (its read failed, or it was deleted)."""
        kept = deque()
        for request in self._waiting:
            if request.adapter_id == adapter_id:
                self.observer.request_failed("adapter")
                self._emit_error(request, error)
            else:
                kept.append(request)
        self._waiting = kept

    # --- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_num_threads(self.threads)
        try:
            while True:
                with self._cv:
                    while not self._stop and not self._inbox and not self._cancels and not self._running \
                            and not self._messages and not self._waiting:
                        self._cv.wait()
                    if self._stop:
                        break
                    self._waiting.extend(self._inbox)
                    self._num_waiting = len(self._waiting)
                    self._inbox.clear()
                    cancels, self._cancels = self._cancels, set()
                    messages, self._messages = self._messages, deque()
                probes = [m for m in messages if isinstance(m, Probe)]
                try:
                    self._reap(cancels)
                    for message in messages:
                        if not isinstance(message, Probe):
                            self.adapters.handle(message)
                    self.adapters.progress()
                    self._admit()
                    self._publish_counts()
                    self._publish_residency()
                    stepped = bool(self._running)
                    if stepped:
                        self._step()
                        # requests that ended released their slots: a Load waiting for one goes
                        # now, since the loop may sleep next (nothing running, nothing queued)
                        self.adapters.progress()
                        self._publish_counts()
                        self._publish_residency()
                    self._answer(probes)
                    if not stepped and self._waiting:
                        with self._cv:  # waiting only on adapter loads: sleep until one finishes
                            self._cv.wait(timeout=0.05)
                except Exception:  # a bug must not kill the loop; fail what was running instead
                    log.exception("engine step failed; failing the running requests")
                    for request in list(self._running):
                        self._finish_error(request, LoradError("internal error in the engine step; see the server log"))
                    self._publish_counts()
                    self._publish_residency()
                    self._answer(probes)
        except Exception:  # the handler above failed: the loop cannot go on
            log.critical("engine loop died; failing every request and refusing new ones", exc_info=True)
        finally:  # nobody may be left waiting on a dead loop
            with self._cv:
                self._stop = True
            self._shutdown()
            if self.on_exit is not None:
                try:
                    self.on_exit()
                except Exception:  # e.g. the server's event loop is already closed
                    log.debug("engine on_exit hook failed", exc_info=True)

    def _publish_counts(self) -> None:
        """Running / waiting as of now, for submit's queue limit and the gauges (which must not
        stay stale on an idle server after cancels and deadlines)."""
        with self._cv:
            self._num_waiting = len(self._waiting)
            self._num_running = len(self._running)
        self.observer.requests_in_engine(len(self._running), len(self._waiting))

    def _publish_residency(self) -> None:
        """The adapter manager's snapshot (listings, residency metrics), with the queue's adapters."""
        self.adapters.publish(waiting=(r.adapter_id for r in self._waiting))

    @property
    def residency(self) -> AdapterResidency:
        """The adapter snapshot the model thread last published (lorad.server.residency; any thread)."""
        return self.adapters.snapshot

    def _shutdown(self) -> None:
        err = EngineStoppedError("the server is shutting down")
        with self._cv:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            messages, self._messages = self._messages, deque()
        for message in messages:  # commands and probes nobody will handle now
            done = getattr(message, "done", None)
            if done is not None and not done.done():
                done.set_exception(err)
        self.adapters.fail_pending(err)
        for request in list(self._running):
            try:
                self._finish_error(request, err)
            except Exception:  # a broken release (the loop may be dying of it) must not stop the answers
                log.exception("releasing request %d failed", request.id)
                self._emit_error(request, err)
        self._running.clear()
        while self._waiting:
            self._emit_error(self._waiting.popleft(), err)
        self._publish_counts()

    def _expired(self, request: Request, now: float) -> bool:
        return request.cancelled or (request.deadline is not None and now >= request.deadline)

    def _reap(self, cancels: set[int]) -> None:
        now = time.monotonic()
        for request in itertools.chain(self._waiting, self._running):
            if request.id in cancels:
                request.cancelled = True
        for request in [r for r in self._running if self._expired(r, now)]:
            self._end_expired(request)
        kept = deque()
        for request in self._waiting:
            if self._expired(request, now):
                self._end_expired(request)
            else:
                kept.append(request)
        self._waiting = kept

    def _end_expired(self, request: Request) -> None:
        """A cancel ends the request normally (finish_reason cancelled: the client asked for it);
        a passed deadline is an error (DEADLINE_EXCEEDED), never a short answer that looks whole."""
        if request.cancelled:
            if request.row >= 0:
                self._release(request)
            self._emit_final(request, FINISH_CANCELLED)
            return
        self.observer.request_failed("deadline")
        self._finish_error(request, DeadlineExceededError(
            f"the request's deadline passed after {len(request.output_ids)} generated tokens"))

    def _admit(self) -> None:
        """Move waiting requests into free cache rows, oldest first.

        A request whose adapter is still loading lets later requests pass. Once a request is
        blocked because every adapter slot is held by running requests, later adapter
        requests queue behind it (base-only requests still pass), so it cannot starve; one
        blocked only for modules_to_save copy room holds back just the later requests whose
        adapters bring copies, whose slots then drain and free the room.
        """
        kept = deque()
        try:
            self._admit_into(kept, time.monotonic())
        finally:  # whatever happens, the requests not admitted stay queued, in order
            kept.extend(self._waiting)
            self._waiting = kept
        self.observer.slots(self.pool.slots_used, self.pool.num_slots)

    def _admit_into(self, kept: deque, now: float) -> None:
        slot_blocked = saved_blocked = False
        while self._waiting:
            request = self._waiting.popleft()
            if len(self._running) >= self.kv.rows or (slot_blocked and request.adapter_id) or (
                    saved_blocked and request.adapter_id and self.adapters.brings_saved_copies(request.adapter_id)):
                kept.append(request)
                continue
            try:
                slot = self._acquire_slot(request)
            except Exception as exc:  # e.g. a slot write failed: fail this request, not the queue
                if isinstance(exc, LoradError):  # a refusal that says why (the adapter's files, a limit)
                    log.info("request %d refused: %s", request.id, exc)
                else:
                    log.exception("admitting request %d (adapter %s) failed", request.id, request.adapter_id)
                self.observer.request_failed("adapter")
                self._emit_error(request, exc if isinstance(exc, LoradError) else LoradError(
                    f"internal error putting adapter {request.adapter_id!r} on the device; see the server log"))
                continue
            if slot is None:
                if self.adapters.waits_for_saved:  # copy room: only adapters with copies queue behind it
                    saved_blocked = True
                elif not self.adapters.is_loading(request.adapter_id) and self.adapters.host_ready(request.adapter_id):
                    slot_blocked = True
                kept.append(request)
                continue
            request.slot = slot
            request.row = len(self._running)
            self._running.append(request)
            self.observer.request_admitted(now - request.arrival)

    def _acquire_slot(self, request: Request) -> int | None:
        """The device slot for a request's adapter (-1 for none), or None if not ready yet; binds
        the request to the adapter version in that slot (AdapterManager.acquire)."""
        if request.adapter_id is None:
            return -1
        first_try = not request.looked_up
        request.looked_up = True
        got = self.adapters.acquire(request.adapter_id, first_try)
        if got is None:
            return None
        slot, request.version = got
        return slot

    # --- one step ----------------------------------------------------------------------------

    def _schedule(self) -> tuple[list[tuple[Request, int]], int]:
        """Pick (request, n_tokens) for this step, grouped by adapter slot; base-only last."""
        budget = self.config.max_prefill_tokens
        picks: dict[int, int] = {}
        for request in self._running:  # admission order: older prompts prefill first
            if request.prefilling:
                remaining = len(request.prompt_ids) - request.num_cached
                n = min(remaining, budget)
                if n > 0:
                    picks[request.id] = n
                    budget -= n
            else:
                picks[request.id] = 1
        ordered = sorted(
            (r for r in self._running if r.id in picks),
            key=lambda r: (r.slot < 0, r.slot, r.row),
        )
        return [(r, picks[r.id]) for r in ordered], sum(picks.values())

    @torch.inference_mode()
    def _step(self) -> None:
        started = time.perf_counter()
        work, num_tokens = self._schedule()
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        slots: list[int] = []
        chunks: list[SeqChunk] = []
        logits_index: list[int] = []
        sampled: list[Request] = []
        active_mask = 0
        for request, n in work:
            offset = len(ids)
            if request.prefilling:
                start = request.num_cached
                ids.extend(request.prompt_ids[start : start + n])
            else:
                start = request.total_len - 1
                ids.append(request.output_ids[-1])
            positions.extend(range(start, start + n))
            request.kv_extent = max(request.kv_extent, start + n)
            rows.extend([request.row] * n)
            slots.extend([request.slot] * n)
            chunks.append(SeqChunk(row=request.row, start=start, length=n, offset=offset))
            if request.slot >= 0:
                active_mask |= 1 << request.slot
            if start + n >= len(request.prompt_ids):  # the chunk reaches the end: sample
                logits_index.append(offset + n - 1)
                sampled.append(request)
        device = self.device
        batch = StepBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            rows=torch.tensor(rows, dtype=torch.int64, device=device),
            chunks=chunks,
            lora_meta=build_lora_meta(slots, self.pool.num_slots, device),
            active_slots_mask=active_mask,
            lora_rank=max((self.pool.slot_rank[r.slot] for r, _ in work if r.slot >= 0), default=0),
            logits_index=torch.tensor(logits_index, dtype=torch.int64, device=device),
            n_rows=len(self._running),
            logits_slots=tuple(r.slot for r in sampled),
        )
        logits = self.runner.forward(batch)  # runs even when no one samples: it fills the cache
        for request, n in work:
            request.num_cached += n
        if sampled:
            self._sample_and_emit(sampled, logits)
        self.steps += 1
        self.observer.step(num_tokens, len(work), len(self._running), len(self._waiting), time.perf_counter() - started)

    def _sample_and_emit(self, sampled: list[Request], logits: torch.Tensor) -> None:
        """Sample one token per request and hand it on. Each request succeeds or fails alone:
        a row of non-finite logits, a row that cannot be sampled, or an error while emitting
        ends that request with an error and leaves every other row of the step untouched."""
        finite = finite_rows(logits)
        params = [r.params for r in sampled]
        gens = [r.generator for r in sampled]
        seen = [
            torch.tensor(list(r.seen), dtype=torch.int64) if r.seen is not None else None for r in sampled
        ]
        tokens = sample_tokens(logits, params, gens, seen, finite)  # None for a row that cannot be sampled
        logprobs = self._chosen_logprobs(sampled, logits, tokens)
        now = time.monotonic()
        for request, token, ok, logprob in zip(sampled, tokens, finite, logprobs):
            try:
                if not ok:
                    self.observer.request_failed("non_finite")
                    # with an adapter, the adapter is the suspect (FAILED_PRECONDITION); without, it is ours
                    self._finish_error(
                        request,
                        InvalidAdapterError(f"the model produced non-finite logits for this request with adapter "
                                            f"{request.adapter_id!r}") if request.adapter_id
                        else LoradError("the model produced non-finite logits for this request; see the server log"),
                    )
                elif token is None:
                    self.observer.request_failed("internal")
                    self._finish_error(request, LoradError("sampling failed for this request; see the server log"))
                else:
                    self._emit_token(request, token, logprob, now)
            except Exception:  # e.g. a detokenizer failure: this request ends, the step goes on
                log.exception("emitting a token of request %d failed", request.id)
                self.observer.request_failed("internal")
                self._finish_error(request, LoradError("internal error while emitting this request's tokens; "
                                                       "see the server log"))

    def _emit_token(self, request: Request, token: int, logprob: float | None, now: float) -> None:
        if request.output_ids:
            self.observer.inter_token(now - request.last_token_at)
        else:
            self.observer.first_token(now - request.arrival)
        request.last_token_at = now
        if token in self.eos_ids and not request.params.ignore_eos:
            self._finish(request, FINISH_EOS)
            return
        request.output_ids.append(token)
        if request.seen is not None:
            request.seen.add(token)
        chunk = Event("chunk", text=request.detok.add(token), token_ids=[token])
        if logprob is not None:
            request.output_logprobs.append(logprob)
            chunk.logprobs = [logprob]
        self._deliver(request, chunk)
        if request.detok.stopped:
            self._finish(request, FINISH_STOP)
        elif len(request.output_ids) >= request.params.max_new_tokens or request.total_len >= self.max_seq_len:
            self._finish(request, FINISH_LENGTH)

    @staticmethod
    def _chosen_logprobs(sampled: list[Request], logits: torch.Tensor,
                         tokens: list[int | None]) -> list[float | None]:
        rows = [i for i, r in enumerate(sampled) if r.params.logprobs and tokens[i] is not None]
        out: list[float | None] = [None] * len(sampled)
        if rows:
            index = torch.tensor(rows, device=logits.device)
            chosen = torch.tensor([tokens[i] for i in rows], device=logits.device)
            values = torch.log_softmax(logits.index_select(0, index), dim=-1).gather(1, chosen[:, None])[:, 0]
            for i, value in zip(rows, values.tolist()):
                out[i] = value
        return out

    # --- retiring requests ---------------------------------------------------------------------

    def _release(self, request: Request) -> None:
        """Give back the request's cache row (compacting rows) and adapter slot.

        Cache positions no live request owns are kept at zero: attention reads past a row's
        length (masked), and a masked 0 x NaN is NaN, so what a request leaves behind (a
        hostile adapter's overflow, say) must never meet the next occupant of its row.
        """
        if request.slot >= 0:
            self.adapters.release(request.slot)
            request.slot = -1
        row, last = request.row, len(self._running) - 1
        assert self._running[row] is request
        if row != last:
            moved = self._running[last]
            self.kv.move_row(last, row, moved.num_cached)
            self.kv.clear_span(last, 0, moved.kv_extent)  # the vacated row held moved's copy
            self.kv.clear_span(row, moved.num_cached, request.kv_extent)  # what is left of request's
            moved.kv_extent = moved.num_cached
            moved.row = row
            self._running[row] = moved
        else:
            self.kv.clear_span(row, 0, request.kv_extent)
        self._running.pop()
        request.row = -1
        request.kv_extent = 0

    def _finish(self, request: Request, reason: str) -> None:
        self._release(request)
        self._emit_final(request, reason)

    def _finish_error(self, request: Request, error: LoradError) -> None:
        if request.row >= 0:
            self._release(request)
        self._emit_error(request, error)

    def _emit_final(self, request: Request, reason: str) -> None:
        tail = request.detok.flush()
        completion = len(request.output_ids)
        self.observer.request_finished(reason, time.monotonic() - request.arrival, len(request.prompt_ids), completion)
        self._deliver(
            request,
            Event(
                "final",
                text=request.detok.text,
                token_ids=list(request.output_ids),
                finish_reason=reason,
                prompt_tokens=len(request.prompt_ids),
                completion_tokens=completion,
                logprobs=list(request.output_logprobs),
                adapter_version=request.version,
            ),
            tail=tail,
        )

    def _emit_error(self, request: Request, error: LoradError) -> None:
        self._deliver(request, Event("error", error=error))

    def _deliver(self, request: Request, event: Event, tail: str = "") -> None:
        try:
            if tail:
                request.sink(Event("chunk", text=tail))
            request.sink(event)
        except Exception:  # a broken sink (client gone) must not break the loop
            log.debug("sink of request %d failed", request.id, exc_info=True)

    def _eos_ids(self) -> set[int]:
        ids = set()
        eos = getattr(self.base.model.generation_config, "eos_token_id", None)
        for value in (eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        return ids
