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
    message = error_of(base(xyzzy=1))
    assert message.startswith("xyzzy: unknown key; known keys:") and "lora_r" in message


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
        (base(lora_target_modules="model.layers.(0.q_proj"), "lora_target_modules: 'model.layers.(0.q_proj' is not a valid regular expression"),
        (base(peft_init_lora_weights="pisa"), "peft_init_lora_weights: 'pisa' is not true, false, gaussian, pissa, olora, loftq or pissa_niter_<K>; did you mean 'pissa'?"),
        (base(peft_init_lora_weights="pissa"), "peft_init_lora_weights: pissa rewrites the base weights it starts from, which an NF4 base cannot hold exactly; use adapter: lora"),
        (base(adapter="lora", peft_init_lora_weights="olora", peft_use_dora=True), "olora with peft_use_dora cannot be converted"),
        (base(adapter="lora", peft_init_lora_weights="loftq"), "peft_init_lora_weights: loftq starts LoRA at the NF4 quantization error of the base; it needs a quantized base"),
        (base(loftq_config={"loftq_bits": 2}), "loftq_config.loftq_bits: 2 bits; lorad's quantized base is NF4"),
        (base(loftq_config={"loftq_iter": 5}), "loftq_config.loftq_iter: LoftQ's alternating iterations re-quantize the base"),
        (base(peft_init_lora_weights="gaussian", loftq_config={}), "loftq_config: set, but peft_init_lora_weights is 'gaussian', not 'loftq'"),
        (base(peft={"backend": "torchao"}), "axolotl key 'peft.backend' is not supported by lorad train"),
        (base(bias="some"), "bias: 'some' is not one of 'none' | 'all' | 'lora_only'"),
        (base(adam_beta2=1.0), "adam_beta2: must be in [0, 1), got 1.0"),
        (base(adam_epsilon=0), "adam_epsilon: must be positive"),
        (base(lr_scheduler="reduce_lr_on_plateau"), "lr_scheduler: reduce_lr_on_plateau follows the eval loss; set val_set_size"),
        (base(attn_implementation="flash"), "attn_implementation: 'flash' is not one of 'sdpa' | 'eager' | 'flash_attention_2'"),
        (base(flash_attention=True, attn_implementation="eager"), "flash_attention: true asks for flash_attention_2, but attn_implementation is 'eager'"),
        (base(eval_steps=3, evals_per_epoch=2), "eval_steps and evals_per_epoch: set one of them, not both"),
        (base(deepspeed="zero2.json"), "axolotl key 'deepspeed' is not supported by lorad train: use data parallelism (torchrun"),
        (base(special_tokens={"pad_token": "<pad>"}), "axolotl key 'special_tokens' is not supported by lorad train: an adapter cannot change the tokenizer"),
        (base(wandb_project="runs"), "axolotl key 'wandb_project' is not supported by lorad train: lorad writes metrics.jsonl"),
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


# ---- round two: names from transformers, targets, variants, axolotl keys ----------------------


def test_every_optimizer_and_scheduler_name_of_transformers_is_accepted():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    assert len(OptimizerNames) > 30 and len(SchedulerType) > 10  # the enums, not a copy of a few names
    for name in OptimizerNames:
        assert config_from_dict(base(optimizer=name.value)).optimizer in (name.value, "adamw_bnb_8bit")
    for name in SchedulerType:
        extra = {"val_set_size": 0.2} if name.value in ("reduce_lr_on_plateau", "greedy") else {}
        assert config_from_dict(base(lr_scheduler=name.value, **extra)).lr_scheduler == name.value
    assert "did you mean 'lion_8bit'?" in error_of(base(optimizer="lion8bit"))
    assert "did you mean 'cosine_with_min_lr'?" in error_of(base(lr_scheduler="cosine_with_minlr"))


def test_axolotl_keys_that_ask_for_nothing_are_ignored_and_named():
    cfg = config_from_dict(base(deepspeed=None, wandb_project="", hub_model_id=None, strict=False,
                                model_type="LlamaForCausalLM", tokenizer_type="AutoTokenizer"))
    assert set(cfg._ignored) == {"deepspeed", "wandb_project", "hub_model_id", "strict", "model_type", "tokenizer_type"}


def test_target_regexes_pick_modules_by_path():
    cfg = config_from_dict(base(lora_target_modules=r"model\.layers\.(0|1)\..*\.(q|v)_proj"))
    assert cfg.target_modules == ["q_proj", "v_proj"]
    import re

    regex = re.compile(cfg.target_patterns)
    assert regex.fullmatch("model.layers.1.self_attn.v_proj") and not regex.fullmatch("model.layers.2.self_attn.v_proj")
    # names and path suffixes mix; plain names keep PEFT's list rule (exact or ".name" suffix)
    cfg = config_from_dict(base(lora_target_modules=["q_proj", "mlp.down_proj"]))
    assert cfg.target_modules == ["q_proj", "down_proj"]
    regex = re.compile(cfg.target_patterns)
    assert regex.fullmatch("model.layers.7.mlp.down_proj") and not regex.fullmatch("model.layers.7.self_attn.o_proj")
    assert config_from_dict(base(lora_target_modules=["v_proj", "q_proj"])).target_patterns == ["q_proj", "v_proj"]


def test_axolotl_loftq_config_asks_for_loftq():
    cfg = config_from_dict(base(peft={"loftq_config": {"loftq_bits": 4}}))
    assert cfg.peft_init_lora_weights == "loftq" and cfg.loftq_config == {"loftq_bits": 4}
    assert config_from_dict(base(adapter="lora", peft_init_lora_weights="pissa_niter_4")).peft_init_lora_weights == "pissa_niter_4"


def test_axolotl_attention_switches():
    assert config_from_dict(base(flash_attention=True)).attn_implementation == "flash_attention_2"
    assert config_from_dict(base(sdp_attention=True)).attn_implementation == "sdpa"
    assert config_from_dict(base()).attn_implementation == "sdpa"


def test_flash_attention_fails_clearly_on_this_machine():
    from lorad.trainer.optim import check_attention

    cfg = config_from_dict(base(flash_attention=True))
    precision = resolve_precision(cfg, "cpu")
    with pytest.raises(ConfigError, match="attn_implementation: flash_attention_2 runs on CUDA GPUs only"):
        check_attention(cfg, "cpu", precision)
    check_attention(config_from_dict(base(attn_implementation="eager")), "cpu", precision)  # nothing to check


def test_scheduler_kwargs_are_checked_against_the_schedule():
    from lorad.trainer.optim import check_schedule

    check_schedule(config_from_dict(base(lr_scheduler="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1})), 10, 2)
    with pytest.raises(ConfigError, match="lr_scheduler_kwargs: .* do not fit lr_scheduler cosine_with_min_lr"):
        check_schedule(config_from_dict(base(lr_scheduler="cosine_with_min_lr")), 10, 2)  # needs min_lr or min_lr_rate
    with pytest.raises(ConfigError, match="lr_scheduler_kwargs: .*'cycles'.* do not fit lr_scheduler cosine"):
        check_schedule(config_from_dict(base(lr_scheduler="cosine", lr_scheduler_kwargs={"cycles": 2})), 10, 2)


def test_an_optimizer_whose_package_is_missing_is_a_config_error(tiny_base):
    import importlib.util

    from transformers import TrainingArguments

    from lorad.trainer.optim import check_optimizer

    if importlib.util.find_spec("galore_torch") is not None:
        pytest.skip("galore-torch is installed here")
    args = TrainingArguments(output_dir="/tmp/unused", optim="galore_adamw", optim_target_modules=["q_proj"],
                             use_cpu=True, report_to="none")
    with pytest.raises(ConfigError, match="optimizer: galore_adamw cannot be used here: .*galore"):
        check_optimizer(args, tiny_base.model)
