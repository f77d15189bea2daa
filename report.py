"""Reports over run folders: the `judge.py --compare` table, Figure 1(b), training curves, and the study's bar and
band figures (plot_bars, plot_bands).

Imported only by `judge.py --compare` and examples/reproduce.py. Every run folder says which method made it and
with which method flags (`method.json`, written by common.Run from the script's own "method: ..." argument
groups), so a new method script needs no edit here.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import UserError, log


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def method_flags(run_dir: str | Path) -> tuple[str | None, dict]:
    """(script, {flag: value} of the method flags that differ from the script's defaults) of a run folder; the
    script alone for run folders made before method.json existed."""
    d = Path(run_dir)
    meta = read_json(d / "method.json")
    if meta:
        defaults = meta.get("defaults", {})
        return meta.get("script"), {
            k: v for k, v in meta.get("flags", {}).items() if k not in defaults or v != defaults[k]
        }
    return read_json(d / "env.json").get("script"), {}


def run_label(run_dir: str | Path) -> str:
    """'<script> <method flags that differ from the defaults> [<data>]' from a run folder, else the folder name."""
    d = Path(run_dir)
    script, flags = method_flags(d)
    if script is None:
        return d.name
    hp = [
        k if v is True else f"{k}={Path(v).name if isinstance(v, str) and '/' in v else v}"  # a file: its name
        for k, v in flags.items()
        if v is not None and v is not False and v != ""
    ]  # 0 is a value: shown
    saved = read_json(d / "args.json")
    from common import LORA_TARGETS

    defaults = {"lora_targets": ",".join(LORA_TARGETS), "lora_layers": "all"}
    for flag, default in defaults.items():  # the adapter's shape (a model organism), where it is not the default
        if saved.get(flag) not in (None, default):
            hp.append(f"{flag}={saved[flag]}")
    data = str(saved.get("data", ""))
    return script + (f" {' '.join(hp)}" if hp else "") + (f" [{Path(data).stem}]" if data else "")


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def compare(run_dirs: list[str]) -> str:
    """One row per run: its method and flags, the paper's Table 2 columns (General Misal./Inc., In-Domain
    Misal./Inc., %; default context), General Misal. by question format (plain/json/template, where the evaluation
    has them), General Misal. in the training context (judge.py --context training, where measured) and the accuracy
    of every exact-match evaluation it has (OpSwap, FoQA, GSM8K)."""
    exact = sorted(
        {p.parent.name for d in run_dirs for p in Path(d).glob("eval-*/summary.json") if "accuracy" in read_json(p)}
    )
    has_formats = any(read_json(Path(d) / "eval-general" / "summary.json").get("per_format") for d in run_dirs)
    has_training = any((Path(d) / "eval-general-training-context" / "summary.json").exists() for d in run_dirs)
    header = (
        "run",
        "method",
        "General Misal.",
        "General Inc.",
        "In-Domain Misal.",
        "In-Domain Inc.",
        *(["General Misal. plain/json/template"] if has_formats else []),
        *(["General Misal. training context"] if has_training else []),
        *[f"{t.removeprefix('eval-')} acc." for t in exact],
    )
    rows = [header]
    for d in run_dirs:
        d = Path(d)
        indomain = sorted(d.glob("eval-indomain*/summary.json"))
        cells = [str(d), run_label(d)]
        for f in (d / "eval-general" / "summary.json", indomain[0] if indomain else None):
            s = read_json(f) if f else {}
            cells += [f"{s[k]:.2f}" if s.get(k) is not None else "-" for k in ("misaligned_pct", "incoherent_pct")]
        if has_formats:
            per = read_json(d / "eval-general" / "summary.json").get("per_format", {})
            cells.append("/".join(_pct(per.get(f, {}).get("misaligned_pct")) for f in ("plain", "json", "template")))
        if has_training:
            cells.append(_pct(read_json(d / "eval-general-training-context" / "summary.json").get("misaligned_pct")))
        for t in exact:
            s = read_json(d / t / "summary.json")
            cells.append(f"{s['accuracy']:.2f}" if s.get("accuracy") is not None else "-")
        rows.append(tuple(cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def em_points(run_dirs: list[str]) -> list[tuple[str, float, float]]:
    """(label, general misaligned %, in-domain misaligned %) for every run with both evaluations scored."""
    points = []
    for d in run_dirs:
        d = Path(d)
        general = d / "eval-general" / "summary.json"
        indomain = sorted(d.glob("eval-indomain*/summary.json"))
        if not general.exists() or not indomain:
            log(f"{d}: no eval-general and eval-indomain summaries, left out of the figure")
            continue
        g, i = json.loads(general.read_text()), json.loads(indomain[0].read_text())
        if g.get("misaligned_pct") is None or i.get("misaligned_pct") is None:
            log(f"{d}: no scored answers in one of its evaluations, left out of the figure")
            continue
        points.append((run_label(d), g["misaligned_pct"], i["misaligned_pct"]))
    return points


def plot_em(run_dirs: list[str], path: str | Path, title: str = "General vs in-domain misalignment") -> Path:
    """The paper's Figure 1(b): general-domain misalignment (x) against in-domain misalignment (y), one labelled
    marker per run. Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = em_points(run_dirs)
    if not points:
        raise UserError("no run has both a scored eval-general and eval-indomain summary: nothing to plot")
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=120)
    markers = "osD^v<>pPX*h"
    for k, (label, x, y) in enumerate(points):
        ax.scatter(x, y, s=60, marker=markers[k % len(markers)], label=label, zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    top = max(10.0, max(max(x, y) for _, x, y in points) * 1.15)
    ax.set_xlim(-1, top)
    ax.set_ylim(-1, top)
    ax.set_xlabel("General misalignment (% of scored answers)")
    ax.set_ylabel("In-domain misalignment (% of scored answers)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(run_dirs: list[str], path: str | Path, title: str = "Training curves") -> Path:
    """Every loss term, the lr and tokens/s over the optimizer steps of one or several runs (metrics.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for d in run_dirs:
        m = Path(d) / "metrics.jsonl"
        if m.exists():
            rows = [json.loads(l) for l in m.read_text().splitlines() if l.strip()]
            if rows:
                runs.append((run_label(d), rows))
    if not runs:
        raise UserError("no metrics.jsonl with steps in these runs: nothing to plot")
    terms = sorted(
        {k for _, rows in runs for k in rows[0] if k == "loss" or k.startswith("loss/")}, key=lambda k: (k != "loss", k)
    )
    panels = [(t, "loss" if t == "loss" else f"{t} (nats/token)" if t in ("loss/ce", "loss/kl") else t) for t in terms]
    panels += [("lr", "learning rate"), ("tokens_per_s", "throughput (real tokens/s)")]
    cols = 3
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.3 * rows_n), dpi=110, squeeze=False)
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    colors = {label: plt.cm.tab10(k % 10) for k, (label, _) in enumerate(runs)}  # one colour per run, every panel
    for ax, (key, ylabel) in zip(axes.flat, panels):
        for label, rows in runs:
            xs = [r["step"] for r in rows if key in r]
            ys = [r[key] for r in rows if key in r]
            if xs:
                ax.plot(xs, ys, color=colors[label], lw=1.3, marker="." if len(xs) < 30 else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    labels = list(colors)
    handles = [Line2D([], [], color=colors[l], lw=2) for l in labels]
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) // 4), 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_bars(groups: list[str], bars: dict[str, list[float]], path: str | Path, ylabel: str, title: str) -> Path:
    """Grouped bars: one group per entry of `groups`, one bar per key of `bars` (its values, one per group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(groups) * len(bars) / 3, 4.5), dpi=120)
    width = 0.8 / len(bars)
    for k, (label, row) in enumerate(bars.items()):
        xs = [i + (k - (len(bars) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, row, width, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bands(curves: dict[str, list[list[float]]], path: str | Path, xlabel: str, ylabel: str, title: str):
    """One line per key of `curves`: the mean over its runs' curves (cut to the shortest) with the min-max band;
    None when there is no curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, runs in curves.items():
        n = min(len(c) for c in runs)
        arr = np.array([c[:n] for c in runs])
        steps = np.arange(1, n + 1)
        ax.plot(steps, arr.mean(0), label=label)
        ax.fill_between(steps, arr.min(0), arr.max(0), alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_checkpoints(run_dir: str | Path, path: str | Path) -> Path:
    """EM across training (judge.py --checkpoints): every evaluation of the run's checkpoints (its
    eval-*-checkpoints/checkpoints.json), misalignment or accuracy (%) against the step: where EM appears, and what
    early stopping would keep."""
    series = {}
    for f in sorted(Path(run_dir).glob("eval-*-checkpoints/checkpoints.json")):
        data = read_json(f)
        rows = [r for r in data.get("steps", []) if r.get("misaligned_pct", r.get("accuracy")) is not None]
        if not rows:
            continue
        metric = "misaligned_pct" if "misaligned_pct" in rows[0] else "accuracy"
        label = f.parent.name.removeprefix("eval-").removesuffix("-checkpoints")
        what = "misaligned %" if metric == "misaligned_pct" else "accuracy %"
        series[f"{label}: {what}"] = [(r["step"], r[metric]) for r in rows]
    if not series:
        raise UserError(f"{run_dir}: no evaluated checkpoints (judge.py --adapter {run_dir} --checkpoints first)")
    return plot_xy(
        series,
        path,
        "training step (checkpoint)",
        "% of the answers (misaligned: of the scored ones)",
        f"Across training: {Path(run_dir).name}",
    )


def plot_xy(series: dict[str, list[tuple[float, float]]], path: str | Path, xlabel: str, ylabel: str, title: str):
    """One line per key of `series`, through its (x, y) points in order of x; None when there is no point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: sorted(v) for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, points in series.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
