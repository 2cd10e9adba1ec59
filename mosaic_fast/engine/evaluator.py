"""Evaluation: predictions per dataset (sharded over DDP ranks), ACC/AUC per dataset and mean, tables.

Each rank scores a strided share of a split; the logits are gathered and put back in the file's order,
so every rank holds the same metrics (and early stopping decides the same way everywhere). Non-finite
logits (a diverged model) raise :class:`NonFiniteOutputError` instead of being scored: NaN > 0.5 is
False, so they would read as "always class 0" and could pass for a trained model.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.datasets import MultiSource, collate
from ..data.registry import EXPERT_ROUTING
from ..data.sampling import eval_keys
from .distributed import DistInfo, all_gather_objects
from .metrics import compute_metrics, summarize


class NonFiniteOutputError(RuntimeError):
    """A model gave NaN or infinite logits: it diverged, and its metrics would be meaningless."""


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast context for ``dtype`` on CUDA (mixed precision), a no-op for fp32 or CPU."""
    if dtype is None or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def predict(
    model: nn.Module,
    data: MultiSource,
    source: int,
    batch_size: int,
    info: DistInfo,
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Logits (N, C) of ``model`` on every sample of ``data.sources[source]``, in file order."""
    ds = data.sources[source]
    head = data.head_ids()[source]
    expert = EXPERT_ROUTING[ds.spec.name]
    keys = eval_keys(len(ds), source, info.rank, info.world_size)
    batches = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
    loader = DataLoader(data, batch_sampler=batches, collate_fn=collate, num_workers=num_workers)
    was_training = model.training
    model.eval()
    indices, outputs = [], []
    bar = tqdm(loader, desc=f"eval {ds.spec.name}", leave=False, disable=not (progress and info.is_main))
    for batch in bar:
        (part,) = batch.to(info.device).parts
        with autocast(info.device, amp_dtype):
            _, logits = model(part.x, task_id=head, expert_id=expert)
        outputs.append(logits.float().cpu().numpy())
        indices += [k[1] for k in batch.keys]
    model.train(was_training)
    local = (np.asarray(indices, dtype=np.int64), np.concatenate(outputs) if outputs else None)
    gathered = [g for g in all_gather_objects(local, info) if g[1] is not None]
    order = np.concatenate([g[0] for g in gathered])
    logits = np.empty((len(ds), gathered[0][1].shape[1]), dtype=np.float32)
    logits[order] = np.concatenate([g[1] for g in gathered])
    return logits


def evaluate(
    model: nn.Module,
    data: MultiSource,
    batch_size: int,
    info: DistInfo,
    mode: str = "medmnist",
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    progress: bool = False,
    model_name: str = "model",
) -> dict:
    """``{dataset: {"acc", "auc"}, "mean_acc", "mean_auc", "mean_acc_2d"?, "mean_acc_3d"?}``.

    Raises :class:`NonFiniteOutputError` naming ``model_name`` and the dataset when any logit is NaN or
    infinite (the same on every rank, since all hold the gathered logits).
    """
    per_dataset = {}
    for source, ds in enumerate(data.sources):
        logits = predict(model, data, source, batch_size, info, amp_dtype, num_workers, progress)
        bad = int((~np.isfinite(logits)).any(axis=1).sum())
        if bad:
            raise NonFiniteOutputError(
                f"the {model_name} gives non-finite logits (NaN or inf) on {ds.spec.name} "
                f"({ds.split} split: {bad} of {len(ds)} samples)"
            )
        per_dataset[ds.spec.name] = compute_metrics(ds.labels.numpy(), logits, ds.spec.task, mode)
    is_3d = {ds.spec.name: ds.spec.is_3d for ds in data.sources}
    return {**per_dataset, **summarize(per_dataset, is_3d)}


def _pct(v: float) -> str:
    return "   nan" if math.isnan(v) else f"{100 * v:6.2f}"


def format_table(
    results: dict[str, dict], datasets: Sequence[str], title: str, untrained: Collection[str] = ()
) -> str:
    """A per-dataset ACC/AUC table (in %) with one column pair per model (e.g. student, teacher).

    Datasets in ``untrained`` (heads the checkpoint never trained) are marked ``*`` and the mean row
    says it covers the trained ones only (the caller computes the mean that way).
    """
    models = list(results)
    marked = [n for n in datasets if n in untrained]
    mean_label = "mean (trained)" if marked and len(marked) < len(datasets) else "mean"
    rows = [(f"{n} *" if n in marked else n, [results[m][n] for m in models], "") for n in datasets]
    rows.append((mean_label, [results[m] for m in models], "mean_"))
    width = max(16, *(len(label) for label, _, _ in rows))
    head = f"{'dataset':<{width}}" + "".join(f" {m + ' ACC':>13} {m + ' AUC':>13}" for m in models)
    lines = [title, head, "-" * len(head)]
    for label, cells, prefix in rows:
        lines.append(f"{label:<{width}}" + "".join(
            f" {_pct(c[prefix + 'acc']):>13} {_pct(c[prefix + 'auc']):>13}" for c in cells))
    if marked:
        lines.append("* untrained head: the checkpoint never trained on this dataset"
                     + (" (left out of the mean)" if mean_label != "mean" else ""))
    return "\n".join(lines)


def save_table(results: dict[str, dict], datasets: Sequence[str], out_dir: str | Path, stem: str) -> None:
    """Write ``{stem}.json`` (everything) and ``{stem}.csv`` (model, dataset, acc, auc) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "dataset", "acc", "auc"])
        for m, res in results.items():
            for name in datasets:
                writer.writerow([m, name, res[name]["acc"], res[name]["auc"]])
            writer.writerow([m, "mean", res["mean_acc"], res["mean_auc"]])
