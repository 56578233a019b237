"""Output paths checked before any work, and written whole or not at all.

A command that is refused, or fails, leaves nothing behind: the folders it created for an output are
removed again, and a file is written to a temporary name beside its target and renamed into place only
when complete. ``os.access`` is not used: it says yes to root for paths no one can write (``/proc``).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


class OutputError(Exception):
    """An output path that can not be written: one line for the user."""


def reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def make_parents(path: Path, *, itself: bool = False) -> list[Path]:
    """Create the missing folders above ``path`` (and ``path`` itself when ``itself``); returns them, outermost first.

    OutputError names ``path`` and the folder that could not be created.
    """
    missing = [p for p in ([path] if itself else []) + list(path.parents) if not p.exists()]
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
    except OSError as exc:
        remove_created(created)
        raise OutputError(f"cannot write {path}: cannot create {folder}: {reason(exc)}") from None
    folder = path if itself else path.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: {folder} is not a directory")
    return created


def remove_created(created: list[Path]) -> None:
    """Remove files and folders this command created (innermost first), as far as they are still empty."""
    for path in reversed(created):
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() else path.unlink()


def check_regular_file(path: Path) -> None:
    """A file to read or append must be a regular file (or not exist yet)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"cannot use {path}: {reason(exc)}") from None
    if stat.S_ISDIR(mode):
        raise OutputError(f"{path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise OutputError(f"{path} is not a regular file (a device, pipe or socket)")


class AtomicFile:
    """An output file claimed up front (a temporary file beside it) and put in place by ``commit``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        check_regular_file(self.path)
        self._created = make_parents(self.path)
        try:
            fd, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        except OSError as exc:
            remove_created(self._created)
            raise OutputError(f"cannot write {self.path}: {reason(exc)}") from None
        os.close(fd)
        self.temp = Path(temp)

    def commit(self, text: str) -> None:
        try:
            self.temp.write_text(text)
            os.replace(self.temp, self.path)
        except OSError as exc:
            self.discard()
            raise OutputError(f"cannot write {self.path}: {reason(exc)}") from None

    def discard(self) -> None:
        self.temp.unlink(missing_ok=True)
        remove_created(self._created)


class OutputDir:
    """An output folder claimed up front: created if missing and proven writable, removed again by ``discard``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"output path {self.path} exists and is not a directory")
        self._created = make_parents(self.path, itself=True)
        try:
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as exc:
            remove_created(self._created)
            raise OutputError(f"cannot write to {self.path}: {reason(exc)}") from None

    def discard(self) -> None:
        remove_created(self._created)
