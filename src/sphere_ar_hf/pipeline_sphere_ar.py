"""SphereARPipeline: class-conditional image generation with SphereAR (diffusers ``DiffusionPipeline``)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput

from .labels import build_label_index, resolve_label_ids
from .modeling_sphere_ar import SphereARTransformer
from .scheduling_sphere_ar import CFG_SCHEDULES, SphereARScheduler, apply_guidance
from .vae import SphereVAE

__all__ = ["SphereARPipeline"]

LabelInput = int | str | Sequence[int | str] | np.ndarray | torch.Tensor
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


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

    Exactness by construction: every product the sampler issues has the official shapes (the time embeddings of
    each step for all rows, the head's evaluation for all rows), so converted official weights give the official
    images bit for bit on the CPU. A call keeps its state (KV cache, scheduler times) to itself: one pipeline can
    serve several threads at once.
    """

    model_cpu_offload_seq = "transformer->vae"
    MODULATION_BYTES = 64 * 2**20  # at most this much of a token's adaLN modulations is computed ahead of its steps
    _callback_tensor_inputs = ["token"]

    def __init__(self, transformer: SphereARTransformer, vae: SphereVAE, scheduler: SphereARScheduler,
                 id2label: dict | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        id2label = {int(k): v for k, v in (id2label or {}).items()}
        self.register_to_config(id2label=id2label or None)
        self.id2label = id2label
        self._velocity_fn: Callable | None = None  # enable_torch_compile

    # ---- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def load_config(cls, *args, **kwargs):
        """``ConfigMixin.load_config``; the entries of a folder with remote code (``sphere-ar push``) map to this
        package's classes, so that code is neither needed nor run."""
        from .remote_code import package_model_index

        return package_model_index(super().load_config(*args, **kwargs))

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
    def enable_torch_compile(self, **compile_kwargs) -> None:
        """Opt in to ``torch.compile`` of the head's velocity (the sampler's hot loop)."""
        self._velocity_fn = torch.compile(self.transformer.head.velocity, **compile_kwargs)

    def disable_torch_compile(self) -> None:
        self._velocity_fn = None

    @staticmethod
    def guidance_at(index: int, num_tokens: int, guidance_scale: float, cfg_schedule: str) -> float:
        """The guidance scale used for token ``index``: constant, or rising linearly from 1 (official)."""
        if guidance_scale <= 1.0:
            return 1.0
        if cfg_schedule == "constant":
            return guidance_scale
        return 1.0 + (guidance_scale - 1.0) * index / num_tokens

    def check_inputs(self, batch_size: int, guidance_scale: float, cfg_schedule: str, num_inference_steps: int,
                     generator, output_type: str, callback_on_step_end_tensor_inputs: Sequence[str] = ()) -> None:
        if not set(callback_on_step_end_tensor_inputs) <= set(self._callback_tensor_inputs):
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, "
                             f"got {list(callback_on_step_end_tensor_inputs)}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"guidance_scale must be a float, got {type(guidance_scale).__name__}")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}")
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
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
                          callback_on_step_end_tensor_inputs)
        tf, head = self.transformer, self.transformer.head
        velocity = self._velocity_fn or head.velocity
        device = self._execution_device
        batch, num_tokens = len(labels), tf.config.num_image_tokens
        do_cfg = guidance_scale > 1.0
        cond = torch.tensor(labels, device=device, dtype=torch.long)
        if do_cfg:  # rows [conditional; unconditional]
            cond = torch.cat([cond, torch.full_like(cond, tf.null_class_id)])
        rows = cond.shape[0]
        # a token sampled without guidance has one state per row: both rows of an image draw from its generator
        row_generator = generator + generator if isinstance(generator, list) and do_cfg else generator
        scheduler = copy.copy(self.scheduler)  # this call's times and step state, not shared with another thread
        scheduler.set_timesteps(num_inference_steps, device=device)
        t_emb = head.embed_times(scheduler.timesteps, rows)  # depends only on the step: once per call
        chunk = max(1, self.MODULATION_BYTES // (rows * head.modulation_width * t_emb.element_size()))
        cache = tf.allocate_kv_cache(rows, device=device)
        z = tf.prefill(cond, cache)
        tokens = []
        with self.progress_bar(total=num_tokens) as bar:
            for i in range(num_tokens):
                guidance = self.guidance_at(i, num_tokens, guidance_scale, cfg_schedule)
                guided = guidance > 1.0  # guided: one state per image, shared by its two rows; else one per row
                c_emb = head.embed_condition(z)  # depends only on the token: once per token
                gen = generator if guided else row_generator
                x, noise = scheduler.token_noise((rows // 2 if guided else rows, tf.config.latent_dim), gen, device)
                for k in range(len(scheduler)):
                    if k % chunk == 0:  # depends only on the token and the step: ahead, a chunk of steps at a time
                        mods = head.step_modulations(t_emb[k:k + chunk], c_emb)
                    v = velocity(torch.cat([x, x]) if guided else x, mods[k % chunk])
                    if guided:
                        v = apply_guidance(v.float(), guidance)
                    x = scheduler.step(v, k, x, generator=gen, noise=noise[k], return_dict=False)[0]
                token = self.vae.normalize(x)  # back onto the sphere, also after CFG: fed back and decoded
                if guided:
                    token = torch.cat([token, token])
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, i, i, {"token": token} if callback_on_step_end_tensor_inputs
                                                   else {})
                    token = outputs.pop("token", token)
                tokens.append(token[:batch])
                if i + 1 < num_tokens:
                    z = tf.decode_step(token, i, cache)
                bar.update()
        latents = torch.stack(tokens, dim=1)
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents.to(self.vae.device, self.vae.dtype)).sample
            if not torch.isfinite(decoded).all():
                raise FloatingPointError(f"the decoder produced non-finite values in {self.vae.dtype}; "
                                         "run the VAE in float32 or bfloat16")
            images = (decoded.float() / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
