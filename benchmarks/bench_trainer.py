"""Step time and peak memory: `lorad train` vs a plain PEFT + transformers Trainer script.

Both train the same QLoRA adapter on the same tokens with the same settings (the trainer baseline
of notes/baselines.md): SmolLM2-135M-Instruct NF4 + double quant, LoRA r=16 alpha=32 dropout
0.05 on every projection, prepare_model_for_kbit_training, non-reentrant gradient checkpointing,
adamw_bnb_8bit, lr 2e-4, micro-batch 4 x accumulation 2 x 256 tokens (2,048 tokens per optimizer
step), bf16 autocast where the CPU has it. Each run is its own process; the two alternate (and
swap order every round) so drift of this shared machine hits both alike.

    python benchmarks/bench_trainer.py                    # 2 rounds x 8 steps, table + JSON
    python benchmarks/bench_trainer.py --rounds 3 --steps 12 --json out.json

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

        def on_train_end(self, args, state, control, **kwargs):
            self.train_peak_kib = vm_hwm_kib()

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


def lorad_config(data: Path, out: Path, steps: int, bf16: str) -> dict:
    return dict(
        SETTINGS,
        base_model="smollm2-135m-instruct",
        adapter="qlora",
        datasets=[{"path": str(data), "type": {"field_instruction": "instruction", "field_output": "output",
                                               "format": "{instruction}\n", "no_input_format": "{instruction}\n"}}],
        output_dir=str(out),
        lora_target_linear=True,
        gradient_checkpointing=True,
        max_steps=steps,
        lr_scheduler="linear",
        save_steps=10_000,
        logging_steps=1,
        bf16=bf16,
    )


def worker_lorad(args) -> dict:
    from lorad.trainer.config import config_from_dict
    from lorad.trainer.recipe import QLoRARecipe, quiet_libraries

    cfg = config_from_dict(lorad_config(Path(args.data), Path(args.out), args.steps, args.bf16))
    with quiet_libraries():
        recipe = QLoRARecipe(cfg, echo=lambda msg: None)
        recipe.setup()
        probe = make_probe()
        recipe.trainer.add_callback(probe)
        recipe.progress.enabled = False
        recipe.train()
        losses = [h["loss"] for h in recipe.trainer.state.log_history if "loss" in h]
        recipe.cleanup()
    tokens = SETTINGS["micro_batch_size"] * SETTINGS["gradient_accumulation_steps"] * SETTINGS["sequence_len"]
    return summarize("lorad train", probe, losses, tokens, args.skip)


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


def run_worker(impl: str, data: Path, tmp: Path, args) -> dict:
    out = tmp / f"{impl}-{time.monotonic_ns()}"
    cmd = [sys.executable, __file__, "--worker", impl, "--data", str(data), "--out", str(out),
           "--steps", str(args.steps), "--skip", str(args.skip), "--bf16", args.bf16]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    by = {impl: [r for r in results if r["impl"] == impl] for impl in ("plain PEFT + Trainer", "lorad train")}
    med = {impl: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "tokens_per_s", "train_peak_mib", "load_peak_mib")}
           for impl, rs in by.items()}
    lines = [
        "| implementation | s / optimizer step | tokens/s | train peak RSS | load peak RSS | runs |",
        "|---|---|---|---|---|---|",
    ]
    for impl, m in med.items():
        runs = ", ".join(f"{r['step_s']:.2f}" for r in by[impl])
        lines.append(f"| {impl} | {m['step_s']:.2f} ({runs}) | {m['tokens_per_s']:.0f} | {m['train_peak_mib']:.0f} MiB | "
                     f"{m['load_peak_mib']:.0f} MiB | {len(by[impl])} |")
    lo, pl = med["lorad train"], med["plain PEFT + Trainer"]
    lines.append(f"| **lorad / plain** | **{lo['step_s'] / pl['step_s']:.2f}x** | | **{lo['train_peak_mib'] / pl['train_peak_mib']:.2f}x** | "
                 f"{lo['load_peak_mib'] / pl['load_peak_mib']:.2f}x | |")
    return "\n".join(lines), med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=3, help="first step counted in the median")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--bf16", default="auto", choices=["auto", "true", "false"])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", choices=["lorad", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.bf16 = {"auto": "auto", "true": True, "false": False}[args.bf16] if args.worker else args.bf16

    if args.worker:
        result = worker_lorad(args) if args.worker == "lorad" else worker_plain(args)
        print(json.dumps(result))
        return

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        tmp = Path(tmp)
        rows = SETTINGS["micro_batch_size"] * SETTINGS["gradient_accumulation_steps"] * args.steps
        data = write_data(tmp / "data.jsonl", rows, seed=0)
        for round_ in range(args.rounds):
            order = ["plain", "lorad"] if round_ % 2 == 0 else ["lorad", "plain"]
            for impl in order:
                r = run_worker(impl, data, tmp, args)
                r["round"] = round_
                results.append(r)
                print(f"round {round_ + 1}/{args.rounds} {r['impl']:>22}: {r['step_s']:.2f} s/step, "
                      f"train peak {r['train_peak_mib']:.0f} MiB, losses {[round(x, 4) for x in r['losses'][:3]]}...",
                      file=sys.stderr, flush=True)
    text, med = table(results)
    summary = {
        "settings": dict(SETTINGS, steps=args.steps, median_from_step=args.skip, rounds=args.rounds,
                         threads=args.threads or "default", bf16=args.bf16),
        "median": med,
        "ratio": {
            "step_time": med["lorad train"]["step_s"] / med["plain PEFT + Trainer"]["step_s"],
            "train_peak_memory": med["lorad train"]["train_peak_mib"] / med["plain PEFT + Trainer"]["train_peak_mib"],
        },
        "runs": results,
    }
    print(text)
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
