"""The base-model cache writes folders atomically: a reader sees a complete folder or none."""

from __future__ import annotations

import pytest

from lorad.base_model import _publish_dir


def test_a_failed_write_leaves_neither_the_folder_nor_its_staging_copy(tmp_path):
    target = tmp_path / "model"

    def write(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # a Ctrl-C halfway through a conversion

    with pytest.raises(KeyboardInterrupt):
        _publish_dir(target, write)
    assert list(tmp_path.iterdir()) == []


def test_a_published_folder_is_complete_and_replaces_a_stale_one(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_bytes(b"old")
    _publish_dir(target, lambda tmp: (tmp / "model.safetensors").write_bytes(b"new"))
    assert sorted(p.name for p in target.iterdir()) == [".complete", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
