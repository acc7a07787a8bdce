"""The official learning-rate schedule, shared by the S-VAE and the SphereAR trainers."""

from __future__ import annotations

import math

__all__ = ["OfficialLRLambda", "official_learning_rate"]


def official_learning_rate(step: int, total_steps: int, lr: float, min_lr: float = 1e-5, warmup_steps: int = 0,
                           decay_start: int = -1) -> float:
    """The official ``adjust_learning_rate`` for optimizer step ``step`` (0-based).

    Linear warm-up ``lr * step / warmup_steps`` for ``step < warmup_steps``; cosine decay from ``lr`` to
    ``min_lr`` over ``[decay_start, total_steps]`` when ``0 < decay_start < total_steps``, held at ``min_lr``
    past ``total_steps``; ``lr`` otherwise.
    """
    if step < warmup_steps and warmup_steps > 0:
        return lr * step / warmup_steps
    if 0 < decay_start < total_steps and step >= decay_start:
        progress = min(1.0, (step - decay_start) / max(total_steps - decay_start, 1e-8))
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


class OfficialLRLambda:
    """``LambdaLR`` factor ``official_learning_rate(step) / lr`` (a callable object, so it is checkpointed)."""

    def __init__(self, total_steps: int, lr: float, min_lr: float, warmup_steps: int, decay_start: int):
        self.total_steps, self.lr, self.min_lr = int(total_steps), float(lr), float(min_lr)
        self.warmup_steps, self.decay_start = int(warmup_steps), int(decay_start)

    def __call__(self, step: int) -> float:
        if self.lr == 0:
            return 0.0
        return official_learning_rate(step, self.total_steps, self.lr, self.min_lr, self.warmup_steps,
                                      self.decay_start) / self.lr
