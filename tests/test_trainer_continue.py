"""Continue and fork, memory you can see, and what the review found, through the real CLI on the
tiny random Llama (trainer_helpers.tiny_base_dir):

  * lora_model_dir starts from an existing adapter: its rank and targets win, a contradiction
    names both; --init-from CHECKPOINT starts a new run (fresh optimizer and schedule) from a
    checkpoint's adapter and the provenance names its parent; --resume stays strict;
  * metrics.jsonl and the provenance carry the peak memory; --dry-run says whether it fits;
  * a torn last line of metrics.jsonl does not stop --resume; the data position a checkpoint
    recorded is checked against the run's plan; an old transformers is refused by name.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import pytest
import torch

from lorad.trainer import checkpoint as ck
from trainer_helpers import adapter_tensors, cli_train, metrics, tiny_base_dir, write_jsonl, write_yaml

ROWS = [{"instruction": f"Add {a} and {b}.", "output": f"{a} plus {b} makes {a + b}."} for a in range(4) for b in range(3)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("continue")
    data = write_jsonl(tmp / "sums.jsonl", ROWS)
    write_yaml(tmp / "run.yaml", {
        "base_model": str(tiny_base_dir()),
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "output_dir": str(tmp / "unused"),
        "sequence_len": 64,
        "sample_packing": False,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "micro_batch_size": 4,
        "max_steps": 4,
        "learning_rate": 0.005,
        "bf16": False,
        "val_set_size": 2,
        "save_steps": 2,
        "seed": 9,
    })
    return tmp


def train(workdir: Path, out: str, *args: str, check: bool = True):
    return cli_train(str(workdir / "run.yaml"), "--set", f"output_dir={workdir / out}", *args, check=check)


@pytest.fixture(scope="module")
def parent(workdir) -> Path:
    train(workdir, "parent")
    return workdir / "parent"


# ---- lora_model_dir ----------------------------------------------------------------------------


def test_lora_model_dir_continues_from_the_adapter_with_its_shape(workdir, parent):
    result = train(workdir, "child", "--set", f"lora_model_dir={parent}")
    assert f"starting from: {parent} (lora_model_dir; fresh optimizer and schedule)" in result.output
    child = workdir / "child"
    # the first loss of the child is the parent's final model on the same rows, not a fresh start
    first_child = metrics(child)[0]["loss"]
    fresh = metrics(parent)[0]["loss"]
    assert first_child < fresh - 0.05, (first_child, fresh)
    config = json.loads((child / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    prov = json.loads((child / "lorad_provenance.json").read_text())
    assert prov["parent"]["kind"] == "lora_model_dir" and prov["parent"]["path"] == str(parent)
    assert prov["parent"]["adapter_sha256"].startswith("sha256:")


def test_lora_model_dir_that_contradicts_the_config_names_both(workdir, parent):
    result = train(workdir, "mismatch", "--set", f"lora_model_dir={parent}", "--set", "lora_r=8",
                   "--set", "lora_target_modules=[q_proj, k_proj]", check=False)
    assert result.exit_code == 1
    assert f"lora_model_dir: the adapter in {parent} does not match this config" in result.output
    assert "lora_r: the adapter has 4, this config has 8" in result.output
    assert "targets: the adapter has ['q_proj', 'v_proj'], this config has ['q_proj', 'k_proj']" in result.output


def test_lora_model_dir_must_hold_an_adapter(workdir, tmp_path):
    result = train(workdir, "nothing", "--set", f"lora_model_dir={tmp_path}", check=False)
    assert result.exit_code == 1 and f"lora_model_dir: {tmp_path} holds no PEFT adapter" in result.output


# ---- --init-from -------------------------------------------------------------------------------


def test_init_from_forks_a_checkpoint_with_a_fresh_schedule(workdir, parent):
    checkpoint = parent / "checkpoints" / "checkpoint-2"
    result = train(workdir, "fork", "--init-from", str(checkpoint), "--set", "learning_rate=0.001",
                   "--set", "max_steps=2", "--set", "lr_scheduler=constant")
    assert "init_from; fresh optimizer and schedule" in result.output
    fork = workdir / "fork"
    rows = [m for m in metrics(fork) if "loss" in m]
    assert [r["step"] for r in rows] == [1, 2]  # a new run: its own step count
    assert [r["learning_rate"] for r in rows] == [0.001, 0.001]  # the new schedule, from step 1
    # it starts from the parent's step-2 adapter: on the same first rows, lower than the parent's start
    assert rows[0]["loss"] < metrics(parent)[0]["loss"] - 0.05
    prov = json.loads((fork / "lorad_provenance.json").read_text())
    assert prov["parent"] == {"kind": "init_from", "path": str(checkpoint), "step": 2,
                              "adapter_sha256": prov["parent"]["adapter_sha256"]}
    from lorad.trainer.adapter import StartingAdapter

    assert prov["parent"]["adapter_sha256"] == StartingAdapter.read("init_from", checkpoint).sha256


def test_init_from_refuses_an_incomplete_checkpoint_and_resume(workdir, parent, tmp_path):
    partial = tmp_path / "checkpoints" / "checkpoint-3"
    partial.mkdir(parents=True)
    result = train(workdir, "fork2", "--init-from", str(partial), check=False)
    assert result.exit_code == 1 and f"--init-from {partial}: not a complete checkpoint" in result.output
    result = train(workdir, "parent", "--resume", "--init-from", str(parent / "checkpoints" / "checkpoint-2"), check=False)
    assert result.exit_code == 1 and "--init-from starts a new run from a checkpoint's adapter; --resume continues" in result.output


def test_a_start_in_a_folder_with_checkpoints_points_at_init_from(workdir, parent):
    result = train(workdir, "parent", check=False)
    assert result.exit_code == 1 and "already holds checkpoints" in result.output and "--init-from" in result.output


def test_resume_stays_strict_about_the_config(workdir, parent):
    result = train(workdir, "parent", "--resume", "--set", "learning_rate=0.001", check=False)
    assert result.exit_code == 1 and "learning_rate: checkpoint has 0.005, this run has 0.001" in result.output


# ---- memory --------------------------------------------------------------------------------------


def test_metrics_and_provenance_record_peak_memory(parent):
    rows = [m for m in metrics(parent) if "loss" in m]
    assert len(rows) == 4 and all(r["peak_rss_mib"] > 100 for r in rows)  # this process: torch alone is more
    prov = json.loads((parent / "lorad_provenance.json").read_text())
    peak = prov["training"]["peak_memory"]
    assert peak["device"] == "cpu_rss" and peak["peak_rss_mib"] == max(r["peak_rss_mib"] for r in rows)


def test_peak_memory_follows_an_allocation():
    from lorad.trainer.device_memory import PeakMemory

    probe = PeakMemory("cpu")
    probe.read()  # start an interval
    # 96 MiB of fresh pages, touched, then given back: an anonymous mapping, because malloc may
    # hand a tensor memory this (long-lived, test-suite) process already holds resident
    block = mmap.mmap(-1, 96 * 2**20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    block.close()
    high = probe.read()["peak_rss_mib"]  # the interval that held the block
    low = probe.read()["peak_rss_mib"]  # the next one, which did not
    if not probe.resettable:
        pytest.skip("this kernel does not let a process reset its RSS peak")
    assert high - low > 80, (high, low)


def test_dry_run_says_whether_the_estimate_fits(workdir, parent):
    result = cli_train(str(workdir / "run.yaml"), "--dry-run", "--set", f"output_dir={workdir / 'dry'}")
    verdict = result.output.strip().splitlines()[-1]
    assert verdict.startswith("fits: ") and "MiB free (MemAvailable;" in verdict
    result = cli_train(str(workdir / "run.yaml"), "--dry-run", "--set", "micro_batch_size=400000",
                       "--set", "sequence_len=4096", "--set", "sample_packing=false")
    assert result.output.strip().splitlines()[-1].startswith("does not fit: ")


# ---- what the review found -------------------------------------------------------------------------


def test_a_torn_last_metrics_line_does_not_stop_resume(workdir):
    out = workdir / "torn"
    train(workdir, "torn", "--stop-after", "2")
    path = out / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "epoch": 0.7, "loss": 1.2')  # a kill in the middle of a write
    result = train(workdir, "torn", "--resume")
    assert "done: adapter" in result.output
    steps = [m["step"] for m in metrics(out) if "loss" in m]
    assert steps == [1, 2, 3, 4]


def test_resume_checks_the_recorded_data_position(workdir, parent, tmp_path):
    import shutil

    copy = tmp_path / "copied"
    shutil.copytree(parent, copy)
    state_file = copy / "checkpoints" / "checkpoint-2" / ck.STATE_FILE
    state = json.loads(state_file.read_text())
    assert (state["epoch"], state["micro_batches_into_epoch"], state["rows_per_epoch"]) == (0, 2, 10)
    state["micro_batches_into_epoch"] = 1
    state_file.write_text(json.dumps(state))
    ck.write_marker(state_file.parent, 2)  # a consistent marker: only the position is wrong
    (copy / "checkpoints" / "checkpoint-4" / ck.MARKER).unlink()
    result = cli_train(str(workdir / "run.yaml"), "--set", f"output_dir={copy}", "--resume", check=False)
    assert result.exit_code == 1
    assert "it recorded the data position {'epoch': 0, 'micro_batches_into_epoch': 1" in result.output
    assert "step 2 of this run's plan is at {'epoch': 0, 'micro_batches_into_epoch': 2" in result.output


def test_an_older_transformers_is_refused_by_name(monkeypatch):
    import transformers

    from lorad.errors import LoradError
    from lorad.trainer.hf_trainer import check_transformers

    check_transformers()  # the pinned one passes
    monkeypatch.setattr(transformers, "__version__", "5.0.0")
    with pytest.raises(LoradError, match=r"lorad train needs transformers >= 5\.23\.0 .* has transformers 5\.0\.0"):
        check_transformers()
    import tomllib

    from trainer_helpers import REPO

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "transformers>=5.23,<6" in deps  # the floor pyproject states is the one checked


def test_adapter_weights_move_from_the_parent(parent):
    assert any(t.abs().sum() > 0 for k, t in adapter_tensors(parent).items() if "lora_B" in k)


def test_a_forked_run_resumes_after_its_parent_is_gone(workdir, parent, tmp_path):
    import shutil

    copy = tmp_path / "checkpoint-2"
    shutil.copytree(parent / "checkpoints" / "checkpoint-2", copy)
    train(workdir, "fork-resume", "--init-from", str(copy), "--set", "max_steps=3", "--stop-after", "1")
    shutil.rmtree(copy)  # the parent's files are not needed to continue the fork
    result = train(workdir, "fork-resume", "--resume", "--set", "max_steps=3")
    assert "done: adapter" in result.output
    prov = json.loads((workdir / "fork-resume" / "lorad_provenance.json").read_text())
    assert prov["parent"]["kind"] == "init_from" and prov["parent"]["path"] == str(copy)
