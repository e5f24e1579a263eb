"""Read and validate LoRA adapters in PEFT's on-disk format.

An adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`, exactly as
PEFT's `save_pretrained` writes them. Only safetensors are read: a pickled
`adapter_model.bin` is refused, never unpickled.

Validation happens in two stages:
  * `inspect_adapter` reads the config and the safetensors header only (no tensor data):
    every tensor must map to a projection of the base with the right shape, ranks must be
    within the limit, at least one module must match. Cheap enough for listing.
  * `load_adapter` also reads the tensors and rejects NaN / Inf.

Scaling follows PEFT: lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`, with
per-module `rank_pattern` / `alpha_pattern` overrides. DoRA adapters (`use_dora`) carry a
magnitude vector per module, which the server turns into a per-output-row scale (see
lorad.server.lora_slots).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from lorad.errors import InvalidAdapterError
from lorad.geometry import PROJECTIONS, ModelGeometry

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

# Adapter ids are names, never paths: a letter or digit, then letters, digits, '.', '_', '-'.
ADAPTER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (PEFT's saved names); group 3 is
# A or B; group 4 matches DoRA's ...q_proj.lora_magnitude_vector instead
_TENSOR_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\."
    r"(?:lora_([AB])(?:\.[\w-]+)?\.weight|lora_(m)agnitude_vector(?:\.[\w-]+)?(?:\.weight)?)$"
)


def _half(m: re.Match) -> str:
    return m.group(3) or "M"  # "A", "B" or "M" (the magnitude)


def validate_adapter_id(adapter_id: str) -> None:
    if not ADAPTER_ID_PATTERN.fullmatch(adapter_id or "") or ".." in adapter_id:
        raise ValueError(
            f"adapter id {adapter_id!r} is not a valid name: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


@dataclass(frozen=True)
class ModuleSpec:
    layer: int
    proj: str
    rank: int
    scale: float


@dataclass
class AdapterSpec:
    """What the header says: enough to list an adapter and to check it fits the base."""

    adapter_id: str
    path: Path
    rank: int  # the largest rank over modules
    lora_alpha: float
    target_modules: tuple[str, ...]  # projection names present
    modules: dict[tuple[int, str], ModuleSpec]
    size_bytes: int
    config: dict = field(repr=False)
    use_dora: bool = False  # every module has a magnitude vector (LoadedAdapter.magnitudes)


@dataclass
class LoadedAdapter:
    spec: AdapterSpec
    # (layer, proj) -> (A [r, in], B [out, r]) as PEFT stores them, in the file's dtype, on the host
    weights: dict[tuple[int, str], tuple["object", "object"]] = field(repr=False)
    load_seconds: float = 0.0
    # DoRA: (layer, proj) -> magnitude [out]; empty for plain LoRA
    magnitudes: dict[tuple[int, str], "object"] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rule: a key matches a module name when the name ends with it (regex allowed)."""
    for key, value in (patterns or {}).items():
        if module_name == key or re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _read_config(path: Path, adapter_id: str) -> dict:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise InvalidAdapterError(f"adapter {adapter_id!r}: {CONFIG_FILE} is missing in {path}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidAdapterError(f"adapter {adapter_id!r}: {CONFIG_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"adapter {adapter_id!r}: {CONFIG_FILE} must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InvalidAdapterError(f"adapter {adapter_id!r}: peft_type {peft_type} is not supported (only LORA)")
    unsupported = {
        "fan_in_fan_out": "fan_in_fan_out (Conv1D) adapters",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise InvalidAdapterError(f"adapter {adapter_id!r}: {what} are not supported yet ({key}=true)")
    if config.get("bias", "none") != "none":
        raise InvalidAdapterError(f"adapter {adapter_id!r}: bias={config['bias']!r} is not supported (only 'none')")
    if config.get("modules_to_save"):
        raise InvalidAdapterError(
            f"adapter {adapter_id!r}: modules_to_save={config['modules_to_save']} would replace base modules "
            "per adapter, which cannot share one batch; retrain without modules_to_save"
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise InvalidAdapterError(f"adapter {adapter_id!r}: {key}={value!r} must be a positive number")
    return config


def inspect_adapter(
    path: Path, adapter_id: str, geometry: ModelGeometry, max_rank: int
) -> AdapterSpec:
    """Validate an adapter folder from its config and safetensors header (no tensor data)."""
    from safetensors import safe_open

    path = Path(path)
    config = _read_config(path, adapter_id)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        pickled = [name for name in PICKLE_FILES if (path / name).exists()]
        if pickled:
            raise InvalidAdapterError(
                f"adapter {adapter_id!r} has only {pickled[0]}: lorad never unpickles weights; re-save it with "
                "PEFT's save_pretrained (safe_serialization is the default) to get adapter_model.safetensors"
            )
        raise InvalidAdapterError(f"adapter {adapter_id!r}: {WEIGHTS_FILE} is missing in {path}")
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise InvalidAdapterError(f"adapter {adapter_id!r}: {WEIGHTS_FILE} is not a readable safetensors file ({exc})") from exc

    default_r, default_alpha = config.get("r", 8), config.get("lora_alpha", 8)
    use_rslora = bool(config.get("use_rslora", False))
    halves: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        m = _TENSOR_NAME.match(name)
        if m is None:
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: tensor {name!r} does not map to a LoRA A/B matrix of a Llama projection "
                f"({', '.join(PROJECTIONS)})"
            )
        layer, proj, half = int(m.group(1)), m.group(2), _half(m)
        if proj not in PROJECTIONS:
            raise InvalidAdapterError(f"adapter {adapter_id!r}: tensor {name!r} targets {proj!r}, not one of {', '.join(PROJECTIONS)}")
        if layer >= geometry.num_layers:
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: tensor {name!r} targets layer {layer} but the base has {geometry.num_layers} layers"
            )
        halves.setdefault((layer, proj), {})[half] = shape

    if not halves:
        raise InvalidAdapterError(f"adapter {adapter_id!r}: no LoRA tensor matches a module of the base")
    use_dora = bool(config.get("use_dora", False))
    modules: dict[tuple[int, str], ModuleSpec] = {}
    for (layer, proj), pair in sorted(halves.items()):
        where = f"layers.{layer}.{proj}"
        magnitude = pair.pop("M", None)
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise InvalidAdapterError(f"adapter {adapter_id!r}: {where} has no {missing} tensor")
        in_f, out_f = geometry.projection_shape(proj)
        if use_dora and magnitude is None:
            raise InvalidAdapterError(f"adapter {adapter_id!r}: DoRA (use_dora=true) needs a lora_magnitude_vector for "
                                      f"{where}; the file has none")
        if not use_dora and magnitude is not None:
            raise InvalidAdapterError(f"adapter {adapter_id!r}: {where} has a DoRA magnitude vector but "
                                      "adapter_config.json does not set use_dora")
        if magnitude is not None and tuple(magnitude) != (out_f,):
            raise InvalidAdapterError(f"adapter {adapter_id!r}: {where} has a magnitude vector of shape "
                                      f"{list(magnitude)}; the base needs [{out_f}]")
        a_shape, b_shape = pair["A"], pair["B"]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != in_f or b_shape[0] != out_f or a_shape[0] != b_shape[1]:
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: {where} has lora_A {list(a_shape)} and lora_B {list(b_shape)}; the base needs "
                f"lora_A [r, {in_f}] and lora_B [{out_f}, r] (was it trained on another base?)"
            )
        rank = a_shape[0]
        module_name = f"model.layers.{layer}.{'self_attn' if proj in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{proj}"
        expected_rank = _pattern_value(config.get("rank_pattern"), module_name, default_r)
        if rank != expected_rank:
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: {where} has rank {rank} but adapter_config.json says {expected_rank}"
            )
        if rank > max_rank:
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: {where} has rank {rank}, above this server's limit of {max_rank} "
                f"(restart with --max-lora-rank {rank} or more)"
            )
        alpha = _pattern_value(config.get("alpha_pattern"), module_name, default_alpha)
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        modules[(layer, proj)] = ModuleSpec(layer, proj, rank, float(scale))

    return AdapterSpec(
        adapter_id=adapter_id,
        path=path,
        rank=max(m.rank for m in modules.values()),
        lora_alpha=float(default_alpha),
        target_modules=tuple(p for p in PROJECTIONS if any(k[1] == p for k in modules)),
        modules=modules,
        size_bytes=weights_path.stat().st_size,
        config=config,
        use_dora=use_dora,
    )


def load_adapter(path: Path, adapter_id: str, geometry: ModelGeometry, max_rank: int) -> LoadedAdapter:
    """Validate (header, then values) and read an adapter into host tensors (the file's dtype).

    Tensors are read with numpy, not torch ops: this runs on the server's loader thread, which
    must not start OpenMP work of its own (lorad.server.model_thread explains why).
    """
    spec = inspect_adapter(path, adapter_id, geometry, max_rank)
    tensors = _read_safetensors(Path(path) / WEIGHTS_FILE, adapter_id)
    grouped: dict[tuple[int, str], dict[str, object]] = {}
    for name, tensor in tensors.items():
        m = _TENSOR_NAME.match(name)
        assert m is not None, name  # inspect_adapter accepted every name
        grouped.setdefault((int(m.group(1)), m.group(2)), {})[_half(m)] = tensor
    weights = {key: (pair.get("A"), pair.get("B")) for key, pair in grouped.items()}
    magnitudes = {key: pair["M"] for key, pair in grouped.items() if "M" in pair}
    _check_matches_spec(weights, spec, geometry)
    if spec.use_dora and set(magnitudes) != set(spec.modules):
        raise InvalidAdapterError(f"adapter {spec.adapter_id!r}: {WEIGHTS_FILE} changed while it was being read; retry")
    return LoadedAdapter(spec=spec, weights=weights, magnitudes=magnitudes)


def _check_matches_spec(weights: dict, spec: AdapterSpec, geometry: ModelGeometry) -> None:
    """The tensors read must be those the header check saw: the file is opened twice, and a
    trainer may replace it in between (ranks and scales come from the first look)."""
    changed = InvalidAdapterError(
        f"adapter {spec.adapter_id!r}: {WEIGHTS_FILE} changed while it was being read; retry the request")
    if set(weights) != set(spec.modules):
        raise changed
    for key, (a, b) in weights.items():
        in_f, out_f = geometry.projection_shape(key[1])
        rank = spec.modules[key].rank
        if a is None or b is None or tuple(a.shape) != (rank, in_f) or tuple(b.shape) != (out_f, rank):
            raise changed


# safetensors dtype -> (numpy dtype read from the file, torch dtype of the tensor)
_FLOAT_DTYPES = {"F32": ("float32", "float32"), "F16": ("float16", "float16"), "F64": ("float64", "float64"),
                 "BF16": ("uint16", "bfloat16")}


def _read_safetensors(path: Path, adapter_id: str) -> dict:
    """A minimal safetensors reader (8-byte header length, JSON header, raw little-endian data)
    that checks every value is finite without running torch ops."""
    import numpy as np
    import torch

    def bad(why: str) -> InvalidAdapterError:
        return InvalidAdapterError(f"adapter {adapter_id!r}: {WEIGHTS_FILE} {why}")

    data = bytearray(path.stat().st_size)  # writable, so tensors can share it; one copy in memory
    with open(path, "rb") as f:
        if f.readinto(data) != len(data):
            raise bad("changed size while being read")
    if len(data) < 8:
        raise bad("is truncated")
    header_len = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"has an unreadable header ({exc})") from exc
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in _FLOAT_DTYPES:
            raise bad(f"holds tensor {name!r} of dtype {dtype}, not a float type")
        np_dtype, torch_dtype = _FLOAT_DTYPES[dtype]
        shape = [int(d) for d in info["shape"]]
        start, end = (int(o) for o in info["data_offsets"])
        count = math.prod(shape)
        itemsize = np.dtype(np_dtype).itemsize
        if end - start != count * itemsize or base + end > len(data):
            raise bad(f"has inconsistent offsets for tensor {name!r}")
        array = np.frombuffer(data, dtype=np.dtype(np_dtype).newbyteorder("<"), count=count, offset=base + start)
        if dtype == "BF16":
            finite = not np.any((array & 0x7F80) == 0x7F80)  # exponent all ones: Inf or NaN
        else:
            finite = bool(np.isfinite(array).all())
        if not finite:
            raise InvalidAdapterError(f"adapter {adapter_id!r}: tensor {name!r} holds NaN or Inf values")
        tensor = torch.from_numpy(array.reshape(shape))
        tensors[name] = tensor.view(getattr(torch, torch_dtype)) if dtype == "BF16" else tensor
    return tensors
