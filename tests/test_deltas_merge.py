"""Merging adapters into their base (tiny Llama folder; one test on the real embedded SmolLM2).

Oracles: bitsandbytes' own Linear4bit (what load_base builds) for the NF4 round trip, W + dW
written here for the merged weights, PEFT's merge_and_unload for --from-original, lorad serving
the adapter (the real Engine) for the verification, and transformers alone (lorad blocked from
importing) for "loads without lorad".
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lorad.deltas import merge as merge_module
from lorad.deltas import nf4
from lorad.deltas.adapter_io import read_adapter
from lorad.deltas.merge import MergeConfig, MergeVerificationError, merge_adapters
from lorad.errors import ConfigError, InvalidAdapterError
from lorad.server.offline_reference import engine_reference
from lorad.testing import write_random_adapter


@pytest.fixture(scope="module")
def base_dir(tiny_base_dir):
    return tiny_base_dir


@pytest.fixture(scope="module")
def adapter(tiny_geometry, tmp_path_factory):
    return read_adapter(write_random_adapter(tmp_path_factory.mktemp("ad") / "a", tiny_geometry, rank=4, seed=1,
                                             b_std=0.3))


@pytest.fixture(scope="module")
def merged(base_dir, adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "nf4"
    report = merge_adapters([adapter], [1.0], out, MergeConfig(base=str(base_dir)), engine_reference)
    return out, report


def _base_tensors(base_dir):
    return load_file(base_dir / "model.safetensors")


def test_nf4_roundtrip_is_what_load_base_serves(base_dir):
    import bitsandbytes.functional as bnbf

    from lorad.base_model import BaseModelConfig, load_base

    served = load_base(BaseModelConfig(name=str(base_dir), quant="nf4", device="cpu"))
    original = _base_tensors(base_dir)
    module = served.model.model.layers[1].mlp.down_proj
    dequant = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
    assert torch.equal(nf4.roundtrip(original["model.layers.1.mlp.down_proj.weight"]), dequant)


def test_merged_weights_are_nf4_roundtrip_plus_delta(base_dir, adapter, merged):
    out, report = merged
    original, written = _base_tensors(base_dir), load_file(out / "model.safetensors")
    assert set(written) == set(original)
    for name, w in original.items():
        module = name.removesuffix(".weight")
        if module in adapter.modules:
            want = nf4.roundtrip(w) + adapter.modules[module].delta()
            assert torch.allclose(written[name], want, atol=1e-6), name
        elif name.endswith("_proj.weight"):  # every projection is quantized when lorad serves NF4
            assert torch.equal(written[name], nf4.roundtrip(w)), name
        else:  # embeddings, norms
            assert torch.equal(written[name], w), name
    assert report.mode == "nf4-roundtrip" and report.roundtripped == 14 and report.adapted_modules == 14


def test_merged_folder_answers_like_lorad_serving_the_adapter(merged):
    out, report = merged
    check = report.verification
    assert check.passed and len(check.prompts) == 8 and check.exact_prompts == 8
    assert check.max_logprob_diff <= 1e-3
    assert all(len(g.tokens) == 16 for g in report.reference)
    prov = json.loads((out / "lorad_merge.json").read_text())
    assert prov["kind"] == "merge" and prov["verification"]["passed"] and prov["merge"]["nf4"]["blocksize"] == 64
    assert not list(out.parent.glob(".*partial*"))  # staging renamed into place, nothing left behind


def test_merged_folder_loads_without_lorad(merged, tiny_base):
    out, _ = merged
    script = (
        "import sys; sys.modules['lorad'] = None\n"  # any import of lorad now fails
        "import torch, json\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig\n"
        f"path = {str(out)!r}\n"
        "tok = AutoTokenizer.from_pretrained(path)\n"
        "model = AutoModelForCausalLM.from_pretrained(path)\n"
        "GenerationConfig.from_pretrained(path)\n"
        "text = tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True, tokenize=False)\n"
        "print(json.dumps({'dtype': str(model.dtype), 'chat': '<|im_start|>assistant' in text,\n"
        "                  'ids': model.generate(**tok(text, return_tensors='pt'), max_new_tokens=3, do_sample=False)[0, -3:].tolist()}))\n"
    )
    # run outside the repository: its top-level kernels/ folder would shadow the PyPI `kernels` package
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=out.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["dtype"] == "torch.float32" and result["chat"] and len(result["ids"]) == 3


def test_weighted_adapters_bf16_in_shards(base_dir, adapter, tiny_geometry, tmp_path):
    other = read_adapter(write_random_adapter(tmp_path / "b", tiny_geometry, rank=2, seed=5, b_std=0.3,
                                              targets=("q_proj", "down_proj")))
    out = tmp_path / "two"
    config = MergeConfig(base=str(base_dir), dtype="bf16", max_shard_size=2**20)
    report = merge_adapters([adapter, other], [0.5, -1.0], out, config, engine_reference)
    assert report.verification.passed, report.verification.failures  # reference: their exact cat combination
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert report.shards > 1 and len(set(index["weight_map"].values())) == report.shards
    name = "model.layers.0.mlp.down_proj.weight"
    written = load_file(out / index["weight_map"][name])[name]
    module = name.removesuffix(".weight")
    want = nf4.roundtrip(_base_tensors(base_dir)[name]) + 0.5 * adapter.modules[module].delta() \
        - other.modules[module].delta()
    assert written.dtype == torch.bfloat16 and torch.equal(written, want.to(torch.bfloat16))


def test_a_wrong_merge_is_caught_and_nothing_is_published(base_dir, adapter, tmp_path, monkeypatch):
    """The check is not vacuous: a delta off by 2% fails it and leaves no folder behind."""
    real = merge_module.weighted_delta
    monkeypatch.setattr(merge_module, "weighted_delta", lambda *a: real(*a) * 1.02)
    out = tmp_path / "wrong"
    with pytest.raises(MergeVerificationError, match="nothing was written"):
        merge_adapters([adapter], [1.0], out, MergeConfig(base=str(base_dir)), engine_reference)
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_a_cancelled_merge_publishes_nothing(base_dir, adapter, tmp_path):
    import threading

    from lorad.deltas.merge import MergeCancelled

    cancel = threading.Event()
    cancel.set()
    out = tmp_path / "cancelled"
    with pytest.raises(MergeCancelled, match="nothing was written"):
        merge_adapters([adapter], [1.0], out, MergeConfig(base=str(base_dir)), engine_reference, cancel=cancel)
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_bad_input_is_refused_before_any_work(base_dir, adapter, tiny_geometry, tmp_path):
    from lorad.geometry import ModelGeometry

    (tmp_path / "exists").mkdir()
    with pytest.raises(ConfigError, match="--force"):
        merge_adapters([adapter], [1.0], tmp_path / "exists", MergeConfig(base=str(base_dir)), engine_reference)
    other = ModelGeometry(2, 32, 128, 4, 2, 8, 1000, 512)
    foreign = read_adapter(write_random_adapter(tmp_path / "foreign", other, rank=2))
    with pytest.raises(InvalidAdapterError, match="another base"):
        merge_adapters([foreign], [1.0], tmp_path / "o", MergeConfig(base=str(base_dir)), engine_reference)
    path = write_random_adapter(tmp_path / "digest", tiny_geometry, rank=2)
    (path / "lorad_provenance.json").write_text(json.dumps({"base_model": {"weights_digest": "sha256:0000"}}))
    with pytest.raises(InvalidAdapterError, match="trained on base weights sha256:0000"):
        merge_adapters([read_adapter(path)], [1.0], tmp_path / "o", MergeConfig(base=str(base_dir)),
                       engine_reference)
    with pytest.raises(ConfigError, match="dtype"):
        MergeConfig(dtype="int8")
    assert not (tmp_path / "o").exists()


def test_merge_command_from_original_equals_peft_merge_and_unload(base_dir, adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorad.cli import main

    out = tmp_path / "cli"
    r = CliRunner().invoke(main, ["merge", "--base", str(base_dir), "--out", str(out), "--from-original",
                                  f"{adapter.path}:1.0"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "passed" in r.output and "the original weights" in r.output
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter.path).merge_and_unload()
    want = peft.state_dict()
    for name, w in load_file(out / "model.safetensors").items():
        assert torch.allclose(w, want[name], atol=1e-6), name
    r = CliRunner().invoke(main, ["merge", "--base", str(base_dir), "--out", str(out), str(adapter.path)])
    assert r.exit_code == 1 and "already exists" in r.output
    r = CliRunner().invoke(main, ["merge", "--base", str(tmp_path / "nobase"), "--out", str(tmp_path / "x"),
                                  str(adapter.path)])
    assert r.exit_code == 1 and "error:" in r.output


@pytest.mark.slow
def test_merge_on_the_embedded_base(smollm_geometry, tmp_path):
    """The real SmolLM2 (the `lorad merge` default): NF4 round trip of all 210 projections, verified
    against the engine serving the adapter on the same base in float32."""
    path = write_random_adapter(tmp_path / "demo", smollm_geometry, rank=8, alpha=16, seed=1, b_std=0.02)
    out = tmp_path / "merged"
    report = merge_adapters([read_adapter(path)], [1.0], out, MergeConfig(), engine_reference)
    check = report.verification
    assert check.passed and check.exact_prompts == 8 and check.max_logprob_diff <= 1e-3
    assert report.roundtripped == 210 and report.dtype == "fp32"
    # the adapter changes the answers (the check is not comparing the base with itself)
    from lorad.base_model import BaseModelConfig, load_base

    loaded = load_base(BaseModelConfig(quant="none"))
    base_only = engine_reference(loaded, None, [g.prompt for g in report.reference], 16)
    assert sum(b.tokens != g.tokens for b, g in zip(base_only, report.reference)) >= 4
