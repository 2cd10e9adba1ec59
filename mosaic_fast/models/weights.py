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

#: Google's official ImageNet-21k ViT-B/16 file (the one timm and most ViT repositories load); nothing
#: downloads it automatically.
VIT_B16_URL = "https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz"

#: Top-level groups of Google's file that no backbone loads (the classifier and its pre-logits layer).
IGNORED_PREFIXES = ("head/", "pre_logits/")

_BLOCK_KEYS = tuple(
    [f"LayerNorm_{i}/{p}" for i in (0, 2) for p in ("scale", "bias")]
    + [f"MultiHeadDotProductAttention_1/{n}/{p}" for n in ("query", "key", "value", "out") for p in ("kernel", "bias")]
    + [f"MlpBlock_3/Dense_{i}/{p}" for i in (0, 1) for p in ("kernel", "bias")]
)


def expected_npz_keys(depth: int) -> set[str]:
    """Every key a Google-layout ViT of ``depth`` blocks must have (and the only ones loaded)."""
    keys = {"embedding/kernel", "embedding/bias", "cls", "Transformer/posembed_input/pos_embedding",
            "Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias"}
    return keys | {f"Transformer/encoderblock_{i}/{k}" for i in range(depth) for k in _BLOCK_KEYS}


def _short(keys: list[str], limit: int = 12) -> str:
    return str(keys[:limit])[:-1] + (f", ... ({len(keys) - limit} more)]" if len(keys) > limit else "]")


def check_npz_keys(weights: Mapping[str, np.ndarray], depth: int) -> None:
    """A ValueError listing every missing and every unexpected key (``head/*``, ``pre_logits/*`` are
    allowed and ignored), before anything is copied."""
    expected = expected_npz_keys(depth)
    missing = sorted(expected - set(weights))
    unexpected = sorted(k for k in weights if k not in expected and not k.startswith(IGNORED_PREFIXES))
    if missing or unexpected:
        raise ValueError(f"the npz does not fit a {depth}-block Google ViT: missing keys {_short(missing)}, "
                         f"unexpected keys {_short(unexpected)}")


def _tensor(weights: Mapping[str, np.ndarray], key: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(weights[key])).float()


#: (parameter, value, name) to copy once every shape has been checked.
Assignment = tuple[torch.Tensor, torch.Tensor, str]


def _copy_all(assignments: list[Assignment]) -> None:
    """Check every shape, then copy: a checkpoint that does not fit leaves the model untouched."""
    for dst, src, what in assignments:
        if dst.shape != src.shape:
            raise ValueError(f"{what}: checkpoint shape {tuple(src.shape)} does not fit the model's {tuple(dst.shape)}")
    with torch.no_grad():
        for dst, src, _ in assignments:
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


def vit_block_assignments(block: nn.Module, weights: Mapping[str, np.ndarray], index: int) -> list[Assignment]:
    """What encoder block ``index`` puts into a block with ``norm1, attn.qkv, attn.proj, norm2, ffn.fc1/fc2``
    (names relative to the block)."""
    pfx = f"Transformer/encoderblock_{index}"
    att = f"{pfx}/MultiHeadDotProductAttention_1"
    dim = block.norm1.weight.shape[0]
    heads = block.attn.num_heads
    for name in ("query", "key", "value"):
        kernel_shape = tuple(weights[f"{att}/{name}/kernel"].shape)
        # a 3-D kernel of other heads would be silently regrouped by the reshape; a 2-D one has no grouping
        if kernel_shape not in ((dim, heads, dim // heads), (dim, dim)):
            raise ValueError(f"{att}/{name}/kernel: checkpoint shape {kernel_shape} does not fit the model's "
                             f"{(dim, heads, dim // heads)} (width {dim}, {heads} heads)")
    qkv_w = [_tensor(weights, f"{att}/{n}/kernel").reshape(dim, -1).T for n in ("query", "key", "value")]
    qkv_b = [_tensor(weights, f"{att}/{n}/bias").reshape(-1) for n in ("query", "key", "value")]
    out = [
        (block.norm1.weight, _tensor(weights, f"{pfx}/LayerNorm_0/scale"), "norm1.weight"),
        (block.norm1.bias, _tensor(weights, f"{pfx}/LayerNorm_0/bias"), "norm1.bias"),
        (block.attn.qkv.weight, torch.cat(qkv_w), "attn.qkv.weight"),
        (block.attn.qkv.bias, torch.cat(qkv_b), "attn.qkv.bias"),
        (block.attn.proj.weight, _tensor(weights, f"{att}/out/kernel").reshape(-1, dim).T, "attn.proj.weight"),
        (block.attn.proj.bias, _tensor(weights, f"{att}/out/bias"), "attn.proj.bias"),
        (block.norm2.weight, _tensor(weights, f"{pfx}/LayerNorm_2/scale"), "norm2.weight"),
        (block.norm2.bias, _tensor(weights, f"{pfx}/LayerNorm_2/bias"), "norm2.bias"),
    ]
    for i, fc in enumerate((block.ffn.fc1, block.ffn.fc2)):
        out.append((fc.weight, _tensor(weights, f"{pfx}/MlpBlock_3/Dense_{i}/kernel").T, f"ffn.fc{i + 1}.weight"))
        out.append((fc.bias, _tensor(weights, f"{pfx}/MlpBlock_3/Dense_{i}/bias"), f"ffn.fc{i + 1}.bias"))
    return out


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
    """Load a Google-layout ViT into the given parts of any backbone; returns the names loaded. Keys and
    shapes are all checked first (one error listing the problems), so a failed load changes nothing."""
    depth = sum(1 for k in weights if k.startswith("Transformer/encoderblock_") and k.endswith("LayerNorm_0/scale"))
    if depth != len(blocks):
        raise ValueError(f"checkpoint has {depth} encoder blocks but the model has {len(blocks)}")
    check_npz_keys(weights, depth)
    pos = resize_pos_embed(_tensor(weights, "Transformer/posembed_input/pos_embedding"), pos_embed.shape[1])
    assignments = [
        (patch_proj.weight, _tensor(weights, "embedding/kernel").permute(3, 2, 0, 1), "patch_proj.weight"),
        (patch_proj.bias, _tensor(weights, "embedding/bias"), "patch_proj.bias"),
        (cls_token, _tensor(weights, "cls"), "cls_token"),
        (pos_embed, pos, "pos_embed"),
    ]
    for i, block in enumerate(blocks):
        assignments += [(p, v, f"blocks.{i}.{n}") for p, v, n in vit_block_assignments(block, weights, i)]
    assignments += [(final_norm.weight, _tensor(weights, "Transformer/encoder_norm/scale"), "norm.weight"),
                    (final_norm.bias, _tensor(weights, "Transformer/encoder_norm/bias"), "norm.bias")]
    _copy_all(assignments)
    return [f"{prefix}{name}" for _, _, name in assignments]


def require_weights_file(path: str | os.PathLike) -> None:
    """A FileNotFoundError naming ``path`` and where to get Google's file, unless ``path`` is a file
    (so the CLI can check ``--pretrained`` before it reads any data)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"ViT weights not found: {path}. Download Google's ImageNet-21k ViT-B_16.npz from {VIT_B16_URL} "
            "(about 400 MB; e.g. wget or curl -O) and pass its path."
        )


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an npz checkpoint into memory, naming the file in any error."""
    require_weights_file(path)
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
