"""The Triton LoRA kernels against an fp64 token loop, with the PyTorch twin as the yardstick:
err(kernel) <= 2 * err(twin) + atol, both measured against the reference.

Runs natively on CUDA; on CPU only through Triton's interpreter, which must be switched on
before triton is first imported, so test_lora_ops.py::test_triton_grid_in_interpreter runs this
file in a TRITON_INTERPRET=1 child process. Run it by hand with:

    TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_lora_triton.py

The grid is split into verticals (hidden sizes; ranks; slots x tokens x popularity; dtypes;
tile shapes) instead of one product, to stay within a few minutes in the interpreter.
"""

from __future__ import annotations

import dataclasses
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "CPU without TRITON_INTERPRET=1: run by test_lora_ops.py::test_triton_grid_in_interpreter",
        allow_module_level=True,
    )

from lora_cases import (  # noqa: E402
    POPULARITIES,
    assert_matches_reference,
    contract_loop,
    contract_shrink,
    make_problem,
    make_slots,
    reference,
    widen,
)
from lorad.kernels import build_lora_meta, lora_expand, lora_shrink  # noqa: E402
from lorad.kernels.kernel_utils import LaunchConfig  # noqa: E402
from lorad.kernels.lora_ops_torch import lora_expand_torch, lora_shrink_torch  # noqa: E402
from lorad.kernels.lora_ops_triton import lora_expand_triton, lora_shrink_triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def to_device(p):
    for f in ("x", "lora_a", "lora_b", "scale", "y0"):
        setattr(p, f, getattr(p, f).to(DEVICE))
    return p


def check_kernels(p, num_slots, dtype, shrink_cfg=None, expand_cfg=None):
    """Run kernels and twin on one problem; compare both to the reference. Returns y."""
    v_ref, y_ref = reference(p)
    v_contract, y_contract = contract_shrink(p), contract_loop(p)  # on the CPU, before the move
    p = to_device(p)
    meta = build_lora_meta(p.slots, num_slots, DEVICE)
    v = lora_shrink_triton(p.x, p.lora_a, meta, config=shrink_cfg)
    y = p.y0.clone()
    lora_expand_triton(y, v, p.lora_b, p.scale, meta, config=expand_cfg)
    v_twin = lora_shrink_torch(p.x, p.lora_a, meta)
    y_twin = p.y0.clone()
    lora_expand_torch(y_twin, v_twin, p.lora_b, p.scale, meta)

    v, y, v_twin, y_twin, y0 = (t.cpu() for t in (v, y, v_twin, y_twin, p.y0))
    lora_rows = [t for t, s in enumerate(p.slots) if s != -1]
    base_rows = [t for t, s in enumerate(p.slots) if s == -1]
    assert torch.equal(y[base_rows], y0[base_rows]), "kernel changed rows whose slot is -1"
    if lora_rows:
        assert (y_ref[lora_rows] - y0[lora_rows].double()).abs().max() > 0.1, "vacuous case: delta is ~0"
    # baselines: the contract run literally (independent of both implementations), and the twin
    assert_matches_reference("shrink v", v, v_contract, v_ref, lora_rows, dtype)
    assert_matches_reference("expand y", y, y_contract, y_ref, lora_rows, dtype)
    assert_matches_reference("expand y vs twin", y, y_twin, y_ref, lora_rows, dtype)
    return y


# --- vertical 1: hidden sizes (non powers of two need the K and N masks) -------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("h_in, h_out", [(64, 64), (576, 1536), (1536, 576), (2049, 2049), (576, 11008)])
def test_hidden_sizes(h_in, h_out, dtype):
    slots = make_slots("mixed_base", 7, 4, seed=h_in)
    check_kernels(make_problem(slots, 4, h_in, h_out, 16, dtype, seed=h_out), 4, dtype)


# --- vertical 2: ranks, and mixed ranks zero-padded in one launch ------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("ranks", [1, 8, 16, 64, [1, 8, 16, 64]], ids=str)
def test_ranks(ranks, dtype):
    slots = make_slots("uniform", 7, 4, seed=5)
    check_kernels(make_problem(slots, 4, 576, 192, ranks, dtype, seed=5), 4, dtype)


# --- vertical 3: slots x tokens x popularity -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("num_slots", [1, 4, 32])
def test_popularity(num_slots, num_tokens, popularity, dtype):
    slots = make_slots(popularity, num_tokens, num_slots, seed=num_tokens * 100 + num_slots)
    check_kernels(make_problem(slots, num_slots, 64, 80, [1, 8, 16, 64], dtype, seed=num_tokens), num_slots, dtype)


# --- vertical 4: bf16 (the interpreter's tl.dot is wrong on bf16 operands; UPCAST fixes it) ----


@pytest.mark.parametrize("h_in, h_out", [(64, 80), (576, 2049)])
@pytest.mark.parametrize("popularity", ["uniform", "skewed"])
def test_bf16(h_in, h_out, popularity):
    slots = make_slots(popularity, 7, 4, seed=7)
    check_kernels(make_problem(slots, 4, h_in, h_out, [8, 16], torch.bfloat16, seed=7), 4, torch.bfloat16)


# --- vertical 5: tile shapes that exercise every loop and split ----------------------------------

TILES = {
    # name: (shrink config, expand config, hidden, ranks)
    "k_loop_with_tail": (LaunchConfig(16, 16, 64), LaunchConfig(16, 64, 16), 2049, 16),
    "split_k": (LaunchConfig(16, 16, 64, split_k=4), None, 576, 16),
    "split_k_uneven": (LaunchConfig(16, 16, 128, split_k=8), None, 576, 8),  # 5 K tiles, 8 splits
    "m_tiles_and_n_tiles": (LaunchConfig(16, 16, 64), LaunchConfig(16, 128, 16), 576, 64),
    "rank_loop": (None, LaunchConfig(16, 64, 16), 64, [1, 64, 40]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", TILES)
def test_tile_shapes(case, dtype):
    shrink_cfg, expand_cfg, hidden, ranks = TILES[case]
    slots = [0] * 3 + [1] * 40 + [-1] * 2 + [2] * 19  # segments longer than a 16-row tile, one short
    p = make_problem(slots, 3, hidden, hidden, ranks, dtype, seed=11)
    check_kernels(p, 3, dtype, shrink_cfg, expand_cfg)


# --- "no adapter": early exits --------------------------------------------------------------


def test_all_base_batch_leaves_y_bit_identical_after_a_lora_batch():
    p = to_device(make_problem([2, 0, 1, 2, 0], 3, 96, 80, 8, torch.float16, seed=3))
    meta = build_lora_meta(p.slots, 3, DEVICE)
    y = p.y0.clone()
    v = lora_shrink_triton(p.x, p.lora_a, meta)
    lora_expand_triton(y, v, p.lora_b, p.scale, meta)
    assert not torch.equal(y, p.y0)

    base_meta = build_lora_meta([-1] * 5, 3, DEVICE)
    y_before = y.clone()
    v2 = lora_shrink_triton(p.x, p.lora_a, base_meta, out=v)  # the stale v of the last batch
    lora_expand_triton(y, v2, p.lora_b, p.scale, base_meta)
    assert torch.equal(y, y_before)


def test_kernel_exits_on_padded_slot_and_empty_segment():
    """A grid padded to a fixed number of adapters (as a CUDA-graph launch would be) with slot -1
    and empty segments: those programs must exit without touching y."""
    p = make_problem([1, 1, -1, 0], 2, 64, 48, 8, torch.float32, seed=4)
    _, y_ref = reference(p)
    p = to_device(p)
    meta = build_lora_meta(p.slots, 2, DEVICE)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    padded = dataclasses.replace(
        meta,
        # sorted ids [3 | 0 1 | 2 | ]: slot 0, slot 1, then a -1 entry whose segment holds the
        # base token 2, then slot 1 again with an empty segment.
        active_slots=torch.cat([meta.active_slots, torch.tensor([-1, 1], **i32)]),
        seg_starts=torch.cat([meta.seg_starts, torch.tensor([4, 4], **i32)]),
        sorted_token_ids=torch.cat([meta.sorted_token_ids, torch.tensor([2], **i32)]),
    )
    assert padded.sorted_token_ids.tolist() == [3, 0, 1, 2] and padded.seg_starts.tolist() == [0, 1, 3, 4, 4]
    y = p.y0.clone()
    v = torch.full((4, 8), float("nan"), device=DEVICE)  # row 2 stays NaN: any read of it shows
    lora_shrink_triton(p.x, p.lora_a, padded, out=v)
    lora_expand_triton(y, v, p.lora_b, p.scale, padded)
    assert torch.equal(y[2], p.y0[2])
    assert torch.allclose(y.double().cpu(), y_ref, atol=1e-5)


# --- through the public ops ---------------------------------------------------------------


def test_dispatcher_runs_triton(monkeypatch):
    p = to_device(make_problem([1, -1, 0, 1], 2, 64, 64, 8, torch.float32, seed=9))
    _, y_ref = reference(p)
    for how in ("argument", "environment"):
        if how == "environment":
            monkeypatch.setenv("LORAD_LORA_BACKEND", "triton")
        backend = "triton" if how == "argument" else None
        meta = build_lora_meta(p.slots, 2, DEVICE)
        y = p.y0.clone()
        v = lora_shrink(p.x, p.lora_a, meta, backend=backend)
        lora_expand(y, v, p.lora_b, p.scale, meta, backend=backend)
        assert torch.allclose(y.double().cpu(), y_ref, atol=1e-5), how


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the dry run uses CPU tensors: interpreter only")
def test_gpu_benchmark_dry_run(monkeypatch, capsys):
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lora_gpu.py"
    monkeypatch.setattr(sys, "argv", [str(bench), "--dry-run"])
    runpy.run_path(str(bench), run_name="__main__")
    out = capsys.readouterr().out
    assert "kernel" in out and "GB/s" in out


# --- CUDA only ----------------------------------------------------------------------------


@needs_cuda
def test_cuda_graph_replay_matches_eager():
    p = to_device(make_problem(make_slots("uniform", 16, 4), 4, 576, 576, 16, torch.float16))
    meta = build_lora_meta(p.slots, 4, DEVICE)
    y_eager = p.y0.clone()
    lora_expand_triton(y_eager, lora_shrink_triton(p.x, p.lora_a, meta), p.lora_b, p.scale, meta)
    y = p.y0.clone()
    v = torch.empty(16, 16, device=DEVICE)
    lora_shrink_triton(p.x, p.lora_a, meta, out=v)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_shrink_triton(p.x, p.lora_a, meta, out=v)
        lora_expand_triton(y, v, p.lora_b, p.scale, meta)
    y.copy_(p.y0)
    graph.replay()
    torch.testing.assert_close(y, y_eager, rtol=0, atol=1e-3)  # split-K atomics may reorder sums


# --- DoRA (stretch) ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("popularity", ["uniform", "mixed_base", "skewed"])
def test_dora_expand(popularity, dtype):
    from lorad.kernels.lora_ops_torch import lora_expand_dora_torch
    from lorad.kernels.lora_ops_triton import lora_expand_dora_triton

    slots = make_slots(popularity, 7, 4, seed=21)
    p = make_problem(slots, 4, 96, 2049, [4, 16], dtype, seed=21)
    g = torch.rand(4, 2049, generator=torch.Generator().manual_seed(21)) + 0.5  # [S, H_out]
    _, y_lora = reference(p)
    y_ref = y_lora.clone()
    for t, s in enumerate(slots):
        if s != -1:
            y_ref[t] *= g[s].double()
    p = to_device(p)
    g = g.to(DEVICE)
    meta = build_lora_meta(slots, 4, DEVICE)
    v = lora_shrink_torch(p.x, p.lora_a, meta)
    y, y_twin = p.y0.clone(), p.y0.clone()
    lora_expand_dora_triton(y, v, p.lora_b, p.scale, g, meta, config=LaunchConfig(16, 512, 16))
    lora_expand_dora_torch(y_twin, v, p.lora_b, p.scale, g, meta)
    y, y_twin, y0 = y.cpu(), y_twin.cpu(), p.y0.cpu()
    lora_rows = [t for t, s in enumerate(slots) if s != -1]
    base_rows = [t for t, s in enumerate(slots) if s == -1]
    assert torch.equal(y[base_rows], y0[base_rows])
    assert_matches_reference("dora expand y", y, y_twin, y_ref, lora_rows, dtype)


def test_rank_slice_of_a_wider_pool():
    """pool[:, :r] (slots spaced R_wide * H apart) gives what the compact pool gives."""
    slots = make_slots("mixed_base", 7, 4, seed=5)
    p = make_problem(slots, 4, 96, 80, [2, 8], torch.float32, seed=5)
    y_compact = check_kernels(p, 4, torch.float32)
    wide_a, wide_b = widen(p, 32)
    p.lora_a, p.lora_b = wide_a[:, :8], wide_b[:, :8]
    y_sliced = check_kernels(p, 4, torch.float32)
    assert torch.allclose(y_sliced, y_compact, atol=1e-5)



@pytest.mark.parametrize("poison", ["nan_scale", "inf_in_b"])
@pytest.mark.parametrize("slots, poisoned", [([0, 0, -1, 2, 2], 1), ([0, 0, 0, -1, 2, 2], 2)],
                         ids=["unused_gap", "padded_used"])
def test_a_slots_values_never_reach_another_slots_tokens(slots, poisoned, poison):
    """The twin's grid point of the same name, on the kernels: other slots' and base tokens come
    out bit-identical to a run without the poisoned slot."""
    outs = []
    for dirty in (False, True):
        p = make_problem(slots, 4, 32, 24, 4, torch.float32, seed=6)
        if dirty and poison == "nan_scale":
            p.scale[poisoned] = float("nan")
        elif dirty:
            p.lora_b[poisoned, 0, 3] = float("inf")
        p = to_device(p)
        meta = build_lora_meta(slots, 4, DEVICE)
        y = p.y0.clone()
        lora_expand_triton(y, lora_shrink_triton(p.x, p.lora_a, meta), p.lora_b, p.scale, meta)
        outs.append(y.cpu())
    others = [t for t, s in enumerate(slots) if s != poisoned]
    assert torch.equal(outs[1][others], outs[0][others]) and torch.isfinite(outs[0]).all()
