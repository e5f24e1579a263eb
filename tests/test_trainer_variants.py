"""Every adapter variant PEFT offers that `lorad train` accepts trains, and the adapter it
publishes is the model it trained: loaded with PEFT onto a fresh copy of the base, it gives the
trained model's logits. That is the check that matters for the variants that rewrite weights
(PiSSA and OLoRA rewrite the base and are published as a standard LoRA of rank 2r on the
original base) and for those with extra tensors (DoRA's magnitude, lora_bias, modules_to_save).

On the tiny random Llama (trainer_helpers.tiny_base_dir), float32, a few steps each.
"""

from __future__ import annotations

import json

import pytest
import torch

from trainer_helpers import adapter_tensors, tiny_base_dir, torch_threads, write_jsonl

ROWS = [{"instruction": f"Spell {n}.", "output": f"{n} is spelled {' '.join(str(n))}, digit by digit."} for n in range(100, 112)]


def run(tmp_path, name: str, **overrides):
    """Train in this process (QLoRARecipe, as `lorad train` runs it) and return the recipe."""
    from lorad.trainer.config import config_from_dict
    from lorad.trainer.recipe import QLoRARecipe, quiet_libraries

    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    raw = {
        "base_model": str(tiny_base_dir()),
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "output_dir": str(tmp_path / name),
        "adapter": "qlora",
        "sequence_len": 96,
        "sample_packing": False,
        "lora_r": 4,
        "lora_alpha": 8,
        "micro_batch_size": 4,
        "max_steps": 3,
        "learning_rate": 0.01,
        "bf16": False,
        "save_steps": 100,
        "seed": 5,
        **overrides,
    }
    init_from = raw.pop("init_from", None)
    with torch_threads(1), quiet_libraries():
        recipe = QLoRARecipe(config_from_dict(raw), init_from=init_from, echo=lambda msg: None)
        recipe.setup()
        recipe.train()
        recipe.cleanup()
    return recipe


def probe_batch(recipe):
    from lorad.trainer.packing import RowCollator

    rows = [[s] for s in recipe.data.train[:3]]
    return RowCollator(recipe.base.tokenizer.pad_token_id, packing=False)(rows)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad(), torch_threads(1):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=False)
    return out.logits.float()  # [B, T, V]


def assert_published_adapter_is_the_trained_model(recipe, atol: float = 2e-4):
    """PEFT loads output_dir onto a freshly loaded base (as `lorad serve` and users do) and must
    reproduce the trained model's logits; the adapter must also differ from the bare base."""
    from peft import PeftModel

    from lorad.base_model import BaseModelConfig, load_base
    from lorad.trainer.recipe import keep_bnb_training_layout

    batch = probe_batch(recipe)
    recipe.model.eval()
    trained = logits(recipe.model, batch)
    base = load_base(BaseModelConfig(name=recipe.cfg.base_model, quant=recipe.cfg.quant, device="cpu"),
                     compute_dtype=torch.float32, cache_quantized=True)
    keep_bnb_training_layout(base.model)  # the layout the run trained with
    bare = logits(base.model, batch)
    published = PeftModel.from_pretrained(base.model, str(recipe.output_dir))
    served = logits(published, batch)
    mask = batch["attention_mask"].bool()
    assert (trained - bare)[mask].abs().max() > 1e-3, "training did not change the model"
    err = (served - trained)[mask].abs().max().item()
    assert err < atol, f"the published adapter differs from the trained model by {err:.2e}"
    return json.loads((recipe.output_dir / "adapter_config.json").read_text()), adapter_tensors(recipe.output_dir)


@pytest.mark.parametrize(
    "overrides, check",
    [
        ({"peft_use_rslora": True, "lora_r": 16}, lambda c, t: c["use_rslora"] is True),
        ({"peft_use_dora": True}, lambda c, t: c["use_dora"] and any("lora_magnitude_vector" in k for k in t)),
        ({"peft_use_dora": True, "adapter": "lora"}, lambda c, t: c["use_dora"]),
        ({"peft_init_lora_weights": "gaussian"}, lambda c, t: c["init_lora_weights"] == "gaussian"),
        ({"peft_init_lora_weights": "loftq"}, lambda c, t: True),
        ({"lora_bias": True}, lambda c, t: c["lora_bias"] and any(k.endswith("lora_B.bias") for k in t)),
        ({"lora_modules_to_save": ["lm_head"]}, lambda c, t: any("lm_head" in k for k in t)),
        ({"lora_target_modules": r"model\.layers\.0\.(self_attn\.(q|v)|mlp\.down)_proj"},
         lambda c, t: sorted({k.split(".layers.")[1].split(".lora")[0] for k in t}) == [
             "0.mlp.down_proj", "0.self_attn.q_proj", "0.self_attn.v_proj"]),
    ],
    ids=["rslora", "dora-nf4", "dora-unquantized", "gaussian", "loftq", "lora_bias", "modules_to_save", "regex"],
)
def test_variant_trains_and_publishes_what_it_trained(tmp_path, overrides, check):
    recipe = run(tmp_path, "out", **overrides)
    config, tensors = assert_published_adapter_is_the_trained_model(recipe)
    assert check(config, tensors), (config, sorted(tensors)[:6])


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_pissa_and_olora_are_published_as_a_standard_lora_on_the_original_base(tmp_path, init):
    """They rewrite the base (W -> W - A0 B0); the published adapter is A B - A0 B0 (rank 2r,
    init_lora_weights true) and applies to the original weights."""
    recipe = run(tmp_path, "out", adapter="lora", peft_init_lora_weights=init)
    config, tensors = assert_published_adapter_is_the_trained_model(recipe)
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    assert all(t.shape[0 if "lora_A" in k else 1] == 8 for k, t in tensors.items())
    assert not (recipe.output_dir / "lorad_initial_adapter").exists()


def test_loftq_starts_closer_to_the_unquantized_base(tmp_path):
    """Before any step, LoftQ's LoRA corrects part of the NF4 error of each layer."""
    from lorad.trainer.config import config_from_dict
    from lorad.trainer.recipe import QLoRARecipe, quiet_libraries

    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    errors = {}
    for init in (True, "loftq"):
        cfg = config_from_dict({"base_model": str(tiny_base_dir()), "datasets": [{"path": str(data), "type": "alpaca"}],
                                "output_dir": str(tmp_path / str(init)), "lora_r": 16, "lora_alpha": 8, "bf16": False,
                                "peft_init_lora_weights": init, "lora_target_modules": ["q_proj"]})
        with torch_threads(1), quiet_libraries():
            recipe = QLoRARecipe(cfg, echo=lambda m: None)
            recipe._setup_run()
            recipe._setup_model()
        from safetensors.torch import load_file

        original = load_file(str(tiny_base_dir() / "model.safetensors"))
        err = 0.0
        for name, module in recipe.model.named_modules():  # the two q_proj layers
            if name.endswith("q_proj") and hasattr(module, "lora_A"):
                import bitsandbytes as bnb

                w = original[name.removeprefix("base_model.model.") + ".weight"]
                q = bnb.functional.dequantize_4bit(module.base_layer.weight.data, module.base_layer.weight.quant_state)
                with torch.no_grad():
                    delta = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
                err += float((w - q.float() - delta).norm() / (w - q.float()).norm())
        errors[init] = err / 2
        recipe.cleanup()
    assert errors[True] == pytest.approx(1.0)  # B = 0: the whole quantization error remains
    assert errors["loftq"] < 0.8, errors  # rank 16 of 64 removes a good part of it


def test_schedule_optimizer_and_attention_settings_reach_the_run(tmp_path):
    """transformers' scheduler and optimizer names, their arguments, and the attention kernel, as
    the run uses them (not only as the config accepts them)."""
    recipe = run(tmp_path, "out", max_steps=6, lr_scheduler="cosine_with_min_lr",
                 lr_scheduler_kwargs={"min_lr_rate": 0.5}, warmup_steps=1, optimizer="adamw_torch",
                 adam_beta1=0.5, adam_beta2=0.9, adam_epsilon=1e-6, max_grad_norm=0.3, attn_implementation="eager")
    group = recipe.trainer.optimizer.param_groups[0]
    assert group["betas"] == (0.5, 0.9) and group["eps"] == 1e-6
    rates = [h["learning_rate"] for h in recipe.trainer.state.log_history if "learning_rate" in h]
    # one warmup step from 0, then cosine down to the floor of half the peak
    assert rates[0] == 0 and rates[1] == pytest.approx(0.01) and min(rates[1:]) >= 0.005 - 1e-9
    assert rates[-1] < rates[2] < rates[1]
    grad_norms = [h["grad_norm"] for h in recipe.trainer.state.log_history if "grad_norm" in h]
    assert all(g > 0 for g in grad_norms)
    assert recipe.base.model.config._attn_implementation == "eager"
