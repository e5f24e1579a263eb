"""Which LoRA a run trains: PEFT's LoraConfig from the YAML, the adapter a run starts from, and
the initialisations PEFT cannot do for lorad.

    lora_config_for(cfg)          LoraConfig: rank, alpha, targets (names or regexes), rsLoRA,
                                  DoRA, init (gaussian / pissa / olora; loftq below), bias,
                                  lora_bias, modules_to_save
    check_lora_modules(model)     every LoRA module sits on a projection lorad serves, one
                                  adapter, no LoRA inside another (the "double LoRA" of a bad resume)
    StartingAdapter               lora_model_dir or --init-from CHECKPOINT: its rank and targets
                                  win over the YAML, a contradiction is an error naming both
    loftq_init_nf4(model, path)   LoftQ for an NF4 base that stays as served
    InitialAdapter                PiSSA / OLoRA: the initial A0, B0, so the published adapter is a
                                  standard LoRA on the original base (rank 2r: A B - A0 B0)

Everything here works on PEFT objects and safetensors files; nothing imports the server.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from lorad.errors import ConfigError
from lorad.geometry import PROJECTIONS
from lorad.trainer.config import TrainConfig
from lorad.trainer.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# model.layers.3.self_attn.q_proj: the modules lorad serve applies LoRA to
_SERVABLE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def peft_init(cfg: TrainConfig) -> bool | str:
    """init_lora_weights for PEFT: LoftQ on an NF4 base is lorad's own (loftq_init_nf4), after a
    standard init."""
    return True if cfg.peft_init_lora_weights == "loftq" else cfg.peft_init_lora_weights


def lora_config_for(cfg: TrainConfig):
    from peft import LoraConfig

    alpha = int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_patterns,
        bias=cfg.bias,
        lora_bias=cfg.lora_bias,
        use_rslora=cfg.peft_use_rslora,
        use_dora=cfg.peft_use_dora,
        init_lora_weights=peft_init(cfg),
        modules_to_save=cfg.lora_modules_to_save,
        task_type="CAUSAL_LM",
    )


def wrap_with_lora(model, cfg: TrainConfig):
    """get_peft_model with lorad's checks: PEFT's "target not found" becomes a ConfigError, and
    every wrapped module must be a projection lorad serves."""
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, lora_config_for(cfg))
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "Target modules" in str(exc):
            raise ConfigError(f"lora_target_modules: {cfg.lora_target_modules!r} matches no module of the base ({exc})") from exc
        raise
    lora_modules(peft_model, cfg)
    return peft_model


def lora_modules(model, cfg: TrainConfig) -> list[str]:
    """Paths of the modules holding LoRA (model.layers.N.self_attn.q_proj, ...); raises when one
    is not a projection lorad serves."""
    found = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and len(getattr(module, "lora_A")):
            path = name.removeprefix("base_model.model.")
            m = _SERVABLE.match(path)
            if m is None or m.group(2) not in PROJECTIONS:
                raise ConfigError(
                    f"lora_target_modules: {cfg.lora_target_modules!r} matches {path}, which lorad serve cannot apply "
                    f"LoRA to (it applies LoRA to {', '.join(PROJECTIONS)})"
                )
            found.append(path)
    return found


def check_single_adapter(model, expected_modules: list[str]) -> None:
    """Exactly one LoRA pair per targeted module: no adapter wrapped inside another (the
    "double LoRA" of a resume that re-wraps a PEFT model, axolotl#2568)."""
    names = [n for n, _ in model.named_modules() if n.endswith(".lora_A.default")]
    nested = [n for n in names if n.count("base_model") > 1 or n.count("lora_A") > 1 or ".base_layer.base_layer" in n]
    adapters = list(getattr(model, "peft_config", {}))
    if nested or len(names) != len(expected_modules) or adapters != ["default"]:
        raise CheckpointError(
            f"the model holds {len(names)} LoRA modules in adapters {adapters} (expected {len(expected_modules)} in "
            "['default']); an adapter was applied on top of another"
        )


# ---- continue from an adapter ------------------------------------------------------------------


@dataclass(frozen=True)
class StartingAdapter:
    """The adapter a run starts from: `lora_model_dir` (any PEFT LoRA folder) or `--init-from`
    (a complete checkpoint of an earlier run). The run gets a fresh optimizer and schedule."""

    kind: str  # "lora_model_dir" | "init_from"
    path: Path
    config: dict  # its adapter_config.json
    sha256: str  # of its adapter_model.safetensors
    step: int | None = None  # the checkpoint's step (init_from)
    parent_fingerprint: dict | None = None  # the checkpoint's run fingerprint (init_from)

    @classmethod
    def read(cls, kind: str, path: str | Path, *, step: int | None = None, fingerprint: dict | None = None):
        folder = Path(path).expanduser()
        what = "lora_model_dir" if kind == "lora_model_dir" else "--init-from"
        config_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
        if not config_path.is_file() or not weights.is_file():
            raise ConfigError(f"{what}: {path} holds no PEFT adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{what}: {config_path} is not readable JSON ({exc})") from exc
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise ConfigError(f"{what}: {path} is a {config.get('peft_type')} adapter, not LoRA")
        for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "layer_replication"):
            if config.get(key):
                raise ConfigError(f"{what}: the adapter in {path} uses {key}, which a lorad config cannot express")
        init = config.get("init_lora_weights", True)
        if kind == "lora_model_dir" and isinstance(init, str) and init.startswith(("pissa", "olora", "corda")):
            raise ConfigError(
                f"lora_model_dir: the adapter in {path} is an unconverted {init} adapter, relative to a rewritten base; "
                "start from the converted adapter a finished lorad run publishes (its output_dir), or fork the "
                "checkpoint with --init-from"
            )
        h = hashlib.sha256()
        with open(weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return cls(kind, folder, config, "sha256:" + h.hexdigest(), step, fingerprint)

    def settings(self) -> dict:
        """The adapter's shape in lorad's config keys."""
        c = self.config
        targets = c.get("target_modules")
        if isinstance(targets, list):
            targets = sorted(targets, key=lambda t: PROJECTIONS.index(t) if t in PROJECTIONS else len(PROJECTIONS))
        return {
            "lora_r": int(c.get("r", 8)),
            "lora_alpha": float(c.get("lora_alpha", 8)),
            "lora_target_modules": targets,
            "peft_use_rslora": bool(c.get("use_rslora", False)),
            "peft_use_dora": bool(c.get("use_dora", False)),
            "bias": c.get("bias", "none") or "none",
            "lora_bias": bool(c.get("lora_bias", False)),
            "lora_modules_to_save": c.get("modules_to_save") or None,
        }

    def state(self) -> dict:
        """What a checkpoint records, so a resumed run rebuilds the same shape without the parent's files."""
        return {"kind": self.kind, "path": str(self.path), "config": self.config, "sha256": self.sha256,
                "step": self.step, "parent_fingerprint": self.parent_fingerprint}

    @classmethod
    def from_state(cls, state: dict) -> "StartingAdapter":
        return cls(state["kind"], Path(state["path"]), state["config"], state["sha256"], state.get("step"),
                   state.get("parent_fingerprint"))

    def provenance(self) -> dict:
        out = {"kind": self.kind, "path": str(self.path), "adapter_sha256": self.sha256}
        if self.step is not None:
            out["step"] = self.step
        return out


def _targets_of(cfg: TrainConfig) -> list[str] | str:
    patterns = cfg.target_patterns
    return patterns if isinstance(patterns, str) else list(patterns)


def apply_starting_adapter(cfg: TrainConfig, start: StartingAdapter) -> TrainConfig:
    """The config with the adapter's rank, alpha, targets and variant; a key the YAML set to
    something else is an error naming both values."""
    theirs = start.settings()
    what = "lora_model_dir" if start.kind == "lora_model_dir" else "--init-from"
    mismatches = []
    for key, value in theirs.items():
        if key == "lora_target_modules":
            given = "lora_target_modules" in cfg._given or "lora_target_linear" in cfg._given
            mine = _targets_of(cfg)
            if given and _norm_targets(mine) != _norm_targets(value):
                mismatches.append(f"targets: the adapter has {value}, this config has {mine}")
        elif key in cfg._given and getattr(cfg, key) != value:
            mismatches.append(f"{key}: the adapter has {value!r}, this config has {getattr(cfg, key)!r}")
    if mismatches:
        raise ConfigError(
            f"{what}: the adapter in {start.path} does not match this config (its shape wins; remove these keys from "
            "the config or make them equal):\n  " + "\n  ".join(mismatches)
        )
    if "peft_init_lora_weights" in cfg._given and cfg.peft_init_lora_weights not in (True, start.config.get("init_lora_weights", True)):
        raise ConfigError(f"peft_init_lora_weights: {cfg.peft_init_lora_weights!r} initialises a new adapter; "
                          f"{what} starts from trained weights")
    init = start.config.get("init_lora_weights", True)
    changes = dict(theirs, lora_target_linear=None, peft_init_lora_weights=True, loftq_config=None, peft=None)
    if isinstance(init, str) and init.startswith(("pissa", "olora")):
        # the checkpoint's A, B are relative to the base its init rewrote: rewrite it the same way
        changes["peft_init_lora_weights"] = init
        parent_seed = (start.parent_fingerprint or {}).get("seed")
        if init.startswith("pissa_niter") and parent_seed is not None and parent_seed != cfg.seed:
            raise ConfigError(f"seed: {init} rewrote the base with a seeded randomized SVD; keep the parent's seed "
                              f"({parent_seed}) to rebuild it, this config has {cfg.seed}")
    new = replace(cfg, **changes)
    object.__setattr__(new, "_given", cfg._given)
    return new


def _norm_targets(t) -> object:
    return t if isinstance(t, str) else sorted(t or [])


def load_adapter_weights(peft_model, folder: Path, what: str) -> None:
    """Copy a saved adapter's tensors into the freshly built PEFT model; every tensor must land."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    weights = load_peft_weights(str(folder), device="cpu")
    result = set_peft_model_state_dict(peft_model, weights, adapter_name="default")
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if result.unexpected_keys or missing:
        raise ConfigError(
            f"{what}: the adapter in {folder} does not fit the model it was loaded into "
            f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}); was it trained on another base?"
        )


def trainable_state(model) -> dict:
    """The trainable tensors, whole and on the CPU. Under FSDP every rank holds shards (DTensors),
    gathered here: a collective, so every rank must call it."""
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


# ---- LoftQ on the served NF4 base --------------------------------------------------------------


def loftq_init_nf4(peft_model, base_location: str) -> int:
    """Start every LoRA pair at the best rank-r correction of its layer's NF4 quantization error:

        s * B A = SVD_r(W - dequant(nf4(W)))        W: the original weight, from the base's files

    so the first forward is closer to the unquantized model, while the base stays the NF4 one
    lorad serves. Written here because PEFT's replace_lora_weights_loftq computes on CUDA only
    and ignores the LoRA scaling s (exact only for alpha = r). Returns the modules initialised."""
    import bitsandbytes as bnb
    import torch
    from safetensors import safe_open

    from lorad.base_model import dequantize_nf4

    files = _weight_files(Path(base_location))
    index = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            index.update({k: path for k in f.keys()})
    done = 0
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})):
            continue
        base = module.get_base_layer()
        if not isinstance(base, bnb.nn.Linear4bit):
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        if key not in index:
            raise ConfigError(f"peft_init_lora_weights: loftq needs the base's original weights; {key} is not in {files}")
        with safe_open(str(index[key]), framework="pt") as f:
            original = f.get_tensor(key).float()  # [out, in]
        with torch.no_grad():
            quantized = dequantize_nf4(base.weight)  # [out, in] float32, as served
            r = module.r["default"]
            u, s, vh = torch.linalg.svd(original - quantized, full_matrices=False)
            root = s[:r].sqrt() / math.sqrt(module.scaling["default"])
            lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
            lora_a.copy_((root[:, None] * vh[:r]).to(lora_a.dtype))  # [r, in]
            lora_b.copy_((u[:, :r] * root[None, :]).to(lora_b.dtype))  # [out, r]
        done += 1
    if done == 0:
        raise ConfigError("peft_init_lora_weights: loftq found no LoRA layer over an NF4 weight")
    return done


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"peft_init_lora_weights: loftq reads the base's original weights from safetensors files; "
                          f"{folder} has none")
    return files


# ---- PiSSA / OLoRA: publish a standard LoRA ------------------------------------------------------


def needs_conversion(cfg: TrainConfig) -> bool:
    init = cfg.peft_init_lora_weights
    return isinstance(init, str) and init.startswith(("pissa", "olora"))


def save_initial_adapter(peft_model, folder: Path) -> Path:
    """The adapter as initialised (A0, B0), which PEFT's save_pretrained(...,
    path_initial_model_for_weight_conversion=folder) subtracts at the end: A B - A0 B0 as one
    LoRA of rank 2r that applies to the original base."""
    config = peft_model.peft_config["default"]
    before = config.init_lora_weights
    config.init_lora_weights = True  # PEFT's documented step: the initial adapter loads as a plain LoRA
    try:
        peft_model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
    finally:
        config.init_lora_weights = before
    return folder
