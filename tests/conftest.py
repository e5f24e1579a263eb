"""Shared fixtures: the real embedded base (SmolLM2-135M, NF4) and a tiny random Llama.

The real base is converted once into the lorad cache (~40 s the first time on 2 cores, ~3 s
to load afterwards). The tiny base shares SmolLM2's tokenizer so prompts and chat templates
behave like the real thing, at a fraction of the cost.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from lorad.base_model import BaseModelConfig, LoadedBase, ResolvedBase, embedded_model_dir, load_base  # noqa: E402
from lorad.geometry import ModelGeometry  # noqa: E402
from lorad.testing import tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def smollm_dir():
    return embedded_model_dir()


@pytest.fixture(scope="session")
def smollm_base(smollm_dir) -> LoadedBase:
    """The real embedded base, NF4, shared by every test that only reads it."""
    return load_base(BaseModelConfig())


@pytest.fixture(scope="session")
def tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="session")
def tiny_base(tokenizer) -> LoadedBase:
    """A 2-layer random Llama (float32) with SmolLM2's tokenizer."""
    model = tiny_llama(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return LoadedBase(
        model=model,
        tokenizer=tokenizer,
        resolved=ResolvedBase("tiny-llama", "local", "<memory>", "none"),
        device=torch.device("cpu"),
        compute_dtype=torch.float32,
    )


@pytest.fixture(scope="session")
def long_base(tokenizer) -> LoadedBase:
    """The tiny random Llama with room for 2048 positions: a request can run for seconds."""
    model = tiny_llama(len(tokenizer), max_position_embeddings=2048)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return LoadedBase(model=model, tokenizer=tokenizer, resolved=ResolvedBase("tiny-llama", "local", "<memory>", "none"),
                      device=torch.device("cpu"), compute_dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_geometry(tiny_base) -> ModelGeometry:
    return ModelGeometry.from_hf_config(tiny_base.model.config)


@pytest.fixture(scope="session")
def smollm_geometry(smollm_base) -> ModelGeometry:
    return ModelGeometry.from_hf_config(smollm_base.model.config)


@pytest.fixture(scope="session")
def smollm_base_fp32(smollm_dir) -> LoadedBase:
    """The real embedded base, unquantized float32 (for exact-parity checks)."""
    return load_base(BaseModelConfig(quant="none"))


@pytest.fixture(scope="session")
def tiny_base_dir(tiny_base, tmp_path_factory):
    """The tiny Llama saved as a transformers folder (what `--base PATH` takes), with SmolLM2's tokenizer."""
    path = tmp_path_factory.mktemp("tiny-base")
    tiny_base.model.save_pretrained(path)
    tiny_base.tokenizer.save_pretrained(path)
    return path
