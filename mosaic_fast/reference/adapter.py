"""Reference AdaptFormer adapter and the MOSAIC three-specialist (A/B/C) adapter.

Plain PyTorch, written for readability: these modules are the ground truth the fast paths are tested
against. Parameter names match the MOSAIC seed repository so checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .checks import check_features, check_int, check_is_tensor

EXPERT_NAMES = ("A", "B", "C")


class Adapter(nn.Module):
    """``adapter(h) = s * up(relu(down(LN_a(h))))`` (AdaptFormer); the residual is added by the caller."""

    def __init__(
        self,
        d_model: int = 768,
        bottleneck: int = 64,
        dropout: float = 0.0,
        init_option: str = "lora",
        adapter_scalar: float = 0.1,
    ) -> None:
        super().__init__()
        check_int("d_model", d_model, 0)
        check_int("bottleneck", bottleneck, 0)
        if d_model <= 0 or bottleneck <= 0:
            raise ValueError(f"d_model and bottleneck must be positive, got {d_model} and {bottleneck}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model = d_model
        self.bottleneck = bottleneck
        self.scale = float(adapter_scalar)
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-5)
        self.down_proj = nn.Linear(d_model, bottleneck)
        self.activation = nn.ReLU()
        self.up_proj = nn.Linear(bottleneck, d_model)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters(init_option)

    def reset_parameters(self, init_option: str = "lora") -> None:
        """"lora": kaiming-uniform down, zero up (output 0 at init); "bert": N(0, 0.02) weights."""
        if init_option == "lora":
            nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up_proj.weight)
        elif init_option == "bert":
            nn.init.normal_(self.down_proj.weight, mean=0.0, std=0.02)
            nn.init.normal_(self.up_proj.weight, mean=0.0, std=0.02)
        else:
            raise ValueError(f"init_option must be 'lora' or 'bert', got {init_option!r}")
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``s · up(relu(down(LN(h))))`` for h (..., d_model); the residual is the caller's."""
        check_features("h", h, self.d_model, self.down_proj.weight)
        z = self.activation(self.down_proj(self.layer_norm(h)))
        return self.dropout(self.up_proj(z)) * self.scale


def check_id_tensor(ids: object, h: torch.Tensor, name: str = "expert_id") -> torch.Tensor:
    """Raise a clear error unless ``ids`` is an int64/int32 tensor of shape (B,), B = h.shape[0], on
    h's device. Values are not read (that needs the data); returns ``ids``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(
            f"{name} must be a str or an integer tensor of shape (B,) (a LongTensor), got {type(ids).__name__}"
        )
    check_is_tensor("h", h)
    if h.dim() < 2:  # (B, ..., D): else the ids would route single features
        raise ValueError(f"h must have a batch dim when {name} is a tensor, got shape {tuple(h.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} tensor must be int64 (or int32), got {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != h.shape[0]:
        raise ValueError(
            f"{name} tensor must have shape ({h.shape[0]},) (one id per sample of h with "
            f"shape {tuple(h.shape)}), got {tuple(ids.shape)}"
        )
    if ids.device != h.device:
        raise ValueError(f"{name} is on {ids.device} but h is on {h.device}")
    return ids


def check_expert_id(expert_id: str | torch.Tensor, h: torch.Tensor) -> None:
    """Raise a clear error unless ``expert_id`` is 'A'/'B'/'C' or a (B,) integer tensor of 0/1/2."""
    if isinstance(expert_id, str):
        if expert_id not in EXPERT_NAMES:
            raise ValueError(f"expert_id must be one of {EXPERT_NAMES}, got {expert_id!r}")
        return
    check_id_tensor(expert_id, h)
    if expert_id.numel() == 0 or torch.compiler.is_compiling():
        return  # value checks need the data: done eagerly only (a traced graph must not branch on it)
    if expert_id.is_cuda:  # no host sync on the hot path: a device-side assert instead of an exception
        torch._assert_async(((expert_id >= 0) & (expert_id <= 2)).all(), "expert_id values must be in {0, 1, 2}")
    elif expert_id.min() < 0 or expert_id.max() > 2:
        raise ValueError(f"expert_id values must be in {{0, 1, 2}}, got {expert_id.tolist()}")


class MoSAdapter(nn.Module):
    """MOSAIC mixture-of-specialists adapter ("v2_moe"): three hard-routed adapters A, B, C.

    ``forward(h, expert_id)``: ``expert_id`` is 'A'/'B'/'C' for the whole batch, or a (B,) integer
    tensor of 0/1/2 routing each sample of a mixed batch to its specialist.
    """

    expert_cls = Adapter  # the fast twin builds its own Adapter class (as Block.adapter_cls does)

    def __init__(
        self,
        d_model: int = 768,
        bottleneck_a: int = 64,
        bottleneck_b: int = 96,
        bottleneck_c: int = 192,
        dropout: float = 0.0,
        init_option: str = "lora",
        adapter_scalar: float = 0.1,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.bottleneck_a, self.bottleneck_b, self.bottleneck_c = bottleneck_a, bottleneck_b, bottleneck_c
        self.expert_a = self.expert_cls(d_model, bottleneck_a, dropout, init_option, adapter_scalar)
        self.expert_b = self.expert_cls(d_model, bottleneck_b, dropout, init_option, adapter_scalar)
        self.expert_c = self.expert_cls(d_model, bottleneck_c, dropout, init_option, adapter_scalar)

    @property
    def experts(self) -> tuple[Adapter, Adapter, Adapter]:
        """The specialists A, B, C, in the order of the integer ids 0, 1, 2."""
        return (self.expert_a, self.expert_b, self.expert_c)

    def get_expert(self, expert_id: str) -> Adapter:
        """The specialist of letter ``expert_id`` ('A'/'B'/'C'; another letter raises a ValueError)."""
        check_expert_id(expert_id, torch.empty(0))
        return self.experts[EXPERT_NAMES.index(expert_id)]

    def forward(self, h: torch.Tensor, expert_id: str | torch.Tensor = "A") -> torch.Tensor:
        """The specialist ``expert_id`` ('A'/'B'/'C') on all of h, or per sample for a (B,) tensor of 0/1/2."""
        check_features("h", h, self.d_model)  # (the dtype against each specialist's weights: in its forward)
        check_expert_id(expert_id, h)
        if isinstance(expert_id, str):
            return self.get_expert(expert_id)(h)
        # Mixed batch: every specialist runs on the samples routed to it (masked per sample). The output
        # takes the dtype the experts compute in (e.g. bf16 under autocast).
        out = None
        for index, expert in enumerate(self.experts):
            mask = expert_id == index
            if bool(mask.any()):
                y = expert(h[mask])
                if out is None:
                    out = y.new_zeros(h.shape)
                out[mask] = y
        return h.new_zeros(h.shape) if out is None else out
