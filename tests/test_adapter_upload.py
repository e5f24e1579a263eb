"""UploadAdapter against a real server on 127.0.0.1:0 (tiny random base): publish, serve at once,
refusals that publish nothing, and a SIGKILL in the middle of an upload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from lorad.base_model import BaseModelConfig
from lorad.clients import Client, LoradRPCError
from lorad.clients.types import upload_messages
from lorad.geometry import ModelGeometry
from lorad.server.adapter_publish import STAGING_PREFIX, adapter_digest
from lorad.server.config import EngineConfig, ServerConfig
from lorad.testing import ServerThread, write_random_adapter
from lorad.v1 import lorad_pb2, lorad_pb2_grpc

MAX_UPLOAD = 50_000


def _config(adapters_dir, **server):
    engine = EngineConfig(max_seq_len=128, kv_cache_memory="16MiB", max_lora_rank=8, max_loras=2, max_cpu_loras=4)
    return ServerConfig(host="127.0.0.1", port=0, metrics_port=None, adapters_dir=str(adapters_dir),
                        base=BaseModelConfig(), engine=engine, max_upload_bytes=MAX_UPLOAD, **server)


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    with ServerThread(_config(root), tiny_base) as srv:
        srv.root = root
        yield srv


@pytest.fixture()
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


def _published(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if not p.name.startswith(".")}


def test_upload_then_generate_at_once(server, client, tiny_geometry, tmp_path):
    src = write_random_adapter(tmp_path / "src", tiny_geometry, rank=4, seed=11, b_std=0.5)
    result = client.upload_adapter(src, "uploaded")
    assert not result.replaced and result.bytes_received > 0
    assert result.adapter.digest == adapter_digest(src) == adapter_digest(server.root / "uploaded")
    assert result.adapter.rank == 4 and result.adapter.base_match == "unknown"
    base = client.generate("The quick brown fox", max_new_tokens=8)
    served = client.generate("The quick brown fox", adapter_id="uploaded", max_new_tokens=8)
    assert served.token_ids != base.token_ids  # the uploaded adapter is what answered
    # the same bytes under a second id are reported as duplicates
    client.upload_adapter(src, "uploaded-copy")
    info = client.get_adapter("uploaded-copy")
    assert info.same_content_as == ["uploaded"] and info.digest == result.adapter.digest
    with pytest.raises(LoradRPCError) as exists:
        client.upload_adapter(src, "uploaded")
    assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS and "replace" in exists.value.details


def _raw_upload(server, messages):
    stub = lorad_pb2_grpc.AdapterManagerStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    with pytest.raises(grpc.RpcError) as info:
        stub.UploadAdapter(iter(messages), timeout=30)
    return info.value.code(), info.value.details()


def _header(adapter_id):
    return lorad_pb2.UploadAdapterRequest(header=lorad_pb2.UploadHeader(id=adapter_id))


def _chunk(name, data):
    return lorad_pb2.UploadAdapterRequest(chunk=lorad_pb2.FileChunk(name=name, data=data))


def _folder_messages(folder, adapter_id):
    return list(upload_messages(folder, adapter_id))


def test_refused_uploads_publish_nothing_and_the_server_stays_healthy(server, client, tiny_geometry, tmp_path):
    good = write_random_adapter(tmp_path / "good", tiny_geometry, rank=4, seed=1)
    truncated = write_random_adapter(tmp_path / "truncated", tiny_geometry, rank=4, seed=2)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    wrong_base = write_random_adapter(tmp_path / "wrong", tiny_geometry, rank=4, seed=3,
                                      base_model_name="meta-llama/Llama-3.1-8B-Instruct")
    other = ModelGeometry(num_layers=2, hidden_size=96, intermediate_size=128, num_heads=4, num_kv_heads=2,
                          head_dim=24, vocab_size=100, max_position_embeddings=128)
    wrong_size = write_random_adapter(tmp_path / "wrong-size", other, rank=4, seed=4, base_model_name="other-model")
    big = write_random_adapter(tmp_path / "big", tiny_geometry, rank=8, seed=5)
    assert (big / "adapter_model.safetensors").stat().st_size > MAX_UPLOAD
    config = (good / "adapter_config.json").read_bytes()
    before = _published(server.root)
    cases = [
        ("pickle-only", [_header("p"), _chunk("adapter_config.json", config), _chunk("adapter_model.bin", b"\x80\x04K.")],
         grpc.StatusCode.FAILED_PRECONDITION, "never unpickles"),
        ("traversal id", [_header("../../etc/x"), _chunk("adapter_config.json", config)],
         grpc.StatusCode.INVALID_ARGUMENT, "not a valid name"),
        ("traversal file name", [_header("t"), _chunk("../adapter_config.json", config)],
         grpc.StatusCode.INVALID_ARGUMENT, "is not one of"),
        ("oversized", _folder_messages(big, "big"), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit"),
        ("truncated safetensors", _folder_messages(truncated, "truncated"),
         grpc.StatusCode.FAILED_PRECONDITION, "safetensors"),
        ("wrong base by name", _folder_messages(wrong_base, "wrong"), grpc.StatusCode.FAILED_PRECONDITION,
         "'meta-llama/Llama-3.1-8B-Instruct'"),
        ("wrong hidden size", _folder_messages(wrong_size, "wrong-size"), grpc.StatusCode.FAILED_PRECONDITION,
         "hidden size 96"),
        ("no header", [_chunk("adapter_config.json", config)], grpc.StatusCode.INVALID_ARGUMENT, "header"),
        ("no weights", [_header("nw"), _chunk("adapter_config.json", config)],
         grpc.StatusCode.FAILED_PRECONDITION, "no adapter_model.safetensors"),
    ]
    for what, messages, code, words in cases:
        got, details = _raw_upload(server, messages)
        assert (got, words in details) == (code, True), f"{what}: {got} {details}"
        assert _published(server.root) == before, what
        assert not list(server.root.glob(STAGING_PREFIX + "*")), what
        assert client.health() == "SERVING"
    _, details = _raw_upload(server, _folder_messages(wrong_base, "wrong"))
    assert "tiny-llama" in details  # the sentence names both bases
    assert client.generate("still serving", max_new_tokens=2).completion_tokens >= 1


def test_cli_upload_list_show(server, tiny_geometry, tmp_path):
    from lorad.cli import main

    src = write_random_adapter(tmp_path / "cli", tiny_geometry, rank=4, seed=21)
    target = f"127.0.0.1:{server.port}"
    runner = CliRunner()
    up = runner.invoke(main, ["adapters", "upload", str(src), "--id", "from-cli", "--target", target])
    assert up.exit_code == 0, up.output
    assert "from-cli: uploaded" in up.output and adapter_digest(src) in up.output
    again = runner.invoke(main, ["adapters", "upload", str(src), "--id", "from-cli", "--target", target])
    assert again.exit_code == 1 and "ALREADY_EXISTS" in again.output
    for args in (["adapters", "--target", target], ["adapters", "list", "--target", target],
                 ["adapters", "--target", target, "list"]):
        listing = runner.invoke(main, args)
        assert listing.exit_code == 0 and "from-cli" in listing.output, args
    shown = runner.invoke(main, ["adapters", "show", "from-cli", "--target", target, "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["digest"] == adapter_digest(src)
    missing = runner.invoke(main, ["adapters", "show", "nope", "--target", target])
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.output
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K.")
    refused = runner.invoke(main, ["adapters", "upload", str(pickled), "--id", "p", "--target", target])
    assert refused.exit_code == 2 and "adapter_model.bin" in refused.output


# --- SIGKILL in the middle of an upload -----------------------------------------------------------

_CHILD = textwrap.dedent("""
    import sys, time, torch
    from transformers import AutoTokenizer
    from lorad.base_model import BaseModelConfig, LoadedBase, ResolvedBase, embedded_model_dir
    from lorad.server.config import EngineConfig, ServerConfig
    from lorad.testing import ServerThread, tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    base = LoadedBase(tiny_llama(len(tokenizer)), tokenizer, ResolvedBase("tiny-llama", "local", "<memory>", "none"),
                      torch.device("cpu"), torch.float32)
    engine = EngineConfig(max_seq_len=128, kv_cache_memory="16MiB", max_lora_rank=8, max_loras=2, max_cpu_loras=4)
    srv = ServerThread(ServerConfig(host="127.0.0.1", port=0, metrics_port=None, adapters_dir=sys.argv[1],
                                    base=BaseModelConfig(), engine=engine), base)
    print(srv.wait_started(), flush=True)
    time.sleep(600)
""")


def test_sigkill_mid_upload_leaves_nothing_half_published(tiny_base, tiny_geometry, tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    src = write_random_adapter(tmp_path / "src", tiny_geometry, rank=4, seed=3)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(root)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        port = int(child.stdout.readline())
        hold = threading.Event()

        def slow_stream():  # the header, half the weights, then the client stalls
            data = (src / "adapter_model.safetensors").read_bytes()
            yield _header("half")
            yield _chunk("adapter_config.json", (src / "adapter_config.json").read_bytes())
            yield _chunk("adapter_model.safetensors", data[: len(data) // 2])
            hold.wait(60)

        outcome = []

        def upload():
            stub = lorad_pb2_grpc.AdapterManagerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            try:
                stub.UploadAdapter(slow_stream(), timeout=60)
            except grpc.RpcError as err:
                outcome.append(err.code())

        thread = threading.Thread(target=upload)
        thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            staging = list(root.glob(STAGING_PREFIX + "half-*"))
            if staging and (staging[0] / "adapter_model.safetensors").is_file() \
                    and (staging[0] / "adapter_model.safetensors").stat().st_size > 0:
                break
            time.sleep(0.02)
        assert staging, "the upload never reached the server's staging folder"
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        hold.set()
        thread.join(30)
        assert outcome == [grpc.StatusCode.UNAVAILABLE]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not (root / "half").exists()  # never visible under its id
    assert staging[0].exists()  # what the kill left behind, until the next start
    with ServerThread(_config(root), tiny_base) as srv:
        assert not staging[0].exists()  # cleaned at start
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            assert "half" not in {a.id for a in c.list_adapters().adapters}
            c.upload_adapter(src, "half")  # and the same id uploads cleanly afterwards
            assert c.generate("hi", adapter_id="half", max_new_tokens=2).completion_tokens >= 1


def _read_only_mount(source: Path, target: Path) -> bool:
    """Bind-mount source read-only at target (root with mount rights, as in CI); False where the
    machine does not allow it."""
    target.mkdir()
    if os.geteuid() != 0:
        return False
    bind = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True)
    if bind.returncode != 0:
        return False
    ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True)
    if ro.returncode != 0:
        subprocess.run(["umount", str(target)], check=False)
        return False
    return True


def test_a_read_only_adapters_folder_serves_and_refuses_writes_with_a_sentence(tiny_base, tiny_geometry, tmp_path):
    """A read-only volume shared by replicas: the server starts, lists and serves its adapters;
    upload, replace, delete and combine get FAILED_PRECONDITION naming the cause."""
    source = tmp_path / "adapters"
    write_random_adapter(source / "there", tiny_geometry, rank=4, seed=3, b_std=0.5)
    read_only = tmp_path / "read-only"
    if not _read_only_mount(source, read_only):
        if os.geteuid() == 0:
            pytest.skip("this machine does not let root bind-mount a folder read-only")
        read_only.rmdir()
        read_only = source
        os.chmod(read_only, 0o555)  # not root: permissions are enough
    try:
        new = write_random_adapter(tmp_path / "new", tiny_geometry, rank=4, seed=4, b_std=0.5)
        with ServerThread(_config(read_only), tiny_base) as srv, Client(f"127.0.0.1:{srv.port}", timeout=60) as c:
            assert [a.id for a in c.list_adapters().adapters] == ["there"]
            base = c.generate("The quick brown fox", max_new_tokens=6)
            assert c.generate("The quick brown fox", adapter_id="there", max_new_tokens=6).token_ids != base.token_ids
            for attempt in (lambda: c.upload_adapter(new, "new"), lambda: c.upload_adapter(new, "there", replace=True),
                            lambda: c.delete_adapter("there")):
                with pytest.raises(LoradRPCError) as refused:
                    attempt()
                assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION, refused.value
                assert "adapters folder of this server is read-only" in refused.value.details
            assert c.generate("The quick brown fox", adapter_id="there", max_new_tokens=6).token_ids != base.token_ids
            assert sorted(p.name for p in read_only.iterdir()) == ["there"]
    finally:
        if read_only != source:
            subprocess.run(["umount", str(read_only)], check=False)
        else:
            os.chmod(source, 0o755)


def test_upload_disk_work_runs_off_the_event_loop_and_a_cancel_frees_its_place(server, client, tiny_geometry,
                                                                               tmp_path, monkeypatch):
    """begin (mkdir, flock) and every chunk's write (sha256, fsync) run on worker threads, never on
    the loop serving every call; a client that cancels mid-upload leaves no staging folder and
    gives its upload place back."""
    from lorad.server import adapter_publish

    threads = []
    begin, write = adapter_publish.AdapterPublisher.begin, adapter_publish.Upload.write

    def spy(fn):
        def run(*args, **kwargs):
            threads.append(threading.current_thread())
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(adapter_publish.AdapterPublisher, "begin", spy(begin))
    monkeypatch.setattr(adapter_publish.Upload, "write", spy(write))
    src = write_random_adapter(tmp_path / "src", tiny_geometry, rank=4, seed=12, b_std=0.5)
    client.upload_adapter(src, "off-loop")
    assert len(threads) >= 3 and server.thread not in threads  # begin + at least one chunk per file

    publisher = server.server.admin.publisher
    assert publisher._active == 0
    hold = threading.Event()

    def messages():
        yield from _folder_messages(src, "cancelled")[:2]  # the header and a first chunk
        hold.wait(30)

    stub = lorad_pb2_grpc.AdapterManagerStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    call = stub.UploadAdapter.future(messages(), timeout=30)
    deadline = time.time() + 20
    while not list(server.root.glob(STAGING_PREFIX + "cancelled*")) and time.time() < deadline:
        time.sleep(0.01)
    assert publisher._active == 1
    call.cancel()
    hold.set()
    deadline = time.time() + 20
    while (publisher._active or list(server.root.glob(STAGING_PREFIX + "*"))) and time.time() < deadline:
        time.sleep(0.01)
    assert publisher._active == 0 and not list(server.root.glob(STAGING_PREFIX + "*"))
    assert "cancelled" not in _published(server.root)
