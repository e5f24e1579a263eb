"""The `lorad train` config: axolotl's keys and aliases, errors that name the key, --set overrides,
hardware resolution of `auto`, and the CLI's handling of bad configs. No model is loaded here."""

from __future__ import annotations

import time

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lorad.errors import ConfigError
from lorad.geometry import PROJECTIONS
from lorad.trainer.config import (
    DatasetConfig,
    PromptFormat,
    apply_overrides,
    config_from_dict,
    load_config,
    resolve_precision,
)
from trainer_helpers import REPO

EXAMPLE = REPO / "trainer" / "examples" / "storyteller.yaml"


def base(**extra) -> dict:
    return {"datasets": [{"path": "d.jsonl"}], **extra}


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    return str(info.value)


# ---- the issue's config --------------------------------------------------------------------


def test_example_is_the_issue_config_with_only_base_and_path_changed():
    from test_trainer_axolotl import ISSUE_CONFIG

    issue = yaml.safe_load(ISSUE_CONFIG)
    example = yaml.safe_load(EXAMPLE.read_text())
    assert example.pop("base_model") != issue.pop("base_model")
    assert example["datasets"][0].pop("path") != issue["datasets"][0].pop("path")
    assert example == issue


def test_issue_config_keys_resolve_to_axolotl_meaning():
    cfg = load_config(EXAMPLE)
    assert cfg.sequence_len == 1024  # from the alias sequence_length
    assert cfg.target_modules == list(PROJECTIONS)  # lora_target_linear: true
    assert cfg.adapter == "lora" and cfg.quant == "none"  # adapter: lora without load_in_4bit
    assert cfg.optimizer == "adamw_bnb_8bit" and cfg.learning_rate == 0.0002
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (32, 16.0, 0.05)
    assert cfg.bf16 == "auto" and cfg.tf32 is False and cfg.gradient_checkpointing is True
    fmt = cfg.datasets[0].type
    assert isinstance(fmt, PromptFormat)
    assert fmt.format == "<|user|>\n {instruction} </s>\n<|assistant|>"
    assert (fmt.field_system, fmt.field_instruction, fmt.field_output) == ("system", "synopsis", "short_story")
    # the relative dataset path is taken relative to the YAML file
    assert Path(cfg.datasets[0].path) == EXAMPLE.parent / "storyteller.jsonl"


def test_qlora_defaults_to_nf4_and_all_projections():
    cfg = config_from_dict(base(adapter="qlora"))
    assert cfg.quant == "nf4"
    assert cfg.target_modules == list(PROJECTIONS)
    cfg = config_from_dict(base(adapter="lora", load_in_4bit=True, lora_target_modules=["v_proj", "q_proj"]))
    assert cfg.quant == "nf4" and cfg.target_modules == ["q_proj", "v_proj"]


# ---- unknown keys and bad values name the key ------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        (base(lora_alpah=16), "lora_alpah: unknown key; did you mean 'lora_alpha'?"),
        (base(micro_batchsize=2), "micro_batchsize: unknown key; did you mean 'micro_batch_size'?"),
        (base(sequence_lenght=512), "sequence_lenght: unknown key; did you mean 'sequence_len"),
        ({"datasets": [{"path": "d", "typ": "alpaca"}]}, "datasets[0].typ: unknown key; did you mean 'type'?"),
        (
            {"datasets": [{"path": "d", "type": {"field_instruction": "a", "field_output": "b", "fromat": "x"}}]},
            "datasets[0].type.fromat: unknown key; did you mean 'format'?",
        ),
    ],
)
def test_unknown_key_names_it_and_the_closest_known_key(raw, expected):
    assert expected in error_of(raw)


def test_unknown_key_without_a_close_match_lists_the_known_keys():
    message = error_of(base(wandb_project="x"))
    assert message.startswith("wandb_project: unknown key; known keys:") and "lora_r" in message


@pytest.mark.parametrize(
    "raw, expected",
    [
        (base(lora_r=0), "lora_r: must be at least 1"),
        (base(lora_r="eight"), "lora_r: expected an integer, got 'eight'"),
        (base(lora_r=True), "lora_r: expected an integer"),
        (base(lora_dropout=1.5), "lora_dropout: must be in [0, 1)"),
        (base(learning_rate="fast"), "learning_rate: expected a number"),
        (base(adapter="qlora", load_in_4bit=False), "load_in_4bit: adapter: qlora needs load_in_4bit: true"),
        (base(adapter="dora"), "adapter: 'dora' is not one of 'lora' | 'qlora'"),
        (base(load_in_8bit=True), "load_in_8bit: 8-bit bases are not supported"),
        (base(warmup_steps=5, warmup_ratio=0.1), "warmup_steps and warmup_ratio: set one of them"),
        (base(optimizer="adamw_bnb_8bt"), "did you mean 'adamw_bnb_8bit'?"),
        (base(lr_scheduler="cosin"), "lr_scheduler: 'cosin' is not one of"),
        (base(lora_target_modules=["lm_head"]), "lora_target_modules: 'lm_head' cannot be served by lorad"),
        (base(lora_target_modules=["q_prj"]), "(did you mean 'q_proj'?)"),
        (base(val_set_size=2.5), "val_set_size: 2.5 must be a fraction"),
        (base(bf16="yes"), "bf16: 'yes' is not bool or 'auto'"),
        (base(bf16=True, fp16=True), "bf16 and fp16: both are true"),
        ({"datasets": []}, "datasets: at least one dataset is required"),
        ({"base_model": "x"}, "datasets: required (at least one dataset"),
        ({"datasets": [{"type": "alpaca"}]}, "datasets[0].path: required"),
        ({"datasets": [{"path": "d", "type": "alpacca"}]}, "datasets[0].type: 'alpacca' is not one of"),
        (
            {"datasets": [{"path": "d", "type": {"field_instruction": "a"}}]},
            "datasets[0].type.field_output: required in a custom type mapping",
        ),
        (
            {"datasets": [{"path": "d", "type": {"field_instruction": "a", "field_output": "b", "format": "{instrucion}"}}]},
            "datasets[0].type.format: placeholder {instrucion} is unknown",
        ),
        (base(sequence_len=512, sequence_length=256), "sequence_length: set twice"),
    ],
)
def test_bad_values_name_the_field(raw, expected):
    assert expected in error_of(raw)


def test_yaml_style_numbers_and_widening():
    cfg = config_from_dict(base(learning_rate="2e-4", lora_alpha=16, num_epochs=3))
    assert cfg.learning_rate == pytest.approx(2e-4)
    assert isinstance(cfg.lora_alpha, float) and isinstance(cfg.num_epochs, float)


# ---- --set overrides -------------------------------------------------------------------------


def test_overrides_reach_nested_keys_and_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"datasets": [{"path": "a.jsonl", "type": "alpaca"}], "lora_r": 8}))
    cfg = load_config(path, ["lora_r=16", "datasets.0.path=/data/b.jsonl", "bf16=false", "max_steps=7",
                             "lora_target_modules=[q_proj, v_proj]"])
    assert cfg.lora_r == 16 and cfg.datasets[0].path == "/data/b.jsonl" and cfg.bf16 is False
    assert cfg.max_steps == 7 and cfg.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("lora_r", "expected key=value"),
        ("=3", "the key is empty"),
        ("datasets.3.path=x", "datasets.3 is not an index of a list of 1 entries"),
        ("lora_alpah=3", "lora_alpah: unknown key; did you mean 'lora_alpha'?"),
    ],
)
def test_bad_overrides_say_what_is_wrong(override, expected):
    with pytest.raises(ConfigError) as info:
        config_from_dict(apply_overrides({"datasets": [{"path": "d"}]}, [override]))
    assert expected in str(info.value)


# ---- hardware resolution ---------------------------------------------------------------------


def test_auto_precision_follows_the_cpu():
    import torch

    native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    p = resolve_precision(config_from_dict(base()), "cpu")
    assert (p.bf16, p.fp16, p.tf32) == (native, False, False)
    assert resolve_precision(config_from_dict(base(bf16=False)), "cpu").compute_dtype_name == "float32"
    with pytest.raises(ConfigError, match="fp16: float16 training needs a CUDA device"):
        resolve_precision(config_from_dict(base(fp16=True, bf16=False)), "cpu")


def test_dataset_type_mapping_builds_a_prompt_format():
    ds = DatasetConfig(path="x", type={"field_instruction": "q", "field_output": "a"})
    assert isinstance(ds.type, PromptFormat) and ds.type.format == "{instruction} {input}"


# ---- the CLI ---------------------------------------------------------------------------------


def invoke(*args):
    from lorad.cli import main

    return CliRunner().invoke(main, ["train", *args])


def test_cli_reports_a_bad_config_and_exits_nonzero(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("datasets:\n  - path: d.jsonl\nlora_alpah: 16\n")
    result = invoke(str(path))
    assert result.exit_code == 1
    assert "lorad train: error: lora_alpah: unknown key; did you mean 'lora_alpha'?" in result.output


def test_cli_reports_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("datasets: [\n")
    result = invoke(str(path))
    assert result.exit_code == 1 and "not valid YAML" in result.output
    result = invoke(str(tmp_path / "nope.yaml"))
    assert result.exit_code == 1 and "does not exist" in result.output


def test_push_to_an_unreachable_server_fails_before_training(tmp_path):
    """(tests/test_train_push.py trains and pushes to a real server.)"""
    started = time.perf_counter()
    result = invoke(str(EXAMPLE), "--push", "127.0.0.1:1", "--set", f"output_dir={tmp_path / 'out'}")
    assert result.exit_code == 1
    assert "--push 127.0.0.1:1: the server cannot be reached" in result.output and "nothing was trained" in result.output
    assert not (tmp_path / "out").exists() and time.perf_counter() - started < 60
