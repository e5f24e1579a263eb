"""Scale-out benchmark: 3 lorad replicas behind HAProxy, adapter affinity vs round-robin, then a failover.

One run, one set of replicas (real `lorad serve` processes on the embedded SmolLM2 NF4 base),
two HAProxy instances in front of them rendered from deploy/haproxy/lorad.cfg.tmpl:
  affinity    balance hdr(x-lorad-adapter), hash-type consistent, hash-balance-factor 150
  round-robin balance roundrobin (the baseline: every replica sees every adapter)
30 random rank-8 adapters, a Zipf(1.1) request mix from benchmarks/loadgen.py (closed loop,
12 concurrent streams). The replicas are sized so that the three together hold every adapter in
device slots and host memory but one alone does not: 12 slots and 16 host-cache entries each,
36 and 48 for the cluster, against 30 adapters (a sizing with 8 slots, 24 for the cluster, is
in the README too).

Phases, in order: round-robin, affinity (each: a warm-up not counted, then a measured window),
then a failover run through the affinity balancer in which the replica owning the most
popular adapter is SIGKILLed. Measured per window, from each replica's /metrics: adapter loads
per request (device slot loads and disk reads), requests per replica (max/mean); from the
client: throughput, TTFT p50/p99; from HAProxy's runtime API: concurrent requests per replica.

    .venv/bin/python benchmarks/bench_cluster.py            # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_cluster.py --json cluster.json --measure 60

Targets (issue 13): affinity cuts adapter loads per request >= 3x vs round-robin and improves
throughput; no replica above balance factor x mean; in the failover run no request is lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import run_load  # noqa: E402

from lorad.cluster import ClusterConfig, LocalCluster, MetricsSnapshot  # noqa: E402
from lorad.haproxy import (BalancerConfig, HAProxyProcess, Replica, free_port, render,  # noqa: E402
                           server_sessions, wait_servers)


def machine_info() -> dict:
    import torch

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    bf16 = "avx512_bf16" in flags
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "nf4_path": "bitsandbytes fused AVX512-BF16 NF4 kernel" if bf16 else "dequantize + matmul (no AVX512-BF16)",
        "platform": platform.platform(),
        "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0],
    }


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def write_adapters(root: Path, n: int, base: str | None) -> list[str]:
    from transformers import AutoConfig

    from lorad.base_model import embedded_model_dir
    from lorad.geometry import ModelGeometry
    from lorad.testing import write_random_adapter

    geometry = ModelGeometry.from_hf_config(AutoConfig.from_pretrained(base or embedded_model_dir()))
    names = [f"tenant-{i:02d}" for i in range(n)]
    for i, name in enumerate(names):
        if not (root / name).exists():
            write_random_adapter(root / name, geometry, rank=8, seed=100 + i, b_std=0.01)
    return names


class Window:
    """Per-replica counters at the start and end of a measured window, and HAProxy concurrency samples."""

    def __init__(self, cluster: LocalCluster, socket_path: Path):
        self.cluster, self.socket_path = cluster, socket_path
        self.start: dict[str, MetricsSnapshot] = {}
        self.end: dict[str, MetricsSnapshot] = {}
        self.sessions: list[dict[str, int]] = []
        self._sampling = threading.Event()

    def _snap(self) -> dict[str, MetricsSnapshot]:
        return {r.name: MetricsSnapshot(r.metrics()) for r in self.cluster.replicas if r.alive}

    def run(self, t0: float, warmup: float, measure: float) -> None:
        """On a thread: snapshot at t0 + warmup, sample sessions, snapshot at t0 + warmup + measure."""
        time.sleep(max(0.0, t0 + warmup - time.perf_counter()))
        self.start = self._snap()
        end = t0 + warmup + measure
        while time.perf_counter() < end:
            try:
                self.sessions.append(server_sessions(self.socket_path))
            except OSError:
                pass
            time.sleep(0.25)
        self.end = self._snap()

    def delta(self, name: str, metric: str, **labels) -> float:
        return self.end[name].sum(metric, **labels) - self.start[name].sum(metric, **labels)

    def stats(self) -> dict:
        names = sorted(self.end)
        requests = {n: self.delta(n, "lorad_requests_total") for n in names}
        total = sum(requests.values()) or 1.0
        device = sum(self.delta(n, "lorad_adapter_loads_total", into="device") for n in names)
        host = sum(self.delta(n, "lorad_adapter_loads_total", into="host") for n in names)
        mean = total / len(names)
        busy = [s for s in self.sessions if sum(s.values()) > 0]
        peak_ratio = max((max(s.values()) / (sum(s.values()) / len(s)) for s in busy), default=0.0)
        mean_sessions = {n: sum(s.get(n, 0) for s in busy) / max(1, len(busy)) for n in names}
        return {
            "requests_by_replica": requests,
            "device_loads_per_request": device / total,
            "host_loads_per_request": host / total,
            "device_loads": device,
            "host_loads": host,
            "max_over_mean_requests": max(requests.values()) / mean if mean else 0.0,
            "mean_sessions_by_replica": mean_sessions,
            "max_over_mean_sessions_mean": (max(mean_sessions.values()) / (sum(mean_sessions.values()) / len(names))
                                            if sum(mean_sessions.values()) else 0.0),
            "peak_instant_max_over_mean_sessions": peak_ratio,
            "peak_sessions": max((max(s.values()) for s in busy), default=0),
        }


def resident(cluster: LocalCluster) -> dict[str, set[str]]:
    return {r.name: {s["adapter_id"] for s in MetricsSnapshot(r.metrics()).labels("lorad_adapter_resident")}
            for r in cluster.replicas if r.alive}


def measured_phase(name, cluster, target, socket_path, adapters, args) -> dict:
    window = Window(cluster, socket_path)
    threads = []

    def on_start(t0):
        t = threading.Thread(target=window.run, args=(t0, args.warmup, args.measure), daemon=True)
        t.start()
        threads.append(t)

    print(f"[{time.strftime('%H:%M:%S')}] {name}: {args.warmup:.0f} s warm-up + {args.measure:.0f} s measured; "
          f"{uptime()}", flush=True)
    result = asyncio.run(run_load(target, adapters, concurrency=args.concurrency,
                                  duration=args.warmup + args.measure, zipf=args.zipf,
                                  max_new_tokens=args.max_new_tokens, seed=args.seed, on_start=on_start))
    threads[0].join(60)
    client = result.window(args.warmup, args.warmup + args.measure).summary()
    out = {"client": client, "server": window.stats(), "resident": {k: sorted(v) for k, v in resident(cluster).items()}}
    print(json.dumps({"phase": name, **out["client"], **{k: v for k, v in out["server"].items()
                                                         if not isinstance(v, dict)}}), flush=True)
    return out


def failover_phase(cluster, target, adapters, args) -> dict:
    before = resident(cluster)
    victim = next(r for r in cluster.replicas if adapters[0] in before.get(r.name, set()))
    victim_adapters = sorted(a for a in before[victim.name] if a in adapters)
    killed_at = {}

    def on_start(t0):
        def kill():
            time.sleep(args.kill_at)
            killed_at["t"] = time.perf_counter() - t0
            victim.kill()
            print(f"[{time.strftime('%H:%M:%S')}] killed {victim.name} (SIGKILL) at {killed_at['t']:.1f} s",
                  flush=True)
        threading.Thread(target=kill, daemon=True).start()

    print(f"[{time.strftime('%H:%M:%S')}] failover: {args.failover:.0f} s through the affinity balancer, "
          f"{victim.name} (holds {adapters[0]}) killed at {args.kill_at:.0f} s; {uptime()}", flush=True)
    result = asyncio.run(run_load(target, adapters, concurrency=args.concurrency, duration=args.failover,
                                  zipf=args.zipf, max_new_tokens=args.max_new_tokens, seed=args.seed + 1,
                                  on_start=on_start))
    after = resident(cluster)
    moved = {a: sorted(n for n, ids in after.items() if a in ids) for a in victim_adapters}
    summary = result.summary()
    late = [r for r in result.records if r.started >= args.kill_at and r.adapter in victim_adapters]
    out = {"victim": victim.name, "killed_at_s": killed_at.get("t"), "client": summary,
           "victim_adapter_requests_after_kill": len(late),
           "victim_adapter_requests_after_kill_ok": sum(r.ok for r in late),
           "victim_adapters_requested_after_kill": len({r.adapter for r in late}),
           "before_kill": result.window(0, args.kill_at).summary(),
           "after_kill": result.window(args.kill_at, args.failover).summary(),
           "victim_adapters_now_on": moved}
    print(json.dumps({"phase": "failover", **{k: v for k, v in summary.items()}, "victim": victim.name,
                      "victim_adapters_resident_elsewhere": sum(1 for v in moved.values() if v),
                      "victim_adapters": len(victim_adapters)}), flush=True)
    return out


def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def table(results: dict, args) -> str:
    rr, aff, fo = results["round_robin"], results["affinity"], results["failover"]
    rows = ["| balancer | device loads / request | disk reads / request | tok/s | req/s | TTFT p50 / p99 (s) | "
            "requests per replica | max / mean requests | mean concurrent per replica (max / mean) |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for label, r in (("round-robin", rr), ("affinity (hash-balance-factor 150)", aff)):
        c, s = r["client"], r["server"]
        per = " / ".join(f"{int(v)}" for v in s["requests_by_replica"].values())
        rows.append(f"| {label} | {fmt(s['device_loads_per_request'], 3)} | {fmt(s['host_loads_per_request'], 3)} | "
                    f"{fmt(c['tok_per_s'], 1)} | {fmt(c['req_per_s'])} | {fmt(c['ttft_p50'])} / {fmt(c['ttft_p99'])} | "
                    f"{per} | {fmt(s['max_over_mean_requests'])} | {fmt(s['max_over_mean_sessions_mean'])} |")
    dl = rr["server"]["device_loads_per_request"] / max(aff["server"]["device_loads_per_request"], 1e-9)
    hl = rr["server"]["host_loads_per_request"] / max(aff["server"]["host_loads_per_request"], 1e-9)
    tp = aff["client"]["tok_per_s"] / max(rr["client"]["tok_per_s"], 1e-9)
    rows += ["", "| ratio (round-robin / affinity) | measured | target |", "|---|---:|---|",
             f"| device slot loads per request | {dl:.2f}x | >= 3x |",
             f"| disk reads per request | {hl:.2f}x | |",
             f"| throughput (affinity / round-robin) | {tp:.2f}x | > 1x |",
             f"| max / mean requests per replica, affinity | {aff['server']['max_over_mean_requests']:.2f} | "
             f"<= {args.balance_factor / 100:.2f} |"]
    c = fo["client"]
    moved = fo["victim_adapters_now_on"]
    rows += ["", "| failover run | value |", "|---|---|",
             f"| killed | {fo['victim']} (SIGKILL) at {fmt(fo['killed_at_s'], 1)} s of {args.failover:.0f} s |",
             f"| requests / ok / failed | {c['requests']} / {c['ok']} / {c['failed']} |",
             f"| streams restarted after a cut (client retry) | {c['restarted']} |",
             f"| TTFT p99 before / after the kill (s) | {fmt(fo['before_kill']['ttft_p99'])} / "
             f"{fmt(fo['after_kill']['ttft_p99'])} |",
             f"| tok/s before / after the kill | {fmt(fo['before_kill']['tok_per_s'], 1)} / "
             f"{fmt(fo['after_kill']['tok_per_s'], 1)} |",
             f"| requests for the victim's adapters after the kill / answered | "
             f"{fo['victim_adapter_requests_after_kill']} / {fo['victim_adapter_requests_after_kill_ok']} |",
             f"| victim's adapters resident on a survivor at the end | {sum(1 for v in moved.values() if v)} of "
             f"{len(moved)} ({fo['victim_adapters_requested_after_kill']} were requested after the kill) |"]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--adapters", type=int, default=30)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--measure", type=float, default=90.0)
    ap.add_argument("--failover", type=float, default=60.0)
    ap.add_argument("--kill-at", type=float, default=20.0)
    ap.add_argument("--max-loras", type=int, default=12)
    ap.add_argument("--max-cpu-loras", type=int, default=16)
    ap.add_argument("--balance-factor", type=int, default=150)
    ap.add_argument("--kv-cache-memory", default="256MiB")
    ap.add_argument("--base", default=None, help="a local base folder instead of the embedded SmolLM2 (smoke runs)")
    ap.add_argument("--quant", default=None, choices=["nf4", "none"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lorad-bench-cluster-"))
    info = machine_info()
    print(json.dumps(info), flush=True)
    print("load before:", uptime(), flush=True)
    adapters = write_adapters(workdir / "adapters", args.adapters, args.base)
    base_args = (("--base", args.base) if args.base else ()) + (("--quant", args.quant) if args.quant else ())
    config = ClusterConfig(
        replicas=args.replicas, port=0, policy="affinity", balance_factor=args.balance_factor,
        adapters_dir=str(workdir / "adapters"), kv_cache_memory=args.kv_cache_memory, max_seq_len=512,
        workdir=str(workdir / "cluster"),
        serve_args=("--max-loras", str(args.max_loras), "--max-cpu-loras", str(args.max_cpu_loras),
                    "--max-lora-rank", "8", *base_args))
    results: dict = {"machine": info, "args": vars(args)}
    started = time.time()
    with LocalCluster(config) as cluster:
        print(f"[{time.strftime('%H:%M:%S')}] {args.replicas} replicas ready in {time.time() - started:.0f} s; "
              f"affinity balancer {cluster.target}", flush=True)
        rr_port = free_port()
        servers = [Replica(r.name, f"127.0.0.1:{r.grpc_port}", r.metrics_port, id=i + 1)
                   for i, r in enumerate(cluster.replicas)]
        rr_socket = cluster.workdir / "rr.sock"
        rr = HAProxyProcess(render(BalancerConfig(bind=f"127.0.0.1:{rr_port}", policy="roundrobin",
                                                  runtime_socket=str(rr_socket)), servers),
                            cluster.workdir / "round-robin")
        rr.start("127.0.0.1", rr_port)
        wait_servers(rr_socket, [r.name for r in cluster.replicas], timeout=30)
        try:
            results["round_robin"] = measured_phase("round-robin", cluster, f"127.0.0.1:{rr_port}", rr_socket,
                                                    adapters, args)
            results["affinity"] = measured_phase("affinity", cluster, cluster.target, cluster.runtime_socket,
                                                 adapters, args)
            results["failover"] = failover_phase(cluster, cluster.target, adapters, args)
        finally:
            rr.stop()
    results["load_after"] = uptime()
    print("load after:", results["load_after"], flush=True)
    print()
    print(table(results, args))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=sorted))


if __name__ == "__main__":
    main()
