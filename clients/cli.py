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
@click.option("--token", envvar="LORAD_TOKEN", default=None, help="Bearer token, if the server needs one [env LORAD_TOKEN].")
@click.option("--tls-ca", envvar="LORAD_TLS_CA", type=click.Path(dir_okay=False), default=None,
              help="Connect over TLS, verifying the server with this PEM CA file [env LORAD_TLS_CA].")
def generate(prompt, target, adapter_id, stream, raw, system, max_new_tokens, temperature, top_p, top_k, seed,
             repetition_penalty, stop, timeout, as_json, token, tls_ca):
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
    with Client(target, timeout=timeout, token=token, tls_ca=tls_ca) as client:
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


def _connection_options(fn):
    """--target, --token, --tls-ca: how every command reaches a server (also via env variables)."""
    fn = click.option("--tls-ca", envvar="LORAD_TLS_CA", type=click.Path(dir_okay=False), default=None,
                      help="Connect over TLS, verifying the server with this PEM CA file [env LORAD_TLS_CA].")(fn)
    fn = click.option("--token", envvar="LORAD_TOKEN", default=None,
                      help="Bearer token (the admin token for adapter management) [env LORAD_TOKEN].")(fn)
    fn = click.option("--target", default=None, help=f"Server address HOST:PORT [default: {DEFAULT_TARGET}].")(fn)
    return fn


def _client(ctx: click.Context, target, token, tls_ca, timeout: float = 60) -> Client:
    """Options given to the subcommand win over those given to `lorad adapters` itself."""
    outer = (ctx.parent.params if ctx.parent is not None and ctx.parent.command is adapters else {}) or {}
    return Client(target or outer.get("target") or DEFAULT_TARGET, timeout=timeout,
                  token=token or outer.get("token"), tls_ca=tls_ca or outer.get("tls_ca"))


def _call(ctx: click.Context, target, token, tls_ca, call, timeout: float = 60):
    """call(client) on a client for these options; an RPC error is printed as a sentence, exit 1."""
    with _client(ctx, target, token, tls_ca, timeout=timeout) as client:
        try:
            return call(client)
        except LoradRPCError as err:
            _fail(err)


def _when(seconds: float) -> str:
    if not seconds:
        return "-"
    import datetime as dt

    return dt.datetime.fromtimestamp(seconds).strftime("%H:%M:%S")


def _print_listing(listing, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({**listing.__dict__, "adapters": [a.__dict__ for a in listing.adapters]}))
        return
    click.echo(f"base {listing.base_model}: {listing.max_loras} device slots, rank <= {listing.max_lora_rank}")
    if not listing.adapters:
        click.echo("no adapters (start the server with --adapters DIR, or upload one: lorad adapters upload)")
        return
    click.echo(f"{'ID':28} {'RANK':>4} {'WHERE':6} {'PIN':3} {'RUN':>3} {'SIZE':>10} {'VERSION':15} {'BASE':7} TARGETS")
    for a in listing.adapters:
        if a.error:
            click.echo(f"{a.id:28} {'-':>4} {'-':6} {'-':3} {'-':>3} {'-':>10} {a.digest[7:19] or '-':15} "
                       f"{a.base_match:7} INVALID: {a.error}")
        else:
            click.echo(f"{a.id:28} {a.rank:>4} {a.location:6} {'yes' if a.pinned else '':3} {a.requests_running:>3} "
                       f"{a.size_bytes:>10} {a.digest[7:19] or '-':15} {a.base_match:7} "
                       f"{','.join([*a.target_modules, *(f'{m} (saved)' for m in a.saved_modules)])}")


def _print_info(a, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(a.__dict__))
        return
    rows = [("id", a.id), ("version", a.digest or "-"), ("location", a.location), ("pinned", a.pinned),
            ("rank", a.rank), ("lora_alpha", a.lora_alpha), ("targets", ",".join(a.target_modules)),
            ("replaces (modules_to_save)", ", ".join(a.saved_modules) or "-"),
            ("size", f"{a.size_bytes} bytes"), ("requests running", a.requests_running),
            ("last used", _when(a.last_used_unix_seconds)),
            ("trained for", f"{a.trained_for_base or '-'} (matches the served base: {a.base_match})"),
            ("same content as", ", ".join(a.same_content_as) or "-"),
            ("old versions resident", a.old_versions_resident)]
    if a.error:
        rows.append(("error", a.error))
    for key, value in rows:
        click.echo(f"{key + ':':22} {value}")


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_connection_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table (with no subcommand).")
@click.pass_context
def adapters(ctx, target, token, tls_ca, as_json):
    """List and manage the adapters of a running server (no subcommand = list).

    \b
    Examples:
      lorad adapters list
      lorad adapters upload ./out/my-adapter --id support-en
      lorad adapters upload ./out/my-adapter-v2 --id support-en --replace
      lorad adapters load support-en --pin
      lorad adapters show support-en
      lorad adapters unload support-en
      lorad adapters delete support-en
    Management needs the server's admin token (--token or LORAD_TOKEN) unless the server
    listens on loopback only.
    """
    if ctx.invoked_subcommand is None:  # `lorad adapters` = `lorad adapters list`
        ctx.invoke(list_cmd, target=target, token=token, tls_ca=tls_ca, as_json=as_json)


@adapters.command("list")
@_connection_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def list_cmd(ctx, target, token, tls_ca, as_json):
    """Every adapter: rank, where it is, pinned, requests running, version, base match."""
    listing = _call(ctx, target, token, tls_ca, lambda client: client.list_adapters())
    _print_listing(listing, as_json)


@adapters.command("show")
@click.argument("adapter_id")
@_connection_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def show_cmd(ctx, adapter_id, target, token, tls_ca, as_json):
    """Everything the server knows about one adapter."""
    info = _call(ctx, target, token, tls_ca, lambda client: client.get_adapter(adapter_id))
    _print_info(info, as_json)


@adapters.command("load")
@click.argument("adapter_id")
@_connection_options
@click.option("--pin", is_flag=True, help="Keep it in a device slot until unpinned or unloaded.")
@click.pass_context
def load_cmd(ctx, adapter_id, target, token, tls_ca, pin):
    """Load an adapter into host memory and a device slot now."""
    r = _call(ctx, target, token, tls_ca, lambda client: client.load_adapter(adapter_id, pin=pin), timeout=300)
    click.echo(f"{adapter_id}: {r.adapter.location}{', pinned' if r.adapter.pinned else ''} "
               f"(disk->host {r.host_load_seconds * 1000:.1f} ms, host->device {r.device_load_seconds * 1000:.1f} ms), "
               f"version {r.adapter.digest}")


@adapters.command("unpin")
@click.argument("adapter_id")
@_connection_options
@click.pass_context
def unpin_cmd(ctx, adapter_id, target, token, tls_ca):
    """Let an adapter be evicted again when its slot is needed."""
    info = _call(ctx, target, token, tls_ca, lambda client: client.unpin_adapter(adapter_id))
    click.echo(f"{adapter_id}: unpinned ({info.location})")


@adapters.command("unload")
@click.argument("adapter_id")
@_connection_options
@click.pass_context
def unload_cmd(ctx, adapter_id, target, token, tls_ca):
    """Free an adapter's memory once its running requests finish (its files stay)."""
    r = _call(ctx, target, token, tls_ca, lambda client: client.unload_adapter(adapter_id), timeout=300)
    click.echo(f"{adapter_id}: unloaded in {r.seconds * 1000:.1f} ms after {r.requests_drained} running requests; "
               f"freed {r.freed_host_bytes} host bytes{' and a device slot' if r.freed_slot else ''}")


@adapters.command("delete")
@click.argument("adapter_id")
@_connection_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def delete_cmd(ctx, adapter_id, target, token, tls_ca, yes):
    """Stop serving an adapter and remove its folder from the server."""
    if not yes:
        click.confirm(f"Delete adapter {adapter_id!r} and its files on the server?", abort=True)
    r = _call(ctx, target, token, tls_ca, lambda client: client.delete_adapter(adapter_id), timeout=300)
    click.echo(f"{adapter_id}: deleted (version {r.digest}, after {r.requests_drained} running requests)")


@adapters.command("upload")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--id", "adapter_id", required=True, help="The id to serve it under.")
@click.option("--replace", is_flag=True, help="Replace an existing adapter with this id (running requests finish "
                                                 "on the old version).")
@_connection_options
@click.pass_context
def upload_cmd(ctx, folder, adapter_id, replace, target, token, tls_ca):
    """Upload a PEFT adapter FOLDER (adapter_config.json + adapter_model.safetensors)."""
    try:
        r = _call(ctx, target, token, tls_ca, lambda client: client.upload_adapter(folder, adapter_id, replace=replace),
                  timeout=1800)
    except ValueError as exc:  # not an adapter folder: found before anything is sent
        raise click.BadParameter(str(exc), param_hint="FOLDER") from None
    what = f"replaced version {r.previous_digest}" if r.replaced else "new"
    click.echo(f"{adapter_id}: uploaded {r.bytes_received} bytes ({what}); serving version {r.adapter.digest}")


def _weighted_id(spec: str) -> tuple[str, float]:
    """'ID' or 'ID:WEIGHT', as `lorad combine` takes folders (weight 1 when omitted)."""
    head, sep, tail = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    try:
        return head, float(tail)
    except ValueError:
        raise click.BadParameter(f"{spec}: the weight after ':' must be a number, got {tail!r}",
                                 param_hint="ADAPTER_ID[:WEIGHT]") from None


def _combine_cmd():
    from lorad.deltas.combine import METHODS, CombineConfig
    from lorad.deltas_cli import combine_knobs

    defaults = CombineConfig()

    @adapters.command("combine")
    @click.argument("inputs", nargs=-1, required=True, metavar="ADAPTER_ID[:WEIGHT]...")
    @click.option("--out", "output_id", required=True, help="Id of the combined adapter on the server.")
    @click.option("--method", type=click.Choice(METHODS), default=defaults.method, show_default=True,
                  help="How to combine (as `lorad combine`).")
    @click.option("--rank", type=click.IntRange(min=1), default=None,
                  help="Output rank [default: the method's; at most the server's --max-lora-rank].")
    @combine_knobs
    @click.option("--replace", is_flag=True, help="Replace an existing adapter with this id.")
    @_connection_options
    @click.pass_context
    def combine_cmd(ctx, inputs, output_id, method, rank, density, majority_sign, seed, replace, target, token,
                    tls_ca):
        """Combine adapters the server holds into a new one, served at once.

        \b
        Examples:
          lorad adapters combine --out both support sales:0.5
          lorad adapters combine --method ties --density 0.3 --rank 16 --out merged a b c
        """
        pairs = [_weighted_id(s) for s in inputs]
        r = _call(ctx, target, token, tls_ca, lambda client: client.combine_adapters(
            pairs, output_id, method=method, rank=rank, density=density, majority_sign_method=majority_sign, seed=seed,
            replace=replace), timeout=3600)
        for warning in r.warnings:
            click.echo(f"warning: {warning}", err=True)
        what = f"replaced version {r.previous_digest}" if r.replaced else "new"
        click.echo(f"{output_id}: combined {len(pairs)} adapters with {method} ({what}), rank {r.rank}, relative "
                   f"error {r.overall_error:.2e} (max module {r.max_module_error:.2e}) in {r.seconds:.1f} s; "
                   f"serving version {r.adapter.digest}")

    return combine_cmd


def _merge_cmd():
    from lorad.deltas.export import FORMATS

    @adapters.command("merge")
    @click.argument("adapter_id")
    @click.option("--format", "fmt", type=click.Choice(FORMATS), default="hf", show_default=True,
                  help="What to write (as `lorad export`).")
    @click.option("--name", "output_name", default="",
                  help="Output name inside the server's --export-dir [default: ID-merged, or ID.gguf].")
    @click.option("--dtype", default="", help="hf: fp32 | bf16 | fp16 [default: the base checkpoint's].")
    @click.option("--outtype", default="", help="GGUF tensor type [default: the format's].")
    @click.option("--overwrite", is_flag=True, help="Replace an existing output (after verification).")
    @_connection_options
    @click.pass_context
    def merge_cmd(ctx, adapter_id, fmt, output_name, dtype, outtype, overwrite, target, token, tls_ca):
        """Merge an adapter into the base on the server, under its --export-dir, verified against serving it.

        \b
        Examples:
          lorad adapters merge support
          lorad adapters merge support --format gguf --outtype q8_0 --name support-q8.gguf
        """
        r = _call(ctx, target, token, tls_ca, lambda client: client.merge_adapter(
            adapter_id, format=fmt, output_name=output_name, dtype=dtype, outtype=outtype, overwrite=overwrite),
            timeout=6 * 3600)
        click.echo(f"{adapter_id}: merged ({r.format}) -> {r.path} on the server, {r.bytes} bytes in {r.seconds:.1f} s")
        for line in r.verification:
            click.echo(f"  check: {line}")

    return merge_cmd


combine_cmd = _combine_cmd()
merge_cmd = _merge_cmd()
