"""GGUF files for llama.cpp and Ollama, written with the `gguf` package (no llama.cpp scripts).

    write_model_gguf(folder, path, outtype)        a (merged) Llama-family transformers folder -> GGUF
    write_adapter_gguf(adapter, base, path, outtype)  a PEFT adapter -> llama.cpp LoRA GGUF

Model GGUF, as llama.cpp's convert_hf_to_gguf.py lays out a Llama:
  * llama.* hyperparameters from config.json; tensors renamed by gguf's own TensorNameMap
    (token_embd, blk.N.attn_q, ..., output_norm; output only when embeddings are untied);
  * q_proj / k_proj rows permuted per head from HF's rotate-half order to llama.cpp's
    interleaved RoPE order (transformers' GGUF loader undoes it on read);
  * tokenizer: copied key for key from the GGUF the base was converted from (the embedded
    SmolLM2), else built from tokenizer.json (GPT-2-style byte-level BPE; the pre-tokenizer is
    recognised from llama.cpp's check string) with merges, special ids and the chat template;
  * outtype: f32 | f16 | bf16 | q8_0 | q4_0 for 2-D weights (1-D norms stay F32, as in
    llama.cpp); q4_0 keeps token_embd / output in Q8_0 (they carry the logits, and the tied
    SmolLM2 embedding would otherwise lose the most). A weight whose rows do not split into
    32-element blocks falls back to F16, as llama.cpp does.
Refused with a sentence: RoPE scaling types other than default / linear, SentencePiece-only
tokenizers, unknown BPE pre-tokenizers (llama.cpp refuses them too).

Adapter GGUF, as llama.cpp's convert_lora_to_gguf.py writes it: general.type=adapter,
adapter.type=lora, adapter.lora.alpha, tensors `<gguf name>.lora_a` = A [r, in] and
`.lora_b` = B [out, r] (q / k rows of B permuted like the weights). llama.cpp scales each module
by alpha / r with r read from the tensor, so a module whose PEFT scale differs (rsLoRA,
rank_pattern, alpha_pattern) gets the ratio folded into its B.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lorad.errors import ConfigError, InvalidAdapterError

MODEL_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
ADAPTER_OUTTYPES = ("f32", "f16", "bf16")

# llama.cpp's pre-tokenizer check (convert_hf_to_gguf.py get_vocab_base_pre): sha256 of the token
# ids of this text identifies a BPE pre-tokenizer.
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

Progress = Callable[[str, int, int], None]


def _gguf():
    import gguf

    return gguf


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp interleaved order, per head: [out, ...] -> [out, ...]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(config: dict) -> tuple[int, int, int]:
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    return n_head, n_kv, head_dim


def _rope(config: dict) -> tuple[float, dict]:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear"):
        raise ConfigError(f"GGUF export of RoPE scaling {kind!r} is not supported yet (default and linear are); "
                          "convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    return theta, params


def _hparams(writer, config: dict, name: str) -> None:
    gguf = _gguf()
    n_head, n_kv, head_dim = _heads(config)
    theta, rope = _rope(config)
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != int(config["hidden_size"]) // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if (rope.get("rope_type") or rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


# ---- tokenizer ----------------------------------------------------------------------------------


def _copy_tokenizer_kv(writer, source_gguf: Path) -> None:
    gguf = _gguf()
    reader = gguf.GGUFReader(str(source_gguf))
    for name, fld in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        main = fld.types[0]
        sub = fld.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, fld.contents(), main, sub_type=sub)


def pre_tokenizer(tokenizer) -> str:
    ids = tokenizer.encode(_CHKTXT)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    pre = _PRE_TOKENIZERS.get(digest)
    if pre is None:
        raise ConfigError(f"GGUF export: this BPE pre-tokenizer (check hash {digest[:16]}...) is not one lorad "
                          f"recognises ({', '.join(sorted(set(_PRE_TOKENIZERS.values())))}); convert the merged folder "
                          "with llama.cpp's convert_hf_to_gguf.py")
    return pre


def _build_tokenizer_kv(writer, folder: Path, vocab_size: int) -> None:
    gguf = _gguf()
    from transformers import AutoTokenizer

    tok_json = folder / "tokenizer.json"
    model_type = json.loads(tok_json.read_text())["model"]["type"] if tok_json.is_file() else None
    if model_type != "BPE" or (folder / "tokenizer.model").is_file():
        raise ConfigError(f"GGUF export supports byte-level BPE tokenizers (tokenizer.json); {folder} has "
                          f"{model_type or 'no tokenizer.json'}: convert the merged folder with llama.cpp's "
                          "convert_hf_to_gguf.py")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def tokenizer_source(folder: Path) -> Path | None:
    """The GGUF a lorad-converted base came from (lorad_source.json), when it is still on disk."""
    from lorad.base_model import find_embedded_gguf

    source = folder / "lorad_source.json"
    if not source.is_file():
        return None
    name = json.loads(source.read_text()).get("gguf")
    try:
        candidate = find_embedded_gguf()
    except Exception:
        return None
    return candidate if candidate.name == name else None


# ---- tensors ------------------------------------------------------------------------------------


def _qtype(outtype: str, name: str, shape: tuple[int, ...]):
    """The GGML type of one output tensor."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if len(shape) < 2 or outtype == "f32":
        return T.F32
    if outtype in ("f16", "bf16"):
        return T.F16 if outtype == "f16" else T.BF16
    qtype = T.Q8_0 if outtype == "q8_0" or name in ("token_embd.weight", "output.weight") else T.Q4_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else T.F16


def _encode(array: np.ndarray, qtype) -> np.ndarray:
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return array.astype(np.float32)
    if qtype == T.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


class _StreamingWriter:
    """GGUFWriter fed one tensor at a time: tensor infos first (shapes and byte sizes are known
    up front), then the data in the same order, so memory holds one tensor, not the model."""

    def __init__(self, path: Path, arch: str):
        gguf = _gguf()
        self.writer = gguf.GGUFWriter(str(path), arch)
        self.plan: list[tuple[str, tuple[int, ...], object]] = []

    def plan_tensor(self, name: str, shape: tuple[int, ...], qtype) -> None:
        gguf = _gguf()
        T = gguf.GGMLQuantizationType
        if qtype in (T.F32, T.F16):
            itemsize = 4 if qtype == T.F32 else 2
            self.writer.add_tensor_info(name, shape, np.dtype(np.float32 if qtype == T.F32 else np.float16),
                                        math.prod(shape) * itemsize)
        else:  # BF16 and the block quants: bytes, as gguf.quants.quantize returns them
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
            self.writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)
        self.plan.append((name, shape, qtype))

    def write(self, tensors: Callable[[str], np.ndarray], progress: Progress | None = None) -> None:
        w = self.writer
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (name, _, qtype) in enumerate(self.plan, 1):
            w.write_tensor_data(_encode(tensors(name), qtype))
            if progress is not None:
                progress("gguf", i, len(self.plan))
        w.flush()
        w.close()


def _llama_names(config: dict):
    gguf = _gguf()
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))


def _gguf_name(names, hf_name: str) -> str:
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise ConfigError(f"GGUF export: tensor {hf_name!r} has no llama.cpp name")
    return name


def write_model_gguf(folder: str | Path, path: str | Path, outtype: str = "f16", name: str = "",
                     tokenizer_gguf: Path | None = None, progress: Progress | None = None) -> Path:
    """A Llama-family transformers folder (safetensors) as one GGUF file at `path` (the caller
    verifies it and moves it into place; a failure leaves no file behind). tokenizer_gguf: a GGUF
    whose tokenizer.* keys are copied (tokenizer_source(base folder)); None builds them."""
    from safetensors import safe_open

    gguf = _gguf()
    if outtype not in MODEL_OUTTYPES:
        raise ConfigError(f"outtype: {outtype!r} is not one of {', '.join(MODEL_OUTTYPES)}")
    folder, path = Path(folder), Path(path)
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") not in ("llama", "mistral"):
        raise ConfigError(f"GGUF export supports the Llama family; {folder} is {config.get('model_type')!r}")
    n_head, n_kv, _ = _heads(config)
    names = _llama_names(config)
    index = folder / "model.safetensors.index.json"
    shards = (sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
              if index.is_file() else [folder / "model.safetensors"])
    handles = {s: safe_open(str(s), framework="pt") for s in shards}
    where = {key: s for s, h in handles.items() for key in h.keys()}
    tied = bool(config.get("tie_word_embeddings", False))
    hf_of: dict[str, str] = {}
    for key in where:
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue
        hf_of[_gguf_name(names, key)] = key

    out = _StreamingWriter(path, "llama")
    try:
        w = out.writer
        w.add_type(gguf.GGUFType.MODEL)
        _hparams(w, config, name or folder.name)
        if tokenizer_gguf is not None:
            _copy_tokenizer_kv(w, tokenizer_gguf)
        else:
            _build_tokenizer_kv(w, folder, int(config["vocab_size"]))
        ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[outtype]
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for gname, key in hf_of.items():
            shape = tuple(handles[where[key]].get_slice(key).get_shape())
            out.plan_tensor(gname, shape, _qtype(outtype, gname, shape))

        def tensor(gname: str) -> np.ndarray:
            key = hf_of[gname]
            t = handles[where[key]].get_tensor(key).float()
            if key.endswith("q_proj.weight"):
                t = permute_rows(t, n_head)
            elif key.endswith("k_proj.weight"):
                t = permute_rows(t, n_kv)
            return t.numpy()

        out.write(tensor, progress)
    except BaseException:
        out.writer.close()
        path.unlink(missing_ok=True)
        raise
    return path


def write_adapter_gguf(adapter, base_config: dict, path: str | Path, outtype: str = "f32",
                       name: str = "") -> Path:
    """A PEFT adapter (lorad.deltas.adapter_io.Adapter) as a llama.cpp LoRA GGUF for this base's config."""
    gguf = _gguf()
    if outtype not in ADAPTER_OUTTYPES:
        raise ConfigError(f"outtype: {outtype!r} is not available for gguf-adapter (use {', '.join(ADAPTER_OUTTYPES)}); "
                          "llama.cpp needs LoRA ranks in multiples of 32 for quantized adapters")
    path = Path(path)
    n_head, n_kv, _ = _heads(base_config)
    names = _llama_names(base_config)
    alpha = float(adapter.config.get("lora_alpha", 8))
    out = _StreamingWriter(path, "llama")
    tensors: dict[str, torch.Tensor] = {}
    for module in adapter.modules.values():
        if not module.name.startswith("model.layers."):
            raise InvalidAdapterError(f"{adapter.path}: {module.name} is not a layer projection; llama.cpp adapters "
                                      "cover the transformer blocks only")
        target = _gguf_name(names, module.name + ".weight")
        b = module.b.float()
        fold = module.scale * module.rank / alpha  # llama.cpp applies alpha / rank
        if abs(fold - 1.0) > 1e-12:
            b = b * fold
        if module.name.endswith("q_proj"):
            b = permute_rows(b, n_head)
        elif module.name.endswith("k_proj"):
            b = permute_rows(b, n_kv)
        tensors[f"{target}.lora_a"] = module.a.float()
        tensors[f"{target}.lora_b"] = b
    try:
        w = out.writer
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(name or adapter.path.name)
        T = gguf.GGMLQuantizationType
        qtype = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16}[outtype]
        for tname, t in tensors.items():
            out.plan_tensor(tname, tuple(t.shape), qtype)
        out.write(lambda tname: tensors[tname].numpy())
    except BaseException:
        out.writer.close()
        path.unlink(missing_ok=True)
        raise
    return path
