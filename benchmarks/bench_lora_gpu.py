"""LoRA cost of one decoder layer on a GPU: Triton kernels vs the PyTorch twin vs PEFT's loop.

For every (batch, distinct adapters) pair it times shrink + expand over the seven adapted
projections of one Llama-3.1-8B layer (q 4096->4096, k/v 4096->1024, o 4096->4096,
gate/up 4096->14336, down 14336->4096; rank 16) and reports the achieved memory bandwidth:
bytes the op must move at least (x, the adapters' A and B, v out and back, y read and written)
divided by the time, and that as a fraction of the device's peak.

    python benchmarks/bench_lora_gpu.py                 # needs CUDA
    python benchmarks/bench_lora_gpu.py --dry-run       # CPU, Triton interpreter, tiny shapes:
                                                        # checks the script still runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402

from lorad.kernels import build_lora_meta  # noqa: E402
from lorad.kernels.lora_ops_torch import lora_expand_torch, lora_shrink_torch  # noqa: E402

LLAMA31_8B = {  # name: (H_in, H_out)
    "q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096),
    "gate": (4096, 14336), "up": (4096, 14336), "down": (14336, 4096),
}  # fmt: skip
TINY = {"q": (64, 64), "kv": (64, 32), "up": (64, 160), "down": (160, 64)}

# Peak HBM bandwidth in GB/s by device-name fragment (vendor datasheets).
PEAK_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100": 3350,
             "A100-SXM4-80GB": 2039, "A100": 1555, "L40S": 864, "L4": 300, "A10": 600, "4090": 1008}


def peak_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def loop_lora(x, y, a, b, scale, slots_host):
    """PEFT's _mixed_batch_forward: per distinct adapter, gather its rows, two matmuls, scatter."""
    for s in sorted(set(slots_host) - {-1}):
        rows = torch.tensor([t for t, u in enumerate(slots_host) if u == s], device=x.device)
        y.index_add_(0, rows, (x[rows] @ a[s].T) @ b[s], alpha=float(scale[s]))


def bytes_moved(T, D, R, shapes, elt):
    total = 0
    for h_in, h_out in shapes.values():
        total += T * h_in * elt + D * R * (h_in + h_out) * elt + 2 * T * R * 4 + 2 * T * h_out * elt
    return total


def timeit(fn, device, reps):
    fn()  # warm-up (and compile)
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU + Triton interpreter, tiny shapes")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--adapters", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="bfloat16")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()

    if args.dry_run:
        device, shapes, batches, adapters, reps = torch.device("cpu"), TINY, [1, 7], [1, 4], 1
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_lora_gpu.py needs CUDA (use --dry-run to check it on CPU)")
        device, shapes, reps = torch.device("cuda"), LLAMA31_8B, args.reps
        batches = [int(v) for v in args.batches.split(",")]
        adapters = [int(v) for v in args.adapters.split(",")]
    from lorad.kernels.lora_ops_triton import lora_expand_triton, lora_shrink_triton

    dtype, R = getattr(torch, args.dtype), args.rank
    S = max(adapters)
    g = torch.Generator().manual_seed(0)
    pool = {  # name: (lora_a [S, R, H_in], lora_b [S, R, H_out])
        n: ((torch.randn(S, R, i, generator=g) / i**0.5).to(device, dtype),
            (torch.randn(S, R, o, generator=g) / R**0.5).to(device, dtype))
        for n, (i, o) in shapes.items()
    }  # fmt: skip
    scale = torch.full((S,), 2.0, device=device)
    peak = peak_gbps(device)
    rows = []
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (interpreter)'}, "
          f"{args.dtype}, rank {R}, {len(shapes)} projections per layer, peak {peak or 'n/a'} GB/s")
    print(f"{'batch':>5} {'adapters':>8} | {'kernel us':>9} {'GB/s':>6} {'%peak':>5} | "
          f"{'twin us':>8} {'loop us':>8} | {'loop/kernel':>11}")
    for T in batches:
        for D in adapters:
            if D > T:
                continue
            slot_ids = torch.randperm(S, generator=g)[:D].tolist()
            slots = [slot_ids[t * D // T] for t in range(T)]  # grouped by adapter, as the engine lays them out
            meta = build_lora_meta(slots, S, device)
            xs = {n: torch.randn(T, i, device=device, dtype=dtype) for n, (i, _) in shapes.items()}
            ys = {n: torch.zeros(T, o, device=device, dtype=dtype) for n, (_, o) in shapes.items()}

            def run(shrink, expand):
                def step():
                    for n, (a, b) in pool.items():
                        expand(ys[n], shrink(xs[n], a, meta), b, scale, meta)
                return step

            def loop():
                for n, (a, b) in pool.items():
                    loop_lora(xs[n], ys[n], a, b, scale.tolist(), slots)

            t_kernel = timeit(run(lora_shrink_triton, lora_expand_triton), device, reps)
            t_twin = timeit(run(lora_shrink_torch, lora_expand_torch), device, reps)
            t_loop = timeit(loop, device, reps)
            gbps = bytes_moved(T, D, R, shapes, dtype.itemsize) / t_kernel / 1e9
            frac = f"{100 * gbps / peak:5.1f}" if peak else "  n/a"
            print(f"{T:>5} {D:>8} | {t_kernel * 1e6:>9.1f} {gbps:>6.1f} {frac} | "
                  f"{t_twin * 1e6:>8.1f} {t_loop * 1e6:>8.1f} | {t_loop / t_kernel:>11.2f}")
            rows.append(dict(batch=T, adapters=D, kernel_s=t_kernel, twin_s=t_twin, loop_s=t_loop,
                             kernel_gbps=gbps, peak_gbps=peak))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
