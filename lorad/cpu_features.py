"""What this CPU can do fast, and the switch that makes lorad behave as on a lesser CPU.

CPUs of this project's machines differ: some have AVX512-BF16 (bitsandbytes runs NF4 through a
fused kernel, bf16 matmuls are native), some only AVX2 (bitsandbytes dequantizes every NF4
weight on every call; bf16 matmuls are emulated and slow). lorad picks its route per CPU
(lorad.server.nf4_cpu), so both routes must be testable on either machine.

`LORAD_CPU_ISA=avx2` makes lorad and bitsandbytes behave as on an AVX2-only CPU: lorad reports
no native bf16, and bitsandbytes' `has_avx512bf16()` answers False, so its Linear4bit never
repacks for the fused kernel and takes the dequantize + matmul fallback an AVX2 machine takes.
For a faithful AVX2 run, torch and its BLAS libraries must be held to AVX2 as well, which only
environment variables set before the process starts can do (AVX2_ENV, used by
benchmarks/bench_serving.py --cpu-path avx2):

    LORAD_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

ISA_ENV = "LORAD_CPU_ISA"
ISA_CHOICES = ("native", "avx2")
AVX2_ENV = {
    ISA_ENV: "avx2",
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorized kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (mkldnn) matmuls and convolutions
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL's sgemm
}


@dataclass(frozen=True)
class CpuFeatures:
    model: str  # /proc/cpuinfo "model name"
    flags: frozenset[str]  # the flags that decide lorad's routes, as the hardware reports them
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", ...
    forced_isa: str  # "native", or "avx2" when LORAD_CPU_ISA holds lorad to AVX2

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run in hardware (AVX512-BF16 or AMX) and lorad may use them."""
        if self.forced_isa == "avx2" or self.torch_capability not in ("AVX512", "AMX"):
            return False
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags

    @property
    def path(self) -> str:
        """One word for reports: the kind of CPU lorad behaves as on."""
        if self.native_bf16:
            return "avx512-bf16"
        return "avx2" if self.forced_isa == "avx2" or "avx2" in self.flags else "baseline"

    def describe(self) -> str:
        shown = " ".join(sorted(self.flags)) or "none of avx2/avx512f/avx512_bf16/amx_bf16"
        forced = f", held to {self.forced_isa} by {ISA_ENV}" if self.forced_isa != "native" else ""
        return f"{self.model}; flags: {shown}; torch kernels: {self.torch_capability}{forced}"


_REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "f16c", "fma")


def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: report what torch knows
        pass
    return model, frozenset(f for f in flags if f in _REPORTED_FLAGS)


def forced_isa() -> str:
    value = os.environ.get(ISA_ENV, "native").strip().lower() or "native"
    if value not in ISA_CHOICES:
        raise ValueError(f"{ISA_ENV}={value!r} is not one of {', '.join(ISA_CHOICES)}")
    return value


@functools.cache
def detect() -> CpuFeatures:
    import torch

    model, flags = _cpuinfo()
    return CpuFeatures(model, flags, torch.backends.cpu.get_cpu_capability(), forced_isa())


def hold_bitsandbytes_to_isa() -> None:
    """Under LORAD_CPU_ISA=avx2, make bitsandbytes take the route it takes on an AVX2 CPU.

    Must run before any Linear4bit is built (each one reads has_avx512bf16() in __init__);
    load_base calls it. A no-op otherwise, and when bitsandbytes is not installed.
    """
    if forced_isa() != "avx2":
        return
    try:
        import bitsandbytes.functional as bnb_functional
        import bitsandbytes.nn.modules as bnb_modules
    except ImportError:
        return

    def has_avx512bf16() -> bool:
        return False

    bnb_functional.has_avx512bf16 = has_avx512bf16
    bnb_modules.has_avx512bf16 = has_avx512bf16


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def host_memory_bytes() -> int | None:
    """The memory this process may use: the machine's physical memory, or the cgroup's limit
    (a container's --memory) when that is lower; None when neither can be read."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(int(text), total) if total else int(text)
        break
    return total


def default_threads() -> int:
    """torch threads for the model thread: every usable core but one, at least one.

    The server's other threads (gRPC, the event loop, tokenizing and detokenizing, the adapter
    loader) need a core too, and OpenMP workers must never wait on a descheduled sibling: on
    a 2-core machine with a busy neighbour, 2 threads made decode steps 5-20x slower than 1
    (README.md, "CPU threads": 132 against 1992 ms a batch-16 step). So 1 thread on 2 cores,
    3 on 4, 15 on 16.
    """
    return max(1, usable_cores() - 1)
