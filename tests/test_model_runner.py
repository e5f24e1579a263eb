"""The runner's cheaper forms of RMSNorm and RoPE compute exactly what the model's own modules
compute (server/model_runner.py), and its forward over a prompt gives the model's logits."""

from __future__ import annotations

import torch

from lorad.server.config import EngineConfig
from lorad.server.engine import Engine
from lorad.server.sampling import SamplingParams


def test_rms_norm_and_rope_are_bit_identical_to_the_modules(tiny_base):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    engine = Engine(tiny_base, EngineConfig(max_seq_len=64, max_batch_size=1, threads=1))
    runner, inner = engine.runner, tiny_base.model.model
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, inner.config.hidden_size, generator=g) * 3
    norm = inner.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)  # not all ones
        assert runner._fused_norm
        assert torch.equal(runner._rms_norm(norm, h), norm(h))
        positions = torch.tensor([0, 3, 5, 9, 17, 33, 60])
        q = torch.randn(7, 4, runner.geometry.head_dim, generator=g)
        k = torch.randn(7, 2, runner.geometry.head_dim, generator=g)
        cos, sin = inner.rotary_emb(q, positions[None])
        q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
        qk = torch.cat([q, k], dim=1)
        D = runner.geometry.head_dim
        rotated = qk * runner.cos[positions][:, None] + qk.roll(D // 2, dims=-1) * runner.sin_signed[positions][:, None]
    assert torch.equal(rotated[:, :4], q_ref[0].transpose(0, 1))
    assert torch.equal(rotated[:, 4:], k_ref[0].transpose(0, 1))


def test_prefill_logits_match_the_model(tiny_base):
    engine = Engine(tiny_base, EngineConfig(max_seq_len=64, max_batch_size=1, threads=1))
    captured = []
    forward = engine.runner.forward

    def capture(batch):
        captured.append(forward(batch))
        return captured[-1]

    engine.runner.forward = capture
    prompt = engine.encode(prompt="The capital of France is")
    with engine:
        engine.generate(prompt, SamplingParams(max_new_tokens=1))
    with torch.no_grad():
        ref = tiny_base.model(torch.tensor([prompt])).logits[0, -1].float()
    assert torch.allclose(captured[0][0], ref, rtol=0, atol=1e-4)
    assert ref.std() > 0.01  # a real distribution, not a constant
