"""Crash-safe checkpoints: where they live, how they are committed, which one a resume picks.

    OUTPUT_DIR/checkpoints/
      .tmp-checkpoint-12/   being written (never read; removed at the next start)
      checkpoint-8/         committed: holds COMPLETE, the commit marker
        adapter_model.safetensors, adapter_config.json   LoRA weights (PEFT format)
        optimizer.pt, scheduler.pt, rng_state*.pth       optimizer, LR schedule, RNG (python, numpy, torch)
        trainer_state.json                               step, epoch, log history
        lorad_state.json                                 data position + config fingerprint
        COMPLETE                                         manifest (file -> size), written last

Commit protocol: write every file into `.tmp-checkpoint-N` (same parent, so the rename never
crosses a filesystem), fsync the files and the folder, rename to `checkpoint-N`, fsync the
parent, then write COMPLETE (temp file, fsync, rename, fsync). A folder without a valid
COMPLETE is never resumed from, whatever killed the writer and wherever.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from lorad.files import fsync_path
from lorad.trainer.errors import CheckpointError, ResumeMismatchError

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
STATE_FILE = "lorad_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_STAGING_PREFIX = ".tmp-checkpoint-"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    def state(self) -> dict:
        try:
            return json.loads((self.path / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {self.path} has no readable {STATE_FILE} ({exc})") from exc


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def staging_dir(root: Path, step: int) -> Path:
    return root / f"{_STAGING_PREFIX}{step}"


def final_dir(root: Path, step: int) -> Path:
    return root / f"checkpoint-{step}"


# ---- durability helpers (module-level so a test can stall the writer at an exact point) ------


def fsync_tree(folder: Path) -> None:
    """fsync every file in a folder, then the folder itself."""
    for child in sorted(folder.iterdir()):
        if child.is_file():
            fsync_path(child)
    fsync_path(folder)


def commit(staging: Path, final: Path) -> None:
    """Atomically publish a fully written staging folder under its final name."""
    if final.exists():  # a previous attempt died after its rename but before its marker
        remove_checkpoint(final)
    os.rename(staging, final)
    fsync_path(final.parent)


def write_marker(final: Path, step: int) -> None:
    """The commit marker, written last: a manifest of the folder's files and sizes."""
    files = {p.name: p.stat().st_size for p in sorted(final.iterdir()) if p.is_file() and p.name != MARKER}
    tmp = final / f".{MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final / MARKER)
    fsync_path(final)


# ---- reading ---------------------------------------------------------------------------------


def is_complete(path: Path) -> bool:
    """True when the folder holds a marker whose manifest matches the files on disk."""
    m = _NAME.match(path.name)
    if m is None:
        return False
    try:
        manifest = json.loads((path / MARKER).read_text())
        if manifest.get("step") != int(m.group(1)):
            return False
        return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def complete_checkpoints(root: Path) -> list[Checkpoint]:
    """Committed checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir() and is_complete(child):
            found.append(Checkpoint(child, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def incomplete_entries(root: Path) -> list[Path]:
    """Staging folders and uncommitted checkpoint folders: leftovers of a crash."""
    if not root.is_dir():
        return []
    return sorted(
        child
        for child in root.iterdir()
        if child.name.startswith(_STAGING_PREFIX) or (_NAME.match(child.name) and not is_complete(child))
    )


def latest_checkpoint(output_dir: str | Path) -> Checkpoint | None:
    found = complete_checkpoints(checkpoint_root(output_dir))
    return found[-1] if found else None


def resolve_resume(output_dir: str | Path, explicit: str | None, flag: str = "--resume-from") -> Checkpoint:
    """--resume (latest complete checkpoint of the run), --resume-from PATH or --init-from PATH."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_dir():
            raise CheckpointError(f"{flag} {explicit}: no such checkpoint folder")
        if not is_complete(path):
            raise CheckpointError(
                f"{flag} {explicit}: not a complete checkpoint (no valid {MARKER} marker on a checkpoint-N folder: "
                "the save that wrote it did not finish, or it is not a checkpoint); pick another one"
                + (" or use --resume for the latest complete one" if flag == "--resume-from" else "")
            )
        return Checkpoint(path, int(_NAME.match(path.name).group(1)))
    root = checkpoint_root(output_dir)
    found = latest_checkpoint(output_dir)
    if found is None:
        partial = incomplete_entries(root)
        extra = f" ({len(partial)} incomplete one(s) ignored)" if partial else ""
        raise CheckpointError(f"--resume: no complete checkpoint in {root}{extra}; start without --resume")
    return found


# ---- housekeeping ----------------------------------------------------------------------------


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder, marker first, so a half-deleted folder never looks complete."""
    marker = path / MARKER
    if marker.exists():
        marker.unlink()
        fsync_path(path)
    shutil.rmtree(path, ignore_errors=True)


def remove_leftovers(root: Path) -> list[Path]:
    leftovers = incomplete_entries(root)
    for path in leftovers:
        remove_checkpoint(path)
    return leftovers


def rotate(root: Path, keep: int | None) -> list[Path]:
    """Keep the newest `keep` complete checkpoints (all when keep is None)."""
    if keep is None:
        return []
    done = complete_checkpoints(root)
    old = [c.path for c in done[: max(0, len(done) - keep)]]
    for path in old:
        remove_checkpoint(path)
    return old


# ---- resume compatibility --------------------------------------------------------------------


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """One line per key whose value differs between the checkpoint and this run."""
    lines = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            lines.append(f"  {key}: checkpoint has {a!r}, this run has {b!r}")
    return lines


def check_compatible(checkpoint: Checkpoint, current: dict) -> dict:
    """Raise ResumeMismatchError listing every difference; returns the checkpoint's state."""
    state = checkpoint.state()
    saved = state.get("fingerprint")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {checkpoint.path} has no config fingerprint in {STATE_FILE}")
    diffs = fingerprint_differences(saved, current)
    if diffs:
        raise ResumeMismatchError(
            f"cannot resume from {checkpoint.path}: this run differs from the one that wrote it, so it would not "
            "continue the same run:\n" + "\n".join(diffs) + "\nRestore those settings, or start a new run in another "
            "output_dir."
        )
    return state
