"""What `lorad train --dry-run` says about size: trainable parameters (exact) and memory (estimated).

The parameter count builds the model on the meta device (no weights are read) and wraps it
with the same LoraConfig the run uses, so it is PEFT's own count.

The memory estimate, per process, in bytes:

    weights      NF4 linears: 0.5 B/param + double-quantized absmax (1 B per 64 params +
                 4 B per 64*256); other params (embeddings, norms) in float32 (as
                 prepare_model_for_kbit_training leaves them); unquantized base: 2 or 4 B/param;
                 LoRA params 4 B each
    gradients    4 B per trainable param
    optimizer    Adam-like 8 B/param; 8-bit (bitsandbytes) 2 B/param (+ absmax) for tensors of 4096+
                 elements, 8 B for smaller ones; adafactor 4 B * (rows + cols) per matrix
    activations  one micro-batch of the longest rows (B x T tokens):
                   checkpointing: every layer's input [B, T, H] in float32 + one layer recomputed
                   no checkpointing: every layer's saved tensors
                 + the loss head: one chunk of logits [chunk, V] float32 (x2) + [N, H] gradient

The activation term is a model of the saved tensors, not a measurement; it ignores allocator
slack and the process's own overhead (Python, torch, a CUDA context). trainer/README.md
compares it with the peak measured by benchmarks/bench_trainer.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorad.trainer.loss import CHUNK_ELEMENTS


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    batch_tokens: tuple[int, int]  # (B, T) the activation term assumes

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def lines(self) -> list[str]:
        b, t = self.batch_tokens
        rows = [
            ("weights", self.weights, "base (quantized linears + float32 rest) + LoRA"),
            ("gradients", self.gradients, "LoRA parameters only"),
            ("optimizer state", self.optimizer, ""),
            ("activations", self.activations, f"one micro-batch of {b} x {t} tokens"),
            ("total", self.total, "live tensors per process; RSS adds Python/torch and allocator slack"),
        ]
        return [f"  {name:<16} {_mib(value):>10}  {note}".rstrip() for name, value, note in rows]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def count_parameters(hf_config, cfg) -> tuple[int, int, dict[str, list[tuple[int, ...]]]]:
    """(trainable, base total, trainable tensor shapes by name) from a meta-device model."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lorad.trainer.adapter import lora_config_for, lora_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    base_total = sum(p.numel() for p in model.parameters())
    lora_config = lora_config_for(cfg)
    lora_config.init_lora_weights = True  # the count does not depend on the init; PiSSA & co. need real weights
    peft_model = get_peft_model(model, lora_config)
    lora_modules(peft_model, cfg)  # targets lorad cannot serve fail here, as in a run
    shapes = {n: tuple(p.shape) for n, p in peft_model.named_parameters() if p.requires_grad}
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return trainable, base_total, shapes


def _optimizer_bytes(optimizer: str, shapes: dict[str, tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        if optimizer in ("sgd", "lomo", "adalomo") or optimizer.startswith("schedule_free_sgd"):
            total += 4 * n  # momentum (sgd), or nothing kept (lomo): an upper bound
        elif "adafactor" in optimizer:
            total += 4 * (sum(shape) if len(shape) == 2 else n)
        elif "8bit" in optimizer or optimizer in ("adamw_bnb_8bit", "rmsprop_bnb_8bit"):
            total += (2 * n + 2 * 4 * -(-n // 256)) if n >= 4096 else 8 * n  # bitsandbytes: 4096+ elements in 8 bits
        elif "4bit" in optimizer:
            total += n + 8 * -(-n // 128)
        else:  # Adam-like: two float32 moments (AdamW, Lion keeps one: an upper bound)
            total += 8 * n
    return total


def estimate_memory(hf_config, cfg, precision, shapes: dict, base_total: int, longest_row: int) -> MemoryEstimate:
    L = hf_config.num_hidden_layers
    H = hf_config.hidden_size
    I = hf_config.intermediate_size
    nh = hf_config.num_attention_heads
    kvh = getattr(hf_config, "num_key_value_heads", None) or nh
    hd = getattr(hf_config, "head_dim", None) or H // nh
    V = hf_config.vocab_size
    linear_per_layer = H * nh * hd + 2 * H * kvh * hd + nh * hd * H + 3 * H * I
    linear = L * linear_per_layer
    other = base_total - linear
    trainable = sum(_numel(s) for s in shapes.values())
    half = precision.bf16 or precision.fp16
    act_bytes = 2 if half else 4

    if cfg.quant == "nf4":
        weights = linear // 2 + linear // 64 + 4 * (linear // (64 * 256)) + 4 * other
    else:
        weights = (2 if half else 4) * (linear + other)
    weights += 4 * trainable
    gradients = 4 * trainable
    optimizer = _optimizer_bytes(cfg.optimizer, shapes)

    B, T = cfg.micro_batch_size, min(cfg.sequence_len, max(1, longest_row))
    r = cfg.lora_r
    n_targets = sum(1 for name in shapes if "lora_A" in name) / L  # LoRA modules per layer (regexes may skip layers)
    # saved for backward in one decoder layer (tokens x bytes):
    per_token = (
        4 * H * 4  # two RMSNorm inputs/outputs, float32 residual stream
        + act_bytes * (nh * hd + 2 * kvh * hd)  # q, k, v
        + act_bytes * nh * hd + 4 * nh  # attention output + logsumexp (SDPA keeps no T x T scores)
        + act_bytes * 4 * I  # gate, up, act(gate), act(gate) * up
        + n_targets * (4 * H + 4 * r)  # LoRA: dropout(x) and A x per target (float32)
    )
    layer = B * T * per_token
    if cfg.gradient_checkpointing:
        body = L * B * T * H * 4 + layer
    else:
        body = L * layer
    chunk = max(16, CHUNK_ELEMENTS // V)
    head = 2 * 4 * min(chunk, B * T) * V + 4 * B * T * H
    return MemoryEstimate(weights, gradients, optimizer, body + head, (B, T))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
