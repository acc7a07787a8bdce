"""The weight-decay rule of the official ``create_optimizer``, shared by the S-VAE trainer, the AR trainer and LoRA.

A trainable parameter gets no weight decay when it has fewer than 2 dimensions (biases, norm scales) or lives in
a submodule its model lists in ``_no_weight_decay_modules`` (the official ``non_decay_keys``: the AR model's
``proj_in`` and ``class_embedding``); every other trainable parameter is decayed. The S-VAE and the PatchGAN
declare no such modules. Module names are resolved relative to the module that declares them, so the rule holds
under DDP, ``torch.compile`` and PEFT wrappers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["NO_WEIGHT_DECAY_ATTRIBUTE", "decay_parameter_names", "no_decay_parameter_names", "official_param_groups"]

NO_WEIGHT_DECAY_ATTRIBUTE = "_no_weight_decay_modules"


def _no_decay_prefixes(model: nn.Module) -> list[str]:
    prefixes = []
    for path, module in model.named_modules():
        for name in getattr(type(module), NO_WEIGHT_DECAY_ATTRIBUTE, ()):
            prefixes.append(f"{path}.{name}" if path else name)
    return prefixes


def no_decay_parameter_names(model: nn.Module) -> list[str]:
    """Names (as ``model.named_parameters()`` gives them) of the parameters trained without weight decay."""
    prefixes = _no_decay_prefixes(model)
    return [n for n, p in model.named_parameters()
            if p.ndim < 2 or any(n.startswith(prefix + ".") for prefix in prefixes)]


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters trained with weight decay (``Trainer.get_decay_parameter_names``'s contract)."""
    no_decay = set(no_decay_parameter_names(model))
    return [n for n, _ in model.named_parameters() if n not in no_decay]


def official_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The official AdamW groups of ``model``'s trainable parameters: ``[decayed, not decayed]``."""
    decay = set(decay_parameter_names(model))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in params if n in decay], "weight_decay": weight_decay},
            {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0}]
