"""Tests found missing by mutation testing: each checks one behaviour against a hand-written formula
(DESIGN.md §3) that an undetected code change would have broken."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mosaic_fast.models import DynaMerModel

DYN_SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4)


def _randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return module


def _layer_norm(x, weight, bias, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


def _attention(x, qkv, proj, heads):
    d = x.shape[-1]
    hd = d // heads
    y = x @ qkv.weight.T + qkv.bias
    q, k, v = y[..., :d], y[..., d : 2 * d], y[..., 2 * d :]
    out = torch.empty_like(x)
    for h in range(heads):
        cols = slice(h * hd, (h + 1) * hd)
        a = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(hd), dim=-1)
        out[..., cols] = a @ v[..., cols]
    return out @ proj.weight.T + proj.bias


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("fast", [False, True])
def test_dynamer_vit_block_is_prenorm_with_eps_1e6(fast):
    """DynaMer's backbone block: x + attn(LN1(x)), then + mlp(LN2(·)), LayerNorm eps 1e-6, exact GELU."""
    model = DynaMerModel(3, fast=fast, **DYN_SMALL).double()
    block = _randomize(model.backbone_gen.blocks[0], seed=int(torch.randint(0, 2**31, ())))
    with torch.no_grad():  # float64: an eps of 1e-5 instead of 1e-6 moves the output by ~1e-6
        x = torch.randn(2, 5, 32, dtype=torch.float64)
        h = x + _attention(_layer_norm(x, block.norm1.weight, block.norm1.bias, 1e-6), block.attn.qkv,
                           block.attn.proj, 4)
        z = _layer_norm(h, block.norm2.weight, block.norm2.bias, 1e-6)
        want = h + _gelu(z @ block.ffn.fc1.weight.T + block.ffn.fc1.bias) @ block.ffn.fc2.weight.T + block.ffn.fc2.bias
        torch.testing.assert_close(block(x), want, rtol=1e-9, atol=1e-9)
        for norm in (block.norm1, block.norm2, model.backbone_gen.norm, model.backbone_med.norm):
            assert norm.eps == 1e-6


def test_dynamer_embed_is_cls_first_then_row_major_patches():
    """Tokens: CLS first, then the p×p patches in row-major order, each W·vec(patch) + b (Conv2d weight
    layout (D, C, p, p)), plus the position table."""
    model = DynaMerModel(3, fast=False, **DYN_SMALL).double()
    bb = _randomize(model.backbone_gen, seed=int(torch.randint(0, 2**31, ())))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    w = bb.patch_embed.proj.weight.reshape(32, -1)
    rows = []
    for i in range(4):
        for j in range(4):
            patch = x[:, :, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8].reshape(2, -1)
            rows.append(patch @ w.T + bb.patch_embed.proj.bias)
    want = torch.cat([bb.cls_token.expand(2, 1, 32), torch.stack(rows, 1)], 1) + bb.pos_embed
    with torch.no_grad():
        torch.testing.assert_close(bb.embed(x), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("old, new", [(2, 4), (4, 3)])
def test_position_table_resize_keeps_cls_and_the_grid_layout(old, new):
    """A (1, 1 + g², D) table resized to another grid: the CLS row unchanged, the patch rows read as a
    row-major g×g image per channel and resized bicubically (align_corners=False, as timm does)."""
    from mosaic_fast.models.weights import resize_pos_embed

    d = 6
    pos = torch.randn(1, 1 + old * old, d, dtype=torch.float64)
    image = torch.empty(1, d, old, old, dtype=torch.float64)
    for i in range(old):
        for j in range(old):
            image[0, :, i, j] = pos[0, 1 + i * old + j]
    resized = F.interpolate(image, size=(new, new), mode="bicubic", align_corners=False)
    want = [pos[0, 0]] + [resized[0, :, i, j] for i in range(new) for j in range(new)]
    got = resize_pos_embed(pos, 1 + new * new)
    torch.testing.assert_close(got, torch.stack(want)[None], rtol=1e-12, atol=1e-12)


def _google_npz(path, depth, d=32, heads=4, p=8, grid=4, mlp=128):
    """Random weights in the layout of Google's ViT-B_16.npz (Flax kernels (in, out), per-head q/k/v)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))

    def r(*shape):
        return (torch.randn(shape, generator=gen) * 0.3).numpy()

    hd = d // heads
    w = {"embedding/kernel": r(p, p, 3, d), "embedding/bias": r(d), "cls": r(1, 1, d),
         "Transformer/posembed_input/pos_embedding": r(1, grid * grid + 1, d),
         "Transformer/encoder_norm/scale": r(d), "Transformer/encoder_norm/bias": r(d)}
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        a = b + "MultiHeadDotProductAttention_1/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            w[b + ln + "/scale"], w[b + ln + "/bias"] = r(d), r(d)
        for n in ("query", "key", "value"):
            w[a + n + "/kernel"], w[a + n + "/bias"] = r(d, heads, hd), r(heads, hd)
        w[a + "out/kernel"], w[a + "out/bias"] = r(heads, hd, d), r(d)
        w[b + "MlpBlock_3/Dense_0/kernel"], w[b + "MlpBlock_3/Dense_0/bias"] = r(d, mlp), r(mlp)
        w[b + "MlpBlock_3/Dense_1/kernel"], w[b + "MlpBlock_3/Dense_1/bias"] = r(mlp, d), r(d)
    np.savez(path, **w)
    return {k: torch.from_numpy(v).double() for k, v in w.items()}


def _flax_vit(w, x, depth, p=8):
    """Google's ViT written from the npz arrays (Flax conventions), final-normed tokens (B, 1 + N, D)."""
    b, _, size, _ = x.shape
    g = size // p
    patches = x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p, p, 3)  # (h, w, c)
    tok = torch.einsum("bnhwc,hwcd->bnd", patches, w["embedding/kernel"]) + w["embedding/bias"]
    h = torch.cat([w["cls"].expand(b, 1, -1), tok], 1) + w["Transformer/posembed_input/pos_embedding"]
    for i in range(depth):
        pre = f"Transformer/encoderblock_{i}/"
        a = pre + "MultiHeadDotProductAttention_1/"
        y = _layer_norm(h, w[pre + "LayerNorm_0/scale"], w[pre + "LayerNorm_0/bias"], 1e-6)
        q, k, v = (torch.einsum("bnd,dhk->bnhk", y, w[a + n + "/kernel"]) + w[a + n + "/bias"]
                   for n in ("query", "key", "value"))
        att = torch.softmax(torch.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1]), dim=-1)
        o = torch.einsum("bhqs,bshk->bqhk", att, v)
        h = h + torch.einsum("bqhk,hkd->bqd", o, w[a + "out/kernel"]) + w[a + "out/bias"]
        y = _layer_norm(h, w[pre + "LayerNorm_2/scale"], w[pre + "LayerNorm_2/bias"], 1e-6)
        m = pre + "MlpBlock_3/"
        y = _gelu(y @ w[m + "Dense_0/kernel"] + w[m + "Dense_0/bias"]) @ w[m + "Dense_1/kernel"] + w[m + "Dense_1/bias"]
        h = h + y
    return _layer_norm(h, w["Transformer/encoder_norm/scale"], w["Transformer/encoder_norm/bias"], 1e-6)


def test_dynamer_npz_backbone_computes_googles_vit(tmp_path):
    """A Google-layout npz loaded into a DynaMer backbone computes the Flax ViT of those arrays (every
    tensor in place: embedding kernel transposed, q/k/v concatenated, out projection, MLP, final norm)."""
    w = _google_npz(tmp_path / "vit.npz", depth=2)
    model = DynaMerModel(3, fast=False, **dict(DYN_SMALL, depth=2))
    model.load_backbone("med", tmp_path / "vit.npz")
    bb = model.backbone_med.double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        h = bb.embed(x)
        for block in bb.blocks:
            h = block(h)
        got = bb.norm(h)
    torch.testing.assert_close(got, _flax_vit(w, x, depth=2), rtol=1e-5, atol=1e-5)


def test_npz_with_fewer_blocks_than_the_model_is_a_clear_error(tmp_path):
    _google_npz(tmp_path / "shallow.npz", depth=1)
    model = DynaMerModel(3, fast=False, **dict(DYN_SMALL, depth=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="1 encoder blocks but the model has 2"):
        model.load_backbone("gen", tmp_path / "shallow.npz")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


MOSAIC_SMALL = dict(embed_dim=16, depth=1, num_heads=2, img_size_2d=16, patch_size_2d=8, img_size_3d=8,
                    patch_size_3d=4, adapter_bottleneck_a=4, adapter_bottleneck_b=6, adapter_bottleneck_c=8)


def _ema_pair(momentum=None):
    from mosaic_fast.models import EMATeacher, MosaicModel

    student = MosaicModel([3, 2], fast=False, task_experts=["A", "C"], **MOSAIC_SMALL)
    student.freeze_backbone(verbose=False)
    teacher = EMATeacher(student, momentum)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    return student, teacher, before


def _ema_expected(student, before, momenta):
    """``m p_t + (1 − m) p_s`` per trainable parameter; ``momenta(name)`` gives m, or None: unchanged."""
    out = {}
    for name, p in student.named_parameters():
        m = momenta(name) if p.requires_grad else None
        out[name] = before[name] if m is None else m * before[name] + (1 - m) * p.detach()
    return out


def _spec(name):
    for e in "abc":
        if f".expert_{e}." in name:
            return e.upper()
    return None


@pytest.mark.parametrize("active, shared", [("C", 0.95), (["A", "C"], 0.95), (["A", "B"], 0.9)])
def test_ema_shared_parameters_use_the_largest_active_momentum(active, shared):
    """Heads and the 3D tokenizer (shared) move with the largest momentum of the step's specialists (C: 0.95),
    each active specialist with its own, inactive specialists not at all (models/ema.py docstring)."""
    student, teacher, before = _ema_pair()
    teacher.update(student, active)
    own = {"A": 0.9, "B": 0.9, "C": 0.95}
    act = {active} if isinstance(active, str) else set(active)
    want = _ema_expected(student, before,
                         lambda n: shared if _spec(n) is None else (own[_spec(n)] if _spec(n) in act else None))
    got = teacher.state_dict()
    assert any(_spec(n) is None and p.requires_grad for n, p in student.named_parameters())
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-6, msg=name)


def test_ema_momentum_given_to_update_overrides_the_constructors():
    """The trainer passes --ema-momentum / --ema-momentum-3d to every update(): they win over the defaults,
    and a constructor momentum replaces DEFAULT_MOMENTUM."""
    student, teacher, before = _ema_pair()
    teacher.update(student, "C", {"A": 0.5, "B": 0.5, "C": 0.6})
    want = _ema_expected(student, before, lambda n: None if _spec(n) in ("A", "B") else 0.6)
    for name, value in want.items():
        torch.testing.assert_close(teacher.state_dict()[name], value, rtol=1e-6, atol=1e-6, msg=name)
    student, teacher, before = _ema_pair({"A": 0.7, "B": 0.8, "C": 0.75})
    teacher.update(student, "B")
    want = _ema_expected(student, before, lambda n: {None: 0.8, "B": 0.8}.get(_spec(n)))
    for name, value in want.items():
        torch.testing.assert_close(teacher.state_dict()[name], value, rtol=1e-6, atol=1e-6, msg=name)


def test_ema_momentum_bounds_are_inclusive():
    """m = 1 (a fixed teacher) and m = 0 (teacher = student) are valid; outside [0, 1] is refused."""
    from mosaic_fast.models import EMATeacher

    student, teacher, before = _ema_pair({"A": 0.0, "B": 1.0, "C": 1.0})
    teacher.update(student, "B")
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    teacher.update(student, "A")
    want = _ema_expected(student, before, lambda n: {None: 0.0, "A": 0.0}.get(_spec(n)))
    for name, value in want.items():
        torch.testing.assert_close(teacher.state_dict()[name], value, msg=name)
    with pytest.raises(ValueError, match="momentum"):
        EMATeacher(student, {"A": 0.9, "B": 1.5, "C": 0.9})


def test_atomic_save_syncs_the_whole_file_before_the_rename(tmp_path, monkeypatch):
    """save_atomic: write a temp file, flush and fsync ALL its bytes, then rename it over the target (a crash
    before the rename leaves the old checkpoint; after it, a complete one)."""
    import os

    from mosaic_fast.engine import checkpoint as ckpt_io

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_size))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.getsize(src), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "new" / "deeper" / "last.pt"  # folders are created
    state = {"student_state_dict": {"w": torch.randn(3000)}, "teacher_state_dict": {}}
    ckpt_io.save_atomic(state, path)
    size = path.stat().st_size
    assert events == [("fsync", size), ("replace", size, os.fspath(path))]
    assert torch.equal(ckpt_io.load(path)["student_state_dict"]["w"], state["student_state_dict"]["w"])
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("missing", ["student_state_dict", "teacher_state_dict"])
def test_checkpoint_missing_one_required_key_is_refused(tmp_path, missing):
    from mosaic_fast.engine import checkpoint as ckpt_io

    ckpt = {"student_state_dict": {}, "teacher_state_dict": {}, "config": {}}
    del ckpt[missing]
    torch.save(ckpt, tmp_path / "half.pt")
    with pytest.raises(ValueError, match=missing):
        ckpt_io.load(tmp_path / "half.pt")


def test_rng_state_round_trip_restores_every_generator():
    """An exact resume restores python's, numpy's and torch's generators (the next draws repeat)."""
    import random

    from mosaic_fast.engine import checkpoint as ckpt_io

    def draw():
        return (random.random(), np.random.rand(), torch.rand(3).tolist())  # noqa: NPY002

    state = ckpt_io.rng_state()
    first = draw()
    draw()
    ckpt_io.set_rng_state(state)
    assert draw() == first


def test_ema_update_unwraps_a_ddp_style_wrapper():
    """update() accepts the student wrapped as DistributedDataParallel does (``.module``, names prefixed
    "module."), giving the same teacher as the bare student; the teacher's parameters are frozen."""
    student, teacher, before = _ema_pair()

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    teacher.update(Wrapper(student), "A")
    want = _ema_expected(student, before, lambda n: {None: 0.9, "A": 0.9}.get(_spec(n)))
    for name, value in want.items():
        torch.testing.assert_close(teacher.state_dict()[name], value, rtol=1e-6, atol=1e-6, msg=name)
    assert not any(p.requires_grad for p in teacher.model.parameters())


class _Probe(torch.nn.Module):
    """A model whose logits are a fixed function of the input; records the (task_id, expert_id) it is asked for."""

    def __init__(self, poison=None):
        super().__init__()
        self.calls, self.poison = [], poison

    @staticmethod
    def logits(x, classes):
        flat = x.reshape(x.shape[0], -1).float()
        return torch.stack([flat[:, c::7].mean(1) for c in range(classes)], 1) * 50

    def forward(self, x, task_id=0, return_features=False, expert_id=None):
        from mosaic_fast.data.registry import NUM_CLASSES

        self.calls.append((task_id, expert_id))
        out = self.logits(x, NUM_CLASSES[task_id])
        if self.poison is not None:
            out[0, 0] = self.poison
        return None, out


def _eval_data(tmp_path):
    from mosaic_fast.data import MedMNISTSplit, MultiSource
    from mosaic_fast.data.synthetic import write_synthetic_npz

    names = ("RetinaMNIST", "AdrenalMNIST3D")  # ordinal 2D (A), binary 3D (C)
    for i, name in enumerate(names):
        write_synthetic_npz(tmp_path, name, 28, (4, 21, 4), seed=int(torch.randint(0, 1000, ())) + i)
    return MultiSource([MedMNISTSplit(n, "val", tmp_path, 28) for n in names])


@pytest.mark.parametrize("mode", ["medmnist", "mosaic"])
def test_evaluate_scores_every_sample_with_its_head_specialist_and_metric_mode(tmp_path, mode):
    """evaluate(): every sample once, each dataset through its own head and specialist, ACC by the chosen
    definition (ordinal: exact argmax vs |pred − y| ≤ 1), means overall and per 2D/3D."""
    from mosaic_fast.data import head_index
    from mosaic_fast.engine.distributed import DistInfo
    from mosaic_fast.engine.evaluator import evaluate

    data = _eval_data(tmp_path)
    model = _Probe().train()
    res = evaluate(model, data, batch_size=4, info=DistInfo(), mode=mode)
    assert model.training  # evaluation puts the model back in the mode it found it in
    assert set(model.calls) == {(head_index("RetinaMNIST"), "A"), (head_index("AdrenalMNIST3D"), "C")}
    accs = {}
    for ds in data.sources:
        x = torch.stack([ds.clean(i) for i in range(len(ds))])
        pred = _Probe.logits(x, 5 if ds.spec.name == "RetinaMNIST" else 2).argmax(1)
        y = ds.labels[:, 0]
        hit = (pred - y).abs() <= 1 if mode == "mosaic" and ds.spec.name == "RetinaMNIST" else pred == y
        accs[ds.spec.name] = hit.double().mean().item()
        assert res[ds.spec.name]["acc"] == pytest.approx(accs[ds.spec.name])
    assert 0 < accs["RetinaMNIST"] < 1, accs  # a score that a wrong head, order or mode would change
    assert res["mean_acc"] == pytest.approx((accs["RetinaMNIST"] + accs["AdrenalMNIST3D"]) / 2)
    assert res["mean_acc_2d"] == pytest.approx(accs["RetinaMNIST"])
    assert res["mean_acc_3d"] == pytest.approx(accs["AdrenalMNIST3D"])


@pytest.mark.parametrize("poison", [math.inf, -math.inf, math.nan])
def test_evaluate_refuses_any_non_finite_logit(tmp_path, poison):
    from mosaic_fast.engine.distributed import DistInfo
    from mosaic_fast.engine.evaluator import NonFiniteOutputError, evaluate

    with pytest.raises(NonFiniteOutputError, match="non-finite"):
        evaluate(_Probe(poison), _eval_data(tmp_path), batch_size=8, info=DistInfo())


def _mosaic_formula(model, x, experts, task_id, scalar):
    """MosaicModel written out from DESIGN.md §3: Conv2d patches (row-major) + LayerNorm, CLS first, pos_embed_2d,
    parallel-adapter blocks (x + attn(LN1 x); h = LN2 x; x + mlp(h) + s·up(relu(down(LN_a h)))) with each
    sample's specialist, final LayerNorm, CLS feature, head ``task_id``. ``experts``: one letter per sample."""
    pe = model.patch_embed.patch_embed_2d
    b, _, size, _ = x.shape
    p = pe.proj.weight.shape[-1]
    g = size // p
    patches = x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
    tok = _layer_norm(patches @ pe.proj.weight.reshape(pe.proj.weight.shape[0], -1).T + pe.proj.bias,
                      pe.norm.weight, pe.norm.bias, 1e-5)
    h = torch.cat([model.cls_token.expand(b, 1, -1), tok], 1) + model.pos_embed_2d
    for blk in model.encoder.blocks:
        h = h + _attention(_layer_norm(h, blk.norm1.weight, blk.norm1.bias, 1e-5), blk.attn.qkv, blk.attn.proj,
                           blk.attn.num_heads)
        z = _layer_norm(h, blk.norm2.weight, blk.norm2.bias, 1e-5)
        mlp = _gelu(z @ blk.ffn.fc1.weight.T + blk.ffn.fc1.bias) @ blk.ffn.fc2.weight.T + blk.ffn.fc2.bias
        ada = []
        for i, e in enumerate(experts):
            a = getattr(blk.adapter, f"expert_{e.lower()}")
            u = _layer_norm(z[i], a.layer_norm.weight, a.layer_norm.bias, 1e-5)
            ada.append(scalar * (torch.relu(u @ a.down_proj.weight.T + a.down_proj.bias) @ a.up_proj.weight.T
                                 + a.up_proj.bias))
        h = h + mlp + torch.stack(ada)
    feats = _layer_norm(h[:, 0], model.encoder.norm.weight, model.encoder.norm.bias, 1e-5)
    return feats, feats @ model.heads[task_id].weight.T + model.heads[task_id].bias


@pytest.mark.parametrize("fast", [False, True])
def test_mosaic_model_equals_design_formula_with_explicit_expert_and_scalar(fast):
    """The CLS (first token) feature after the final norm, the adapter scale passed to the constructor, and an
    explicit ``expert_id`` (a string or per-sample ids) winning over the head's default specialist."""
    from mosaic_fast.models import MosaicModel

    scalar = 0.37
    kw = dict(MOSAIC_SMALL, depth=2)
    model = _randomize(MosaicModel([3, 2], fast=False, task_experts=["A", "C"], adapter_scalar=scalar, **kw),
                       seed=int(torch.randint(0, 2**31, ()))).double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    cases = [("B", "BBB", 0), (torch.tensor([2, 0, 1]), "CAB", 1), (None, "AAA", 0)]
    if fast:
        fast_model = MosaicModel([3, 2], fast=True, task_experts=["A", "C"], adapter_scalar=scalar, **kw).eval()
        fast_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        for expert_id, letters, task in cases:
            want_f, want_l = _mosaic_formula(model, x, letters, task, scalar)
            if fast:
                got_f, got_l = fast_model(x.float(), task, expert_id=expert_id)
                torch.testing.assert_close(got_l.double(), want_l, rtol=1e-4, atol=1e-4)
            else:
                got_f, got_l = model(x, task, expert_id=expert_id)
                torch.testing.assert_close(got_l, want_l, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(got_f.double(), want_f, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ratio, n", [(0.07, 100), (0.14, 50), (0.28, 25), (0.17, 300), (0.3, 10), (0.5, 7)])
def test_num_kept_is_the_exact_ceiling_of_rho_n(ratio, n):
    """k = ⌈ρN⌉ of the decimal ρ the user wrote: 0.07·100 is 7.000000000000001 in floating point, k is 7."""
    from fractions import Fraction

    from mosaic_fast.reference import SkipRouter
    from mosaic_fast.reference.moe import num_kept

    want = math.ceil(Fraction(str(ratio)) * n)
    assert num_kept(ratio, n) == want
    router = SkipRouter(8, ratio)
    idx, _ = router.select(torch.randn(2, n, 8))
    assert idx.shape == (2, want)


def test_tied_router_scores_keep_cls_and_the_lowest_token_indices_at_vit_length():
    """A router whose scores all tie (fc2 zero, as a zero-initialised router) keeps CLS and tokens 1..k−1,
    also at ViT sequence lengths (197), where an unstable sort would pick other tied tokens."""
    from mosaic_fast.reference import SkipRouter
    from mosaic_fast.reference.moe import top_k_lowest_index_first

    router = SkipRouter(8, 0.3)
    with torch.no_grad():
        router.fc2.weight.zero_()
    idx, gate = router.select(torch.randn(2, 197, 8))
    k = 60  # ⌈0.3 · 197⌉ = ⌈59.1⌉
    assert idx.tolist() == [list(range(k))] * 2
    torch.testing.assert_close(gate, torch.sigmoid(router.fc2.bias).expand(2, k))
    values, index = top_k_lowest_index_first(torch.zeros(3, 500), 7)
    assert index.tolist() == [list(range(7))] * 3 and values.abs().sum() == 0


def test_result_table_and_csv_report_percentages_marks_and_both_means(tmp_path):
    """format_table prints ACC/AUC in % per model, marks untrained heads and says the mean covers the trained
    ones; save_table's CSV has one row per dataset and a mean row with mean ACC and mean AUC."""
    import csv
    import json

    from mosaic_fast.engine.evaluator import format_table, save_table

    names = ["BreastMNIST", "ChestMNIST"]
    vals = torch.rand(2, 6).double().tolist()
    results = {m: {"BreastMNIST": {"acc": v[0], "auc": v[1]}, "ChestMNIST": {"acc": v[2], "auc": v[3]},
                   "mean_acc": v[4], "mean_auc": v[5]} for m, v in zip(("student", "teacher"), vals)}
    table = format_table(results, names, "test", untrained=["ChestMNIST"])
    lines = table.splitlines()
    assert lines[0] == "test"
    row = next(line for line in lines if line.startswith("BreastMNIST"))
    assert row.split()[1:] == [f"{100 * vals[0][0]:.2f}", f"{100 * vals[0][1]:.2f}",
                               f"{100 * vals[1][0]:.2f}", f"{100 * vals[1][1]:.2f}"]
    assert any(line.startswith("ChestMNIST *") for line in lines)
    mean = next(line for line in lines if line.startswith("mean"))
    assert mean.startswith("mean (trained)") and mean.split()[2:] == [
        f"{100 * vals[0][4]:.2f}", f"{100 * vals[0][5]:.2f}", f"{100 * vals[1][4]:.2f}", f"{100 * vals[1][5]:.2f}"]
    save_table(results, names, tmp_path / "out", "res")
    with open(tmp_path / "out" / "res.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["model", "dataset", "acc", "auc"]
    want = []
    for m, v in zip(("student", "teacher"), vals):
        want += [[m, "BreastMNIST", v[0], v[1]], [m, "ChestMNIST", v[2], v[3]], [m, "mean", v[4], v[5]]]
    assert [[r[0], r[1], float(r[2]), float(r[3])] for r in rows[1:]] == want
    assert json.loads((tmp_path / "out" / "res.json").read_text()) == results


def test_gated_mixture_from_a_mos_adapter_keeps_its_adapter_scale():
    """Experts initialised from a trained MOSAIC MoSAdapter built with adapter_scalar s compute
    s·up(relu(down(LN_a h))); with the zero-initialised gate the mixture is their mean (softmax of equal scores)."""
    from mosaic_fast.reference import GatedSpecialistAdapter, MoSAdapter

    mos = _randomize(MoSAdapter(16, 4, 6, 8, adapter_scalar=0.25), seed=int(torch.randint(0, 2**31, ()))).double()
    h = torch.randn(2, 5, 16, dtype=torch.float64)
    outs = []
    for e in (mos.expert_a, mos.expert_b, mos.expert_c):
        u = _layer_norm(h, e.layer_norm.weight, e.layer_norm.bias, 1e-5)
        outs.append(0.25 * (torch.relu(u @ e.down_proj.weight.T + e.down_proj.bias) @ e.up_proj.weight.T
                            + e.up_proj.bias))
    want = sum(outs) / 3
    with torch.no_grad():
        torch.testing.assert_close(GatedSpecialistAdapter.from_mos_adapter(mos)(h), want)
        mixed = GatedSpecialistAdapter(16, (4, 6, 8)).double()
        mixed.load_specialists(mos)
        torch.testing.assert_close(mixed(h), want)


def test_fresh_gated_moe_adapter_nearly_keeps_the_backbone_tokens():
    """At init (zero up-projections, gate weight 0, gate bias −4) x̂ = σ(−4)·0 + (1 − σ(−4))·x for both streams."""
    from mosaic_fast.reference import GatedMoEAdapter

    adapter = GatedMoEAdapter(16, 4, 2, 8, gate_dim=4).double()
    xg, xm = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    keep = 1 - 1 / (1 + math.exp(4.0))
    with torch.no_grad():
        hat_g, hat_m = adapter(xg, xm)
    torch.testing.assert_close(hat_g, keep * xg)
    torch.testing.assert_close(hat_m, keep * xm)


def test_default_heads_route_to_the_seeds_specialists():
    """The 18 heads in the seed's order (Path, Derma, OCT, Pneumonia, Chest, Breast, Blood, Tissue, Retina,
    OrganA/C/S, then the six 3D sets) route to A = Path, Blood, Tissue, Derma, Retina; B = the other 2D; C = 3D."""
    from mosaic_fast.data.registry import NUM_CLASSES
    from mosaic_fast.models import MosaicModel

    model = MosaicModel(NUM_CLASSES, fast=False, **MOSAIC_SMALL)
    assert [model.resolve_expert(t, None) for t in range(18)] == list("AABBBBAAABBBCCCCCC")


def test_new_parameters_start_random_and_heads_start_unbiased():
    """CLS, pos_embed_2d and the new pos_embed_3d are drawn from N(0, 0.02²) (the 3D table is new and randomly
    initialised, DESIGN.md §3), head weights too, head biases are zero."""
    from mosaic_fast.models import MosaicModel

    model = MosaicModel([3, 2], fast=False, task_experts=["A", "C"], **dict(MOSAIC_SMALL, embed_dim=64))
    model.requires_grad_(False)
    for name in ("pos_embed_2d", "pos_embed_3d", "heads.0.weight", "heads.1.weight"):
        p = model.get_parameter(name)
        assert 0.014 < float(p.std()) < 0.026, name
    assert 0 < float(model.cls_token.abs().max()) < 0.1
    assert all(float(h.bias.abs().max()) == 0 for h in model.heads)


def test_predict_puts_the_ranks_strided_shares_back_in_file_order(tmp_path, monkeypatch):
    """With 2 ranks, rank r scores samples r, r + 2, ...; the gathered logits come back in file order (the other
    rank's share is simulated by patching the all-gather)."""
    from mosaic_fast.engine import evaluator
    from mosaic_fast.engine.distributed import DistInfo

    data = _eval_data(tmp_path)
    ds = data.sources[0]
    every = _Probe.logits(torch.stack([ds.clean(i) for i in range(len(ds))]), 5).numpy()
    other = np.arange(1, len(ds), 2)
    monkeypatch.setattr(evaluator, "all_gather_objects", lambda local, info: [local, (other, every[other])])
    got = evaluator.predict(_Probe(), data, 0, batch_size=4, info=DistInfo(rank=0, world_size=2))
    np.testing.assert_allclose(got, every, rtol=1e-6, atol=1e-6)
