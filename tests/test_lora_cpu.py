"""The "cpu" LoRA backend (kernels/lora_cpu.py, lora_cpu.c): add_lora's fp32 decode layout in C,
against the fp64 token loop of tests/lora_cases.py and the twin; every other layout must reach
the twin; the dispatcher picks it on the CPU where it builds."""

from __future__ import annotations

import pytest
import torch

from lora_cases import make_problem, reference
from lorad.kernels import add_lora, build_lora_meta, lora_cpu, resolve_backend
from lorad.kernels.lora_ops_torch import add_lora_torch
from lorad.kernels.native_build import NativeKernel

pytestmark = pytest.mark.skipif(not lora_cpu.available(),
                                reason=f"LoRA CPU kernel unavailable: {lora_cpu.unavailable_reason()}")


def refuse_twin(monkeypatch):
    def twin(*args):
        raise AssertionError("the decode layout went to the twin, not the C kernel")

    monkeypatch.setattr(lora_cpu, "add_lora_torch", twin)


@pytest.mark.parametrize("adapters", [1, 3, 8])
@pytest.mark.parametrize("tokens_each", [1, 2, 3, 17])  # pairs, a lone token, more than one 16-token chunk
@pytest.mark.parametrize("into", ["whole", "column_slice"])
def test_decode_layout_matches_the_reference(adapters, tokens_each, into, monkeypatch):
    slots = [s for s in range(adapters) for _ in range(tokens_each)]
    # 70 inputs and 45 outputs: remainders after the 8-wide and 32-wide vector loops
    p = make_problem(slots, adapters, 70, 45, [8, 3, 16], torch.float32, seed=adapters * 100 + tokens_each)
    meta = build_lora_meta(slots, adapters)
    assert meta.pad_identity
    wide = torch.cat([torch.zeros_like(p.y0), p.y0], dim=1)
    y = wide[:, 45:] if into == "column_slice" else p.y0.clone()
    twin = p.y0.clone()
    add_lora_torch(twin, p.x, p.lora_a, p.lora_b, p.scale, meta)
    refuse_twin(monkeypatch)
    add_lora(y, p.x, p.lora_a, p.lora_b, p.scale, meta, backend="cpu")
    _, y_ref = reference(p)
    assert (y_ref - p.y0.double()).abs().max() > 0.1  # not vacuous
    assert (y.double() - y_ref).abs().max() < 1e-4
    assert (y - twin).abs().max() < 1e-4
    if into == "column_slice":
        assert torch.equal(wide[:, :45], torch.zeros_like(p.y0))  # the other columns untouched


def test_offsets_rank_slices_and_threads(monkeypatch):
    """Base rows before the LoRA rows (pad_first > 0), slots starting above 0 (slot_lo), and a
    rank slice of a wider pool (the engine's rank_slice): strides the kernel must follow."""
    slots = [-1, -1, 2, 2, 3, 3, 4, 4]
    p = make_problem(slots, 6, 64, 96, 8, torch.float32, seed=5)
    meta = build_lora_meta(slots, 6)
    assert meta.pad_identity and meta.pad_first == 2 and meta.slot_lo == 2
    wide_a = torch.zeros(6, 32, 64)
    wide_b = torch.zeros(6, 32, 96)
    wide_a[:, :8], wide_b[:, :8] = p.lora_a, p.lora_b
    a, b = wide_a[:, :8], wide_b[:, :8]
    assert not a.is_contiguous()
    _, y_ref = reference(p)
    refuse_twin(monkeypatch)
    for threads in (1, 2):
        y = p.y0.clone()
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        add_lora(y, p.x, a, b, p.scale, meta, backend="cpu")
        assert (y.double() - y_ref).abs().max() < 1e-4
        assert torch.equal(y[:2], p.y0[:2])  # base rows untouched


def test_other_layouts_and_dtypes_go_to_the_twin(monkeypatch):
    calls = []
    monkeypatch.setattr(lora_cpu, "add_lora_torch", lambda *args: calls.append(args))
    uneven = [0, 0, 0, 1]  # unequal segments: not the decode layout
    p = make_problem(uneven, 2, 64, 40, 8, torch.float32)
    meta = build_lora_meta(uneven, 2)
    assert not meta.pad_identity
    add_lora(p.y0.clone(), p.x, p.lora_a, p.lora_b, p.scale, meta, backend="cpu")
    even = [0, 0, 1, 1]
    q = make_problem(even, 2, 64, 40, 8, torch.bfloat16)
    add_lora(q.y0.clone(), q.x, q.lora_a, q.lora_b, q.scale, build_lora_meta(even, 2), backend="cpu")
    assert len(calls) == 2


def test_auto_picks_the_cpu_kernel_and_an_unbuildable_one_says_why(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAD_LORA_BACKEND", raising=False)
    assert resolve_backend(torch.device("cpu")) == "cpu"
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails, on a source not built before
    monkeypatch.setattr(lora_cpu, "_KERNEL", NativeKernel(tmp_path / "k.c", "f", []))
    (tmp_path / "k.c").write_text("int f(void) { return 0; }\n")
    assert resolve_backend(torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="false failed to build k.c"):
        resolve_backend(torch.device("cpu"), "cpu")


def test_traces_under_torch_compile_as_the_same_kernel():
    """In a traced step add_lora (backend auto) is the custom op lorad::add_lora running the same
    C kernel as eager calls: bit-identical results."""
    slots = [0, 0, 1, 1, 2, 2]
    p = make_problem(slots, 3, 64, 48, 8, torch.float32, seed=9)
    meta = build_lora_meta(slots, 3)
    assert meta.pad_identity and resolve_backend(torch.device("cpu")) == "cpu"

    def step(y, x):
        wide = torch.cat([y, y], dim=1) * 2
        add_lora(wide[:, 48:], x, p.lora_a, p.lora_b, p.scale, meta)
        return wide + 1

    eager = step(p.y0.clone(), p.x)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(p.y0.clone(), p.x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, eager)
    assert not torch.equal(eager[:, 48:], eager[:, :48])  # the LoRA changed its half
