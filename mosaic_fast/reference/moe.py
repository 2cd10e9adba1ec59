"""Reference DynaMer and M4oE modules: gated top-k MoE adapter, token-skipping router, gated specialists.

Plain PyTorch written for readability (every expert is evaluated densely on every token); these are
the ground truth the fused kernels in :mod:`mosaic_fast.ops` are tested against. DESIGN.md §3 fixes the
formulas; choices it leaves open are documented on each class.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Adapter, MoSAdapter
from .checks import check_floating, check_input_dtype, check_int, check_tokens, repeats_in_rows


def check_pair(x_gen: torch.Tensor, x_med: torch.Tensor, d_model: int, weight: torch.Tensor | None = None) -> None:
    """Both streams: (B, N, d_model) tensors of the same shape, dtype and device (``weight``'s dtype outside
    autocast)."""
    check_tokens(x_gen, d_model, "x_gen", weight)
    check_tokens(x_med, d_model, "x_med", weight)
    if x_gen.shape != x_med.shape:
        raise ValueError(f"x_gen and x_med must have the same shape, got {tuple(x_gen.shape)} and "
                         f"{tuple(x_med.shape)}")
    if x_gen.dtype != x_med.dtype or x_gen.device != x_med.device:
        raise ValueError(f"x_gen ({x_gen.dtype}, {x_gen.device}) and x_med ({x_med.dtype}, {x_med.device}) "
                         "must share dtype and device")


def check_selection(x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, name: str) -> None:
    """``idx`` (B, k) integer token indices into ``x`` (B, N, D) and ``gate`` (B, k) floating."""
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx_{name} must be an int64/int32 tensor, got {getattr(idx, 'dtype', type(idx))}")
    if idx.dim() != 2 or idx.shape[0] != x.shape[0] or not 1 <= idx.shape[1] <= x.shape[1]:
        raise ValueError(f"idx_{name}: expected shape (B={x.shape[0]}, k) with 1 <= k <= N={x.shape[1]}, "
                         f"got {tuple(idx.shape)}")
    if not isinstance(gate, torch.Tensor) or gate.shape != idx.shape:
        raise ValueError(f"gate_{name}: expected a floating tensor of shape {tuple(idx.shape)}, got "
                         f"{tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__}")
    if not gate.is_floating_point():
        raise TypeError(f"gate_{name}: expected a floating tensor, got {gate.dtype}")
    if idx.device != x.device or gate.device != x.device:
        raise ValueError(f"idx_{name}/gate_{name} must be on {x.device}")
    # values only where reading them is free (CPU): on CUDA that would synchronise the host
    if idx.is_cpu and idx.numel() and not torch.compiler.is_compiling():
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= x.shape[1]:
            raise ValueError(f"idx_{name}: token indices must be in [0, {x.shape[1]}), got values in [{low}, {high}]")
        if repeats_in_rows(idx, x.shape[1]):
            raise ValueError(f"idx_{name}: token indices must be distinct within each sample")


def check_gate_width(x: torch.Tensor, *gates: tuple[str, torch.Tensor], x_name: str = "x_gen") -> None:
    """Raise a TypeError unless the skip gates ``(name, gate)`` fit the tokens' dtype (a float64 gate on float32
    tokens would make gated tokens the streams cannot hold; torch would fail later inside a scatter)."""
    for name, gate in gates:
        if torch.promote_types(gate.dtype, x.dtype) != x.dtype:
            raise TypeError(f"{name} is {gate.dtype}, wider than {x_name} ({x.dtype}): the gated tokens would not "
                            "fit the streams")


def check_update(x: torch.Tensor, idx: torch.Tensor, update: torch.Tensor) -> None:
    """``update`` (B, k, D) floating, for the tokens ``idx`` (B, k) of ``x``, in x's dtype or a narrower one
    (bf16 under autocast): a wider one would not fit the merged tokens into x."""
    if not isinstance(update, torch.Tensor) or update.shape != (*idx.shape, x.shape[-1]):
        got = tuple(update.shape) if isinstance(update, torch.Tensor) else type(update).__name__
        raise ValueError(f"update: expected shape {(*idx.shape, x.shape[-1])}, got {got}")
    check_floating("update", update)
    if torch.promote_types(update.dtype, x.dtype) != x.dtype:
        raise TypeError(f"update is {update.dtype}, wider than x ({x.dtype}): the merged tokens would not fit x")


def check_merge(x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> None:
    """The arguments of :meth:`SkipRouter.merge`: floating tokens x (B, N, D) (any width), a selection of them,
    its gates and updates, neither wider than x's dtype."""
    check_tokens(x, None, "x")
    check_selection(x, idx, gate, "x")
    check_gate_width(x, ("gate", gate), x_name="x")
    check_update(x, idx, update)


def top_k_lowest_index_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest ``scores`` along the last dim (descending) and their indices, equal scores going
    to the lower index. ``torch.topk`` leaves ties unspecified (a zero-initialised router ties every
    score); this rule makes the choice the same on every device and in every fast path."""
    values, index = scores.sort(dim=-1, descending=True, stable=True)
    return values[..., :k].contiguous(), index[..., :k].contiguous()


def scatter_tokens(x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Copy of ``x`` (B, N, D) with rows ``idx`` (B, k) of every sample replaced by ``values`` (B, k, D)."""
    return x.scatter(1, idx.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]), values)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (B, k) of every sample of ``x`` (B, N, D) -> (B, k, D)."""
    return x.gather(1, idx.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class GatedMoEAdapter(nn.Module):
    """DynaMer's shared gated mixture-of-experts adapter over the (general, medical) token pair.

    Expert ``j`` maps the concatenated pair ``u_i = [x_gen_i ; x_med_i]`` (2D wide) to one token:
    ``e_j(u) = up_j(relu(down_j(u)))``. The router of stream s (``router_gen``/``router_med``,
    Linear(D, n)) scores the experts from its own token; the top-k scores are kept and softmaxed:
    ``x̃_s = Σ_{j∈topk} p_j e_j(u)``. The per-stream gate ``G_s`` = Linear(D, g) gives ``g`` values per
    token, each broadcast over D/g consecutive channels: ``x̂_s = σ(G_s(x_s))·x̃_s + (1 − σ(G_s(x_s)))·x_s``.

    Choices DESIGN.md leaves open: the expert activation is ReLU (as in the MOSAIC adapters); experts are
    stored stacked (``down_weight`` (n, r, 2D), ``down_bias`` (n, r), ``up_weight`` (n, D, r),
    ``up_bias`` (n, D)) so kernels index one buffer; "lora" init (kaiming down, zero up) and gate biases
    at ``gate_bias_init`` = −4 so that x̂ ≈ x at init (σ(−4) ≈ 0.018) and the frozen backbone is kept.
    """

    def __init__(
        self,
        d_model: int = 768,
        num_experts: int = 4,
        top_k: int = 2,
        bottleneck: int = 64,
        gate_dim: int | None = 768,
        gate_bias_init: float = -4.0,
    ) -> None:
        super().__init__()
        gate_dim = d_model if gate_dim is None else gate_dim
        for name, value in (("d_model", d_model), ("bottleneck", bottleneck), ("num_experts", num_experts),
                            ("top_k", top_k), ("gate_dim", gate_dim)):
            check_int(name, value, 0)
        if d_model <= 0 or bottleneck <= 0:
            raise ValueError(f"d_model and bottleneck must be positive, got {d_model} and {bottleneck}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if gate_dim < 1 or d_model % gate_dim:
            hint = " (the default 768 is ViT-B's width; gate_dim=None means D)" if gate_dim == 768 else ""
            raise ValueError(f"gate_dim must divide d_model={d_model} (e.g. D, D/2, D/4, 1), got {gate_dim}{hint}")
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.bottleneck, self.gate_dim = bottleneck, gate_dim
        self.down_weight = nn.Parameter(torch.empty(num_experts, bottleneck, 2 * d_model))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, bottleneck))
        self.up_weight = nn.Parameter(torch.zeros(num_experts, d_model, bottleneck))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, d_model))
        for w in self.down_weight:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.router_gen = nn.Linear(d_model, num_experts)
        self.router_med = nn.Linear(d_model, num_experts)
        self.gate_gen = nn.Linear(d_model, gate_dim)
        self.gate_med = nn.Linear(d_model, gate_dim)
        for gate in (self.gate_gen, self.gate_med):
            nn.init.zeros_(gate.weight)
            nn.init.constant_(gate.bias, gate_bias_init)

    def route(self, x: torch.Tensor, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert indices (…, k) and their softmax probabilities (…, k) for stream 0 (gen) / 1 (med)."""
        router = self.router_gen if stream == 0 else self.router_med
        scores = router(x)
        top, index = top_k_lowest_index_first(scores, self.top_k)
        return index, top.softmax(dim=-1)

    def gate_values(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        """σ(G_s(x)) expanded to (…, D): gate value c covers channels [c·D/g, (c+1)·D/g)."""
        gate = self.gate_gen if stream == 0 else self.gate_med
        return torch.sigmoid(gate(x)).repeat_interleave(self.d_model // self.gate_dim, dim=-1)

    def expert_outputs(self, x_gen: torch.Tensor, x_med: torch.Tensor) -> torch.Tensor:
        """Every expert on every token pair: (B, N, n, D) (dense; the reference only)."""
        pair = torch.cat([x_gen, x_med], dim=-1)
        hidden = torch.relu(torch.einsum("bnc,erc->bner", pair, self.down_weight) + self.down_bias)
        return torch.einsum("bner,edr->bned", hidden, self.up_weight) + self.up_bias

    def forward(self, x_gen: torch.Tensor, x_med: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token of both streams through its top-k experts, mixed by the per-stream gate: (x̂_gen, x̂_med)."""
        check_pair(x_gen, x_med, self.d_model, self.router_gen.weight)
        experts = self.expert_outputs(x_gen, x_med)
        outs = []
        for stream, x in enumerate((x_gen, x_med)):
            index, prob = self.route(x, stream)
            chosen = experts.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, self.d_model))
            mix = (prob.unsqueeze(-1) * chosen).sum(dim=2)
            g = self.gate_values(x, stream)
            outs.append(g * mix + (1 - g) * x)
        return outs[0], outs[1]

    def forward_skip(
        self,
        x_gen: torch.Tensor,
        x_med: torch.Tensor,
        idx_gen: torch.Tensor,
        gate_gen: torch.Tensor,
        idx_med: torch.Tensor,
        gate_med: torch.Tensor,
        inplace: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter on selected tokens only (DynaMer token skipping).

        ``idx_s`` (B, k_s) are the tokens stream s selected, ``gate_s`` (B, k_s) their skip gates σ(score):
        ``x_s[idx] ← x + gate·(x̂_s − x)``; the other tokens are returned unchanged. The expert input is the
        pair of both streams' current tokens. ``inplace=True`` writes into ``x_gen``/``x_med`` (inference)."""
        check_pair(x_gen, x_med, self.d_model, self.router_gen.weight)
        check_selection(x_gen, idx_gen, gate_gen, "gen")
        check_selection(x_med, idx_med, gate_med, "med")
        check_gate_width(x_gen, ("gate_gen", gate_gen), ("gate_med", gate_med))
        hats = self(x_gen, x_med)
        outs = []
        for x, hat, idx, gate in ((x_gen, hats[0], idx_gen, gate_gen), (x_med, hats[1], idx_med, gate_med)):
            sel, hat_sel = gather_tokens(x, idx), gather_tokens(hat, idx)
            outs.append(scatter_tokens(x, idx, sel + gate.unsqueeze(-1) * (hat_sel - sel)))
        if inplace:
            x_gen.copy_(outs[0])
            x_med.copy_(outs[1])
            return x_gen, x_med
        return outs[0], outs[1]


def num_kept(keep_ratio: float, num_tokens: int) -> int:
    """k = ⌈ρN⌉, clamped to [1, N]; ρN is rounded to 6 decimals first so that float noise cannot add one
    (0.07·100 is 7.000000000000001 in floating point: 7 kept, not 8)."""
    return min(num_tokens, max(1, math.ceil(round(keep_ratio * num_tokens, 6))))


class SkipRouter(nn.Module):
    """DynaMer's layer-wise top-k token skipping router R_S.

    Scores every token with Linear(D, D/4) → GELU → Linear(D/4, 1); keeps the top ⌈ρN⌉ tokens with the CLS
    token (index 0) always kept; ``forward(x, fn)`` returns ``x`` with the kept tokens replaced by
    ``x + σ(s)(fn(x_kept) − x)`` (σ(s) keeps the router trainable) and the others unchanged.
    Selected indices are returned in ascending order, so the CLS token is first in ``x_kept`` and the
    order of the other tokens is kept; equal scores go to the lower token index.
    """

    def __init__(self, d_model: int = 768, keep_ratio: float = 0.5) -> None:
        super().__init__()
        if d_model < 4:
            raise ValueError(f"d_model must be >= 4, got {d_model}")
        self.d_model = d_model
        self.keep_ratio = keep_ratio
        self.fc1 = nn.Linear(d_model, d_model // 4)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_model // 4, 1)

    @property
    def keep_ratio(self) -> float:
        """ρ in (0, 1], the fraction of tokens kept (the setter checks it and stores it as a float)."""
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"keep_ratio must be a number in (0, 1], got {type(value).__name__} {value!r}")
        if not 0.0 < value <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {value!r}")
        self._keep_ratio = float(value)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits s, (B, N)."""
        return self.fc2(self.act(self.fc1(x))).squeeze(-1)

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept token indices (B, k) ascending, and their skip gates σ(s) (B, k)."""
        check_tokens(x, self.d_model, "x", self.fc1.weight, min_tokens=1)
        s = self.scores(x)
        k = num_kept(self.keep_ratio, x.shape[1])
        ranked = s.detach().clone()
        ranked[:, 0] = float("inf")
        idx = top_k_lowest_index_first(ranked, k)[1].sort(dim=1).values
        return idx, torch.sigmoid(s.gather(1, idx))

    def merge(self, x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """``x`` with rows ``idx`` set to ``x + gate·(update − x)``; ``update`` is (B, k, D)."""
        check_merge(x, idx, gate, update)
        sel = gather_tokens(x, idx)
        return scatter_tokens(x, idx, sel + gate.unsqueeze(-1) * (update - sel))

    def forward(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn`` (B, k, D) -> (B, k, D) on the kept tokens only, merged back as ``x + σ(s)(fn(x) − x)``."""
        if not callable(fn):
            raise TypeError(f"fn must be callable (B, k, D) -> (B, k, D), got {type(fn).__name__}")
        idx, gate = self.select(x)
        return self.merge(x, idx, gate, fn(gather_tokens(x, idx)))


GATE_KINDS = ("expert", "channel")


class GatedSpecialistAdapter(nn.Module):
    """M4oE-style gated mixture of the specialist adapters (dense, every expert on every token).

    ``gate="expert"``: ``out = Σ_e softmax(W_g h)_e · adapter_e(h)`` with ``gate`` = Linear(D, E).
    ``gate="channel"`` (the M4oE code's variant): ``w = softmax_channels(gate(h))`` with ``gate`` =
    Linear(D, D), ``out = w ⊙ Σ_e adapter_e(h)``. Like :class:`Adapter`, the residual is added by the caller.
    Experts are :class:`Adapter` modules ``expert_a``, ``expert_b``, ``expert_c`` (…), so a trained MOSAIC
    :class:`MoSAdapter` initialises them (:meth:`load_specialists`). The gate starts at zero (uniform mix).
    """

    def __init__(
        self,
        d_model: int = 768,
        bottlenecks: tuple[int, ...] = (64, 96, 192),
        gate: str = "expert",
        dropout: float = 0.0,
        init_option: str = "lora",
        adapter_scalar: float = 0.1,
    ) -> None:
        super().__init__()
        if gate not in GATE_KINDS:
            raise ValueError(f"gate must be one of {GATE_KINDS}, got {gate!r}")
        bottlenecks = tuple(check_int(f"bottlenecks[{i}]", b, 1) for i, b in enumerate(bottlenecks))
        if not 1 <= len(bottlenecks) <= 26:
            raise ValueError(f"bottlenecks must name 1..26 experts, got {bottlenecks}")
        self.d_model, self.bottlenecks, self.gate_kind = d_model, bottlenecks, gate
        self.expert_names = tuple(f"expert_{chr(ord('a') + i)}" for i in range(len(bottlenecks)))
        for name, r in zip(self.expert_names, bottlenecks):
            setattr(self, name, Adapter(d_model, r, dropout, init_option, adapter_scalar))
        self.gate = nn.Linear(d_model, len(bottlenecks) if gate == "expert" else d_model)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    @property
    def experts(self) -> tuple[Adapter, ...]:
        """The expert adapters in name order (``expert_a``, ``expert_b``, ...)."""
        return tuple(getattr(self, name) for name in self.expert_names)

    def load_specialists(self, mos: MoSAdapter) -> None:
        """Copy a trained MOSAIC :class:`MoSAdapter`'s expert_a/b/c into this module's experts."""
        if not isinstance(mos, MoSAdapter):
            raise TypeError(f"mos must be a MoSAdapter, got {type(mos).__name__}")
        if len(self.experts) != 3:
            raise ValueError(f"a MoSAdapter has 3 specialists, this module has {len(self.experts)} experts")
        for name, mine, theirs in zip(self.expert_names, self.experts, mos.experts):
            if mine.bottleneck != theirs.bottleneck or mine.d_model != theirs.d_model:
                raise ValueError(f"{name}: MoSAdapter expert has d_model {theirs.d_model}, bottleneck "
                                 f"{theirs.bottleneck}; this module expects {mine.d_model}, {mine.bottleneck}")
            mine.load_state_dict(theirs.state_dict())
            mine.scale = theirs.scale

    @classmethod
    def from_mos_adapter(cls, mos: MoSAdapter, gate: str = "expert") -> GatedSpecialistAdapter:
        """A gated mixture whose experts start from a trained MOSAIC specialist adapter."""
        if not isinstance(mos, MoSAdapter):
            raise TypeError(f"mos must be a MoSAdapter, got {type(mos).__name__}")
        module = cls(mos.d_model, tuple(e.bottleneck for e in mos.experts), gate)
        module.load_specialists(mos)
        return module.to(device=mos.expert_a.down_proj.weight.device, dtype=mos.expert_a.down_proj.weight.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The specialists on h (..., d_model), mixed by the softmax gate (per expert, or per channel)."""
        if not isinstance(h, torch.Tensor) or h.dim() < 2 or h.shape[-1] != self.d_model:
            raise ValueError(f"h: expected shape (..., {self.d_model}), got "
                             f"{tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}")
        check_floating("h", h)
        check_input_dtype("h", h, self.gate.weight)
        outs = torch.stack([expert(h) for expert in self.experts], dim=-2)  # (..., E, D)
        if self.gate_kind == "expert":
            weights = F.softmax(self.gate(h), dim=-1)
            return (weights.unsqueeze(-1) * outs).sum(dim=-2)
        return F.softmax(self.gate(h), dim=-1) * outs.sum(dim=-2)
