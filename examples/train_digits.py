"""Train the bundled ``digits`` model: an S-VAE and a SphereAR transformer on scikit-learn's 8x8 digits, on CPU.

    python examples/train_digits.py                          # writes runs/digits
    python examples/train_digits.py --output_dir src/sphere_ar_hf/pretrained/digits --overwrite   # the shipped one

The whole recipe runs the project's own training code (``train_vae``, ``cache_latents``, ``train_sphere_ar``) on a
``save_to_disk`` dataset of the train split, written into ``--work_dir`` (default: a temporary folder):

1. data: ``sphere_ar_hf.evaluation.digits.load_digit_splits`` holds out a stratified, seeded 20% test split that no step
   sees; the 1,437 train digits are upscaled to 16 px RGB in [-1, 1] (no flips, no crops: digits are not
   mirror-symmetric);
2. S-VAE: 16 px, patch 8 (CNN 16-32-64-64, 2-block ViTs) -> 2x2 = 4 tokens of ``latent_dim`` 16 on the radius-4
   sphere; L1 + KL (no LPIPS: its VGG backbone would need a download), optionally the PatchGAN;
3. latent cache: posterior parameters of every train image;
4. SphereAR: a small transformer (width 128, 4 blocks; head width 192, 3 blocks) trained on fresh posterior
   samples with the official loss and schedule shape, EMA weights (decay 0.995: a short run must forget the init);
5. the pipeline folder (model_index.json, transformer/, vae/, scheduler/, safetensors only, id2label "0".."9",
   the recommended ``guidance_scale`` in the transformer config) is written atomically to ``--output_dir``.

Seeded and reproducible in one environment (one thread by default: ``--threads``): 8 minutes on this project's 2-core
machine (447-478 s, measured quiet by ``benchmarks/reproduce_digits.py``). It wrote the shipped weights byte for
byte in the environment that shipped them; with other library versions the bytes differ (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from sphere_ar_hf.evaluation.digits import DIGITS_IMAGE_SIZE, load_digit_splits, write_digits_dataset
from sphere_ar_hf.options import POSTERIORS
from sphere_ar_hf.utils import check_output_folder, run_main, write_folder_atomically

logger = logging.getLogger("train_digits")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", type=Path, default=Path("runs/digits"), help="where the pipeline folder is written")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output_dir if it holds an earlier pipeline folder (only such a folder)")
    p.add_argument("--work_dir", type=Path, default=None,
                   help="data, runs and caches (default: a temporary folder, deleted at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is robust on a busy 2-core machine; results depend on it)")
    p.add_argument("--reuse_vae", action="store_true", help="skip the S-VAE stage if <work_dir>/vae-run/vae exists")
    g = p.add_argument_group("quality while it trains (needs --work_dir: the curves are written there)")
    g.add_argument("--eval_images", type=int, default=0,
                   help="images per evaluation: S-VAE reconstructions, SphereAR samples (100 steps, the recommended "
                        "guidance), measured in the digits feature space (0: off)")
    g.add_argument("--vae_eval_steps", type=int, default=100, help="S-VAE steps between evaluations")
    g.add_argument("--ar_eval_steps", type=int, default=100, help="SphereAR steps between evaluations")
    g = p.add_argument_group("S-VAE")
    g.add_argument("--resolution", type=int, default=DIGITS_IMAGE_SIZE)
    g.add_argument("--latent_dim", type=int, default=16)
    g.add_argument("--cnn_channels", type=int, nargs="+", default=[16, 32, 64, 64])
    g.add_argument("--vae_layers", type=int, default=2, help="encoder and decoder ViT blocks each")
    g.add_argument("--vae_heads", type=int, default=2)
    g.add_argument("--vae_epochs", type=int, default=50)
    g.add_argument("--vae_batch_size", type=int, default=64)
    g.add_argument("--vae_lr", type=float, default=1e-3)
    g.add_argument("--posterior", choices=POSTERIORS, default="power_spherical",
                   help="the S-VAE's Power Spherical posterior, or the diagonal-Gaussian baseline of the ablation")
    g.add_argument("--normalize_decoder_input", action=argparse.BooleanOptionalAction, default=True,
                   help="project the decoder's input onto the sphere (a Gaussian VAE may go without)")
    g.add_argument("--kl_weight", type=float, default=None,
                   help="KL weight (default: the posterior's, 0.004 for the Power Spherical; see train_vae.py)")
    g.add_argument("--disc_weight", type=float, default=0.0, help="PatchGAN weight (0: no GAN)")
    g.add_argument("--disc_start_frac", type=float, default=0.5, help="GAN from this fraction of the VAE steps")
    g = p.add_argument_group("SphereAR")
    g.add_argument("--hidden_size", type=int, default=128)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--head_hidden_size", type=int, default=192)
    g.add_argument("--head_layers", type=int, default=3)
    g.add_argument("--num_class_tokens", type=int, default=4)
    g.add_argument("--normalize_tokens", action=argparse.BooleanOptionalAction, default=True,
                   help="train on and sample tokens projected onto the sphere (SphereAR); off: a Gaussian VAE's raw "
                        "tokens, no projection when sampling")
    g.add_argument("--diff_batch_mul", type=int, default=4)
    g.add_argument("--ar_epochs", type=float, default=100)
    g.add_argument("--ar_batch_size", type=int, default=64)
    g.add_argument("--ar_lr", type=float, default=1e-3)
    g.add_argument("--ar_warmup_steps", type=int, default=200)
    g.add_argument("--ema_decay", type=float, default=0.995)
    g.add_argument("--ar_workers", type=int, default=1,
                   help="DataLoader workers drawing posterior samples next to the training process")
    g.add_argument("--guidance_scale", type=float, default=2.0,
                   help="the recommended guidance written to the config (2: see benchmarks/eval_digits.py)")
    return p.parse_args(argv)


def train_vae_stage(args: argparse.Namespace, dataset: Path, run_dir: Path, num_train: int) -> Path:
    from sphere_ar_hf.training.vae_trainer import VAEModelArguments, VAETrainingArguments, train_vae

    steps_per_epoch = num_train // args.vae_batch_size  # drop_last
    max_steps = args.vae_epochs * steps_per_epoch
    model_args = VAEModelArguments(
        latent_dim=args.latent_dim, patch_size=2 ** (len(args.cnn_channels) - 1), z_channels=args.cnn_channels[-1],
        cnn_channels=list(args.cnn_channels), encoder_layers=args.vae_layers, decoder_layers=args.vae_layers,
        num_attention_heads=args.vae_heads, posterior=args.posterior,
        normalize_decoder_input=args.normalize_decoder_input, disc_channels=16, disc_layers=2)
    training_args = VAETrainingArguments(
        output_dir=str(run_dir), seed=args.seed, global_batch_size=args.vae_batch_size,
        num_train_epochs=args.vae_epochs, learning_rate=args.vae_lr, lr_warmup_steps=min(100, max_steps // 10),
        lr_decay_start=max(1, max_steps // 2), min_lr=args.vae_lr / 20, weight_decay=0.0,
        perceptual_weight=0.0, kl_weight=args.kl_weight, disc_weight=args.disc_weight,
        disc_start=int(max_steps * args.disc_start_frac) + 1 if args.disc_weight > 0 else 10**9,
        mixed_precision="no", dataloader_num_workers=0, logging_steps=max(1, steps_per_epoch * 5),
        report_to="tensorboard" if args.eval_images else "none", checkpointing_steps=10**9, validation_steps=10**9,
        num_validation_images=8, eval_images=args.eval_images,
        eval_steps=args.vae_eval_steps if args.eval_images else 0, eval_features="digits")
    data_args = _data_args(args, dataset)
    return train_vae(model_args, training_args, data_args)


def _data_args(args: argparse.Namespace, dataset: Path, **kwargs):
    from sphere_ar_hf.training.data import DataArguments

    return DataArguments(dataset_path=str(dataset), resolution=args.resolution, num_classes=10, aug_ratio=0.0,
                         hflip=False, **kwargs)


def check_flags(args: argparse.Namespace) -> None:
    """Every numeric flag in its range, and the SphereAR config buildable, before the S-VAE stage trains."""
    from sphere_ar_hf.training.argument_checks import (
        NON_NEGATIVE_INT,
        POSITIVE_INT,
        POSITIVE_REAL,
        PROBABILITY,
        RATE,
        check_value,
    )

    rules = {**dict.fromkeys(["threads", "resolution", "latent_dim", "cnn_channels", "vae_layers", "vae_heads",
                              "vae_epochs", "vae_batch_size", "ar_batch_size"], POSITIVE_INT),
             **dict.fromkeys(["ar_warmup_steps", "ar_workers", "eval_images"], NON_NEGATIVE_INT),
             **dict.fromkeys(["vae_eval_steps", "ar_eval_steps"], POSITIVE_INT),
             **dict.fromkeys(["vae_lr", "ar_lr", "kl_weight", "disc_weight"], RATE),
             "ar_epochs": POSITIVE_REAL, "disc_start_frac": PROBABILITY}
    for name, rule in rules.items():
        check_value(name, getattr(args, name), rule=rule)
    check_value("ema_decay", args.ema_decay)
    if args.eval_images and args.work_dir is None:
        raise ValueError(f"--eval_images {args.eval_images} needs --work_dir: the evaluation curves are written to "
                         "<work_dir>/vae-run/eval and <work_dir>/ar-run/eval")
    if args.eval_images == 1:
        raise ValueError("--eval_images 1: expected 0 (off) or at least 2 (a covariance needs 2)")
    ar_config(args)


# the SphereAR config's fields that the recipe sets from a flag of another name
CONFIG_FLAGS = {"num_hidden_layers": "--layers", "num_attention_heads": "--heads", "head_num_layers": "--head_layers",
                "image_size": "--resolution", "patch_size": "--cnn_channels"}


def ar_config(args: argparse.Namespace):
    """The SphereAR config of the recipe (its fields are checked when it is built; an error names the flag)."""
    from sphere_ar_hf import SphereARConfig

    try:
        return SphereARConfig(
            hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=args.heads,
            head_hidden_size=args.head_hidden_size, head_num_layers=args.head_layers, head_num_adaln=1,
            num_class_tokens=args.num_class_tokens, normalize_tokens=args.normalize_tokens,
            diff_batch_mul=args.diff_batch_mul,
            guidance_scale=args.guidance_scale, latent_dim=args.latent_dim, image_size=args.resolution,
            patch_size=2 ** (len(args.cnn_channels) - 1), num_classes=10)
    except ValueError as e:
        field, _, rest = str(e).partition(": ")
        flag = CONFIG_FLAGS.get(field, f"--{field}")
        raise ValueError(f"{flag}: {rest}" if rest and field.isidentifier() else str(e)) from None


def train_ar_stage(args: argparse.Namespace, vae_dir: Path, cache: Path, run_dir: Path, num_train: int) -> Path:
    from sphere_ar_hf.training.arguments import ModelArguments, SphereARTrainingArguments
    from sphere_ar_hf.training.trainer import train_sphere_ar

    config = ar_config(args)
    config_file = run_dir.parent / "ar_config.json"
    config.to_json_file(str(config_file))
    steps = int(args.ar_epochs * (num_train // args.ar_batch_size))
    training_args = SphereARTrainingArguments(
        output_dir=str(run_dir), pipeline_output_dir=str(run_dir / "pipeline"), use_cpu=True, seed=args.seed,
        per_device_train_batch_size=args.ar_batch_size, num_train_epochs=args.ar_epochs, learning_rate=args.ar_lr,
        min_lr=args.ar_lr / 20, warmup_steps=args.ar_warmup_steps, decay_start=max(args.ar_warmup_steps, steps // 3),
        weight_decay=0.05, ema_decay=args.ema_decay, dataloader_num_workers=args.ar_workers,
        logging_steps=max(1, steps // 20), save_strategy="no", report_to="tensorboard" if args.eval_images else "none",
        disable_tqdm=True, eval_images=args.eval_images, eval_steps=args.ar_eval_steps, eval_features="digits",
        per_device_eval_batch_size=256)
    model_args = ModelArguments(pretrained_vae=str(vae_dir), config_file=str(config_file))
    return train_sphere_ar(model_args, _data_args(args, cache.parent / "data", latent_cache=str(cache)),
                           training_args)


def _copy_public(src: Path, dst: Path) -> None:
    """Copy the pipeline folder without the ``_name_or_path`` of the (temporary) folder the VAE was loaded from, so
    that two runs of the recipe write byte-identical folders (``write_folder_atomically`` sets the modes by the
    umask)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    for config in dst.glob("*/config.json"):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    check_flags(args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    # --output_dir may replace only an earlier pipeline folder, never one that holds the work folder
    check_output_folder(args.output_dir, args.overwrite, kind="pipeline", inputs=[args.work_dir],
                        option="--output_dir")
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="train_digits-")
        work = Path(tmp.name)
    else:
        work = args.work_dir
        work.mkdir(parents=True, exist_ok=True)
    try:
        # 1. data: the train split only (the test split is for the benchmark)
        splits = load_digit_splits()
        num_train = len(splits.train_labels)
        data = work / "data"
        shutil.rmtree(data, ignore_errors=True)
        write_digits_dataset(splits.train_images, splits.train_labels, data, args.resolution)
        # 2. S-VAE
        vae_dir = work / "vae-run" / "vae"
        if not (args.reuse_vae and (vae_dir / "config.json").is_file()):
            shutil.rmtree(work / "vae-run", ignore_errors=True)
            vae_dir = train_vae_stage(args, data, work / "vae-run", num_train)
        t_vae = time.time()
        logger.info("S-VAE done after %.0f s", t_vae - t0)
        # 3. latent cache
        from sphere_ar_hf.training.latent_cache import cache_latents, load_vae

        cache = work / "latents"
        cache_latents(load_vae(vae_dir).eval(), _data_args(args, data), cache, batch_size=256, overwrite=True)
        # 4. SphereAR
        shutil.rmtree(work / "ar-run", ignore_errors=True)
        pipeline = train_ar_stage(args, vae_dir, cache, work / "ar-run", num_train)
        logger.info("SphereAR done after %.0f s (S-VAE %.0f s)", time.time() - t0, t_vae - t0)
        # 5. the pipeline folder
        write_folder_atomically(args.output_dir, lambda out: _copy_public(pipeline, out), overwrite=args.overwrite,
                                kind="pipeline", inputs=[work], option="--output_dir")
        (work / "recipe.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    finally:
        if tmp is not None:
            tmp.cleanup()
    size = sum(f.stat().st_size for f in args.output_dir.rglob("*") if f.is_file())
    logger.info("wrote %s (%.1f MB) in %.0f s", args.output_dir, size / 1e6, time.time() - t0)
    return args.output_dir


if __name__ == "__main__":
    run_main(main)
