"""Crash-safe writes and their verification.

A directory is written beside its target, then swapped in whole; its last file is ``manifest.json``
({file name: {"sha256": hex digest, "bytes": size}} of every other file in it), so that a file
damaged later on disk (a bad sector, a copy cut short) is found when it is read back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

TMP_PREFIX, OLD_PREFIX = ".tmp_", ".old_"  # leftovers of a killed write carry these (see checkpoint._clean)
MANIFEST_NAME = "manifest.json"

T = TypeVar("T")


class CheckpointError(ValueError):
    """A saved file is damaged: it differs from its manifest entry, or it cannot be parsed.

    ``path`` is the file (or the directory, when none of its checkpoints could be read).
    """

    def __init__(self, message: str, path: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = Path(path)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's entries: renames into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Write ``directory/manifest.json`` with the checksum and size of every file directly in it."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
    entries = {p.name: {"sha256": sha256_of(p), "bytes": p.stat().st_size} for p in files}
    (directory / MANIFEST_NAME).write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: Path) -> dict[str, dict] | None:
    """The manifest of ``directory``; None when it has none (written before manifests existed)."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text())
        if not all(isinstance(e["sha256"], str) and isinstance(e["bytes"], int) for e in entries.values()):
            raise ValueError("an entry lacks its sha256 or bytes")
    except Exception as e:  # any parse failure of a damaged file: JSON, UTF-8, wrong structure
        raise CheckpointError(f"{path} is damaged: {type(e).__name__}: {e}", path) from e
    return entries


def read_verified(file: Path, manifest: dict[str, dict] | None, parse: Callable[[Path], T]) -> T:
    """``parse(file)`` once its size and sha256 match its manifest entry (a file the manifest does not
    list, or a directory without manifest, is only parsed). Damage, found either way, raises a
    ``CheckpointError`` that names the file instead of the parser's own error."""
    entry = (manifest or {}).get(file.name)
    if entry is not None:
        size = file.stat().st_size
        if size != entry["bytes"]:
            found = f"{size} bytes, {entry['bytes']} when saved"
        elif sha256_of(file) != entry["sha256"]:
            found = f"its sha256 differs from the one in {MANIFEST_NAME}"
        else:
            found = None
        if found:
            raise CheckpointError(
                f"{file} is damaged or was changed after the save: {found} (to load an intentionally edited file "
                f"unchecked, delete {file.parent / MANIFEST_NAME})",
                file,
            )
    try:
        return parse(file)
    except Exception as e:  # safetensors, torch.load (zip, pickle) and JSON each raise their own types
        raise CheckpointError(f"{file} is damaged or unreadable: {type(e).__name__}: {e}", file) from e


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target`` to write into. When the block ends without
    an error, the manifest is written, every file in it and the directory are fsynced, it is
    renamed to ``target`` (an existing ``target`` is moved aside first and removed after) and the
    parent is fsynced. On an error the temporary directory is removed and ``target`` is left as it
    was."""
    parent = target.parent
    tmp = parent / f"{TMP_PREFIX}{target.name}_{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        yield tmp
        write_manifest(tmp)
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
