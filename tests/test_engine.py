"""Engine behaviour on a tiny random Llama: batching, caching, sampling, errors, cancellation.

Each test compares against something independent: HF's own generate() on the same model, the
same request served alone, or an exact expectation.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lorad.errors import (
    AdapterNotFoundError,
    DeadlineExceededError,
    EngineStoppedError,
    InvalidAdapterError,
    InvalidRequestError,
    QueueFullError,
)
from lorad.server.config import EngineConfig
from lorad.server.engine import Engine
from lorad.server.sampling import SamplingParams
from lorad.testing import pace_steps, write_random_adapter
from serving_helpers import Collector, make_engine

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away, there lived a",
    "1 2 3 4",
    "A much longer prompt that keeps going, with many words, so that the prefill of this request spans more tokens "
    "than the chunk size used in some tests below",
]


def hf_greedy(model, prompt_ids, n):
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def engine(tiny_base):
    eng = make_engine(tiny_base)
    yield eng
    eng.stop()


def test_concurrent_requests_match_hf_generate(engine, tiny_base):
    n = 12
    prompts = [engine.encode(p) for p in PROMPTS]
    sinks = [Collector() for _ in prompts]
    for ids, sink in zip(prompts, sinks):
        engine.submit(ids, SamplingParams(max_new_tokens=n, ignore_eos=True), sink)
    for ids, sink in zip(prompts, sinks):
        final = sink.final()
        assert final.finish_reason == "length"
        assert final.token_ids == hf_greedy(tiny_base.model, ids, n)
        assert final.prompt_tokens == len(ids) and final.completion_tokens == n


def test_chunked_prefill_and_late_joiners_match_solo(tiny_base):
    """Prompts prefilled 5 tokens per step, requests joining mid-flight: same tokens as alone."""
    eng = make_engine(tiny_base, max_prefill_tokens=5)
    try:
        prompts = [eng.encode(p) for p in PROMPTS]
        solo = [eng.generate(ids, SamplingParams(max_new_tokens=10, ignore_eos=True)).token_ids for ids in prompts]
        sinks = []
        for ids in prompts:
            sink = Collector()
            eng.submit(ids, SamplingParams(max_new_tokens=10, ignore_eos=True), sink)
            sinks.append(sink)
            time.sleep(0.02)  # the next request arrives while this one is running
        assert [s.final().token_ids for s in sinks] == solo
        assert [s.final().token_ids for s in sinks] == [hf_greedy(tiny_base.model, ids, 10) for ids in prompts]
    finally:
        eng.stop()


def test_rows_compact_when_requests_finish_at_different_times(engine):
    """Short requests leave while long ones run; moved cache rows must keep the long ones exact."""
    prompts = [engine.encode(p) for p in PROMPTS]
    lengths = [3, 20, 7, 15]
    solo = [engine.generate(ids, SamplingParams(max_new_tokens=n, ignore_eos=True)).token_ids
            for ids, n in zip(prompts, lengths)]
    sinks = [Collector() for _ in prompts]
    for ids, n, sink in zip(prompts, lengths, sinks):
        engine.submit(ids, SamplingParams(max_new_tokens=n, ignore_eos=True), sink)
    assert [s.final().token_ids for s in sinks] == solo


def test_stream_chunks_add_up_to_final(engine):
    sink = Collector()
    engine.submit(engine.encode(PROMPTS[1]), SamplingParams(max_new_tokens=15, ignore_eos=True), sink)
    final = sink.final()
    chunks = [e for e in sink.events if e.kind == "chunk"]
    assert "".join(c.text for c in chunks) == final.text
    assert [t for c in chunks for t in c.token_ids] == final.token_ids


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(engine):
    ids = engine.encode(PROMPTS[0])
    sampled = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=1234, ignore_eos=True)
    a = engine.generate(ids, sampled).token_ids
    b = engine.generate(ids, sampled).token_ids
    c = engine.generate(ids, SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=99, ignore_eos=True)).token_ids
    greedy = engine.generate(ids, SamplingParams(max_new_tokens=12, ignore_eos=True)).token_ids
    top1 = engine.generate(ids, SamplingParams(max_new_tokens=12, temperature=0.8, top_k=1, seed=5, ignore_eos=True)).token_ids
    assert a == b
    assert a != c  # a random 2-layer model at temperature 1.5: two seeds agreeing on 12 tokens is ~impossible
    assert top1 == greedy


def test_repetition_penalty_discourages_repeats(engine):
    ids = engine.encode("a a a a a a a a a a")
    plain = engine.generate(ids, SamplingParams(max_new_tokens=20, ignore_eos=True)).token_ids
    penalised = engine.generate(ids, SamplingParams(max_new_tokens=20, repetition_penalty=5.0, ignore_eos=True)).token_ids
    repeats = lambda toks: len(toks) - len(set(toks))  # noqa: E731
    assert repeats(penalised) < repeats(plain)


def test_stop_sequence_ends_generation_and_is_not_returned(engine):
    ids = engine.encode(PROMPTS[1])
    free = engine.generate(ids, SamplingParams(max_new_tokens=30, ignore_eos=True))
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    assert len(stop) == 3
    stopped = engine.generate(ids, SamplingParams(max_new_tokens=30, stop=(stop,), ignore_eos=True))
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text
    assert free.text.startswith(stopped.text)
    assert len(stopped.token_ids) < len(free.token_ids)


def test_eos_finishes_with_reason_eos(tiny_base):
    """Make EOS the only sensible token by asking the engine to treat the greedy first token as EOS."""
    eng = make_engine(tiny_base)
    try:
        ids = eng.encode(PROMPTS[0])
        first = eng.generate(ids, SamplingParams(max_new_tokens=1, ignore_eos=True)).token_ids[0]
        eng.eos_ids = {first}
        final = eng.generate(ids, SamplingParams(max_new_tokens=10))
        assert final.finish_reason == "eos" and final.token_ids == [] and final.completion_tokens == 0
    finally:
        eng.stop()


def test_logprobs_are_log_softmax_of_the_chosen_tokens(engine, tiny_base):
    ids = engine.encode(PROMPTS[2])
    final = engine.generate(ids, SamplingParams(max_new_tokens=5, logprobs=True, ignore_eos=True))
    full = torch.tensor([ids + final.token_ids])
    with torch.no_grad():
        logits = tiny_base.model(full).logits[0, len(ids) - 1 : -1].float()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(final.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(final.logprobs), expected, atol=1e-4)


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=5, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=5, temperature=float("nan")), "temperature"),
        (dict(max_new_tokens=5, top_p=1.5), "top_p"),
        (dict(max_new_tokens=5, top_k=-3), "top_k"),
        (dict(max_new_tokens=5, repetition_penalty=-2.0), "repetition_penalty"),
        (dict(max_new_tokens=5, stop=("",)), "stop"),
        (dict(max_new_tokens=5, stop=tuple("abcdefghijklmnopq")), "stop"),
    ],
)
def test_bad_sampling_params_name_the_field(params, match):
    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(**params)


def test_bad_requests_are_refused_before_queueing(engine):
    ok = SamplingParams(max_new_tokens=4)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.submit([], ok, lambda e: None)
    with pytest.raises(InvalidRequestError, match="context"):
        engine.submit([1] * engine.max_seq_len, ok, lambda e: None)
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.submit([10**9], ok, lambda e: None)
    with pytest.raises(InvalidRequestError, match="limit"):
        engine.submit([1, 2], SamplingParams(max_new_tokens=10**6), lambda e: None)
    with pytest.raises(InvalidRequestError, match="adapter"):
        engine.submit([1, 2], ok, lambda e: None, adapter_id="../../etc/passwd")
    with pytest.raises(AdapterNotFoundError):
        engine.submit([1, 2], ok, lambda e: None, adapter_id="no-such-adapter")
    with pytest.raises(InvalidRequestError, match="exactly one"):
        engine.encode(prompt="x", messages=[{"role": "user", "content": "y"}])
    with pytest.raises(InvalidRequestError, match="role"):
        engine.encode(messages=[{"role": "wizard", "content": "y"}])
    # and the engine still serves
    assert engine.generate(engine.encode("hello"), ok).completion_tokens >= 1


def test_cancel_frees_the_batch_slot_at_the_next_step(tiny_base):
    eng = make_engine(tiny_base)
    pace_steps(eng, 0.005)  # 200 tokens take over 1 s: the cancel lands mid-request on any machine
    try:
        sink = Collector()
        rid = eng.submit(eng.encode(PROMPTS[0]), SamplingParams(max_new_tokens=200, ignore_eos=True), sink)
        deadline = time.time() + 30
        while not any(e.kind == "chunk" for e in sink.events) and time.time() < deadline:
            time.sleep(0.005)
        eng.cancel(rid)
        final = sink.final()
        assert final.finish_reason == "cancelled" and final.completion_tokens < 200
        assert not eng._running
    finally:
        eng.stop()


def test_a_passed_deadline_is_an_error_and_frees_the_slot(tiny_base):
    eng = make_engine(tiny_base)
    pace_steps(eng, 0.005)  # 200 tokens take over 1 s: the 50 ms deadline passes mid-request on any machine
    try:
        with pytest.raises(DeadlineExceededError, match="deadline passed"):
            eng.generate(eng.encode(PROMPTS[0]), SamplingParams(max_new_tokens=200, ignore_eos=True), timeout=0.05)
        assert not eng._running
        # a deadline that has passed before the engine sees the request: an error too, never
        # an empty answer that looks complete
        with pytest.raises(DeadlineExceededError):
            eng.generate(eng.encode(PROMPTS[0]), SamplingParams(max_new_tokens=5), timeout=0.0)
    finally:
        eng.stop()


def test_full_queue_is_refused_and_loses_nothing(tiny_base):
    eng = make_engine(tiny_base, max_queue=2, max_batch_size=1)
    try:
        sinks = []
        ids = eng.encode(PROMPTS[0])
        refused = 0
        for _ in range(6):
            sink = Collector()
            try:
                eng.submit(ids, SamplingParams(max_new_tokens=30, ignore_eos=True), sink)
                sinks.append(sink)
            except QueueFullError as exc:
                assert "queue is full" in str(exc)
                refused += 1
        assert refused >= 1 and len(sinks) >= 2
        for sink in sinks:  # every accepted request completes
            assert sink.final().completion_tokens == 30
    finally:
        eng.stop()


def test_adapter_with_nan_fails_its_requests_only(tiny_base, tiny_geometry, tmp_path):
    good = write_random_adapter(tmp_path / "good", tiny_geometry, rank=4, seed=1, b_std=0.5)
    bad = write_random_adapter(tmp_path / "bad", tiny_geometry, rank=4, seed=2)
    from safetensors.torch import load_file, save_file

    tensors = load_file(bad / "adapter_model.safetensors")
    name = next(iter(tensors))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    eng = make_engine(tiny_base, adapters_dir=tmp_path)
    try:
        ids = eng.encode(PROMPTS[0])
        bad_sink, good_sink = Collector(), Collector()
        eng.submit(ids, SamplingParams(max_new_tokens=5), bad_sink, adapter_id="bad")
        eng.submit(ids, SamplingParams(max_new_tokens=5, ignore_eos=True), good_sink, adapter_id="good")
        err = bad_sink.final()
        assert err.kind == "error" and isinstance(err.error, InvalidAdapterError) and "NaN" in str(err.error)
        assert good_sink.final().completion_tokens == 5
    finally:
        eng.stop()


def test_adapter_that_overflows_fails_its_request_and_spares_the_rest(tiny_base, tiny_geometry, tmp_path):
    """Finite weights so large the activations overflow: that request errors, the others finish."""
    write_random_adapter(tmp_path / "huge", tiny_geometry, rank=4, seed=3, a_std=1e18, b_std=1e18)
    eng = make_engine(tiny_base, adapters_dir=tmp_path)
    try:
        ids = eng.encode(PROMPTS[1])
        alone = eng.generate(ids, SamplingParams(max_new_tokens=8, ignore_eos=True)).token_ids
        huge, base = Collector(), Collector()
        eng.submit(ids, SamplingParams(max_new_tokens=8, ignore_eos=True), huge, adapter_id="huge")
        eng.submit(ids, SamplingParams(max_new_tokens=8, ignore_eos=True), base)
        assert huge.final().kind == "error" and "non-finite" in str(huge.final().error)
        assert base.final().token_ids == alone
    finally:
        eng.stop()


def test_adapters_change_output_and_base_rows_are_untouched(tiny_base, tiny_geometry, tmp_path):
    for i in range(3):
        write_random_adapter(tmp_path / f"a{i}", tiny_geometry, rank=4 + 4 * i, seed=i, b_std=0.5)
    eng = make_engine(tiny_base, adapters_dir=tmp_path)
    try:
        ids = eng.encode(PROMPTS[1])
        p = SamplingParams(max_new_tokens=10, ignore_eos=True)
        solo = {a: eng.generate(ids, p, adapter_id=a).token_ids for a in (None, "a0", "a1", "a2")}
        assert len({tuple(v) for v in solo.values()}) == 4  # every adapter changes the output
        order = [None, "a2", "a0", None, "a1", "a0"]
        sinks = [Collector() for _ in order]
        for a, sink in zip(order, sinks):
            eng.submit(ids, p, sink, adapter_id=a)
        assert [s.final().token_ids for s in sinks] == [solo[a] for a in order]
        listing = {s.adapter_id: s for s in eng.list_adapters()}
        assert {k: v.location for k, v in listing.items()} == {"a0": "device", "a1": "device", "a2": "device"}
        assert listing["a2"].rank == 12
    finally:
        eng.stop()


def test_more_adapters_than_slots_all_get_served(tiny_base, tiny_geometry, tmp_path):
    """6 adapters through 2 device slots and a 3-entry host cache: every request completes correctly."""
    for i in range(6):
        write_random_adapter(tmp_path / f"a{i}", tiny_geometry, rank=4, seed=10 + i, b_std=0.5)
    eng = make_engine(tiny_base, adapters_dir=tmp_path, max_loras=2, max_cpu_loras=3)
    try:
        ids = eng.encode(PROMPTS[0])
        p = SamplingParams(max_new_tokens=6, ignore_eos=True)
        solo = {f"a{i}": eng.generate(ids, p, adapter_id=f"a{i}").token_ids for i in range(6)}
        order = [f"a{i % 6}" for i in range(12)]
        sinks = [Collector() for _ in order]
        for a, sink in zip(order, sinks):
            eng.submit(ids, p, sink, adapter_id=a)
        assert [s.final().token_ids for s in sinks] == [solo[a] for a in order]
        assert eng.pool.slots_used <= 2
    finally:
        eng.stop()


def test_kv_budget_bounds_running_requests(tiny_base, tiny_geometry):
    row = tiny_geometry.kv_bytes_per_token(4) * 256
    eng = make_engine(tiny_base, kv_cache_memory=row * 3, max_batch_size=8)
    try:
        assert eng.max_running == 3
        ids = eng.encode(PROMPTS[0])
        sinks = [Collector() for _ in range(7)]
        for sink in sinks:
            eng.submit(ids, SamplingParams(max_new_tokens=5, ignore_eos=True), sink)
        assert all(s.final().completion_tokens == 5 for s in sinks)
    finally:
        eng.stop()


def test_adapter_loading_never_stalls_running_requests(tiny_base, tiny_geometry, tmp_path, monkeypatch):
    """A slow disk read runs beside the engine: a running request keeps getting tokens meanwhile."""
    import lorad.server.adapter_store as store_module

    write_random_adapter(tmp_path / "slow", tiny_geometry, rank=4, seed=5, b_std=0.5)
    real_load = store_module.load_adapter
    loading = threading.Event()

    def slow_load(*args, **kwargs):
        loading.set()
        time.sleep(1.0)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(store_module, "load_adapter", slow_load)
    eng = make_engine(tiny_base, adapters_dir=tmp_path)
    pace_steps(eng, 0.005)  # 200 tokens outlast the 1 s read on any machine (the tiny base alone may not)
    try:
        ids = eng.encode(PROMPTS[0])
        runner = Collector()
        eng.submit(ids, SamplingParams(max_new_tokens=200, ignore_eos=True), runner)
        while not runner.events:
            time.sleep(0.005)
        waiter = Collector()
        eng.submit(ids, SamplingParams(max_new_tokens=3, ignore_eos=True), waiter, adapter_id="slow")
        assert loading.wait(10)
        before = len(runner.events)
        time.sleep(0.5)  # in the middle of the 1 s load
        assert len(runner.events) > before + 5  # the running request kept decoding
        assert waiter.final().completion_tokens == 3
    finally:
        eng.stop()


def test_adapters_added_after_start_are_found(tiny_base, tiny_geometry, tmp_path):
    eng = make_engine(tiny_base, adapters_dir=tmp_path)
    try:
        with pytest.raises(AdapterNotFoundError):
            eng.submit([1, 2, 3], SamplingParams(max_new_tokens=2), lambda e: None, adapter_id="late")
        write_random_adapter(tmp_path / "late", tiny_geometry, rank=4, seed=6)
        assert eng.generate([1, 2, 3], SamplingParams(max_new_tokens=2, ignore_eos=True), adapter_id="late").completion_tokens == 2
    finally:
        eng.stop()


def test_a_failing_adapter_admission_fails_that_request_only(tiny_base, tiny_geometry, tmp_path, monkeypatch):
    """A slot write that raises fails its request; the queue behind it is neither lost nor stuck."""
    for name, seed in (("bad", 1), ("good", 2)):
        write_random_adapter(tmp_path / name, tiny_geometry, rank=4, seed=seed)
    eng = make_engine(tiny_base, adapters_dir=tmp_path)
    try:
        real_write = eng.pool._write

        def write(slot, adapter):
            if adapter.spec.adapter_id == "bad":
                raise RuntimeError("simulated device copy failure")
            real_write(slot, adapter)

        monkeypatch.setattr(eng.pool, "_write", write)
        ids = eng.encode(PROMPTS[0])
        sinks = {name: Collector() for name in ("bad", "good", "")}
        for name, sink in sinks.items():
            eng.submit(ids, SamplingParams(max_new_tokens=4, ignore_eos=True), sink, adapter_id=name or None)
        bad = sinks["bad"].final()
        assert bad.kind == "error" and "internal error putting adapter 'bad'" in str(bad.error)
        assert sinks["good"].final().completion_tokens == 4
        assert sinks[""].final().completion_tokens == 4
        # the engine goes on serving, the failed adapter's slot included
        assert eng.generate(ids, SamplingParams(max_new_tokens=3, ignore_eos=True), adapter_id="good").completion_tokens == 3
    finally:
        eng.stop()


def test_a_broken_adapter_is_read_once_until_its_files_change(tiny_base, tiny_geometry, tmp_path, monkeypatch):
    from lorad.server import adapter_store

    path = write_random_adapter(tmp_path / "bad", tiny_geometry, rank=4, seed=1)
    (path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    reads = []
    real_load = adapter_store.load_adapter
    monkeypatch.setattr(adapter_store, "load_adapter", lambda *a, **kw: reads.append(1) or real_load(*a, **kw))
    eng = make_engine(tiny_base, adapters_dir=tmp_path)
    try:
        ids = eng.encode(PROMPTS[0])
        for _ in range(3):
            with pytest.raises(InvalidAdapterError):
                eng.generate(ids, SamplingParams(max_new_tokens=2), adapter_id="bad")
        assert len(reads) == 1
        write_random_adapter(tmp_path / "bad", tiny_geometry, rank=4, seed=1)  # fixed on disk
        assert eng.generate(ids, SamplingParams(max_new_tokens=2, ignore_eos=True), adapter_id="bad").completion_tokens == 2
        assert len(reads) == 2
    finally:
        eng.stop()


def test_a_dead_engine_loop_answers_everyone_and_refuses_new_work(tiny_base, monkeypatch):
    """Even if failing the running requests fails, nobody waits forever on a dead loop."""
    eng = Engine(tiny_base, EngineConfig(max_seq_len=64, kv_cache_memory="16MiB"))
    exited = threading.Event()
    eng.on_exit = exited.set

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(eng, "_step", broken)
    real_finish_error = eng._finish_error
    calls = []

    def finish_error_once_broken(request, error):
        calls.append(request.id)
        if len(calls) == 1:
            raise RuntimeError("simulated bug in the error path")
        real_finish_error(request, error)

    monkeypatch.setattr(eng, "_finish_error", finish_error_once_broken)
    eng.start()
    sink = Collector()
    eng.submit(eng.encode(PROMPTS[0]), SamplingParams(max_new_tokens=2), sink)
    assert exited.wait(30), "the loop did not end"
    final = sink.final(timeout=10)
    assert final.kind == "error" and isinstance(final.error, EngineStoppedError)
    with pytest.raises(EngineStoppedError):
        eng.submit(eng.encode(PROMPTS[0]), SamplingParams(max_new_tokens=2), Collector())
    eng.stop()


def test_top_p_keeps_the_smallest_set_reaching_p_and_top_k_the_k_best():
    from lorad.server.sampling import make_generator, sample_tokens

    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps {0, 1}; 0.85 keeps {0, 1, 2}
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))

    def draws(**kw):
        params = SamplingParams(max_new_tokens=1, temperature=1.0, seed=0, **kw)
        gen = make_generator(params)
        return {sample_tokens(logits, [params], [gen], [None])[0] for _ in range(300)}

    assert draws(top_p=0.7) == {0, 1}
    assert draws(top_p=0.85) == {0, 1, 2}
    assert draws(top_p=0.01) == {0}
    assert draws(top_k=3) == {0, 1, 2}
    assert draws() == {0, 1, 2, 3}


def test_finite_rows_flags_exactly_the_rows_holding_nan_or_inf():
    """The engine's per-row check, against torch.isfinite, including finite values whose plain
    sum would overflow (which a sum-based check would wrongly flag)."""
    from lorad.server.sampling import finite_rows

    big = torch.finfo(torch.float32).max
    logits = torch.zeros(7, 1000)
    logits[1, 3] = float("nan")
    logits[2, 999] = float("inf")
    logits[3, 0] = float("-inf")
    logits[4] = big  # every value finite, their sum is not
    logits[5] = -big
    logits[6, 10] = -0.0
    expected = [True, False, False, False, True, True, True]
    assert torch.isfinite(logits).all(dim=-1).tolist() == expected
    assert finite_rows(logits) == expected
