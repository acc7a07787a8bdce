"""SphereARTransformer: class tokens + causal trunk with 2D RoPE + a per-token flow-matching MLP head."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_sphere_ar import SphereARConfig
from .layers import KVCache, Rope2D, TransformerBlock, align_loaded, run_blocks
from .scheduling_sphere_ar import flow_path

__all__ = ["SphereARTransformer", "SphereARTransformerOutput", "DiffusionHead"]


@dataclass
class SphereARTransformerOutput(ModelOutput):
    """``loss``: flow-matching velocity MSE; ``head_condition``: per-token conditions ``(B, L, hidden)``."""

    loss: torch.Tensor | None = None
    head_condition: torch.Tensor | None = None


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


class HeadResBlock(nn.Module):
    """LayerNorm -> adaLN modulation -> SwiGLU (width 1.5x) -> gated residual."""

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


class DiffusionHead(nn.Module):
    """The per-token velocity MLP: input ``x_t`` (N, latent_dim), time ``t`` (N,), condition ``z`` (N, hidden).

    One adaLN projection is shared by each run of ``num_layers / num_adaln`` consecutive blocks. For sampling,
    the condition and time embeddings are computed separately (:meth:`embed_condition`, :meth:`embed_time`) so
    that each is computed once per token / once per step, not once per evaluation.
    """

    def __init__(self, latent_dim: int, cond_dim: int, dim: int, num_layers: int, num_adaln: int):
        super().__init__()
        self.gradient_checkpointing = False
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
        return self.cond_embed(z)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embed(t)

    @property
    def modulation_width(self) -> int:
        """Columns of all adaLN outputs together (see :meth:`modulation`)."""
        return sum(m.out_features for m in self.adaln) + self.final_adaln.out_features

    def modulation(self, t_emb: torch.Tensor, c_emb: torch.Tensor, per_step: bool = False) -> list[torch.Tensor]:
        """Every adaLN projection of ``silu(t_emb + c_emb)`` (broadcast together), ``1`` already added to each scale.

        Returns one tensor ``(..., 3 * dim)`` (scale + 1, shift, gate) per shared adaLN and one ``(..., 2 * dim)``
        (scale + 1, shift) for the final layer. It does not depend on the state ``x``, so the sampler computes it
        for many steps at once (``t_emb`` (steps, 1 or rows, dim), ``c_emb`` (rows, dim)): in one product per
        projection, or with ``per_step`` in one product of ``rows`` rows per step and projection, the official
        shapes (a product's rounding can depend on its row count), issued back to back so that each projection's
        weight stays in cache.
        """
        y = F.silu(t_emb + c_emb)
        dim = self.final_linear.in_features
        layers = [*self.adaln, self.final_adaln]
        if per_step:
            mods = [torch.stack([m(y_k) for y_k in y]) for m in layers]
        else:
            mods = [m(y) for m in layers]
        for m in mods:
            m[..., :dim] += 1  # the same float32 ``1 + scale`` as the unfused form
        return mods

    def transposed_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Contiguous ``(w1.weight.T, w2.weight.T)`` of each residual block, for :meth:`velocity_from_modulation`.

        ``None`` when a block's linear is not a plain ``nn.Linear`` (e.g. wrapped by a LoRA adapter): its
        ``weight`` would then be the base weight alone, and the product must go through the module.
        """
        if any(type(m) is not nn.Linear for b in self.res_blocks for m in (b.w1, b.w2)):
            return None
        return [(b.w1.weight.t().contiguous(), b.w2.weight.t().contiguous()) for b in self.res_blocks]

    @torch.no_grad()
    def batched_modulation_is_exact(self, rows: int, steps: int) -> bool:
        """Whether :meth:`modulation` of ``steps`` steps in one product per projection gives, bit for bit, what one
        product of ``rows`` rows per step gives, here (the BLAS kernels, thread count, dtype and device decide).
        Probed on random inputs from a fixed private generator: a different summation order shows up at once."""
        weight = self.final_adaln.weight
        g = torch.Generator().manual_seed(0)
        y = torch.randn(steps, rows, self.final_linear.in_features, generator=g).to(weight.device, weight.dtype)
        return all(torch.equal(m(y), torch.stack([m(y_k) for y_k in y])) for m in [*self.adaln, self.final_adaln])

    @torch.no_grad()
    def transposed_weights_are_exact(self, rows: int, weights_t: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Whether products of ``rows`` rows with :meth:`transposed_weights` equal the blocks' own, bit for bit."""
        g = torch.Generator().manual_seed(0)
        for block, (w1t, w2t) in zip(self.res_blocks, weights_t):
            w = block.w1.weight
            u = torch.randn(rows, w1t.shape[0], generator=g).to(w.device, w.dtype)
            a = torch.randn(rows, w2t.shape[0], generator=g).to(w.device, w.dtype)
            if not (torch.equal(block.w1(u), torch.addmm(block.w1.bias, u, w1t))
                    and torch.equal(block.w2(a), torch.addmm(block.w2.bias, a, w2t))):
                return False
        return True

    def velocity_from_modulation(self, x: torch.Tensor, mods: Sequence[torch.Tensor], repeat: int = 1,
                                 weights_t: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Velocity at ``x`` (n, latent_dim) given one step's rows of :meth:`modulation` (each (n * repeat, width)).

        ``repeat > 1``: the state is shared by ``repeat`` row blocks (the conditional and unconditional halves of
        classifier-free guidance). ``weights_t``: :meth:`transposed_weights`; the residual blocks' products then
        read the weights in (in, out) layout, which MKL multiplies faster for a few dozen rows (same values).
        The float32 operations are those of the official head, in the same order.
        """
        dim = self.final_linear.in_features
        x = x.to(self.input_proj.weight.dtype)
        h = self.input_proj(torch.cat([x] * repeat) if repeat > 1 else x)
        for i, block in enumerate(self.res_blocks):
            if i % self.adaln_every == 0:
                mod = mods[i // self.adaln_every]
                scale1, shift, gate = mod[:, :dim], mod[:, dim:2 * dim], mod[:, 2 * dim:]
            u = block.norm(h) * scale1 + shift
            if weights_t is None:
                a, b = block.w1(u).chunk(2, dim=-1)
                h = h + block.w2(F.silu(a) * b) * gate
            else:
                w1t, w2t = weights_t[i]
                a, b = torch.addmm(block.w1.bias, u, w1t).chunk(2, dim=-1)
                h = h + torch.addmm(block.w2.bias, F.silu(a) * b, w2t) * gate
        mod = mods[-1]
        return self.final_linear(self.final_norm(h) * mod[:, :dim] + mod[:, dim:])

    def velocity(self, x: torch.Tensor, t_emb: torch.Tensor, c_emb: torch.Tensor) -> torch.Tensor:
        """Velocity from precomputed time (N or 1, dim) and condition (N, dim) embeddings."""
        h = self.input_proj(x.to(self.input_proj.weight.dtype))
        y = F.silu(t_emb + c_emb)
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.res_blocks):
            if i % self.adaln_every == 0:
                scale, shift, gate = self.adaln[i // self.adaln_every](y).chunk(3, dim=-1)
            if ckpt:
                h = self._gradient_checkpointing_func(block, h, scale, shift, gate)
            else:
                h = block(h, scale, shift, gate)
        scale, shift = self.final_adaln(y).chunk(2, dim=-1)
        return self.final_linear(self.final_norm(h) * (1 + scale) + shift)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.velocity(x, self.embed_time(t), self.embed_condition(z))


class SphereARPreTrainedModel(PreTrainedModel):
    config_class = SphereARConfig
    base_model_prefix = "sphere_ar"
    main_input_name = "latents"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransformerBlock", "HeadResBlock"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained``, with the CPU weights in aligned memory (``layers.align_tensors_``)."""
        return align_loaded(super().from_pretrained(*args, **kwargs))

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, DiffusionHead):
            module.reset_parameters()
        elif isinstance(module, (nn.Linear, nn.Embedding)) and not getattr(module, "_is_head", False):
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

    def __init__(self, config: SphereARConfig):
        super().__init__(config)
        c = config
        self.gradient_checkpointing = False
        self.class_embedding = nn.Embedding(c.num_classes + 1, c.hidden_size * c.num_class_tokens)
        self.proj_in = nn.Linear(c.latent_dim, c.hidden_size)
        self.input_norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.layers = nn.ModuleList(
            TransformerBlock(c.hidden_size, c.num_attention_heads, c.intermediate_size, causal=True, eps=c.rms_norm_eps)
            for _ in range(c.num_hidden_layers)
        )
        self.norm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.head_pos_embedding = nn.Embedding(c.num_image_tokens, c.hidden_size)
        self.head = DiffusionHead(c.latent_dim, c.hidden_size, c.head_hidden_size, c.head_num_layers, c.head_num_adaln)
        for m in self.head.modules():
            m._is_head = True
        self.rope = Rope2D(c.hidden_size // c.num_attention_heads, c.grid_size, c.num_class_tokens, c.rope_theta,
                           drop_last=True)
        self.post_init()

    @property
    def null_class_id(self) -> int:
        return self.config.num_classes

    def non_decay_parameter_names(self) -> list[str]:
        """Parameters trained without weight decay (official): 1-d tensors, the input projection, class embedding."""
        return [n for n, p in self.named_parameters()
                if p.ndim < 2 or n.startswith("proj_in.") or n.startswith("class_embedding.")]

    def _class_tokens(self, class_labels: torch.Tensor) -> torch.Tensor:
        return self.class_embedding(class_labels).view(class_labels.shape[0], self.config.num_class_tokens, -1)

    def drop_labels(self, class_labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null class with probability ``class_dropout_prob``."""
        p = self.config.class_dropout_prob
        if p <= 0:
            return class_labels
        gdev = generator.device if generator is not None else class_labels.device
        drop = torch.rand(class_labels.shape, generator=generator, device=gdev).to(class_labels.device) < p
        return torch.where(drop, torch.full_like(class_labels, self.null_class_id), class_labels)

    def compute_head_condition(self, latents: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced head conditions ``(B, L, hidden)`` for tokens ``latents`` (B, L, latent_dim)."""
        x = self.proj_in(latents[:, :-1].to(self.proj_in.weight.dtype))
        x = self.input_norm(torch.cat([self._class_tokens(class_labels), x], dim=1))
        x = run_blocks(self, self.layers, x, self.rope.get(x.device))
        x = self.norm(x[:, -self.config.num_image_tokens:])
        return x + self.head_pos_embedding.weight

    def forward(self, latents: torch.Tensor, class_labels: torch.Tensor, generator: torch.Generator | None = None,
                return_dict: bool = True, **kwargs) -> SphereARTransformerOutput | tuple:
        """Flow-matching training loss for sphere tokens ``latents`` (B, L, latent_dim) of classes ``class_labels``.

        In training mode labels are dropped to the null class with ``class_dropout_prob``. The head batch is
        repeated ``diff_batch_mul`` times with independent ``t = sigmoid(N(0, 1))`` and noise.
        """
        c = self.config
        if latents.dim() != 3 or latents.shape[1:] != (c.num_image_tokens, c.latent_dim):
            raise ValueError(f"latents must have shape (batch, {c.num_image_tokens}, {c.latent_dim}), "
                             f"got {tuple(latents.shape)}")
        class_labels = class_labels.to(latents.device).long().view(-1)
        if self.training:
            class_labels = self.drop_labels(class_labels, generator)
        cond = self.compute_head_condition(latents, class_labels)
        z = cond.reshape(-1, cond.shape[-1]).repeat(c.diff_batch_mul, 1)
        target = latents.reshape(-1, c.latent_dim).float().repeat(c.diff_batch_mul, 1)
        gdev = generator.device if generator is not None else target.device
        t = torch.randn(target.shape[0], generator=generator, device=gdev).to(target.device).sigmoid()
        noise = torch.randn(target.shape, generator=generator, device=gdev).to(target.device)
        x_t, v_target = flow_path(target, noise, t)
        v = self.head(x_t, t, z).float()
        loss = F.mse_loss(v, v_target)
        if not return_dict:
            return (loss, cond)
        return SphereARTransformerOutput(loss=loss, head_condition=cond)

    # ---- incremental decoding -------------------------------------------------------------------------------
    def allocate_kv_cache(self, batch_size: int, device: torch.device | None = None,
                          dtype: torch.dtype | None = None) -> KVCache:
        """A preallocated cache for one whole sequence (class tokens + L - 1 latent tokens)."""
        c = self.config
        p = self.proj_in.weight
        return KVCache(c.num_hidden_layers, batch_size, c.num_attention_heads, len(self.rope),
                       c.hidden_size // c.num_attention_heads, device or p.device, dtype or p.dtype)

    def _decode(self, x: torch.Tensor, start: int, cache: KVCache, token_index: int) -> torch.Tensor:
        cos, sin = self.rope.get(x.device)
        end = start + x.shape[1]
        x = run_blocks(self, self.layers, self.input_norm(x), (cos[start:end], sin[start:end]), cache, start)
        return self.norm(x[:, -1]) + self.head_pos_embedding.weight[token_index]

    def prefill(self, class_labels: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run the class tokens; return the head condition ``(B, hidden)`` for latent token 0."""
        return self._decode(self._class_tokens(class_labels), 0, cache, 0)

    def decode_step(self, token: torch.Tensor, index: int, cache: KVCache) -> torch.Tensor:
        """Feed latent token ``index`` (B, latent_dim), on the sphere; return the condition for token ``index + 1``."""
        x = self.proj_in(token.to(self.proj_in.weight.dtype)).unsqueeze(1)
        return self._decode(x, self.config.num_class_tokens + index, cache, index + 1)
