"""Fast ViT pieces: SDPA attention, the MLP and the block whose adapter adds into the residual in one kernel.

Attention and MLP use their frozen weights' autocast casts once per weight, not once per call
(:mod:`mosaic_fast.nn.frozen_cast`), and run fp32 on CPU through oneDNN (:mod:`mosaic_fast.ops.cpu_gemm`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from ..reference.checks import check_features, check_tokens
from ..reference.vit import layer_weight
from .adapter import MoSAdapter
from .bypass import global_hooks, has_hooks
from .frozen_cast import linear, linear_act


def fuses_adapter(block: reference.Block) -> bool:
    """Whether ``block`` may add its adapter through :meth:`MoSAdapter.forward_fused` (which bypasses the
    adapter's own hooks): the adapter is the fast MoSAdapter and nothing hooks it."""
    return type(block.adapter) is MoSAdapter and not has_hooks(block.adapter) and not global_hooks()


class Attention(reference.Attention):
    """Same parameters as the reference (``scale`` included); computed with ``scaled_dot_product_attention``
    (flash/mem-eff), except on CPU in bfloat16 (see :meth:`attend`)."""

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> q, k, v each (B, heads, N, head_dim), the qkv projection with its cached autocast cast."""
        b, n, _ = x.shape
        qkv = linear(self, self.qkv, x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ · scale) v through ``scaled_dot_product_attention``; on CPU in bfloat16 through the
        reference's explicit product instead: there torch's fused CPU attention took 1.5–3.8× as long for
        forward + backward and was no faster forward (Zen 5, torch 2.14; in float32 and float16 it is the
        faster one)."""
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            return super().attend(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference's attention through :meth:`attend` and the cached casts of the frozen weights."""
        check_tokens(x, self.dim, "x", layer_weight(self.qkv))
        b, n, d = x.shape
        q, k, v = self.split_heads(x)
        return linear(self, self.proj, self.attend(q, k, v).transpose(1, 2).reshape(b, n, d))


class Mlp(reference.Mlp):
    """Same parameters and arithmetic as the reference (exact GELU, fused into fc1 on CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reference's ``fc2(gelu(fc1(x)))`` with cached autocast casts (GELU fused on CPU)."""
        check_features("x", x, self.dim, layer_weight(self.fc1))
        return linear(self, self.fc2, linear_act(self, self.fc1, x, self.act))


class Block(reference.Block):
    """Parallel-adapter block; ``x + mlp(h)`` is the base the fused adapter kernel adds into."""

    def forward(self, x: torch.Tensor, expert_id: str | torch.Tensor) -> torch.Tensor:
        """``x + attn(norm1(x))``, then ``+ ffn(h) + adapter(h, expert_id)`` with the adapter's add fused."""
        check_tokens(x, self.dim, "x", layer_weight(getattr(self.ffn, "fc1", None)))
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        if not fuses_adapter(self):
            return x + self.ffn(h) + self.adapter(h, expert_id)
        return self.adapter.forward_fused(h, x + self.ffn(h), expert_id)

    def forward_packed(self, xs: list[torch.Tensor], row_expert: torch.Tensor) -> list[torch.Tensor]:
        """One block over several batches of different sequence lengths (e.g. 2D with 197 tokens and 3D
        with 513): attention per batch (SDPA), then LayerNorm, MLP and the grouped adapter over the packed
        token stream in one launch. ``row_expert`` holds the specialist (0/1/2) of every packed row."""
        xs = [x + self.attn(self.norm1(x)) for x in xs]
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])
        h = self.norm2(flat)
        if fuses_adapter(self):
            out = self.adapter.forward_fused(h[:, None], (flat + self.ffn(h))[:, None], row_expert)[:, 0]
        else:
            out = flat + self.ffn(h) + self.adapter(h[:, None], row_expert)[:, 0]
        return [o.view_as(x) for o, x in zip(out.split([x.shape[0] * x.shape[1] for x in xs]), xs)]
