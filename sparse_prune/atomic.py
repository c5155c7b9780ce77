"""Crash-safe file writes: a file is written beside its target under a temporary name, flushed
to disk (``fsync``), then renamed over the target (``os.replace``, atomic on POSIX and Windows)
and the directory entry flushed. A write killed at any moment leaves the old file or the new one
whole, never a truncated mix."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable


def _fsync_dir(directory: str) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """``write(tmp)`` fills a new temporary file beside ``path``; it is then fsynced and its
    name returned (the caller renames it with :func:`commit`). On any error the temporary file
    is removed and the error raised."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def commit(tmp: str, path: str | os.PathLike) -> None:
    """Rename the fsynced temporary file ``tmp`` over ``path`` and flush the directory."""
    os.replace(tmp, os.fspath(path))
    _fsync_dir(os.path.dirname(os.path.abspath(os.fspath(path))))


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write ``path`` crash-safely: ``write(tmp)`` fills a temporary file, then it replaces ``path``."""
    commit(write_temp(path, write), path)


def write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`write_atomic` of a UTF-8 text file (the CLI's JSON and Markdown results)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    write_atomic(path, write)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """``fig.savefig`` crash-safely (the format from ``path``'s suffix, as matplotlib would)."""
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))
