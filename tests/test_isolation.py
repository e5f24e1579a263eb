"""Isolation through the engine API: what one request or one adapter does never changes what
another gets. Each test first shows its hostile ingredient is live (it fails, or it would change
an output), then that every other request is bit-identical to a clean run.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from safetensors.torch import load_file

from lorad.errors import InvalidAdapterError, InvalidRequestError, LoradError, QueueFullError
from lorad.server.config import EngineConfig
from lorad.server.engine import Engine
from lorad.server.observer import EngineObserver
from lorad.server.sampling import SamplingParams
from lorad.testing import write_random_adapter
from serving_helpers import Collector, make_engine

PROMPT = "Once upon a time, in a land far away, there lived a"
STORY = "Tell me a story about a dragon who learned to read"


def _run_together(engine, specs: list[tuple[list[int], SamplingParams, str | None]]) -> list:
    """Submit every request in one burst (so they share steps); return their last events."""
    sinks = [Collector() for _ in specs]
    for (ids, params, adapter), sink in zip(specs, sinks):
        engine.submit(ids, params, sink, adapter_id=adapter)
    return [sink.final() for sink in sinks]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_geometry):
    root = tmp_path_factory.mktemp("isolation-adapters")
    write_random_adapter(root / "a0", tiny_geometry, rank=4, seed=1, b_std=0.5)
    write_random_adapter(root / "huge", tiny_geometry, rank=4, seed=3, a_std=1e18, b_std=1e18)
    return root


@pytest.fixture(scope="module")
def engine(tiny_base, adapters):
    eng = make_engine(tiny_base, adapters_dir=adapters)
    yield eng
    eng.stop()


# --- 1. a failing request fails alone -------------------------------------------------------------

NORMAL = [  # (prompt, params, adapter): greedy and seeded sampling, base and adapter, penalty, logprobs
    (PROMPT, dict(), None),
    (STORY, dict(temperature=0.8, top_k=50, seed=7), None),
    (PROMPT, dict(), "a0"),
    (STORY, dict(temperature=1.0, top_p=0.9, seed=11, logprobs=True), "a0"),
    ("a a a a b b b b", dict(repetition_penalty=1.3), None),
]

EDGES = {  # finite, positive, accepted: each must be computed safely or fail its request alone
    "temperature_1e-40": (dict(temperature=1e-40), None),
    "temperature_1e-45_top_p": (dict(temperature=1e-45, top_p=0.5), None),
    "temperature_3e38": (dict(temperature=3e38), None),
    "penalty_1e-40_sampled": (dict(temperature=1.0, repetition_penalty=1e-40), None),
    "penalty_1e-40_greedy": (dict(repetition_penalty=1e-40), None),
    "penalty_1e30_sampled": (dict(temperature=0.7, repetition_penalty=1e30), None),
    "tiny_everything_top_k": (dict(temperature=1e-30, repetition_penalty=1e-30, top_k=3), None),
    "non_finite_logits_sampled": (dict(temperature=1.0), "huge"),  # the adapter overflows the model
}


@pytest.mark.parametrize("edge", EDGES)
def test_a_numeric_edge_fails_alone_and_the_batch_stays_bit_identical(engine, edge):
    params, adapter = EDGES[edge]
    normal = [(engine.encode(p), SamplingParams(max_new_tokens=12, ignore_eos=True, **kw), a) for p, kw, a in NORMAL]
    clean = _run_together(engine, normal)
    assert all(e.kind == "final" for e in clean)
    hostile = (engine.encode(STORY), SamplingParams(max_new_tokens=12, ignore_eos=True, **params), adapter)
    mixed = _run_together(engine, [hostile, *normal])
    assert [e.token_ids for e in mixed[1:]] == [e.token_ids for e in clean]
    assert all(e.kind == "final" for e in mixed[1:])
    outcome = mixed[0]
    if adapter == "huge":  # the hostile request itself fails, with its own sentence
        assert outcome.kind == "error" and isinstance(outcome.error, InvalidAdapterError)
        assert "non-finite logits" in str(outcome.error)
    else:  # a tiny temperature or penalty is computed safely: a whole answer
        assert outcome.kind == "final" and outcome.completion_tokens == 12


def test_a_tiny_temperature_behaves_like_greedy(engine):
    ids = engine.encode(PROMPT)
    greedy = engine.generate(ids, SamplingParams(max_new_tokens=10, ignore_eos=True)).token_ids
    tiny = engine.generate(ids, SamplingParams(max_new_tokens=10, ignore_eos=True, temperature=1e-40, seed=1)).token_ids
    assert tiny == greedy


# --- 2. a hostile adapter harms nobody else ----------------------------------------------------


class _CancelAfterOneStep(EngineObserver):
    """Cancels one request right after the first engine step that ran it (deterministic, where
    a sleep before cancel() would race the engine)."""

    def __init__(self):
        self.engine = self.request_id = None

    def step(self, *args) -> None:
        if self.request_id is not None:
            self.engine.cancel(self.request_id)
            self.request_id = None


def test_a_hostile_adapter_cancelled_mid_prefill_leaves_nothing_in_its_cache_row(tiny_base, adapters):
    """The overflowing adapter writes Inf/NaN into its cache row while its prompt is prefilled
    (64 tokens per step here). Cancelled before it samples, it must leave the row clean: a later
    occupant attends over that row's tail (masked), and a masked 0 x NaN is still NaN."""
    hook = _CancelAfterOneStep()
    eng = hook.engine = Engine(tiny_base, EngineConfig(max_seq_len=256, kv_cache_memory="64MiB", max_lora_rank=16,
                                                       max_prefill_tokens=64), adapters_dir=adapters, observer=hook)
    eng.start()
    try:
        short, long_ = eng.encode("Hi there"), eng.encode("word " * 40)
        p = SamplingParams(max_new_tokens=12, ignore_eos=True)
        solo = [eng.generate(short, p).token_ids, eng.generate(long_, p).token_ids]
        with pytest.raises(InvalidAdapterError, match="non-finite"):  # the adapter is hostile and loaded
            eng.generate(short, SamplingParams(max_new_tokens=2), adapter_id="huge")
        poison = Collector()
        # set microseconds after submit, long before the engine has run its 64-token chunk; were it
        # late, the cancel would land after the second chunk, still before the 200-token prompt ends
        hook.request_id = eng.submit(eng.encode("story " * 200), SamplingParams(max_new_tokens=2), poison,
                                     adapter_id="huge")
        final = poison.final()
        assert final.kind == "final" and final.finish_reason == "cancelled" and final.completion_tokens == 0
        # the short request takes the row the poison used and decodes beside the longer one, so
        # its row is read (masked) up to the longer one's length
        after = _run_together(eng, [(short, p, None), (long_, p, None)])
        assert [e.kind for e in after] == ["final", "final"], [str(e.error) for e in after]
        assert [e.token_ids for e in after] == solo
    finally:
        eng.stop()


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))  # json writes NaN / Infinity as PEFT would


def test_a_nan_alpha_adapter_is_refused_and_never_reaches_other_adapters(tiny_base, tiny_geometry, tmp_path):
    for name, seed in (("first", 1), ("nan_alpha", 2), ("third", 3)):
        write_random_adapter(tmp_path / name, tiny_geometry, rank=4, seed=seed, b_std=0.5)
    _edit_config(tmp_path / "nan_alpha", lora_alpha=float("nan"))
    eng = make_engine(tiny_base, adapters_dir=tmp_path)
    try:
        ids = eng.encode(PROMPT)
        p = SamplingParams(max_new_tokens=10, ignore_eos=True)
        # slots fill in order: first, then nan_alpha (if it were accepted), then third
        solo = {"first": eng.generate(ids, p, adapter_id="first").token_ids}
        with pytest.raises(InvalidAdapterError, match="lora_alpha=nan must be a positive, finite number"):
            eng.generate(ids, p, adapter_id="nan_alpha")
        solo["third"] = eng.generate(ids, p, adapter_id="third").token_ids
        assert solo["first"] != solo["third"]
        for _ in range(3):  # the batch spans the slots on both sides of where nan_alpha would sit
            together = _run_together(eng, [(ids, p, "first"), (ids, p, "third")])
            assert [e.token_ids for e in together] == [solo["first"], solo["third"]], [str(e.error) for e in together]
        listing = {s.adapter_id: s for s in eng.list_adapters()}
        assert "lora_alpha=nan" in listing["nan_alpha"].error
    finally:
        eng.stop()


def test_adapter_files_replaced_on_disk_are_never_served_stale(tiny_base, tiny_geometry, tmp_path):
    """Requests after a replace use the new files (or get their error); a request running during
    the replace finishes on the weights it started with."""
    write_random_adapter(tmp_path / "v", tiny_geometry, rank=4, seed=1, b_std=0.5)
    write_random_adapter(tmp_path / "ref2", tiny_geometry, rank=8, seed=2, b_std=0.5)  # what v becomes
    eng = make_engine(tiny_base, adapters_dir=tmp_path)
    try:
        ids = eng.encode(PROMPT)
        p = SamplingParams(max_new_tokens=10, ignore_eos=True)
        v1 = eng.generate(ids, p, adapter_id="v").token_ids
        v2 = eng.generate(ids, p, adapter_id="ref2").token_ids
        assert v1 != v2
        long_v1 = eng.generate(ids, SamplingParams(max_new_tokens=150, ignore_eos=True), adapter_id="v").token_ids

        running = Collector()
        eng.submit(ids, SamplingParams(max_new_tokens=150, ignore_eos=True), running, adapter_id="v")
        while len(running.events) < 5:
            time.sleep(0.002)
        write_random_adapter(tmp_path / "v", tiny_geometry, rank=8, seed=2, b_std=0.5)  # retrained in place
        assert eng.generate(ids, p, adapter_id="v").token_ids == v2  # the new files, at once
        assert running.final().token_ids == long_v1  # the running request kept its weights
        assert {s.adapter_id: s.location for s in eng.list_adapters()}["v"] == "device"

        (tmp_path / "v" / "adapter_model.safetensors").write_bytes(b"broken by a bad copy")
        with pytest.raises(InvalidAdapterError, match="not a readable safetensors"):
            eng.generate(ids, p, adapter_id="v")
        status = {s.adapter_id: s for s in eng.list_adapters()}["v"]
        assert status.location == "disk" and "not a readable safetensors" in status.error

        write_random_adapter(tmp_path / "v", tiny_geometry, rank=4, seed=1, b_std=0.5)  # fixed: back to v1
        assert eng.generate(ids, p, adapter_id="v").token_ids == v1
    finally:
        eng.stop()


def test_files_linked_out_of_the_adapters_folder_are_refused(tiny_base, tiny_geometry, tmp_path):
    root, outside = tmp_path / "adapters", tmp_path / "outside"
    write_random_adapter(outside / "secret", tiny_geometry, rank=4, seed=1)
    for name in ("weights_out", "config_out", "linked_inside"):
        write_random_adapter(root / name, tiny_geometry, rank=4, seed=1)
    (root / "weights_out" / "adapter_model.safetensors").unlink()
    (root / "weights_out" / "adapter_model.safetensors").symlink_to(outside / "secret" / "adapter_model.safetensors")
    (root / "config_out" / "adapter_config.json").unlink()
    (root / "config_out" / "adapter_config.json").symlink_to(outside / "secret" / "adapter_config.json")
    (root / "linked_inside" / "adapter_model.safetensors").unlink()  # a link that stays inside is fine
    (root / "linked_inside" / "adapter_model.safetensors").symlink_to(root / "config_out" / "adapter_model.safetensors")
    eng = make_engine(tiny_base, adapters_dir=root)
    try:
        ids = eng.encode(PROMPT)
        p = SamplingParams(max_new_tokens=4, ignore_eos=True)
        for name, file in (("weights_out", "adapter_model.safetensors"), ("config_out", "adapter_config.json")):
            with pytest.raises(InvalidAdapterError, match=f"{file} is a link to a file outside the adapters folder"):
                eng.generate(ids, p, adapter_id=name)
        assert eng.generate(ids, p, adapter_id="linked_inside").completion_tokens == 4
        listing = {s.adapter_id: s.error for s in eng.list_adapters()}
        assert "outside the adapters folder" in listing["weights_out"] and listing["linked_inside"] == ""
        assert all(str(tmp_path) not in error for error in listing.values())
    finally:
        eng.stop()


# --- 3. every client exit frees its resources ---------------------------------------------------


def test_a_burst_fills_the_free_rows_and_then_the_queue(tiny_base):
    """11 free batch rows and 8 queue places: a burst of 64 gets exactly 19 in, the rest refused."""
    eng = make_engine(tiny_base, max_batch_size=11, max_queue=8)
    try:
        ids = eng.encode(PROMPT)
        accepted, refused = [], 0
        for _ in range(64):
            sink = Collector()
            try:
                accepted.append((eng.submit(ids, SamplingParams(max_new_tokens=200, ignore_eos=True), sink), sink))
            except QueueFullError:
                refused += 1
        assert (len(accepted), refused) == (19, 45)
        for request_id, _ in accepted:
            eng.cancel(request_id)
        assert all(sink.final().finish_reason == "cancelled" for _, sink in accepted)
    finally:
        eng.stop()


# --- 4. the edge ------------------------------------------------------------------------------


def test_a_huge_prompt_is_refused_before_it_is_tokenized(engine, monkeypatch):
    calls = []
    real_call = type(engine.tokenizer).__call__
    monkeypatch.setattr(type(engine.tokenizer), "__call__", lambda self, *a, **kw: calls.append(1) or real_call(self, *a, **kw))
    with pytest.raises(InvalidRequestError, match="cannot fit this server's context"):
        engine.encode("word " * 800_000)  # 4 MB
    with pytest.raises(InvalidRequestError, match="cannot fit this server's context"):
        engine.encode(messages=[{"role": "user", "content": "word " * 800_000}])
    assert calls == []
    with pytest.raises(InvalidRequestError, match="do not fit"):  # near the limit: tokenized, then refused
        engine.submit(engine.encode("word " * 2000), SamplingParams(max_new_tokens=2), lambda e: None)
    assert calls == [1]


def test_errors_quote_untrusted_values_briefly(engine):
    with pytest.raises(InvalidRequestError) as info:
        engine.encode(messages=[{"role": "x" * 100_000, "content": "hi"}])
    assert len(str(info.value)) < 200
    with pytest.raises(InvalidRequestError) as info:
        engine.submit([1, 2], SamplingParams(max_new_tokens=2), lambda e: None, adapter_id="../" * 10_000)
    assert len(str(info.value)) < 300


def test_a_request_failing_while_its_token_is_emitted_fails_alone(engine, monkeypatch):
    """An exception while emitting one request's token (here: its detokenizer) ends that request,
    not the step it shares with others."""
    from lorad.server.detokenizer import IncrementalDetokenizer

    ids = engine.encode(PROMPT)
    p = SamplingParams(max_new_tokens=8, ignore_eos=True)
    clean = _run_together(engine, [(ids, p, None), (ids, p, "a0")])
    real_add = IncrementalDetokenizer.add

    def add(self, token_id):
        if self.stop == ("zzz",):
            raise RuntimeError("simulated detokenizer bug")
        return real_add(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "add", add)
    broken = (ids, SamplingParams(max_new_tokens=8, ignore_eos=True, stop=("zzz",)), None)
    out = _run_together(engine, [broken, (ids, p, None), (ids, p, "a0")])
    assert out[0].kind == "error" and isinstance(out[0].error, LoradError) and "emitting" in str(out[0].error)
    assert [e.token_ids for e in out[1:]] == [e.token_ids for e in clean]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_an_adapter_folder_never_blocks_the_reader(tiny_base, tiny_geometry, tmp_path):
    write_random_adapter(tmp_path / "fifo", tiny_geometry, rank=4, seed=1)
    (tmp_path / "fifo" / "adapter_model.safetensors").unlink()
    os.mkfifo(tmp_path / "fifo" / "adapter_model.safetensors")
    eng = make_engine(tiny_base, adapters_dir=tmp_path)
    try:
        with pytest.raises(InvalidAdapterError, match="not a regular file"):
            eng.generate([1, 2, 3], SamplingParams(max_new_tokens=2), adapter_id="fifo")
        assert "not a regular file" in eng.list_adapters()[0].error
    finally:
        eng.stop()


def test_the_safetensors_reader_reads_what_safetensors_wrote(tiny_geometry, tmp_path):
    """Guard for the hand-written header reader: every tensor comes back equal."""
    from lorad.adapter_format import load_adapter

    path = write_random_adapter(tmp_path / "a", tiny_geometry, rank=4, seed=9)
    expected = load_file(path / "adapter_model.safetensors")
    adapter = load_adapter(path, "a", tiny_geometry, 16)
    for (layer, proj), (a, b) in adapter.weights.items():
        group = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        prefix = f"base_model.model.model.layers.{layer}.{group}.{proj}"
        assert a.equal(expected[f"{prefix}.lora_A.weight"]) and b.equal(expected[f"{prefix}.lora_B.weight"])
    assert len(adapter.weights) * 2 == len(expected)
