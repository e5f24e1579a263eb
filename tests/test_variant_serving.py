"""Adapter variants `lorad train` makes, served: PEFT's `bias` ("all", "lora_only") on a Llama base
is a plain LoRA (Llama projections have no biases to train), so the server accepts it and
serves exactly what PEFT computes. PEFT's `lora_bias` (a bias on lora_B: y = base(x) + scaling *
(B @ A @ x + bias)) is served through a per-slot bias table, in mixed batches with plain
adapters and base-only rows. DoRA and rsLoRA are in tests/test_oracle.py and
tests/test_dora_serving.py; modules_to_save in tests/test_saved_module_serving.py."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lorad.adapter_format import load_adapter
from lorad.errors import InvalidAdapterError
from variant_helpers import edit_adapter, engine_greedy_tokens, greedy, prefill_last_logits, runner_with_adapters


def _peft_adapter(model, path, targets=("q_proj", "down_proj"), seed=0, **extra):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():  # lora_bias on a bias-free Linear: PEFT warns that it cannot merge,
        warnings.simplefilter("ignore")
        peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                               target_modules=list(targets), **extra))
        peft.save_pretrained(path)  # and warns that a 1-D lora_B bias may be an unsharded ZeRO-3 save
    return peft


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_adapter_on_llama_is_served_as_peft_computes_it(tiny_base, tiny_geometry, tmp_path, bias):
    from test_dora_serving import runner_for

    from lorad.kernels import build_lora_meta
    from lorad.server.model_runner import SeqChunk, StepBatch

    peft = _peft_adapter(tiny_base.model, tmp_path / "a", bias=bias)
    adapter = load_adapter(tmp_path / "a", "a", tiny_geometry, max_rank=8)
    assert set(adapter.weights) == {(layer, p) for layer in (0, 1) for p in ("q_proj", "down_proj")}
    runner, pool = runner_for(tiny_base.model, tiny_geometry)
    slot = pool.acquire_load(adapter)
    ids = torch.tensor([5, 17, 99, 3, 42, 7])
    T = len(ids)
    batch = StepBatch(
        input_ids=ids, positions=torch.arange(T), rows=torch.zeros(T, dtype=torch.int64),
        chunks=[SeqChunk(row=0, start=0, length=T, offset=0)],
        lora_meta=build_lora_meta(torch.full((T,), slot, dtype=torch.int64), pool.num_slots),
        active_slots_mask=1 << slot, lora_rank=4, logits_index=torch.tensor([T - 1]), n_rows=1)
    got = runner.forward(batch)[0]  # [V]
    with torch.no_grad():
        expected = peft(ids[None]).logits[0, -1].float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# --- lora_bias ----------------------------------------------------------------------------------

BIAS_TARGETS = ("q_proj", "v_proj", "down_proj")  # overlaps the plain adapter's q_proj/down_proj, adds v_proj
PROMPTS = [[5, 17, 99, 3, 42], [7, 8, 250, 11, 64, 2], [33, 1, 90, 12], [61, 4, 4, 300, 18]]


@pytest.fixture(scope="module")
def bias_adapters(tiny_base, tmp_path_factory):
    """Two PEFT adapters saved in one adapters folder: 'plain' and 'lbias' (lora_bias=true, its
    biases PEFT's nonzero nn.Linear init), with the PEFT models that serve each alone."""
    root = tmp_path_factory.mktemp("bias-adapters")
    plain = _peft_adapter(tiny_base.model, root / "plain").eval()
    lbias = _peft_adapter(tiny_base.model, root / "lbias", targets=BIAS_TARGETS, seed=1, lora_bias=True).eval()
    return root, {"plain": plain, "lbias": lbias}


def _peft_lora_b_biases(peft) -> dict:
    return {(int(name.split(".layers.")[1].split(".")[0]), name.split(".")[-1]): m.lora_B["default"].bias.detach()
            for name, m in peft.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B}


def test_peft_adds_the_lora_bias_inside_the_scaling(bias_adapters):
    """The formula the server implements, read off PEFT itself: scaling multiplies the bias too."""
    q = bias_adapters[1]["lbias"].base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, q.in_features, generator=torch.Generator().manual_seed(0))
    a, b, bias, s = q.lora_A["default"].weight, q.lora_B["default"].weight, q.lora_B["default"].bias, q.scaling["default"]
    assert s != 1 and bias.abs().max() > 0.1
    with torch.no_grad():
        torch.testing.assert_close(q(x), q.base_layer(x) + s * (x @ a.t() @ b.t() + bias), rtol=1e-5, atol=1e-6)
        assert (q(x) - (q.base_layer(x) + s * (x @ a.t() @ b.t()) + bias)).abs().max() > 0.01


def test_lora_bias_adapter_is_read_with_its_biases(bias_adapters, tiny_geometry):
    root, peft = bias_adapters
    adapter = load_adapter(root / "lbias", "lbias", tiny_geometry, max_rank=8)
    assert adapter.spec.lora_bias and set(adapter.biases) == set(adapter.weights)
    expected = _peft_lora_b_biases(peft["lbias"])
    assert set(expected) == {(layer, p) for layer in (0, 1) for p in BIAS_TARGETS}
    for key, bias in expected.items():
        assert torch.equal(adapter.biases[key], bias)
    plain = load_adapter(root / "plain", "plain", tiny_geometry, max_rank=8)
    assert not plain.spec.lora_bias and plain.biases == {}
    assert adapter.nbytes == sum(t.numel() * 4 for pair in adapter.weights.values() for t in pair) + sum(
        b.numel() * 4 for b in expected.values())


_BIAS_NAME = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.bias"


@pytest.mark.parametrize("case, config, tensors, message", [
    ("missing", None, lambda w: w.pop(_BIAS_NAME), "lora_bias=true needs a lora_B bias for layers.1.v_proj"),
    ("undeclared", {"lora_bias": False}, None, "layers.0.down_proj has a lora_B bias but adapter_config.json does not set lora_bias"),
    ("shape", None, lambda w: w.__setitem__(_BIAS_NAME, torch.zeros(3)), r"lora_B bias of shape \[3\]"),
    ("nan", None, lambda w: w[_BIAS_NAME].__setitem__(0, float("nan")), "NaN or Inf"),
    ("inf-bf16", None, lambda w: w.__setitem__(_BIAS_NAME, torch.full_like(w[_BIAS_NAME], float("inf")).bfloat16()),
     "NaN or Inf"),
    ("int", None, lambda w: w.__setitem__(_BIAS_NAME, torch.zeros(w[_BIAS_NAME].shape, dtype=torch.int32)),
     "not a float type"),
    ("not-bool", {"lora_bias": "yes"}, None, "lora_bias='yes' must be true or false"),
    ("with-dora", {"use_dora": True}, None, "lora_bias=true with use_dora=true"),
])
def test_broken_lora_bias_adapters_are_refused_naming_the_problem(bias_adapters, tiny_geometry, tmp_path, case, config,
                                                                   tensors, message):
    root, _ = bias_adapters
    edit_adapter(root / "lbias", tmp_path / case, config, tensors)
    with pytest.raises(InvalidAdapterError, match=message):
        load_adapter(tmp_path / case, case, tiny_geometry, max_rank=8)


def test_bias_table_is_made_on_first_use_and_zeroed_on_eviction(bias_adapters, tiny_base, tiny_geometry):
    from test_dora_serving import runner_for

    root, peft = bias_adapters
    _, pool = runner_for(tiny_base.model, tiny_geometry)
    plain = pool.acquire_load(load_adapter(root / "plain", "plain", tiny_geometry, max_rank=8))
    assert all(m.bias is None and m.bias_mask == 0 for layer in pool.layers for m in layer.values())
    nbytes = pool.nbytes
    slot = pool.acquire_load(load_adapter(root / "lbias", "lbias", tiny_geometry, max_rank=8))
    assert slot != plain
    for (layer, proj), bias in _peft_lora_b_biases(peft["lbias"]).items():
        m = pool.layers[layer][proj]
        assert m.bias_mask == 1 << slot
        torch.testing.assert_close(m.bias[slot], bias * m.scale[slot], rtol=0, atol=0)
        assert torch.equal(m.bias[plain], torch.zeros_like(m.bias[plain]))
    assert pool.layers[0]["k_proj"].bias is None  # no table for a module no lora_bias adapter touched
    assert pool.nbytes == nbytes + 4 * sum(pool.num_slots * w for w in (64, 32, 64)) * 2  # q, v, down of 2 layers
    pool.release(slot)
    assert pool.evict("lbias")
    for layer in pool.layers:
        for proj in BIAS_TARGETS:
            assert layer[proj].bias_mask == 0 and torch.equal(layer[proj].bias, torch.zeros_like(layer[proj].bias))


def _mixed_runner(tiny_base, tiny_geometry, root):
    # two slots: lbias lands in the last one, which a base token's -1 would index if it were used as a slot
    return runner_with_adapters(tiny_base.model, tiny_geometry, root, ("plain", "lbias"), rows=len(PROMPTS))


def _prefill(runner, pool, token_slots_per_row):
    return prefill_last_logits(runner, pool, PROMPTS, token_slots_per_row)


def test_lora_bias_rows_in_a_mixed_batch_match_peft_alone_and_leave_the_others_alone(bias_adapters, tiny_base,
                                                                                      tiny_geometry):
    root, peft = bias_adapters
    runner, pool, slots = _mixed_runner(tiny_base, tiny_geometry, root)
    rows = ["lbias", "plain", None, "lbias"]  # adapter of each prompt
    got = _prefill(runner, pool, [slots[a] if a else -1 for a in rows])  # [4, V]
    with torch.no_grad():
        expected = [(peft[a] if a else tiny_base.model)(torch.tensor([ids])).logits[0, -1].float()
                    for ids, a in zip(PROMPTS, rows)]
        no_bias = copy.deepcopy(peft["lbias"])
        for m in no_bias.modules():
            if hasattr(m, "lora_B") and "default" in m.lora_B:
                m.lora_B["default"].bias.zero_()
        without = no_bias(torch.tensor([PROMPTS[0]])).logits[0, -1].float()
    assert (expected[0] - without).abs().max() > 0.05  # the bias matters: parity cannot pass without it
    assert (expected[1] - expected[2]).abs().max() > 0.05  # and so does the plain adapter
    for i in range(len(rows)):
        torch.testing.assert_close(got[i], expected[i], rtol=1e-4, atol=1e-4)

    # the same batch with the lora_bias rows made base-only: plain and base rows bit-identical
    alone = _prefill(runner, pool, [-1, slots["plain"], -1, -1])
    assert torch.equal(got[1], alone[1]) and torch.equal(got[2], alone[2])
    # an evicted lora_bias slot leaves nothing behind: its rows now compute the plain base
    pool.release(slots["lbias"])
    assert pool.evict("lbias")
    base_rows = _prefill(runner, pool, [-1, slots["plain"], -1, -1])
    torch.testing.assert_close(base_rows, alone, rtol=0, atol=0)


def test_engine_serves_lora_bias_greedy_tokens_as_peft_does(bias_adapters, tiny_base):
    root, peft = bias_adapters
    rows = [None, "lbias", "plain", "lbias"]
    got = engine_greedy_tokens(tiny_base, root, PROMPTS, rows, new_tokens=8)
    expected = [greedy(peft[a] if a else tiny_base.model, ids, 8) for ids, a in zip(PROMPTS, rows)]
    assert expected[1] != greedy(tiny_base.model, PROMPTS[1], 8)  # the lora_bias adapter changes what is generated
    assert got == expected
