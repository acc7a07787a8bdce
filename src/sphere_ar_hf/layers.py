"""Building blocks shared by the S-VAE's ViTs and the AR trunk: SwiGLU, 2D RoPE, attention with a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

__all__ = ["FeedForward", "Attention", "RMSNorm", "TransformerBlock", "KVCache", "Rope2D", "align_loaded",
           "align_tensors_", "swiglu_hidden_size"]

CPU_ALIGNMENT = 64  # bytes: what PyTorch's CPU allocator gives every new tensor


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose weight follows the input's dtype, so that under autocast (float32 weights, bf16
    activations) ``F.rms_norm`` gets matching dtypes and runs the fused kernel instead of the unfused fallback.
    In float32 it is exactly ``nn.RMSNorm``; the state-dict keys are the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight is not None and weight.dtype != x.dtype:
            weight = weight.to(x.dtype)  # as LlamaRMSNorm: the weight is applied in the activations' dtype
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


def swiglu_hidden_size(dim: int, multiple_of: int = 256) -> int:
    """The official SwiGLU width: 2/3 of 4 * dim, rounded up to a multiple of 256."""
    hidden = int(2 * (4 * dim) / 3)
    return -(-hidden // multiple_of) * multiple_of


def grid_positions(grid_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(x, y) patch centres of a ``grid_size`` x ``grid_size`` raster, in patch units, as in the official code."""
    centers = torch.arange(grid_size, dtype=torch.float32, device=device) + 0.5
    gy, gx = torch.meshgrid(centers, centers, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


class Rope2D:
    """2D rotary position embedding: half of each head's rotary pairs encode x, half encode y.

    The first ``num_prefix`` positions (class or register tokens) get position 0 (no rotation); the patches get
    their grid centre + 1; ``drop_last`` leaves out the last patch (the AR input never holds it).
    """

    def __init__(self, head_dim: int, grid_size: int, num_prefix: int, theta: float = 10000.0, drop_last: bool = False):
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        self.head_dim, self.grid_size, self.num_prefix, self.theta = head_dim, grid_size, num_prefix, theta
        self.length = num_prefix + grid_size * grid_size - int(drop_last)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.length

    def _tables(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        quarter, half = self.head_dim // 4, self.head_dim // 2
        exps = torch.arange(0, half, 2, device=device)[:quarter].float() / half
        freqs = 1.0 / (self.theta**exps)
        pos = torch.cat([torch.zeros(self.num_prefix, 2, device=device), grid_positions(self.grid_size, device) + 1.0])
        angles = torch.outer(pos.flatten(), freqs).view(pos.shape[0], -1)[: self.length]  # (seq, hd/2): x then y
        return angles.cos(), angles.sin()

    def get(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` tables ``(seq, head_dim // 2)`` on ``device`` (built once per device).

        Eager calls build them on the CPU (models may be constructed under a meta-device context) and keep them. A
        ``torch.compile``-d call that finds none builds them inside its graph and keeps nothing: a compiled call that
        filled the cache would fail its own graph's guard on its next call (a second compile)."""
        if device not in self._cache:
            if torch.compiler.is_compiling():
                return self._tables(device)
            cos, sin = self._tables()
            self._cache[device] = (cos.to(device), sin.to(device))
        return self._cache[device]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` (B, H, L, D) by ``cos``/``sin`` (L, D // 2), in float32."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return out.type_as(x)


class KVCache:
    """Preallocated keys and values for one whole sequence: per layer, ``k[layer]`` and ``v[layer]`` of shape
    ``(batch, heads, max_len, head_dim)``. One tensor per layer, so that a compiled trunk step writes each layer's
    new keys in place (with one tensor for all layers, inductor copies the whole cache at every layer's write:
    measured 3x slower than eager on SphereAR-B at 16 rows)."""

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (batch_size, num_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        """The memory the keys and values take."""
        return sum(t.nbytes for t in (*self.k, *self.v))

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Multi-head self-attention (fused qkv, no biases).

    Without a cache: ``scaled_dot_product_attention``. With a :class:`KVCache` (incremental decoding): explicit
    ``softmax(q k^T / sqrt(d)) v`` as in the official KV-cache path, which for a query of one token (a few dozen
    keys) is also cheaper than the fused kernel's setup.
    """

    def __init__(self, dim: int, num_heads: int, causal: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} attention heads")
        self.num_heads, self.head_dim, self.causal = num_heads, dim // num_heads, causal
        self.scale = self.head_dim**-0.5
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None,
                layer_idx: int = 0, start: int = 0) -> torch.Tensor:
        b, n, _ = x.shape
        cos, sin = rope
        if cache is None:
            q, k, v = self.wqkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            return self.wo(out.transpose(1, 2).reshape(b, n, -1))
        qkv = self.wqkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[:2], cos, sin).unbind(0)  # q and k rotated together
        k, v = cache.update(layer_idx, start, k, qkv[2])
        attn = (q * self.scale) @ k.transpose(-1, -2)  # (b, heads, n, start + n)
        if self.causal and n > 1:
            i = torch.arange(n, device=x.device).unsqueeze(1)
            j = torch.arange(start + n, device=x.device).unsqueeze(0)
            attn.masked_fill_(j > start + i, float("-inf"))
        out = torch.softmax(attn, dim=-1) @ v
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP with fused gate/up projection ``w1`` and down projection ``w2``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(GradientCheckpointingLayer):
    """Pre-norm block: RMSNorm -> attention -> residual, RMSNorm -> SwiGLU -> residual.

    A ``GradientCheckpointingLayer``: with checkpointing enabled (transformers' ``gradient_checkpointing_enable`` or
    diffusers' ``enable_gradient_checkpointing`` on the model that holds it), in training mode and with gradients
    on, the block recomputes its activations in the backward pass. Pass the cache positionally (transformers drops
    a ``cache=`` keyword under checkpointing); the recompute writes the same keys and values again.
    """

    def __init__(self, dim: int, num_heads: int, hidden: int, causal: bool, eps: float = 1e-6):
        super().__init__()
        self.attention_norm = RMSNorm(dim, eps=eps)
        self.attention = Attention(dim, num_heads, causal)
        self.ffn_norm = RMSNorm(dim, eps=eps)
        self.feed_forward = FeedForward(dim, hidden)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None,
                layer_idx: int = 0, start: int = 0) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, cache, layer_idx, start)
        return x + self.feed_forward(self.ffn_norm(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               cache: KVCache | None = None, start: int = 0,
               hidden_states: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Run ``blocks`` in order (each checkpoints itself when enabled: :class:`TransformerBlock`); append each
    block's output to ``hidden_states`` if given."""
    for i, block in enumerate(blocks):
        x = block(x, rope, cache, i, start)
        if hidden_states is not None:
            hidden_states.append(x)
    return x


@torch.no_grad()
def align_tensors_(module: nn.Module, alignment: int = CPU_ALIGNMENT) -> int:
    """Move CPU parameters and buffers whose data does not start on an ``alignment``-byte boundary to fresh memory.

    Weights loaded from a safetensors file are views of the file at 8-byte offsets. MKL's products of one row
    round differently for such weights than for allocator-aligned ones (the same values), so a loaded model would
    not reproduce the official code's images at batch 1 (which loads aligned copies). Returns how many moved.
    """
    moved = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % alignment:
            tensor.data = tensor.data.clone(memory_format=torch.preserve_format)
            moved += 1
    return moved


def align_loaded(loaded):
    """:func:`align_tensors_` on what a ``from_pretrained`` returned: a model, or ``(model, loading_info)``."""
    align_tensors_(loaded[0] if isinstance(loaded, tuple) else loaded)
    return loaded
