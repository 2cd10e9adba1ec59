"""MosaicModel: seed checkpoint compatibility, trainable set, forward contract, EMA teacher."""

import numpy as np
import pytest
import torch
from parity import TOL_CPU_FWD, assert_parity, randomize_

from mosaic_fast import models
from mosaic_fast.data.registry import NUM_CLASSES
from mosaic_fast.models.ema import EMATeacher

SMALL = dict(embed_dim=32, depth=2, num_heads=4, img_size_2d=32, patch_size_2d=16, img_size_3d=16,
             patch_size_3d=8, adapter_bottleneck_a=8, adapter_bottleneck_b=16, adapter_bottleneck_c=24)


def seed_v2_moe_keys(depth: int, num_tasks: int) -> list[tuple[str, str]]:
    """(key, shape-formula) pairs of the seed's UnifiedModel(adapter_mode="v2_moe"), written out from its
    module tree: UnifiedPatchEmbed, cls/pos tokens, TransformerEncoder(blocks, norm), heads."""
    keys = ["cls_token", "pos_embed_2d", "pos_embed_3d"]
    for dim in ("2d", "3d"):
        keys += [f"patch_embed.patch_embed_{dim}.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")]
    for i in range(depth):
        b = f"encoder.blocks.{i}."
        keys += [b + f"{m}.{p}" for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "ffn.fc1", "ffn.fc2")
                 for p in ("weight", "bias")]
        keys += [b + f"adapter.expert_{e}.{m}.{p}" for e in "abc" for m in ("layer_norm", "down_proj", "up_proj")
                 for p in ("weight", "bias")]
    keys += ["encoder.norm.weight", "encoder.norm.bias"]
    keys += [f"heads.{t}.{p}" for t in range(num_tasks) for p in ("weight", "bias")]
    return keys


@pytest.mark.parametrize("fast", [False, True])
def test_state_dict_keys_equal_seed(fast):
    model = models.MosaicModel(fast=False, depth=12)
    expected = seed_v2_moe_keys(12, 18)
    assert sorted(model.state_dict()) == sorted(expected)
    small = models.MosaicModel([3, 2], fast=fast, task_experts=["A", "C"], **SMALL)
    assert sorted(small.state_dict()) == sorted(seed_v2_moe_keys(2, 2))


def test_shapes_of_default_model():
    sd = models.MosaicModel(fast=False).state_dict()
    assert sd["pos_embed_2d"].shape == (1, 197, 768)
    assert sd["pos_embed_3d"].shape == (1, 513, 768)
    assert sd["patch_embed.patch_embed_3d.proj.weight"].shape == (768, 1, 8, 8, 8)
    assert sd["encoder.blocks.0.adapter.expert_c.down_proj.weight"].shape == (192, 768)
    assert sd["encoder.blocks.11.attn.qkv.weight"].shape == (2304, 768)
    assert [sd[f"heads.{t}.weight"].shape[0] for t in range(18)] == list(NUM_CLASSES)


def test_trainable_count_default_vit_b(capsys):
    model = models.MosaicModel(fast=False)
    count = model.freeze_backbone()
    printed = capsys.readouterr().out
    adapters = 12 * sum(2 * 768 + 768 * r + r + r * 768 + 768 for r in (64, 96, 192))
    heads = 768 * sum(NUM_CLASSES) + sum(NUM_CLASSES)
    tokenizer_3d = 768 * 512 + 768 + 2 * 768 + 513 * 768
    assert (adapters, heads, tokenizer_3d) == (6_575_232, 87_666, 789_504)
    assert count == adapters + heads + tokenizer_3d == 7_452_402
    assert "7,452,402" in printed
    assert model.freeze_backbone(freeze_3d_tokenizer=True, verbose=False) == adapters + heads
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "encoder.blocks.0.attn.qkv.weight" in frozen and "pos_embed_2d" in frozen


def test_forward_contract_and_routing():
    torch.manual_seed(0)
    model = models.MosaicModel([3, 2], fast=False, task_experts=["A", "C"], **SMALL).eval()
    x2 = torch.randn(2, 3, 32, 32)
    feats, logits = model(x2, task_id=0)
    assert feats.shape == (2, 32) and logits.shape == (2, 3)
    assert torch.equal(model(x2, 0, return_features=True), feats)
    x3 = torch.rand(2, 1, 16, 16, 16)
    assert model(x3, task_id=1)[1].shape == (2, 2)
    with pytest.raises(ValueError, match="task_id"):
        model(x2, task_id=2)
    for bad in ("0", 1.0):  # not an index: a named error, not a comparison or ModuleList failure
        with pytest.raises(TypeError, match="task_id must be an integer"):
            model(x2, task_id=bad)
    assert torch.equal(model(x2, task_id=torch.tensor(0))[1], logits)  # a 0-d integer tensor is an index
    with pytest.raises(ValueError, match="resize the input"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="expert_id is required"):
        models.MosaicModel([3], fast=False, **SMALL)(x2)


def test_fast_model_matches_reference_model():
    """Every parameter randomised (zero-initialised up-projections, LayerNorm affines, tokens and position
    tables included); the fast fp32 model against the float64 reference on a mixed batch."""
    ref = randomize_(models.MosaicModel([3, 2], fast=False, task_experts=["A", "C"], **SMALL), std=0.1, seed=0)
    fast = models.MosaicModel([3, 2], fast=True, task_experts=["A", "C"], **SMALL)
    fast.load_state_dict(ref.state_dict())
    ref, fast = ref.double().eval(), fast.eval()
    x = torch.randn(3, 3, 32, 32)
    ids = torch.tensor([0, 2, 1])
    with torch.no_grad():
        feats, logits = fast(x, 0, expert_id=ids)
        want_feats, want_logits = ref(x.double(), 0, expert_id=ids)
    assert_parity(feats, want_feats, TOL_CPU_FWD, "features")
    assert_parity(logits, want_logits, TOL_CPU_FWD, "logits")


def write_google_npz(path, dim=32, heads=4, depth=2, patch=16, grid=2, mlp=128, seed=0):
    """A small random checkpoint in the layout of Google's ViT-B_16.npz."""
    rng = np.random.default_rng(seed)
    hd = dim // heads
    w = {
        "embedding/kernel": rng.normal(size=(patch, patch, 3, dim)),
        "embedding/bias": rng.normal(size=(dim,)),
        "cls": rng.normal(size=(1, 1, dim)),
        "Transformer/posembed_input/pos_embedding": rng.normal(size=(1, grid * grid + 1, dim)),
        "Transformer/encoder_norm/scale": rng.normal(size=(dim,)),
        "Transformer/encoder_norm/bias": rng.normal(size=(dim,)),
    }
    for i in range(depth):
        p = f"Transformer/encoderblock_{i}/"
        a = p + "MultiHeadDotProductAttention_1/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            w[p + ln + "/scale"] = rng.normal(size=(dim,))
            w[p + ln + "/bias"] = rng.normal(size=(dim,))
        for n in ("query", "key", "value"):
            w[a + n + "/kernel"] = rng.normal(size=(dim, heads, hd))
            w[a + n + "/bias"] = rng.normal(size=(heads, hd))
        w[a + "out/kernel"] = rng.normal(size=(heads, hd, dim))
        w[a + "out/bias"] = rng.normal(size=(dim,))
        w[p + "MlpBlock_3/Dense_0/kernel"] = rng.normal(size=(dim, mlp))
        w[p + "MlpBlock_3/Dense_0/bias"] = rng.normal(size=(mlp,))
        w[p + "MlpBlock_3/Dense_1/kernel"] = rng.normal(size=(mlp, dim))
        w[p + "MlpBlock_3/Dense_1/bias"] = rng.normal(size=(dim,))
    w = {k: v.astype(np.float32) for k, v in w.items()}
    np.savez(path, **w)
    return w


def test_load_vit_npz_puts_every_tensor_in_place(tmp_path):
    w = write_google_npz(tmp_path / "vit.npz")
    model = models.MosaicModel([3, 2], fast=False, task_experts=["A", "C"], **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = models.load_vit_npz(model, tmp_path / "vit.npz")
    sd = model.state_dict()
    t = lambda k: torch.from_numpy(w[k])
    torch.testing.assert_close(sd["patch_embed.patch_embed_2d.proj.weight"], t("embedding/kernel").permute(3, 2, 0, 1))
    torch.testing.assert_close(sd["cls_token"], t("cls"))
    torch.testing.assert_close(sd["pos_embed_2d"], t("Transformer/posembed_input/pos_embedding"))
    torch.testing.assert_close(sd["encoder.norm.weight"], t("Transformer/encoder_norm/scale"))
    for i in range(2):
        p, a, b = f"Transformer/encoderblock_{i}/", f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/", \
            f"encoder.blocks.{i}."
        torch.testing.assert_close(sd[b + "norm1.weight"], t(p + "LayerNorm_0/scale"))
        torch.testing.assert_close(sd[b + "norm2.bias"], t(p + "LayerNorm_2/bias"))
        x = torch.randn(5, 32)
        # q/k/v: the torch qkv Linear must compute the same projections as the Flax einsums.
        qkv = x @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            flax = torch.einsum("nd,dhk->nhk", x, t(a + n + "/kernel")) + t(a + n + "/bias")
            torch.testing.assert_close(qkv[:, 32 * j : 32 * (j + 1)], flax.reshape(5, 32), rtol=1e-4, atol=1e-4)
        o = torch.randn(5, 4, 8)
        flax_out = torch.einsum("nhk,hkd->nd", o, t(a + "out/kernel")) + t(a + "out/bias")
        ours = o.reshape(5, 32) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        torch.testing.assert_close(ours, flax_out, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sd[b + "ffn.fc1.weight"], t(p + "MlpBlock_3/Dense_0/kernel").T)
        torch.testing.assert_close(sd[b + "ffn.fc2.bias"], t(p + "MlpBlock_3/Dense_1/bias"))
    new_parts = ("heads.", "patch_embed.patch_embed_3d", "pos_embed_3d")
    untouched = [k for k in sd if "adapter" in k or k.startswith(new_parts)]
    assert untouched and all(torch.equal(sd[k], before[k]) for k in untouched)
    assert "encoder.blocks.1.attn.qkv.weight" in loaded and "pos_embed_2d" in loaded


def test_load_vit_npz_errors(tmp_path):
    model = models.MosaicModel([3], fast=False, task_experts=["A"], **SMALL)
    with pytest.raises(FileNotFoundError, match=r"missing\.npz"):
        models.load_vit_npz(model, tmp_path / "missing.npz")
    write_google_npz(tmp_path / "deep.npz", depth=3)
    with pytest.raises(ValueError, match="3 encoder blocks but the model has 2"):
        models.load_vit_npz(model, tmp_path / "deep.npz")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = write_google_npz(tmp_path / "vit.npz")
    broken = {k: v for k, v in w.items() if k not in ("cls", "Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias")}
    broken["Transformer/encoderblock_0/SomethingNew/kernel"] = np.zeros(3, np.float32)
    broken["head/kernel"] = np.zeros((32, 3), np.float32)  # Google's classifier: ignored, not unexpected
    np.savez(tmp_path / "broken.npz", **broken)
    want = (r"missing keys \['Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias', 'cls'\], "
            r"unexpected keys \['Transformer/encoderblock_0/SomethingNew/kernel'\]")
    with pytest.raises(ValueError, match=want):
        models.load_vit_npz(model, tmp_path / "broken.npz")
    w["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"] = np.zeros((32, 64), np.float32)
    np.savez(tmp_path / "narrow.npz", **w)
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.fc1\.weight: checkpoint shape \(64, 32\)"):
        models.load_vit_npz(model, tmp_path / "narrow.npz")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a failed load changed the model"
    write_google_npz(tmp_path / "two_heads.npz", heads=2)  # same parameter count, other head grouping
    want = (r"encoderblock_0/MultiHeadDotProductAttention_1/query/kernel: checkpoint shape \(32, 2, 16\) does not "
            r"fit the model's \(32, 4, 8\) \(width 32, 4 heads\)")
    with pytest.raises(ValueError, match=want):
        models.load_vit_npz(model, tmp_path / "two_heads.npz")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a failed load changed the model"
    # q/k/v kernels stored flat (D, D) carry no head grouping: they load as the (D, H, D/H) ones do
    flat = {k: (v.reshape(32, 32) if k.endswith(("query/kernel", "key/kernel", "value/kernel")) else v)
            for k, v in write_google_npz(tmp_path / "ok.npz").items()}
    np.savez(tmp_path / "flat.npz", **flat)
    models.load_vit_npz(model, tmp_path / "flat.npz")
    loaded_flat = {k: v.clone() for k, v in model.state_dict().items()}
    models.load_vit_npz(model, tmp_path / "ok.npz")
    assert all(torch.equal(v, loaded_flat[k]) for k, v in model.state_dict().items())


def test_ema_update_formula_and_inactive_specialists():
    torch.manual_seed(0)
    student = models.MosaicModel([3, 2], fast=False, task_experts=["A", "C"], **SMALL)
    student.freeze_backbone(verbose=False)
    teacher = EMATeacher(student)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    teacher.update(student, "B")
    after = teacher.state_dict()
    s = student.state_dict()
    for name, p in student.named_parameters():
        if ".expert_a." in name or ".expert_c." in name:
            assert torch.equal(after[name], before[name]), name
        elif not p.requires_grad:
            assert torch.equal(after[name], before[name]), name
        else:  # expert_b and shared trainable parameters: m = 0.9
            torch.testing.assert_close(after[name], 0.9 * before[name] + 0.1 * s[name])
    teacher.update(student, ["A", "C"])
    a = "encoder.blocks.0.adapter.expert_a.down_proj.weight"
    c = "encoder.blocks.0.adapter.expert_c.down_proj.weight"
    torch.testing.assert_close(teacher.state_dict()[a], 0.9 * before[a] + 0.1 * s[a])
    torch.testing.assert_close(teacher.state_dict()[c], 0.95 * before[c] + 0.05 * s[c])
    with pytest.raises(ValueError, match="experts"):
        teacher.update(student, "D")
