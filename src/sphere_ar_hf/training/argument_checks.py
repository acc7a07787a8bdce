"""The ranges of the trainers' numeric arguments, checked before any work: a run never starts (or, worse, trains
for hours and exits 0 with a broken model) on a batch size of 0, a NaN EMA decay or an infinite learning rate.

One table (:data:`RULES`) for every trainer's argument dataclasses, by field name; :func:`check_arguments` raises a
one-line ``ValueError`` naming the flag (``--name``), the value and what is expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

__all__ = ["NON_NEGATIVE_INT", "POSITIVE_INT", "POSITIVE_REAL", "PROBABILITY", "RATE", "RULES", "check_arguments",
           "check_input_path", "check_value"]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"an integer >= {low}"


def _real(low: float, high: float = math.inf, open_low: bool = False, open_high: bool = False
          ) -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        return _number(v) and (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

    left, right = "(" if open_low else "[", ")" if open_high or high == math.inf else "]"
    return ok, f"a finite number in {left}{low:g}, {high:g}{right}"


POSITIVE_INT, NON_NEGATIVE_INT = _integer(1), _integer(0)
RATE = _real(0.0)  # learning rates, loss weights, decays: finite and >= 0
POSITIVE_REAL = _real(0.0, open_low=True)
PROBABILITY = _real(0.0, 1.0)

RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # sizes and counts
    **dict.fromkeys(["per_device_train_batch_size", "global_batch_size", "gradient_accumulation_steps",
                     "checkpointing_steps", "resolution", "diff_batch_mul", "disc_channels", "disc_layers",
                     "latent_dim", "patch_size", "z_channels", "encoder_layers", "decoder_layers",
                     "num_register_tokens", "num_attention_heads", "max_train_steps", "threads", "lora_rank",
                     "rank", "cnn_channels"], POSITIVE_INT),
    **dict.fromkeys(["dataloader_num_workers", "disc_start", "shuffle_buffer_size", "eval_images"],
                    NON_NEGATIVE_INT),
    "eval_num_inference_steps": POSITIVE_INT,
    "eval_guidance_scale": _real(-1e6, 1e6),
    "num_train_epochs": POSITIVE_REAL,
    # optimisation
    **dict.fromkeys(["learning_rate", "min_lr", "weight_decay", "max_grad_norm", "reconstruction_weight",
                     "perceptual_weight", "disc_weight", "kl_weight"], RATE),
    **dict.fromkeys(["adam_beta1", "adam_beta2"], _real(0.0, 1.0, open_high=True)),
    "ema_decay": (lambda v: _number(v) and v <= 1.0, "a finite number <= 1 (<= 0: no EMA)"),
    # probabilities
    **dict.fromkeys(["class_dropout_prob", "aug_ratio"], PROBABILITY),
    "lora_dropout": _real(0.0, 1.0, open_high=True),
    "lora_alpha": POSITIVE_REAL,
}


def check_value(name: str, value: Any, flag: str | None = None,
                rule: tuple[Callable[[Any], bool], str] | None = None) -> None:
    """``value`` of the argument ``name`` against ``rule`` (default: its entry of :data:`RULES`; None means "not
    set" and passes; a list is checked item by item): a one-line ``ValueError`` naming ``flag`` (default
    ``--<name>``)."""
    rule = rule or RULES.get(name)
    if rule is None or value is None:
        return
    ok, expected = rule
    values = value if isinstance(value, list | tuple) else [value]
    if not values or not all(ok(v) for v in values):
        raise ValueError(f"{flag or '--' + name} {value!r}: expected {expected}")


def check_arguments(*arguments: Any, flags: dict[str, str] | None = None) -> None:
    """Check every field of the argument dataclasses ``arguments`` that :data:`RULES` knows; ``flags`` maps a
    field name to the flag a script calls it (``{"learning_rate": "--vae_lr"}``)."""
    flags = flags or {}
    for args in arguments:
        for f in dataclasses.fields(args):
            check_value(f.name, getattr(args, f.name), flags.get(f.name))


def check_input_path(flag: str, value: str | os.PathLike | None) -> None:
    """An input the run reads (``--pretrained_vae``, ``--config_file``, ...): a one-line ``ValueError`` if it looks
    like a local path (absolute, ``./``, ``~``, a ``.json`` name, more than one ``/``) and does not exist, or is a
    ``.json`` file that is not a JSON object. Anything else may be a Hub repository id and is left to the loader."""
    if value is None:
        return
    path = os.fspath(value)
    if os.path.isfile(path) and path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{flag} {path}: not a readable JSON file ({' '.join(str(e).split())})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{flag} {path}: expected a JSON object (a config), got {type(data).__name__}")
        return
    local = os.path.isabs(path) or path.startswith((".", "~")) or path.endswith(".json") or path.count("/") > 1
    if not os.path.exists(os.path.expanduser(path)) and (local or not path):
        raise ValueError(f"{flag} {path}: no such file or folder")
