"""`lorad train --dry-run CONFIG`: everything a run would do up to the first step, without weights.

Reads the data first (a dataset that cannot be fetched fails before anything else), then the
tokenizer and the base's config (not its weights), tokenizes the data (so a bad row fails here,
not an hour in), and prints the resolved config, the step plan, the trainable parameter count,
a memory estimate split into weights, gradients, optimizer state and activations, and whether
that estimate fits in the memory the device has free.
"""

from __future__ import annotations

import os

import yaml

from lorad.base_model import BaseModelConfig, check_architecture, resolve_base, resolve_device
from lorad.errors import BaseModelError
from lorad.trainer import adapter as lora
from lorad.trainer import checkpoint as ck
from lorad.trainer.config import TrainConfig, resolve_precision
from lorad.trainer.data import prepare_data, read_datasets
from lorad.trainer.device_memory import fit_verdict
from lorad.trainer.memory import count_parameters, estimate_memory
from lorad.trainer.optim import check_attention, check_schedule
from lorad.trainer.packing import resolve_packing, rows_of
from lorad.trainer.recipe import Plan


def dry_run_report(cfg: TrainConfig, init_from: str | None = None) -> str:
    from transformers import AutoConfig, AutoTokenizer

    start = None
    if init_from is not None:
        parent = ck.resolve_resume(cfg.output_dir, init_from, flag="--init-from")
        start = lora.StartingAdapter.read("init_from", parent.path, step=parent.step,
                                          fingerprint=parent.state().get("fingerprint"))
    elif cfg.lora_model_dir is not None:
        start = lora.StartingAdapter.read("lora_model_dir", cfg.lora_model_dir)
    if start is not None:
        cfg = lora.apply_starting_adapter(cfg, start)
    raw = read_datasets(cfg)
    resolved = resolve_base(BaseModelConfig(name=cfg.base_model, quant=cfg.quant, device=cfg.device))
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg, device.type)
    check_attention(cfg, device.type, precision)
    try:
        hf_config = AutoConfig.from_pretrained(resolved.location)
        tokenizer = AutoTokenizer.from_pretrained(resolved.location)
    except OSError as exc:
        hint = " (the model hub is unreachable here: pass a local folder)" if resolved.source == "hub" else ""
        raise BaseModelError(f"cannot read base {resolved.display_name!r} from {resolved.location}: {exc}{hint}") from exc
    check_architecture(hf_config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = prepare_data(cfg, tokenizer, raw)
    packing, why = resolve_packing(cfg.sample_packing, data.train, cfg.sequence_len)
    rows = rows_of(data.train, cfg.sequence_len, packing)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = Plan.make(cfg, len(rows), world, bool(data.eval))
    check_schedule(cfg, plan.total_steps, plan.warmup_steps)
    trainable, base_total, shapes = count_parameters(hf_config, cfg)
    longest = max(sum(len(s.input_ids) for s in row) for row in rows)
    memory = estimate_memory(hf_config, cfg, precision, shapes, base_total, longest)

    resolved_cfg = cfg.to_dict()
    resolved_cfg["resolved"] = {
        "base_location": resolved.location,
        "quant": cfg.quant,
        "target_modules": cfg.target_modules,
        "sample_packing": packing,
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
    if start is not None:
        resolved_cfg["resolved"]["start_adapter"] = start.provenance()
    if cfg._ignored:
        resolved_cfg["resolved"]["ignored_axolotl_keys"] = list(cfg._ignored)
    lines = ["# resolved config", yaml.safe_dump(resolved_cfg, sort_keys=False).rstrip(), ""]
    lines += data.report.lines()
    lines.append(f"packing: {why}")
    lines.append(plan.line(cfg))
    lines.append(
        f"trainable parameters: {trainable:,} ({100 * trainable / (base_total + trainable):.2f}% of "
        f"{base_total + trainable:,}); LoRA r={cfg.lora_r} on {', '.join(cfg.target_modules)}"
    )
    lines.append("memory estimate (per process):")
    lines += memory.lines()
    lines.append(fit_verdict(memory.total, device.type, world))
    return "\n".join(lines)
