"""Property-based fuzz of adapter folders (hypothesis) written into a live server's adapters
folder while traffic runs.

Each example writes (or rewrites: ids are reused, so replaced files are exercised too) one
folder: a valid PEFT adapter with its adapter_config.json and/or its safetensors header and data
mutated, a file linked out of the folder, a file missing, a folder where a file should be.
Meanwhile other threads keep generating with a good adapter, the base and the hostile ids.
After each example: ListAdapters answers and lists the folder (valid, or with an error that
names the adapter id and no server path), a request for it ends OK or with its own status, the
server is SERVING; at the end the good adapter's and the base's greedy tokens never changed,
and /metrics shows nothing running or waiting.

Bounded to about a minute on 2 cores; LORAD_FUZZ_EXAMPLES=2000 for a long run (-s prints the
tally).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorad.clients import Client, LoradRPCError
from lorad.testing import ServerThread, write_random_adapter
from serving_helpers import server_config, wait_gauges_idle

EXAMPLES = int(os.environ.get("LORAD_FUZZ_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=bool(os.environ.get("CI")),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
HOSTILE_IDS = ["h0", "h1", "h2", "h3"]
PROMPT = "Once upon a time"
ADAPTER_STATUSES = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}
CONFIG_KEYS = ["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "peft_type", "bias", "use_dora",
               "modules_to_save", "target_modules", "fan_in_fan_out", "layer_replication", "task_type"]
RAW_VALUES = ["NaN", "Infinity", "-Infinity", "1e400", "9" * 5000, "[" * 5000 + "]" * 5000,
              json.dumps({r"(\w*\.?\w*)*Z": 4}), json.dumps({"(": 4}), json.dumps({"(?=q)q_proj": 4}),
              json.dumps({r"layers\.0\..*": 8}), json.dumps({"q_proj": 1e39})]


class Traffic:
    """Threads that keep generating (good adapter, base, hostile ids) and record any answer that
    differs from the reference, or any status a hostile folder must never cause."""

    def __init__(self, port: int, reference: dict):
        self.port, self.reference = port, reference
        self.mismatches: list = []
        self.bad_status: list = []
        self.calls = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(3)]

    def _run(self, i: int) -> None:
        with Client(f"127.0.0.1:{self.port}", timeout=30) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                adapter = ["good", None, HOSTILE_IDS[n % len(HOSTILE_IDS)]][(i + n) % 3]
                try:
                    tokens = client.generate(PROMPT, adapter_id=adapter, max_new_tokens=6).token_ids
                except LoradRPCError as err:
                    if adapter in self.reference or err.code not in ADAPTER_STATUSES:
                        self.bad_status.append((adapter, err.code, err.details))
                else:
                    if adapter in self.reference and tokens != self.reference[adapter]:
                        self.mismatches.append((adapter, tokens))
                self.calls += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)


@pytest.fixture(scope="module")
def fuzz_server(tiny_base, tiny_geometry, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-adapter-folders")
    outside = tmp_path_factory.mktemp("outside-the-folder")
    template = write_random_adapter(outside / "template", tiny_geometry, rank=4, seed=5, b_std=0.5)
    write_random_adapter(root / "good", tiny_geometry, rank=4, seed=1, b_std=0.5)
    config = server_config(root, max_seq_len=128, max_batch_size=8, max_loras=3, max_cpu_loras=4)
    tally = Counter()
    with ServerThread(config, tiny_base) as srv:
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as client:
            reference = {a: client.generate(PROMPT, adapter_id=a, max_new_tokens=6).token_ids for a in ("good", None)}
        srv.root, srv.template, srv.tally = root, template, tally
        with Traffic(srv.port, reference) as traffic:
            srv.traffic = traffic
            yield srv
        assert traffic.mismatches == [], traffic.mismatches[:5]
        assert traffic.bad_status == [], traffic.bad_status[:5]
        assert wait_gauges_idle(srv.server.metrics_port) == (0.0, 0.0)
    print(f"\nfuzzed adapter folders: {tally['folders']} hostile folders ({tally['listed_valid']} still valid, "
          f"{tally['listed_error']} listed with an error, {tally['refused']} requests refused), "
          f"{traffic.calls} requests of concurrent traffic, answers changed: {len(traffic.mismatches)}, leaks: 0")


# --- strategies ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def config_bytes(draw, valid: dict) -> bytes:
    kind = draw(st.sampled_from(["edit", "edit", "edit", "raw_value", "random_json", "random_bytes", "truncated"]))
    if kind == "random_bytes":
        return draw(st.binary(max_size=300))
    if kind == "random_json":
        return json.dumps(draw(json_values)).encode()
    config = dict(valid)
    for _ in range(draw(st.integers(1, 3))):
        config[draw(st.sampled_from(CONFIG_KEYS))] = draw(json_values)
    text = json.dumps(config)
    if kind == "raw_value":  # values json.dumps cannot write: NaN, 1e400, deep nesting, hostile patterns
        config[draw(st.sampled_from(CONFIG_KEYS))] = "@@RAW@@"
        text = json.dumps(config).replace('"@@RAW@@"', draw(st.sampled_from(RAW_VALUES)))
    if kind == "truncated":
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode()


@st.composite
def weights_bytes(draw, valid: bytes) -> bytes:
    n = int.from_bytes(valid[:8], "little")
    header, data = json.loads(valid[8 : 8 + n]), bytearray(valid[8 + n :])
    kind = draw(st.sampled_from(["header", "header", "length", "data", "truncate", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "length":
        return draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + valid[8:]
    if kind == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "data":  # flipped bytes: other weights, or NaN / Inf / huge values
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    else:
        names = sorted(k for k in header if k != "__metadata__")
        for _ in range(draw(st.integers(1, 3))):
            name = draw(st.sampled_from(names))
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "rename", "metadata"]))
            if field == "drop":
                header.pop(name, None)
            elif field == "rename":
                header[draw(st.text(max_size=30))] = header.pop(name, {})
            elif field == "metadata":
                header["__metadata__"] = draw(json_values)
            elif name in header:
                header[name][field] = draw(st.one_of(json_values, st.sampled_from(["F16", "BF16", "I64", "F64"])))
    blob = json.dumps(header).encode()
    return len(blob).to_bytes(8, "little") + blob + bytes(data)


@st.composite
def hostile_folders(draw, template) -> dict:
    valid_config = json.loads((template / "adapter_config.json").read_text())
    valid_weights = (template / "adapter_model.safetensors").read_bytes()
    target = draw(st.sampled_from(["config", "weights", "both", "link_out", "missing", "folder_as_file"]))
    files = {"adapter_config.json": json.dumps(valid_config).encode(), "adapter_model.safetensors": valid_weights}
    if target in ("config", "both"):
        files["adapter_config.json"] = draw(config_bytes(valid_config))
    if target in ("weights", "both"):
        files["adapter_model.safetensors"] = draw(weights_bytes(valid_weights))
    if target in ("link_out", "missing", "folder_as_file"):
        files[draw(st.sampled_from(sorted(files)))] = target
    # ids are reused: half the rewrites replace files in place, half start from an empty folder
    return {"id": draw(st.sampled_from(HOSTILE_IDS)), "files": files, "fresh": draw(st.booleans())}


def _write_folder(srv, folder: dict) -> None:
    path = srv.root / folder["id"]
    if path.exists() and folder["fresh"]:
        shutil.rmtree(path)
    path.mkdir(exist_ok=True)
    for name, content in folder["files"].items():
        file = path / name
        if file.is_symlink() or file.is_file():
            file.unlink()
        elif file.is_dir():
            shutil.rmtree(file)
        if content == "link_out":
            file.symlink_to(srv.template / name)
        elif content == "folder_as_file":
            file.mkdir()
        elif content != "missing":
            file.write_bytes(content)


@SETTINGS
@given(data=st.data())
def test_hostile_adapter_folders_never_harm_other_tenants(fuzz_server, data):
    srv = fuzz_server
    folder = data.draw(hostile_folders(srv.template))
    _write_folder(srv, folder)
    srv.tally["folders"] += 1
    adapter_id = folder["id"]
    with Client(f"127.0.0.1:{srv.port}", timeout=30) as client:
        listing = {a.id: a for a in client.list_adapters(timeout=20).adapters}
        assert listing["good"].error == ""
        if adapter_id in listing:  # a folder without a readable config is not an adapter at all
            error = listing[adapter_id].error
            srv.tally["listed_error" if error else "listed_valid"] += 1
            assert error == "" or error.startswith(f"adapter '{adapter_id}'"), error
            assert str(srv.root) not in error and str(srv.template) not in error and len(error) < 1000
        try:
            client.generate(PROMPT, adapter_id=adapter_id, max_new_tokens=4)
        except LoradRPCError as err:
            srv.tally["refused"] += 1
            assert err.code in ADAPTER_STATUSES, (err.code, err.details)
            assert str(srv.root) not in err.details and "class" not in err.details
        assert client.health() == "SERVING"
    assert srv.traffic.bad_status == [] and srv.traffic.mismatches == []
