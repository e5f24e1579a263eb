"""lorad's NF4 AVX2 kernel and its PyTorch twin (kernels/nf4_avx2.py) against an fp64 reference.

The twin's dequantization is checked bit for bit against bitsandbytes' own, on a Linear4bit it
quantized (double quantization, as lorad loads bases): that pins the layout (nibble order,
scale per 64 weights) the kernel reads. The kernel is then checked against the twin's weights
in fp64, over row counts that take both of its paths (up to 4 rows, decoded in registers; more,
through 4 x 3 tiles) with every remainder of rows and weight rows, strided rows of x, threads,
and the shapes of SmolLM2's projections.
"""

from __future__ import annotations

import pytest
import torch

from lorad.kernels import nf4_avx2
from lorad.kernels.native_build import NativeKernel
from lorad.kernels.nf4_avx2 import nf4_dequantize_torch, nf4_matmul, nf4_matmul_torch

needs_kernel = pytest.mark.skipif(not nf4_avx2.available(),
                                  reason=f"NF4 AVX2 kernel unavailable: {nf4_avx2.unavailable_reason()}")
# float32 sums of K products of unit-scale values, measured against fp64: both implementations
# stay within 5e-7 of max |y| at K = 1536 (the kernel ~1.5e-7, the twin ~4e-7)
TOLERANCE = 2e-6


def random_nf4(N: int, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8, generator=g)
    absmax = torch.rand(N * K // 64, generator=g) + 0.01
    code = torch.sort(torch.randn(16, generator=g)).values
    return weight, absmax, code


def reference(x, weight, absmax, code):
    return x.double() @ nf4_dequantize_torch(weight, absmax.double(), code.double(), x.shape[1]).T


def relative_error(got, ref) -> float:
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def test_twin_dequantizes_exactly_as_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    from lorad.server.nf4_cpu import absmax_f32, dequantized_weight

    g = torch.Generator().manual_seed(0)
    lin = bnb.nn.Linear4bit(128, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(96, 128, generator=g) * 0.05, requires_grad=False,
                                   quant_type="nf4", compress_statistics=True, module=lin)
    lin = lin.to("cpu").eval()
    lin.support_avx512bf16_for_cpu = False  # keep bitsandbytes' layout (no repacking for its fused kernel)
    state = lin.weight.quant_state
    assert state.nested and state.blocksize == nf4_avx2.BLOCK
    ours = nf4_dequantize_torch(lin.weight.data.reshape(-1), absmax_f32(state).float(), state.code.float(), 128)
    assert torch.equal(ours, dequantized_weight(lin, torch.float32))
    # and bitsandbytes' public dequantize, which un-nests the scales itself
    assert torch.equal(ours, bnb.functional.dequantize_4bit(lin.weight.data, state).float())


@needs_kernel
@pytest.mark.parametrize("M", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16])  # every remainder of both paths
@pytest.mark.parametrize("N,K", [(1, 64), (41, 192), (96, 576)])  # N % 3: every tile width
def test_kernel_matches_fp64(M, N, K):
    weight, absmax, code = random_nf4(N, K, seed=M * 1000 + N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    got = nf4_matmul(x, weight, absmax, code)
    assert got.shape == (M, N) and got.dtype == torch.float32
    if M:
        assert relative_error(got, reference(x, weight, absmax, code)) < TOLERANCE


@needs_kernel
def test_kernel_on_strided_rows_and_smollm_shapes():
    for N, K in [(576 + 2 * 192, 576), (576, 1536)]:  # fused q/k/v; down
        weight, absmax, code = random_nf4(N, K, seed=K)
        wide = torch.randn(7, K + 64, generator=torch.Generator().manual_seed(1))
        x = wide[:, 32 : 32 + K]  # rows 64 floats apart: the kernel reads x.stride(0)
        assert not x.is_contiguous()
        for rows in (x[:3], x):  # both paths
            ref = reference(rows, weight, absmax, code)
            assert relative_error(nf4_matmul(rows, weight, absmax, code), ref) < TOLERANCE
            assert relative_error(nf4_matmul(rows, weight, absmax, code, threads=2), ref) < TOLERANCE


def test_twin_matches_fp64():
    weight, absmax, code = random_nf4(40, 576, seed=3)
    x = torch.randn(6, 576, generator=torch.Generator().manual_seed(3))
    assert relative_error(nf4_matmul_torch(x, weight, absmax, code), reference(x, weight, absmax, code)) < TOLERANCE


@pytest.mark.parametrize("impl", [nf4_matmul_torch, pytest.param(nf4_matmul, marks=needs_kernel)],
                         ids=["twin", "kernel"])
def test_arguments_outside_the_contract_are_refused(impl):
    weight, absmax, code = random_nf4(8, 128, seed=0)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="not a positive multiple of 64"):
        impl(torch.randn(2, 96), weight[: 8 * 96 // 2], absmax[: 8 * 96 // 64], code)
    with pytest.raises(ValueError, match="not a positive multiple of 64"):
        impl(torch.randn(2, 0), weight[:0], absmax[:0], code)
    with pytest.raises(ValueError, match="float32"):
        impl(x.double(), weight, absmax, code)
    with pytest.raises(ValueError, match="absmax: expected 16"):
        impl(x, weight, absmax[:-1], code)
    with pytest.raises(ValueError, match="code: expected 16"):
        impl(x, weight, absmax, code[:8])
    with pytest.raises(ValueError, match="weight: expected contiguous uint8"):
        impl(x, weight.view(torch.int8), absmax, code)


def test_a_kernel_that_cannot_build_says_why(monkeypatch, tmp_path):
    """A failing compiler, or a source that is not there, leaves the caller on its PyTorch path
    with the reason, instead of an exception at server start."""
    monkeypatch.setenv("LORAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    source = tmp_path / "k.c"
    source.write_text("int f(void) { return 0; }\n")
    failing = NativeKernel(source, "f", [])
    assert not failing.available() and failing.function is None
    assert "false failed to build k.c" in failing.unavailable_reason()
    monkeypatch.delenv("CC")
    missing = NativeKernel(tmp_path / "missing.c", "f", [])
    assert not missing.available() and "missing.c" in missing.unavailable_reason()
