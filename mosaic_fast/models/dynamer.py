"""DynaMer: two frozen ViT backbones joined by a shared gated MoE adapter with layer-wise token skipping.

Our reading of the paper (DESIGN.md §3; no public code). Per layer l and stream s ∈ {gen, med}:

* ``skip_mode="adapter"`` (paper eq. 4): ``y_s = block_s(x_s)``; the skip router R_S of stream s scores
  ``y_s`` and keeps the top ⌈ρN⌉ tokens (CLS always); the shared adapter updates only those:
  ``x_s ← y_s + σ(score)(x̂_s − y_s)`` on kept tokens, ``y_s`` elsewhere. Saves adapter work only.
* ``skip_mode="block"``: the same routers, on the same inputs (the block outputs ``y_s``), with the same
  adapter update; in addition the tokens that layer l's router did not keep bypass the next transformer
  block, block l + 1 (DESIGN.md §3): only layer l's kept tokens of a sample go through block l + 1, with
  attention among those tokens only; the others keep their value. Block 0 has no selection before it
  and sees every token. At ρ = 1 both modes compute the same function. This is where inference time
  falls with ρ.

The expert input of a kept token is the pair of both streams' current tokens at that position (block
outputs, or the unchanged token where the other stream skipped it). The head reads the mean of the two
streams' final-normed CLS features. Backbones are plain pre-norm ViTs (LayerNorm eps 1e-6 as in Google's
and timm's ViT); they are frozen (:meth:`DynaMerModel.freeze_backbone`, called by the constructor).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from .. import reference
from ..reference.checks import check_input_dtype, check_int, check_is_tensor
from ..reference.moe import gather_tokens
from .weights import load_vit_weights, read_npz, resize_pos_embed

SKIP_MODES = ("adapter", "block")


class ViTBlock(nn.Module):
    """Plain pre-norm ViT block: ``x = x + attn(norm1(x)); x = x + ffn(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = reference.Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = reference.Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens through attention then the MLP, each added to the residual."""
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, (H/p)(W/p), D) with Conv2d(C, D, p, stride p) (no norm, as in the plain ViT)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        check_int("patch_size", patch_size, 1)
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, patches, D) tokens; another shape, an integer batch or (outside autocast)
        another dtype than the weights' raises a clear error."""
        expect = (self.in_chans, self.img_size, self.img_size)
        check_is_tensor("x", x)
        if x.dim() != 4 or tuple(x.shape[1:]) != expect:
            raise ValueError(f"x: expected (B, {', '.join(map(str, expect))}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point image batch (normalised), got {x.dtype}")
        check_input_dtype("x", x, self.proj.weight)
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTBackbone(nn.Module):
    """Patch embedding, CLS token, learned position table, ``depth`` blocks and the final norm."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
        self.blocks = nn.ModuleList([ViTBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks' input: patch tokens with the CLS token prepended and the position table added."""
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed

    def load_weights(self, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> list[str]:
        """Load Google's npz layout (a ``.npz`` path) or a plain state_dict (mapping or a torch file path).

        State_dicts may use timm's names (``mlp.fc1`` for ``ffn.fc1``); a classifier ``head.*`` is ignored.
        Missing or unexpected keys, and tensors of other shapes, raise a ValueError listing them (nothing is
        loaded then); a position table of another grid is resized bicubically, as for the npz layout.
        Returns the names loaded."""
        if isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz"):
            return load_vit_weights(read_npz(source), patch_proj=self.patch_embed.proj, cls_token=self.cls_token,
                                    pos_embed=self.pos_embed, blocks=list(self.blocks), final_norm=self.norm)
        if isinstance(source, (str, os.PathLike)):
            if not os.path.isfile(source):
                raise FileNotFoundError(f"backbone weights not found: {source}")
            source = torch.load(source, map_location="cpu", weights_only=True)
        if not isinstance(source, Mapping):
            raise TypeError(
                f"source must be an .npz path, a state_dict or a torch file path, got {type(source).__name__}"
            )
        state = {k.replace(".mlp.", ".ffn."): v for k, v in source.items() if not k.startswith("head.")}
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(describe_key_mismatch(missing, unexpected, set(own)))
        if state["pos_embed"].shape[1] != own["pos_embed"].shape[1]:
            state["pos_embed"] = resize_pos_embed(state["pos_embed"].float(), own["pos_embed"].shape[1])
        wrong = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state.items()
                 if tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            raise ValueError(f"backbone state_dict does not fit: wrong shapes {wrong}")
        self.load_state_dict(state, strict=True)
        return sorted(state)


def _listed(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, … ({len(keys)} in all)" if len(keys) > limit else shown


def describe_key_mismatch(missing: list[str], unexpected: list[str], own: set[str]) -> str:
    """The error for a backbone state_dict whose keys do not fit: a few of each, their counts, and the prefix
    to strip when the keys are those of a bigger model (``backbone_gen.``, ``module.``, ``encoder.``…)."""
    message = "backbone state_dict does not fit"
    if missing:
        message += f": missing keys {_listed(missing)}"
    if unexpected:
        message += f"{';' if missing else ':'} unexpected keys {_listed(unexpected)}"
    prefixes = sorted({key[: end + 1] for key in unexpected for end, c in enumerate(key)
                       if c == "." and key[end + 1:] in own})
    for prefix in prefixes:
        stripped = {k[len(prefix):] for k in unexpected if k.startswith(prefix)}
        if set(missing) <= stripped:
            return (f"{message}. The keys carry the prefix {prefix!r} (a whole model's state_dict?): pass "
                    f"{{k.removeprefix({prefix!r}): v for k, v in state.items() if k.startswith({prefix!r})}}")
    return message


class DynaMerModel(nn.Module):
    """Two frozen ViT backbones (general, medical) + shared gated MoE adapters + per-stream skip routers.

    ``forward(x, return_features=False)`` -> logits (B, num_classes), or (features, logits). Both
    backbones see the same image. ``med_num_heads``/``med_mlp_ratio`` let the medical backbone use a
    different ViT config of the same width and depth. ``fast=True`` converts the model to the
    :mod:`mosaic_fast.nn` modules (fused MoE/skip kernels, SDPA attention); inference (no grad) then
    updates the residual streams in place, touching only the kept tokens.

    (Unlike :class:`~mosaic_fast.models.MosaicModel`, whose ``forward`` follows the MOSAIC seed repository
    and returns ``(features, logits)`` or, with ``return_features``, the features alone.)

    Args:
        num_classes: classes of the single head (on the mean of the two streams' CLS features).
        img_size, patch_size, in_chans: the 2D input and its patches (both backbones).
        embed_dim, depth, num_heads, mlp_ratio: the ViT config of both backbones (ViT-B/16 by default).
        num_experts, top_k: experts of each layer's shared MoE adapter and how many each token uses.
        bottleneck: hidden width of each expert.
        gate_dim: width g of the per-stream sigmoid gate (embed_dim when None; D/2, D/4 or 1 share gate
            values over channel groups).
        keep_ratio: ρ, the fraction of tokens each skip router keeps (⌈ρN⌉, CLS always kept).
        skip_mode: "adapter" (paper eq. 4: unkept tokens skip the adapter) or "block" (they also bypass the
            next block).
        fast: convert to the fast modules (False: the plain reference model, the eager baseline).
        med_num_heads, med_mlp_ratio: the medical backbone's own heads / MLP ratio (same width and depth).
    """

    def __init__(
        self,
        num_classes: int,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_experts: int = 4,
        top_k: int = 2,
        bottleneck: int = 64,
        gate_dim: int | None = None,
        keep_ratio: float = 0.5,
        skip_mode: str = "adapter",
        fast: bool = True,
        med_num_heads: int | None = None,
        med_mlp_ratio: float | None = None,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, 1)
        if skip_mode not in SKIP_MODES:
            raise ValueError(f"skip_mode must be one of {SKIP_MODES}, got {skip_mode!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.skip_mode, self.depth, self.embed_dim = skip_mode, depth, embed_dim
        self.backbone_gen = ViTBackbone(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio)
        self.backbone_med = ViTBackbone(img_size, patch_size, in_chans, embed_dim, depth,
                                        med_num_heads or num_heads, med_mlp_ratio or mlp_ratio)
        self.adapters = nn.ModuleList([
            reference.GatedMoEAdapter(embed_dim, num_experts, top_k, bottleneck, gate_dim) for _ in range(depth)
        ])
        self.skip_gen = nn.ModuleList([reference.SkipRouter(embed_dim, keep_ratio) for _ in range(depth)])
        self.skip_med = nn.ModuleList([reference.SkipRouter(embed_dim, keep_ratio) for _ in range(depth)])
        self.head = nn.Linear(embed_dim, num_classes)
        self.freeze_backbone(verbose=False)
        if fast:
            from .. import nn as fast_nn

            fast_nn.convert(self)

    @property
    def keep_ratio(self) -> float:
        """ρ, the fraction of tokens the skip routers keep (read from the first; setting it sets all)."""
        return self.skip_gen[0].keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        """Set ρ of every skip router (e.g. to sweep inference time against ρ)."""
        for router in (*self.skip_gen, *self.skip_med):
            router.keep_ratio = value

    def freeze_backbone(self, verbose: bool = True) -> int:
        """Freeze both backbones (adapters, routers and head train); returns the trainable parameter count."""
        for name, p in self.named_parameters():
            p.requires_grad_(not name.startswith(("backbone_gen.", "backbone_med.")))
        count = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if verbose:
            total = sum(p.numel() for p in self.parameters())
            print(f"trainable parameters: {count:,} of {total:,} ({100.0 * count / total:.2f}%)")
        return count

    def load_backbone(self, stream: str, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> list[str]:
        """Load the "gen" or "med" backbone from Google's npz layout or a plain (timm-style) state_dict."""
        if stream not in ("gen", "med"):
            raise ValueError(f"stream must be 'gen' or 'med', got {stream!r}")
        backbone = self.backbone_gen if stream == "gen" else self.backbone_med
        return [f"backbone_{stream}.{name}" for name in backbone.load_weights(source)]

    @staticmethod
    def _block_on(block: nn.Module, x: torch.Tensor, idx: torch.Tensor, inplace: bool) -> torch.Tensor:
        """Run ``block`` on the kept tokens ``idx`` of ``x`` only; the others bypass it."""
        if idx.shape[1] == x.shape[1]:  # everything kept (idx is sorted): no gather/scatter
            return block(x)
        out = block(gather_tokens(x, idx))
        index = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return x.scatter_(1, index, out) if inplace else x.scatter(1, index, out)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the two streams' final-normed CLS features, (B, D)."""
        xg, xm = self.backbone_gen.embed(x), self.backbone_med.embed(x)
        inplace = not torch.is_grad_enabled()
        layers = zip(self.backbone_gen.blocks, self.backbone_med.blocks, self.adapters, self.skip_gen, self.skip_med)
        idx_g = idx_m = None  # the previous layer's kept tokens (none before block 0)
        for block_g, block_m, adapter, router_g, router_m in layers:
            if self.skip_mode == "block" and idx_g is not None:
                # tokens the previous layer's routers did not keep bypass this block
                xg = self._block_on(block_g, xg, idx_g, inplace)
                xm = self._block_on(block_m, xm, idx_m, inplace)
            else:
                xg, xm = block_g(xg), block_m(xm)
            (idx_g, gate_g), (idx_m, gate_m) = router_g.select(xg), router_m.select(xm)
            xg, xm = adapter.forward_skip(xg, xm, idx_g, gate_g, idx_m, gate_m, inplace=inplace)
        return 0.5 * (self.backbone_gen.norm(xg)[:, 0] + self.backbone_med.norm(xm)[:, 0])

    def forward(self, x: torch.Tensor,
                return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, num_classes), or ``(features, logits)`` with ``return_features``."""
        features = self.forward_features(x)
        logits = self.head(features)
        return (features, logits) if return_features else logits
