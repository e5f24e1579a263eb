"""CombineAdapters and MergeAdapter on a real server on 127.0.0.1:0 (tiny random Llama, served
unquantized, so a merge adds the deltas to the original weights).

Combine: the served result is byte for byte what `lorad combine` writes offline, and answers
like it; merge: the folder under --export-dir loads in transformers alone and its greedy tokens
are the served adapter's. Bad input gets its status and a sentence; the server keeps serving,
also while a merge runs."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from click.testing import CliRunner

from lorad.base_model import BaseModelConfig
from lorad.clients import Client, LoradRPCError
from lorad.deltas.adapter_io import read_adapter
from lorad.deltas.combine import CombineConfig, combine, write_combined
from lorad.server import offline_reference
from lorad.server.adapter_publish import adapter_digest
from lorad.server.config import EngineConfig, ServerConfig
from lorad.testing import ServerThread, write_random_adapter

PROMPT = "Once upon a time, in a land far away"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def server(tiny_base, tiny_base_dir, tiny_geometry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deltas-rpc")
    root = tmp / "adapters"
    write_random_adapter(root / "a", tiny_geometry, rank=4, seed=11, b_std=0.5)
    write_random_adapter(root / "b", tiny_geometry, rank=2, seed=12, b_std=0.5)
    write_random_adapter(root / "wide", tiny_geometry, rank=6, seed=13, b_std=0.5)
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=None, adapters_dir=str(root),
                          export_dir=str(tmp / "exports"), base=BaseModelConfig(name=str(tiny_base_dir), quant="none"),
                          engine=EngineConfig(max_seq_len=128, kv_cache_memory="64MiB", max_lora_rank=8, max_loras=3,
                                              max_cpu_loras=6, max_batch_size=8))
    with ServerThread(config, tiny_base) as srv:
        srv.root, srv.exports, srv.tmp = root, tmp / "exports", tmp
        srv.target = f"127.0.0.1:{srv.port}"
        yield srv


def _greedy(c: Client, adapter_id: str) -> list[int]:
    return c.generate(PROMPT, adapter_id=adapter_id, max_new_tokens=12).token_ids


def _actions(server, action: str) -> float:
    return server.server.metrics.adapter_actions.labels(action)._value.get()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(LoradRPCError) as info:
        call()
    assert info.value.details and not info.value.details.startswith("internal error"), info.value.details
    return info.value.code


def test_combine_serves_what_an_offline_combine_writes(server):
    combines, replaces = _actions(server, "combine"), _actions(server, "replace")
    with Client(server.target, timeout=120) as c:
        done = c.combine_adapters([("a", 1.0), ("b", -0.5)], "ab", method="linear")
        assert done.rank == 6 and done.overall_error < 1e-5 and not done.replaced
        assert done.adapter.id == "ab" and done.adapter.digest == adapter_digest(server.root / "ab")
        served = _greedy(c, "ab")  # servable the moment the call returned

        offline = combine([read_adapter(server.root / "a"), read_adapter(server.root / "b")], [1.0, -0.5],
                          CombineConfig(method="linear"))
        write_combined(offline, server.tmp / "ab-offline")
        assert (server.root / "ab" / WEIGHTS).read_bytes() == (server.tmp / "ab-offline" / WEIGHTS).read_bytes()
        c.upload_adapter(server.tmp / "ab-offline", "ab-offline")
        assert _greedy(c, "ab-offline") == served
        assert served != _greedy(c, "a") and served != c.generate(PROMPT, max_new_tokens=12).token_ids  # not vacuous

        # a sparsifying method with its knobs, then a versioned replace of the output
        ties = c.combine_adapters(["a", "b"], "ab", method="ties", density=0.5, rank=4, replace=True)
        assert ties.replaced and ties.previous_digest == done.adapter.digest and ties.rank == 4
        assert c.generate(PROMPT, adapter_id="ab", max_new_tokens=2).adapter_version == ties.adapter.digest
    assert (_actions(server, "combine") - combines, _actions(server, "replace") - replaces) == (2, 1)


def test_combine_refusals_are_statuses_with_a_sentence(server, tiny_geometry):
    bad_base = server.root / "other-base"
    write_random_adapter(bad_base, tiny_geometry, rank=2, seed=14)
    (bad_base / "lorad_provenance.json").write_text('{"base_model": {"name": "x", "weights_digest": "sha256:00"}}')
    good_base = server.root / "this-base"
    write_random_adapter(good_base, tiny_geometry, rank=2, seed=15)
    (good_base / "lorad_provenance.json").write_text('{"base_model": {"name": "x", "weights_digest": "sha256:11"}}')
    with Client(server.target, timeout=120) as c:
        assert _code(lambda: c.combine_adapters(["a", "nope"], "x1")) == grpc.StatusCode.NOT_FOUND
        assert _code(lambda: c.combine_adapters(["a", "../b"], "x1")) == grpc.StatusCode.INVALID_ARGUMENT
        assert _code(lambda: c.combine_adapters([], "x1")) == grpc.StatusCode.INVALID_ARGUMENT
        assert _code(lambda: c.combine_adapters(["a"], "x1", method="mean")) == grpc.StatusCode.INVALID_ARGUMENT
        assert _code(lambda: c.combine_adapters(["a"], "x1", density=1.5, method="ties")) == \
            grpc.StatusCode.INVALID_ARGUMENT
        assert _code(lambda: c.combine_adapters(["a", "b"], "a")) == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(LoradRPCError) as info:  # different bases: the sentence names ids, not server paths
            c.combine_adapters(["other-base", "this-base"], "x1")
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "'other-base'" in info.value.details and str(server.root) not in info.value.details
        with pytest.raises(LoradRPCError) as info:  # rank 10 > --max-lora-rank 8
            c.combine_adapters(["a", "wide"], "x1", method="cat")
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "max-lora-rank 8" in info.value.details
        listed = {a.id for a in c.list_adapters().adapters}
        assert "x1" not in listed and not (server.root / "x1").exists()
        assert not [p for p in server.root.rglob("*") if p.name.startswith((".lorad-upload", "combine-"))]
        assert len(_greedy(c, "a")) == 12  # still serving


def test_merge_writes_a_folder_that_answers_like_the_served_adapter(server, tiny_base, monkeypatch):
    from transformers import AutoModelForCausalLM

    from lorad.server import offline_reference

    threads = []  # of every reference engine the merge builds: one thread, beside serving's

    class Spy(offline_reference.Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            threads.append(self.threads)

    monkeypatch.setattr(offline_reference, "Engine", Spy)
    # as on a many-core machine (here all-but-one is already 1): the default must not reach it
    monkeypatch.setattr("lorad.server.engine.default_threads", lambda: 7)
    with Client(server.target, timeout=600) as c:
        served = _greedy(c, "a")
        assert served != c.generate(PROMPT, max_new_tokens=12).token_ids  # the adapter changes the answer
        merges = _actions(server, "merge")
        merged = c.merge_adapter("a")
        assert _actions(server, "merge") == merges + 1
    assert merged.verified and merged.format == "hf" and merged.bytes > 0
    assert threads and set(threads) == {1}, threads
    assert merged.path == str(server.exports / "a-merged") and merged.max_logprob_error <= 1e-3
    assert merged.verification and "passed" in merged.verification[0]
    model = AutoModelForCausalLM.from_pretrained(merged.path, dtype=torch.float32).eval()
    ids = torch.tensor([server.engine.encode(PROMPT)])
    out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=tiny_base.tokenizer.eos_token_id)
    assert out[0, ids.shape[1]:].tolist() == served


def test_merge_runs_beside_serving_and_refuses_bad_outputs(server, monkeypatch):
    """While a merge is held inside its reference step: generation, listing and combine go on, a
    second merge is RESOURCE_EXHAUSTED; outputs only ever land inside --export-dir."""
    inside, release = threading.Event(), threading.Event()
    real = offline_reference.engine_reference

    def held(*args, **kwargs):
        inside.set()
        assert release.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(offline_reference, "engine_reference", held)
    results: list = []
    with Client(server.target, timeout=600) as c:
        first = threading.Thread(target=lambda: results.append(c.merge_adapter("b", output_name="b-folder")))
        first.start()
        try:
            assert inside.wait(120), "the merge never reached its reference step"
            assert len(_greedy(c, "a")) == 12 and c.list_adapters().adapters
            assert _code(lambda: c.merge_adapter("a", output_name="other")) == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            release.set()
            first.join(600)
        assert results and results[0].verified and results[0].path == str(server.exports / "b-folder")

        for name in ("../escape", "/tmp/abs", "a/b", "..", ".hidden"):
            assert _code(lambda: c.merge_adapter("a", output_name=name)) == grpc.StatusCode.INVALID_ARGUMENT, name
        assert _code(lambda: c.merge_adapter("a", output_name="b-folder")) == grpc.StatusCode.ALREADY_EXISTS
        assert _code(lambda: c.merge_adapter("nope")) == grpc.StatusCode.NOT_FOUND
        assert _code(lambda: c.merge_adapter("a", format="zip")) == grpc.StatusCode.INVALID_ARGUMENT
        # nothing else was written, and no scratch or staging folder is left behind
        assert {p.name for p in server.exports.iterdir()} - {"a-merged"} == {"b-folder"}
        assert not (server.tmp / "escape").exists()
        assert len(_greedy(c, "b")) == 12


def test_cli_combine_and_merge(server):
    from lorad.cli import main

    runner = CliRunner()
    target = ["--target", server.target]
    r = runner.invoke(main, ["adapters", "combine", "--out", "cli-ab", "--method", "svd", "--rank", "3", "a", "b:0.25",
                             *target])
    assert r.exit_code == 0, r.output
    assert "cli-ab: combined 2 adapters with svd (new), rank 3" in r.output
    assert "serving version " + adapter_digest(server.root / "cli-ab") in r.output
    r = runner.invoke(main, ["adapters", "combine", "--out", "cli-ab", "a", *target])
    assert r.exit_code == 1 and "ALREADY_EXISTS" in r.output and "replace" in r.output
    r = runner.invoke(main, ["adapters", "merge", "cli-ab", "--name", "../x", *target])
    assert r.exit_code == 1 and "INVALID_ARGUMENT" in r.output and "--export-dir" in r.output


def test_asyncio_client_combines_and_merges(server):
    import asyncio

    from lorad.clients import AsyncClient

    async def run():
        async with AsyncClient(server.target, timeout=600) as c:
            combined = await c.combine_adapters(["a", ("b", 2.0)], "async-ab", method="cat")
            merged = await c.merge_adapter("async-ab", format="gguf-adapter")
            return combined, merged

    combined, merged = asyncio.run(run())
    assert combined.rank == 6 and combined.overall_error == 0.0  # cat is exact
    assert merged.path == str(server.exports / "async-ab.gguf") and merged.verified and merged.bytes > 0
    assert "module deltas read back" in merged.verification[0]  # the adapter GGUF's check


def test_without_export_dir_merge_is_refused_with_a_sentence(tiny_base, tiny_geometry, tmp_path):
    root = tmp_path / "adapters"
    write_random_adapter(root / "a", tiny_geometry, rank=2, seed=1)
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=None, adapters_dir=str(root),
                          engine=EngineConfig(max_seq_len=64, kv_cache_memory="16MiB", max_lora_rank=8))
    with ServerThread(config, tiny_base) as srv, Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
        with pytest.raises(LoradRPCError) as info:
            c.merge_adapter("a")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "--export-dir" in info.value.details
