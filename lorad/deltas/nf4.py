"""dequant(NF4(W)): the base weights a QLoRA-trained or NF4-served adapter actually saw.

`lorad serve` and `lorad train` load the base with bitsandbytes NF4, double quantization,
blocksize 64, after casting the weights to float32 whatever the compute dtype
(lorad.base_model.nf4_source_dtype). Every Linear projection of every layer is quantized,
whether an adapter targets it or not; embeddings, norms and lm_head are not. Merging an adapter
into dequant(NF4(W)) therefore gives the function the adapter was trained and served against;
merging into W gives a slightly different one (the NF4 rounding, about 10% of each weight's
relative error, no longer sits under the delta).

roundtrip() calls bitsandbytes' own quantize_4bit / dequantize_4bit, so it is bit-identical to
dequantizing the Linear4bit modules `load_base` builds (tests/test_deltas_merge.py checks it).
"""

from __future__ import annotations

import torch

BLOCKSIZE = 64  # bitsandbytes' Linear4bit default, what BitsAndBytesConfig(load_in_4bit=True) uses
QUANT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def roundtrip(weight: torch.Tensor, quant_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dequant(NF4(weight.to(quant_dtype))) as float32: [out, in] -> [out, in]."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight.to(quant_dtype).contiguous(), blocksize=BLOCKSIZE,
                                       quant_type="nf4", compress_statistics=True)
    return bnbf.dequantize_4bit(packed, state).float()
