"""Step time and peak memory: `lorad train` vs a plain PEFT + transformers Trainer script.

Both train the same QLoRA adapter on the same tokens with the same settings (the trainer baseline
of notes/baselines.md): SmolLM2-135M-Instruct NF4 + double quant, LoRA r=16 alpha=32 dropout
0.05 on every projection, prepare_model_for_kbit_training, non-reentrant gradient checkpointing,
adamw_bnb_8bit, lr 2e-4, micro-batch 4 x accumulation 2 x 256 tokens (2,048 tokens per optimizer
step), bf16 autocast where the CPU has it. Each run is its own process; the two alternate (and
swap order every round) so drift of this shared machine hits both alike.

    python benchmarks/bench_trainer.py                    # 2 rounds x 8 steps, table + JSON
    python benchmarks/bench_trainer.py --rounds 3 --steps 12 --json out.json
    python benchmarks/bench_trainer.py --impls plain,lorad,lorad-peft   # + lorad on PEFT's own LoRA forward
    python benchmarks/bench_trainer.py --sweep            # the memory/speed table of trainer/README.md

--sweep runs, one process each, the configurations of the efficient-training table (baseline;
gradient checkpointing + accumulation; + bf16 mixed precision; then the optimizers AdamW, 8-bit
AdamW, paged 8-bit AdamW, Adafactor) through `lorad train` and prints time per step, tokens/s,
train peak RSS and the final train and eval loss.

Every run prints the CPU path (torch's CPU capability, AVX512-BF16, whether bitsandbytes takes its
fused NF4 kernel) and `uptime` before and after: figures from a loaded machine measure the load.

Measured per run:
  step time      median of the optimizer-step intervals from step 3 on (wall clock between
                 consecutive on_step_end callbacks)
  train peak     peak RSS from the start of Trainer.train() to its end (VmHWM is reset through
                 /proc/self/clear_refs when training starts, so model loading is excluded)
  load peak      peak RSS before training starts (imports, model load, data)

The plain script is what a user would write: the model returns the loss from `labels`
(transformers' ForCausalLMLoss over full [B, T, V] logits), DataCollatorForSeq2Seq pads. It is fed
token ids produced by lorad's data code, so both runs see identical tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the a river mountain quiet engine garden letter window silver morning story answer number city "
    "bright slowly under between little green history market friend question light paper ocean voice"
).split()

SETTINGS = {
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "sequence_len": 256,
    "learning_rate": 2e-4,
    "optimizer": "adamw_bnb_8bit",
    "seed": 42,
}


# ---- measurement hooks shared by both workers ---------------------------------------------------


def vm_hwm_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def make_probe():
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self):
            self.step_ends: list[float] = []
            self.train_peak_kib = 0
            self.load_peak_kib = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.load_peak_kib = vm_hwm_kib()  # everything before training: imports, model load, data
            reset_peak()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())
            if state.global_step == 2 and os.environ.get("LORAD_BENCH_PROFILE"):  # steady state: step 3 on
                import torch

                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.profiler.__enter__()

        def on_train_end(self, args, state, control, **kwargs):
            self.train_peak_kib = vm_hwm_kib()
            profiler = getattr(self, "profiler", None)
            if profiler is not None:
                profiler.__exit__(None, None, None)
                Path(os.environ["LORAD_BENCH_PROFILE"]).write_text(
                    profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))

    return Probe()


def summarize(impl: str, probe, losses: list[float], tokens_per_step: int, skip: int) -> dict:
    intervals = [b - a for a, b in zip(probe.step_ends, probe.step_ends[1:])]  # interval i = step i + 2
    steady = intervals[max(0, skip - 2):] or intervals
    step_s = statistics.median(steady)
    return {
        "impl": impl,
        "step_s": step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "train_peak_mib": probe.train_peak_kib / 1024,
        "load_peak_mib": probe.load_peak_kib / 1024,
        "losses": losses,
        "steps": len(probe.step_ends),
    }


# ---- workers ------------------------------------------------------------------------------------


def lorad_config(data: Path, out: Path, steps: int, bf16: str, **overrides) -> dict:
    return dict(
        SETTINGS,
        base_model="smollm2-135m-instruct",
        adapter="qlora",
        datasets=[{"path": str(data), "type": {"field_instruction": "instruction", "field_output": "output",
                                               "format": "{instruction}\n", "no_input_format": "{instruction}\n"}}],
        output_dir=str(out),
        lora_target_linear=True,
        gradient_checkpointing=True,
        sample_packing=False,  # the rows fill sequence_len anyway; stated so the settings match the plain script
        max_steps=steps,
        lr_scheduler="linear",
        save_steps=10_000,
        logging_steps=1,
        bf16=bf16,
    ) | overrides  # a sweep row's settings win


def worker_lorad(args) -> dict:
    from lorad.trainer.config import config_from_dict
    from lorad.trainer.recipe import QLoRARecipe, quiet_libraries

    overrides = json.loads(args.overrides) if args.overrides else {}
    bf16 = overrides.pop("bf16", args.bf16)  # a sweep row's own precision wins over --bf16
    cfg = config_from_dict(lorad_config(Path(args.data), Path(args.out), args.steps, bf16, **overrides))
    with quiet_libraries():
        recipe = QLoRARecipe(cfg, echo=lambda msg: None)
        recipe.setup()
        probe = make_probe()
        recipe.trainer.add_callback(probe)
        recipe.progress.enabled = False
        recipe.train()
        history = recipe.trainer.state.log_history
        losses = [h["loss"] for h in history if "loss" in h]
        evals = [h["eval_loss"] for h in history if "eval_loss" in h]
        fast = recipe.fast_layers
        recipe.cleanup()
    tokens = cfg.micro_batch_size * cfg.gradient_accumulation_steps * cfg.sequence_len
    name = "lorad train" if fast else "lorad train (PEFT forward)"
    out = summarize(name, probe, losses, tokens, args.skip)
    out.update(eval_losses=evals, fast_lora_layers=fast)
    return out


def worker_plain(args) -> dict:
    """A plain QLoRA script: transformers + PEFT + bitsandbytes, nothing of lorad in the loop."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from lorad.base_model import BaseModelConfig, resolve_base
    from lorad.trainer.config import config_from_dict, resolve_precision
    from lorad.trainer.data import prepare_data

    cfg = config_from_dict(lorad_config(Path(args.data), Path(args.out), args.steps, args.bf16))
    bf16 = resolve_precision(cfg, "cpu").bf16
    dtype = torch.bfloat16 if bf16 else torch.float32
    location = resolve_base(BaseModelConfig()).location
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(
        location,
        dtype=dtype,
        device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        ),
    )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    set_seed(SETTINGS["seed"])
    model = get_peft_model(
        model,
        LoraConfig(r=SETTINGS["lora_r"], lora_alpha=SETTINGS["lora_alpha"], lora_dropout=SETTINGS["lora_dropout"],
                   target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    samples = prepare_data(cfg, tokenizer).train
    train_dataset = [{"input_ids": s.input_ids, "labels": s.labels, "attention_mask": [1] * len(s.input_ids)} for s in samples]
    targs = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=SETTINGS["micro_batch_size"],
        gradient_accumulation_steps=SETTINGS["gradient_accumulation_steps"],
        max_steps=args.steps,
        learning_rate=SETTINGS["learning_rate"],
        lr_scheduler_type="linear",
        optim=SETTINGS["optimizer"],
        bf16=bf16,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=SETTINGS["seed"],
    )
    probe = make_probe()
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train_dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[probe],
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = SETTINGS["micro_batch_size"] * SETTINGS["gradient_accumulation_steps"] * SETTINGS["sequence_len"]
    return summarize("plain PEFT + Trainer", probe, losses, tokens, args.skip)


# ---- driver -------------------------------------------------------------------------------------


def write_data(path: Path, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            instruction = "Summarize: " + " ".join(rng.choice(WORDS) for _ in range(160))
            output = " ".join(rng.choice(WORDS) for _ in range(200))
            f.write(json.dumps({"instruction": instruction, "output": output}) + "\n")
    return path


def run_worker(impl: str, data: Path, tmp: Path, args, overrides: dict | None = None, steps: int | None = None) -> dict:
    out = tmp / f"{impl}-{time.monotonic_ns()}"
    worker = "plain" if impl == "plain" else "lorad"
    cmd = [sys.executable, __file__, "--worker", worker, "--data", str(data), "--out", str(out),
           "--steps", str(steps or args.steps), "--skip", str(args.skip), "--bf16", args.bf16]
    if overrides:
        cmd += ["--overrides", json.dumps(overrides)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if impl == "lorad-peft":
        env["LORAD_TRAIN_PEFT_FORWARD"] = "1"
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if getattr(args, "profile", None):
        args.profile.mkdir(parents=True, exist_ok=True)
        env["LORAD_BENCH_PROFILE"] = str(args.profile / f"{impl}-{time.monotonic_ns()}.txt")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


IMPL_NAMES = {"plain": "plain PEFT + Trainer", "lorad": "lorad train", "lorad-peft": "lorad train (PEFT forward)"}


def table(results: list[dict], impls: list[str]) -> tuple[str, dict]:
    names = [IMPL_NAMES[i] for i in impls]
    by = {name: [r for r in results if r["impl"] == name] for name in names}
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "tokens_per_s", "train_peak_mib", "load_peak_mib")}
           for name, rs in by.items()}
    lines = [
        "| implementation | s / optimizer step | tokens/s | train peak RSS | load peak RSS | runs |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in med.items():
        runs = ", ".join(f"{r['step_s']:.2f}" for r in by[name])
        lines.append(f"| {name} | {m['step_s']:.2f} ({runs}) | {m['tokens_per_s']:.0f} | {m['train_peak_mib']:.0f} MiB | "
                     f"{m['load_peak_mib']:.0f} MiB | {len(by[name])} |")
    plain = med[IMPL_NAMES["plain"]]
    for name in names[1:]:
        m = med[name]
        lines.append(f"| **{name} / plain** | **{m['step_s'] / plain['step_s']:.2f}x** | | "
                     f"**{m['train_peak_mib'] / plain['train_peak_mib']:.2f}x** | {m['load_peak_mib'] / plain['load_peak_mib']:.2f}x | |")
    # per-round ratios: each round ran its implementations back to back, so drift cancels inside a round
    rounds = sorted({r["round"] for r in results})
    for name in names[1:]:
        ratios = []
        for rd in rounds:
            a = [r for r in results if r["round"] == rd and r["impl"] == name]
            b = [r for r in results if r["round"] == rd and r["impl"] == IMPL_NAMES["plain"]]
            if a and b:
                ratios.append(a[0]["step_s"] / b[0]["step_s"])
        lines.append(f"per-round step-time ratio {name} / plain: {', '.join(f'{x:.2f}' for x in ratios)}")
    return "\n".join(lines), med


def machine_line() -> str:
    """Which CPU path runs, and how loaded the machine is."""
    import torch
    from bitsandbytes.functional import has_avx512bf16

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return (f"cpu: torch capability {torch.backends.cpu.get_cpu_capability()}, avx512_bf16={'avx512_bf16' in flags}, "
            f"amx={'amx_tile' in flags}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; bitsandbytes "
            f"NF4: {'fused AVX512-BF16 kernel for inference, dequantize + matmul while training' if has_avx512bf16() else 'dequantize + matmul'}"
            f"; uptime: {uptime()}")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "n/a"


# ---- the sweep: the efficient-training table -------------------------------------------------------

# (row name, lorad config overrides); each row changes one thing from the row above, except the
# optimizer rows, which all start from "+ bf16 mixed precision"
SWEEP = [
    ("baseline: micro-batch 4, no checkpointing, float32, AdamW",
     {"micro_batch_size": 4, "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "bf16": False,
      "optimizer": "adamw_torch"}),
    ("+ gradient checkpointing, micro-batch 1 x accumulation 4",
     {"micro_batch_size": 1, "gradient_accumulation_steps": 4, "gradient_checkpointing": True, "bf16": False,
      "optimizer": "adamw_torch"}),
    ("+ bf16 mixed precision (AdamW)",
     {"micro_batch_size": 1, "gradient_accumulation_steps": 4, "gradient_checkpointing": True, "bf16": True,
      "optimizer": "adamw_torch"}),
    ("  optimizer: 8-bit AdamW (bitsandbytes)",
     {"micro_batch_size": 1, "gradient_accumulation_steps": 4, "gradient_checkpointing": True, "bf16": True,
      "optimizer": "adamw_bnb_8bit"}),
    ("  optimizer: paged 8-bit AdamW",
     {"micro_batch_size": 1, "gradient_accumulation_steps": 4, "gradient_checkpointing": True, "bf16": True,
      "optimizer": "paged_adamw_8bit"}),
    ("  optimizer: Adafactor",
     {"micro_batch_size": 1, "gradient_accumulation_steps": 4, "gradient_checkpointing": True, "bf16": True,
      "optimizer": "adafactor"}),
]


def run_sweep(args) -> None:
    import torch

    if "bf16" in json.dumps(SWEEP) and not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        print("note: this CPU has no AVX512-BF16/AMX: the bf16 rows emulate bf16 and are not the speed a bf16 CPU gets",
              file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        tmp = Path(tmp)
        # rows for args.steps optimizer steps of 4 x 256 tokens, plus an eval set of 8 rows
        data = write_data(tmp / "data.jsonl", 4 * args.steps + 8, seed=1)
        print(machine_line(), file=sys.stderr, flush=True)
        for name, overrides in SWEEP:
            overrides = dict(overrides, val_set_size=8, eval_steps=args.steps, lr_scheduler="constant",
                             learning_rate=1e-3, optimizer=overrides["optimizer"])
            r = run_worker("lorad", data, tmp, args, overrides)
            r["row"] = name
            results.append(r)
            print(f"{name}: {r['step_s']:.2f} s/step, peak {r['train_peak_mib']:.0f} MiB, loss {r['losses'][-1]:.4f}, "
                  f"eval {r['eval_losses'][-1] if r['eval_losses'] else float('nan'):.4f}", file=sys.stderr, flush=True)
        print(machine_line(), file=sys.stderr, flush=True)
    lines = ["| configuration | s / step | tokens/s | train peak RSS | final train loss | final eval loss |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['row'].strip()} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['train_peak_mib']:.0f} MiB | "
                     f"{r['losses'][-1]:.4f} | {r['eval_losses'][-1]:.4f} |")
    print("\n".join(lines))
    print(json.dumps({"sweep": results, "steps": args.steps, "threads": args.threads or "default"}))
    if args.json:
        args.json.write_text(json.dumps({"sweep": results}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=3, help="first step counted in the median")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--bf16", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--impls", default="plain,lorad", help="side by side: plain, lorad, lorad-peft (comma-separated)")
    parser.add_argument("--sweep", action="store_true", help="the efficient-training table instead of the comparison")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--profile", type=Path, default=None,
                        help="write each run's torch.profiler table (self CPU time, step 3 on) into this folder "
                             "(profiling slows the runs: its step times are not the benchmark's)")
    parser.add_argument("--worker", choices=["lorad", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.bf16 = {"auto": "auto", "true": True, "false": False}[args.bf16] if args.worker else args.bf16

    if args.worker:
        result = worker_lorad(args) if args.worker == "lorad" else worker_plain(args)
        print(json.dumps(result))
        return
    if args.sweep:
        run_sweep(args)
        return

    impls = args.impls.split(",")
    assert impls[0] == "plain" and all(i in IMPL_NAMES for i in impls), "--impls starts with plain"
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        tmp = Path(tmp)
        rows = SETTINGS["micro_batch_size"] * SETTINGS["gradient_accumulation_steps"] * args.steps
        data = write_data(tmp / "data.jsonl", rows, seed=0)
        print(machine_line(), file=sys.stderr, flush=True)
        for round_ in range(args.rounds):
            order = impls if round_ % 2 == 0 else impls[::-1]
            for impl in order:
                r = run_worker(impl, data, tmp, args)
                r["round"] = round_
                results.append(r)
                print(f"round {round_ + 1}/{args.rounds} {r['impl']:>28}: {r['step_s']:.2f} s/step, "
                      f"train peak {r['train_peak_mib']:.0f} MiB, losses {[round(x, 4) for x in r['losses'][:3]]}...",
                      file=sys.stderr, flush=True)
        print(machine_line(), file=sys.stderr, flush=True)
    text, med = table(results, impls)
    plain = med[IMPL_NAMES["plain"]]
    summary = {
        "settings": dict(SETTINGS, steps=args.steps, median_from_step=args.skip, rounds=args.rounds,
                         threads=args.threads or "default", bf16=args.bf16),
        "median": med,
        "ratio": {name: {"step_time": m["step_s"] / plain["step_s"], "train_peak_memory": m["train_peak_mib"] / plain["train_peak_mib"]}
                  for name, m in med.items() if name != IMPL_NAMES["plain"]},
        "runs": results,
    }
    print(text)
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
