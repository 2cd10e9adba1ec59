"""EMA teacher with per-specialist momentum (MOSAIC).

After every optimizer step ``p_t = m p_t + (1 - m) p_s`` over the student's trainable parameters,
except the adapters of the specialists that were not active in the step (so a 2D batch never moves
the volumetric specialist's teacher weights). Momentum: 0.9 for A and B, 0.95 for C (DESIGN.md §3).
When several specialists are active (a mixed batch), each specialist's adapters use its own momentum
and the shared trainable parameters (heads, 3D tokenizer) the largest active momentum (the slowest,
most conservative update).

The seed's ``TeacherModel.ema_update`` walks over every parameter, frozen ones included, with the momentum
of the dataset's specialist; for a frozen parameter (equal in student and teacher) that rewrites it with
itself, up to an ulp of rounding, so skipping frozen parameters gives the same teacher (and keeps the frozen
backbone bitwise equal to the student's). Every head moves at every step, also those of the other datasets,
as in the seed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..reference.adapter import EXPERT_NAMES

DEFAULT_MOMENTUM = {"A": 0.9, "B": 0.9, "C": 0.95}


def expert_of_parameter(name: str) -> str | None:
    """'A'/'B'/'C' for a parameter inside ``expert_a/b/c``, else None."""
    for expert in EXPERT_NAMES:
        if f".expert_{expert.lower()}." in f".{name}":
            return expert
    return None


class EMATeacher:
    """Holds ``model``, a frozen deep copy of the student, and updates it by EMA.

    ``state_dict()`` is the copy's own (the same keys as the student), as the seed saves it.
    """

    def __init__(self, student: nn.Module, momentum: dict[str, float] | None = None) -> None:
        self.model = copy.deepcopy(student)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.momentum = dict(DEFAULT_MOMENTUM if momentum is None else momentum)
        for expert in EXPERT_NAMES:
            m = self.momentum.get(expert)
            if m is None or not 0.0 <= m <= 1.0:
                raise ValueError(f"momentum[{expert!r}] must be in [0, 1], got {m}")

    def __call__(self, *args, **kwargs) -> Any:
        """The teacher model's forward, under ``torch.no_grad()``."""
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def eval(self) -> EMATeacher:
        """Put the teacher model in eval mode; returns self, as ``nn.Module.eval`` does."""
        self.model.eval()
        return self

    def to(self, *args, **kwargs) -> EMATeacher:
        """Move or cast the teacher model (``nn.Module.to``'s arguments); returns self."""
        self.model.to(*args, **kwargs)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher model's state_dict (the student's keys, as the seed saves it)."""
        return self.model.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> object:
        """Load into the teacher model; returns what ``nn.Module.load_state_dict`` returns."""
        return self.model.load_state_dict(state_dict, strict=strict)

    @torch.no_grad()
    def update(
        self,
        student: nn.Module,
        experts: str | Iterable[str],
        momentum: dict[str, float] | None = None,
    ) -> None:
        """EMA step towards ``student`` for the specialists in ``experts`` (e.g. "A" or {"A", "C"})."""
        active = {experts} if isinstance(experts, str) else set(experts)
        if not active or not active <= set(EXPERT_NAMES):
            raise ValueError(f"experts must be a non-empty subset of {EXPERT_NAMES}, got {experts!r}")
        moms = {**self.momentum, **(momentum or {})}
        shared_m = max(moms[e] for e in active)
        student = getattr(student, "module", student)  # unwrap DistributedDataParallel
        teacher_params = dict(self.model.named_parameters())
        groups: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for name, p_s in student.named_parameters():
            if not p_s.requires_grad:
                continue
            expert = expert_of_parameter(name)
            if expert is not None and expert not in active:
                continue
            m = moms[expert] if expert is not None else shared_m
            teachers, students = groups.setdefault(m, ([], []))
            teachers.append(teacher_params[name])
            students.append(p_s.detach())
        # p_t + (1 - m)(p_s - p_t) = m p_t + (1 - m) p_s: one fused multi-tensor launch per momentum value
        # (a loop of mul_/add_ per parameter costs hundreds of kernel launches per training step)
        for m, (teachers, students) in groups.items():
            torch._foreach_lerp_(teachers, students, 1.0 - m)
