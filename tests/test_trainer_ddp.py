"""One optimizer step is one batch, however it is split. The same 4 rows per step as
  * one process, micro_batch_size 4;
  * one process, micro_batch_size 1 x gradient_accumulation_steps 4;
  * two processes (torchrun, DDP over gloo on CPU), micro_batch_size 1 x gradient_accumulation 2,
    stopped after step 1 and resumed;
give the same losses and the same adapter, and the loss is the mean CE over all trained tokens of
the step: not the mean of per-micro-batch (or per-rank) means, which the rows' very different
response lengths would make visibly different (checked against the base model directly)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_helpers import adapter_tensors, cli_train, metrics, train_env, write_jsonl, write_yaml

pytestmark = pytest.mark.slow

ROWS = [
    {"q": "Say yes.", "a": "Yes."},
    {"q": "Count from one to twenty in words.", "a": "one two three four five six seven eight nine ten eleven twelve "
                                                      "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty"},
    {"q": "Say no.", "a": "No."},
    {"q": "Name the planets.", "a": "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune."},
    {"q": "Say maybe.", "a": "Maybe."},
    {"q": "List five colours.", "a": "Red, orange, yellow, green and blue are five colours of the rainbow."},
    {"q": "Say hi.", "a": "Hi."},
    {"q": "Name three fruits.", "a": "Apples, pears and plums are three fruits that grow on trees."},
]
FORMAT = {"field_instruction": "q", "field_output": "a", "format": "Q: {instruction}\nA: ", "no_input_format": "Q: {instruction}\nA: "}
CONFIG = {
    "base_model": "smollm2-135m-instruct",
    "adapter": "qlora",
    "sequence_len": 64,
    "sample_packing": False,  # one sample per row: the step arithmetic below counts rows
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_target_modules": ["q_proj", "v_proj"],
    "max_steps": 2,
    "optimizer": "adamw_torch",
    "learning_rate": 0.001,
    "lr_scheduler": "constant",
    "bf16": False,  # float32 compute: the three splits then agree to rounding
    "save_steps": 100,
    "seed": 11,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("batching")
    data = write_jsonl(tmp / "rows.jsonl", ROWS)
    config = write_yaml(tmp / "run.yaml", dict(CONFIG, datasets=[{"path": str(data), "type": FORMAT}], output_dir=str(tmp / "x")))
    out = {name: tmp / name for name in ("batch4", "accum4", "ddp2x2")}
    cli_train(str(config), "--set", f"output_dir={out['batch4']}", "--set", "micro_batch_size=4")
    cli_train(str(config), "--set", f"output_dir={out['accum4']}", "--set", "micro_batch_size=1",
              "--set", "gradient_accumulation_steps=4")
    # the DDP run also stops after step 1 and resumes: each rank must get back its RNG state and
    # its place in the data (the comparison below is with the single-process runs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lorad.cli", "train", str(config), "--set", f"output_dir={out['ddp2x2']}",
           "--set", "micro_batch_size=1", "--set", "gradient_accumulation_steps=2"]
    stop = subprocess.run(cmd + ["--stop-after", "1"], cwd=tmp, env=train_env(), capture_output=True, text=True, timeout=600)
    assert stop.returncode == 0 and "stopped at step 1 of 2" in stop.stderr, stop.stderr[-6000:]
    resume = subprocess.run(cmd + ["--resume"], cwd=tmp, env=train_env(), capture_output=True, text=True, timeout=600)
    assert resume.returncode == 0 and "checkpoint-1 (step 1" in resume.stderr, resume.stderr[-6000:]
    assert (tmp / "ddp2x2" / "checkpoints" / "checkpoint-1" / "rng_state_1.pth").is_file()  # one RNG file per rank
    out["_config"] = config
    return out


def logged(folder: Path, key: str) -> list[float]:
    return [m[key] for m in metrics(folder) if "loss" in m]


def test_accumulation_and_ddp_give_the_losses_and_gradients_of_one_batch(runs):
    """grad_norm is taken from the summed gradient of the whole step (after DDP's all-reduce):
    equal norms mean the accumulation and the cross-rank scaling are right, not just the logging."""
    for key in ("loss", "grad_norm"):
        reference = logged(runs["batch4"], key)
        assert len(reference) == 2
        for name in ("accum4", "ddp2x2"):
            assert logged(runs[name], key) == pytest.approx(reference, rel=1e-4), (name, key)


def test_accumulation_and_ddp_give_the_adapter_of_one_batch(runs):
    """Relative Frobenius distance: Adam's first updates are ~lr * sign(gradient), so the few
    elements whose gradient is ~0 may flip on rounding; a missing all-reduce moves half of them."""
    reference = adapter_tensors(runs["batch4"])
    norm = sum((t.double() ** 2).sum() for t in reference.values()) ** 0.5
    assert norm > 0.1  # the adapter moved
    for name in ("accum4", "ddp2x2"):
        other = adapter_tensors(runs[name])
        distance = sum(((reference[k].double() - other[k].double()) ** 2).sum() for k in reference) ** 0.5
        assert distance < 1e-2 * norm, f"{name}: relative distance {float(distance / norm):.2e}"


def test_ddp_records_its_world_size(runs):
    prov = json.loads((runs["ddp2x2"] / "lorad_provenance.json").read_text())
    assert prov["training"]["world_size"] == 2 and prov["config"]["resolved"]["world_size"] == 2


def test_step_loss_is_the_token_mean_not_a_mean_of_means(runs):
    """Recompute step 1's loss from the base (LoRA-B starts at zero, so the first forward is the
    base): the token mean matches what lorad logged; the mean of per-row means does not."""
    from lorad.base_model import BaseModelConfig, load_base
    from lorad.trainer.config import load_config
    from lorad.trainer.data import prepare_data
    from lorad.trainer.loss import HiddenStateTap, causal_lm_parts, token_loss_sum
    from lorad.trainer.packing import EpochShuffleSampler, RowCollator
    from lorad.trainer.recipe import keep_bnb_training_layout

    cfg = load_config(runs["_config"])
    base = load_base(BaseModelConfig(), cache_quantized=True)  # NF4, float32 compute: as the runs
    keep_bnb_training_layout(base.model)  # the runs' NF4 kernels, not the CPU inference repacking
    data = prepare_data(cfg, base.tokenizer)
    first_step = list(EpochShuffleSampler(len(data.train), cfg.seed))[:4]
    norm, head = causal_lm_parts(base.model)
    tap = HiddenStateTap(norm)
    collate = RowCollator(base.tokenizer.pad_token_id, packing=False)
    sums, counts = [], []
    with torch.no_grad():
        for i in first_step:
            s, n = token_loss_sum(base.model, tap, head, collate([[data.train[i]]]))
            sums.append(float(s))
            counts.append(n)
    tap.remove()
    token_mean = sum(sums) / sum(counts)
    mean_of_means = sum(s / n for s, n in zip(sums, counts)) / len(sums)
    assert max(counts) >= 5 * min(counts)  # the rows differ enough for the two to part
    assert abs(mean_of_means - token_mean) > 0.05 * token_mean
    for name in ("batch4", "accum4", "ddp2x2"):
        assert logged(runs[name], "loss")[0] == pytest.approx(token_mean, rel=1e-4), name
