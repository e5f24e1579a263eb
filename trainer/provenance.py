"""The run's product: a PEFT-format adapter folder that PEFT and `lorad serve` load, and where it
came from.

    OUTPUT_DIR/
      adapter_model.safetensors   LoRA A/B tensors, PEFT's names
      adapter_config.json         PEFT's LoraConfig; base_model_name_or_path = the base's lorad name
      lorad_provenance.json       base name + weights digest, lorad version, resolved config,
                                  data digest, steps, final train and eval loss, versions

Files are written by lorad's one adapter writer (lorad.deltas.adapter_io): staged in a temporary
folder and moved in with os.replace, weights first and adapter_config.json (what `lorad serve`
looks for) after them; lorad_provenance.json goes last, so its presence means the adapter beside
it is complete.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from lorad.deltas.adapter_io import PROVENANCE_FILE, package_versions, write_peft_model

__all__ = ["PROVENANCE_FILE", "build_provenance", "package_versions", "write_adapter"]


def write_adapter(peft_model, output_dir: Path, base_name: str, provenance: dict) -> Path:
    """Save the active adapter of `peft_model` into output_dir (PEFT format) with provenance, through
    lorad's one adapter writer (lorad.deltas.adapter_io.write_adapter: staged, fsynced, moved in
    weights first, config next, provenance last)."""
    return write_peft_model(peft_model, output_dir, base_name, provenance)


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
        },
        "versions": package_versions(),
    }
