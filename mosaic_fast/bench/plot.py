"""PNG charts of benchmark results: speed-up over the eager reference per case and column, and time vs keep
ratio ρ for the token-skipping cases.

The data preparation (:func:`speedup_rows`, :func:`bar_columns`, :func:`rho_series`) is kept apart from the
drawing so that it can be tested without reading pixels. Results merged from several files (or an older
file holding several runs) are split with :func:`~mosaic_fast.bench.targets.split_runs`: each row and each
ρ line belongs to exactly one run, since timings of different runs are not comparable point by point.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, NullLocator

from mosaic_fast.bench.targets import REFERENCE_COLUMNS, split_runs

if TYPE_CHECKING:
    from matplotlib.axes import Axes

#: Fixed colour per known column, so a column looks the same in every chart; others get one by name hash.
COLUMN_COLORS = {
    "reference": "#4d4d4d",
    "compiled": "#ff7f0e",
    "reference+graphs": "#8c564b",
    "fast": "#1f77b4",
    "fast+graphs": "#17becf",
    "fast+compiled": "#9467bd",
    "fast+cudnn-attn": "#e377c2",
    "kernel": "#2ca02c",
    "fast+mkl": "#d62728",
    "three launches": "#bcbd22",
}
_FALLBACK_COLORS = ("#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94")
#: Drawing order of the known columns (reference side first); unknown columns follow in order of appearance.
_COLUMN_ORDER = ("compiled", "reference+graphs", "fast", "fast+graphs", "fast+compiled", "fast+cudnn-attn",
                 "kernel", "fast+mkl", "three launches")
_RUN_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))

# layout, in inches
_BAR_H = 0.14  # one bar
_ROW_GAP = 0.14  # between two rows
_RHO_PANEL_H = 3.4
_FIG_W = 14.0


@dataclass
class Row:
    """One bar-chart row: a record of one run, its label and its speed-up per drawn column."""

    label: str
    run: int
    name: str
    speedups: dict[str, float] = field(default_factory=dict)


@dataclass
class RhoSeries:
    """One line of the time-vs-ρ panel: one run, one case family, one column; points sorted by ρ."""

    run: int
    family: str
    column: str
    rhos: list[float]
    times_ms: list[float]


def column_color(column: str) -> str:
    """The colour of ``column``: fixed for known columns, stable (name hash) for others."""
    if column in COLUMN_COLORS:
        return COLUMN_COLORS[column]
    return _FALLBACK_COLORS[zlib.crc32(column.encode()) % len(_FALLBACK_COLORS)]


def _runs(results: dict) -> list[list[dict]]:
    return split_runs(results.get("records", []))


def run_descriptions(results: dict) -> list[str]:
    """One line per run, "run k: file · date", from ``results["runs"]`` where present."""
    infos = results.get("runs") or []
    lines = []
    for k in range(len(_runs(results))):
        info = infos[k] if k < len(infos) else {}
        parts = [str(info[key]) for key in ("file", "date") if info.get(key)]
        lines.append(f"run {k}: {' · '.join(parts)}" if parts else f"run {k}")
    return lines


def _speedups(record: dict) -> dict[str, float]:
    """Speed-up over the eager reference of every non-reference column; taken from the record, or from its
    times where the record carries none. Missing, zero and non-finite values are left out (log axis)."""
    given = record.get("speedup_vs_reference") or {}
    times = record.get("times_s") or {}
    out = {}
    for column in dict.fromkeys([*given, *times]):
        if column == "reference":
            continue
        value = given.get(column)
        if value is None and times.get("reference") and times.get(column):
            value = times["reference"] / times[column]
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            out[column] = float(value)
    return out


def speedup_rows(results: dict) -> list[Row]:
    """Every record as a row, run by run in record order; labelled "name" for a single run and
    "name (run k)" when there are several, so repeated case names stay distinct."""
    runs = _runs(results)
    rows = []
    for k, run in enumerate(runs):
        for record in run:
            label = record["name"] if len(runs) == 1 else f"{record['name']} (run {k})"
            rows.append(Row(label, k, record["name"], _speedups(record)))
    return rows


def bar_columns(rows: list[Row]) -> list[str]:
    """Every column any row has a speed-up for: reference-side ones (compiled, reference+graphs) first,
    then the fast-side ones, known columns in a fixed order, others in order of appearance."""
    return _ordered(c for row in rows for c in row.speedups)


def _ordered(columns: Iterable[str]) -> list[str]:
    """Distinct ``columns``: reference, then the reference side, then the fast side (see bar_columns)."""
    present = list(dict.fromkeys(columns))
    head = ["reference"] if "reference" in present else []
    present = [c for c in present if c != "reference"]
    known = [c for c in _COLUMN_ORDER if c in present]
    unknown = [c for c in present if c not in _COLUMN_ORDER]
    ref_side = [c for c in known + unknown if c in REFERENCE_COLUMNS]
    return head + ref_side + [c for c in known + unknown if c not in REFERENCE_COLUMNS]


def _family(record: dict) -> str:
    """The case family of a ρ case: its name without the ``rho…`` part (``dynamer_block_rho0.5`` →
    ``dynamer_block``)."""
    stripped = re.sub(r"[_ ]?rho[0-9.eE+-]*", "", record["name"]).strip("_ ")
    return stripped or record.get("suite", "ρ cases")


def rho_series(results: dict) -> list[RhoSeries]:
    """Time vs ρ lines: one per (run, case family, column), sorted by ρ. Records of one family whose other
    parameters differ (a second shape, say) get a family name that tells them apart, so a line never joins
    points that are not the same case at another ρ."""
    groups: dict[tuple, list[dict]] = {}
    for k, run in enumerate(_runs(results)):
        for record in run:
            params = record.get("params") or {}
            if not isinstance(params.get("rho"), (int, float)):
                continue
            rest = tuple(sorted((key, repr(v)) for key, v in params.items() if key != "rho"))
            groups.setdefault((k, _family(record), rest), []).append(record)
    # families (by name) seen with several parameter sets: name them by the parameters that differ
    variants: dict[str, set] = {}
    for _, family, rest in groups:
        variants.setdefault(family, set()).add(rest)
    series = []
    for (k, family, rest), records in groups.items():
        name = family
        if len(variants[family]) > 1:
            shared = set.intersection(*(set(v) for v in variants[family]))
            name += " " + ",".join(f"{key}={v}" for key, v in rest if (key, v) not in shared)
        records = sorted(records, key=lambda r: r["params"]["rho"])
        columns = dict.fromkeys(c for r in records for c in (r.get("times_s") or {}))
        for column in columns:
            pts = [(float(r["params"]["rho"]), 1e3 * r["times_s"][column]) for r in records
                   if isinstance(r["times_s"].get(column), (int, float)) and r["times_s"][column] > 0]
            if pts:
                series.append(RhoSeries(k, name, column, [p[0] for p in pts], [p[1] for p in pts]))
    return series


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks (…, 0.5, 1, 2, 5, 10, …) within [lo, hi], 1 always included; a narrow range (under five
    such ticks) also gets 1.5, 3 and 7 (0.15, 0.3, 0.7, …)."""
    def within(mantissas: tuple[float, ...]) -> list[float]:
        ticks = {1.0}
        for exp in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
            ticks |= {round(m * 10.0**exp, 10) for m in mantissas if lo <= m * 10.0**exp <= hi}
        return sorted(ticks)

    ticks = within((1, 2, 5))
    return ticks if len(ticks) >= 5 else within((1, 1.5, 2, 3, 5, 7))


def _fmt_x(value: float) -> str:
    return f"{value:.2f}×" if value < 9.95 else f"{value:.0f}×"


def _draw_bars(ax: Axes, rows: list[Row], columns: list[str], row_heights: list[float]) -> None:
    """Grouped horizontal bars from the 1× line, one per column a row has, on a log x axis."""
    values = [v for row in rows for v in row.speedups.values()]
    lo = min([*values, 1.0]) / 1.7
    hi = max([*values, 1.0]) * 1.7
    y = 0.0
    centers = []
    for i, (row, height) in enumerate(zip(rows, row_heights)):
        top = y + _ROW_GAP / 2
        if i % 2:
            ax.axhspan(y, y + height, color="#f2f2f2", zorder=0, linewidth=0)
        if i and row.run != rows[i - 1].run:
            ax.axhline(y, color="#555555", linewidth=1.2, zorder=1)
        drawn = [c for c in columns if c in row.speedups]
        for j, column in enumerate(drawn):
            value = row.speedups[column]
            yc = top + (j + 0.5) * _BAR_H
            ax.barh(yc, value - 1.0, left=1.0, height=_BAR_H * 0.9, color=column_color(column), zorder=2)
            ax.text(value * (1.03 if value >= 1 else 1 / 1.03), yc, _fmt_x(value), va="center",
                    ha="left" if value >= 1 else "right", fontsize=6.5, zorder=3)
        if not drawn:
            ax.text(1.03, top + _BAR_H / 2, "no speed-up recorded", va="center", fontsize=6.5, color="#888888")
        centers.append(y + height / 2)
        y += height
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(y, 0)  # first record at the top
    ax.xaxis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}×" for t in log_ticks(lo, hi)])
    ax.tick_params(axis="x", labeltop=True, top=True, labelsize=8)
    ax.set_yticks(centers, [row.label for row in rows], fontsize=8)
    ax.tick_params(axis="y", length=0)
    ax.grid(axis="x", color="#cccccc", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)
    ax.axvline(1.0, color="black", linewidth=1.0, zorder=2)
    ax.set_xlabel("speed-up over the eager reference (×, log scale; right of 1× is faster)", fontsize=9)


def _draw_rho(axes: Sequence[Axes], series: list[RhoSeries], families: list[str]) -> None:
    """One panel per case family: time vs ρ, a line per (run, column); log y axis when the range is wide."""
    for ax, family in zip(axes, families):
        mine = [s for s in series if s.family == family]
        for s in mine:
            style, marker = _RUN_STYLES[s.run % len(_RUN_STYLES)]
            ax.plot(s.rhos, s.times_ms, linestyle=style, marker=marker, markersize=4, linewidth=1.4,
                    color=column_color(s.column))
        times = [t for s in mine for t in s.times_ms]
        if times and max(times) / min(times) > 8:
            ax.set_yscale("log")
        ax.set_title(family, fontsize=9)
        ax.set_xlabel("keep ratio ρ", fontsize=8)
        ax.set_ylabel("median time (ms)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(color="#dddddd", linewidth=0.6)
    for ax in axes[len(families):]:
        ax.set_visible(False)


def plot_results(results: dict, path: str) -> None:
    """Write a PNG: speed-up of every non-reference column per case (log axis, a row per record and run,
    height growing with the rows so labels never overlap) and, for cases with ``rho``, time vs ρ per case
    family with one line per run and column."""
    rows = speedup_rows(results)
    columns = bar_columns(rows)
    series = rho_series(results)
    families = list(dict.fromkeys(s.family for s in series))
    runs = run_descriptions(results)
    n_runs = len(runs)

    row_heights = [_BAR_H * max(len(row.speedups), 1) + _ROW_GAP for row in rows]
    bars_h = max(sum(row_heights), 1.0)
    head_h = 0.55 + (0.2 * n_runs + 0.15 if n_runs > 1 else 0) + 0.3 * math.ceil(max(len(columns), 1) / 7) + 0.35
    n_rho_cols = min(len(families), 3)
    n_rho_rows = math.ceil(len(families) / 3)
    rho_top = head_h + bars_h + 0.8  # below the bar chart's tick labels and x label
    rho_h = n_rho_rows * _RHO_PANEL_H + 0.9 if families else 0.0
    fig_h = rho_top + rho_h
    fig = plt.figure(figsize=(_FIG_W, fig_h))

    def box(left: float, top: float, width: float, height: float) -> list[float]:  # inches → fig fraction
        return [left / _FIG_W, (fig_h - top - height) / fig_h, width / _FIG_W, height / fig_h]

    env = results.get("environment") or {}
    title = " · ".join(str(env[k]) for k in ("device", "dtype") if env.get(k))
    if env.get("torch"):
        title += f" · torch {env['torch']}"
    fig.text(0.5 / _FIG_W, 1 - 0.3 / fig_h, title or "benchmark results", fontsize=12, weight="bold", va="center")
    if n_runs > 1:
        for k, line in enumerate(runs):
            fig.text(0.5 / _FIG_W, 1 - (0.6 + 0.2 * k) / fig_h, line, fontsize=8, va="center", color="#333333")

    label_w = min(0.3 + 0.068 * max([len(row.label) for row in rows] or [10]), 5.0)
    ax = fig.add_axes(box(label_w, head_h, _FIG_W - label_w - 0.3, bars_h))
    if rows:
        _draw_bars(ax, rows, columns, row_heights)
    else:
        ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
    if columns:
        ax.legend(handles=[Patch(color=column_color(c), label=c) for c in columns], ncol=min(len(columns), 7),
                  loc="lower left", bbox_to_anchor=(0.0, 1.0 + 0.35 / bars_h), fontsize=8, frameon=False,
                  title="speed-up over the eager reference of:", title_fontsize=8, alignment="left")

    if families:
        gap = 0.7
        width = (_FIG_W - 1.0 - gap * (n_rho_cols - 1)) / n_rho_cols
        rho_axes = [fig.add_axes(box(0.8 + (i % 3) * (width + gap), rho_top + 0.9 + (i // 3) * _RHO_PANEL_H,
                                     width, _RHO_PANEL_H - 0.8)) for i in range(len(families))]
        _draw_rho(rho_axes, series, families)
        rho_columns = _ordered(s.column for s in series)
        handles = [Line2D([], [], color=column_color(c), linewidth=2, label=c) for c in rho_columns]
        if n_runs > 1:
            used = sorted({s.run for s in series})
            handles += [Line2D([], [], color="black", linestyle=_RUN_STYLES[k % 4][0], marker=_RUN_STYLES[k % 4][1],
                               markersize=4, label=f"run {k}") for k in used]
        fig.legend(handles=handles, loc="upper left", ncol=min(len(handles), 8), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.8 / _FIG_W, 1 - rho_top / fig_h),
                   title="time vs keep ratio ρ (token skipping): colour = column"
                         + (", line style = run" if n_runs > 1 else ""), title_fontsize=8, alignment="left")
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.2)
    plt.close(fig)
