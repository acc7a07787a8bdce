"""Fine-tune a SphereAR pipeline's transformer with LoRA (PEFT) on your images; writes a PEFT adapter.

    python examples/train_lora.py --pretrained_model path/to/pipeline --train_data_dir my_images \\
        --output_dir lora-run --lora_rank 8 --num_train_epochs 10 [--lora_head] [--train_class_embeddings 3 7]

LoRA goes on the trunk's attention and feed-forward linears (``layers.N.attention.wqkv / wo``,
``layers.N.feed_forward.w1 / w2``); ``--lora_head`` adds the diffusion head's linears; ``--train_class_embeddings``
also trains those rows of the class embedding (re-purposed classes; only these rows are stored). Images come from
an imagefolder (``--train_data_dir``), a ``datasets`` dataset (``--dataset_name`` / ``--dataset_path``) or a latent
cache (``--latent_cache``, made with the pipeline's VAE), and are encoded on the fly by the pipeline's frozen VAE
at its resolution. Labels are the base model's class ids, or ``--class_ids 3 7`` maps dataset label i to class
``class_ids[i]`` (e.g. a two-folder imagefolder re-purposing classes 3 and 7). The augmentation defaults are the
official ones (random crops, flips: ``--aug_ratio 0 --hflip False`` turns them off). Every ``TrainingArguments``
flag works (``--help``).

The adapter (``adapter_model.safetensors`` + ``adapter_config.json``) is written atomically to
``<output_dir>/adapter`` (or ``--adapter_output_dir``). Use it with one call:

    from sphere_ar_hf.lora import load_lora, merge_lora, unload_lora
    load_lora(pipe, "lora-run/adapter")   # then pipe(...) samples with it; unload_lora(pipe) / merge_lora(pipe)
"""

from __future__ import annotations

import logging
import sys

from transformers import HfArgumentParser

from sphere_ar_hf.training.arguments import flags_in_errors
from sphere_ar_hf.training.data import DataArguments
from sphere_ar_hf.training.lora import LoraArguments, LoraTrainingArguments, train_lora
from sphere_ar_hf.utils import ScriptHelpFormatter, run_main


def parse_args(argv: list[str] | None = None) -> tuple[LoraArguments, DataArguments, LoraTrainingArguments]:
    """Parse flags (or one ``.json`` file) into the LoRA, data and training arguments."""
    parser = HfArgumentParser((LoraArguments, DataArguments, LoraTrainingArguments), description=__doc__,
                              formatter_class=ScriptHelpFormatter)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> str:
    """Train the adapter; returns its folder."""
    lora_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if training_args.should_log else logging.WARNING)
    with flags_in_errors(adapter_output_dir="--adapter_output_dir", output_dir="--adapter_output_dir"):
        return str(train_lora(lora_args, data_args, training_args))


if __name__ == "__main__":
    run_main(main)
