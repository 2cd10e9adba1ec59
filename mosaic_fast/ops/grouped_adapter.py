"""Grouped specialist adapter: ``base + s * up_g(relu(down_g(LN_g(h))))`` per row, all groups in one op.

Public entry points
-------------------
:func:`grouped_adapter` — checks every argument (packed weights included), handles autocast and shapes,
    runs the op and returns ``out`` with h's shape.
:func:`run_packed` — the same for weights known to be consistent (e.g. from :func:`pack_adapters`):
    checks only h, base, expert_id and devices (what ``nn.Adapter``/``nn.MoSAdapter`` call).
:func:`pack_adapters` — packs the parameters of several reference/nn ``Adapter`` modules into the
    layout the op takes (differentiable ``torch.cat``, so gradients reach every adapter's parameters).

Packed layout (G groups, bottlenecks r_g, R = sum r_g): ``ln_w``, ``ln_b``, ``up_b`` (G, D);
``down_w`` (R, D) with group g at rows [off_g, off_g + r_g); ``down_b`` (R,); ``up_w`` (D, R) with group g
at columns [off_g, off_g + r_g). One adapter (G = 1) is just its own tensors, viewed.

Routing: ``expert_id`` None means every row is group 0 (G must be 1); else an integer tensor (B,) with
B = h.shape[0] routes sample b (rows b*N .. b*N + N - 1 of the flattened h) to group expert_id[b]
(h of shape (T, 1, D) with a (T,) id tensor routes single rows, as the packed 2D/3D stream does).

Autograd and torch.compile
--------------------------
* Custom ops (``torch.library``; fake implementations give the shapes, so torch.compile does not
  graph-break): ``mosaic_fast::grouped_adapter_fwd`` -> (out, mean, rstd, preact) and
  ``mosaic_fast::grouped_adapter_bwd`` -> (dh, dln_w, dln_b, ddown_w, ddown_b, dup_w, dup_b), with the
  autograd formula registered on the forward op. Used whenever torch.compile traces the call.
* Eagerly the same implementations run through :class:`GroupedAdapterFunction` (a plain
  ``autograd.Function``: no custom-op dispatch overhead), or, without any gradient, directly. One group
  on the torch fallback is differentiated by autograd itself (:func:`adapter_torch`: the reference's
  ops, C++ backward).
* d(base) is the incoming gradient itself. The forward saves h, the LayerNorm statistics (T,) fp32 and
  the pre-activation (T, max r). The Triton backward recomputes x-hat on the fly (and the pre-activation
  too when ``mosaic_fast.kernels.grouped_adapter.SAVE_PREACT = False``); the torch backward forms
  ``ddown_w`` from x and the saved statistics for fp32/fp64 (no LayerNorm recompute) and recomputes the
  LayerNorm output for 16-bit activations.

Dispatch (``mosaic_fast.set_backend``): Triton kernels on CUDA (and on CPU under TRITON_INTERPRET=1 with
backend "triton"), the torch fallback otherwise. One exception, from measurement: with one group
(``expert_id`` None) backend "auto" runs the torch ops (cuBLAS) on CUDA too, because on an H200 (bf16,
2026-11-30) the fused kernel took 1.4-2.0x cuBLAS's time for one specialist, while for mixed batches it
was 2-4x faster than the reference; backend "triton" still runs the kernel for one group.
The fallback sorts samples by group with a stable argsort and runs one LayerNorm + two GEMMs per group
(oneDNN for fp32 on CPU, :mod:`mosaic_fast.ops.cpu_gemm`) over the gathered rows (a mixed batch with
base starts from a copy of base and index_add_s each group's scaled output); it reads the group sizes on
the host (fine on CPU, a sync on CUDA, where the Triton path is the default). Bad ids: on CPU tensors,
ids outside [0, G) raise ValueError (as does the torch fallback on CUDA). The Triton kernels on CUDA
cannot raise without a host sync: rows routed to an invalid id come out as NaN
(never a silently plausible value).
"""


from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backend
from ..reference.checks import check_floating
from . import cpu_gemm
from ._common import (
    autocast_dtype,
    check_ids,
    check_ids_range,
    check_real,
    check_sizes,
    check_tensor,
    once_differentiable_strict,
    resolve_compute_dtype,
)

__all__ = ["adapter_torch", "group_offsets", "grouped_adapter", "pack_adapters", "run_adapter", "run_packed",
           "single_adapter_uses_torch"]


def group_offsets(bottlenecks: Sequence[int]) -> list[int]:
    """Start of each group in the packed bottleneck dimension."""
    offs, acc = [], 0
    for r in bottlenecks:
        offs.append(acc)
        acc += int(r)
    return offs


def pack_adapters(adapters: Iterable[nn.Module]) -> tuple[tuple[Tensor, ...], list[int]]:
    """((ln_w, ln_b, down_w, down_b, up_w, up_b), bottlenecks) for a sequence of Adapter modules."""
    adapters = list(adapters)
    if not adapters:
        raise ValueError("adapters must hold at least one Adapter")
    for i, a in enumerate(adapters):
        if not all(isinstance(getattr(a, n, None), nn.Module) for n in ("layer_norm", "down_proj", "up_proj")):
            raise TypeError(f"adapters[{i}] must be an Adapter (layer_norm, down_proj, up_proj), got "
                            f"{type(a).__name__}")
    widths = [a.down_proj.weight.shape[1] for a in adapters]
    if len(set(widths)) != 1:
        raise ValueError(f"adapters must share one d_model, got {widths}")
    if len(adapters) == 1:
        a = adapters[0]
        tensors = (
            a.layer_norm.weight.unsqueeze(0),
            a.layer_norm.bias.unsqueeze(0),
            a.down_proj.weight,
            a.down_proj.bias,
            a.up_proj.weight,
            a.up_proj.bias.unsqueeze(0),
        )
    else:
        tensors = (
            torch.stack([a.layer_norm.weight for a in adapters]),
            torch.stack([a.layer_norm.bias for a in adapters]),
            torch.cat([a.down_proj.weight for a in adapters], dim=0),
            torch.cat([a.down_proj.bias for a in adapters], dim=0),
            torch.cat([a.up_proj.weight for a in adapters], dim=1),
            torch.stack([a.up_proj.bias for a in adapters]),
        )
    return tensors, [a.down_proj.weight.shape[0] for a in adapters]


# ----------------------------------------------------------------------------------------------------
# torch fallback
# ----------------------------------------------------------------------------------------------------


def _groups(ids: Tensor | None, G: int) -> list[tuple[int, Tensor | None]]:
    """Non-empty groups as (g, sample indices in stable order); (0, None) = all rows, no gather."""
    if ids is None:
        return [(0, None)]
    ids_host = ids if ids.device.type == "cpu" else ids.cpu()
    counts = torch.bincount(ids_host.long(), minlength=G).tolist()
    parts = torch.argsort(ids_host, stable=True).split(counts)
    if ids.device.type != "cpu":
        parts = [p.to(ids.device) for p in parts]
    return [(g, p) for g, (p, c) in enumerate(zip(parts, counts)) if c]


def _gather(x: Tensor, idx: Tensor | None, seg_len: int) -> Tensor:
    if idx is None:
        return x
    return x.reshape(-1, seg_len, x.shape[-1]).index_select(0, idx).reshape(-1, x.shape[-1])


def _scatter_(dst: Tensor, idx: Tensor | None, seg_len: int, src: Tensor) -> None:
    if idx is None:
        dst.copy_(src)
    else:
        dst.view(-1, seg_len, dst.shape[-1]).index_copy_(0, idx, src.view(-1, seg_len, dst.shape[-1]))


def _layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float):
    """(y, mean, rstd) with mean/rstd flat; LayerNorm in x's dtype (weights cast to it)."""
    y, mean, rstd = torch.native_layer_norm(x, [x.shape[-1]], w.to(x.dtype), b.to(x.dtype), eps)
    return y, mean.reshape(-1), rstd.reshape(-1)


def _torch_forward(h, base, ids, seg_len, ln_w, ln_b, wd, bd, wu, bu, bottlenecks, scale, eps, save):
    """One LayerNorm and two addmm per non-empty group over its gathered rows.

    Mixed batches with ``base`` start from a copy of ``base`` and add each group's scaled adapter
    output into its rows (index_add_), so base is read once and no zero fill or second gather is
    needed. Every row belongs to a group (ids are range-checked), so ``out`` needs no fill otherwise.
    """
    T, D = h.shape
    G = len(bottlenecks)
    r_max = max(bottlenecks)
    ct = wd.dtype
    single = ids is None
    if single and T > 0:
        mean = rstd = preact = None  # set from the one group below
    else:
        mean = torch.empty(T if save else 0, dtype=torch.float32, device=h.device)
        rstd = torch.empty(T if save else 0, dtype=torch.float32, device=h.device)
        preact = torch.zeros((T if save else 0, r_max), dtype=ct, device=h.device)
    if T == 0:
        return torch.empty((0, D), dtype=h.dtype, device=h.device), mean, rstd, preact
    out = None
    if not single:
        out = base.clone(memory_format=torch.contiguous_format) if base is not None else torch.empty(
            (T, D), dtype=h.dtype, device=h.device)
    offs = group_offsets(bottlenecks)
    for g, idx in _groups(ids, G):
        r, o = bottlenecks[g], offs[g]
        x = _gather(h, idx, seg_len)
        y, mu, rs = _layer_norm(x, ln_w[g], ln_b[g], eps)
        a = cpu_gemm.addmm(bd[o : o + r], y.to(ct), wd[o : o + r].t())
        z = torch.relu(a) if save else a.relu_()
        wu_g = wu[:, o : o + r].t()
        if single:
            res = cpu_gemm.addmm(bu[g], z, wu_g)
            out = res.mul_(scale) if base is None else torch.add(base, res.to(h.dtype), alpha=scale)
            out = out if out.dtype == h.dtype else out.to(h.dtype)
            if save:
                mean, rstd, preact = mu.float(), rs.float(), a
            else:
                mean, rstd = h.new_empty(0, dtype=torch.float32), h.new_empty(0, dtype=torch.float32)
                preact = h.new_empty((0, r_max), dtype=ct)
            continue
        res = cpu_gemm.addmm(bu[g], z, wu_g)
        view = out.view(-1, seg_len, D)
        if base is None:
            view.index_copy_(0, idx, res.mul_(scale).to(h.dtype).view(-1, seg_len, D))
        else:
            view.index_add_(0, idx, res.to(h.dtype).view(-1, seg_len, D), alpha=scale)
        if save:
            _scatter_(mean.view(T, 1), idx, seg_len, mu.view(-1, 1).float())
            _scatter_(rstd.view(T, 1), idx, seg_len, rs.view(-1, 1).float())
            _scatter_(preact[:, :r] if r < r_max else preact, idx, seg_len, a)
    return out, mean, rstd, preact


def _torch_backward(dout, h, ids, seg_len, ln_w, ln_b, wd, bd, wu, bu, bottlenecks, mean, rstd, preact, scale,
                    eps, need_dh, need_w):
    T, D = h.shape
    G = len(bottlenecks)
    ct = wd.dtype
    single = ids is None

    def no_grads():
        return [torch.zeros(0, dtype=ct, device=h.device) for _ in range(6)]

    if T == 0:
        dh = torch.zeros((0, D), dtype=h.dtype, device=h.device)
        return (dh, *([torch.zeros_like(t) for t in (ln_w, ln_b, wd, bd, wu, bu)] if need_w else no_grads()))
    # every row belongs to a group (ids were range-checked), so dh needs no zero fill
    dh = None if single else torch.empty((T if need_dh else 0, D), dtype=h.dtype, device=h.device)
    grads = None if single or not need_w else [torch.zeros_like(t) for t in (ln_w, ln_b, wd, bd, wu, bu)]
    offs = group_offsets(bottlenecks)
    have_a = preact.shape[0] == T
    # the statistics path needs x, the statistics and the weights in one dtype (not fp32 x under bf16 autocast)
    have_stats = mean.shape[0] == T and mean.dtype == h.dtype == ct
    for g, idx in _groups(ids, G):
        r, o = bottlenecks[g], offs[g]
        x = _gather(h, idx, seg_len)
        if have_stats and have_a:
            # fp32/fp64 activations: no LayerNorm recompute. The statistics come from the forward and
            # dWd = da^T y is formed from x: da^T y = ((da * rstd)^T x - ((da * rstd)^T mean) 1^T) * w
            # + (sum da) b^T, one GEMM of the same size as da^T y.
            mu = _gather(mean.view(T, 1), idx, seg_len).view(-1)
            rs = _gather(rstd.view(T, 1), idx, seg_len).view(-1)
            y = None
        else:
            y, mu, rs = _layer_norm(x, ln_w[g], ln_b[g], eps)
        if have_a:
            a = _gather(preact[:, :r] if r < preact.shape[1] else preact, idx, seg_len)
        else:
            a = cpu_gemm.addmm(bd[o : o + r], y.to(ct), wd[o : o + r].t())
        do = _gather(dout, idx, seg_len).to(ct)
        dz = cpu_gemm.mm(do, wu[:, o : o + r]).mul_(scale)
        da = torch.ops.aten.threshold_backward(dz, a, 0)
        dy = cpu_gemm.mm(da, wd[o : o + r])
        dx, dlw, dlb = torch.ops.aten.native_layer_norm_backward(
            dy.to(x.dtype), x, [D], mu.view(-1, 1), rs.view(-1, 1), ln_w[g].to(x.dtype), ln_b[g].to(x.dtype),
            [bool(need_dh), bool(need_w), bool(need_w)],
        )
        if need_w:
            dwu = cpu_gemm.mm(do.t(), torch.relu(a)).mul_(scale)
            dbu = do.sum(0).mul_(scale)
            dbd = da.sum(0)
            if y is None:
                da_s = da * rs.view(-1, 1)
                dwd = cpu_gemm.mm(da_s.t(), x.to(ct))
                dwd.sub_(torch.mv(da_s.t(), mu.to(ct)).view(-1, 1)).mul_(ln_w[g].view(1, -1))
                dwd.addr_(dbd, ln_b[g])
            else:
                dwd = cpu_gemm.mm(da.t(), y.to(ct))
            dlw, dlb = dlw.to(ct), dlb.to(ct)
            if single:
                grads = [dlw.view(1, D), dlb.view(1, D), dwd, dbd, dwu, dbu.view(1, D)]
            else:
                grads[0][g], grads[1][g], grads[5][g] = dlw, dlb, dbu
                grads[2][o : o + r], grads[3][o : o + r], grads[4][:, o : o + r] = dwd, dbd, dwu
        if need_dh:
            if single:
                dh = dx if dx.dtype == h.dtype else dx.to(h.dtype)
            else:
                _scatter_(dh, idx, seg_len, dx)
    if dh is None:
        dh = torch.zeros((0, D), dtype=h.dtype, device=h.device)
    return (dh, *(grads if need_w else no_grads()))


# ----------------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------------


def _kernels():
    from mosaic_fast.kernels import grouped_adapter as k

    return k


def _validate_ids_on_host(ids: Tensor | None, G: int, triton_path: bool) -> None:
    # The Triton kernels mark rows of invalid ids NaN (no sync); where reading the ids costs nothing
    # (CPU) or the path syncs anyway (torch fallback), raise instead.
    if ids is not None and (ids.device.type == "cpu" or not triton_path):
        check_ids_range("expert_id", ids, G)


def _use_kernels(h: Tensor) -> bool:
    """Whether the Triton kernels run: the backend's choice, except for float64, which the kernels would
    compute in fp32 (and whose backward they do not support); float64 takes the torch path."""
    return h.dtype != torch.float64 and backend.use_triton(h)


def single_adapter_uses_torch(h: Tensor) -> bool:
    """Whether one adapter (one group) on ``h`` runs :func:`adapter_torch` (cuBLAS on CUDA) rather than the
    kernel: always, unless backend "triton" asks for the kernel (module docstring)."""
    return backend.get_backend() != "triton" or not _use_kernels(h)


def _forward_impl(h, base, ids, seg_len, ln_w, ln_b, wd, bd, wu, bu, bottlenecks, scale, eps, save):
    """Dispatch the forward: (out, mean, rstd, preact)."""
    triton_path = _use_kernels(h)
    _validate_ids_on_host(ids, len(bottlenecks), triton_path)
    if triton_path:
        return _kernels().forward(h, base, ids, seg_len, ln_w, ln_b, wd, bd, wu, bu, bottlenecks, scale, eps, save)
    return _torch_forward(h, base, ids, seg_len, ln_w, ln_b, wd, bd, wu, bu, bottlenecks, scale, eps, save)


def _backward_impl(dout, h, ids, seg_len, ln_w, ln_b, wd, bd, wu, bu, mean, rstd, preact, bottlenecks, scale, eps,
                   need_dh, need_w):
    """Dispatch the backward: (dh, dln_w, dln_b, ddown_w, ddown_b, dup_w, dup_b)."""
    if _use_kernels(h):
        return tuple(
            _kernels().backward(dout, h, ids, seg_len, ln_w, ln_b, wd, bd, wu, bu, bottlenecks, mean, rstd, preact,
                                scale, eps, need_dh, need_w)
        )
    return _torch_backward(dout, h, ids, seg_len, ln_w, ln_b, wd, bd, wu, bu, bottlenecks, mean, rstd, preact, scale,
                           eps, need_dh, need_w)


@torch.library.custom_op("mosaic_fast::grouped_adapter_fwd", mutates_args=())
def grouped_adapter_fwd(
    h: Tensor,
    base: Tensor | None,
    ids: Tensor | None,
    seg_len: int,
    ln_w: Tensor,
    ln_b: Tensor,
    down_w: Tensor,
    down_b: Tensor,
    up_w: Tensor,
    up_b: Tensor,
    bottlenecks: list[int],
    scale: float,
    eps: float,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, mean, rstd, preact); mean/rstd/preact are empty unless ``save``."""
    return _forward_impl(h, base, ids, seg_len, ln_w, ln_b, down_w, down_b, up_w, up_b, bottlenecks, scale, eps,
                         save)


@grouped_adapter_fwd.register_fake
def _(h, base, ids, seg_len, ln_w, ln_b, down_w, down_b, up_w, up_b, bottlenecks, scale, eps, save):
    T, D = h.shape
    n = T if save else 0
    return (
        h.new_empty((T, D)),
        h.new_empty((n,), dtype=torch.float32),
        h.new_empty((n,), dtype=torch.float32),
        h.new_empty((n, max(bottlenecks)), dtype=down_w.dtype),
    )


@torch.library.custom_op("mosaic_fast::grouped_adapter_bwd", mutates_args=())
def grouped_adapter_bwd(
    dout: Tensor,
    h: Tensor,
    ids: Tensor | None,
    seg_len: int,
    ln_w: Tensor,
    ln_b: Tensor,
    down_w: Tensor,
    down_b: Tensor,
    up_w: Tensor,
    up_b: Tensor,
    mean: Tensor,
    rstd: Tensor,
    preact: Tensor,
    bottlenecks: list[int],
    scale: float,
    eps: float,
    need_dh: bool,
    need_w: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dh, dln_w, dln_b, ddown_w, ddown_b, dup_w, dup_b); dh empty unless need_dh, the weight
    gradients empty unless need_w."""
    return _backward_impl(dout, h, ids, seg_len, ln_w, ln_b, down_w, down_b, up_w, up_b, mean, rstd, preact,
                          bottlenecks, scale, eps, need_dh, need_w)


@grouped_adapter_bwd.register_fake
def _(dout, h, ids, seg_len, ln_w, ln_b, down_w, down_b, up_w, up_b, mean, rstd, preact, bottlenecks, scale,
      eps, need_dh, need_w):
    T, D = h.shape
    dh = h.new_empty((T if need_dh else 0, D))
    if need_w:
        grads = [torch.empty_like(t) for t in (ln_w, ln_b, down_w, down_b, up_w, up_b)]
    else:
        grads = [h.new_empty((0,), dtype=down_w.dtype) for _ in range(6)]
    return (dh, *grads)


def _input_grads(ctx, dout, bwd):
    """Gradients of (h, base, ids, seg_len, 6 weights, ...) from the saved context; ``bwd`` is the
    backward op (custom op under torch.compile, the plain implementation in eager)."""
    h, ids, ln_w, ln_b, down_w, down_b, up_w, up_b, mean, rstd, preact = ctx.saved_tensors
    seg_len, bottlenecks, scale, eps = ctx.config
    need = ctx.needs_input_grad
    need_dh, need_w = need[0], any(need[4:10])
    grads = (None,) * 7
    if need_dh or need_w:
        grads = bwd(dout, h, ids, seg_len, ln_w, ln_b, down_w, down_b, up_w, up_b, mean, rstd, preact, bottlenecks,
                    scale, eps, need_dh, need_w)
    wgrads = [g if n else None for g, n in zip(grads[1:], need[4:10])]
    return (grads[0] if need_dh else None, dout if need[1] else None, None, None, *wgrads)


def _setup_context(ctx, inputs, output):
    h, _base, ids, seg_len, ln_w, ln_b, down_w, down_b, up_w, up_b, bottlenecks, scale, eps, save = inputs
    _, mean, rstd, preact = output
    if not save:
        ctx.unusable = True
    ctx.save_for_backward(h, ids, ln_w, ln_b, down_w, down_b, up_w, up_b, mean, rstd, preact)
    ctx.config = (seg_len, list(bottlenecks), scale, eps)
    ctx.mark_non_differentiable(mean, rstd, preact)


def _backward(ctx, dout, _dmean, _drstd, _dpreact):
    if getattr(ctx, "unusable", False):
        raise RuntimeError("grouped_adapter_fwd ran with save=False; it cannot be differentiated")
    return (*_input_grads(ctx, dout, grouped_adapter_bwd), None, None, None, None)


grouped_adapter_fwd.register_autograd(_backward, setup_context=_setup_context)


def adapter_torch(h: Tensor, base: Tensor | None, ln_w: Tensor, ln_b: Tensor, down_w: Tensor, down_b: Tensor,
                  up_w: Tensor, up_b: Tensor, scale: float, eps: float) -> Tensor:
    """One adapter, ``[base +] scale * up(relu(down(LN(h))))``, with the reference's own torch ops
    (fp32 Linear on CPU through oneDNN, :mod:`mosaic_fast.ops.cpu_gemm`).

    What backend "auto" runs for one specialist (cuBLAS on CUDA, differentiated by torch's C++ autograd):
    the reference's ops, minus its separate scale multiply when ``base`` is given (one add with
    ``alpha``; on CPU without gradients the up-projection accumulates into a copy of ``base``,
    :func:`cpu_gemm.add_linear`). Weights as the modules hold them (``ln_w`` (D,), ``down_w`` (r, D),
    ``up_w`` (D, r), ...); under autocast ``F.linear`` casts them as the reference's ``nn.Linear`` does.
    The ReLU and the scale act in place on the fresh GEMM outputs (neither GEMM's backward reads its
    output), except when a gradient is recorded and the output is a view (oneDNN's, for N-D inputs on
    CPU): autograd would then copy the whole base gradient in the backward (CopySlices, AsStridedBackward).
    """
    y = F.layer_norm(h, (h.shape[-1],), ln_w, ln_b, eps)
    hidden = cpu_gemm.linear(y, down_w, down_b)
    recording = torch.is_grad_enabled() and hidden.requires_grad
    in_place = not recording or not (torch.compiler.is_compiling() or hidden._is_view())  # (dynamo: no _is_view)
    z = hidden.relu_() if in_place else torch.relu(hidden)
    if base is not None:
        return cpu_gemm.add_linear(base, z, up_w, up_b, alpha=scale)
    out = cpu_gemm.linear(z, up_w, up_b)
    return out.mul_(scale) if in_place else out * scale


class GroupedAdapterFunction(torch.autograd.Function):
    """Eager autograd path (no custom-op dispatch overhead); torch.compile traces the custom op."""

    @staticmethod
    def forward(ctx, h, base, ids, seg_len, ln_w, ln_b, down_w, down_b, up_w, up_b, bottlenecks, scale, eps):
        out, mean, rstd, preact = _forward_impl(h, base, ids, seg_len, ln_w, ln_b, down_w, down_b, up_w, up_b,
                                                bottlenecks, scale, eps, True)
        ctx.save_for_backward(h, ids, ln_w, ln_b, down_w, down_b, up_w, up_b, mean, rstd, preact)
        ctx.config = (seg_len, bottlenecks, scale, eps)
        return out

    @staticmethod
    @once_differentiable_strict  # torch's once_differentiable let a double backward pass silently
    def backward(ctx, dout):
        return (*_input_grads(ctx, dout, _backward_impl), None, None, None)


# ----------------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------------


def grouped_adapter(
    h: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
    down_w: Tensor,
    down_b: Tensor,
    up_w: Tensor,
    up_b: Tensor,
    bottlenecks: Sequence[int],
    *,
    base: Tensor | None = None,
    expert_id: Tensor | None = None,
    scale: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``[base +] scale * up_g(relu(down_g(LN_g(h))))`` for every row of ``h`` (..., D).

    Weights in the packed layout (module docstring). ``expert_id``: None (one group) or an integer
    tensor (B,) routing sample b of h (B, ...) to its group. Output: h's shape and dtype; under
    autocast the adapter runs in the autocast dtype and, without ``base``, returns that dtype (as the
    reference's Linear layers do).
    """
    check_tensor("h", h, floating=True)
    bottlenecks = check_sizes("bottlenecks", bottlenecks)
    G = len(bottlenecks)
    R = sum(bottlenecks)
    check_tensor("ln_w", ln_w, shape=(G, None), floating=True)
    D = ln_w.shape[1]
    check_tensor("ln_b", ln_b, shape=(G, D), floating=True)
    check_tensor("down_w", down_w, shape=(R, D), floating=True)
    check_tensor("down_b", down_b, shape=(R,), floating=True)
    check_tensor("up_w", up_w, shape=(D, R), floating=True)
    check_tensor("up_b", up_b, shape=(G, D), floating=True)
    weights = [ln_w, ln_b, down_w, down_b, up_w, up_b]
    for name, w in zip(("ln_b", "down_w", "down_b", "up_w", "up_b"), weights[1:]):
        if w.dtype != ln_w.dtype:
            raise TypeError(f"{name} is {w.dtype} but ln_w is {ln_w.dtype}: all weights must share one dtype")
    return run_packed(h, weights, bottlenecks, base=base, expert_id=expert_id, scale=scale, eps=eps)


def _check_h_base_devices(h: Tensor, base: Tensor | None, D: int, weights) -> None:
    """h's last dim, base's shape/dtype/device and the weights' device (what the packed checks skip)."""
    check_tensor("h", h)
    if h.dim() == 0 or h.shape[-1] != D:
        raise ValueError(f"h: expected last dim {D}, got shape {tuple(h.shape)}")
    check_floating("h", h)  # (else the dtype check below suggests casting the module to an integer dtype)
    if base is not None:
        check_tensor("base", base, floating=True)
        if base.shape != h.shape:
            raise ValueError(f"base must have h's shape {tuple(h.shape)}, got {tuple(base.shape)}")
        if base.dtype != h.dtype:
            raise TypeError(f"base dtype {base.dtype} differs from h dtype {h.dtype}")
        if base.device != h.device:
            raise ValueError(f"base is on {base.device} but h is on {h.device}")
    for name, w in zip(("ln_w", "ln_b", "down_w", "down_b", "up_w", "up_b"), weights):
        if w.device != h.device:
            raise ValueError(f"{name} is on {w.device} but h is on {h.device}")


def run_adapter(h: Tensor, weights: Sequence[Tensor], *, base: Tensor | None = None, scale: float = 0.1,
                eps: float = 1e-5) -> Tensor:
    """One adapter from its own parameters ``(ln_w (D,), ln_b (D,), down_w (r, D), down_b (r,), up_w (D, r),
    up_b (D,))`` by :func:`adapter_torch`, with run_packed's checks (for when
    :func:`single_adapter_uses_torch` holds: no packing, no per-call weight casts beyond the reference's)."""
    _check_h_base_devices(h, base, weights[0].shape[0], weights)
    resolve_compute_dtype(h, weights[2:3], "the adapter weights")  # dtype mismatch outside autocast
    return adapter_torch(h, base, *weights, check_real("scale", scale), check_real("eps", eps))


def run_packed(h: Tensor, weights: Sequence[Tensor], bottlenecks: Sequence[int], *, base: Tensor | None = None,
               expert_id: str | Tensor | None = None, scale: float = 0.1, eps: float = 1e-5) -> Tensor:
    """:func:`grouped_adapter` for weights already known to be packed consistently (one dtype, shapes
    of ``bottlenecks``, e.g. from :func:`pack_adapters`): checks only h, base, expert_id and devices."""
    D = weights[0].shape[1]
    G = len(bottlenecks)
    _check_h_base_devices(h, base, D, weights)
    scale, eps = check_real("scale", scale), check_real("eps", eps)
    if expert_id is None:
        if G != 1:
            raise ValueError(f"expert_id is required with {G} groups (bottlenecks {list(bottlenecks)})")
    else:
        check_ids("expert_id", expert_id, h)
    cast = resolve_compute_dtype(h, weights[2:3], "the adapter weights")
    if expert_id is None and single_adapter_uses_torch(h):
        ln_w, ln_b, wd, bd, wu, bu = weights
        return adapter_torch(h, base, ln_w[0], ln_b[0], wd, bd, wu, bu[0], scale, eps)
    if cast is not None:
        weights = [w.to(cast) for w in weights]

    T = h.numel() // D
    h2 = h.reshape(T, D)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    base2 = None
    if base is not None:
        base2 = base.reshape(T, D)
        if base2.stride(-1) != 1:
            base2 = base2.contiguous()
    S = h.shape[0] if expert_id is not None else 1
    seg_len = T // S if S else 0
    save = torch.is_grad_enabled() and (
        h.requires_grad or (base is not None and base.requires_grad) or any(w.requires_grad for w in weights)
    )
    args = (h2, base2, expert_id, seg_len, *weights, list(bottlenecks), scale, eps)
    if torch.compiler.is_compiling():
        out = grouped_adapter_fwd(*args, bool(save))[0]
    elif not save:
        out = _forward_impl(*args, False)[0]
    else:
        out = GroupedAdapterFunction.apply(*args)
    out = out.view(h.shape)
    autocast_to = autocast_dtype(h.device.type)
    if base is None and autocast_to is not None:  # also when the (cached) weights already had that dtype
        out = out.to(autocast_to)
    return out
