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
              help="When training finishes, upload the adapter to this running lorad server, which serves it at once "
                   "(an adapter with the same id is replaced; running requests finish on the old version).")
@click.option("--push-id", default=None, metavar="ID",
              help="The id to serve the pushed adapter under [default: the output folder's name].")
@click.option("--token", envvar="LORAD_TOKEN", default=None,
              help="The server's admin token, for --push [env LORAD_TOKEN].")
@click.option("--tls-ca", envvar="LORAD_TLS_CA", type=click.Path(dir_okay=False), default=None,
              help="Reach the --push server over TLS, verifying it with this PEM CA file [env LORAD_TLS_CA].")
def train(config, overrides, dry_run, resume, resume_from, init_from, stop_after, push, push_id, token, tls_ca):
    """QLoRA-train an adapter from an axolotl-style YAML CONFIG.

    \b
    Examples:
      lorad train trainer/examples/storyteller.yaml
      lorad train cfg.yaml --set max_steps=50 --set learning_rate=1e-4
      lorad train cfg.yaml --dry-run
      lorad train cfg.yaml --resume                  # after a stop or a crash
      lorad train cfg.yaml --init-from out/checkpoints/checkpoint-200 --set output_dir=out2 --set learning_rate=5e-5
      torchrun --nproc-per-node 2 -m lorad.cli train cfg.yaml   # data parallel
      lorad train cfg.yaml --push 127.0.0.1:50051    # then serve it on a running server
    """
    from lorad.trainer.config import load_config
    from lorad.trainer.errors import PushError

    try:
        cfg = load_config(config, overrides)
        if push is not None and not dry_run:
            _check_push_target(push, token, tls_ca)  # before hours of training, not after
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
                result = recipe.train()
            finally:
                recipe.cleanup()
        if push is not None and recipe.is_main:
            if not result.finished:
                raise PushError(f"--push {push}: training stopped before the end, so there is no adapter to push yet; "
                                "finish it with --resume")
            _push(push, result.output_dir, push_id, token, tls_ca)
    except LoradError as exc:
        click.echo(f"lorad train: error: {exc}", err=True)
        sys.exit(1)


def _check_push_target(target: str, token: str | None, tls_ca: str | None) -> None:
    from lorad.clients import Client, LoradRPCError
    from lorad.trainer.errors import PushError

    import grpc

    try:
        with Client(target, timeout=10, token=token, tls_ca=tls_ca, retries=0) as client:
            client.health(timeout=10)
            try:  # an admin call: a missing or wrong token shows now, not after hours of training
                client.get_adapter(".lorad-push-check", timeout=10)
            except LoradRPCError as err:
                if err.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    raise PushError(f"--push {target}: the server refuses adapter uploads from this client "
                                    f"({err.code.name}: {err.details}); nothing was trained. Give its admin "
                                    "token with --token or LORAD_TOKEN") from None
    except LoradRPCError as err:
        raise PushError(f"--push {target}: the server cannot be reached ({err.code.name}: {err.details}); "
                        "nothing was trained. Start `lorad serve` there first, or drop --push") from None


def _push(target: str, folder, adapter_id: str | None, token: str | None, tls_ca: str | None) -> None:
    from pathlib import Path

    from lorad.clients import Client, LoradRPCError
    from lorad.trainer.errors import PushError

    adapter_id = adapter_id or Path(folder).resolve().name
    try:
        with Client(target, timeout=1800, token=token, tls_ca=tls_ca) as client:
            result = client.upload_adapter(folder, adapter_id, replace=True)
    except LoradRPCError as err:
        raise PushError(f"--push {target}: the server refused the adapter ({err.code.name}: {err.details}); "
                        f"it is still in {folder}") from None
    what = f"replacing version {result.previous_digest}" if result.replaced else "new"
    click.echo(f"pushed {folder} to {target}: serving adapter {adapter_id!r} ({what}), version {result.adapter.digest}")
