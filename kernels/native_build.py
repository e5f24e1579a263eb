"""Build a kernel's C source on first use with the system's C compiler, cache it, load it with ctypes.

lorad's CPU kernels (nf4_avx2.c, lora_cpu.c) are plain C with AVX2 intrinsics, compiled where
they run (no wheel per CPU, no torch headers: ~0.5 s with gcc) into
`<lorad cache>/kernels/<name>-<hash of source and flags>.so`, built aside and renamed into place
so concurrent processes never load a half-written file. Without AVX2/FMA, a compiler, or a
writable and executable cache, the caller gets the reason and keeps its PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# -fopenmp: the library then needs libgomp.so.1. torch's CPU wheel ships its libgomp under that
# same soname, so the loader reuses the copy torch has loaded (one OpenMP runtime); a torch built
# with a renamed libgomp would give the kernels a second runtime of their own.
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc") if c and shutil.which(c)), None)


class NativeKernel:
    """One C source with one entry point `int symbol(*argtypes)`, built and loaded on first use."""

    def __init__(self, source: Path, symbol: str, argtypes: list):
        self.source, self.symbol, self.argtypes = source, symbol, argtypes

    @functools.cached_property
    def _loaded(self) -> tuple[ctypes.CDLL | None, str]:
        try:
            return _build_and_load(self.source, self.symbol, self.argtypes)
        except (OSError, subprocess.SubprocessError, AttributeError) as exc:  # read-only or noexec cache, no
            return None, f"building or loading {self.source.name} failed: {exc}"  # libgomp, a hung compiler

    @property
    def function(self):
        """The entry point (ctypes), or None."""
        lib = self._loaded[0]
        return None if lib is None else getattr(lib, self.symbol)

    def available(self) -> bool:
        return self._loaded[0] is not None

    def unavailable_reason(self) -> str:
        """Why it cannot run here ("" when it can)."""
        return self._loaded[1]


def _build_and_load(source: Path, symbol: str, argtypes: list) -> tuple[ctypes.CDLL | None, str]:
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
            result = subprocess.run([cc, *FLAGS, "-o", str(built), str(source)], capture_output=True, text=True,
                                    timeout=BUILD_TIMEOUT_S)
            if result.returncode != 0:
                return None, f"{cc} failed to build {source.name}: {result.stderr.strip()[-500:]}"
            os.replace(built, target)
    lib = ctypes.CDLL(str(target))
    fn = getattr(lib, symbol)
    fn.restype, fn.argtypes = ctypes.c_int, argtypes
    return lib, ""
