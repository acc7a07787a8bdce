"""Official SphereAR checkpoints (``SphereAR_B.pt``, ``vae.pt``, ...) as this package's models:
:func:`official_components` builds the transformer and the S-VAE with the checkpoint's weights
(:mod:`.convert` writes them as a pipeline folder, :mod:`.single_file` loads them as a pipeline).

Checkpoints are read with ``torch.load(weights_only=True)``: only tensors, containers, numbers, strings and
``argparse.Namespace`` (the official ``args``) are allowed, so a pickle that would run code is refused before
any of it runs. Every architecture setting is inferred from tensor shapes and key counts.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .configuration_sphere_ar import PRESETS, SphereARConfig
from .labels import imagenet_id2label
from .modeling_sphere_ar import SphereARTransformer
from .vae import SphereVAE

__all__ = ["AR_KEY_RULES", "VAE_KEY_RULES", "ConversionError", "infer_ar_config", "infer_vae_config",
           "load_official_checkpoint", "official_components", "rename_key"]


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the problem in one line."""


# Renaming rules as (official prefix, our prefix) templates; "{i}" stands for a block index. Both directions are
# derived from them: official -> ours to convert, ours -> official to name a missing weight as the user's file does.
# S-VAE (official keys without the leading "vae.")
VAE_KEY_RULES = [
    ("encoder.conv_in.", "encoder_conv_in."),
    ("encoder.patchify.0.net.{i}.block.0.", "down_blocks.{i}.norm1."),
    ("encoder.patchify.0.net.{i}.block.2.", "down_blocks.{i}.conv1."),
    ("encoder.patchify.0.net.{i}.block.3.", "down_blocks.{i}.norm2."),
    ("encoder.patchify.0.net.{i}.block.5.", "down_blocks.{i}.conv2."),
    ("encoder.patchify.0.net.{i}.shortcut.", "down_blocks.{i}.shortcut."),
    ("encoder.register_token.weight", "encoder_vit.register_tokens"),
    ("encoder.layers.", "encoder_vit.layers."),
    ("encoder.norm.", "encoder_norm."),
    ("encoder.output.", "encoder_out."),
    ("decoder.conv_in.1.", "decoder_conv_in."),
    ("decoder.register_token.weight", "decoder_vit.register_tokens"),
    ("decoder.layers.", "decoder_vit.layers."),
    ("decoder.unpatchify.1.net.{i}.block.0.", "up_blocks.{i}.norm1."),
    ("decoder.unpatchify.1.net.{i}.block.2.", "up_blocks.{i}.conv1."),
    ("decoder.unpatchify.1.net.{i}.block.3.", "up_blocks.{i}.norm2."),
    ("decoder.unpatchify.1.net.{i}.block.5.", "up_blocks.{i}.conv2."),
    ("decoder.unpatchify.1.net.{i}.shortcut.", "up_blocks.{i}.shortcut."),
    ("decoder.unpatchify.1.net.{i}.block2.0.", "up_blocks.{i}.norm3."),
    ("decoder.unpatchify.1.net.{i}.block2.2.", "up_blocks.{i}.conv3."),
    ("decoder.unpatchify.1.net.{i}.block2.3.", "up_blocks.{i}.norm4."),
    ("decoder.unpatchify.1.net.{i}.block2.5.", "up_blocks.{i}.conv4."),
    ("decoder.conv_out.0.", "decoder_norm_out."),
    ("decoder.conv_out.2.", "decoder_conv_out."),
    ("quant_proj.", "quant_proj."),
    ("post_quant_proj.", "post_quant_proj."),
]
# AR transformer
AR_KEY_RULES = [
    ("cls_embedding.", "class_embedding."),
    ("proj_in.", "proj_in."),
    ("emb_norm.", "input_norm."),
    ("layers.", "layers."),
    ("norm.", "norm."),
    ("pos_for_diff.", "head_pos_embedding."),
    ("head.net.time_embed.mlp.0.", "head.time_embed.linear_1."),
    ("head.net.time_embed.mlp.2.", "head.time_embed.linear_2."),
    ("head.net.cond_embed.", "head.cond_embed."),
    ("head.net.input_proj.", "head.input_proj."),
    ("head.net.res_blocks.", "head.res_blocks."),
    ("head.net.ada_ln_blocks.", "head.adaln."),
    ("head.net.final_layer.ada_ln_modulation.", "head.final_adaln."),
    ("head.net.final_layer.linear.", "head.final_linear."),
]
# buffers the official code saves that we recompute (checked for shape only)
_VAE_IGNORED = ("encoder.freqs_cis", "decoder.freqs_cis")


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def rename_key(key: str, rules: list[tuple[str, str]], reverse: bool = False) -> str | None:
    """``key`` renamed by the first matching rule (official -> ours, or ours -> official), or None."""
    for official, ours in rules:
        src, dst = (ours, official) if reverse else (official, ours)
        m = _template_regex(src).match(key)
        if m:
            return dst.replace("{i}", m.group("i") if "{i}" in src else "") + key[m.end():]
    return None


def _safe_globals() -> list:
    return [argparse.Namespace]


def _first_sentence(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    cut = text.find(". ")
    text = text[:cut + 1] if cut > 0 else text
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _type_name(e: BaseException) -> str:
    mod = type(e).__module__
    return type(e).__qualname__ if mod in ("builtins", None) else f"{mod.lstrip('_')}.{type(e).__qualname__}"


def _refusal(path: Path, message: str) -> ConversionError:
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m:
        why = (f"it would import {m.group(1)}, and a weights-only load allows only tensors, containers, numbers, "
               "strings and argparse.Namespace (a pickle that imports anything else can run code)")
    else:
        detail = next((line.strip() for line in message.splitlines() if "Unsupported" in line), "")
        why = "it is not a weights-only torch checkpoint" + (f" ({detail})" if detail else "")
    return ConversionError(f"{path}: refused to unpickle: {why}")


def load_official_checkpoint(path: str | os.PathLike) -> dict:
    """Read an official ``.pt`` file without running code from it (weights-only unpickling).

    Raises :class:`ConversionError` (one line) for a missing, empty, unreadable, truncated or corrupt file, and for
    a pickle that would import anything but weights (it is refused before any of it runs).
    """
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file")
    if path.is_dir():
        raise ConversionError(f"{path}: is a directory, not a checkpoint file")
    try:
        if path.stat().st_size == 0:
            raise ConversionError(f"{path}: the file is empty")
        with warnings.catch_warnings():  # torch warns about pickle protocols; the outcome is what matters
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(_safe_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except ConversionError:
        raise
    except OSError as e:
        raise ConversionError(f"{path}: cannot read the file: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - every failure becomes one line
        if isinstance(e, pickle.UnpicklingError) and "weights only load failed" in str(e).lower():
            raise _refusal(path, str(e)) from None
        raise ConversionError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                              f"{_type_name(e)}: {_first_sentence(e)}") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict (a state dict, or a checkpoint with 'ema'/'model'), "
                              f"got {type(obj).__name__}")
    return obj


# the official ``args`` fields the converter reads, with the types they must have
_ARGS_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), "a model name such as 'SphereAR-B'"),
    "vae_only": ((bool,), "true or false"),
}


def _check_args(args: argparse.Namespace, path) -> argparse.Namespace:
    """``args`` whose fields that the converter reads have the official types (one-line error otherwise)."""
    for name, (types, expected) in _ARGS_FIELDS.items():
        value = getattr(args, name, None)
        if value is not None and not isinstance(value, types):
            raise ConversionError(f"{path}: args.{name} holds a {type(value).__name__}, expected {expected}")
    return args


def _format_bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _check_tensor_sizes(weights: dict[str, torch.Tensor], path, where: str) -> None:
    """Refuse a tensor that claims more data than the file holds (before anything copies or sizes a model by it).

    ``torch.load`` checks that a tensor's strides stay inside its storage, but a stride of 0 (or overlapping
    strides) lets a tiny storage claim a huge shape, e.g. (10**9, 2048) from 2048 stored numbers; a model sized by
    such a tensor would allocate terabytes. Every tensor must be stored element by element: its numel times its
    element size fits in its storage, and no dimension longer than 1 has stride 0.
    """
    file_size = Path(path).stat().st_size
    for key, t in weights.items():
        if t.layout is not torch.strided or t.is_quantized:
            raise ConversionError(f"{path}: tensor {where}{key} is a {t.layout} {t.dtype} tensor, expected a dense "
                                  "weight")
        claimed = t.numel() * t.element_size()
        stored = t.untyped_storage().nbytes()
        if claimed > stored or any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):
            raise ConversionError(f"{path}: tensor {where}{key} claims shape {tuple(t.shape)} "
                                  f"({_format_bytes(claimed)}) through strides {tuple(t.stride())} over "
                                  f"{_format_bytes(stored)} of stored data (the file is {_format_bytes(file_size)}): "
                                  "refused (a checkpoint stores every element of its weights)")


def _state_dict(ckpt: dict, path, prefer: str) -> tuple[dict[str, torch.Tensor], argparse.Namespace | None, str]:
    """The weights of a checkpoint, its ``args`` and where the weights came from (``ema``, ``model``, ``state dict``).

    ``prefer``: ``"ema"`` (EMA if present, else ``model``), ``"model"`` (only ``model``: an EMA-only checkpoint is an
    error) or ``"any"`` (``model`` if present, else ``ema``). Every weight passes :func:`_check_tensor_sizes`.
    """
    args = _check_args(ckpt["args"], path) if isinstance(ckpt.get("args"), argparse.Namespace) else None
    if "ema" in ckpt or "model" in ckpt:
        order = {"ema": ("ema", "model"), "model": ("model",), "any": ("model", "ema")}[prefer]
        source = next((k for k in order if k in ckpt), None)
        if source is None:
            raise ConversionError(f"{path}: --no-ema asks for the 'model' weights, but the checkpoint only has 'ema'")
        sd = ckpt[source]
        if not isinstance(sd, dict):
            raise ConversionError(f"{path}: '{source}' holds a {type(sd).__name__}, not a state dict")
    else:
        source, sd = "state dict", ckpt
    weights = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not weights:
        keys = sorted(str(k) for k in ckpt)[:6]
        raise ConversionError(f"{path}: the file holds no weights (no tensors; top-level keys {keys})")
    _check_tensor_sizes(weights, path, "" if source == "state dict" else f"{source}/")
    out = {}
    for k, v in weights.items():
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        out[k] = v
    return out, args, source


def _count(sd: dict, pattern: str) -> int:
    """How many numbered blocks ``pattern`` (one group: the index) has: the highest index + 1."""
    rx = re.compile(pattern)
    return 1 + max((int(m.group(1)) for k in sd if (m := rx.match(k))), default=-1)


def _need(sd: dict, key: str, what: str, prefix: str = "") -> torch.Tensor:
    if key not in sd:
        raise ConversionError(f"missing key {prefix + key!r}: cannot infer {what}")
    t = sd[key]
    if t.dim() < 1:
        raise ConversionError(f"{prefix + key} is a scalar: cannot infer {what}")
    return t


def infer_vae_config(vae_sd: dict[str, torch.Tensor], image_size: int | None, num_heads: int | None) -> dict:
    """The SphereVAE config of official S-VAE weights (keys without ``vae.``)."""
    qp = _need(vae_sd, "quant_proj.weight", "the latent dim", "vae.")
    if qp.dim() != 2:
        raise ConversionError(f"vae.quant_proj.weight has shape {tuple(qp.shape)}, expected a matrix")
    z, latent_dim = qp.shape[1], qp.shape[0] - 1
    n_down = _count(vae_sd, r"encoder\.patchify\.0\.net\.(\d+)\.")
    chs = [_need(vae_sd, "encoder.conv_in.weight", "the CNN width", "vae.").shape[0]]
    chs += [_need(vae_sd, f"encoder.patchify.0.net.{i}.block.2.weight", "the CNN widths", "vae.").shape[0]
            for i in range(n_down)]
    regs = _need(vae_sd, "encoder.register_token.weight", "the register tokens", "vae.").shape[0]
    freqs = vae_sd.get("encoder.freqs_cis")
    if num_heads is None:
        num_heads = z // freqs.shape[1] // 2 if freqs is not None and freqs.dim() >= 2 else max(1, z // 64)
    if num_heads < 1 or z % num_heads:
        raise ConversionError(f"S-VAE width {z} is not divisible by {num_heads} attention heads (--vae-num-heads)")
    patch = 2**n_down
    if image_size is None:
        if freqs is None:
            raise ConversionError("cannot infer the image size: no 'vae.encoder.freqs_cis' and no 'args.image_size'")
        image_size = int(round(math.sqrt(freqs.shape[0] - regs))) * patch
    return dict(latent_dim=latent_dim, image_size=image_size, patch_size=patch, z_channels=z, cnn_channels=chs,
                encoder_layers=_count(vae_sd, r"encoder\.layers\.(\d+)\."),
                decoder_layers=_count(vae_sd, r"decoder\.layers\.(\d+)\."), num_register_tokens=regs,
                num_attention_heads=num_heads)


def infer_ar_config(ar_sd: dict[str, torch.Tensor], patch_size: int, num_heads: int | None,
                    preset: str | None = None) -> dict:
    """The SphereARConfig of official AR weights (keys without the ``vae.`` part).

    ``preset``: the official ``args.model`` (``"SphereAR-B"``, ...); when it names a known preset, the inferred sizes
    must match it (so that, e.g., a checkpoint missing its last layer is not silently converted to a smaller model).
    """
    pin = _need(ar_sd, "proj_in.weight", "the width")
    if pin.dim() != 2:
        raise ConversionError(f"proj_in.weight has shape {tuple(pin.shape)}, expected a matrix")
    hidden, latent_dim = pin.shape
    cls = _need(ar_sd, "cls_embedding.weight", "the class embedding")
    if cls.dim() != 2 or cls.shape[1] % hidden:
        raise ConversionError(f"cls_embedding.weight has shape {tuple(cls.shape)}: its width is not a multiple of "
                              f"the model width {hidden}")
    n_tok = _need(ar_sd, "pos_for_diff.weight", "the token count").shape[0]
    grid = int(round(math.sqrt(n_tok)))
    if grid * grid != n_tok:
        raise ConversionError(f"pos_for_diff.weight has {n_tok} rows, not a square token grid")
    known = PRESETS.get(preset) if isinstance(preset, str) else None
    if num_heads is None:
        num_heads = known["num_attention_heads"] if known else max(1, hidden // 64)
    cfg = dict(hidden_size=hidden, num_hidden_layers=_count(ar_sd, r"layers\.(\d+)\."),
               num_attention_heads=num_heads,
               intermediate_size=_need(ar_sd, "layers.0.feed_forward.w2.weight", "the MLP width").shape[-1],
               head_hidden_size=_need(ar_sd, "head.net.input_proj.weight", "the head width").shape[0],
               head_num_layers=_count(ar_sd, r"head\.net\.res_blocks\.(\d+)\."),
               head_num_adaln=_count(ar_sd, r"head\.net\.ada_ln_blocks\.(\d+)\."),
               latent_dim=latent_dim, image_size=grid * patch_size, patch_size=patch_size,
               num_classes=cls.shape[0] - 1, num_class_tokens=cls.shape[1] // hidden)
    if known:
        wrong = [f"{k}={cfg[k]} (expected {known[k]})" for k in known
                 if k not in ("guidance_scale", "num_attention_heads") and cfg[k] != known[k]]
        if wrong:
            raise ConversionError(f"the checkpoint's args say {preset}, but its weights have {', '.join(wrong)}: "
                                  "missing or extra layers?")
    if num_heads < 1 or hidden % num_heads:
        raise ConversionError(f"width {hidden} is not divisible by {num_heads} attention heads (--num-heads)")
    for p in PRESETS.values():  # the recommended guidance of the matching official model
        if all(cfg[k] == p[k] for k in p if k not in ("guidance_scale", "num_attention_heads")):
            cfg["guidance_scale"] = p["guidance_scale"]
    return cfg


def _load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], names: dict[str, str], what: str,
               rules, prefix: str) -> None:
    """Load converted weights, naming any problem by the official key (``names``: ours -> official)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        official = [prefix + (rename_key(k, rules, reverse=True) or k) for k in missing]
        raise ConversionError(f"{what}: missing key{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(official[:4])}{' ...' if len(missing) > 4 else ''} ({len(missing)} in all)")
    if unexpected:
        official = [names[k] for k in unexpected]
        raise ConversionError(f"{what}: unexpected key{'s' if len(unexpected) > 1 else ''} "
                              f"{', '.join(official[:4])}{' ...' if len(unexpected) > 4 else ''}")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise ConversionError(f"{what}: {names[k]} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        if not (v.is_floating_point() or v.is_complex()) and expected[k].is_floating_point():
            raise ConversionError(f"{what}: {names[k]} has dtype {v.dtype}, expected floating point weights")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


def _map(sd: dict[str, torch.Tensor], rules, what: str, prefix: str = "",
         ignored=()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename official keys to ours; returns the renamed weights and ours -> official (with ``prefix``) names."""
    out, names = {}, {}
    for k, v in sd.items():
        if k in ignored:
            continue
        new = rename_key(k, rules)
        if new is None:
            raise ConversionError(f"{what}: unexpected key {prefix + k!r}")
        out[new], names[new] = v, prefix + k
    return out, names


@contextlib.contextmanager
def _about(path) -> Iterator[None]:
    """Prefix ``path`` to the message of a ConversionError raised inside (unless it names it already)."""
    try:
        yield
    except ConversionError as e:
        if str(e).startswith(f"{path}:"):
            raise
        raise ConversionError(f"{path}: {e}") from None


def _build(factory, what: str):
    try:
        return factory()
    except (ValueError, TypeError) as e:  # a config the inferred sizes do not allow
        raise ConversionError(f"{what}: cannot build the model from the inferred sizes: {_first_sentence(e)}") from None


def official_components(checkpoint: str | os.PathLike, vae_checkpoint: str | os.PathLike | None = None,
                        use_ema: bool = True, num_heads: int | None = None, vae_num_heads: int | None = None,
                        info: dict | None = None) -> tuple[SphereARTransformer, SphereVAE, dict[int, str] | None]:
    """The transformer and the S-VAE (in eval mode) with an official checkpoint's weights, and the class names
    (ImageNet's for 1000 classes, else ``None``).

    ``checkpoint``: an official AR checkpoint (``{"ema", "model", "epochs", "args"}`` or a bare state dict),
    which normally carries the ``vae.*`` weights too; ``vae_checkpoint``: an official ``vae.pt`` whose weights
    replace them. ``use_ema``: the EMA weights when the checkpoint has them (else ``model``); ``False`` requires
    ``model``. Attention heads default to width / 64 (all official models); ``num_heads`` overrides. ``info``, if
    given, is filled with where the weights came from (``weights``, ``vae_weights``).

    Every problem with the inputs raises :class:`ConversionError` with a one-line message.
    """
    sd, args, source = _state_dict(load_official_checkpoint(checkpoint), checkpoint, "ema" if use_ema else "model")
    vae_sd = {k[4:]: v for k, v in sd.items() if k.startswith("vae.")}
    ar_sd = {k: v for k, v in sd.items() if not k.startswith("vae.")}
    vae_source = f"{checkpoint} ({source})"
    if not ar_sd or getattr(args, "vae_only", False):
        raise ConversionError(f"{checkpoint}: holds only S-VAE weights; pass an AR checkpoint (e.g. SphereAR_B.pt) "
                              "as --checkpoint and give this file as --vae-checkpoint")
    if vae_checkpoint is not None:
        vsd, _, vsource = _state_dict(load_official_checkpoint(vae_checkpoint), vae_checkpoint, "any")
        if any(k.startswith("vae.") for k in vsd):  # an official vae.pt (or an AR checkpoint): its vae.* weights
            vae_sd = {k[4:]: v for k, v in vsd.items() if k.startswith("vae.")}
        else:  # a bare S-VAE state dict
            vae_sd = vsd
        vae_source = f"{vae_checkpoint} ({vsource})"
    if not vae_sd:
        raise ConversionError(f"{checkpoint}: no S-VAE ('vae.*') weights; pass --vae-checkpoint vae.pt")
    vae_path = vae_checkpoint if vae_checkpoint is not None else checkpoint
    # sizes: the token grid comes from the AR weights, the patch size from the VAE's CNN
    patch_size = 2 ** _count(vae_sd, r"encoder\.patchify\.0\.net\.(\d+)\.")  # one 2x downsampling per block
    with _about(checkpoint):
        ar_cfg = infer_ar_config(ar_sd, patch_size, num_heads, getattr(args, "model", None))
    with _about(vae_path):
        vae_cfg = infer_vae_config(vae_sd, ar_cfg["image_size"], vae_num_heads)
        if ar_cfg["latent_dim"] != vae_cfg["latent_dim"]:
            raise ConversionError(f"the S-VAE has latent dim {vae_cfg['latent_dim']}, but the AR model "
                                  f"({checkpoint}) has {ar_cfg['latent_dim']}")
        if vae_checkpoint is None:  # the VAE was saved with the AR model: its RoPE table must fit the same grid
            rows = vae_cfg["num_register_tokens"] + (vae_cfg["image_size"] // vae_cfg["patch_size"]) ** 2
            for k in _VAE_IGNORED:
                if k in vae_sd and vae_sd[k].dim() >= 1 and vae_sd[k].shape[0] != rows:
                    raise ConversionError(f"S-VAE: vae.{k} has {vae_sd[k].shape[0]} positions, expected {rows} for "
                                          f"{vae_cfg['image_size']}px images")
        vae = _build(lambda: SphereVAE(**vae_cfg), "S-VAE")
        _load_into(vae, *_map(vae_sd, VAE_KEY_RULES, "S-VAE", "vae.", _VAE_IGNORED), "S-VAE", VAE_KEY_RULES, "vae.")
    with _about(checkpoint):
        transformer = _build(lambda: SphereARTransformer(SphereARConfig(**ar_cfg)), "AR model")
        _load_into(transformer, *_map(ar_sd, AR_KEY_RULES, "AR model"), "AR model", AR_KEY_RULES, "")
    id2label = imagenet_id2label() if ar_cfg["num_classes"] == 1000 else None
    if info is not None:
        info.update(weights=source, vae_weights=vae_source)
    return transformer.eval(), vae.eval(), id2label
