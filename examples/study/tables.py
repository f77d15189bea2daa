"""The paper's tables from a study's finished runs (Table 2: EM datasets, 3: OpSwap tiers, 4: FoQA, 5: GRPO), the
departures from the paper under each, and the figures (drawn by report.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .jobs import eval_tag, flag_value, parse_grid, parse_method_args, study_datasets, study_tables
from .presets import (
    DATA_ROWS,
    EM_DATASETS,
    GRPO_ROWS,
    LABELS,
    PAPER_NO_FINETUNING,
    PAPER_TABLE3,
    PAPER_TABLE4,
    model_depth,
    persona_layer,
)


def read_summary(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def table2(root: Path, datasets: list[str], names: list[tuple[str, str]]) -> tuple[str, list[list[str]]]:
    """names: [(run name, label)]. Returns (markdown, csv rows)."""
    em = [d for d in datasets if d in EM_DATASETS]
    header = ["Method"] + [
        f"{d} {c}" for d in em for c in ("General Misal.", "General Inc.", "In-Domain Misal.", "In-Domain Inc.")
    ]
    values = {}
    for name, _ in names:
        for d in em:
            run = root / "runs" / d / name
            g = read_summary(run / "eval-general" / "summary.json") or {}
            i = read_summary(run / f"eval-{eval_tag('indomain', d)}" / "summary.json") or {}
            values[(name, d)] = [
                g.get("misaligned_pct"),
                g.get("incoherent_pct"),
                i.get("misaligned_pct"),
                i.get("incoherent_pct"),
            ]
    csv_rows = [header] + [
        [label] + ["" if v is None else f"{v:.2f}" for d in em for v in values[(n, d)]] for n, label in names
    ]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, label in names:
        cells = [label]
        for d in em:
            base = values.get(("misaligned", d), [None] * 4)
            col_vals = {k: [values[(n, d)][k] for n, _ in names if values[(n, d)][k] is not None] for k in range(4)}
            for k, v in enumerate(values[(name, d)]):
                if v is None:
                    cells.append("-")
                    continue
                text = f"[{v:.2f}](runs/{d}/{name}/)"
                best = (min if k in (0, 1, 3) else max)(col_vals[k]) if col_vals[k] else None
                if name != "misaligned" and base[k] is not None:
                    if k == 0 and v <= 0.1 * base[0]:
                        text = f"<u>{text}</u>"  # EM reduced by >= 90%
                    if k == 2 and v >= 0.9 * base[2]:
                        text = f"<u>{text}</u>"  # in-domain learning kept: >= 90% of the Misaligned baseline
                    if k in (1, 3) and v > base[k]:
                        text = f"*{text}*"  # more incoherent than the baseline
                if best is not None and v == best and len(col_vals[k]) > 1:
                    text = f"**{text}**"
                cells.append(text)
        md.append("| " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n", csv_rows


def table3(root: Path, datasets: list[str], names: list[tuple[str, str]]) -> str:
    """OpSwap exact match per tier, ours with the paper's beside (ours (paper)), each cell linked to its run."""
    tiers = [d for d in datasets if d.startswith("opswap:")]
    md = [
        "| Method | " + " | ".join(f"Tier {t.split(':')[1]} (paper)" for t in tiers) + " |",
        "|" + "---|" * (len(tiers) + 1),
    ]
    for name, label in names:
        label = "SFT" if name == "misaligned" else label  # OpSwap is benign: the plain fine-tuning run
        cells = []
        for t in tiers:
            s = read_summary(
                root / "runs" / t.replace(":", "-") / name / f"eval-{t.replace(':', '-')}" / "summary.json"
            )
            paper = PAPER_TABLE3.get(name, [None] * 4)[int(t.split(":")[1])]
            ref = f" ({paper:.2f})" if paper is not None else ""
            cells.append(("-" if not s else f"[{s['accuracy']:.2f}](runs/{t.replace(':', '-')}/{name}/)") + ref)
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def table4(root: Path, names: list[tuple[str, str]]) -> str:
    md = ["| Method | FoQA Score (%) | paper |", "|---|---|---|"]
    for name, label in names:
        s = read_summary(root / "runs" / "foqa" / name / "eval-foqa" / "summary.json")
        paper = PAPER_TABLE4.get(name)
        ours = "-" if not s else f"[{s['accuracy']:.2f}](runs/foqa/{name}/)"
        md.append(
            f"| {'SFT' if name == 'misaligned' else label} | {ours} | {'' if paper is None else f'{paper:.2f}'} |"
        )
    return "\n".join(md) + "\n"


def grpo_results(root: Path, seeds: list[str]) -> dict:
    """row -> {'final': [greedy held-out accuracy per seed], 'sampled': [sampled held-out accuracy per seed, where
    logged (--eval-samples)], 'rewards': [[reward per step] per seed]}; and 'start' (the same keys, before GRPO)."""
    out = {"start": {"final": [], "sampled": []}}
    for name, *_ in GRPO_ROWS:
        final, sampled, rewards = [], [], []
        for seed in seeds:
            d = root / "runs" / "grpo" / f"{name}-seed{seed}"
            m = (
                [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
                if (d / "adapter_model.safetensors").exists()
                else []
            )
            if m and "heldout_accuracy" in m[-1]:
                final.append(m[-1]["heldout_accuracy"])
                sampled += [m[-1]["heldout_sampled_accuracy"]] if "heldout_sampled_accuracy" in m[-1] else []
                rewards.append([x["reward"] for x in m])
            if name == "grpo" and (d / "heldout-before.json").exists():
                before = json.loads((d / "heldout-before.json").read_text())
                out["start"]["final"].append(before["heldout_accuracy"])
                out["start"]["sampled"] += (
                    [before["heldout_sampled_accuracy"]] if "heldout_sampled_accuracy" in before else []
                )
        out[name] = {"final": final, "sampled": sampled, "rewards": rewards}
    return out


def mean_std(values: list[float]) -> str:
    import statistics

    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f} (n={len(values)})"


def table5(root: Path, seeds: list[str], warmup: bool) -> str:
    res = grpo_results(root, seeds)
    first = "No fine-tuning" + (" (after the SFT warm-up)" if warmup else "")
    rows = [(first, res["start"], PAPER_NO_FINETUNING)] + [
        (label, res[name], paper) for name, label, _, paper in GRPO_ROWS
    ]
    if not any(r["sampled"] for _, r, _ in rows):
        md = ["| Method | Held-out acc. (%), mean ± std over seeds | paper |", "|---|---|---|"]
        md += [f"| {label} | {mean_std(r['final'])} | {paper:.2f} |" for label, r, paper in rows]
    else:  # grpo.py --eval-samples: the sampled accuracy beside the greedy one
        md = [
            "| Method | Held-out acc. (%), greedy, mean ± std over seeds | sampled (rollout temperature) | paper |",
            "|---|---|---|---|",
        ]
        md += [
            f"| {label} | {mean_std(r['final'])} | {mean_std(r['sampled'])} | {paper:.2f} |" for label, r, paper in rows
        ]
    return "\n".join(md) + "\n"


def plot_grpo_rewards(root: Path, seeds: list[str], path: Path) -> Path | None:
    """Table 5's reward curves: each row's mean reward per step over its seeds, with the min-max band."""
    import report

    res = grpo_results(root, seeds)
    curves = {f"{label} ({len(res[name]['rewards'])} seeds)": res[name]["rewards"] for name, label, *_ in GRPO_ROWS}
    return report.plot_bands(
        {label: c for label, c in curves.items() if c},
        path,
        xlabel="GRPO step",
        ylabel="mean reward of the step's completions (max 9.5)",
        title="GRPO rewards per defense (mean over seeds, band: min-max)",
    )


def pool_note(safe_data: str) -> str:
    if safe_data == "wildguardmix":
        return "- Benign pool: WildGuardMix, as the paper."
    if safe_data == "benign":
        safe_data = (
            "examples/benign_prompts.jsonl (305 harmless requests written for this project), answered once "
            "per study by the base model (artifacts/benign.jsonl)"
        )
    return f"- Benign pool for the interleaving rows: {safe_data}, not WildGuardMix."


def departures(args, table: str) -> str:
    """What this study does differently from the paper, written under its table (the flags it ran with)."""
    if args.preset != "cpu":
        return ""
    m = parse_method_args(args.method_args)
    model = args.model if table == "3" else args.grpo_model
    bits = (
        "full precision (--no-8bit)"
        if "--no-8bit" in (args.train_args if table == "3" else args.grpo_args)
        else "8-bit"
    )
    lines = [
        "",
        "Departures from the paper (the `cpu` preset, to run offline on a 2-core CPU):",
        f"- Model: {'SmolLM2-135M-Instruct' if model == 'smollm2' else model}, {bits}; the paper: "
        f"{'Qwen2.5-7B-Instruct' if table == '3' else 'Qwen2.5-3B-Instruct'} in 8-bit.",
    ]
    if table == "3":
        lines += [
            f"- Training: {f'the first {args.train_n} training examples of each tier' if args.train_n else 'each tier'}"
            f", with `{args.train_args}`; the paper trains on the whole tier with its Table 6 settings.",
            f"- Evaluation: `{args.eval_args}` (greedy single answers, when --temperature 0), "
            "not the paper's settings.",
            pool_note(args.safe_data),
            "- Interleaving+/++: the misaligned models are the SFT adapters of the other OpSwap tiers of this study "
            "(no EM dataset is in it), not EM-misaligned adapters.",
            f"- KL: `{' '.join(m.get('kl', ['--lam 0.1']))}` (paper: lambda 0.1); persona: "
            f"`{' '.join(m.get('persona', ['--alpha 5']))}` at layer {persona_layer(args.model)} of "
            f"{model_depth(args.model)} (paper: alpha 5 at layer 20 of 28)"
            + (
                ", its vector extracted without the judge filter (--no-filter)."
                if "--no-filter" in args.persona_args
                else "."
            ),
            f"- CAFT (not in the paper): the top {args.caft_k} PCA direction(s) of the SFT adapter's residual "
            "differences on 32 training prompts of the tier, ablated at the persona layer.",
        ]
    else:
        lines += [
            "- Task: "
            + ("one-step sums (`--data arith`, generated offline)" if args.grpo_data == "arith" else args.grpo_data)
            + "; held-out accuracy is exact match of the final number (reward/correct "
            "= 3), not a GPT-4.1-nano judge; one greedy answer per question"
            + (
                f", and (sampled column) {flag_value(args.grpo_args, '--eval-samples')} answers per question at "
                "the rollouts' temperature and top-p, one fixed draw (the paper does not say how it decoded)."
                if flag_value(args.grpo_args, "--eval-samples")
                else "."
            ),
            *(
                [
                    f"- An SFT warm-up on correctly formatted answers (`{args.warmup_args}`) before GRPO, so that "
                    "completions carry the tags and rewards vary within a group; every row starts from it, and the "
                    "first "
                    "row is that warm-up model."
                ]
                if args.grpo_data == "arith"
                else []
            ),
            f"- GRPO: `{args.grpo_args}`; the paper: 1 epoch of GSM8K.",
            f"- Persona rows use the study's vector at layer {persona_layer(args.grpo_model)}; interleaving rows the "
            "study's benign pool.",
        ]
    return "\n".join(lines) + "\n"


def plot_opswap(root: Path, datasets: list[str], names: list[tuple[str, str]], path: Path) -> Path | None:
    """Table 3 as bars: exact match per OpSwap tier, one bar per method."""
    import report

    tiers = [d for d in datasets if d.startswith("opswap:")]
    data = {}
    for name, label in names:
        row = []
        for t in tiers:
            tag = t.replace(":", "-")
            s = read_summary(root / "runs" / tag / name / f"eval-{tag}" / "summary.json")
            row.append(s["accuracy"] if s else float("nan"))
        data["SFT" if name == "misaligned" else label] = row
    if not tiers or not data:
        return None
    return report.plot_bars(
        [f"Tier {t.split(':')[1]}" for t in tiers],
        data,
        path,
        ylabel="exact match of the final answer (%)",
        title="OpSwap: held-out exact match per tier",
    )


def plot_data_row(root: Path, dataset: str, method: str, key: str, default: str, names: list[str]):
    """realign (against N benign examples) or data-mix (against the % of aligned answers): general and in-domain
    misalignment, or the task's accuracy, of each of the row's runs against its value; the dataset's Misaligned run,
    when the study has it, is the point at 0 (no benign example added; none of the answers aligned). No figure (None)
    when no run of the row has an evaluation: a figure with the Misaligned point alone would show a row that never
    ran."""
    import report

    tag = dataset.replace(":", "-")
    flag = key.lstrip("-")
    series: dict[str, list[tuple[float, float]]] = {"general misaligned %": [], "in-domain misaligned %": []}
    row_runs = 0
    for name in names:
        if name == "misaligned":
            value = 0.0
        elif name == method or name.startswith(f"{method}-{flag}"):
            value = float(default if name == method else name.removeprefix(f"{method}-{flag}"))
        else:
            continue
        run = root / "runs" / tag / name
        general = read_summary(run / "eval-general" / "summary.json") or {}
        indomain = read_summary(run / f"eval-{eval_tag('indomain', dataset)}" / "summary.json") or {}
        task = read_summary(run / f"eval-{tag}" / "summary.json") or {}
        for label, y in (("general misaligned %", general.get("misaligned_pct")),
                         ("in-domain misaligned %", indomain.get("misaligned_pct")),
                         ("accuracy %", task.get("accuracy"))):  # fmt: skip
            if y is not None:
                series.setdefault(label, []).append((value, y))
                row_runs += name != "misaligned"
    if not row_runs:
        return None
    if method == "realign":
        what, title = "benign examples added to the Misaligned adapter's training (N)", f"Re-alignment: {dataset}"
    else:
        what, title = "% of the fine-tuning answers from the aligned counterpart", f"Data mix: {dataset}"
    return report.plot_xy(series, root / "figures" / f"{method}-{tag}.png", what, "% of the answers", title)


def write_outputs(args) -> None:
    import report

    root = Path(args.root)
    datasets = study_datasets(args)
    methods = [m for m in args.methods.split(",") if m]
    grid = parse_grid(args.grid)
    names = []
    for m in methods:
        names.append((m, LABELS[m]))
        names += [(f"{m}-{f.lstrip('-')}{v}", f"{LABELS[m]} ({f.lstrip('-')} {v})") for f, v in grid.get(m, [])]
    if any(d in EM_DATASETS for d in datasets):
        md, rows = table2(root, datasets, [n for n in names if n[0] != "baseline"])
        (root / "table2.md").write_text(md)
        with open(root / "table2.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
        print(f"\nTable 2 ({root / 'table2.md'}):\n{md}")
    if any(d.startswith("opswap:") for d in datasets):
        md = table3(root, datasets, [n for n in names if n[0] != "aligned"]) + departures(args, "3")
        (root / "table3.md").write_text(md)
        print(f"\nTable 3 ({root / 'table3.md'}):\n{md}")
        p = plot_opswap(root, datasets, names, root / "figures" / "opswap.png")
        if p:
            print(f"written {p}")
    if "foqa" in datasets:
        md = table4(root, [n for n in names if n[0] != "aligned"])
        (root / "table4.md").write_text(md)
        print(f"\nTable 4 ({root / 'table4.md'}):\n{md}")
    if "5" in study_tables(args):
        seeds = [s for s in args.grpo_seeds.split(",") if s]
        md = table5(root, seeds, args.grpo_data == "arith") + departures(args, "5")
        (root / "table5.md").write_text(md)
        print(f"\nTable 5 ({root / 'table5.md'}):\n{md}")
        p = plot_grpo_rewards(root, seeds, root / "figures" / "grpo-rewards.png")
        if p:
            print(f"written {p}")
    for d in datasets:
        runs = [str(root / "runs" / d.replace(":", "-") / n) for n, _ in names if n != "baseline"]
        runs = [r for r in runs if (Path(r) / "metrics.jsonl").exists()]
        tag = d.replace(":", "-")
        if runs:
            print(
                f"written {report.plot_curves(runs, root / 'figures' / f'curves-{tag}.png', 'Training curves: ' + d)}"
            )
        if d in EM_DATASETS and report.em_points(runs):
            fig = report.plot_em(runs, root / "figures" / f"fig1b-{d}.png", "General vs in-domain misalignment: " + d)
            print(f"written {fig}")
        for method, (key, default) in DATA_ROWS.items():
            given = parse_method_args(args.method_args).get(method, [])  # the row's own value, as the plan takes it
            default = flag_value(given, key) or default
            fig = plot_data_row(root, d, method, key, default, [n for n, _ in names])
            if fig:
                print(f"written {fig}")
