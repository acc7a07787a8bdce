"""LoRA fine-tuning of the SphereAR transformer with PEFT, and one-call loading / merging into a pipeline.

Adapters go on the causal trunk's linears (``layers.N.attention.wqkv / wo``, ``layers.N.feed_forward.w1 / w2``),
optionally on the diffusion head's linears (``lora_head``), and optionally as trainable rows of the class
embedding (``class_rows``: PEFT's ``trainable_token_indices``, so the adapter stores just those rows). The targets
are full-name regexes: the head also has modules named ``w1`` / ``w2``, and they are left alone unless asked for.

    from sphere_ar_hf.lora import load_lora, merge_lora, unload_lora

    load_lora(pipe, "my-adapter")      # adapters injected into pipe.transformer (it stays a SphereARTransformer)
    images = pipe([3, 7]).images
    unload_lora(pipe)                  # the base weights, bit for bit
    merge_lora(pipe)                   # or: fold the adapter into the weights for plain fast inference

Design: **the transformer carries the adapters**, and nothing else holds state. PEFT injects its layers in place
(``get_peft_model`` / ``PeftModel.from_pretrained``) and marks the model with its public ``peft_config``
attribute; every function here takes a pipeline, a transformer or a ``PeftModel`` and reads the adapters from
the transformer's modules (PEFT's ``BaseTunerLayer`` / ``AuxiliaryTrainingWrapper``). So ``pipe.transformer``
stays a plain SphereARTransformer that samples with the adapter, the ``PeftModel`` that :func:`add_lora` /
:func:`load_lora` return is an optional view (train it, or use PEFT's own methods on it) that may be dropped,
and there is no second object whose lifetime a user must manage, no handle hung on the transformer and no
method patched on it. Unloading and merging use PEFT's public layer methods (``merge``, ``get_base_layer``,
``unload_and_optionally_merge_module``: what ``PeftModel.merge_and_unload`` / ``unload`` run), saving uses
``get_peft_model_state_dict``, and an adapter folder is PEFT's own format: ``PeftModel.from_pretrained(
transformer, folder)`` loads it directly. While adapters are injected, ``SphereARTransformer.save_pretrained``
refuses to write the base weights with PEFT's keys mixed in (it checks the same ``peft_config`` marker).

Training an adapter (``train_lora``, behind ``examples/train_lora.py``) lives in :mod:`sphere_ar_hf.training.lora`;
this module imports no training code.

Needs ``peft`` (the ``[lora]`` extra).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .hub.cards import (
    ADAPTER_FILES,
    CLASS_EMBEDDING,
    TRAINING_INFO_FILE,
    load_style,
    public_model_name,
    render_lora_card,
)
from .modeling_sphere_ar import SphereARTransformer

__all__ = [
    "HEAD_TARGETS",
    "TRUNK_TARGETS",
    "add_lora",
    "adapter_parameter_count",
    "build_lora_config",
    "get_lora_model",
    "load_lora",
    "merge_lora",
    "save_lora",
    "unload_lora",
]

logger = logging.getLogger(__name__)

#: the trunk's attention and feed-forward linears (full module names; ``re.fullmatch``)
TRUNK_TARGETS = r"layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.(w1|w2))"
#: every linear of the diffusion head
HEAD_TARGETS = (r"head\.(time_embed\.linear_[12]|cond_embed|input_proj|res_blocks\.\d+\.(w1|w2)|adaln\.\d+|"
                r"final_adaln|final_linear)")


def _peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA needs peft: pip install 'sphere-ar-hf[lora]' (or pip install peft)") from err
    return peft


# ---------------------------------------------------------------------------------------------------------------
# configuration and wrapping


def build_lora_config(rank: int = 8, alpha: float | None = None, dropout: float = 0.0, lora_head: bool = False,
                      class_rows: Sequence[int] | None = None, target_modules: str | None = None,
                      num_classes: int | None = None) -> Any:
    """A ``peft.LoraConfig`` for :class:`SphereARTransformer`.

    Args:
        rank: LoRA rank ``r``.
        alpha: LoRA alpha (default: ``rank``, i.e. a scale of 1).
        dropout: dropout on the LoRA input.
        lora_head: also adapt the diffusion head's linears.
        class_rows: class-embedding rows to train (class ids; ``num_classes`` is the null class of CFG).
        target_modules: a full-name regex replacing the trunk (+ head) targets.
        num_classes: the model's class count, to check ``class_rows`` (ids in ``[0, num_classes]``).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    targets = target_modules or (f"({TRUNK_TARGETS}|{HEAD_TARGETS})" if lora_head else TRUNK_TARGETS)
    re.compile(targets)
    rows = sorted({int(r) for r in class_rows}) if class_rows else None
    if rows and num_classes is not None and (rows[0] < 0 or rows[-1] > num_classes):
        raise ValueError(f"class_rows must lie in [0, {num_classes}] ({num_classes} is the null class), got {rows}")
    return _peft().LoraConfig(
        r=int(rank), lora_alpha=float(alpha if alpha is not None else rank), lora_dropout=float(dropout),
        target_modules=targets, bias="none",
        trainable_token_indices={CLASS_EMBEDDING: rows} if rows else None)


def add_lora(transformer: SphereARTransformer, config: Any, adapter_name: str = "default") -> Any:
    """Inject trainable adapters into ``transformer`` (in place; only they require grad) and return the
    ``PeftModel`` to train (``peft.get_peft_model``)."""
    if not isinstance(transformer, SphereARTransformer):
        raise TypeError(f"add_lora expects a SphereARTransformer, got {type(transformer).__name__}")
    if get_lora_model(transformer) is not None:
        raise ValueError("this transformer already has a LoRA adapter: merge_lora or unload_lora it first")
    with _quiet():
        return _peft().get_peft_model(transformer, config, adapter_name=adapter_name)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the transformers deprecation warning that PEFT triggers (``is_gradient_checkpointing``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _transformer_of(target: Any) -> SphereARTransformer:
    """The SphereARTransformer of a pipeline, a PeftModel or a transformer."""
    peft = _peft()
    if isinstance(target, peft.PeftModel):
        return target.get_base_model()
    model = getattr(target, "transformer", target)
    if isinstance(model, peft.PeftModel):
        model = model.get_base_model()
    if not isinstance(model, SphereARTransformer):
        raise TypeError(f"expected a SphereARPipeline, a SphereARTransformer or its PeftModel, got "
                        f"{type(target).__name__}")
    return model


def _adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost PEFT modules of ``model`` (LoRA layers, trainable-token wrappers), by full name."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():  # parents come before their children
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and not any(
                name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, module))
    return found


def _has_adapters(transformer: SphereARTransformer) -> bool:
    """PEFT's marker (``peft_config``, set on injection, removed on unload) or PEFT layers in the module tree."""
    return bool(getattr(transformer, "peft_config", None)) or bool(_adapter_modules(transformer))


def get_lora_model(target: Any) -> nn.Module | None:
    """The model whose modules hold ``target``'s LoRA adapters, or None when it has none.

    That is ``target`` itself when it is a ``PeftModel``, else the pipeline's / the given SphereARTransformer
    (PEFT injects in place; it keeps no link from the transformer back to a ``PeftModel`` wrapping it). Either can
    be passed to :func:`save_lora`, :func:`adapter_parameter_count`, :func:`merge_lora` and :func:`unload_lora`.
    """
    transformer = _transformer_of(target)
    if not _has_adapters(transformer):
        return None
    return target if isinstance(target, _peft().PeftModel) else transformer


def _adapter_name(transformer: SphereARTransformer, adapter_name: str | None) -> str:
    names = list(getattr(transformer, "peft_config", None) or {})
    if not names:
        raise ValueError("no LoRA adapter is loaded")
    if adapter_name is None:
        if len(names) > 1:
            raise ValueError(f"this transformer holds the adapters {names}: pass adapter_name")
        return names[0]
    if adapter_name not in names:
        raise ValueError(f"no adapter named {adapter_name!r} is loaded (loaded: {names})")
    return adapter_name


def _adapter_state(transformer: SphereARTransformer, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's checkpoint names (LoRA matrices, trained class rows)."""
    return _peft().get_peft_model_state_dict(transformer, adapter_name=adapter_name, save_embedding_layers=False)


def adapter_parameter_count(target: Any, adapter_name: str | None = None) -> int:
    """Number of values an adapter stores (LoRA matrices + trained class-embedding rows) for ``target``."""
    transformer = _transformer_of(target)
    state = _adapter_state(transformer, _adapter_name(transformer, adapter_name))
    return sum(t.numel() for t in state.values())


# ---------------------------------------------------------------------------------------------------------------
# saving, loading, merging


def save_lora(target: Any, output_dir: str | os.PathLike, overwrite: bool = True,
              base_model_name_or_path: str | None = None, adapter_name: str | None = None,
              inputs: Sequence[str | os.PathLike | None] = (), training_info: Mapping[str, Any] | None = None,
              style: Mapping[str, Any] | str | os.PathLike | None = None) -> Path:
    """Write the adapter of ``target`` (a pipeline, a transformer or a PeftModel with an adapter) to
    ``output_dir`` atomically, in PEFT's format: ``adapter_model.safetensors`` (the tensors PEFT's
    ``save_pretrained`` writes, under its ``base_model.model.`` names) and ``adapter_config.json``, so that
    ``PeftModel.from_pretrained(transformer, output_dir)`` and :func:`load_lora` both load it. Its ``README.md``
    is our card (:func:`render_lora_card`); ``training_info`` (the trainer's record) and ``style`` (a
    ``benchmarks/bench_lora.py --json`` result) go to ``training_info.json`` for it. ``base_model_name_or_path``
    is recorded as :func:`public_model_name` has it.

    ``adapter_name`` picks one adapter when the transformer holds several (default: the only one). An existing
    ``output_dir`` is replaced (``overwrite``) only if it is an adapter folder that holds neither the base model
    nor any of ``inputs`` (``utils.check_output_folder``).
    """
    import copy

    from safetensors.torch import save_file

    from .utils import write_folder_atomically

    transformer = _transformer_of(target)
    name = _adapter_name(transformer, adapter_name)
    state = {f"base_model.model.{key}": value.detach().contiguous().cpu()
             for key, value in _adapter_state(transformer, name).items()}
    config = copy.deepcopy(transformer.peft_config[name])
    config.inference_mode = True
    if base_model_name_or_path is not None:
        config.base_model_name_or_path = public_model_name(base_model_name_or_path)
    elif config.base_model_name_or_path:
        config.base_model_name_or_path = public_model_name(config.base_model_name_or_path)
    record = {**({"training": dict(training_info)} if training_info else {}),
              **({"style": load_style(style)} if style is not None else {})}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / ADAPTER_FILES[0]), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        missing = [file for file in ADAPTER_FILES if not (tmp / file).is_file()]
        if missing:
            raise RuntimeError(f"PEFT did not write {missing}")
        if record:
            (tmp / TRAINING_INFO_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        try:
            card = render_lora_card(tmp)
        except FileNotFoundError as e:  # no hub_cards/ (an installed wheel): the adapter is still complete
            logger.warning("no model card written: %s", e)
        else:
            (tmp / "README.md").write_text(str(card), encoding="utf-8")

    return write_folder_atomically(output_dir, write, overwrite=overwrite, kind="lora",
                                   inputs=[base_model_name_or_path, *inputs], option="output_dir")


def load_lora(target: Any, adapter: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False,
              **kwargs) -> Any:
    """Inject the adapter at ``adapter`` (a folder or Hub repo id) into ``target`` (a pipeline or a transformer).

    The adapter layers replace the targeted linears *in place* (``peft.PeftModel.from_pretrained``):
    ``pipe.transformer`` stays the same SphereARTransformer object, so the pipeline works unchanged
    (``pipe(...)`` now samples with the adapter). Returns the ``PeftModel`` wrapping it (``kwargs`` go to
    ``PeftModel.from_pretrained``; ``is_trainable=True`` to train on), which you may keep or drop. Undo with
    :func:`unload_lora`, or make it permanent with :func:`merge_lora`. While it is loaded,
    ``pipe.save_pretrained`` raises (the weights would be saved under PEFT's names): merge or unload first.
    """
    peft = _peft()
    transformer = _transformer_of(target)
    if get_lora_model(transformer) is not None:
        raise ValueError("a LoRA adapter is already loaded: merge_lora or unload_lora it first")
    path = Path(adapter)
    if path.exists() and not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} holds no adapter_config.json (not a PEFT adapter folder)")
    with _quiet():
        return peft.PeftModel.from_pretrained(transformer, str(adapter), adapter_name=adapter_name,
                                              is_trainable=is_trainable, **kwargs)


def _release(target: Any, merge: bool) -> SphereARTransformer:
    """Put the base modules back in place of PEFT's (merging the adapters into them first if ``merge``): the
    public layer methods that ``PeftModel.merge_and_unload`` / ``unload`` run, applied to the transformer."""
    from peft.utils import AuxiliaryTrainingWrapper

    transformer = _transformer_of(target)
    if not _has_adapters(transformer):
        raise ValueError("no LoRA adapter is loaded")
    for name, module in _adapter_modules(transformer):
        if isinstance(module, AuxiliaryTrainingWrapper):  # the trained class rows
            base = module.unload_and_optionally_merge_module(merge=merge, safe_merge=False, adapter_names=None)
        else:
            if merge:
                module.merge()
            base = module.get_base_layer()
        parent, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent), child, base)
    if hasattr(transformer, "peft_config"):
        del transformer.peft_config  # PEFT's marker goes with its layers, as in its own unload
    if not isinstance(target, nn.Module) and getattr(target, "transformer", transformer) is not transformer:
        target.transformer = transformer  # a pipeline that held the PeftModel itself
    return transformer


def merge_lora(target: Any) -> SphereARTransformer:
    """Fold the loaded adapter into the transformer's weights and remove the adapter layers (in place).

    The result is a plain SphereARTransformer (same speed as the base model, saveable with ``save_pretrained``);
    the base weights are overwritten, so reload the base model to go back.
    """
    return _release(target, merge=True)


def unload_lora(target: Any) -> SphereARTransformer:
    """Remove the loaded adapter: the original linears (and class embedding) are put back, bit for bit."""
    return _release(target, merge=False)
