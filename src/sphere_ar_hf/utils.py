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

__all__ = [
    "HelpFormatter",
    "atomic_write",
    "check_output_folder",
    "format_millions",
    "remove_staged_folders",
    "shared_staging_path",
    "stage_folder",
    "swap_folder_into_place",
    "write_folder_atomically",
]


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


def shared_staging_path(output: str | os.PathLike) -> Path:
    """Where ``stage_folder(output, shared=True)`` stages: ``.<name>.tmp-shared`` beside ``output`` (the other
    processes of a distributed writer get the path from here)."""
    output = Path(output)
    return output.parent / f".{output.name}.tmp-shared"


def stage_folder(output: str | os.PathLike, shared: bool = False) -> Path:
    """A new, empty staging folder beside ``output`` (same file system, so :func:`swap_folder_into_place` is a
    rename), hidden as ``.<name>.tmp-<suffix>``.

    ``shared=False``: a unique random suffix. ``shared=True``: the fixed name ``.<name>.tmp-shared``, so that
    processes of a distributed run can all write into it (one process calls this, the others wait at a barrier);
    whatever an earlier, killed run left there is removed first.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if not shared:
        return Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    staged = shared_staging_path(output)
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir()
    return staged


def swap_folder_into_place(staged: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Move the complete folder ``staged`` to ``output`` (a rename: ``staged`` must be on the same file system).

    An existing ``output`` is first moved aside (``.<name>.old-*``), deleted once the new folder is in place, and
    put back if the rename fails; nothing is left beside ``output`` either way.
    """
    staged, output = Path(staged), Path(output)
    if not output.exists():
        os.replace(staged, output)
        return output
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    try:
        os.replace(output, old / output.name)
        try:
            os.replace(staged, output)
        except BaseException:
            os.replace(old / output.name, output)
            raise
    finally:
        if not (old / output.name).exists() or output.exists():
            shutil.rmtree(old, ignore_errors=True)
    return output


def remove_staged_folders(parent: str | os.PathLike, name_pattern: str = "*") -> None:
    """Delete what :func:`stage_folder` / :func:`swap_folder_into_place` leave when a process is killed mid-write:
    ``.<name>.tmp-*`` and ``.<name>.old-*`` folders in ``parent`` whose ``<name>`` matches ``name_pattern``."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for path in parent.glob(f".{name_pattern}.{kind}-*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def write_folder_atomically(output: str | os.PathLike, write: Callable[[Path], object],
                            overwrite: bool = False) -> Path:
    """Call ``write(tmp_dir)`` and move the folder into place only once it is complete.

    The temporary folder (:func:`stage_folder`) sits beside ``output`` and is removed on any failure or
    interruption; an existing ``output`` (with ``overwrite``) is replaced by :func:`swap_folder_into_place`.
    Without ``overwrite`` a non-empty ``output`` is an error. Writers on several processes use the two steps
    directly (``stage_folder(output, shared=True)`` on one process, every process writes, one swaps).
    """
    output = Path(output)
    check_output_folder(output, overwrite)
    staged = stage_folder(output)
    try:
        write(staged)
        swap_folder_into_place(staged, output)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    return output
