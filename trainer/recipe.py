"""`lorad train CONFIG`: QLoRA fine-tuning of one adapter, as one readable recipe.

    recipe = QLoRARecipe(cfg, resume=True)
    recipe.setup()      # base, data, LoRA, plan, resume check, Trainer
    recipe.train()      # steps, checkpoints, final adapter + provenance
    recipe.cleanup()
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from lorad.adapter_format import SAVED_MODULES, saved_module
from lorad.base_model import BaseModelConfig, load_base, weights_digest
from lorad.errors import ConfigError
from lorad.trainer import adapter as lora
from lorad.trainer import checkpoint as ck
from lorad.trainer.config import Precision, TrainConfig, resolve_precision
from lorad.trainer.data import PreparedData, prepare_data, read_datasets
from lorad.trainer.device_memory import PeakMemory
from lorad.trainer.errors import CheckpointError
from lorad.trainer.fast_lora import use_fast_lora
from lorad.trainer.fsdp import fsdp_arguments
from lorad.trainer.loss import HiddenStateTap, causal_lm_parts
from lorad.trainer.optim import check_attention, check_optimizer, check_schedule
from lorad.trainer.packing import EpochShuffleSampler, RowCollator, RowDataset, resolve_packing, rows_of
from lorad.trainer.progress import ProgressReporter, StopController, plot_loss_curve, truncate_metrics
from lorad.trainer.provenance import build_provenance, write_adapter

log = logging.getLogger(__name__)

@dataclass
class Plan:
    """Step arithmetic of the run, per transformers' Trainer rules."""

    world_size: int
    rows: int
    micro_batches_per_rank: int  # per epoch
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    save_steps: int
    eval_steps: int | None

    @classmethod
    def make(cls, cfg: TrainConfig, rows: int, world_size: int, has_eval: bool) -> "Plan":
        """rows: training rows after packing (packing.resolve_packing)."""
        batches = math.ceil(rows / cfg.micro_batch_size)
        per_rank = math.ceil(batches / world_size)  # accelerate evens the batches out across ranks
        ga = cfg.gradient_accumulation_steps
        steps_per_epoch = max(1, per_rank // ga + int(per_rank % ga > 0))
        total = cfg.max_steps or math.ceil(cfg.num_epochs * steps_per_epoch)
        if cfg.warmup_steps is not None:
            warmup = cfg.warmup_steps
        elif cfg.warmup_ratio is not None:
            warmup = math.ceil(cfg.warmup_ratio * total)
        else:
            warmup = 0
        if cfg.saves_per_epoch:
            save = max(1, steps_per_epoch // cfg.saves_per_epoch)
        else:
            save = cfg.save_steps or max(1, math.ceil(total / 10))
        if cfg.evals_per_epoch:
            evals = max(1, steps_per_epoch // cfg.evals_per_epoch) if has_eval else None
        else:
            evals = (cfg.eval_steps or save) if has_eval else None
        return cls(world_size, rows, per_rank, steps_per_epoch, total, warmup, save, evals)

    def line(self, cfg: TrainConfig) -> str:
        per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps * self.world_size
        return (
            f"plan: {self.total_steps} optimizer steps ({self.steps_per_epoch} per epoch; {cfg.micro_batch_size} rows x "
            f"{cfg.gradient_accumulation_steps} micro-batches x {self.world_size} process(es) = {per_step} rows per step), "
            f"warmup {self.warmup_steps}, checkpoint every {self.save_steps} steps"
            + (f", eval every {self.eval_steps}" if self.eval_steps else "")
        )


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    finished: bool  # False when stopped early (a checkpoint was written instead of the adapter)
    final_train_loss: float | None
    final_eval_loss: float | None
    checkpoint: Path | None


class QLoRARecipe:
    """QLoRA (or LoRA) fine-tuning of one adapter over one base, on transformers' Trainer.

    Features, with their trade-offs:
      * NF4 + double-quant base (adapter: qlora): ~0.56 bytes per base parameter instead of 2-4;
        the adapter is trained against exactly the weights lorad serves. The quantized base is
        cached in ~/.cache/lorad/quantized (bit-identical, loads in ~1 s instead of ~15 s on CPU).
      * Gradient checkpointing (non-reentrant): keeps only each decoder layer's input ([B, T, H]
        per layer) instead of every tensor the layer saves for backward, and recomputes one
        layer's forward at a time during the backward pass (about a third more compute); LoRA
        gradients flow although the base is frozen.
      * Adapter variants from PEFT: rsLoRA, DoRA, gaussian / PiSSA / OLoRA / LoftQ init, bias,
        lora_bias, modules_to_save, targets by name or regex (trainer/adapter.py); a run can start
        from an adapter (lora_model_dir) or fork a checkpoint (--init-from).
      * Loss normalised over all trained tokens of an optimizer step, across micro-batches and
        ranks; the head runs on trained positions only, in chunks (trainer/loss.py).
      * Packing (sample_packing): fewer padding tokens; samples never attend to each other.
      * Checkpoints every save_steps, crash-safe (trainer/checkpoint.py); --resume continues the
        same run bit for bit on CPU, after a stop, a crash or a SIGKILL in the middle of a save.
      * DDP over torchrun processes (gloo on CPU, NCCL on CUDA).

    Raises:
        ConfigError: a key or value of the config is invalid, or output_dir holds another run.
        DataError: a dataset file or row cannot become a training sample.
        BaseModelError: the base cannot be resolved or loaded.
        CheckpointError: --resume found no complete checkpoint, or one cannot be read.
        ResumeMismatchError: the config differs from the checkpoint's (the message lists how).
        TrainingDivergedError: the loss became NaN or infinite.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        resume_from: str | None = None,
        init_from: str | None = None,
        stop_after: int | None = None,
        echo=None,
    ):
        self.cfg = cfg
        self.resume = resume or resume_from is not None
        self.resume_from = resume_from
        self.init_from = init_from
        self.start: lora.StartingAdapter | None = None
        self.stop_after = stop_after
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_root = ck.checkpoint_root(self.output_dir)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self._echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.resume_checkpoint: ck.Checkpoint | None = None
        self.trainer = None

    def echo(self, msg: str) -> None:
        if self.is_main:
            self._echo(msg)

    # ---- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        self._setup_run()
        self._setup_model()
        self._setup_data()
        self.plan = Plan.make(self.cfg, len(self.rows), self.world_size, bool(self.data.eval))
        self.echo(self.plan.line(self.cfg))
        self._setup_resume()
        self._setup_trainer()

    def _setup_run(self) -> None:
        from lorad.base_model import resolve_device
        from lorad.trainer.hf_trainer import check_transformers

        check_transformers()
        self.device = resolve_device(self.cfg.device)
        self.precision: Precision = resolve_precision(self.cfg, self.device.type)
        check_attention(self.cfg, self.device.type, self.precision)
        fsdp_arguments(self.cfg, self.device.type, self.world_size)  # refuses what cannot run before any loading
        adapter_cfg = Path(self.cfg.base_model) / "adapter_config.json"
        if adapter_cfg.is_file():
            raise ConfigError(
                f"base_model: {self.cfg.base_model} is a LoRA adapter folder, not a base model; set base_model to "
                "the base it was trained on (to continue from that adapter, set lora_model_dir; to continue an "
                "interrupted run, use --resume)"
            )
        if self.resume and self.init_from:
            raise ConfigError("--init-from starts a new run from a checkpoint's adapter; --resume continues the same "
                              "run; pick one")
        if self.resume:  # before any loading: a missing checkpoint is reported at once
            self.resume_checkpoint = ck.resolve_resume(self.output_dir, self.resume_from)
        elif ck.complete_checkpoints(self.ckpt_root):
            latest = ck.complete_checkpoints(self.ckpt_root)[-1]
            raise ConfigError(
                f"output_dir: {self.output_dir} already holds checkpoints of a run (latest: step {latest.step}); "
                "pass --resume to continue it, or choose another output_dir (with --init-from "
                f"{latest.path} to start a new run from its adapter)"
            )
        self._setup_start()
        if self.cfg._ignored:
            self.echo(f"note: axolotl keys read and not used by lorad: {', '.join(self.cfg._ignored)}")
        # the data before the model: a dataset that cannot be read fails in seconds, not after a load
        self.raw_data = read_datasets(self.cfg)

    def _setup_start(self) -> None:
        """lora_model_dir / --init-from: the adapter the run starts from, whose shape wins. A resumed
        run takes it from its checkpoint (the parent's files may be gone; its weights are not
        needed, the checkpoint's replace them)."""
        self.load_start_weights = not self.resume
        recorded = self.resume_checkpoint.state().get("parent") if self.resume_checkpoint else None
        if recorded is not None:
            self.start = lora.StartingAdapter.from_state(recorded)
        elif self.init_from is not None:
            parent = ck.resolve_resume(self.output_dir, self.init_from, flag="--init-from")
            self.start = lora.StartingAdapter.read("init_from", parent.path, step=parent.step,
                                                   fingerprint=parent.state().get("fingerprint"))
        elif self.cfg.lora_model_dir is not None:
            self.start = lora.StartingAdapter.read("lora_model_dir", self.cfg.lora_model_dir)
        if self.start is not None:
            self.cfg = lora.apply_starting_adapter(self.cfg, self.start)

    def _setup_model(self) -> None:
        import torch
        from peft import prepare_model_for_kbit_training
        from transformers import set_seed

        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
            self.precision.compute_dtype_name
        ]
        base_cfg = BaseModelConfig(name=self.cfg.base_model, quant=self.cfg.quant, device=self.device.type)
        # QLoRA + FSDP: NF4 packed into the compute dtype, so FSDP shards it with the rest (trainer/fsdp.py)
        storage = dtype if self.cfg.fsdp and self.cfg.quant == "nf4" else None
        self.base = load_base(base_cfg, for_training=True, compute_dtype=dtype, cache_quantized=True,
                              quant_storage=storage)
        self.base_digest = weights_digest(self.base.resolved)
        if self.start is not None and self.start.parent_fingerprint is not None:
            parent_base = self.start.parent_fingerprint.get("base_digest")
            if parent_base and self.base_digest and parent_base != self.base_digest:
                raise ConfigError(f"--init-from: {self.start.path} was trained on base {parent_base}; this run's base "
                                  f"{self.cfg.base_model} is {self.base_digest}")
        model = self.base.model
        model.config.use_cache = False
        model.set_attn_implementation(self.cfg.attn_implementation)
        if self.cfg.quant == "nf4":
            # freezes the base, upcasts norms/embeddings to float32; checkpointing is set below
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            model.requires_grad_(False)
        keep_bnb_training_layout(model)
        if self.cfg.gradient_checkpointing:
            # non-reentrant: gradients reach LoRA weights without making the frozen inputs require grad
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        set_seed(self.cfg.seed)  # LoRA A init (and PiSSA's randomized SVD)
        self.model = lora.wrap_with_lora(model, self.cfg)
        self.lora_modules = lora.lora_modules(self.model, self.cfg)
        if self.cfg.peft_init_lora_weights == "loftq":
            n = lora.loftq_init_nf4(self.model, self.base.resolved.location)
            self.echo(f"loftq: {n} LoRA pairs start at the rank-{self.cfg.lora_r} correction of their NF4 error")
        self.initial_adapter = None
        if lora.needs_conversion(self.cfg) and self.is_main:
            # A0, B0 as initialised, for the conversion to a standard LoRA when the adapter is published
            # (no dot in the folder name: PEFT loads it under its folder name as an adapter name)
            self.initial_adapter = lora.save_initial_adapter(self.model, self.output_dir / "lorad_initial_adapter")
        if self.start is not None and self.load_start_weights:
            lora.load_adapter_weights(self.model, self.start.path, self.start.kind)
        self.fast_layers = 0
        if os.environ.get("LORAD_TRAIN_PEFT_FORWARD") != "1":  # diagnostic switch: PEFT's own forward
            self.fast_layers = use_fast_lora(self.model, keep_dequantized=self.cfg.gradient_checkpointing)
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        lora.check_single_adapter(self.model, self.lora_modules)
        norm, self.head = causal_lm_parts(self.model)
        self.tap = HiddenStateTap(norm)
        prec = "bf16 autocast" if self.precision.bf16 else "fp16 autocast" if self.precision.fp16 else "float32"
        self.echo(
            f"base: {self.base.resolved.display_name} ({self.cfg.quant}, {self.base_digest or 'digest unavailable'}) "
            f"on {self.device.type}, {prec}, attention {self.cfg.attn_implementation}"
        )
        c = self.cfg
        variants = [v for v, on in (("rsLoRA", c.peft_use_rslora), ("DoRA", c.peft_use_dora),
                                     (f"init {c.peft_init_lora_weights}", c.peft_init_lora_weights is not True),
                                     (f"bias {c.bias}", c.bias != "none"), ("lora_bias", c.lora_bias),
                                     (f"modules_to_save {c.lora_modules_to_save}", bool(c.lora_modules_to_save))) if on]
        self.echo(
            f"adapter: LoRA r={c.lora_r} alpha={c.lora_alpha:g} dropout={c.lora_dropout:g} on "
            f"{', '.join(c.target_modules)} ({len(self.lora_modules)} modules)"
            + (f" [{', '.join(variants)}]" if variants else "")
            + f": {self.trainable:,} trainable parameters ({100 * self.trainable / total:.2f}% of {total:,})"
        )
        if self.start is not None:
            self.echo(f"starting from: {self.start.path} ({self.start.kind}; fresh optimizer and schedule)")
        if c.quant == "none":
            self.echo("note: adapter: lora trains against the unquantized base; lorad serves over NF4 "
                      "(adapter: qlora trains against exactly the served weights)")
        unservable = [n for n in c.lora_modules_to_save or () if saved_module(n) is None]
        if unservable:  # embed_tokens and lm_head copies are served (tests/test_saved_module_serving.py)
            self.echo(f"note: modules_to_save {unservable}: such adapters load in PEFT, but lorad serve swaps only "
                      f"{' and '.join(SAVED_MODULES)} per adapter and will refuse them")

    def _setup_data(self) -> None:
        tokenizer = self.base.tokenizer
        self.data: PreparedData = prepare_data(self.cfg, tokenizer, self.raw_data)
        for line in self.data.report.lines():
            self.echo(line)
        max_pos = getattr(self.base.model.config, "max_position_embeddings", None)
        if max_pos and self.cfg.sequence_len > max_pos:
            self.echo(f"warning: sequence_len {self.cfg.sequence_len} exceeds the base's {max_pos} positions")
        self.packing, why = resolve_packing(self.cfg.sample_packing, self.data.train, self.cfg.sequence_len)
        self.rows = rows_of(self.data.train, self.cfg.sequence_len, self.packing)
        self.eval_rows = rows_of(self.data.eval, self.cfg.sequence_len, self.packing)
        self.echo(f"packing: {why}" + (f": {len(self.data.train)} samples -> {len(self.rows)} rows of <= "
                                       f"{self.cfg.sequence_len} tokens" if self.packing else ""))
        self.collator = RowCollator(pad_id=tokenizer.pad_token_id, packing=self.packing)
        self.sampler = EpochShuffleSampler(len(self.rows), self.cfg.seed)

    def fingerprint(self) -> dict:
        """What must match between a checkpoint and the run resuming from it."""
        c = self.cfg
        return {
            "base_model": c.base_model,
            "base_digest": self.base_digest,
            "quant": c.quant,
            "lora_r": c.lora_r,
            "lora_alpha": c.lora_alpha,
            "lora_dropout": c.lora_dropout,
            "target_modules": c.target_modules,
            "lora_modules": len(self.lora_modules),
            "lora_variant": {
                "use_rslora": c.peft_use_rslora, "use_dora": c.peft_use_dora, "init": c.peft_init_lora_weights,
                "bias": c.bias, "lora_bias": c.lora_bias, "modules_to_save": c.lora_modules_to_save,
            },
            "start_adapter": self.start.sha256 if self.start is not None else None,
            "seed": c.seed,
            "sequence_len": c.sequence_len,
            "sample_packing": self.packing,
            "train_on_inputs": c.train_on_inputs,
            "val_set_size": c.val_set_size,
            "micro_batch_size": c.micro_batch_size,
            "gradient_accumulation_steps": c.gradient_accumulation_steps,
            "world_size": self.world_size,
            "total_steps": self.plan.total_steps,
            "optimizer": c.optimizer,
            "learning_rate": c.learning_rate,
            "lr_scheduler": c.lr_scheduler,
            "lr_scheduler_kwargs": c.lr_scheduler_kwargs,
            "adam": [c.adam_beta1, c.adam_beta2, c.adam_epsilon],
            "warmup_steps": self.plan.warmup_steps,
            "weight_decay": c.weight_decay,
            "max_grad_norm": c.max_grad_norm,
            "precision": self.precision.compute_dtype_name,
            "attn_implementation": c.attn_implementation,
            "fsdp": c.fsdp,
            "data_digest": self.data.digest,
        }

    def _setup_resume(self) -> None:
        if self.resume_checkpoint is not None:
            state = ck.check_compatible(self.resume_checkpoint, self.fingerprint())
            self._check_data_position(state)
            self.echo(
                f"resume: from {self.resume_checkpoint.path} (step {state['global_step']}, epoch {state['epoch']}, "
                f"{state['micro_batches_into_epoch']} micro-batches into it)"
            )
        if self.is_main:
            for path in ck.remove_leftovers(self.ckpt_root):
                self.echo(f"removed an incomplete checkpoint left by an interrupted save: {path.name}")
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.resume_checkpoint is not None:
                truncate_metrics(self.output_dir, self.resume_checkpoint.step)
            else:
                (self.output_dir / "metrics.jsonl").unlink(missing_ok=True)
            (self.output_dir / "resolved_config.yaml").write_text(
                yaml.safe_dump(self.resolved_config(), sort_keys=False)
            )

    def data_position(self, step: int) -> dict:
        """Where `step` leaves the data: the epoch and the micro-batches (per rank) done in it."""
        spe = self.plan.steps_per_epoch
        return {
            "epoch": step // spe,
            "micro_batches_into_epoch": (step % spe) * self.cfg.gradient_accumulation_steps,
            "rows_per_epoch": len(self.rows),
        }

    def _check_data_position(self, state: dict) -> None:
        """The Trainer skips to the checkpoint's place in the data from its step count; the
        position the checkpoint recorded must be that same place, or the resumed run would
        see other rows than the interrupted one."""
        recorded = {k: state.get(k) for k in ("epoch", "micro_batches_into_epoch", "rows_per_epoch")}
        expected = self.data_position(int(state["global_step"]))
        if recorded != expected:
            raise CheckpointError(
                f"cannot resume from {self.resume_checkpoint.path}: it recorded the data position {recorded}, but "
                f"step {state['global_step']} of this run's plan is at {expected}; the data or batching changed"
            )

    def resolved_config(self) -> dict:
        out = self.cfg.to_dict()
        out.update(
            resolved={
                "quant": self.cfg.quant,
                "target_modules": self.cfg.target_modules,
                "lora_modules": len(self.lora_modules),
                "sample_packing": self.packing,
                "bf16": self.precision.bf16,
                "fp16": self.precision.fp16,
                "tf32": self.precision.tf32,
                "device": self.device.type,
                "world_size": self.world_size,
                "total_steps": self.plan.total_steps,
                "steps_per_epoch": self.plan.steps_per_epoch,
                "warmup_steps": self.plan.warmup_steps,
                "save_steps": self.plan.save_steps,
                "eval_steps": self.plan.eval_steps,
            }
        )
        if self.start is not None:
            out["resolved"]["start_adapter"] = self.start.provenance()
        if self.cfg._ignored:
            out["resolved"]["ignored_axolotl_keys"] = list(self.cfg._ignored)
        return out

    def _setup_trainer(self) -> None:
        from transformers import TrainingArguments
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        from lorad.trainer.hf_trainer import LoradTrainer

        cfg, plan = self.cfg, self.plan
        args = TrainingArguments(
            output_dir=str(self.output_dir),
            per_device_train_batch_size=cfg.micro_batch_size,
            per_device_eval_batch_size=cfg.micro_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            max_steps=plan.total_steps,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler,
            lr_scheduler_kwargs=cfg.lr_scheduler_kwargs or {},
            warmup_steps=plan.warmup_steps,
            optim=cfg.optimizer,  # lorad's optimizer names are transformers' OptimizerNames
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_epsilon=cfg.adam_epsilon,
            max_grad_norm=cfg.max_grad_norm,
            bf16=self.precision.bf16,
            fp16=self.precision.fp16,
            # the one place tf32 is set (TrainingArguments turns it on for CUDA matmuls and cuDNN)
            tf32=self.precision.tf32 if self.device.type == "cuda" else None,
            **fsdp_arguments(cfg, self.device.type, self.world_size, type(self.base.model.model.layers[0]).__name__),
            logging_steps=cfg.logging_steps,
            logging_nan_inf_filter=False,  # a NaN loss must show, not be replaced by an average
            save_strategy="steps",
            save_steps=plan.save_steps,
            eval_strategy="steps" if plan.eval_steps else "no",
            eval_steps=plan.eval_steps,
            seed=cfg.seed,
            data_seed=cfg.seed,
            use_cpu=self.device.type == "cpu",
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            ddp_backend="gloo" if self.device.type == "cpu" and self.world_size > 1 else None,
            ddp_find_unused_parameters=False,
            log_level="warning",
        )
        check_optimizer(args, self.model)
        check_schedule(cfg, plan.total_steps, plan.warmup_steps)
        self.stop = StopController(self.stop_after, self.world_size)
        self.progress = ProgressReporter(self.output_dir, enabled=self.is_main)
        self.peak_memory = PeakMemory(self.device.type)
        self.trainer = LoradTrainer(
            model=self.model,
            args=args,
            train_dataset=RowDataset(self.rows),
            eval_dataset=RowDataset(self.eval_rows) if self.eval_rows else None,  # evaluated by LoradTrainer.evaluate
            data_collator=self.collator,
            sampler=self.sampler,
            tap=self.tap,
            head=self.head,
            eval_rows=self.eval_rows,
            save_checkpoint=self.save_checkpoint,
            peak_memory=self.peak_memory,
            callbacks=[self.progress, self.stop],
        )
        self.trainer.remove_callback(PrinterCallback)
        self.trainer.remove_callback(ProgressCallback)
        if self.world_size != self.trainer.args.world_size:
            raise ConfigError(f"world size: environment says {self.world_size}, torch says {self.trainer.args.world_size}")

    # ---- train ------------------------------------------------------------------------------

    def train(self) -> RunResult:
        self.stop.install()
        try:
            resume_path = str(self.resume_checkpoint.path) if self.resume_checkpoint else None
            if resume_path and self.trainer.is_fsdp_enabled:
                # before FSDP shards the model; the Trainer then restores optimizer, schedule and RNG
                lora.load_adapter_weights(self.model, self.resume_checkpoint.path, "--resume")
            self.trainer.train(resume_from_checkpoint=resume_path)
        finally:
            self.stop.uninstall()
        lora.check_single_adapter(self.model, self.lora_modules)
        history = self.trainer.state.log_history
        train_loss = next((h["loss"] for h in reversed(history) if "loss" in h), None)
        eval_loss = next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None)
        step = self.trainer.state.global_step
        finished = self.stop.stopped_at is None
        latest = ck.latest_checkpoint(self.output_dir)
        state = lora.trainable_state(self.model) if finished and self.trainer.is_fsdp_enabled else None  # all ranks
        if self.is_main:
            plot_loss_curve(self.output_dir)
            if finished:
                self.save_adapter(train_loss, eval_loss, state)
                self.echo(
                    f"done: adapter -> {self.output_dir} (step {step}, train loss {_fmt(train_loss)}, "
                    f"eval loss {_fmt(eval_loss)}); serve it with: lorad serve --adapters {self.output_dir.parent}"
                )
            else:
                self.echo(
                    f"stopped at step {step} of {self.plan.total_steps}; checkpoint {latest.path if latest else '?'}; "
                    f"continue with: lorad train CONFIG --resume"
                )
        self._barrier()
        return RunResult(self.output_dir, step, finished, train_loss, eval_loss, latest.path if latest else None)

    # ---- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write checkpoint-<step> crash-safely; called by the Trainer at every save point."""
        from transformers.trainer_callback import ExportableState

        t = self.trainer
        step = t.state.global_step
        staging, final = ck.staging_dir(self.ckpt_root, step), ck.final_dir(self.ckpt_root, step)
        if self.is_main:
            if staging.exists():
                ck.remove_checkpoint(staging)
            staging.mkdir(parents=True)
        self._barrier()
        if t.is_fsdp_enabled:  # gathered on every rank, written by the main one (PEFT's format, whole tensors)
            state = lora.trainable_state(self.model)
            if self.is_main:
                self.model.save_pretrained(str(staging), state_dict=state, safe_serialization=True,
                                           save_embedding_layers=False)
        else:
            t.save_model(str(staging), _internal_call=True)  # adapter (main process)
        t._save_optimizer_and_scheduler(str(staging))
        t._save_scaler(str(staging))
        t._save_rng_state(str(staging))  # every rank writes its own
        if self.is_main:
            for cb in [c for c in t.callback_handler.callbacks + [t.control] if isinstance(c, ExportableState)]:
                t.state.stateful_callbacks[cb.__class__.__name__] = cb.state()
            t.state.save_to_json(str(staging / "trainer_state.json"))
            state = {"global_step": step, **self.data_position(step), "fingerprint": self.fingerprint(),
                     "parent": self.start.state() if self.start is not None else None}
            (staging / ck.STATE_FILE).write_text(json.dumps(state, indent=1))
        self._barrier()
        if self.is_main:
            ck.fsync_tree(staging)
            ck.commit(staging, final)
            ck.write_marker(final, step)
            for path in ck.rotate(self.ckpt_root, self.cfg.save_total_limit):
                log.info("removed old checkpoint %s (save_total_limit=%s)", path, self.cfg.save_total_limit)
        self._barrier()

    def save_adapter(self, train_loss: float | None, eval_loss: float | None, state: dict | None = None) -> Path:
        resolved = self.base.resolved
        provenance = build_provenance(
            base={
                "name": resolved.display_name,
                "source": resolved.source,
                "quant": self.cfg.quant,
                "weights_digest": self.base_digest,
            },
            config=self.resolved_config(),
            data={
                "digest": "sha256:" + self.data.digest,
                "files": {p: "sha256:" + d for p, d in self.data.report.file_digests.items()},
                "train_samples": self.data.report.train_samples,
                "eval_samples": self.data.report.eval_samples,
                "truncated": self.data.report.truncated,
                "dropped_empty": self.data.report.dropped_empty,
            },
            steps=self.trainer.state.global_step,
            epochs=self.trainer.state.epoch or 0.0,
            tokens_seen=self.trainer.state.num_input_tokens_seen,
            final_train_loss=train_loss,
            final_eval_loss=eval_loss,
            world_size=self.world_size,
            precision=self.precision.compute_dtype_name,
            trainable_parameters=self.trainable,
            peak_memory=self.peak_memory.summary(),
            parent=self.start.provenance() if self.start is not None else None,
        )
        written = write_adapter(self.model, self.output_dir, resolved.display_name, provenance,
                                initial_adapter=self.initial_adapter, state_dict=state)
        if self.initial_adapter is not None:
            shutil.rmtree(self.initial_adapter, ignore_errors=True)
        return written

    # ---- cleanup ----------------------------------------------------------------------------

    def cleanup(self) -> None:
        if getattr(self, "tap", None) is not None:
            self.tap.remove()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def keep_bnb_training_layout(model) -> int:
    """Stop bitsandbytes from repacking NF4 weights for CPU inference during a training run.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight, permanently, on
    its first eval-mode forward without grad (an evaluation). The repacked layout runs through
    `bitsandbytes::gemv_4bit`, which has no autograd kernel, so every later training step
    silently loses the gradient through the frozen base weights (torch only warns "an autograd
    kernel was not registered"), and a run with evaluations no longer matches one without.
    Returns the number of layers switched."""
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


@contextlib.contextmanager
def quiet_libraries():
    """Silence transformers' info/warning chatter and FutureWarnings for the length of a run (the
    run prints its own summary), restoring both afterwards."""
    import warnings

    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*[Pp]aged optimizers are not supported on CPU.*")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
