"""Tests found missing by mutation testing of the reference modules (reference/adapter.py, vit.py,
patch_embed.py, checks.py): the ground truth itself, checked against hand-written formulas and literals of
DESIGN.md §3 and §7 (plain torch ops, float64), never against another mosaic_fast module."""

import copy
import math

import pytest
import torch

from mosaic_fast import reference
from mosaic_fast.reference.checks import repeats_in_rows

EPS = 1e-5  # DESIGN.md §3: LayerNorm eps 1e-5 everywhere (LN_a, norm1/norm2, final norm, tokenizers)


def _seed() -> int:
    return int(torch.randint(0, 2**31, ()))


def _randomize(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Every parameter random (the zero-initialised up-projections included), fresh each run."""
    gen = torch.Generator().manual_seed(_seed())
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def _layer_norm(x, weight, bias, eps=EPS):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def _adapter(ad, h, scale):
    """``s * up(relu(down(LN_a(h))))``, DESIGN.md §3, written out with the adapter's parameters."""
    z = _layer_norm(h, ad.layer_norm.weight, ad.layer_norm.bias)
    z = torch.clamp_min(z @ ad.down_proj.weight.T + ad.down_proj.bias, 0.0)
    return scale * (z @ ad.up_proj.weight.T + ad.up_proj.bias)


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _attention(x, qkv, proj, heads):
    """Multi-head self-attention: qkv columns [q | k | v], head h owns columns h*hd:(h+1)*hd of each."""
    d = x.shape[-1]
    hd = d // heads
    y = x @ qkv.weight.T + (0 if qkv.bias is None else qkv.bias)
    q, k, v = y[..., :d], y[..., d : 2 * d], y[..., 2 * d :]
    out = torch.empty_like(x)
    for h in range(heads):
        cols = slice(h * hd, (h + 1) * hd)
        a = torch.softmax(q[..., cols] @ k[..., cols].transpose(-2, -1) / math.sqrt(hd), dim=-1)
        out[..., cols] = a @ v[..., cols]
    return out @ proj.weight.T + proj.bias


def _block(blk, x, expert, heads, scale=0.1):
    """``x = x + attn(norm1(x)); h = norm2(x); x = x + mlp(h) + adapter(h)`` (DESIGN.md §3)."""
    x = x + _attention(_layer_norm(x, blk.norm1.weight, blk.norm1.bias), blk.attn.qkv, blk.attn.proj, heads)
    h = _layer_norm(x, blk.norm2.weight, blk.norm2.bias)
    mlp = _gelu(h @ blk.ffn.fc1.weight.T + blk.ffn.fc1.bias) @ blk.ffn.fc2.weight.T + blk.ffn.fc2.bias
    return x + mlp + _adapter(getattr(blk.adapter, f"expert_{expert.lower()}"), h, scale)


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- adapter


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_adapter_is_scaled_relu_bottleneck_with_ln_eps_1e5(dropout):
    """float64, tokens of small spread (so eps 1e-5 vs 1e-6 shows), a non-default scale, and dropout
    that must be the identity in eval."""
    scale = 0.05 + torch.rand(()).item()
    ad = _randomize(reference.Adapter(32, 8, dropout=dropout, adapter_scalar=scale).double()).eval()
    h = torch.randn(3, 5, 32, dtype=torch.float64) * 0.01 + torch.randn(3, 5, 1, dtype=torch.float64)
    with torch.no_grad():
        _close(ad(h), _adapter(ad, h, scale))


def test_adapter_default_scale_is_0_1():
    ad = _randomize(reference.Adapter(24, 6).double())
    h = torch.randn(2, 4, 24, dtype=torch.float64)
    with torch.no_grad():
        _close(ad(h), _adapter(ad, h, 0.1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=0, bottleneck=8), "d_model and bottleneck must be positive"),
        (dict(d_model=16, bottleneck=0), "d_model and bottleneck must be positive"),
        (dict(d_model=16, bottleneck=8, dropout=1.0), "dropout must be in"),
        (dict(d_model=16, bottleneck=8, dropout=-0.1), "dropout must be in"),
    ],
)
def test_adapter_rejects_bad_sizes_and_dropout(kwargs, match):
    with pytest.raises(ValueError, match=match):
        reference.Adapter(**kwargs)


def test_lora_init_kaiming_uniform_a_sqrt5_and_zeros():
    """"lora": down ~ U(-b, b) with b = gain·sqrt(3/fan_in), gain = sqrt(2/(1+5)) -> b = 1/sqrt(fan_in);
    down bias, up weight and bias 0; LN_a starts as the identity affine map (weight 1, bias 0)."""
    fan_in = 256
    ad = reference.Adapter(fan_in, 64, init_option="lora")
    w = ad.down_proj.weight.detach().double()
    bound = 1 / math.sqrt(fan_in)
    assert w.abs().max() <= bound * (1 + 1e-6)  # a=0 (bound sqrt(6/fan_in)) or a normal would exceed it
    assert w.abs().max() >= 0.95 * bound  # 16384 uniform draws reach the bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)
    assert abs(w.mean().item()) < 0.05 * bound
    for t in (ad.down_proj.bias, ad.up_proj.weight, ad.up_proj.bias, ad.layer_norm.bias):
        assert torch.count_nonzero(t) == 0
    assert torch.equal(ad.layer_norm.weight, torch.ones(fan_in))


def test_bert_init_normal_0_02_zero_biases():
    ad = reference.Adapter(256, 64, init_option="bert")
    for lin in (ad.down_proj, ad.up_proj):
        w = lin.weight.detach().double()
        assert abs(w.std().item() - 0.02) < 0.002
        assert abs(w.mean().item()) < 0.002
        assert w.abs().max() > 2 * 0.02  # a normal, not a uniform of the same spread (max 0.035)
        assert torch.count_nonzero(lin.bias) == 0


def test_adapter_dtype_mismatch_names_h():
    """§7: a float64 h into a float32 adapter is a TypeError naming h, not torch's mat1/mat2 error."""
    with pytest.raises(TypeError, match=r"h is torch\.float64 but the module's parameters are torch\.float32"):
        reference.Adapter(16, 4)(torch.randn(2, 3, 16, dtype=torch.float64))


def test_adapter_runs_under_cpu_autocast():
    """Under autocast a bf16 h with fp32 parameters is not a dtype mismatch: the adapter runs (bf16)."""
    ad = _randomize(reference.Adapter(32, 8))
    h = torch.randn(2, 4, 32).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ad(h)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        want = _adapter(copy.deepcopy(ad).double(), h.double(), 0.1)
    assert float((out.double() - want).norm() / want.norm()) < 2e-2


# ---------------------------------------------------------------- MoS adapter and expert ids


def test_mos_default_bottlenecks_64_96_192():
    mos = reference.MoSAdapter(48)
    for expert, r in zip(mos.experts, (64, 96, 192)):
        assert expert.down_proj.weight.shape == (r, 48) and expert.up_proj.weight.shape == (48, r)


def test_mos_passes_bottleneck_scale_init_and_dropout_to_each_expert():
    mos = reference.MoSAdapter(16, 4, 6, 10, dropout=0.5, init_option="bert", adapter_scalar=0.7)
    h = torch.randn(4, 64, 16, dtype=torch.float64)
    for expert, r in zip(mos.experts, (4, 6, 10)):
        assert expert.down_proj.weight.shape == (r, 16)
        assert torch.count_nonzero(expert.up_proj.weight) > 0  # "bert", not "lora"
    mos = _randomize(mos.double())
    with torch.no_grad():
        mos.eval()
        for name, expert in zip("ABC", mos.experts):
            _close(mos(h, name), _adapter(expert, h, 0.7))
        mos.train()  # dropout 0.5 on up(...) in training: about half the outputs exactly 0
        for name in "ABC":
            zero = (mos(h, name) == 0).double().mean().item()
            assert 0.4 < zero < 0.6, (name, zero)


def test_mos_int32_ids_route_like_int64():
    mos = _randomize(reference.MoSAdapter(16, 4, 6, 10).double())
    h = torch.randn(5, 3, 16, dtype=torch.float64)
    ids = torch.tensor([2, 0, 1, 1, 0])
    with torch.no_grad():
        got = mos(h, ids.int())
        for i, e in enumerate(ids.tolist()):
            _close(got[i], _adapter(mos.experts[e], h[i], 0.1))


@pytest.mark.parametrize(
    "ids, err, match",
    [
        (torch.tensor([[0], [1], [2]]), ValueError, r"expert_id tensor must have shape \(3,\)"),
        (torch.tensor([0, -1, 2]), ValueError, r"expert_id values must be in \{0, 1, 2\}"),
        (torch.tensor([0, 1], dtype=torch.int16), TypeError, "expert_id tensor must be int64"),
        (torch.zeros(3, dtype=torch.long, device="meta"), ValueError, "expert_id is on meta but h is on cpu"),
    ],
)
def test_mos_bad_expert_id_tensor_named(ids, err, match):
    with pytest.raises(err, match=match):
        reference.MoSAdapter(16, 4, 6, 10)(torch.randn(3, 2, 16), ids)


def test_mos_mixed_batch_of_one_specialist_equals_string_route_under_autocast():
    """A (B,) tensor of one id is the same routing as that id's letter, dtype included (autocast: bf16)."""
    mos = _randomize(reference.MoSAdapter(16, 4, 6, 10))
    h = torch.randn(3, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for i, name in enumerate("ABC"):
            by_name, by_ids = mos(h, name), mos(h, torch.full((3,), i))
            assert by_ids.dtype == by_name.dtype
            torch.testing.assert_close(by_ids, by_name, rtol=0, atol=0)


# ---------------------------------------------------------------- checks


def _repeats_oracle(idx):
    rows = [idx.tolist()] if idx.dim() == 1 else idx.tolist()
    return any(len(set(r)) < len(r) for r in rows)


def test_repeats_in_rows_matches_a_set_per_row():
    gen = torch.Generator().manual_seed(_seed())
    assert not repeats_in_rows(torch.tensor([[0, 1, 2], [0, 1, 2]]), 3)  # the same values in two rows
    assert repeats_in_rows(torch.tensor([[0, 1, 1], [2, 0, 1]]), 3)
    assert repeats_in_rows(torch.tensor([3, 0, 3]), 4)  # a 1-D tensor is one row
    assert not repeats_in_rows(torch.tensor([3, 0, 1]), 4)
    for _ in range(30):
        bound = int(torch.randint(2, 9, (), generator=gen))
        shape = (int(torch.randint(1, 4, (), generator=gen)), int(torch.randint(1, bound + 1, (), generator=gen)))
        idx = torch.randint(0, bound, shape, generator=gen)
        for t in (idx, idx[0], idx.int()):
            assert repeats_in_rows(t, bound) == _repeats_oracle(t), (t, bound)


# ---------------------------------------------------------------- tokenizers


def test_patch_embed_2d_row_major_patches_then_ln():
    """Tokens are the p×p patches in row-major order, W·vec(patch) + b, then LayerNorm eps 1e-5 (a
    non-square image, so rows and columns cannot be swapped)."""
    pe = _randomize(reference.PatchEmbed2D(16, 8, 3, 24).double())
    with torch.no_grad():
        pe.proj.weight.mul_(0.01)  # small token spread: eps 1e-5 vs 1e-6 shows
    x = torch.randn(2, 3, 16, 32, dtype=torch.float64)
    w = pe.proj.weight.reshape(24, -1)
    rows = [x[:, :, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8].reshape(2, -1) @ w.T + pe.proj.bias
            for i in range(2) for j in range(4)]
    with torch.no_grad():
        _close(pe(x), _layer_norm(torch.stack(rows, 1), pe.norm.weight, pe.norm.bias))
    assert pe.num_patches == 4 and reference.PatchEmbed2D(224, 16, 3, 8).num_patches == 196


@pytest.mark.parametrize(
    "x, err, match",
    [
        (torch.randn(1, 3, 12, 16), ValueError, "divisible by patch_size 8"),
        (torch.randn(1, 3, 0, 16), ValueError, "x: H and W must be non-zero"),
        (torch.randn(1, 3, 16, 12), ValueError, "divisible by patch_size 8"),
        (torch.randn(1, 1, 16, 16), ValueError, r"x: expected \(B, 3, H, W\)"),
        (torch.ones(1, 3, 16, 16, dtype=torch.uint8), TypeError, "x: expected a floating-point image"),
        (torch.randn(1, 3, 16, 16, dtype=torch.float64), TypeError, "x is torch.float64"),
    ],
)
def test_patch_embed_2d_bad_input_named(x, err, match):
    with pytest.raises(err, match=match):
        reference.PatchEmbed2D(16, 8, 3, 8)(x)


@pytest.mark.parametrize(
    "img_size, patch_size, match",
    [(20, 8, "img_size 20 must be divisible by patch_size 8"), (16, 0, "patch_size must be a positive int")],
)
def test_patch_embed_2d_bad_construction_named(img_size, patch_size, match):
    """As the 3D tokenizer: an img_size the patches do not tile is refused when built (it used to build a
    model whose forward then rejected every image of that size, and took smaller ones instead)."""
    with pytest.raises(ValueError, match=match):
        reference.PatchEmbed2D(img_size, patch_size, 3, 8)
    with pytest.raises(ValueError, match=match):
        reference.UnifiedPatchEmbed(img_size, patch_size, 3, 8, 4, 1, 8)


def test_patch_embed_3d_anisotropic_row_major_patches_then_ln():
    """(pd, ph, pw) = (2, 4, 8) kernels; tokens in (d, h, w) row-major order; LayerNorm eps 1e-5."""
    pe = _randomize(reference.PatchEmbed3D((4, 12, 32), (2, 4, 8), 2, 16).double())
    assert pe.proj.weight.shape == (16, 2, 2, 4, 8)
    assert pe.num_patches == 2 * 3 * 4
    with torch.no_grad():
        pe.proj.weight.mul_(0.01)
    x = torch.randn(2, 2, 4, 12, 32, dtype=torch.float64)  # grid (2, 3, 4)
    w = pe.proj.weight.reshape(16, -1)
    rows = [x[:, :, 2 * a : 2 * a + 2, 4 * b : 4 * b + 4, 8 * c : 8 * c + 8].reshape(2, -1) @ w.T + pe.proj.bias
            for a in range(2) for b in range(3) for c in range(4)]
    with torch.no_grad():
        _close(pe(x), _layer_norm(torch.stack(rows, 1), pe.norm.weight, pe.norm.bias))


def test_patch_embed_3d_num_patches_and_defaults():
    assert reference.PatchEmbed3D((8, 16, 32), (2, 2, 2), 1, 8).num_patches == 4 * 8 * 16
    assert reference.PatchEmbed3D(64, 8, 1, 8).num_patches == 512


def test_patch_embed_3d_integer_volume_cast_unscaled_to_parameter_dtype():
    pe = _randomize(reference.PatchEmbed3D(8, 4, 1, 8).double())
    vol = torch.randint(0, 256, (2, 1, 8, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        out = pe(vol)
        assert out.dtype == torch.float64
        _close(out, pe(vol.double()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(img_size=8, patch_size=0), "patch_size must be a positive int"),
        (dict(img_size=8, patch_size=(4, 0, 4)), "patch_size must be a positive int"),
        (dict(img_size=(8, 8, 10), patch_size=4), "img_size .* must be divisible by patch_size"),
    ],
)
def test_patch_embed_3d_bad_construction_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        reference.PatchEmbed3D(in_chans=1, embed_dim=8, **kwargs)


@pytest.mark.parametrize(
    "x, err, match",
    [
        (torch.rand(1, 1, 0, 8, 8), ValueError, "is empty or not divisible by patch_size"),
        (torch.ones(1, 1, 8, 8, 8, dtype=torch.bool), TypeError, "x: expected an integer or floating dtype"),
        (torch.rand(1, 2, 8, 8, 8), ValueError, r"x: expected \(B, 1, D, H, W\)"),
    ],
)
def test_patch_embed_3d_bad_input_named(x, err, match):
    with pytest.raises(err, match=match):
        reference.PatchEmbed3D(8, 4, 1, 8)(x)


# ---------------------------------------------------------------- ViT


def test_attention_and_mlp_by_hand():
    attn = _randomize(reference.Attention(32, 4).double())
    mlp = _randomize(reference.Mlp(32, 48).double())
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        _close(attn(x), _attention(x, attn.qkv, attn.proj, 4))
        _close(mlp(x), _gelu(x @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias)


def test_block_by_hand_with_non_default_sizes():
    blk = reference.Block(32, 4, mlp_ratio=2.0, qkv_bias=False, adapter_bottleneck_a=4, adapter_bottleneck_b=6,
                          adapter_bottleneck_c=10, adapter_scalar=0.4)
    assert blk.attn.qkv.bias is None
    assert blk.ffn.fc1.weight.shape == (64, 32)
    for expert in blk.adapter.experts:  # the block's adapters start "lora": output 0
        assert torch.count_nonzero(expert.up_proj.weight) == 0
    blk = _randomize(blk.double())
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    with torch.no_grad():
        for name in "ABC":
            _close(blk(x, name), _block(blk, x, name, 4, scale=0.4))


def test_encoder_blocks_then_final_ln():
    enc = _randomize(reference.Encoder(2, 32, num_heads=4, adapter_bottleneck_a=4, adapter_bottleneck_b=6,
                                       adapter_bottleneck_c=10).double(), std=0.2)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    want = x
    for blk in enc.blocks:
        want = _block(blk, want, "C", 4)
    with torch.no_grad():
        _close(enc(x, "C"), _layer_norm(want, enc.norm.weight, enc.norm.bias))
    assert {"blocks.1.attn.qkv.weight", "blocks.0.ffn.fc2.bias", "blocks.0.adapter.expert_c.up_proj.weight",
            "blocks.1.norm2.weight", "norm.bias"} <= set(enc.state_dict())
