"""The trainer against the seed's training semantics (BurkeBelle/MOSAIC-MedMNIST engine/trainer.py, train.py,
utils/logger.py, model/unified_model.py), and resume corner cases.

The seed's step is written out here from its description: task loss (CrossEntropy on the class index;
BCEWithLogits on the float label rows of a multi-label set, both averaged), plus 0.1 · MSE(student CLS
feature, teacher CLS feature of the clean view); zero_grad, backward, clip the gradient norm of all
parameters to 1.0, AdamW(lr, weight_decay 0.01) over all parameters; then every teacher parameter except
the adapters of the specialists not in use moves as ``p_t = m p_t + (1 - m) p_s`` with m = 0.95 for the
volumetric specialist's datasets and 0.9 otherwise.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from test_train import TINY
from torch import nn

from mosaic_fast.data import MedMNISTSplit, MultiSource
from mosaic_fast.data.datasets import collate
from mosaic_fast.data.registry import NUM_CLASSES
from mosaic_fast.data.synthetic import write_synthetic_npz
from mosaic_fast.engine import checkpoint as ckpt_io
from mosaic_fast.engine.commands import _seed_everything
from mosaic_fast.engine.distributed import DistInfo
from mosaic_fast.engine.trainer import Trainer, TrainSettings
from mosaic_fast.models import EMATeacher, MosaicModel

NAMES = ("BreastMNIST", "ChestMNIST", "RetinaMNIST", "AdrenalMNIST3D")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Training sets of different sizes (64 / 16 / 16 / 32), so per-dataset step counts differ."""
    root = tmp_path_factory.mktemp("seed_semantics")
    for i, (name, n_train) in enumerate(zip(NAMES, (64, 16, 16, 32))):
        write_synthetic_npz(root, name, 28, (n_train, 16, 16), seed=i)
    return root


def _data(root: Path, split: str) -> MultiSource:
    return MultiSource([MedMNISTSplit(n, split, root, 28) for n in NAMES])


def _trainer(root: Path, out: Path, student: MosaicModel | None = None, **overrides) -> Trainer:
    if student is None:
        torch.manual_seed(0)
        student = MosaicModel(NUM_CLASSES, **TINY, fast=False)
    settings = TrainSettings(**{"num_rounds": 2, "batch_size": 16, "lr": 3e-3, "warmup_rounds": 0,
                                "progress": False, "eval_batch_size": 32, "config": {"model": TINY}, **overrides})
    return Trainer(student, EMATeacher(student), _data(root, "train"), _data(root, "val"), _data(root, "test"),
                   settings, DistInfo(), out)


@pytest.mark.parametrize("freeze", [False, True], ids=["all-trainable", "frozen-backbone"])
def test_one_step_per_dataset_matches_the_seeds_update(root, tmp_path, freeze):
    """Losses, student and EMA teacher after one step on each dataset (CE, BCE for ChestMNIST, ordinal CE,
    3D) equal the seed's update; the EMA moves every head (also of the other datasets), never the
    specialists not in use; the frozen backbone is left as it was."""
    torch.manual_seed(0)
    student = MosaicModel(NUM_CLASSES, **TINY, fast=False)
    if freeze:
        student.freeze_backbone(freeze_3d_tokenizer=True, verbose=False)  # the seed code's trainable set
    trainer = _trainer(root, tmp_path, student, lr=3e-3)
    teacher = trainer.teacher.model
    with torch.no_grad():  # a teacher apart from the student, so that the EMA's direction shows
        for p_t, p_s in zip(teacher.parameters(), student.parameters()):
            if p_s.requires_grad:
                p_t.add_(0.01 * torch.randn_like(p_t))
    seed_student, seed_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    seed_opt = torch.optim.AdamW(seed_student.parameters(), lr=3e-3, weight_decay=0.01)
    first = {}
    for batch_keys in trainer._round_batches(0):
        first.setdefault(batch_keys[0][0], batch_keys)
    assert sorted(first) == [0, 1, 2, 3]
    for src, keys in sorted(first.items()):
        batch = collate([trainer.train_data[k] for k in keys])
        expert, head = trainer.experts[src], trainer.heads[src]
        ours = trainer.train_step(batch, {expert}, [NAMES[src]])

        part = batch.parts[0]
        seed_student.train()
        seed_teacher.eval()
        feat_s, logits = seed_student(part.x, task_id=head, expert_id=expert)
        with torch.no_grad():
            feat_t = seed_teacher(part.x_clean, task_id=head, return_features=True, expert_id=expert)
        if trainer.multi_label[src]:
            l_cls = nn.BCEWithLogitsLoss()(logits, part.labels[:, : trainer.widths[src]].float())
        else:
            l_cls = nn.CrossEntropyLoss()(logits, part.labels[:, 0])
        l_con = nn.MSELoss()(feat_s, feat_t)
        loss = l_cls + 0.1 * l_con
        seed_opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(seed_student.parameters(), 1.0)
        seed_opt.step()
        m = 0.95 if expert == "C" else 0.9
        with torch.no_grad():
            for (name, p_t), p_s in zip(seed_teacher.named_parameters(), seed_student.parameters()):
                if any(f"expert_{e.lower()}" in name and e != expert for e in "ABC"):
                    continue
                p_t.mul_(m).add_((1 - m) * p_s)

        for key, value in (("loss", loss), ("loss_cls", l_cls), ("loss_consist", l_con)):
            assert ours[key] == pytest.approx(value.item(), rel=1e-5, abs=1e-7), (NAMES[src], key)
        for what, a, b in (("student", student, seed_student), ("teacher", teacher, seed_teacher)):
            for (name, p), q in zip(a.named_parameters(), b.parameters()):
                # fused vs per-tensor AdamW and lerp vs mul/add round differently; the seed's EMA also
                # rewrites the frozen weights with themselves (m·p + (1 - m)·p, off by an ulp at times)
                if name.endswith("attn.qkv.bias"):  # the key bias's gradient is 0 up to rounding noise,
                    d = TINY["embed_dim"]  # which Adam's first steps scale up to ±lr: not comparable
                    p, q = torch.cat([p[:d], p[2 * d :]]), torch.cat([q[:d], q[2 * d :]])
                assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), (NAMES[src], what, name)


def test_round_records_follow_the_seed_and_best_pt_loads_as_the_seeds_test_py_does(root, tmp_path):
    """``train_loss["mean"]`` is the unweighted mean over datasets of their mean step loss (the seed's
    ``losses["mean"]``), not a step-weighted mean (BreastMNIST has 4 steps a round, the others 1 or 2);
    ``avg_forgetting`` is the seed logger's; best.pt loads with ``weights_only=True`` (torch.load's
    default since 2.6, as the seed's test.py calls it) and strictly into a fresh model."""
    trainer = _trainer(root, tmp_path, num_rounds=2)
    steps = {}
    record = trainer._record

    def counting(names, losses):
        steps.setdefault(trainer.round, {}).setdefault(names[0], []).append(losses)
        record(names, losses)

    trainer._record = counting
    trainer.fit()
    history = json.loads((tmp_path / "history.json").read_text())
    for r, entry in enumerate(history):
        per = {n: sum(s["loss"] for s in v) / len(v) for n, v in steps[r].items()}
        assert [len(steps[r][n]) for n in NAMES] == [4, 1, 1, 2]
        assert entry["train_loss"] == pytest.approx({**per, "mean": sum(per.values()) / len(per)})
        cls = {n: sum(s["loss_cls"] for s in v) / len(v) for n, v in steps[r].items()}
        assert entry["train_loss_cls"] == pytest.approx(sum(cls.values()) / len(cls))
        accs = [[e["val"]["student"][n]["acc"] for e in history[: r + 1]] for n in NAMES]
        expected = sum(max(0.0, max(a[:-1], default=a[-1]) - a[-1]) for a in accs) / len(NAMES)
        assert entry["avg_forgetting"] == pytest.approx(expected)
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[1]["avg_forgetting"]) == pytest.approx(history[1]["avg_forgetting"])

    best = torch.load(tmp_path / "best.pt", weights_only=True)
    for key in ("student_state_dict", "teacher_state_dict"):
        MosaicModel(NUM_CLASSES, **TINY, fast=False).load_state_dict(best[key], strict=True)
    assert 0 <= best["round"] < 2 and 0.0 <= best["best_acc"] <= 1.0


def test_resuming_an_early_stopped_run_trains_no_further(root, tmp_path):
    """The seed stops after ``patience`` rounds without improvement; resuming that run's last.pt with the
    same options gives the same final state (the test of the best model), not more rounds."""
    kw = dict(num_rounds=4, lr=1e-30, early_stopping_patience=1, early_stopping_min_delta=0.0)
    done = _trainer(root, tmp_path, **kw)
    done.fit()
    assert len(done.history) < 4, "the run must stop early for this test"
    final = ckpt_io.load(tmp_path / "last.pt")
    resumed = _trainer(root, tmp_path, **kw)
    resumed.resume(tmp_path / "last.pt")
    assert resumed.fit() is not None  # the final test runs
    assert resumed.global_step == done.global_step and len(resumed.history) == len(done.history)
    assert ckpt_io.load(tmp_path / "last.pt")["progress"] == final["progress"]
    patient = _trainer(root, tmp_path, **{**kw, "early_stopping_patience": 10})  # more patience: trains on
    patient.resume(tmp_path / "last.pt")
    patient.fit()
    assert patient.global_step > done.global_step


def test_resume_at_max_steps_takes_no_step(root, tmp_path):
    _trainer(root, tmp_path, max_steps=2).fit()
    again = _trainer(root, tmp_path, max_steps=2)
    again.resume(tmp_path / "last.pt")
    before = copy.deepcopy(again.student.state_dict())
    assert again.fit() is None
    assert again.global_step == 2
    assert all(torch.equal(v, again.student.state_dict()[k]) for k, v in before.items())


def test_mid_round_resume_with_another_batch_plan_is_refused(root, tmp_path):
    """A checkpoint from inside a round continues that round's batch plan; options that change the plan
    (here the batch size) would skip or repeat samples, so they are refused with a message."""
    _trainer(root, tmp_path, max_steps=2).fit()
    with pytest.raises(ValueError, match=r"step 2 of round 1.*another batch plan.*--batch_size"):
        _trainer(root, tmp_path, batch_size=8).resume(tmp_path / "last.pt")
    with pytest.raises(ValueError, match="another batch plan"):
        _trainer(root, tmp_path, seed=7).resume(tmp_path / "last.pt")
    _trainer(root, tmp_path).resume(tmp_path / "last.pt")  # the same options resume


def test_seeding_makes_cudnn_deterministic_as_the_seed():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
        _seed_everything(0)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def test_round_losses_and_forgetting_by_hand(root, tmp_path):
    """Direct checks of the round records: with mixed batches every step (even one drawing a single
    dataset) counts under "mixed"; cyclic steps count per dataset and "mean" is their unweighted mean;
    ``avg_forgetting`` is the drop below the *best* earlier ACC, never negative."""
    losses = [dict(loss=1.0, loss_cls=0.5, loss_consist=5.0), dict(loss=3.0, loss_cls=1.5, loss_consist=15.0)]
    mixed = _trainer(root, tmp_path / "mixed", mixed_batches=True)
    mixed._record(["BreastMNIST"], losses[0])
    mixed._record(["BreastMNIST", "ChestMNIST"], losses[1])
    assert mixed.round_losses() == {"train_loss": {"mixed": 2.0, "mean": 2.0}, "train_loss_cls": 1.0,
                                    "train_loss_consist": 10.0}
    cyclic = _trainer(root, tmp_path / "cyclic")
    for names, step in ((["BreastMNIST"], losses[0]), (["BreastMNIST"], losses[0]), (["ChestMNIST"], losses[1])):
        cyclic._record(names, step)
    assert cyclic.round_losses() == {"train_loss": {"BreastMNIST": 1.0, "ChestMNIST": 3.0, "mean": 2.0},
                                     "train_loss_cls": 1.0, "train_loss_consist": 10.0}

    def val(*accs):
        return {"student": {n: {"acc": a} for n, a in zip(NAMES, accs)}}

    assert cyclic._forgetting(val(0.5, 0.5, 0.5, 0.5)) == 0.0  # no earlier round
    cyclic.history = [{"val": val(0.6, 0.2, 0.5, 0.5)}, {"val": val(0.4, 0.3, 0.5, 0.5)}]
    # BreastMNIST: best 0.6, now 0.5 → 0.1; ChestMNIST improves (0.9 > 0.3) → 0, not negative
    assert cyclic._forgetting(val(0.5, 0.9, 0.5, 0.5)) == pytest.approx(0.1 / 4)
