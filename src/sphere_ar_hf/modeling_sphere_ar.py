"""SphereARTransformer: class tokens + causal trunk with 2D RoPE + a per-token flow-matching MLP head."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .config_fields import TRANSFORMER_ARCHITECTURE, TransformerFields
from .configuration_sphere_ar import SphereARConfig
from .layers import KVCache, RMSNorm, Rope2D, TransformerBlock, align_loaded, run_blocks
from .loading import auto_dtype, load_strictly, resolve_dtype, write_architecture
from .scheduling_sphere_ar import flow_path

__all__ = ["SphereARTransformer", "SphereARTransformerOutput", "DiffusionHead", "SamplingPlan", "offload_entry_point"]
# PreTrainedModel.save_pretrained's parameters, which the override keeps: a pipeline's save_pretrained passes
# variant, max_shard_size, ... only to a save method whose signature names them
SAVE_SIGNATURE = inspect.signature(PreTrainedModel.save_pretrained)

MODULATION_BYTES = 64 * 2**20  # eager sampling: at most this much of a token's adaLN modulations is computed ahead


def offload_entry_point(method: Callable) -> Callable:
    """Run the module's accelerate hook (``_hf_hook``, set by diffusers' model or sequential CPU offload) around
    ``method`` as accelerate runs it around ``forward``: an offloaded model moves to its execution device before the
    method computes. The sampler calls the transformer only through such methods (like diffusers' ``decode``)."""

    @functools.wraps(method)
    def hooked(self, *args, **kwargs):
        hook = getattr(self, "_hf_hook", None)
        if hook is None:
            return method(self, *args, **kwargs)
        args, kwargs = hook.pre_forward(self, *args, **kwargs)
        return hook.post_forward(self, method(self, *args, **kwargs))

    return hooked


@dataclass
class SphereARTransformerOutput(ModelOutput):
    """``loss``: flow-matching velocity MSE; ``head_condition``: per-token conditions ``(B, L, hidden)``;
    ``hidden_states`` (with ``output_hidden_states``): the trunk's input (the normalised class and latent token
    embeddings) and each block's output, ``num_hidden_layers + 1`` tensors ``(B, num_class_tokens + L - 1, hidden)``."""

    loss: torch.Tensor | None = None
    head_condition: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos, sin]`` of ``scale * t``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = scale * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class HeadResBlock(GradientCheckpointingLayer):
    """LayerNorm -> adaLN modulation -> SwiGLU (width 1.5x) -> gated residual (checkpointed when enabled)."""

    def __init__(self, dim: int):
        super().__init__()
        hidden = int(dim * 1.5)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.w1 = nn.Linear(dim, 2 * hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) * (1 + scale) + shift
        a, b = self.w1(h).chunk(2, dim=-1)
        return x + self.w2(F.silu(a) * b) * gate


class SamplingPlan:
    """What one sampling call's head evaluations share, as the KV cache holds the trunk's (from
    :meth:`DiffusionHead.sampling_plan`): the time embedding of every step (once per call) and, per token, the
    condition embedding and the adaLN modulations of its steps. It belongs to one call.

    Eager (:meth:`start_token`, then :meth:`velocity` for the steps in order): the official shapes, each step's time
    embedding and products for all ``rows`` rows, the modulations computed a chunk of steps ahead (at most
    ``max_bytes``), projection by projection, so that each weight is read once per chunk. Fast path
    (:meth:`token_modulations`): each step's time embedding once, shared by the rows, and all of a token's steps in
    one product per projection (the same values up to float rounding).
    """

    def __init__(self, head: DiffusionHead, time_embeddings: torch.Tensor, rows: int,
                 max_bytes: int = MODULATION_BYTES):
        self.head, self.time_embeddings, self.rows = head, time_embeddings, rows
        one_step = rows * head.modulation_width * time_embeddings.element_size()
        self.chunk = max(1, max_bytes // one_step)
        self._condition: torch.Tensor | None = None
        self._modulations: list[list[torch.Tensor]] = []

    @staticmethod
    def estimate_bytes(head: DiffusionHead, steps: int, rows: int, dtype: torch.dtype, exact: bool = True,
                       max_bytes: int = MODULATION_BYTES) -> int:
        """The memory a plan takes at most: its time embeddings and a token's condition and modulations (a chunk of
        steps when ``exact``, the eager sampler; all of them for the fast path)."""
        el = dtype.itemsize
        one_step = rows * head.modulation_width * el
        modulations = min(max_bytes + one_step, steps * one_step) if exact else steps * one_step
        return (steps * (rows if exact else 1) + rows) * head.dim * el + modulations

    @property
    def nbytes(self) -> int:
        """This plan's :meth:`estimate_bytes`."""
        steps, exact = self.time_embeddings.shape[0], self.time_embeddings.shape[1] == self.rows
        el = self.time_embeddings.element_size()
        return self.estimate_bytes(self.head, steps, self.rows, self.time_embeddings.dtype, exact,
                                   self.chunk * self.rows * self.head.modulation_width * el)

    def start_token(self, z: torch.Tensor) -> None:
        """Condition the next steps on head conditions ``z`` (rows, cond_dim): a new token."""
        self._condition, self._modulations = self.head.embed_condition(z), []

    def velocity(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The head's velocity at ``x`` (rows, latent_dim) at step ``step`` of the token (steps in order)."""
        if step % self.chunk == 0:
            times = self.time_embeddings[step:step + self.chunk]
            self._modulations = self.head.step_modulations(times, self._condition)
        return self.head.velocity(x, self._modulations[step % self.chunk])

    def token_modulations(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The modulations of all steps of a token with head conditions ``z``, one product per projection: per
        projection, a ``(steps, rows, width)`` tensor (row ``k``: step ``k``'s :meth:`DiffusionHead.modulations`)."""
        return tuple(self.head.modulations(self.time_embeddings, self.head.embed_condition(z)))


class DiffusionHead(nn.Module):
    """The per-token velocity MLP: input ``x_t`` (N, latent_dim), time ``t`` (N,), condition ``z`` (N, hidden).

    One adaLN projection is shared by each run of ``num_layers / num_adaln`` consecutive blocks. For sampling,
    the condition and time embeddings are computed separately (:meth:`embed_condition`, :meth:`embed_times`), so
    that each is computed once per token / once per call, not once per evaluation, and the adaLN modulations of a
    token's steps ahead of its step loop (:meth:`step_modulations`); :meth:`velocity` then runs the rest, the same
    computation as in training.
    """

    def __init__(self, latent_dim: int, cond_dim: int, dim: int, num_layers: int, num_adaln: int):
        super().__init__()
        self.dim = dim
        self.time_embed = TimestepEmbedder(dim)
        self.cond_embed = nn.Linear(cond_dim, dim)
        self.input_proj = nn.Linear(latent_dim, dim)
        self.res_blocks = nn.ModuleList(HeadResBlock(dim) for _ in range(num_layers))
        self.adaln = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(num_adaln))
        self.adaln_every = max(1, num_layers // num_adaln)
        self.final_norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.final_adaln = nn.Linear(dim, 2 * dim)
        self.final_linear = nn.Linear(dim, latent_dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official head init: xavier linears, N(0, 0.02) time MLP, zero adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        for m in [*self.adaln, self.final_adaln, self.final_linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def embed_condition(self, z: torch.Tensor) -> torch.Tensor:
        """The condition embedding of head conditions ``z`` (N, cond_dim): once per token when sampling."""
        return self.cond_embed(z)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time embedding of times ``t`` (N,)."""
        return self.time_embed(t)

    def embed_times(self, timesteps: torch.Tensor, rows: int) -> torch.Tensor:
        """``(steps, rows, dim)``: each sampler time's embedding for ``rows`` rows, once per call when sampling.

        Computed per step for ``rows`` rows, the shapes of the official sampler (which embeds the time of every row
        at every step), so the values are the official ones bit for bit.
        """
        return torch.stack([self.embed_time(t.expand(rows)) for t in timesteps])

    def modulations(self, t_emb: torch.Tensor, c_emb: torch.Tensor) -> list[torch.Tensor]:
        """The adaLN projections of ``silu(t_emb + c_emb)`` (N, dim): ``(scale, shift, gate)`` concatenated for each
        shared adaLN, then ``(scale, shift)`` of the final layer. They do not depend on the state ``x``."""
        y = F.silu(t_emb + c_emb)
        return [m(y) for m in (*self.adaln, self.final_adaln)]

    @property
    def modulation_width(self) -> int:
        """Columns of one row of :meth:`modulations`, all projections together."""
        return sum(m.out_features for m in (*self.adaln, self.final_adaln))

    def step_modulations(self, t_emb: torch.Tensor, c_emb: torch.Tensor) -> list[list[torch.Tensor]]:
        """:meth:`modulations` of each step of ``t_emb`` (steps, N, dim) for one token's ``c_emb`` (N, dim).

        Per step the products of the official shapes (N rows each, so the same bits as :meth:`modulations` of that
        step), issued projection by projection so that each weight is read from memory once for all the steps.
        """
        y = [F.silu(t + c_emb) for t in t_emb]
        per_layer = [[m(y_k) for y_k in y] for m in (*self.adaln, self.final_adaln)]
        return [list(mods) for mods in zip(*per_layer)]

    def sampling_plan(self, timesteps: torch.Tensor, rows: int, exact: bool = True,
                      max_bytes: int = MODULATION_BYTES) -> SamplingPlan:
        """A :class:`SamplingPlan` for one call over ``timesteps`` (on the head's device) with ``rows`` rows: the
        official shapes when ``exact`` (eager), else the fast path's (see there)."""
        t_emb = self.embed_times(timesteps, rows) if exact else self.embed_time(timesteps).unsqueeze(1)
        return SamplingPlan(self, t_emb, rows, max_bytes)

    def velocity(self, x: torch.Tensor, mods: list[torch.Tensor]) -> torch.Tensor:
        """The head's velocity at ``x`` (N, latent_dim) given :meth:`modulations` (training and sampling: the head's
        one computation, the float32 operations of the official head in the same order)."""
        h = self.input_proj(x.to(self.input_proj.weight.dtype))
        for i, block in enumerate(self.res_blocks):
            if i % self.adaln_every == 0:
                scale, shift, gate = mods[i // self.adaln_every].chunk(3, dim=-1)
            h = block(h, scale, shift, gate)
        scale, shift = mods[-1].chunk(2, dim=-1)
        return self.final_linear(self.final_norm(h) * (1 + scale) + shift)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Velocity at ``x`` (N, latent_dim) for times ``t`` (N,) and head conditions ``z`` (N, cond_dim)."""
        return self.velocity(x, self.modulations(self.embed_time(t), self.embed_condition(z)))


class SphereARPreTrainedModel(PreTrainedModel):
    config_class = SphereARConfig
    base_model_prefix = "sphere_ar"
    main_input_name = "latents"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock", "HeadResBlock"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, strict (a missing, unexpected or mis-shaped weight is a
        ``ValueError``: :func:`.loading.load_strictly`), with ``dtype`` names such as ``"bf16"`` understood and the
        CPU weights in aligned memory (``layers.align_tensors_``). ``dtype="auto"`` on a local folder is the dtype of
        the weights files loaded (of ``variant``), not transformers' reading of ``config.json``, which the last save
        of any variant wrote."""
        dtype = resolve_dtype(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
        if dtype == "auto":  # (a Hub repository: transformers reads its config.json)
            dtype = auto_dtype(args[0] if args else kwargs["pretrained_model_name_or_path"], kwargs) or dtype
        if dtype is not None:
            kwargs["dtype"] = dtype
        return align_loaded(load_strictly(cls, super().from_pretrained, args, kwargs, "ignore_mismatched_sizes"))

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, DiffusionHead):
            module.reset_parameters()
        elif isinstance(module, (nn.Linear, nn.Embedding)) and module not in self.head_modules:
            module.weight.normal_(0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)) and module.weight is not None:
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


class SphereARTransformer(SphereARPreTrainedModel):
    """The SphereAR autoregressive model (everything but the S-VAE).

    Sequence: ``num_class_tokens`` class tokens, then the latent tokens 0..L-2 (raster order) projected to the
    width; the trunk output at position ``num_class_tokens - 1 + i``, normalised and plus a per-position
    embedding, conditions the diffusion head that predicts latent token ``i``.
    """

    config_fields = TransformerFields  # the type and range of each config field (checked at load)

    def __init__(self, config: SphereARConfig):
        super().__init__(config)
        c = config
        self.gradient_checkpointing = False
        self.class_embedding = nn.Embedding(c.num_classes + 1, c.hidden_size * c.num_class_tokens)
        self.proj_in = nn.Linear(c.latent_dim, c.hidden_size)
        self.input_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.layers = nn.ModuleList(
            TransformerBlock(c.hidden_size, c.num_attention_heads, c.intermediate_size, causal=True, eps=c.rms_norm_eps)
            for _ in range(c.num_hidden_layers)
        )
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.head_pos_embedding = nn.Embedding(c.num_image_tokens, c.hidden_size)
        self.head = DiffusionHead(c.latent_dim, c.hidden_size, c.head_hidden_size, c.head_num_layers, c.head_num_adaln)
        self.head_modules = frozenset(self.head.modules())  # initialised by DiffusionHead.reset_parameters only
        self.rope = Rope2D(c.hidden_size // c.num_attention_heads, c.grid_size, c.num_class_tokens, c.rope_theta,
                           drop_last=True)
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, refused while PEFT adapters are injected (PEFT's public
        ``peft_config`` marker, set on injection and removed on unload / merge): the weights would be written under
        PEFT's names (``base_layer``, ``lora_A``) and reload as random weights."""
        if getattr(self, "peft_config", None):
            raise RuntimeError(
                "this transformer carries LoRA adapters, and its weights would be saved under PEFT's names (a folder "
                "that loads with random weights): merge_lora(pipe) to save the merged model, unload_lora(pipe) to "
                "save the base model, save_lora(pipe, folder) to save the adapter")
        saving = SAVE_SIGNATURE.bind(self, save_directory, *args, **kwargs).arguments
        out = super().save_pretrained(save_directory, *args, **kwargs)
        write_architecture(saving, self.config, TRANSFORMER_ARCHITECTURE)
        return out

    save_pretrained.__signature__ = SAVE_SIGNATURE

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    # submodules trained without weight decay (official ``non_decay_keys``); the rule: training/optimization.py
    _no_weight_decay_modules = ("proj_in", "class_embedding")

    def _class_tokens(self, class_labels: torch.Tensor) -> torch.Tensor:
        return self.class_embedding(class_labels).view(class_labels.shape[0], self.config.num_class_tokens, -1)

    def label_drop_mask(self, class_labels: torch.Tensor, generator: torch.Generator | None = None
                        ) -> torch.Tensor | None:
        """Which labels become the null class: each with probability ``class_dropout_prob`` (one uniform draw per
        label from ``generator``); ``None`` when the probability is 0 (nothing drawn)."""
        p = self.config.class_dropout_prob
        if p <= 0:
            return None
        gdev = generator.device if generator is not None else class_labels.device
        return torch.rand(class_labels.shape, generator=generator, device=gdev).to(class_labels.device) < p

    def drop_labels(self, class_labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null class with probability ``class_dropout_prob``."""
        drop = self.label_drop_mask(class_labels, generator)
        if drop is None:
            return class_labels
        return torch.where(drop, torch.full_like(class_labels, self.null_class_id), class_labels)

    def draw_training_inputs(self, latents: torch.Tensor, class_labels: torch.Tensor,
                             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The random draws of one training :meth:`forward`, in the order it makes them itself: in training mode
        (with ``class_dropout_prob`` > 0) the label-drop mask, then ``timesteps = sigmoid(N(0, 1))`` and the
        ``noise``, one row per token and ``diff_batch_mul`` copy. Drawn before a compiled ``forward`` (a generator
        inside it breaks the graph), they are passed as keyword arguments:
        ``model(x, y, **model.draw_training_inputs(x, y, g))`` equals ``model(x, y, generator=g)``."""
        c = self.config
        device = latents.device
        gdev = generator.device if generator is not None else device
        draws = {}
        mask = self.label_drop_mask(class_labels.reshape(-1).to(device), generator) if self.training else None
        if mask is not None:
            draws["label_drop_mask"] = mask
        rows = latents.shape[0] * latents.shape[1] * c.diff_batch_mul
        draws["timesteps"] = torch.randn(rows, generator=generator, device=gdev).to(device).sigmoid()
        draws["noise"] = torch.randn(rows, latents.shape[-1], generator=generator, device=gdev).to(device)
        return draws

    def get_input_embeddings(self) -> nn.Embedding:
        """The class embedding: class id (``num_classes`` is the null class) -> ``num_class_tokens`` input tokens."""
        return self.class_embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the class embedding (``num_classes + 1`` rows of ``hidden_size * num_class_tokens``)."""
        c = self.config
        shape = (c.num_classes + 1, c.hidden_size * c.num_class_tokens)
        if not isinstance(value, nn.Embedding) or tuple(value.weight.shape) != shape:
            got = tuple(value.weight.shape) if isinstance(value, nn.Embedding) else type(value).__name__
            raise ValueError(f"the class embedding must be an nn.Embedding of shape {shape}, got {got}")
        self.class_embedding = value

    def compute_head_condition(self, latents: torch.Tensor, class_labels: torch.Tensor,
                               hidden_states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Teacher-forced head conditions ``(B, L, hidden)`` for tokens ``latents`` (B, L, latent_dim); the trunk's
        input and each block's output are appended to ``hidden_states`` if given."""
        x = self.proj_in(latents[:, :-1].to(self.proj_in.weight.dtype))
        x = self.input_norm(torch.cat([self._class_tokens(class_labels), x], dim=1))
        if hidden_states is not None:
            hidden_states.append(x)
        x = run_blocks(self.layers, x, self.rope.get(x.device), hidden_states=hidden_states)
        x = self.norm(x[:, -self.config.num_image_tokens:])
        return x + self.head_pos_embedding.weight

    def forward(self, latents: torch.Tensor, class_labels: torch.Tensor, generator: torch.Generator | None = None,
                return_dict: bool | None = None, output_hidden_states: bool | None = None,
                label_drop_mask: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, **kwargs) -> SphereARTransformerOutput | tuple:
        """Flow-matching training loss for sphere tokens ``latents`` (B, L, latent_dim) of classes ``class_labels``.

        In training mode labels are dropped to the null class with ``class_dropout_prob``. The head batch is
        repeated ``diff_batch_mul`` times with independent ``t = sigmoid(N(0, 1))`` and noise, drawn from
        ``generator`` unless given as ``timesteps`` and ``noise`` (with ``label_drop_mask``: see
        :meth:`draw_training_inputs`, which keeps a compiled forward in one graph). ``return_dict`` and
        ``output_hidden_states`` default to the config's; the tuple holds the output's fields that are set, in
        order: ``(loss, head_condition[, hidden_states])``.
        """
        c = self.config
        return_dict = return_dict if return_dict is not None else c.return_dict
        output_hidden_states = output_hidden_states if output_hidden_states is not None else c.output_hidden_states
        if latents.dim() != 3 or latents.shape[1:] != (c.num_image_tokens, c.latent_dim):
            raise ValueError(f"latents must have shape (batch, {c.num_image_tokens}, {c.latent_dim}), "
                             f"got {tuple(latents.shape)}")
        class_labels = class_labels.to(latents.device).long().view(-1)
        if timesteps is None or noise is None:
            draws = self.draw_training_inputs(latents, class_labels, generator)
            label_drop_mask, timesteps, noise = draws.get("label_drop_mask"), draws["timesteps"], draws["noise"]
        rows = latents.shape[0] * c.num_image_tokens * c.diff_batch_mul
        if timesteps.shape != (rows,) or noise.shape != (rows, c.latent_dim):
            raise ValueError(f"timesteps and noise must have shapes ({rows},) and ({rows}, {c.latent_dim}), got "
                             f"{tuple(timesteps.shape)} and {tuple(noise.shape)}")
        if label_drop_mask is not None:
            class_labels = torch.where(label_drop_mask.to(latents.device), self.null_class_id, class_labels)
        hidden_states = [] if output_hidden_states else None
        cond = self.compute_head_condition(latents, class_labels, hidden_states)
        z = cond.reshape(-1, cond.shape[-1]).repeat(c.diff_batch_mul, 1)
        target = latents.reshape(-1, c.latent_dim).float().repeat(c.diff_batch_mul, 1)
        t, noise = timesteps.to(target.device), noise.to(target.device)
        x_t, v_target = flow_path(target, noise, t)
        v = self.head(x_t, t, z).float()
        loss = F.mse_loss(v, v_target)
        out = SphereARTransformerOutput(loss=loss, head_condition=cond,
                                        hidden_states=tuple(hidden_states) if hidden_states is not None else None)
        return out if return_dict else out.to_tuple()

    # ---- incremental decoding -------------------------------------------------------------------------------
    def allocate_kv_cache(self, batch_size: int, device: torch.device | None = None,
                          dtype: torch.dtype | None = None) -> KVCache:
        """A preallocated cache for one whole sequence (class tokens + L - 1 latent tokens, and one spare position)."""
        p = self.proj_in.weight
        return KVCache(*self._kv_cache_dims(batch_size), device or p.device, dtype or p.dtype)

    def kv_cache_bytes(self, batch_size: int, dtype: torch.dtype | None = None) -> int:
        """The memory :meth:`allocate_kv_cache` takes for ``batch_size`` rows (keys and values)."""
        elements = math.prod(self._kv_cache_dims(batch_size))
        return 2 * elements * (dtype or self.proj_in.weight.dtype).itemsize

    def _kv_cache_dims(self, batch_size: int) -> tuple[int, int, int, int, int]:
        c = self.config
        # one position more than the sequence: no token's keys end at the cache's last position, so the slices the
        # compiled trunk step reads are one shape class for every token (else dynamo compiles the last one apart)
        return (c.num_hidden_layers, batch_size, c.num_attention_heads, len(self.rope) + 1,
                c.hidden_size // c.num_attention_heads)

    def _decode(self, x: torch.Tensor, start: int, cache: KVCache, token_index: int) -> torch.Tensor:
        cos, sin = self.rope.get(x.device)
        end = start + x.shape[1]
        x = run_blocks(self.layers, self.input_norm(x), (cos[start:end], sin[start:end]), cache, start)
        # a kernel, no copy or wait; arange, not full: torch 2.6's compile specialises full's value (a graph per token)
        position = torch.arange(token_index, token_index + 1, device=x.device)
        return self.norm(x[:, -1]) + self.head_pos_embedding(position)  # the module (its offload hook), not .weight

    @offload_entry_point
    def sampling_plan(self, timesteps: torch.Tensor, rows: int, exact: bool = True,
                      max_bytes: int = MODULATION_BYTES) -> SamplingPlan:
        """The head's :class:`SamplingPlan` for one call (``timesteps`` on the execution device)."""
        return self.head.sampling_plan(timesteps, rows, exact, max_bytes)

    def sampling_plan_bytes(self, steps: int, rows: int, exact: bool = True) -> int:
        """The memory :meth:`sampling_plan` takes for ``steps`` evaluations per token and ``rows`` rows."""
        return SamplingPlan.estimate_bytes(self.head, steps, rows, self.dtype, exact)

    @offload_entry_point
    def prefill(self, class_labels: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run the class tokens; return the head condition ``(B, hidden)`` for latent token 0."""
        return self._decode(self._class_tokens(class_labels), 0, cache, 0)

    @offload_entry_point
    def decode_step(self, token: torch.Tensor, index: int, cache: KVCache) -> torch.Tensor:
        """Feed latent token ``index`` (B, latent_dim), on the sphere; return the condition for token ``index + 1``."""
        x = self.proj_in(token.to(self.proj_in.weight.dtype)).unsqueeze(1)
        return self._decode(x, self.config.num_class_tokens + index, cache, index + 1)


AutoModel.register(SphereARConfig, SphereARTransformer, exist_ok=True)
