"""`lorad serve` as a user runs it: a real process on the embedded base, queried by `lorad generate`."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorad.cli import main
from lorad.demo import write_demo_adapters
from lorad.testing import ServeProcess

LORAD = str(Path(sys.executable).with_name("lorad"))


def _run(*args, timeout=120):
    return subprocess.run([LORAD, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm_dir):
    adapters = tmp_path_factory.mktemp("served-adapters")
    write_demo_adapters(adapters)
    log = tmp_path_factory.mktemp("log") / "serve.log"
    srv = ServeProcess(["--adapters", str(adapters), "--max-seq-len", "512", "--kv-cache-memory", "256MiB"], log)
    srv.start()
    yield srv.target, srv.proc, log
    srv.stop()


@pytest.mark.slow
def test_quickstart_requests_with_and_without_adapter(served):
    target, _, _ = served
    question = "What is the capital of France?"
    base = _run("generate", "--target", target, "--max-new-tokens", "24", question)
    demo_a = _run("generate", "--target", target, "--adapter", "demo-a", "--max-new-tokens", "24", question)
    demo_b = _run("generate", "--target", target, "--adapter", "demo-b", "--stream", "--max-new-tokens", "24", question)
    for result in (base, demo_a, demo_b):
        assert result.returncode == 0, result.stderr
    assert "Paris" in base.stdout  # coherent text from the real base
    outputs = {base.stdout.strip(), demo_a.stdout.strip(), demo_b.stdout.strip()}
    assert len(outputs) == 3  # each adapter changes the answer
    listing = _run("adapters", "--target", target)
    assert "demo-a" in listing.stdout and "device" in listing.stdout


@pytest.mark.slow
def test_sigterm_shuts_down_cleanly(served):
    _, proc, log = served
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert "shutting down" in log.read_text()


def test_serve_help_explains_the_options():
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--base", "--adapters", "--max-loras", "--max-cpu-loras", "--kv-cache-memory", "--metrics-port",
                   "--nf4-kernel-rows", "--lora-backend"):
        assert option in result.output


def test_the_cli_offers_every_lora_backend_the_kernels_have():
    from lorad.kernels import BACKENDS
    from lorad.server.config import LORA_BACKENDS

    assert LORA_BACKENDS == BACKENDS


@pytest.mark.parametrize(
    "args, message",
    [
        (["--base", "no-such-model-alias"], "neither a known alias"),
        (["--adapters", "/no/such/folder"], "is not a folder"),
        (["--kv-cache-memory", "lots"], "not a size"),
        (["--max-loras", "0"], "max_loras"),
        (["--port", "70000"], "port"),
    ],
)
def test_serve_refuses_bad_options_with_a_message(args, message):
    result = _run("serve", "--metrics-port", "-1", *args, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
