"""The ``sphere-ar`` command line: ``convert`` (official checkpoint -> pipeline folder), ``generate`` (class labels
-> PNG images), ``space``, and the parser of every subcommand (``sample`` / ``evaluate``: :mod:`.cli_sampling`;
``push``: :mod:`.cli_push`).

Errors in the inputs (a bad checkpoint, an unknown class name, a missing model folder, ...) print one line
``error: <message>`` on stderr and exit with status 2; nothing is left half-written (files and folders are written
under a temporary name and renamed into place).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_common import (
    MODEL_HELP,
    CLIError,
    add_compile_argument,
    add_threads_argument,
    device_from_name,
    guidance_option,
    is_checkpoint,
    load_pipeline,
    number_argument,
    one_line,
    positive_int,
    quiet_libraries,
    resolve_model,
    seed_argument,
    set_threads,
    steps_argument,
)
from .cli_push import add_push_parser
from .cli_sampling import add_evaluate_parser, add_sample_parser
from .cli_sweep import add_sweep_parser
from .options import CFG_SCHEDULES, DTYPES
from .utils import HelpFormatter, OutputFolderError, atomic_write, format_millions, plural

if TYPE_CHECKING:
    from PIL import Image

    from .pipeline_sphere_ar import SphereARPipeline

__all__ = ["CLIError", "build_parser", "grid_columns", "label_ids_from_config", "main", "make_grid",
           "save_image_atomically", "slugify"]


def slugify(text: str, max_length: int = 60) -> str:
    """A file-name-safe slug: lower case, runs of anything but letters and digits -> ``-``."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "image"


def grid_columns(n: int) -> int:
    """Columns for ``n`` cells: the fewest from ``ceil(sqrt(n))`` up to ``2 sqrt(n)`` that fill every row (10 ->
    5 x 2, 8 -> 4 x 2), else ``ceil(sqrt(n))`` (7 -> 3 columns, one row part-filled)."""
    start = math.ceil(math.sqrt(n))
    return next((c for c in range(start, math.floor(2 * math.sqrt(n)) + 1) if n % c == 0), start)


def make_grid(images: Sequence[Image.Image], ncols: int | None = None, padding: int = 2,
              background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Tile equally sized images row by row into one RGB image.

    ``ncols`` defaults to :func:`grid_columns`; cells are separated by ``padding`` pixels of ``background`` (none
    around the border), so the grid is ``ncols * W + (ncols - 1) * padding`` pixels wide.
    """
    from PIL import Image

    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = images[0].size
    if any(im.size != (w, h) for im in images):
        raise ValueError(f"make_grid needs images of one size, got {sorted({im.size for im in images})}")
    n = len(images)
    ncols = max(1, min(n, ncols or grid_columns(n)))
    nrows = math.ceil(n / ncols)
    grid = Image.new("RGB", (ncols * w + (ncols - 1) * padding, nrows * h + (nrows - 1) * padding), background)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        grid.paste(im.convert("RGB"), (c * (w + padding), r * (h + padding)))
    return grid


def _image_format(path: Path) -> str:
    """``"PNG"``: the one format ``generate`` writes; any other extension is refused, so a name never lies."""
    if path.suffix.lower() != ".png":
        raise CLIError(f"{path}: generate writes PNG images: name the file .png, not {path.suffix or 'no extension'!r}")
    return "PNG"


MAX_IMAGE_SIDE = 8192  # pixels per side of one upscaled image
MAX_GRID_PIXELS = 2**28  # all images of a grid (about 800 MB as RGB)


def _check_output_size(size: int, scale: int | None, count: int) -> None:
    """Refuse an upscaling that would not fit in memory, before sampling."""
    side = size * (scale or _default_scale(size))
    if side > MAX_IMAGE_SIDE:
        raise CLIError(f"--scale {scale}: {size}-pixel images would become {side} pixels per side; at most "
                       f"{MAX_IMAGE_SIDE} (--scale {MAX_IMAGE_SIDE // size} or less)")
    if count * side * side > MAX_GRID_PIXELS:
        raise CLIError(f"{count} images of {side}x{side} pixels make a grid of {count * side * side / 1e6:.0f} "
                       f"megapixels; at most {MAX_GRID_PIXELS / 1e6:.0f}: lower --scale or make fewer images per call")


def _default_scale(size: int) -> int:
    """Enough nearest-neighbour upscaling to make a small image readable: at least 128 px, integer factor."""
    return max(1, -(-128 // size))


def save_image_atomically(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    fmt = _image_format(path)
    with atomic_write(path) as f:
        image.save(f, format=fmt)
    return path


# ---- convert --------------------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import ConversionError, convert_official_checkpoint
    from .single_file import resolve_checkpoint

    info: dict = {}
    try:
        checkpoint = resolve_checkpoint(args.checkpoint, "--checkpoint")  # a file, or one on the Hub
        vae_checkpoint = None if args.vae_checkpoint is None else resolve_checkpoint(args.vae_checkpoint,
                                                                                     "--vae-checkpoint")
        with quiet_libraries():
            pipe = convert_official_checkpoint(checkpoint, args.output, vae_checkpoint=vae_checkpoint,
                                               use_ema=not args.no_ema, num_heads=args.num_heads,
                                               vae_num_heads=args.vae_num_heads, overwrite=args.overwrite, info=info)
    except ConversionError as e:
        raise CLIError(one_line(e)) from None
    tf, vae = pipe.transformer, pipe.vae
    c = tf.config
    n_tf = sum(p.numel() for p in tf.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    names = "ImageNet class names" if pipe.id2label else "no class names"
    print(f"wrote {args.output}: transformer {format_millions(n_tf)} parameters ({info.get('weights', '?')} weights; "
          f"width {c.hidden_size}, {c.num_hidden_layers} layers), S-VAE {format_millions(n_vae)} parameters; "
          f"{c.image_size}x{c.image_size} images, {c.num_image_tokens} tokens of dim {c.latent_dim}, "
          f"{plural(c.num_classes, 'class', 'classes')} ({names})")
    return 0


def label_ids_from_config(model: str, labels: list[str]) -> list[int]:
    """Class ids for ``labels`` from the pipeline's configs alone (``model_index.json``'s ``id2label``, the
    transformer's ``num_classes``): an unknown name or an out-of-range id is refused before any weight loads."""
    from .configuration_sphere_ar import SphereARConfig
    from .labels import resolve_label_ids
    from .pipeline_sphere_ar import SphereARPipeline

    try:
        with quiet_libraries():
            index = SphereARPipeline.load_config(model)
            config = SphereARConfig.from_pretrained(model, subfolder="transformer")
    except (OSError, ValueError, TypeError, KeyError) as e:
        where = model if Path(model).exists() else f"{model} (no such local folder; tried the Hugging Face Hub)"
        raise CLIError(f"cannot load the pipeline from {where}: {one_line(e)}") from None
    id2label = index.get("id2label") or None
    return resolve_label_ids(labels, id2label, config.num_classes)


def _label_slug(pipe: SphereARPipeline, class_id: int) -> str:
    name = (pipe.id2label or {}).get(class_id)
    return slugify(name.split(",")[0]) if name else f"class-{class_id}"


def cmd_generate(args: argparse.Namespace) -> int:
    """``sphere-ar generate``: one image per class label, made in padded batches (:mod:`.batching`), as PNGs."""
    from PIL import Image

    from .batching import ROW_QUANTUM, padded_batches, padded_size
    from .labels import resolve_label_ids
    from .seeding import image_generators

    if args.output is not None:
        try:
            _image_format(args.output)  # fail before loading anything
        except CLIError as e:
            raise CLIError(f"--output {e}") from None
    guidance = guidance_option(args.guidance_scale)  # before anything loads (None: the model's)
    threads = set_threads(args.threads)
    device = device_from_name(args.device)
    model = resolve_model(args.model)
    pipe = load_pipeline(model, args.dtype) if is_checkpoint(model) else None  # (its class names are in its weights)
    try:
        ids = (resolve_label_ids(list(args.class_labels), pipe.id2label, pipe.num_classes) if pipe is not None else
               label_ids_from_config(model, list(args.class_labels)))  # for a folder: before the weights load
    except (ValueError, TypeError) as e:
        raise CLIError(f"--class-labels {one_line(e)}") from None
    pipe = pipe or load_pipeline(model, args.dtype)
    _check_output_size(pipe.vae.config.image_size, args.scale, len(ids))
    pipe.to(device)
    if args.compile:
        pipe.enable_torch_compile()
    guidance = guidance if guidance is not None else float(pipe.transformer.config.guidance_scale)
    (args.output_dir if args.output_dir is not None else args.output.parent).mkdir(parents=True, exist_ok=True)

    def describe(index: int, count: int) -> None:
        if count > 1:
            pipe.set_progress_bar_config(desc=f"batch {index + 1}/{count}, tokens")

    per_call = padded_size(min(args.batch_size, len(ids)))
    try:  # the padded call is what must fit: say so, before the first token
        pipe.check_memory(per_call, args.steps, guidance > 1.0, "pil", pipe.device)
    except ValueError as e:
        raise CLIError(f"--batch-size {args.batch_size}: each call makes {per_call} images (padded to a multiple of "
                       f"{ROW_QUANTUM}, so that an image does not depend on its batch-mates); {one_line(e)}") from None
    # one CPU generator per image, seeded from (seed, index), and each batch padded to a multiple of 8 images: on
    # the CPU an image has the same bits whatever --batch-size and the other labels; seeds S and S + 1 share no image
    batches = padded_batches(pipe, ids, image_generators(args.seed, len(ids)), args.batch_size, on_batch=describe,
                             guidance_scale=guidance, cfg_schedule=args.cfg_schedule, num_inference_steps=args.steps,
                             output_type="pil")
    images, written = [], []
    try:
        for start, batch_images in batches:
            for k, image in enumerate(batch_images, start):
                scale = args.scale or _default_scale(max(image.size))
                if scale > 1:
                    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
                images.append(image)
                if args.output_dir is not None:
                    name = f"{k:03d}_{_label_slug(pipe, ids[k])}.png"
                    written.append(save_image_atomically(image, args.output_dir / name))
    except (ValueError, TypeError) as e:  # a request the pipeline refuses (e.g. too large for the memory)
        raise CLIError(one_line(e)) from None
    except FloatingPointError as e:  # e.g. a float16 decoder overflow: a known, explained failure
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    grid_path = args.output if args.output is not None else args.output_dir / "grid.png"
    save_image_atomically(make_grid(images, args.grid_cols), grid_path)
    w, h = images[0].size
    where = f"{plural(len(written), 'image')} and the grid to {args.output_dir}" if written else \
        f"the grid to {grid_path}"
    print(f"wrote {where} ({plural(len(images), 'image')} of {w}x{h}, seed {args.seed}, images 0..{len(images) - 1},"
          f" guidance {guidance:g} {args.cfg_schedule}, {plural(args.steps, 'step')}, {device.type}, "
          f"{plural(threads, 'thread')})")
    return 0


# ---- parser ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="sphere-ar", description="SphereAR: class-conditional image generation with hyperspherical latents.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fmt = HelpFormatter
    add_convert_parser(sub, fmt)
    add_generate_parser(sub, fmt)
    add_sample_parser(sub, fmt)
    add_evaluate_parser(sub, fmt)
    add_sweep_parser(sub, fmt)

    add_push_parser(sub, formatter_class=fmt)
    add_space_parser(sub, fmt)
    return parser


def add_convert_parser(sub, fmt) -> None:
    conv = sub.add_parser(
        "convert", formatter_class=fmt, help="convert an official SphereAR checkpoint into a pipeline folder",
        description="Convert an official SphereAR checkpoint (e.g. SphereAR_B.pt) into a pipeline folder "
                    "(model_index.json, transformer/, vae/, scheduler/; safetensors weights) that "
                    "`sphere-ar generate --model` and SphereARPipeline.from_pretrained load. The checkpoint is read "
                    "weights-only: a pickle that would run code is refused. The folder is written atomically.")
    conv.add_argument("--checkpoint", required=True, metavar="PATH",
                      help="official AR checkpoint (.pt): {'ema', 'model', 'epochs', 'args'} or a bare state dict; "
                           "it normally includes the S-VAE ('vae.*') weights. A local file, or a file on the Hub "
                           "(downloaded into its cache): https://huggingface.co/guolinke/SphereAR/blob/main/"
                           "SphereAR_B.pt or guolinke/SphereAR/SphereAR_B.pt")
    conv.add_argument("--output", required=True, type=Path, metavar="DIR", help="pipeline folder to write")
    conv.add_argument("--vae-checkpoint", metavar="PATH", default=None,
                      help="official S-VAE checkpoint (vae.pt; a local file or a file on the Hub, as --checkpoint) "
                           "whose weights replace the checkpoint's 'vae.*' weights (default: those in --checkpoint)")
    conv.add_argument("--no-ema", action="store_true",
                      help="convert the raw 'model' weights instead of the EMA weights (by default 'ema' is used "
                           "when present, as the official sampler does)")
    conv.add_argument("--num-heads", type=positive_int, metavar="N", default=None,
                      help="attention heads of the AR transformer (default: the official preset's, i.e. width / 64)")
    conv.add_argument("--vae-num-heads", type=positive_int, metavar="N", default=None,
                      help="attention heads of the S-VAE's ViTs (default: inferred from its RoPE table, "
                           "else width / 64)")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace --output if it exists and is not empty: only an earlier pipeline folder that "
                           "holds nothing else and not the checkpoint (the old folder is removed only once the new "
                           "one is complete)")
    conv.set_defaults(func=cmd_convert)


def add_generate_parser(sub, fmt) -> None:
    gen = sub.add_parser(
        "generate", formatter_class=fmt,
        help="generate images of a model's classes (default: the embedded digits model)",
        description="Generate one image per class label and write PNGs. Image k (counting from 0 over all "
                    "labels) uses its own CPU random generator seeded from a hash of (--seed, k), so an image "
                    "depends only on its seed, k, class and the sampling settings (and the device and dtype), not "
                    "on --batch-size or the other labels (on the CPU not even in the last bit: each batch is padded "
                    "to a multiple of 8 images), and seeds S and S + 1 share no image.",
        epilog="example: sphere-ar generate --model ./SphereAR-B --class-labels 207 360 'golden retriever' "
               "--output-dir samples/")
    gen.add_argument("--model", default=None, metavar="DIR",
                     help=f"{MODEL_HELP} (default: the embedded digits model, classes 0-9)")
    gen.add_argument("--class-labels", required=True, nargs="+", metavar="LABEL",
                     help="class ids (0-999 for ImageNet) and/or class names, e.g. 207 360 'golden retriever' "
                          "(names are case-insensitive; any synonym of an ImageNet class works)")
    gen.add_argument("--guidance-scale", type=number_argument, metavar="F", default=None,
                     help="classifier-free guidance scale; <= 1 disables guidance (default: the model's "
                          "recommended value, e.g. 4.5 for SphereAR-B)")
    gen.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default="linear",
                     help="guidance over the tokens: 'linear' rises from 1 to --guidance-scale (official), "
                          "'constant' uses it for every token")
    gen.add_argument("--steps", type=steps_argument, metavar="N", default=100,
                     help="sampler steps per token, as in the official sampler (fewer are faster and rougher)")
    gen.add_argument("--seed", type=seed_argument, metavar="S", default=0,
                     help="random seed: image k (from 0) uses a CPU torch.Generator seeded from a hash of (S, k), "
                          "so seeds S and S + 1 share no image")
    gen.add_argument("--batch-size", type=positive_int, metavar="N", default=16,
                     help="images generated at once, padded to a multiple of 8 (memory vs. speed; the images do "
                          "not depend on it: on the CPU not even in the last bit)")
    gen.add_argument("--device", metavar="DEVICE", default=None,
                     help="torch device: cpu, cuda, cuda:1, mps, ... (default: cuda if available, else mps, else cpu)")
    gen.add_argument("--dtype", choices=DTYPES, default="float32",
                     help="weights and compute dtype (bfloat16 is faster on GPUs; float16 may overflow in the "
                          "decoder)")
    add_threads_argument(gen)
    add_compile_argument(gen)
    gen.add_argument("--scale", type=positive_int, metavar="N", default=None,
                     help="enlarge each image N times (nearest neighbour; 1 keeps the model's size; default: the "
                          "smallest factor that makes it at least 128 px, e.g. 8 for the 16 px digits, 1 at 256 px)")
    gen.add_argument("--grid-cols", type=positive_int, metavar="N", default=None,
                     help="columns of the grid image (default: about square, with full rows where that is "
                          "possible, e.g. 5 x 2 for 10 images)")
    out = gen.add_mutually_exclusive_group(required=True)
    out.add_argument("--output", type=Path, metavar="FILE", default=None,
                     help="write only a grid of all images to FILE (e.g. grid.png)")
    out.add_argument("--output-dir", type=Path, metavar="DIR", default=None,
                     help="write each image to DIR/{index:03d}_{label}.png (e.g. 000_golden-retriever.png) plus "
                          "DIR/grid.png")
    gen.set_defaults(func=cmd_generate)


# ---- space ----------------------------------------------------------------------------------------------------
def cmd_space(args: argparse.Namespace) -> int:
    """Write a Hugging Face Space folder (``sphere-ar space``); see :func:`.hub.build_space_folder`."""
    from .cli_push import flag_message
    from .hub import HubError, build_space_folder

    try:
        out = build_space_folder(args.output, model=args.model, title=args.title, license=args.license,
                                 license_name=args.license_name, license_link=args.license_link,
                                 overwrite=args.overwrite)
    except (HubError, OutputFolderError) as e:
        raise CLIError(flag_message(e)) from None
    tops = sorted(p.name + "/" * p.is_dir() for p in out.iterdir())
    serves = "model/ (a copy of the pipeline)" if (out / "model").is_dir() else (args.model or "")
    print(f"wrote {out} ({', '.join(tops)}): a Gradio Space that serves {serves}; upload it with "
          f"`hf upload OWNER/NAME {out} . --repo-type space`")
    return 0


def add_space_parser(sub, fmt) -> None:
    p = sub.add_parser(
        "space", formatter_class=fmt, help="write a Hugging Face Space folder that serves a model with the demo",
        description="Write a complete Hugging Face Space folder (sdk: gradio) that serves --model with the Gradio "
                    "demo: README.md (front matter: sdk_version = the installed gradio, python_version, models), "
                    "requirements.txt (the installed versions of torch, diffusers, transformers, gradio, ...), "
                    "app.py, and sphere_ar_hf/, a copy of this package's module files, so the Space runs without "
                    "sphere-ar-hf being installable. A pipeline folder is copied into model/; a Hub repository id "
                    "is downloaded when the Space starts. The folder is written atomically.",
        epilog="example: sphere-ar space --model you/SphereAR-B --output my-space && hf upload you/sphere-ar-demo "
               "my-space . --repo-type space")
    p.add_argument("--model", default=None, metavar="REPO_ID_OR_DIR",
                   help="pipeline folder (copied into the Space) or Hub repository id (default: the embedded "
                        "digits model)")
    p.add_argument("--output", required=True, type=Path, metavar="DIR", help="Space folder to write")
    p.add_argument("--title", default="SphereAR", help="the Space's title")
    p.add_argument("--license", metavar="LICENSE", default=None,
                   help="license of the Space's files as a Hub license id; needed with a pipeline folder of your "
                        "own (its weights' license, never guessed); else, by default, this package's: mit")
    p.add_argument("--license-name", metavar="NAME", default=None, help="name of the license, with --license other")
    p.add_argument("--license-link", metavar="URL", default=None, help="link to its text, with --license other")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it is not empty: only an earlier Space folder that holds nothing else")
    p.set_defaults(func=cmd_space)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sphere-ar`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (status 2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.func(args)
    except (CLIError, OSError) as e:
        if isinstance(e, OSError) and e.strerror:  # without the "[Errno N]" noise
            e = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

