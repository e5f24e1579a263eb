"""The PyTorch twin of the multi-adapter LoRA ops against an fp64 token loop, argument checks,
the dispatcher, and the driver that runs the Triton grid (test_lora_triton.py) through the
interpreter in a subprocess, so TRITON_INTERPRET=1 never leaks into this process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from lora_cases import (
    POPULARITIES,
    assert_matches_reference,
    contract_loop,
    contract_shrink,
    make_problem,
    make_slots,
    reference,
    widen,
)
from lorad.kernels import add_lora, build_lora_meta, lora_expand, lora_shrink, resolve_backend
from lorad.kernels import lora_cpu, lora_ops_torch
from lorad.kernels.lora_ops_torch import lora_expand_torch, lora_shrink_torch

TESTS = Path(__file__).resolve().parent
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_twin(p, num_slots, out=None):
    meta = build_lora_meta(p.slots, num_slots)
    v = lora_shrink_torch(p.x, p.lora_a, meta, out)
    y = p.y0.clone()
    lora_expand_torch(y, v, p.lora_b, p.scale, meta)
    return meta, v, y


def check_twin(p, num_slots, dtype):
    meta, v, y = run_twin(p, num_slots)
    v_ref, y_ref = reference(p)
    lora_rows = [t for t, s in enumerate(p.slots) if s != -1]
    base_rows = [t for t, s in enumerate(p.slots) if s == -1]
    assert torch.equal(y[base_rows], p.y0[base_rows]), "rows with slot -1 changed"
    if lora_rows:
        assert (y_ref[lora_rows] - p.y0[lora_rows].double()).abs().max() > 0.1, "vacuous case: delta is ~0"
        # v is fp32 from inputs in `dtype`; its baseline is the contract run literally, not the twin
        assert_matches_reference("v", v, contract_shrink(p), v_ref, lora_rows, dtype)
    assert_matches_reference("y", y, contract_loop(p), y_ref, lora_rows, dtype)
    return meta


# --- the twin's four strategies ---------------------------------------------------------------

STRATEGIES = {
    # name: (slots, padded bmm?, expected meta.pad_identity, expected meta.grouped_contiguous)
    "padded_identity": ([0, 0, 1, 1, 2, 2], True, True, True),
    "padded_identity_offset": ([-1, 3, 3, 4, 4], True, True, True),
    "padded_gather": ([2, 0, 1, 0, 2, 1, -1], True, False, False),
    "padded_gather_slot_gap": ([1, 1, 3, 3], True, False, True),  # empty slot 2 is padded
    "padded_gather_uneven": ([0] + [2] * 9 + [-1], True, False, True),  # pads in slots 0 and 1
    "segments_contiguous": ([-1, 0] + [1] * 20 + [3] * 2, False, False, True),
    "segments_index": ([1] * 10 + [-1, 0] + [1] * 10, False, False, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", STRATEGIES)
def test_twin_strategies_match_reference(case, dtype, monkeypatch):
    slots, padded, identity, contiguous = STRATEGIES[case]
    # Force the strategy: the choice between them is a speed threshold that may move.
    monkeypatch.setattr(lora_ops_torch, "use_padded", lambda meta: padded)
    p = make_problem(slots, 6, 96, 80, 8, dtype, seed=1)
    meta = check_twin(p, 6, dtype)
    # The case really exercises the code path it is named after.
    assert (meta.pad_identity, meta.grouped_contiguous) == (identity, contiguous)


def _ragged(counts, shuffle=False):
    slots = [s for s, c in enumerate(counts) for _ in range(c)]
    if shuffle:
        slots = [slots[i] for i in torch.randperm(len(slots), generator=torch.Generator().manual_seed(0)).tolist()]
    return slots


@pytest.mark.parametrize("slots, padded", [
    (_ragged([2] * 8), True),  # decode, grouped: the bmm on views
    (_ragged([2] * 8, shuffle=True), True),  # decode, shuffled: one gathered bmm beats 8 indexed mms
    (_ragged([9] + [1] * 7), True),  # decode, skewed: padding 4.5x is still cheaper than 8 mms
    (_ragged([64, 64, 63, 63]), False),  # prefill, grouped but ragged: 4 mms on slices, no gathers
    (_ragged([121, 62, 41, 32]), False),  # zipf prefill: padding ~2x the tokens
    (_ragged([1, 255]), False),  # skewed prefill
], ids=["decode", "decode_shuffled", "decode_skewed", "prefill_ragged", "prefill_zipf", "prefill_skewed"])
def test_twin_strategy_choice(slots, padded):
    """The cost model picks the strategy the CPU sweep measured faster (benchmarks/bench_lora_cpu.py)."""
    assert lora_ops_torch.use_padded(build_lora_meta(slots, 16)) is padded


@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("num_slots", [1, 4, 32])
def test_twin_popularity_grid(popularity, num_tokens, num_slots):
    slots = make_slots(popularity, num_tokens, num_slots, seed=num_tokens)
    p = make_problem(slots, num_slots, 64, 72, [1, 8, 16, 64], torch.float32, seed=2)
    check_twin(p, num_slots, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("hidden", [576, 2049])
def test_twin_hidden_sizes(hidden, dtype):
    slots = make_slots("mixed_base", 7, 4, seed=3)
    p = make_problem(slots, 4, hidden, hidden, 16, dtype, seed=3)
    check_twin(p, 4, dtype)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "segments"])
def test_twin_accepts_a_rank_slice_of_a_wider_pool(padded, monkeypatch):
    """The engine passes pool[:, :r] when every adapter of a batch has rank <= r."""
    monkeypatch.setattr(lora_ops_torch, "use_padded", lambda meta: padded)
    p = make_problem([0, 0, 2, 2, -1, 1], 3, 64, 48, [2, 4], torch.float32, seed=4)
    wide_a, wide_b = widen(p, 16)
    sliced_a, sliced_b = wide_a[:, :4], wide_b[:, :4]
    assert not sliced_a.is_contiguous()
    meta = build_lora_meta(p.slots, 3)
    y = p.y0.clone()
    lora_expand_torch(y, lora_shrink_torch(p.x, sliced_a, meta), sliced_b, p.scale, meta)
    y_wide = p.y0.clone()
    lora_expand_torch(y_wide, lora_shrink_torch(p.x, wide_a, meta), wide_b, p.scale, meta)
    _, y_ref = reference(p)
    assert torch.allclose(y, y_wide, atol=1e-5)
    assert (y.double() - y_ref).abs().max() < 1e-4


def test_pools_whose_slots_are_not_row_major_are_refused():
    p = make_problem([0, 1], 2, 32, 32, 4, torch.float32)
    wide = torch.zeros(2, 4, 64)
    wide[:, :, :32] = p.lora_a
    with pytest.raises(ValueError, match="lora_a: every slot must be a row-major"):
        lora_shrink_torch(p.x, wide[:, :, :32], build_lora_meta(p.slots, 2))


def test_twin_writes_into_out_buffer():
    p = make_problem([1, 0, 1], 2, 32, 40, 4, torch.float32)
    out = torch.full((3, 4), float("nan"))
    _, v, _ = run_twin(p, 2, out=out)
    assert v is out
    assert torch.allclose(out, reference(p)[0].float(), atol=1e-5)


def test_all_base_batch_leaves_y_bit_identical_after_a_lora_batch():
    p = make_problem([0, 1, 2, 1], 3, 48, 40, 8, torch.float16)
    _, v, y = run_twin(p, 3)
    assert not torch.equal(y, p.y0)  # the first batch did change y
    meta = build_lora_meta([-1] * 4, 3)
    assert meta.no_lora
    y_before = y.clone()
    v2 = lora_shrink(p.x, p.lora_a, meta, out=v)
    lora_expand(y, v2, p.lora_b, p.scale, meta)
    assert torch.equal(y, y_before)


# --- argument checks ----------------------------------------------------------------------------


def _args(dtype=torch.float32):
    p = make_problem([0, -1, 1], 2, 16, 24, 4, dtype)
    meta = build_lora_meta(p.slots, 2)
    v = torch.zeros(3, 4)
    return p, meta, v


SHRINK_BAD = {
    "x 3-D": (lambda p, m, v: dict(x=p.x[None]), "x must be [T, H_in]"),
    "lora_a 2-D": (lambda p, m, v: dict(lora_a=p.lora_a[0]), "lora_a must be [S, R, H_in]"),
    "x int": (lambda p, m, v: dict(x=p.x.int(), lora_a=p.lora_a.int()), "x dtype"),
    "lora_a dtype": (lambda p, m, v: dict(lora_a=p.lora_a.half()), "lora_a dtype"),
    "lora_a in-features": (lambda p, m, v: dict(lora_a=p.lora_a[:, :, :8].contiguous()), "lora_a in-features"),
    "x tokens": (lambda p, m, v: dict(x=p.x[:2]), "x has 2 tokens"),
    "x strided": (lambda p, m, v: dict(x=torch.randn(16, 3).t()), "x must be contiguous"),
    "lora_a slots": (lambda p, m, v: dict(lora_a=p.lora_a[:1].contiguous()), "meta uses slot 1"),
    "out shape": (lambda p, m, v: dict(out=torch.zeros(3, 5)), "out must be [T, R]"),
    "out dtype": (lambda p, m, v: dict(out=v.half()), "out must be float32"),
    "meta device": (lambda p, m, v: dict(meta=build_lora_meta(p.slots, 2, device="meta")), "meta was built on meta"),
}

EXPAND_BAD = {
    "y 1-D": (lambda p, m, v: dict(y=p.y0[0]), "y must be [T, H_out]"),
    "v dtype": (lambda p, m, v: dict(v=v.half()), "v must be float32"),
    "v shape": (lambda p, m, v: dict(v=torch.zeros(3, 5)), "v must be [T, R]"),
    "lora_b dtype": (lambda p, m, v: dict(lora_b=p.lora_b.double()), "lora_b dtype"),
    "lora_b out-features": (lambda p, m, v: dict(lora_b=p.lora_b[:, :, :8].contiguous()), "lora_b out-features"),
    "scale shape": (lambda p, m, v: dict(scale=torch.ones(3)), "scale must be [S]"),
    "scale dtype": (lambda p, m, v: dict(scale=torch.ones(2, dtype=torch.float64)), "scale must be float32"),
    "y tokens": (lambda p, m, v: dict(y=p.y0[:2], v=v[:2]), "y has 2 tokens"),
    "y strided": (lambda p, m, v: dict(y=torch.randn(24, 3).t()), "y must be contiguous"),
    "lora_b slots": (lambda p, m, v: dict(lora_b=p.lora_b[:1].contiguous(), scale=torch.ones(1)), "meta uses slot 1"),
}


@pytest.mark.parametrize("case", SHRINK_BAD)
def test_shrink_rejects_bad_argument(case):
    p, meta, v = _args()
    make, message = SHRINK_BAD[case]
    kwargs = dict(x=p.x, lora_a=p.lora_a, meta=meta, out=None) | make(p, meta, v)
    with pytest.raises(ValueError, match=re.escape(message)):
        lora_shrink(**kwargs, backend="torch")


@pytest.mark.parametrize("case", EXPAND_BAD)
def test_expand_rejects_bad_argument(case):
    p, meta, v = _args()
    make, message = EXPAND_BAD[case]
    kwargs = dict(y=p.y0.clone(), v=v, lora_b=p.lora_b, scale=p.scale, meta=meta) | make(p, meta, v)
    with pytest.raises(ValueError, match=re.escape(message)):
        lora_expand(**kwargs, backend="torch")


@pytest.mark.parametrize("slots, message", [([0, 2], r"\[-1, 2\)"), ([-2], r"\[-1, 2\)"), ([[0]], "1-D")])
def test_build_lora_meta_rejects_bad_slots(slots, message):
    with pytest.raises(ValueError, match=message):
        build_lora_meta(torch.tensor(slots), 2)


# --- dispatcher -------------------------------------------------------------------------------


def test_resolve_backend(monkeypatch):
    monkeypatch.delenv("LORAD_LORA_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert resolve_backend(cpu) == ("cpu" if lora_cpu.available() else "torch")  # tests/test_lora_cpu.py
    assert resolve_backend(cpu, "torch") == "torch"
    with pytest.raises(ValueError, match="'cuda' is not one of"):
        resolve_backend(cpu, "cuda")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend(cpu, "triton")
    monkeypatch.setenv("LORAD_LORA_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend(cpu)
    assert resolve_backend(cpu, "torch") == "torch"  # an explicit argument beats the variable


# --- the Triton grid, through the interpreter ----------------------------------------------------

# The grid is sized to run in about half of this on a 2-core machine; the child is killed at
# twice the budget (a timing assertion would be flaky on a shared machine, a hang would not).
INTERPRETER_BUDGET_S = 180


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already inside the interpreter run")
def test_triton_grid_in_interpreter(tmp_path):
    """Run test_lora_triton.py under TRITON_INTERPRET=1 in a child process; all of it must pass.

    The child gets the variable before anything imports triton (torch and bitsandbytes can), and
    this process never sees it. Only tests that need a real CUDA device may be skipped there.
    """
    report = tmp_path / "report.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("LORAD_LORA_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
           "--rootdir", str(TESTS.parent), str(TESTS / "test_lora_triton.py")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=TESTS.parent, capture_output=True, text=True,
                          timeout=2 * INTERPRETER_BUDGET_S)
    elapsed = time.perf_counter() - start
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter grid failed (rc {proc.returncode}):\n{tail}"
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    ran = int(suite.get("tests")) - int(suite.get("skipped"))
    assert ran >= 100, f"only {ran} interpreter tests ran:\n{tail}"
    for case in suite.iter("testcase"):
        skipped = case.find("skipped")
        if skipped is not None:
            assert "CUDA" in (skipped.get("message") or ""), f"{case.get('name')} skipped: {skipped.get('message')}"
    print(f"interpreter grid: {ran} tests in {elapsed:.0f} s")


# --- DoRA (stretch): the expand epilogue's per-output-row scale ---------------------------------


def test_dora_expand_matches_peft_mixed_batch():
    """Two DoRA adapters and a base row in one batch == PEFT's own DoRA layer, row by row."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    from lorad.kernels import lora_expand_dora
    from lorad.kernels.dora import dora_row_scale

    torch.manual_seed(0)
    h_in, h_out, ranks = 48, 40, {"a0": 4, "a1": 8}
    base = torch.nn.Linear(h_in, h_out, bias=False)
    layer = None
    for name, r in ranks.items():
        config = LoraConfig(r=r, lora_alpha=2 * r, use_dora=True, init_lora_weights=False)
        if layer is None:
            layer = LoraLinear(base, name, config, r=r, lora_alpha=2 * r)
        else:
            layer.update_layer(name, r, 2 * r, config)
        with torch.no_grad():  # PEFT starts m at the norm (g == 1): move it so the scale matters
            layer.lora_magnitude_vector[name].weight.mul_(torch.rand(h_out) + 0.5)
    layer.eval()

    R, S = max(ranks.values()), len(ranks)
    lora_a, lora_b = torch.zeros(S, R, h_in), torch.zeros(S, R, h_out)
    scale, g = torch.zeros(S), torch.zeros(S, h_out)
    for s, (name, r) in enumerate(ranks.items()):
        a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
        lora_a[s, :r], lora_b[s, :r] = a, b.T
        scale[s] = layer.scaling[name]
        g[s] = dora_row_scale(base.weight.detach(), a, b, layer.scaling[name],
                              layer.lora_magnitude_vector[name].weight.detach())
    assert (g - 1).abs().max() > 0.1

    names = ["a1", "__base__", "a0", "a0", "a1"]
    slots = [list(ranks).index(n) if n in ranks else -1 for n in names]
    x = torch.randn(len(names), h_in)
    expected = torch.empty(len(names), h_out)
    with torch.no_grad():  # PEFT refuses mixed batches with DoRA: each row with its adapter alone
        for t, name in enumerate(names):
            if name == "__base__":
                expected[t] = base(x[t : t + 1])[0]
            else:
                layer.set_adapter(name)
                expected[t] = layer(x[t : t + 1])[0]
        y = base(x)
    y_base = y.clone()
    meta = build_lora_meta(slots, S)
    lora_expand_dora(y, lora_shrink(x, lora_a, meta), lora_b, scale, g, meta)
    assert torch.equal(y[1], y_base[1])  # the base row is untouched
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_dora_expand_rejects_bad_scale():
    from lorad.kernels import lora_expand_dora

    p, meta, v = _args()
    for bad, message in [(torch.ones(2, 23), "dora_scale must be [S, H_out]"),
                         (torch.ones(2, 24, dtype=torch.float16), "dora_scale must be float32")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            lora_expand_dora(p.y0.clone(), v, p.lora_b, p.scale, bad, meta, backend="torch")


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "segments"])
def test_expand_never_reads_the_unspecified_v_rows_of_base_tokens(padded, monkeypatch):
    """Rows of v for slot -1 tokens are unspecified; expand must not let them reach y (0 * NaN)."""
    monkeypatch.setattr(lora_ops_torch, "use_padded", lambda meta: padded)
    slots = [-1, 0, 0, 2]  # token 0 is base-only; slot 0 and 2 segments differ in length: pads
    p = make_problem(slots, 3, 32, 24, 4, torch.float32, seed=5)
    meta = build_lora_meta(slots, 3)
    v = lora_shrink_torch(p.x, p.lora_a, meta)
    v[0] = float("nan")  # what an uninitialised row may hold
    y = p.y0.clone()
    lora_expand_torch(y, v, p.lora_b, p.scale, meta)
    assert torch.equal(y[0], p.y0[0])
    _, y_ref = reference(p)
    assert (y.double() - y_ref).abs().max() < 1e-4


# --- isolation: a slot's values reach only its own tokens -------------------------------------

POISONS = {
    "nan_scale": lambda p, s: p.scale.__setitem__(s, float("nan")),
    "inf_scale": lambda p, s: p.scale.__setitem__(s, float("inf")),
    "inf_in_b": lambda p, s: p.lora_b[s].__setitem__((0, 3), float("inf")),
    "nan_in_b": lambda p, s: p.lora_b[s].__setitem__((1, 0), float("nan")),
    "inf_in_a": lambda p, s: p.lora_a[s].__setitem__((0, 5), float("inf")),
    "huge_b": lambda p, s: p.lora_b[s].fill_(3e38),
}


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("case, poisoned", [
    ("unused_slot_between_used_ones", 1),  # slots 0 and 2 in use: the padded range spans slot 1
    ("used_slot_with_pads", 2),  # slot 2's segment is shorter than slot 0's: it has pad positions
], ids=["unused_gap", "padded_used"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "segments"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_slots_values_never_reach_another_slots_tokens(case, poisoned, poison, padded, dtype, monkeypatch):
    """NaN scale, Inf/NaN/huge weights in one slot (in use or not): every token of another slot,
    and every base token, comes out bit-identical to a run without the poison (0 * NaN = NaN
    must not travel through padding)."""
    monkeypatch.setattr(lora_ops_torch, "use_padded", lambda meta: padded)
    slots = [0, 0, 0, -1, 2, 2] if case == "used_slot_with_pads" else [0, 0, -1, 2, 2]
    clean = make_problem(slots, 4, 32, 24, 4, dtype, seed=6)
    dirty = make_problem(slots, 4, 32, 24, 4, dtype, seed=6)
    POISONS[poison](dirty, poisoned)
    meta = build_lora_meta(slots, 4)
    assert (meta.pad_identity, meta.n_range) == (False, 3)  # the padded layout has pads here
    outs = []
    for p in (clean, dirty):
        y = p.y0.clone()
        add_lora(y, p.x, p.lora_a, p.lora_b, p.scale, meta, backend="torch")
        outs.append(y)
    others = [t for t, s in enumerate(slots) if s != poisoned]
    assert torch.equal(outs[1][others], outs[0][others])
    assert torch.isfinite(outs[0]).all()


@pytest.mark.parametrize("into", ["column_slice", "whole"])
@pytest.mark.parametrize("adapters, tokens_each", [(4, 2), (8, 1), (5, 4), (2, 8), (1, 16)])
def test_add_lora_decode_layout_both_operand_orders(adapters, tokens_each, into):
    """add_lora's fast path for equal segments (decode) computes the shrink as x @ A^T or, with
    a few tokens over many adapters, as A @ x^T, and the expand as one baddbmm_ into a contiguous
    y or a bmm and an add into a column slice of a wider output (as the engine passes q/k/v and
    gate/up): every combination must match the reference."""
    slots = [s for s in range(adapters) for _ in range(tokens_each)]
    p = make_problem(slots, adapters, 64, 40, 8, torch.float32, seed=11)
    meta = build_lora_meta(slots, adapters)
    assert meta.pad_identity
    wide = torch.cat([torch.zeros_like(p.y0), p.y0], dim=1)
    y = wide[:, 40:] if into == "column_slice" else p.y0.clone()
    assert y.is_contiguous() == (into == "whole")
    add_lora(y, p.x, p.lora_a, p.lora_b, p.scale, meta, backend="torch")
    _, y_ref = reference(p)
    assert (y.double() - y_ref).abs().max() < 1e-4
    if into == "column_slice":
        assert torch.equal(wide[:, :40], torch.zeros_like(p.y0))  # the other columns untouched
