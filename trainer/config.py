"""The typed config of `lorad train`, read from an axolotl-style YAML file.

One dataclass per concept, validated at construction; every error names the key. The YAML is
data: unknown keys are rejected with the closest known key, nothing is imported or executed.

    cfg = load_config("storyteller.yaml", overrides=["max_steps=20", "datasets.0.path=./d.jsonl"])

Key names follow axolotl (`sequence_len`, `micro_batch_size`, `lora_target_linear`, the custom
`datasets[].type` mapping, ...). Values that depend on the hardware (`bf16: auto`) are resolved
later, by `resolve_precision`, once the device is known.
"""

from __future__ import annotations

import difflib
import math
import re
import string
import types
import typing
import dataclasses
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lorad.base_model import EMBEDDED_ALIAS
from lorad.errors import ConfigError
from lorad.geometry import PROJECTIONS
from lorad.trainer.axolotl_keys import AXOLOTL_INFORMATIONAL, AXOLOTL_UNSUPPORTED

# adamw_8bit is transformers' own name for the same bitsandbytes optimizer; one name keeps
# resume fingerprints stable
OPTIMIZER_ALIASES = {"adamw_8bit": "adamw_bnb_8bit", "adamw_hf": "adamw_torch"}
BUILTIN_TYPES = ("alpaca", "chat_template", "completion")
INIT_LORA_WEIGHTS = ("gaussian", "pissa", "olora", "loftq")  # besides true / false and pissa_niter_<K>
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
Auto = Literal["auto"]


def transformers_optimizers() -> tuple[str, ...]:
    """Every optimizer name the installed transformers accepts (its own enum: new ones arrive for free)."""
    from transformers.training_args import OptimizerNames

    return tuple(o.value for o in OptimizerNames)


def transformers_schedulers() -> tuple[str, ...]:
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)


# --------------------------------------------------------------------------------------------
# Generic checking of a dict against a dataclass's type hints


def _closest(key: str, known: list[str]) -> str | None:
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return match[0] if match else None


def _unknown_key_error(where: str, key: str, known: list[str]) -> ConfigError:
    guess = _closest(key, known)
    hint = f"; did you mean '{guess}'?" if guess else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"{where}{key}: unknown key{hint}")


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _coerce(name: str, value: Any, hint) -> Any:
    """Check `value` against a type hint; returns the value (ints widened to float, '2e-4' parsed)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(name, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} is not {_type_name(hint)}")
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        raise ConfigError(f"{name}: {value!r} is not one of {_type_name(hint)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected {_type_name(hint)}, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{name}: expected null, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{name}: expected a mapping, got {value!r}")
    return value  # nested dataclasses are handled by their own from_dict


def _check_fields(obj) -> None:
    """Type-check every field of a dataclass instance in place (called from __post_init__)."""
    hints = typing.get_type_hints(type(obj))
    prefix = getattr(obj, "_where", "")
    for f in fields(obj):
        if f.name.startswith("_") or f.metadata.get("nested"):
            continue
        setattr(obj, f.name, _coerce(prefix + f.name, getattr(obj, f.name), hints[f.name]))


def _from_dict(cls, raw: dict, where: str, aliases: dict[str, str] | None = None,
               unsupported: dict[str, str] | None = None, ignored: list[str] | None = None) -> dict:
    """Map YAML keys (with aliases) onto field names; unknown keys raise with the closest match.

    unsupported: keys of another tool (axolotl) that lorad knows but does not implement, with
    what to do instead; one set to null/false/empty asks for nothing and lands in `ignored`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping of keys to values, got {raw!r}")
    aliases = aliases or {}
    unsupported = unsupported or {}
    names = [f.name for f in fields(cls) if not f.name.startswith("_")]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        target = aliases.get(key, key)
        if target not in names and (key in unsupported or key in AXOLOTL_INFORMATIONAL) and ignored is not None:
            if key in AXOLOTL_INFORMATIONAL or value in (None, False, "", [], {}):
                ignored.append(key)
                continue
            raise ConfigError(f"axolotl key '{key}' is not supported by lorad train: {unsupported[key]}")
        if target not in names:
            raise _unknown_key_error(where, key, names + list(aliases))
        if target in out:
            raise ConfigError(f"{where}{key}: set twice (as '{target}' and an alias of it); keep one")
        out[target] = value
    for f in fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in out:
            hints = {TrainConfig: " (at least one dataset: a list of {path: ..., type: ...})", PromptFormat: " in a custom type mapping"}
            hint = hints.get(cls, "")
            raise ConfigError(f"{where}{f.name}: required{hint}")
    return out


# --------------------------------------------------------------------------------------------
# Datasets


@dataclass
class PromptFormat:
    """axolotl's custom `type:` mapping: a prompt built from row fields.

    prompt = system_format.format(system=S) + (format if the input is non-empty else no_input_format)
    where S is row[field_system] when that field is set and non-empty, else system_prompt.
    The response is row[field_output], followed by the tokenizer's EOS token.
    """

    field_instruction: str
    field_output: str
    field_input: str | None = None
    field_system: str | None = None
    system_prompt: str = ""
    system_format: str = "{system}"
    format: str = "{instruction} {input}"
    no_input_format: str = "{instruction}"
    _where: str = dataclasses.field(default="type.", repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_fields(self)
        for key, allowed in (
            ("format", {"instruction", "input"}),
            ("no_input_format", {"instruction"}),
            ("system_format", {"system"}),
        ):
            template = getattr(self, key)
            try:
                used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
            except ValueError as exc:
                raise ConfigError(f"{self._where}{key}: {template!r} is not a valid format string ({exc})") from exc
            unknown = used - allowed
            if unknown:
                raise ConfigError(
                    f"{self._where}{key}: placeholder {{{sorted(unknown)[0]}}} is unknown; "
                    f"use {', '.join('{' + a + '}' for a in sorted(allowed))}"
                )
        if "{instruction}" not in self.format or "{instruction}" not in self.no_input_format:
            raise ConfigError(f"{self._where}format: both format and no_input_format must contain {{instruction}}")


@dataclass
class DatasetConfig:
    """One entry of `datasets:`.

    path: a local .json / .jsonl / .csv / .parquet file; a local folder (written by datasets'
        save_to_disk, or a dataset repository's files: data/*.parquet, *.jsonl, ...); anything
        else is a hub dataset id, read through `datasets.load_dataset(path, name, split=split,
        data_files=data_files, revision=revision)`.
    type: alpaca | chat_template | completion | a PromptFormat mapping | null (detected from the
        fields of each row: `messages` -> chat_template, `instruction`+`output` -> alpaca, `text` -> completion).
    """

    path: str
    type: str | PromptFormat | None = dataclasses.field(default=None, metadata={"nested": True})
    split: str = "train"
    name: str | None = None  # the dataset's configuration (load_dataset's `name`)
    data_files: str | list[str] | dict | None = None
    revision: str | None = None
    ds_type: Literal["json", "csv", "parquet", "arrow"] | None = None
    field_messages: str = "messages"
    field: str = "text"
    _where: str = dataclasses.field(default="datasets[0].", repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_fields(self)
        if not self.path:
            raise ConfigError(f"{self._where}path: must not be empty")
        if isinstance(self.type, dict):
            raw = _from_dict(PromptFormat, self.type, f"{self._where}type.")
            self.type = PromptFormat(**raw, _where=f"{self._where}type.")
        elif isinstance(self.type, str):
            if self.type not in BUILTIN_TYPES:
                guess = _closest(self.type, list(BUILTIN_TYPES))
                hint = f"; did you mean '{guess}'?" if guess else ""
                raise ConfigError(
                    f"{self._where}type: {self.type!r} is not one of {', '.join(BUILTIN_TYPES)} "
                    f"or a mapping with field_instruction/field_output{hint}"
                )
        elif self.type is not None and not isinstance(self.type, PromptFormat):
            raise ConfigError(f"{self._where}type: expected a name or a mapping, got {self.type!r}")


# --------------------------------------------------------------------------------------------
# The run


TOP_LEVEL_ALIASES = {"sequence_length": "sequence_len", "packing": "sample_packing"}
_REGEX_CHARS = set("\\^$*+?()[]{}|")


def is_regex(pattern: str) -> bool:
    """A target entry is a pattern (a regex, or a dotted path suffix like self_attn.q_proj) rather
    than a plain projection name. Every entry matches a module whose path ends with it at a dot
    boundary (`(?:.*\.)?(?:entry)`, a full match): for a plain name that is PEFT's list rule."""
    return any(c in _REGEX_CHARS for c in pattern) or "." in pattern


def target_regex(entries: list[str]) -> str:
    return "|".join(rf"(?:.*\.)?(?:{e})" for e in entries)


@dataclass
class TrainConfig:
    """Everything `lorad train` needs, with axolotl's names and lorad's defaults."""

    datasets: list[DatasetConfig] = dataclasses.field(metadata={"nested": True})
    base_model: str = EMBEDDED_ALIAS
    output_dir: str = "./lorad-out"
    # data
    sequence_len: int = 1024
    sample_packing: bool | Auto = "auto"  # auto: packs when samples are short enough (packing.resolve_packing)
    train_on_inputs: bool = False
    val_set_size: float = 0.0
    # adapter
    adapter: Literal["lora", "qlora"] = "qlora"
    load_in_4bit: bool | None = None  # None: true for qlora, false for lora (axolotl's meaning)
    load_in_8bit: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] | None = None  # names, or regexes on the module path
    lora_target_linear: bool | None = None
    lora_modules_to_save: list[str] | None = None
    lora_model_dir: str | None = None  # start from this adapter; its rank and targets win
    peft_use_rslora: bool = False
    peft_use_dora: bool = False
    peft_init_lora_weights: bool | str = True
    loftq_config: dict | None = None  # {loftq_bits: 4, loftq_iter: 1}; also read from axolotl's peft.loftq_config
    peft: dict | None = None  # axolotl's `peft:` section; only loftq_config is read
    bias: Literal["none", "all", "lora_only"] = "none"  # PEFT's bias: which base biases train
    lora_bias: bool = False  # PEFT's lora_bias: a trainable bias on lora_B
    # optimisation
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    num_epochs: float = 1.0
    max_steps: int | None = None
    optimizer: str = "adamw_torch"  # any transformers OptimizerNames value
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"  # any transformers SchedulerType value
    lr_scheduler_kwargs: dict | None = None
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    flash_attention: bool | None = None  # axolotl's switch: true = attn_implementation: flash_attention_2
    sdp_attention: bool | None = None  # axolotl's switch: true = attn_implementation: sdpa
    # precision; "auto" is resolved by the hardware (resolve_precision)
    bf16: bool | Auto = "auto"
    fp16: bool | Auto = False
    tf32: bool | Auto = False
    # cadence
    logging_steps: int = 1
    eval_steps: int | None = None
    evals_per_epoch: int | None = None
    save_steps: int | None = None  # None: about ten checkpoints per run
    saves_per_epoch: int | None = None
    save_total_limit: int | None = None
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # scale-out (accelerate's FSDP under torchrun); see trainer/fsdp.py
    fsdp: str | list[str] | None = None
    fsdp_config: dict | None = None
    # keys the YAML set explicitly (after aliases), and axolotl keys that were ignored
    _given: frozenset = dataclasses.field(default=frozenset(), repr=False, compare=False)
    _ignored: tuple = dataclasses.field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.datasets, list) or not self.datasets:
            raise ConfigError("datasets: at least one dataset is required (a list of {path: ..., type: ...})")
        self.datasets = [
            d if isinstance(d, DatasetConfig) else DatasetConfig(**_from_dict(DatasetConfig, d, f"datasets[{i}]."), _where=f"datasets[{i}].")
            for i, d in enumerate(self.datasets)
        ]
        _check_fields(self)
        self._check_names()
        self._check_ranges()
        self._check_adapter()
        self._check_attention()

    def _check_names(self) -> None:
        """optimizer / lr_scheduler: whatever the installed transformers accepts, by its own enums."""
        self.optimizer = OPTIMIZER_ALIASES.get(self.optimizer, self.optimizer)
        for key, known in (("optimizer", transformers_optimizers()), ("lr_scheduler", transformers_schedulers())):
            value = getattr(self, key)
            if value not in known:
                guess = _closest(value, list(known))
                hint = f"; did you mean '{guess}'?" if guess else ""
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(known)}{hint}")

    def _check_ranges(self) -> None:
        positive_ints = ("sequence_len", "lora_r", "micro_batch_size", "gradient_accumulation_steps", "logging_steps")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_steps", "save_steps", "save_total_limit", "evals_per_epoch", "saves_per_epoch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be at least 1 (or left out), got {value}")
        for a, b in (("eval_steps", "evals_per_epoch"), ("save_steps", "saves_per_epoch")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise ConfigError(f"{a} and {b}: set one of them, not both")
        if self.sequence_len < 8:
            raise ConfigError(f"sequence_len: {self.sequence_len} is too short to hold a prompt and a response")
        if not (self.num_epochs > 0 and math.isfinite(self.num_epochs)):
            raise ConfigError(f"num_epochs: must be a positive number, got {self.num_epochs}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"learning_rate: must be a positive number, got {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha: must be positive, got {self.lora_alpha}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("weight_decay and max_grad_norm: must not be negative (max_grad_norm: 0 turns clipping off)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_epsilon > 0:
            raise ConfigError(f"adam_epsilon: must be positive, got {self.adam_epsilon}")
        if self.val_set_size < 0 or (self.val_set_size >= 1 and not float(self.val_set_size).is_integer()):
            raise ConfigError(
                f"val_set_size: {self.val_set_size} must be a fraction in [0, 1) or a whole number of rows"
            )
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ConfigError("warmup_steps and warmup_ratio: set one of them, not both")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must not be negative, got {self.warmup_steps}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.bf16 is True and self.fp16 is True:
            raise ConfigError("bf16 and fp16: both are true; pick one")
        if self.lr_scheduler in ("reduce_lr_on_plateau", "greedy") and not self.val_set_size:
            raise ConfigError(f"lr_scheduler: {self.lr_scheduler} follows the eval loss; set val_set_size")

    def _check_adapter(self) -> None:
        if self.load_in_8bit:
            raise ConfigError("load_in_8bit: 8-bit bases are not supported; use adapter: qlora with load_in_4bit: true")
        if self.adapter == "qlora" and self.load_in_4bit is False:
            raise ConfigError("load_in_4bit: adapter: qlora needs load_in_4bit: true (or use adapter: lora)")
        self._check_targets()
        self._check_init()

    def _check_targets(self) -> None:
        targets = self.lora_target_modules
        entries = [targets] if isinstance(targets, str) else list(targets or [])
        for entry in entries:
            if is_regex(entry):
                try:
                    re.compile(entry)
                except re.error as exc:
                    raise ConfigError(f"lora_target_modules: {entry!r} is not a valid regular expression ({exc})") from exc
            elif entry not in PROJECTIONS:
                guess = _closest(entry, list(PROJECTIONS))
                hint = f" (did you mean '{guess}'?)" if guess else ""
                raise ConfigError(
                    f"lora_target_modules: {entry!r}{hint} cannot be served by lorad, which applies LoRA to "
                    f"{', '.join(PROJECTIONS)}"
                )
        if targets is not None and not entries and not self.lora_target_linear:
            raise ConfigError("lora_target_modules: empty; list projections or set lora_target_linear: true")

    def _check_init(self) -> None:
        init = self.peft_init_lora_weights
        if isinstance(init, str) and init not in INIT_LORA_WEIGHTS and not re.fullmatch(r"pissa_niter_\d+", init):
            guess = _closest(init, list(INIT_LORA_WEIGHTS))
            hint = f"; did you mean '{guess}'?" if guess else ""
            raise ConfigError(f"peft_init_lora_weights: {init!r} is not true, false, "
                              f"{', '.join(INIT_LORA_WEIGHTS)} or pissa_niter_<K>{hint}")
        if self.peft is not None:
            extra = sorted(set(self.peft) - {"loftq_config"})
            if extra:
                raise ConfigError(f"axolotl key 'peft.{extra[0]}' is not supported by lorad train: lorad trains over a "
                                  "bitsandbytes NF4 base (adapter: qlora) or an unquantized one (adapter: lora)")
            if self.peft.get("loftq_config") is not None:
                if self.loftq_config is not None:
                    raise ConfigError("loftq_config and peft.loftq_config: set one of them, not both")
                self.loftq_config = _coerce("peft.loftq_config", self.peft["loftq_config"], dict)
        if self.loftq_config is not None:
            if init is True and "peft_init_lora_weights" not in self._given:
                self.peft_init_lora_weights = init = "loftq"  # axolotl: a loftq_config asks for LoftQ
            if init != "loftq":
                raise ConfigError(f"loftq_config: set, but peft_init_lora_weights is {init!r}, not 'loftq'")
            unknown = sorted(set(self.loftq_config) - {"loftq_bits", "loftq_iter"})
            if unknown:
                raise ConfigError(f"loftq_config.{unknown[0]}: unknown key; known keys: loftq_bits, loftq_iter")
            if self.loftq_config.get("loftq_bits", 4) != 4:
                raise ConfigError(f"loftq_config.loftq_bits: {self.loftq_config['loftq_bits']} bits; lorad's quantized "
                                  "base is NF4, so LoftQ corrects 4-bit quantization (loftq_bits: 4)")
            if self.loftq_config.get("loftq_iter", 1) != 1:
                raise ConfigError("loftq_config.loftq_iter: LoftQ's alternating iterations re-quantize the base, but "
                                  "lorad serves one fixed NF4 base; only loftq_iter: 1 (the served base kept) applies")
        if init == "loftq" and self.quant != "nf4":
            raise ConfigError("peft_init_lora_weights: loftq starts LoRA at the NF4 quantization error of the base; "
                              "it needs a quantized base (adapter: qlora)")
        if isinstance(init, str) and init.startswith(("pissa", "olora")) and self.quant == "nf4":
            raise ConfigError(
                f"peft_init_lora_weights: {init} rewrites the base weights it starts from, which an NF4 base cannot "
                "hold exactly; use adapter: lora (unquantized base). lorad converts the result into a standard "
                "LoRA of rank 2 x lora_r on the original base when it saves the adapter"
            )

        if isinstance(init, str) and init.startswith(("pissa", "olora")) and self.peft_use_dora:
            raise ConfigError(f"peft_init_lora_weights: {init} with peft_use_dora cannot be converted into an adapter "
                              "for the original base; use one of them")

    def _check_attention(self) -> None:
        switches = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa"}
        for key, impl in switches.items():
            if getattr(self, key):
                if "attn_implementation" in self._given and self.attn_implementation != impl:
                    raise ConfigError(f"{key}: true asks for {impl}, but attn_implementation is "
                                      f"{self.attn_implementation!r}; keep one of them")
                self.attn_implementation = impl

    # ---- derived values ---------------------------------------------------------------------

    @property
    def quant(self) -> str:
        """nf4 when the base is loaded in 4 bits (qlora, or lora with load_in_4bit: true), else none."""
        in_4bit = self.load_in_4bit if self.load_in_4bit is not None else self.adapter == "qlora"
        return "nf4" if in_4bit else "none"

    @property
    def target_patterns(self) -> list[str] | str:
        """What PEFT's LoraConfig.target_modules receives: a list of projection names, or one
        regex (full match on the module path) when any entry is a regex."""
        targets = self.lora_target_modules
        entries = [targets] if isinstance(targets, str) else list(targets or [])
        if not any(is_regex(e) for e in entries):
            return self.target_modules
        return target_regex(entries + (list(PROJECTIONS) if self.lora_target_linear else []))

    @property
    def target_modules(self) -> list[str]:
        """The projections LoRA is applied to (in at least one layer), in PROJECTIONS order.

        lora_target_linear: true means every linear layer but the output head, which on a Llama
        base is exactly PROJECTIONS; it is the default when neither key is set. Regex entries are
        matched against the module paths a Llama base has (model.layers.N.self_attn.q_proj, ...);
        trainer/adapter.py resolves them against the real model."""
        targets = self.lora_target_modules
        entries = [targets] if isinstance(targets, str) else list(targets or [])
        chosen = {e for e in entries if not is_regex(e)}
        if self.lora_target_linear or (self.lora_target_linear is None and not entries):
            chosen |= set(PROJECTIONS)
        patterns = [e for e in entries if is_regex(e)]
        if patterns:
            regex = re.compile(target_regex(patterns))
            for proj in PROJECTIONS:
                group = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                if any(regex.fullmatch(f"model.layers.{i}.{group}.{proj}") for i in range(256)):
                    chosen.add(proj)
        return [p for p in PROJECTIONS if p in chosen]

    def to_dict(self) -> dict:
        """Plain data (YAML/JSON-able), as the user would write it."""

        def clean(value):
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items() if not k.startswith("_")}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return clean(asdict(self))


# --------------------------------------------------------------------------------------------
# Loading


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `key=value` strings; dotted keys reach into nested mappings and lists (datasets.0.path)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: the key is empty")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: {text!r} is not a valid YAML value ({exc})") from exc
        parts = key.split(".")
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {where} is not an index of a list of {len(node)} entries")
                node = node[int(part)]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise ConfigError(f"--set {key}: {where} is not a mapping or a list")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"--set {key}: {last} is not an index of a list of {len(node)} entries")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {key}: cannot set a key inside {node!r}")
    return raw


def config_from_dict(raw: dict) -> TrainConfig:
    ignored: list[str] = []
    values = _from_dict(TrainConfig, raw, "", TOP_LEVEL_ALIASES, AXOLOTL_UNSUPPORTED, ignored)
    return TrainConfig(**values, _given=frozenset(values), _ignored=tuple(ignored))


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML file, apply `--set` overrides, and validate. Relative dataset paths are taken
    relative to the YAML file's folder when they exist there (else relative to the working dir)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    raw = apply_overrides(raw, list(overrides))
    cfg = config_from_dict(raw)
    for ds in cfg.datasets:
        candidate = path.parent / ds.path
        if not Path(ds.path).is_absolute() and not Path(ds.path).exists() and candidate.exists():
            ds.path = str(candidate)
    return cfg


# --------------------------------------------------------------------------------------------
# Hardware-dependent resolution


@dataclass(frozen=True)
class Precision:
    bf16: bool
    fp16: bool
    tf32: bool

    @property
    def compute_dtype_name(self) -> str:
        return "bfloat16" if self.bf16 else "float16" if self.fp16 else "float32"


def resolve_precision(cfg: TrainConfig, device_type: str) -> Precision:
    """`auto` -> what the device does natively. On CPU: bf16 when the CPU has AVX512-BF16 or AMX
    (autocast to bf16 was faster than float32 on such CPUs, notes/baselines.md); fp16 and tf32 never."""
    import torch

    if device_type == "cuda":
        bf16_native = torch.cuda.is_bf16_supported()
    else:
        bf16_native = bool(
            getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
            or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        )
    bf16 = bf16_native if cfg.bf16 == "auto" else bool(cfg.bf16)
    if cfg.fp16 == "auto":
        fp16 = device_type == "cuda" and not bf16
    else:
        fp16 = bool(cfg.fp16)
    if fp16 and device_type != "cuda":
        raise ConfigError("fp16: float16 training needs a CUDA device; on CPU use bf16: true (or auto)")
    if bf16 and fp16:
        bf16 = False if cfg.bf16 == "auto" else bf16
        if bf16:
            raise ConfigError("bf16 and fp16: both resolve to true; pick one")
    tf32 = device_type == "cuda" if cfg.tf32 == "auto" else bool(cfg.tf32) and device_type == "cuda"
    return Precision(bf16=bf16, fp16=fp16, tf32=tf32)
