"""PNG charts of benchmark results: speed-up over the reference per case, and time vs keep ratio ρ."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_results(results: dict, path: str) -> None:
    """Bar chart of fast/compiled speed-ups; a second panel of time vs ρ for cases that carry ``rho``."""
    records = results["records"]
    rho_records = [r for r in records if "rho" in r["params"]]
    fig, axes = plt.subplots(1, 2 if rho_records else 1, figsize=(16 if rho_records else 10, 6), squeeze=False)
    ax = axes[0][0]
    names = [r["name"] for r in records]
    labels = [lab for lab in ("compiled", "fast") if any(lab in r["speedup_vs_reference"] for r in records)]
    width = 0.8 / max(len(labels), 1)
    for i, lab in enumerate(labels):
        values = [r["speedup_vs_reference"].get(lab, 0.0) for r in records]
        ax.barh([j + i * width for j in range(len(records))], values, height=width, label=lab)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([j + width * (len(labels) - 1) / 2 for j in range(len(records))], names, fontsize=7)
    ax.set_xlabel("speed-up over the eager reference (×)")
    env = results["environment"]
    ax.set_title(f"{env['device']} · {env['dtype']} · torch {env['torch']}")
    ax.legend()
    if rho_records:
        ax2 = axes[0][1]
        series: dict[tuple, list] = {}
        for r in rho_records:
            key = tuple((k, v) for k, v in sorted(r["params"].items()) if k != "rho")
            series.setdefault(key, []).append(r)
        for key, rs in series.items():
            rs = sorted(rs, key=lambda r: r["params"]["rho"])
            for lab in ("reference", "fast"):
                pts = [(r["params"]["rho"], 1e3 * r["times_s"][lab]) for r in rs if lab in r["times_s"]]
                if pts:
                    tag = ",".join(f"{k}={v}" for k, v in key if k in ("skip_mode", "op", "model"))
                    ax2.plot(*zip(*pts), marker="o", label=f"{rs[0]['name'].split('_rho')[0]} {tag} {lab}")
        ax2.set_xlabel("keep ratio ρ")
        ax2.set_ylabel("median time (ms)")
        ax2.set_title("time vs ρ (token skipping)")
        ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
