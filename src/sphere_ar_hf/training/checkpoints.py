"""Crash-safe training checkpoints, shared by both trainers: a completion marker written last, and the resolver of
``--resume_from_checkpoint`` that never picks a checkpoint a crash left half-written."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..utils import atomic_write

__all__ = ["CHECKPOINT_MARKER", "DEFAULT_CHECKPOINT_LIMIT", "checkpoints_to_delete", "is_complete_checkpoint",
           "list_checkpoints", "mark_checkpoint_complete", "resolve_resume_checkpoint", "rotate_checkpoints"]

logger = logging.getLogger(__name__)

CHECKPOINT_MARKER = "checkpoint_complete.json"
DEFAULT_CHECKPOINT_LIMIT = 3
"""Both trainers keep the newest 3 complete checkpoints by default (plus every N-th with ``keep_checkpoints_every``)."""
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR, and the S-VAE trainer's


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every ``checkpoint-<step>`` folder in ``output_dir`` as ``(step, path)``, newest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))]
    return sorted(found, key=lambda sp: sp[0], reverse=True)


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """True when ``folder`` has its completion marker and every file the marker lists, at the recorded size."""
    folder = Path(folder)
    try:
        files = json.loads((folder / CHECKPOINT_MARKER).read_text())["files"]
        return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def mark_checkpoint_complete(folder: str | os.PathLike, step: int, extra: dict[str, Any] | None = None) -> None:
    """fsync every file of ``folder``, then write the completion marker (``global_step``, every file's size and
    ``extra``) under a temporary name and rename it."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != CHECKPOINT_MARKER:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[str(path.relative_to(folder))] = path.stat().st_size
    with atomic_write(folder / CHECKPOINT_MARKER, "w", fsync=True) as f:
        json.dump({"global_step": int(step), **(extra or {}), "files": files}, f, indent=1, default=str)
    _fsync_path(folder)


def checkpoints_to_delete(output_dir: str | os.PathLike, limit: int | None, keep_every: int | None = None,
                          protect: Sequence[str | os.PathLike | None] = ()) -> list[Path]:
    """The checkpoint folders of ``output_dir`` that a rotation deletes: every incomplete one, and the complete
    ones beyond the newest ``limit`` (``None`` or ``<= 0``: no limit), except those whose step is a multiple of
    ``keep_every`` (kept for good, not counted in ``limit``) and the ``protect``-ed paths (e.g. the best one).
    Only call this right after a checkpoint was marked complete: an incomplete one could be in the making."""
    if not limit or limit <= 0:
        return []
    kept = {Path(p).resolve() for p in protect if p is not None}
    rotating, incomplete = [], []
    for step, folder in list_checkpoints(output_dir):
        if not is_complete_checkpoint(folder):
            incomplete.append(folder)
        elif not (keep_every and keep_every > 0 and step % keep_every == 0):
            rotating.append(folder)
    return [p for p in rotating[limit:] + incomplete if p.resolve() not in kept]


def rotate_checkpoints(output_dir: str | os.PathLike, limit: int | None, keep_every: int | None = None,
                       protect: Sequence[str | os.PathLike | None] = ()) -> list[Path]:
    """Delete :func:`checkpoints_to_delete` (main process only); returns the deleted folders."""
    doomed = checkpoints_to_delete(output_dir, limit, keep_every, protect)
    for folder in doomed:
        logger.info("deleting checkpoint %s (keeping the newest %d%s)", folder, limit,
                    f" and every {keep_every}-th step" if keep_every else "")
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def resolve_resume_checkpoint(output_dir: str | os.PathLike, resume: str | bool | None) -> str | None:
    """Turn ``--resume_from_checkpoint`` into a checkpoint folder (or None: start from scratch).

    ``"latest"`` (or ``True``): the newest *complete* checkpoint in ``output_dir``, None when there is none, so a
    preemptible job can always pass it. A path must be a complete checkpoint: one a crash left half-written is
    refused with a ValueError that says so.
    """
    word = resume.strip().lower() if isinstance(resume, str) else None
    if resume is None or resume is False or word in ("", "none", "false"):
        return None
    if resume is True or word in ("latest", "last", "true"):
        for _, folder in list_checkpoints(output_dir):
            if is_complete_checkpoint(folder):
                return str(folder)
            logger.warning("skipping %s: incomplete (the run stopped while writing it)", folder)
        logger.info("no complete checkpoint in %s: training starts from scratch", output_dir)
        return None
    folder = Path(resume)
    if not folder.is_dir():
        raise ValueError(f"--resume_from_checkpoint {resume}: no such folder (pass a checkpoint folder or 'latest')")
    if not is_complete_checkpoint(folder):
        raise ValueError(f"--resume_from_checkpoint {resume}: incomplete checkpoint (no valid {CHECKPOINT_MARKER}; "
                         "the run stopped while writing it); pass 'latest' to use the newest complete one")
    return str(folder)
