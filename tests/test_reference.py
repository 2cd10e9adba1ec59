"""Pin the reference math of DESIGN.md §3: the adapter formula, init, routing, the block."""

import pytest
import torch
from parity import TOL_CPU_FWD, assert_parity, randomize_

from mosaic_fast import reference


def adapter_formula(ad: reference.Adapter, h: torch.Tensor) -> torch.Tensor:
    """s * up(relu(down(LN(h)))) written out by hand in float64."""
    h = h.double()
    mu = h.mean(-1, keepdim=True)
    var = h.var(-1, unbiased=False, keepdim=True)
    ln = (h - mu) / torch.sqrt(var + 1e-5) * ad.layer_norm.weight.double() + ad.layer_norm.bias.double()
    z = torch.relu(ln @ ad.down_proj.weight.double().T + ad.down_proj.bias.double())
    return ad.scale * (z @ ad.up_proj.weight.double().T + ad.up_proj.bias.double())


def test_adapter_equals_formula():
    ad = randomize_(reference.Adapter(48, 16))
    h = torch.randn(2, 5, 48)
    assert_parity(ad(h), adapter_formula(ad, h), TOL_CPU_FWD)


def test_lora_init_outputs_zero_and_bert_does_not():
    h = torch.randn(3, 4, 32)
    assert torch.count_nonzero(reference.Adapter(32, 8, init_option="lora")(h)) == 0
    assert reference.Adapter(32, 8, init_option="bert")(h).abs().sum() > 0


def test_adapter_bad_arguments():
    with pytest.raises(ValueError, match="init_option"):
        reference.Adapter(32, 8, init_option="xavier")
    with pytest.raises(ValueError, match="h: expected last dim 32"):
        reference.Adapter(32, 8)(torch.randn(2, 3, 31))


def test_mos_adapter_parameter_names():
    keys = set(reference.MoSAdapter(32, 8, 16, 24).state_dict())
    for e in "abc":
        for part in ("layer_norm", "down_proj", "up_proj"):
            assert {f"expert_{e}.{part}.weight", f"expert_{e}.{part}.bias"} <= keys


def test_routing_by_string_and_by_tensor_agree():
    mos = randomize_(reference.MoSAdapter(32, 8, 16, 24))
    h = torch.randn(4, 6, 32)
    for idx, name in enumerate("ABC"):
        ids = torch.full((4,), idx, dtype=torch.long)
        torch.testing.assert_close(mos(h, name), mos(h, ids), rtol=0, atol=0)
        assert_parity(mos(h, name), adapter_formula(mos.get_expert(name), h), TOL_CPU_FWD)


def test_mixed_batch_equals_each_sample_alone():
    mos = randomize_(reference.MoSAdapter(32, 8, 16, 24))
    h = torch.randn(5, 6, 32)
    ids = torch.tensor([2, 0, 1, 0, 2])
    out = mos(h, ids)
    for i in range(5):
        alone = mos(h[i : i + 1], "ABC"[ids[i]])
        torch.testing.assert_close(out[i : i + 1], alone, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "bad, err, match",
    [
        ("D", ValueError, "expert_id must be one of"),
        (torch.tensor([0, 1, 3]), ValueError, "values must be in"),
        (torch.tensor([0, 1]), ValueError, r"shape \(3,\)"),
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, "int64"),
        (1, TypeError, "LongTensor"),
    ],
)
def test_mos_adapter_bad_expert_id(bad, err, match):
    with pytest.raises(err, match=match):
        reference.MoSAdapter(32, 8, 16, 24)(torch.randn(3, 4, 32), bad)


def test_block_is_parallel_adapter():
    blk = randomize_(reference.Block(32, num_heads=4, adapter_bottleneck_a=8, adapter_bottleneck_b=16,
                                     adapter_bottleneck_c=24))
    x = torch.randn(2, 7, 32)
    x1 = x + blk.attn(blk.norm1(x))
    h = blk.norm2(x1)
    expected = x1 + blk.ffn(h) + blk.adapter.expert_b(h)
    assert_parity(blk(x, "B"), expected, TOL_CPU_FWD)


def test_attention_is_softmax_attention():
    attn = randomize_(reference.Attention(32, 4), std=0.2)
    x = torch.randn(2, 5, 32)
    q, k, v = attn.split_heads(x)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 32)
    assert_parity(attn(x), attn.proj(expected), TOL_CPU_FWD)


def test_unified_patch_embed_chooses_by_rank():
    pe = reference.UnifiedPatchEmbed(32, 16, 3, 16, 8, 1, 24)
    tokens, is_3d = pe(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 4, 24) and not is_3d
    tokens, is_3d = pe(torch.rand(2, 1, 16, 16, 16))
    assert tokens.shape == (2, 8, 24) and is_3d
    with pytest.raises(ValueError, match="4-D image batch or a 5-D volume"):
        pe(torch.randn(2, 32, 32))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        pe(torch.rand(1, 1, 12, 16, 16))


def test_reference_modules_name_bad_input_dtypes_as_the_fast_ones_do():
    """An integer h, or a skip gate wider than the streams: the same TypeError as the fast modules, not
    torch's "mixed dtype" or a scatter failure deep inside."""
    h = torch.ones(3, 4, 8, dtype=torch.long)
    for module in (reference.Adapter(8, 4), reference.GatedSpecialistAdapter(8, (4, 4))):
        with pytest.raises(TypeError, match=r"h must be a floating-point tensor, got torch\.int64"):
            module(h)
    with pytest.raises(TypeError, match=r"h must be a floating-point tensor, got torch\.int64"):
        reference.MoSAdapter(8, 4, 4, 4)(h, torch.tensor([0, 1, 2]))
    moe, x = reference.GatedMoEAdapter(8, 4, 2, 4, 2), torch.randn(3, 4, 8)
    idx, ones = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    with pytest.raises(TypeError, match=r"gate_med is torch\.float64, wider than x_gen"):
        moe.forward_skip(x, x, idx, ones, idx, ones.double())
