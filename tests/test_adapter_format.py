"""Adapters on disk: PEFT's format is read; anything unusable is refused with a sentence."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorad.adapter_format import inspect_adapter, load_adapter, validate_adapter_id
from lorad.errors import InvalidAdapterError
from lorad.testing import write_random_adapter


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    tensors = load_file(path / "adapter_model.safetensors")
    fn(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def test_peft_saved_adapter_is_accepted_with_its_scaling(tiny_base, tiny_geometry, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_base.model,
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                   rank_pattern={"down_proj": 4}, alpha_pattern={"down_proj": 2}),
    )
    try:
        model.save_pretrained(tmp_path / "peft")
    finally:
        model.unload()
    adapter = load_adapter(tmp_path / "peft", "peft", tiny_geometry, max_rank=16)
    spec = adapter.spec
    assert spec.target_modules == ("q_proj", "v_proj", "down_proj")
    assert spec.modules[(0, "q_proj")].scale == 2.0 and spec.modules[(0, "q_proj")].rank == 8
    assert spec.modules[(1, "down_proj")].scale == 0.5 and spec.modules[(1, "down_proj")].rank == 4
    a, b = adapter.weights[(1, "down_proj")]
    assert a.shape == (4, tiny_geometry.intermediate_size) and b.shape == (tiny_geometry.hidden_size, 4)


def test_written_adapters_load_in_peft(tiny_base, tiny_geometry, tmp_path):
    """lorad.testing writes what PEFT writes: PEFT loads it and its weights come back unchanged."""
    from peft import PeftModel

    path = write_random_adapter(tmp_path / "mine", tiny_geometry, rank=4, seed=3)
    model = PeftModel.from_pretrained(tiny_base.model, path)
    try:
        lora_a = model.base_model.model.model.layers[1].mlp.up_proj.lora_A["default"].weight
        expected = load_file(path / "adapter_model.safetensors")["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"]
        assert torch.equal(lora_a, expected)
    finally:
        model.unload()


def test_rslora_scale(tiny_geometry, tmp_path):
    path = write_random_adapter(tmp_path / "rs", tiny_geometry, rank=16, alpha=8, use_rslora=True)
    spec = inspect_adapter(path, "rs", tiny_geometry, max_rank=16)
    assert math.isclose(spec.modules[(0, "k_proj")].scale, 8 / 4)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json is missing"),
        (lambda p: (p / "adapter_config.json").write_text("{not json"), "not valid JSON"),
        (lambda p: _edit_config(p, peft_type="PREFIX_TUNING"), "only LORA"),
        (lambda p: _edit_config(p, use_dora=True), "DoRA"),
        (lambda p: _edit_config(p, modules_to_save=["lm_head"]), "modules_to_save"),
        (lambda p: _edit_config(p, r=-1), "positive"),
        (lambda p: _edit_config(p, r=4), "rank 8 but adapter_config.json says 4"),
        (lambda p: (p / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes(b"garbage"), "not a readable safetensors"),
        (lambda p: _edit_tensors(p, lambda t: t.__setitem__("base_model.model.lm_head.lora_A.weight", torch.zeros(8, 64))),
         "does not map"),
        (lambda p: _edit_tensors(p, lambda t: t.__setitem__(
            "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight", torch.zeros(8, 64))), "layer 9"),
        (lambda p: _edit_tensors(p, lambda t: t.pop("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight")),
         "no lora_B"),
        (lambda p: _edit_tensors(p, lambda t: t.__setitem__(
            "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", torch.zeros(8, 65))), "another base"),
    ],
)
def test_broken_adapters_are_refused_with_a_reason(tiny_geometry, tmp_path, breakage, message):
    path = write_random_adapter(tmp_path / "x", tiny_geometry, rank=8)
    breakage(path)
    with pytest.raises(InvalidAdapterError, match=message):
        load_adapter(path, "x", tiny_geometry, max_rank=16)


def test_pickled_weights_are_never_read(tiny_geometry, tmp_path):
    path = write_random_adapter(tmp_path / "p", tiny_geometry, rank=8)
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(InvalidAdapterError, match="never unpickles"):
        inspect_adapter(path, "p", tiny_geometry, max_rank=16)


def test_rank_above_the_limit_says_how_to_fix_it(tiny_geometry, tmp_path):
    path = write_random_adapter(tmp_path / "big", tiny_geometry, rank=32)
    with pytest.raises(InvalidAdapterError, match="--max-lora-rank 32"):
        inspect_adapter(path, "big", tiny_geometry, max_rank=16)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(tiny_geometry, tmp_path, bad):
    path = write_random_adapter(tmp_path / "n", tiny_geometry, rank=8)
    _edit_tensors(path, lambda t: t["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"].__setitem__((3, 2), bad))
    inspect_adapter(path, "n", tiny_geometry, max_rank=16)  # the header is fine
    with pytest.raises(InvalidAdapterError, match="NaN or Inf"):
        load_adapter(path, "n", tiny_geometry, max_rank=16)


def test_an_adapter_with_no_tensors_is_refused(tiny_geometry, tmp_path):
    path = write_random_adapter(tmp_path / "e", tiny_geometry, rank=8)
    save_file({}, path / "adapter_model.safetensors")
    with pytest.raises(InvalidAdapterError, match="no LoRA tensor"):
        inspect_adapter(path, "e", tiny_geometry, max_rank=16)


@pytest.mark.parametrize("good", ["a", "support-en", "cust_42.v2", "A" * 128])
def test_valid_adapter_ids(good):
    validate_adapter_id(good)


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "/abs", ".hidden", "-x", "a..b", "x" * 129, "sp ace", "é", "abc\n"])
def test_adapter_ids_are_names_not_paths(bad):
    with pytest.raises(ValueError, match="not a valid name"):
        validate_adapter_id(bad)


def test_weights_replaced_between_the_header_check_and_the_read_are_refused(tiny_geometry, tmp_path, monkeypatch):
    """The file is opened twice (header, then values); a retrain in between must not slip through
    with the first file's ranks and scales."""
    from lorad import adapter_format

    path = write_random_adapter(tmp_path / "a", tiny_geometry, rank=4, seed=1)
    newer = write_random_adapter(tmp_path / "newer", tiny_geometry, rank=8, seed=2)
    real_read = adapter_format._read_safetensors
    monkeypatch.setattr(adapter_format, "_read_safetensors",
                        lambda p, adapter_id: real_read(newer / "adapter_model.safetensors", adapter_id))
    with pytest.raises(InvalidAdapterError, match="changed while it was being read"):
        load_adapter(path, "a", tiny_geometry, 16)
