"""The engine's LoRA cost per decode step on CPU, at SmolLM2-135M shapes.

Headline: 30 layers x 7 projections (q 576->576, k/v 576->192, o 576->576, gate/up 576->1536,
down 1536->576), 16 decode tokens over 8 adapters, rank 16, float32. Four ways to add the
adapters' deltas to the base outputs:

  twin        lorad.kernels.lora_shrink / lora_expand (the PyTorch twin), tokens grouped by
              slot as the engine lays them out, and again with the tokens shuffled; and
              add_lora, the engine's one call per projection, on the twin and on the cpu
              backend (lorad's C kernel, kernels/lora_cpu.c)
  peft loop   PEFT's LoraLayer._mixed_batch_forward in plain torch: for each distinct adapter,
              gather its rows, lora_B(lora_A(x_sub)) * scaling, scatter-add into the result
  peft layer  the same through PEFT's own lora.Linear(adapter_names=...), base time subtracted
              (one layer's modules reused for all 30: cache-friendlier than reality)
  gather+bmm  bmm of every token with a copy of its own adapter's weights

against the base model's own decode step (the real NF4 SmolLM2 from lorad.base_model, batch 16,
eval, no_grad). Targets: twin <= 0.5x the PEFT loop, twin <= 15% of the base step.

Then a sweep over tokens x distinct adapters x segment shapes times the twin's two strategies
(forced) against the loop and gather+bmm, and checks the twin's automatic choice.

    .venv/bin/python benchmarks/bench_lora_cpu.py [--threads 1] [--quick] [--no-model] [--no-sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from datetime import date

import torch
import torch.nn.functional as F

from lorad.kernels import add_lora, build_lora_meta, lora_cpu, lora_expand, lora_ops_torch, lora_shrink

SMOLLM2_135M = {  # projection: (H_in, H_out)
    "q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576),
    "gate": (576, 1536), "up": (576, 1536), "down": (1536, 576),
}  # fmt: skip
LAYERS = 30


def bench(fn, reps: int = 7, inner: int = 3) -> float:
    """Best over `reps` of the mean time of `inner` calls, after one warm-up call (seconds).

    The best, not the median: this machine is shared, and other processes only ever add time.
    """
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return min(times)


def race(fns: dict, reps: int = 7, inner: int = 3) -> dict:
    """bench() for several functions at once, round-robin, so that they share the same noise."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / inner)
    return best


class Problem:
    """Per layer and projection: a slot pool, the inputs and base outputs of one step."""

    def __init__(self, slots: list[int], num_slots: int, rank: int, layers: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        T, S = len(slots), num_slots
        self.slots, self.num_slots, self.layers = slots, S, layers
        self.pool = [  # [layer][proj] = (lora_a [S, R, H_in], lora_b [S, R, H_out])
            {n: (torch.randn(S, rank, i, generator=g) / i**0.5, torch.randn(S, rank, o, generator=g) / rank**0.5)
             for n, (i, o) in SMOLLM2_135M.items()}
            for _ in range(layers)
        ]  # fmt: skip
        self.scale = torch.full((S,), 2.0)
        self.scale_host = self.scale.tolist()
        self.x = {n: torch.randn(T, i, generator=g) for n, (i, _) in SMOLLM2_135M.items()}  # [T, H_in]
        self.y = {n: torch.zeros(T, o) for n, (_, o) in SMOLLM2_135M.items()}  # [T, H_out]
        # PEFT keeps nn.Linear weights as [out, in]: A [r, H_in] (as ours), B [H_out, r].
        self.peft_b = [{n: b.transpose(1, 2).contiguous() for n, (_, b) in layer.items()} for layer in self.pool]


def step_twin(p: Problem, meta=None) -> None:
    if meta is None:
        meta = build_lora_meta(p.slots, p.num_slots)  # once per batch, shared by all projections
    for layer in p.pool:
        for n, (a, b) in layer.items():
            lora_expand(p.y[n], lora_shrink(p.x[n], a, meta, backend="torch"), b, p.scale, meta, backend="torch")


def step_add_lora(p: Problem, backend: str, meta=None) -> None:
    """The engine's call: add_lora per projection (torch: the twin's fused decode path; cpu: lorad's C kernel)."""
    if meta is None:
        meta = build_lora_meta(p.slots, p.num_slots)
    for layer in p.pool:
        for n, (a, b) in layer.items():
            add_lora(p.y[n], p.x[n], a, b, p.scale, meta, backend=backend)


def step_peft_loop(p: Problem) -> None:
    names = p.slots  # PEFT's adapter_names, one per row
    for layer, layer_b in zip(p.pool, p.peft_b):
        for n, (a, _) in layer.items():
            x, result = p.x[n], p.y[n]
            unique = set(names)
            sub_batch_indices_list = [[i for i, item in enumerate(names) if item == s] for s in unique]
            for i, s in enumerate(unique):
                if s == -1:
                    continue
                sub_batch = x[sub_batch_indices_list[i]]
                lora_output = F.linear(F.linear(sub_batch, a[s]), layer_b[n][s]) * p.scale_host[s]
                result[sub_batch_indices_list[i]] += lora_output


def step_read_weights(p: Problem) -> None:
    """Not a method: the memory floor, every adapter weight of the step read once."""
    for layer in p.pool:
        for a, b in layer.values():
            a.sum()
            b.sum()


def step_gather_bmm(p: Problem) -> None:
    idx = torch.tensor(p.slots)  # (assumes no -1 tokens, as in every benchmark case)
    s = p.scale[idx].view(-1, 1, 1)
    for layer in p.pool:
        for n, (a, b) in layer.items():
            v = torch.bmm(p.x[n].unsqueeze(1), a[idx].transpose(1, 2))  # [T, 1, R]
            p.y[n].unsqueeze(1).baddbmm_(v * s, b[idx])


def peft_layer_cost(p: Problem, reps: int) -> float | None:
    """PEFT's own lora.Linear with one adapter per slot: (mixed forward - base forward) x layers."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return None
    torch.manual_seed(0)
    config = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False)
    total = 0.0
    names = [f"a{s}" for s in p.slots]
    for n, (h_in, h_out) in SMOLLM2_135M.items():
        base = torch.nn.Linear(h_in, h_out, bias=False)
        layer = None
        for s in sorted(set(p.slots)):
            if layer is None:
                layer = LoraLinear(base, f"a{s}", config, r=16, lora_alpha=32)
            else:
                layer.update_layer(f"a{s}", 16, 32, config)
        layer.eval()
        x = p.x[n]
        with torch.no_grad():
            t_mixed = bench(lambda: layer(x, adapter_names=names), reps, 20)
            t_base = bench(lambda: base(x), reps, 20)
        total += max(0.0, t_mixed - t_base)
    return total * p.layers


def load_base_model():
    from lorad.base_model import BaseModelConfig, load_base

    return load_base(BaseModelConfig(device="cpu")).model


def base_step_fns(model, batch: int = 16) -> dict:
    """The real NF4 base: one decode step at batch 16, and its projections and lm_head alone."""
    with torch.no_grad():
        cache = model(input_ids=torch.randint(0, 1000, (batch, 32)), use_cache=True).past_key_values
    nxt = torch.randint(0, 1000, (batch, 1))
    mods = [getattr(layer.self_attn, f"{n}_proj") for layer in model.model.layers for n in "qkvo"]
    mods += [getattr(layer.mlp, f"{n}_proj") for layer in model.model.layers for n in ("gate", "up", "down")]
    xs = [torch.randn(batch, m.in_features) for m in mods]
    h = torch.randn(batch, model.lm_head.in_features)

    @torch.no_grad()
    def decode():
        # The cache grows by one position per call (32 -> ~100): negligible for the step time.
        model(input_ids=nxt, past_key_values=cache, use_cache=True)

    @torch.no_grad()
    def projections():
        for m, x in zip(mods, xs):
            m(x)

    @torch.no_grad()
    def lm_head():
        model.lm_head(h)

    fns = {"base_decode_step_s": decode, "nf4_projections_s": projections, "lm_head_s": lm_head}
    # The engine's projections: q/k/v and gate/up as one call each, through the route this CPU
    # takes (fused NF4 kernel, or lorad's NF4 kernel and copies where bitsandbytes would dequantize per call).
    from lorad.server.config import EngineConfig
    from lorad.server.model_runner import GROUPS
    from lorad.server.projections import GroupBuilder

    engine = EngineConfig()
    builder = GroupBuilder(engine.dequant_memory, torch.float32, engine.nf4_kernel_rows)
    groups = []
    for layer in model.model.layers:
        owner = {p: layer.self_attn if p in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
                 for _, projs in GROUPS for p in projs}
        for _, projs in GROUPS:
            group = builder.build([getattr(owner[p], p) for p in projs])
            groups.append((group, torch.randn(batch, getattr(owner[projs[0]], projs[0]).in_features)))

    @torch.no_grad()
    def engine_projections():
        for group, x in groups:
            group(x)

    fns["engine_nf4_projections_s"] = engine_projections
    return fns


SHAPES = ("uniform", "ragged", "zipf", "skewed")


def grouped_slots(T: int, D: int, shape: str) -> list[int]:
    """About T tokens over D adapters (slots 0..D-1), grouped by slot. Segment lengths:
    uniform: equal (+-1); ragged: T - D/2 tokens spread uniformly, so that half the segments
    are one token shorter (pad waste 1.1-1.3); zipf: proportional to 1/(d+1), at least 1;
    skewed: one adapter has T - D + 1 tokens, the others one each."""
    if shape in ("uniform", "ragged"):
        n = T - D // 2 if shape == "ragged" else T
        counts = [n // D + (d < n % D) for d in range(D)]
    elif shape == "zipf":
        w = [1 / (d + 1) for d in range(D)]
        counts = [1 + int((T - D) * x / sum(w)) for x in w]
        counts[0] += T - sum(counts)
    else:
        counts = [T - D + 1] + [1] * (D - 1)
    return [d for d, c in enumerate(counts) for _ in range(c)]


def shuffled(slots: list[int], seed: int = 1) -> list[int]:
    return [slots[i] for i in torch.randperm(len(slots), generator=torch.Generator().manual_seed(seed)).tolist()]


def headline(args) -> dict:
    T, D, R = 16, 8, 16
    grouped = grouped_slots(T, D, "uniform")  # [0, 0, 1, 1, ..., 7, 7]
    p = Problem(grouped, D, R, LAYERS)
    p_shuffled = copy.copy(p)
    p_shuffled.slots = shuffled(grouped)
    fns = {
        "twin_grouped_s": lambda: step_twin(p),
        "twin_shuffled_s": lambda: step_twin(p_shuffled),
        "twin_add_lora_s": lambda: step_add_lora(p, "torch"),
        "peft_loop_s": lambda: step_peft_loop(p),
        "gather_bmm_s": lambda: step_gather_bmm(p),
        "read_weights_s": lambda: step_read_weights(p),
    }
    if lora_cpu.available():
        fns["cpu_kernel_s"] = lambda: step_add_lora(p, "cpu")
    if not args.no_model:
        fns |= base_step_fns(load_base_model())
    res = race(fns, args.reps, 2)
    res["build_meta_s"] = bench(lambda: build_lora_meta(grouped, D), args.reps, 20)
    if not args.quick:
        res["peft_layer_s"] = peft_layer_cost(p, args.reps)
    return res


def forced(strategy: bool, fn):
    """fn with the twin's strategy forced (True: padded bmm, False: per-segment)."""

    def run():
        auto = lora_ops_torch.use_padded
        lora_ops_torch.use_padded = lambda meta: strategy
        try:
            fn()
        finally:
            lora_ops_torch.use_padded = auto

    return run


def sweep(args) -> list[dict]:
    """One layer (7 projections) per configuration; metadata built outside the timing."""
    rows = []
    tokens = [1, 16, 64] if args.quick else [1, 16, 64, 256]
    for T in tokens:
        for D in [1, 4, 8, 16]:
            if D > T:
                continue
            for shape in SHAPES if D > 1 else SHAPES[:1]:
                if shape == "ragged" and T - D // 2 < D:
                    continue
                slots = grouped_slots(T, D, shape)
                if shape != "uniform" and slots == grouped_slots(T, D, "uniform"):
                    continue  # e.g. T == D: every shape is one token per adapter
                p = Problem(slots, D, 16, 1)
                p_shuffled = copy.copy(p)
                p_shuffled.slots = shuffled(slots)
                meta, meta_shuffled = build_lora_meta(p.slots, D), build_lora_meta(p_shuffled.slots, D)
                times = race({
                    "padded": forced(True, lambda: step_twin(p, meta)),
                    "segments": forced(False, lambda: step_twin(p, meta)),
                    "auto_shuffled": lambda: step_twin(p_shuffled, meta_shuffled),
                    "peft_loop": lambda: step_peft_loop(p),
                    "gather_bmm": lambda: step_gather_bmm(p),
                }, args.reps, 5)  # fmt: skip
                row = dict(tokens=T, adapters=D, shape=shape, pad_waste=meta.padded_size / meta.num_lora_tokens,
                           auto="padded" if lora_ops_torch.use_padded(meta) else "segments")
                row |= {f"{k}_us": 1e6 * v for k, v in times.items()}
                rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller sweep, no PEFT layer")
    ap.add_argument("--no-model", action="store_true", help="skip the base model's step time")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if args.quick:
        args.reps = 3
    if args.threads:
        # On a shared machine 1 thread measures more steadily: OpenMP regions with a
        # descheduled thread stall at their barrier, which hurts the many-small-ops methods most.
        torch.set_num_threads(args.threads)

    env = dict(date=str(date.today()), machine=platform.machine(), processor=platform.processor(),
               threads=torch.get_num_threads(), torch=torch.__version__,
               load_avg_1min=os.getloadavg()[0])  # fmt: skip
    print(f"# bench_lora_cpu {env}")
    h = headline(args)
    ms = lambda s: f"{1e3 * s:8.2f}"  # noqa: E731
    print("\nLoRA cost per decode step, SmolLM2-135M shapes: 30 layers x 7 projections, "
          "16 tokens over 8 adapters, rank 16, float32")
    print(f"{'method':<34} {'ms/step':>8} {'x PEFT loop':>11}")
    for key, label in [("twin_grouped_s", "twin, tokens grouped by slot"),
                       ("twin_shuffled_s", "twin, tokens shuffled"),
                       ("twin_add_lora_s", "twin add_lora (the engine's call)"),
                       ("cpu_kernel_s", "cpu backend: lorad's C kernel"),
                       ("peft_loop_s", "PEFT loop (plain torch)"),
                       ("peft_layer_s", "PEFT lora.Linear, minus base"),
                       ("gather_bmm_s", "gather + bmm"),
                       ("read_weights_s", "floor: read every adapter weight")]:  # fmt: skip
        if h.get(key) is not None:
            print(f"{label:<34} {ms(h[key])} {h[key] / h['peft_loop_s']:>11.2f}")
    print(f"{'build_lora_meta (once per step)':<34} {ms(h['build_meta_s'])}")
    if "base_decode_step_s" in h:
        print("\nbase model, batch 16 (bitsandbytes NF4 Linear4bit, eval, no_grad)")
        print(f"{'real decode step':<34} {ms(h['base_decode_step_s'])}")
        print(f"{'  of which 210 NF4 projections':<34} {ms(h['nf4_projections_s'])}")
        print(f"{'  of which lm_head 576->49152':<34} {ms(h['lm_head_s'])}")
        if "engine_nf4_projections_s" in h:
            print(f"{'120 grouped projections (engine)':<34} {ms(h['engine_nf4_projections_s'])}")
        twin = h["twin_grouped_s"] + h["build_meta_s"]
        h["twin_over_base"] = twin / h["base_decode_step_s"]
    h["twin_over_peft_loop"] = h["twin_grouped_s"] / h["peft_loop_s"]
    print("\ntargets: twin <= 0.5x PEFT loop: "
          f"{h['twin_over_peft_loop']:.2f}x ({'met' if h['twin_over_peft_loop'] <= 0.5 else 'MISSED'})", end="")
    if "twin_over_base" in h:
        print(f"; twin (+ metadata) <= 15% of the base step: {100 * h['twin_over_base']:.1f}% "
              f"({'met' if h['twin_over_base'] <= 0.15 else 'MISSED'})")
    else:
        print()

    rows = [] if args.no_sweep else sweep(args)
    if rows:
        print(f"\nsweep: one layer (7 projections), rank 16, float32, grouped tokens; us per layer; "
              f"twin cost model SEGMENT_ROWS={lora_ops_torch.SEGMENT_ROWS}, GATHER_COST={lora_ops_torch.GATHER_COST}")
        print(f"{'T':>4} {'D':>3} {'shape':>8} {'waste':>5} | {'padded':>7} {'segments':>8} {'auto':>8} "
              f"{'auto/best':>9} {'shuffled':>8} | {'peft loop':>9} {'gath+bmm':>8} | best")
        for r in rows:
            cands = {"padded": r["padded_us"], "segments": r["segments_us"], "gather_bmm": r["gather_bmm_us"],
                     "peft_loop": r["peft_loop_us"]}
            best = min(cands, key=cands.get)
            r["best"] = best
            r["auto_over_best_twin"] = r[f"{r['auto']}_us"] / min(r["padded_us"], r["segments_us"])
            print(f"{r['tokens']:>4} {r['adapters']:>3} {r['shape']:>8} {r['pad_waste']:>5.1f} | "
                  f"{r['padded_us']:>7.0f} {r['segments_us']:>8.0f} {r['auto']:>8} {r['auto_over_best_twin']:>9.2f} "
                  f"{r['auto_shuffled_us']:>8.0f} | "
                  f"{r['peft_loop_us']:>9.0f} {r['gather_bmm_us']:>8.0f} | {best}")
    env["load_avg_1min_end"] = os.getloadavg()[0]
    result = dict(env=env, headline=h, sweep=rows)
    print("\n" + json.dumps(dict(env=env, headline=h), indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
