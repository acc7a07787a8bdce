"""Helpers shared across the package, one owner each."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = ["HelpFormatter", "atomic_write", "check_output_folder", "format_millions", "write_folder_atomically"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", fsync: bool = False,
                 encoding: str | None = None) -> Iterator[IO]:
    """Write ``path`` all or nothing: yields a new temporary file beside it, renamed over ``path`` when the block
    ends without an exception, removed otherwise (a crash leaves at most a hidden ``.tmp`` file). ``fsync``: the
    data reaches the disk before the rename (for files whose presence marks something complete)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def format_millions(n: int) -> str:
    """A parameter count for people: ``204.5M``, ``81k``."""
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless it has no default, is required or already talks about
    its default (the ``sphere-ar`` commands and the demo)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        no_default = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if no_default or action.required or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def check_output_folder(output: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise unless ``output`` can become a new folder: absent, empty, or (with ``overwrite``) a folder."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"{output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty (pass --overwrite to replace it)")


def write_folder_atomically(output: str | os.PathLike, write: Callable[[Path], object],
                            overwrite: bool = False) -> Path:
    """Call ``write(tmp_dir)`` and move the folder into place only once it is complete.

    The temporary folder sits beside ``output`` (same file system, so the final rename is atomic) and is removed
    on any failure or interruption; an existing ``output`` (with ``overwrite``) is only removed once the new one
    is complete, and put back if the swap fails. Without ``overwrite`` a non-empty ``output`` is an error.
    """
    output = Path(output)
    check_output_folder(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        write(tmp)
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, old / output.name)
            try:
                os.replace(tmp, output)
            except BaseException:
                os.replace(old / output.name, output)
                raise
            finally:
                if not (old / output.name).exists() or output.exists():
                    shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output
