"""transformers' Trainer, with the four things lorad owns replaced.

  * loss: summed CE over trained tokens / trained tokens of the whole optimizer step, counted
    from the already-shifted targets and summed over ranks (trainer/loss.py);
  * order: rows shuffled by (seed, epoch) only, so a mid-epoch resume sees the same order;
  * evaluation: the same token-weighted loss over the eval rows, each row seen exactly once;
  * checkpoints: written by the recipe's crash-safe writer (trainer/checkpoint.py).

Everything else (optimizers, schedulers, accumulation, DDP, mixed precision, resume of
optimizer/scheduler/RNG/data position) is transformers' and accelerate's own code.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from transformers import Trainer
from transformers.trainer import SCHEDULER_NAME

from lorad.errors import LoradError
from lorad.trainer.fsdp import enable_fsdp_on_cpu
from lorad.trainer.loss import HiddenStateTap, token_loss_sum
from lorad.trainer.packing import EpochShuffleSampler
from lorad.trainer.progress import Stopwatch

# The oldest transformers this file is tested with. It overrides Trainer internals (below) whose
# names and signatures change between releases, so an older one is refused with a sentence, not
# left to fail mid-run. Keep equal to the floor in pyproject.toml.
MIN_TRANSFORMERS = "5.23.0"
OVERRIDDEN = ("_get_train_sampler", "_run_epoch", "_get_num_items_in_batch", "_inner_training_loop",
              "_save_checkpoint", "_save_optimizer_and_scheduler", "_save_scaler", "_save_rng_state",
              "_load_from_checkpoint", "create_accelerator_and_postprocess")


def check_transformers() -> None:
    import transformers
    from packaging.version import Version

    installed = Version(transformers.__version__)
    missing = [name for name in OVERRIDDEN if not hasattr(Trainer, name)]
    if installed < Version(MIN_TRANSFORMERS) or missing:
        raise LoradError(
            f"lorad train needs transformers >= {MIN_TRANSFORMERS} (it replaces parts of Trainer: "
            f"{', '.join(OVERRIDDEN)}); this environment has transformers {transformers.__version__}"
            + (f", whose Trainer lacks {', '.join(missing)}" if missing else "")
            + f". Upgrade with: pip install 'transformers>={MIN_TRANSFORMERS},<6'"
        )


class LoradTrainer(Trainer):
    # compute_loss already divides by the trained tokens of the whole step (and ranks)
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args,
        sampler: EpochShuffleSampler,
        tap: HiddenStateTap,
        head: torch.nn.Module,
        eval_rows: list,
        save_checkpoint: Callable[[], None],
        peak_memory=None,
        **kwargs,
    ):
        check_transformers()
        super().__init__(*args, **kwargs)
        self.lorad_sampler = sampler
        self.tap = tap
        self.head = head
        self.eval_rows = eval_rows
        self.save_checkpoint_fn = save_checkpoint
        self.peak_memory = peak_memory  # trainer/device_memory.PeakMemory, read at every training log
        self.tokens_since_log = 0
        self.stopwatch = Stopwatch()
        self.steps_at_last_log: int | None = None

    # ---- data order ---------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        return self.lorad_sampler

    def _run_epoch(self, **kwargs):
        self.lorad_sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(**kwargs)

    # ---- loss ---------------------------------------------------------------------------------

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """Trained tokens in this optimizer step, over all its micro-batches and all ranks."""
        count = torch.tensor(sum(int((b["targets"] != -100).sum()) for b in batch_samples), device=device)
        if self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.accelerator.autocast():
            loss_sum, _ = token_loss_sum(model, self.tap, self.head, inputs)
        self.tokens_since_log += int(inputs["num_tokens"])
        # DDP averages gradients over ranks; the step's loss is a sum over ranks, hence * world_size
        loss = loss_sum * (self.args.world_size / num_items_in_batch.clamp(min=1))
        return (loss, None) if return_outputs else loss

    # ---- evaluation ---------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Mean CE per trained token over the eval rows (rank r takes rows r, r + world, ...)."""
        model = self.model
        was_training = model.training
        model.eval()
        collate = self.data_collator
        mb = self.args.per_device_eval_batch_size
        mine = self.eval_rows[self.args.process_index :: max(1, self.args.world_size)]
        total = torch.zeros(2, dtype=torch.float64)  # [loss sum, trained tokens]
        with torch.no_grad(), self.accelerator.autocast():
            for start in range(0, len(mine), mb):
                batch = {k: v.to(self.args.device) for k, v in collate(mine[start : start + mb]).items()}
                loss_sum, count = token_loss_sum(model, self.tap, self.head, batch)
                total += torch.tensor([float(loss_sum), count], dtype=torch.float64)
        if self.args.world_size > 1:
            total = self.accelerator.reduce(total.to(self.args.device), reduction="sum").cpu()
        if was_training:
            model.train()
        metrics = {f"{metric_key_prefix}_loss": float(total[0] / total[1].clamp(min=1))}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ---- logging ------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            tokens = torch.tensor(self.tokens_since_log, device=self.args.device)
            if self.args.world_size > 1:
                tokens = self.accelerator.gather(tokens).sum()
            self.tokens_since_log = 0
            self.state.num_input_tokens_seen += int(tokens)
            lap, elapsed = self.stopwatch.lap()
            since = self.steps_at_last_log if self.steps_at_last_log is not None else self._initial_global_step
            steps = max(1, self.state.global_step - since)
            self.steps_at_last_log = self.state.global_step
            logs["tokens"] = self.state.num_input_tokens_seen
            logs["tokens_per_s"] = int(tokens) / lap if lap > 0 else 0.0
            logs["step_time_s"] = lap / steps
            logs["elapsed_s"] = elapsed
            if self.peak_memory is not None:
                logs.update(self.peak_memory.read())
        super().log(logs, start_time)

    def _inner_training_loop(self, *args, **kwargs):
        self.stopwatch = Stopwatch()
        if self.peak_memory is not None:
            self.peak_memory.reset()  # model loading is not part of the first interval
        self.steps_at_last_log = None  # the loop sets _initial_global_step once the state is loaded
        return super()._inner_training_loop(*args, **kwargs)

    # ---- checkpoints --------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial) -> None:
        self.save_checkpoint_fn()

    # ---- FSDP ---------------------------------------------------------------------------------

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        enable_fsdp_on_cpu(self)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP the Trainer would also write the whole (frozen) model; the recipe writes the
        LoRA tensors, so only the optimizer (gathered) and the schedule are saved here."""
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import save_fsdp_optimizer

        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_fsdp_enabled:
            return  # the recipe loaded the LoRA tensors before FSDP sharded the model
        return super()._load_from_checkpoint(resume_from_checkpoint, model)
