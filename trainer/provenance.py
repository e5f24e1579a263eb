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
import json
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from lorad.adapter_format import CONFIG_FILE, WEIGHTS_FILE
from lorad.deltas.adapter_io import PROVENANCE_FILE, package_versions, write_peft_model
from lorad.deltas.adapter_io import write_adapter as write_peft_files

__all__ = ["PROVENANCE_FILE", "build_provenance", "package_versions", "write_adapter"]


def write_adapter(peft_model, output_dir: Path, base_name: str, provenance: dict,
                  initial_adapter: Path | None = None, state_dict: dict | None = None) -> Path:
    """Save the active adapter of `peft_model` into output_dir (PEFT format) with provenance, through
    lorad's one adapter writer (lorad.deltas.adapter_io.write_adapter: staged, fsynced, moved in
    weights first, config next, provenance last).

    initial_adapter: for PiSSA / OLoRA runs, the adapter as initialised; PEFT then turns the
    trained one into the difference A B - A0 B0 as a standard LoRA (rank 2r) that applies to the
    original base. state_dict: the trainable tensors when the model's own are shards (FSDP)."""
    if initial_adapter is None:
        return write_peft_model(peft_model, output_dir, base_name, provenance, state_dict=state_dict)
    # Only PEFT knows its conversion (config included: r and alpha doubled, patterns adjusted), so
    # it writes into a scratch folder and the one writer publishes what it wrote.
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-convert-", dir=output_dir) as scratch:
        peft_model.save_pretrained(
            scratch, safe_serialization=True, save_embedding_layers=False,
            path_initial_model_for_weight_conversion=str(initial_adapter),
            **({"state_dict": state_dict} if state_dict is not None else {}),
        )
        tensors = load_file(str(Path(scratch) / WEIGHTS_FILE))
        config = json.loads((Path(scratch) / CONFIG_FILE).read_text())
    config["base_model_name_or_path"] = base_name
    return write_peft_files(output_dir, tensors, config, provenance)


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
