"""Parity helpers shared by the tests (DESIGN.md §5)."""

from __future__ import annotations

import torch

#: DESIGN.md §5 tolerances on ‖fast − ref‖ / ‖ref‖.
TOL_CPU_FWD = 1e-5
TOL_CPU_GRAD = 1e-4
TOL_INTERPRETER = 1e-4
TOL_CUDA_TF32 = 3e-3
TOL_BF16 = 2e-2
TOL_FP16 = 5e-3


def rel_err(fast: torch.Tensor, ref: torch.Tensor) -> float:
    """‖fast − ref‖ / ‖ref‖ computed in float64."""
    ref64 = ref.detach().double()
    return float((fast.detach().double() - ref64).norm() / ref64.norm())


def assert_parity(fast: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    """Fail on NaN/Inf, on a shape mismatch, on a near-zero reference, or when the error exceeds tol."""
    assert fast.shape == ref.shape, f"{what}: shape {tuple(fast.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(fast).all(), f"{what}: fast result has NaN/Inf"
    scale = float(ref.detach().double().norm())
    assert scale > 1e-6 * (ref.numel() ** 0.5), f"{what}: reference is ~0 ({scale}); the check proves nothing"
    err = rel_err(fast, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_grads_parity(fast: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float) -> None:
    """Per-parameter gradient parity, with one allowance for ill-conditioned gradients.

    A parameter whose gradient is a sum of terms that nearly cancel (seen: a skip router's scalar output
    bias, gradient norm ~1e-4 of its module's) cannot be resolved in float32: there even the float32
    reference misses the float64 one by ~1e-3. Such a tensor passes when its absolute error is within
    ``tol`` of the gradient norm of the module that owns it (``a.b.fc2.bias`` -> every ``a.b.*``); a
    wrong or missing gradient still fails, since its error is its whole norm.
    """
    assert set(fast) == set(ref), f"gradient names differ: {sorted(set(fast) ^ set(ref))}"
    for name, want in ref.items():
        got = fast[name]
        assert got is not None, f"{name}: no gradient"
        assert torch.isfinite(got).all(), f"{name}: gradient has NaN/Inf"
        err = float((got.detach().double() - want.detach().double()).norm())
        own = float(want.detach().double().norm())
        if err <= tol * own:
            continue
        owner = name.rsplit(".", 2)[0] + "."
        group = sum(float(g.detach().double().norm()) ** 2 for n, g in ref.items() if n.startswith(owner)) ** 0.5
        assert err <= tol * group, (f"grad {name}: relative error {err / own:.3e} > {tol:.1e}, and "
                                    f"{err / group:.3e} of the gradient norm of {owner}*")


def randomize_(module: torch.nn.Module, std: float = 0.05, seed: int | None = None) -> torch.nn.Module:
    """Give every parameter fresh random values (incl. zero-initialised up-projections and biases);
    LayerNorm-like weights stay near 1."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return module


def run_with_grads(module: torch.nn.Module, call, inputs: list[torch.Tensor], seed: int = 0):
    """(outputs, input grads, {param name: grad}) of ``call(module, *inputs)``, with random output gradients
    (the same for the same seed and shapes)."""
    module.zero_grad(set_to_none=True)
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    outs = call(module, *inputs)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    gen = torch.Generator().manual_seed(seed)
    gouts = [torch.randn(o.shape, generator=gen).to(device=o.device, dtype=o.dtype) for o in outs]
    torch.autograd.backward(outs, gouts)
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return outs, [x.grad for x in inputs if x.requires_grad], grads
