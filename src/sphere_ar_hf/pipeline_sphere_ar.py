"""SphereARPipeline: class-conditional image generation with SphereAR (diffusers ``DiffusionPipeline``)."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from packaging.version import Version

from .configuration_sphere_ar import check_guidance_scale
from .fast_sampling import FastTokenSampler, compiled_forward
from .labels import build_label_index, resolve_label_ids
from .loading import pipeline_dtype, require_safetensors
from .modeling_sphere_ar import SphereARTransformer
from .options import CFG_SCHEDULES
from .scheduling_sphere_ar import SphereARScheduler, apply_guidance, check_num_inference_steps, guidance_at
from .vae import SphereVAE

__all__ = ["SphereARPipeline"]

LabelInput = int | str | Sequence[int | str] | np.ndarray | torch.Tensor
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
logger = logging.getLogger(__name__)
# the dtype keyword of DiffusionPipeline.from_pretrained: `dtype` from diffusers 0.40 on, `torch_dtype` before
DIFFUSERS_DTYPE_KWARG = "dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype"


def _class_names(id2label: object) -> dict[int, str]:
    """``id2label`` as ``{class id: name}``; anything but a mapping of integer ids to strings is a ``ValueError``."""
    if id2label is None:
        return {}
    expected = 'a mapping of class ids to names, e.g. {"0": "tench, Tinca tinca"}'
    if not isinstance(id2label, dict):
        raise ValueError(f"id2label (model_index.json) must be {expected}, got {type(id2label).__name__}")
    names = {}
    for key, name in id2label.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)) or not str(key).strip().isdigit():
            raise ValueError(f"id2label (model_index.json) must be {expected}: key {key!r} is not a class id")
        if not isinstance(name, str):
            raise ValueError(f"id2label (model_index.json) must be {expected}: class {key} is named "
                             f"{name!r}, not a string")
        names[int(key)] = name
    return names


def _free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: CUDA's free memory plus what torch holds unused; on the CPU the
    system's available memory (Linux); ``None`` where it is not known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                fields = dict(line.split(":", 1) for line in f)
            return int(fields["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None
    return None


def _check_source(source: object) -> None:
    """Refuse what is neither a folder nor a possible Hub repository id (``owner/name``), in one line, before
    diffusers would blame its characters (``HFValidationError``) or go to the network."""
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"pretrained_model_name_or_path must be a folder or a Hub repository id (a str or path), "
                        f"got {type(source).__name__}")
    path = os.fspath(source)
    if os.path.isdir(path):
        official = sorted(p.name for p in Path(path).glob("*.pt"))
        if official and not os.path.exists(os.path.join(path, "model_index.json")):
            raise ValueError(f"pretrained_model_name_or_path: {path} holds checkpoints ({', '.join(official)}), not "
                             f"a pipeline folder: load one with SphereARPipeline.from_single_file"
                             f"({os.path.join(path, official[0])!r}), or convert it with `sphere-ar convert`")
        return
    if os.path.exists(path):
        hint = " (an official checkpoint loads with SphereARPipeline.from_single_file)" if path.endswith(
            (".pt", ".pth", ".bin", ".ckpt")) else ""
        raise ValueError(f"pretrained_model_name_or_path: {path} is a file; expected a pipeline folder (with "
                         f"model_index.json) or a Hub repository id{hint}")
    if not path or os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or "\\" in path:
        raise ValueError(f"pretrained_model_name_or_path: no such folder {path!r} (and not a Hub repository id, "
                         "owner/name)")


def _check_model_index(index: object, where: object) -> None:
    """Each component entry of ``model_index.json`` must be ``[library, class]`` (two strings, or two nulls for a
    component left out), before diffusers indexes into it."""
    if not isinstance(index, dict):
        raise ValueError(f"{where}/model_index.json: must be a JSON object, got a {type(index).__name__}")
    for name in ("transformer", "vae", "scheduler"):
        entry = index.get(name)
        ok = isinstance(entry, list | tuple) and len(entry) == 2 and (
            all(isinstance(x, str) and x for x in entry) or all(x is None for x in entry))
        if name in index and not ok:
            raise ValueError(f"{where}/model_index.json: {name} must be [library, class name] (two strings), got "
                             f"{entry!r}")


def _check_component_classes(index: dict, where: object) -> None:
    """A component entry ``[module, class]`` whose module imports but has no such class (a typo, an edited file) is
    named here, not by diffusers' ``getattr`` deep inside loading."""
    import importlib

    for name in ("transformer", "vae", "scheduler"):
        entry = index.get(name)
        if not (isinstance(entry, list | tuple) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            continue
        try:
            module = importlib.import_module(entry[0])
        except ImportError:
            continue  # a library diffusers resolves itself, or remote code
        if not hasattr(module, entry[1]):
            raise ValueError(f"{where}/model_index.json: {name} names {entry[1]!r}, which {entry[0]} does not define")


def _need_accelerator(method: str, device: torch.device | str | None) -> None:
    accelerator = getattr(torch, "accelerator", None)
    if device is None and accelerator is not None and not accelerator.is_available():
        raise RuntimeError(f"{method}() moves each model to an accelerator (CUDA, XPU, MPS) while it runs, and this "
                           "machine has none: run on the CPU instead (pipe.to('cpu'))")


class SphereARPipeline(DiffusionPipeline):
    """Class-conditional generation: the transformer predicts one sphere token at a time, the VAE decodes.

    Per token ``i``: one trunk step with the KV cache gives the head condition; the scheduler integrates the
    head's velocity (classifier-free guided, with a scale rising linearly from 1 to ``guidance_scale`` over
    the tokens for ``cfg_schedule="linear"``); the result is projected back onto the radius-sqrt(d) sphere
    before it is fed back and decoded.

    Randomness: with one ``torch.Generator`` the noise is drawn in the official code's order and shapes, so
    ``generator=torch.Generator().manual_seed(s)`` reproduces the official sampler run after
    ``torch.manual_seed(s)`` (CPU, float32). With a list of generators (one per image) each image uses only
    its own generator, so it does not depend on the rest of the batch.

    Exactness by construction: every product the eager sampler issues has the official shapes (the time
    embeddings of each step for all rows, the head's evaluation for all rows), so converted official weights give
    the official images bit for bit on the CPU. A call keeps its state (KV cache, scheduler times, the head's
    :class:`.SamplingPlan`) to itself: one pipeline can serve several threads at once.

    On a GPU the token loop never waits for the device: a token's noise is drawn before its steps (pinned memory,
    copied without blocking), and nothing in the loop reads a device value. :meth:`enable_torch_compile` adds the
    fast sampler (one compiled function per step; on CUDA each token's step loop replayed as a CUDA graph).
    Offload (``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``): the transformer computes only in
    ``forward`` and its sampling entry points (``sampling_plan``, ``prefill``, ``decode_step``), which run its
    offload hook as ``forward`` does, and no weight is read outside its module.
    """

    model_cpu_offload_seq = "transformer->vae"
    _callback_tensor_inputs = ["token"]

    def __init__(self, transformer: SphereARTransformer, vae: SphereVAE, scheduler: SphereARScheduler,
                 id2label: dict | None = None):
        super().__init__()
        for name, value, cls in (("transformer", transformer, SphereARTransformer), ("vae", vae, SphereVAE),
                                 ("scheduler", scheduler, SphereARScheduler)):
            if not isinstance(value, cls):
                raise TypeError(f"SphereARPipeline's {name} must be a {cls.__name__}, got {type(value).__name__} "
                                f"(check the {name!r} entry of model_index.json)")
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        id2label = _class_names(id2label)
        self.register_to_config(id2label=id2label or None)
        self.id2label = id2label
        self._compiled_sampler: Callable | None = None  # enable_torch_compile
        self.set_progress_bar_config()

    def set_progress_bar_config(self, **kwargs) -> None:
        """diffusers' ``set_progress_bar_config`` (tqdm's arguments); the bar counts tokens (``desc="tokens"``,
        ``unit="token"``) unless ``desc`` / ``unit`` say otherwise."""
        super().set_progress_bar_config(**{"desc": "tokens", "unit": "token", **kwargs})

    # ---- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``DiffusionPipeline.from_pretrained``, with every component loaded strictly (a missing, unexpected or
        mis-shaped weight is a ``ValueError``) and ``dtype`` given as a floating ``torch.dtype``, a name
        (``"bfloat16"``, ``"bf16"``, ``"float16"``, ``"fp16"``, ``"float32"``) or ``"auto"`` (each component in the
        dtype its weights are stored in), or per component (``{"transformer": torch.bfloat16, "default": ...}``);
        any other dtype is a ``ValueError``."""
        _check_source(pretrained_model_name_or_path)
        dtype = pipeline_dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None), ("transformer", "vae"))
        if dtype is not None:
            kwargs[DIFFUSERS_DTYPE_KWARG] = dtype
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs) -> None:
        """``DiffusionPipeline.save_pretrained`` (``variant=``, ``max_shard_size=`` reach both models), safetensors
        only: ``safe_serialization=False`` is refused before anything is written."""
        require_safetensors(safe_serialization, "SphereARPipeline")
        super().save_pretrained(save_directory, safe_serialization=True, **kwargs)

    @classmethod
    def from_single_file(cls, checkpoint: str | os.PathLike, **kwargs) -> SphereARPipeline:
        """An official checkpoint (``SphereAR_B.pt``, ``_L``, ``_H``) as a pipeline, converted in memory as ``sphere-ar
        convert`` does (weights-only unpickling, sizes inferred, EMA weights unless ``use_ema=False``): a local file,
        a Hub file URL (``https://huggingface.co/guolinke/SphereAR/blob/main/SphereAR_B.pt``) or ``owner/repo/file``,
        downloaded once into the Hub cache. Takes ``vae_checkpoint`` (a separate ``vae.pt``, the same forms),
        ``use_ema``, ``dtype`` and ``cache_dir``, ``revision``, ``token``, ``local_files_only``,
        ``force_download``, ``proxies`` (:mod:`.single_file`)."""
        from .single_file import load_single_file

        return load_single_file(cls, checkpoint, **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """``ConfigMixin.load_config``; the entries of a folder with remote code (``sphere-ar push``) map to this
        package's classes, so that code is neither needed nor run."""
        from .remote_code import package_model_index

        config = super().load_config(*args, **kwargs)
        where = args[0] if args else kwargs.get("pretrained_model_name_or_path", "?")
        _check_model_index(config[0] if isinstance(config, tuple) else config, where)
        config = package_model_index(config)
        _check_component_classes(config[0] if isinstance(config, tuple) else config, where)
        return config

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs) -> str:
        """Fetch a Hub repository's configs and weights (not its remote code, which this package does not need)."""
        from .remote_code import download_pipeline

        return download_pipeline(pretrained_model_name, **kwargs)

    # ---- labels --------------------------------------------------------------------------------------------
    @property
    def labels(self) -> dict[str, int]:
        """Every lower-cased class name and synonym -> class id."""
        return build_label_index(self.id2label)

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_classes

    def get_label_ids(self, label: LabelInput) -> list[int]:
        """Class ids for names (case-insensitive, any comma-separated synonym) and/or integer ids."""
        return resolve_label_ids(label, self.id2label, self.num_classes)

    # ---- helpers -------------------------------------------------------------------------------------------
    def enable_torch_compile(self, cuda_graph: bool = True, **compile_kwargs) -> None:
        """Opt in to the fast sampler (:class:`.FastTokenSampler`): one ``torch.compile``-d function per sampler
        step (the head's velocity, the guidance and the scheduler update together) in a token loop that never waits
        for the device, and a compiled trunk step between tokens; on CUDA with ``cuda_graph``, each token's whole
        step loop is captured once per (batch, steps, dtype) and replayed as a CUDA graph. ``compile_kwargs`` go to
        ``torch.compile`` (default: inductor, ``fullgraph=True``; the trunk step ``dynamic=True``; inductor's
        ``options`` are merged with the sampler's :class:`.thin_products.ThinProducts` pass, left out with a
        ``mode``). The first call of a shape compiles (seconds to minutes); its images agree with the eager sampler's
        to float rounding.
        :meth:`disable_torch_compile` returns to the eager sampler (the official arithmetic, bit for bit)."""
        self._compiled_sampler = FastTokenSampler(cuda_graph=cuda_graph, **compile_kwargs)

    def disable_torch_compile(self) -> None:
        """Back to the eager sampler."""
        self._compiled_sampler = None

    def _fast_sampler(self) -> FastTokenSampler | None:
        fast = self._compiled_sampler
        if fast is None and (compiled := compiled_forward(self.transformer)):
            logger.warning(f"{compiled} is compiled, but sampling does not call its forward: sampling eagerly "
                           "(pipe.enable_torch_compile() compiles the sampler)")
        elif fast is not None and not fast.supports(self.transformer):
            logger.warning("sequential or group offload moves weights per module call: sampling eagerly")
            return None
        return fast

    def check_inputs(self, batch_size: int, guidance_scale: float, cfg_schedule: str, num_inference_steps: int,
                     generator, output_type: str, callback_on_step_end_tensor_inputs: Sequence[str] = (),
                     callback_on_step_end: Callable | None = None) -> None:
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"callback_on_step_end must be callable (pipe, i, t, kwargs) -> dict, got "
                            f"{type(callback_on_step_end).__name__}")
        if not set(callback_on_step_end_tensor_inputs) <= set(self._callback_tensor_inputs):
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, "
                             f"got {list(callback_on_step_end_tensor_inputs)}")
        check_guidance_scale(guidance_scale)
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
        check_num_inference_steps(num_inference_steps)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(generator, list):
            if len(generator) != batch_size:
                raise ValueError(f"got a list of {len(generator)} generators for {batch_size} images: pass one "
                                 "generator per image, or a single generator")
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise TypeError("generator must be a torch.Generator or a list of torch.Generator")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")

    def sampling_bytes(self, batch_size: int, num_inference_steps: int, guided: bool,
                       output_type: str = "pil", vae_slicing: bool | None = None) -> int:
        """About the memory a call allocates beyond the weights: the KV cache, the head's :class:`.SamplingPlan`
        (time embeddings, a token's modulations), a token's noise, and the decoder's activations (all linear in
        ``batch_size``; the decoder's for one image when the VAE decodes in slices: ``vae_slicing``, default
        ``pipe.vae.use_slicing``)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        check_num_inference_steps(num_inference_steps)
        if vae_slicing is not None and not isinstance(vae_slicing, bool):
            raise TypeError(f"vae_slicing must be a bool or None, got {type(vae_slicing).__name__}")
        tf = self.transformer
        rows = batch_size * (2 if guided else 1)
        heun = self.scheduler.config.sampler == "heun"  # (without building a grid: a billion steps are refused)
        evaluations = 2 * num_inference_steps if heun else num_inference_steps + 1  # at least the head evaluations
        total = tf.kv_cache_bytes(rows)
        total += tf.sampling_plan_bytes(evaluations, rows, exact=self._compiled_sampler is None)
        total += (evaluations + 1) * rows * tf.config.latent_dim * 4  # a token's noise
        total += 2 * batch_size * tf.config.num_image_tokens * tf.config.latent_dim * 4  # tokens, latents
        if output_type != "latent":  # the decoder's activations (for one image when it decodes in slices), images
            size = self.vae.config.image_size
            sliced = self.vae.use_slicing if vae_slicing is None else vae_slicing
            total += (1 if sliced else batch_size) * self.vae.decode_bytes_per_image()
            total += batch_size * 3 * size * size * 4 * 2
        return total

    def check_memory(self, batch_size: int, num_inference_steps: int, guided: bool, output_type: str,
                     device: torch.device) -> None:
        """Refuse a call whose :meth:`sampling_bytes` exceed the free memory of ``device`` (before allocating)."""
        free = _free_memory(device)
        need = self.sampling_bytes(batch_size, num_inference_steps, guided, output_type)
        if free is None or need <= free:
            return
        one = self.sampling_bytes(1, num_inference_steps, guided, output_type)
        fits = min(batch_size - 1, free // one) if one <= free else 0
        what = f"{batch_size} images with {num_inference_steps} steps per token need"
        advice = (f"at most {fits} images fit in one call: pass fewer class labels per call (the CLI splits "
                  "requests with --batch-size)" if fits else "even one image does not fit: use fewer "
                  "num_inference_steps")
        if output_type != "latent" and not self.vae.use_slicing:
            sliced = self.sampling_bytes(batch_size, num_inference_steps, guided, output_type, vae_slicing=True)
            if sliced <= free:
                advice += f", or call pipe.vae.enable_slicing() (then about {sliced / 2**30:.1f} GiB)"
        raise ValueError(f"{what} about {need / 2**30:.1f} GiB of {device.type} memory (KV cache and activations) "
                         f"but about {free / 2**30:.1f} GiB is free; {advice}")

    def to(self, *args, **kwargs):
        """``DiffusionPipeline.to``, without diffusers' warning that float16 cannot run on the CPU: this pipeline
        does (tested); a keyword it does not take (diffusers would ignore ``torch_dtype=``) is a ``TypeError``."""
        unknown = sorted(set(kwargs) - {"dtype", "device", "silence_dtype_warnings"})
        if unknown:
            raise TypeError(f"to() got unexpected keyword arguments {unknown}: expected dtype= and / or device=")
        kwargs.setdefault("silence_dtype_warnings", True)
        return super().to(*args, **kwargs)

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None):
        """``DiffusionPipeline.enable_model_cpu_offload``; without an accelerator, a one-line error saying what to
        do instead."""
        _need_accelerator("enable_model_cpu_offload", device)
        return super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None):
        """``DiffusionPipeline.enable_sequential_cpu_offload``; without an accelerator, a one-line error."""
        _need_accelerator("enable_sequential_cpu_offload", device)
        return super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)

    # ---- generation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: LabelInput,
        guidance_scale: float | None = None,
        cfg_schedule: str = "linear",
        num_inference_steps: int = 100,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("token",),
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per class label.

        Args:
            class_labels: an id, a class name, or a list / array / tensor of them.
            guidance_scale: classifier-free guidance; ``None`` takes the model's recommended value
                (``transformer.config.guidance_scale``); ``<= 1`` disables guidance.
            cfg_schedule: ``"linear"`` (official: rises from 1 to ``guidance_scale`` over the tokens) or ``"constant"``.
            num_inference_steps: sampler steps per token (plus the official final Euler step).
            generator: one generator (official noise order) or one per image.
            output_type: ``"pil"``, ``"np"`` (NHWC in [0, 1]), ``"pt"`` (NCHW in [0, 1]) or ``"latent"``
                (sphere tokens).
            callback_on_step_end: called after each token ``i`` as ``callback(pipe, i, i, kwargs)``, ``kwargs``
                holding ``callback_on_step_end_tensor_inputs`` (``"token"``: the new token of every row,
                ``(rows, latent_dim)``, on the sphere); a ``"token"`` it returns replaces the token fed back.
        """
        labels = self.get_label_ids(class_labels)
        if guidance_scale is None:
            guidance_scale = float(self.transformer.config.guidance_scale)
        self.check_inputs(len(labels), guidance_scale, cfg_schedule, num_inference_steps, generator, output_type,
                          callback_on_step_end_tensor_inputs, callback_on_step_end)
        guidance_scale = float(guidance_scale)  # (a numpy or other real scalar: a float in the arithmetic)
        device = self._execution_device  # under offload: where the hooks move each model when it runs
        self.check_memory(len(labels), num_inference_steps, guidance_scale > 1.0, output_type, device)
        latents = self._sample_tokens(labels, guidance_scale, cfg_schedule, num_inference_steps, generator, device,
                                      callback_on_step_end, callback_on_step_end_tensor_inputs)
        if not torch.isfinite(latents).all():  # after the loop: the one wait for the device before decoding
            if guidance_scale > 1.0:
                raise ValueError(f"guidance_scale={guidance_scale} made the guided velocity non-finite in float32; use "
                                 f"a moderate scale (this model recommends {self.transformer.config.guidance_scale})")
            raise FloatingPointError(f"the transformer produced non-finite tokens in {self.transformer.dtype}; run it "
                                     "in float32 or bfloat16")
        images = latents if output_type == "latent" else self._decode(latents, output_type, device)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _sample_tokens(self, labels: list[int], guidance_scale: float, cfg_schedule: str, num_inference_steps: int,
                       generator: torch.Generator | list[torch.Generator] | None, device: torch.device,
                       callback: Callable | None, callback_inputs: Sequence[str]) -> torch.Tensor:
        """The token loop, ``(batch, tokens, latent_dim)``: per token, the scheduler's steps over the head's guided
        velocity (eager, or the fast sampler), the projection onto the sphere, one trunk step with the KV cache."""
        tf = self.transformer
        batch, num_tokens, dim = len(labels), tf.config.num_image_tokens, tf.config.latent_dim
        cond = torch.tensor(labels, device=device, dtype=torch.long)
        if guidance_scale > 1.0:  # rows [conditional; unconditional]
            cond = torch.cat([cond, torch.full_like(cond, tf.null_class_id)])
        rows = cond.shape[0]
        # a token sampled without guidance has one state per row: both rows of an image draw from its generator
        row_generator = generator + generator if isinstance(generator, list) and rows > batch else generator
        scheduler = copy.copy(self.scheduler)  # this call's times and step state, not shared with another thread
        scheduler.set_timesteps(num_inference_steps)
        times = scheduler.timesteps.tolist()  # read once: step() checks each time without reading a tensor
        guidance = [guidance_at(i, num_tokens, guidance_scale, cfg_schedule) for i in range(num_tokens)]
        fast = self._fast_sampler()
        plan = tf.sampling_plan(scheduler.timesteps.to(device), rows, exact=fast is None)  # the head's share
        if fast is not None:  # the loop's scalars as tensors on the device, prepared once
            table = scheduler.step_table(device)
            scales = torch.tensor(guidance, dtype=torch.float32).to(device).unbind(0)
        cache = tf.allocate_kv_cache(rows, device=device)
        z = tf.prefill(cond, cache)
        tokens = []
        with self.progress_bar(total=num_tokens) as bar:
            for i in range(num_tokens):
                guided = guidance[i] > 1.0  # guided: one state per image, shared by its two rows; else one per row
                shape, gen = ((rows // 2, dim), generator) if guided else ((rows, dim), row_generator)
                if fast is None:
                    x, noise = scheduler.token_noise(shape, gen, device)  # all of the token's noise, drawn now
                    plan.start_token(z)
                    for k, t in enumerate(times):  # one pass per token; the step index then resets
                        v = plan.velocity(torch.cat([x, x]) if guided else x, k)
                        if guided:
                            v = apply_guidance(v.float(), guidance[i])
                        x = scheduler.step(v, t, x, noise=noise[k], return_dict=False)[0]
                else:
                    noise = scheduler.token_noise_block(shape, gen, device)
                    x = fast(plan, table, z, noise, scales[i] if guided else None)
                # back onto the sphere, also after CFG: fed back and decoded (no projection for the baselines)
                token = self.vae.normalize(x) if tf.config.normalize_tokens else x
                if guided:
                    token = torch.cat([token, token])
                if callback is not None:
                    token = self._callback_token(callback, i, token, callback_inputs)
                tokens.append(token[:batch])
                if i + 1 < num_tokens:
                    z = tf.decode_step(token, i, cache) if fast is None else fast.decode_step(tf, token, i, cache)
                bar.update()
        return torch.stack(tokens, dim=1)

    def _callback_token(self, callback: Callable, i: int, token: torch.Tensor, callback_inputs: Sequence[str]
                        ) -> torch.Tensor:
        """``callback_on_step_end`` after token ``i``: the token it returns (if any) replaces ``token``."""
        out = callback(self, i, i, {"token": token} if callback_inputs else {})
        if not isinstance(out, dict):
            raise TypeError(f"callback_on_step_end must return a dict (the kwargs it got, or {{}}), got "
                            f"{type(out).__name__}")
        new = out.pop("token", token)
        if not isinstance(new, torch.Tensor) or new.shape != token.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(f"callback_on_step_end returned a token of {got}; expected a tensor of shape "
                             f"{tuple(token.shape)} (rows, latent_dim)")
        return new.to(dtype=token.dtype, device=token.device)

    def _decode(self, latents: torch.Tensor, output_type: str, device: torch.device):
        """Tokens -> images of ``output_type`` (the latents go to the execution device: the VAE's offload hook moves
        the VAE there when ``decode`` runs)."""
        decoded = self.vae.decode(latents.to(device, self.vae.dtype)).sample
        if not torch.isfinite(decoded).all():
            raise FloatingPointError(f"the decoder produced non-finite values in {self.vae.dtype}; "
                                     "run the VAE in float32 or bfloat16")
        images = (decoded.float() / 2 + 0.5).clamp(0, 1)
        if latents.shape[0] > 0 and bool(images.amax() == images.amin()):  # the one wait before returning
            raise ValueError(f"the VAE decoded every image to the constant value {float(images.amax()):.3g}: its "
                             "decoder weights are broken (e.g. zeroed), not the sampling; re-save or re-convert vae/")
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return images
