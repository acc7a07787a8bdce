"""Convert official SphereAR checkpoints (``SphereAR_B.pt``, ``vae.pt``, ...) into a pipeline folder.

Checkpoints are read with ``torch.load(weights_only=True)``: only tensors, containers, numbers, strings and
``argparse.Namespace`` (the official ``args``) are allowed, so a pickle that would run code is refused before
any of it runs. Every architecture setting is inferred from tensor shapes and key counts.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .configuration_sphere_ar import PRESETS, SphereARConfig
from .labels import imagenet_id2label
from .modeling_sphere_ar import SphereARTransformer
from .scheduling_sphere_ar import SphereARScheduler
from .vae import SphereVAE

__all__ = ["ConversionError", "convert_official_checkpoint", "load_official_checkpoint", "write_atomically"]


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the problem in one line."""


# official key (without the leading "vae.") -> ours, for the S-VAE
_VAE_RULES = [
    (r"encoder\.conv_in\.", "encoder_conv_in."),
    (r"encoder\.patchify\.0\.net\.(\d+)\.block\.0\.", r"down_blocks.\1.norm1."),
    (r"encoder\.patchify\.0\.net\.(\d+)\.block\.2\.", r"down_blocks.\1.conv1."),
    (r"encoder\.patchify\.0\.net\.(\d+)\.block\.3\.", r"down_blocks.\1.norm2."),
    (r"encoder\.patchify\.0\.net\.(\d+)\.block\.5\.", r"down_blocks.\1.conv2."),
    (r"encoder\.patchify\.0\.net\.(\d+)\.shortcut\.", r"down_blocks.\1.shortcut."),
    (r"encoder\.register_token\.weight", "encoder_vit.register_tokens"),
    (r"encoder\.layers\.", "encoder_vit.layers."),
    (r"encoder\.norm\.", "encoder_norm."),
    (r"encoder\.output\.", "encoder_out."),
    (r"decoder\.conv_in\.1\.", "decoder_conv_in."),
    (r"decoder\.register_token\.weight", "decoder_vit.register_tokens"),
    (r"decoder\.layers\.", "decoder_vit.layers."),
    (r"decoder\.unpatchify\.1\.net\.(\d+)\.block\.0\.", r"up_blocks.\1.norm1."),
    (r"decoder\.unpatchify\.1\.net\.(\d+)\.block\.2\.", r"up_blocks.\1.conv1."),
    (r"decoder\.unpatchify\.1\.net\.(\d+)\.block\.3\.", r"up_blocks.\1.norm2."),
    (r"decoder\.unpatchify\.1\.net\.(\d+)\.block\.5\.", r"up_blocks.\1.conv2."),
    (r"decoder\.unpatchify\.1\.net\.(\d+)\.shortcut\.", r"up_blocks.\1.shortcut."),
    (r"decoder\.unpatchify\.1\.net\.(\d+)\.block2\.0\.", r"up_blocks.\1.norm3."),
    (r"decoder\.unpatchify\.1\.net\.(\d+)\.block2\.2\.", r"up_blocks.\1.conv3."),
    (r"decoder\.unpatchify\.1\.net\.(\d+)\.block2\.3\.", r"up_blocks.\1.norm4."),
    (r"decoder\.unpatchify\.1\.net\.(\d+)\.block2\.5\.", r"up_blocks.\1.conv4."),
    (r"decoder\.conv_out\.0\.", "decoder_norm_out."),
    (r"decoder\.conv_out\.2\.", "decoder_conv_out."),
    (r"(quant_proj|post_quant_proj)\.", r"\1."),
]
# official key -> ours, for the AR transformer
_AR_RULES = [
    (r"cls_embedding\.", "class_embedding."),
    (r"proj_in\.", "proj_in."),
    (r"emb_norm\.", "input_norm."),
    (r"layers\.", "layers."),
    (r"norm\.", "norm."),
    (r"pos_for_diff\.", "head_pos_embedding."),
    (r"head\.net\.time_embed\.mlp\.0\.", "head.time_embed.linear_1."),
    (r"head\.net\.time_embed\.mlp\.2\.", "head.time_embed.linear_2."),
    (r"head\.net\.(cond_embed|input_proj|res_blocks)\.", r"head.\1."),
    (r"head\.net\.ada_ln_blocks\.", "head.adaln."),
    (r"head\.net\.final_layer\.ada_ln_modulation\.", "head.final_adaln."),
    (r"head\.net\.final_layer\.linear\.", "head.final_linear."),
]
# buffers the official code saves that we recompute (checked for shape only)
_VAE_IGNORED = ("encoder.freqs_cis", "decoder.freqs_cis")


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m:
            return m.expand(repl) + key[m.end():]
    return None


def _safe_globals() -> list:
    return [argparse.Namespace]


def load_official_checkpoint(path: str | os.PathLike) -> dict:
    """Read an official ``.pt`` file without running code from it (weights-only unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: the file is empty")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line
        msg = str(e).strip().splitlines()
        first = next((line for line in msg if "Unsupported global" in line or "Unsupported operand" in line),
                     msg[0] if msg else type(e).__name__)
        if "global" in first.lower() or "weights_only" in " ".join(msg).lower():
            raise ConversionError(f"{path}: refused to unpickle: the file holds objects other than weights "
                                  f"({first.strip()})") from None
        raise ConversionError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {first.strip()}") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict (a state dict or one with 'ema'/'model'), got {type(obj).__name__}")
    return obj


def _state_dict(ckpt: dict, path, use_ema: bool) -> tuple[dict[str, torch.Tensor], argparse.Namespace | None]:
    args = ckpt.get("args") if isinstance(ckpt.get("args"), argparse.Namespace) else None
    if "ema" in ckpt or "model" in ckpt:
        key = "ema" if use_ema and "ema" in ckpt else "model"
        if key not in ckpt:
            raise ConversionError(f"{path}: --no-ema asks for the 'model' weights, but the checkpoint only has 'ema'")
        sd = ckpt[key]
    else:
        sd = ckpt
    if not isinstance(sd, dict):
        raise ConversionError(f"{path}: the weights are a {type(sd).__name__}, not a state dict")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ConversionError(f"{path}: the file holds no weights")
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        out[k] = v
    return out, args


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def _need(sd: dict, key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise ConversionError(f"missing key {key!r}: cannot infer {what}")
    return sd[key]


def infer_vae_config(vae_sd: dict[str, torch.Tensor], image_size: int | None, num_heads: int | None) -> dict:
    """The SphereVAE config of official S-VAE weights (keys without ``vae.``)."""
    qp = _need(vae_sd, "quant_proj.weight", "the latent dim")
    z, latent_dim = qp.shape[1], qp.shape[0] - 1
    n_down = _count(vae_sd, r"encoder\.patchify\.0\.net\.(\d+)\.")
    chs = [_need(vae_sd, "encoder.conv_in.weight", "the CNN width").shape[0]]
    chs += [_need(vae_sd, f"encoder.patchify.0.net.{i}.block.2.weight", "the CNN widths").shape[0] for i in range(n_down)]
    regs = _need(vae_sd, "encoder.register_token.weight", "the register tokens").shape[0]
    freqs = vae_sd.get("encoder.freqs_cis")
    if num_heads is None:
        num_heads = z // freqs.shape[1] // 2 if freqs is not None else max(1, z // 64)
    patch = 2**n_down
    if image_size is None:
        if freqs is None:
            raise ConversionError("cannot infer the image size: no 'encoder.freqs_cis' and no 'args.image_size'")
        image_size = int(round(math.sqrt(freqs.shape[0] - regs))) * patch
    return dict(latent_dim=latent_dim, image_size=image_size, patch_size=patch, z_channels=z, cnn_channels=chs,
                encoder_layers=_count(vae_sd, r"encoder\.layers\.(\d+)\."),
                decoder_layers=_count(vae_sd, r"decoder\.layers\.(\d+)\."), num_register_tokens=regs,
                num_attention_heads=num_heads)


def infer_ar_config(ar_sd: dict[str, torch.Tensor], patch_size: int, num_heads: int | None) -> dict:
    """The SphereARConfig of official AR weights (keys without the ``vae.`` part)."""
    pin = _need(ar_sd, "proj_in.weight", "the width")
    hidden, latent_dim = pin.shape
    cls = _need(ar_sd, "cls_embedding.weight", "the class embedding")
    if cls.shape[1] % hidden:
        raise ConversionError(f"cls_embedding.weight has width {cls.shape[1]}, not a multiple of the width {hidden}")
    n_tok = _need(ar_sd, "pos_for_diff.weight", "the token count").shape[0]
    grid = int(round(math.sqrt(n_tok)))
    if grid * grid != n_tok:
        raise ConversionError(f"pos_for_diff.weight has {n_tok} rows, not a square token grid")
    cfg = dict(hidden_size=hidden, num_hidden_layers=_count(ar_sd, r"layers\.(\d+)\."),
               num_attention_heads=num_heads or max(1, hidden // 64),
               intermediate_size=_need(ar_sd, "layers.0.feed_forward.w2.weight", "the MLP width").shape[1],
               head_hidden_size=_need(ar_sd, "head.net.input_proj.weight", "the head width").shape[0],
               head_num_layers=_count(ar_sd, r"head\.net\.res_blocks\.(\d+)\."),
               head_num_adaln=_count(ar_sd, r"head\.net\.ada_ln_blocks\.(\d+)\."),
               latent_dim=latent_dim, image_size=grid * patch_size, patch_size=patch_size,
               num_classes=cls.shape[0] - 1, num_class_tokens=cls.shape[1] // hidden)
    if hidden % cfg["num_attention_heads"]:
        raise ConversionError(f"width {hidden} is not divisible by {cfg['num_attention_heads']} heads (--num-heads)")
    for preset in PRESETS.values():  # the recommended guidance of the matching official model
        if all(cfg[k] == preset[k] for k in preset if k != "guidance_scale"):
            cfg["guidance_scale"] = preset["guidance_scale"]
    return cfg


def _load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        raise ConversionError(f"{what}: missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                              f"({len(missing)} in all)")
    if unexpected:
        raise ConversionError(f"{what}: unexpected keys {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise ConversionError(f"{what}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


def _map(sd: dict[str, torch.Tensor], rules, what: str, ignored=()) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k in ignored:
            continue
        new = _rename(k, rules)
        if new is None:
            raise ConversionError(f"{what}: unexpected key {k!r}")
        out[new] = v
    return out


def write_atomically(output: str | os.PathLike, write, overwrite: bool = False) -> Path:
    """Call ``write(tmp_dir)`` and move the folder into place only once it is complete."""
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ConversionError(f"{output} exists and is not empty (pass --overwrite to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        write(tmp)
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output


def convert_official_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike | None = None,
                                vae_checkpoint: str | os.PathLike | None = None, use_ema: bool = True,
                                num_heads: int | None = None, vae_num_heads: int | None = None,
                                overwrite: bool = False):
    """Build a :class:`SphereARPipeline` from official weights and, if ``output`` is given, save it there.

    ``checkpoint``: an official AR checkpoint (``{"ema", "model", "epochs", "args"}`` or a bare state dict),
    which normally carries the ``vae.*`` weights too; ``vae_checkpoint``: an official ``vae.pt`` whose weights
    replace them. Attention heads default to width / 64 (all official models); ``num_heads`` overrides.
    """
    from .pipeline_sphere_ar import SphereARPipeline

    sd, args = _state_dict(load_official_checkpoint(checkpoint), checkpoint, use_ema)
    vae_sd = {k[4:]: v for k, v in sd.items() if k.startswith("vae.")}
    ar_sd = {k: v for k, v in sd.items() if not k.startswith("vae.")}
    if not ar_sd:
        raise ConversionError(f"{checkpoint}: holds only S-VAE weights; pass an AR checkpoint (e.g. SphereAR_B.pt) "
                              "and give this file as --vae-checkpoint")
    if vae_checkpoint is not None:
        vsd, vargs = _state_dict(load_official_checkpoint(vae_checkpoint), vae_checkpoint, use_ema=False)
        vae_sd = {k[4:] if k.startswith("vae.") else k: v for k, v in vsd.items()}
        bad = [k for k in vsd if not k.startswith("vae.")]
        if bad and len(bad) != len(vsd):
            raise ConversionError(f"{vae_checkpoint}: unexpected non-VAE keys {bad[:3]}")
    if not vae_sd:
        raise ConversionError(f"{checkpoint}: no S-VAE ('vae.*') weights; pass --vae-checkpoint vae.pt")
    image_size = getattr(args, "image_size", None)
    vae_cfg = infer_vae_config(vae_sd, image_size, vae_num_heads)
    ar_cfg = infer_ar_config(ar_sd, vae_cfg["patch_size"], num_heads)
    if ar_cfg["image_size"] != vae_cfg["image_size"] or ar_cfg["latent_dim"] != vae_cfg["latent_dim"]:
        raise ConversionError(f"the AR model ({ar_cfg['image_size']}px, latent dim {ar_cfg['latent_dim']}) does not "
                              f"match the S-VAE ({vae_cfg['image_size']}px, latent dim {vae_cfg['latent_dim']})")
    rows = vae_cfg["num_register_tokens"] + (vae_cfg["image_size"] // vae_cfg["patch_size"]) ** 2
    for k in _VAE_IGNORED:
        if k in vae_sd and vae_sd[k].shape[0] != rows:
            raise ConversionError(f"S-VAE: {k} has {vae_sd[k].shape[0]} positions, expected {rows} for "
                                  f"{vae_cfg['image_size']}px images")
    vae = SphereVAE(**vae_cfg)
    _load_into(vae, _map(vae_sd, _VAE_RULES, "S-VAE", _VAE_IGNORED), "S-VAE")
    transformer = SphereARTransformer(SphereARConfig(**ar_cfg))
    _load_into(transformer, _map(ar_sd, _AR_RULES, "AR model"), "AR model")
    id2label = imagenet_id2label() if ar_cfg["num_classes"] == 1000 else None
    pipe = SphereARPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=SphereARScheduler(),
                            id2label=id2label)
    if output is not None:
        write_atomically(output, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True), overwrite=overwrite)
    return pipe
