"""Read and validate LoRA adapters in PEFT's on-disk format.

An adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`, exactly as
PEFT's `save_pretrained` writes them. Only safetensors are read: a pickled
`adapter_model.bin` is refused, never unpickled.

Validation happens in two stages:
  * `inspect_adapter` reads the config and the safetensors header only (no tensor data):
    every tensor must map to a projection of the base with the right shape, ranks must be
    within the limit, at least one module must match. Cheap enough for listing.
  * `load_adapter` also reads the tensors (from the same open file as the header) and rejects
    NaN / Inf.

Everything in an adapter folder is untrusted input (another tenant may have written it), so
reading is defensive: size caps before any parse, JSON nesting caught, every config field lorad
uses type-checked, `rank_pattern` / `alpha_pattern` keys matched in linear time (RE2), the
safetensors header checked entry by entry, files that are links out of the adapters folder or
not regular files refused. Error messages name the adapter id and the file name, never a
server path.

Scaling follows PEFT: lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`, with
per-module `rank_pattern` / `alpha_pattern` overrides. DoRA adapters (`use_dora`) carry a
magnitude vector per module, which the server turns into a per-output-row scale (see
lorad.server.lora_slots). `lora_bias` adapters carry a bias vector on lora_B per module; PEFT
computes y = base(x) + scaling * (B @ A @ x + bias), so the server adds scaling * bias to the
rows of that adapter's tokens. `modules_to_save` adapters carry a whole trained copy of the
embedding table and/or the output head (the two modules PEFT users save: new or retrained
tokens, a chat template); the server swaps them in for that adapter's tokens
(lorad.server.model_runner). A saved copy of any other module is refused: a replaced layer
would need its own forward pass per adapter.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from lorad.errors import InvalidAdapterError
from lorad.geometry import PROJECTIONS, ModelGeometry

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

# Adapter ids are names, never paths: a letter or digit, then letters, digits, '.', '_', '-'.
ADAPTER_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (PEFT's saved names)
_TENSOR_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\."
    r"(?:lora_([AB])(?:\.[\w-]+)?\.weight|lora_(m)agnitude_vector(?:\.[\w-]+)?(?:\.weight)?"
    r"|lora_B(?:\.[\w-]+)?\.(b)ias)$"
)
_HALF_NAMES = {"A": "lora_A", "B": "lora_B", "M": "lora_magnitude_vector", "b": "lora_B bias"}

# modules_to_save the server can swap per adapter: short name -> the module's name in the base.
# PEFT saves the trained copy as base_model.model.<full name>.weight (its ".modules_to_save.default"
# stripped), e.g. base_model.model.lm_head.weight.
SAVED_MODULES = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}
_SAVED_SHORT = {full: short for short, full in SAVED_MODULES.items()}


def distinct_tensors(tensors) -> list:
    """Each tensor once: PEFT's tied saved copies are one tensor under two names."""
    return list({id(t): t for t in tensors}.values())


# Every module name of a Llama model as transformers names them (layer 0 stands for every layer),
# for matching modules_to_save entries the way PEFT does.
_LLAMA_MODULE_NAMES = (
    "", "model", "model.embed_tokens", "model.layers", "model.layers.0", "model.layers.0.self_attn",
    *(f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")), "model.layers.0.mlp",
    *(f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj", "act_fn")),
    "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.norm", "model.rotary_emb",
    "lm_head",
)


def saved_module(name: str) -> str | None:
    """The SAVED_MODULES key a modules_to_save entry names, or None when lorad serve cannot
    swap what it names. PEFT's rule (peft.utils.other._set_trainable): every module whose name
    ends with the entry is replaced, so "head" names lm_head, and "proj" every projection."""
    matched = [full for full in _LLAMA_MODULE_NAMES if full.endswith(name)]
    if len(matched) != 1:
        return None
    return next((short for short, full in SAVED_MODULES.items() if full == matched[0]), None)


_SAVED_MODULE_NAME = re.compile(r"^(?:base_model\.model\.)?(model\.embed_tokens|lm_head)\.weight$")


def _half(m: re.Match) -> str:
    # "A", "B", "M" (a DoRA magnitude vector) or "b" (lora_B's bias, lora_bias=true)
    return m.group(3) or ("M" if m.group(4) else "b")

# Limits on what is read before anything is parsed. PEFT writes a config of about 1 KB (a
# per-module rank_pattern of an 80-layer base: about 40 KB) and a header of about 130 bytes per
# tensor (1,120 tensors for every projection of 80 layers: about 150 KB).
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 8 << 20
MAX_JSON_DEPTH = 32
MAX_PATTERN_KEYS = 2048
MAX_PATTERN_KEY_CHARS = 512
MAX_RANK = 1 << 16  # a config value above this is nonsense whatever the server's --max-lora-rank


def validate_adapter_id(adapter_id: str) -> None:
    if not ADAPTER_ID_PATTERN.fullmatch(adapter_id or "") or ".." in adapter_id:
        raise ValueError(
            f"adapter id {shorten(adapter_id)} is not a valid name: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def shorten(value, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: error messages quote untrusted values."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    config: "AdapterConfig" = field(repr=False)
    use_dora: bool = False  # every module has a magnitude vector (LoadedAdapter.magnitudes)
    lora_bias: bool = False  # every module has a lora_B bias (LoadedAdapter.biases)
    saved_modules: tuple[str, ...] = ()  # SAVED_MODULES keys whose whole weight the adapter replaces


@dataclass
class LoadedAdapter:
    spec: AdapterSpec
    # (layer, proj) -> (A [r, in], B [out, r]) as PEFT stores them, in the file's dtype, on the host
    weights: dict[tuple[int, str], tuple["object", "object"]] = field(repr=False)
    load_seconds: float = 0.0
    stamp: tuple = ()  # adapter_stamp() of the files this copy was read from (all of its version's)
    digest: str = ""  # content digest of those files (lorad.server.adapter_publish), its version
    # DoRA: (layer, proj) -> magnitude [out]; empty for plain LoRA
    magnitudes: dict[tuple[int, str], "object"] = field(default_factory=dict, repr=False)
    # lora_bias: (layer, proj) -> lora_B bias [out], unscaled as PEFT stores it; empty otherwise
    biases: dict[tuple[int, str], "object"] = field(default_factory=dict, repr=False)
    # modules_to_save: "embed_tokens" / "lm_head" -> the trained weight [vocab, hidden]; empty otherwise
    saved_modules: dict[str, "object"] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        return (sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())
                + sum(v.numel() * v.element_size() for v in self.biases.values())
                + sum(v.numel() * v.element_size() for v in distinct_tensors(self.saved_modules.values())))


# --- files --------------------------------------------------------------------------------------


def adapter_stamp(path: Path, names: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE)) -> tuple:
    """Identity of an adapter folder's files as they are now (inode, size, times of each of
    `names`, links followed; an absent file is None): a replace, a touch or a rewrite changes it
    (a rewrite in place of the same size only once the filesystem's timestamp has ticked).
    Reading it costs one stat per file."""
    out = []
    for name in names:
        try:
            st = os.stat(Path(path) / name)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def _open_file(path: Path, name: str, adapter_id: str, root: Path | None):
    """Open one file of an adapter folder for reading, refusing what is not a regular file and
    (when `root` is given) what resolves outside `root`: a symlinked file must not let an
    adapter folder read the server's own files."""
    file = Path(path) / name
    try:
        # O_NONBLOCK: opening a FIFO must not hang the reader (it is then refused as not regular)
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InvalidAdapterError(f"adapter {adapter_id!r}: {name} is missing") from None
    except OSError as exc:
        raise InvalidAdapterError(f"adapter {adapter_id!r}: {name} cannot be opened ({exc.strerror})") from None
    f = os.fdopen(fd, "rb")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidAdapterError(f"adapter {adapter_id!r}: {name} is not a regular file")
        if root is not None:
            # where the open file really is (the /proc link is race-free; realpath is the fallback)
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                real = os.path.realpath(file)
            root_text = str(root)
            if os.path.commonpath([root_text, real]) != root_text:
                raise InvalidAdapterError(
                    f"adapter {adapter_id!r}: {name} is a link to a file outside the adapters folder; "
                    "lorad only reads files inside it")
    except BaseException:
        f.close()
        raise
    return f


def _read_capped(f, limit: int, what: str, adapter_id: str) -> bytes:
    data = f.read(limit + 1)
    if len(data) > limit:
        raise InvalidAdapterError(f"adapter {adapter_id!r}: {what} is larger than lorad's limit of {limit} bytes")
    return data


def _parse_json(data: bytes, what: str, adapter_id: str):
    """json.loads with every failure a sentence: syntax, bad UTF-8, nesting deeper than the
    interpreter's recursion limit, integers of thousands of digits."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise InvalidAdapterError(f"adapter {adapter_id!r}: {what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidAdapterError(f"adapter {adapter_id!r}: {what} is not valid JSON ({str(exc)[:120]})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise InvalidAdapterError(f"adapter {adapter_id!r}: {what} is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _depth(value) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


# --- adapter_config.json ------------------------------------------------------------------------


class PatternTable:
    r"""rank_pattern / alpha_pattern: module name -> value by PEFT's rule: a key matches a module
    when the name ends with it, read as a regex (`(.*\.)?(key)$`); the first matching key in
    file order wins.

    Python's `re` backtracks: a key such as `(\w*\.?\w*)*Z` takes exponential time, holding the
    interpreter lock, so one adapter folder could freeze every request and health check. Keys
    are matched with RE2 instead (google-re2: time linear in the input), all keys in one pass;
    keys RE2 cannot run in linear time (look-around, back-references) are refused.
    """

    def __init__(self, field_name: str, items: list[tuple[str, object]], adapter_id: str):
        import re2

        self.keys = [k for k, _ in items]
        self.values = [v for _, v in items]
        self._set = None
        if not items:
            return
        options = re2.Options()
        options.log_errors = False
        options.max_mem = 64 << 20
        self._set = re2.Set.MatchSet(options)
        for key in self.keys:
            try:
                re2.compile(key, options)  # alone first: a key must be a whole regex, not a fragment
                self._set.Add(rf"(?:.*\.)?(?:{key})$")
            except re2.error:
                raise InvalidAdapterError(
                    f"adapter {adapter_id!r}: {field_name} key {shorten(key)} is not a regular expression lorad "
                    "can match (RE2 syntax: no look-around or back-references)") from None
        if self._set.Compile() is False:
            raise InvalidAdapterError(f"adapter {adapter_id!r}: {field_name} is too large to match")

    def value_for(self, module_name: str, default):
        if self._set is None:
            return default
        hits = self._set.Match(module_name) or []
        exact = [i for i, key in enumerate(self.keys) if key == module_name]
        first = min([*hits, *exact], default=None)
        return default if first is None else self.values[first]


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of adapter_config.json that lorad acts on, each type-checked; PEFT writes
    many more, which are ignored."""

    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    lora_bias: bool
    modules_to_save: tuple[str, ...]  # SAVED_MODULES keys, each listed module resolved
    ensure_weight_tying: bool  # PEFT ties the saved copies of tied modules (both are in the file)
    rank_pattern: PatternTable
    alpha_pattern: PatternTable

    @classmethod
    def parse(cls, raw, adapter_id: str) -> "AdapterConfig":
        def bad(name: str, why: str) -> InvalidAdapterError:
            return InvalidAdapterError(f"adapter {adapter_id!r}: {CONFIG_FILE}: {name}={shorten(raw.get(name))} {why}")

        if not isinstance(raw, dict):
            raise InvalidAdapterError(f"adapter {adapter_id!r}: {CONFIG_FILE} must hold a JSON object")
        peft_type = raw.get("peft_type", "LORA")
        if not isinstance(peft_type, str):
            raise bad("peft_type", "must be a string")
        if peft_type.upper() != "LORA":
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: peft_type {shorten(peft_type)} is not supported (only LORA)")
        flags = {}
        for key in ("use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "ensure_weight_tying"):
            value = raw.get(key)
            if value is not None and not isinstance(value, bool):
                raise bad(key, "must be true or false")
            flags[key] = bool(value)
        if flags["fan_in_fan_out"]:
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: fan_in_fan_out (Conv1D) adapters are not supported yet (fan_in_fan_out=true)")
        if flags["lora_bias"] and flags["use_dora"]:  # PEFT's LoraConfig refuses the pair too
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: lora_bias=true with use_dora=true is not an adapter PEFT makes; use one of them")
        bias = raw.get("bias", "none")
        if bias is not None and not isinstance(bias, str):
            raise bad("bias", "must be a string")
        # PEFT's bias ("all", "lora_only") trains the base's own biases; Llama-family projections
        # have none, so such an adapter is a plain LoRA. A file that holds other bias tensors
        # (not lora_B's, which lora_bias adds) is refused by their names (_TENSOR_NAME).
        if bias not in (None, "none", "all", "lora_only"):
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: bias={shorten(bias)} is not one of PEFT's 'none', 'all', 'lora_only'")
        modules_to_save = raw.get("modules_to_save")
        if modules_to_save is not None and not _is_str_list(modules_to_save):
            raise bad("modules_to_save", "must be null or a list of module names")
        saved = []
        for name in modules_to_save or ():
            short = saved_module(name)
            if short is None:
                raise InvalidAdapterError(
                    f"adapter {adapter_id!r}: modules_to_save names {shorten(name)}: PEFT replaces every module whose "
                    f"name ends with it, and lorad serve swaps only {' and '.join(SAVED_MODULES)} per adapter (another "
                    "replaced module would need its own forward pass per adapter, which cannot share one batch); "
                    "retrain without it")
            if short not in saved:
                saved.append(short)
        if raw.get("layer_replication") is not None:
            raise InvalidAdapterError(f"adapter {adapter_id!r}: layer_replication is not supported")
        target = raw.get("target_modules")
        if target is not None and not isinstance(target, str) and not _is_str_list(target):
            raise bad("target_modules", "must be null, a string or a list of strings")
        r = raw.get("r", 8)
        if not _is_rank(r):
            raise bad("r", f"must be a positive whole number up to {MAX_RANK}")
        alpha = raw.get("lora_alpha", 8)
        if not _is_positive_number(alpha):
            raise bad("lora_alpha", "must be a positive, finite number")
        return cls(
            r=int(r),
            lora_alpha=float(alpha),
            use_rslora=flags["use_rslora"],
            use_dora=flags["use_dora"],
            lora_bias=flags["lora_bias"],
            modules_to_save=tuple(saved),
            ensure_weight_tying=flags["ensure_weight_tying"],
            rank_pattern=_pattern_table(raw, "rank_pattern", _is_rank, f"positive whole numbers up to {MAX_RANK}",
                                        adapter_id),
            alpha_pattern=_pattern_table(raw, "alpha_pattern", _is_positive_number, "positive, finite numbers",
                                         adapter_id),
        )


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_rank(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and value == int(value) and 1 <= value <= MAX_RANK


def _is_positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _pattern_table(raw: dict, name: str, check, what: str, adapter_id: str) -> PatternTable:
    table = raw.get(name)
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise InvalidAdapterError(f"adapter {adapter_id!r}: {CONFIG_FILE}: {name} must be an object of "
                                  f"module-name patterns, got a JSON {type(table).__name__}")
    if len(table) > MAX_PATTERN_KEYS:
        raise InvalidAdapterError(
            f"adapter {adapter_id!r}: {CONFIG_FILE}: {name} has {len(table)} keys, more than lorad's limit of "
            f"{MAX_PATTERN_KEYS}")
    items = []
    for key, value in table.items():
        if not key or len(key) > MAX_PATTERN_KEY_CHARS:
            raise InvalidAdapterError(f"adapter {adapter_id!r}: {CONFIG_FILE}: {name} key {shorten(key)} must have "
                                      f"1 to {MAX_PATTERN_KEY_CHARS} characters")
        if not check(value):
            raise InvalidAdapterError(f"adapter {adapter_id!r}: {CONFIG_FILE}: {name}[{shorten(key)}]={shorten(value)}: "
                                      f"values must be {what}")
        items.append((key, value))
    return PatternTable(name, items, adapter_id)


def read_config(path: Path, adapter_id: str, root: Path | None = None) -> AdapterConfig:
    with _open_file(path, CONFIG_FILE, adapter_id, root) as f:
        data = _read_capped(f, MAX_CONFIG_BYTES, CONFIG_FILE, adapter_id)
    return AdapterConfig.parse(_parse_json(data, CONFIG_FILE, adapter_id), adapter_id)


# --- adapter_model.safetensors ------------------------------------------------------------------

# safetensors dtype -> (numpy dtype read from the file, torch dtype of the tensor, bytes)
_FLOAT_DTYPES = {"F32": ("float32", "float32", 4), "F16": ("float16", "float16", 2),
                 "F64": ("float64", "float64", 8), "BF16": ("uint16", "bfloat16", 2)}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets into the data section
    end: int


def _read_header(f, adapter_id: str, max_tensors: int) -> tuple[dict[str, TensorEntry], int]:
    """The safetensors header of an open file: (tensor name -> entry, offset of the data section).

    Format: 8-byte little-endian header length N, N bytes of JSON, then the data section, which
    the entries' data_offsets must cover exactly, without gaps or overlaps (what the safetensors
    library itself requires). Checked here entry by entry, so a lying header never reaches a
    read of the data.
    """
    def bad(why: str) -> InvalidAdapterError:
        return InvalidAdapterError(f"adapter {adapter_id!r}: {WEIGHTS_FILE} is not a readable safetensors file: it {why}")

    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise bad("is too short to hold a header")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES:
        raise bad(f"declares a header of {n} bytes, more than lorad's limit of {MAX_HEADER_BYTES}")
    if 8 + n > size:
        raise bad("is shorter than its declared header")
    header = _parse_json(f.read(n), f"{WEIGHTS_FILE} header", adapter_id)
    if not isinstance(header, dict):
        raise bad("has a header that is not a JSON object")
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if len(entries) >= max_tensors:
            raise bad(f"holds more than {max_tensors} tensors, more than any adapter of this base can have")
        if not isinstance(info, dict):
            raise bad(f"has a malformed entry for tensor {shorten(name)}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _FLOAT_DTYPES:
            raise bad(f"holds tensor {shorten(name)} of dtype {shorten(dtype)}, not a float type (F16, BF16, F32, F64)")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_count(d) for d in shape)):
            raise bad(f"has a malformed shape for tensor {shorten(name)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise bad(f"has malformed data_offsets for tensor {shorten(name)}")
        start, end = offsets
        if end - start != math.prod(shape) * _FLOAT_DTYPES[dtype][2]:
            raise bad(f"has data_offsets that do not match the shape and dtype of tensor {shorten(name)}")
        entries[name] = TensorEntry(dtype, tuple(shape), start, end)
    position = 0
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start != position:
            raise bad("has tensors whose data overlap or leave gaps")
        position = entry.end
    if 8 + n + position != size:
        raise bad(f"is {size} bytes but its header describes {8 + n + position}")
    return entries, 8 + n


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 50


def _max_tensors(geometry: ModelGeometry) -> int:
    """A bound on header entries worth reading: 4x what the base's projections can use (so a few
    extra tensors still get the error that names them)."""
    return 4 * 2 * len(PROJECTIONS) * geometry.num_layers + 16


def _check_weights_present(path: Path, adapter_id: str) -> None:
    if not (Path(path) / WEIGHTS_FILE).exists():
        pickled = [name for name in PICKLE_FILES if (Path(path) / name).exists()]
        if pickled:
            raise InvalidAdapterError(
                f"adapter {adapter_id!r} has only {pickled[0]}: lorad never unpickles weights; re-save it with "
                "PEFT's save_pretrained (safe_serialization is the default) to get adapter_model.safetensors"
            )


def _build_spec(path: Path, adapter_id: str, config: AdapterConfig, entries: dict[str, TensorEntry], size: int,
                geometry: ModelGeometry, max_rank: int) -> AdapterSpec:
    halves: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
    saved = _saved_module_shapes(adapter_id, config, entries, geometry)
    for name, entry in entries.items():
        if _SAVED_MODULE_NAME.match(name):
            continue
        m = _TENSOR_NAME.match(name)
        if m is None:
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: tensor {shorten(name)} does not map to a LoRA A/B matrix of a Llama "
                f"projection ({', '.join(PROJECTIONS)})"
            )
        layer, proj, half = int(m.group(1)), m.group(2), _half(m)
        if proj not in PROJECTIONS:
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: tensor {shorten(name)} targets {shorten(proj)}, not one of {', '.join(PROJECTIONS)}")
        if layer >= geometry.num_layers:
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: tensor {shorten(name)} targets layer {layer} but the base has "
                f"{geometry.num_layers} layers"
            )
        if half in halves.setdefault((layer, proj), {}):
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: layers.{layer}.{proj} has two {_HALF_NAMES[half]} tensors")
        halves[(layer, proj)][half] = entry.shape

    if not halves:
        raise InvalidAdapterError(f"adapter {adapter_id!r}: no LoRA tensor matches a module of the base")
    modules: dict[tuple[int, str], ModuleSpec] = {}
    for (layer, proj), pair in sorted(halves.items()):
        where = f"layers.{layer}.{proj}"
        magnitude = pair.pop("M", None)
        bias = pair.pop("b", None)
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise InvalidAdapterError(f"adapter {adapter_id!r}: {where} has no {missing} tensor")
        in_f, out_f = geometry.projection_shape(proj)
        if config.use_dora and magnitude is None:
            raise InvalidAdapterError(f"adapter {adapter_id!r}: DoRA (use_dora=true) needs a lora_magnitude_vector for "
                                      f"{where}; the file has none")
        if not config.use_dora and magnitude is not None:
            raise InvalidAdapterError(f"adapter {adapter_id!r}: {where} has a DoRA magnitude vector but "
                                      f"{CONFIG_FILE} does not set use_dora")
        if magnitude is not None and tuple(magnitude) != (out_f,):
            raise InvalidAdapterError(f"adapter {adapter_id!r}: {where} has a magnitude vector of shape "
                                      f"{list(magnitude)}; the base needs [{out_f}]")
        if config.lora_bias and bias is None:
            raise InvalidAdapterError(f"adapter {adapter_id!r}: lora_bias=true needs a lora_B bias for {where}; "
                                      "the file has none")
        if not config.lora_bias and bias is not None:
            raise InvalidAdapterError(f"adapter {adapter_id!r}: {where} has a lora_B bias but {CONFIG_FILE} does not "
                                      "set lora_bias")
        if bias is not None and tuple(bias) != (out_f,):
            raise InvalidAdapterError(f"adapter {adapter_id!r}: {where} has a lora_B bias of shape {list(bias)}; "
                                      f"the base needs [{out_f}]")
        a_shape, b_shape = pair["A"], pair["B"]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != in_f or b_shape[0] != out_f or a_shape[0] != b_shape[1]:
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: {where} has lora_A {list(a_shape)} and lora_B {list(b_shape)}; the base needs "
                f"lora_A [r, {in_f}] and lora_B [{out_f}, r] (was it trained on another base?)"
            )
        rank = a_shape[0]
        module_name = f"model.layers.{layer}.{'self_attn' if proj in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{proj}"
        expected_rank = config.rank_pattern.value_for(module_name, config.r)
        if rank != expected_rank:
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: {where} has rank {rank} but adapter_config.json says {expected_rank}"
            )
        if rank > max_rank:
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: {where} has rank {rank}, above this server's limit of {max_rank} "
                f"(restart with --max-lora-rank {rank} or more)"
            )
        alpha = config.alpha_pattern.value_for(module_name, config.lora_alpha)
        scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        if not 0 < scale <= _FLOAT32_MAX:  # the slot stores it as float32: inf there is NaN later
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: {where} has scaling {scale:g} (lora_alpha / r), which float32 cannot hold")
        modules[(layer, proj)] = ModuleSpec(layer, proj, rank, float(scale))

    return AdapterSpec(
        adapter_id=adapter_id,
        path=Path(path),
        rank=max(m.rank for m in modules.values()),
        lora_alpha=config.lora_alpha,
        target_modules=tuple(p for p in PROJECTIONS if any(k[1] == p for k in modules)),
        modules=modules,
        size_bytes=size,
        config=config,
        use_dora=config.use_dora,
        lora_bias=config.lora_bias,
        saved_modules=tuple(saved),
    )


def _saved_module_shapes(adapter_id: str, config: AdapterConfig, entries: dict[str, TensorEntry],
                         geometry: ModelGeometry) -> list[str]:
    """The SAVED_MODULES the file replaces, checked against the config and the base's shapes."""
    allowed = set(config.modules_to_save)
    if config.ensure_weight_tying and allowed:  # PEFT saves the tied partner's copy too
        allowed |= set(SAVED_MODULES)
    found = []
    for name, entry in entries.items():
        m = _SAVED_MODULE_NAME.match(name)
        if m is None:
            continue
        short = _SAVED_SHORT[m.group(1)]
        if short not in allowed:
            raise InvalidAdapterError(f"adapter {adapter_id!r}: tensor {shorten(name)} is a trained copy of {short}, "
                                      f"but {CONFIG_FILE} does not list it in modules_to_save")
        if short in found:
            raise InvalidAdapterError(f"adapter {adapter_id!r}: the file has two trained copies of {short}")
        if entry.shape != (geometry.vocab_size, geometry.hidden_size):
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: its trained {short} has shape {list(entry.shape)}; the base needs "
                f"[{geometry.vocab_size}, {geometry.hidden_size}] (lorad serves the base's vocabulary: an adapter "
                "trained with added tokens cannot share its batches)")
        found.append(short)
    for short in config.modules_to_save:
        if short not in found:
            raise InvalidAdapterError(f"adapter {adapter_id!r}: modules_to_save lists {short} but the file has no "
                                      f"trained copy of it ({SAVED_MODULES[short]}.weight)")
    return sorted(found, key=list(SAVED_MODULES).index)


_FLOAT32_MAX = 3.4028234663852886e38


def inspect_adapter(
    path: Path, adapter_id: str, geometry: ModelGeometry, max_rank: int, root: Path | None = None
) -> AdapterSpec:
    """Validate an adapter folder from its config and safetensors header (no tensor data).

    root: when given, every file read must lie inside it once links are followed.
    """
    config = read_config(path, adapter_id, root)
    _check_weights_present(path, adapter_id)
    with _open_file(path, WEIGHTS_FILE, adapter_id, root) as f:
        entries, _ = _read_header(f, adapter_id, _max_tensors(geometry))
        size = os.fstat(f.fileno()).st_size
    return _build_spec(path, adapter_id, config, entries, size, geometry, max_rank)


def load_adapter(path: Path, adapter_id: str, geometry: ModelGeometry, max_rank: int,
                 root: Path | None = None) -> LoadedAdapter:
    """Validate (header, then values) and read an adapter into host tensors (the file's dtype).

    Header and data come from one open file, so a weights file replaced meanwhile cannot pair
    one file's ranks with another's tensors.
    Tensors are read with numpy, not torch ops: this runs on the server's loader thread, which
    must not start OpenMP work of its own (lorad.server.model_thread explains why).
    """
    config = read_config(path, adapter_id, root)
    _check_weights_present(path, adapter_id)
    with _open_file(path, WEIGHTS_FILE, adapter_id, root) as f:
        entries, data_start = _read_header(f, adapter_id, _max_tensors(geometry))
        size = os.fstat(f.fileno()).st_size
        spec = _build_spec(path, adapter_id, config, entries, size, geometry, max_rank)
        tensors = _read_tensors(f, entries, data_start, size, adapter_id)
    weights: dict[tuple[int, str], list] = {}
    magnitudes, biases, saved = {}, {}, {}
    for name, tensor in tensors.items():
        module = _SAVED_MODULE_NAME.match(name)
        if module is not None:  # [vocab, hidden], checked by _build_spec
            saved[_SAVED_SHORT[module.group(1)]] = tensor
            continue
        m = _TENSOR_NAME.match(name)
        assert m is not None, name  # _build_spec accepted every name
        key, half = (int(m.group(1)), m.group(2)), _half(m)
        if half == "M":
            magnitudes[key] = tensor  # [out]
        elif half == "b":
            biases[key] = tensor  # [out]
        else:
            weights.setdefault(key, [None, None])["AB".index(half)] = tensor
    if config.ensure_weight_tying and len(saved) == 2:  # PEFT ties the two copies into one parameter
        if not _same_bits(saved["embed_tokens"], saved["lm_head"]):
            raise InvalidAdapterError(
                f"adapter {adapter_id!r}: ensure_weight_tying=true but its trained embed_tokens and lm_head differ; "
                "PEFT ties them into one weight, so which one it serves is not defined")
        saved["embed_tokens"] = saved["lm_head"]  # one tensor for both: the slot holds it once
    return LoadedAdapter(spec=spec, weights={key: (a, b) for key, (a, b) in weights.items()}, magnitudes=magnitudes,
                         biases=biases, saved_modules=saved)


def _same_bits(a, b) -> bool:
    """Bit equality of two tensors read from a file, in numpy (no torch ops: see load_adapter)."""
    import numpy as np
    import torch

    return (a.shape == b.shape and a.dtype == b.dtype
            and np.array_equal(a.view(torch.uint8).numpy(), b.view(torch.uint8).numpy()))


def _read_tensors(f, entries: dict[str, TensorEntry], data_start: int, size: int, adapter_id: str) -> dict:
    """The tensors of a checked header (size is bounded by the shapes _build_spec accepted),
    each checked to be finite without running torch ops."""
    import numpy as np
    import torch

    data = bytearray(size - data_start)  # writable, so tensors can share it; one copy in memory
    f.seek(data_start)
    if f.readinto(data) != len(data):
        raise InvalidAdapterError(f"adapter {adapter_id!r}: {WEIGHTS_FILE} changed size while being read; retry")
    tensors = {}
    for name, entry in entries.items():
        np_dtype, torch_dtype, _ = _FLOAT_DTYPES[entry.dtype]
        count = math.prod(entry.shape)
        array = np.frombuffer(data, dtype=np.dtype(np_dtype).newbyteorder("<"), count=count, offset=entry.start)
        if entry.dtype == "BF16":
            finite = not np.any((array & 0x7F80) == 0x7F80)  # exponent all ones: Inf or NaN
        else:
            finite = bool(np.isfinite(array).all())
            if finite and entry.dtype == "F64" and count and np.abs(array).max() > _FLOAT32_MAX:
                raise InvalidAdapterError(f"adapter {adapter_id!r}: tensor {shorten(name)} holds values beyond float32's "
                                          "range, which the server computes in")
        if not finite:
            raise InvalidAdapterError(f"adapter {adapter_id!r}: tensor {shorten(name)} holds NaN or Inf values")
        tensor = torch.from_numpy(array.reshape(entry.shape))
        tensors[name] = tensor.view(getattr(torch, torch_dtype)) if entry.dtype == "BF16" else tensor
    return tensors
