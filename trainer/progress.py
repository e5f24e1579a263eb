"""What a person watching a run sees, and what stays behind in the output folder.

  * a progress bar on stderr: step / total, loss, learning rate, tokens/s, ETA;
  * metrics.jsonl: one JSON object per logging step (train) and per evaluation (eval_loss);
  * loss_curve.png, drawn from metrics.jsonl at the end of the run (or at a stop);
  * a stop controller: SIGINT / SIGTERM or --stop-after N finish the current step, write a
    checkpoint and end the run cleanly, so `--resume` continues it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from lorad.trainer.errors import TrainingDivergedError

METRICS_FILE = "metrics.jsonl"
MEMORY_KEYS = ("peak_rss_mib", "peak_allocated_mib", "peak_reserved_mib")  # trainer/device_memory.py
LOSS_CURVE_FILE = "loss_curve.png"


class ProgressReporter(TrainerCallback):
    """Progress bar and metrics.jsonl (main process only)."""

    def __init__(self, output_dir: Path, enabled: bool, stream=None):
        self.metrics_path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.bar = None
        self.last_eval: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=state.max_steps,
            initial=state.global_step,
            unit="step",
            file=self.stream,
            dynamic_ncols=True,
            desc="train",
            mininterval=0.5,
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs and not math.isfinite(logs["loss"]):
            raise TrainingDivergedError(
                f"the training loss became {logs['loss']} at step {state.global_step}; lower learning_rate "
                f"(now {args.learning_rate}) or check the data. The last complete checkpoint is kept."
            )
        if not self.enabled:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            row.update(
                loss=logs["loss"],
                learning_rate=logs.get("learning_rate"),
                grad_norm=logs.get("grad_norm"),
                tokens=logs.get("tokens"),
                tokens_per_s=logs.get("tokens_per_s"),
                step_time_s=logs.get("step_time_s"),
                elapsed_s=logs.get("elapsed_s"),
                **{k: logs[k] for k in MEMORY_KEYS if k in logs},
            )
            if self.bar is not None:
                postfix = f"loss={logs['loss']:.4f} lr={logs.get('learning_rate', 0):.2e}"
                if logs.get("tokens_per_s"):
                    postfix += f" tok/s={logs['tokens_per_s']:.0f}"
                if self.last_eval is not None:
                    postfix += f" eval={self.last_eval:.4f}"
                self.bar.set_postfix_str(postfix, refresh=False)
        elif "eval_loss" in logs:
            row["eval_loss"] = logs["eval_loss"]
            self.last_eval = logs["eval_loss"]
            if self.bar is not None:
                self.bar.write(f"step {state.global_step}: eval_loss={logs['eval_loss']:.4f}", file=self.stream)
        else:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _parse_lines(text: str) -> list[tuple[str, dict]]:
    """(line, row) for every complete JSON object line. A line cut short by a kill in the middle
    of a write (the last one, without its newline, or any unparsable one) is skipped."""
    out = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            out.append((line, row))
    return out


def truncate_metrics(output_dir: Path, step: int) -> None:
    """On resume: drop metric rows past the checkpoint (the resumed run writes them again) and
    any torn line a killed run left."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = [line for line, row in _parse_lines(path.read_text(errors="replace")) if row["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [row for _, row in _parse_lines(path.read_text(errors="replace"))]


def plot_loss_curve(output_dir: Path) -> Path | None:
    rows = read_metrics(output_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean CE per trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(output_dir) / LOSS_CURVE_FILE
    fig.savefig(path)
    plt.close(fig)
    return path


class StopController(TrainerCallback):
    """Ends the run after the current optimizer step, with a checkpoint, when asked to.

    Asked by SIGINT/SIGTERM (Ctrl-C, a scheduler's pre-emption notice) or by --stop-after N.
    Under DDP the ranks agree on the decision each step (one all-reduce of a flag)."""

    def __init__(self, stop_after: int | None, world_size: int):
        self.stop_after = stop_after
        self.world_size = world_size
        self.signal_received: int | None = None
        self.stopped_at: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame):
        if self.signal_received is not None:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.signal_received = signum
        print(
            f"\nlorad train: got {signal.Signals(signum).name}; finishing this step and writing a checkpoint "
            "(press Ctrl-C again to abort without one)",
            file=sys.stderr,
        )

    def _should_stop(self, state) -> bool:
        wanted = self.signal_received is not None or (
            self.stop_after is not None and state.global_step >= self.stop_after
        )
        if self.world_size > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([1 if wanted else 0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            wanted = bool(flag.item())
        return wanted

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps and self._should_stop(state):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


class Stopwatch:
    """Wall time and token counts between two logging points (for tokens/s and step time)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.mark = self.start

    def lap(self) -> tuple[float, float]:
        now = time.perf_counter()
        lap, self.mark = now - self.mark, now
        return lap, now - self.start
