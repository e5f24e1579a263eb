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
        (lambda p: _edit_config(p, modules_to_save=["lm_head"]), "modules_to_save lists lm_head but the file has no"),
        (lambda p: _edit_config(p, modules_to_save=["norm"]), "swaps only embed_tokens and lm_head"),
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


def test_weights_replaced_while_being_read_never_mix_two_files(tiny_geometry, tmp_path, monkeypatch):
    """Header and tensors come from one open file: a retrain that replaces the file after the
    header was read cannot pair the first file's ranks and scales with the second's tensors."""
    import os

    from lorad import adapter_format

    path = write_random_adapter(tmp_path / "a", tiny_geometry, rank=4, seed=1)
    first = load_file(path / "adapter_model.safetensors")
    newer = write_random_adapter(tmp_path / "newer", tiny_geometry, rank=8, seed=2)
    real_read_header = adapter_format._read_header

    def read_header_then_replace(f, *args):
        out = real_read_header(f, *args)
        os.replace(newer / "adapter_model.safetensors", path / "adapter_model.safetensors")
        return out

    monkeypatch.setattr(adapter_format, "_read_header", read_header_then_replace)
    adapter = load_adapter(path, "a", tiny_geometry, 16)
    a, b = adapter.weights[(0, "q_proj")]
    assert adapter.spec.rank == 4
    assert torch.equal(a, first["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    assert torch.equal(b, first["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])


# --- hostile configs and headers: refused with a sentence, in bounded time -------------------------


def _write_config_text(path, text: str):
    (path / "adapter_config.json").write_text(text)


def _set_raw(path, key, raw_json: str):
    """Put a raw JSON value (NaN, 1e400, a 5000-digit integer...) into the config."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg[key] = "@@RAW@@"
    _write_config_text(path, json.dumps(cfg).replace('"@@RAW@@"', raw_json))


HOSTILE_CONFIGS = {
    "alpha_nan": (lambda p: _set_raw(p, "lora_alpha", "NaN"), "lora_alpha=nan must be a positive, finite number"),
    "alpha_inf": (lambda p: _set_raw(p, "lora_alpha", "Infinity"), "lora_alpha=inf must be"),
    "alpha_1e400": (lambda p: _set_raw(p, "lora_alpha", "1e400"), "lora_alpha=inf must be"),
    "alpha_over_float32": (lambda p: _edit_config(p, lora_alpha=1e40), "scaling 1.25e\\+39 .*float32"),
    "alpha_string": (lambda p: _edit_config(p, lora_alpha="16"), "lora_alpha='16' must be"),
    "alpha_bool": (lambda p: _edit_config(p, lora_alpha=True), "lora_alpha=True must be"),
    "r_string": (lambda p: _edit_config(p, r="8"), "r='8' must be a positive whole number"),
    "r_fraction": (lambda p: _edit_config(p, r=8.5), "r=8.5 must be"),
    "r_5000_digits": (lambda p: _set_raw(p, "r", "9" * 5000), "not valid JSON"),
    "rank_pattern_paren": (lambda p: _edit_config(p, rank_pattern={"(": 8}), r"rank_pattern key '\(' is not a regular"),
    "rank_pattern_list": (lambda p: _edit_config(p, rank_pattern=[1, 2]), "rank_pattern must be an object"),
    "rank_pattern_lookahead": (lambda p: _edit_config(p, rank_pattern={"(?=q)q_proj": 8}), "no look-around"),
    "rank_pattern_value": (lambda p: _edit_config(p, rank_pattern={"q_proj": -8}), r"rank_pattern\['q_proj'\]=-8"),
    "alpha_pattern_string": (lambda p: _edit_config(p, alpha_pattern={"q_proj": "x"}), r"alpha_pattern\['q_proj'\]='x'"),
    "alpha_pattern_nan": (lambda p: _set_raw(p, "alpha_pattern", '{"q_proj": NaN}'), "positive, finite numbers"),
    "pattern_too_many_keys": (lambda p: _edit_config(p, alpha_pattern={f"k{i}": 1 for i in range(5000)}), "5000 keys"),
    "nested_100k": (lambda p: _set_raw(p, "extra", "[" * 100_000 + "]" * 100_000), "nested too deeply"),
    "nested_40": (lambda p: _set_raw(p, "extra", "[" * 40 + "]" * 40), "nested more than 32 levels"),
    "config_2mib": (lambda p: _edit_config(p, extra="x" * (2 << 20)), "larger than lorad's limit"),
    "config_not_object": (lambda p: _write_config_text(p, "[1, 2]"), "must hold a JSON object"),
    "config_bad_utf8": (lambda p: (p / "adapter_config.json").write_bytes(b'{"r": "\xff"}'), "not valid JSON"),
    "use_dora_string": (lambda p: _edit_config(p, use_dora="no"), "use_dora='no' must be true or false"),
    "bias_number": (lambda p: _edit_config(p, bias=5), "bias=5 must be a string"),
    "peft_type_number": (lambda p: _edit_config(p, peft_type=7), "peft_type=7 must be a string"),
    "target_modules_number": (lambda p: _edit_config(p, target_modules=5), "target_modules=5 must be"),
    "layer_replication": (lambda p: _edit_config(p, layer_replication=[[0, 2]]), "layer_replication"),
}


@pytest.mark.parametrize("case", HOSTILE_CONFIGS)
def test_hostile_configs_are_refused_naming_the_field(tiny_geometry, tmp_path, case):
    path = write_random_adapter(tmp_path / "x", tiny_geometry, rank=8)
    breakage, message = HOSTILE_CONFIGS[case]
    breakage(path)
    with pytest.raises(InvalidAdapterError, match=message) as info:
        inspect_adapter(path, "x", tiny_geometry, max_rank=16)
    assert str(tmp_path) not in str(info.value) and len(str(info.value)) < 400


def test_patterns_follow_peft_matching_in_linear_time(tiny_geometry, tmp_path):
    """Regex keys still work as PEFT reads them (first matching key wins), through RE2."""
    path = write_random_adapter(tmp_path / "x", tiny_geometry, rank=8, alpha=16)
    _edit_config(path, alpha_pattern={r"layers\.1\..*_proj": 4, "q_proj": 32, r"(gate|up)_proj": 1})
    spec = inspect_adapter(path, "x", tiny_geometry, max_rank=16)
    assert spec.modules[(0, "q_proj")].scale == 32 / 8
    assert spec.modules[(1, "q_proj")].scale == 4 / 8  # the earlier key wins
    assert spec.modules[(0, "up_proj")].scale == 1 / 8
    assert spec.modules[(0, "down_proj")].scale == 16 / 8


def test_a_catastrophic_pattern_is_matched_in_bounded_time(tiny_geometry, tmp_path):
    """`(\\w*\\.?\\w*)*Z` backtracks exponentially in Python's re (it froze the whole server, GIL
    held, SIGTERM ignored). Run in a child process so a regression fails here instead of hanging."""
    import subprocess
    import sys

    path = write_random_adapter(tmp_path / "x", tiny_geometry, rank=8)
    _edit_config(path, rank_pattern={r"(\w*\.?\w*)*Z": 8}, alpha_pattern={r"(.*a){20}$": 2})
    code = ("import sys; from lorad.adapter_format import inspect_adapter; from lorad.geometry import ModelGeometry; "
            f"g = ModelGeometry(**{tiny_geometry.__dict__!r}); "
            f"print(inspect_adapter({str(path)!r}, 'x', g, 16).rank)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "8", proc.stderr[-2000:]


def _header_file(path, header: dict, data: bytes = b"", raw_len: int | None = None):
    blob = json.dumps(header).encode()
    n = len(blob) if raw_len is None else raw_len
    (path / "adapter_model.safetensors").write_bytes(n.to_bytes(8, "little") + blob + data)


QPROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
QPROJ_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

HOSTILE_HEADERS = {
    "length_2^40": (lambda p: _header_file(p, {}, raw_len=1 << 40), "declares a header of"),
    "length_past_end": (lambda p: _header_file(p, {}, raw_len=4096), "shorter than its declared header"),
    "not_an_object": (lambda p: (p / "adapter_model.safetensors").write_bytes((2).to_bytes(8, "little") + b"[]"),
                      "not a JSON object"),
    "int_dtype": (lambda p: _header_file(p, {QPROJ_A: {"dtype": "I64", "shape": [8, 64], "data_offsets": [0, 4096]}},
                                         bytes(4096)), "of dtype 'I64', not a float type"),
    "negative_shape": (lambda p: _header_file(p, {QPROJ_A: {"dtype": "F32", "shape": [-8, 64], "data_offsets": [0, 0]}}),
                       "malformed shape"),
    "lying_offsets": (lambda p: _header_file(p, {QPROJ_A: {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 16]}},
                                             bytes(16)), "do not match the shape"),
    "overlapping": (lambda p: _header_file(p, {
        QPROJ_A: {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 2048]},
        QPROJ_B: {"dtype": "F32", "shape": [64, 8], "data_offsets": [1024, 3072]}}, bytes(3072)), "overlap or leave gaps"),
    "trailing_bytes": (lambda p: _header_file(p, {QPROJ_A: {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 2048]}},
                                              bytes(4096)), "header describes"),
    "tensor_flood": (lambda p: _header_file(p, {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
                                                for i in range(500)}), "more than .* tensors"),
    "duplicate_half": (lambda p: _header_file(p, {
        QPROJ_A: {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 2048]},
        "model.layers.0.self_attn.q_proj.lora_A.weight": {"dtype": "F32", "shape": [8, 64], "data_offsets": [2048, 4096]}},
        bytes(4096)), "two lora_A tensors"),
    "deep_metadata": (lambda p: _header_file(p, {"__metadata__": json.loads("[" * 50 + "]" * 50)}), "nested more than"),
}


@pytest.mark.parametrize("case", HOSTILE_HEADERS)
def test_hostile_safetensors_headers_are_refused_from_the_header(tiny_geometry, tmp_path, case):
    path = write_random_adapter(tmp_path / "x", tiny_geometry, rank=8)
    breakage, message = HOSTILE_HEADERS[case]
    breakage(path)
    with pytest.raises(InvalidAdapterError, match=message):
        inspect_adapter(path, "x", tiny_geometry, max_rank=16)
