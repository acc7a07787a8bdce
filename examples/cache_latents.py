"""Encode a dataset's center crops (and their flips) once into a SphereVAE latent cache for AR training.

    torchrun --nproc_per_node 8 examples/cache_latents.py --pretrained_vae path/to/pipeline \\
        --dataset_name ILSVRC/imagenet-1k --output_dir imagenet-latents --batch_size 128 --mixed_precision bf16

Accepts every DataArguments option (--train_data_dir, --dataset_path, --image_column, ...); see --help.
Then train with --latent_cache imagenet-latents.
"""

from sphere_ar_hf.training.latent_cache import main
from sphere_ar_hf.utils import run_main

if __name__ == "__main__":
    run_main(main)
