"""FSDP (accelerate's plugin, torch's fully_shard) under torchrun with 2 gloo processes on CPU, LoRA
over an unquantized base: the run really shards (DTensor parameters), stops after step 1 and
resumes, and ends with the adapter of the same run under DDP.

Tolerance: relative Frobenius distance 1e-4 between the two adapters (measured 2026-11-28:
max |difference| 1.2e-6 on tensors of max |value| 0.13). The two reduce gradients in different
orders (all-reduce vs reduce-scatter), so they agree to float32 rounding, amplified a little by
Adam's normalisation; a missing reduction would move the adapter by ~100%.

QLoRA + FSDP (NF4 stored as bf16 through bitsandbytes' quant_storage) is written for CUDA and
tested only where a GPU is present.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_helpers import adapter_tensors, metrics, tiny_base_dir, train_env, write_jsonl, write_yaml

pytestmark = pytest.mark.slow

ROWS = [{"instruction": f"Add {a} and {b}.", "output": f"{a} plus {b} makes {a + b}."} for a in range(4) for b in range(4)]


def launch(config: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lorad.cli", "train", str(config), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fsdp")
    data = write_jsonl(tmp / "rows.jsonl", ROWS)
    config = write_yaml(tmp / "run.yaml", {
        "base_model": str(tiny_base_dir()),
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "adapter": "lora",
        "sequence_len": 64,
        "sample_packing": False,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 2,
        "learning_rate": 0.01,
        "lr_scheduler": "constant",
        "bf16": False,
        "save_steps": 100,
        "seed": 4,
    })
    out = {"ddp": tmp / "ddp", "fsdp": tmp / "fsdp"}
    launch(config, tmp, "--set", f"output_dir={out['ddp']}")
    fsdp = ("--set", f"output_dir={out['fsdp']}", "--set", "fsdp=[full_shard, auto_wrap]")
    stopped = launch(config, tmp, *fsdp, "--stop-after", "1")
    assert "stopped at step 1 of 2" in stopped.stderr
    resumed = launch(config, tmp, *fsdp, "--resume")
    assert "resume: from" in resumed.stderr and "checkpoint-1 (step 1" in resumed.stderr
    out["_fsdp_log"] = resumed.stderr
    return out


def test_fsdp_shards_and_equals_the_ddp_run(runs):
    ddp, fsdp = adapter_tensors(runs["ddp"]), adapter_tensors(runs["fsdp"])
    assert sorted(ddp) == sorted(fsdp) and len(ddp) == 2 * 7 * 2
    assert all(fsdp[k].shape == ddp[k].shape for k in ddp)  # whole tensors, not shards
    norm = sum((t.double() ** 2).sum() for t in ddp.values()) ** 0.5
    distance = sum(((ddp[k].double() - fsdp[k].double()) ** 2).sum() for k in ddp) ** 0.5
    assert norm > 0.05 and distance < 1e-4 * norm, float(distance / norm)
    losses = {name: [m["loss"] for m in metrics(runs[name]) if "loss" in m] for name in ("ddp", "fsdp")}
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=1e-5) and len(losses["ddp"]) == 2


def test_fsdp_checkpoint_holds_the_lora_tensors_not_the_base(runs):
    checkpoint = runs["fsdp"] / "checkpoints" / "checkpoint-1"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert "adapter_model.safetensors" in names and "optimizer.bin" in names
    assert not any(n.startswith("pytorch_model_fsdp") for n in names)  # the frozen base is not copied per checkpoint
    prov = json.loads((runs["fsdp"] / "lorad_provenance.json").read_text())
    assert prov["config"]["fsdp"] == ["full_shard", "auto_wrap"] and prov["training"]["world_size"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA + FSDP (bnb quant_storage) runs on CUDA only")
def test_qlora_fsdp_on_cuda(runs, tmp_path):
    config = tmp_path / "qlora.yaml"
    raw = {"base_model": str(tiny_base_dir()), "datasets": [{"path": str(write_jsonl(tmp_path / "r.jsonl", ROWS)),
           "type": "alpaca"}], "adapter": "qlora", "sequence_len": 64, "lora_r": 4, "micro_batch_size": 2,
           "max_steps": 2, "bf16": True, "fsdp": ["full_shard", "auto_wrap"], "output_dir": str(tmp_path / "out"),
           "device": "cuda"}
    write_yaml(config, raw)
    launch(config, tmp_path)
    assert len(adapter_tensors(tmp_path / "out")) == 2 * 7 * 2


def test_fsdp_is_refused_where_it_cannot_run(tmp_path):
    from lorad.errors import ConfigError
    from lorad.trainer.config import config_from_dict
    from lorad.trainer.fsdp import fsdp_arguments

    cfg = config_from_dict({"datasets": [{"path": "d"}], "adapter": "lora", "fsdp": "full_shard auto_wrap"})
    with pytest.raises(ConfigError, match="fsdp: shards the model over processes; start the run with torchrun"):
        fsdp_arguments(cfg, "cpu", 1)
    args = fsdp_arguments(cfg, "cpu", 2)
    assert args["fsdp"] == "full_shard auto_wrap" and args["fsdp_config"]["use_orig_params"] is True
    qlora = config_from_dict({"datasets": [{"path": "d"}], "fsdp": ["full_shard"]})
    with pytest.raises(ConfigError, match="fsdp with adapter: qlora .* CUDA only"):
        fsdp_arguments(qlora, "cpu", 2)
    with pytest.raises(ConfigError, match="fsdp: 'zero3' is not one of"):
        fsdp_arguments(config_from_dict({"datasets": [{"path": "d"}], "fsdp": ["zero3"]}), "cpu", 2)
