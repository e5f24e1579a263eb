"""Shared helpers of the trainer tests: write small datasets and configs, run the real
`lorad train` CLI in a subprocess, read adapters back.

Training subprocesses run with one torch thread: the result is then independent of how busy
the (shared, 2-core) machine is, and OpenMP threads do not spin against each other there.
Nothing here downloads: the base is the embedded SmolLM2 and the hub is switched off.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from lorad.deltas.factor import torch_threads  # noqa: F401 (the tests take it from here too)

REPO = Path(__file__).resolve().parents[1]

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def train_env(threads: int = 1, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra)
    return env


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_yaml(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def lorad_train_cmd(*args: str) -> list[str]:
    """The installed `lorad` entry point (run as a script, so the repository root, whose kernels/
    folder shadows the `kernels` package bitsandbytes probes for, is not on sys.path)."""
    script = Path(sys.executable).parent / "lorad"
    if script.is_file():
        return [sys.executable, str(script), "train", *args]
    return [sys.executable, "-m", "lorad.cli", "train", *args]


def run_train(*args: str, timeout: float = 600, check: bool = True, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`lorad train ARGS` in a subprocess; raises with its output when it fails and check is set."""
    proc = subprocess.run(
        lorad_train_cmd(*args), cwd=cwd or REPO, env=env or train_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"lorad train {' '.join(args)} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    """Bit-for-bit equality of two adapters' tensors (names, shapes, values)."""
    import torch

    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert sorted(ta) == sorted(tb), "the adapters hold different tensors"
    differing = [k for k in ta if not torch.equal(ta[k], tb[k])]
    worst = max(((ta[k] - tb[k]).abs().max().item(), k) for k in differing) if differing else None
    assert not differing, f"{len(differing)} of {len(ta)} tensors differ; largest |diff| {worst}"


def metrics(folder: Path) -> list[dict]:
    path = Path(folder) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(folder: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in metrics(folder) if "loss" in m]


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """The chat-template greedy answer of `model` to one user message."""
    import torch

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def cli_train(*args: str, check: bool = True, threads: int = 1):
    """`lorad train ARGS` in this process through click's CliRunner (no interpreter start-up, which
    costs ~10 s on this machine); returns click's Result (.exit_code, .output)."""
    from click.testing import CliRunner

    from lorad.cli import main

    with torch_threads(threads):
        result = CliRunner().invoke(main, ["train", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if check and result.exit_code != 0:
        raise AssertionError(f"lorad train {' '.join(args)} exited {result.exit_code}\n{result.output[-6000:]}")
    return result


def tiny_base_dir() -> Path:
    """A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer, saved once as a transformers
    checkpoint folder under the lorad cache, for `base_model:` in fast trainer tests (a training
    step takes milliseconds instead of seconds; NF4 works on it too)."""
    import fcntl

    from transformers import AutoTokenizer

    from lorad.base_model import cache_dir, embedded_model_dir
    from lorad.testing import tiny_llama

    target = cache_dir() / "test-bases" / "tiny-llama-2x64-v1"
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").is_file():
            tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
            model = tiny_llama(len(tokenizer), seed=0)
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.save_pretrained(target)
            tokenizer.save_pretrained(target)
            (target / ".complete").write_text("ok\n")
    return target


@contextlib.contextmanager
def hub_offline():
    """No hub for code run in this process, whatever the environment: datasets and huggingface_hub
    read their offline flags at import, so the flags are patched as well as set."""
    import datasets
    import huggingface_hub.constants as hub_constants
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(key, "1")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(hub_constants, "HF_HUB_OFFLINE", True)
        yield


def dataset_repository_copy(folder: Path, splits: dict[str, list[dict]], readme: str = "# a dataset\n") -> Path:
    """A folder laid out like a dataset repository on the hub (what `huggingface-cli download
    --repo-type dataset` writes): README.md and data/<split>-00000-of-00001.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text(readme)
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder
