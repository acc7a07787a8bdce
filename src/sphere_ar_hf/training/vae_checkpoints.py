"""The S-VAE run's resumable position and its checkpoints: the sampler that starts mid-epoch, the state that
``accelerate`` does not save itself, and the atomic ``save_state`` into ``checkpoint-<step>``.

:class:`TrainState` travels as JSON in the checkpoint's completion marker, not as an object registered with
``accelerator.register_for_checkpointing``: ``accelerate`` unpickles registered objects with
``weights_only=False``, so a checkpoint folder from elsewhere could run code on resume.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from ..utils import shared_staging_path, stage_folder, swap_folder_into_place
from .checkpoints import CHECKPOINT_MARKER, mark_checkpoint_complete, rotate_checkpoints

__all__ = [
    "ResumableDistributedSampler",
    "TrainState",
    "accelerate_state_folder",
    "process_positions",
    "save_checkpoint_atomically",
]


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (the official sampler: shuffled with ``seed + epoch``, sharded by rank) that can
    start after the first ``start_index`` indices of this rank's share, to resume mid-epoch."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.start_index = 0

    def set_start_index(self, start_index: int) -> None:
        """Skip the first ``start_index`` indices of this rank's share (until set again)."""
        self.start_index = int(start_index)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start_index, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_index)


@dataclass
class TrainState:
    """What ``accelerate`` does not save itself: the step, the data position and the batch geometry."""

    global_step: int = 0
    epoch: int = 0
    micro_batches_in_epoch: int = 0
    global_batch_size: int = 0
    num_processes: int = 0
    gradient_accumulation_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        """The fields, for ``accelerator.save_state``."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Set the fields from :meth:`state_dict`'s dict."""
        for key, value in state.items():
            setattr(self, key, int(value))

    def load_checkpoint(self, folder: str | os.PathLike, process_index: int = 0, num_processes: int = 1) -> None:
        """Set the fields from the completion marker of ``folder`` (a complete ``checkpoint-<step>``), with the data
        position of process ``process_index`` when the checkpoint was written by ``num_processes`` processes (the
        processes of a stream can be in different epochs; otherwise process 0's). A checkpoint written before the
        state moved there holds it in accelerate's ``custom_checkpoint_0.pkl``, which is read with
        ``torch.load(weights_only=True)`` (a dict of integers): a pickle that would run code is refused."""
        folder = Path(folder)
        marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
        saved = marker.get("train_state")
        if saved is None:
            legacy = folder / "custom_checkpoint_0.pkl"
            try:
                saved = torch.load(legacy, map_location="cpu", weights_only=True)
            except (OSError, pickle.UnpicklingError, RuntimeError) as e:
                lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                why = next((line for line in lines if "unsupported global" in line.lower()), lines[0] if lines else
                           type(e).__name__)
                raise ValueError(f"{legacy}: the run's position could not be read as plain data ({why}); expected "
                                 "a checkpoint written by this trainer") from None
        if not isinstance(saved, dict) or set(saved) != set(self.state_dict()) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in saved.values()):
            raise ValueError(f"{folder}: train_state {saved!r}: expected the integers {sorted(self.state_dict())}")
        self.load_state_dict(saved)
        positions = marker.get("process_positions")
        if positions is None:  # written before the positions were saved per process
            return
        if not (isinstance(positions, list) and len(positions) == self.num_processes and all(
                isinstance(p, list) and len(p) == 2 and all(type(v) is int and v >= 0 for v in p) for p in positions)):
            raise ValueError(f"{folder}: process_positions {positions!r}: expected {self.num_processes} pairs "
                             "[epoch, micro_batches_in_epoch] of integers >= 0")
        if num_processes == self.num_processes:
            self.epoch, self.micro_batches_in_epoch = positions[process_index]


def process_positions(accelerator: Any, state: TrainState) -> list[list[int]]:
    """``[epoch, micro_batches_in_epoch]`` of every process, in process order (a collective: call on every process).
    They differ when the processes stream shards of different lengths."""
    mine = torch.tensor([[state.epoch, state.micro_batches_in_epoch]], dtype=torch.long, device=accelerator.device)
    return accelerator.gather(mine).tolist()


@contextlib.contextmanager
def accelerate_state_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """``folder`` for ``accelerator.load_state`` with no object registered for checkpointing. A checkpoint written
    before :class:`TrainState` moved into the marker also holds ``custom_checkpoint_0.pkl``, which ``load_state``
    would refuse to skip: it then gets a temporary folder of links to every other file (removed afterwards; the
    checkpoint itself is not touched)."""
    folder = Path(folder)
    if not list(folder.glob("custom_checkpoint_*.pkl")):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="sphere-ar-resume-") as links:
        for path in folder.iterdir():
            if not path.name.startswith("custom_checkpoint_"):
                (Path(links) / path.name).symlink_to(path.resolve())
        yield Path(links)


def save_checkpoint_atomically(accelerator: Any, output_dir: str | os.PathLike, step: int,
                               extra: dict[str, Any] | None = None, total_limit: int | None = None,
                               keep_every: int | None = None) -> Path:
    """``accelerator.save_state`` into a staging folder (``utils.stage_folder(..., shared=True)``), add the
    completion marker (with ``extra``: the trainer passes its :class:`TrainState` as ``{"train_state": ...}``),
    then swap it into place as ``checkpoint-<step>`` (``utils.swap_folder_into_place``) and keep the newest
    ``total_limit`` complete checkpoints and every ``keep_every``-th (:func:`~.checkpoints.rotate_checkpoints`).
    Call on every process. An error removes the staging folder; a run killed before the swap leaves only a hidden
    folder that ``resolve_resume_checkpoint`` ignores and the next run removes."""
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    staged = stage_folder(final, shared=True) if accelerator.is_main_process else None
    try:
        accelerator.wait_for_everyone()
        staged = staged or shared_staging_path(final)
        accelerator.save_state(str(staged))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            mark_checkpoint_complete(staged, step, extra)
            swap_folder_into_place(staged, final)
            rotate_checkpoints(root, total_limit, keep_every)
    finally:
        if accelerator.is_main_process and staged is not None and staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
