"""Merge adapters into their base: a transformers model folder, verified before it is published.

    report = merge_adapters(adapters, weights, out_dir, MergeConfig(base="smollm2-135m-instruct"),
                            reference=engine_reference, progress=cb)

Steps (memory: one float32 copy of the base, plus one output shard):
  1. resolve the base to a local folder of safetensors (the embedded default is converted once);
     check that every adapted module is a weight of the base with the adapter's shape, and that
     the base weights digest matches the one an adapter's provenance records;
  2. load the base in float32; unless from_original, replace every quantized projection by
     dequant(NF4(W)) (lorad.deltas.nf4): the base the adapter was trained and served against;
  3. reference: lorad serving the adapter (weighted adapters: their exact `cat` combination) on
     THAT base in float32 answers the verification prompts (greedy tokens and log-probs);
  4. write W' = W_src + sum_i w_i dW_i for every adapted module, W_src for the other projections
     and every other tensor (embeddings, norms) as in the base, cast to the output dtype, under
     the base's own tensor names, with config, generation config, tokenizer and chat template,
     into a staging folder beside out_dir;
  5. load the staging folder back with AutoModelForCausalLM and check it against the reference
     (lorad.deltas.verify); only then rename it into place (atomic on one filesystem).

`reference` is injected (lorad.server.offline_reference.engine_reference in the CLI), so this
module never imports server code; progress is reported as (phase, done, total).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lorad.base_model import (
    EMBEDDED_ALIAS,
    BaseModelConfig,
    LoadedBase,
    ResolvedBase,
    check_architecture,
    resolve_base,
    weights_digest,
)
from lorad.deltas import nf4
from lorad.deltas.adapter_io import Adapter, package_versions, provenance_header
from lorad.deltas.combine import CombineConfig, combine, weighted_delta, write_combined
from lorad.deltas.verify import (
    VERIFY_PROMPTS,
    Generation,
    VerifyReport,
    as_reference,
    compare,
    encode_prompts,
    forced_logprobs,
)
from lorad.errors import BaseModelError, ConfigError, InvalidAdapterError, LoradError
from lorad.geometry import ATTENTION_PROJECTIONS, PROJECTIONS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_CONFIG_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
MERGE_FILE = "lorad_merge.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")

Progress = Callable[[str, int, int], None]  # (phase, done, total)
# (base loaded in float32, adapter folder or None, prompt token ids, max new tokens) -> greedy answers
Reference = Callable[[LoadedBase, "Path | None", list, int], list]


class MergeVerificationError(LoradError):
    """The merged model does not answer like lorad serving the adapter; nothing was published."""


class MergeCancelled(LoradError):
    """The caller cancelled the merge; nothing was published."""


@dataclass
class MergeConfig:
    """How adapters are merged into a base.

    base: what `lorad serve --base` takes (alias, local folder, hub id already in the local cache).
    dtype: fp32 | bf16 | fp16 of the written weights; None = the base checkpoint's own dtype.
    from_original: add the deltas to the original weights instead of dequant(NF4(W)).
    nf4_dtype: dtype the weights are cast to before NF4 quantization: fp32 is what `lorad serve`
        and `lorad train` do on CPU, bf16 what they do on CUDA.
    max_shard_size: bytes per safetensors shard of the output.
    verify_tokens: greedy tokens generated per verification prompt.
    overwrite: replace an existing output folder (after verification, atomically).
    """

    base: str = EMBEDDED_ALIAS
    dtype: str | None = None
    from_original: bool = False
    nf4_dtype: str = "fp32"
    max_shard_size: int = 2 * 2**30
    verify_tokens: int = 16
    prompts: tuple[str, ...] = VERIFY_PROMPTS
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.nf4_dtype not in nf4.QUANT_DTYPES:
            raise ConfigError(f"nf4_dtype: {self.nf4_dtype!r} is not one of {', '.join(nf4.QUANT_DTYPES)}")
        if not isinstance(self.max_shard_size, int) or self.max_shard_size < 2**20:
            raise ConfigError(f"max_shard_size: must be at least 1 MiB, got {self.max_shard_size!r}")
        if not isinstance(self.verify_tokens, int) or self.verify_tokens < 1:
            raise ConfigError(f"verify_tokens: must be a positive integer, got {self.verify_tokens!r}")
        if len(self.prompts) < 8:
            raise ConfigError(f"prompts: verification needs at least 8 prompts, got {len(self.prompts)}")


@dataclass
class BaseFiles:
    resolved: ResolvedBase
    folder: Path
    shards: list[Path]
    tensors: dict[str, tuple[Path, tuple[int, ...], str]]  # name -> (shard, shape, safetensors dtype)
    config: dict

    @property
    def dtype(self) -> str:
        name = self.config.get("dtype") or self.config.get("torch_dtype") or "float32"
        return _CONFIG_DTYPES.get(str(name), "fp32")


@dataclass
class MergeReport:
    out_dir: Path
    base: str
    base_location: str
    dtype: str
    mode: str  # "nf4-roundtrip" | "original"
    adapted_modules: int
    roundtripped: int
    bytes_written: int
    shards: int
    verification: VerifyReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    reference: list[Generation] = field(default_factory=list, repr=False)  # what lorad serving answered
    merged: list[Generation] = field(default_factory=list, repr=False)  # the merged folder's view (GGUF check)


def locate_base(name: str) -> BaseFiles:
    """The base's local folder, its safetensors shards and tensor index (headers only)."""
    from safetensors import safe_open

    resolved = resolve_base(BaseModelConfig(name=name, quant="none"))
    folder = Path(resolved.location)
    if resolved.source == "hub":
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(resolved.location, local_files_only=True))
        except Exception as exc:
            raise BaseModelError(f"base {name!r} ({resolved.location}) is not in the local hub cache and the hub "
                                 "is not reachable here: pass a local checkpoint folder") from exc
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BaseModelError(f"base folder {folder} has no config.json")
    from transformers import AutoConfig

    config = json.loads(config_path.read_text())
    check_architecture(AutoConfig.from_pretrained(folder))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / "model.safetensors").is_file():
        shards = [folder / "model.safetensors"]
    else:
        raise BaseModelError(f"base folder {folder} has no safetensors weights (model.safetensors or an index); "
                             "lorad never unpickles .bin checkpoints")
    tensors = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                tensors[key] = (shard, tuple(sl.get_shape()), sl.get_dtype())
    return BaseFiles(resolved=resolved, folder=folder, shards=shards, tensors=tensors, config=config)


def quantized_weights(base: BaseFiles) -> list[str]:
    """Names of the weights bitsandbytes quantizes when lorad loads this base in NF4: every projection."""
    layers = int(base.config.get("num_hidden_layers", 0))
    names = []
    for layer in range(layers):
        for proj in PROJECTIONS:
            group = "self_attn" if proj in ATTENTION_PROJECTIONS else "mlp"
            name = f"model.layers.{layer}.{group}.{proj}.weight"
            if name in base.tensors:
                names.append(name)
    return names


def check_adapters_fit(base: BaseFiles, adapters: list[Adapter]) -> None:
    digest = None
    for adapter in adapters:
        for name, module in adapter.modules.items():
            entry = base.tensors.get(f"{name}.weight")
            if entry is None:
                raise InvalidAdapterError(f"{adapter.path}: adapts {name}, which base {base.resolved.display_name!r} "
                                          "does not have (was it trained on another base?)")
            if tuple(entry[1]) != module.shape:
                raise InvalidAdapterError(
                    f"{adapter.path}: {name} is [out, in] {list(module.shape)} in the adapter but {list(entry[1])} in "
                    f"base {base.resolved.display_name!r} (was it trained on another base?)")
        if adapter.base_digest:
            digest = digest or weights_digest(base.resolved)
            if digest is not None and digest != adapter.base_digest:
                raise InvalidAdapterError(
                    f"{adapter.path} was trained on base weights {adapter.base_digest}, but "
                    f"{base.resolved.display_name!r} has {digest}")


def _load_source(base: BaseFiles, config: MergeConfig, progress: Progress | None):
    """The base in float32 with the weights the adapter saw (NF4 round trip unless from_original)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base.folder, dtype=torch.float32).eval()
    model.requires_grad_(False)
    names = [] if config.from_original else quantized_weights(base)
    quant_dtype = nf4.QUANT_DTYPES[config.nf4_dtype]
    with torch.no_grad():
        for i, name in enumerate(names, 1):
            param = model.get_parameter(name)
            param.copy_(nf4.roundtrip(param, quant_dtype))
            if progress is not None:
                progress("nf4 round trip", i, len(names))
    loaded = LoadedBase(model=model, tokenizer=tokenizer, resolved=base.resolved, device=torch.device("cpu"),
                        compute_dtype=torch.float32)
    return loaded, len(names)


def _shard_plan(base: BaseFiles, dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    """Tensor names per output shard, in the base's order, each shard at most max_bytes (or one tensor)."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, (_, shape, st_dtype) in base.tensors.items():
        n = itemsize if st_dtype.startswith(("F", "BF")) else 8
        for d in shape:
            n *= d
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _write_weights(base: BaseFiles, model, deltas: Callable[[str], "torch.Tensor | None"], dtype: torch.dtype,
                   staging: Path, config: MergeConfig, progress: Progress | None) -> tuple[int, int]:
    """W' = W_src + delta for projections, other tensors as in the base; returns (bytes, shards)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    plan = _shard_plan(base, dtype, config.max_shard_size)
    quantized = set(quantized_weights(base))
    files = ["model.safetensors"] if len(plan) == 1 else [
        f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    total, done, weight_map = 0, 0, {}
    handles: dict[Path, object] = {}
    try:
        for names, fname in zip(plan, files):
            out = {}
            for name in names:
                if name in quantized:
                    weight = model.get_parameter(name).detach()  # W_src, float32
                else:
                    shard = base.tensors[name][0]
                    if shard not in handles:
                        handles[shard] = safe_open(str(shard), framework="pt")
                    weight = handles[shard].get_tensor(name)
                delta = deltas(name.removesuffix(".weight")) if name.endswith(".weight") else None
                if delta is not None:
                    weight = weight.float() + delta
                out[name] = weight.to(dtype).contiguous() if weight.is_floating_point() else weight
                weight_map[name] = fname
                total += out[name].numel() * out[name].element_size()
                done += 1
                if progress is not None:
                    progress("write", done, len(base.tensors))
            save_file(out, str(staging / fname), metadata={"format": "pt"})
            del out
    finally:
        handles.clear()
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total, len(files)


def _write_side_files(base: BaseFiles, dtype: torch.dtype, staging: Path) -> None:
    """config.json (dtype updated), generation config, tokenizer and chat template."""
    config = dict(base.config)
    config.pop("quantization_config", None)
    config["dtype"] = _DTYPE_NAMES[dtype]
    if "torch_dtype" in config:
        config["torch_dtype"] = _DTYPE_NAMES[dtype]
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = base.folder / "generation_config.json"
    if generation.is_file():
        shutil.copy2(generation, staging / generation.name)
    else:
        from transformers import GenerationConfig, PretrainedConfig

        GenerationConfig.from_model_config(PretrainedConfig.from_dict(base.config)).save_pretrained(staging)
    for name in TOKENIZER_FILES:
        if (base.folder / name).is_file():
            shutil.copy2(base.folder / name, staging / name)


def reference_adapter(adapters: list[Adapter], weights: list[float], scratch: Path) -> Path:
    """What lorad serves for the reference: the adapter itself, or the exact (cat) combination."""
    if len(adapters) == 1 and weights[0] == 1.0:
        return adapters[0].path
    result = combine(adapters, weights, CombineConfig(method="cat"))
    return write_combined(result, scratch / "merged-reference")


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the staging folder into place; with overwrite an existing folder is swapped out first."""
    _fsync_tree(staging)
    old = None
    if out_dir.exists():
        if not overwrite:
            raise ConfigError(f"{out_dir} already exists; pass --force to replace it")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(out_dir: Path, overwrite: bool) -> Path:
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir} already exists; pass --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))


def merge_adapters(adapters: list[Adapter], weights: list[float], out_dir: str | Path, config: MergeConfig,
                   reference: Reference, progress: Progress | None = None, staged_only: bool = False,
                   cancel: threading.Event | None = None) -> MergeReport:
    """Merge sum_i w_i dW_i into the base, verify against `reference`, publish out_dir atomically.

    cancel: set it from another thread to stop at the next weight (MergeCancelled; nothing is
    published, the staging folder is removed).

    staged_only=True leaves the verified folder in a hidden staging folder beside out_dir and
    returns that path as report.out_dir (export uses it as an intermediate and removes it).
    """
    if not adapters:
        raise ConfigError("adapters: give at least one adapter")
    if len(weights) != len(adapters):
        raise ConfigError(f"weights: {len(weights)} weights for {len(adapters)} adapters")
    out_dir = Path(out_dir)
    times: dict[str, float] = {}
    caller_progress = progress

    def progress(phase: str, done: int, total: int) -> None:
        if cancel is not None and cancel.is_set():
            raise MergeCancelled(f"merge cancelled during {phase}; nothing was written to {out_dir}")
        if caller_progress is not None:
            caller_progress(phase, done, total)

    t0 = time.perf_counter()
    base = locate_base(config.base)
    check_adapters_fit(base, adapters)
    dtype = DTYPES[config.dtype or base.dtype]
    staging = staging_dir(out_dir, config.overwrite or staged_only)
    scratch = Path(tempfile.mkdtemp(prefix=".lorad-merge-"))
    try:
        loaded, roundtripped = _load_source(base, config, progress)
        times["load_base"] = time.perf_counter() - t0
        t = time.perf_counter()
        prompts = encode_prompts(loaded.tokenizer, config.prompts)
        ref_adapter = reference_adapter(adapters, weights, scratch)
        generations = reference(loaded, ref_adapter, prompts, config.verify_tokens)
        times["reference"] = time.perf_counter() - t
        progress("reference", len(prompts), len(prompts))

        t = time.perf_counter()
        adapted = {name for a in adapters for name in a.modules}

        def delta(name: str):
            return weighted_delta(adapters, weights, name) if name in adapted else None

        total, shards = _write_weights(base, loaded.model, delta, dtype, staging, config, progress)
        _write_side_files(base, dtype, staging)
        times["write"] = time.perf_counter() - t
        del loaded
        gc.collect()

        t = time.perf_counter()
        verification, merged_view = verify_folder(staging, generations, config.dtype or base.dtype, progress)
        times["verify"] = time.perf_counter() - t
        report = MergeReport(
            out_dir=staging if staged_only else out_dir, base=base.resolved.display_name,
            base_location=str(base.folder), dtype=config.dtype or base.dtype,
            mode="original" if config.from_original else "nf4-roundtrip", adapted_modules=len(adapted),
            roundtripped=roundtripped, bytes_written=total, shards=shards, verification=verification,
            seconds=times, reference=generations, merged=merged_view)
        if not verification.passed:
            raise MergeVerificationError(
                f"{verification.summary()}; nothing was written to {out_dir}: " + "; ".join(verification.failures[:4]))
        times["total"] = time.perf_counter() - t0
        provenance = _provenance(report, base, adapters, weights, config)
        (staging / MERGE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        if not staged_only:
            publish(staging, out_dir, config.overwrite)
        return report
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def verify_folder(folder: Path, reference: list[Generation], storage: str, progress: Progress | None = None,
                  label: str | None = None) -> tuple[VerifyReport, list[Generation]]:
    """Load a merged folder back as a user would (transformers only) and compare it with the reference.

    Returns the report and the folder's own teacher-forced answers (the reference of a GGUF check)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(folder)  # the tokenizer and its chat template load too
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = forced_logprobs(model, reference)
    del model
    if progress is not None:
        progress("verify", len(reference), len(reference))
    report = compare(reference, rows, storage=storage,
                     label=label or f"merged folder ({storage}) vs lorad serving the adapter")
    return report, as_reference(reference, rows)


def _provenance(report: MergeReport, base: BaseFiles, adapters: list[Adapter], weights: list[float],
                config: MergeConfig) -> dict:
    return {
        **provenance_header("merge"),
        "base_model": {"name": report.base, "location": report.base_location,
                       "weights_digest": weights_digest(base.resolved)},
        "merge": {
            "mode": report.mode,
            "nf4": None if config.from_original else {"quant_type": "nf4", "double_quant": True,
                                                       "blocksize": nf4.BLOCKSIZE, "from_dtype": config.nf4_dtype,
                                                       "roundtripped_weights": report.roundtripped},
            "dtype": report.dtype,
            "adapted_modules": report.adapted_modules,
        },
        "inputs": [{**a.describe(), "weight": w} for a, w in zip(adapters, weights)],
        "verification": report.verification.as_dict() if report.verification else None,
        "seconds": {k: round(v, 2) for k, v in report.seconds.items()},
        "versions": package_versions(),
    }
