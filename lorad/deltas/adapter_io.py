"""PEFT LoRA adapters in and out: per-module deltas read from any adapter, and lorad's one writer.

    read_adapter(path)                  -> Adapter: for every module, A [r, in], B [out, r] and the
                                           scale s, so that its delta is dW = s * B @ A
    peft_tensors(factors, base_name)    -> (tensors, config): factors with scale 1 as PEFT lays them out
    write_adapter(dir, tensors, config, provenance)
                                        the ONE writer of adapter folders in lorad (trainer, combine,
                                        test helpers, demo adapters)
    write_peft_model(model, dir, base_name, provenance)
                                        a PEFT model's active adapter, through write_adapter

Scaling is PEFT's: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, with per-module
rank_pattern / alpha_pattern overrides matched by PEFT's own rule (peft.utils.other.get_pattern_key).
Adapters whose delta is not s * B @ A are refused with a sentence: DoRA (rescales the columns of
W + dW), lora_bias, embedding LoRAs, modules_to_save, trainable tokens, aLoRA.

An adapter folder on disk:
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, in] / .lora_B.weight [out, r]
    adapter_config.json         PEFT's LoraConfig (PEFT, lorad serve, vLLM and llama.cpp's converter read it)
    lorad_provenance.json       where it came from (trainer run, combination, ...); written last
"""

from __future__ import annotations

import datetime as _dt
import enum
import importlib.metadata
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorad.adapter_format import CONFIG_FILE, PICKLE_FILES, WEIGHTS_FILE
from lorad.errors import InvalidAdapterError
from lorad.files import fsync_path, sha256_file

PROVENANCE_FILE = "lorad_provenance.json"
PROVENANCE_FORMAT = "lorad-provenance/1"
PEFT_PREFIX = "base_model.model."

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (PEFT drops the adapter name on save)
_LORA_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<half>[AB])(?:\.[^.]+)?\.weight$")

# adapter_config.json keys whose adapters are not s * B @ A on Linear weights
_UNSUPPORTED = {
    "use_dora": "DoRA adapters (their delta rescales the columns of W + dW, it is not s * B @ A)",
    "lora_bias": "adapters with a LoRA bias (lora_bias=true)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters",
    "modules_to_save": "adapters with modules_to_save (they replace whole base modules)",
    "trainable_token_indices": "adapters with trainable tokens (they change embeddings)",
    "alora_invocation_tokens": "aLoRA adapters (active only after their invocation tokens)",
    "target_parameters": "adapters on raw parameters (target_parameters)",
    "layer_replication": "adapters with layer_replication",
}


@dataclass
class LoraModule:
    """One adapted Linear: dW = scale * b @ a."""

    name: str  # module path in the transformers model, e.g. model.layers.3.self_attn.q_proj
    a: torch.Tensor  # [r, in], as stored (any float dtype)
    b: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the adapted weight."""
        return self.b.shape[0], self.a.shape[1]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """dW = scale * B @ A: [out, in], computed in `dtype` (float32 unless asked)."""
        return (self.b.to(dtype) * self.scale) @ self.a.to(dtype)


@dataclass
class Adapter:
    path: Path
    config: dict = field(repr=False)
    modules: dict[str, LoraModule] = field(repr=False)  # module name -> factors, in file order
    weights_sha256: str = ""
    provenance: dict | None = field(default=None, repr=False)

    @property
    def base_model_name(self) -> str:
        return str(self.config.get("base_model_name_or_path") or "")

    @property
    def base_digest(self) -> str | None:
        """The base weights digest a lorad-written adapter records (trainer runs, combinations)."""
        base = (self.provenance or {}).get("base_model")
        return base.get("weights_digest") if isinstance(base, dict) else None

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    def describe(self) -> dict:
        """What provenance records about an input adapter."""
        return {
            "path": str(self.path),
            "weights_sha256": self.weights_sha256,
            "base_model_name_or_path": self.base_model_name,
            "base_weights_digest": self.base_digest,
            "ranks": sorted(self.ranks),
            "modules": len(self.modules),
        }


def _pattern_value(patterns: dict | None, module: str, default):
    """PEFT's own rule for rank_pattern / alpha_pattern (the first key matching the name's end)."""
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key

    return patterns.get(get_pattern_key(patterns.keys(), module), default)


def _positive_number(config: dict, key: str, where: str):
    value = config.get(key, 8)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise InvalidAdapterError(f"{where}: {CONFIG_FILE} has {key}={value!r}; it must be a positive number")
    return value


def read_config(path: Path) -> dict:
    where = str(path)
    if not path.is_dir():
        raise InvalidAdapterError(f"{where}: no such adapter folder")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise InvalidAdapterError(f"{where}: {CONFIG_FILE} is missing (not a PEFT adapter folder)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidAdapterError(f"{where}: {CONFIG_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{where}: {CONFIG_FILE} must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InvalidAdapterError(f"{where}: peft_type {peft_type} is not a LoRA adapter")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise InvalidAdapterError(f"{where}: {what} are not supported ({key}={config[key]!r})")
    if config.get("bias", "none") != "none":
        raise InvalidAdapterError(f"{where}: bias={config['bias']!r} is not supported (only 'none')")
    for key in ("r", "lora_alpha"):
        _positive_number(config, key, where)
    return config


def file_sha256(path: Path) -> str:
    return "sha256:" + sha256_file(path)


def read_adapter(path: str | Path) -> Adapter:
    """Read a PEFT LoRA adapter folder into per-module factors and scales (tensors on the CPU)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config = read_config(path)
    where = str(path)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        pickled = [name for name in PICKLE_FILES if (path / name).exists()]
        if pickled:
            raise InvalidAdapterError(
                f"{where}: only {pickled[0]} is there; lorad never unpickles weights: re-save the adapter with "
                "PEFT's save_pretrained to get adapter_model.safetensors")
        raise InvalidAdapterError(f"{where}: {WEIGHTS_FILE} is missing")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidAdapterError(f"{where}: {WEIGHTS_FILE} is not a readable safetensors file ({exc})") from exc

    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _LORA_TENSOR.match(key)
        if m is None:
            what = ("an embedding LoRA" if "lora_embedding" in key else
                    "a DoRA magnitude vector" if "lora_magnitude_vector" in key else "not a LoRA A/B matrix")
            raise InvalidAdapterError(f"{where}: tensor {key!r} is {what}; only LoRA on Linear layers is supported")
        if not tensor.is_floating_point() or tensor.dim() != 2:
            raise InvalidAdapterError(f"{where}: tensor {key!r} must be a 2-D float matrix, got {tensor.dtype} "
                                      f"{list(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise InvalidAdapterError(f"{where}: tensor {key!r} holds NaN or Inf values")
        halves.setdefault(m.group("module"), {})[m.group("half")] = tensor
    if not halves:
        raise InvalidAdapterError(f"{where}: {WEIGHTS_FILE} holds no LoRA tensors")

    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    use_rslora = bool(config.get("use_rslora", False))
    modules: dict[str, LoraModule] = {}
    for name, pair in halves.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise InvalidAdapterError(f"{where}: {name} has no {missing} tensor")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != b.shape[1]:
            raise InvalidAdapterError(f"{where}: {name} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
                                      "their ranks differ")
        rank = a.shape[0]
        expected = _pattern_value(config.get("rank_pattern"), name, r)
        if rank != expected:
            raise InvalidAdapterError(f"{where}: {name} has rank {rank} but {CONFIG_FILE} says {expected}")
        module_alpha = _pattern_value(config.get("alpha_pattern"), name, alpha)
        scale = module_alpha / math.sqrt(rank) if use_rslora else module_alpha / rank
        modules[name] = LoraModule(name, a, b, float(scale))

    provenance = None
    prov_path = path / PROVENANCE_FILE
    if prov_path.is_file():
        try:
            provenance = json.loads(prov_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            provenance = None  # provenance is informative; a damaged one does not make the adapter unusable
    return Adapter(path=path, config=config, modules=modules, weights_sha256=file_sha256(weights_path),
                   provenance=provenance if isinstance(provenance, dict) else None)


# ---- writing ------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    out = {}
    for dist in ("lorad", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def provenance_header(kind: str) -> dict:
    """The fields every lorad_provenance.json starts with."""
    return {
        "format": PROVENANCE_FORMAT,
        "kind": kind,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "lorad_version": package_versions()["lorad"],
    }


def lora_config(*, rank: int, alpha: float, target_modules: list[str], base_model_name: str = "",
                rank_pattern: dict | None = None, use_rslora: bool = False) -> dict:
    """An adapter_config.json as PEFT writes it for a plain LoRA (PEFT loads it; so do vLLM and llama.cpp)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": {},
        "init_lora_weights": False,
        "inference_mode": True,
    }


def peft_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], base_model_name: str = "",
                 dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict]:
    """Factors whose product IS the delta (dW = B @ A, scale 1) as PEFT tensors and config.

    One lora_alpha for every module keeps the file readable by tools that ignore alpha_pattern
    (llama.cpp's converter): lora_alpha is the most common rank R0, so modules of rank R0 have
    scale 1; a module of another rank r gets rank_pattern[r] and its B is stored divided by its
    scale R0 / r, so that PEFT's scale * B @ A is still the delta.
    """
    if not factors:
        raise ValueError("no modules to write")
    ranks = Counter(a.shape[0] for a, _ in factors.values())
    default_rank = max(ranks, key=lambda r: (ranks[r], r))
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    for name, (a, b) in factors.items():
        rank = a.shape[0]
        if rank != default_rank:
            rank_pattern[re.escape(name)] = rank
            b = b * (rank / default_rank)  # / scale, with scale = default_rank / rank
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.to(dtype).contiguous()
    targets = sorted({name.rsplit(".", 1)[-1] for name in factors})
    config = lora_config(rank=default_rank, alpha=default_rank, target_modules=targets,
                         base_model_name=base_model_name, rank_pattern=rank_pattern)
    return tensors, config


def write_adapter(output_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict,
                  provenance: dict | None = None) -> Path:
    """Write an adapter folder: the only place in lorad that writes adapter_model.safetensors.

    Files are staged in a temporary folder inside output_dir, fsynced, then moved in with
    os.replace: weights first, adapter_config.json (what `lorad serve` looks for) after them,
    lorad_provenance.json last, so its presence means the adapter beside it is complete, and a
    server scanning the folder never sees a config without its weights. Other files in
    output_dir (a trainer's metrics, checkpoints) are left alone.
    """
    from safetensors.torch import save_file

    if str(config.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"adapter config must have peft_type LORA, got {config.get('peft_type')!r}")
    clean: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"tensor {name!r} holds NaN or Inf values; refusing to write it")
        clean[name] = tensor.detach().to("cpu").contiguous()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=output_dir))
    try:
        save_file(clean, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(_jsonable(config), indent=2, sort_keys=True) + "\n")
        names = [WEIGHTS_FILE, CONFIG_FILE]
        if provenance is not None:
            (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
            names.append(PROVENANCE_FILE)
        for name in names:
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
            os.replace(staging / name, output_dir / name)
        fsync_path(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def _jsonable(value):
    """PEFT configs hold sets and str enums; JSON wants lists and strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value  # PeftType.LORA -> "LORA"
    return value


def write_peft_model(peft_model, output_dir: str | Path, base_name: str, provenance: dict | None = None,
                     adapter_name: str = "default", state_dict: dict | None = None) -> Path:
    """Save a PEFT model's adapter as PEFT's save_pretrained would (same tensors, same config), through
    write_adapter. base_model_name_or_path is set to base_name (lorad's name for the base).
    state_dict: the model's full state when its own parameters are shards (the trainer's FSDP runs)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, state_dict=state_dict, adapter_name=adapter_name,
                                      save_embedding_layers=False)
    tensors = {name: tensor.detach().clone() for name, tensor in state.items()}  # no shared storage
    config = _jsonable(peft_model.peft_config[adapter_name].to_dict())
    config.pop("runtime_config", None)
    config["base_model_name_or_path"] = base_name
    config["inference_mode"] = True
    if config.get("task_type") is None:  # PEFT records which class to rebuild, as save_pretrained does
        cls = type(peft_model.get_base_model())
        config["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return write_adapter(output_dir, tensors, config, provenance)
