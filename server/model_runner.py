"""The engine's forward pass: a Llama-family model over a packed batch of mixed requests.

Each step runs ONE forward over every token the scheduler picked: the prompt chunks of
requests being prefilled and one token of each request being decoded, packed into a single
[T, hidden] tensor. Each token carries its request's KV-cache row, its position and its
adapter slot. The model's own weights are reused; what this file owns is the packing, the KV
cache reads and writes, and the multi-adapter LoRA added to every projection through
lorad.kernels.

A decode step runs several hundred torch calls, and on a CPU each costs microseconds of
dispatch whatever its size, so the layer is written for few calls:
  * q/k/v and gate/up run as one matmul each on their shared input (lorad.server.projections:
    concatenated weights; the NF4 routes are bit-identical to the modules called one by one);
    LoRA adds into column views of the fused output;
  * RMSNorm is one call (F.rms_norm: bit-identical to the model's module in fp32);
    RoPE rotates q and k together with a precomputed signed sine (bit-identical to HF's
    rotate_half form; tests/test_model_runner.py checks both);
  * the KV cache is written with one index_copy_ per tensor through a flat index computed
    once per step, not per layer;
  * decode attention (one token per request) is one batched SDPA over cache rows [0, n_rows)
    with a key mask per row; the scheduler keeps live rows compacted at the front of the
    cache, so the keys are a view, never a copy. Prompt chunks run one SDPA per request
    (causal, offset by what is already cached);
  * only the rows that sample reach the final norm and the logits head
    (projections.LogitsHead);
  * an adapter with modules_to_save (embed_tokens, lm_head) has its own trained copy looked up
    or multiplied for its tokens only, one call per such adapter in the step
    (replace_saved_rows); the other rows keep the base's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorad.cpu_features import detect as detect_cpu
from lorad.geometry import ModelGeometry
from lorad.kernels import LoRABatchMeta, add_lora, lora_expand_dora, lora_shrink, resolve_backend

from lorad.server.config import EngineConfig
from lorad.server.kv_cache import KVCache
from lorad.server.lora_slots import LoRASlotPool
from lorad.server.projections import GroupBuilder, LogitsHead

# The projection groups of a layer, in the order they run: (group, its projections).
GROUPS = (("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)),
          ("gate_up", ("gate_proj", "up_proj")), ("down", ("down_proj",)))
_MEMBERS = dict(GROUPS)


def _weight_row_sq(group, dtype: torch.dtype) -> torch.Tensor:
    """||W_row||^2 [sum of out_features] float32 of a projection group as it is served
    (lorad.server.projections), the rows of its members one after another.

    A group that holds its weight (dense, or NF4 dequantized once) is read directly; an NF4 weight
    repacked for bitsandbytes' fused CPU kernel can only be read through that kernel: W^T is then
    the group applied to the identity, in blocks of rows (the identity is exact in bf16, and the
    kernel accumulates in fp32). NF4 modules called one by one are dequantized by bitsandbytes
    (their weight is still in its own layout)."""
    weight = getattr(group, "weight", None)
    if getattr(group, "wide", None) is not None:  # KernelNF4 with a dequantized copy: read the copy
        weight = group.wide.weight
    if weight is not None and weight.is_floating_point():  # DenseGroup, DequantizedNF4: [N, K]
        return weight.float().square().sum(1)
    modules = getattr(group, "modules", None)
    if modules is not None and not any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
                                       for m in modules):  # ModuleGroup
        import bitsandbytes.functional as bnbf

        def rows(m):
            state = getattr(m.weight, "quant_state", None)
            w = m.weight if state is None else bnbf.dequantize_4bit(m.weight.data, state)
            return w.float().square().sum(1)

        return torch.cat([rows(m) for m in modules])
    in_f = group.in_features if hasattr(group, "in_features") else modules[0].in_features
    device = weight.device if weight is not None else modules[0].weight.device
    total = None
    for start in range(0, in_f, 512):
        n = min(512, in_f - start)
        eye = torch.zeros(n, in_f, dtype=dtype, device=device)  # [n, H_in]: rows start .. start + n of I
        eye[torch.arange(n), torch.arange(start, start + n)] = 1
        part = group(eye).float().square().sum(0)  # [N]: rows of W^T, squared and summed
        total = part if total is None else total + part
    return total


def add_slot_bias(y: torch.Tensor, bias: torch.Tensor, meta: LoRABatchMeta) -> None:
    """Add each adapter token's slot row of `bias` to its output row (PEFT's lora_bias).

    Semantics:
      for t in range(T):
          if meta.token_slots[t] >= 0:
              y[t] += bias[meta.token_slots[t]].to(y.dtype)
    Only the rows of the batch's adapter tokens are read from `bias`: a base-only token (-1)
    gets nothing, and no unused slot's row is ever gathered.

    Args:
      y: Shape: `[T, H_out]` (a column view of a group's output is fine). Modified in place.
      bias: Shape: `[S, H_out]` float32, scale * lora_B bias per slot (zeros where a slot has none).
      meta: the batch's LoRABatchMeta.
    """
    rows = meta.sorted_rows  # [num_lora_tokens] int64, the tokens that have an adapter
    slots = meta.token_slots.index_select(0, rows).long()  # [num_lora_tokens]
    y.index_add_(0, rows, bias.index_select(0, slots).to(y.dtype))


def replace_saved_rows(out: torch.Tensor, slot_rows, weights: list, compute) -> None:
    """Overwrite the rows of `out` whose adapter has a trained copy of a module (modules_to_save).

    Semantics:
      for slot, rows in slot_rows:
          out[rows] = compute(weights[slot], rows)
    one call per slot over all of its rows: `compute(weight, rows)` gets the slot's weight and
    the int64 index of its rows and returns their new values [len(rows), ...].

    Args:
      out: Shape: `[N, ...]`, modified in place (the step's embeddings or logits).
      slot_rows: (slot, rows) pairs, rows an int64 index tensor on out's device, for the slots of
        the batch that have a copy (weights[slot] is not None); no other row is touched.
      weights: the pool's per-slot list for one module.
    """
    for slot, rows in slot_rows:
        out.index_copy_(0, rows, compute(weights[slot], rows).to(out.dtype))


@dataclass
class SeqChunk:
    """One request's tokens in a step."""

    row: int  # KV-cache row
    start: int  # position of the first token of the chunk
    length: int  # tokens in the chunk
    offset: int  # index of the chunk's first token in the packed batch


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    rows: torch.Tensor  # [T] int64 cache row of each token
    chunks: list[SeqChunk]
    lora_meta: LoRABatchMeta
    active_slots_mask: int  # bit s set when slot s has tokens in this batch
    lora_rank: int  # the largest rank among the batch's adapters (slots are zero past it)
    logits_index: torch.Tensor  # [B] int64 packed index of each token whose next token is sampled
    n_rows: int  # live cache rows, all in [0, n_rows)
    # the slot of each sampled token (host ints, -1 for none), for modules_to_save heads; None:
    # read from lora_meta when needed (a device sync)
    logits_slots: tuple[int, ...] | None = None


@dataclass
class _StepPlan:
    """What every layer of one step shares: computed once per step."""

    cache_index: torch.Tensor  # [T * kv_heads] flat row of each (token, kv head) in a layer's cache
    decode: "_DecodePlan | None"


@dataclass
class _DecodePlan:
    token_index: torch.Tensor  # [Bd] packed indices of decode tokens
    rows: torch.Tensor  # [Bd] their cache rows
    key_len: int  # keys to read per row (max length over decode rows)
    mask: torch.Tensor  # [n_rows, 1, 1, key_len] additive: 0 where a row attends, -inf past its length
    row_token: torch.Tensor | None  # [n_rows] token of each row, when every row decodes (else None)


@dataclass
class _Layer:
    in_norm: object
    post_norm: object
    groups: dict  # group name -> callable x [T, H_in] -> [T, sum of its out_features]
    act: object


class LlamaRunner:
    def __init__(self, model, geometry: ModelGeometry, kv: KVCache, pool: LoRASlotPool, lora_backend: str = "auto",
                 dequant_memory: int = 0, nf4_kernel_rows: int = EngineConfig.nf4_kernel_rows):
        inner = model.model
        self.geometry = geometry
        self.kv = kv
        self.pool = pool
        self.lora_backend = resolve_backend(kv.device, lora_backend)  # once, not per call
        self.device = kv.device
        self.dtype = kv.dtype  # activations
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        builder = GroupBuilder(dequant_memory, self.dtype, nf4_kernel_rows)
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            owner = {"q_proj": attn, "k_proj": attn, "v_proj": attn, "o_proj": attn,
                     "gate_proj": mlp, "up_proj": mlp, "down_proj": mlp}
            groups = {g: builder.build([getattr(owner[p], p) for p in projs]) for g, projs in GROUPS}
            self.layers.append(_Layer(layer.input_layernorm, layer.post_attention_layernorm, groups, mlp.act_fn))
        quantized = set(builder.routes) != {"dense"}
        self.head = LogitsHead(model.lm_head, quantized, detect_cpu(), self.device)
        self.route = f"{builder.describe()}; {self.head.route}"
        self.extra_bytes = builder.extra_bytes + self.head.extra_bytes  # weights held besides the model's
        self._fused_norm = self.dtype == torch.float32 and all(
            hasattr(n, "variance_epsilon") for l in self.layers for n in (l.in_norm, l.post_norm))
        # (first column, width) of each projection in its group's output
        self.columns = {}
        for _, projs in GROUPS:
            offset = 0
            for p in projs:
                width = geometry.projection_shape(p)[1]
                self.columns[p] = (offset, width)
                offset += width
        self._row_sq: dict[tuple[int, str], torch.Tensor] = {}  # ||W_row||^2 per group, for DoRA, on first use
        pool.row_scale = self.dora_row_scale
        # RoPE tables for every position the cache can hold, from the model's own rotary
        # module (so llama3 / linear / dynamic-free scaling variants come out right).
        # rotate_half(x) * sin == roll(x, D/2) * sin_signed, with the first half of sin negated.
        positions = torch.arange(kv.max_seq_len, device=self.device)[None]
        probe = torch.zeros(1, dtype=kv.dtype, device=self.device)
        cos, sin = inner.rotary_emb(probe, positions)
        self.cos, sin = cos[0].to(kv.dtype), sin[0].to(kv.dtype)  # [max_seq_len, head_dim]
        half = geometry.head_dim // 2
        self.sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self.scaling = geometry.head_dim**-0.5

    # --- pieces of a layer ------------------------------------------------------------------

    def _rms_norm(self, module, h: torch.Tensor) -> torch.Tensor:
        if self._fused_norm:
            return F.rms_norm(h, (h.shape[-1],), module.weight, module.variance_epsilon)
        return module(h)

    def _add_lora(self, layer: int, proj: str, y: torch.Tensor, x: torch.Tensor, batch: StepBatch) -> None:
        """y: the group's output [T, sum of widths]; adds proj's LoRA into its columns."""
        slots = self.pool.layers[layer][proj]
        if slots.slots_mask & batch.active_slots_mask:
            offset, width = self.columns[proj]
            a, b = slots.rank_slice(batch.lora_rank)  # [S, r, H_in], [S, r, H_out]
            y = y[:, offset : offset + width]
            if slots.dora_mask & batch.active_slots_mask:  # DoRA: the sum is scaled per slot and output row
                v = lora_shrink(x, a, batch.lora_meta, backend=self.lora_backend)
                lora_expand_dora(y, v, b, slots.scale, slots.dora, batch.lora_meta, backend=self.lora_backend)
            else:
                add_lora(y, x, a, b, slots.scale, batch.lora_meta, backend=self.lora_backend)
            if slots.bias_mask & batch.active_slots_mask:  # lora_bias: scale * bias of each token's slot
                add_slot_bias(y, slots.bias, batch.lora_meta)

    def dora_row_scale(self, layer: int, name: str, lora_a, lora_b, scale: float, magnitude) -> torch.Tensor:
        """m / ||W + scale B A||_row, float32 [H_out] (lorad.kernels.dora.dora_row_scale), from
        ||W_row||^2 kept once per group and W A^T taken through the served group itself, so no
        dequantized copy of the base is needed:
            ||W + s B A||^2_row = ||W||^2_row + 2 s rowsum(B * (W A^T)) + s^2 rowsum((B A A^T) * B)"""
        a = lora_a.to(self.device, torch.float32)  # [r, H_in]
        b = lora_b.to(self.device, torch.float32)  # [H_out, r]
        group_name = next(g for g, projs in GROUPS if name in projs)
        group = self.layers[layer].groups[group_name]
        offset, width = self.columns[name]
        with torch.inference_mode():
            wa = group(a.to(self.dtype))[:, offset : offset + width].float().t()  # [H_out, r] = W A^T
            row_sq = self._row_sq.get((layer, group_name))
            if row_sq is None:
                row_sq = self._row_sq[(layer, group_name)] = _weight_row_sq(group, self.dtype)
        row_sq = row_sq[offset : offset + width]
        norm_sq = row_sq + 2 * scale * (b * wa).sum(1) + scale**2 * ((b @ (a @ a.t())) * b).sum(1)
        return (magnitude.to(self.device, torch.float32) / norm_sq.clamp(min=0).sqrt()).contiguous()

    def _project(self, layer: int, group: str, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        y = self.layers[layer].groups[group](x)  # [T, sum of widths]
        if batch.active_slots_mask:
            for proj in _MEMBERS[group]:
                self._add_lora(layer, proj, y, x, batch)
        return y

    def _plan(self, batch: StepBatch) -> _StepPlan:
        g, kv = self.geometry, self.kv
        heads = torch.arange(g.num_kv_heads, device=self.device)
        # flat index into a layer's cache viewed as [rows * kv_heads * max_len, D]
        cache_index = ((batch.rows[:, None] * g.num_kv_heads + heads) * kv.max_seq_len + batch.positions[:, None])
        return _StepPlan(cache_index=cache_index.reshape(-1), decode=self._plan_decode(batch))

    def _plan_decode(self, batch: StepBatch) -> _DecodePlan | None:
        singles = [c for c in batch.chunks if c.length == 1]
        if not singles:
            return None
        key_len = max(c.start + 1 for c in singles)
        lengths = torch.ones(batch.n_rows, dtype=torch.int64)  # rows not decoding: attend to one key
        row_token = [-1] * batch.n_rows
        for c in singles:
            lengths[c.row] = c.start + 1
            row_token[c.row] = c.offset
        beyond = torch.arange(key_len)[None, :] >= lengths[:, None]  # [n_rows, key_len]
        mask = torch.zeros(beyond.shape, dtype=self.dtype).masked_fill_(beyond, float("-inf"))
        every_row = len(singles) == batch.n_rows
        return _DecodePlan(
            token_index=torch.tensor([c.offset for c in singles], device=self.device),
            rows=torch.tensor([c.row for c in singles], device=self.device),
            key_len=key_len,
            mask=mask[:, None, None, :].to(self.device),
            row_token=torch.tensor(row_token, device=self.device) if every_row else None,
        )

    def _attention(self, layer: int, q, k, v, batch: StepBatch, plan: _StepPlan) -> torch.Tensor:
        # q: [T, nH, D]; k, v: [T, nKV, D] (rotated); returns [T, nH * D]
        k_cache, v_cache = self.kv.k[layer], self.kv.v[layer]  # [rows, nKV, max_len, D]
        T, nH, D = q.shape
        k_cache.view(-1, D).index_copy_(0, plan.cache_index, k.reshape(-1, D))
        v_cache.view(-1, D).index_copy_(0, plan.cache_index, v.reshape(-1, D))
        decode = plan.decode
        if decode is not None and decode.row_token is not None and len(batch.chunks) == batch.n_rows:
            # every token decodes and every row has one: gather q by row, scatter o back by token
            o = self._sdpa_decode(q.index_select(0, decode.row_token), k_cache, v_cache, batch, decode)
            out = torch.empty_like(q)
            out[decode.row_token] = o
            return out.view(T, nH * D)
        out = torch.empty_like(q)
        if decode is not None:
            q_rows = q.new_zeros(batch.n_rows, nH, D)
            q_rows[decode.rows] = q[decode.token_index]
            o = self._sdpa_decode(q_rows, k_cache, v_cache, batch, decode)
            out[decode.token_index] = o[decode.rows]
        for c in batch.chunks:
            if c.length == 1:
                continue
            qc = q[c.offset : c.offset + c.length].transpose(0, 1)[None]  # [1, nH, n, D]
            end = c.start + c.length
            keys = k_cache[c.row : c.row + 1, :, :end]
            values = v_cache[c.row : c.row + 1, :, :end]
            if c.start == 0:
                o = F.scaled_dot_product_attention(qc, keys, values, is_causal=True, scale=self.scaling, enable_gqa=True)
            else:
                q_pos = torch.arange(c.start, end, device=self.device)
                mask = torch.arange(end, device=self.device)[None, :] <= q_pos[:, None]  # [n, end]
                o = F.scaled_dot_product_attention(qc, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True)
            out[c.offset : c.offset + c.length] = o[0].transpose(0, 1)
        return out.view(T, nH * D)

    def _sdpa_decode(self, q_rows, k_cache, v_cache, batch: StepBatch, decode: _DecodePlan) -> torch.Tensor:
        """q_rows [n_rows, nH, D] -> [n_rows, nH, D]: one query per row over its cached keys.

        Grouped-query attention without repeating keys: the query heads sharing a kv head
        (consecutive heads, as HF's repeat_kv pairs them) become that head's query rows.
        """
        n, nH, D = q_rows.shape
        nKV = k_cache.shape[1]
        keys = k_cache[:n, :, : decode.key_len]  # [n_rows, nKV, key_len, D] view
        values = v_cache[:n, :, : decode.key_len]
        o = F.scaled_dot_product_attention(q_rows.view(n, nKV, nH // nKV, D), keys, values, attn_mask=decode.mask,
                                           scale=self.scaling)  # [n_rows, nKV, nH / nKV, D]
        return o.view(n, nH, D)

    # --- forward --------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Run one step; return logits [B, vocab] float32 for batch.logits_index."""
        return self.step(batch)

    def step(self, batch: StepBatch) -> torch.Tensor:
        """forward without its inference_mode, for torch.compile: AOT autograd cannot trace views
        of inference tensors, so a compiled step runs under torch.no_grad on normal tensors
        (tests/test_compile.py traces it in one graph)."""
        g = self.geometry
        T = batch.input_ids.shape[0]
        nH, nKV, D = g.num_heads, g.num_kv_heads, g.head_dim
        h = self.embed(batch.input_ids).to(self.dtype)  # [T, hidden]
        saved = self.pool.saved_mask
        if saved["embed_tokens"] & batch.active_slots_mask:  # modules_to_save: the adapter's own embeddings
            replace_saved_rows(h, self._token_rows(batch, saved["embed_tokens"]), self.pool.saved["embed_tokens"],
                               lambda w, rows: w.index_select(0, batch.input_ids.index_select(0, rows)))
        cos = self.cos[batch.positions][:, None]  # [T, 1, D]
        sin = self.sin_signed[batch.positions][:, None]
        plan = self._plan(batch)
        inter = g.intermediate_size
        for i, layer in enumerate(self.layers):
            x = self._rms_norm(layer.in_norm, h)
            qkv = self._project(i, "qkv", x, batch)  # [T, (nH + 2 nKV) * D]
            qk = qkv[:, : (nH + nKV) * D].view(T, nH + nKV, D)
            qk = qk * cos + qk.roll(D // 2, dims=-1) * sin  # RoPE on q and k at once
            v = qkv[:, (nH + nKV) * D :].view(T, nKV, D)
            attn = self._attention(i, qk[:, :nH], qk[:, nH:], v, batch, plan)
            h += self._project(i, "o", attn, batch)
            x = self._rms_norm(layer.post_norm, h)
            gate_up = self._project(i, "gate_up", x, batch)  # [T, 2 * intermediate]
            h += self._project(i, "down", layer.act(gate_up[:, :inter]) * gate_up[:, inter:], batch)
        last = self._rms_norm(self.norm, h.index_select(0, batch.logits_index))  # [B, hidden]
        logits = self.head(last)  # [B, vocab] float32
        if saved["lm_head"] & batch.active_slots_mask:  # modules_to_save: the adapter's own output head
            replace_saved_rows(logits, self._logits_rows(batch, saved["lm_head"]), self.pool.saved["lm_head"],
                               lambda w, rows: F.linear(last.index_select(0, rows), w).float())
        return logits

    def _token_rows(self, batch: StepBatch, mask: int) -> list:
        """(slot, its tokens' rows) for the batch's slots in `mask`, from the grouped layout the
        LoRA ops use: host bounds over the device's sorted rows, no sync."""
        meta = batch.lora_meta
        return [(slot, meta.sorted_rows[meta.seg_starts_host[d] : meta.seg_starts_host[d + 1]])
                for d, slot in enumerate(meta.active_slots_host) if mask >> slot & 1]

    def _logits_rows(self, batch: StepBatch, mask: int) -> list:
        """(slot, its rows of the logits) for the batch's slots in `mask`."""
        slots = batch.logits_slots
        if slots is None:
            slots = batch.lora_meta.token_slots.index_select(0, batch.logits_index).tolist()
        rows: dict[int, list[int]] = {}
        for i, slot in enumerate(slots):
            if slot >= 0 and mask >> slot & 1:
                rows.setdefault(slot, []).append(i)
        return [(slot, torch.tensor(r, dtype=torch.int64, device=self.device)) for slot, r in rows.items()]
