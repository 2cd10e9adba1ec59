"""Property-based fuzzing of bad input to the public entry points (DESIGN.md §7).

For each entry point (the reference and fast modules' forwards, the models' forwards, the grouped-adapter,
skip-merge and 3D patch-embedding ops, and the constructors' k / ρ / size arguments) hypothesis builds a
valid call and then spoils one argument: another type, one dim more or less, a dim resized (to 0 too), a
wrong dtype (int, bool, complex, float16/bfloat16/float64 against float32 weights), index values out of
range or repeated, or a strided view of the same values (valid). The property:

* the call raises a ValueError/TypeError whose message names the spoiled argument (or the argument it
  must agree with: x_gen/x_med, h/base/expert_id, idx/gate), never another exception (an IndexError,
  AttributeError or a raw torch RuntimeError from deep inside);
* or it succeeds, and then the fast module agrees with the reference (same outcome, same shape and
  dtype, equal values within 1e-4), an op with its formula. Empty inputs (0 samples, 0 tokens) are valid
  where the reference accepts them and must then give the reference's (empty) result.

tests/test_ops_errors.py holds the hand-picked cases of the ops' own arguments; this file does not repeat
them. The regression examples found by fuzzing are kept as ``@example``s.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from fuzzing import examples
from hypothesis import example, given, settings
from hypothesis import strategies as st
from parity import randomize_

from mosaic_fast import models, reference
from mosaic_fast import nn as fast_nn
from mosaic_fast.ops import grouped_adapter as ga_ops
from mosaic_fast.ops import patch_embed3d as pe_ops
from mosaic_fast.ops import token_skip

D = 8


# ----------------------------------------------------------------------------------------------------
# spoiling one argument
# ----------------------------------------------------------------------------------------------------

BAD_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool, torch.complex64, torch.float16,
              torch.bfloat16, torch.float64)
NOT_TENSORS = (None, 1.0, 3, "x", [1.0, 2.0], (2, 3))


@st.composite
def spoiled(draw, value):
    """A spoiled copy of ``value``: a tensor, a str, an int, a float or a list of sizes."""
    if isinstance(value, (list, tuple)):  # sizes
        seq = type(value)
        return draw(st.sampled_from([seq(), "abc", None, 3, seq(value[:-1]), seq([*value, value[0]]),
                                     seq([0] * len(value)), seq([-1] * len(value)), seq(float(v) for v in value),
                                     seq([*value[:-1], True])]))
    if not isinstance(value, torch.Tensor):
        extra = {str: ["a", "D", "", "AB", 0, 2, None, ["A"], torch.tensor([0])],
                 int: [-1, 1000, 1.5, "0", None, torch.tensor([0, 1])],
                 float: ["0.1", None, torch.tensor([1.0, 2.0]), [0.1]]}
        return draw(st.sampled_from(extra[type(value)]))
    t = value
    kinds = ["type", "rank_up", "resize", "dtype", "strided"] + (["rank_down"] if t.dim() else [])
    if t.dtype in (torch.int64, torch.int32) and t.numel():
        kinds.append("values")
    kind = draw(st.sampled_from(kinds))
    if kind == "type":
        return draw(st.sampled_from([*NOT_TENSORS, t.tolist()]))
    if kind == "rank_up":
        return t.unsqueeze(draw(st.integers(0, t.dim())))
    if kind == "rank_down":
        dim = draw(st.integers(0, t.dim() - 1))
        return (t.select(dim, 0) if t.shape[dim] else t.sum(dim).to(t.dtype))
    if kind == "resize" and t.dim():
        dim = draw(st.integers(0, t.dim() - 1))
        size = draw(st.sampled_from([0, 1, t.shape[dim] + 1, 2 * t.shape[dim] + 1]).filter(lambda s: s != t.shape[dim]))
        shape = list(t.shape)
        shape[dim] = size
        gen = torch.Generator().manual_seed(draw(st.integers(0, 99)))
        if t.is_floating_point():
            return torch.randn(shape, generator=gen).to(t.dtype)
        high = int(t.max()) + 1 if t.numel() else 2
        return torch.randint(0, max(high, 1), shape, generator=gen).to(t.dtype)
    if kind == "dtype":
        return t.to(draw(st.sampled_from([d for d in BAD_DTYPES if d != t.dtype])))
    if kind == "values":
        flat = t.clone().reshape(-1)
        i = draw(st.integers(0, flat.numel() - 1))
        flat[i] = draw(st.sampled_from([-1, 1000, int(flat[0])]))
        return flat.view(t.shape)
    # the same values through a non-contiguous view (valid: must succeed and match)
    return torch.stack([t, t], -1)[..., 0] if t.dim() else t


# ----------------------------------------------------------------------------------------------------
# entry points: valid arguments, how to call each implementation, which names an error may give
# ----------------------------------------------------------------------------------------------------


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + len(shape)))


def twins(build: Callable[[object], torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """The reference module (randomised) and its fast twin (converted copy)."""
    ref = randomize_(build(reference), std=0.2, seed=0)
    return {"reference": ref, "fast": fast_nn.convert(copy.deepcopy(ref))}


@dataclass
class Entry:
    """An entry point: ``build()`` -> {implementation: object}; ``args()`` -> valid arguments by name;
    ``call(obj, args)``; ``expect(args)`` the reference result of a single implementation (ops), or None;
    ``names[arg]`` the argument names an error about ``arg`` may give instead."""

    build: Callable[[], dict[str, object]]
    args: Callable[[], dict[str, object]]
    call: Callable[[object, dict], object]
    expect: Callable[[dict], object] | None = None
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _mos(m):
    return m.MoSAdapter(D, 4, 5, 6)


def _fused_ref(args):
    out = twins(_mos)["reference"](args["h"], args["expert_id"])
    return out if args["base"] is None else args["base"] + out  # (base None: the adapter alone)


def _grouped_args():
    ads = [randomize_(reference.Adapter(D, r), std=0.2, seed=r) for r in (2, 3, 4)]
    (ln_w, ln_b, down_w, down_b, up_w, up_b), bottlenecks = ga_ops.pack_adapters(ads)
    w = {k: v.detach() for k, v in dict(ln_w=ln_w, ln_b=ln_b, down_w=down_w, down_b=down_b, up_w=up_w,
                                          up_b=up_b).items()}
    return dict(h=randn(2, 3, D), **w, bottlenecks=bottlenecks, base=randn(2, 3, D),
                expert_id=torch.tensor([2, 0]), scale=0.1, eps=1e-5)


def _grouped_expect(a):
    """``[base +] scale * up_g(relu(down_g(LN_g(h))))`` per sample from the packed layout, written out."""
    out, offs = [], ga_ops.group_offsets(a["bottlenecks"])
    for b in range(a["h"].shape[0]):
        g = int(a["expert_id"][b])
        rows = slice(offs[g], offs[g] + a["bottlenecks"][g])
        y = F.layer_norm(a["h"][b], (a["h"].shape[-1],), a["ln_w"][g], a["ln_b"][g], a["eps"])
        z = torch.relu(y @ a["down_w"][rows].T + a["down_b"][rows])
        update = a["scale"] * (z @ a["up_w"][:, rows].T + a["up_b"][g])
        out.append(update if a["base"] is None else a["base"][b] + update)
    return torch.stack(out) if out else torch.zeros_like(a["h"])


def _merge_expect(a):
    x, rows, update, coef = a["x"], a["rows"].long(), a["update"], a["coef"]
    out = x.clone()
    c = coef.repeat_interleave(x.shape[1] // coef.shape[1], dim=-1)
    out[rows] = x[rows] + c * (update - x[rows])
    return out


def _pe_expect(a):
    """Conv3d of the normalised volume; as documented, normalised in fp32 (fp64 for fp64) and held in x's
    floating dtype (float32 for integer x), then in the weight's dtype."""
    x = a["x"]
    if 0 in x.shape[2:]:  # no patches (conv3d refuses an empty volume; the op gives 0 tokens)
        return torch.zeros(x.shape[0], 0, a["weight"].shape[0], dtype=a["weight"].dtype)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    held = x.dtype if x.is_floating_point() else torch.float32
    x = (x.to(compute) * a["scale"] + a["shift"]).to(held).to(a["weight"].dtype)
    return F.conv3d(x, a["weight"], a["bias"], stride=a["patch_size"]).flatten(2).transpose(1, 2)


MOSAIC = dict(embed_dim=D, depth=1, num_heads=2, img_size_2d=8, patch_size_2d=4, img_size_3d=8, patch_size_3d=4,
              adapter_bottleneck_a=4, adapter_bottleneck_b=5, adapter_bottleneck_c=6, task_experts=["A", "C"])
DYNAMER = dict(img_size=8, patch_size=4, embed_dim=D, depth=2, num_heads=2, num_experts=3, top_k=2, bottleneck=4,
               keep_ratio=0.6)


def _mosaic_pair():
    ref = randomize_(models.MosaicModel([2, 3], fast=False, **MOSAIC), std=0.2, seed=0)
    fast = models.MosaicModel([2, 3], fast=True, **MOSAIC)
    fast.load_state_dict(ref.state_dict())
    return {"reference": ref, "fast": fast}


def _dynamer_pair():
    ref = randomize_(models.DynaMerModel(3, fast=False, **DYNAMER), std=0.2, seed=0)
    fast = models.DynaMerModel(3, fast=True, **DYNAMER)
    fast.load_state_dict(ref.state_dict())
    return {"reference": ref, "fast": fast}


def _encoder(m):
    enc = reference.Encoder(2, D, num_heads=2, adapter_bottleneck_a=4, adapter_bottleneck_b=5, adapter_bottleneck_c=6)
    return enc if m is reference else fast_nn.convert(enc)


SKIP_PAIR = ("idx_gen", "gate_gen", "idx_med", "gate_med", "x_gen", "x_med")
ENTRIES = {
    "Adapter": Entry(lambda: twins(lambda m: m.Adapter(D, 4)), lambda: dict(h=randn(2, 3, D)),
                     lambda m, a: m(a["h"])),
    "MoSAdapter": Entry(lambda: twins(_mos), lambda: dict(h=randn(3, 2, D), expert_id=torch.tensor([1, 0, 2])),
                        lambda m, a: m(a["h"], a["expert_id"]), names={"h": ("h", "expert_id")}),
    "MoSAdapter-letter": Entry(lambda: twins(_mos), lambda: dict(h=randn(3, 2, D), expert_id="C"),
                               lambda m, a: m(a["h"], a["expert_id"])),
    "MoSAdapter.forward_fused": Entry(
        lambda: {"fast": twins(_mos)["fast"]}, lambda: dict(h=randn(2, 3, D), base=randn(2, 3, D),
                                                            expert_id=torch.tensor([2, 1])),
        lambda m, a: m.forward_fused(a["h"], a["base"], a["expert_id"]), expect=_fused_ref,
        names={"h": ("h", "base", "expert_id"), "base": ("base", "h")}),
    "GatedMoEAdapter": Entry(lambda: twins(lambda m: m.GatedMoEAdapter(D, 3, 2, 4, D // 2)),
                             lambda: dict(x_gen=randn(2, 3, D), x_med=randn(2, 3, D) + 1),
                             lambda m, a: m(a["x_gen"], a["x_med"]), names={"x_gen": ("x_gen", "x_med"),
                                                                            "x_med": ("x_gen", "x_med")}),
    "GatedMoEAdapter.forward_skip": Entry(
        lambda: twins(lambda m: m.GatedMoEAdapter(D, 3, 2, 4, D)),
        lambda: dict(x_gen=randn(2, 4, D), x_med=randn(2, 4, D) + 1, idx_gen=torch.tensor([[0, 2], [0, 3]]),
                     gate_gen=randn(2, 2).sigmoid(), idx_med=torch.tensor([[0, 1, 3], [0, 1, 2]]),
                     gate_med=randn(2, 3).sigmoid()),
        lambda m, a: m.forward_skip(a["x_gen"], a["x_med"], a["idx_gen"], a["gate_gen"], a["idx_med"], a["gate_med"]),
        names={k: SKIP_PAIR for k in SKIP_PAIR}),
    "SkipRouter.select": Entry(lambda: twins(lambda m: m.SkipRouter(D, 0.5)), lambda: dict(x=randn(2, 5, D)),
                               lambda m, a: m.select(a["x"])),
    "SkipRouter.forward": Entry(lambda: twins(lambda m: m.SkipRouter(D, 0.4)), lambda: dict(x=randn(2, 5, D)),
                                lambda m, a: m(a["x"], lambda t: 2 * t + 1)),
    "SkipRouter.merge": Entry(
        lambda: twins(lambda m: m.SkipRouter(D, 0.5)),
        lambda: dict(x=randn(2, 4, D), idx=torch.tensor([[0, 2], [0, 1]]), gate=randn(2, 2).sigmoid(),
                     update=randn(2, 2, D)),
        lambda m, a: m.merge(a["x"], a["idx"], a["gate"], a["update"]),
        names={k: ("x", "idx_x", "gate_x", "gate", "update") for k in ("x", "idx", "gate", "update")}),
    "GatedSpecialistAdapter": Entry(lambda: twins(lambda m: m.GatedSpecialistAdapter(D, (2, 3, 4), "channel")),
                                    lambda: dict(h=randn(5, D)), lambda m, a: m(a["h"])),
    "PatchEmbed3D": Entry(lambda: twins(lambda m: m.PatchEmbed3D((8, 4, 8), (4, 2, 4), 1, D)),
                          lambda: dict(x=torch.rand(2, 1, 8, 4, 8)), lambda m, a: m(a["x"])),
    "UnifiedPatchEmbed": Entry(lambda: twins(lambda m: m.UnifiedPatchEmbed(8, 4, 3, 8, 4, 1, D)),
                               lambda: dict(x=randn(2, 3, 8, 8)), lambda m, a: m(a["x"])[0]),
    "Attention": Entry(lambda: twins(lambda m: m.Attention(D, 2)), lambda: dict(x=randn(2, 3, D)),
                       lambda m, a: m(a["x"])),
    "Mlp": Entry(lambda: twins(lambda m: m.Mlp(D, 12)), lambda: dict(x=randn(2, 3, D)), lambda m, a: m(a["x"])),
    "Block": Entry(lambda: twins(lambda m: m.Block(D, 2, 2.0, True, 4, 5, 6)),
                   lambda: dict(x=randn(2, 3, D), expert_id=torch.tensor([2, 0])),
                   lambda m, a: m(a["x"], a["expert_id"]), names={"x": ("x", "h", "expert_id")}),
    "Encoder": Entry(lambda: {"reference": randomize_(_encoder(reference), seed=0),
                              "fast": randomize_(_encoder(fast_nn), seed=0)},
                     lambda: dict(x=randn(2, 3, D), expert_id="B"), lambda m, a: m(a["x"], a["expert_id"])),
    "MosaicModel": Entry(_mosaic_pair, lambda: dict(x=randn(2, 3, 8, 8), task_id=1, expert_id=torch.tensor([1, 2])),
                         lambda m, a: m(a["x"], a["task_id"], expert_id=a["expert_id"]),
                         names={"x": ("x", "expert_id")}),
    "MosaicModel.forward_packed": Entry(
        _mosaic_pair, lambda: dict(x2=randn(2, 3, 8, 8), ids2=torch.tensor([0, 1]), x3=torch.rand(1, 1, 8, 8, 8),
                                   ids3="C"),
        lambda m, a: m.forward_packed([(a["x2"], a["ids2"]), (a["x3"], a["ids3"])]),
        names={"x2": ("x", "expert_id"), "x3": ("x", "expert_id"), "ids2": ("expert_id",), "ids3": ("expert_id",)}),
    "DynaMerModel": Entry(_dynamer_pair, lambda: dict(x=randn(2, 3, 8, 8)), lambda m, a: m(a["x"])),
    "grouped_adapter": Entry(
        lambda: {"op": ga_ops.grouped_adapter}, _grouped_args,
        lambda op, a: op(a["h"], a["ln_w"], a["ln_b"], a["down_w"], a["down_b"], a["up_w"], a["up_b"],
                         a["bottlenecks"], base=a["base"], expert_id=a["expert_id"], scale=a["scale"], eps=a["eps"]),
        expect=_grouped_expect,
        names={"h": ("h", "base", "expert_id"), "base": ("base", "h"), "ln_w": ("ln_w", "ln_b", "up_b"),
               "down_w": ("down_w", "up_w"), "bottlenecks": ("bottlenecks", "ln_w", "down_w")}),
    "skip_merge": Entry(
        lambda: {"op": token_skip.skip_merge},
        lambda: dict(x=randn(6, D), rows=torch.tensor([4, 0, 2]), update=randn(3, D), coef=torch.rand(3, 2)),
        lambda op, a: op(a["x"], a["rows"], a["update"], a["coef"]), expect=_merge_expect,
        names={"rows": ("rows", "update", "coef"), "x": ("x", "rows", "update", "coef")}),
    "patch_embed3d": Entry(
        lambda: {"op": pe_ops.patch_embed3d},
        lambda: dict(x=torch.randint(0, 255, (2, 1, 4, 8, 4), dtype=torch.uint8), weight=randn(5, 1, 2, 4, 2),
                     bias=randn(5), patch_size=(2, 4, 2), scale=1 / 255, shift=-0.5),
        lambda op, a: op(a["x"], a["weight"], a["bias"], a["patch_size"], a["scale"], a["shift"]), expect=_pe_expect,
        names={"x": ("x", "weight"), "weight": ("weight", "bias"), "bias": ("bias", "weight")}),
}


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _assert_same(got, want, what: str) -> None:
    got, want = _outputs(got), _outputs(want)
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (
            f"{what}: {g.dtype} {tuple(g.shape)} vs {w.dtype} {tuple(w.shape)}")
        torch.testing.assert_close(g.detach(), w.detach(), rtol=1e-4, atol=1e-5, msg=what)


def check_entry(name: str, arg: str, value: object) -> None:
    """Call ``name`` with ``arg`` replaced by ``value`` on every implementation: a ValueError/TypeError naming
    the argument everywhere, or success everywhere with equal results."""
    entry = ENTRIES[name]
    accepted = entry.names.get(arg, (arg,))
    args = {**entry.args(), arg: value}  # (once: the implementations see the same tensors)
    outcomes = {}
    for impl, obj in entry.build().items():
        try:
            outcomes[impl] = entry.call(obj, args)
        except (ValueError, TypeError) as e:
            message = str(e)
            assert any(re.search(rf"\b{re.escape(n)}\b", message) for n in accepted), (
                f"{name} ({impl}): {type(e).__name__} does not name {'/'.join(accepted)}: {message}")
            outcomes[impl] = e
    failed = {impl: type(o).__name__ for impl, o in outcomes.items() if isinstance(o, Exception)}
    assert not failed or len(failed) == len(outcomes), f"{name}: only some implementations raise: {failed}"
    if failed:
        return
    results = list(outcomes.values())
    if entry.expect is not None:
        results.append(entry.expect(args))
    for other in results[1:]:
        _assert_same(results[0], other, f"{name} with {arg} spoiled")


@st.composite
def spoiled_calls(draw):
    name = draw(st.sampled_from(sorted(ENTRIES)))
    arg = draw(st.sampled_from(sorted(ENTRIES[name].args())))
    return name, arg, draw(spoiled(ENTRIES[name].args()[arg]))


@settings(max_examples=examples(1500))
@given(call=spoiled_calls())
@example(call=("Adapter", "h", torch.tensor(1.0)))  # 0-d h: the reference raised IndexError
@example(call=("Adapter", "h", [1.0] * D))  # not a tensor: AttributeError in both
@example(call=("GatedSpecialistAdapter", "h", torch.tensor(1.0)))  # IndexError in the reference
@example(call=("SkipRouter.merge", "gate", torch.rand(2, 2, dtype=torch.float64)))  # reference: scatter RuntimeError
@example(call=("SkipRouter.merge", "x", [1.0]))  # AttributeError in both
@example(call=("SkipRouter.merge", "update", torch.ones(2, 2, D, dtype=torch.bool)))  # NotImplementedError
@example(call=("PatchEmbed3D", "x", [1.0]))  # AttributeError in the reference
@example(call=("UnifiedPatchEmbed", "x", [1.0]))
@example(call=("Attention", "x", torch.randn(2, 3, D + 1)))  # raw "mat1 and mat2 shapes" RuntimeError
@example(call=("Mlp", "x", torch.ones(2, 3, D, dtype=torch.long)))
@example(call=("Block", "x", torch.randn(2, 3, D, dtype=torch.float64)))  # "mixed dtype" RuntimeError
@example(call=("Encoder", "x", torch.randn(3, D)))  # "not enough values to unpack" naming nothing
@example(call=("MosaicModel", "x", [1.0]))
@example(call=("DynaMerModel", "x", [1.0]))
@example(call=("grouped_adapter", "bottlenecks", "abc"))  # "invalid literal for int()"
@example(call=("grouped_adapter", "scale", "0.1"))  # "could not convert string to float"
@example(call=("grouped_adapter", "down_b", torch.zeros(9, dtype=torch.float16)))  # named no weight
@example(call=("patch_embed3d", "scale", torch.tensor([1.0, 2.0])))  # "only one element tensors..."
@example(call=("patch_embed3d", "x", torch.zeros(2, 1, 0, 8, 4, dtype=torch.uint8)))  # valid: 0 tokens
def test_spoiled_argument_raises_a_named_error_or_matches(one_thread, call):
    """One spoiled argument: a ValueError/TypeError naming it, or the reference's result."""
    check_entry(*call)


# ----------------------------------------------------------------------------------------------------
# constructors: k, ρ, sizes
# ----------------------------------------------------------------------------------------------------

BAD_INTS = st.sampled_from([-1, 0, 1.5, 2.0, "2", None, True, 1000]) | st.integers(-3, 12)


@settings(max_examples=examples(200))
@given(arg=st.sampled_from(["num_experts", "top_k", "bottleneck", "gate_dim", "keep_ratio", "patch_size"]),
       value=st.sampled_from([0, -0.1, 1.0001, float("nan"), float("inf"), "0.5", None, True, 1e-9, 1, 0.3])
       | BAD_INTS)
@example(arg="top_k", value=1.5)  # accepted, then "slice indices must be integers" at the first forward
@example(arg="num_experts", value=2.0)  # "empty() takes 1 positional argument"
@example(arg="patch_size", value=0)  # ZeroDivisionError
def test_dynamer_constructor_arguments(one_thread, arg, value):
    """DynaMerModel(**{arg: value}) raises a ValueError/TypeError naming ``arg``, or builds a model whose fast
    and reference twins agree (inference and training)."""
    kw = {**DYNAMER, arg: value}
    if arg == "patch_size":
        kw["img_size"] = 2 * value if type(value) is int and 0 < value <= 8 else 8
    try:
        ref = randomize_(models.DynaMerModel(3, fast=False, **kw), std=0.2, seed=0)
    except (ValueError, TypeError) as e:
        assert re.search(rf"\b{arg}\b", str(e)), f"{type(e).__name__} does not name {arg}: {e}"
        return
    fast = models.DynaMerModel(3, fast=True, **kw)
    fast.load_state_dict(ref.state_dict())
    x = randn(2, 3, kw["img_size"], kw["img_size"])
    with torch.no_grad():
        _assert_same(fast(x), ref(x), f"DynaMerModel({arg}={value!r})")
    _assert_same(fast(x), ref(x), f"DynaMerModel({arg}={value!r}), grad mode")


@pytest.mark.parametrize(("build", "name"), [
    (lambda v: models.MosaicModel([2, v], embed_dim=8, depth=1, num_heads=2), r"num_classes_list\[1\]"),
    (lambda v: models.DynaMerModel(v, **DYNAMER), "num_classes"),
    (lambda v: reference.GatedSpecialistAdapter(D, (4, v)), r"bottlenecks\[1\]"),
    (lambda v: fast_nn.GatedSpecialistAdapter(D, (4, v)), r"bottlenecks\[1\]")])
@pytest.mark.parametrize(("value", "exc"), [(1.5, TypeError), ("3", TypeError), (True, TypeError), (0, ValueError)])
def test_class_and_bottleneck_counts_must_be_ints(build, name, value, exc):
    """A head's class count or a specialist's bottleneck of 1.5 was truncated to 1 by ``int()`` (a "3" became
    3): each is now an int >= 1, else an error naming it."""
    with pytest.raises(exc, match=name):
        build(value)


@pytest.mark.parametrize("module", ["reference", "fast"])
@pytest.mark.parametrize(("batches", "exc"), [
    (None, TypeError), (torch.zeros(2, 3, 8, 8), TypeError), ([], ValueError),
    ([(torch.zeros(1, 3, 8, 8),)], TypeError), ([torch.zeros(1, 3, 8, 8)], TypeError),
    ([(torch.zeros(1, 3, 8, 8), "A", "B")], TypeError)])
def test_forward_packed_names_bad_batches(module, batches, exc):
    """forward_packed's list of (x, expert_id) pairs: a clear error naming ``batches`` (was a RuntimeError about
    a tensor's truth value, or 'not enough values to unpack')."""
    with pytest.raises(exc, match="batches"):
        _mosaic_pair()[module].forward_packed(batches)


@pytest.mark.parametrize("impl", [reference, fast_nn])
def test_mos_adapter_refuses_ids_for_unbatched_h(impl):
    """h (D,) with D ids: the reference routed single features as if they were samples (the fast module
    refused); both now ask for a batch dim."""
    with pytest.raises(ValueError, match="h must have a batch dim"):
        impl.MoSAdapter(D, 4, 5, 6)(torch.randn(D), torch.zeros(D, dtype=torch.long))


@pytest.mark.parametrize("name", ["run_packed", "run_adapter"])
def test_packed_runners_name_a_non_tensor_h(name):
    a = reference.Adapter(D, 3)
    weights, bottlenecks = ga_ops.pack_adapters([a])
    with pytest.raises(TypeError, match=r"h must be a torch\.Tensor"):
        if name == "run_packed":
            ga_ops.run_packed([1.0] * D, weights, bottlenecks)
        else:
            ga_ops.run_adapter([1.0] * D, [t[0] if t.dim() == 2 and t.shape[0] == 1 else t for t in weights])


@pytest.mark.parametrize(("adapters", "exc", "match"), [
    ([], ValueError, "at least one"), ([torch.nn.Linear(2, 2)], TypeError, r"adapters\[0\]"),
    ([reference.Adapter(8, 2), reference.Adapter(16, 2)], ValueError, "one d_model")])
def test_pack_adapters_names_bad_adapters(adapters, exc, match):
    with pytest.raises(exc, match=match):
        ga_ops.pack_adapters(adapters)


@pytest.mark.parametrize(("shape", "exc"), [("abcde", TypeError), (None, TypeError), ((1, 1, 4, 4), ValueError),
                                            ((1, 1, -4, 4, 4), ValueError), ((1, 1, 4.0, 4, 4), TypeError)])
def test_unpatchify3d_names_a_bad_volume_shape(shape, exc):
    with pytest.raises(exc, match="volume_shape"):
        pe_ops.unpatchify3d(torch.randn(1, 8, 8), shape, (2, 2, 2))
