"""Strict loading for every component: a folder loads exactly, or it is a one-line ``ValueError``.

Both libraries load a folder whose weights do not match its config (missing, unexpected or mis-shaped weights)
and fill the gaps with random weights, with at most a warning. Here each model's ``from_pretrained`` asks the
library for its loading report and refuses any gap, naming the component, the folder and the first few keys; an
unreadable weights file (truncated safetensors, a pickle that holds more than tensors) is refused the same way.
Dtypes are resolved here too, for both libraries alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .config_fields import ConfigFieldError, check_config_file, check_fields, config_file_error

__all__ = ["DTYPE_NAMES", "auto_dtype", "component_dtypes", "describe_mismatch", "load_strictly", "pipeline_dtype",
           "require_safetensors", "resolve_dtype", "stored_dtype", "variant_files"]

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_FLOAT_DTYPES = frozenset(DTYPE_NAMES.values())
_SHOWN = 3  # keys named per kind of mismatch


def resolve_dtype(dtype: Any = None, torch_dtype: Any = None) -> torch.dtype | str | None:
    """The dtype asked for by ``dtype=`` or (deprecated) ``torch_dtype=``: a floating ``torch.dtype``, ``"auto"``
    (the dtype the weights are stored in) or ``None``; the names of :data:`DTYPE_NAMES` are accepted too."""
    dtype, torch_dtype = _as_dtype(dtype), _as_dtype(torch_dtype)
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"got both dtype={dtype!r} and torch_dtype={torch_dtype!r}: pass one (dtype)")
    return dtype if dtype is not None else torch_dtype


def pipeline_dtype(dtype: Any, torch_dtype: Any, components: Iterable[str]) -> torch.dtype | dict | None:
    """What a pipeline's ``from_pretrained`` hands diffusers for ``dtype=`` / ``torch_dtype=``: ``None``, a floating
    dtype, or a dict per component (:func:`component_dtypes`; ``"auto"`` becomes ``{"default": "auto"}``, so that
    each component loads in the dtype its weights are stored in)."""
    if isinstance(dtype, dict) or isinstance(torch_dtype, dict):
        if dtype is not None and torch_dtype is not None:
            raise ValueError("got both dtype= and torch_dtype=: pass one (dtype)")
        return component_dtypes(dtype if dtype is not None else torch_dtype, components)
    resolved = resolve_dtype(dtype, torch_dtype)
    return {"default": "auto"} if resolved == "auto" else resolved


def component_dtypes(dtype: dict, components: Iterable[str]) -> dict[str, torch.dtype | str]:
    """A pipeline's ``dtype={component: dtype, "default": dtype}`` (diffusers' per-component form), each value read
    as :func:`resolve_dtype` reads one; a key that names no component is a ``ValueError``."""
    known = {"default", *components}
    unknown = sorted(str(k) for k in dtype if k not in known)
    if unknown:
        raise ValueError(f"dtype: no component named {', '.join(map(repr, unknown))}; expected keys among "
                         f"{sorted(known)}")
    resolved = {k: _as_dtype(v) for k, v in dtype.items()}
    return {k: v for k, v in resolved.items() if v is not None}


def _as_dtype(value: Any) -> torch.dtype | str | None:
    if value is None or isinstance(value, torch.dtype) and value in _FLOAT_DTYPES or value == "auto":
        return value
    if isinstance(value, str):
        name = value.lower().removeprefix("torch.")
        if name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
    raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, 'auto' or a floating torch.dtype "
                     f"(torch.float32, torch.bfloat16, torch.float16), got {value!r}")


def variant_files(folder: str | os.PathLike, variant: str | None = None) -> list[Path]:
    """The safetensors files of ``folder`` that hold ``variant`` (``name.<variant>.safetensors``, sharded or not), or
    with ``None`` those of no variant (``name.safetensors``, ``name-00001-of-00002.safetensors``)."""
    tag = "" if variant is None else r"\." + re.escape(variant)
    pattern = re.compile(rf"[^.]+{tag}(-\d+-of-\d+)?\.safetensors")
    return sorted(f for f in Path(folder).glob("*.safetensors") if pattern.fullmatch(f.name))


def stored_dtype(folder: str | os.PathLike, variant: str | None = None) -> torch.dtype | None:
    """The dtype of the first floating tensor of the safetensors weights of ``variant`` in ``folder`` (any file's where
    no file is named as a variant's; ``None`` if none)."""
    for file in variant_files(folder, variant) or sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                as_torch = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dtype)
                if as_torch is not None:
                    return as_torch
    return None


FLOAT_STORAGE = ("F32", "BF16", "F16", "F64")


def non_floating_weights(folder: str | os.PathLike) -> list[str]:
    """``"<file>: <key> (<dtype>)"`` for each weight in the safetensors files of the local ``folder`` that is not
    stored as a floating type (read from the headers only)."""
    found = []
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(file, "pt") as f:
                found += [f"{file.name}: {key} ({f.get_slice(key).get_dtype()})" for key in f.keys()
                          if f.get_slice(key).get_dtype() not in FLOAT_STORAGE]
        except (SafetensorError, OSError):
            continue  # unreadable files are reported by the load itself
    return found


def non_finite_weights(model: torch.nn.Module) -> list[str]:
    """The names of ``model``'s floating weights that hold a NaN or an infinity (one check per tensor, at load)."""
    return [name for name, t in model.state_dict().items()
            if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all())]


def refuse_non_finite(model: torch.nn.Module, what: str) -> None:
    """Before a trainer saves ``model``: a ``ValueError`` if any weight is NaN or infinite (a diverged run), so that
    no broken model is ever written. Every process calls it (the weights are the same on each), so none waits."""
    bad = non_finite_weights(model)
    if bad:
        listed = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise ValueError(f"training diverged: {len(bad)} weights of the {what} are NaN or infinite ({listed}); nothing "
                         "was saved: lower the learning rate, or resume from an earlier checkpoint")


ARCHITECTURE_KEY = "sphere_ar_hf.architecture"  # safetensors metadata: the config fields the weights were saved with


def require_safetensors(safe_serialization: Any, owner: str) -> None:
    """Refuse diffusers' ``safe_serialization=False`` (a pickle, which can run code where it loads) in one line."""
    if safe_serialization is not True:
        raise ValueError(f"safe_serialization={safe_serialization!r}: {owner} writes safetensors only (a pickled "
                         "weights file can run code where it is loaded)")


def write_architecture(saving: Mapping[str, Any], config: Any, fields: Iterable[str]) -> None:
    """After a model's ``save_pretrained`` (``saving``: its bound arguments), record ``config``'s ``fields`` in the
    metadata of the safetensors files of the variant just saved (another variant's files are left alone; nothing on
    a process other than the main one of a distributed save): the header is rewritten and the tensor bytes copied as
    they are, through a temporary file renamed over it (this module ships as remote code, so it uses no helper of
    the package's)."""
    if not saving.get("is_main_process", True):
        return
    value = json.dumps({k: _plain(getattr(config, k)) for k in fields}, sort_keys=True)
    for file in variant_files(saving["save_directory"], saving.get("variant")):
        with open(file, "rb") as src:
            size = struct.unpack("<Q", src.read(8))[0]
            header = json.loads(src.read(size))
            header["__metadata__"] = {**(header.get("__metadata__") or {}), ARCHITECTURE_KEY: value}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data stays 8-byte aligned
            tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
            try:
                with open(tmp, "xb") as dst:
                    dst.write(struct.pack("<Q", len(raw)) + raw)
                    shutil.copyfileobj(src, dst, 2**24)
                os.replace(tmp, file)
            finally:
                tmp.unlink(missing_ok=True)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def recorded_architecture(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The config fields recorded with the weights of ``folder`` (:func:`write_architecture`), or None (a folder
    written before they were recorded, or by another tool)."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(file, "pt") as f:
                value = (f.metadata() or {}).get(ARCHITECTURE_KEY)
        except (SafetensorError, OSError):
            return None
        return json.loads(value) if value else None
    return None


def check_architecture(folder: Path, schema: type | None = None) -> None:
    """Refuse a ``config.json`` whose architecture differs from what the weights of ``folder`` were saved with (an
    edited config: other heads, eps or rope_theta compute other images from the same weights). Its fields are
    checked against ``schema`` first (:func:`.config_fields.check_fields`), so a value out of range says so."""
    recorded = recorded_architecture(folder)
    if not recorded:
        return
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # reported by the load itself
    if schema is not None and isinstance(config, dict):
        names = {f.name for f in dataclasses.fields(schema)}
        if names <= set(config):  # (a config missing a field is the library's to report)
            try:
                check_fields(schema, config)
            except ConfigFieldError as e:
                raise config_file_error(e, folder, None, "config.json") from None
    for key, saved in recorded.items():
        if key in config and _plain(config[key]) != saved:
            error = ConfigFieldError(f"{folder}/config.json: {key} is {config[key]!r} but the weights were saved "
                                     f"with {key}={saved!r}: the config was edited; restore it or re-save the model")
            error.file = str(folder / "config.json")
            raise error


def auto_dtype(path: str | os.PathLike, kwargs: dict[str, Any], hub_weights: str | None = None) -> torch.dtype | None:
    """``dtype="auto"``: the dtype the weights of ``kwargs["variant"]`` are stored in (:func:`stored_dtype`), read in
    the folder ``path`` (plus ``kwargs["subfolder"]``) if it is a directory, else, given ``hub_weights``, in that
    file of repo ``path`` (downloaded if needed, as loading would); ``None`` if not known."""
    subfolder, variant = kwargs.get("subfolder") or "", kwargs.get("variant")
    local = Path(path) / subfolder
    if local.is_dir():
        return stored_dtype(local, variant)
    if hub_weights is None:
        return None
    from huggingface_hub import hf_hub_download

    if variant:
        hub_weights = hub_weights.replace(".safetensors", f".{variant}.safetensors")
    hub_args = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    file = hf_hub_download(str(path), hub_weights, subfolder=subfolder or None, **hub_args)
    return stored_dtype(Path(file).parent, variant)


# diffusers raises (rather than reports) a mis-shaped weight unless it re-initialises the whole model first
_DIFFUSERS_SHAPE_ERROR = re.compile(r"because (\S+) expected shape torch\.Size\((\[[^\]]*\])\), but got "
                                    r"torch\.Size\((\[[^\]]*\])\)")


def _shape(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def _first(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def describe_mismatch(info: dict[str, Any], allow_mismatched: bool = False) -> str:
    """What a loading report (``output_loading_info=True``) says is wrong, or ``""`` when the load was exact."""
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing {_first(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected {_first(info['unexpected_keys'])}")
    mismatched = [] if allow_mismatched else list(info.get("mismatched_keys") or [])
    if mismatched:
        shown = [f"{key} (weights {list(saved)}, config {list(expected)})" for key, saved, expected in
                 sorted(mismatched)[:_SHOWN]]
        more = f" (+{len(mismatched) - _SHOWN} more)" if len(mismatched) > _SHOWN else ""
        problems.append("mis-shaped " + ", ".join(shown) + more)
    if info.get("error_msgs"):
        problems.append(str(info["error_msgs"][0]).splitlines()[0])
    return "; ".join(problems)


def _unreadable(error: BaseException) -> BaseException | None:
    """The root cause when loading failed because a weights file could not be read (else ``None``)."""
    seen = error
    while seen is not None:
        if isinstance(seen, (SafetensorError, pickle.UnpicklingError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _unreadable_message(cause: BaseException) -> str:
    if isinstance(cause, pickle.UnpicklingError):
        lines = [line.strip() for line in str(cause).splitlines()
                 if "unsupported global" in line.lower() or "error:" in line]  # torch words it both ways
        why = lines[0] if lines else "it holds objects other than tensors"
        return (f"a pickled weights file that does not load with torch.load(weights_only=True) was refused ({why}); "
                "only plain tensors are loaded from pickles: save the weights as safetensors")
    return f"a weights file is damaged or truncated ({str(cause).splitlines()[0]})"


def load_strictly(cls: type, load: Callable[..., Any], args: tuple, kwargs: dict[str, Any],
                  mismatch_option: str | None = None) -> Any:
    """Run a library ``from_pretrained`` (``load``) for ``cls`` with its loading report, and raise a one-line
    ``ValueError`` naming ``cls``, the folder and the first keys if any weight is missing, unexpected or
    mis-shaped, or if a weights file cannot be read. Returns what the caller asked for (the model, or
    ``(model, loading_info)`` with ``output_loading_info=True``).

    ``mismatch_option``: the library's keyword that keeps loading past mis-shaped weights, so that they are
    reported here instead of raised deep inside the library. A caller who passes it as ``True`` themselves opts in
    to mis-shaped weights being re-initialised (the library's documented use: a new number of classes for
    fine-tuning); missing and unexpected weights are refused still.
    """
    kwargs = dict(kwargs)
    want_info = kwargs.pop("output_loading_info", False)
    allow_mismatched = bool(mismatch_option and kwargs.get(mismatch_option, False))
    if mismatch_option:
        kwargs[mismatch_option] = True
    where = str(args[0] if args else kwargs.get("pretrained_model_name_or_path", "?"))
    if kwargs.get("subfolder"):
        where = f"{where}/{kwargs['subfolder']}"
    folder = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    check_config_file(folder, kwargs.get("subfolder"), "config.json")
    local = Path(str(folder), kwargs.get("subfolder") or "") if isinstance(folder, str | os.PathLike) else None
    if local is not None and local.is_dir() and not allow_mismatched:
        check_architecture(local, getattr(cls, "config_fields", None))
    stored = non_floating_weights(local) if local is not None and local.is_dir() else []
    if stored:
        listed = ", ".join(stored[:2]) + (" ..." if len(stored) > 2 else "")
        raise ValueError(f"cannot load {cls.__name__} from {where}: {len(stored)} weights are not stored as floating "
                         f"point ({listed}); expected F32, BF16 or F16")
    try:
        model, info = load(*args, output_loading_info=True, **kwargs)
    except ConfigFieldError as e:  # a field of the config: name the file
        raise config_file_error(e, folder, kwargs.get("subfolder"), "config.json") from None
    except Exception as e:  # re-raised below unless it is one of the two known failures
        cause = _unreadable(e)
        shape = _DIFFUSERS_SHAPE_ERROR.search(str(e)) if isinstance(e, ValueError) else None
        if cause is None and shape is None:
            raise
        if cause is not None:
            raise ValueError(f"cannot load {cls.__name__} from {where}: {_unreadable_message(cause)}") from None
        key, expected, saved = shape.groups()
        info = {"mismatched_keys": [(key, _shape(saved), _shape(expected))]}
    problem = describe_mismatch(info, allow_mismatched)
    if problem:
        raise ValueError(f"cannot load {cls.__name__} from {where}: its weights do not match its config ({problem}); "
                         "the folder is incomplete or its config was edited: re-save or re-convert it")
    bad = non_finite_weights(model)
    if bad:
        raise ValueError(f"cannot load {cls.__name__} from {where}: {len(bad)} weights hold NaN or infinite values "
                         f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); the file is damaged or was saved "
                         "from a diverged training run")
    return (model, info) if want_info else model
