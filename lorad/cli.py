"""The `lorad` command. Subcommands live next to the code they drive and load lazily, so
`lorad --help` answers at once and `lorad generate` does not import torch."""

from __future__ import annotations

import importlib

import click

# subcommand -> "module:attribute" of its click command
SUBCOMMANDS = {
    "serve": ("lorad.server.cli", "serve", "Serve one base and many LoRA adapters over gRPC."),
    "generate": ("lorad.clients.cli", "generate", "Send one prompt to a running server."),
    "adapters": ("lorad.clients.cli", "adapters", "List, upload, load, pin, unload and delete adapters on a running server."),
    "train": ("lorad.trainer.cli", "train", "QLoRA-train an adapter from an axolotl-style YAML."),
    "combine": ("lorad.deltas_cli", "combine", "Combine adapters into one (linear, svd, cat, ties, dare, ...)."),
    "merge": ("lorad.deltas_cli", "merge", "Merge adapters into the base: a verified transformers folder."),
    "export": ("lorad.deltas_cli", "export", "Export an adapter: hf folder, GGUF, llama.cpp adapter, Ollama."),
    "cluster": ("lorad.cluster", "cluster", "Run replicas behind HAProxy with adapter affinity on this machine."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx, name):
        entry = SUBCOMMANDS.get(name)
        if entry is None:
            return None
        module, attr, _ = entry
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, SUBCOMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lorad")
def main() -> None:
    """lorad: one resident 4-bit base model, many LoRA adapters.

    \b
    Quick start (CPU, embedded SmolLM2-135M base):
      lorad serve --adapters ./adapters          # terminal 1
      lorad generate "What is the capital of France?"          # terminal 2
      lorad generate --adapter my-adapter "Hello"
    """


if __name__ == "__main__":
    main()
