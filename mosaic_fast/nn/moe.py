"""Fast DynaMer / M4oE modules: same parameters and state_dict keys as :mod:`mosaic_fast.reference.moe`.

* :class:`GatedMoEAdapter`: in inference on the Triton backend the whole forward is two launches for
  both streams, routing included (:mod:`mosaic_fast.ops.moe_routed`), in place on the selected rows of
  the residual streams. Otherwise (gradients, autocast, the torch backend) routing, probabilities and
  gates run in torch (tiny GEMMs) and everything D-wide in one differentiable op
  (:func:`mosaic_fast.ops.moe_adapter.moe_gated_update`): only the chosen experts run, selected rows
  only. Under autocast the routing follows autocast and the update runs in the streams' dtype.
* :class:`SkipRouter`: the merge is one gather/scatter op (:mod:`mosaic_fast.ops.token_skip`).
* :class:`GatedSpecialistAdapter`: the specialists as one adapter of concatenated bottleneck with their
  LayerNorm affines folded into the down projection (:mod:`mosaic_fast.ops.gated_specialist`).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference
from ..ops import cpu_gemm
from ..ops._common import autocast_dtype, is_exact_gelu, use_kernels
from ..ops.gated_specialist import gated_specialist
from ..ops.moe_adapter import moe_gated_update
from ..ops.moe_routed import routed_update_
from ..ops.token_skip import SELECT_MAX_TOKENS, skip_merge, skip_select
from ..reference.checks import check_floating, check_input_dtype
from ..reference.moe import (
    check_gate_width,
    check_merge,
    check_pair,
    check_selection,
    check_tokens,
    num_kept,
    top_k_lowest_index_first,
)
from .adapter import adapter_parameters, bypassable
from .bypass import may_bypass
from .caches import same_tensors, weak_refs

#: The inner layers the fast modules read instead of calling (see :mod:`.bypass`), with their classes.
MOE_LAYERS = {name: (nn.Linear,) for name in ("router_gen", "router_med", "gate_gen", "gate_med")}
ROUTER_LAYERS = {"fc1": (nn.Linear,), "act": None, "fc2": (nn.Linear,)}  # (any activation, called as it is)

_ROW_OFFSETS: dict[tuple, torch.Tensor] = {}
#: GatedSpecialistAdapter -> (parameter stamp, folded weights), for inference (kept outside the module so
#: deepcopy and pickling do not carry it along).
_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: Inference on the Triton backend through the routed MoE op and the fused selection (True), or through
#: the differentiable ops as in training (False: e.g. to bisect a numerical difference).
FUSED_INFERENCE = True


def _fused_inference(x: torch.Tensor, params: tuple[torch.Tensor, ...], *others: torch.Tensor) -> bool:
    """Whether an inference-only fused op may run on ``x``: :data:`FUSED_INFERENCE`, Triton backend, no
    autocast, no gradient to record (for x, ``others`` or ``params``), every parameter in x's dtype. Not
    for float64 (:func:`~mosaic_fast.ops._common.use_kernels`: the kernels would score and route in fp32)."""
    if not FUSED_INFERENCE or not use_kernels(x) or autocast_dtype(x.device.type) is not None:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others, *params)):
        return False
    return all(p.dtype == x.dtype for p in params)


def _flat_rows(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, k) token indices -> (B·k,) row indices into the flattened (B·N, D) stream.

    The per-sample offsets (B, 1) are cached per (B, N, device) outside torch.compile (one add per call
    instead of three launches; DynaMer calls this twice per layer)."""
    key = (idx.shape[0], num_tokens, idx.device)
    compiling = torch.compiler.is_compiling()
    offsets = None if compiling else _ROW_OFFSETS.get(key)
    if offsets is None:
        offsets = torch.arange(0, idx.shape[0] * num_tokens, num_tokens, device=idx.device).unsqueeze(1)
        if not compiling and not (idx.is_cuda and torch.cuda.is_current_stream_capturing()):
            _ROW_OFFSETS[key] = offsets  # (never a tensor of a graph's private pool)
    return (idx.long() + offsets).reshape(-1)


def _in_token_order(idx: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """(B, N) skip gates of a selection that keeps all N tokens: ``gate[b, j]`` moved to token ``idx[b, j]``
    (the identity for the ascending selection a SkipRouter makes). Differentiable in ``gate``."""
    return torch.zeros_like(gate).scatter_(1, idx.long(), gate)


class GatedMoEAdapter(reference.GatedMoEAdapter):
    """Drop-in fast :class:`mosaic_fast.reference.GatedMoEAdapter` (top-k experts only, fused update)."""

    def _routing(self, x_sel: torch.Tensor, stream: int, skip_gate: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reference's :meth:`route` and gate (fp32 CPU Linears through oneDNN), times the skip gate."""
        router, gate = (self.router_gen, self.gate_gen) if stream == 0 else (self.router_med, self.gate_med)
        top, index = top_k_lowest_index_first(cpu_gemm.linear(x_sel, router.weight, router.bias), self.top_k)
        coef = torch.sigmoid(cpu_gemm.linear(x_sel, gate.weight, gate.bias))
        if skip_gate is not None:
            coef = coef * skip_gate.unsqueeze(1)
        return index, top.softmax(dim=-1), coef

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._in_stream_dtype(x, self.down_weight, self.down_bias, self.up_weight, self.up_bias)

    @staticmethod
    def _in_stream_dtype(x: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Under autocast the routing comes out in mixed dtypes (fp32 softmax, autocast-dtype gates): the
        fused update then runs in the residual streams' dtype (fp32 streams stay fp32, as the reference's
        final mix does). Outside autocast nothing is cast, so a genuine dtype mismatch still raises."""
        if autocast_dtype(x.device.type) is None:
            return tensors
        return tuple(t.to(x.dtype) for t in tensors)

    def _routed_weights(self) -> tuple[torch.Tensor, ...]:
        """Every parameter, in the order of :func:`mosaic_fast.ops.moe_routed.moe_routed_update_`."""
        return (self.router_gen.weight, self.router_gen.bias, self.router_med.weight, self.router_med.bias,
                self.gate_gen.weight, self.gate_gen.bias, self.gate_med.weight, self.gate_med.bias,
                self.down_weight, self.down_bias, self.up_weight, self.up_bias)

    def _routed_inference(self, x: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The parameters when the routing-fused inference op applies (Triton backend, no gradient to
        record, no autocast, every parameter in the streams' dtype), else None."""
        weights = self._routed_weights()
        return weights if _fused_inference(x, weights, *others) else None

    def _routed_update_(
        self, weights: tuple[torch.Tensor, ...], xg: torch.Tensor, xm: torch.Tensor,
        idx_g: torch.Tensor | None = None, gate_g: torch.Tensor | None = None,
        idx_m: torch.Tensor | None = None, gate_m: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both contiguous streams updated in place by the routed op (every token when no selection)."""
        idx = [i.long() if i is not None else None for i in (idx_g, idx_m)]
        # (the module's own checks and parameters leave nothing for the op's checks to catch)
        return routed_update_(xg, xm, idx[0], gate_g, idx[1], gate_m, weights, self.top_k)

    def forward(self, x_gen: torch.Tensor, x_med: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams updated by their top-k experts and gates (as the reference), fused."""
        if not may_bypass(self, MOE_LAYERS):
            return super().forward(x_gen, x_med)
        check_pair(x_gen, x_med, self.d_model, self.router_gen.weight)
        weights = self._routed_inference(x_gen, x_med)
        if weights is not None:
            fmt = torch.contiguous_format
            return self._routed_update_(weights, x_gen.clone(memory_format=fmt), x_med.clone(memory_format=fmt))
        xg, xm = x_gen.reshape(-1, self.d_model), x_med.reshape(-1, self.d_model)
        eg, pg, cg = self._routing(xg, 0)
        em, pm, cm = self._routing(xm, 1)
        pg, cg, pm, cm = self._in_stream_dtype(xg, pg, cg, pm, cm)
        og, om = moe_gated_update(xg, xm, None, None, eg, pg, cg, em, pm, cm, *self._params(xg))  # every row
        return og.view(x_gen.shape), om.view(x_med.shape)

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
        """The reference's :meth:`~mosaic_fast.reference.GatedMoEAdapter.forward_skip` on the selected rows
        only: unselected rows are neither read nor written (in place on the streams when ``inplace``)."""
        if not may_bypass(self, MOE_LAYERS):
            return super().forward_skip(x_gen, x_med, idx_gen, gate_gen, idx_med, gate_med, inplace)
        check_pair(x_gen, x_med, self.d_model, self.router_gen.weight)
        check_selection(x_gen, idx_gen, gate_gen, "gen")
        check_selection(x_med, idx_med, gate_med, "med")
        check_gate_width(x_gen, ("gate_gen", gate_gen), ("gate_med", gate_med))
        if inplace and torch.is_grad_enabled() and any(
                t.requires_grad for t in (x_gen, x_med, gate_gen, gate_med, *self._routed_weights())):
            # under autograd the update saves what it reads (the streams, or views of them, for the routing's
            # and the experts' backward): it reads copies, then its result is copied into the streams
            out_gen, out_med = self.forward_skip(x_gen.clone(), x_med.clone(), idx_gen, gate_gen, idx_med, gate_med)
            return x_gen.copy_(out_gen), x_med.copy_(out_med)
        n = x_gen.shape[1]
        direct = inplace and x_gen.is_contiguous() and x_med.is_contiguous()
        weights = self._routed_inference(x_gen, x_med, gate_gen, gate_med)
        if weights is not None:
            fmt = torch.contiguous_format
            yg, ym = (x_gen, x_med) if direct else (x_gen.clone(memory_format=fmt), x_med.clone(memory_format=fmt))
            self._routed_update_(weights, yg, ym, idx_gen, gate_gen, idx_med, gate_med)
            if inplace and not direct:
                x_gen.copy_(yg)
                x_med.copy_(ym)
                return x_gen, x_med
            return yg, ym
        xg, xm = x_gen.reshape(-1, self.d_model), x_med.reshape(-1, self.d_model)
        if idx_gen.shape[1] == n and idx_med.shape[1] == n:
            # every token kept (ρ = 1: each idx a permutation): the update of every row in order, with the
            # skip gates put in token order; no gathers, one shared expert input, no scatter
            rows_g = rows_m = None
            sel_g, sel_m = xg, xm
            skip_g, skip_m = _in_token_order(idx_gen, gate_gen), _in_token_order(idx_med, gate_med)
        else:
            rows_g, rows_m = _flat_rows(idx_gen, n), _flat_rows(idx_med, n)
            sel_g, sel_m = xg.index_select(0, rows_g), xm.index_select(0, rows_m)
            skip_g, skip_m = gate_gen, gate_med
        eg, pg, cg = self._routing(sel_g, 0, skip_g.reshape(-1))
        em, pm, cm = self._routing(sel_m, 1, skip_m.reshape(-1))
        pg, cg, pm, cm = self._in_stream_dtype(xg, pg, cg, pm, cm)
        og, om = moe_gated_update(xg, xm, rows_g, rows_m, eg, pg, cg, em, pm, cm, *self._params(xg),
                                  inplace=direct)
        if direct:
            return x_gen, x_med
        if inplace:
            x_gen.copy_(og.view(x_gen.shape))
            x_med.copy_(om.view(x_med.shape))
            return x_gen, x_med
        return og.view(x_gen.shape), om.view(x_med.shape)


class SkipRouter(reference.SkipRouter):
    """Drop-in fast :class:`mosaic_fast.reference.SkipRouter`: the gated merge is one gather/scatter op. In
    inference on the Triton backend the selection is the first Linear plus one kernel (score, top-k, sort,
    gates); otherwise it is the reference's, except that at ρ = 1 (every token kept) the selection is the
    identity, without the top-k and sort. Equal scores go to the lower token index, as in the reference."""

    def _fused_select(self, x: torch.Tensor) -> bool:
        """Whether :func:`mosaic_fast.ops.token_skip.skip_select` applies: Triton backend, no gradient to
        record, no autocast, exact GELU, parameters in x's dtype, at most ``SELECT_MAX_TOKENS`` tokens."""
        params = (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return (is_exact_gelu(self.act) and x.shape[1] <= SELECT_MAX_TOKENS and _fused_inference(x, params)
                and may_bypass(self, ROUTER_LAYERS))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The reference's router logits (B, N), fp32 CPU Linears through oneDNN with the GELU fused."""
        if not may_bypass(self, ROUTER_LAYERS):
            return super().scores(x)
        hidden = cpu_gemm.linear_act(x, self.fc1.weight, self.fc1.bias, self.act)
        return cpu_gemm.linear(hidden, self.fc2.weight, self.fc2.bias).squeeze(-1)

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's kept tokens (B, k) ascending and their gates σ(s) (B, k)."""
        n = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 3 else 0
        if n and self._fused_select(x):
            check_tokens(x, self.d_model, "x", self.fc1.weight, min_tokens=1)
            h = F.linear(x, self.fc1.weight, self.fc1.bias)
            return skip_select(h, self.fc2.weight, self.fc2.bias, num_kept(self.keep_ratio, n))
        if n == 0 or num_kept(self.keep_ratio, n) < n:
            return super().select(x)
        check_tokens(x, self.d_model, "x", self.fc1.weight, min_tokens=1)
        s = self.scores(x)
        # all N kept: the reference's ascending top-N indices are exactly 0..N-1, whatever the scores
        idx = torch.arange(n, device=x.device).expand(x.shape[0], n)
        return idx, torch.sigmoid(s)

    def merge(self, x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """The reference's merge as one gather/scatter op: rows ``idx`` of x become ``x + gate·(update − x)``."""
        check_merge(x, idx, gate, update)
        d = x.shape[-1]
        out = skip_merge(x.reshape(-1, d), _flat_rows(idx, x.shape[1]), update.reshape(-1, d).to(x.dtype),
                         gate.reshape(-1, 1).to(x.dtype))
        return out.view(x.shape)


class GatedSpecialistAdapter(reference.GatedSpecialistAdapter):
    """Drop-in fast :class:`mosaic_fast.reference.GatedSpecialistAdapter`: one adapter of bottleneck Σ r_e.

    Falls back to the reference forward when dropout is active (training with p > 0), the specialists'
    LayerNorm eps differ, or a specialist or one of its layers is replaced or hooked (:mod:`.bypass`)."""

    def _unit_expert(self, device: torch.device) -> torch.Tensor:
        cache = self.__dict__.setdefault("_unit_expert_cache", {})
        if device not in cache:
            cache[device] = torch.cat([torch.full((r,), i, dtype=torch.int32) for i, r in
                                       enumerate(self.bottlenecks)]).to(device)
        return cache[device]

    def _fold(self) -> tuple[torch.Tensor, ...]:
        """(w_fold, b_fold, w_up, b_up, scales): the specialists as one adapter of bottleneck Σ r_e, their
        LayerNorm affines folded into the down projection, and their scalars as an (E,) vector."""
        experts = self.experts
        w_fold = torch.cat([e.down_proj.weight * e.layer_norm.weight for e in experts])
        b_fold = torch.cat([e.down_proj.weight @ e.layer_norm.bias + e.down_proj.bias for e in experts])
        w_up = torch.cat([e.up_proj.weight for e in experts], dim=1)
        b_up = torch.stack([e.up_proj.bias for e in experts])
        scales = torch.cat([w_up.new_full((1,), float(e.scale)) for e in experts])  # on the device: no copy
        return w_fold, b_fold, w_up, b_up, scales

    def _folded(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`_fold`, kept between inference calls while the parameters are unchanged (same tensors,
        storage and version counters): the ~14 small ops of the fold then run once, not per call. Recomputed (and
        differentiable) when a gradient is recorded, under torch.compile and during CUDA-graph capture."""
        params = adapter_parameters(self.experts)
        if (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or torch.compiler.is_compiling() \
                or (h.is_cuda and torch.cuda.is_current_stream_capturing()):
            return self._fold()
        stamp = (tuple((p.data_ptr(), p._version) for p in params), tuple(float(e.scale) for e in self.experts),
                 torch.is_inference_mode_enabled())
        entry = _FOLDED.get(self)
        if entry is None or entry[0] != stamp or not same_tensors(entry[1], params):
            entry = _FOLDED[self] = (stamp, weak_refs(params), self._fold())
        return entry[2]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The reference's mixture as one adapter of concatenated bottleneck (one fused op)."""
        experts = self.experts
        if not bypassable(self, experts):
            return super().forward(h)
        dropout_active = self.training and any(e.dropout.p > 0 for e in experts)
        if dropout_active or len({e.layer_norm.eps for e in experts}) != 1 or not isinstance(h, torch.Tensor):
            return super().forward(h)
        if h.dim() < 2 or h.shape[-1] != self.d_model:
            raise ValueError(f"h: expected shape (..., {self.d_model}), got {tuple(h.shape)}")
        check_floating("h", h)
        check_input_dtype("h", h, self.gate.weight)
        h2 = h.reshape(-1, self.d_model)
        w_fold, b_fold, w_up, b_up, scales = self._folded(h)
        logits = self.gate(h2)
        if self.gate_kind == "expert":
            scale = F.softmax(logits, dim=-1) * scales
            channel_weight = None
        else:
            scale = scales.to(h2.dtype).expand(h2.shape[0], -1).contiguous()
            channel_weight = F.softmax(logits, dim=-1)
        out = gated_specialist(h2, w_fold, b_fold, self._unit_expert(h.device), scale, w_up, b_up,
                               channel_weight, experts[0].layer_norm.eps)
        return out.view(h.shape)
