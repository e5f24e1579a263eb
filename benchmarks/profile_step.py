"""Where a decode step of lorad's engine spends its time, per part and per op, on this CPU.

Builds the engine on the embedded SmolLM2-135M NF4 base, admits --batch requests (spread over
--adapters adapters of rank 16, or none), prefills them, then times --steps decode steps:

  * the whole step: wall and process CPU time (min / p10 / median). With one thread the CPU
    time of the min and p10 steps is the figure least moved by neighbours on a shared machine;
  * the step split into parts by timing every call of the runner's pieces: the projection
    groups (base matmuls), the LoRA adds, attention (cache writes + SDPA), norms, the logits
    head, and the rest (RoPE, residuals, activation, embedding, step planning, sampling,
    Python);
  * with --ops, torch.profiler's per-op table over a few steps (the NF4 kernel is a ctypes call
    and does not appear there).

    python benchmarks/profile_step.py --batch 16 --adapters 8
    python benchmarks/profile_step.py --batch 1 --adapters 0 --cpu-path avx2   # the AVX2 route
"""

from __future__ import annotations

import argparse
import atexit
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict, deque
from pathlib import Path


def _reexec_for_avx2() -> None:
    from lorad.cpu_features import AVX2_ENV

    if any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})


class PartTimer:
    """Accumulates the CPU time of this thread spent in wrapped callables, per named part.

    CPU time, not wall time: time the thread spends preempted by neighbours is not counted, so
    the split stays meaningful on a loaded machine (with one torch thread all compute runs on
    this thread; with more, the worker threads' share is missing and the parts are low).
    """

    def __init__(self):
        self.totals = defaultdict(float)
        self.calls = defaultdict(int)

    def wrap(self, part: str, fn):
        clock = time.thread_time

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[part] += clock() - t0
                self.calls[part] += 1
        return timed

    def reset(self):
        self.totals.clear()
        self.calls.clear()


def instrument(engine, timer: PartTimer) -> None:
    import lorad.server.model_runner as mr

    runner = engine.runner
    for layer in runner.layers:
        for name, group in list(layer.groups.items()):
            layer.groups[name] = timer.wrap("projections (base)", group)
    mr.add_lora = timer.wrap("lora", mr.add_lora)
    runner._attention = timer.wrap("attention", runner._attention)
    runner._rms_norm = timer.wrap("norms", runner._rms_norm)
    runner.head = timer.wrap("logits head", runner.head)
    engine._sample_and_emit = timer.wrap("sampling", engine._sample_and_emit)
    runner.forward = timer.wrap("forward", runner.forward)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=100, help="prompt length of every request")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None, help="[default: lorad's choice]")
    ap.add_argument("--cpu-path", choices=("native", "avx2"), default="native")
    ap.add_argument("--nf4-kernel-rows", type=int, default=None,
                    help="EngineConfig.nf4_kernel_rows (AVX2 path) [default: lorad's default]")
    ap.add_argument("--lora-backend", default=None, help="EngineConfig.lora_backend [default: auto]")
    ap.add_argument("--ops", action="store_true", help="also print torch.profiler's per-op table")
    args = ap.parse_args()
    if args.cpu_path == "avx2":
        _reexec_for_avx2()

    import torch

    from lorad.base_model import BaseModelConfig, load_base
    from lorad.cpu_features import detect
    from lorad.geometry import ModelGeometry
    from lorad.server.config import EngineConfig
    from lorad.server.engine import Engine
    from lorad.server.requests import Probe
    from lorad.server.sampling import SamplingParams
    from lorad.testing import write_random_adapter

    base = load_base(BaseModelConfig(device="cpu"), cache_quantized=True)
    geometry = ModelGeometry.from_hf_config(base.model.config)
    tmp = Path(tempfile.mkdtemp(prefix="lorad-profile-"))
    atexit.register(shutil.rmtree, tmp, True)  # 8 rank-16 adapters, 150 MB
    names = []
    for i in range(args.adapters):
        write_random_adapter(tmp / f"a{i}", geometry, rank=16, alpha=32, seed=i, b_std=0.004)
        names.append(f"a{i}")
    kernel_rows = {} if args.nf4_kernel_rows is None else {"nf4_kernel_rows": args.nf4_kernel_rows}
    if args.lora_backend is not None:
        kernel_rows["lora_backend"] = args.lora_backend
    engine = Engine(base, EngineConfig(max_seq_len=args.prompt_tokens + args.steps + 64, threads=args.threads,
                                       **kernel_rows,
                                       max_batch_size=args.batch), adapters_dir=str(tmp))
    prompt = list(range(1000, 1000 + args.prompt_tokens))
    for i in range(args.batch):
        adapter = names[i * args.adapters // args.batch] if args.adapters else None
        engine.submit(prompt, SamplingParams(max_new_tokens=4096, ignore_eos=True), lambda e: None,
                      adapter_id=adapter)

    def iterate():  # one loop iteration of the engine (Engine._loop), on this thread
        engine._waiting.extend(engine._inbox)
        engine._inbox.clear()
        messages, engine._messages = engine._messages, deque()
        for message in messages:  # adapter loads go through the adapter manager's messages
            if not isinstance(message, Probe):
                engine.adapters.handle(message)
        engine.adapters.progress()
        engine._admit()
        if engine._running:
            engine._step()
        else:
            time.sleep(0.01)

    while len(engine._running) < args.batch or any(r.prefilling for r in engine._running):
        iterate()
    for _ in range(3):
        iterate()
    timer = PartTimer()
    instrument(engine, timer)
    walls, cpus, thread_cpus = [], [], []
    load_before = os.getloadavg()[0]
    for _ in range(args.steps):
        ru0, t0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), time.thread_time()
        iterate()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        thread_cpus.append(time.thread_time() - c0)
        walls.append(time.perf_counter() - t0)
        cpus.append(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime)
    load_after = os.getloadavg()[0]
    cpu = detect()
    print(f"CPU path {cpu.path} ({cpu.describe()}); {torch.get_num_threads()} thread(s); "
          f"load {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} cores")
    print(f"route: {engine.runner.route}")
    print(f"batch {args.batch} over {args.adapters} adapters, prompts of {args.prompt_tokens} tokens, "
          f"{args.steps} decode steps")

    def stats(xs):
        xs = sorted(xs)
        return f"min {xs[0] * 1e3:6.1f}  p10 {xs[len(xs) // 10] * 1e3:6.1f}  median {statistics.median(xs) * 1e3:6.1f} ms"

    print(f"  step wall {stats(walls)}")
    print(f"  step CPU  {stats(cpus)}")
    total = sum(thread_cpus)
    forward = timer.totals.pop("forward")
    timer.calls.pop("forward")
    parts = dict(timer.totals)
    parts["rest of forward (RoPE, residuals, activation, planning, Python)"] = forward - sum(
        v for k, v in parts.items() if k != "sampling")
    parts["rest of step (batch building, sampling setup)"] = total - forward - parts.get("sampling", 0.0)
    print("  split of this thread's CPU time over all steps:")
    for name, value in sorted(parts.items(), key=lambda kv: -kv[1]):
        calls = timer.calls.get(name, 0)
        per = f", {calls // args.steps} calls/step" if calls else ""
        print(f"    {name:66s} {value / args.steps * 1e3:7.2f} ms/step  {100 * value / total:5.1f}%{per}")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                iterate()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
