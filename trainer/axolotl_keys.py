"""axolotl's config keys that `lorad train` knows but does not implement, each with what to do
instead. trainer/config.py turns them into "axolotl key 'deepspeed' is not supported by lorad
train: ..." rather than a did-you-mean towards an unrelated lorad key."""

# axolotl keys lorad reads no further, with what to do instead. A key set to null / false / empty
# asks for nothing and is ignored (axolotl's example configs carry many such blanks).
AXOLOTL_UNSUPPORTED = {
    "deepspeed": "use data parallelism (torchrun --nproc-per-node N -m lorad.cli train CONFIG) or FSDP "
                 "(fsdp: [full_shard, auto_wrap]); see trainer/README.md",
    "fsdp_version": "lorad uses accelerate's FSDP through `fsdp:` / `fsdp_config:`",
    "gptq": "GPTQ bases are not supported; lorad trains over an NF4 (bitsandbytes) base",
    "resume_from_checkpoint": "use `lorad train CONFIG --resume` (latest complete checkpoint) or --resume-from PATH",
    "auto_resume_from_checkpoints": "use `lorad train CONFIG --resume`",
    "dataset_prepared_path": "lorad tokenizes in memory at every start (seconds); there is nothing to prepare",
    "push_dataset_to_hub": "lorad reads data and writes adapters locally",
    "hub_model_id": "lorad does not upload; serve output_dir with `lorad serve --adapters`",
    "hub_strategy": "lorad does not upload; serve output_dir with `lorad serve --adapters`",
    "special_tokens": "an adapter cannot change the tokenizer: every adapter lorad serves shares the base's vocabulary",
    "tokens": "an adapter cannot add tokens: every adapter lorad serves shares the base's vocabulary",
    "chat_template": "the base's own chat template renders `type: chat_template` datasets",
    "xformers_attention": "use attn_implementation: sdpa (default), eager or flash_attention_2",
    "s2_attention": "use attn_implementation: sdpa (default), eager or flash_attention_2",
    "flex_attention": "use attn_implementation: sdpa (default), eager or flash_attention_2",
    "torch_compile": "lorad does not compile the model",
    "loss_watchdog_threshold": "lorad stops the run when the loss becomes NaN or infinite; there is no threshold",
    "early_stopping_patience": "not implemented; watch eval_loss in metrics.jsonl and use --stop-after or Ctrl-C",
    "wandb_project": "lorad writes metrics.jsonl and loss_curve.png into output_dir; no experiment trackers",
    "wandb_entity": "lorad writes metrics.jsonl and loss_curve.png into output_dir; no experiment trackers",
    "wandb_name": "lorad writes metrics.jsonl and loss_curve.png into output_dir; no experiment trackers",
    "wandb_watch": "lorad writes metrics.jsonl and loss_curve.png into output_dir; no experiment trackers",
    "wandb_log_model": "lorad writes metrics.jsonl and loss_curve.png into output_dir; no experiment trackers",
    "mlflow_tracking_uri": "lorad writes metrics.jsonl and loss_curve.png into output_dir; no experiment trackers",
    "use_tensorboard": "lorad writes metrics.jsonl and loss_curve.png into output_dir; no experiment trackers",
    "lora_target_parameters": "lorad serves LoRA on the linear projections only (lora_target_modules)",
    "lora_fan_in_fan_out": "Llama projections are nn.Linear; fan_in_fan_out is for Conv1D models",
    "peft_layers_to_transform": "select layers with a regex in lora_target_modules, e.g. 'model\\.layers\\.(0|1)\\..*\\.q_proj'",
    "peft_trainable_token_indices": "an adapter cannot train embeddings that lorad could serve per request",
    "loraplus_lr_ratio": "not implemented",
    "relora": "not implemented",
    "merge_lora": "merging is a separate step, not part of `lorad train`",
    "rl": "lorad train does supervised fine-tuning only",
    "unsloth_lora_mlp": "lorad has its own fused LoRA path (see trainer/README.md, Speed)",
    "unsloth_lora_qkv": "lorad has its own fused LoRA path (see trainer/README.md, Speed)",
    "unsloth_lora_o": "lorad has its own fused LoRA path (see trainer/README.md, Speed)",
    "eval_sample_packing": "evaluation rows are packed exactly when training rows are (sample_packing)",
    "gradient_checkpointing_kwargs": "lorad always uses non-reentrant checkpointing (gradients reach LoRA over a frozen base)",
    "group_by_length": "lorad orders rows by (seed, epoch) only, so a resumed run sees the same order",
}
# Informational axolotl keys: accepted and not used (lorad reads the base's own config).
AXOLOTL_INFORMATIONAL = ("model_type", "tokenizer_type", "is_llama_derived_model", "strict", "base_model_config",
                         "trust_remote_code")
