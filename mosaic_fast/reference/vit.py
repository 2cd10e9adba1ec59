"""Reference ViT pieces of MOSAIC: attention, MLP, the parallel-adapter block and the encoder.

Attribute names (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``ffn.fc1``, ``ffn.fc2``,
``adapter``, ``blocks``, ``norm``) follow the seed repository, so its checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import MoSAdapter
from .checks import check_features, check_tokens


def layer_weight(layer: nn.Module | None) -> torch.Tensor | None:
    """The ``weight`` tensor of a layer, or None when it has none (a replaced or wrapped layer, or no layer): the input
    dtype is then checked by the layer itself."""
    weight = getattr(layer, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


class Attention(nn.Module):
    """Standard multi-head self-attention, computed explicitly (softmax(q kᵀ / sqrt(d)) v)."""

    def __init__(self, dim: int = 768, num_heads: int = 12, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> q, k, v each (B, heads, N, head_dim)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ · scale) v over (B, heads, N, head_dim)."""
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return attn @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention of x (B, N, D) -> (B, N, D)."""
        check_tokens(x, self.dim, "x", layer_weight(self.qkv))
        b, n, d = x.shape
        q, k, v = self.split_heads(x)
        return self.proj(self.attend(q, k, v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear(D, 4D) -> exact GELU -> Linear(4D, D)."""

    def __init__(self, dim: int = 768, hidden_dim: int = 3072) -> None:
        super().__init__()
        self.dim = dim
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``fc2(gelu(fc1(x)))``."""
        check_features("x", x, self.dim, layer_weight(self.fc1))
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Parallel-adapter block: ``x = x + attn(norm1(x)); h = norm2(x); x = x + mlp(h) + adapter(h)``."""

    adapter_cls = MoSAdapter
    attention_cls = Attention

    def __init__(
        self,
        dim: int = 768,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        adapter_bottleneck_a: int = 64,
        adapter_bottleneck_b: int = 96,
        adapter_bottleneck_c: int = 192,
        adapter_dropout: float = 0.0,
        adapter_scalar: float = 0.1,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = self.attention_cls(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.ffn = Mlp(dim, int(dim * mlp_ratio))
        self.adapter = self.adapter_cls(
            dim, adapter_bottleneck_a, adapter_bottleneck_b, adapter_bottleneck_c,
            adapter_dropout, "lora", adapter_scalar,
        )

    def forward(self, x: torch.Tensor, expert_id: str | torch.Tensor) -> torch.Tensor:
        """``x + attn(norm1(x))``, then ``+ ffn(h) + adapter(h, expert_id)`` with h = norm2(x)."""
        check_tokens(x, self.dim, "x", layer_weight(getattr(self.ffn, "fc1", None)))
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + self.ffn(h) + self.adapter(h, expert_id)


class Encoder(nn.Module):
    """``depth`` blocks and the final LayerNorm (seed: ``TransformerEncoder``)."""

    block_cls = Block

    def __init__(self, depth: int = 12, dim: int = 768, **block_kwargs) -> None:
        super().__init__()
        self.depth, self.dim = depth, dim
        self.blocks = nn.ModuleList([self.block_cls(dim, **block_kwargs) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, expert_id: str | torch.Tensor) -> torch.Tensor:
        """Every block with the same routing ``expert_id``, then the final LayerNorm."""
        check_tokens(x, self.dim, "x")  # (the dtype: in the blocks)
        for block in self.blocks:
            x = block(x, expert_id)
        return self.norm(x)
