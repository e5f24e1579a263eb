"""GGUF and Ollama export (tiny Llama folder; llama.cpp itself in a slow test when installed).

Oracles: transformers' own GGUF reader (gguf_file=) for the model layout, the RoPE row
permutation and the tokenizer; gguf's GGUFReader + dequantize for the adapter file and the
quantized tensors; lorad serving the adapter and the merged folder for the exported model's
answers; llama-cpp-python, the real consumer, in test_llama_cpp_runs_both_exports.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lorad.deltas.adapter_io import read_adapter
from lorad.deltas.export import ExportConfig, export
from lorad.deltas.gguf_export import permute_rows, write_model_gguf
from lorad.errors import ConfigError
from lorad.server.offline_reference import engine_reference
from lorad.testing import write_random_adapter


@pytest.fixture(scope="module")
def adapter(tiny_geometry, tmp_path_factory):
    return read_adapter(write_random_adapter(tmp_path_factory.mktemp("ad") / "a", tiny_geometry, rank=4, seed=1,
                                             b_std=0.3))


def _reader(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    return reader, fields


def test_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(4 * 16, 8)  # 4 heads of 16 rows
    undone = LlamaTensorProcessor()._reverse_permute_weights(permute_rows(w, 4).numpy(), 4, 4)
    assert np.array_equal(undone, w.numpy())
    assert not torch.equal(permute_rows(w, 4), w)


def test_model_gguf_f32_reads_back_exactly_in_transformers(tiny_base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_model_gguf(tiny_base_dir, tmp_path / "base-f32.gguf", "f32")
    _, fields = _reader(path)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert fields["tokenizer.ggml.pre"] == "smollm" and "<|im_start|>" in fields["tokenizer.chat_template"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    want = load_file(tiny_base_dir / "model.safetensors")
    got = model.state_dict()
    for name, w in want.items():
        assert torch.equal(got[name], w), name  # q/k permutation undone, every tensor exact


def test_quantized_tensors_stay_within_their_block_error(tiny_base_dir, tmp_path):
    import gguf

    want = load_file(tiny_base_dir / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    for outtype, bound in (("q8_0", 0.01), ("q4_0", 0.15)):
        reader, _ = _reader(write_model_gguf(tiny_base_dir, tmp_path / f"{outtype}.gguf", outtype))
        tensors = {t.name: t for t in reader.tensors}
        down = tensors["blk.0.ffn_down.weight"]
        got = torch.from_numpy(gguf.dequantize(down.data, down.tensor_type).copy())
        assert float((got - want).norm() / want.norm()) < bound, outtype
        assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
        assert tensors["blk.0.ffn_up.weight"].tensor_type.name == outtype.upper()
        assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"  # q4_0 keeps the tied embeddings at Q8_0


def test_gguf_adapter_has_llama_cpp_metadata_and_the_same_deltas(tiny_base_dir, tiny_geometry, tmp_path):
    # rsLoRA: PEFT scales by alpha / sqrt(r), llama.cpp by alpha / r, so the ratio is folded into B
    source = read_adapter(write_random_adapter(tmp_path / "rs", tiny_geometry, rank=4, alpha=8, use_rslora=True,
                                               seed=2, b_std=0.3))
    out = tmp_path / "adapter.gguf"
    report = export(source, out, ExportConfig(format="gguf-adapter", base=str(tiny_base_dir)), engine_reference)
    _, fields = _reader(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0 and fields["general.architecture"] == "llama"
    reader, _ = _reader(out)
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}  # ggml order: [ne0, ne1]
    assert shapes["blk.1.attn_q.weight.lora_a"] == (64, 4) and shapes["blk.1.attn_q.weight.lora_b"] == (4, 64)
    assert shapes["blk.0.ffn_down.weight.lora_a"] == (128, 4) and len(shapes) == 2 * 14
    assert max(report.adapter_errors.values()) < 1e-6  # f32: the deltas llama.cpp applies are the adapter's


def test_export_gguf_is_verified_against_the_merged_folder(tiny_base_dir, adapter, tmp_path):
    """The GGUF is read back by transformers (tokenizer: same ids on the prompts; model: teacher-forced)
    and compared with the merged folder, itself checked against lorad serving the adapter."""
    out = tmp_path / "model.gguf"
    report = export(adapter, out, ExportConfig(format="gguf", base=str(tiny_base_dir)), engine_reference)
    merged_check, gguf_check = report.checks
    assert report.outtype == "f16" and merged_check.passed and gguf_check.passed
    assert gguf_check.max_logprob_diff > 0  # f16 rounding is seen, and stays within the f16 tolerance
    assert out.is_file() and not list(tmp_path.glob(".*"))  # the intermediate merged folder is gone


def test_export_ollama_folder(tiny_base_dir, adapter, tmp_path):
    out = tmp_path / "ollama"
    report = export(adapter, out, ExportConfig(format="ollama", base=str(tiny_base_dir), outtype="f32"),
                    engine_reference)
    gguf_check = report.checks[1]
    assert gguf_check.exact_prompts == 8 and gguf_check.max_logprob_diff < 1e-3  # f32 GGUF: exact
    text = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf" in text and "<|im_start|>{{ .Role }}" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert json.loads((out / "lorad_export.json").read_text())["gguf"]["passed"]


def test_unsupported_rope_is_refused(tiny_base_dir, tmp_path):
    import shutil

    folder = tmp_path / "llama3-rope"
    shutil.copytree(tiny_base_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="RoPE scaling 'llama3'"):
        write_model_gguf(folder, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("args, message", [
    (["--format", "gguf-adapter", "--outtype", "q4_0"], "is not one of f32, f16, bf16 for --format gguf-adapter"),
    (["--format", "gguf", "--dtype", "bf16"], "use --outtype"),
    (["--format", "hf", "--outtype", "f16"], "applies to GGUF formats"),
])
def test_export_command_refuses_bad_options(adapter, tmp_path, args, message):
    from lorad.cli import main

    r = CliRunner().invoke(main, ["export", *args, "--out", str(tmp_path / "o"), str(adapter.path)])
    assert r.exit_code == 1 and message in r.output, r.output


def test_export_command_writes_an_adapter_gguf(tiny_base_dir, adapter, tmp_path):
    from lorad.cli import main

    out = tmp_path / "a.gguf"
    r = CliRunner().invoke(main, ["export", "--format", "gguf-adapter", "--outtype", "f16", "--base",
                                  str(tiny_base_dir), "--out", str(out), str(adapter.path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "14 module deltas read back" in r.output and out.is_file()
    r = CliRunner().invoke(main, ["export", "--format", "gguf-adapter", "--out", str(tmp_path / "m.gguf"),
                                  str(tmp_path / "missing")])
    assert r.exit_code == 1 and "no such adapter folder" in r.output


# ---- llama.cpp, the real consumer ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_runs_both_exports(smollm_geometry, tmp_path):
    """SmolLM2 + a rank-8 adapter: the merged GGUF (f16) and base GGUF (f32) + adapter GGUF, run by
    llama.cpp greedily, against lorad serving the adapter (float32 base, --from-original: llama.cpp
    gets the original weights). Prints what it saw; asserts most prompts agree token for token."""
    from llama_cpp import Llama

    from lorad.base_model import BaseModelConfig, embedded_model_dir, load_base

    path = write_random_adapter(tmp_path / "demo", smollm_geometry, rank=8, alpha=16, seed=1, b_std=0.02)
    adapter = read_adapter(path)
    merged = export(adapter, tmp_path / "merged-f16.gguf", ExportConfig(format="gguf", outtype="f16",
                                                                        from_original=True), engine_reference)
    export(adapter, tmp_path / "adapter.gguf", ExportConfig(format="gguf-adapter"), engine_reference)
    from lorad.deltas.gguf_export import tokenizer_source

    base_gguf = write_model_gguf(embedded_model_dir(), tmp_path / "base-f32.gguf", "f32",
                                 tokenizer_gguf=tokenizer_source(embedded_model_dir()))
    reference = merged.merge.reference
    loaded = load_base(BaseModelConfig(quant="none"))
    base_only = engine_reference(loaded, None, [g.prompt for g in reference], 16)

    def greedy(llm, prompt: list[int], n: int) -> tuple[list[int], bool]:
        """llama.cpp's greedy continuation (token ids) and whether it ended on EOS."""
        out = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if token == llm.token_eos():
                return out, True
            out.append(token)
            if len(out) == n:
                return out, False
        return out, False

    results = {}
    for label, kwargs in (("merged f16", {"model_path": str(tmp_path / "merged-f16.gguf")}),
                          ("base f32 + adapter", {"model_path": str(base_gguf),
                                                  "lora_path": str(tmp_path / "adapter.gguf")})):
        llm = Llama(n_ctx=256, n_threads=2, verbose=False, **kwargs)
        results[label] = sum(greedy(llm, g.prompt, 16) == (g.tokens, bool(g.stop_ids)) for g in reference)
        del llm
    print(f"\nllama.cpp greedy tokens equal to lorad serving the adapter: {results} of {len(reference)} prompts; "
          f"the adapter changes {sum(b.tokens != g.tokens for b, g in zip(base_only, reference))} of them")
    assert all(v >= 6 for v in results.values()), results
