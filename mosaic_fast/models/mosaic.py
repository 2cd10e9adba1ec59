"""MosaicModel: frozen ViT-B/16 with the three hard-routed specialist adapters of MOSAIC.

The state_dict keys equal those of the seed repository's ``UnifiedModel`` in "v2_moe" mode
(``patch_embed.patch_embed_2d/3d``, ``cls_token``, ``pos_embed_2d/3d``, ``encoder.blocks.{i}``,
``encoder.norm``, ``heads.{t}``), so seed checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import nn

from .. import reference
from ..data.registry import ALL_DATASETS, EXPERT_ROUTING, NUM_CLASSES
from ..reference.adapter import EXPERT_NAMES, check_expert_id
from ..reference.checks import check_int

#: Parameter-name fragments of the parts that are new (randomly initialised) and trained by default.
TOKENIZER_3D_PARAMS = ("patch_embed.patch_embed_3d.", "pos_embed_3d")

#: Compiled variants :meth:`MosaicModel.compile_encoder` allows per function: a training run meets up to 4
#: routings (three letters, per-sample ids) × gradients on/off × sequence lengths and last-batch sizes, more
#: than Dynamo's default of 8, past which it would run the encoder eagerly.
COMPILE_VARIANTS = 64


class MosaicModel(nn.Module):
    """Unified 2D/3D MedMNIST classifier: tokenizer, ViT encoder with MoS adapters, one head per task.

    ``fast=True`` swaps in the fast modules of :mod:`mosaic_fast.nn` (SDPA attention, fused grouped
    adapter, fast 3D tokenizer); ``fast=False`` keeps the plain reference modules (the eager baseline).
    ``task_experts`` names the specialist of each head; by default the seed routing when the heads are the
    18 MedMNIST datasets in the seed order.
    """

    def __init__(
        self,
        num_classes_list: Sequence[int] = NUM_CLASSES,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        adapter_mode: str = "v2_moe",
        adapter_bottleneck_a: int = 64,
        adapter_bottleneck_b: int = 96,
        adapter_bottleneck_c: int = 192,
        adapter_dropout: float = 0.0,
        adapter_scalar: float = 0.1,
        img_size_2d: int = 224,
        patch_size_2d: int = 16,
        in_chans_2d: int = 3,
        img_size_3d: int = 64,
        patch_size_3d: int = 8,
        in_chans_3d: int = 1,
        fast: bool = True,
        task_experts: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if adapter_mode != "v2_moe":
            raise ValueError(f"adapter_mode: only 'v2_moe' (three specialists) is supported, got {adapter_mode!r}")
        if not num_classes_list:
            raise ValueError(f"num_classes_list must be a non-empty list of positive ints, got {num_classes_list}")
        for i, c in enumerate(num_classes_list):  # (a float would be truncated by nn.Linear's int())
            check_int(f"num_classes_list[{i}]", c, 1)
        if task_experts is None and list(num_classes_list) == list(NUM_CLASSES):
            task_experts = [EXPERT_ROUTING[name] for name in ALL_DATASETS]
        if task_experts is not None:
            if len(task_experts) != len(num_classes_list) or any(e not in EXPERT_NAMES for e in task_experts):
                raise ValueError(
                    f"task_experts must name one of {EXPERT_NAMES} per head ({len(num_classes_list)}), "
                    f"got {task_experts}"
                )
        self.task_experts = None if task_experts is None else tuple(task_experts)
        self.embed_dim = embed_dim
        self.adapter_mode = adapter_mode
        self.num_tasks = len(num_classes_list)
        self.fast = fast

        self.patch_embed = reference.UnifiedPatchEmbed(
            img_size_2d, patch_size_2d, in_chans_2d, img_size_3d, patch_size_3d, in_chans_3d, embed_dim
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed_2d = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches_2d + 1, embed_dim))
        self.pos_embed_3d = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches_3d + 1, embed_dim))
        self.encoder = reference.Encoder(
            depth,
            embed_dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            adapter_bottleneck_a=adapter_bottleneck_a,
            adapter_bottleneck_b=adapter_bottleneck_b,
            adapter_bottleneck_c=adapter_bottleneck_c,
            adapter_dropout=adapter_dropout,
            adapter_scalar=adapter_scalar,
        )
        self.heads = nn.ModuleList(nn.Linear(embed_dim, int(c)) for c in num_classes_list)
        for p in (self.pos_embed_2d, self.pos_embed_3d, self.cls_token):
            nn.init.trunc_normal_(p, std=0.02)
        for head in self.heads:
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        if fast:
            from ..nn import convert

            convert(self)

    def resolve_expert(self, task_id: int, expert_id: str | torch.Tensor | None) -> str | torch.Tensor:
        """The specialist to route to: ``expert_id`` when given, else the one of head ``task_id``."""
        if expert_id is not None:
            return expert_id
        if self.task_experts is None:
            raise ValueError(
                "expert_id is required: this model's heads are not the 18 MedMNIST datasets, so the "
                "specialist cannot be derived from task_id (or pass task_experts= to the constructor)"
            )
        return self.task_experts[task_id]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens with CLS and the 2D/3D position embedding: (B, 1 + N, D)."""
        tokens, is_3d = self.patch_embed(x)
        pos = self.pos_embed_3d if is_3d else self.pos_embed_2d
        if tokens.shape[1] + 1 != pos.shape[1]:
            kind = "3D" if is_3d else "2D"
            raise ValueError(
                f"x: a {kind} input of shape {tuple(x.shape)} gives {tokens.shape[1]} tokens but the model "
                f"was built for {pos.shape[1] - 1} (img_size_{kind.lower()}); resize the input"
            )
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + pos

    def forward_features(self, x: torch.Tensor, expert_id: str | torch.Tensor) -> torch.Tensor:
        """CLS features (B, D) after the final LayerNorm."""
        tokens = self.embed(x)
        check_expert_id(expert_id, tokens)
        return self.encoder(tokens, expert_id)[:, 0]

    def forward_packed(self, batches: Sequence[tuple[torch.Tensor, str | torch.Tensor]]) -> list[torch.Tensor]:
        """CLS features of several batches at once, e.g. ``[(images_2d, ids_2d), (volumes_3d, "C")]``.

        Equals ``[forward_features(x, e) for x, e in batches]``. The fast model runs attention per batch
        (the sequence lengths differ) and the MLP + grouped adapter over all tokens packed together.
        """
        if not isinstance(batches, (list, tuple)):
            raise TypeError(f"batches must be a list of (x, expert_id) pairs, got {type(batches).__name__}")
        if not batches:
            raise ValueError("batches must hold at least one (x, expert_id) pair")
        for i, pair in enumerate(batches):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                what = f"length {len(pair)}" if isinstance(pair, (list, tuple)) else type(pair).__name__
                raise TypeError(f"batches[{i}] must be an (x, expert_id) pair, got {what}")
        if not self.fast or not self._packs_blocks():
            return [self.forward_features(x, e) for x, e in batches]
        tokens, rows = [], []
        for x, expert_id in batches:
            t = self.embed(x)
            check_expert_id(expert_id, t)
            if isinstance(expert_id, str):
                rows.append(torch.full((t.shape[0] * t.shape[1],), EXPERT_NAMES.index(expert_id), device=t.device))
            else:
                rows.append(expert_id.long().repeat_interleave(t.shape[1]))
            tokens.append(t)
        row_expert = torch.cat(rows)
        for block in self.encoder.blocks:
            tokens = block.forward_packed(tokens, row_expert)
        return [self.encoder.norm(t[:, 0]) for t in tokens]

    def _packs_blocks(self) -> bool:
        """Whether :meth:`forward_packed` may call ``Block.forward_packed`` (which bypasses the blocks' and the
        encoder's hooks): every block the fast Block, nothing hooked."""
        from ..nn.bypass import global_hooks, has_hooks
        from ..nn.vit import Block

        blocks = self.encoder.blocks
        return not (global_hooks() or has_hooks(self.encoder) or any(type(b) is not Block or has_hooks(b)
                                                                      for b in blocks))

    def forward(
        self,
        x: torch.Tensor,
        task_id: int = 0,
        return_features: bool = False,
        expert_id: str | torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``(features, logits of head task_id)``, or only the features with ``return_features``."""
        try:
            task_id = operator.index(task_id)  # an int, a NumPy integer or a 0-d integer tensor
        except TypeError:
            raise TypeError(f"task_id must be an integer, got {type(task_id).__name__} {task_id!r}") from None
        if not 0 <= task_id < self.num_tasks:
            raise ValueError(f"task_id must be in [0, {self.num_tasks}), got {task_id}")
        features = self.forward_features(x, self.resolve_expert(task_id, expert_id))
        if return_features:
            return features
        return features, self.heads[task_id](features)

    def compile_encoder(self, **options) -> None:
        """``torch.compile`` the transformer encoder, where the time goes, in place (``nn.Module.compile``, so
        state_dict keys and checkpoints are unchanged; ``options`` go to torch.compile). The tokenizers and
        heads stay eager. Raises Dynamo's recompile limit to :data:`COMPILE_VARIANTS` (process-wide)."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_VARIANTS)
        self.encoder.compile(**options)

    def freeze_backbone(self, freeze_3d_tokenizer: bool = False, verbose: bool = True) -> int:
        """Train only adapters and heads (+ the new 3D tokenizer and pos_embed_3d unless frozen).

        Returns the number of trainable parameters (and prints it when ``verbose``).
        """
        for name, p in self.named_parameters():
            trainable = ".adapter." in name or name.startswith("heads.")
            if not freeze_3d_tokenizer and name.startswith(TOKENIZER_3D_PARAMS):
                trainable = True
            p.requires_grad_(trainable)
        count = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if verbose:
            total = sum(p.numel() for p in self.parameters())
            print(f"trainable parameters: {count:,} of {total:,} ({100.0 * count / total:.2f}%)")
        return count
