"""Exact resume. A run that stops (--stop-after) or is SIGKILLed, even in the middle of writing a
checkpoint, and is then resumed with --resume ends with the same adapter, bit for bit, and the
same loss log as the run that was never interrupted. Partial checkpoints are never picked, and a
resume with a different config says what differs.

The run exercises everything resume must restore: LoRA dropout (torch RNG), 8-bit AdamW state,
a warmup + cosine schedule, gradient accumulation with an uneven last micro-batch per epoch,
epoch boundaries (two epochs; the stop falls mid-epoch), gradient checkpointing, evaluation
every two steps (on AVX512-BF16 CPUs evaluation used to change the NF4 weight layout; see
recipe.keep_bnb_training_layout), and NF4 + bf16 autocast.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorad.trainer import checkpoint as ck
from trainer_helpers import (
    assert_same_adapter,
    cli_train,
    metrics,
    train_env,
    write_jsonl,
    write_yaml,
)

pytestmark = pytest.mark.slow

PAIRS = [(1, 2), (3, 4), (10, 5), (7, 7), (2, 9), (6, 1)]  # 5 train rows + 1 eval row
CONFIG = {
    "base_model": "smollm2-135m-instruct",
    "adapter": "qlora",
    "sequence_len": 64,
    "sample_packing": False,  # one sample per row: the step arithmetic below counts rows
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.1,
    "lora_target_modules": ["q_proj", "v_proj", "down_proj"],
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 2,  # 5 train rows -> 3 micro-batches -> 2 steps per epoch (2 + 1)
    "num_epochs": 2,  # 4 steps
    "optimizer": "adamw_bnb_8bit",
    "learning_rate": 0.001,
    "warmup_steps": 1,
    "gradient_checkpointing": True,
    "val_set_size": 1,
    "save_steps": 2,
    "seed": 3,
}

STALL_DRIVER = """
import os, sys, time
import lorad.trainer.checkpoint as ck
point, step, flag = os.environ["STALL_POINT"], os.environ["STALL_STEP"], os.environ["STALL_FLAG"]
real = getattr(ck, point)

def stall(path, *args, **kwargs):
    if path.name.endswith("-" + step):  # .tmp-checkpoint-N (fsync_tree) or checkpoint-N (write_marker)
        open(flag, "w").write(point)
        time.sleep(3600)
    return real(path, *args, **kwargs)

setattr(ck, point, stall)
from lorad.cli import main
sys.argv = ["lorad"] + sys.argv[1:]
main()
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("resume")
    rows = [{"q": f"What is {a} plus {b}?", "a": f"{a} plus {b} is {a + b}."} for a, b in PAIRS]
    data = write_jsonl(tmp / "sums.jsonl", rows)
    fmt = {"field_instruction": "q", "field_output": "a", "format": "Q: {instruction}\nA: ", "no_input_format": "Q: {instruction}\nA: "}
    write_yaml(tmp / "run.yaml", dict(CONFIG, datasets=[{"path": str(data), "type": fmt}], output_dir=str(tmp / "unused")))
    return tmp


def train(workdir: Path, out: str, *args: str, check: bool = True):
    """In this process (CliRunner); only the runs that get SIGKILLed need a process of their own."""
    return cli_train(str(workdir / "run.yaml"), "--set", f"output_dir={workdir / out}", *args, check=check)


@pytest.fixture(scope="module")
def uninterrupted(workdir) -> Path:
    train(workdir, "straight")
    return workdir / "straight"


TIMINGS = ("tokens_per_s", "step_time_s", "elapsed_s", "peak_rss_mib", "peak_allocated_mib", "peak_reserved_mib")  # measured, not computed


def assert_same_run(a: Path, b: Path) -> None:
    """Same adapter bits and the same log: steps, losses, eval losses, learning rates, grad norms."""
    assert_same_adapter(a, b)
    untimed = [[{k: v for k, v in row.items() if k not in TIMINGS} for row in metrics(run)] for run in (a, b)]
    assert untimed[0] == untimed[1], "loss / eval-loss logs differ"


def test_uninterrupted_run_checkpoints_every_save_steps(uninterrupted):
    root = uninterrupted / ck.CHECKPOINTS
    assert [c.step for c in ck.complete_checkpoints(root)] == [2, 4]
    assert not ck.incomplete_entries(root)
    assert [m["step"] for m in metrics(uninterrupted) if "eval_loss" in m] == [2, 4]
    assert (uninterrupted / "adapter_model.safetensors").is_file()


def stalled_run(workdir: Path, out: str, point: str, step: int, *args: str) -> str:
    """Start `lorad train` in its own process, let it freeze inside the checkpoint writer at
    `point` while saving `step`, SIGKILL it there, and return its stderr."""
    flag = workdir / f"stalled-{out}-{point}"
    driver = workdir / "stall_driver.py"
    driver.write_text(STALL_DRIVER)
    cmd = [sys.executable, str(driver), "train", str(workdir / "run.yaml"), "--set", f"output_dir={workdir / out}", *args]
    env = train_env(STALL_POINT=point, STALL_STEP=str(step), STALL_FLAG=str(flag))
    log = workdir / f"{out}-{point}.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 400
        while not flag.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before stalling:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("the run never reached the stall point")
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return log.read_text()


def test_stop_and_sigkills_mid_save_then_resume_equal_the_uninterrupted_run(workdir, uninterrupted):
    out = workdir / "interrupted"
    root = out / ck.CHECKPOINTS

    # 1. a clean stop after step 1, in the middle of epoch 0: a checkpoint, no adapter
    stopped = train(workdir, "interrupted", "--stop-after", "1")
    assert "stopped at step 1 of 4" in stopped.output
    assert not (out / "adapter_model.safetensors").exists(), "a stopped run must not publish an adapter"
    assert [c.step for c in ck.complete_checkpoints(root)] == [1]

    # 2. resumed, then SIGKILLed while checkpoint-2's files sit in the staging folder
    log = stalled_run(workdir, "interrupted", "fsync_tree", 2, "--resume")
    assert "checkpoint-1 (step 1, epoch 0, 2 micro-batches into it)" in log
    assert [c.step for c in ck.complete_checkpoints(root)] == [1]
    assert [p.name for p in ck.incomplete_entries(root)] == [".tmp-checkpoint-2"]

    # 3. resumed from step 1 again, then SIGKILLed after checkpoint-4 was renamed, before its marker
    log = stalled_run(workdir, "interrupted", "write_marker", 4, "--resume")
    assert "checkpoint-1 (step 1" in log and "removed an incomplete checkpoint" in log
    assert [c.step for c in ck.complete_checkpoints(root)] == [1, 2]
    assert (root / "checkpoint-4").is_dir() and not ck.is_complete(root / "checkpoint-4")

    # 4. the renamed-but-unmarked checkpoint-4 is not picked: the run continues from step 2
    final = train(workdir, "interrupted", "--resume")
    assert "checkpoint-2 (step 2, epoch 1, 0 micro-batches into it)" in final.output
    assert [c.step for c in ck.complete_checkpoints(root)] == [1, 2, 4]
    assert not ck.incomplete_entries(root)
    assert_same_run(uninterrupted, out)


def test_resume_with_a_different_config_says_what_differs(workdir, uninterrupted):
    result = train(workdir, "straight", "--resume", "--set", "lora_r=8", "--set", "seed=4", check=False)
    assert result.exit_code == 1
    assert "cannot resume from" in result.output and "checkpoint-4" in result.output
    assert "lora_r: checkpoint has 4, this run has 8" in result.output
    assert "seed: checkpoint has 3, this run has 4" in result.output
    assert "lora_alpha" not in result.output  # only what differs


def test_start_and_resume_refuse_the_wrong_folder(workdir, uninterrupted):
    # checkpoints present, no --resume: refuse to start over on top of them
    result = train(workdir, "straight", check=False)
    assert result.exit_code == 1
    assert "already holds checkpoints of a run (latest: step 4); pass --resume" in result.output
    # --resume with nothing to resume from
    result = train(workdir, "never-ran", "--resume", check=False)
    assert result.exit_code == 1 and "--resume: no complete checkpoint in" in result.output
    # --resume-from a folder without its commit marker
    partial = workdir / "partial" / ck.CHECKPOINTS / "checkpoint-9"
    partial.mkdir(parents=True)
    result = train(workdir, "partial", "--resume-from", str(partial), check=False)
    assert result.exit_code == 1 and "not a complete checkpoint" in result.output


def test_checkpoint_marker_guards_against_truncated_files(tmp_path):
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (folder / "optimizer.pt").write_bytes(b"x" * 100)
    ck.write_marker(folder, 5)
    assert ck.is_complete(folder)
    (folder / "optimizer.pt").write_bytes(b"x" * 10)  # same name, cut short
    assert not ck.is_complete(folder)
    renamed = tmp_path / "checkpoint-6"
    folder.rename(renamed)  # a marker for step 5 does not vouch for step 6
    assert not ck.is_complete(renamed)


def test_stop_controller_turns_a_signal_into_a_checkpoint_and_a_clean_stop():
    from types import SimpleNamespace

    from transformers import TrainerControl

    from lorad.trainer.progress import StopController

    stop = StopController(stop_after=None, world_size=1)
    state = SimpleNamespace(global_step=3, max_steps=10)
    control = stop.on_step_end(None, state, TrainerControl())
    assert not control.should_save and not control.should_training_stop
    stop._on_signal(signal.SIGTERM, None)  # what Ctrl-C / a scheduler's SIGTERM triggers
    control = stop.on_step_end(None, state, TrainerControl())
    assert control.should_save and control.should_training_stop and stop.stopped_at == 3
    with pytest.raises(KeyboardInterrupt):  # a second signal aborts at once
        stop._on_signal(signal.SIGINT, None)


def test_a_second_adapter_on_the_model_is_refused(tiny_base):
    """The 'double LoRA' of a resume that loads the checkpoint as another adapter (axolotl#2568)."""
    import copy

    from peft import get_peft_model

    from lorad.trainer.adapter import check_single_adapter, lora_config_for, lora_modules
    from lorad.trainer.config import config_from_dict
    from lorad.trainer.errors import CheckpointError

    cfg = config_from_dict({"datasets": [{"path": "d"}], "lora_target_modules": ["q_proj", "v_proj"]})
    model = get_peft_model(copy.deepcopy(tiny_base.model), lora_config_for(cfg))
    modules = lora_modules(model, cfg)
    assert len(modules) == 2 * 2  # tiny Llama: 2 layers x (q, v)
    check_single_adapter(model, modules)  # one adapter: fine
    model.add_adapter("second", lora_config_for(cfg))
    with pytest.raises(CheckpointError, match="an adapter was applied on top of another"):
        check_single_adapter(model, modules)
