"""Reading any PEFT adapter into deltas, writing PEFT adapters, and combining them (tiny Llama).

Oracles: PEFT's own get_delta_weight for what an adapter means, the weighted sum of deltas for
linear / svd / cat, the dense formulas of tests/test_deltas_math.py for the sparsifying methods
(here through whole adapters on disk), PEFT and lorad's server-side reader for what is written.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lorad.adapter_format import load_adapter
from lorad.deltas.adapter_io import read_adapter
from lorad.deltas.combine import CombineConfig, combine, write_combined
from lorad.deltas.methods import combine_dense
from lorad.errors import ConfigError, InvalidAdapterError
from lorad.testing import write_random_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_adapter(tiny_base, path, seed, **lora_kwargs):
    """An adapter made and saved by PEFT itself (random A and B)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(tiny_base.model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    try:
        model.save_pretrained(path)
    finally:
        model.unload()
    return path


def _peft_deltas(tiny_base, path) -> dict[str, torch.Tensor]:
    """module name -> PEFT's own get_delta_weight for the adapter at `path`."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_base.model, path)
    try:
        out = {}
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                out[name] = module.get_delta_weight("default").detach().clone()
        return out
    finally:
        model.unload()


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    """Three PEFT adapters with mixed ranks, rsLoRA, rank/alpha patterns and partial targets."""
    root = tmp_path_factory.mktemp("peft-adapters")
    return {
        "a": _peft_adapter(tiny_base, root / "a", 1, r=8, lora_alpha=16, target_modules=TARGETS),
        "b": _peft_adapter(tiny_base, root / "b", 2, r=4, lora_alpha=8, use_rslora=True,
                           target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 6},
                           alpha_pattern={"v_proj": 3}),
        "c": _peft_adapter(tiny_base, root / "c", 3, r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"]),
    }


def _weighted_sum(tiny_base, paths, weights) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for path, w in zip(paths, weights):
        for name, d in _peft_deltas(tiny_base, path).items():
            total[name] = total.get(name, 0) + w * d.double()
    return total


def _deltas_of(path) -> dict[str, torch.Tensor]:
    return {name: m.delta(torch.float64) for name, m in read_adapter(path).modules.items()}


def _rel(x, y) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


# ---- reading ------------------------------------------------------------------------------------


def test_read_adapter_gives_peft_deltas(tiny_base, adapters):
    for path in adapters.values():
        ours, peft = _deltas_of(path), _peft_deltas(tiny_base, path)
        assert set(ours) == set(peft)
        for name in ours:
            assert _rel(ours[name], peft[name]) < 1e-6, name


@pytest.mark.parametrize("edit, message", [
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "LoRA bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "not a LoRA adapter"),
    ({"r": 0}, "positive number"),
    ({"r": 4}, "says 4"),
])
def test_read_adapter_refuses_what_is_not_s_b_a(tiny_geometry, tmp_path, edit, message):
    path = write_random_adapter(tmp_path / "x", tiny_geometry, rank=8)
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(edit)
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidAdapterError, match=message):
        read_adapter(path)


def test_read_adapter_refuses_broken_files(tiny_geometry, tmp_path):
    with pytest.raises(InvalidAdapterError, match="no such adapter folder"):
        read_adapter(tmp_path / "missing")
    path = write_random_adapter(tmp_path / "nan", tiny_geometry, rank=4)
    tensors = load_file(path / "adapter_model.safetensors")
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(InvalidAdapterError, match="NaN"):
        read_adapter(path)
    path = write_random_adapter(tmp_path / "pickle", tiny_geometry, rank=4)
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(InvalidAdapterError, match="never unpickles"):
        read_adapter(path)


# ---- writing ------------------------------------------------------------------------------------


def test_write_peft_model_writes_what_peft_save_pretrained_writes(tiny_base, tmp_path):
    """The trainer's path: the same tensors and config as PEFT's own save, plus provenance."""
    from peft import LoraConfig, PeftConfig, get_peft_model

    from lorad.deltas.adapter_io import write_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_base.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                       init_lora_weights=False, rank_pattern={"down_proj": 2}))
    try:
        model.save_pretrained(tmp_path / "peft")
        write_peft_model(model, tmp_path / "ours", "tiny-llama", {"kind": "test"})
    finally:
        model.unload()
    theirs, ours = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(
        tmp_path / "ours" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    c_theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    c_ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert c_ours.pop("base_model_name_or_path") == "tiny-llama"
    c_theirs.pop("base_model_name_or_path")
    assert c_ours == {k: sorted(v) if isinstance(v, list) else v for k, v in c_theirs.items()}
    assert PeftConfig.from_pretrained(tmp_path / "ours").rank_pattern == {"down_proj": 2}
    assert json.loads((tmp_path / "ours" / "lorad_provenance.json").read_text()) == {"kind": "test"}


def test_write_adapter_refuses_non_finite_values_and_leaves_nothing(tmp_path):
    from lorad.deltas.adapter_io import lora_config, write_adapter

    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.tensor([[float("inf")]]),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(1, 1)}
    with pytest.raises(ValueError, match="NaN or Inf"):
        write_adapter(tmp_path / "bad", tensors, lora_config(rank=1, alpha=1, target_modules=["q_proj"]))
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


# ---- combining: the oracles ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "svd", "cat"])
def test_one_adapter_with_weight_one_is_itself(tiny_base, adapters, tmp_path, method):
    result = combine([read_adapter(adapters["b"])], [1.0], CombineConfig(method=method))
    out = write_combined(result, tmp_path / method)
    want = _peft_deltas(tiny_base, adapters["b"])
    got = _deltas_of(out)
    assert set(got) == set(want)
    for name in want:
        assert _rel(got[name], want[name]) < 2e-6, name  # float32 rounding
    assert result.overall_error < 1e-6


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_linear_and_cat_equal_the_weighted_sum_of_deltas(tiny_base, adapters, tmp_path, method):
    paths, weights = [adapters["a"], adapters["b"], adapters["c"]], [0.7, -1.5, 2.0]
    result = combine([read_adapter(p) for p in paths], weights, CombineConfig(method=method))
    out = write_combined(result, tmp_path / method)
    want = _weighted_sum(tiny_base, paths, weights)
    got = _deltas_of(out)
    assert set(got) == set(want)
    for name in want:
        assert _rel(got[name], want[name]) < 2e-6, name
    assert result.overall_error < 1e-6
    # mixed ranks: q_proj carries 8 + 4 + 2 = 14 directions, k_proj only a's 8
    ranks = {m.name: m.rank for m in result.modules}
    assert ranks["model.layers.0.self_attn.q_proj"] == 14 and ranks["model.layers.0.self_attn.k_proj"] == 8


def test_truncated_rank_reports_the_error_it_costs(tiny_base, adapters, tmp_path):
    paths, weights = [adapters["a"], adapters["b"]], [1.0, 1.0]
    result = combine([read_adapter(p) for p in paths], weights, CombineConfig(method="svd", rank=3))
    out = write_combined(result, tmp_path / "svd3")
    want, got = _weighted_sum(tiny_base, paths, weights), _deltas_of(out)
    for m in result.modules:
        residual = _rel(got[m.name], want[m.name])
        assert m.error == pytest.approx(residual, rel=1e-3, abs=1e-6), m.name
        u, s, vh = torch.linalg.svd(want[m.name])  # the best rank-3 approximation (Eckart-Young)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert _rel(got[m.name], best) < 1e-5, m.name
    assert 0.05 < result.overall_error < 1.0
    prov = json.loads((out / "lorad_provenance.json").read_text())
    assert prov["error"]["overall"] == pytest.approx(result.overall_error)
    assert prov["error"]["modules"]["model.layers.1.mlp.down_proj"]["error"] == pytest.approx(
        next(m.error for m in result.modules if m.name == "model.layers.1.mlp.down_proj"))


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_sparsifying_methods_equal_the_dense_formula_on_true_deltas(tiny_base, adapters, tmp_path, method):
    """At full rank (min(out, in)) the SVD keeps everything: the written adapter IS the dense result."""
    paths, weights = [adapters["a"], adapters["b"], adapters["c"]], [1.0, 0.5, -1.0]
    config = CombineConfig(method=method, rank=256, density=0.3, majority_sign_method="frequency", seed=11)
    result = combine([read_adapter(p) for p in paths], weights, config)
    got = _deltas_of(write_combined(result, tmp_path / method))
    per_adapter = [_peft_deltas(tiny_base, p) for p in paths]
    for name in got:
        shape = got[name].shape
        taus = [(w * d[name]).float() if name in d else torch.zeros(shape) for w, d in zip(weights, per_adapter)]
        want = combine_dense(method, taus, density=0.3, sign_method="frequency", seed=11, module=name)
        assert _rel(got[name], want) < 1e-5, name
    assert result.overall_error < 1e-6


def test_dare_is_reproducible_from_its_seed(adapters, tmp_path):
    inputs = [read_adapter(adapters["a"]), read_adapter(adapters["c"])]

    def run(seed, name):
        config = CombineConfig(method="dare_ties", density=0.5, seed=seed, rank=8)
        return (write_combined(combine(inputs, [1.0, 1.0], config), tmp_path / name) / "adapter_model.safetensors").read_bytes()

    assert run(3, "x") == run(3, "y")
    assert run(3, "x") != run(4, "z")


def test_combined_adapter_loads_in_peft_and_in_lorad_serve(tiny_base, tiny_geometry, adapters, tmp_path):
    """Mixed ranks become rank_pattern with one lora_alpha; PEFT and the server reader agree on it."""
    inputs = [read_adapter(adapters["a"]), read_adapter(adapters["c"])]
    result = combine(inputs, [1.0, 1.0], CombineConfig(method="linear"))
    out = write_combined(result, tmp_path / "both")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"] == {} and config["lora_alpha"] == config["r"]
    peft = _peft_deltas(tiny_base, out)
    ours = _deltas_of(out)
    assert set(peft) == set(ours)
    for name in ours:
        assert _rel(peft[name], ours[name]) < 1e-6, name
    served = load_adapter(out, "both", tiny_geometry, max_rank=64)  # the server's validator
    assert served.spec.modules[(0, "q_proj")].rank == 10 and served.spec.modules[(0, "k_proj")].rank == 8


def test_provenance_lists_inputs_weights_method_and_error(adapters, tmp_path):
    inputs = [read_adapter(adapters["a"]), read_adapter(adapters["b"])]
    result = combine(inputs, [1.0, -0.25], CombineConfig(method="ties", density=0.4, rank=4))
    prov = json.loads((write_combined(result, tmp_path / "t") / "lorad_provenance.json").read_text())
    assert prov["kind"] == "combine"
    assert prov["combine"] == {"method": "ties", "rank": 4, "density": 0.4, "majority_sign_method": "total"}
    assert [i["weight"] for i in prov["inputs"]] == [1.0, -0.25]
    assert prov["inputs"][0]["path"] == str(adapters["a"]) and prov["inputs"][0]["weights_sha256"].startswith("sha256:")
    assert prov["error"]["overall"] > 0.01 and len(prov["error"]["modules"]) == len(result.modules)


def test_incompatible_inputs_are_refused(tiny_geometry, tmp_path):
    from lorad.geometry import ModelGeometry

    other = ModelGeometry(2, 32, 128, 4, 2, 8, 1000, 512)
    a = read_adapter(write_random_adapter(tmp_path / "a", tiny_geometry, rank=4))
    b = read_adapter(write_random_adapter(tmp_path / "b", other, rank=4))
    with pytest.raises(InvalidAdapterError, match="different bases"):
        combine([a, b], [1.0, 1.0], CombineConfig())
    with pytest.raises(ConfigError, match="rank: cat keeps"):
        CombineConfig(method="cat", rank=4)
    with pytest.raises(ConfigError, match="density"):
        CombineConfig(method="ties", density=0.0)
    with pytest.raises(ConfigError, match="all weights are 0"):
        combine([a], [0.0], CombineConfig())


# ---- the command --------------------------------------------------------------------------------


def _cli(args):
    from lorad.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_combine_command_writes_and_reports(adapters, tmp_path):
    out = tmp_path / "cli"
    r = _cli(["combine", "--method", "svd", "--rank", "2", "--out", str(out), str(adapters["a"]),
              f"{adapters['c']}:-0.5"])
    assert r.exit_code == 0, r.output
    assert "q_proj" in r.output and "overall relative error" in r.output and "note: rank 2" in r.output
    assert read_adapter(out).ranks == {2}
    r = _cli(["combine", "--method", "linear", "--out", str(out), str(adapters["a"])])
    assert r.exit_code == 1 and "pass --force" in r.output


@pytest.mark.parametrize("args, message", [
    (["--method", "linear", "{missing}"], "no such adapter folder"),
    (["--method", "linear", "{a}:heavy"], "must be a number"),
    (["--method", "cat", "--rank", "4", "{a}"], "cat keeps every input"),
    (["--method", "ties", "--density", "1.5", "{a}"], "density"),
])
def test_combine_command_refuses_bad_input(adapters, tmp_path, args, message):
    args = [a.format(missing=tmp_path / "nope", a=adapters["a"]) for a in args]
    r = _cli(["combine", "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 1 and message in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_combine_help_explains_every_method_with_an_example():
    r = _cli(["combine", "--help"])
    for method in ("linear", "svd", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        assert f"--method {method}" in r.output
    for knob in ("--rank", "--density", "--majority-sign", "--seed"):
        assert knob in r.output


@pytest.mark.slow
def test_combined_adapter_served_by_lorad_answers_like_peft(smollm_base_fp32, tmp_path):
    """The real SmolLM2 in float32: two PEFT adapters (rank 8 on attention, rank 16 rsLoRA on every
    projection) combined with linear, weights 1 and -0.5 (ranks 24 and 16, so rank_pattern and a
    folded scale are in play), served by lorad's engine and by PEFT: the same greedy tokens."""
    from peft import PeftModel

    from lorad.deltas.verify import encode_prompts
    from lorad.server.offline_reference import engine_reference

    base = smollm_base_fp32
    first = _peft_adapter(base, tmp_path / "attn", 11, r=8, lora_alpha=16,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    second = _peft_adapter(base, tmp_path / "all", 12, r=16, lora_alpha=8, use_rslora=True, target_modules=TARGETS)
    for path, scale in ((first, 0.3), (second, 0.15)):  # PEFT's random B is large; keep the text fluent
        tensors = load_file(path / "adapter_model.safetensors")
        save_file({k: v * scale if "lora_B" in k else v for k, v in tensors.items()},
                  path / "adapter_model.safetensors")
    result = combine([read_adapter(first), read_adapter(second)], [1.0, -0.5], CombineConfig(method="linear"))
    out = write_combined(result, tmp_path / "combined")
    assert {m.rank for m in result.modules} == {24, 16} and result.overall_error < 1e-6

    prompts = encode_prompts(base.tokenizer)
    served = engine_reference(base, out, prompts, 16)
    base_only = engine_reference(base, None, prompts, 16)
    assert sum(s.tokens != b.tokens for s, b in zip(served, base_only)) >= 4  # the adapter matters

    model = PeftModel.from_pretrained(base.model, out)
    try:
        eos = base.tokenizer.eos_token_id
        for ids, s in zip(prompts, served):
            with torch.no_grad():
                gen = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=eos,
                                     pad_token_id=base.tokenizer.pad_token_id)[0, len(ids):].tolist()
            want = s.tokens + ([eos] if s.stop_ids else [])
            assert gen[: len(want)] == want, (gen, want)
    finally:
        model.unload()
