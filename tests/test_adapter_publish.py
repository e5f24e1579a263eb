"""Adapter digests, atomic publishing and the base check (lorad.server.adapter_publish, .base_match).

Real folders on disk; crash windows are reproduced by stopping halfway through the same steps
the publisher takes."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from lorad.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    IntegrityError,
    InvalidAdapterError,
    InvalidRequestError,
    LimitExceededError,
)
from lorad.geometry import ModelGeometry
from lorad.server import adapter_publish, base_match
from lorad.server.adapter_store import AdapterStore
from lorad.server.adapter_publish import (
    STAGING_PREFIX,
    TRASH_DIR,
    AdapterPublisher,
    DigestMemo,
    UploadLimits,
    adapter_digest,
)
from lorad.testing import write_random_adapter

GEOMETRY = ModelGeometry(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                         head_dim=16, vocab_size=100, max_position_embeddings=128)
OTHER = ModelGeometry(num_layers=2, hidden_size=96, intermediate_size=128, num_heads=4, num_kv_heads=2,
                      head_dim=24, vocab_size=100, max_position_embeddings=128)
FILES = ("adapter_config.json", "adapter_model.safetensors")


def _send(upload, folder: Path, chunk: int = 1000) -> None:
    for name in FILES:
        data = (folder / name).read_bytes()
        for i in range(0, len(data), chunk):
            upload.write(name, data[i : i + chunk])


def _visible(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if not p.name.startswith(".")}


@pytest.fixture()
def source(tmp_path):
    return write_random_adapter(tmp_path / "src", GEOMETRY, rank=4, seed=1)


def test_digest_depends_on_content_only(tmp_path, source):
    copy = shutil.copytree(source, tmp_path / "copy")
    os.utime(copy / "adapter_model.safetensors", (1, 1))  # other mtime, same bytes
    other = write_random_adapter(tmp_path / "other", GEOMETRY, rank=4, seed=2)
    assert adapter_digest(source) == adapter_digest(copy)
    assert adapter_digest(source) != adapter_digest(other)
    assert adapter_digest(source).startswith("sha256:") and len(adapter_digest(source)) == 7 + 64
    (copy / "lorad_provenance.json").write_text("{}")  # provenance is part of a version
    assert adapter_digest(source) != adapter_digest(copy)


def test_digest_memo_rereads_changed_files(tmp_path, source):
    memo = DigestMemo()
    first = memo.digest(source)
    write_random_adapter(source, GEOMETRY, rank=4, seed=9)
    assert memo.digest(source) == adapter_digest(source) != first


def test_upload_publishes_atomically_and_leaves_no_staging(tmp_path, source):
    root = tmp_path / "adapters"
    publisher = AdapterPublisher(root)
    seen = []
    with publisher.begin("new-one") as upload:
        _send(upload, source)
        assert _visible(root) == set()  # nothing visible while receiving
        published = upload.finish(lambda path: seen.append(sorted(p.name for p in path.iterdir())))
    assert seen == [[".lock", *sorted(FILES)]]  # validation sees the whole folder before it is visible
    assert _visible(root) == {"new-one"}
    assert published.digest == adapter_digest(root / "new-one") == adapter_digest(source)
    assert published.bytes_received == sum((source / n).stat().st_size for n in FILES)
    assert not [p for p in root.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert sorted(p.name for p in (root / "new-one").iterdir()) == sorted(FILES)


def test_refused_uploads_publish_nothing(tmp_path, source):
    root = tmp_path / "adapters"
    publisher = AdapterPublisher(root, UploadLimits(max_bytes=20_000, max_json_bytes=50))

    def attempt(fn, error, adapter_id="x"):
        with pytest.raises(error):
            with publisher.begin(adapter_id) as upload:
                fn(upload)
        assert _visible(root) == set() and not list(root.glob(STAGING_PREFIX + "*"))

    attempt(lambda u: u.write("adapter_model.bin", b"\x80\x04"), InvalidAdapterError)  # pickle: never
    attempt(lambda u: u.write("../evil", b"x"), InvalidRequestError)
    attempt(lambda u: u.write("adapter_model.safetensors", b"x" * 30_000), LimitExceededError)
    attempt(lambda u: u.write("adapter_config.json", b"{" * 60), LimitExceededError)
    attempt(lambda u: (u.write("adapter_config.json", b"{}"), u.write("adapter_model.safetensors", b"x"),
                       u.write("adapter_config.json", b"{}")), InvalidRequestError)  # interleaved
    attempt(lambda u: (u.write("adapter_config.json", b"{}"), u.finish(lambda p: None)), InvalidAdapterError)

    def failing_validation(u):
        u.write("adapter_config.json", b"{}")
        u.write("adapter_model.safetensors", b"12345678")
        u.finish(lambda p: (_ for _ in ()).throw(InvalidAdapterError("truncated")))

    attempt(failing_validation, InvalidAdapterError)
    for bad_id in ("../x", "a/b", ".hidden", "", "a" * 200):
        with pytest.raises(InvalidRequestError):
            publisher.begin(bad_id)
    assert publisher._active == 0  # every refused upload gave its place back


def test_expected_digest_is_checked(tmp_path, source):
    publisher = AdapterPublisher(tmp_path / "adapters")
    with pytest.raises(IntegrityError, match="announced"):
        with publisher.begin("x", expected_digest="sha256:" + "0" * 64) as upload:
            _send(upload, source)
            upload.finish(lambda p: None)
    with publisher.begin("x", expected_digest=adapter_digest(source)) as upload:
        _send(upload, source)
        assert upload.finish(lambda p: None).digest == adapter_digest(source)


def test_existing_id_needs_replace_and_concurrency_is_bounded(tmp_path, source):
    publisher = AdapterPublisher(tmp_path / "adapters", UploadLimits(max_concurrent=2))
    with publisher.begin("x") as upload:
        _send(upload, source)
        upload.finish(lambda p: None)
    with pytest.raises(AdapterExistsError, match="replace"):
        publisher.begin("x")
    first, second = publisher.begin("a"), publisher.begin("b")
    with pytest.raises(LimitExceededError, match="uploads"):
        publisher.begin("c")
    first.abort()
    publisher.begin("c").abort()
    second.abort()


@pytest.mark.parametrize("verdict", ["accept", "refuse"])
def test_leaving_an_upload_while_finish_validates_changes_nothing(tmp_path, source, verdict):
    """A client that cancels while finish() validates on a worker thread: the context exits
    (abort) during validation. finish alone decides: the staging folder stays under the
    validator, the folder is published whole or not at all, and the upload slot is released
    once (it used to be released twice, _active going to -1 and raising the limit)."""
    root = tmp_path / "adapters"
    publisher = AdapterPublisher(root, UploadLimits(max_concurrent=1))
    validating, go_on = threading.Event(), threading.Event()
    seen, outcome = [], []

    def validate(path):
        validating.set()
        assert go_on.wait(30)
        seen.append(sorted(p.name for p in path.iterdir()))  # still all there after the abort
        if verdict == "refuse":
            raise InvalidAdapterError("refused")

    def finish(upload):
        try:
            outcome.append(upload.finish(validate))
        except InvalidAdapterError as exc:
            outcome.append(exc)

    with publisher.begin("x") as upload:
        _send(upload, source)
        worker = threading.Thread(target=finish, args=(upload,))
        worker.start()
        assert validating.wait(30)
    # the context was left (the cancelled RPC), finish still validating
    assert publisher._active == 1 and list(root.glob(STAGING_PREFIX + "*"))
    go_on.set()
    worker.join(30)
    assert seen == [[".lock", *sorted(FILES)]]
    assert publisher._active == 0
    assert not list(root.glob(STAGING_PREFIX + "*"))
    if verdict == "accept":
        assert _visible(root) == {"x"} and adapter_digest(root / "x") == adapter_digest(source)
    else:
        assert isinstance(outcome[0], InvalidAdapterError) and _visible(root) == set()
    publisher.begin("y").abort()  # the limit is still one upload at a time
    first = publisher.begin("y")
    with pytest.raises(LimitExceededError):
        publisher.begin("z")
    first.abort()
    assert publisher._active == 0


def test_replace_swaps_versions_and_trash_is_purged(tmp_path, source):
    root = tmp_path / "adapters"
    publisher = AdapterPublisher(root)
    v2 = write_random_adapter(tmp_path / "v2", GEOMETRY, rank=4, seed=2)
    with publisher.begin("x") as upload:
        _send(upload, source)
        upload.finish(lambda p: None)
    with publisher.begin("x", replace=True) as upload:
        _send(upload, v2)
        published = upload.finish(lambda p: None)
    assert published.replaced and published.previous_digest == adapter_digest(source)
    assert adapter_digest(root / "x") == adapter_digest(v2)
    assert published.previous_trash.parent == root / TRASH_DIR and published.previous_trash.is_dir()
    publisher.purge(published.previous_trash)
    assert not published.previous_trash.exists()


@pytest.mark.parametrize("atomic_exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_reader_never_finds_a_replaced_id_missing(tmp_path, source, monkeypatch, atomic_exchange):
    """While an id is replaced again and again, a reader asking the store for it always gets a
    folder: at once where the filesystem swaps the two folders in one call (Linux
    renameat2 RENAME_EXCHANGE), by waiting for the publish lock where it cannot."""
    if not atomic_exchange:
        monkeypatch.setattr(adapter_publish, "exchange", lambda a, b: False)
    root = tmp_path / "adapters"
    publisher = AdapterPublisher(root)
    store = AdapterStore(root, GEOMETRY, max_rank=8)
    versions = [source, write_random_adapter(tmp_path / "v2", GEOMETRY, rank=2, seed=2)]
    with publisher.begin("x") as upload:
        _send(upload, source)
        upload.finish(lambda p: None)
    stop, misses, reads = threading.Event(), [], [0]

    def read():
        while not stop.is_set():
            try:
                store.path_for("x")
                reads[0] += 1
            except AdapterNotFoundError as err:
                misses.append(str(err))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(60):
            with publisher.begin("x", replace=True) as upload:
                _send(upload, versions[i % 2], chunk=1 << 20)
                publisher.purge(upload.finish(lambda p: None).previous_trash)
    finally:
        stop.set()
        reader.join()
    assert reads[0] > 0 and not misses, (reads, misses[:3])
    assert adapter_digest(root / "x") == adapter_digest(versions[1]) and not list((root / TRASH_DIR).iterdir())


def test_delete_renames_out_first(tmp_path, source):
    root = tmp_path / "adapters"
    shutil.copytree(source, root / "x")
    publisher = AdapterPublisher(root)
    out = publisher.retire("x")
    assert _visible(root) == set() and out.is_dir()
    publisher.purge(out)
    assert not out.exists()
    with pytest.raises(AdapterNotFoundError):
        publisher.retire("x")


def test_recover_after_crashes(tmp_path, source):
    """What a SIGKILL can leave: a half upload, a replace stopped between its two renames, a
    delete not yet removed. recover() brings back a consistent folder."""
    root = tmp_path / "adapters"
    shutil.copytree(source, root / "kept")
    shutil.copytree(source, root / "deleted")
    (root / (STAGING_PREFIX + "half-1234")).mkdir()
    (root / (STAGING_PREFIX + "half-1234") / "adapter_model.safetensors").write_bytes(b"half")
    publisher = AdapterPublisher(root)
    publisher._rename_out("kept", "replace")  # the old version is out, the new one never came in
    publisher._rename_out("deleted", "delete")
    live = publisher.begin("live")  # another upload still being written: its flock is held
    actions = publisher.recover()
    assert _visible(root) == {"kept"} and adapter_digest(root / "kept") == adapter_digest(source)
    assert any("restored adapter 'kept'" in a for a in actions)
    assert not (root / (STAGING_PREFIX + "half-1234")).exists()
    assert live.staging.is_dir()  # not removed under a live writer
    assert list((root / TRASH_DIR).iterdir()) == []
    live.abort()


# --- the base check -------------------------------------------------------------------------------


SERVED = base_match.ServedBase("smollm2-135m-instruct", 64, "sha256:" + "a" * 64,
                               ("HuggingFaceTB/SmolLM2-135M-Instruct", "/cache/lorad/smollm2"))


def _provenance(path: Path, name: str, digest: str | None) -> None:
    (path / "lorad_provenance.json").write_text(json.dumps({"base_model": {"name": name, "weights_digest": digest}}))


@pytest.mark.parametrize(
    "name, digest, geometry, verdict, words",
    [
        ("", None, GEOMETRY, "unknown", ""),
        ("smollm2-135m-instruct", "sha256:" + "a" * 64, GEOMETRY, "yes", ""),
        ("renamed-copy", "sha256:" + "a" * 64, GEOMETRY, "yes", ""),  # the digest decides
        ("smollm2-135m-instruct", "sha256:" + "b" * 64, GEOMETRY, "no", "base weights differ"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", None, GEOMETRY, "yes", ""),
        ("/other/place/SmolLM2", None, GEOMETRY, "yes", ""),  # same last path component
        ("meta-llama/Llama-3.1-8B-Instruct", None, GEOMETRY, "no", "names differ"),
        ("", None, OTHER, "no", "hidden sizes differ"),
    ],
)
def test_base_match(tmp_path, name, digest, geometry, verdict, words):
    path = write_random_adapter(tmp_path / "a", geometry, rank=4, seed=1)
    if digest:
        _provenance(path, name, digest)
    else:
        config = json.loads((path / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = name
        (path / "adapter_config.json").write_text(json.dumps(config))
    trained = base_match.read_trained_for(path)
    assert trained.hidden_size == geometry.hidden_size
    got, why = base_match.match(trained, SERVED)
    assert got == verdict and words in why
    if verdict == "no":
        with pytest.raises(InvalidAdapterError) as info:
            base_match.check("a", path, SERVED)
        assert "'smollm2-135m-instruct'" in str(info.value) and "this server serves" in str(info.value)
        assert (name and repr(name) in str(info.value)) or f"hidden size {geometry.hidden_size}" in str(info.value)
