"""`lorad combine`, `lorad merge`, `lorad export`: the click edge of lorad.deltas.

Options take their defaults from the typed configs (CombineConfig, MergeConfig, ExportConfig);
errors print one sentence and exit 1; progress bars go to stderr, the summary table to stdout.
This module (not lorad.deltas) wires in the server's engine as the verification reference.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import click

from lorad.base_model import BASE_ALIASES, EMBEDDED_ALIAS
from lorad.errors import LoradError

_CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_BASE_HELP = (f"Base model, as `lorad serve --base` takes it: an alias ({', '.join(sorted(BASE_ALIASES))}), a local "
              "checkpoint folder, or a hub id already in the local cache.")


def _fail(command: str, exc: Exception) -> None:
    click.echo(f"lorad {command}: error: {exc}", err=True)
    sys.exit(1)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _table(rows: list[list], header: list[str], right: tuple[int, ...] = ()) -> str:
    """Plain aligned columns; the columns in `right` (numbers) are right-aligned."""
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]

    def line(r):
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    head = [line(header), line(["-" * w for w in widths])] if any(header) else []
    return "\n".join(head + [line(r) for r in rows])


class _Bars:
    """One tqdm bar per phase, fed by the (phase, done, total) callbacks of lorad.deltas."""

    def __init__(self):
        self.bars = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        bar = self.bars.get(phase)
        if bar is None:
            bar = self.bars[phase] = tqdm(total=total, desc=phase, file=sys.stderr, dynamic_ncols=True,
                                          mininterval=0.3, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _quiet() -> None:
    import logging
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "bitsandbytes", "gguf", "lorad.server"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# ---- combine ------------------------------------------------------------------------------------

_COMBINE_HELP = """Combine LoRA adapters into one adapter, in delta space.

\b
ADAPTER_DIR[:WEIGHT]: PEFT adapter folders, each with a weight (1 when omitted; negative
weights subtract an adapter). Every method works on the true deltas dW = s * B @ A (ranks,
lora_alpha, rsLoRA, rank/alpha patterns honoured; ranks may differ), then factors the result
back to rank R by truncated SVD and reports the relative Frobenius error it costs, per
projection here and per module in lorad_provenance.json.

\b
Methods:
  linear           sum of w_i dW_i, exact (default rank: the sum of the input ranks)
                     lorad combine --method linear --out both a/ b/:0.5
  svd              the same sum truncated to --rank (default: the largest input rank)
                     lorad combine --method svd --rank 16 --out small a/ b/
  cat              the same sum as stacked factors, no SVD: exact, rank = sum of ranks
                     lorad combine --method cat --out both a/ b/
  ties             TIES: keep the top --density of each task vector by magnitude, elect a
                   sign per entry (--majority-sign), average the entries that agree
                     lorad combine --method ties --density 0.3 --out t a/ b/ c/
  dare_linear      DARE: drop entries with probability 1 - density, rescale by 1/density, sum
                     lorad combine --method dare_linear --density 0.5 --seed 7 --out d a/ b/
  dare_ties        DARE drop-and-rescale, then TIES' sign election and disjoint mean
                     lorad combine --method dare_ties --density 0.5 --out d a/ b/
  magnitude_prune  keep the top --density of each task vector by magnitude, sum
                     lorad combine --method magnitude_prune --density 0.2 --out p a/ b/

\b
Knobs:
  --rank R          rank of every output module; below the sum of the input ranks the
                    error is reported (linear/svd: exact from R = sum of ranks)
                      lorad combine --method linear --rank 8 --out r8 a/ b/
  --density D       fraction of each delta's entries kept (ties, dare_*, magnitude_prune)
  --majority-sign   total: sign of the summed values (TIES paper); frequency: the sign most
                    adapters vote for (ties, dare_ties)
                      lorad combine --method ties --majority-sign frequency --out t a/ b/
  --seed S          seed of the DARE masks: the same seed gives the same adapter, byte for byte
"""


def combine_knobs(command):
    """--density, --majority-sign and --seed with CombineConfig's defaults: the knobs that
    `lorad combine` (folders) and `lorad adapters combine` (ids on a server) share."""
    from lorad.deltas.combine import CombineConfig
    from lorad.deltas.methods import SIGN_METHODS

    defaults = CombineConfig()
    for option in reversed([
        click.option("--density", type=float, default=defaults.density, show_default=True,
                     help="Fraction of entries kept (ties, dare_*, magnitude_prune)."),
        click.option("--majority-sign", type=click.Choice(SIGN_METHODS), default=defaults.majority_sign_method,
                     show_default=True, help="Sign election of ties / dare_ties."),
        click.option("--seed", type=click.IntRange(min=0), default=defaults.seed, show_default=True,
                     help="Seed of the DARE masks."),
    ]):
        command = option(command)
    return command


def _combine_command():
    from lorad.deltas.combine import METHODS

    @click.command("combine", context_settings=_CTX, help=_COMBINE_HELP)
    @click.option("--method", type=click.Choice(METHODS), required=True, help="How to combine (see above).")
    @click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
                  help="Folder to write the combined adapter into (PEFT format + lorad_provenance.json).")
    @click.option("--rank", type=click.IntRange(min=1), default=None,
                  help="Output rank [default: sum of input ranks; svd: the largest input rank].")
    @combine_knobs
    @click.option("--force", is_flag=True, help="Write into --out even if it already holds an adapter.")
    @click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER_DIR[:WEIGHT]...")
    def combine_cmd(method, out_dir, rank, density, majority_sign, seed, force, adapters):
        _quiet()
        try:
            _run_combine(method, out_dir, rank, density, majority_sign, seed, force, adapters)
        except LoradError as exc:
            _fail("combine", exc)

    return combine_cmd


def _run_combine(method, out_dir, rank, density, majority_sign, seed, force, adapters):
    from lorad.deltas.combine import CombineConfig, combine, read_weighted, write_combined
    from lorad.errors import ConfigError

    config = CombineConfig(method=method, rank=rank, density=density, majority_sign_method=majority_sign, seed=seed)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ConfigError(f"{out_dir} already exists and is not empty; pass --force to write into it")
    inputs, weights = read_weighted(list(adapters))
    bars = _Bars()
    try:
        result = combine(inputs, weights, config, progress=lambda done, total, _: bars("combine", done, total))
    finally:
        bars.close()
    started = time.perf_counter()
    write_combined(result, out_dir)
    written = time.perf_counter() - started
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(_combine_summary(result, out_dir, written))


def _combine_summary(result, out_dir: Path, write_seconds: float) -> str:
    from lorad.adapter_format import WEIGHTS_FILE

    from lorad.geometry import PROJECTIONS

    groups = defaultdict(list)
    for m in result.modules:
        groups[m.name.rsplit(".", 1)[-1]].append(m)
    order = {p: i for i, p in enumerate(PROJECTIONS)}
    rows = []
    for proj, mods in sorted(groups.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
        ins = sorted({tuple(m.input_ranks) for m in mods})
        outs = sorted({m.rank for m in mods})
        rows.append([proj, len(mods), " | ".join("+".join(map(str, r)) for r in ins), ",".join(map(str, outs)),
                     f"{max(m.error for m in mods):.2e}"])
    lines = [f"combined {len(result.inputs)} adapters with {result.config.method} -> {out_dir}",
             "inputs: " + ", ".join(f"{a.path.name} x {w:g}" for a, w in zip(result.inputs, result.weights)), "",
             _table(rows, ["projection", "modules", "input ranks", "rank", "max error"], right=(1, 2, 3, 4)), "",
             f"overall relative error {result.overall_error:.2e} (max module {result.max_error:.2e}); "
             f"{_size((out_dir / WEIGHTS_FILE).stat().st_size)}; "
             f"{result.seconds:.1f} s combining + {write_seconds:.1f} s writing"]
    exact_rank = max(sum(m.input_ranks) for m in result.modules)
    if result.overall_error > 1e-4:
        lines.append(f"note: rank {max(m.rank for m in result.modules)} does not hold the whole combination; "
                     f"--rank {exact_rank} (the sum of the input ranks) would be exact for linear/svd")
    return "\n".join(lines)


# ---- merge --------------------------------------------------------------------------------------

_MERGE_HELP = """Merge adapters into their base: a transformers model folder, verified before publish.

\b
ADAPTER_DIR[:WEIGHT]: one or more adapters; their weighted deltas are summed exactly.
By default the deltas are added to dequant(NF4(W)): the base an adapter trained with
`lorad train` (QLoRA) or served by `lorad serve` (NF4) actually saw; --from-original adds
them to the original weights instead.

\b
Before the folder appears at --out, it is loaded back with transformers and its greedy
tokens on 8 prompts must equal lorad serving the adapter on the same base in float32, with
log-probabilities within a stated tolerance (fp32 1e-3; bf16/fp16: see README). Then it is
renamed into place; a failed check leaves nothing behind.

\b
Examples:
  lorad merge --out merged/ my-adapter/
  lorad merge --base ./llama-folder --dtype bf16 --out merged/ a/:0.7 b/:0.3
  lorad merge --from-original --dtype fp32 --out merged-orig/ my-adapter/
"""


def _merge_command():
    from lorad.deltas.merge import DTYPES, MergeConfig
    from lorad.deltas.nf4 import QUANT_DTYPES

    defaults = MergeConfig()

    @click.command("merge", context_settings=_CTX, help=_MERGE_HELP)
    @click.option("--base", default=defaults.base, show_default=True, help=_BASE_HELP)
    @click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
                  help="The merged model folder to create.")
    @click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
                  help="Weights of the merged model [default: the base checkpoint's dtype].")
    @click.option("--from-original", is_flag=True,
                  help="Add the deltas to the original weights, not to dequant(NF4(W)).")
    @click.option("--nf4-dtype", type=click.Choice(list(QUANT_DTYPES)), default=defaults.nf4_dtype, show_default=True,
                  help="Dtype the base was cast to before NF4 when the adapter was trained or served: "
                       "fp32 for lorad (lorad.base_model.nf4_source_dtype); bf16 for an adapter from a QLoRA "
                       "run that loaded its base in bf16.")
    @click.option("--verify-tokens", type=click.IntRange(min=1), default=defaults.verify_tokens, show_default=True,
                  help="Greedy tokens per verification prompt.")
    @click.option("--max-shard-size", default="2GiB", show_default=True, help="Largest safetensors shard.")
    @click.option("--force", is_flag=True, help="Replace --out if it exists (after verification).")
    @click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER_DIR[:WEIGHT]...")
    def merge_cmd(base, out_dir, dtype, from_original, nf4_dtype, verify_tokens, max_shard_size, force, adapters):
        _quiet()
        try:
            from lorad.deltas.combine import read_weighted
            from lorad.deltas.merge import merge_adapters
            from lorad.server.config import parse_bytes
            from lorad.server.offline_reference import engine_reference

            config = MergeConfig(base=base, dtype=dtype, from_original=from_original, nf4_dtype=nf4_dtype,
                                 verify_tokens=verify_tokens, overwrite=force,
                                 max_shard_size=parse_bytes(max_shard_size, "max_shard_size"))
            inputs, weights = read_weighted(list(adapters))
            bars = _Bars()
            try:
                report = merge_adapters(inputs, weights, out_dir, config, engine_reference, progress=bars)
            finally:
                bars.close()
            click.echo(_merge_summary(report, inputs, weights))
        except LoradError as exc:
            _fail("merge", exc)

    return merge_cmd


def _merge_summary(report, inputs, weights) -> str:
    rows = [["base", f"{report.base} ({report.base_location})"],
            ["adapters", ", ".join(f"{a.path.name} x {w:g}" for a, w in zip(inputs, weights))],
            ["merged into", "dequant(NF4(W)), " f"{report.roundtripped} weights round-tripped"
             if report.mode == "nf4-roundtrip" else "the original weights (--from-original)"],
            ["adapted modules", str(report.adapted_modules)],
            ["dtype", report.dtype],
            ["written", f"{_size(report.bytes_written)} in {report.shards} shard(s)"],
            ["verification", report.verification.summary()],
            ["time", ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())]]
    return f"merged -> {report.out_dir}\n" + _table(rows, ["", ""])


# ---- export -------------------------------------------------------------------------------------

_EXPORT_HELP = """Export an adapter for offline deployment, verified before it is published.

\b
Formats:
  hf            the merged transformers folder (as `lorad merge`; --dtype applies)
                  lorad export --format hf --out merged/ my-adapter/
  gguf          the merged model as one GGUF file for llama.cpp (--outtype f32|f16|bf16|q8_0|q4_0,
                default f16), with tokenizer and chat template; read back by transformers and
                compared with the merged folder before it is renamed into place
                  lorad export --format gguf --outtype q8_0 --out model.gguf my-adapter/
  gguf-adapter  the adapter alone as a llama.cpp LoRA GGUF (--outtype f32|f16|bf16, default f32),
                for `llama-cli -m base.gguf --lora adapter.gguf`; its deltas are read back and compared
                  lorad export --format gguf-adapter --out adapter.gguf my-adapter/
  ollama        a folder with model.gguf and a Modelfile (chat template, stop tokens):
                `ollama create NAME -f OUT/Modelfile`
                  lorad export --format ollama --out ollama-model/ my-adapter/

The merge inside hf / gguf / ollama adds the delta to dequant(NF4(W)) unless --from-original.
"""


def _export_command():
    from lorad.deltas.export import FORMATS, ExportConfig
    from lorad.deltas.gguf_export import MODEL_OUTTYPES
    from lorad.deltas.merge import DTYPES
    from lorad.deltas.nf4 import QUANT_DTYPES

    @click.command("export", context_settings=_CTX, help=_EXPORT_HELP)
    @click.option("--format", "fmt", type=click.Choice(FORMATS), required=True, help="What to write (see above).")
    @click.option("--out", "out", type=click.Path(path_type=Path), required=True,
                  help="Output folder (hf, ollama) or file (gguf, gguf-adapter).")
    @click.option("--base", default=EMBEDDED_ALIAS, show_default=True, help=_BASE_HELP)
    @click.option("--outtype", type=click.Choice(MODEL_OUTTYPES), default=None,
                  help="GGUF tensor type [default: f16 for gguf/ollama, f32 for gguf-adapter].")
    @click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
                  help="Weights of an hf export [default: the base checkpoint's dtype].")
    @click.option("--from-original", is_flag=True, help="Merge into the original weights, not dequant(NF4(W)).")
    @click.option("--nf4-dtype", type=click.Choice(list(QUANT_DTYPES)), default=ExportConfig.nf4_dtype,
                  show_default=True, help="As for `lorad merge`.")
    @click.option("--force", is_flag=True, help="Replace --out if it exists (after verification).")
    @click.argument("adapter", type=click.Path(path_type=Path), metavar="ADAPTER_DIR")
    def export_cmd(fmt, out, base, outtype, dtype, from_original, nf4_dtype, force, adapter):
        _quiet()
        try:
            from lorad.deltas.adapter_io import read_adapter
            from lorad.deltas.export import export
            from lorad.server.offline_reference import engine_reference

            config = ExportConfig(format=fmt, base=base, outtype=outtype, dtype=dtype, from_original=from_original,
                                  nf4_dtype=nf4_dtype, overwrite=force)
            bars = _Bars()
            try:
                report = export(read_adapter(adapter), out, config, engine_reference, progress=bars)
            finally:
                bars.close()
            click.echo(_export_summary(report))
        except LoradError as exc:
            _fail("export", exc)

    return export_cmd


def _export_summary(report) -> str:
    rows = [["format", report.format + (f" ({report.outtype})" if report.outtype else "")],
            ["written", f"{report.path} ({_size(report.bytes)})"]]
    for check in report.checks or ([report.merge.verification] if report.merge else []):
        rows.append(["check", check.summary()])
    if report.adapter_errors:
        worst = max(report.adapter_errors, key=report.adapter_errors.get)
        rows.append(["check", f"{len(report.adapter_errors)} module deltas read back; max relative error "
                              f"{report.adapter_errors[worst]:.2e} ({worst})"])
    rows.append(["time", ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())])
    return _table(rows, ["", ""])


combine = _combine_command()
merge = _merge_command()
export = _export_command()
