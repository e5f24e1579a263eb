"""Memory a run can see: the peak per logging interval, and what the device has free.

    CUDA: torch's peak allocated and reserved bytes since the last reading (the caching
          allocator's high-water marks, reset after each reading);
    CPU:  the process's peak resident set (VmHWM), reset after each reading through
          /proc/self/clear_refs where the kernel allows it (else it is the peak since start,
          and the reading says so).

metrics.jsonl gets one reading per logging step; provenance gets the run's maximum.
"""

from __future__ import annotations

import re
from pathlib import Path

MIB = 2**20


def _vm_hwm_bytes() -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def _reset_vm_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory between readings, and the maximum over the run."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.run_peak: dict[str, float] = {}
        self.resettable = True
        self.reset()

    def reset(self) -> None:
        if self.device_type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            self.resettable = _reset_vm_hwm()

    def read(self) -> dict[str, float]:
        """{peak_allocated_mib, peak_reserved_mib} on CUDA, {peak_rss_mib} on CPU; then resets."""
        if self.device_type == "cuda":
            import torch

            out = {
                "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / MIB, 1),
                "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / MIB, 1),
            }
        else:
            hwm = _vm_hwm_bytes()
            out = {} if hwm is None else {"peak_rss_mib": round(hwm / MIB, 1)}
        for key, value in out.items():
            self.run_peak[key] = max(self.run_peak.get(key, 0.0), value)
        self.reset()
        return out

    def summary(self) -> dict:
        what = "cuda" if self.device_type == "cuda" else "cpu_rss"
        note = {} if self.device_type == "cuda" or self.resettable else {"note": "peak since process start"}
        return {"device": what, **self.run_peak, **note}


def free_memory(device_type: str) -> tuple[int, int, str] | None:
    """(free bytes, total bytes, what was read) for the device a run would use."""
    if device_type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        return free, total, "cuda free memory"
    try:
        info = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    avail = re.search(r"MemAvailable:\s+(\d+)\s+kB", info)
    total = re.search(r"MemTotal:\s+(\d+)\s+kB", info)
    if not avail or not total:
        return None
    return int(avail.group(1)) * 1024, int(total.group(1)) * 1024, "MemAvailable"


# Measured on this project's CPU machines: Python + torch + transformers + bitsandbytes after
# import, before any model (trainer/README.md, --dry-run); a CUDA context costs about as much.
PROCESS_OVERHEAD = 500 * MIB


def fit_verdict(estimate_bytes: int, device_type: str, world_size: int = 1) -> str:
    """One line: does the estimate (live tensors per process) fit in what the device has free?"""
    free = free_memory(device_type)
    if free is None:
        return "fits: unknown (free memory could not be read)"
    avail, total, what = free
    # processes on one CPU machine share its memory; on CUDA each rank has its own device
    need = (estimate_bytes + PROCESS_OVERHEAD) * (world_size if device_type == "cpu" else 1)
    share = need / avail if avail else float("inf")
    head = (f"{need / MIB:,.0f} MiB needed (estimate + ~{PROCESS_OVERHEAD // MIB} MiB process overhead"
            + (f", x{world_size} processes" if device_type == "cpu" and world_size > 1 else "")
            + f") of {avail / MIB:,.0f} MiB free ({what}; {total / MIB:,.0f} MiB total)")
    if share <= 0.8:
        return f"fits: {head}"
    if share <= 1.0:
        return f"tight: {head}; allocator slack may not fit, consider gradient_checkpointing or a smaller micro_batch_size"
    return (f"does not fit: {head}; lower micro_batch_size or sequence_len, turn on gradient_checkpointing, "
            "or use adapter: qlora")
