"""Checks, before the first step, that the optimizer, the LR schedule and the attention kernel a
config names can actually be built here.

The names themselves are validated in trainer/config.py against transformers' own enums, so any
optimizer or scheduler the pinned transformers knows is accepted. What the enum cannot say is
whether its package is installed (galore, apollo, torchao, schedule-free, ...), whether
`lr_scheduler_kwargs` fit the schedule, or whether FlashAttention-2 exists on this machine;
each of those is a ConfigError naming the key here instead of a traceback at step 0.
"""

from __future__ import annotations

from lorad.errors import ConfigError


def check_attention(cfg, device_type: str, precision) -> None:
    impl = cfg.attn_implementation
    if impl != "flash_attention_2":
        return
    from transformers.utils import is_flash_attn_2_available

    if device_type != "cuda":
        raise ConfigError("attn_implementation: flash_attention_2 runs on CUDA GPUs only; on this "
                          f"{device_type} device use sdpa (the default) or eager")
    if not is_flash_attn_2_available():
        raise ConfigError("attn_implementation: flash_attention_2 needs the flash-attn package "
                          "(pip install flash-attn --no-build-isolation), which is not installed; use sdpa (the default)")
    if not (precision.bf16 or precision.fp16):
        raise ConfigError("attn_implementation: flash_attention_2 computes in bf16 or fp16; set bf16: true (or auto)")


def check_optimizer(args, model) -> None:
    """Resolve the optimizer class as the Trainer will; a missing package or a bad argument
    becomes a ConfigError."""
    from transformers import Trainer

    try:
        Trainer.get_optimizer_cls_and_kwargs(args, model)
    except (ImportError, ValueError, RuntimeError) as exc:
        name = getattr(args.optim, "value", args.optim)
        raise ConfigError(f"optimizer: {name} cannot be used here: {exc}") from exc


def check_schedule(cfg, total_steps: int, warmup_steps: int) -> None:
    """Build the schedule on a throw-away optimizer: unknown or missing lr_scheduler_kwargs fail here."""
    import torch
    from transformers import get_scheduler

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate)
    try:
        get_scheduler(cfg.lr_scheduler, optimizer=probe, num_warmup_steps=warmup_steps,
                      num_training_steps=total_steps, scheduler_specific_kwargs=dict(cfg.lr_scheduler_kwargs or {}))
    except (TypeError, ValueError) as exc:
        kwargs = cfg.lr_scheduler_kwargs or {}
        raise ConfigError(f"lr_scheduler_kwargs: {kwargs} do not fit lr_scheduler {cfg.lr_scheduler} ({exc})") from exc
