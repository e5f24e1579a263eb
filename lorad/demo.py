"""Write two small demo adapters so the quickstart can show per-adapter output at once.

    python -m lorad.demo ./adapters

They are random (seeded) rank-8 LoRA adapters for the embedded SmolLM2 base, in PEFT's
format, small enough that text stays fluent but different from the base. Real adapters come
from `lorad train` or any PEFT LoRA for the same base. Existing folders are left alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEMO_ADAPTERS = {"demo-a": 1, "demo-b": 2}


def write_demo_adapters(root: Path) -> list[Path]:
    from transformers import AutoConfig

    from lorad.base_model import embedded_model_dir
    from lorad.geometry import ModelGeometry
    from lorad.testing import write_random_adapter

    geometry = ModelGeometry.from_hf_config(AutoConfig.from_pretrained(embedded_model_dir()))
    written = []
    for name, seed in DEMO_ADAPTERS.items():
        path = root / name
        if path.exists():
            continue
        write_random_adapter(path, geometry, rank=8, alpha=16, seed=seed, b_std=0.02,
                             base_model_name="smollm2-135m-instruct")
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "adapters")
    target.mkdir(parents=True, exist_ok=True)
    for path in write_demo_adapters(target):
        print(f"wrote demo adapter {path}")
