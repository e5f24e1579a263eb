"""DoRA (weight-decomposed LoRA, Liu et al. 2024) at inference: the per-output-row scale.

DoRA replaces a LoRA layer's output W x + s B A x by

    (m / ||W + s B A||_row) * (W x + s B A x)          (+ bias, not scaled)

where m [H_out] is the adapter's learned magnitude and the norm is taken over each output row
of the merged weight (PEFT's DoraLinearLayer, which treats the norm as a constant). At
inference every factor is fixed once the adapter is loaded, so the slot pool stores
g = m / ||W + s B A||_row per slot ([S, H_out], 1.0 for plain LoRA adapters) and the expand
op applies it in its epilogue: see lorad.kernels.lora_expand_dora.
"""

from __future__ import annotations

import torch


def dora_row_scale(
    weight: torch.Tensor,  # [H_out, H_in] the base weight (dequantized)
    lora_a: torch.Tensor,  # [r, H_in] PEFT's lora_A.weight
    lora_b: torch.Tensor,  # [H_out, r] PEFT's lora_B.weight
    scaling: float,
    magnitude: torch.Tensor,  # [H_out] PEFT's lora_magnitude_vector[name].weight
) -> torch.Tensor:
    """g = magnitude / ||weight + scaling * lora_b @ lora_a||_row, float32 [H_out].

    Computed in fp32 (PEFT computes the norm in the weight's dtype; fp32 is at least as exact).
    """
    merged = weight.float() + scaling * (lora_b.float() @ lora_a.float())  # [H_out, H_in]
    return (magnitude.float() / torch.linalg.norm(merged, dim=1)).contiguous()
