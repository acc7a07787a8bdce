"""Train a SphereAR transformer on images (encoded on the fly by a frozen S-VAE) or on a latent cache.

The defaults are the official recipe (SphereAR-B, 400 epochs, global batch 512 = 64 x 8 GPUs, AdamW 3e-4,
betas (0.9, 0.95), weight decay 0.05, 20k warm-up steps then cosine decay to 1e-5, EMA 0.9999, bf16 on GPU):

    torchrun --nproc_per_node 8 examples/train_sphere_ar.py --pretrained_vae path/to/vae_or_pipeline \\
        --dataset_name ILSVRC/imagenet-1k --model SphereAR-B --output_dir results \\
        --resume_from_checkpoint latest

    # or from a latent cache written by examples/cache_latents.py:
    ... --latent_cache imagenet-latents

Every ``transformers.TrainingArguments`` flag works (``--torch_compile``, ``--activation_checkpointing``
(transformers >= 5.23; ``--gradient_checkpointing`` before),
``--save_steps``, ``--push_to_hub --hub_model_id``, ...); ``--help`` lists them all. Checkpoints are marked
complete only once fully written; ``--resume_from_checkpoint latest`` resumes from the newest complete one (or
starts fresh); the newest 3 are kept (``--save_total_limit``, ``--keep_checkpoints_every N``). The classes and
their names come from the dataset (``--num_classes`` must match it). TensorBoard logs go to ``<output_dir>/logs``.
The run ends by writing a pipeline folder with the EMA weights to ``<output_dir>/pipeline``.
A single JSON file with all the arguments may be given instead of flags.
"""

from __future__ import annotations

import logging
import sys

from transformers import HfArgumentParser

from sphere_ar_hf.training.arguments import ModelArguments, SphereARTrainingArguments, flags_in_errors
from sphere_ar_hf.training.data import DataArguments
from sphere_ar_hf.training.trainer import train_sphere_ar
from sphere_ar_hf.utils import ScriptHelpFormatter, run_main


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, SphereARTrainingArguments]:
    """Parse flags (or one ``.json`` file) into the model, data and training arguments."""
    parser = HfArgumentParser((ModelArguments, DataArguments, SphereARTrainingArguments), description=__doc__,
                              formatter_class=ScriptHelpFormatter)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> None:
    """Train the transformer and write the pipeline folder."""
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if training_args.should_log else logging.WARNING)
    with flags_in_errors(pipeline_output_dir="--pipeline_output_dir", output_dir="--pipeline_output_dir"):
        train_sphere_ar(model_args, data_args, training_args)


if __name__ == "__main__":
    run_main(main)
