"""lorad vs PEFT on one machine, one run: multi-adapter serving throughput and latency.

Workload (defaults = the W16 workload of notes/baselines.md): 16 chat requests of ~20-120
prompt tokens over 8 distinct adapters (2 requests each), rank 16, alpha 32, on all seven
projections; greedy; exactly 64 new tokens per request (EOS ignored); all requests arrive at
once. Base: the embedded SmolLM2-135M-Instruct in NF4.

Methods:
  lorad-mixed      lorad's engine, the 16 requests over 8 adapters
  lorad-base       lorad's engine, the 16 requests with no adapter
  peft-mixed       PEFT generate(adapter_names=[...]), one left-padded batch of 16
  peft-sequential  PEFT, one request at a time with set_adapter (what a naive server does)

Each method runs in a fresh subprocess (so peak memory is its own), and the methods are
interleaved over --rounds rounds so machine drift hits them alike. Reported: tokens/s
(generated tokens / wall time), time to first token and inter-token latency p50/p99 (every
request is timed from the common arrival), peak RSS. Medians over rounds.

    python benchmarks/bench_serving.py                 # full run, ~10 min on 2 cores
    python benchmarks/bench_serving.py --quick         # 1 round, fewer tokens: a smoke run
    python benchmarks/bench_serving.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("lorad-mixed", "lorad-base", "peft-mixed", "peft-sequential")
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
            "new_tokens": args.new_tokens, "rank": args.rank}
    (workdir / "workload.json").write_text(json.dumps(spec))
    return spec


# --- one method in a subprocess ------------------------------------------------------------------


def run_lorad(spec: dict, with_adapters: bool) -> dict:
    import threading

    from lorad.base_model import BaseModelConfig, load_base
    from lorad.server.config import EngineConfig
    from lorad.server.engine import Engine
    from lorad.server.model_thread import ModelThread
    from lorad.server.sampling import SamplingParams

    # As lorad serve does it: load, build and step on one thread (lorad/server/model_thread.py).
    model_thread = ModelThread()
    base = model_thread.run(load_base, BaseModelConfig())
    n_req = len(spec["prompts"])
    config = EngineConfig(max_seq_len=512, kv_cache_memory="1GiB", max_batch_size=n_req,
                          max_loras=max(8, len(set(spec["assignment"]))))
    engine = model_thread.run(Engine, base, config, adapters_dir=spec["adapters_dir"])
    assignment = spec["assignment"] if with_adapters else [None] * n_req
    params = SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=True)
    engine.start(model_thread)
    try:
        stamps = [[] for _ in range(n_req)]
        done = threading.Semaphore(0)

        def sink_for(i):
            def sink(event):
                if event.kind == "chunk" and event.token_ids:
                    stamps[i].append(time.perf_counter())
                elif event.kind != "chunk":
                    done.release()
            return sink

        def run(p):
            for i, (ids, a) in enumerate(zip(spec["prompts"], assignment)):
                engine.submit(ids, p, sink_for(i), adapter_id=a)
            for _ in range(n_req):
                done.acquire()

        # Warm-up: the whole workload once with a few tokens (adapters resident, allocator and
        # kernel caches warm), as on a server that has been running.
        run(SamplingParams(max_new_tokens=WARMUP_TOKENS, ignore_eos=True))
        stamps[:] = [[] for _ in range(n_req)]
        t0 = time.perf_counter()
        run(params)
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
        model_thread.shutdown()
    return _summary(t0, wall, stamps)


def run_peft(spec: dict, sequential: bool) -> dict:
    import torch
    from peft import PeftModel
    from transformers import LogitsProcessor, LogitsProcessorList

    from lorad.base_model import BaseModelConfig, load_base

    base = load_base(BaseModelConfig())
    tok = base.tokenizer
    names = sorted(set(spec["assignment"]))
    model = PeftModel.from_pretrained(base.model, Path(spec["adapters_dir"]) / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(Path(spec["adapters_dir"]) / name, adapter_name=name)
    model.eval()
    n_new = spec["new_tokens"]

    class Clock(LogitsProcessor):
        """Records when each decoding step's logits are ready (one timestamp per new token)."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def generate(prompts, adapter_names=None, n_new=n_new):
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        clock = Clock()
        kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                           do_sample=False, pad_token_id=pad, logits_processor=LogitsProcessorList([clock]), **kwargs)
        return clock.times

    # Warm-up: the same calls with a few tokens. PEFT's first mixed-adapter batch on this CPU
    # takes over a minute (one-time setup per shape); it must not count against it.
    if sequential:
        for ids, name in zip(spec["prompts"], spec["assignment"]):
            model.set_adapter(name)
            generate([ids], n_new=WARMUP_TOKENS)
    else:
        generate(spec["prompts"], adapter_names=spec["assignment"], n_new=WARMUP_TOKENS)
    t0 = time.perf_counter()
    if sequential:
        stamps = []
        for ids, name in zip(spec["prompts"], spec["assignment"]):
            model.set_adapter(name)
            stamps.append(generate([ids]))
    else:
        times = generate(spec["prompts"], adapter_names=spec["assignment"])
        stamps = [times for _ in spec["prompts"]]
    wall = time.perf_counter() - t0
    return _summary(t0, wall, stamps)


def _summary(t0: float, wall: float, stamps: list[list[float]]) -> dict:
    tokens = sum(len(s) for s in stamps)
    ttft = [s[0] - t0 for s in stamps if s]
    itl = [b - a for s in stamps for a, b in zip(s, s[1:])]
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "itl_p50_s": percentile(itl, 0.5),
        "itl_p99_s": percentile(itl, 0.99),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def child(method: str, workload: str) -> None:
    spec = json.loads(Path(workload).read_text())
    import logging

    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    result = {
        "lorad-mixed": lambda: run_lorad(spec, True),
        "lorad-base": lambda: run_lorad(spec, False),
        "peft-mixed": lambda: run_peft(spec, False),
        "peft-sequential": lambda: run_peft(spec, True),
    }[method]()
    print("RESULT " + json.dumps(result), flush=True)


# --- driver --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--quick", action="store_true", help="1 round, 16 new tokens: checks the script runs")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.quick:
        args.rounds, args.new_tokens = 1, 16
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory(prefix="lorad-bench-") as tmp:
        workdir = Path(tmp)
        spec = prepare(args, workdir)
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for r in range(args.rounds):
            for m in methods:
                proc = subprocess.run([sys.executable, __file__, "--child", m, str(workdir / "workload.json")],
                                      capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    sys.exit(f"{m} failed:\n{proc.stderr[-3000:]}")
                runs[m].append(json.loads(line[7:]))
                print(f"round {r + 1}/{args.rounds} {m:16} {runs[m][-1]['tok_s']:7.1f} tok/s", file=sys.stderr, flush=True)
    med = {m: {k: statistics.median(run[k] for run in runs[m]) for k in runs[m][0]} for m in methods}
    ratios = {}
    if "lorad-mixed" in med:
        for other in ("lorad-base", "peft-mixed", "peft-sequential"):
            if other in med:
                ratios[f"lorad-mixed / {other}"] = med["lorad-mixed"]["tok_s"] / med[other]["tok_s"]
    import platform

    import torch

    report = {
        "workload": {k: v for k, v in vars(args).items() if k not in ("child", "json_out")},
        "distinct_adapters": len(set(spec["assignment"])),
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        "median": med,
        "runs": runs,
        "ratios": ratios,
        "targets": {"lorad-mixed / lorad-base": ">= 0.85", "lorad-mixed / peft-mixed": ">= 2.0"},
    }
    print(f"\n{args.requests} requests over {len(set(spec['assignment']))} adapters (rank {args.rank}), "
          f"{args.new_tokens} new tokens each, {args.rounds} round(s), medians\n")
    print(f"| method | tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | peak RSS (MB) |")
    print(f"|---|---|---|---|---|")
    for m in methods:
        x = med[m]
        print(f"| {m} | {x['tok_s']:.1f} | {x['ttft_p50_s']:.2f} / {x['ttft_p99_s']:.2f} | "
              f"{x['itl_p50_s'] * 1e3:.0f} / {x['itl_p99_s'] * 1e3:.0f} | {x['peak_rss_mb']:.0f} |")
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
