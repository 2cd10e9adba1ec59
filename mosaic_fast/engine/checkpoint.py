"""Checkpoints: atomic writes, checked loads, and the random state an exact resume needs.

Layout (a dict, as the seed's ``*.pth``): ``student_state_dict`` and ``teacher_state_dict`` (the seed's
keys), plus ``optimizer_state_dict``, ``scheduler_state_dict``, ``scaler_state_dict``, ``rng`` (python,
numpy, torch CPU and CUDA generators), ``progress`` (round, step inside the round, global step, early
stopping state), ``history`` and ``config`` (the model and data settings ``eval`` rebuilds the model from).
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.registry import ALL_DATASETS

REQUIRED_KEYS = ("student_state_dict", "teacher_state_dict")
#: What ``--resume`` needs on top of :data:`REQUIRED_KEYS` (``last.pt`` has it, ``best.pt`` does not).
RESUME_KEYS = ("optimizer_state_dict", "scheduler_state_dict", "progress")
#: Recorded data settings compared on resume (a difference is reported, not refused: data may move).
DATA_KEYS = ("root", "size_2d", "size_3d")


def save_atomic(obj: dict, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash mid-write leaves the previous checkpoint intact, never a truncated one. The file gets the
    permissions a plain ``open()`` would give (0666 minus the umask), not ``mkstemp``'s private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str | Path) -> dict:
    """Load a checkpoint onto the CPU; clear errors for a missing, corrupt or foreign file.

    The file is unpickled in full (``weights_only=False``: it holds RNG states and history), so load
    only checkpoints you trust, as with any pickle.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a directory, not a checkpoint file (e.g. {path / 'last.pt'})")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(
            f"checkpoint {path} is corrupt or not a torch checkpoint ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {path} lacks {list(REQUIRED_KEYS)} (found {found})")
    return ckpt


def load_model_state(model: nn.Module, state: dict, what: str) -> None:
    """``load_state_dict(strict=True)`` with the missing and unexpected keys listed in the error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the model: missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}, "
            f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
        )
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if state[k].shape != own[k].shape]
    if wrong:
        raise ValueError(f"{what} has tensors of the wrong shape (checkpoint vs model): {wrong[:10]}")
    model.load_state_dict(state, strict=True)


def rng_state() -> dict:
    """The global random generators' states (python, numpy, torch, CUDA)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (third-party code may draw from it)
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA only when present on both sides)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_for_resume(path: str | Path) -> tuple[Path, dict]:
    """The checkpoint ``--resume path`` names (a folder means its ``last.pt``), loaded and checked for
    what resuming needs; returns its path and contents."""
    path = Path(path)
    if path.is_dir():
        if not (path / "last.pt").is_file():
            raise FileNotFoundError(f"--resume {path} is a directory without a last.pt to resume from")
        path = path / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"--resume {path}: the checkpoint does not exist")
    ckpt = load(path)
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {path} cannot resume training: it lacks {missing} (use last.pt)")
    return path, ckpt


def _names(names: Sequence[str]) -> str:
    """``a,b,c`` (ready for ``--datasets``), or "all 18"."""
    return "all 18" if len(names) == len(ALL_DATASETS) else ",".join(names)


def resume_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """``(refused, noted)``: the settings of a checkpoint's ``config`` that differ from ``current`` (same
    layout), as "what: checkpoint (now ...)" strings. Refused: the datasets and the model (the saved state
    would not fit or would train other heads); noted: the data root and file sizes, and ``--demo``."""
    refused = []
    if saved.get("datasets") is not None and list(saved["datasets"]) != list(current.get("datasets", [])):
        refused.append(f"datasets: trained on {_names(saved['datasets'])} (now {_names(current.get('datasets', []))})")
    saved_model, model = saved.get("model"), current.get("model") or {}
    if saved_model is not None:
        refused += [f"{k} {saved_model.get(k)} (now {model.get(k)})" for k in dict.fromkeys([*saved_model, *model])
                    if saved_model.get(k) != model.get(k)]
    noted = []
    saved_data, data = saved.get("data") or {}, current.get("data") or {}
    noted += [f"data {k} {saved_data[k]} (now {data.get(k)})" for k in DATA_KEYS
              if k in saved_data and k in data and saved_data[k] != data[k]]
    saved_demo, demo = (saved.get("args") or {}).get("demo"), (current.get("args") or {}).get("demo")
    if saved_demo is not None and demo is not None and bool(saved_demo) != bool(demo):
        noted.append(f"--demo {'on' if saved_demo else 'off'} (now {'on' if demo else 'off'})")
    return refused, noted


def check_resume_config(path: str | Path, saved: dict, current: dict) -> list[str]:
    """Refuse (ValueError) a checkpoint trained on other datasets or another model, with every difference
    and the options it was trained with (its ``args.json``); returns the data differences to report."""
    refused, noted = resume_differences(saved, current)
    if not refused:
        return noted
    path = Path(path)
    args_json = path.parent / "args.json"
    where = (f"; they are in {args_json}" if args_json.is_file()
             else "; they are recorded in the checkpoint's config['args']" if saved.get("args") else "")
    demo = (saved.get("args") or {}).get("demo") and not (current.get("args") or {}).get("demo")
    raise ValueError(
        f"--resume {path} was trained with other options than these: {'; '.join(refused + noted)}. Resume with "
        f"the options it was trained with{where}{' (it was trained with --demo: add --demo)' if demo else ''}"
    )
