"""Exponential moving average of the trainable parameters (the official ``update_ema``) and its Trainer callback.

The official recipe keeps ``ema = lerp(ema, param, 1 - decay)`` over the parameters that require grad, updated
after every optimizer step, with ``decay = 0.9999`` and ``ema = param`` at the start of a fresh run. The callback
saves the average into every Trainer checkpoint folder (``ema.safetensors``) and restores it on resume, so that a
resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..utils import atomic_write

__all__ = ["EMA_WEIGHTS_NAME", "EMACallback", "ParameterEMA", "unwrap_module"]

logger = logging.getLogger(__name__)

EMA_WEIGHTS_NAME = "ema.safetensors"


def unwrap_module(model: nn.Module) -> nn.Module:
    """The plain module under DDP / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class ParameterEMA:
    """EMA copies of ``model``'s trainable parameters (same dtype and device as the parameters).

    ``update()`` is the official ``update_ema``: ``torch._foreach_lerp_(ema, params, 1 - decay)`` over the
    parameters with ``requires_grad``. Parameters are referenced, so in-place loads into the model (resume) are
    seen; the average starts as an exact copy of the parameters.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        model = unwrap_module(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters to average")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]
        self.num_updates = 0

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """One EMA step towards the current parameters: ``ema += (1 - decay) * (param - ema)``."""
        d = self.decay if decay is None else float(decay)
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the averaged weights into ``model`` (default: the model being averaged)."""
        if model is None:
            targets = self.params
        else:
            by_name = dict(unwrap_module(model).named_parameters())
            missing = [n for n in self.names if n not in by_name]
            if missing:
                raise ValueError(f"the model has no parameters {missing[:5]} (EMA of a different architecture?)")
            targets = [by_name[n] for n in self.names]
        for t, s in zip(targets, self.shadow):
            t.copy_(s.to(t.dtype))

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """The averaged weights in the model for the duration of the block (e.g. to sample with them), its own
        weights back afterwards, bit for bit."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: averaged tensor}`` (CPU, contiguous)."""
        return {n: s.detach().to("cpu").contiguous() for n, s in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load averaged tensors saved by :meth:`state_dict`; names and shapes must match exactly."""
        missing = [n for n in self.names if n not in state_dict]
        extra = [n for n in state_dict if n not in set(self.names)]
        if missing or extra:
            raise ValueError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for n, s in zip(self.names, self.shadow):
            if state_dict[n].shape != s.shape:
                raise ValueError(f"EMA tensor {n}: shape {tuple(state_dict[n].shape)}, expected {tuple(s.shape)}")
            s.copy_(state_dict[n].to(s.device, s.dtype))

    def save(self, path: str | os.PathLike) -> None:
        """Write ``state_dict()`` as safetensors (temporary name, then rename)."""
        meta = {"decay": repr(self.decay), "num_updates": str(self.num_updates)}
        with atomic_write(path, fsync=True) as f:
            f.write(save(self.state_dict(), metadata=meta))

    def load(self, path: str | os.PathLike) -> None:
        """Load a file written by :meth:`save`."""
        with safe_open(str(path), "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        self.load_state_dict(state)
        self.num_updates = int(meta.get("num_updates", self.num_updates))


class EMACallback(TrainerCallback):
    """Keeps a :class:`ParameterEMA` of the trained model in step with a ``transformers.Trainer``.

    * ``on_train_begin``: starts the average from the model, or loads ``ema.safetensors`` from
      ``resume_from_checkpoint`` (set by :class:`~sphere_ar_hf.training.trainer.SphereARTrainer`; with a plain
      Trainer, ``args.resume_from_checkpoint`` is used when it is a folder);
    * ``on_step_end``: one EMA update per optimizer step;
    * ``on_save``: writes ``ema.safetensors`` into the checkpoint just saved (with SphereARTrainer: before the
      checkpoint is marked complete, since the trainer's completion callback comes after this one);
    * ``on_train_end``: copies the averaged weights into the model when ``copy_to_model_on_train_end``.
    """

    def __init__(self, decay: float = 0.9999, copy_to_model_on_train_end: bool = True):
        self.decay = float(decay)
        self.copy_to_model_on_train_end = copy_to_model_on_train_end
        self.ema: ParameterEMA | None = None
        self.resume_from_checkpoint: str | None = None

    def _resume_folder(self, args: TrainingArguments) -> str | None:
        folder = self.resume_from_checkpoint
        if folder is None and isinstance(args.resume_from_checkpoint, str) and os.path.isdir(
                args.resume_from_checkpoint):
            folder = args.resume_from_checkpoint
        return folder

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs) -> None:
        if model is None:
            raise ValueError("EMACallback needs the model (pass it through the Trainer)")
        self.ema = ParameterEMA(model, self.decay)
        folder = self._resume_folder(args)
        if folder is not None:
            path = os.path.join(folder, EMA_WEIGHTS_NAME)
            if os.path.isfile(path):
                self.ema.load(path)
                logger.info("restored the EMA weights from %s", path)
            else:
                logger.warning("%s has no %s: the EMA restarts from the current weights", folder, EMA_WEIGHTS_NAME)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.ema is not None:
            self.ema.update()

    def save(self, folder: str | os.PathLike) -> None:
        """Write the average into a checkpoint folder."""
        if self.ema is not None:
            self.ema.save(Path(folder) / EMA_WEIGHTS_NAME)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and folder.is_dir():
            self.save(folder)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs) -> None:
        if self.ema is not None and self.copy_to_model_on_train_end:
            self.ema.copy_to(model)
