"""Every field of the transformer, VAE and scheduler configs checked for type and range where a config is built
(so also when a folder's config is loaded), with huggingface_hub's strict dataclasses as the schemas.

:func:`check_fields` raises a one-line ``ValueError`` naming the field, the value and what is expected
(``"hidden_size: must be an integer >= 1, got 0"``); the loaders add the file (:mod:`.loading`). The ranges are
those the code supports or that mean something: a positive ``rms_norm_eps`` up to 0.01, a ``rope_theta`` above 1
and up to 1e7, sizes from 1 to 2**20.
"""


import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from huggingface_hub.dataclasses import as_validated_field, strict
from huggingface_hub.errors import StrictDataclassFieldValidationError

__all__ = ["ConfigFieldError", "SchedulerFields", "TransformerFields", "VAEFields", "check_dtype_name", "check_fields",
           "check_config_file", "config_file_error", "TRANSFORMER_ARCHITECTURE", "VAE_ARCHITECTURE"]

# the fields that make a model's computation: recorded with its weights at save (``loading.write_architecture``)
# and compared with the config at load, since weight shapes do not show them all (heads, eps, rope_theta)
TRANSFORMER_ARCHITECTURE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                            "head_hidden_size", "head_num_layers", "head_num_adaln", "latent_dim", "image_size",
                            "patch_size", "num_classes", "num_class_tokens", "rms_norm_eps", "rope_theta")
VAE_ARCHITECTURE = ("latent_dim", "image_size", "patch_size", "z_channels", "cnn_channels", "encoder_layers",
                    "decoder_layers", "num_register_tokens", "num_attention_heads", "in_channels", "rms_norm_eps",
                    "rope_theta", "posterior")

class ConfigFieldError(ValueError):
    """A config field of the wrong type or out of range (one line); the loaders put the config file in front
    (:func:`config_file_error`, which sets ``file``)."""

    file: str | None = None


MAX_SIZE = 2**20  # no size of a model of ours comes near; 1e9 layers or pixels is a typo, not a model


def _count(value: int, low: int = 1) -> None:
    if not low <= value <= MAX_SIZE:
        raise ValueError(f"must be an integer from {low} to {MAX_SIZE}, got {value!r}")


@as_validated_field
def count(value: int) -> None:
    """An integer from 1 to :data:`MAX_SIZE`."""
    _count(value)


@as_validated_field
def optional_count(value: int | None) -> None:
    if value is not None:
        _count(value)


@as_validated_field
def probability(value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be a number in [0, 1], got {value!r}")


@as_validated_field
def finite(value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")


@as_validated_field
def norm_eps(value: float) -> None:
    if not 0.0 < value <= 1e-2:
        raise ValueError(f"must be a number in (0, 0.01] (the RMSNorm epsilon; official 1e-6), got {value!r}")


@as_validated_field
def rope_theta(value: float) -> None:
    if not 1.0 < value <= 1e7:
        raise ValueError(f"must be a number in (1, 1e7] (the RoPE base; official 10000), got {value!r}")


@as_validated_field
def non_negative(value: float) -> None:
    if not 0.0 <= value < math.inf:
        raise ValueError(f"must be a finite number >= 0, got {value!r}")


@as_validated_field
def channels(value: list[int] | tuple[int, ...]) -> None:
    if not value or any(isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= MAX_SIZE for c in value):
        raise ValueError(f"must be a non-empty list of integers from 1 to {MAX_SIZE}, got {value!r}")


@strict
@dataclasses.dataclass
class TransformerFields:
    """:class:`.SphereARConfig`."""

    hidden_size: int = count()
    num_hidden_layers: int = count()
    num_attention_heads: int = count()
    intermediate_size: int | None = optional_count()  # None: the official SwiGLU width
    head_hidden_size: int = count()
    head_num_layers: int = count()
    head_num_adaln: int = count()
    latent_dim: int = count()
    image_size: int = count()
    patch_size: int = count()
    num_classes: int = count()
    num_class_tokens: int = count()
    class_dropout_prob: int | float = probability()
    diff_batch_mul: int = count()
    guidance_scale: int | float = finite()
    normalize_tokens: bool
    rms_norm_eps: int | float = norm_eps()
    rope_theta: int | float = rope_theta()
    initializer_range: int | float = non_negative()


@strict
@dataclasses.dataclass
class VAEFields:
    """:class:`.SphereVAE`."""

    latent_dim: int = count()
    image_size: int = count()
    patch_size: int = count()
    z_channels: int = count()
    cnn_channels: list[int] | tuple[int, ...] = channels()
    encoder_layers: int = count()
    decoder_layers: int = count()
    num_register_tokens: int = count()
    num_attention_heads: int | None = optional_count()
    in_channels: int = count()
    rms_norm_eps: int | float = norm_eps()
    rope_theta: int | float = rope_theta()
    posterior: str
    normalize_decoder_input: bool


@strict
@dataclasses.dataclass
class SchedulerFields:
    """:class:`.SphereARScheduler`."""

    num_inference_steps: int = count()
    last_step_size: int | float = probability()
    sampler: str
    time_shift: int | float = finite()


def check_fields(schema: type, values: Mapping[str, Any]) -> None:
    """Check ``values`` (a config's fields; others are ignored) against ``schema``: a one-line
    :class:`ConfigFieldError` (a ``ValueError``)
    naming the first field that fails (``"<field>: <what is expected>, got <value>"``)."""
    names = [f.name for f in dataclasses.fields(schema)]
    try:
        schema(**{name: values[name] for name in names if name in values})
    except StrictDataclassFieldValidationError as e:
        field = getattr(e, "field", None) or str(e).split("'")[1]
        detail = str(e).strip().splitlines()[-1].strip()
        detail = detail.split(": ", 1)[1] if detail.split(": ", 1)[0].endswith("Error") else detail
        wrong_type = re.fullmatch(r"Field '\w+' expected (.+), got (\w+) \(value: (.*)\)", detail)
        no_number = re.fullmatch(r"Field '\w+' with value (.*) doesn't match any type in .*", detail)
        if wrong_type:
            expected, kind, value = wrong_type.groups()
            detail = f"must be {expected.replace(' | ', ' or ')}, got {value} ({kind})"
        elif no_number:
            detail = f"must be a number, got {no_number.group(1)}"
        raise ConfigFieldError(f"{field}: {detail}") from None


DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")


def check_dtype_name(field: str, value: Any) -> None:
    """A config's stored dtype (``"dtype"`` / ``"torch_dtype"``): None, a floating ``torch.dtype`` or one of
    :data:`DTYPE_NAMES`; else a :class:`ConfigFieldError`."""
    import torch

    if value is None or (isinstance(value, torch.dtype) and value.is_floating_point):
        return
    if not (isinstance(value, str) and value.removeprefix("torch.") in DTYPE_NAMES):
        raise ConfigFieldError(f"{field}: must be one of {', '.join(DTYPE_NAMES)} or null, got {value!r}")


def config_file_error(error: ConfigFieldError, folder: Any, subfolder: str | None, name: str) -> ConfigFieldError:
    """``error`` with the config file it came from in front: ``<folder>[/<subfolder>]/<name>: <field>: ...`` (once:
    an error that names its file already is returned as it is)."""
    if error.file is not None:
        return error
    where = "/".join(str(p).rstrip("/") for p in (folder, subfolder, name) if p)
    named = ConfigFieldError(f"{where}: {error}")
    named.file = where
    return named


def check_config_file(folder: Any, subfolder: str | None, name: str) -> None:
    """Where ``folder`` is a local folder: its ``[subfolder/]name`` must hold a JSON object (a list or a scalar is a
    :class:`ConfigFieldError` naming the file; libraries would report it as a failed download). A missing file is
    left to the library."""
    if not isinstance(folder, str | os.PathLike) or not os.path.isdir(folder):
        return
    path = os.path.join(folder, subfolder or "", name)
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigFieldError(f"{path}: not a readable JSON file ({' '.join(str(e).split())})") from None
    if not isinstance(value, dict):
        error = ConfigFieldError(f"{path}: must be a JSON object (a config's fields), got {json.dumps(value)[:60]}")
        error.file = path
        raise error
