"""Writes that a crash cannot leave half done: a file or a folder appears whole or not at all.

Every stage that saves something a later run trusts (checkpoints, reward statistics, exported
policies, prepared default-run stages, results) writes through these two, so the rule lives once:
write beside the target, flush to disk, then rename over it (a rename within a folder is atomic).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def write_synced(path: str | Path, data: str | bytes) -> None:
    """Write and fsync one file (inside a folder that is itself renamed into place later)."""
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Replace ``path`` with ``data``: readers see the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)
    return path


@contextlib.contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name; it replaces ``final`` only when the block ends without error.

    A failure removes the temporary folder and leaves ``final`` (an earlier complete version, if any)
    untouched. A leftover temporary folder from a crash is removed on the next attempt.
    """
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _sync_folder(final.parent)
