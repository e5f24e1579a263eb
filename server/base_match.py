"""Was an adapter made for the base this server serves?

An adapter says which base it was trained for in two places:
  * lorad_provenance.json (written by `lorad train`): the base's name and the sha256 of its
    weight files; the digest is decisive when the server knows its own;
  * adapter_config.json's base_model_name_or_path (PEFT): a hub id, alias or local path,
    compared by name (the full string, or its last path component, case-insensitive).
Independently of what it says, its tensors fix the hidden size it was trained with.

Outcomes: "yes", "no" (the load is refused with a sentence naming both bases) or "unknown"
(the adapter says nothing; it is served if its shapes fit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lorad.adapter_format import CONFIG_FILE, WEIGHTS_FILE
from lorad.errors import InvalidAdapterError

PROVENANCE_FILE = "lorad_provenance.json"
YES, NO, UNKNOWN = "yes", "no", "unknown"
# lora_A of these projections is [r, hidden_size]
_HIDDEN_INPUT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


@dataclass(frozen=True)
class ServedBase:
    """The base a server serves, by every name it may be known under."""

    name: str
    hidden_size: int
    weights_digest: str | None = None
    other_names: tuple[str, ...] = field(default=())

    @classmethod
    def from_loaded(cls, base, weights_digest: str | None = None) -> "ServedBase":
        from lorad.base_model import BASE_ALIASES, EMBEDDED_ALIAS

        resolved = base.resolved
        names = [resolved.location, getattr(base.model.config, "_name_or_path", "") or ""]
        alias = BASE_ALIASES.get(resolved.display_name)
        if alias is not None and not alias[0].startswith("<"):
            names.append(alias[0])
        if resolved.display_name == EMBEDDED_ALIAS or resolved.source == "embedded":
            names += [EMBEDDED_ALIAS, "HuggingFaceTB/SmolLM2-135M-Instruct"]
        return cls(resolved.display_name, base.model.config.hidden_size, weights_digest,
                   tuple(n for n in names if n and not n.startswith("<")))


@dataclass(frozen=True)
class TrainedFor:
    name: str = ""
    weights_digest: str | None = None
    hidden_size: int | None = None

    def describe(self) -> str:
        parts = [repr(self.name) if self.name else "an unnamed base"]
        if self.weights_digest:
            parts.append(f"weights {self.weights_digest[:19]}")
        if self.hidden_size:
            parts.append(f"hidden size {self.hidden_size}")
        return f"{parts[0]} ({', '.join(parts[1:])})" if len(parts) > 1 else parts[0]


def read_trained_for(path: str | Path) -> TrainedFor:
    """What an adapter folder says about its base (never raises for missing or odd files)."""
    path = Path(path)
    name, digest = "", None
    provenance = _read_json(path / PROVENANCE_FILE)
    base = provenance.get("base_model") if isinstance(provenance, dict) else None
    if isinstance(base, dict):
        name = str(base.get("name") or "")
        digest = base.get("weights_digest") if isinstance(base.get("weights_digest"), str) else None
    if not name:
        config = _read_json(path / CONFIG_FILE)
        if isinstance(config, dict) and isinstance(config.get("base_model_name_or_path"), str):
            name = config["base_model_name_or_path"]
    return TrainedFor(name, digest, _hidden_size(path / WEIGHTS_FILE))


def _read_json(path: Path):
    try:
        if path.is_file() and path.stat().st_size <= 2**20:
            return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        pass
    return None


def _hidden_size(weights: Path) -> int | None:
    """The hidden size an adapter was trained with, from its safetensors header (no tensor data)."""
    try:
        with open(weights, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= 100 * 2**20:
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    for name, info in header.items():
        if ".lora_A" in name and any(f".{p}." in name for p in _HIDDEN_INPUT) and isinstance(info, dict):
            shape = info.get("shape")
            if isinstance(shape, list) and len(shape) == 2 and isinstance(shape[1], int):
                return shape[1]
    return None


def _norm(name: str) -> tuple[str, str]:
    full = name.strip().rstrip("/").lower()
    return full, full.rsplit("/", 1)[-1]


def match(trained: TrainedFor, served: ServedBase) -> tuple[str, str]:
    """(YES | NO | UNKNOWN, a sentence for NO naming both bases)."""
    def refuse(why: str) -> tuple[str, str]:
        return NO, (f"it was made for {trained.describe()} but this server serves {served.name!r} "
                    f"(hidden size {served.hidden_size}{', weights ' + served.weights_digest[:19] if served.weights_digest else ''}): "
                    f"{why}")

    if trained.hidden_size is not None and trained.hidden_size != served.hidden_size:
        return refuse("the hidden sizes differ")
    if trained.weights_digest and served.weights_digest:
        if trained.weights_digest == served.weights_digest:
            return YES, ""
        return refuse("the base weights differ (lorad_provenance.json)")
    if trained.name:
        full, last = _norm(trained.name)
        for known in (served.name, *served.other_names):
            k_full, k_last = _norm(known)
            if full == k_full or last == k_last:
                return YES, ""
        return refuse("the base names differ (if it is the same model under another name, set "
                      f"base_model_name_or_path in {CONFIG_FILE} to {served.name!r}, or leave it empty)")
    return UNKNOWN, ""


def check(adapter_id: str, path: str | Path, served: ServedBase) -> TrainedFor:
    """Raise InvalidAdapterError when the adapter at `path` was made for another base."""
    trained = read_trained_for(path)
    verdict, why = match(trained, served)
    if verdict == NO:
        raise InvalidAdapterError(f"adapter {adapter_id!r}: {why}")
    return trained
