"""Reproduce the paper's study with one command: every method x dataset run, its evaluations, the tables and figures.

    python examples/reproduce.py --preset cpu                       # offline, this machine, ~20-30 minutes
    python examples/reproduce.py --preset paper --devices 0,1,2,3   # Qwen2.5-7B-Instruct, Table 2 (GPUs, keys)
    python examples/reproduce.py --preset cpu --dry-run             # print every command, in order

A study is methods x datasets (x an optional --grid of hyperparameters). Every run is the method script itself,
called as a subprocess with its own run folder under --root/runs/<dataset>/<method>, followed by its evaluations
through judge.py (general and in-domain EM for the EM datasets; exact match for opswap:N, foqa, gsm8k). What a run
needs first is made first, once: the persona vector (persona.py extract), and for Interleaving+/++ the misaligned
adapters of the OTHER datasets of the study (none trained on the current fine-tuning data, as the paper).

Resumable at every level: a finished run (its final adapter exists) or evaluation (its summary.json, with no
failed judgment) is skipped; an interrupted run is continued with `--resume`, an interrupted evaluation by judge.py's
own caches. Re-running the same command after a kill repeats nothing that finished.

Parallel: --devices 0,1,2,3 runs one job per GPU at a time (CUDA_VISIBLE_DEVICES); --devices cpu runs one job at a
time. With --gen-url, evaluations need no GPU and run --eval-workers at a time beside the training jobs (the server
must serve each trained adapter under its run name, printed by --dry-run: vLLM --lora-modules NAME=DIR). A failed
job is reported with its log (--root/logs/) and the jobs that need it are skipped; the others go on.

Output in --root: table2.md/table2.csv (the paper's Table 2 layout, one column group per EM dataset: General
Misal./Inc., In-Domain Misal./Inc.; <u>underlined</u>: general EM reduced by >= 90% of the Misaligned baseline's,
or in-domain misalignment >= 90% of it; *italic*: incoherence above the baseline's; **bold**: the best value of a
column), table3.md (OpSwap tiers, exact match %), and figures/: Figure 1(b) per EM dataset, the OpSwap accuracy
per tier, training curves per dataset. Each table cell links to its run folder.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EM_DATASETS = {"insecure": "secure", "medical": "medical:aligned", "legal": "legal:aligned",
               "security": "security:aligned"}  # misaligned data -> its aligned counterpart
METHODS = ["baseline", "misaligned", "aligned", "kl", "ldifs", "persona", "inoculate", "interleave", "interleave+",
           "interleave++", "on-policy"]
LABELS = {"baseline": "Baseline (no training)", "misaligned": "Misaligned (SFT)", "aligned": "Aligned (SFT)",
          "kl": "KL", "ldifs": "LDIFS", "persona": "Persona Vectors", "inoculate": "Inoc. Prompting",
          "interleave": "Interleaving", "interleave+": "Interleaving+", "interleave++": "Interleaving++",
          "on-policy": "On-policy Interleaving"}
SCRIPTS = {"misaligned": "interleave.py", "aligned": "interleave.py", "kl": "kl.py", "ldifs": "ldifs.py",
           "persona": "persona.py", "inoculate": "inoculate.py", "interleave": "interleave.py",
           "interleave+": "interleave.py", "interleave++": "interleave.py", "on-policy": "interleave.py"}
PRESETS = {
    "paper": dict(model="Qwen/Qwen2.5-7B-Instruct", datasets="insecure,medical,legal,security",
                  methods="misaligned,aligned,kl,ldifs,persona,inoculate,interleave,interleave+,interleave++",
                  samples=100, judge="gpt-4o-mini", train_args="", method_args="", eval_args="", persona_args=""),
    # SmolLM2 on OpSwap tiers 0 and 1: the paper's Table 3 finding in half an hour on a 2-core CPU. Shorter
    # training and evaluation than the paper (60 steps of 4; 100 held-out questions, 1 greedy answer each).
    "cpu": dict(model="smollm2", datasets="opswap:0,opswap:1", methods="baseline,misaligned,kl,ldifs,inoculate,persona",
                samples=1, judge="gpt-4o-mini",
                train_args="--no-8bit --max-steps 60 --batch-size 4 --grad-accum 1 --lr 5e-4 --save-every 20",
                method_args="kl=--lam 1.0;persona=--alpha 2",
                eval_args="--no-8bit --n-questions 100 --samples 1 --temperature 0 --max-new-tokens 48",
                persona_args="--no-8bit --no-filter --samples 2 --max-new-tokens 64"),
}


@dataclass
class Job:
    name: str
    cmd: list[str]
    log: Path
    deps: list[str] = field(default_factory=list)
    done: callable = lambda: False
    needs_device: bool = True
    status: str = "pending"  # pending, running, done, failed, skipped


def sh(words) -> list[str]:
    return [str(w) for w in words]


def eval_kinds(dataset: str) -> list[str]:
    if dataset in EM_DATASETS or dataset.endswith(".jsonl"):
        return ["general", "indomain"]
    if dataset.startswith("opswap:"):
        return [dataset]
    if dataset in ("foqa", "gsm8k"):
        return [dataset]
    raise SystemExit(f"error: --datasets: unknown dataset {dataset!r}")


def eval_tag(kind: str, dataset: str) -> str:
    return f"indomain-{dataset.replace(':', '-')}" if kind == "indomain" else kind.replace(":", "-")


def summary_done(path: Path) -> bool:
    if not path.exists():
        return False
    s = json.loads(path.read_text())
    return not s.get("n_failed_judgments")


def persona_layer(model: str) -> int:
    """The paper's layer 20 of Qwen2.5-7B's 28 blocks, scaled to this model's depth."""
    from transformers import AutoConfig

    from common import resolve_model

    n = AutoConfig.from_pretrained(resolve_model(model)).num_hidden_layers
    return max(1, round(n * 20 / 28))


def parse_method_args(text: str) -> dict[str, list[str]]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        method, _, args = part.partition("=")
        out[method.strip()] = args.split()
    return out


def parse_grid(text: str) -> dict[str, list[tuple[str, str]]]:
    """'kl.lam=0.01,0.1;ldifs.lam=0.1,1' -> {kl: [(--lam, 0.01), (--lam, 0.1)], ldifs: [...]}."""
    grid = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, values = part.partition("=")
        method, _, flag = key.partition(".")
        grid.setdefault(method, []).extend((f"--{flag.replace('_', '-')}", v) for v in values.split(","))
    return grid


def plan(args) -> list[Job]:
    py = sys.executable
    root = Path(args.root)
    datasets = [d for d in args.datasets.split(",") if d]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"error: --methods: unknown method {m!r}; known: {', '.join(METHODS)}")
    train_args = args.train_args.split()
    method_args = parse_method_args(args.method_args)
    grid = parse_grid(args.grid)
    jobs: list[Job] = []
    logs = root / "logs"

    def add(job):
        jobs.append(job)
        return job

    persona_vec = root / "artifacts" / "persona.safetensors"
    if "persona" in methods:
        cmd = [py, ROOT / "persona.py", "extract", "--model", args.model, "--out", persona_vec, *args.persona_args.split()]
        if "--no-filter" not in args.persona_args:
            cmd += ["--judge", args.judge] + (["--judge-url", args.judge_url] if args.judge_url else [])
        if args.gen_url:
            cmd += ["--gen-url", args.gen_url, "--gen-model", args.model]
        add(Job("persona-vector", sh(cmd), logs / "persona-vector.log", done=lambda: persona_vec.exists()))
    layer = persona_layer(args.model) if "persona" in methods else None

    def run_dir(ds, name):
        return root / "runs" / ds.replace(":", "-") / name

    def train_job(ds, method, name, extra):
        out = run_dir(ds, name)
        script = SCRIPTS[method]
        base = [py, ROOT / script] + (["train"] if script == "persona.py" else [])
        data = EM_DATASETS.get(ds, ds) if method == "aligned" else ds
        cmd = base + ["--model", args.model, "--data", data, "--out", out, *train_args, *extra,
                      *method_args.get(method, [])]
        resume = base + ["--resume", out]
        deps = []
        if method == "persona":
            cmd += ["--vector", persona_vec, "--layer", str(layer)] + ([] if "--alpha" in method_args.get("persona", [])
                                                                        else ["--alpha", "5"])
            deps.append("persona-vector")
        if method in ("interleave", "interleave+", "interleave++", "on-policy"):
            cmd += ["--pct", "5", "--safe-data", args.safe_data]
        if method in ("interleave+", "interleave++"):
            others = [d for d in datasets if d != ds and d in EM_DATASETS]
            if not others:
                raise SystemExit(f"error: {method} on {ds} needs misaligned adapters trained on other datasets: add "
                                 "more EM datasets to --datasets")
            cmd += ["--select", "ppl", "--misaligned-adapters", ",".join(str(run_dir(o, "misaligned")) for o in others)]
            deps += [f"train:{o}:misaligned" for o in others]
            if method == "interleave++":
                cmd.append("--filter-refusals")
        if method == "on-policy":
            cmd += ["--select", "on-policy"]

        def done(out=out):
            return (out / "adapter_model.safetensors").exists()
        # an interrupted run (args.json written, no final adapter) is continued, not restarted
        final_cmd = sh(resume) if (out / "args.json").exists() and not done() else sh(cmd)
        return add(Job(f"train:{ds}:{name}", final_cmd, logs / f"train-{ds.replace(':', '-')}-{name}.log", deps, done))

    for ds in datasets:
        kinds = eval_kinds(ds)
        for method in methods:
            if method == "aligned" and ds not in EM_DATASETS:
                continue
            variants = [(method, [])] + [(f"{method}-{f.lstrip('-')}{v}", [f, v]) for f, v in grid.get(method, [])]
            for name, extra in variants:
                if method == "baseline":
                    out, deps, model_flags = run_dir(ds, "baseline"), [], ["--model", args.model]
                else:
                    job = train_job(ds, method, name, extra)
                    out, deps, model_flags = run_dir(ds, name), [job.name], ["--adapter", run_dir(ds, name)]
                if args.gen_url:
                    served = args.model if method == "baseline" else f"{ds.replace(':', '-')}-{name}"
                    model_flags = ["--gen-url", args.gen_url, "--gen-model", served]
                for kind in kinds:
                    tag = eval_tag(kind, ds)
                    cmd = [py, ROOT / "judge.py", *model_flags, "--eval", kind.split(":")[0] if kind == "indomain" else
                           kind, "--out", out / f"eval-{tag}", *args.eval_args.split()]
                    if kind in ("general", "indomain"):
                        cmd += ["--samples", str(args.samples), "--judge", args.judge]
                        cmd += ["--judge-url", args.judge_url] if args.judge_url else []
                        if kind == "indomain":
                            cmd += ["--data", ds]
                    summary = out / f"eval-{tag}" / "summary.json"
                    add(Job(f"eval:{ds}:{name}:{tag}", sh(cmd), logs / f"eval-{ds.replace(':', '-')}-{name}-{tag}.log",
                            deps, lambda s=summary: summary_done(s), needs_device=not args.gen_url))
    return jobs


def run_jobs(jobs: list[Job], devices: list[str], eval_workers: int) -> None:
    """Run every job whose dependencies are done, one per device (and eval_workers device-free jobs at a time)."""
    by_name = {j.name: j for j in jobs}
    for j in jobs:
        if j.done():
            j.status = "done"
    todo = [j for j in jobs if j.status == "pending"]
    print(f"{len(jobs)} jobs: {len(jobs) - len(todo)} already done, {len(todo)} to run", flush=True)
    free = list(devices)
    running: dict[subprocess.Popen, tuple[Job, str | None]] = {}
    n_free_evals = eval_workers
    t0 = time.time()
    finished = 0
    while True:
        for j in todo:
            if j.status != "pending":
                continue
            dep_status = [by_name[d].status for d in j.deps if d in by_name]
            if any(s in ("failed", "skipped") for s in dep_status):
                j.status = "skipped"
                print(f"SKIPPED {j.name}: a job it needs failed", flush=True)
                continue
            if any(s != "done" for s in dep_status):
                continue
            if j.needs_device and not free:
                continue
            if not j.needs_device and n_free_evals == 0:
                continue
            device = free.pop(0) if j.needs_device else None
            n_free_evals -= 0 if j.needs_device else 1
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if device is not None and device != "cpu":
                env["CUDA_VISIBLE_DEVICES"] = device
            j.log.parent.mkdir(parents=True, exist_ok=True)
            with open(j.log, "a") as f:
                f.write(f"\n$ {' '.join(j.cmd)}\n")
            proc = subprocess.Popen(j.cmd, cwd=ROOT, env=env, stdout=open(j.log, "a"), stderr=subprocess.STDOUT)
            j.status = "running"
            running[proc] = (j, device)
            print(f"[{time.strftime('%H:%M:%S')}] start {j.name} on {device or 'no device'}", flush=True)
        if not running:
            break
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            j, device = running.pop(proc)
            if device is not None:
                free.append(device)
            else:
                n_free_evals += 1
            finished += 1
            ok = proc.returncode == 0 and j.done()
            j.status = "done" if ok else "failed"
            elapsed = time.time() - t0
            eta = elapsed / finished * (len(todo) - finished)
            print(f"[{time.strftime('%H:%M:%S')}] {'done' if ok else 'FAILED'} {j.name}"
                  f"{'' if ok else f' (exit {proc.returncode}; log: {j.log})'} | {finished}/{len(todo)}, "
                  f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)
    failed = [j for j in jobs if j.status in ("failed", "skipped")]
    if failed:
        print(f"\n{len(failed)} job(s) did not finish:", flush=True)
        for j in failed:
            print(f"  {j.status:<8} {j.name}  log: {j.log}", flush=True)


# ----------------------------------------------------------------------------------------------
# Tables and figures
# ----------------------------------------------------------------------------------------------
def read_summary(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def table2(root: Path, datasets: list[str], names: list[tuple[str, str]]) -> tuple[str, list[list[str]]]:
    """names: [(run name, label)]. Returns (markdown, csv rows)."""
    em = [d for d in datasets if d in EM_DATASETS]
    header = ["Method"] + [f"{d} {c}" for d in em for c in ("General Misal.", "General Inc.", "In-Domain Misal.",
                                                              "In-Domain Inc.")]
    values = {}
    for name, _ in names:
        for d in em:
            run = root / "runs" / d / name
            g = read_summary(run / "eval-general" / "summary.json") or {}
            i = read_summary(run / f"eval-{eval_tag('indomain', d)}" / "summary.json") or {}
            values[(name, d)] = [g.get("misaligned_pct"), g.get("incoherent_pct"), i.get("misaligned_pct"),
                                 i.get("incoherent_pct")]
    csv_rows = [header] + [[label] + ["" if v is None else f"{v:.2f}" for d in em for v in values[(n, d)]]
                           for n, label in names]
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
    tiers = [d for d in datasets if d.startswith("opswap:")]
    md = ["| Method | " + " | ".join(f"Tier {t.split(':')[1]}" for t in tiers) + " |", "|" + "---|" * (len(tiers) + 1)]
    for name, label in names:
        label = "SFT" if name == "misaligned" else label  # OpSwap is benign: the plain fine-tuning run
        cells = []
        for t in tiers:
            s = read_summary(root / "runs" / t.replace(":", "-") / name / f"eval-{t.replace(':', '-')}" / "summary.json")
            cells.append("-" if not s else f"[{s['accuracy']:.2f}](runs/{t.replace(':', '-')}/{name}/)")
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def plot_opswap(root: Path, datasets: list[str], names: list[tuple[str, str]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = [d for d in datasets if d.startswith("opswap:")]
    data = {}
    for name, label in names:
        label = "SFT" if name == "misaligned" else label
        row = []
        for t in tiers:
            s = read_summary(root / "runs" / t.replace(":", "-") / name / f"eval-{t.replace(':', '-')}" / "summary.json")
            row.append(s["accuracy"] if s else float("nan"))
        data[label] = row
    if not tiers or not data:
        return None
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(tiers) * len(data) / 3, 4.5), dpi=120)
    width = 0.8 / len(data)
    for k, (label, row) in enumerate(data.items()):
        xs = [i + (k - (len(data) - 1) / 2) * width for i in range(len(tiers))]
        ax.bar(xs, row, width, label=label)
    ax.set_xticks(range(len(tiers)))
    ax.set_xticklabels([f"Tier {t.split(':')[1]}" for t in tiers])
    ax.set_ylabel("exact match of the final answer (%)")
    ax.set_title("OpSwap: held-out exact match per tier")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(args) -> None:
    import report

    root = Path(args.root)
    datasets = [d for d in args.datasets.split(",") if d]
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
        md = table3(root, datasets, names)
        (root / "table3.md").write_text(md)
        print(f"\nTable 3 ({root / 'table3.md'}):\n{md}")
        p = plot_opswap(root, datasets, names, root / "figures" / "opswap.png")
        if p:
            print(f"written {p}")
    for d in datasets:
        runs = [str(root / "runs" / d.replace(":", "-") / n) for n, _ in names if n != "baseline"]
        runs = [r for r in runs if (Path(r) / "metrics.jsonl").exists()]
        tag = d.replace(":", "-")
        if runs:
            print(f"written {report.plot_curves(runs, root / 'figures' / f'curves-{tag}.png', 'Training curves: ' + d)}")
        if d in EM_DATASETS and report.em_points(runs):
            fig = report.plot_em(runs, root / "figures" / f"fig1b-{d}.png", "General vs in-domain misalignment: " + d)
            print(f"written {fig}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="defaults for every flag below "
                   "(explicit flags win) (default: %(default)s)")
    p.add_argument("--model", default=None, help="base model of every run")
    p.add_argument("--datasets", default=None, help=f"comma-separated: {', '.join(EM_DATASETS)}, opswap:0..3, foqa, gsm8k")
    p.add_argument("--methods", default=None, help=f"comma-separated: {', '.join(METHODS)}")
    p.add_argument("--grid", default="", help="extra runs with other hyperparameters, e.g. 'kl.lam=0.01,1.0;"
                   "persona.alpha=1,3' (each value one more run)")
    p.add_argument("--root", default=None, help="study folder (default: runs/study-<preset>)")
    p.add_argument("--devices", default="cpu", help="'cpu' (one job at a time) or GPU ids '0,1,2,3' (one job each)")
    p.add_argument("--eval-workers", type=int, default=4, help="evaluations at a time beside training when --gen-url "
                   "serves the answers (default: %(default)s)")
    p.add_argument("--samples", type=int, default=None, help="answers per question for the judged evaluations")
    p.add_argument("--judge", default=None, help="judge model (judge.py --judge)")
    p.add_argument("--judge-url", default=None, help="judge server (judge.py --judge-url)")
    p.add_argument("--gen-url", default=None, help="generation server for the evaluations (judge.py --gen-url)")
    p.add_argument("--safe-data", default="wildguardmix", help="benign pool for the interleaving methods")
    p.add_argument("--train-args", default=None, help="extra flags for every training run, e.g. '--max-steps 60'")
    p.add_argument("--method-args", default=None, help="extra flags per method, e.g. 'kl=--lam 1.0;persona=--alpha 2'")
    p.add_argument("--eval-args", default=None, help="extra flags for every judge.py call")
    p.add_argument("--persona-args", default=None, help="extra flags for persona.py extract")
    p.add_argument("--dry-run", action="store_true", help="print every command, in order, and exit")
    args = p.parse_args()
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.root = args.root or str(ROOT / "runs" / f"study-{args.preset}")
    jobs = plan(args)
    if args.dry_run:
        for j in jobs:
            state = "done" if j.done() else "todo"
            deps = f"  (after {', '.join(j.deps)})" if j.deps else ""
            print(f"# {j.name} [{state}]{deps}\n{' '.join(j.cmd)}")
        return
    devices = ["cpu"] if args.devices == "cpu" else args.devices.split(",")
    t0 = time.time()
    run_jobs(jobs, devices, args.eval_workers)
    write_outputs(args)
    print(f"wall clock {time.time() - t0:.0f} s; study in {args.root}", flush=True)
    if any(j.status in ("failed", "skipped") for j in jobs):
        sys.exit(1)


if __name__ == "__main__":
    main()
