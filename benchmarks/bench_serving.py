"""lorad vs transformers and PEFT on one machine, in one run: throughput, latency, memory.

Workload (defaults = W16 of notes/baselines.md): 16 chat requests of ~20-120 prompt tokens over
8 distinct adapters (2 requests each), rank 16, alpha 32, on all seven projections; greedy;
exactly 64 new tokens per request (EOS ignored); all requests arrive at once. Base: the
embedded SmolLM2-135M-Instruct in NF4 (fp32 compute on CPU, bf16 on CUDA).

Methods (the default six, interleaved over --rounds):
  lorad-mixed      lorad's engine, the 16 requests over 8 adapters, all submitted at once
  lorad-base       lorad's engine, the 16 requests without adapters, all at once
  peft-mixed       PEFT generate(adapter_names=[...]), one left-padded batch of 16
  hf-batch         transformers generate, base only, one static left-padded batch of 16
  hf-single        transformers generate, base only, batch 1: --single-requests prompts in turn
  lorad-single     lorad's engine, base only, the same prompts in turn (one running at a time)
and on request (--methods): peft-sequential, PEFT one request at a time with set_adapter.

Ratios and their targets (issue 14): lorad-mixed / lorad-base >= 0.85, lorad-base / hf-batch
>= 1.5, lorad-single / hf-single >= 2.4, lorad-mixed / peft-mixed >= 3. Each is printed as the
ratio of the medians and per round (both sides of a round ran minutes apart, under the same
neighbours).

Each method runs in a fresh subprocess (peak RSS is its own, nothing is shared), after one
warm-up pass of the same workload with 4 new tokens (PEFT's first mixed batch alone takes a
minute here). Every method of a run uses the same number of torch threads (--threads, default
lorad's own choice, lorad.cpu_features.default_threads). The run prints the CPU, its flags,
the CPU path each method took (bitsandbytes' fused NF4 kernel or its dequantize-per-call
fallback; lorad's NF4 route) and the load average around every method, because this project's
machines are shared: a figure taken next to a busy neighbour measures the neighbour.

--cpu-path avx2 runs every method as on an AVX2-only CPU (lorad.cpu_features.AVX2_ENV: torch,
oneDNN and MKL held to AVX2, bitsandbytes told there is no AVX512-BF16, so it dequantizes
every NF4 weight on every call, and lorad takes its AVX2 route).

    python benchmarks/bench_serving.py                      # ~15 min on 2 cores
    python benchmarks/bench_serving.py --cpu-path avx2      # the AVX2 route, ~25 min
    python benchmarks/bench_serving.py --quick              # 1 round, 16 new tokens: a smoke run
    python benchmarks/bench_serving.py --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("lorad-mixed", "lorad-base", "peft-mixed", "hf-batch", "hf-single", "lorad-single")
EXTRA_METHODS = ("peft-sequential",)
# (numerator, denominator, target): numerator / denominator must reach target
TARGETS = (
    ("lorad-mixed", "lorad-base", 0.85),
    ("lorad-base", "hf-batch", 1.5),
    ("lorad-single", "hf-single", 2.4),
    ("lorad-mixed", "peft-mixed", 3.0),
)
WARMUP_TOKENS = 4
QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis to a ten-year-old in a few sentences, with an example from a garden.",
    "Write a haiku about the sea.",
    "Give me three practical tips for sleeping better at night, and explain briefly why each one works.",
    "What is the difference between weather and climate?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do I make a simple tomato sauce? List the ingredients and the steps, and say how long it keeps in the fridge.",
    "Why is the sky blue?",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# --- workload -----------------------------------------------------------------------------------


def prepare(args, workdir: Path) -> dict:
    """Write the adapters and the prompt ids once; every method reads the same files."""
    from transformers import AutoConfig, AutoTokenizer

    from lorad.base_model import embedded_model_dir
    from lorad.geometry import ModelGeometry
    from lorad.testing import write_random_adapter

    model_dir = embedded_model_dir()
    geometry = ModelGeometry.from_hf_config(AutoConfig.from_pretrained(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    adapters = []
    for i in range(args.adapters):
        name = f"bench-{i}"
        write_random_adapter(workdir / "adapters" / name, geometry, rank=args.rank, alpha=2 * args.rank, seed=i,
                             b_std=0.004)
        adapters.append(name)
    prompts = []
    for i in range(args.requests):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    assignment = [adapters[i * args.adapters // args.requests] for i in range(args.requests)]
    spec = {"adapters_dir": str(workdir / "adapters"), "prompts": prompts, "assignment": assignment,
            "new_tokens": args.new_tokens, "rank": args.rank, "single_requests": args.single_requests,
            "device": args.device, "quant": args.quant, "threads": args.threads}
    (workdir / "workload.json").write_text(json.dumps(spec))
    return spec


# --- one method in a subprocess ------------------------------------------------------------------


def _usage_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_lorad(spec: dict, mode: str) -> dict:
    """mode: "mixed" (adapters), "base" (no adapters), "single" (no adapters, one at a time)."""
    import threading

    from lorad.base_model import BaseModelConfig, load_base
    from lorad.server.config import EngineConfig
    from lorad.server.engine import Engine
    from lorad.server.model_thread import ModelThread
    from lorad.server.sampling import SamplingParams

    # As lorad serve does it: load, build and step on one thread (lorad/server/model_thread.py).
    model_thread = ModelThread()
    base = model_thread.run(load_base, BaseModelConfig(device=spec["device"], quant=spec.get("quant", "nf4")))
    prompts = spec["prompts"][: spec["single_requests"]] if mode == "single" else spec["prompts"]
    n_req = len(prompts)
    config = EngineConfig(max_seq_len=512, max_batch_size=n_req, threads=spec["threads"],
                          max_loras=max(8, len(set(spec["assignment"]))))
    engine = model_thread.run(Engine, base, config, adapters_dir=spec["adapters_dir"])
    assignment = spec["assignment"] if mode == "mixed" else [None] * n_req
    engine.start(model_thread)
    try:
        stamps = [[] for _ in range(n_req)]
        starts = [0.0] * n_req
        done = threading.Semaphore(0)

        def sink_for(i):
            def sink(event):
                if event.kind == "chunk" and event.token_ids:
                    stamps[i].append(time.perf_counter())
                elif event.kind != "chunk":
                    done.release()
            return sink

        def run(params):
            if mode == "single":  # one request at a time: the next is sent when the last finished
                for i, ids in enumerate(prompts):
                    starts[i] = time.perf_counter()
                    engine.submit(ids, params, sink_for(i))
                    done.acquire()
                return
            now = time.perf_counter()
            for i, (ids, a) in enumerate(zip(prompts, assignment)):
                starts[i] = now
                engine.submit(ids, params, sink_for(i), adapter_id=a)
            for _ in range(n_req):
                done.acquire()

        # Warm-up: the whole workload once with a few tokens (adapters resident, allocator and
        # kernel caches warm), as on a server that has been running.
        run(SamplingParams(max_new_tokens=WARMUP_TOKENS, ignore_eos=True))
        stamps[:] = [[] for _ in range(n_req)]
        cpu0, t0 = _usage_s(), time.perf_counter()
        run(SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=True))
        wall, cpu = time.perf_counter() - t0, _usage_s() - cpu0
        route = engine.runner.route
    finally:
        engine.stop()
        model_thread.shutdown()
    return _summary(starts, wall, cpu, stamps) | {"route": route}


def _bnb_route(model) -> str:
    """What bitsandbytes did for this process's Linear4bit modules (after a forward)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return "no bitsandbytes"
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        return "unquantized"
    if layers[0].weight.device.type != "cpu":
        return f"bitsandbytes NF4 on {layers[0].weight.device.type}"
    fused = getattr(layers[0].weight.quant_state, "packing_format_for_cpu", False)
    return "bitsandbytes fused NF4 kernel (AVX512-BF16)" if fused else "bitsandbytes dequantize + matmul per call"


def run_hf(spec: dict, method: str) -> dict:
    """peft-mixed, peft-sequential, hf-batch, hf-single."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from lorad.base_model import BaseModelConfig, load_base

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    base = load_base(BaseModelConfig(device=spec["device"], quant=spec.get("quant", "nf4")))
    tok, model = base.tokenizer, base.model
    if method.startswith("peft"):
        from peft import PeftModel

        names = sorted(set(spec["assignment"]))
        model = PeftModel.from_pretrained(model, Path(spec["adapters_dir"]) / names[0], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(Path(spec["adapters_dir"]) / name, adapter_name=name)
        model.eval()
    device = base.device

    class Clock(LogitsProcessor):
        """Records when each decoding step's logits are ready (one timestamp per new token)."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter())
            return scores

    def generate(prompts, n_new, adapter_names=None):
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        clock = Clock()
        kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                           do_sample=False, pad_token_id=pad, logits_processor=LogitsProcessorList([clock]), **kwargs)
        return clock.times

    prompts, assignment = spec["prompts"], spec["assignment"]
    if method == "hf-single":
        prompts = prompts[: spec["single_requests"]]

    def run(n_new):
        """Returns (per-request start times, per-request token stamps)."""
        if method == "peft-mixed":
            t = time.perf_counter()
            times = generate(prompts, n_new, adapter_names=assignment)
            return [t] * len(prompts), [times] * len(prompts)
        if method == "hf-batch":
            t = time.perf_counter()
            times = generate(prompts, n_new)
            return [t] * len(prompts), [times] * len(prompts)
        starts, stamps = [], []
        for i, ids in enumerate(prompts):  # hf-single, peft-sequential: one request at a time
            if method == "peft-sequential":
                model.set_adapter(assignment[i])
            starts.append(time.perf_counter())
            stamps.append(generate([ids], n_new))
        return starts, stamps

    run(WARMUP_TOKENS)
    cpu0, t0 = _usage_s(), time.perf_counter()
    starts, stamps = run(spec["new_tokens"])
    wall, cpu = time.perf_counter() - t0, _usage_s() - cpu0
    if method in ("peft-sequential",):  # every request is timed from the common start
        starts = [t0] * len(starts)
    return _summary(starts, wall, cpu, stamps) | {"route": _bnb_route(base.model)}


def _summary(starts: list[float], wall: float, cpu: float, stamps: list[list[float]]) -> dict:
    """TTFT from each request's start (the common arrival when all arrive at once)."""
    import torch

    from lorad.cpu_features import detect

    tokens = sum(len(s) for s in stamps)
    ttft = [s[0] - t for s, t in zip(stamps, starts) if s]
    itl = [b - a for s in stamps for a, b in zip(s, s[1:])]
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "cpu_ms_per_token": 1e3 * cpu / max(tokens, 1),
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "itl_p50_s": percentile(itl, 0.5),
        "itl_p99_s": percentile(itl, 0.99),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "cpu_path": detect().path,
        "torch_capability": detect().torch_capability,
    }


def child(method: str, workload: str) -> None:
    spec = json.loads(Path(workload).read_text())
    import logging

    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if method.startswith("lorad-"):
        result = run_lorad(spec, method.removeprefix("lorad-"))
    else:
        result = run_hf(spec, method)
    print("RESULT " + json.dumps(result), flush=True)


# --- driver --------------------------------------------------------------------------------------


def load() -> float:
    return os.getloadavg()[0]


def ratio_rows(runs: dict, med: dict) -> list[dict]:
    rows = []
    for num, den, target in TARGETS:
        if num not in med or den not in med:
            continue
        value = med[num]["tok_s"] / med[den]["tok_s"]
        per_round = [a["tok_s"] / b["tok_s"] for a, b in zip(runs[num], runs[den])]
        rows.append({"ratio": f"{num} / {den}", "value": value, "per_round": per_round, "target": target,
                     "met": value >= target})
    return rows


def render(report: dict) -> str:
    w, m = report["workload"], report["machine"]
    lines = [
        f"## Serving benchmark: {w['requests']} requests over {report['distinct_adapters']} adapters "
        f"(rank {w['rank']}), {w['new_tokens']} new tokens each, {w['rounds']} round(s), medians",
        "",
        f"- CPU: {m['cpu']}",
        f"- CPU path: **{m['cpu_path']}** ({m['cpu_path_how']}); torch {m['torch']}, {m['threads']} thread(s) "
        f"per method, device {w['device']}",
        f"- routes: " + "; ".join(f"{k}: {v}" for k, v in report["routes"].items()),
        f"- load average (1 min) around the methods: min {m['load_min']:.2f}, median {m['load_median']:.2f}, "
        f"max {m['load_max']:.2f} on {m['cores']} cores",
        "",
        "| method | tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | CPU ms / token | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, x in report["median"].items():
        lines.append(f"| {name} | {x['tok_s']:.1f} | {x['ttft_p50_s']:.2f} / {x['ttft_p99_s']:.2f} | "
                     f"{x['itl_p50_s'] * 1e3:.0f} / {x['itl_p99_s'] * 1e3:.0f} | {x['cpu_ms_per_token']:.1f} | "
                     f"{x['peak_rss_mb']:.0f} |")
    lines += ["", "| ratio | median | per round | target | |", "|---|---:|---|---:|---|"]
    for r in report["ratios"]:
        rounds = ", ".join(f"{v:.2f}" for v in r["per_round"])
        lines.append(f"| {r['ratio']} | {r['value']:.2f} | {rounds} | >= {r['target']} | "
                     f"{'met' if r['met'] else '**missed**'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--single-requests", type=int, default=4,
                        help="prompts sent one at a time by hf-single and lorad-single")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS + EXTRA_METHODS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every method [default: lorad's choice for this machine]")
    parser.add_argument("--cpu-path", choices=("native", "avx2"), default="native",
                        help="avx2: run every method as on an AVX2-only CPU (see the module docstring)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--quant", choices=("nf4", "none"), default="nf4", help="the base's weights")
    parser.add_argument("--quick", action="store_true", help="1 round, 16 new tokens: checks the script runs")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    parser.add_argument("--markdown", dest="md_out", default=None, help="also write the tables here")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS + EXTRA_METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS + EXTRA_METHODS)}")
    for name in ("requests", "adapters", "new_tokens", "rank", "single_requests", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.quick:
        args.rounds, args.new_tokens = 1, 16
    import torch

    from lorad.cpu_features import AVX2_ENV, default_threads, detect

    if args.threads is None:
        args.threads = default_threads()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if args.cpu_path == "avx2":
        env.update(AVX2_ENV)
        how = "emulated: " + " ".join(f"{k}={v}" for k, v in AVX2_ENV.items())
    else:
        env.pop("LORAD_CPU_ISA", None)
        how = "as the hardware reports it"
    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="lorad-bench-") as tmp:
        workdir = Path(tmp)
        spec = prepare(args, workdir)
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for r in range(args.rounds):
            for m in methods:
                before = load()
                proc = subprocess.run([sys.executable, __file__, "--child", m, str(workdir / "workload.json")],
                                      capture_output=True, text=True, env=env)
                after = load()
                loads += [before, after]
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    sys.exit(f"{m} failed:\n{proc.stderr[-3000:]}")
                result = json.loads(line[7:]) | {"load_before": before, "load_after": after}
                runs[m].append(result)
                print(f"round {r + 1}/{args.rounds} {m:16} {result['tok_s']:7.1f} tok/s  "
                      f"({result['cpu_path']}, {result['route']}; load {before:.2f} -> {after:.2f})",
                      file=sys.stderr, flush=True)
    numeric = [k for k, v in runs[methods[0]][0].items() if isinstance(v, (int, float))]
    med = {m: {k: statistics.median(run[k] for run in runs[m]) for k in numeric} for m in methods}
    first = runs[methods[0]][0]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "workload": {k: v for k, v in vars(args).items() if k not in ("child", "json_out", "md_out")},
        "distinct_adapters": len(set(spec["assignment"])),
        "machine": {
            "cpu": detect().describe(),
            "cpu_path": first["cpu_path"],
            "cpu_path_how": how,
            "torch": torch.__version__,
            "threads": first["threads"],
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "load_min": min(loads),
            "load_median": statistics.median(loads),
            "load_max": max(loads),
        },
        "routes": {m: runs[m][0]["route"] for m in methods},
        "median": med,
        "runs": runs,
        "ratios": ratio_rows(runs, med),
    }
    text = render(report)
    print("\n" + text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    if args.md_out:
        Path(args.md_out).write_text(text)


if __name__ == "__main__":
    main()
