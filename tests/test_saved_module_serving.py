"""modules_to_save adapters, served: PEFT saves a whole trained copy of the embedding table
and/or the output head beside the LoRA matrices, and lorad serve swaps the copy in for that
adapter's tokens only, in the same batches as plain adapters and base-only rows
(lorad.server.model_runner.replace_saved_rows). Checked against PEFT itself, for adapters
PEFT makes and for one `lorad train` makes; copies of other modules are refused with a reason."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lorad.adapter_format import load_adapter
from lorad.errors import InvalidAdapterError
from variant_helpers import edit_adapter, engine_greedy_tokens, greedy, prefill_last_logits, runner_with_adapters

PROMPTS = [[5, 17, 99, 3, 42], [7, 8, 250, 11, 64, 2], [33, 1, 90, 12], [61, 4, 4, 300, 18]]


def _peft_adapter(model, path, modules_to_save, seed, **extra):
    """A PEFT adapter (LoRA on q_proj and down_proj) whose saved copies are moved away from the
    base's weights, as training would, so that serving the base's instead cannot pass."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():  # PEFT warns about tied embeddings and saving the embedding layer
        warnings.simplefilter("ignore")
        peft = get_peft_model(copy.deepcopy(model), LoraConfig(
            r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "down_proj"],
            modules_to_save=modules_to_save, **extra))
        with torch.no_grad():
            for name, module in peft.named_modules():
                if name.endswith("modules_to_save.default"):
                    module.weight.add_(torch.randn_like(module.weight) * 3 * module.weight.std())
        peft.save_pretrained(path)
    return peft.eval()


@pytest.fixture(scope="module")
def saved_adapters(tiny_base, tmp_path_factory):
    """One adapters folder: 'head' (a trained lm_head), 'embed' (trained embed_tokens), 'tied'
    (PEFT's ensure_weight_tying: one trained copy for both, saved twice) and 'plain', with the
    PEFT model that serves each alone."""
    root = tmp_path_factory.mktemp("saved-modules")
    model = tiny_base.model
    return root, {
        "head": _peft_adapter(model, root / "head", ["lm_head"], seed=1),
        "embed": _peft_adapter(model, root / "embed", ["embed_tokens"], seed=2),
        "tied": _peft_adapter(model, root / "tied", ["embed_tokens"], seed=3, ensure_weight_tying=True),
        "plain": _peft_adapter(model, root / "plain", None, seed=4),
    }


def test_saved_copies_are_read_with_the_adapter(saved_adapters, tiny_geometry):
    root, peft = saved_adapters
    expected_modules = {"head": ("lm_head",), "embed": ("embed_tokens",), "tied": ("embed_tokens", "lm_head"),
                        "plain": ()}
    for name, modules in expected_modules.items():
        adapter = load_adapter(root / name, name, tiny_geometry, max_rank=8)
        assert adapter.spec.saved_modules == modules and set(adapter.saved_modules) == set(modules)
        inner = peft[name].base_model.model
        for module in modules:
            wrapper = inner.lm_head if module == "lm_head" else inner.model.embed_tokens
            assert torch.equal(adapter.saved_modules[module], wrapper.modules_to_save["default"].weight)
        lora_bytes = sum(t.numel() * 4 for pair in adapter.weights.values() for t in pair)
        copies = 1 if modules else 0  # the tied adapter's two copies are one tensor
        assert adapter.nbytes == lora_bytes + copies * tiny_geometry.vocab_size * tiny_geometry.hidden_size * 4
    tied = load_adapter(root / "tied", "tied", tiny_geometry, max_rank=8).saved_modules
    assert tied["lm_head"] is tied["embed_tokens"]


def _mixed_runner(tiny_base, tiny_geometry, root, adapters):
    return runner_with_adapters(tiny_base.model, tiny_geometry, root, adapters, rows=len(PROMPTS))


def _prefill(runner, pool, token_slots_per_row):
    return prefill_last_logits(runner, pool, PROMPTS, token_slots_per_row)


def _without_copies(peft):
    """The PEFT model with its saved copies reset to the base's modules (the LoRA kept)."""
    inner = copy.deepcopy(peft).base_model.model
    for wrapper in (inner.lm_head, inner.model.embed_tokens):
        if hasattr(wrapper, "modules_to_save"):
            wrapper.modules_to_save["default"].weight.data.copy_(wrapper.original_module.weight)
    return inner


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("rows", [["head", "plain", None, "embed"], ["tied", "head", "embed", None]])
def test_saved_module_rows_in_a_mixed_batch_match_peft_alone(saved_adapters, tiny_base, tiny_geometry, rows):
    root, peft = saved_adapters
    runner, pool, slots = _mixed_runner(tiny_base, tiny_geometry, root, ("head", "embed", "tied", "plain"))
    got = _prefill(runner, pool, [slots[a] if a else -1 for a in rows])  # [4, V]
    expected = [_logits(peft[a] if a else tiny_base.model, ids) for ids, a in zip(PROMPTS, rows)]
    for i, a in enumerate(rows):
        if a in ("head", "embed", "tied"):  # the copy matters: serving the base's module instead cannot pass
            assert (_logits(_without_copies(peft[a]), PROMPTS[i]) - expected[i]).abs().max() > 0.1
        torch.testing.assert_close(got[i], expected[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("leave", ["evict", "retire-in-use"])
def test_saved_copies_leave_the_device_with_their_slot(saved_adapters, tiny_base, tiny_geometry, leave):
    """Unloaded (evict), or replaced on disk while a request still runs on it (retire, then the
    last release): the copies are freed, and a plain adapter written into the slot next is
    served exactly, with nothing of the copies left."""
    root, peft = saved_adapters
    runner, pool, slots = _mixed_runner(tiny_base, tiny_geometry, root, ("tied",))
    slot = slots["tied"]
    copy_bytes = tiny_geometry.vocab_size * tiny_geometry.hidden_size * 4
    assert pool.saved_nbytes == copy_bytes and pool.nbytes == pool.tables_nbytes + copy_bytes  # tied: held once
    assert pool.saved_mask == {"embed_tokens": 1 << slot, "lm_head": 1 << slot}
    assert pool.saved["lm_head"][slot] is pool.saved["embed_tokens"][slot]
    if leave == "evict":
        pool.release(slot)
        assert pool.evict("tied")
    else:
        pool.retire("tied")  # in use: it keeps its weights for the running request
        assert pool.saved_nbytes == copy_bytes
        pool.release(slot)
    assert pool.saved_nbytes == 0 and pool.saved_mask == {"embed_tokens": 0, "lm_head": 0}
    assert pool.saved["lm_head"] == [None]
    assert pool.acquire_load(load_adapter(root / "plain", "plain", tiny_geometry, max_rank=8)) == slot
    got = _prefill(runner, pool, [slot, -1, slot, -1])
    for i, model in enumerate([peft["plain"], tiny_base.model, peft["plain"], tiny_base.model]):
        torch.testing.assert_close(got[i], _logits(model, PROMPTS[i]), rtol=1e-4, atol=1e-4)


def _pool(geometry, copies: float, num_slots: int = 4):
    from lorad.server.lora_slots import LoRASlotPool

    budget = int(copies * geometry.vocab_size * geometry.hidden_size * 4)
    return LoRASlotPool(geometry, num_slots, 8, torch.float32, torch.device("cpu"), saved_budget=budget)


def test_saved_copies_stay_within_the_budget_evicting_idle_ones_least_recently_used_first(saved_adapters,
                                                                                          tiny_geometry):
    root, _ = saved_adapters
    load = {a: load_adapter(root / a, a, tiny_geometry, max_rank=8) for a in ("head", "embed", "tied", "plain")}
    copy_bytes = tiny_geometry.vocab_size * tiny_geometry.hidden_size * 4
    pool = _pool(tiny_geometry, copies=2, num_slots=3)
    head, embed, plain = (pool.acquire_load(load[a]) for a in ("head", "embed", "plain"))
    assert pool.saved_nbytes == 2 * copy_bytes
    for slot in (plain, head, embed):  # released in this order: plain is the LRU slot, head the LRU copy
        pool.release(slot)
    tied = pool.acquire_load(load["tied"])  # one copy more than the budget: head's goes, LRU among the copies
    assert tied == head and pool.saved_nbytes == 2 * copy_bytes  # into the slot it emptied, not plain's
    assert pool.lookup("head") is None and pool.lookup("embed") == embed and pool.lookup("plain") == plain
    assert pool.saved_mask == {"embed_tokens": (1 << embed) | (1 << tied), "lm_head": 1 << tied}


def test_a_saved_copy_waits_while_running_requests_hold_the_budget(saved_adapters, tiny_geometry):
    root, _ = saved_adapters
    load = {a: load_adapter(root / a, a, tiny_geometry, max_rank=8) for a in ("head", "embed", "tied", "plain")}
    pool = _pool(tiny_geometry, copies=2)
    head, embed = pool.acquire_load(load["head"]), pool.acquire_load(load["embed"])  # both in use
    assert pool.acquire_load(load["tied"]) is None  # a free slot, but no room: wait, evicting nothing
    assert pool.lookup("head") == head and pool.lookup("embed") == embed
    assert pool.acquire_load(load["plain"]) is not None  # adapters without copies are not held back
    pool.release(embed)
    tied = pool.acquire_load(load["tied"])
    assert tied is not None and pool.lookup("embed") is None and pool.lookup("head") == head


@pytest.mark.parametrize("copies", [0, 0.5])
def test_an_adapter_whose_copies_exceed_the_whole_budget_is_refused(saved_adapters, tiny_geometry, copies):
    from lorad.errors import AdapterDoesNotFitError

    root, _ = saved_adapters
    pool = _pool(tiny_geometry, copies=copies)
    with pytest.raises(AdapterDoesNotFitError, match="replaces lm_head: 12 MiB of whole weights on the device, more "
                                                 "than --saved-modules-memory"):
        pool.acquire_load(load_adapter(root / "head", "head", tiny_geometry, max_rank=8))
    assert pool.slots_used == 0 and pool.saved_nbytes == 0
    assert pool.acquire_load(load_adapter(root / "plain", "plain", tiny_geometry, max_rank=8)) is not None


def test_copies_of_pinned_adapters_never_leave_so_no_room_beside_them_is_refused(saved_adapters, tiny_geometry):
    from lorad.errors import AdapterDoesNotFitError

    root, _ = saved_adapters
    load = {a: load_adapter(root / a, a, tiny_geometry, max_rank=8) for a in ("head", "embed", "tied")}
    pool = _pool(tiny_geometry, copies=2)
    head, embed = pool.acquire_load(load["head"]), pool.acquire_load(load["embed"])
    assert pool.acquire_load(load["tied"]) is None and pool.waits_for_saved  # running requests: wait
    with pytest.raises(AdapterDoesNotFitError, match=r"pinned adapters \('embed', 'head'\) hold 24 MiB of "
                                                     r"--saved-modules-memory \(24 MiB\); unpin one"):
        pool.acquire_load(load["tied"], pinned=frozenset({head, embed}))
    assert pool.acquire_load(load["tied"], pinned=frozenset({head})) is None  # embed's copy will leave


def test_engine_serves_saved_module_adapters_greedy_tokens_as_peft_does(saved_adapters, tiny_base):
    root, peft = saved_adapters
    rows = ["head", "embed", None, "plain"]
    got = engine_greedy_tokens(tiny_base, root, PROMPTS, rows, new_tokens=8)
    expected = [greedy(peft[a] if a else tiny_base.model, ids, 8) for ids, a in zip(PROMPTS, rows)]
    for i in (0, 1):  # the trained head and embeddings change what is generated
        assert expected[i] != greedy(_without_copies(peft[rows[i]]), PROMPTS[i], 8)
    assert got == expected


_HEAD = "base_model.model.lm_head.weight"


@pytest.mark.parametrize("source, config, tensors, message", [
    ("head", {"modules_to_save": ["norm"]}, None, "modules_to_save names 'norm': .* lorad serve swaps only "
                                                  "embed_tokens and lm_head"),
    ("head", {"modules_to_save": ["lm_head", "embed_tokens"]}, None,
     "modules_to_save lists embed_tokens but the file has no trained copy"),
    ("head", {"modules_to_save": None}, None, "trained copy of lm_head, but adapter_config.json does not list it"),
    ("head", {"modules_to_save": "lm_head"}, None, "must be null or a list"),
    ("head", None, lambda w: w.__setitem__(_HEAD, torch.zeros(w[_HEAD].shape[0] + 8, w[_HEAD].shape[1])),
     r"has shape \[49160, 64\]; the base needs \[49152, 64\].*added tokens"),
    ("head", None, lambda w: w[_HEAD].__setitem__((0, 0), float("inf")), "NaN or Inf"),
    ("plain", None, lambda w: w.__setitem__("base_model.model.model.norm.weight", torch.ones(64)), "does not map"),
    ("head", {"modules_to_save": ["proj"]}, None, "names 'proj': PEFT replaces every module whose name ends with it"),
    ("tied", None, lambda w: w[_HEAD].__setitem__((0, 0), 1.0), "ensure_weight_tying=true but its trained embed_tokens "
                                                               "and lm_head differ"),
    ("head", None, lambda w: w.__setitem__(_HEAD, torch.full(w[_HEAD].shape, 1e300, dtype=torch.float64)),
     "beyond float32's range"),
])
def test_unservable_saved_modules_are_refused_naming_the_problem(saved_adapters, tiny_geometry, tmp_path, source,
                                                                  config, tensors, message):
    root, _ = saved_adapters
    edit_adapter(root / source, tmp_path / "x", config, tensors)
    with pytest.raises(InvalidAdapterError, match=message):
        load_adapter(tmp_path / "x", "x", tiny_geometry, max_rank=8)


@pytest.mark.parametrize("entry, module", [("head", "lm_head"), ("m_head", "lm_head"), ("tokens", "embed_tokens"),
                                           ("model.embed_tokens", "embed_tokens")])
def test_entries_name_modules_by_peft_suffix_rule(saved_adapters, tiny_geometry, tmp_path, entry, module):
    """PEFT replaces every module whose name ends with the entry (peft.utils.other._set_trainable)."""
    root, _ = saved_adapters
    source = "head" if module == "lm_head" else "embed"
    edit_adapter(root / source, tmp_path / "x", {"modules_to_save": [entry]})
    assert load_adapter(tmp_path / "x", "x", tiny_geometry, max_rank=8).spec.saved_modules == (module,)


def test_a_trained_modules_to_save_adapter_is_served_as_peft_loads_it(tmp_path):
    """`lorad train` with lora_modules_to_save: [lm_head] (on the unquantized base, so the check
    is exact): the adapter it publishes, loaded by the server's reader and run by the engine's
    forward, gives the logits PEFT gives with it."""
    from peft import PeftModel
    from test_trainer_variants import run
    from trainer_helpers import tiny_base_dir
    from transformers import AutoModelForCausalLM

    from lorad.geometry import ModelGeometry

    recipe = run(tmp_path, "out", adapter="lora", lora_modules_to_save=["lm_head"], learning_rate=0.05)
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir(), dtype=torch.float32).eval()
    geometry = ModelGeometry.from_hf_config(base.config)
    out = recipe.output_dir
    runner, pool, slots = runner_with_adapters(base, geometry, out.parent, (out.name,), rows=len(PROMPTS), num_slots=2,
                                               max_rank=16)
    slot = slots[out.name]
    assert pool.saved_mask["lm_head"] == 1 << slot and pool.saved_mask["embed_tokens"] == 0
    got = _prefill(runner, pool, [slot, -1, slot, -1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(copy.deepcopy(base), str(recipe.output_dir)).eval()
    head = peft.base_model.model.lm_head
    assert (head.modules_to_save["default"].weight - head.original_module.weight).abs().max() > 1e-3  # it trained
    for i, model in enumerate([peft, base, peft, base]):
        torch.testing.assert_close(got[i], _logits(model, PROMPTS[i]), rtol=1e-4, atol=1e-4)


def test_a_real_server_lists_and_serves_saved_module_adapters(saved_adapters, tiny_base):
    """Over gRPC on 127.0.0.1:0: the listing names what each adapter replaces, and a request
    on the adapter with a trained head generates PEFT's greedy tokens."""
    from click.testing import CliRunner
    from serving_helpers import server_config

    from lorad.cli import main
    from lorad.clients import Client
    from lorad.testing import ServerThread

    root, peft = saved_adapters
    server = ServerThread(server_config(root), tiny_base)
    server.wait_started()
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=60) as client:
            listing = {a.id: a for a in client.list_adapters().adapters}
            assert {a: listing[a].saved_modules for a in ("head", "embed", "tied", "plain")} == {
                "head": ["lm_head"], "embed": ["embed_tokens"], "tied": ["embed_tokens", "lm_head"], "plain": []}
            assert all(not listing[a].error for a in listing)
            got = client.generate("The capital of France is", adapter_id="head", max_new_tokens=6)
        target = f"127.0.0.1:{server.port}"
        shown = CliRunner().invoke(main, ["adapters", "show", "tied", "--target", target])
        listed = CliRunner().invoke(main, ["adapters", "list", "--target", target])
    finally:
        server.stop()
    ids = tiny_base.tokenizer("The capital of France is")["input_ids"]
    assert got.prompt_tokens == len(ids) and got.finish_reason == "length"
    assert got.token_ids == greedy(peft["head"], ids, 6) != greedy(_without_copies(peft["head"]), ids, 6)
    assert shown.exit_code == 0 and "replaces (modules_to_save)" in shown.output
    assert "embed_tokens, lm_head" in shown.output.split("replaces (modules_to_save)")[1].splitlines()[0]
    head_line = next(line for line in listed.output.splitlines() if line.startswith("head "))
    assert head_line.endswith("q_proj,down_proj,lm_head (saved)"), head_line


def test_a_server_refuses_saved_copies_beyond_its_budget_and_serves_on(saved_adapters, tiny_base):
    """--saved-modules-memory below one copy: a request on a modules_to_save adapter, and a Load
    of it, get FAILED_PRECONDITION naming the flag; plain adapters and the base serve on."""
    import grpc
    from serving_helpers import server_config

    from lorad.clients import Client, LoradRPCError
    from lorad.testing import ServerThread

    root, _ = saved_adapters
    with ServerThread(server_config(root, saved_modules_memory="1MiB"), tiny_base) as server:
        with Client(f"127.0.0.1:{server.port}", timeout=60) as client:
            for call in (lambda: client.generate("Hi", adapter_id="head", max_new_tokens=2),
                         lambda: client.load_adapter("tied")):
                with pytest.raises(LoradRPCError) as info:
                    call()
                assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION  # retrying cannot help
                assert "more than --saved-modules-memory (1 MiB) holds; raise it" in info.value.details
            assert client.generate("Hi", adapter_id="plain", max_new_tokens=2).completion_tokens in (1, 2)
            assert client.generate("Hi", max_new_tokens=2).completion_tokens in (1, 2)


def test_a_request_waiting_for_copy_room_holds_back_only_adapters_with_copies(saved_adapters, tiny_base):
    """Room for one copy, 'head' running: a request on 'embed' waits for the room, while a later
    one on 'plain' (no copies) is admitted and finishes first; 'embed' runs once 'head' is done."""
    import threading
    import time

    from serving_helpers import make_engine

    from lorad.server.sampling import SamplingParams
    from lorad.testing import pace_steps

    root, _ = saved_adapters
    engine = make_engine(tiny_base, root, saved_modules_memory=tiny_base.model.lm_head.weight.numel() * 4)
    try:
        pace_steps(engine, 0.01)
        order, started = [], threading.Event()

        def sink(name):
            def on_event(event):
                if event.kind == "chunk" and name == "head":
                    started.set()
                elif event.kind != "chunk":
                    order.append((name, event.kind))
            return on_event

        engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=60, ignore_eos=True), sink("head"), adapter_id="head")
        assert started.wait(30)
        for name in ("embed", "plain"):
            engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=4, ignore_eos=True), sink(name), adapter_id=name)
        deadline = time.time() + 60
        while len(order) < 3 and time.time() < deadline:
            time.sleep(0.02)
    finally:
        engine.stop()
    assert order == [("plain", "final"), ("head", "final"), ("embed", "final")]
