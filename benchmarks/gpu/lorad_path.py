"""Make `import lorad` work from a bare checkout, with no pip install (the GPU machine has no
registry and its own Python): the package-dir mapping of pyproject.toml, as a meta-path finder.

run.sh writes a sitecustomize.py that calls install(REPO), so every process of the check
(pytest, the benchmarks' subprocesses) sees the same mapping.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import tomllib
from pathlib import Path


class _PackageDirFinder(importlib.abc.MetaPathFinder):
    def __init__(self, root: Path, mapping: dict[str, str]):
        self.root = root
        self.mapping = mapping

    def find_spec(self, name, path=None, target=None):
        folder = self.mapping.get(name)
        if folder is None:
            return None
        location = self.root / folder
        return importlib.util.spec_from_file_location(name, location / "__init__.py",
                                                      submodule_search_locations=[str(location)])


def install(root: str | Path) -> None:
    root = Path(root).resolve()
    if any(isinstance(f, _PackageDirFinder) for f in sys.meta_path):
        return
    config = tomllib.loads((root / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    sys.meta_path.insert(0, _PackageDirFinder(root, mapping))
