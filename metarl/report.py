"""The adaptation report: JSON, CSV, a markdown table, a PNG of the curves with confidence bands, TensorBoard scalars.

Every writer takes a sequence of `AdaptationResult` (one per method and split: the agent and its baselines, on
`test` and `ood`), so methods are rows of one table and curves of one plot.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metarl.evaluation import SERIES, AdaptationResult, CurveStats

FORMAT = "metarl-eval-v1"
#: Axes of the curves: the series holding them, and the x value of their first point.
AXES = {"gradient_steps": 0, "incontext_episodes": 1}
_CSV_FIELDS = ("method", "split", "axis", "x", "metric", "mean", "std", "ci95_low", "ci95_high", "n")

Series = dict[tuple[str, str, str], dict[str, list[float]]]


def to_json(results: Sequence[AdaptationResult]) -> dict[str, Any]:
    """The JSON document of a report."""
    return {"format": FORMAT, "results": [r.to_dict() for r in results]}


def load_results(path: str | Path) -> list[AdaptationResult]:
    """The results of a report's JSON file."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a metarl evaluation report (format {data.get('format')!r}, expected {FORMAT!r})")
    return [AdaptationResult.from_dict(r) for r in data["results"]]


def csv_rows(results: Sequence[AdaptationResult]) -> list[dict[str, Any]]:
    """One row per (method, split, axis, x, metric): the mean, std, 95% interval and number of tasks."""
    rows = []
    for r in results:
        for series in SERIES:
            axis = series.removesuffix("_success")
            metric = "success" if series.endswith("_success") else "return"
            for i, s in enumerate(r.stats[series]):
                rows.append({"method": r.method, "split": r.split, "axis": axis, "x": AXES[axis] + i, "metric": metric,
                             "mean": s.mean, "std": s.std, "ci95_low": s.ci95_low, "ci95_high": s.ci95_high, "n": s.n})
    return rows


def write_csv(results: Sequence[AdaptationResult], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        writer.writerows(csv_rows(results))


def _cell(s: CurveStats) -> str:
    return f"{s.mean:.2f} ± {s.ci95:.2f}"


def table(results: Sequence[AdaptationResult]) -> str:
    """A markdown table: one row per (method, split); return after k inner gradient steps and in each in-context
    episode (mean ± 95% CI half-width), and the success rate before and after adaptation where defined."""
    if not results:
        return "(no results)"
    steps = max(len(r.gradient_steps) for r in results)
    episodes = max(len(r.incontext_episodes) for r in results)
    success = any(r.gradient_steps_success or r.incontext_episodes_success for r in results)
    first = results[0]
    head = ["method", "split"] + [f"after {k}" for k in range(steps)] + [f"episode {e + 1}" for e in range(episodes)]
    head += ["success (before → after)"] if success else []
    lines = [f"Return on {first.num_tasks} held-out tasks of {first.family} per split, seed {first.seed}: after k inner "
             f"gradient steps ('after k') and in in-context episode e; mean ± 95% CI half-width (Student t across tasks).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.method, r.split]
        cells += [_cell(s) for s in r.gradient_steps] + [""] * (steps - len(r.gradient_steps))
        cells += [_cell(s) for s in r.incontext_episodes] + [""] * (episodes - len(r.incontext_episodes))
        if success:
            rates = r.gradient_steps_success or r.incontext_episodes_success
            cells.append(f"{rates[0].mean:.2f} → {rates[-1].mean:.2f}" if rates else "")
        lines.append("| " + " | ".join(cells) + " |")
    notes = dict.fromkeys(f"- {r.method}: {r.notes}" for r in results if r.notes)
    return "\n".join(lines + ([""] + list(notes) if notes else []))


def curve_series(results: Sequence[AdaptationResult]) -> Series:
    """(split, axis, method) -> {"x", "mean", "low", "high"}: the return curves a plot draws."""
    series: Series = {}
    for r in results:
        for axis, x0 in AXES.items():
            stats = r.stats[axis]
            if stats:
                series[(r.split, axis, r.method)] = {"x": [float(x0 + i) for i in range(len(stats))],
                                                     "mean": [s.mean for s in stats], "low": [s.ci95_low for s in stats],
                                                     "high": [s.ci95_high for s in stats]}
    return series


def plot(results: Sequence[AdaptationResult], path: str | Path | None = None):
    """Draws the return curves (mean line, shaded 95% interval) of every method: one column per split, a row for
    gradient steps and one for in-context episodes where present. Saves a PNG to `path`; returns the matplotlib
    Figure and the series it drew (`curve_series`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    series = curve_series(results)
    splits = list(dict.fromkeys(k[0] for k in series)) or ["test"]
    axes_used = [a for a in AXES if any(k[1] == a for k in series)] or ["gradient_steps"]
    methods = list(dict.fromkeys(r.method for r in results))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig, grid = plt.subplots(len(axes_used), len(splits), figsize=(5.5 * len(splits), 4 * len(axes_used)),
                             squeeze=False, sharey="row")
    for row, axis in enumerate(axes_used):
        for col, split in enumerate(splits):
            ax = grid[row][col]
            for method in methods:
                s = series.get((split, axis, method))
                if s is None:
                    continue
                ax.plot(s["x"], s["mean"], marker="o", color=colors[method], label=method)
                ax.fill_between(s["x"], s["low"], s["high"], color=colors[method], alpha=0.2)
            ax.set_title(f"{results[0].family}, {split} tasks")
            ax.set_xlabel("inner gradient steps" if axis == "gradient_steps" else "in-context episode")
            ax.set_ylabel("return (mean, 95% CI)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig, series


def _tag(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def write_tensorboard(results: Sequence[AdaptationResult], log_dir: str | Path) -> None:
    """Scalars `eval/<split>/<method>/return_step` (x = gradient step), `.../return_episode` (x = episode), their
    `_ci95_low` / `_ci95_high`, and `success_step` / `success_episode` where defined."""
    from torch.utils.tensorboard import SummaryWriter

    names = {"gradient_steps": "return_step", "incontext_episodes": "return_episode",
             "gradient_steps_success": "success_step", "incontext_episodes_success": "success_episode"}
    with SummaryWriter(str(log_dir)) as writer:
        for r in results:
            prefix = f"eval/{_tag(r.split)}/{_tag(r.method)}"
            for series, name in names.items():
                x0 = AXES[series.removesuffix("_success")]
                for i, s in enumerate(r.stats[series]):
                    writer.add_scalar(f"{prefix}/{name}", s.mean, x0 + i)
                    if not series.endswith("_success"):
                        writer.add_scalar(f"{prefix}/{name}_ci95_low", s.ci95_low, x0 + i)
                        writer.add_scalar(f"{prefix}/{name}_ci95_high", s.ci95_high, x0 + i)


def write_report(results: Sequence[AdaptationResult], out_dir: str | Path, tb_dir: str | Path | None = None,
                 command: str | None = None) -> dict[str, Path]:
    """Writes eval.json, eval.csv, eval.png, table.md (with `command` above the table, if given) into `out_dir`
    and TensorBoard scalars into `tb_dir` (default out_dir/tb); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "csv": out / "eval.csv", "png": out / "eval.png", "table": out / "table.md",
             "tensorboard": Path(tb_dir) if tb_dir is not None else out / "tb"}
    paths["json"].write_text(json.dumps(to_json(results), indent=2) + "\n")
    write_csv(results, paths["csv"])
    plot(results, paths["png"])
    header = f"```bash\n{command}\n```\n\n" if command else ""
    paths["table"].write_text(header + table(results) + "\n\n![adaptation curves](eval.png)\n")
    write_tensorboard(results, paths["tensorboard"])
    return paths
