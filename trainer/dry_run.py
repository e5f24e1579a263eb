"""`lorad train --dry-run CONFIG`: everything a run would do up to the first step, without weights.

Reads the tokenizer and the base's config (not its weights), tokenizes the data (so a bad row
fails here, not an hour in), and prints the resolved config, the step plan, the trainable
parameter count and a memory estimate split into weights, gradients, optimizer state and
activations.
"""

from __future__ import annotations

import os

import yaml

from lorad.base_model import BaseModelConfig, check_architecture, resolve_base, resolve_device
from lorad.errors import BaseModelError
from lorad.trainer.config import TrainConfig, resolve_precision
from lorad.trainer.data import prepare_data
from lorad.trainer.memory import count_parameters, estimate_memory
from lorad.trainer.packing import rows_of
from lorad.trainer.recipe import Plan


def dry_run_report(cfg: TrainConfig) -> str:
    from transformers import AutoConfig, AutoTokenizer

    resolved = resolve_base(BaseModelConfig(name=cfg.base_model, quant=cfg.quant, device=cfg.device))
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg, device.type)
    try:
        hf_config = AutoConfig.from_pretrained(resolved.location)
        tokenizer = AutoTokenizer.from_pretrained(resolved.location)
    except OSError as exc:
        raise BaseModelError(f"cannot read base {resolved.display_name!r} from {resolved.location}: {exc}") from exc
    check_architecture(hf_config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = prepare_data(cfg, tokenizer)
    rows = rows_of(data.train, cfg.sequence_len, cfg.sample_packing)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = Plan.make(cfg, len(rows), world, bool(data.eval))
    trainable, base_total, shapes = count_parameters(hf_config, cfg)
    longest = max(sum(len(s.input_ids) for s in row) for row in rows)
    memory = estimate_memory(hf_config, cfg, precision, shapes, base_total, longest)

    resolved_cfg = cfg.to_dict()
    resolved_cfg["resolved"] = {
        "base_location": resolved.location,
        "quant": cfg.quant,
        "target_modules": cfg.target_modules,
        "bf16": precision.bf16,
        "fp16": precision.fp16,
        "tf32": precision.tf32,
        "device": device.type,
        "world_size": world,
        "total_steps": plan.total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "warmup_steps": plan.warmup_steps,
        "save_steps": plan.save_steps,
        "eval_steps": plan.eval_steps,
    }
    lines = ["# resolved config", yaml.safe_dump(resolved_cfg, sort_keys=False).rstrip(), ""]
    lines += data.report.lines()
    lines.append(plan.line(cfg))
    lines.append(
        f"trainable parameters: {trainable:,} ({100 * trainable / (base_total + trainable):.2f}% of "
        f"{base_total + trainable:,}); LoRA r={cfg.lora_r} on {', '.join(cfg.target_modules)}"
    )
    lines.append("memory estimate (per process):")
    lines += memory.lines()
    return "\n".join(lines)
