"""The axolotl config of issue 4, as users have it (a hub dataset path, a hub base), fails offline
with a clear sentence about the dataset and how to point at a local copy; with `path` pointed at a
local copy of the dataset repository (and, on this machine without the 8B base, `base_model` set
to the embedded SmolLM2) it runs unchanged (plus `--set max_steps=2`, to keep the suite short: the
config itself asks for 4 epochs). Checks what a person gets: the adapter (PEFT format, every
LoRA-B trained although the base is frozen and checkpointed), metrics.jsonl, loss_curve.png,
provenance, and --dry-run."""

from __future__ import annotations

import contextlib
import json

import pytest
import yaml
from click.testing import CliRunner

from trainer_helpers import REPO, adapter_tensors, cli_train, dataset_repository_copy, hub_offline, metrics, write_yaml

pytestmark = pytest.mark.slow

# Verbatim from the issue.
ISSUE_CONFIG = """\
base_model: unsloth/Meta-Llama-3.1-8B-Instruct
datasets:
  - path: jaydenccc/AI_Storyteller_Dataset
    type:
      system_prompt: "You are an amazing storyteller. From the following synopsis, create an engaging story."
      field_system: system
      field_instruction: synopsis
      field_output: short_story
      format: "<|user|>\\n {instruction} </s>\\n<|assistant|>"
      no_input_format: "<|user|> {instruction} </s>\\n<|assistant|>"
output_dir: ./models/Llama3_Storyteller2
sequence_length: 1024
bf16: auto
tf32: false
micro_batch_size: 4
num_epochs: 4
optimizer: adamw_bnb_8bit
learning_rate: 0.0002
logging_steps: 1
adapter: lora
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
gradient_accumulation_steps: 1
gradient_checkpointing: true
"""

STORIES = REPO / "trainer" / "examples" / "storyteller.jsonl"  # 10 rows: system, synopsis, short_story


def local_copy(tmp_path):
    """The dataset as `huggingface-cli download --repo-type dataset jaydenccc/AI_Storyteller_Dataset
    --local-dir DIR` lays it out (README.md, data/train-*.parquet), holding the example's 10 rows."""
    folder = tmp_path / "AI_Storyteller_Dataset"
    if not folder.exists():
        rows = [json.loads(line) for line in STORIES.read_text().splitlines()]
        dataset_repository_copy(folder, {"train": rows})
    return folder


def issue_config_for(tmp_path):
    cfg = yaml.safe_load(ISSUE_CONFIG)
    cfg["base_model"] = "smollm2-135m-instruct"
    cfg["datasets"][0]["path"] = str(local_copy(tmp_path))
    return write_yaml(tmp_path / "storyteller.yaml", cfg)


@pytest.fixture(scope="module")
def story_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("axolotl")
    config = issue_config_for(tmp)
    with contextlib.chdir(tmp), hub_offline():  # output_dir is relative: the run lands in tmp
        result = cli_train(str(config), "--set", "max_steps=2")
    return tmp / "models" / "Llama3_Storyteller2", result


def test_issue_config_as_users_have_it_fails_offline_naming_the_dataset_and_the_fix(tmp_path, monkeypatch):
    config = tmp_path / "storyteller.yaml"
    config.write_text(ISSUE_CONFIG)
    monkeypatch.chdir(tmp_path)
    with hub_offline():
        for args in ((), ("--dry-run",)):
            result = cli_train(str(config), *args, check=False)
            assert result.exit_code == 1, result.output
            message = result.output.strip()
            assert message.startswith("lorad train: error: dataset path 'jaydenccc/AI_Storyteller_Dataset' is not a "
                                      "local file or folder, so lorad read it as a hub dataset, and datasets could not "
                                      "fetch it ("), message
            assert "--set datasets.N.path=DIR" in message
            assert "Loading weights" not in result.output  # the data fails first, before any model
        # the same config pointed at a local copy gets past the data, to the base (also on the hub)
        result = cli_train(str(config), "--dry-run", "--set", f"datasets.0.path={local_copy(tmp_path)}", check=False)
    assert result.exit_code == 1
    assert "unsloth/Meta-Llama-3.1-8B-Instruct" in result.output and "hub is unreachable" in result.output
    assert not (tmp_path / "models").exists()


def test_issue_config_trains_an_adapter_in_peft_format(story_run):
    out, result = story_run
    assert "done: adapter ->" in result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 32 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert config["base_model_name_or_path"] == "smollm2-135m-instruct"
    tensors = adapter_tensors(out)
    assert len(tensors) == 30 * 7 * 2  # layers x projections x (A, B)
    # gradient checkpointing over a frozen base must still train every LoRA-B (it starts at zero)
    untrained = [k for k, v in tensors.items() if "lora_B" in k and not v.abs().sum() > 0]
    assert not untrained, f"{len(untrained)} lora_B tensors stayed zero, e.g. {untrained[:2]}"


def test_issue_config_leaves_metrics_curve_and_provenance(story_run):
    out, _ = story_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["loss"] > 0 and r["learning_rate"] > 0 and r["tokens_per_s"] > 0 and r["tokens"] > 0
        assert r["peak_rss_mib"] > 100
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from lorad.base_model import BaseModelConfig, resolve_base, weights_digest

    prov = json.loads((out / "lorad_provenance.json").read_text())
    assert prov["base_model"]["name"] == "smollm2-135m-instruct" and prov["base_model"]["quant"] == "none"
    assert prov["base_model"]["weights_digest"] == weights_digest(resolve_base(BaseModelConfig()))
    assert prov["lorad_version"] and prov["versions"]["peft"]
    assert prov["data"]["digest"].startswith("sha256:") and prov["data"]["train_samples"] == 10
    assert prov["training"]["steps"] == 2
    assert prov["training"]["final_train_loss"] == pytest.approx(rows[-1]["loss"])
    assert prov["training"]["final_eval_loss"] is None  # no val_set_size in this config
    assert prov["config"]["sequence_len"] == 1024 and prov["config"]["resolved"]["total_steps"] == 2
    assert prov["training"]["trainable_parameters"] == sum(t.numel() for t in adapter_tensors(out).values())


def test_dry_run_prints_config_parameters_and_memory(story_run, tmp_path, monkeypatch):
    from lorad.cli import main

    out, _ = story_run
    monkeypatch.chdir(tmp_path)  # the config's output_dir is relative
    with hub_offline():
        result = CliRunner().invoke(main, ["train", str(issue_config_for(tmp_path)), "--dry-run"])
    assert result.exit_code == 0, result.output
    text = result.output
    # 10 stories of ~130 tokens pack into 2 rows of 1024 (packing: auto): 1 step per epoch, 4 epochs
    assert "# resolved config" in text and "sequence_len: 1024" in text and "total_steps: 4" in text
    assert "packing: on (auto: samples average" in text
    trainable = sum(t.numel() for t in adapter_tensors(out).values())
    assert f"trainable parameters: {trainable:,}" in text
    for part in ("weights", "gradients", "optimizer state", "activations", "total"):
        assert any(line.strip().startswith(part) and "MiB" in line for line in text.splitlines()), part
    assert not (tmp_path / "models").exists(), "--dry-run must not write a run"
