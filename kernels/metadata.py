"""Per-batch metadata for the multi-adapter LoRA ops, built once per forward pass.

Every token of a batch carries the device slot of its adapter (-1 = base only). The ops need
that mapping in two forms:

* grouped by slot (Punica's segments): `sorted_token_ids`, `active_slots`, `seg_starts`. The
  Triton kernels walk these; the PyTorch twin's per-segment path too.
* padded by slot: a [n_range, max_seg_len] table of token rows, where n_range covers the slots
  from the lowest to the highest active one. The twin runs a single batched matmul over it.
  When the engine lays tokens out grouped by slot with equal segment lengths (the common decode
  case), the table is the identity and the op runs on views, with no copies.

The metadata is a frozen dataclass passed explicitly to every op: no module-level caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NO_LORA = -1  # the single "no adapter" slot value


@dataclass(frozen=True)
class LoRABatchMeta:
    # --- per token ----------------------------------------------------------------------
    token_slots: torch.Tensor  # [T] int32, slot of each token's adapter, -1 = none
    num_tokens: int  # T
    num_lora_tokens: int  # tokens whose slot is not -1
    no_lora: bool  # every token is -1: the ops return at once

    # --- grouped by slot (Punica SGMV layout) ----------------------------------------------
    sorted_token_ids: torch.Tensor  # [num_lora_tokens] int32, token rows grouped by slot (stable)
    sorted_rows: torch.Tensor  # the same, int64: the index dtype torch's index ops take
    active_slots: torch.Tensor  # [D] int32, distinct slots in ascending order
    seg_starts: torch.Tensor  # [D + 1] int32, segment d is sorted_token_ids[seg_starts[d]:seg_starts[d+1]]
    max_seg_len: int
    active_slots_host: tuple[int, ...]  # the same as Python ints (no device sync in the twin)
    seg_starts_host: tuple[int, ...]
    grouped_contiguous: bool  # sorted_token_ids == arange(first, first + num_lora_tokens)

    # --- padded by slot (the twin's batched-matmul layout) ---------------------------------
    slot_lo: int  # lowest active slot
    n_range: int  # highest active slot - slot_lo + 1
    pad_rows: torch.Tensor  # [n_range * max_seg_len] int64 token row per padded position (pads: the first LoRA token's row)
    pad_valid: torch.Tensor  # [n_range, max_seg_len, 1] float32, 1 where a padded position is a real token
    pad_valid_pos: torch.Tensor  # [num_lora_tokens] int64, padded positions holding real tokens,
    #                                in sorted_token_ids order
    pad_identity: bool  # pad_rows == arange(pad_first, pad_first + n_range * max_seg_len)
    pad_first: int  # first token row when pad_identity

    @property
    def num_active(self) -> int:
        return len(self.active_slots_host)

    @property
    def padded_size(self) -> int:
        return self.n_range * self.max_seg_len


def build_lora_meta(token_slots, num_slots: int, device: torch.device | str | None = None) -> LoRABatchMeta:
    """Build the metadata for one batch.

    Args:
      token_slots: [T] ints (list or tensor), the device slot per token, -1 for base-only tokens.
      num_slots: S, the number of slots in the pool; every slot must be in [-1, S).
      device: where the tensors used by kernels live (defaults to token_slots' device, or cpu).
    """
    if isinstance(token_slots, torch.Tensor):
        if device is None:
            device = token_slots.device
        slots_host = token_slots.detach().to("cpu", torch.int64)
    else:
        slots_host = torch.as_tensor(list(token_slots), dtype=torch.int64)
    device = torch.device(device or "cpu")
    if slots_host.dim() != 1:
        raise ValueError(f"token_slots must be 1-D [T], got shape {tuple(slots_host.shape)}")
    num_tokens = slots_host.numel()
    if num_tokens and (int(slots_host.min()) < NO_LORA or int(slots_host.max()) >= num_slots):
        raise ValueError(f"token_slots values must lie in [-1, {num_slots}), got min {int(slots_host.min())} "
                         f"max {int(slots_host.max())}")

    lora_mask = slots_host != NO_LORA
    lora_rows = torch.nonzero(lora_mask).squeeze(1)  # [N]
    lora_slots = slots_host[lora_rows]
    order = torch.argsort(lora_slots, stable=True)
    sorted_rows = lora_rows[order]  # [N]
    active, counts = torch.unique_consecutive(lora_slots[order], return_counts=True)
    seg_starts = torch.zeros(active.numel() + 1, dtype=torch.int64)
    seg_starts[1:] = torch.cumsum(counts, 0)
    num_lora = int(lora_rows.numel())
    max_seg = int(counts.max()) if counts.numel() else 0
    grouped_contiguous = num_lora > 0 and bool(
        torch.equal(sorted_rows, torch.arange(int(sorted_rows[0]), int(sorted_rows[0]) + num_lora))
    )

    if num_lora:
        slot_lo = int(active[0])
        n_range = int(active[-1]) - slot_lo + 1
    else:
        slot_lo, n_range = 0, 0
    # Pads point at a token that has an adapter, so the v row they read (times 0) is one the
    # shrink wrote: a slot -1 row of v is unspecified (possibly NaN) and 0 * NaN is NaN.
    pad_rows = torch.full((n_range, max_seg), int(sorted_rows[0]) if num_lora else 0, dtype=torch.int64)
    pad_valid = torch.zeros(n_range, max_seg, 1, dtype=torch.float32)
    pad_valid_pos = torch.empty(num_lora, dtype=torch.int64)
    for d in range(active.numel()):
        r = int(active[d]) - slot_lo
        a, b = int(seg_starts[d]), int(seg_starts[d + 1])
        pad_rows[r, : b - a] = sorted_rows[a:b]
        pad_valid[r, : b - a] = 1.0
        pad_valid_pos[a:b] = torch.arange(r * max_seg, r * max_seg + b - a)
    pad_rows = pad_rows.view(-1)
    pad_identity = bool(
        num_lora
        and num_lora == n_range * max_seg
        and torch.equal(pad_rows, torch.arange(int(pad_rows[0]), int(pad_rows[0]) + num_lora))
    )

    def dev(t: torch.Tensor, dtype=torch.int32) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    return LoRABatchMeta(
        token_slots=dev(slots_host),
        num_tokens=num_tokens,
        num_lora_tokens=num_lora,
        no_lora=num_lora == 0,
        sorted_token_ids=dev(sorted_rows),
        sorted_rows=dev(sorted_rows, torch.int64),
        active_slots=dev(active),
        seg_starts=dev(seg_starts),
        max_seg_len=max_seg,
        active_slots_host=tuple(int(s) for s in active),
        seg_starts_host=tuple(int(s) for s in seg_starts),
        grouped_contiguous=grouped_contiguous,
        slot_lo=slot_lo,
        n_range=n_range,
        pad_rows=dev(pad_rows, torch.int64),
        pad_valid=dev(pad_valid, torch.float32),
        pad_valid_pos=dev(pad_valid_pos, torch.int64),
        pad_identity=pad_identity,
        pad_first=int(pad_rows[0]) if pad_identity else 0,
    )
