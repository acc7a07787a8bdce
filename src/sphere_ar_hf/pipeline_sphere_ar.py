"""SphereARPipeline: class-conditional image generation with SphereAR (diffusers ``DiffusionPipeline``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput

from .labels import build_label_index, resolve_label_ids
from .modeling_sphere_ar import SphereARTransformer
from .scheduling_sphere_ar import CFG_SCHEDULES, SphereARScheduler, apply_guidance, draw_noise
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

    Exactness: a float32 product's rounding can depend on its row count (MKL on the CPU takes other kernels for
    a few rows, and splits them differently across threads), and a random or early-training model amplifies a
    1e-7 difference in one token to visible changes by the last. So on the CPU the sampler computes nothing that
    could round differently from the official per-step evaluation: the time embeddings for the token's rows, and
    the adaLN modulations of many steps in one product per token only where a probe on this machine (this thread
    count, dtype and weights) shows that this changes no bit, otherwise per step with the official shapes. Converted
    official weights then give the official images bit for bit at any batch size (same thread count).
    ``pipe.batched_head_modulation``: ``None`` (default) as just described on the CPU, batched elsewhere (CUDA);
    ``True``: batched everywhere (fewer, larger products; equal to ~1e-7); ``False``: per step everywhere.
    """

    model_cpu_offload_seq = "transformer->vae"
    MODULATION_BYTES = 64 * 2**20  # sample_token: memory for the precomputed adaLN modulations of a token
    TRANSPOSED_HEAD_MIN_ROWS = 32  # __call__: from this many head rows (CPU), use DiffusionHead.transposed_weights

    def __init__(self, transformer: SphereARTransformer, vae: SphereVAE, scheduler: SphereARScheduler,
                 id2label: dict | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        id2label = {int(k): v for k, v in (id2label or {}).items()}
        self.register_to_config(id2label=id2label or None)
        self.id2label = id2label
        self._velocity_fn: Callable | None = None
        self._head_weights_t: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # this call's plan (__call__)
        self._per_step_modulation = False
        self._rounding_probes: dict[tuple, bool] = {}
        # None: on the CPU batched only where that changes no bit, elsewhere batched (see the class docstring)
        self.batched_head_modulation: bool | None = None

    # ---- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def load_config(cls, *args, **kwargs):
        """``ConfigMixin.load_config``; a repository pushed with remote code (``sphere-ar push``) maps to this
        package's classes, so its bundled code is neither needed nor run."""
        from .hub import package_model_index

        return package_model_index(super().load_config(*args, **kwargs))

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs) -> str:
        """Fetch a Hub repository's configs and weights (not its remote code, which this package does not need)."""
        from .hub import download_pipeline

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
        """Opt in to ``torch.compile`` of the per-step head evaluation (the sampler's hot loop)."""
        self._velocity_fn = torch.compile(self.transformer.head.velocity_from_modulation, **compile_kwargs)

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
                     generator, output_type: str) -> None:
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

    def embed_times(self, rows: int, device: torch.device) -> torch.Tensor:
        """The head's time embeddings of every scheduler step, once per call (the same times for every token).

        On the CPU ``(steps, rows, dim)``: each step's embedding computed for ``rows`` rows, as the official sampler
        does (a product's rounding can depend on its row count); elsewhere ``(steps, 1, dim)``.
        """
        head, times = self.transformer.head, self.scheduler.timesteps.to(device)
        if device.type == "cpu":
            return torch.stack([head.embed_time(t.expand(rows)) for t in times])
        return head.embed_time(times).unsqueeze(1)

    def modulation_chunk(self, rows: int) -> int:
        """Steps whose adaLN modulations :meth:`sample_token` computes at a time: ~``MODULATION_BYTES`` at most."""
        head = self.transformer.head
        row_bytes = rows * head.modulation_width * head.final_adaln.weight.element_size()
        return max(1, min(len(self.scheduler), self.MODULATION_BYTES // row_bytes))

    def _probe(self, kind: str, rows: int, steps: int, run: Callable[[], bool]) -> bool:
        """``run()`` once per shape, thread count, dtype, device, weights and adapter wrapping (cached)."""
        head = self.transformer.head
        weight, layers = head.final_adaln.weight, (*head.adaln, head.final_adaln, *head.res_blocks)
        key = (kind, rows, steps, torch.get_num_threads(), weight.dtype, weight.device, weight.data_ptr(),
               tuple(type(m) for b in layers for m in ((b.w1, b.w2) if hasattr(b, "w1") else (b,))))
        if key not in self._rounding_probes:
            self._rounding_probes[key] = run()
        return self._rounding_probes[key]

    def plan_head(self, rows: int, device: torch.device) -> None:
        """Choose how this call's head products are issued (see the class docstring): batched or per-step adaLN
        modulations, and, for many rows on the CPU, the block weights in (in, out) layout (~1.4x faster products
        at 64 rows, a transient copy) where that changes no bit (or when batching is forced)."""
        head, mode = self.transformer.head, self.batched_head_modulation
        self._head_weights_t = None
        if device.type != "cpu":
            self._per_step_modulation = mode is False
            return
        if mode is None:
            num_steps, chunk = len(self.scheduler), self.modulation_chunk(rows)
            mode = all(self._probe("modulation", rows, s, lambda s=s: head.batched_modulation_is_exact(rows, s))
                       for s in {chunk, num_steps % chunk} - {0})
        self._per_step_modulation = not mode
        if rows >= self.TRANSPOSED_HEAD_MIN_ROWS and (weights_t := head.transposed_weights()) is not None:
            if self.batched_head_modulation or self._probe(
                    "transposed", rows, 0, lambda: head.transposed_weights_are_exact(rows, weights_t)):
                self._head_weights_t = weights_t

    def sample_token(self, cond: torch.Tensor, t_emb: torch.Tensor, guidance: float, generator) -> torch.Tensor:
        """Integrate the head's flow for one token of every row of ``cond`` and project onto the sphere.

        ``cond`` (rows, hidden) are head conditions laid out ``[conditional; unconditional]`` when guiding;
        ``t_emb``: :meth:`embed_times`. With ``guidance > 1`` one state per image is integrated with guided
        velocities and shared by both halves; otherwise every row gets its own state (as in the official sampler).

        Work that does not depend on the state is hoisted out of the step loop: the condition embedding once
        per token, the time embeddings once per call, the adaLN modulations (which depend only on time and
        condition) for many steps at a time, in batched products or in per-step products of the official shapes
        (:meth:`plan_head`); each step then runs only the state-dependent MLP.
        """
        head, scheduler = self.transformer.head, self.scheduler
        velocity = self._velocity_fn or head.velocity_from_modulation
        guided = guidance > 1.0
        rows = cond.shape[0]
        n = rows // 2 if guided else rows
        if isinstance(generator, list) and len(generator) != n:
            generator = generator * (n // len(generator))  # unguided rows of both halves: each image's own
        c_emb = head.embed_condition(cond)  # once per token
        dim, stochastic = self.transformer.config.latent_dim, scheduler.stochastic
        if isinstance(generator, list):
            # each image draws all of this token's noise from its own generator in one call (the initial state, then
            # each SDE step's): one draw per image and token instead of one per image and step
            noise = torch.stack([torch.randn(1 + scheduler.num_noise_draws, dim, generator=g, device=g.device)
                                 for g in generator]).to(cond.device)
            x, step_noise = noise[:, 0], iter(noise.unbind(1)[1:])
        else:  # the official order: the initial state, then one draw per SDE step
            x, step_noise = draw_noise((n, dim), generator, cond.device, torch.float32), None
        num_steps = len(scheduler)
        chunk, per_step, weights_t = self.modulation_chunk(rows), self._per_step_modulation, self._head_weights_t
        repeat = 2 if guided else 1
        for k in range(num_steps):
            j = k % chunk
            if j == 0:
                mods = head.modulation(t_emb[k:k + chunk], c_emb, per_step=per_step)
            v = velocity(x, [m[j] for m in mods], repeat, weights_t)
            if guided:
                v = apply_guidance(v.float(), guidance)
            eps = next(step_noise) if step_noise is not None and stochastic[k] else None
            x = scheduler.step(v, k, x, generator=generator, noise=eps, return_dict=False)[0]
        x = self.vae.normalize(x)  # back onto the sphere, also after CFG: fed back and decoded
        return torch.cat([x, x]) if guided else x

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
        """
        labels = self.get_label_ids(class_labels)
        if guidance_scale is None:
            guidance_scale = float(self.transformer.config.guidance_scale)
        self.check_inputs(len(labels), guidance_scale, cfg_schedule, num_inference_steps, generator, output_type)
        tf = self.transformer
        device = self._execution_device
        batch = len(labels)
        do_cfg = guidance_scale > 1.0
        cond = torch.tensor(labels, device=device, dtype=torch.long)
        if do_cfg:
            cond = torch.cat([cond, torch.full_like(cond, tf.null_class_id)])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        num_tokens = tf.config.num_image_tokens
        cache = tf.allocate_kv_cache(cond.shape[0], device=device)
        t_emb = self.embed_times(cond.shape[0], device)
        z = tf.prefill(cond, cache)
        tokens = []
        self.plan_head(cond.shape[0], device)
        try:
            with self.progress_bar(total=num_tokens) as bar:
                for i in range(num_tokens):
                    guidance = self.guidance_at(i, num_tokens, guidance_scale, cfg_schedule)
                    token = self.sample_token(z, t_emb, guidance, generator)
                    tokens.append(token[:batch])
                    if i + 1 < num_tokens:
                        z = tf.decode_step(token, i, cache)
                    bar.update()
        finally:
            self._head_weights_t, self._per_step_modulation = None, False
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
