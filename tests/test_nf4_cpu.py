"""lorad's projection routes compute exactly what the modules compute (server/nf4_cpu.py,
server/projections.py), and the engine on the AVX2 route matches transformers.

The exception is the nf4-kernel route (lorad's NF4 AVX2 kernel, kernels/nf4_avx2.py): it sums
in another order, so it is compared to the modules within float32 rounding.

Small random NF4 Linear4bit modules, quantized by bitsandbytes itself (double quantization, as
lorad loads bases). Every comparison is bit-for-bit (torch.equal) against the module's own
forward: the fused kernel where this CPU has AVX512-BF16, bitsandbytes' dequantize-per-call
fallback everywhere (a module told it has no AVX512-BF16 takes it, as on an AVX2 CPU).
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from lorad.cpu_features import CpuFeatures  # noqa: E402
from lorad.kernels import nf4_avx2  # noqa: E402
from lorad.server import nf4_cpu  # noqa: E402
from lorad.server.nf4_cpu import DequantizedNF4, FusedNF4, KernelNF4, _fused_kernel, nf4_route  # noqa: E402
from lorad.server.projections import DenseGroup, GroupBuilder, LogitsHead, ModuleGroup  # noqa: E402

FUSED = bool(bnb.functional.has_avx512bf16()) and _fused_kernel() is not None
needs_fused = pytest.mark.skipif(
    not FUSED, reason="this CPU has no AVX512-BF16: bitsandbytes has no fused NF4 kernel to compare with")
needs_kernel = pytest.mark.skipif(not nf4_avx2.available(),
                                  reason=f"NF4 AVX2 kernel unavailable: {nf4_avx2.unavailable_reason()}")
SHAPES = [(64, 96), (64, 32), (64, 32)]  # a q/k/v-like group: in 64, out 96 / 32 / 32 (multiples of 32)


def nf4_linear(in_f: int, out_f: int, seed: int, fused: bool, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.float32, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(out_f, in_f, generator=g) * 0.05, requires_grad=False,
                                   quant_type="nf4", compress_statistics=True, module=lin)
    if bias:
        lin.bias = torch.nn.Parameter(torch.randn(out_f, generator=g) * 0.1, requires_grad=False)
    lin = lin.to("cpu").eval()
    if not fused:
        lin.support_avx512bf16_for_cpu = False  # what Linear4bit reads on an AVX2 CPU
    return lin


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def group(fused: bool, bias: bool = False):
    return [nf4_linear(i, o, seed=n, fused=fused, bias=bias) for n, (i, o) in enumerate(SHAPES)]


def inputs(in_f: int = 64):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(m, in_f, generator=g) for m in (1, 3, 16, 33)]


@needs_fused
def test_fused_group_is_bit_identical_to_each_module():
    mods = group(fused=True)
    assert {nf4_route(m) for m in mods} == {"fused"}
    with torch.inference_mode():
        before = [torch.cat([m(x) for m in mods], dim=1) for x in inputs()]
        fused = FusedNF4(mods)
        for x, ref in zip(inputs(), before):
            assert torch.equal(fused(x), ref)
            # the modules now read views of the concatenated weight and still compute the same
            assert torch.equal(torch.cat([m(x) for m in mods], dim=1), ref)
    assert all(shares_storage(m.weight, fused.weight) for m in mods)  # no byte held twice


def test_dequantized_group_is_bit_identical_to_bitsandbytes_fallback():
    mods = group(fused=False, bias=True)
    assert {nf4_route(m) for m in mods} == {"dequant"}
    with torch.inference_mode():
        refs = [torch.cat([m(x) for m in mods], dim=1) for x in inputs()]  # dequantizes on every call
        assert not getattr(mods[0].weight.quant_state, "packing_format_for_cpu", False)
        dq = DequantizedNF4(mods)
        for x, ref in zip(inputs(), refs):
            assert torch.equal(dq(x), ref)
    assert dq.extra_bytes == sum(i * o for i, o in SHAPES) * 4 == DequantizedNF4.bytes_for(mods)


def test_builder_keeps_the_dequant_copies_within_budget():
    groups = [group(fused=False), [nf4_linear(64, 64, seed=9, fused=False)]]
    budget = DequantizedNF4.bytes_for(groups[0])  # room for the first group only
    builder = GroupBuilder(budget, torch.float32, nf4_kernel_rows=0)
    built = [builder.build(g) for g in groups]
    assert [type(b) for b in built] == [DequantizedNF4, ModuleGroup]
    assert builder.routes == {"nf4-dequant": 1, "modules": 1}
    assert builder.extra_bytes == budget and builder.past_budget == 1
    assert "1 NF4 groups past --dequant-memory" in builder.describe()
    with torch.inference_mode():
        for g, b in zip(groups, built):
            x = inputs()[2]
            assert torch.equal(b(x), torch.cat([m(x) for m in g], dim=1))
    assert isinstance(GroupBuilder(0, torch.float32, 0).build(group(fused=False)), ModuleGroup)  # 0 disables


@needs_kernel
def test_kernel_group_matches_the_modules_and_hands_wide_batches_on(monkeypatch):
    mods = group(fused=False, bias=True)
    with torch.inference_mode():
        refs = [torch.cat([m(x) for m in mods], dim=1) for x in inputs()]  # bitsandbytes' fallback
        builder = GroupBuilder(DequantizedNF4.bytes_for(mods), torch.float32, nf4_kernel_rows=16)
        kernel = builder.build(mods)
        assert isinstance(kernel, KernelNF4) and isinstance(kernel.wide, DequantizedNF4)
        assert builder.routes == {"nf4-kernel": 1}
        assert "AVX2 kernel up to 16 rows" in builder.describe()
        calls = []
        real = nf4_cpu.nf4_matmul
        monkeypatch.setattr(nf4_cpu, "nf4_matmul", lambda *args: calls.append(args[0].shape[0]) or real(*args))
        for x, ref in zip(inputs(), refs):  # 1, 3 and 16 rows: the kernel; 33: the fp32 copy
            got = kernel(x)
            if x.shape[0] > 16:
                assert torch.equal(got, ref)
            else:
                assert ((got - ref).abs().max() / ref.abs().max()).item() < 2e-6
            # the modules now read views of the concatenated weight and still compute the same
            assert torch.equal(torch.cat([m(x) for m in mods], dim=1), ref)
        assert calls == [1, 3, 16]  # the kernel ran for the small batches, not the copy
    assert all(shares_storage(m.weight, kernel.weight) for m in mods)  # no byte held twice
    assert kernel.extra_bytes == kernel.absmax.numel() * 4 + DequantizedNF4.bytes_for(mods)
    # past the copies' budget: the kernel at every batch size (not bitsandbytes' per-call dequantization)
    mods = group(fused=False)
    builder = GroupBuilder(0, torch.float32, nf4_kernel_rows=4)
    past = builder.build(mods)
    assert isinstance(past, KernelNF4) and past.wide is None and past.route == "nf4-kernel-all"
    assert builder.past_budget == 0 and "at every batch size" in builder.describe()
    with torch.inference_mode():
        x = inputs()[3]  # 33 rows
        ref = torch.cat([m(x) for m in mods], dim=1)
        got = past(x)
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 2e-6 and not torch.equal(got, ref)
    assert isinstance(GroupBuilder(0, torch.float32, nf4_kernel_rows=0).build(group(fused=False)), ModuleGroup)


def test_dense_group_concatenates_without_copying():
    torch.manual_seed(0)
    mods = [torch.nn.Linear(64, o, bias=False) for _, o in SHAPES]
    x = inputs()[2]
    with torch.no_grad():
        ref = torch.cat([m(x) for m in mods], dim=1)
        dense = DenseGroup(mods)
        assert torch.equal(dense(x), ref)
        assert torch.equal(torch.cat([m(x) for m in mods], dim=1), ref)
    assert all(shares_storage(m.weight, dense.weight) for m in mods)  # views: no byte held twice
    assert dense.extra_bytes == 0


def test_route_follows_lorad_cpu_isa(monkeypatch):
    """LORAD_CPU_ISA=avx2 makes bitsandbytes build modules that take the AVX2 fallback."""
    from lorad import cpu_features

    # monkeypatch records the originals, so the patch below is undone after the test
    monkeypatch.setattr(bnb.functional, "has_avx512bf16", bnb.functional.has_avx512bf16)
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", bnb.nn.modules.has_avx512bf16)
    monkeypatch.setenv(cpu_features.ISA_ENV, "avx2")
    cpu_features.hold_bitsandbytes_to_isa()
    lin = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    assert lin.support_avx512bf16_for_cpu is False
    features = CpuFeatures("test CPU", frozenset({"avx2", "avx512f", "avx512_bf16"}), "AVX512", "avx2")
    assert not features.native_bf16 and features.path == "avx2"
    monkeypatch.setenv(cpu_features.ISA_ENV, "sse")
    with pytest.raises(ValueError, match="LORAD_CPU_ISA='sse' is not one of native, avx2"):
        cpu_features.forced_isa()


@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16-cpu", "avx2-cpu"])
def test_logits_head_refines_the_top_tokens_in_fp32(native_bf16):
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 500, bias=False)
    flags = frozenset({"avx2", "avx512f", "avx512_bf16"} if native_bf16 else {"avx2"})
    cpu = CpuFeatures("test CPU", flags, "AVX512" if native_bf16 else "AVX2", "native")
    lh = LogitsHead(head, quantized=True, cpu=cpu, device=torch.device("cpu"))
    assert lh.dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    assert (lh.single is None) == native_bf16  # the fp16 single-row copy is the AVX2 route's
    h = torch.randn(4, 64) * 3
    with torch.no_grad():
        exact = head(h)
        for rows in (h[:1], h):
            got = lh(rows)
            ref = exact[: len(rows)]
            assert got.dtype == torch.float32 and got.shape == ref.shape
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
            top = ref.topk(lh.REFINE // 2, dim=-1).indices  # well inside the refined set
            assert torch.allclose(got.gather(1, top), ref.gather(1, top), rtol=0, atol=1e-5)
            coarse = (got - ref).abs().max().item()
            assert coarse < 0.1, f"16-bit logits off by {coarse}"
    plain = LogitsHead(head, quantized=False, cpu=cpu, device=torch.device("cpu"))
    assert plain.dtype == torch.float32 and plain.single is None  # fp32 throughout, only reordered
    with torch.no_grad():
        assert torch.allclose(plain(h), head(h), rtol=0, atol=1e-5)
        assert torch.equal(plain(h).argmax(-1), head(h).argmax(-1))


@pytest.mark.parametrize("kernel_rows", [0, pytest.param(16, marks=needs_kernel)], ids=["fp32-copies", "nf4-kernel"])
def test_engine_on_the_avx2_route_matches_transformers(tmp_path, tokenizer, monkeypatch, kernel_rows):
    """A tiny Llama quantized to NF4 with the AVX2 route forced: the engine (dequantized copies or
    lorad's NF4 kernel, fused q/k/v and gate/up, fp16 logits head refined in fp32) gives HF
    generate's greedy tokens."""
    from lorad import cpu_features
    from lorad.base_model import BaseModelConfig, load_base
    from lorad.server.config import EngineConfig
    from lorad.server.engine import Engine
    from lorad.server.sampling import SamplingParams
    from lorad.testing import tiny_llama

    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    monkeypatch.setattr(bnb.functional, "has_avx512bf16", bnb.functional.has_avx512bf16)
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", bnb.nn.modules.has_avx512bf16)
    monkeypatch.setenv(cpu_features.ISA_ENV, "avx2")
    cpu_features.detect.cache_clear()
    try:
        base = load_base(BaseModelConfig(name=str(tmp_path / "tiny"), quant="nf4", device="cpu"))
        engine = Engine(base, EngineConfig(max_seq_len=64, max_batch_size=2, threads=1, nf4_kernel_rows=kernel_rows))
        expected = "NF4 through lorad's AVX2 kernel" if kernel_rows else "NF4 dequantized once to fp32"
        assert engine.runner.route.startswith(expected), engine.runner.route
        assert "lm_head fp16 for one row" in engine.runner.route
        prompt = engine.encode(prompt="The capital of France is")
        with engine:
            got = engine.generate(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True)).token_ids
        with torch.no_grad():
            ref = base.model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert got == ref
    finally:
        cpu_features.detect.cache_clear()


@pytest.mark.parametrize("route", [pytest.param("fused", marks=needs_fused), pytest.param("kernel", marks=needs_kernel)])
def test_ctypes_groups_trace_under_torch_compile(route):
    """Both NF4 kernels are ctypes calls: torch.compile sees each as one custom op
    (lorad::nf4_fused_linear, lorad::nf4_kernel_linear)."""
    built = FusedNF4(group(fused=True)) if route == "fused" else KernelNF4(group(fused=False), None, None)
    x = inputs()[2]
    with torch.no_grad():
        eager = built(x)
        torch._dynamo.reset()
        try:
            compiled = torch.compile(lambda t: built(t) * 2, backend="aot_eager", fullgraph=True)(x)
        finally:
            torch._dynamo.reset()
    assert torch.equal(compiled, eager * 2)
