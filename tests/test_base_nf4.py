"""One NF4 base, whoever loads it: `lorad train` (bf16 compute on CPUs with AVX512-BF16, bf16 on
CUDA) and `lorad serve` (float32 compute on CPU) quantize the same float32 weights, so an adapter
is served against the very base it was trained on. Before lorad.base_model.nf4_source_dtype,
a bf16 run quantized from bf16 weights: ~1.6% relative difference in SmolLM2's dequantized
weights, ~2.4% on the tiny Llama here."""

from __future__ import annotations

import pytest
import torch

from lorad.base_model import BaseModelConfig, dequantize_nf4, load_base

pytest.importorskip("bitsandbytes")


def _nf4_weights(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (packed NF4 bytes, the weight dequantized to float32) for every Linear4bit."""
    out = {}
    for name, module in model.named_modules():
        if getattr(getattr(module, "weight", None), "quant_state", None) is not None:
            out[name] = (module.weight.data.view(torch.uint8).clone(), dequantize_nf4(module.weight))
    return out


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_base):
    folder = tmp_path_factory.mktemp("tiny-base")
    tiny_base.model.save_pretrained(folder)
    tiny_base.tokenizer.save_pretrained(folder)
    return folder


def test_trainer_and_server_quantize_the_same_base(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAD_CACHE_DIR", str(tmp_path / "cache"))
    cfg = BaseModelConfig(name=str(tiny_folder), quant="nf4", device="cpu")
    served = _nf4_weights(load_base(cfg).model)  # as `lorad serve` loads it (float32 compute on CPU)
    assert len(served) == 2 * 7
    # as lorad.trainer.recipe loads it for a bf16 run: first quantized, then from the quantized cache
    for attempt in ("quantized now", "from the cache"):
        trained = load_base(cfg, for_training=True, compute_dtype=torch.bfloat16, cache_quantized=True).model
        assert trained.model.embed_tokens.weight.dtype == torch.bfloat16, attempt  # still a bf16 run
        assert trained.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16, attempt
        got = _nf4_weights(trained)
        assert got.keys() == served.keys()
        for name, (packed, weight) in served.items():
            assert torch.equal(got[name][0], packed), f"{name} ({attempt}): packed NF4 bytes differ"
            assert torch.equal(got[name][1], weight), f"{name} ({attempt}): dequantized weights differ"
    assert any((tmp_path / "cache" / "quantized").iterdir())  # the second load did come from the cache


def test_bf16_run_dequantizes_to_bf16_as_before(tiny_folder):
    """The NF4 weight of a bf16 run reaches its matmul as bf16 (no float32 copy per call), and
    the forward agrees with the float32-compute model up to bf16 rounding."""
    cfg = BaseModelConfig(name=str(tiny_folder), quant="nf4", device="cpu")
    bf16 = load_base(cfg, compute_dtype=torch.bfloat16).model
    fp32 = load_base(cfg).model
    module = bf16.model.layers[0].mlp.up_proj
    assert module.weight.quant_state.dtype == torch.bfloat16
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        a, b = bf16(ids).logits.float(), fp32(ids).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()
