"""`lorad train`: the click command (loaded lazily by lorad.cli)."""

from __future__ import annotations

import sys

import click

from lorad.errors import LoradError


@click.command("train", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (repeatable); dotted keys reach into lists: datasets.0.path=x.jsonl")
@click.option("--dry-run", is_flag=True,
              help="Print the resolved config, data summary, trainable parameters and a memory estimate; train nothing.")
@click.option("--resume", is_flag=True, help="Continue the run in output_dir from its latest complete checkpoint.")
@click.option("--resume-from", type=click.Path(file_okay=False), default=None,
              help="Continue from this checkpoint folder (OUTPUT_DIR/checkpoints/checkpoint-N).")
@click.option("--init-from", type=click.Path(file_okay=False), default=None, metavar="CHECKPOINT",
              help="Start a new run from this checkpoint's adapter (OUTPUT_DIR/checkpoints/checkpoint-N) with a fresh "
                   "optimizer and schedule under this config (e.g. a lower learning_rate after a loss spike, more epochs).")
@click.option("--stop-after", type=click.IntRange(min=1), default=None, metavar="STEP",
              help="Stop after this optimizer step with a checkpoint, as on Ctrl-C (for time-boxed jobs).")
@click.option("--push", metavar="HOST:PORT", default=None,
              help="Hand the adapter to a running lorad server (not offered by the server yet).")
def train(config, overrides, dry_run, resume, resume_from, init_from, stop_after, push):
    """QLoRA-train an adapter from an axolotl-style YAML CONFIG.

    \b
    Examples:
      lorad train trainer/examples/storyteller.yaml
      lorad train cfg.yaml --set max_steps=50 --set learning_rate=1e-4
      lorad train cfg.yaml --dry-run
      lorad train cfg.yaml --resume                  # after a stop or a crash
      lorad train cfg.yaml --init-from out/checkpoints/checkpoint-200 --set output_dir=out2 --set learning_rate=5e-5
      torchrun --nproc-per-node 2 -m lorad.cli train cfg.yaml   # data parallel
    """
    from lorad.trainer.config import load_config
    from lorad.trainer.errors import PushError

    try:
        cfg = load_config(config, overrides)
        if push is not None:
            raise PushError(
                f"--push {push}: lorad serve does not accept adapter uploads yet; copy the output folder "
                f"({cfg.output_dir}) into the server's --adapters folder instead (it is served under its folder name)"
            )
        from lorad.trainer.recipe import QLoRARecipe, quiet_libraries  # torch and transformers load here

        with quiet_libraries():
            if dry_run:
                from lorad.trainer.dry_run import dry_run_report

                click.echo(dry_run_report(cfg, init_from=init_from))
                return
            recipe = QLoRARecipe(cfg, resume=resume, resume_from=resume_from, init_from=init_from,
                                 stop_after=stop_after)
            try:
                recipe.setup()
                recipe.train()
            finally:
                recipe.cleanup()
    except LoradError as exc:
        click.echo(f"lorad train: error: {exc}", err=True)
        sys.exit(1)
