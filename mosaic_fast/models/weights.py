"""Load Google's ImageNet-21k ViT checkpoints (``ViT-B_16.npz``, JAX/Flax layout) into our backbones.

Layout: ``embedding/kernel`` (p, p, C, D) -> Conv2d (D, C, p, p); ``cls``; ``Transformer/posembed_input/
pos_embedding``; per block ``Transformer/encoderblock_{i}/`` with ``LayerNorm_0`` (norm1),
``MultiHeadDotProductAttention_1/{query,key,value}`` (concatenated into qkv), ``.../out`` (proj),
``LayerNorm_2`` (norm2), ``MlpBlock_3/Dense_0`` and ``Dense_1`` (fc1, fc2); ``Transformer/encoder_norm``
(final norm). Flax kernels are (in, out): transposed into torch's (out, in).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _tensor(weights: Mapping[str, np.ndarray], key: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(weights[key])).float()


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{what}: checkpoint shape {tuple(src.shape)} does not fit the model's {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src.to(dtype=dst.dtype, device=dst.device))


def resize_pos_embed(pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Bicubic resize of a (1, 1 + g², D) position table (CLS first) to (1, num_tokens, D)."""
    if pos.shape[1] == num_tokens:
        return pos
    cls, grid = pos[:, :1], pos[:, 1:]
    old, new = math.isqrt(grid.shape[1]), math.isqrt(num_tokens - 1)
    if old * old != grid.shape[1] or new * new != num_tokens - 1:
        raise ValueError(f"cannot resize a position table of {pos.shape[1]} tokens to {num_tokens}")
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)


def load_vit_block(block: nn.Module, weights: Mapping[str, np.ndarray], index: int) -> list[str]:
    """Load encoder block ``index`` into a block with ``norm1, attn.qkv, attn.proj, norm2, ffn.fc1/fc2``."""
    pfx = f"Transformer/encoderblock_{index}"
    att = f"{pfx}/MultiHeadDotProductAttention_1"
    dim = block.norm1.weight.shape[0]
    loaded = []

    def put(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
        _copy(param, value, f"block {index} {name}")
        loaded.append(name)

    put(block.norm1.weight, _tensor(weights, f"{pfx}/LayerNorm_0/scale"), "norm1.weight")
    put(block.norm1.bias, _tensor(weights, f"{pfx}/LayerNorm_0/bias"), "norm1.bias")
    qkv_w = [_tensor(weights, f"{att}/{n}/kernel").reshape(dim, -1).T for n in ("query", "key", "value")]
    qkv_b = [_tensor(weights, f"{att}/{n}/bias").reshape(-1) for n in ("query", "key", "value")]
    put(block.attn.qkv.weight, torch.cat(qkv_w), "attn.qkv.weight")
    put(block.attn.qkv.bias, torch.cat(qkv_b), "attn.qkv.bias")
    put(block.attn.proj.weight, _tensor(weights, f"{att}/out/kernel").reshape(-1, dim).T, "attn.proj.weight")
    put(block.attn.proj.bias, _tensor(weights, f"{att}/out/bias"), "attn.proj.bias")
    put(block.norm2.weight, _tensor(weights, f"{pfx}/LayerNorm_2/scale"), "norm2.weight")
    put(block.norm2.bias, _tensor(weights, f"{pfx}/LayerNorm_2/bias"), "norm2.bias")
    for i, fc in enumerate((block.ffn.fc1, block.ffn.fc2)):
        put(fc.weight, _tensor(weights, f"{pfx}/MlpBlock_3/Dense_{i}/kernel").T, f"ffn.fc{i + 1}.weight")
        put(fc.bias, _tensor(weights, f"{pfx}/MlpBlock_3/Dense_{i}/bias"), f"ffn.fc{i + 1}.bias")
    return loaded


def load_vit_weights(
    weights: Mapping[str, np.ndarray],
    *,
    patch_proj: nn.Conv2d,
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
    blocks: list[nn.Module],
    final_norm: nn.LayerNorm,
    prefix: str = "",
) -> list[str]:
    """Load a Google-layout ViT into the given parts of any backbone; returns the names loaded."""
    depth = sum(1 for k in weights if k.startswith("Transformer/encoderblock_") and k.endswith("LayerNorm_0/scale"))
    if depth != len(blocks):
        raise ValueError(f"checkpoint has {depth} encoder blocks but the model has {len(blocks)}")
    loaded = []
    _copy(patch_proj.weight, _tensor(weights, "embedding/kernel").permute(3, 2, 0, 1), "embedding/kernel")
    _copy(patch_proj.bias, _tensor(weights, "embedding/bias"), "embedding/bias")
    _copy(cls_token, _tensor(weights, "cls"), "cls")
    pos = resize_pos_embed(_tensor(weights, "Transformer/posembed_input/pos_embedding"), pos_embed.shape[1])
    _copy(pos_embed, pos, "Transformer/posembed_input/pos_embedding")
    loaded += [f"{prefix}{n}" for n in ("patch_proj.weight", "patch_proj.bias", "cls_token", "pos_embed")]
    for i, block in enumerate(blocks):
        loaded += [f"{prefix}blocks.{i}.{n}" for n in load_vit_block(block, weights, i)]
    _copy(final_norm.weight, _tensor(weights, "Transformer/encoder_norm/scale"), "encoder_norm/scale")
    _copy(final_norm.bias, _tensor(weights, "Transformer/encoder_norm/bias"), "encoder_norm/bias")
    return [*loaded, f"{prefix}norm.weight", f"{prefix}norm.bias"]


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an npz checkpoint into memory, naming the file in any error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ViT weights not found: {path}. Download ViT-B_16.npz (ImageNet-21k) from Google's "
            "vision_transformer release and pass its path."
        )
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise ValueError(f"{path} is not a readable npz file: {exc}") from exc


def load_vit_npz(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load Google's ViT npz into a :class:`MosaicModel` backbone (2D tokenizer, CLS, pos_embed_2d,
    blocks, final norm). Adapters, heads and the 3D tokenizer keep their initialisation. Returns the
    state_dict names that were loaded (the 2D pos table is resized bicubically if the grid differs)."""
    weights = read_npz(path)
    loaded = load_vit_weights(
        weights,
        patch_proj=model.patch_embed.patch_embed_2d.proj,
        cls_token=model.cls_token,
        pos_embed=model.pos_embed_2d,
        blocks=list(model.encoder.blocks),
        final_norm=model.encoder.norm,
    )
    rename = {
        "patch_proj.": "patch_embed.patch_embed_2d.proj.",
        "cls_token": "cls_token",
        "pos_embed": "pos_embed_2d",
        "blocks.": "encoder.blocks.",
        "norm.": "encoder.norm.",
    }
    out = []
    for name in loaded:
        for old, new in rename.items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out.append(name)
    return out
