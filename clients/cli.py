"""`lorad generate` and `lorad adapters`: talk to a running server from the shell."""

from __future__ import annotations

import json
import sys

import click

from lorad.clients.sync_client import Client
from lorad.clients.types import Completion, LoradRPCError

DEFAULT_TARGET = "127.0.0.1:50051"


def _fail(err: LoradRPCError) -> None:
    click.echo(f"error: {err.code.name}: {err.details}", err=True)
    sys.exit(1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("prompt")
@click.option("--target", default=DEFAULT_TARGET, show_default=True, help="Server address HOST:PORT.")
@click.option("--adapter", "adapter_id", default="", help="Adapter id; empty = the base model alone.")
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--raw", is_flag=True,
              help="Send PROMPT as raw text. Without it PROMPT is one user message and the server applies "
                   "the base's chat template.")
@click.option("--system", default=None, help="A system message to put before PROMPT (chat mode).")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=0, help="0 = the server's default.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=0.0, help="Nucleus sampling mass; 0 = off.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, help="Keep the k most likely tokens; 0 = off.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=None, help="Sampling seed, for reproducible output.")
@click.option("--repetition-penalty", type=float, default=0.0, help="> 1 discourages repeats; 0 = off.")
@click.option("--stop", multiple=True, help="Stop sequence (repeatable); not included in the output.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Deadline in seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole response as JSON.")
def generate(prompt, target, adapter_id, stream, raw, system, max_new_tokens, temperature, top_p, top_k, seed,
             repetition_penalty, stop, timeout, as_json):
    """Generate a completion for PROMPT, optionally through an adapter.

    \b
    Examples:
      lorad generate "What is the capital of France?"
      lorad generate --adapter support-en --stream "My order is late."
      lorad generate --raw --max-new-tokens 20 "Once upon a time"
    """
    if raw:
        if system:
            raise click.BadParameter("--system needs chat mode; drop --raw", param_hint="--system")
        fields = {"prompt": prompt}
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        fields = {"messages": messages}
    fields.update(adapter_id=adapter_id, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  top_k=top_k, seed=seed, repetition_penalty=repetition_penalty, stop=list(stop))
    with Client(target, timeout=timeout) as client:
        try:
            if stream and not as_json:
                for event in client.stream(**fields):
                    if isinstance(event, Completion):
                        click.echo()
                        click.echo(f"[{event.finish_reason}, {event.completion_tokens} tokens]", err=True)
                    else:
                        click.echo(event.text, nl=False)
                        sys.stdout.flush()
                return
            result = client.generate(**fields)
        except LoradRPCError as err:
            _fail(err)
    if as_json:
        click.echo(json.dumps(result.__dict__))
    else:
        click.echo(result.text)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--target", default=DEFAULT_TARGET, show_default=True, help="Server address HOST:PORT.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def adapters(target, as_json):
    """List the adapters a running server knows, with rank, targets and where each one is."""
    with Client(target, timeout=30) as client:
        try:
            listing = client.list_adapters()
        except LoradRPCError as err:
            _fail(err)
    if as_json:
        click.echo(json.dumps({**listing.__dict__, "adapters": [a.__dict__ for a in listing.adapters]}))
        return
    click.echo(f"base {listing.base_model}: {listing.max_loras} device slots, rank <= {listing.max_lora_rank}")
    if not listing.adapters:
        click.echo("no adapters (start the server with --adapters DIR)")
        return
    click.echo(f"{'ID':30} {'RANK':>4} {'WHERE':6} {'SIZE':>10}  TARGETS")
    for a in listing.adapters:
        if a.error:
            click.echo(f"{a.id:30} {'-':>4} {'-':6} {'-':>10}  INVALID: {a.error}")
        else:
            click.echo(f"{a.id:30} {a.rank:>4} {a.location:6} {a.size_bytes:>10}  {','.join(a.target_modules)}")
