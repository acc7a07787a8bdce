"""The official learning-rate schedule, shared by the S-VAE and the SphereAR trainers.

The schedule is a pure function of ``(step, total_steps, settings)``: clamped to ``[0, total_steps]`` (never past
its end, never above the peak ``lr``, never below ``min_lr`` once the decay started), and on resume it is
recomputed from the *current* arguments (:class:`OfficialLRScheduler` ignores the totals a checkpoint recorded),
so a run resumed with a larger ``max_steps`` follows the schedule it would have followed had it started with it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["OfficialLRLambda", "OfficialLRScheduler", "official_learning_rate"]


def official_learning_rate(step: int, total_steps: int, lr: float, min_lr: float = 1e-5, warmup_steps: int = 0,
                           decay_start: int = -1) -> float:
    """The official ``adjust_learning_rate`` for optimizer step ``step`` (0-based), clamped at both ends.

    Linear warm-up ``lr * step / warmup_steps`` for ``step < warmup_steps``; cosine decay from ``lr`` to
    ``min_lr`` over ``[decay_start, total_steps]`` when ``0 < decay_start < total_steps``, held at ``min_lr``
    past ``total_steps``; ``lr`` otherwise. The result always lies in ``[0, lr]``.
    """
    step = max(0, int(step))
    if step < warmup_steps and warmup_steps > 0:
        value = lr * step / warmup_steps
    elif 0 < decay_start < total_steps and step >= decay_start:
        progress = min(1.0, (step - decay_start) / max(total_steps - decay_start, 1e-8))
        value = min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        value = lr
    return float(min(max(value, 0.0), lr))


class OfficialLRLambda:
    """``LambdaLR`` factor ``official_learning_rate(step) / lr`` (a callable object: its settings are recorded in
    the scheduler's state dict, for information; :class:`OfficialLRScheduler` does not restore them)."""

    def __init__(self, total_steps: int, lr: float, min_lr: float, warmup_steps: int, decay_start: int):
        self.total_steps, self.lr, self.min_lr = int(total_steps), float(lr), float(min_lr)
        self.warmup_steps, self.decay_start = int(warmup_steps), int(decay_start)

    def __call__(self, step: int) -> float:
        if self.lr == 0:
            return 0.0
        return official_learning_rate(step, self.total_steps, self.lr, self.min_lr, self.warmup_steps,
                                      self.decay_start) / self.lr


class OfficialLRScheduler(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` of :class:`OfficialLRLambda` that, when a checkpoint is loaded, restores only the step.

    ``LambdaLR.load_state_dict`` would also restore the lambda's settings (the old ``total_steps``) and the old
    ``base_lrs``; here both stay those of the current arguments, and the optimizer's learning rates are set to the
    current schedule's value at the restored step (the optimizer state a checkpoint restores holds the old ones).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr_lambda: OfficialLRLambda, last_epoch: int = -1):
        super().__init__(optimizer, lr_lambda, last_epoch=last_epoch)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step (``last_epoch``) only, and put the current schedule's rates into the optimizer."""
        self.last_epoch = int(state_dict.get("last_epoch", self.last_epoch))
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        values = [base * fn(self.last_epoch) for base, fn in zip(self.base_lrs, self.lr_lambdas)]
        for group, value in zip(self.optimizer.param_groups, values):
            group["lr"] = value
        self._last_lr = values
