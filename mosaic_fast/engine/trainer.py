"""The cyclic MOSAIC trainer (DESIGN.md §3): student + EMA teacher, consistency loss, rounds over datasets.

One step: the student sees the augmented view, the teacher (no gradient) the clean view; loss = task loss
(CE, or BCE-with-logits for multi-label, averaged over samples) + ``consist_weight`` · MSE(student CLS
feature, teacher CLS feature); AdamW step with gradient clipping; then the EMA teacher moves towards the
student for the specialists active in the batch. The learning rate follows a linear warm-up (0.01 → 1)
and a cosine to ``min_lr``, stepped once per round. After each round both models are validated; early
stopping watches the student's mean validation ACC (of the ``metrics`` mode: medmnist's, or the seed's
with ``"mosaic"``), and the best student + teacher are kept. As in the seed, a round's ``train_loss["mean"]``
is the mean over its datasets of each dataset's mean step loss (not weighted by their step counts), and
``avg_forgetting`` is the mean over datasets of the student's drop in validation ACC below its best in
earlier rounds.

DDP: the student runs inside :class:`StudentStep` wrapped by ``DistributedDataParallel`` with
``find_unused_parameters=True``, because a batch only uses its specialists, its heads and one tokenizer.
Each rank takes its slice of the global batch, so gradients average over the global batch. Only rank 0
prints, shows progress bars and writes files.

Exact resume: batch plans and augmentations are functions of (seed, round, position), and ``last.pt``
records the round, the step inside it, optimizer / scheduler / scaler / RNG state and the running
losses; a resumed run takes the same next batch and ends with the same parameters. A run that had already
stopped early (or reached ``max_steps``) is not trained further on resume; a checkpoint taken inside a round
resumes only when the options give the same batch plan for that round (checked against a digest).
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..cliutil import plural
from ..data.datasets import Batch, MultiSource, collate
from ..data.registry import EXPERT_INDEX, EXPERT_ROUTING
from ..data.sampling import round_plan, shard_batch
from ..models.ema import EMATeacher, expert_of_parameter
from ..reference.adapter import EXPERT_NAMES
from . import checkpoint as ckpt_io
from .distributed import DistInfo, barrier, mean_across_ranks
from .evaluator import NonFiniteOutputError, autocast, evaluate, format_table, save_table
from .history import write_history


def build_adamw(params: Sequence[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, torch's fused implementation where the parameters live on CPU or CUDA: one kernel per step
    instead of several per tensor (a host-bound cost in a MOSAIC step: ~3.6x faster on CPU for 234
    adapter tensors). Same update rule and state_dict as the default implementation."""
    fused = {p.device.type for p in params} <= {"cpu", "cuda"}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def specialist_parameters(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """The trainable parameters of each specialist ('A'/'B'/'C') of ``model``."""
    return {e: [p for n, p in model.named_parameters() if p.requires_grad and expert_of_parameter(n) == e]
            for e in EXPERT_NAMES}


def drop_absent_specialist_grads(specialist_params: dict[str, list[torch.Tensor]], active: set[str]) -> None:
    """``.grad = None`` for the specialists without samples in the batch, as the reference model leaves
    them: the fast adapter on CUDA runs every specialist of a mixed batch and gives the absent ones zero
    gradients, which AdamW's weight decay and momentum would still act on."""
    for expert, params in specialist_params.items():
        if expert not in active:
            for p in params:
                p.grad = None


def plan_digest(batches: Sequence[Sequence[tuple[int, int, int]]]) -> str:
    """SHA-256 of a round's batch plan (keys and batch boundaries), to check that a resumed run would
    continue the same plan."""
    h = hashlib.sha256()
    for b in batches:
        h.update(np.asarray(b, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without writing a checkpoint of that state."""


class RoundSchedule:
    """Learning-rate factor per round: the seed's LinearLR(0.01 → 1, ``warmup`` rounds) then cosine to
    ``min_lr`` over the remaining rounds (closed form, so the scheduler state is just the round)."""

    def __init__(self, num_rounds: int, warmup: int, base_lr: float, min_lr: float) -> None:
        if not 0 <= warmup < num_rounds:
            raise ValueError(f"warmup rounds must be in [0, num_rounds={num_rounds}), got {warmup}")
        self.num_rounds, self.warmup, self.base_lr, self.min_lr = num_rounds, warmup, base_lr, min_lr

    def __call__(self, r: int) -> float:
        """The factor on ``base_lr`` for round ``r``, as ``LambdaLR`` takes it."""
        if r < self.warmup:
            return 0.01 + 0.99 * r / self.warmup
        t = min(r - self.warmup, self.num_rounds - self.warmup) / max(self.num_rounds - self.warmup, 1)
        lr = self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
        return lr / self.base_lr


@dataclass
class TrainSettings:
    """Hyper-parameters of :class:`Trainer` (the CLI fills them from its options)."""

    num_rounds: int = 50
    batch_size: int = 32  # per process
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_rounds: int = 5
    min_lr: float = 1e-6
    consist_weight: float = 0.1
    ema_momentum: float = 0.9
    ema_momentum_3d: float = 0.95
    max_grad_norm: float = 1.0
    early_stopping_patience: int = 5
    early_stopping_min_delta: float = 1e-3
    seed: int = 42
    samples_per_round: int | None = None
    mixed_batches: bool = False
    metrics: str = "medmnist"
    eval_batch_size: int = 128
    num_workers: int = 0
    amp_dtype: torch.dtype | None = None
    checkpoint_every: int = 0
    max_steps: int | None = None
    progress: bool = True
    config: dict = field(default_factory=dict)  # recorded in checkpoints (model / data settings)


class StudentStep(nn.Module):
    """Student forward + summed task loss of a (possibly mixed) batch, as one module call for DDP.

    ``forward(parts)`` takes per modality ``(x, expert, labels, groups)``: ``expert`` a letter or a
    (B,) LongTensor, ``groups`` a list of ``(head, multi_label, width, positions)``. Returns the sum of
    per-sample task losses and the CLS features of each part.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, parts: list) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Summed per-sample task loss over all parts and the CLS features of each part."""
        total = None
        features = []
        for x, expert, labels, groups in parts:
            feats = self.model.forward_features(x, expert)
            features.append(feats)
            for head, multi_label, width, pos in groups:
                f, y = (feats, labels) if pos is None else (feats[pos], labels[pos])
                logits = self.model.heads[head](f).float()
                if multi_label:
                    loss = F.binary_cross_entropy_with_logits(logits, y[:, :width].float(), reduction="none")
                    loss = loss.mean(dim=1).sum()
                else:
                    loss = F.cross_entropy(logits, y[:, 0], reduction="sum")
                total = loss if total is None else total + loss
        return total, features


class Trainer:
    """Runs rounds of training, validation, early stopping, checkpoints and the final test."""

    def __init__(
        self,
        student: nn.Module,
        teacher: EMATeacher,
        train_data: MultiSource,
        val_data: MultiSource,
        test_data: MultiSource | None,
        settings: TrainSettings,
        info: DistInfo,
        out_dir: str | Path,
    ) -> None:
        self.s = settings
        self.info = info
        self.out_dir = Path(out_dir)
        self.student = student.to(info.device)
        self.teacher = teacher.to(info.device)
        self.train_data, self.val_data, self.test_data = train_data, val_data, test_data
        self.names = [ds.spec.name for ds in train_data.sources]
        self.heads = train_data.head_ids()
        self.experts = [EXPERT_ROUTING[n] for n in self.names]
        self.multi_label = [ds.spec.task.startswith("multi-label") for ds in train_data.sources]
        self.widths = [ds.spec.num_classes for ds in train_data.sources]
        self.expert_of_source = torch.tensor([EXPERT_INDEX[e] for e in self.experts], device=info.device)

        self.params = [p for p in self.student.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the student has no trainable parameters")
        self.specialist_params = specialist_parameters(self.student)
        self.optimizer = build_adamw(self.params, settings.lr, settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, RoundSchedule(settings.num_rounds, settings.warmup_rounds, settings.lr, settings.min_lr)
        )
        use_scaler = settings.amp_dtype == torch.float16 and info.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.step_module: nn.Module = StudentStep(self.student)
        if info.enabled:
            ids = [info.device.index] if info.device.type == "cuda" else None
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=ids, find_unused_parameters=True
            )
        self.round = 0
        self.step_in_round = 0
        self.global_step = 0
        self.best_acc = -1.0
        self.best_round = -1
        self.no_improve = 0
        self.round_sums: dict = {}
        self.history: list[dict] = []
        self.plan_digest: str | None = None  # of the current round's plan, recorded in mid-round checkpoints

    # ---------------------------------------------------------------- logging and checkpoints
    def log(self, msg: str) -> None:
        """Print ``msg`` on rank 0 only, through ``tqdm.write`` so progress bars are not broken up."""
        if self.info.is_main:
            tqdm.write(msg)

    def state(self) -> dict:
        """The full checkpoint dict (see :mod:`.checkpoint`)."""
        return {
            "student_state_dict": self.student.state_dict(),
            "teacher_state_dict": self.teacher.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scheduler_state_dict": self.scheduler.state_dict(),
            "scaler_state_dict": self.scaler.state_dict(),
            "rng": ckpt_io.rng_state(),
            "progress": {
                "round": self.round, "step_in_round": self.step_in_round, "global_step": self.global_step,
                "best_acc": self.best_acc, "best_round": self.best_round, "no_improve": self.no_improve,
                "round_sums": self.round_sums,
                "plan_digest": self.plan_digest if self.step_in_round else None,
            },
            "history": self.history,
            "config": self.s.config,
        }

    def save(self, name: str, state: dict | None = None) -> None:
        """Rank 0 writes ``out_dir/name`` atomically."""
        if self.info.is_main:
            ckpt_io.save_atomic(self.state() if state is None else state, self.out_dir / name)

    def resume(self, path: str | Path, ckpt: dict | None = None) -> None:
        """Continue from ``path`` (a ``last.pt``, or an output folder holding one): weights, optimizer,
        scheduler position, RNG and position. ``ckpt``: its contents, already loaded (and checked) by
        :func:`.checkpoint.load_for_resume`. The learning-rate schedule and weight decay are those of the
        current settings (see :meth:`_load_schedule`)."""
        path, ckpt = (Path(path), ckpt) if ckpt is not None else ckpt_io.load_for_resume(path)
        current = {**self.s.config, "datasets": self.names}
        ckpt_io.check_resume_config(path, ckpt.get("config") or {}, current)
        p = ckpt["progress"]
        if p["step_in_round"] and p.get("plan_digest") is not None:
            batches = self._round_batches(p["round"])
            if len(batches) < p["step_in_round"] or plan_digest(batches) != p["plan_digest"]:
                raise ValueError(
                    f"--resume: {path} was taken after step {p['step_in_round']} of round {p['round'] + 1}, but "
                    f"these options give that round another batch plan, so the rest of the round would skip "
                    f"or repeat samples. Resume with the options it was trained with (--seed, --batch_size "
                    f"times the number of processes, --samples_per_round, --mixed_batches), or from a "
                    f"checkpoint written at the end of a round"
                )
        ckpt_io.load_model_state(self.student, ckpt["student_state_dict"], f"{path}: student_state_dict")
        ckpt_io.load_model_state(self.teacher.model, ckpt["teacher_state_dict"], f"{path}: teacher_state_dict")
        self.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        self._load_schedule(ckpt["scheduler_state_dict"])
        self.scaler.load_state_dict(ckpt.get("scaler_state_dict", {}))
        ckpt_io.set_rng_state(ckpt["rng"])
        self.round, self.step_in_round, self.global_step = p["round"], p["step_in_round"], p["global_step"]
        self.best_acc, self.best_round, self.no_improve = p["best_acc"], p["best_round"], p["no_improve"]
        self.round_sums = p["round_sums"]
        self.history = ckpt.get("history", [])
        self.log(f"resumed from {path}: round {self.round + 1}, step {self.step_in_round} of the round")

    def _load_schedule(self, state: dict) -> None:
        """Restore the scheduler's position (rounds done) but keep the current options' schedule.

        LambdaLR's state_dict holds the RoundSchedule's fields and its base lr, and the optimizer's holds
        the lr and weight decay, so loading them as they are would silently keep the checkpoint's
        ``--num_rounds``, ``--warmup_rounds``, ``--lr``, ``--min_lr`` and ``--weight_decay``. Here the lr
        is recomputed as LambdaLR does (``base_lr * schedule(round)``): with the same options it is the
        very value saved, so an exact resume stays exact. A changed option is logged in one line.
        """
        saved_schedule = (state.get("lr_lambdas") or [None])[0] or {}
        saved_wd = self.optimizer.param_groups[0]["weight_decay"]  # the optimizer state was just loaded
        self.scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(self.scheduler.lr_lambdas)})
        schedule = self.scheduler.lr_lambdas[0]
        self.scheduler.base_lrs = [self.s.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.s.lr
            group["lr"] = self.s.lr * schedule(self.scheduler.last_epoch)
            group["weight_decay"] = self.s.weight_decay
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        names = {"num_rounds": "num_rounds", "warmup": "warmup_rounds", "base_lr": "lr", "min_lr": "min_lr"}
        changes = [f"{option} {saved_schedule[key]:g} -> {getattr(schedule, key):g}" for key, option in names.items()
                   if key in saved_schedule and saved_schedule[key] != getattr(schedule, key)]
        what = ["the learning-rate schedule"] if changes else []
        if saved_wd != self.s.weight_decay:
            changes.append(f"weight_decay {saved_wd:g} -> {self.s.weight_decay:g}")
            what.append("the weight decay")
        if changes:
            lr = self.optimizer.param_groups[0]["lr"]
            self.log(f"--resume: {', '.join(changes)}: {' and '.join(what)} follow{'s' if len(what) == 1 else ''} "
                     f"the new options (round {self.scheduler.last_epoch + 1} at lr {lr:.2e})")

    # ---------------------------------------------------------------- one step
    def _parts(self, batch: Batch) -> tuple[list, list[tuple[torch.Tensor, str | torch.Tensor]]]:
        """Per part: the StudentStep inputs and the teacher inputs."""
        student_parts, teacher_parts = [], []
        offset = 0
        dev = self.info.device
        for part in batch.parts:
            keys = batch.keys[offset : offset + len(part.source)]
            offset += len(part.source)
            sources = [k[0] for k in keys]
            used = sorted(set(sources))
            experts = {self.experts[s] for s in used}
            expert = next(iter(experts)) if len(experts) == 1 else self.expert_of_source[part.source]
            groups = []
            for s in used:
                pos = None if len(used) == 1 else torch.tensor(
                    [i for i, src in enumerate(sources) if src == s], device=dev
                )
                groups.append((self.heads[s], self.multi_label[s], self.widths[s], pos))
            student_parts.append((part.x, expert, part.labels, groups))
            teacher_parts.append((part.x_clean, expert))
        return student_parts, teacher_parts

    def train_step(self, batch: Batch, active: set[str], names: list[str]) -> dict[str, float]:
        """One optimizer step on this rank's share of a global batch; returns the global mean losses.

        ``active``: the specialists of the whole global batch (the EMA update must be the same on every
        rank); ``names``: its datasets (for messages).
        """
        batch = batch.to(self.info.device, non_blocking=True)
        student_parts, teacher_parts = self._parts(batch)
        n = len(batch)
        self.student.train()
        self.teacher.model.eval()
        with autocast(self.info.device, self.s.amp_dtype):
            task_sum, feats = self.step_module(student_parts)
            with torch.no_grad():
                t_feats = [self.teacher.model.forward_features(x, e) for x, e in teacher_parts]
        consist = sum(((fs.float() - ft.float()) ** 2).mean(dim=1).sum() for fs, ft in zip(feats, t_feats))
        loss_cls = task_sum / n
        loss_con = consist / n
        loss = loss_cls + self.s.consist_weight * loss_con
        values = mean_across_ranks(torch.stack([loss, loss_cls, loss_con]).detach(), self.info).tolist()
        if not all(math.isfinite(v) for v in values):
            raise NonFiniteLossError(
                f"non-finite loss ({values[0]}) at round {self.round + 1}, step {self.step_in_round + 1} "
                f"(global step {self.global_step + 1}, datasets {names}); "
                f"stopped without writing a checkpoint of this state. The last good one is "
                f"{self.out_dir / 'last.pt'} (if any). Try a lower --lr, --precision fp32 or --max_grad_norm."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        drop_absent_specialist_grads(self.specialist_params, active)
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.params, self.s.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        momentum = {"A": self.s.ema_momentum, "B": self.s.ema_momentum, "C": self.s.ema_momentum_3d}
        self.teacher.update(self.student, active, momentum)
        return {"loss": values[0], "loss_cls": values[1], "loss_consist": values[2]}

    # ---------------------------------------------------------------- rounds
    def _record(self, names: list[str], losses: dict[str, float]) -> None:
        """Add one step's losses to the round's sums, per dataset (cyclic) or under "mixed"."""
        key = names[0] if len(names) == 1 and not self.s.mixed_batches else "mixed"
        sums = self.round_sums
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v
        sums["steps"] = sums.get("steps", 0) + 1
        for field_name, per_key in (("loss", "per_dataset"), ("loss_cls", "per_dataset_cls"),
                                    ("loss_consist", "per_dataset_consist")):
            per = sums.setdefault(per_key, {})
            total, count = per.get(key, (0.0, 0))
            per[key] = (total + losses[field_name], count + 1)

    def round_losses(self) -> dict:
        """The round's training losses as the seed reports them: each dataset's mean step loss, and their
        unweighted mean over the datasets ("mean"; with mixed batches, the mean step loss)."""
        sums = self.round_sums

        def means(per_key: str, total_key: str) -> tuple[dict[str, float], float]:
            per = {k: t / c for k, (t, c) in sums.get(per_key, {}).items()}
            if per:
                return per, sum(per.values()) / len(per)
            # a mid-round checkpoint of an older version recorded only the step sums of the cls/consist parts
            return per, sums.get(total_key, float("nan")) / max(sums.get("steps", 0), 1)

        per, mean = means("per_dataset", "loss")
        return {"train_loss": {**per, "mean": mean},
                "train_loss_cls": means("per_dataset_cls", "loss_cls")[1],
                "train_loss_consist": means("per_dataset_consist", "loss_consist")[1]}

    def _forgetting(self, val: dict) -> float:
        """Mean over datasets of max(0, best student val ACC of the earlier rounds − this round's)."""
        drops = []
        for name in self.names:
            earlier = [e["val"]["student"][name]["acc"] for e in self.history if name in e["val"]["student"]]
            drops.append(max(0.0, max(earlier) - val["student"][name]["acc"]) if earlier else 0.0)
        return sum(drops) / len(drops)

    def _round_batches(self, r: int) -> list[list[tuple[int, int, int]]]:
        """The global batches of round ``r`` (see :func:`round_plan`)."""
        world = self.info.world_size
        return round_plan(
            [len(ds) for ds in self.train_data.sources], self.s.batch_size * world, self.s.seed, r,
            self.s.samples_per_round, self.s.mixed_batches, self.experts, world,
        )

    def validate(self, data: MultiSource, when: str = "validation") -> dict[str, dict]:
        """Metrics of student and teacher on ``data``; a diverged model (non-finite logits) stops training
        with :class:`NonFiniteOutputError` before anything of this state is written (``when``: for the
        message, e.g. "validation after round 3")."""
        kw = dict(batch_size=self.s.eval_batch_size, info=self.info, mode=self.s.metrics,
                  amp_dtype=self.s.amp_dtype, num_workers=self.s.num_workers, progress=self.s.progress)
        try:
            return {name: evaluate(model, data, **kw, model_name=name)
                    for name, model in (("student", self.student), ("teacher", self.teacher.model))}
        except NonFiniteOutputError as err:
            last = ("last.pt may hold weights from inside this round (--checkpoint_every), diverged already"
                    if self.s.checkpoint_every else "last.pt is that of the previous round")
            raise NonFiniteOutputError(
                f"{when}: {err}; the model diverged (although the training loss was finite). Stopped "
                f"without writing a checkpoint of this state: in {self.out_dir}, best.pt (if any) is the best "
                f"validated round and {last}. Try a lower --lr, --precision fp32 or --max_grad_norm."
            ) from None

    def _end_round(self, r: int, t0: float) -> bool:
        """Scheduler step, validation, early stopping, history, checkpoints; True when training stops."""
        lr = self.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():
            # a run resumed after the round's last step steps the scheduler before its first optimizer
            # step; torch warns of a skipped first value, which a per-round LambdaLR cannot skip
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()
        val = self.validate(self.val_data, f"validation after round {r + 1}")
        entry = {"round": r + 1, "lr": lr, "time_s": time.time() - t0, **self.round_losses(), "val": val,
                 "avg_forgetting": self._forgetting(val)}
        self.history.append(entry)
        self.log(format_table(val, self.names, f"validation, round {r + 1} (lr {lr:.2e}, train loss "
                                               f"{entry['train_loss']['mean']:.4f})"))
        cur = val["student"]["mean_acc"]
        improved = cur > self.best_acc
        if improved:
            self.best_acc, self.best_round, self.no_improve = cur, r, 0
            self.log(f"  new best student mean ACC {100 * cur:.2f}% (round {r + 1}): best.pt")
        elif cur > self.best_acc - self.s.early_stopping_min_delta:
            self.no_improve = 0
        else:
            self.no_improve += 1
            self.log(f"  no improvement ({self.no_improve}/{self.s.early_stopping_patience})")
        self.round, self.step_in_round, self.round_sums = r + 1, 0, {}
        state = self.state()
        if improved:
            self.save("best.pt", {k: state[k] for k in ("student_state_dict", "teacher_state_dict", "config")}
                      | {"round": r, "best_acc": cur, "val": val})
        self.save("last.pt", state)
        if self.info.is_main:
            write_history(self.history, self.out_dir)
        if self.no_improve >= self.s.early_stopping_patience:
            self.log(f"early stopping after round {r + 1}")
            return True
        return False

    def fit(self) -> dict | None:
        """Train from the current position; returns the test results of the best model, or None when
        stopped early by ``max_steps`` (a checkpoint to resume from is written)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.s.max_steps is not None and self.global_step >= self.s.max_steps:
            self.log(f"already at step {self.global_step} of --max_steps {self.s.max_steps}: nothing to train")
            return None
        if self.no_improve >= self.s.early_stopping_patience:
            self.log(f"this run had stopped early after round {self.round} ({plural(self.no_improve, 'round')} without "
                     f"improvement, patience {self.s.early_stopping_patience}): no further training")
            return self.final_test()
        if self.round >= self.s.num_rounds:
            self.log(f"this run has done all of its --num_rounds {self.s.num_rounds}: nothing to train (a larger "
                     f"--num_rounds trains further); testing the best model again")
            return self.final_test()
        for r in range(self.round, self.s.num_rounds):
            t0 = time.time()
            self.round = r
            batches = self._round_batches(r)
            self.plan_digest = plan_digest(batches)
            todo = batches[self.step_in_round :]
            shards = [shard_batch(b, self.info.rank, self.info.world_size) for b in todo]
            loader = DataLoader(
                self.train_data, batch_sampler=shards, collate_fn=collate, num_workers=self.s.num_workers,
                pin_memory=self.info.device.type == "cuda",
            )
            bar = tqdm(loader, total=len(batches), initial=self.step_in_round, desc=f"round {r + 1}",
                       disable=not (self.info.is_main and self.s.progress), leave=False, dynamic_ncols=True)
            for global_batch, batch in zip(todo, bar):
                sources = sorted({k[0] for k in global_batch})
                names = [self.names[i] for i in sources]
                losses = self.train_step(batch, {self.experts[i] for i in sources}, names)
                self._record(names, losses)
                self.global_step += 1
                self.step_in_round += 1
                bar.set_postfix(loss=f"{losses['loss']:.4f}")
                if self.s.checkpoint_every and self.global_step % self.s.checkpoint_every == 0:
                    self.save("last.pt")
                if self.s.max_steps is not None and self.global_step >= self.s.max_steps:
                    self.save("last.pt")
                    self.log(f"stopped after {plural(self.global_step, 'step')} (--max_steps); resume with "
                             f"--resume {self.out_dir / 'last.pt'}")
                    return None
            bar.close()
            if self._end_round(r, t0):
                break
        return self.final_test()

    def final_test(self) -> dict | None:
        """Test metrics of the best student and teacher (printed, saved as test_results.json/csv)."""
        barrier(self.info)  # rank 0 wrote best.pt
        best = self.out_dir / "best.pt"
        if best.is_file():
            ckpt = ckpt_io.load(best)
            ckpt_io.load_model_state(self.student, ckpt["student_state_dict"], f"{best}: student_state_dict")
            ckpt_io.load_model_state(self.teacher.model, ckpt["teacher_state_dict"], f"{best}: teacher_state_dict")
        if self.test_data is None:
            return None
        results = self.validate(self.test_data, "final test")
        title = f"test ({self.s.metrics} metrics), best round {self.best_round + 1}"
        self.log(format_table(results, self.names, title))
        if self.info.is_main:
            save_table(results, self.names, self.out_dir, "test_results")
        return results


def trainable_summary(model: nn.Module, names: Sequence[str]) -> str:
    """One line: trainable and total parameter counts, and the datasets trained on."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%); "
            f"datasets ({len(names)}): {', '.join(names)}")
