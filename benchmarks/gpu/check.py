"""The GPU check's stages (run through benchmarks/gpu/run.sh, which sets up imports and payload).

Each stage runs in its own process under its own time limit and writes <out>/<stage>.json;
the driver then writes <out>/summary.json and <out>/summary.md. A stage that fails or runs out
of time is reported as such and the next one still runs: the device minutes are few, and a
partial result is worth more than none.

    python benchmarks/gpu/check.py --out DIR [--stages env,kernels,...] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# stage: (time limit in seconds, needs the model payload, what it checks)
STAGES = {
    "env": (60, False, "device, versions, payload"),
    "kernels": (150, False, "tests/test_lora_triton.py compiled for the GPU (the interpreter grid's shapes)"),
    "engine": (150, True, "engine on CUDA (bf16) vs PEFT on SmolLM2, NF4 too with bitsandbytes; /metrics vs torch.cuda"),
    "sweep": (60, False, "LoRA add-on, Llama-3.1-8B shapes, 1-64 distinct adapters at batch 64 (goal: flat)"),
    "serving": (150, True, "benchmarks/bench_serving.py at batch 32 on CUDA"),
}
PLAN_IMPORTS = {  # what each stage imports; the dry run imports them all
    "env": ["torch", "triton", "transformers"],
    "kernels": ["pytest", "lorad.kernels.lora_ops_triton"],
    "engine": ["peft", "prometheus_client", "grpc", "lorad.server.app", "lorad.clients.aio_client"],
    "sweep": ["lorad.kernels.lora_ops_triton"],
    "serving": ["peft"],
}


# --- stages (each in its own process) ------------------------------------------------------------


def stage_env(out: Path) -> dict:
    import importlib.metadata

    import torch

    info = {"payload": os.environ.get("LORAD_GPU_PAYLOAD", "unknown"), "cuda": torch.cuda.is_available(), "ok": True}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"device": props.name, "memory_gib": props.total_memory / 2**30,
                 "multiprocessors": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
                 "cuda_version": torch.version.cuda}
    for dist in ("torch", "triton", "transformers", "accelerate", "peft", "bitsandbytes", "grpcio", "protobuf", "gguf"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    return info


def stage_kernels(out: Path) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    report = out / "kernels.xml"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LORAD_LORA_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                           "--rootdir", str(REPO), str(REPO / "tests" / "test_lora_triton.py")],
                          cwd=REPO, env=env, capture_output=True, text=True)
    (out / "kernels.log").write_text(proc.stdout + proc.stderr)
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    return {"tests": int(suite.get("tests")), "failed": len(failed), "skipped": int(suite.get("skipped")),
            "failures": failed[:20], "seconds": float(suite.get("time")), "ok": proc.returncode == 0}


def _oracle(base, adapters_dir) -> dict:
    """tests/test_oracle.py's mixed batch vs PEFT alone, with its measured-noise tolerance."""
    sys.path.insert(0, str(REPO / "tests"))
    import test_oracle

    rows, steps = test_oracle.serve_mixed_batch(base, adapters_dir)
    peft_rows = test_oracle.peft_alone(base, adapters_dir, rows)
    result = {"steps": steps}
    try:
        test_oracle.check_rows(rows, peft_rows, quantized=True)  # bf16 / NF4: the noise-tolerance branch
        result["within_tolerance"] = True
    except AssertionError as exc:
        result["within_tolerance"] = False
        result["error"] = str(exc)[:500]
    result["exact_rows"] = sum(t == r["tokens"] for (t, _), r in zip(rows, peft_rows))
    result["rows"] = len(rows)
    result["ok"] = result["within_tolerance"] and result["exact_rows"] >= len(rows) - 2
    return result


def _device_memory(device) -> tuple[int, int]:
    import torch

    if device.type != "cuda":
        return 0, 0  # what the gauges report off CUDA
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)


def _metrics_check(base, adapters_dir) -> dict:
    """A real server (gRPC + Prometheus) on 127.0.0.1: serve a few requests, scrape /metrics,
    compare its device-memory gauges with torch.cuda read at the same moment (engine idle).
    Runs on the CPU too (tests/test_gpu_check.py), where both sides are 0."""
    import asyncio
    import urllib.request

    from lorad.clients.aio_client import AsyncClient
    from lorad.server.app import LoradServer
    from lorad.server.config import EngineConfig, ServerConfig

    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, adapters_dir=str(adapters_dir),
                          engine=EngineConfig(max_seq_len=256, max_lora_rank=16, max_batch_size=8))

    async def run() -> dict:
        server = LoradServer(config, base=base)
        await server.start()
        try:
            async with AsyncClient(f"127.0.0.1:{server.port}") as client:
                await asyncio.gather(*(client.generate("Tell me about the sea.", adapter_id=a, max_new_tokens=8)
                                       for a in ("r8-all", "r16-attn", None, "r4-mlp")))
            text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
            allocated, reserved = _device_memory(base.device)
        finally:
            await server.stop(grace=1)
        return {"text": text, "allocated": allocated, "reserved": reserved}

    got = asyncio.run(run())
    gauges = {}
    for line in got["text"].splitlines():
        if line.startswith(("lorad_device_memory_", "lorad_memory_bytes")):
            name, value = line.rsplit(" ", 1)
            gauges[name] = float(value)
    alloc = gauges.get("lorad_device_memory_allocated_bytes")
    res = gauges.get("lorad_device_memory_reserved_bytes")
    split = {k: v for k, v in gauges.items() if k.startswith("lorad_memory_bytes")}
    result = {"gauges": gauges, "torch_allocated": got["allocated"], "torch_reserved": got["reserved"]}
    result["allocated_matches"] = alloc is not None and abs(alloc - got["allocated"]) <= 0.01 * got["allocated"]
    result["reserved_matches"] = res is not None and abs(res - got["reserved"]) <= 0.01 * got["reserved"]
    on_cuda = base.device.type == "cuda"  # off CUDA the split is host memory, not device memory
    result["split_within_allocated"] = len(split) == 3 and (not on_cuda or sum(split.values()) <= got["allocated"])
    result["ok"] = result["allocated_matches"] and result["reserved_matches"] and result["split_within_allocated"]
    return result


def stage_engine(out: Path) -> dict:
    import torch

    from lorad.base_model import BaseModelConfig, load_base

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    sys.path.insert(0, str(REPO / "tests"))
    import test_oracle

    result = {}
    base = load_base(BaseModelConfig(quant="none", device="cuda"))  # bf16 compute on CUDA
    adapters_dir = test_oracle.write_oracle_adapters(base.model, out / "oracle-adapters")
    started = time.perf_counter()
    result["bf16"] = _oracle(base, adapters_dir) | {"seconds": time.perf_counter() - started}
    result["metrics"] = _metrics_check(base, adapters_dir)
    del base
    torch.cuda.empty_cache()
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        result["nf4"] = {"skipped": "bitsandbytes did not travel (prepare.sh --no-nf4?)"}
    else:
        started = time.perf_counter()
        nf4 = load_base(BaseModelConfig(device="cuda"))
        result["nf4"] = _oracle(nf4, adapters_dir) | {"seconds": time.perf_counter() - started}
    result["ok"] = all(v.get("ok", True) for v in result.values() if isinstance(v, dict))
    return result


def stage_sweep(out: Path) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    rows_file = out / "sweep_rows.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_lora_gpu.py"), "--batches", "64",
                           "--adapters", "1,2,4,8,16,32,64", "--reps", "30", "--json", str(rows_file)],
                          cwd=REPO, capture_output=True, text=True)
    (out / "sweep.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr[-1500:]}
    rows = json.loads(rows_file.read_text())
    t = {r["adapters"]: r["kernel_s"] for r in rows}
    return {"rows": rows, "kernel_us": {d: s * 1e6 for d, s in t.items()},
            "flatness_64_over_1": t[64] / t[1], "ok": True}


def stage_serving(out: Path) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    try:
        import bitsandbytes  # noqa: F401

        quant = "nf4"
    except ImportError:  # prepare.sh --no-nf4: serve the bf16 base instead
        quant = "none"
    report = out / "serving.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_serving.py"), "--device", "cuda",
                           "--quant", quant, "--requests", "32", "--rounds", "1", "--json", str(report),
                           "--markdown", str(out / "serving.md")], cwd=REPO, capture_output=True, text=True)
    (out / "serving.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr[-1500:]}
    data = json.loads(report.read_text())
    return {"quant": quant, "median": data["median"], "ratios": data["ratios"], "routes": data["routes"], "ok": True}


# --- driver ----------------------------------------------------------------------------------------


def run_stage(name: str, out: Path) -> None:
    fn = globals()[f"stage_{name}"]
    try:
        result = fn(out)
    except Exception as exc:  # reported, not raised: the next stage still runs
        import traceback

        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))


def payload_ready() -> str:
    return os.environ.get("LORAD_GPU_PAYLOAD", "unknown")


def dry_run(stages: list[str], out: Path) -> int:
    """Imports, arguments, the plan: everything but the GPU work."""
    import importlib

    problems, plan = [], []
    for name in stages:
        limit, needs_payload, what = STAGES[name]
        for module in PLAN_IMPORTS[name]:
            try:
                importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - report every import problem
                problems.append(f"{name}: import {module} failed: {type(exc).__name__}: {exc}")
        plan.append({"stage": name, "limit_s": limit, "needs_payload": needs_payload, "checks": what})
    scripts = {"sweep": "bench_lora_gpu.py", "serving": "bench_serving.py"}
    for script in (scripts[s] for s in stages if s in scripts):
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"], capture_output=True, text=True)
        if proc.returncode != 0:
            problems.append(f"benchmarks/{script} --help failed: {proc.stderr[-300:]}")
    total = sum(STAGES[s][0] for s in stages)
    summary = {"dry_run": True, "plan": plan, "total_limit_s": total, "problems": problems,
               "payload": payload_ready()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["# GPU check: plan (dry run)", "", "| stage | limit (s) | needs payload | checks |", "|---|---:|---|---|"]
    lines += [f"| {p['stage']} | {p['limit_s']} | {'yes' if p['needs_payload'] else 'no'} | {p['checks']} |" for p in plan]
    lines += ["", f"total time limit {total} s; payload: {summary['payload']}"]
    lines += [f"- PROBLEM: {p}" for p in problems]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if problems else 0


def render(results: dict) -> str:
    env = results.get("env", {})
    lines = [f"# GPU check on {env.get('device', 'no device')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}, "
             f"peft {env.get('peft')}, bitsandbytes {env.get('bitsandbytes')}; payload: {env.get('payload')}", "",
             "| stage | result | detail |", "|---|---|---|"]
    for name, r in results.items():
        if name == "env":
            continue
        status = "skipped" if "skipped" in r else ("ok" if r.get("ok") else "**FAILED**")
        detail = r.get("skipped") or r.get("error", "")
        if name == "kernels" and "tests" in r:
            detail = f"{r['tests']} tests, {r['failed']} failed, {r['skipped']} skipped, {r['seconds']:.0f} s"
        elif name == "engine" and "bf16" in r:
            b = r["bf16"]
            detail = (f"bf16: {b.get('exact_rows')}/{b.get('rows')} rows token-identical, tolerance "
                      f"{'met' if b.get('within_tolerance') else 'missed'}; metrics: allocated "
                      f"{'matches' if r['metrics'].get('allocated_matches') else 'DIFFERS'}, reserved "
                      f"{'matches' if r['metrics'].get('reserved_matches') else 'DIFFERS'}; nf4: "
                      f"{r['nf4'].get('skipped') or str(r['nf4'].get('exact_rows')) + '/' + str(r['nf4'].get('rows'))}")
        elif name == "sweep" and "kernel_us" in r:
            detail = ", ".join(f"{d}: {us:.0f} us" for d, us in r["kernel_us"].items())
            detail += f"; 64 / 1 adapters = {r['flatness_64_over_1']:.2f}"
        elif name == "serving" and "ratios" in r:
            detail = "; ".join(f"{x['ratio']} {x['value']:.2f} (>= {x['target']})" for x in r["ratios"])
        lines.append(f"| {name} | {status} | {detail} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="results folder [default: $OUT]")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    ap.add_argument("--dry-run", action="store_true", help="imports, argument checks and the plan; no GPU work")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out_arg = args.out or os.environ.get("OUT")
    if not out_arg:
        ap.error("give --out DIR (or set OUT)")
    out = Path(out_arg)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage:
        run_stage(args.stage, out)
        return
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if args.dry_run:
        sys.exit(dry_run(stages, out))
    results = {}
    payload = payload_ready()
    for name in stages:
        limit, needs_payload, _ = STAGES[name]
        if needs_payload and payload != "complete":
            results[name] = {"skipped": f"needs the model payload: {payload}"}
            continue
        started = time.perf_counter()
        try:
            subprocess.run([sys.executable, __file__, "--stage", name, "--out", str(out)], timeout=limit, cwd=REPO)
            results[name] = json.loads((out / f"{name}.json").read_text())
        except subprocess.TimeoutExpired:
            results[name] = {"ok": False, "error": f"ran past its {limit} s limit"}
        except (OSError, json.JSONDecodeError) as exc:
            results[name] = {"ok": False, "error": f"no result: {exc}"}
        results[name]["stage_seconds"] = time.perf_counter() - started
        print(f"{name}: {'skipped' if 'skipped' in results[name] else 'ok' if results[name].get('ok') else 'FAILED'} "
              f"({results[name]['stage_seconds']:.0f} s)", flush=True)
    (out / "summary.json").write_text(json.dumps(results, indent=1, default=str))
    text = render(results)
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
