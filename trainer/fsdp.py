"""FSDP for `lorad train`: transformers' Trainer drives accelerate's FullyShardedDataParallel.

    torchrun --nproc-per-node 2 -m lorad.cli train cfg.yaml     # with `fsdp: [full_shard, auto_wrap]`

axolotl's keys: `fsdp` (a list or space-separated string of transformers' FSDP options) and
`fsdp_config` (its `fsdp_`-prefixed keys are accepted with or without the prefix). lorad fills
in what LoRA needs:
  * auto_wrap by decoder layer (LlamaDecoderLayer), so each layer's weights are whole only while
    that layer runs;
  * use_orig_params: the frozen base and the trainable LoRA tensors live in the same wrapped
    units, which FSDP only allows with the original parameters kept;
  * the full (gathered) state dict on save, so checkpoints and the published adapter hold the
    whole LoRA tensors, in PEFT's format, exactly as without FSDP.

QLoRA + FSDP (adapter: qlora) needs bitsandbytes to store the NF4 weights in the same dtype as
the rest of the model (`bnb_4bit_quant_storage`, set here to the compute dtype), so FSDP can
flatten them together with the norms and embeddings. That combination is written for CUDA and
is untested until it runs on a GPU (tests/test_trainer_fsdp.py skips without one).
"""

from __future__ import annotations

from lorad.errors import ConfigError

FSDP_OPTIONS = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard", "offload", "auto_wrap")
LAYER_CLASS = "LlamaDecoderLayer"  # lorad trains Llama-family bases (Mistral's layer class is MistralDecoderLayer)


def fsdp_options(cfg) -> list[str]:
    raw = cfg.fsdp
    options = raw.split() if isinstance(raw, str) else list(raw or [])
    unknown = [o for o in options if o not in FSDP_OPTIONS]
    if unknown:
        raise ConfigError(f"fsdp: {unknown[0]!r} is not one of {', '.join(FSDP_OPTIONS)}")
    return options


def fsdp_arguments(cfg, device_type: str, world_size: int, layer_class: str = LAYER_CLASS) -> dict:
    """TrainingArguments keyword arguments for the config's FSDP settings ({} without FSDP)."""
    options = fsdp_options(cfg)
    if not options:
        return {}
    if world_size < 2:
        raise ConfigError("fsdp: shards the model over processes; start the run with torchrun --nproc-per-node N "
                          "(N >= 2), or drop fsdp for one process")
    if cfg.quant == "nf4" and device_type != "cuda":
        raise ConfigError("fsdp with adapter: qlora shards NF4 weights stored as bf16 (bitsandbytes' quant_storage), "
                          "which lorad runs on CUDA only; on CPU use adapter: lora with fsdp, or DDP (no fsdp key)")
    if cfg.lora_modules_to_save:
        raise ConfigError("fsdp and lora_modules_to_save: a fully trained module inside a sharded unit is not "
                          "supported by lorad; drop one of them")
    if "offload" in options and device_type != "cuda":
        raise ConfigError("fsdp: offload moves parameters to the CPU between uses; there is nothing to offload on a CPU run")
    fsdp_config = {key.removeprefix("fsdp_"): value for key, value in (cfg.fsdp_config or {}).items()}
    fsdp_config.setdefault("transformer_layer_cls_to_wrap", [layer_class])
    fsdp_config["use_orig_params"] = True  # frozen base + trainable LoRA in one unit
    fsdp_config.setdefault("state_dict_type", "FULL_STATE_DICT")
    fsdp_config.setdefault("sync_module_states", True)
    if "auto_wrap" not in options:
        options.append("auto_wrap")
    return {"fsdp": " ".join(options), "fsdp_config": fsdp_config}


def enable_fsdp_on_cpu(trainer) -> bool:
    """accelerate turns its FSDP plugin on only for GPU-family process groups; on CPU (gloo) it
    silently falls back to DDP. torch's FSDP2 (fully_shard) runs on CPU, so lorad hands accelerate
    the plugin the Trainer built: the same sharded code path a GPU run takes is then what the CPU
    tests exercise. Returns whether it did."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if trainer.args.fsdp_plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True
    return True
