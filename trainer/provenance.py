"""The run's product: a PEFT-format adapter folder that PEFT and `lorad serve` load, and where it
came from.

    OUTPUT_DIR/
      adapter_model.safetensors   LoRA A/B tensors, PEFT's names
      adapter_config.json         PEFT's LoraConfig; base_model_name_or_path = the base's lorad name
      lorad_provenance.json       base name + weights digest, lorad version, resolved config,
                                  data digest, steps, final train and eval loss, versions

Files are staged in a temporary folder and moved in with os.replace, weights first and
adapter_config.json (what `lorad serve` looks for) after them; lorad_provenance.json goes last,
so its presence means the adapter beside it is complete.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

PROVENANCE_FILE = "lorad_provenance.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def package_versions() -> dict[str, str]:
    out = {}
    for dist in ("lorad", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def write_adapter(peft_model, output_dir: Path, base_name: str, provenance: dict,
                  initial_adapter: Path | None = None, state_dict: dict | None = None) -> Path:
    """Save the active adapter of `peft_model` into output_dir (PEFT format) with provenance.

    initial_adapter: for PiSSA / OLoRA runs, the adapter as initialised; PEFT then writes the
    difference A B - A0 B0 as a standard LoRA (rank 2r) that applies to the original base.
    state_dict: the trainable tensors when the model's own are shards (FSDP)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=output_dir))
    try:
        config = peft_model.peft_config["default"]
        saved_name = config.base_model_name_or_path
        config.base_model_name_or_path = base_name
        try:
            peft_model.save_pretrained(
                str(staging), safe_serialization=True, save_embedding_layers=False,
                **({"path_initial_model_for_weight_conversion": str(initial_adapter)} if initial_adapter else {}),
                **({"state_dict": state_dict} if state_dict is not None else {}),
            )
        finally:
            config.base_model_name_or_path = saved_name
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=False) + "\n")
        for name in ADAPTER_FILES + (PROVENANCE_FILE,):
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
            os.replace(staging / name, output_dir / name)
        fd = os.open(output_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def build_provenance(
    *,
    base: dict,
    config: dict,
    data: dict,
    steps: int,
    epochs: float,
    tokens_seen: int,
    final_train_loss: float | None,
    final_eval_loss: float | None,
    world_size: int,
    precision: str,
    trainable_parameters: int,
    peak_memory: dict | None = None,
    parent: dict | None = None,
) -> dict:
    return {
        "format": "lorad-provenance/1",
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "lorad_version": package_versions()["lorad"],
        "base_model": base,
        "config": config,
        "data": data,
        "training": {
            "steps": steps,
            "epochs": round(epochs, 4),
            "tokens_seen": tokens_seen,
            "final_train_loss": final_train_loss,
            "final_eval_loss": final_eval_loss,
            "world_size": world_size,
            "precision": precision,
            "trainable_parameters": trainable_parameters,
            "peak_memory": peak_memory,  # rank 0's highest reading (trainer/device_memory.py)
        },
        "parent": parent,  # the adapter the run started from (lora_model_dir or --init-from), if any
        "versions": package_versions(),
    }
