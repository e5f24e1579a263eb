"""Measure `lorad combine`, `lorad merge` and `lorad export` on the embedded SmolLM2-135M (the README
figures): combination errors, sizes and times per method; merge verification per dtype, NF4 versus
--from-original; GGUF sizes and how each outtype reads back; llama.cpp when llama-cpp-python is
installed.

    .venv/bin/python benchmarks/bench_deltas.py [--workdir DIR] [--skip-llama-cpp]

Adapters are random (seeded) PEFT-format LoRAs on every projection; B is scaled so the answers
change but stay fluent. Prints the CPU path and the load average, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--skip-llama-cpp", action="store_true")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig

    from lorad.base_model import embedded_model_dir
    from lorad.deltas import verify
    from lorad.deltas.adapter_io import read_adapter
    from lorad.deltas.combine import METHODS, CombineConfig, combine, write_combined
    from lorad.deltas.export import ExportConfig, export, verify_gguf
    from lorad.deltas.gguf_export import tokenizer_source, write_model_gguf
    from lorad.deltas.merge import MergeConfig, locate_base, merge_adapters
    from lorad.deltas_cli import _size
    from lorad.geometry import ModelGeometry
    from lorad.server.offline_reference import engine_reference
    from lorad.testing import write_random_adapter

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-deltas-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()}")
    geometry = ModelGeometry.from_hf_config(AutoConfig.from_pretrained(embedded_model_dir()))
    a = read_adapter(write_random_adapter(work / "a-r8", geometry, rank=8, alpha=16, seed=1, b_std=0.02))
    b = read_adapter(write_random_adapter(work / "b-r16", geometry, rank=16, alpha=16, seed=2, b_std=0.02))

    print("\n## combine: a (rank 8) + b (rank 16), weights 1 and 0.5, 210 modules")
    for method in METHODS:
        for rank in ((None, 8) if method in ("linear", "svd") else (None,)):
            if method == "svd" and rank is None:
                continue
            config = CombineConfig(method=method, rank=rank, density=0.3)
            result = combine([a, b], [1.0, 0.5], config)
            out = write_combined(result, work / f"combined-{method}-{rank}")
            ranks = sorted({m.rank for m in result.modules})
            print(f"{method:16s} rank {ranks}  overall error {result.overall_error:.2e}  max module "
                  f"{result.max_error:.2e}  {_size((out / 'adapter_model.safetensors').stat().st_size)}  "
                  f"{result.seconds:.1f} s")

    # every check's numbers, whatever its tolerance
    for key in list(verify.TOLERANCES):
        verify.TOLERANCES[key] = verify.Tolerance(math.inf, math.inf)

    def show(label, report):
        print(f"  {label}: {report.summary()}")

    print("\n## merge a into the embedded base")
    merges = {}
    for dtype, original in (("fp32", False), ("bf16", False), ("fp16", False), ("fp32", True)):
        t = time.perf_counter()
        name = f"merged-{dtype}{'-orig' if original else ''}"
        report = merge_adapters([a], [1.0], work / name, MergeConfig(dtype=dtype, from_original=original,
                                                                     overwrite=True), engine_reference)
        merges[name] = report
        print(f"{name}: {time.perf_counter() - t:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in report.seconds.items())}),"
              f" {_size(report.bytes_written)}")
        show("check", report.verification)

    print("\n## what --from-original changes: the original-weights merge against lorad serving on NF4")
    from lorad.deltas.merge import verify_folder

    nf4_reference = merges["merged-fp32"].reference
    report, _ = verify_folder(work / "merged-fp32-orig", nf4_reference, "fp32",
                              label="merged --from-original vs lorad serving the adapter (NF4 base)")
    show("check", report)

    print("\n## export gguf from the fp32 merge")
    merged = merges["merged-fp32"]
    source = tokenizer_source(locate_base("smollm2-135m-instruct").folder)
    for outtype in ("f16", "bf16", "q8_0", "q4_0"):
        t = time.perf_counter()
        path = write_model_gguf(work / "merged-fp32", work / f"model-{outtype}.gguf", outtype, tokenizer_gguf=source)
        written = time.perf_counter() - t
        t = time.perf_counter()
        check = verify_gguf(path, work / "merged-fp32", merged, outtype)
        print(f"{outtype}: {_size(path.stat().st_size)}, written in {written:.1f} s, read back in "
              f"{time.perf_counter() - t:.1f} s")
        show("check", check)

    print("\n## export gguf-adapter")
    base_config = locate_base("smollm2-135m-instruct").config
    for outtype in ("f32", "f16"):
        t = time.perf_counter()
        report = export(a, work / f"adapter-{outtype}.gguf", ExportConfig(format="gguf-adapter", outtype=outtype,
                                                                          overwrite=True), engine_reference)
        print(f"{outtype}: {_size(report.bytes)} in {time.perf_counter() - t:.1f} s, max relative delta error "
              f"{max(report.adapter_errors.values()):.2e}")

    if not args.skip_llama_cpp and importlib.util.find_spec("llama_cpp") is not None:
        print("\n## llama.cpp (llama-cpp-python) greedy, 16 tokens, against lorad serving the adapter")
        from llama_cpp import Llama

        orig = merges["merged-fp32-orig"]
        base_gguf = write_model_gguf(embedded_model_dir(), work / "base-f32.gguf", "f32", tokenizer_gguf=source)
        merged_orig_gguf = write_model_gguf(work / "merged-fp32-orig", work / "merged-orig-f16.gguf", "f16",
                                            tokenizer_gguf=source)
        runs = {
            "merged (NF4 base) f16 GGUF": ({"model_path": str(work / "model-f16.gguf")}, merged.reference),
            "merged (--from-original) f16 GGUF": ({"model_path": str(merged_orig_gguf)}, orig.reference),
            "base f32 GGUF + adapter f32 GGUF": ({"model_path": str(base_gguf),
                                                   "lora_path": str(work / "adapter-f32.gguf")}, orig.reference),
        }
        for label, (kwargs, reference) in runs.items():
            llm = Llama(n_ctx=256, n_threads=2, verbose=False, **kwargs)
            same = 0
            for g in reference:
                out, stopped = [], False
                for token in llm.generate(g.prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
                    if token == llm.token_eos():
                        stopped = True
                        break
                    out.append(token)
                    if len(out) == 16:
                        break
                same += (out, stopped) == (g.tokens, bool(g.stop_ids))
            print(f"{label}: greedy tokens equal on {same}/{len(reference)} prompts")
            del llm
    print(f"\nload average {os.getloadavg()}; work dir {work}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
