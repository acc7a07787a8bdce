"""``sphere-ar sample`` (many images into an ADM ``.npz``, on any number of processes) and ``sphere-ar evaluate``
(FID / sFID / IS / precision / recall)."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .cli_common import (
    MODEL_HELP,
    CLIError,
    add_compile_argument,
    add_threads_argument,
    device_from_name,
    finite_float,
    guidance_option,
    load_pipeline,
    make_current,
    number_argument,
    one_line,
    positive_int,
    resolve_model,
    seed_argument,
    set_threads,
    steps_argument,
)
from .options import CFG_SCHEDULES, DTYPES, FEATURE_SPACES, LABEL_MODES, SAMPLERS
from .utils import plural

__all__ = ["add_evaluate_parser", "add_feature_options", "add_sample_parser", "add_sampling_options", "cmd_evaluate",
           "cmd_sample", "model_id", "process_group", "sampling_device"]


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int, int, Callable[[], None]]]:
    """``(rank, world_size, local_rank, barrier)`` under torchrun / ``accelerate launch`` (a gloo group, used for
    barriers only, with a timeout long enough for a rank to wait for the slowest one), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1, 0, lambda: None
        return
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    try:
        yield dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.barrier
    finally:
        dist.destroy_process_group()


def sampling_device(name: str | None, world: int, local_rank: int):
    """``--device`` of a sampling process: a bare ``cuda`` means ``cuda:LOCAL_RANK`` under torchrun (made current:
    each rank's CUDA graphs and pinned memory on its own GPU)."""
    device = device_from_name(name)
    if device.type == "cuda" and device.index is None and world > 1:
        import torch

        device = make_current(torch.device("cuda", local_rank))
    return device


def model_id(model: str) -> str:
    """How a run records its model: a local folder by its absolute path (resuming from another working directory
    is the same run), else the Hub id."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def cmd_sample(args: argparse.Namespace) -> int:
    from .evaluation.sampling import run_sampling, sampling_settings, set_sampler

    guidance = guidance_option(args.guidance_scale)  # (None: the model's)
    threads = set_threads(args.threads)
    with process_group() as (rank, world, local_rank, barrier):
        device = sampling_device(args.device, world, local_rank)
        model = resolve_model(args.model)
        pipe = load_pipeline(model, args.dtype)
        try:
            set_sampler(pipe, args.sampler, args.time_shift)
        except ValueError as e:
            raise CLIError(one_line(e)) from None
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if args.compile:
            pipe.enable_torch_compile()
        if args.vae_slicing:
            pipe.vae.enable_slicing()
        tf = pipe.transformer.config
        guidance = guidance if guidance is not None else float(tf.guidance_scale)
        settings = sampling_settings(pipe, model_id(model), args.num_images, args.seed, args.labels, guidance,
                                     args.cfg_schedule, args.steps, args.dtype, args.shard_size, args.compile)
        try:
            final = run_sampling(pipe, args.output_dir, settings, batch_size=args.batch_size, resume=args.resume,
                                 png=args.png, rank=rank, world_size=world, barrier=barrier)
        except ValueError as e:
            raise CLIError(one_line(e)) from None
    if rank == 0:
        print(f"wrote {final}: {plural(args.num_images, 'image')}, {plural(world, 'process', 'processes')} of "
              f"{plural(threads, 'thread')}, "
              f"{settings.sampler} {plural(args.steps, 'step')}{' (compiled)' if args.compile else ''}, "
              f"guidance {guidance:g} {args.cfg_schedule}, "
              f"labels {args.labels}, seed {args.seed}")
    return 0




METRIC_NAMES = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "frechet_distance":
                "Fréchet distance (digits features)", "accuracy": "Accuracy (digits classifier)",
                "precision": "Precision", "recall": "Recall"}


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from .evaluation import evaluate

    device = device_from_name(args.device)
    try:
        result = evaluate(args.gen, args.ref, features=args.features, inception_weights=args.inception_weights,
                          device=device, batch_size=args.batch_size, k=args.k, split_size=args.split_size,
                          with_precision_recall=not args.no_precision_recall, progress=not args.json)
    except (ValueError, ImportError) as e:
        raise CLIError(one_line(e)) from None
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"GEN {result['gen']}: {plural(result['num_gen'], 'image')}; REF {result['ref']}: "
          f"{plural(result['num_ref'], 'image')}")
    for key, name in METRIC_NAMES.items():
        if key in result:
            print(f"{name}: {result[key]:.6g}")
    for note in result.get("notes", []):
        print(f"note: {note}")
    return 0



def add_sample_parser(sub, fmt) -> None:

    p = sub.add_parser(
        "sample", formatter_class=fmt, help="sample many images for evaluation into an ADM .npz (multi-process)",
        description="Sample --num-images images into DIR/samples.npz (ADM layout: arr_0 uint8 NHWC, arr_1 labels), "
                    "as one process or under `torchrun --nproc_per_node P` / `accelerate launch` (each rank samples "
                    "its own shards). Image n depends only on --seed, n, its label and the settings: it has its own "
                    "generator, seeded from a hash of (seed, n), and on the CPU the same bits for any number of "
                    "processes and batch size. Shards are written atomically; --resume continues a run that "
                    "crashed or was killed, redoing only unfinished shards.",
        epilog="example: torchrun --nproc_per_node 8 -m sphere_ar_hf.cli sample --model sphere-ar-b "
               "--num-images 50000 --output-dir samples/b --batch-size 256 --dtype bfloat16 --compile")
    add_sampling_options(p, "folder for sampling.json, shards/ and samples.npz (and images/ with --png)")
    p.add_argument("--guidance-scale", type=number_argument, metavar="F", default=None,
                   help="classifier-free guidance scale; <= 1 disables it (default: the model's recommended value)")
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default="linear",
                   help="guidance over the tokens: 'linear' (official) or 'constant'")
    p.add_argument("--steps", type=steps_argument, metavar="K", default=100,
                   help="sampler steps per token (euler_maruyama: K + 1 head evaluations; heun: 2K - 1)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="per-token sampler (default: the model's scheduler, euler_maruyama for official weights)")
    p.add_argument("--png", action="store_true", help="also write each image to DIR/images/{n:06d}.png")
    p.add_argument("--vae-slicing", action="store_true",
                   help="decode one image at a time (pipe.vae.enable_slicing()): the decoder's memory for one image "
                        "instead of the batch, so a larger --batch-size fits a smaller GPU; images equal to float "
                        "rounding")
    add_compile_argument(p)
    p.set_defaults(func=cmd_sample)


def add_sampling_options(p: argparse.ArgumentParser, output_help: str) -> None:
    """The options ``sample`` shares with ``sweep``: model, image count, output folder (``output_help``), labels,
    batch, seed, time shift, shards, resume, device, dtype and threads."""
    p.add_argument("--model", default=None, metavar="DIR",
                   help=f"{MODEL_HELP} (default: the embedded digits model)")
    p.add_argument("--num-images", required=True, type=positive_int, metavar="N", help="images to sample")
    p.add_argument("--output-dir", required=True, type=Path, metavar="DIR", help=output_help)
    p.add_argument("--labels", choices=LABEL_MODES, default="uniform",
                   help="'uniform': random classes from a hash of (seed, n), as the official sampler draws them; "
                        "'balanced': image n shows class n %% num_classes")
    p.add_argument("--batch-size", type=positive_int, metavar="B", default=32,
                   help="images per forward pass and process (the images do not depend on it)")
    p.add_argument("--seed", type=seed_argument, metavar="S", default=0, help="random seed of the run")
    p.add_argument("--time-shift", type=finite_float, metavar="S", default=None,
                   help="warp of the time grid, t -> t / (t + S (1 - t)): S < 1 puts smaller steps near the data "
                        "end (heun: 0.5 measured best on the digits model); default: the model's scheduler (1.0)")
    p.add_argument("--shard-size", type=positive_int, metavar="N", default=1000,
                   help="images per shard: the unit of work of a rank and what a crash can lose")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir (its settings must match), skipping finished shards")
    p.add_argument("--device", metavar="DEVICE", default=None,
                   help="torch device (default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and compute dtype")
    add_threads_argument(p)




def add_evaluate_parser(sub, fmt) -> None:

    p = sub.add_parser(
        "evaluate", formatter_class=fmt, help="FID / sFID / IS / precision / recall of sampled images",
        description="Compare GEN with REF, each an ADM .npz (arr_0 uint8 NHWC images; stored mu/sigma and "
                    "mu_s/sigma_s are used, as in ADM reference batches) or a folder of images. Inception features "
                    "come from torch-fidelity's TF-ported InceptionV3 (downloaded once and cached, or "
                    "--inception-weights); no TensorFlow. --features digits measures in the digit classifier's "
                    "feature space (for the embedded digits model; REF defaults to the held-out real digits).",
        epilog="example: sphere-ar evaluate samples/b/samples.npz VIRTUAL_imagenet256_labeled.npz --json")
    p.add_argument("gen", type=Path, metavar="GEN", help="generated images: .npz or folder")
    p.add_argument("ref", type=Path, metavar="REF", nargs="?", default=None,
                   help="reference images or statistics: .npz or folder (optional with --features digits)")
    add_feature_options(p)
    p.add_argument("--batch-size", type=positive_int, metavar="N", default=64, help="images per forward pass")
    p.add_argument("--device", metavar="DEVICE", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--split-size", type=positive_int, metavar="N", default=5000,
                   help="Inception Score: images per split (ADM: 5000)")
    p.add_argument("--no-precision-recall", action="store_true",
                   help="skip precision / recall (they need the images of both sets and N^2 distances)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=cmd_evaluate)


def add_feature_options(p: argparse.ArgumentParser) -> None:
    """The options ``evaluate`` shares with ``sweep``: the feature space, the Inception weights and k."""
    p.add_argument("--features", choices=FEATURE_SPACES, default="inception",
                   help="feature space: 'inception' (FID etc.) or 'digits' (the embedded digits model's yardstick)")
    p.add_argument("--inception-weights", type=Path, metavar="PATH", default=None,
                   help="local copy of torch-fidelity's InceptionV3 weights (weights-inception-2015-12-05-6726825d"
                        ".pth; default: download once into the torch hub cache)")
    p.add_argument("--k", type=positive_int, metavar="K", default=3,
                   help="nearest neighbours for precision / recall (ADM: 3)")
