"""Crash-safe writes: a directory is written beside its target, then swapped in whole."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX, OLD_PREFIX = ".tmp_", ".old_"  # leftovers of a killed write carry these (see checkpoint._clean)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entries: renames into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target`` to write into. When the block ends without
    an error, every file in it and the directory are fsynced, it is renamed to ``target`` (an
    existing ``target`` is moved aside first and removed after) and the parent is fsynced. On an
    error the temporary directory is removed and ``target`` is left as it was."""
    parent = target.parent
    tmp = parent / f"{TMP_PREFIX}{target.name}_{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        yield tmp
        for path in tmp.iterdir():
            fsync_path(path)
        fsync_path(tmp)
        if target.exists():
            old = parent / f"{OLD_PREFIX}{target.name}_{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)
