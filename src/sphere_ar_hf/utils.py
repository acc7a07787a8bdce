"""Helpers shared across the package, one owner each."""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["HelpFormatter", "atomic_write", "format_millions"]


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
