"""The engine's forward pass: a Llama-family model over a packed batch of mixed requests.

Each step runs ONE forward over every token the scheduler picked: the prompt chunks of
requests being prefilled and one token of each request being decoded, packed into a single
[T, hidden] tensor. Each token carries its request's KV-cache row, its position and its
adapter slot. The model's own modules are reused (embeddings, RMSNorm, the NF4 Linear4bit
projections, lm_head); what this file owns is the packing, the KV cache reads and writes, and
the multi-adapter LoRA added to every projection through lorad.kernels.

Attention:
  * decode tokens (one per request) run as one batched SDPA over cache rows [0, n_rows),
    with a key mask for each row's length; the scheduler keeps live rows compacted at the
    front of the cache, so the keys are a view, never a copy;
  * prompt chunks run one SDPA per request (causal, offset by what is already cached).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorad.geometry import ATTENTION_PROJECTIONS, PROJECTIONS, ModelGeometry
from lorad.kernels import LoRABatchMeta, add_lora, lora_expand_dora, lora_shrink, resolve_backend

from lorad.server.kv_cache import KVCache
from lorad.server.lora_slots import LoRASlotPool
from lorad.server.nf4_cpu import wrap_linear


def _weight_row_sq(proj, dtype: torch.dtype) -> torch.Tensor:
    """||W_row||^2 [H_out] float32 of a projection as it is served.

    An NF4 weight repacked for bitsandbytes' fused CPU kernel (lorad.server.nf4_cpu) can only be
    read through that kernel: W^T is then the projection of the identity, in blocks of rows (the
    identity is exact in bf16, and the kernel accumulates in fp32)."""
    module = getattr(proj, "module", proj)  # FastNF4Linear wraps the Linear4bit
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.float().square().sum(1)
    if not getattr(state, "packing_format_for_cpu", False):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, state).float().square().sum(1)
    in_f = module.in_features
    total = torch.zeros(module.out_features, dtype=torch.float32, device=weight.device)
    for start in range(0, in_f, 512):
        n = min(512, in_f - start)
        eye = torch.zeros(n, in_f, dtype=dtype, device=weight.device)  # [n, H_in]: rows start .. start + n of I
        eye[torch.arange(n), torch.arange(start, start + n)] = 1
        total += proj(eye).float().square().sum(0)  # [H_out]: rows of W^T, squared and summed
    return total


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


@dataclass
class _DecodePlan:
    token_index: torch.Tensor  # [Bd] packed indices of decode tokens
    rows: torch.Tensor  # [Bd] their cache rows
    key_len: int  # keys to read per row (max length over decode rows)
    mask: torch.Tensor  # [n_rows, 1, 1, key_len] bool, True = attend


class LlamaRunner:
    def __init__(self, model, geometry: ModelGeometry, kv: KVCache, pool: LoRASlotPool, lora_backend: str = "auto"):
        inner = model.model
        self.geometry = geometry
        self.kv = kv
        self.pool = pool
        self.lora_backend = resolve_backend(kv.device, lora_backend)  # once, not per call
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    layer.input_layernorm,
                    layer.post_attention_layernorm,
                    {p: wrap_linear(getattr(attn if p in ATTENTION_PROJECTIONS else mlp, p)) for p in PROJECTIONS},
                    mlp.act_fn,
                )
            )
        self._weight_row_sq: dict[tuple[int, str], torch.Tensor] = {}  # ||W_row||^2 for DoRA, computed on first use
        pool.row_scale = self.dora_row_scale
        self.dtype = self.embed.weight.dtype if self.embed.weight.is_floating_point() else torch.float32
        self.device = kv.device
        # RoPE tables for every position the cache can hold, from the model's own rotary
        # module (so llama3 / linear / dynamic-free scaling variants come out right).
        positions = torch.arange(kv.max_seq_len, device=self.device)[None]
        probe = torch.zeros(1, dtype=kv.dtype, device=self.device)
        cos, sin = inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].to(kv.dtype), sin[0].to(kv.dtype)  # [max_seq_len, head_dim]
        self.scaling = geometry.head_dim**-0.5

    # --- projections with LoRA --------------------------------------------------------------

    def _proj(self, layer: int, name: str, module, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        y = module(x)  # [T, H_out]
        slots = self.pool.layers[layer][name]
        if slots.slots_mask & batch.active_slots_mask:
            a, b = slots.rank_slice(batch.lora_rank)  # [S, r, H_in], [S, r, H_out]
            if slots.dora_mask & batch.active_slots_mask:  # DoRA: the sum is scaled per slot and output row
                v = lora_shrink(x, a, batch.lora_meta, backend=self.lora_backend)
                lora_expand_dora(y, v, b, slots.scale, slots.dora, batch.lora_meta, backend=self.lora_backend)
            else:
                add_lora(y, x, a, b, slots.scale, batch.lora_meta, backend=self.lora_backend)
        return y

    def dora_row_scale(self, layer: int, name: str, lora_a, lora_b, scale: float, magnitude) -> torch.Tensor:
        """m / ||W + scale B A||_row, float32 [H_out] (lorad.kernels.dora.dora_row_scale), from
        ||W_row||^2 kept at start-up and W A^T taken through the served projection itself, so no
        dequantized copy of the base is needed:
            ||W + s B A||^2_row = ||W||^2_row + 2 s rowsum(B * (W A^T)) + s^2 rowsum((B A A^T) * B)"""
        a = lora_a.to(self.device, torch.float32)  # [r, H_in]
        b = lora_b.to(self.device, torch.float32)  # [H_out, r]
        proj = self.layers[layer][2][name]
        with torch.inference_mode():
            wa = proj(a.to(self.kv.dtype)).float().t()  # [H_out, r] = W A^T
            row_sq = self._weight_row_sq.get((layer, name))
            if row_sq is None:
                row_sq = self._weight_row_sq[(layer, name)] = _weight_row_sq(proj, self.kv.dtype)
        norm_sq = row_sq + 2 * scale * (b * wa).sum(1) + scale**2 * ((b @ (a @ a.t())) * b).sum(1)
        return (magnitude.to(self.device, torch.float32) / norm_sq.clamp(min=0).sqrt()).contiguous()

    # --- attention ----------------------------------------------------------------------------

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, D]; cos, sin: [T, 1, D]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _plan_decode(self, batch: StepBatch) -> _DecodePlan | None:
        singles = [c for c in batch.chunks if c.length == 1]
        if not singles:
            return None
        key_len = max(c.start + 1 for c in singles)
        lengths = torch.ones(batch.n_rows, dtype=torch.int64)  # rows not decoding: attend to one key
        for c in singles:
            lengths[c.row] = c.start + 1
        mask = torch.arange(key_len)[None, :] < lengths[:, None]  # [n_rows, key_len]
        return _DecodePlan(
            token_index=torch.tensor([c.offset for c in singles], device=self.device),
            rows=torch.tensor([c.row for c in singles], device=self.device),
            key_len=key_len,
            mask=mask[:, None, None, :].to(self.device),
        )

    def _attention(self, layer: int, q, k, v, batch: StepBatch, plan: _DecodePlan | None) -> torch.Tensor:
        # q: [T, nH, D]; k, v: [T, nKV, D] (rotated); returns [T, nH * D]
        k_cache, v_cache = self.kv.k[layer], self.kv.v[layer]  # [rows, nKV, max_len, D]
        k_cache[batch.rows, :, batch.positions] = k
        v_cache[batch.rows, :, batch.positions] = v
        T, nH, D = q.shape
        out = torch.empty_like(q)
        if plan is not None:
            q_rows = q.new_zeros(batch.n_rows, nH, 1, D)
            q_rows[plan.rows, :, 0] = q[plan.token_index]
            keys = k_cache[: batch.n_rows, :, : plan.key_len]
            values = v_cache[: batch.n_rows, :, : plan.key_len]
            o = F.scaled_dot_product_attention(q_rows, keys, values, attn_mask=plan.mask, scale=self.scaling, enable_gqa=True)
            out[plan.token_index] = o[plan.rows, :, 0]
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
        return out.reshape(T, nH * D)

    # --- forward --------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Run one step; return logits [B, vocab] float32 for batch.logits_index."""
        g = self.geometry
        T = batch.input_ids.shape[0]
        h = self.embed(batch.input_ids).to(self.kv.dtype)  # [T, hidden]
        cos = self.cos[batch.positions][:, None]  # [T, 1, D]
        sin = self.sin[batch.positions][:, None]
        plan = self._plan_decode(batch)
        for i, (in_norm, post_norm, proj, act) in enumerate(self.layers):
            x = in_norm(h)
            q = self._proj(i, "q_proj", proj["q_proj"], x, batch).view(T, g.num_heads, g.head_dim)
            k = self._proj(i, "k_proj", proj["k_proj"], x, batch).view(T, g.num_kv_heads, g.head_dim)
            v = self._proj(i, "v_proj", proj["v_proj"], x, batch).view(T, g.num_kv_heads, g.head_dim)
            attn = self._attention(i, self._rope(q, cos, sin), self._rope(k, cos, sin), v, batch, plan)
            h = h + self._proj(i, "o_proj", proj["o_proj"], attn, batch)
            x = post_norm(h)
            gate = self._proj(i, "gate_proj", proj["gate_proj"], x, batch)
            up = self._proj(i, "up_proj", proj["up_proj"], x, batch)
            h = h + self._proj(i, "down_proj", proj["down_proj"], act(gate) * up, batch)
        last = self.norm(h.index_select(0, batch.logits_index))  # [B, hidden]
        return self.lm_head(last.to(self.lm_head.weight.dtype)).float()  # [B, vocab]
