"""Fast modules never bypass a replaced or hooked inner layer (:mod:`mosaic_fast.nn.bypass`), and their
weight caches never serve a replaced parameter.

A drop-in user may swap the adapter's activation, wrap a Linear with LoRA, register forward hooks (feature
extraction, FLOP counters) or change the attention scale. The fast modules read their inner layers' weights
instead of calling them, so each such change must send them to the reference computation (with a
:class:`FastPathFallbackWarning`), which calls every layer: same result as the reference module with the
same change, and every hook runs.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from parity import TOL_CPU_FWD, rel_err
from torch import nn

from mosaic_fast import nn as fast_nn
from mosaic_fast import reference
from mosaic_fast.models.mosaic import MosaicModel
from mosaic_fast.nn.bypass import FastPathFallbackWarning

D = 32


class LoRALinear(nn.Module):
    """A LoRA wrapper as PEFT builds it: the base Linear plus a low-rank update (keeps ``.weight``/``.bias``)."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) * 0.3)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank) * 0.3)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_a.t() @ self.lora_b.t()


def _randomise(module: nn.Module) -> nn.Module:
    """Non-zero weights everywhere (the reference inits up-projections and gates at zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return module


def _pair(ref: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(reference, converted fast copy) of a randomised reference module, in eval mode."""
    ref = _randomise(ref).eval()
    return ref, fast_nn.convert(copy.deepcopy(ref))


def _counting_hook(calls: list):
    def hook(module, args, output):
        calls.append(type(module).__name__)
        return output * 1.5  # a hook that changes the output: bypassing it would change the result

    return hook


# ----------------------------------------------------------------------------------------- the adapters


@pytest.mark.parametrize("change", ["gelu", "lora", "hook", "bias-free"])
def test_adapter_with_a_changed_layer_equals_the_reference(change):
    ref, fast = _pair(reference.Adapter(D, 8))
    calls: dict[str, list] = {"ref": [], "fast": []}
    for name, m in (("ref", ref), ("fast", fast)):
        if change == "gelu":
            m.activation = nn.GELU()
        elif change == "lora":
            torch.manual_seed(2)
            m.down_proj = LoRALinear(m.down_proj)
        elif change == "hook":
            m.up_proj.register_forward_hook(_counting_hook(calls[name]))
        else:
            m.up_proj.bias = None
    h = torch.randn(2, 5, D)
    with pytest.warns(FastPathFallbackWarning, match="Adapter"):
        out = fast(h)
    assert rel_err(out, ref(h)) < TOL_CPU_FWD
    assert calls["fast"] == calls["ref"]
    with pytest.warns(FastPathFallbackWarning):
        fused = fast.forward_fused(h, h)
    assert rel_err(fused, h + ref(h)) < TOL_CPU_FWD


def test_adapter_with_another_activation_differs_from_relu():
    """The case above is not vacuous: with the activation swapped the result really changes."""
    ref, fast = _pair(reference.Adapter(D, 8))
    h = torch.randn(2, 5, D)
    relu_out = fast(h)
    fast.activation = nn.Tanh()
    ref.activation = nn.Tanh()
    with pytest.warns(FastPathFallbackWarning, match="activation is a Tanh"):
        tanh_out = fast(h)
    assert rel_err(tanh_out, ref(h)) < TOL_CPU_FWD
    assert rel_err(tanh_out, relu_out) > 1e-2


@pytest.mark.parametrize("routing", ["letter", "mixed"])
def test_mos_adapter_with_a_hooked_or_wrapped_specialist(routing):
    ref, fast = _pair(reference.MoSAdapter(D, 4, 6, 8))
    calls: dict[str, list] = {"ref": [], "fast": []}
    for name, m in (("ref", ref), ("fast", fast)):
        m.expert_b.register_forward_hook(_counting_hook(calls[name]))  # the specialist itself
        torch.manual_seed(3)
        m.expert_c.down_proj = LoRALinear(m.expert_c.down_proj)
    h = torch.randn(3, 4, D)
    expert_id = "B" if routing == "letter" else torch.tensor([2, 0, 1])
    with pytest.warns(FastPathFallbackWarning) as record:  # mixed: the LoRA specialist warns on its own too
        out = fast(h, expert_id)
    assert any(str(w.message).startswith("MoSAdapter") for w in record)
    assert rel_err(out, ref(h, expert_id)) < TOL_CPU_FWD
    assert calls["fast"] == calls["ref"] == ["Adapter"]


def test_mos_adapter_with_a_foreign_specialist():
    ref, fast = _pair(reference.MoSAdapter(D, 4, 6, 8))
    torch.manual_seed(4)
    for m in (ref, fast):
        m.expert_a = nn.Sequential(nn.Linear(D, D), nn.Tanh())
    torch.manual_seed(4)
    fast.expert_a.load_state_dict(ref.expert_a.state_dict())
    h, ids = torch.randn(3, 4, D), torch.tensor([0, 1, 0])
    with pytest.warns(FastPathFallbackWarning, match="not an Adapter"):
        out = fast(h, ids)
    assert rel_err(out, ref(h, ids)) < TOL_CPU_FWD


def test_plain_fast_modules_do_not_warn():
    """Only a real change falls back: plain modules, with hooks on the outer module, stay on the fast path."""
    _, adapter = _pair(reference.Adapter(D, 8))
    _, mos = _pair(reference.MoSAdapter(D, 4, 6, 8))
    adapter.register_forward_hook(lambda *a: None)  # called through __call__: nothing bypassed
    h = torch.randn(3, 4, D)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathFallbackWarning)
        adapter(h)
        mos(h, torch.tensor([0, 1, 2]))
        mos.forward_fused(h, h, "C")


# ------------------------------------------------------------------------------------------------- the ViT


def test_block_calls_a_hooked_adapter():
    ref, fast = _pair(reference.Block(D, 4, 2.0, True, 4, 6, 8))
    calls: dict[str, list] = {"ref": [], "fast": []}
    for name, m in (("ref", ref), ("fast", fast)):
        m.adapter.register_forward_hook(_counting_hook(calls[name]))
    x = torch.randn(2, 5, D)
    assert rel_err(fast(x, "B"), ref(x, "B")) < TOL_CPU_FWD
    assert calls["fast"] == calls["ref"] == ["MoSAdapter"]


def test_block_with_a_replaced_adapter_module():
    """A fast Block whose adapter the user replaced by another module (no forward_fused) still runs."""
    ref, fast = _pair(reference.Block(D, 4, 2.0, True, 4, 6, 8))

    class ScaledAdapter(nn.Module):
        def forward(self, h, expert_id):
            return 0.5 * h

    ref.adapter, fast.adapter = ScaledAdapter(), ScaledAdapter()
    x = torch.randn(2, 5, D)
    assert rel_err(fast(x, "A"), ref(x, "A")) < TOL_CPU_FWD


@pytest.mark.parametrize("change", ["qkv-lora", "proj-hook", "fc1-hook", "act-hook", "scale"])
def test_attention_and_mlp_call_replaced_or_hooked_layers(change):
    ref, fast = _pair(reference.Block(D, 4, 2.0, True, 4, 6, 8))
    calls: dict[str, list] = {"ref": [], "fast": []}
    for name, m in (("ref", ref), ("fast", fast)):
        if change == "qkv-lora":
            torch.manual_seed(5)
            m.attn.qkv = LoRALinear(m.attn.qkv)
        elif change == "proj-hook":
            m.attn.proj.register_forward_hook(_counting_hook(calls[name]))
        elif change == "fc1-hook":
            m.ffn.fc1.register_forward_hook(_counting_hook(calls[name]))
        elif change == "act-hook":
            m.ffn.act.register_forward_hook(_counting_hook(calls[name]))
        else:
            m.attn.scale = 0.05  # a temperature other than head_dim ** -0.5
    x = torch.randn(2, 5, D)
    assert rel_err(fast(x, "C"), ref(x, "C")) < TOL_CPU_FWD
    assert calls["fast"] == calls["ref"]


def test_global_module_hook_sees_every_layer_of_the_fast_model():
    """A FLOP counter or profiler with a global forward hook sees the same layers run (the fast modules fall
    back while it is registered) and the same outputs."""
    torch.manual_seed(0)
    kwargs = dict(num_classes_list=[3], embed_dim=D, depth=2, num_heads=4, img_size_2d=16, patch_size_2d=8,
                  task_experts=["A"])
    ref = _randomise(MosaicModel(**kwargs, fast=False)).eval()
    fast = fast_nn.convert(copy.deepcopy(ref))
    fast.fast = True
    seen: dict[str, list] = {"ref": [], "fast": []}
    x = torch.randn(2, 3, 16, 16)
    outs = {}
    for name, m in (("ref", ref), ("fast", fast)):
        handle = nn.modules.module.register_module_forward_hook(
            lambda mod, args, out, name=name: seen[name].append(type(mod).__name__))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FastPathFallbackWarning)
                outs[name] = m(x, 0)[1]
        finally:
            handle.remove()
    assert rel_err(outs["fast"], outs["ref"]) < TOL_CPU_FWD
    linears = {k: v.count("Linear") for k, v in seen.items()}
    assert linears["fast"] == linears["ref"] > 0, seen


def test_forward_packed_runs_block_hooks():
    torch.manual_seed(0)
    kwargs = dict(num_classes_list=[3], embed_dim=D, depth=2, num_heads=4, img_size_2d=16, patch_size_2d=8,
                  img_size_3d=16, patch_size_3d=8, task_experts=["A"])
    ref = _randomise(MosaicModel(**kwargs, fast=False)).eval()
    fast = fast_nn.convert(copy.deepcopy(ref))
    fast.fast = True
    calls: dict[str, list] = {"ref": [], "fast": []}
    for name, m in (("ref", ref), ("fast", fast)):
        m.encoder.blocks[1].register_forward_hook(_counting_hook(calls[name]))
    batches = [(torch.randn(2, 3, 16, 16), torch.tensor([0, 2])), (torch.randn(1, 1, 16, 16, 16), "C")]
    for got, want in zip(fast.forward_packed(batches), ref.forward_packed(batches)):
        assert rel_err(got, want) < TOL_CPU_FWD
    assert calls["fast"] == calls["ref"] == ["Block", "Block"]


# ---------------------------------------------------------------------------------- DynaMer, M4oE, 3D embed


def test_gated_moe_adapter_calls_a_hooked_router():
    ref, fast = _pair(reference.GatedMoEAdapter(D, 4, 2, 8, D // 4))
    calls: dict[str, list] = {"ref": [], "fast": []}
    for name, m in (("ref", ref), ("fast", fast)):
        m.gate_med.register_forward_hook(_counting_hook(calls[name]))
    xg, xm = torch.randn(2, 5, D), torch.randn(2, 5, D)
    with pytest.warns(FastPathFallbackWarning, match="gate_med has a forward or backward hook"):
        got = fast(xg, xm)
    for g, w in zip(got, ref(xg, xm)):
        assert rel_err(g, w) < TOL_CPU_FWD
    idx = torch.tensor([[0, 2, 3], [0, 1, 4]])
    gate = torch.rand(2, 3)
    with pytest.warns(FastPathFallbackWarning):
        got = fast.forward_skip(xg, xm, idx, gate, idx, gate)
    for g, w in zip(got, ref.forward_skip(xg, xm, idx, gate, idx, gate)):
        assert rel_err(g, w) < TOL_CPU_FWD
    assert calls["fast"] == calls["ref"] and calls["ref"]


@pytest.mark.parametrize("keep_ratio", [1.0, 0.5])
def test_skip_router_calls_a_wrapped_fc1(keep_ratio):
    ref, fast = _pair(reference.SkipRouter(D, keep_ratio))
    for m in (ref, fast):
        torch.manual_seed(6)
        m.fc1 = LoRALinear(m.fc1)
    x = torch.randn(2, 7, D)
    with pytest.warns(FastPathFallbackWarning, match="fc1 is a LoRALinear"):
        idx, gate = fast.select(x)
    ref_idx, ref_gate = ref.select(x)
    assert torch.equal(idx, ref_idx)
    assert rel_err(gate, ref_gate) < TOL_CPU_FWD


def test_gated_specialist_adapter_with_a_swapped_activation():
    ref, fast = _pair(reference.GatedSpecialistAdapter(D, (4, 6, 8)))
    for m in (ref, fast):
        m.expert_b.activation = nn.SiLU()
    h = torch.randn(2, 5, D)
    with pytest.warns(FastPathFallbackWarning, match="activation is a SiLU"):
        out = fast(h)
    assert rel_err(out, ref(h)) < TOL_CPU_FWD


def test_patch_embed3d_calls_a_hooked_projection():
    ref, fast = _pair(reference.PatchEmbed3D(16, 8, 1, D))
    calls: dict[str, list] = {"ref": [], "fast": []}
    for name, m in (("ref", ref), ("fast", fast)):
        m.proj.register_forward_hook(_counting_hook(calls[name]))
    x = torch.randint(0, 255, (2, 1, 16, 16, 16), dtype=torch.uint8)
    with pytest.warns(FastPathFallbackWarning, match="proj has a forward or backward hook"):
        out = fast(x)
    assert rel_err(out, ref(x)) < TOL_CPU_FWD
    assert calls["fast"] == calls["ref"] == ["Conv3d"]


# ------------------------------------------------------------------------------------ caches and identity


def _age(p: torch.Tensor) -> None:
    """Version counter >= 2 (an alias made by ``set_`` starts at 1 and its ``copy_`` adds one)."""
    with torch.no_grad():
        while p._version < 2:
            p.mul_(1.0)


def _replace_at_same_address(owner: nn.Module, name: str, values: torch.Tensor) -> None:
    """Replace parameter ``name`` of ``owner`` by a new Parameter holding ``values`` at the old storage address
    with the old version counter value: what a freed parameter's successor can look like to a cache keyed
    on (data pointer, version)."""
    old = getattr(owner, name)
    assert old._version >= 2, "call _age(parameter) before the forward that caches it"
    alias = torch.empty(0, dtype=old.dtype).set_(old.untyped_storage(), old.storage_offset(), old.shape, old.stride())
    while alias._version < old._version - 1:
        alias.add_(0)
    alias.copy_(values)  # new values, written without touching the old parameter's version counter
    new = nn.Parameter(alias, requires_grad=old.requires_grad)
    assert new.data_ptr() == old.data_ptr() and new._version == old._version
    setattr(owner, name, new)


def test_packed_specialists_follow_a_parameter_replaced_at_the_same_address():
    ref, fast = _pair(reference.MoSAdapter(D, 4, 6, 8))
    h, ids = torch.randn(3, 4, D), torch.tensor([0, 1, 2])
    _age(fast.expert_b.up_proj.weight)
    with torch.no_grad():
        fast(h, ids)  # caches the packed weights
        values = torch.randn_like(ref.expert_b.up_proj.weight)
        ref.expert_b.up_proj.weight.copy_(values)
        _replace_at_same_address(fast.expert_b.up_proj, "weight", values)
        assert rel_err(fast(h, ids), ref(h, ids)) < TOL_CPU_FWD


def test_folded_specialists_follow_a_parameter_replaced_at_the_same_address():
    ref, fast = _pair(reference.GatedSpecialistAdapter(D, (4, 6, 8)))
    h = torch.randn(2, 5, D)
    _age(fast.expert_a.down_proj.weight)
    with torch.no_grad():
        fast(h)  # caches the folded weights
        values = torch.randn_like(ref.expert_a.down_proj.weight)
        ref.expert_a.down_proj.weight.copy_(values)
        _replace_at_same_address(fast.expert_a.down_proj, "weight", values)
        assert rel_err(fast(h), ref(h)) < TOL_CPU_FWD


def test_convert_leaves_user_subclasses_and_says_so():
    class MyAdapter(reference.Adapter):
        def forward(self, h):
            return 2.0 * super().forward(h)

    model = nn.Sequential(MyAdapter(D, 4), reference.Adapter(D, 4))
    with pytest.warns(UserWarning, match=r"left MyAdapter as it is"):
        fast_nn.convert(model)
    assert type(model[0]) is MyAdapter and type(model[1]) is fast_nn.Adapter
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast_nn.convert(nn.Sequential(reference.Adapter(D, 4)))  # nothing left behind: no warning
