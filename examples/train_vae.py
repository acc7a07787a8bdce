"""Train the SphereAR S-VAE (SphereVAE + PatchGAN discriminator) with accelerate.

The defaults are the official recipe (75M S-VAE, 256px, 100 epochs, global batch 256, lr 1e-4, bf16):

    accelerate launch --multi_gpu --num_processes 8 examples/train_vae.py \\
        --dataset_name ILSVRC/imagenet-1k --output_dir runs/svae
    # or: torchrun --nproc_per_node 8 examples/train_vae.py --dataset_name ILSVRC/imagenet-1k --output_dir runs/svae

Resume an interrupted run with ``--resume_from_checkpoint latest`` (same output_dir); the newest 3 checkpoints are
kept (``--checkpoints_total_limit``, ``--keep_checkpoints_every N``); TensorBoard logs go to ``<output_dir>/logs``.
LPIPS needs torchvision's VGG16 weights (downloaded once; offline: ``--perceptual_weight 0``). Options may also come
from a single JSON file: ``examples/train_vae.py args.json``. See ``--help`` for every option.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from transformers import HfArgumentParser

from sphere_ar_hf.training.data import DataArguments
from sphere_ar_hf.training.vae_arguments import VAEModelArguments, VAETrainingArguments
from sphere_ar_hf.training.vae_trainer import train_vae
from sphere_ar_hf.utils import run_main


def parse_args(argv: Sequence[str] | None = None) -> tuple[VAEModelArguments, VAETrainingArguments, DataArguments]:
    """The three argument dataclasses from the command line (or from one ``.json`` file)."""
    parser = HfArgumentParser((VAEModelArguments, VAETrainingArguments, DataArguments),
                              description=__doc__.split("\n\n")[0])
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: Sequence[str] | None = None) -> Path:
    """Train the S-VAE; returns its saved folder."""
    return train_vae(*parse_args(argv))


if __name__ == "__main__":
    run_main(main)
