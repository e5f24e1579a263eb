"""Device-resident adapter slots: the weights the multi-adapter LoRA ops read.

For every (layer, projection) the pool preallocates
    a:     [S, R, H_in]   lora_A of each slot, rank-padded with zeros
    b:     [S, R, H_out]  lora_B of each slot, transposed (see lorad.kernels.lora_expand)
    scale: [S]            float32 lora_alpha / r (or / sqrt(r) for rsLoRA)
    dora:  [S, H_out]     float32 DoRA row scale m / ||W + scale B A||_row; ones for plain LoRA
    bias:  [S, H_out]     float32 scale * lora_B bias (PEFT's lora_bias); zeros for plain LoRA
where S = max_loras and R = max_lora_rank. Loading an adapter zeroes its slot and copies the
adapter in; nothing is allocated after start-up, except a module's `dora` table (all ones)
and `bias` table (all zeros), each made when the first adapter that needs it is written to
that module, so a server that never sees DoRA or lora_bias holds neither. An adapter with
modules_to_save also brings whole weights ([vocab, hidden] each: `saved[name][slot]`), held
on the device while it has its slot and dropped when it leaves; they are not preallocated:
most adapters have none, and each is large (28 M parameters on SmolLM2, 525 M on
Llama-3.1-8B). Their bytes are bounded by `saved_budget`: putting such an adapter in a slot
first evicts idle slots' copies (least recently used first); while copies that running
requests hold leave no room, acquire_load waits (None) as for a busy slot, and an adapter
whose copies alone exceed the budget is refused. The DoRA row scale needs the base weight,
which the pool does not hold: the model runner computes it (`row_scale`, set by LlamaRunner).

The slot table is a small state machine: an adapter is in at most one slot; a slot in use by
running requests (refcount > 0) is never evicted; free slots are reused least recently used
first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from lorad.adapter_format import SAVED_MODULES, LoadedAdapter, distinct_tensors
from lorad.errors import AdapterDoesNotFitError
from lorad.geometry import PROJECTIONS, ModelGeometry

from lorad.server.zero_pages import ZeroPages


@dataclass
class ModuleSlots:
    a: torch.Tensor  # [S, R, H_in]
    b: torch.Tensor  # [S, R, H_out]
    scale: torch.Tensor  # [S] float32
    dora: torch.Tensor | None = None  # [S, H_out] float32, 1.0 except in DoRA slots; None until the first
    slots_mask: int = 0  # bit s set when slot s holds a nonzero adapter for this module
    dora_mask: int = 0  # bit s set when slot s holds a DoRA adapter for this module
    bias: torch.Tensor | None = None  # [S, H_out] float32, 0.0 except in lora_bias slots; None until the first
    bias_mask: int = 0  # bit s set when slot s holds a lora_bias adapter for this module
    _views: dict = field(default_factory=dict, repr=False)

    def rank_slice(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a[:, :rank], b[:, :rank]): the rows a batch whose adapters have rank <= `rank` needs.

        Rows past an adapter's rank are zero, so skipping them changes nothing but the work:
        rank-16 adapters in rank-64 slots would otherwise cost 4x.
        """
        views = self._views.get(rank)
        if views is None:
            views = self._views[rank] = (self.a[:, :rank], self.b[:, :rank])
        return views


class LoRASlotPool:
    def __init__(self, geometry: ModelGeometry, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device,
                 saved_budget: int | None = None):
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        # On the CPU the pools are resident only where adapters were written: rank-16 adapters
        # in rank-64 slots touch a quarter of them (server/zero_pages.py).
        self._memory = ZeroPages()
        self.layers: list[dict[str, ModuleSlots]] = []
        for _ in range(geometry.num_layers):
            modules = {}
            for proj in PROJECTIONS:
                in_f, out_f = geometry.projection_shape(proj)
                modules[proj] = ModuleSlots(
                    a=self._memory.zeros((num_slots, max_rank, in_f), dtype, device),
                    b=self._memory.zeros((num_slots, max_rank, out_f), dtype, device),
                    scale=torch.zeros(num_slots, dtype=torch.float32, device=device),
                )
            self.layers.append(modules)
        self.slot_of: dict[str, int] = {}
        self.adapter_in: list[str | None] = [None] * num_slots
        self.refcount = [0] * num_slots
        self.slot_rank = [0] * num_slots
        self._written_rank = [0] * num_slots  # rows [0, r) of a slot may be nonzero (cleared up to r)
        # slots with refcount 0, least recently released first; empty slots are always first
        self._idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(num_slots))
        # (layer, proj, lora_a [r, H_in], lora_b [H_out, r], scale, magnitude [H_out]) -> [H_out] float32
        # DoRA's row scale; set by the model runner, which holds the base weights
        self.row_scale = None
        # modules_to_save: name -> [S] the slot's trained weight [vocab, hidden] or None; bit s of
        # saved_mask[name] set when slot s has one
        self.saved: dict[str, list[torch.Tensor | None]] = {name: [None] * num_slots for name in SAVED_MODULES}
        self.saved_mask: dict[str, int] = dict.fromkeys(SAVED_MODULES, 0)
        # device bytes the saved copies of all slots may take together (None: unbounded)
        self.saved_budget = saved_budget
        self.waits_for_saved = False  # the last acquire_load returned None for copy room, not for a slot

    # --- accounting -----------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return self.tables_nbytes + self.saved_nbytes

    @property
    def tables_nbytes(self) -> int:
        """Bytes of the per-module slot tables (every slot is sized for max_lora_rank)."""
        return sum(
            m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size()
            + (m.scale.numel() + sum(t.numel() for t in (m.dora, m.bias) if t is not None)) * 4
            for layer in self.layers
            for m in layer.values()
        )

    @property
    def saved_nbytes(self) -> int:
        """Bytes of the modules_to_save weights the slots hold now (each slot has its own copies)."""
        return sum(self.slot_saved_nbytes(slot) for slot in range(self.num_slots))

    def slot_saved_nbytes(self, slot: int) -> int:
        """Bytes of the modules_to_save copies `slot` holds (tied copies once)."""
        held = distinct_tensors(w for slots in self.saved.values() if (w := slots[slot]) is not None)
        return sum(w.numel() * w.element_size() for w in held)

    def saved_nbytes_needed(self, adapter: LoadedAdapter) -> int:
        """Device bytes the adapter's modules_to_save copies take in this pool's dtype."""
        return sum(w.numel() * self.dtype.itemsize for w in distinct_tensors(adapter.saved_modules.values()))

    @property
    def slot_nbytes(self) -> int:
        """Device bytes of one slot's tables (every slot is sized for max_lora_rank; saved
        modules are counted apart, by saved_nbytes)."""
        return self.tables_nbytes // self.num_slots

    @property
    def slots_used(self) -> int:
        return sum(1 for a in self.adapter_in if a is not None)

    def has_idle_slot(self) -> bool:
        """Whether some slot is held by no running request or pin (acquire_load would find a slot;
        an adapter with modules_to_save copies may still wait for room in saved_budget)."""
        return bool(self._idle)

    def lookup(self, adapter_id: str) -> int | None:
        return self.slot_of.get(adapter_id)

    # --- state machine --------------------------------------------------------------------

    def acquire_resident(self, adapter_id: str) -> int | None:
        """Take a reference on the slot already holding adapter_id, if any."""
        slot = self.slot_of.get(adapter_id)
        if slot is not None:
            self._take(slot)
        return slot

    def acquire_load(self, adapter: LoadedAdapter, pinned: frozenset[int] = frozenset()) -> int | None:
        """Put an adapter into the least recently used idle slot and take a reference.

        Returns None when every slot is held by running requests, or when its modules_to_save
        copies need room in saved_budget that running requests' copies hold (`waits_for_saved`
        tells the two apart). `pinned`: slots whose adapters are pinned, so their copies never
        leave; AdapterDoesNotFitError when the copies can never fit beside them.
        """
        adapter_id = adapter.spec.adapter_id
        assert adapter_id not in self.slot_of, "acquire_resident first"
        budgeted = bool(adapter.saved_modules) and self.saved_budget is not None
        if budgeted:
            self._check_saved_fits(adapter, pinned)
        self.waits_for_saved = False
        if not self._idle:
            return None
        if budgeted and not self._room_for_saved(adapter):
            self.waits_for_saved = True
            return None
        slot = next(iter(self._idle))  # after _room_for_saved: a slot it emptied, if any
        evicted = self.adapter_in[slot]
        if evicted is not None:
            del self.slot_of[evicted]
            self.adapter_in[slot] = None
        try:
            self._write(slot, adapter)
        except BaseException:  # never leave a half-written slot behind
            self._clear(slot)
            raise
        self.slot_of[adapter_id] = slot
        self.adapter_in[slot] = adapter_id
        self._take(slot)
        return slot

    def _check_saved_fits(self, adapter: LoadedAdapter, pinned: frozenset[int]) -> None:
        need = self.saved_nbytes_needed(adapter)
        held = sum(self.slot_saved_nbytes(s) for s in pinned)
        if need + held <= self.saved_budget:
            return
        what = (f"adapter {adapter.spec.adapter_id!r} replaces {', '.join(adapter.saved_modules)}: "
                f"{need / 2**20:.0f} MiB of whole weights on the device")
        budget = f"--saved-modules-memory ({self.saved_budget / 2**20:.0f} MiB)"
        if need > self.saved_budget:
            raise AdapterDoesNotFitError(f"{what}, more than {budget} holds; raise it to serve this adapter")
        owners = ", ".join(sorted(repr(self.adapter_in[s]) for s in pinned if self.slot_saved_nbytes(s)))
        raise AdapterDoesNotFitError(f"{what}, and pinned adapters ({owners}) hold {held / 2**20:.0f} MiB of "
                                     f"{budget}; unpin one or raise the budget")

    def _room_for_saved(self, adapter: LoadedAdapter) -> bool:
        """Make room within saved_budget for the adapter's copies by evicting idle slots'
        adapters with copies, least recently used first. False, evicting nothing, while copies
        held by running requests leave too little room."""
        need = self.saved_nbytes_needed(adapter)
        idle = [s for s in self._idle if self.slot_saved_nbytes(s)]  # least recently used first
        held = self.saved_nbytes
        if held - sum(self.slot_saved_nbytes(s) for s in idle) + need > self.saved_budget:
            return False  # running requests hold the copies that would have to go: wait for them
        for other in idle:
            if held + need <= self.saved_budget:
                break
            held -= self.slot_saved_nbytes(other)
            self.evict(self.adapter_in[other])  # idle with copies: holds an adapter (retired slots clear at release)
        return True

    def release(self, slot: int) -> None:
        assert self.refcount[slot] > 0, f"slot {slot} released more often than acquired"
        self.refcount[slot] -= 1
        if self.refcount[slot] == 0:
            self._idle[slot] = None  # most recently used goes last
            if self.adapter_in[slot] is None:  # retired: cleared (its saved modules freed) and reused first
                self._clear(slot)
                self._idle.move_to_end(slot, last=False)

    def retire(self, adapter_id: str) -> None:
        """Stop handing out adapter_id's slot (its files changed on disk): an idle slot is
        cleared now; a slot in use keeps its weights for the requests running on it and is
        cleared once they have released it. A later acquire loads the adapter afresh."""
        slot = self.slot_of.pop(adapter_id, None)
        if slot is None:
            return
        self.adapter_in[slot] = None
        if self.refcount[slot] == 0:
            self._clear(slot)
            self._idle.move_to_end(slot, last=False)

    def evict(self, adapter_id: str) -> bool:
        """Drop an idle adapter from its slot (unload). False if it is in use or absent."""
        slot = self.slot_of.get(adapter_id)
        if slot is None or self.refcount[slot] > 0:
            return False
        self._clear(slot)
        del self.slot_of[adapter_id]
        self.adapter_in[slot] = None
        self._idle.move_to_end(slot, last=False)
        return True

    def _take(self, slot: int) -> None:
        self.refcount[slot] += 1
        self._idle.pop(slot, None)

    # --- weights --------------------------------------------------------------------------

    def _clear(self, slot: int) -> None:
        bit = 1 << slot
        for layer in self.layers:
            for m in layer.values():
                if m.slots_mask & bit:
                    rows = self._written_rank[slot]  # only the rows a write may have touched
                    m.a[slot, :rows].zero_()
                    m.b[slot, :rows].zero_()
                    m.scale[slot] = 0.0
                    m.slots_mask &= ~bit
                if m.dora_mask & bit:
                    m.dora[slot].fill_(1.0)
                    m.dora_mask &= ~bit
                if m.bias_mask & bit:
                    m.bias[slot].zero_()
                    m.bias_mask &= ~bit
        for name, weights in self.saved.items():
            weights[slot] = None
            self.saved_mask[name] &= ~bit
        self.slot_rank[slot] = 0
        self._written_rank[slot] = 0

    def _write(self, slot: int, adapter: LoadedAdapter) -> None:
        self._clear(slot)
        bit = 1 << slot
        self._written_rank[slot] = max(a.shape[0] for a, _ in adapter.weights.values()) if adapter.weights else 0
        for (layer, proj), (lora_a, lora_b) in adapter.weights.items():
            m = self.layers[layer][proj]
            r = lora_a.shape[0]
            m.slots_mask |= bit  # first: a write that fails half-way is cleared by _clear
            m.a[slot, :r].copy_(lora_a)  # [r, H_in]
            m.b[slot, :r].copy_(lora_b.t())  # [H_out, r] -> [r, H_out]
            m.scale[slot] = adapter.spec.modules[(layer, proj)].scale
            magnitude = adapter.magnitudes.get((layer, proj))
            if magnitude is not None:
                assert self.row_scale is not None, "DoRA needs the model runner's row_scale"
                if m.dora is None:
                    m.dora = torch.ones(self.num_slots, m.b.shape[2], dtype=torch.float32, device=self.device)
                m.dora_mask |= bit  # first, as for slots_mask
                m.dora[slot].copy_(self.row_scale(layer, proj, lora_a, lora_b, float(m.scale[slot]), magnitude))
            bias = adapter.biases.get((layer, proj))
            if bias is not None:  # [H_out], stored times the module's scale: what PEFT adds to a row
                if m.bias is None:
                    m.bias = torch.zeros(self.num_slots, m.b.shape[2], dtype=torch.float32, device=self.device)
                m.bias_mask |= bit  # first, as for slots_mask
                m.bias[slot].copy_(bias.to(self.device, torch.float32) * m.scale[slot])
        copies = {}  # id of the host tensor -> its device copy: tied copies are one tensor (adapter_format)
        for name, weight in adapter.saved_modules.items():  # [vocab, hidden], in the activations' dtype
            self.saved_mask[name] |= bit  # first, as for slots_mask
            if id(weight) not in copies:
                # a copy, never a view of the host cache's tensor (which is dropped on its own schedule)
                copies[id(weight)] = weight.to(self.device, self.dtype, copy=True)
            self.saved[name][slot] = copies[id(weight)]
        self.slot_rank[slot] = adapter.spec.rank
