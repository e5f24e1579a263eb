"""`lorad export`: an adapter for offline deployment, verified before it is published.

    hf            the merged transformers folder (lorad.deltas.merge, as `lorad merge`)
    gguf          the merged model as one GGUF file: merged (float32, verified against lorad
                  serving the adapter), converted, read back by transformers (gguf_file=) and
                  compared with the merged folder (lorad.deltas.verify tolerances per outtype)
    gguf-adapter  the adapter alone as a llama.cpp LoRA GGUF, read back and its deltas compared
                  with the adapter's
    ollama        a folder with model.gguf (as gguf) and a Modelfile carrying the chat template

A failed check leaves nothing at --out.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorad.base_model import EMBEDDED_ALIAS
from lorad.deltas.adapter_io import Adapter
from lorad.deltas.merge import (
    MergeConfig,
    MergeReport,
    MergeVerificationError,
    Progress,
    Reference,
    locate_base,
    merge_adapters,
    publish,
    staging_dir,
)
from lorad.deltas.verify import VerifyReport, compare, encode_prompts, forced_logprobs
from lorad.errors import ConfigError

FORMATS = ("hf", "gguf", "gguf-adapter", "ollama")
# relative Frobenius error allowed between an adapter's deltas and the ones read back from its GGUF
ADAPTER_TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 1e-2}


@dataclass
class ExportConfig:
    """What to export and how.

    format: hf | gguf | gguf-adapter | ollama.
    base: the base the adapter belongs to (what `lorad serve --base` takes).
    outtype: GGUF tensor type: f32 | f16 | bf16 | q8_0 | q4_0 (gguf, ollama; default f16) or
        f32 | f16 | bf16 (gguf-adapter; default f32).
    dtype: weights of the hf folder (fp32 | bf16 | fp16; default the base's own dtype).
    from_original: merge into the original weights instead of dequant(NF4(W)).
    nf4_dtype: as MergeConfig.nf4_dtype.
    overwrite: replace an existing --out.
    """

    format: str
    base: str = EMBEDDED_ALIAS
    outtype: str | None = None
    dtype: str | None = None
    from_original: bool = False
    nf4_dtype: str = "fp32"
    overwrite: bool = False

    def __post_init__(self) -> None:
        from lorad.deltas.gguf_export import ADAPTER_OUTTYPES, MODEL_OUTTYPES

        if self.format not in FORMATS:
            raise ConfigError(f"format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.format == "hf" and self.outtype is not None:
            raise ConfigError("outtype: applies to GGUF formats; for hf use --dtype fp32|bf16|fp16")
        if self.format in ("gguf", "ollama", "gguf-adapter") and self.dtype is not None:
            raise ConfigError(f"dtype: applies to --format hf; for {self.format} use --outtype")
        allowed = ADAPTER_OUTTYPES if self.format == "gguf-adapter" else MODEL_OUTTYPES
        if self.outtype is not None and self.outtype not in allowed:
            raise ConfigError(f"outtype: {self.outtype!r} is not one of {', '.join(allowed)} for --format {self.format}")
        if self.format == "gguf-adapter" and self.from_original:
            raise ConfigError("from_original: a gguf-adapter holds the adapter alone; there is nothing to merge")
        if self.outtype is None and self.format != "hf":
            self.outtype = "f32" if self.format == "gguf-adapter" else "f16"


@dataclass
class ExportReport:
    path: Path
    format: str
    outtype: str | None
    bytes: int
    merge: MergeReport | None = None
    checks: list[VerifyReport] = field(default_factory=list)
    adapter_errors: dict[str, float] = field(default_factory=dict)  # gguf-adapter: module -> relative error
    seconds: dict[str, float] = field(default_factory=dict)


def export(adapter: Adapter, out: str | Path, config: ExportConfig, reference: Reference,
           progress: Progress | None = None) -> ExportReport:
    out = Path(out)
    if out.exists() and not config.overwrite:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    if config.format == "hf":
        merge = merge_adapters([adapter], [1.0], out, _merge_config(config, dtype=config.dtype), reference, progress)
        return ExportReport(path=out, format="hf", outtype=None, bytes=_size(out), merge=merge, seconds=merge.seconds)
    if config.format == "gguf-adapter":
        return _export_adapter(adapter, out, config)
    return _export_model(adapter, out, config, reference, progress)


def _merge_config(config: ExportConfig, dtype: str | None) -> MergeConfig:
    return MergeConfig(base=config.base, dtype=dtype, from_original=config.from_original,
                       nf4_dtype=config.nf4_dtype, overwrite=config.overwrite)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _export_model(adapter: Adapter, out: Path, config: ExportConfig, reference: Reference,
                  progress: Progress | None) -> ExportReport:
    from lorad.deltas.gguf_export import tokenizer_source, write_model_gguf
    from lorad.deltas.ollama import write_modelfile

    # the merged model in float32, so the GGUF's own type is the only rounding after the merge
    merge = merge_adapters([adapter], [1.0], out, _merge_config(config, dtype="fp32"), reference, progress,
                           staged_only=True)
    merged = merge.out_dir
    seconds = dict(merge.seconds)
    staging = gguf_path = None
    try:
        if config.format == "ollama":
            staging = staging_dir(out, config.overwrite)
        t = time.perf_counter()
        if staging is not None:
            gguf_path = staging / "model.gguf"
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            gguf_path = out.with_name(f".{out.name}.partial-{os.getpid()}")
        write_model_gguf(merged, gguf_path, config.outtype, name=f"{merge.base}+{adapter.path.name}",
                         tokenizer_gguf=tokenizer_source(Path(merge.base_location)), progress=progress)
        seconds["gguf_write"] = time.perf_counter() - t
        t = time.perf_counter()
        check = verify_gguf(gguf_path, merged, merge, config.outtype)
        seconds["gguf_verify"] = time.perf_counter() - t
        if not check.passed:
            raise MergeVerificationError(f"{check.summary()}; nothing was written to {out}: "
                                         + "; ".join(check.failures[:4]))
        if staging is not None:
            from transformers import AutoTokenizer

            write_modelfile(staging, gguf_path.name, AutoTokenizer.from_pretrained(merged))
            (staging / "lorad_export.json").write_text(json.dumps(
                {"format": "ollama", "outtype": config.outtype, "merge": merge.verification.as_dict(),
                 "gguf": check.as_dict()}, indent=2) + "\n")
            publish(staging, out, config.overwrite)
        else:
            with open(gguf_path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(gguf_path, out)
        return ExportReport(path=out, format=config.format, outtype=config.outtype, bytes=_size(out), merge=merge,
                            checks=[merge.verification, check], seconds=seconds)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        elif gguf_path is not None:
            gguf_path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(merged, ignore_errors=True)


def verify_gguf(gguf_path: Path, merged: Path, merge: MergeReport, outtype: str) -> VerifyReport:
    """Read the GGUF back with transformers and compare it with the merged folder it came from:
    the same token ids for the verification prompts, then the teacher-forced check."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    reference = merge.merged
    expected = encode_prompts(AutoTokenizer.from_pretrained(merged), MergeConfig().prompts)
    got = encode_prompts(tokenizer, MergeConfig().prompts)
    label = f"GGUF ({outtype}) read back by transformers vs the merged folder"
    if got != expected:
        raise MergeVerificationError(f"{label}: the GGUF's tokenizer encodes the verification prompts differently "
                                     "from the base's tokenizer")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    rows = forced_logprobs(model, reference)
    del model
    return compare(reference, rows, storage=f"gguf-{outtype}", label=label)


def _export_adapter(adapter: Adapter, out: Path, config: ExportConfig) -> ExportReport:
    from lorad.deltas.gguf_export import write_adapter_gguf
    from lorad.deltas.merge import check_adapters_fit

    t = time.perf_counter()
    base = locate_base(config.base)
    check_adapters_fit(base, [adapter])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        write_adapter_gguf(adapter, base.config, tmp, config.outtype)
        errors = adapter_gguf_errors(tmp, adapter, base.config)
        worst = max(errors.values())
        if worst > ADAPTER_TOLERANCE[config.outtype]:
            module = max(errors, key=errors.get)
            raise MergeVerificationError(
                f"the GGUF adapter's delta of {module} differs from the adapter's by {worst:.2e} (relative), above "
                f"{ADAPTER_TOLERANCE[config.outtype]:g} for {config.outtype}; nothing was written to {out}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if out.exists() and config.overwrite and out.is_dir():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(path=out, format="gguf-adapter", outtype=config.outtype, bytes=out.stat().st_size,
                        adapter_errors=errors, seconds={"total": time.perf_counter() - t})


def adapter_gguf_errors(path: Path, adapter: Adapter, base_config: dict) -> dict[str, float]:
    """Per module, ||dW_gguf - dW_adapter||_F / ||dW_adapter||_F, with dW_gguf rebuilt the way
    llama.cpp applies it: (alpha / r) * unpermute(lora_b) @ lora_a."""
    import gguf

    from lorad.deltas.gguf_export import _gguf_name, _heads, _llama_names

    reader = gguf.GGUFReader(str(path))
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    tensors = {t.name: torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).float()
               for t in reader.tensors}
    n_head, n_kv, _ = _heads(base_config)
    names = _llama_names(base_config)
    errors = {}
    for module in adapter.modules.values():
        target = _gguf_name(names, module.name + ".weight")
        a, b = tensors[f"{target}.lora_a"], tensors[f"{target}.lora_b"]
        heads = n_head if module.name.endswith("q_proj") else n_kv if module.name.endswith("k_proj") else 0
        if heads:
            b = _unpermute_rows(b, heads)
        got = (alpha / a.shape[0]) * (b.double() @ a.double())
        want = module.delta(torch.float64)
        errors[module.name] = float((got - want).norm() / want.norm()) if want.norm() > 0 else float(got.norm())
    return errors


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
