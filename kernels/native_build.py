"""Build a kernel's C source on first use with the system's C compiler, cache it, load it with ctypes.

lorad's CPU kernels (nf4_avx2.c, lora_cpu.c) are plain C with AVX2 intrinsics, compiled where
they run (no wheel per CPU, no torch headers: ~0.5 s with gcc) into
`<lorad cache>/kernels/<name>-<hash of source and flags>.so`, built aside and renamed into place
so concurrent processes never load a half-written file. Without AVX2/FMA or a compiler the
caller gets the reason and keeps its PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# -fopenmp: the library then needs libgomp.so.1, which resolves to the copy torch has loaded
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc") if c and shutil.which(c)), None)


def build_and_load(source: Path) -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "") or (None, why it is unavailable here)."""
    from lorad.base_model import cache_dir
    from lorad.cpu_features import detect

    if not {"avx2", "fma"} <= detect().flags:
        return None, "the CPU lacks AVX2/FMA"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (cc or gcc; or set CC)"
    key = hashlib.sha256(source.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{source.stem}-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([cc, *FLAGS, "-o", str(built), str(source)], capture_output=True, text=True)
            if result.returncode != 0:
                return None, f"{cc} failed to build {source.name}: {result.stderr.strip()[-500:]}"
            os.replace(built, target)
    return ctypes.CDLL(str(target)), ""
