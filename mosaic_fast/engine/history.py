"""Learning-curve records: one entry per round, written as JSON, CSV and a PNG plot (matplotlib, Agg).

An entry (see :class:`~mosaic_fast.engine.trainer.Trainer`): ``round``, ``lr``, ``time_s``, ``train_loss``
(per dataset and their mean), ``train_loss_cls``, ``train_loss_consist``, ``val`` (student and teacher
metrics) and ``avg_forgetting`` (as the seed's logger: mean over datasets of the student's validation ACC
drop below its best of the earlier rounds).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path


def _flat(entry: dict) -> dict:
    row = {"round": entry["round"], "lr": entry["lr"], "train_loss": entry["train_loss"]["mean"],
           "train_loss_cls": entry["train_loss_cls"], "train_loss_consist": entry["train_loss_consist"],
           "time_s": entry["time_s"]}
    if "avg_forgetting" in entry:  # the seed logger's measure (absent in histories of older versions)
        row["avg_forgetting"] = entry["avg_forgetting"]
    for model, res in entry["val"].items():
        for key, value in res.items():
            if isinstance(value, dict):
                row.update({f"val_{model}_{key}_{m}": v for m, v in value.items()})
            else:
                row[f"val_{model}_{key}"] = value
    return row


def write_history(history: list[dict], out_dir: str | Path) -> None:
    """``history.json`` (all of it), ``history.csv`` (one flat row per round) and ``curves.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    if not history:
        return
    rows = [_flat(e) for e in history]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(out_dir / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot_curves(history, out_dir / "curves.png")


def plot_curves(history: list[dict], path: str | Path) -> None:
    """Training loss, and validation mean ACC / AUC of student and teacher, against the round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [e["round"] for e in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(rounds, [e["train_loss"]["mean"] for e in history], marker="o", label="total")
    ax_loss.plot(rounds, [e["train_loss_cls"] for e in history], marker=".", label="task")
    ax_loss.set(xlabel="round", ylabel="training loss", title="training loss")
    ax_loss.legend()
    for model, style in (("student", "-"), ("teacher", "--")):
        for metric in ("acc", "auc"):
            values = [100 * e["val"][model][f"mean_{metric}"] for e in history]
            ax_val.plot(rounds, values, style, marker="o", label=f"{model} {metric.upper()}")
    ax_val.set(xlabel="round", ylabel="%", title="validation (mean over datasets)")
    ax_val.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
