"""What flows through the engine: a request (its prompt, parameters and progress), the events
its sink receives, and probes. Shared by the engine, the frontend and every transport."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from lorad.errors import LoradError

from lorad.server.detokenizer import IncrementalDetokenizer
from lorad.server.sampling import SamplingParams


@dataclass
class Event:
    """What a request's sink receives: chunks, then exactly one final or error event."""

    kind: str  # "chunk" | "final" | "error"
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)  # when the request asked for them
    error: LoradError | None = None
    adapter_version: str = ""  # final: digest of the adapter version that produced it ("" = base)


@dataclass(eq=False)
class Request:
    id: int
    prompt_ids: list[int]
    adapter_id: str | None
    params: SamplingParams
    sink: Callable[[Event], None]
    detok: IncrementalDetokenizer
    arrival: float
    deadline: float | None = None
    slot: int = -1
    row: int = -1
    num_cached: int = 0  # tokens of prompt + output already in the KV cache
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    generator: torch.Generator | None = None
    seen: set[int] | None = None  # token ids for the repetition penalty
    cancelled: bool = False
    looked_up: bool = False  # adapter cache lookups are counted once per request
    last_token_at: float = 0.0
    kv_extent: int = 0  # cache positions of its row this request has written (zeroed when it leaves)
    version: str = ""  # digest of the adapter version in its slot, bound at admission

    @property
    def prefilling(self) -> bool:
        return self.num_cached < len(self.prompt_ids)

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(eq=False)
class Probe:
    """fn(engine), run on the model thread at the end of a loop iteration, where the engine's and
    the adapter manager's tables agree with each other; `done` gets its result or its exception.
    For tests and debugging: the one way another thread may look at the model thread's tables."""

    fn: Callable[[object], object]
    done: Future = field(default_factory=Future)
