"""The SphereAR Gradio demo: a class picker, the sampling settings, a per-token progress bar and a gallery.

``build_demo(pipeline)`` returns a ready-to-launch ``gr.Blocks`` (queue enabled); ``main()`` is the command line
(``python -m sphere_ar_hf.demo`` or the Space's ``app.py``)::

    python -m sphere_ar_hf.demo                       # the bundled digits model, offline, http://127.0.0.1:7860
    python -m sphere_ar_hf.demo --model sphere-ar-b   # any pipeline folder or Hub repository id

Every request is checked on the server, whatever the sliders allow (an API call can send any value): at most
``max_images`` images, ``1..max_steps`` sampler steps, a finite guidance scale in the slider's range, a known
schedule, a seed in ``[0, 2**64)``. The event skips Gradio's preprocessing, so the handler sees the raw values (no
rounding of a seed of 1.5, no generic error for a string): ``validate_request`` checks their types and bounds and
refuses a bad request with a one-line ``gr.Error`` naming the field, before any work. Image ``k`` of a request
with seed ``S`` has its own generator seeded from a hash of ``(S, k)`` (``sphere_ar_hf.seeding``, as the CLI), so
seeds ``S`` and ``S + 1`` share no image.
One request samples at a time (the queue's concurrency limit defaults to 1; the pipeline itself keeps no per-call
state, so a higher limit is safe), and the queue holds at most ``max_queue_size`` waiting requests. Progress comes
from the pipeline's per-token ``callback_on_step_end``.

On a Hugging Face Space with ZeroGPU hardware, the Space's ``app.py`` imports ``spaces`` first; the handler is
then wrapped by ``spaces.GPU``, which attaches a GPU for each request (:func:`on_zero_gpu`). Elsewhere ``spaces``
is not imported, or its ``GPU`` returns the handler unchanged.

Needs ``gradio`` (the ``[demo]`` extra); imported here, so import this module only for the demo.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from .batching import generate_padded
from .cli_common import MODEL_HELP, add_compile_argument, add_threads_argument, positive_int, set_threads
from .configuration_sphere_ar import check_guidance_scale
from .scheduling_sphere_ar import CFG_SCHEDULES, check_num_inference_steps
from .seeding import MAX_SEED, image_generators
from .utils import HelpFormatter

if TYPE_CHECKING:
    from PIL import Image

    from .pipeline_sphere_ar import SphereARPipeline

__all__ = ["DEMO_CSS", "MAX_SEED", "DemoRunner", "build_demo", "build_parser", "class_choices", "create_demo",
           "load_default_pipeline", "main", "on_zero_gpu", "validate_request",
           "zero_gpu_hardware"]

MAX_LABEL_CHARS = 200  # a class name longer than this is refused before the (fuzzy) name lookup
IMAGENET_DEFAULT_CLASSES = (207, 360, 388, 88)  # golden retriever, otter, giant panda, macaw
API_NAME = "generate"
GPU_DURATION_S = 60  # ZeroGPU's default: the most seconds one request holds a GPU
# Gradio lays a thumbnail's caption over the bottom of the image and cuts it to one line, and the gallery's label
# over the first image; here the caption goes below its square image, whole, and the grid starts below the label
# (passed to ``launch(css=...)`` by ``create_demo``)
DEMO_CSS = """
#gallery .grid-wrap { padding-top: 2.25rem; }
#gallery .thumbnail-lg { aspect-ratio: auto; height: auto; display: flex; flex-direction: column; }
#gallery .thumbnail-lg > img { aspect-ratio: 1 / 1; height: auto; flex: none; }
#gallery .thumbnail-lg .caption-label { position: static; max-width: none; white-space: normal;
  overflow-wrap: anywhere; border: none; border-radius: 0; text-align: center; }
"""


# ---- the pipeline side ----------------------------------------------------------------------------------------
def class_choices(pipeline: SphereARPipeline) -> list[tuple[str, str]]:
    """Dropdown choices ``(shown name, value)``: ``("207: golden retriever", "207")``, or ``("3", "3")`` when the
    name is the id itself. The value is the class id as a string, which ``pipeline.get_label_ids`` resolves
    unambiguously (ImageNet has two classes named "crane"); the shown name carries every synonym for the search."""
    id2label = pipeline.id2label or {}
    choices = []
    for class_id in range(pipeline.num_classes):
        label = " ".join(str(id2label.get(class_id, "")).split())
        name = str(class_id) if not label or label == str(class_id) else f"{class_id}: {label}"
        choices.append((name, str(class_id)))
    return choices


def short_label(pipeline: SphereARPipeline, class_id: int) -> str:
    """The first synonym of a class's name, or ``class N`` without names."""
    label = (pipeline.id2label or {}).get(class_id)
    return label.split(",")[0].strip() if label else f"class {class_id}"


def default_classes(pipeline: SphereARPipeline) -> list[str]:
    """A few ImageNet favourites for an ImageNet-1k model, else the first (up to) ten classes."""
    if pipeline.num_classes == 1000 and pipeline.id2label:
        return [str(i) for i in IMAGENET_DEFAULT_CLASSES]
    return [str(i) for i in range(min(pipeline.num_classes, 10))]


def upscale(image: Image.Image, min_size: int) -> Image.Image:
    """Nearest-neighbour upscaling by an integer factor to at least ``min_size`` pixels (pixels stay visible)."""
    from PIL import Image

    factor = math.ceil(min_size / max(1, min(image.size)))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _error(message: str) -> gr.Error:
    """A user error shown in the UI / returned to the API client, without a traceback in the server log."""
    return gr.Error(message, print_exception=False)


class DemoBlocks(gr.Blocks):
    """``gr.Blocks`` whose API answers a request with too few inputs in one line that names them: gradio's own check
    raises a multi-line ``ValueError``, which an API client receives as ``{"error": null}`` and the server logs with
    a traceback."""

    def validate_inputs(self, block_fn: Any, inputs: list[Any]) -> None:
        wanted = list(block_fn.inputs)
        if len(inputs) < len(wanted):
            names = ", ".join(getattr(c, "label", None) or type(c).__name__ for c in wanted)
            raise _error(f"the request holds {len(inputs)} of the {len(wanted)} inputs; send all of them, in this "
                         f"order: {names}")
        super().validate_inputs(block_fn, inputs)


def _shown(value: Any) -> str:
    """``repr(value)``, cut to 60 characters (an API call can send a long string or a huge integer)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's 4300-digit limit for str()
        return "an integer with more than 4300 digits"
    return text if len(text) <= 60 else text[:57] + "..."


def _as_integer(value: Any, name: str) -> int:
    """``value`` as an int: an integer, or an integral float (``3.0``, as JSON may send it). Refused, with a
    one-line ``gr.Error`` naming ``name``: a bool, a string (even ``"3"``), a fractional or non-finite float,
    ``None`` and anything else."""
    if isinstance(value, float) and value.is_integer():  # False for NaN and the infinities
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _error(f"{name} must be an integer, got {_shown(value)}")
    return int(value)


def _integer(value: Any, name: str, low: int, high: int, high_text: str | None = None) -> int:
    """:func:`_as_integer` in ``[low, high]``, else a one-line ``gr.Error`` naming ``name``."""
    value = _as_integer(value, name)
    if not low <= value <= high:
        raise _error(f"{name} must be between {low} and {high_text or high}, got {_shown(value)}")
    return value


def _guidance(value: Any, high: float) -> float:
    """The guidance scale, checked by its owner (:func:`.configuration_sphere_ar.check_guidance_scale`) and kept
    in the slider's range ``[1, high]``; refused in the slider's words."""
    try:
        guidance = check_guidance_scale(value)
    except TypeError:
        raise _error(f"guidance scale must be a number, got {_shown(value)}") from None
    except ValueError:
        guidance = math.nan
    if not 1.0 <= guidance <= high:
        raise _error(f"guidance scale must be a finite number between 1 and {high:g}, got {_shown(value)}")
    return guidance


def _steps(value: Any, high: int) -> int:
    """The steps per token: an integer (or an integral float) checked by its owner
    (:func:`.scheduling_sphere_ar.check_num_inference_steps`) and at most ``high``; refused in the slider's words."""
    steps = _as_integer(value, "steps")
    try:
        fits = check_num_inference_steps(steps) <= high
    except ValueError:
        fits = False
    if not fits:
        raise _error(f"steps must be between 1 and {high}, got {_shown(steps)}")
    return steps


def validate_request(pipeline: SphereARPipeline, classes: Any, images_per_class: Any, guidance_scale: Any,
                     cfg_schedule: Any, steps: Any, seed: Any, *, max_images: int, max_steps: int,
                     max_guidance: float) -> tuple[list[int], float, str, int, int]:
    """Check the raw values of a request (as an API call sends them, before any rounding or coercion).

    Returns ``(class ids, one per image; guidance, schedule, steps, seed)``; a bad field raises a one-line
    ``gr.Error`` that names it and says what was expected. Integers (images per class, steps, the seed in
    ``[0, 2**64)``) may come as integral floats (``3.0``) but never as fractional or non-finite floats, bools or
    strings; the guidance scale is a finite number in ``[1, max_guidance]``.
    """
    per_class = _integer(images_per_class, "images per class", 1, max_images)
    steps = _steps(steps, max_steps)
    seed = _integer(seed, "seed", 0, MAX_SEED, "2**64 - 1")
    guidance = _guidance(guidance_scale, max_guidance)
    if not isinstance(cfg_schedule, str) or cfg_schedule not in CFG_SCHEDULES:
        raise _error(f"CFG schedule must be one of {', '.join(CFG_SCHEDULES)}, got {_shown(cfg_schedule)}")
    ids = _class_ids(pipeline, classes, max_images)
    if len(ids) * per_class > max_images:
        raise _error(f"at most {max_images} images per request on this server, asked for {len(ids)} "
                     f"classes x {per_class} per class = {len(ids) * per_class}")
    labels = [class_id for class_id in ids for _ in range(per_class)]
    return labels, guidance, cfg_schedule, steps, seed


def _class_ids(pipeline: SphereARPipeline, classes: Any, max_images: int) -> list[int]:
    """The class ids of a request's classes (names, synonyms or ids; a single one or a list), or ``gr.Error``."""
    if classes is None or classes == "":
        classes = []
    if isinstance(classes, (str, int)) and not isinstance(classes, bool):
        classes = [classes]
    if not isinstance(classes, (list, tuple)):
        raise _error(f"classes must be a list of class names or ids, got {type(classes).__name__}")
    if not classes:
        raise _error("classes: pick at least one class")
    if len(classes) > max_images:
        raise _error(f"classes: at most {max_images} classes (and images) per request on this server, "
                     f"got {len(classes)} classes")
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (str, numbers.Integral)):
            raise _error(f"classes: each class must be a name or an integer id, got {_shown(c)}")
        if isinstance(c, str) and len(c) > MAX_LABEL_CHARS:
            raise _error(f"classes: class name too long ({len(c)} characters; at most {MAX_LABEL_CHARS})")
    try:
        return pipeline.get_label_ids(list(classes))
    except (ValueError, TypeError) as e:
        raise _error("classes: " + " ".join(str(e).split())) from None


class DemoRunner:
    """Validates a request against the server's bounds and runs the pipeline (one request at a time)."""

    def __init__(self, pipeline: SphereARPipeline, *, max_images: int = 16, max_steps: int = 200,
                 max_guidance: float | None = None, display_size: int = 256) -> None:
        for name, value in (("max_images", max_images), ("max_steps", max_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.pipeline = pipeline
        self.max_images = max_images
        self.max_steps = max_steps
        self.recommended_guidance = float(pipeline.transformer.config.guidance_scale)
        self.max_guidance = float(max_guidance) if max_guidance is not None else max(
            10.0, math.ceil(2 * self.recommended_guidance))
        self.display_size = display_size
        pipeline.set_progress_bar_config(disable=True)  # progress goes to the page (callback_on_step_end)

    def validate(self, classes: Any, images_per_class: Any, guidance_scale: Any, cfg_schedule: Any, steps: Any,
                 seed: Any) -> tuple[list[int], float, str, int, int]:
        """:func:`validate_request` with this server's bounds."""
        return validate_request(self.pipeline, classes, images_per_class, guidance_scale, cfg_schedule, steps, seed,
                                max_images=self.max_images, max_steps=self.max_steps, max_guidance=self.max_guidance)

    # -- the event handler ---------------------------------------------------------------------------------
    def generate(self, classes: Any, images_per_class: Any, guidance_scale: Any, cfg_schedule: Any, steps: Any,
                 seed: Any, progress: gr.Progress = gr.Progress()  # noqa: B008 (gradio's idiom)
                 ) -> tuple[list[tuple[Image.Image, str]], str]:
        """Generate ``images_per_class`` images of each class from the raw request values (checked first).

        Image k uses its own CPU generator seeded from a hash of ``(seed, k)`` (``image_generators``, as
        ``sphere-ar generate``), and the request is made in one call padded to a multiple of 8 images
        (:mod:`.batching`), so an image depends only on its seed, index, class and settings (on the CPU not even in
        the last bit on the rest of the request), and seeds S and S + 1 share no image.
        """
        labels, guidance, schedule, steps, seed = self.validate(classes, images_per_class, guidance_scale,
                                                                cfg_schedule, steps, seed)
        tokens = self.pipeline.transformer.config.num_image_tokens

        def report(pipe: SphereARPipeline, i: int, t: int, kwargs: dict) -> dict:
            progress((i + 1, tokens), desc="Sampling tokens", unit="tokens")
            return kwargs

        progress((0, tokens), desc="Sampling tokens", unit="tokens")
        start = time.perf_counter()
        try:  # one call, padded to a multiple of 8 images: an image does not depend on the rest of the request
            images = generate_padded(self.pipeline, labels, image_generators(seed, len(labels)), len(labels),
                                     guidance_scale=guidance, cfg_schedule=schedule, num_inference_steps=steps,
                                     output_type="pil", callback_on_step_end=report,
                                     callback_on_step_end_tensor_inputs=())
        except (FloatingPointError, ValueError, TypeError) as e:
            raise _error(" ".join(str(e).split())) from None
        seconds = time.perf_counter() - start
        gallery = [(upscale(image, self.display_size), f"{short_label(self.pipeline, c)} · seed {seed}, image {k}")
                   for k, (c, image) in enumerate(zip(labels, images))]
        w, h = images[0].size
        shown = f" (shown ×{gallery[0][0].width // w})" if gallery[0][0].width != w else ""
        count = f"{len(images)} image{'s' * (len(images) != 1)}"
        info = (f"{count} of {w}×{h} px{shown} · guidance {guidance:g} ({schedule}) · "
                f"{steps} step{'s' * (steps != 1)} · seed {seed} · {seconds:.1f} s")
        return gallery, info


def on_zero_gpu(handler: Any, duration: int = GPU_DURATION_S) -> Any:
    """``handler`` wrapped by ``spaces.GPU(duration=...)`` when the ``spaces`` package has been imported (a Space's
    ``app.py`` imports it before torch: on ZeroGPU hardware each call then gets a GPU for at most ``duration``
    seconds; elsewhere ``spaces.GPU`` returns the handler unchanged), else ``handler`` itself. Not imported here:
    on ZeroGPU, ``spaces`` must be imported before CUDA is initialised."""
    spaces = sys.modules.get("spaces")
    return handler if spaces is None else spaces.GPU(handler, duration=duration)


def zero_gpu_hardware() -> bool:
    """Whether this process runs on ZeroGPU hardware: ``spaces`` imported, in its ZeroGPU mode."""
    config = getattr(getattr(sys.modules.get("spaces"), "config", None), "Config", None)
    return getattr(config, "zero_gpu", False) is True


# ---- the UI -----------------------------------------------------------------------------------------------------
def _describe(pipeline: SphereARPipeline, model_name: str | None) -> str:
    c = pipeline.transformer.config
    names = "class names" if pipeline.id2label else "class ids only"
    return (f"**Model:** `{model_name or 'custom pipeline'}` · {c.num_classes} classes ({names}) · "
            f"{c.image_size}×{c.image_size} px · {c.num_image_tokens} tokens of dimension {c.latent_dim} · "
            f"recommended guidance {c.guidance_scale:g}")


def build_demo(pipeline: SphereARPipeline, *, model_name: str | None = None, max_images: int = 16,
               max_steps: int = 200, default_steps: int | None = None, default_images_per_class: int = 1,
               default_class_labels: Sequence[int | str] | None = None, max_guidance: float | None = None,
               concurrency_limit: int = 1, max_queue_size: int = 16, display_size: int = 256,
               analytics_enabled: bool = False, gpu_duration: int = GPU_DURATION_S) -> gr.Blocks:
    """The demo for ``pipeline``, with the queue enabled; call ``.launch(css=DEMO_CSS)`` on it (the gallery's
    captions below their images).

    Args:
        pipeline: a loaded ``SphereARPipeline`` (already on its device).
        model_name: shown in the header (e.g. the folder or Hub id).
        max_images: most images one request may ask for (classes x images per class); enforced on the server.
        max_steps: most sampler steps per token one request may ask for; enforced on the server.
        default_steps: the steps slider's start value (default: the scheduler's ``num_inference_steps``).
        default_images_per_class: the images-per-class slider's start value.
        default_class_labels: classes selected at start (ids or names; default: four ImageNet classes for an
            ImageNet-1k model, else the first ten classes); ``[]`` selects none.
        max_guidance: the guidance slider's (and the server's) upper bound (default: max(10, 2 x recommended)).
        concurrency_limit: requests processed at once (the pipeline itself runs one at a time).
        max_queue_size: requests that may wait; more are turned away.
        display_size: images smaller than this are upscaled (nearest neighbour, integer factor) for display.
        analytics_enabled: Gradio's usage telemetry (off by default: the demo never phones home).
        gpu_duration: on ZeroGPU, the most seconds one request may hold a GPU (:func:`on_zero_gpu`).
    """
    runner = DemoRunner(pipeline, max_images=max_images, max_steps=max_steps, max_guidance=max_guidance,
                        display_size=display_size)
    choices = class_choices(pipeline)
    if default_class_labels is None:
        selected = default_classes(pipeline)
    else:
        selected = [str(i) for i in pipeline.get_label_ids(list(default_class_labels))] if default_class_labels else []
    selected = selected[:max_images]
    steps = default_steps if default_steps is not None else int(pipeline.scheduler.config.num_inference_steps)
    steps = max(1, min(int(steps), max_steps))
    per_class = max(1, min(int(default_images_per_class), max_images // max(1, len(selected))))

    with DemoBlocks(title="SphereAR", analytics_enabled=analytics_enabled, delete_cache=(1800, 3600)) as demo:
        gr.Markdown("# SphereAR: class-conditional image generation with hyperspherical latents\n"
                    "Autoregressive generation of continuous tokens that live on a sphere "
                    "([Ke & Xue, ICLR 2026](https://arxiv.org/abs/2509.24335)).\n\n" + _describe(pipeline, model_name))
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                classes = gr.Dropdown(
                    choices, value=selected, multiselect=True, allow_custom_value=True, filterable=True,
                    label="Classes", elem_id="classes",
                    info="Type to search; any class name, synonym or id works. Each class gets its own images.")
                images_per_class = gr.Slider(1, max_images, value=per_class, step=1, label="Images per class",
                                             info=f"at most {max_images} images per request", elem_id="per-class")
                guidance = gr.Slider(1.0, runner.max_guidance, value=runner.recommended_guidance, step=0.1,
                                     label="Guidance scale", elem_id="guidance",
                                     info=f"classifier-free guidance; 1 disables it (recommended: "
                                          f"{runner.recommended_guidance:g})")
                schedule = gr.Radio(list(CFG_SCHEDULES), value="linear", label="CFG schedule", elem_id="schedule",
                                    info="linear: guidance rises from 1 over the tokens (official); constant: "
                                         "the same for every token")
                steps_slider = gr.Slider(1, max_steps, value=steps, step=1, label="Steps per token",
                                         elem_id="steps", info="sampler steps for each token (official: 100)")
                seed = gr.Number(0, precision=None, minimum=0, maximum=MAX_SEED, step=1, label="Seed",
                                 elem_id="seed", info="an integer in [0, 2**64); image k's noise comes from "
                                                      "(seed, k), so a new seed gives all new images")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3, min_width=320):
                columns = 5 if pipeline.transformer.config.image_size < 64 else 4
                gallery = gr.Gallery(label="Samples", columns=columns, format="png", object_fit="contain",
                                     elem_id="gallery", interactive=False)
                info = gr.Markdown(label="Details", elem_id="info")
        # preprocess=False: the handler gets the raw values, so validate_request sees a seed of 1.5 or a string
        # steps (Gradio's preprocessing would round the one and fail with a generic error on the other)
        button.click(on_zero_gpu(runner.generate, gpu_duration),
                     inputs=[classes, images_per_class, guidance, schedule, steps_slider, seed],
                     outputs=[gallery, info], api_name=API_NAME, concurrency_limit=concurrency_limit,
                     preprocess=False)
    demo.queue(max_size=max_queue_size, default_concurrency_limit=concurrency_limit)
    demo.runner = runner  # for tests and callers that want the validated handler
    return demo


# ---- the command line ---------------------------------------------------------------------------------------------
def load_default_pipeline(dtype: str = "float32") -> SphereARPipeline:
    """The bundled digits model (package data: works offline)."""
    from .cli_common import load_pipeline
    from .pretrained import bundled_model_path

    return load_pipeline(str(bundled_model_path("digits")), dtype)


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sphere-ar-demo", formatter_class=HelpFormatter,
        description="The SphereAR Gradio demo: pick classes, set guidance / schedule / steps / seed, generate.")
    parser.add_argument("--model", default=None, metavar="DIR_OR_REPO",
                        help=f"{MODEL_HELP} (default: the bundled digits model, which needs no network)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                        help="address to bind; 0.0.0.0 exposes the demo to the network (default: $GRADIO_SERVER_NAME, "
                             "which Spaces set to 0.0.0.0, else 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=int(os.environ.get("GRADIO_SERVER_PORT") or 7860),
                        help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda if available, else mps, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="weights and compute dtype")
    parser.add_argument("--max-images", type=positive_int, default=16, help="most images per request")
    parser.add_argument("--max-steps", type=positive_int, default=200, help="most sampler steps per token")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="the steps slider's start value (default: the scheduler's num_inference_steps)")
    add_compile_argument(parser)
    parser.add_argument("--concurrency-limit", type=positive_int, default=1, help="requests processed at once")
    parser.add_argument("--queue-size", type=positive_int, default=16, help="requests that may wait in the queue")
    parser.add_argument("--gpu-duration", type=positive_int, metavar="SECONDS",
                        default=os.environ.get("SPHERE_AR_GPU_DURATION") or str(GPU_DURATION_S),
                        help="on a ZeroGPU Space: the most seconds one request may hold a GPU (default: "
                             f"$SPHERE_AR_GPU_DURATION, a Space variable, or {GPU_DURATION_S})")
    add_threads_argument(parser)
    return parser


def create_demo(argv: Sequence[str] | None = None) -> tuple[gr.Blocks, dict[str, Any]]:
    """Parse ``argv``, load the model and build the demo; returns ``(demo, launch keyword arguments)``.

    Raises ``CLIError`` (from ``sphere_ar_hf.cli_common``) for a model that cannot be loaded.
    """
    from .cli_common import CLIError, device_from_name, load_pipeline, resolve_model

    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    if args.compile and zero_gpu_hardware():  # ZeroGPU's documentation: torch.compile is not supported there
        raise CLIError("--compile: ZeroGPU hardware does not support torch.compile (huggingface.co/docs/hub/"
                       "spaces-zerogpu#compilation); serve without --compile")
    if args.model is None:
        pipeline, name = load_default_pipeline(args.dtype), "digits (bundled)"
    else:
        model = resolve_model(args.model)
        # a local folder is shown by its name only: a public demo need not reveal the server's paths
        name = Path(model).resolve().name if Path(model).exists() else model
        pipeline = load_pipeline(model, args.dtype)
    try:
        pipeline.to(device_from_name(args.device))  # made current: its CUDA graphs captured on its own GPU
    except (RuntimeError, ValueError, AssertionError) as e:
        raise CLIError(f"--device {args.device}: {' '.join(str(e).split())}") from None
    pipeline.set_progress_bar_config(disable=True)
    if args.compile:
        pipeline.enable_torch_compile()
    demo = build_demo(pipeline, model_name=name, max_images=args.max_images, max_steps=args.max_steps,
                      default_steps=args.steps, concurrency_limit=args.concurrency_limit,
                      max_queue_size=args.queue_size, gpu_duration=args.gpu_duration)
    return demo, {"server_name": args.host, "server_port": args.port, "ssr_mode": False, "css": DEMO_CSS}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo until interrupted; returns the exit status (2 with a one-line ``error:`` for bad input)."""
    from .cli_common import CLIError

    try:
        demo, launch_kwargs = create_demo(argv)
    except (CLIError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    demo.launch(**launch_kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
