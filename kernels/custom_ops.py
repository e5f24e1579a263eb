"""The LoRA ops as torch.library custom ops, with fake implementations, for torch.compile.

torch.compile cannot trace into the ops' bodies: the twin picks its strategy from host-side
metadata (Python ints and tuples) and the Triton wrappers launch kernels. Registered as custom
ops with fake (shape-only) implementations, they become single opaque nodes of the traced
graph, and inductor or CUDA graphs compile everything around them.

Eager calls do not go through these registrations: a custom op's dispatch costs several
microseconds of Python, and a decode step makes hundreds of LoRA calls. The public functions in
lorad.kernels call `add_lora_op` & co. only while torch.compile traces
(torch.compiler.is_compiling()); at run time the compiled graph calls the same implementation.

LoRABatchMeta is a dataclass, which custom ops cannot take: it travels as its tensors and its
host-side fields and is rebuilt (a frozen dataclass, no copies) on the other side.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from lorad.kernels.metadata import LoRABatchMeta

_META_FIELDS = tuple(f.name for f in fields(LoRABatchMeta))
_META_TENSORS = tuple(n for n in _META_FIELDS if n in (
    "token_slots", "sorted_token_ids", "sorted_rows", "active_slots", "seg_starts", "pad_rows", "pad_valid",
    "pad_valid_pos"))
_META_INTS = ("num_tokens", "num_lora_tokens", "max_seg_len", "slot_lo", "n_range", "pad_first")
_META_BOOLS = ("no_lora", "grouped_contiguous", "pad_identity")


def flatten_meta(meta: LoRABatchMeta) -> tuple[list[torch.Tensor], list[int], list[int], list[int]]:
    """(tensors, ints and bools as ints, active_slots_host, seg_starts_host)."""
    return (
        [getattr(meta, n) for n in _META_TENSORS],
        [int(getattr(meta, n)) for n in _META_INTS + _META_BOOLS],
        list(meta.active_slots_host),
        list(meta.seg_starts_host),
    )


def unflatten_meta(tensors, scalars, active_slots_host, seg_starts_host) -> LoRABatchMeta:
    values = dict(zip(_META_TENSORS, tensors))
    values.update(zip(_META_INTS, scalars[: len(_META_INTS)]))
    values.update((n, bool(v)) for n, v in zip(_META_BOOLS, scalars[len(_META_INTS):]))
    values["active_slots_host"] = tuple(active_slots_host)
    values["seg_starts_host"] = tuple(seg_starts_host)
    return LoRABatchMeta(**values)


@torch.library.custom_op("lorad::add_lora", mutates_args=("y",))
def _add_lora_op(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    meta_tensors: list[torch.Tensor],
    meta_scalars: list[int],
    active_slots_host: list[int],
    seg_starts_host: list[int],
    backend: str,
) -> None:
    from lorad.kernels import _add_lora_impl

    _add_lora_impl(y, x, lora_a, lora_b, scale, unflatten_meta(meta_tensors, meta_scalars, active_slots_host,
                                                                seg_starts_host), backend)


@_add_lora_op.register_fake
def _(y, x, lora_a, lora_b, scale, meta_tensors, meta_scalars, active_slots_host, seg_starts_host, backend) -> None:
    return None


@torch.library.custom_op("lorad::lora_shrink", mutates_args=())
def _lora_shrink_op(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    meta_tensors: list[torch.Tensor],
    meta_scalars: list[int],
    active_slots_host: list[int],
    seg_starts_host: list[int],
    backend: str,
) -> torch.Tensor:
    from lorad.kernels import _lora_shrink_impl

    meta = unflatten_meta(meta_tensors, meta_scalars, active_slots_host, seg_starts_host)
    return _lora_shrink_impl(x, lora_a, meta, None, backend)


@_lora_shrink_op.register_fake
def _(x, lora_a, meta_tensors, meta_scalars, active_slots_host, seg_starts_host, backend) -> torch.Tensor:
    return x.new_empty(x.shape[0], lora_a.shape[1], dtype=torch.float32)


@torch.library.custom_op("lorad::lora_expand", mutates_args=("y",))
def _lora_expand_op(
    y: torch.Tensor,
    v: torch.Tensor,
    lora_b: torch.Tensor,
    scale: torch.Tensor,
    meta_tensors: list[torch.Tensor],
    meta_scalars: list[int],
    active_slots_host: list[int],
    seg_starts_host: list[int],
    backend: str,
) -> None:
    from lorad.kernels import _lora_expand_impl

    meta = unflatten_meta(meta_tensors, meta_scalars, active_slots_host, seg_starts_host)
    _lora_expand_impl(y, v, lora_b, scale, meta, backend)


@_lora_expand_op.register_fake
def _(y, v, lora_b, scale, meta_tensors, meta_scalars, active_slots_host, seg_starts_host, backend) -> None:
    return None


def add_lora_op(y, x, lora_a, lora_b, scale, meta: LoRABatchMeta, backend: str) -> None:
    _add_lora_op(y, x, lora_a, lora_b, scale, *flatten_meta(meta), backend)


def lora_shrink_op(x, lora_a, meta: LoRABatchMeta, backend: str) -> torch.Tensor:
    return _lora_shrink_op(x, lora_a, *flatten_meta(meta), backend)


def lora_expand_op(y, v, lora_b, scale, meta: LoRABatchMeta, backend: str) -> None:
    _lora_expand_op(y, v, lora_b, scale, *flatten_meta(meta), backend)
