"""The ``sphere-ar`` command line: ``sphere-ar convert`` (official checkpoint -> pipeline folder) and
``sphere-ar generate`` (class labels -> PNG images).

Errors in the inputs (a bad checkpoint, an unknown class name, a missing model folder, ...) print one line
``error: <message>`` on stderr and exit with status 2; nothing is left half-written (files and folders are written
under a temporary name and renamed into place).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .options import CFG_SCHEDULES, DEFAULT_THREADS, DTYPES, FEATURE_SPACES, LABEL_MODES, MAX_SEED, SAMPLERS
from .utils import HelpFormatter, atomic_write, format_millions, plural

if TYPE_CHECKING:
    from PIL import Image

    from .pipeline_sphere_ar import SphereARPipeline

__all__ = ["CLIError", "DEFAULT_MODEL", "add_threads_argument", "build_parser", "grid_columns", "label_ids_from_config",
           "main", "make_grid", "positive_int", "save_image_atomically", "set_threads", "slugify", "threads_argument"]

# The model `generate` uses without --model. None: --model is required. A later release points this at the
# bundled default model (see resolve_model).
# the embedded digits model (package data): `sphere-ar generate` works offline with no --model
DEFAULT_MODEL: str | None = str(Path(__file__).parent / "pretrained" / "digits")


class CLIError(Exception):
    """A user error: printed as ``error: <message>``, exit status 2."""


# ---- small helpers --------------------------------------------------------------------------------------------
def _one_line(message: object) -> str:
    return " ".join(str(message).split()) or "unknown error"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"the seed must be in [0, 2**64), got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


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


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Hide the libraries' loading / saving bars and warnings (the pipeline's token bar stays)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    state = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (dlog, tlog)]
    for m, _, _ in state:
        m.set_verbosity_error()
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, verbosity, bar in state:
            m.set_verbosity(verbosity)
            (m.enable_progress_bar if bar else m.disable_progress_bar)()


# ---- convert --------------------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import ConversionError, convert_official_checkpoint

    info: dict = {}
    try:
        with _quiet_libraries():
            pipe = convert_official_checkpoint(args.checkpoint, args.output, vae_checkpoint=args.vae_checkpoint,
                                               use_ema=not args.no_ema, num_heads=args.num_heads,
                                               vae_num_heads=args.vae_num_heads, overwrite=args.overwrite, info=info)
    except ConversionError as e:
        raise CLIError(_one_line(e)) from None
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


# ---- generate -------------------------------------------------------------------------------------------------
def resolve_model(model: str | None) -> str:
    """The pipeline folder (or Hub id) to load: ``--model``, else :data:`DEFAULT_MODEL`."""
    model = model or DEFAULT_MODEL
    if not model:
        raise CLIError("no model given: pass --model DIR (a folder written by `sphere-ar convert`)")
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"{model}: not a folder (--model takes a pipeline folder written by `sphere-ar convert`)")
        if not (path / "model_index.json").is_file():
            raise CLIError(f"{model}: no model_index.json, so not a pipeline folder (write one with `sphere-ar "
                           "convert`)")
        return str(path)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) and not model.startswith("."):
        return model  # a Hugging Face Hub repository id
    raise CLIError(f"{model}: no such folder")


def _device(name: str | None):
    import torch

    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--device {name!r}: {_one_line(e)}") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise CLIError(f"--device {name}: expected cpu, cuda, cuda:N, mps or xpu (a device that computes)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CLIError(f"--device {name}: MPS is not available on this machine")
    if device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise CLIError(f"--device {name}: XPU is not available on this machine")
    return device


def load_pipeline(model: str, dtype: str = "float32") -> SphereARPipeline:
    """``SphereARPipeline.from_pretrained`` with quiet loading; load failures become :class:`CLIError`."""
    import torch
    from diffusers.pipelines import pipeline_utils

    from .pipeline_sphere_ar import SphereARPipeline

    torch_dtype = getattr(torch, dtype)
    # newer diffusers call it `dtype` (and deprecate `torch_dtype`); older ones only know `torch_dtype`
    kwargs = {"dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype": torch_dtype}
    try:
        with _quiet_libraries():
            pipe = SphereARPipeline.from_pretrained(model, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        where = model if Path(model).exists() else f"{model} (no such local folder; tried the Hugging Face Hub)"
        raise CLIError(f"cannot load the pipeline from {where}: {_one_line(e)}") from None
    if not isinstance(pipe, SphereARPipeline):
        raise CLIError(f"{model} holds a {type(pipe).__name__}, not a SphereARPipeline")
    return pipe


def label_ids_from_config(model: str, labels: list[str]) -> list[int]:
    """Class ids for ``labels`` from the pipeline's configs alone (``model_index.json``'s ``id2label``, the
    transformer's ``num_classes``): an unknown name or an out-of-range id is refused before any weight loads."""
    from .configuration_sphere_ar import SphereARConfig
    from .labels import resolve_label_ids
    from .pipeline_sphere_ar import SphereARPipeline

    try:
        with _quiet_libraries():
            index = SphereARPipeline.load_config(model)
            config = SphereARConfig.from_pretrained(model, subfolder="transformer")
    except (OSError, ValueError, TypeError, KeyError) as e:
        where = model if Path(model).exists() else f"{model} (no such local folder; tried the Hugging Face Hub)"
        raise CLIError(f"cannot load the pipeline from {where}: {_one_line(e)}") from None
    id2label = index.get("id2label") or None
    return resolve_label_ids(labels, id2label, config.num_classes)


def set_threads(threads: int | str) -> int:
    """``torch.set_num_threads`` for ``--threads`` (a count, or ``"auto"``: :func:`.utils.auto_threads`); returns
    the count."""
    import torch

    from .utils import auto_threads

    count = auto_threads() if threads == "auto" else int(threads)
    torch.set_num_threads(count)
    return count


def threads_argument(text: str) -> int | str:
    """``--threads``: ``auto`` or a positive integer."""
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


def _label_slug(pipe: SphereARPipeline, class_id: int) -> str:
    name = (pipe.id2label or {}).get(class_id)
    return slugify(name.split(",")[0]) if name else f"class-{class_id}"


def cmd_generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from .seeding import image_generators

    if args.output is not None:
        _image_format(args.output)  # fail before loading anything
    threads = set_threads(args.threads)
    device = _device(args.device)
    model = resolve_model(args.model)
    try:
        ids = label_ids_from_config(model, list(args.class_labels))  # before the weights load
    except (ValueError, TypeError) as e:
        raise CLIError(f"--class-labels {_one_line(e)}") from None
    pipe = load_pipeline(model, args.dtype)
    pipe.to(device)
    guidance = args.guidance_scale if args.guidance_scale is not None else float(pipe.transformer.config.guidance_scale)
    (args.output_dir if args.output_dir is not None else args.output.parent).mkdir(parents=True, exist_ok=True)

    images, written = [], []
    n_batches = math.ceil(len(ids) / args.batch_size)
    for b in range(n_batches):
        start = b * args.batch_size
        batch = ids[start:start + args.batch_size]
        # one CPU generator per image, seeded from (seed, index): an image depends only on its seed, index, class
        # and settings, not on --batch-size, and seeds S and S + 1 share no image
        generators = image_generators(args.seed, range(start, start + len(batch)))
        if n_batches > 1:
            pipe.set_progress_bar_config(desc=f"batch {b + 1}/{n_batches}, tokens")
        try:
            out = pipe(batch, guidance_scale=guidance, cfg_schedule=args.cfg_schedule,
                       num_inference_steps=args.steps, generator=generators, output_type="pil")
        except (ValueError, TypeError) as e:  # a request the pipeline refuses (e.g. too large for the memory)
            raise CLIError(_one_line(e)) from None
        except FloatingPointError as e:  # e.g. a float16 decoder overflow: a known, explained failure
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 1
        for i, (class_id, image) in enumerate(zip(batch, out.images)):
            scale = args.scale or _default_scale(max(image.size))
            if scale > 1:
                image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
            images.append(image)
            if args.output_dir is not None:
                name = f"{start + i:03d}_{_label_slug(pipe, class_id)}.png"
                written.append(save_image_atomically(image, args.output_dir / name))
    grid_path = args.output if args.output is not None else args.output_dir / "grid.png"
    save_image_atomically(make_grid(images, args.grid_cols), grid_path)
    w, h = images[0].size
    where = f"{plural(len(written), 'image')} and the grid to {args.output_dir}" if written else \
        f"the grid to {grid_path}"
    print(f"wrote {where} ({plural(len(images), 'image')} of {w}x{h}, seed {args.seed}, images 0..{len(images) - 1},"
          f" guidance {guidance:g} {args.cfg_schedule}, {plural(args.steps, 'step')}, {device.type}, "
          f"{plural(threads, 'thread')})")
    return 0


# ---- sample ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _process_group() -> Iterator[tuple[int, int, int, Callable[[], None]]]:
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


def cmd_sample(args: argparse.Namespace) -> int:
    from .evaluation.sampling import SamplingSettings, run_sampling
    from .scheduling_sphere_ar import SphereARScheduler

    threads = set_threads(args.threads)
    with _process_group() as (rank, world, local_rank, barrier):
        device = _device(args.device)
        if device.type == "cuda" and device.index is None and world > 1:
            import torch

            device = torch.device("cuda", local_rank)
        model = resolve_model(args.model)
        pipe = load_pipeline(model, args.dtype)
        scheduler_config = pipe.scheduler.config
        overrides = {k: v for k, v in (("sampler", args.sampler), ("time_shift", args.time_shift))
                     if v is not None and v != scheduler_config[k]}
        if overrides:
            try:
                pipe.scheduler = SphereARScheduler.from_config(scheduler_config, **overrides)
            except ValueError as e:
                raise CLIError(_one_line(e)) from None
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        tf = pipe.transformer.config
        guidance = args.guidance_scale if args.guidance_scale is not None else float(tf.guidance_scale)
        # a local folder by its absolute path: resuming from another working directory is the same run
        model_id = str(Path(model).resolve()) if Path(model).exists() else model
        settings = SamplingSettings(
            model=model_id, num_images=args.num_images, seed=args.seed, labels=args.labels, guidance_scale=guidance,
            cfg_schedule=args.cfg_schedule, sampler=pipe.scheduler.config.sampler,
            time_shift=float(pipe.scheduler.config.time_shift), num_inference_steps=args.steps,
            dtype=args.dtype, shard_size=args.shard_size, num_classes=tf.num_classes,
            image_size=pipe.vae.config.image_size)
        try:
            final = run_sampling(pipe, args.output_dir, settings, batch_size=args.batch_size, resume=args.resume,
                                 png=args.png, rank=rank, world_size=world, barrier=barrier)
        except ValueError as e:
            raise CLIError(_one_line(e)) from None
    if rank == 0:
        print(f"wrote {final}: {plural(args.num_images, 'image')}, {plural(world, 'process', 'processes')} of "
              f"{plural(threads, 'thread')}, "
              f"{settings.sampler} {plural(args.steps, 'step')}, guidance {guidance:g} {args.cfg_schedule}, "
              f"labels {args.labels}, seed {args.seed}")
    return 0


# ---- evaluate -------------------------------------------------------------------------------------------------
METRIC_NAMES = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "frechet_distance":
                "Fréchet distance (digits features)", "accuracy": "Accuracy (digits classifier)",
                "precision": "Precision", "recall": "Recall"}


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from .evaluation import evaluate

    device = _device(args.device)
    try:
        result = evaluate(args.gen, args.ref, features=args.features, inception_weights=args.inception_weights,
                          device=device, batch_size=args.batch_size, k=args.k, split_size=args.split_size,
                          with_precision_recall=not args.no_precision_recall, progress=not args.json)
    except (ValueError, ImportError) as e:
        raise CLIError(_one_line(e)) from None
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


# ---- parser ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="sphere-ar", description="SphereAR: class-conditional image generation with hyperspherical latents.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fmt = HelpFormatter
    conv = sub.add_parser(
        "convert", formatter_class=fmt, help="convert an official SphereAR checkpoint into a pipeline folder",
        description="Convert an official SphereAR checkpoint (e.g. SphereAR_B.pt) into a pipeline folder "
                    "(model_index.json, transformer/, vae/, scheduler/; safetensors weights) that "
                    "`sphere-ar generate --model` and SphereARPipeline.from_pretrained load. The checkpoint is read "
                    "weights-only: a pickle that would run code is refused. The folder is written atomically.")
    conv.add_argument("--checkpoint", required=True, type=Path, metavar="PATH",
                      help="official AR checkpoint (.pt): {'ema', 'model', 'epochs', 'args'} or a bare state dict; "
                           "it normally includes the S-VAE ('vae.*') weights")
    conv.add_argument("--output", required=True, type=Path, metavar="DIR", help="pipeline folder to write")
    conv.add_argument("--vae-checkpoint", type=Path, metavar="PATH", default=None,
                      help="official S-VAE checkpoint (vae.pt) whose weights replace the checkpoint's 'vae.*' "
                           "weights (default: those in --checkpoint)")
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

    gen = sub.add_parser(
        "generate", formatter_class=fmt,
        help="generate images of a model's classes (default: the embedded digits model)",
        description="Generate one image per class label and write PNGs. Image k (counting from 0 over all "
                    "labels) uses its own CPU random generator seeded from a hash of (--seed, k), so an image "
                    "depends only on its seed, k, class and the sampling settings (and the device and dtype), not "
                    "on --batch-size or the other labels (up to float rounding: at most 1/255 in a few pixels), and "
                    "seeds S and S + 1 share no image.",
        epilog="example: sphere-ar generate --model ./SphereAR-B --class-labels 207 360 'golden retriever' "
               "--output-dir samples/")
    gen.add_argument("--model", default=None, metavar="DIR",
                     help="pipeline folder written by `sphere-ar convert` or a Hub repository id (default: the "
                          "embedded digits model, classes 0-9)")
    gen.add_argument("--class-labels", required=True, nargs="+", metavar="LABEL",
                     help="class ids (0-999 for ImageNet) and/or class names, e.g. 207 360 'golden retriever' "
                          "(names are case-insensitive; any synonym of an ImageNet class works)")
    gen.add_argument("--guidance-scale", type=_finite_float, metavar="F", default=None,
                     help="classifier-free guidance scale; <= 1 disables guidance (default: the model's "
                          "recommended value, e.g. 4.5 for SphereAR-B)")
    gen.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default="linear",
                     help="guidance over the tokens: 'linear' rises from 1 to --guidance-scale (official), "
                          "'constant' uses it for every token")
    gen.add_argument("--steps", type=positive_int, metavar="N", default=100,
                     help="sampler steps per token, as in the official sampler (fewer are faster and rougher)")
    gen.add_argument("--seed", type=_seed, metavar="S", default=0,
                     help="random seed: image k (from 0) uses a CPU torch.Generator seeded from a hash of (S, k), "
                          "so seeds S and S + 1 share no image")
    gen.add_argument("--batch-size", type=positive_int, metavar="N", default=16,
                     help="images generated at once (memory vs. speed; the images do not depend on it, up to "
                          "float rounding)")
    gen.add_argument("--device", metavar="DEVICE", default=None,
                     help="torch device: cpu, cuda, cuda:1, mps, ... (default: cuda if available, else mps, else cpu)")
    gen.add_argument("--dtype", choices=DTYPES, default="float32",
                     help="weights and compute dtype (bfloat16 is faster on GPUs; float16 may overflow in the "
                          "decoder)")
    add_threads_argument(gen)
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

    add_sample_parser(sub, fmt)
    add_evaluate_parser(sub, fmt)

    from .hub import add_push_parser

    add_push_parser(sub, formatter_class=fmt)
    add_space_parser(sub, fmt)
    return parser


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
               "--num-images 50000 --output-dir samples/b --batch-size 256 --dtype bfloat16")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="pipeline folder or Hub repository id (default: the embedded digits model)")
    p.add_argument("--num-images", required=True, type=positive_int, metavar="N", help="images to sample")
    p.add_argument("--output-dir", required=True, type=Path, metavar="DIR",
                   help="folder for sampling.json, shards/ and samples.npz (and images/ with --png)")
    p.add_argument("--labels", choices=LABEL_MODES, default="uniform",
                   help="'uniform': random classes from a hash of (seed, n), as the official sampler draws them; "
                        "'balanced': image n shows class n %% num_classes")
    p.add_argument("--batch-size", type=positive_int, metavar="B", default=32,
                   help="images per forward pass and process (the images do not depend on it)")
    p.add_argument("--seed", type=_seed, metavar="S", default=0, help="random seed of the run")
    p.add_argument("--guidance-scale", type=_finite_float, metavar="F", default=None,
                   help="classifier-free guidance scale; <= 1 disables it (default: the model's recommended value)")
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default="linear",
                   help="guidance over the tokens: 'linear' (official) or 'constant'")
    p.add_argument("--steps", type=positive_int, metavar="K", default=100,
                   help="sampler steps per token (euler_maruyama: K + 1 head evaluations; heun: 2K - 1)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="per-token sampler (default: the model's scheduler, euler_maruyama for official weights)")
    p.add_argument("--time-shift", type=_finite_float, metavar="S", default=None,
                   help="warp of the time grid, t -> t / (t + S (1 - t)): S < 1 puts smaller steps near the data "
                        "end (heun: 0.5 measured best on the digits model); default: the model's scheduler (1.0)")
    p.add_argument("--shard-size", type=positive_int, metavar="N", default=1000,
                   help="images per shard: the unit of work of a rank and what a crash can lose")
    p.add_argument("--png", action="store_true", help="also write each image to DIR/images/{n:06d}.png")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir (its settings must match), skipping finished shards")
    p.add_argument("--device", metavar="DEVICE", default=None,
                   help="torch device (default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and compute dtype")
    add_threads_argument(p)
    p.set_defaults(func=cmd_sample)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads (``generate``, ``sample`` and the demo)."""
    parser.add_argument("--threads", type=threads_argument, metavar="N", default=DEFAULT_THREADS,
                        help="CPU threads of torch's operations (torch.set_num_threads; the images do not depend on "
                             "it). 'auto' (default): the cores not busy with other processes (1-minute load "
                             "average), shared by the processes of a torchrun launch (measured on 2 cores: beside a "
                             "busy process 2 threads sample 2-3x slower than 1; on a quiet machine 1.2-1.7x faster "
                             "from batch 32 on)")


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
    p.add_argument("--features", choices=FEATURE_SPACES, default="inception",
                   help="feature space: 'inception' (FID etc.) or 'digits' (the embedded digits model's yardstick)")
    p.add_argument("--inception-weights", type=Path, metavar="PATH", default=None,
                   help="local copy of torch-fidelity's InceptionV3 weights (weights-inception-2015-12-05-6726825d"
                        ".pth; default: download once into the torch hub cache)")
    p.add_argument("--batch-size", type=positive_int, metavar="N", default=64, help="images per forward pass")
    p.add_argument("--device", metavar="DEVICE", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--k", type=positive_int, metavar="K", default=3,
                   help="nearest neighbours for precision / recall (ADM: 3)")
    p.add_argument("--split-size", type=positive_int, metavar="N", default=5000,
                   help="Inception Score: images per split (ADM: 5000)")
    p.add_argument("--no-precision-recall", action="store_true",
                   help="skip precision / recall (they need the images of both sets and N^2 distances)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=cmd_evaluate)


# ---- space ----------------------------------------------------------------------------------------------------
def cmd_space(args: argparse.Namespace) -> int:
    """Write a Hugging Face Space folder (``sphere-ar space``); see :func:`.hub.build_space_folder`."""
    from .hub import HubError, build_space_folder

    try:
        out = build_space_folder(args.output, model=args.model, title=args.title, license=args.license,
                                 license_name=args.license_name, license_link=args.license_link,
                                 overwrite=args.overwrite)
    except HubError as e:
        raise CLIError(_one_line(e)) from None
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
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
