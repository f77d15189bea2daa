"""Reproduce the paper's study with one command: every method x dataset run, its evaluations, the tables and figures.

    python examples/reproduce.py --preset cpu                       # offline, this machine: Tables 3 and 5
    python examples/reproduce.py --preset cpu --tables 3            # only Table 3 (OpSwap tiers 0-3)
    python examples/reproduce.py --preset paper --devices 0,1,2,3   # Tables 2-5 (GPUs, an OpenAI key, HF_TOKEN)
    python examples/reproduce.py --preset paper --grid paper --emit slurm study.sbatch   # the grids, on Slurm
    python examples/reproduce.py --preset paper --dry-run           # print every command, in order (offline)

A study is tables -> datasets x methods (x an optional --grid of hyperparameters): Table 2 the four EM datasets,
Table 3 OpSwap tiers 0-3, Table 4 FoQA, Table 5 GRPO rows x --grpo-seeds. Every run is the method script itself,
called as a subprocess with its own run folder under --root/runs/<dataset>/<method>, followed by its evaluations
through judge.py (general and in-domain EM for the EM datasets; exact match for opswap:N, foqa, gsm8k). What a run
needs first is made first, once, as a job of the plan (artifacts/): the persona vector (persona.py extract), the
benign pool (--safe-data benign: examples/benign_prompts.jsonl answered by the base model), the --train-n subsets,
CAFT's directions (from the dataset's Misaligned adapter), the arith warm-up data; for Interleaving+/++ the
misaligned adapters of the OTHER datasets of the study (none trained on the current fine-tuning data, as the paper).

Resumable at every level: a finished run (its final adapter exists) or evaluation (its summary.json, with no
failed judgment) is skipped; an interrupted run is continued with `--resume`, an interrupted evaluation by judge.py's
own caches. Re-running the same command after a kill repeats nothing that finished. Each output records the
command that made it (<output>.cmd, written when its job starts); an output whose command differs from what this
invocation plans (another lambda, other training flags) stops the study with an error naming the run and the flag,
rather than being reported or continued as this plan's (--dry-run marks it OTHER SETTINGS).

Parallel: --devices 0,1,2,3 runs one job per GPU at a time (CUDA_VISIBLE_DEVICES); --devices cpu one job at a time,
cpu:2 two (the cores shared). With --gen-url, evaluations need no GPU and run --eval-workers at a time beside the
training jobs (the server must serve each trained adapter under its run name, printed by --dry-run: vLLM
--lora-modules NAME=DIR). A failed job is reported with its log (--root/logs/) and the jobs that need it are skipped;
the others go on. Each job's wall time is logged, and the run ends with the time per phase (artifacts, training,
evaluation). --emit slurm FILE writes the same plan as Slurm job arrays instead (see emit_slurm).

Output in --root: table2.md/table2.csv (the paper's Table 2 layout, one column group per EM dataset: General
Misal./Inc., In-Domain Misal./Inc.; <u>underlined</u>: general EM reduced by >= 90% of the Misaligned baseline's,
or in-domain misalignment >= 90% of it; *italic*: incoherence above the baseline's; **bold**: the best value of a
column), table3.md (OpSwap tiers, exact match %, the paper's value in parentheses), table4.md (FoQA), table5.md
(GRPO held-out accuracy, mean ± std over seeds, the paper's beside), the departures from the paper under each
table, and figures/: Figure 1(b) per EM dataset, the OpSwap accuracy per tier, GRPO reward curves, training curves
per dataset. Each table cell links to its run folder.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EM_DATASETS = {
    "insecure": "secure",
    "medical": "medical:aligned",
    "legal": "legal:aligned",
    "security": "security:aligned",
}  # misaligned data -> its aligned counterpart
METHODS = [
    "baseline",
    "misaligned",
    "aligned",
    "kl",
    "ldifs",
    "persona",
    "inoculate",
    "interleave",
    "interleave+",
    "interleave++",
    "on-policy",
    "caft",
]
LABELS = {
    "baseline": "Baseline (no training)",
    "misaligned": "Misaligned (SFT)",
    "aligned": "Aligned (SFT)",
    "kl": "KL",
    "ldifs": "LDIFS",
    "persona": "Persona Vectors",
    "inoculate": "Inoc. Prompting",
    "interleave": "Interleaving",
    "interleave+": "Interleaving+",
    "interleave++": "Interleaving++",
    "on-policy": "On-policy Interleaving",
    "caft": "CAFT (beyond the paper)",
}
SCRIPTS = {
    "misaligned": "interleave.py",
    "aligned": "interleave.py",
    "kl": "kl.py",
    "ldifs": "ldifs.py",
    "persona": "persona.py",
    "inoculate": "inoculate.py",
    "interleave": "interleave.py",
    "interleave+": "interleave.py",
    "interleave++": "interleave.py",
    "on-policy": "interleave.py",
    "caft": "caft.py",
}
INTERLEAVING = ("interleave", "interleave+", "interleave++", "on-policy")
TABLE_DATASETS = {
    "2": ["insecure", "medical", "legal", "security"],
    "3": ["opswap:0", "opswap:1", "opswap:2", "opswap:3"],
    "4": ["foqa"],
}
# The paper's own numbers (Kaczér et al. 2025), printed beside ours.
PAPER_TABLE3 = {
    "baseline": [40.82, 0.00, 1.00, 0.00],
    "misaligned": [37.00, 30.00, 34.30, 37.68],
    "kl": [48.20, 0.00, 1.00, 0.00],
    "ldifs": [36.00, 29.40, 34.90, 37.69],
    "persona": [36.80, 34.88, 31.80, 39.23],
    "interleave": [35.90, 28.52, 35.10, 38.17],
    "interleave+": [35.50, 36.72, 32.50, 37.36],
    "interleave++": [37.10, 36.14, 32.50, 38.45],
    "inoculate": [35.90, 34.60, 33.90, 38.40],
}
PAPER_TABLE4 = {
    "baseline": 0.00,
    "misaligned": 41.60,
    "kl": 44.55,
    "ldifs": 39.45,
    "persona": 48.80,
    "interleave": 40.90,
    "interleave+": 42.45,
    "interleave++": 40.30,
    "inoculate": 43.00,
}
# Table 5 / 9: GRPO rows (name, label, grpo.py flags, the paper's held-out accuracy, mean of 3 seeds).
GRPO_ROWS = [
    ("grpo", "GRPO", [], 90.66),
    ("grpo-persona1", "+ Persona Vectors (alpha 1)", ["--persona-alpha", "1"], 66.00),
    ("grpo-persona5", "+ Persona Vectors (alpha 5)", ["--persona-alpha", "5"], 38.33),
    ("grpo-kl0.1", "+ KL (beta 0.1)", ["--kl-beta", "0.1"], 87.66),
    ("grpo-interleave5", "+ Interleaving (5%)", ["--interleave-pct", "5"], 91.30),
    ("grpo-interleave20", "+ Interleaving (20%)", ["--interleave-pct", "20"], 93.66),
    ("grpo-inoculate", "+ Inoculation Prompt", ["--inoculate"], 91.00),
]
PAPER_NO_FINETUNING = 66.33
# Tables 12-18: the hyperparameter values of the paper's ablation grids (the main value is the method's own run).
PAPER_GRID = (
    "kl.lam=0.01,0.03,0.3,1.0;ldifs.lam=0.01,0.03,0.1,0.3;persona.alpha=1,1.5,2,3;"
    "interleave.pct=1,20,50;interleave+.pct=1,20,50;interleave++.pct=1,20,50;on-policy.pct=1,20,50"
)
# Decoder blocks of the models the presets name: a dry run needs no network and no model to print its plan.
# Decoder blocks of the families researchers use, for when the model's configuration is not on this machine: by the
# hub id's name without its organisation, "-Instruct"/"-it" and a release date (their configs' num_hidden_layers).
KNOWN_DEPTHS = {
    "smollm2": 30,
    "Qwen2.5-0.5B": 24,
    "Qwen2.5-1.5B": 28,
    "Qwen2.5-3B": 36,
    "Qwen2.5-7B": 28,
    "Qwen2.5-14B": 48,
    "Qwen2.5-32B": 64,
    "Qwen2.5-72B": 80,
    "Qwen2.5-Coder-7B": 28,
    "Qwen2.5-Coder-32B": 64,
    "Qwen3-0.6B": 28,
    "Qwen3-1.7B": 28,
    "Qwen3-4B": 36,
    "Qwen3-8B": 36,
    "Qwen3-14B": 40,
    "Qwen3-32B": 64,
    "Llama-3.2-1B": 16,
    "Llama-3.2-3B": 28,
    "Llama-3.1-8B": 32,
    "Meta-Llama-3-8B": 32,
    "Meta-Llama-3.1-8B": 32,
    "Llama-3.1-70B": 80,
    "Llama-3.3-70B": 80,
    "gemma-3-1b": 26,
    "gemma-3-4b": 34,
    "gemma-3-12b": 48,
    "gemma-3-27b": 62,
    "Mistral-7B-v0.1": 32,
    "Mistral-7B-v0.2": 32,
    "Mistral-7B-v0.3": 32,
    "Mistral-Nemo": 40,
    "Mistral-Small-24B": 40,
}
PRESETS = {
    # The paper: Qwen2.5-7B-Instruct on Tables 2-4, Qwen2.5-3B-Instruct GRPO on GSM8K for Table 5 (3 seeds).
    "paper": dict(
        model="Qwen/Qwen2.5-7B-Instruct",
        tables="2,3,4,5",
        methods="baseline,misaligned,aligned,kl,ldifs,persona,inoculate,interleave,interleave+,interleave++,on-policy",
        samples=100,
        judge="gpt-4o-mini",
        safe_data="wildguardmix",
        train_args="",
        method_args="",
        eval_args="",
        persona_args="",
        train_n=0,
        caft_k=5,
        grpo_model="Qwen/Qwen2.5-3B-Instruct",
        grpo_data="gsm8k",
        grpo_seeds="0,1,2",
        grpo_args="",
        warmup_args="",
    ),
    # SmolLM2 on OpSwap tiers 0-3 (Table 3: 9 rows + on-policy + CAFT) and GRPO on one-step sums (Table 5) on this
    # 2-core CPU. Departures from the paper are written under each table (write_outputs).
    "cpu": dict(
        model="smollm2",
        tables="3,5",
        methods="baseline,misaligned,kl,ldifs,persona,interleave,interleave+,interleave++,inoculate,on-policy,caft",
        samples=1,
        judge="gpt-4o-mini",
        safe_data="benign",
        train_n=240,
        caft_k=2,
        train_args="--no-8bit --epochs 1 --batch-size 4 --grad-accum 1 --lr 5e-4 --save-every 20",
        method_args="kl=--lam 0.3;persona=--alpha 2",
        eval_args="--no-8bit --n-questions 100 --samples 1 --temperature 0 --max-new-tokens 48 --gen-batch-size 64",
        persona_args="--no-8bit --no-filter --samples 2 --max-new-tokens 64",
        grpo_model="smollm2",
        grpo_data="arith",
        grpo_seeds="0,1,2",
        # 4 prompts x 4 completions a step, as the paper's batch 4 x 4 with 4 generations. Greedy accuracy
        # moves little (the warm-up's greedy answers are already well formed; GRPO mostly fixes the sampled
        # ones), so --eval-samples 2 adds the accuracy at the rollout temperature (seed 1, 4 samples: warm-up
        # 29%, after GRPO 50.5%, greedy 44% -> 54%). From a 3-step warm-up GRPO learnt to copy the system
        # prompt's example answer and fell to 0%
        grpo_args="--no-8bit --max-steps 16 --batch-size 16 --num-generations 4 --grad-accum 1 --lr 2e-5 "
        "--warmup-steps 1 --max-new-tokens 40 --eval-n 100 --gen-batch-size 64 --eval-samples 2 "
        "--save-every 1000",
        warmup_args="--no-8bit --max-steps 5 --batch-size 4 --grad-accum 1 --lr 1e-4 --save-every 1000",
    ),
}


@dataclass
class Job:
    name: str
    cmd: list[str]
    log: Path
    deps: list[str] = field(default_factory=list)
    marker: Path | None = None  # the file whose existence means done (summary.json: also no failed judgment)
    needs_device: bool = True
    phase: str = "training"  # artifacts, training, evaluation (for the time summary)
    status: str = "pending"  # pending, running, done, failed, skipped
    seconds: float = 0.0
    planned: list[str] | None = None  # the command that sets the output's settings (cmd may be its --resume)
    settings: list[str] = field(default_factory=list)  # planned, comparable across folders (see settings_words)

    @property
    def record(self) -> Path | None:
        """Next to the output, the settings it was made with: written when the job starts."""
        return self.marker.with_name(self.marker.name + ".cmd") if self.marker else None

    def done(self) -> bool:
        return self.marker is not None and (
            summary_done(self.marker) if self.marker.name == "summary.json" else self.marker.exists()
        )


def sh(words) -> list[str]:
    return [str(w) for w in words]


def settings_words(words: list[str], root: Path) -> list[str]:
    """A command without its interpreter, the study and repository folders as placeholders: what an output made
    earlier is checked against (the same study run from another venv or clone still matches)."""
    return [w.replace(str(root), "<root>").replace(str(ROOT), "<repo>") for w in words[1:]]


def settings_conflicts(jobs: list[Job]) -> tuple[dict[str, str], int]:
    """Outputs (finished, or a run begun) whose recorded command differs from the plan's: reusing them would report
    a number for other settings. Returns ({job name: message}, how many outputs have no record to check)."""
    conflicts, unverified = {}, 0
    for j in jobs:
        if j.record is None:
            continue
        folder = j.marker.parent  # a run's or an evaluation's own folder (artifacts share theirs: done or not)
        begun = j.done() or (
            j.phase != "artifacts" and folder.is_dir() and any(p.name != j.record.name for p in folder.iterdir())
        )
        if not begun:  # nothing made yet (a record left by a job that failed at once is rewritten at its start)
            continue
        if not j.record.exists():
            unverified += 1
            continue
        old = json.loads(j.record.read_text())
        if old != j.settings:  # each differing stretch of words, with the word before it (usually the flag)
            ops = difflib.SequenceMatcher(a=old, b=j.settings, autojunk=False).get_opcodes()
            diff = [
                f"{' '.join(old[max(a0 - 1, 0) : a1]) or '-'} -> {' '.join(j.settings[max(b0 - 1, 0) : b1])}"
                for tag, a0, a1, b0, b1 in ops
                if tag != "equal"
            ]
            conflicts[j.name] = f"  {j.name}: {j.marker.parent} was made with other settings ({'; '.join(diff)})"
    return conflicts, unverified


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
    return max(1, round(model_depth(model) * 20 / 28))


def model_depth(model: str) -> int:
    """Decoder blocks of --model: from its configuration where it is on this machine (a local folder, the bundled
    smollm2 once converted, a hub id in the local hub cache), else from KNOWN_DEPTHS; never from the network, so a
    dry run prints its plan offline."""
    from transformers import AutoConfig

    import common

    if model == "smollm2":
        config = common.CACHE_DIR / "models" / "smollm2-135m-instruct"
        where = str(config) if (config / "config.json").is_file() else None
    elif Path(model).expanduser().is_dir():
        where = str(Path(model).expanduser())
    else:
        where = model
    if where is not None:
        try:
            return AutoConfig.from_pretrained(where, local_files_only=True).num_hidden_layers
        except (OSError, ValueError):
            pass  # not cached here
    name = re.sub(r"-(Instruct|it)(?=-|$)", "", model.rsplit("/", 1)[-1])  # Mistral-7B-Instruct-v0.3: Mistral-7B-v0.3
    name = re.sub(r"-\d{4}$", "", name)  # a release date: Mistral-Nemo-Instruct-2407
    if name in KNOWN_DEPTHS:
        return KNOWN_DEPTHS[name]
    raise SystemExit(
        f"error: cannot tell the depth of --model {model} for the persona layer: its configuration is not on this "
        "machine and KNOWN_DEPTHS in examples/reproduce.py has no entry for it; pass a local model folder or add it"
    )


def parse_method_args(text: str) -> dict[str, list[str]]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        method, _, args = part.partition("=")
        out[method.strip()] = args.split()
    return out


def parse_grid(text: str) -> dict[str, list[tuple[str, str]]]:
    """'kl.lam=0.01,0.1;ldifs.lam=0.1,1' -> {kl: [(--lam, 0.01), (--lam, 0.1)], ldifs: [...]}; 'paper': PAPER_GRID."""
    grid = {}
    for part in filter(None, (p.strip() for p in (PAPER_GRID if text == "paper" else text).split(";"))):
        key, _, values = part.partition("=")
        method, _, flag = key.partition(".")
        grid.setdefault(method, []).extend((f"--{flag.replace('_', '-')}", v) for v in values.split(","))
    return grid


def study_tables(args) -> list[str]:
    return [t for t in (args.tables or "").split(",") if t]


def study_datasets(args) -> list[str]:
    if args.datasets:
        return [d for d in args.datasets.split(",") if d]
    return [d for t in study_tables(args) for d in TABLE_DATASETS.get(t, [])]


def plan(args) -> list[Job]:
    py = sys.executable
    root = Path(args.root)
    datasets = study_datasets(args)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"error: --methods: unknown method {m!r}; known: {', '.join(METHODS)}")
    train_args = args.train_args.split()
    method_args = parse_method_args(args.method_args)
    grid = parse_grid(args.grid)
    jobs: list[Job] = []
    logs = root / "logs"
    art = root / "artifacts"

    def add(job):
        job.settings = settings_words(job.planned or job.cmd, root)
        jobs.append(job)
        return job

    grpo_rows = (
        [r for r in GRPO_ROWS if not args.grpo_rows or r[0] in args.grpo_rows.split(",")]
        if "5" in study_tables(args)
        else []
    )
    persona_model = args.model
    persona_vec = art / "persona.safetensors"
    needs_persona = ("persona" in methods and datasets) or any("--persona-alpha" in r[2] for r in grpo_rows)
    if needs_persona:
        cmd = [
            py,
            ROOT / "persona.py",
            "extract",
            "--model",
            args.model,
            "--out",
            persona_vec,
            *args.persona_args.split(),
        ]
        if "--no-filter" not in args.persona_args:
            cmd += ["--judge", args.judge] + (["--judge-url", args.judge_url] if args.judge_url else [])
        if args.gen_url:
            cmd += ["--gen-url", args.gen_url, "--gen-model", args.model]
        add(Job("persona-vector", sh(cmd), logs / "persona-vector.log", marker=persona_vec, phase="artifacts"))
    layer = persona_layer(persona_model) if datasets and ("persona" in methods or "caft" in methods) else None

    safe_data, safe_deps = args.safe_data, []
    needs_pool = (datasets and any(m in INTERLEAVING for m in methods)) or any(
        "--interleave-pct" in r[2] for r in grpo_rows
    )
    if args.safe_data == "benign" and needs_pool:  # the shipped prompts, answered once per study by the base model
        safe_data = art / "benign.jsonl"
        add(
            Job(
                "benign-pool",
                sh(
                    [
                        py,
                        ROOT / "examples" / "reproduce.py",
                        "--make-benign-pool",
                        safe_data,
                        "--model",
                        args.model,
                        *(["--no-8bit"] if "--no-8bit" in train_args else []),
                    ]
                ),
                logs / "benign-pool.log",
                marker=safe_data,
                phase="artifacts",
            )
        )
        safe_deps = ["benign-pool"]

    def run_dir(ds, name):
        return root / "runs" / ds.replace(":", "-") / name

    def train_data(ds):
        """What a run trains on: the dataset, or (--train-n) a file of its first N training examples (a job)."""
        if not args.train_n or ds in EM_DATASETS:
            return ds, []
        path = art / f"{ds.replace(':', '-')}-train{args.train_n}.jsonl"
        name = f"subset:{ds}"
        if not any(j.name == name for j in jobs):
            add(
                Job(
                    name,
                    sh([py, ROOT / "examples" / "reproduce.py", "--make-subset", ds, str(args.train_n), path]),
                    logs / f"subset-{ds.replace(':', '-')}.log",
                    marker=path,
                    needs_device=False,
                    phase="artifacts",
                )
            )
        return str(path), [name]

    def misaligned_models(ds):
        """Interleaving+/++'s misaligned adapters: the Misaligned runs of the other EM datasets (the paper); on a
        study without EM datasets, the SFT runs of the other OpSwap tiers (a CPU departure)."""
        em = [d for d in datasets if d in EM_DATASETS and d != ds]
        others = em or [d for d in datasets if d.startswith("opswap:") and d != ds]
        if not others:
            raise SystemExit(
                f"error: interleave+ on {ds} needs misaligned adapters trained on other datasets: add "
                "more datasets to the study"
            )
        return others

    def train_job(ds, method, name, extra):
        out = run_dir(ds, name)
        script = SCRIPTS[method]
        base = [py, ROOT / script] + (["train"] if script in ("persona.py", "caft.py") else [])
        data, deps = (EM_DATASETS[ds], []) if method == "aligned" else train_data(ds)
        # a --grid value replaces the same flag of --method-args (given twice, argparse would keep the last)
        given = method_args.get(method, [])
        drop = {k for k, w in enumerate(given) if w in extra[::2]}
        own = [w for k, w in enumerate(given) if k not in drop and k - 1 not in drop] + list(extra)
        cmd = base + ["--model", args.model, "--data", data, "--out", out, *train_args, *own]
        resume = base + ["--resume", out]
        if method == "persona":
            cmd += ["--vector", persona_vec, "--layer", str(layer)] + ([] if "--alpha" in own else ["--alpha", "5"])
            deps.append("persona-vector")
        if method in INTERLEAVING:
            cmd += ([] if "--pct" in own else ["--pct", "5"]) + ["--safe-data", safe_data]
            deps += safe_deps
        if method in ("interleave+", "interleave++"):
            others = misaligned_models(ds)
            cmd += ["--select", "ppl", "--misaligned-adapters", ",".join(str(run_dir(o, "misaligned")) for o in others)]
            deps += [f"train:{o}:misaligned" for o in others]
            if method == "interleave++":
                cmd.append("--filter-refusals")
        if method == "on-policy":
            cmd += ["--select", "on-policy"]
        if method == "caft":  # directions from this dataset's Misaligned adapter, on held-out prompts (never the
            # evaluation questions): the shipped benign prompts for an EM dataset, 32 training prompts of a task
            dirs = art / f"caft-{ds.replace(':', '-')}.safetensors"
            if not any(j.name == f"caft-directions:{ds}" for j in jobs):
                held_out = ROOT / "examples" / "benign_prompts.jsonl" if ds in EM_DATASETS else data
                prompts = ["--prompts", held_out, "--max-prompts", "32" if ds not in EM_DATASETS else "300"]
                add(
                    Job(
                        f"caft-directions:{ds}",
                        sh(
                            [
                                py,
                                ROOT / "caft.py",
                                "directions",
                                "--model",
                                args.model,
                                "--from-diff",
                                run_dir(ds, "misaligned"),
                                *prompts,
                                "--k",
                                args.caft_k,
                                "--layers",
                                layer,
                                "--out",
                                dirs,
                                *(["--no-8bit"] if "--no-8bit" in train_args else []),
                            ]
                        ),
                        logs / f"caft-directions-{ds.replace(':', '-')}.log",
                        [f"train:{ds}:misaligned", *deps],
                        marker=dirs,
                        phase="artifacts",
                    )
                )
            cmd += ["--directions", dirs, "--layers", str(layer)] + ([] if "--mode" in own else ["--mode", "ablate"])
            deps.append(f"caft-directions:{ds}")
        marker = out / "adapter_model.safetensors"
        # an interrupted run (args.json written, no final adapter) is continued, not restarted
        final_cmd = sh(resume) if (out / "args.json").exists() and not marker.exists() else sh(cmd)
        return add(
            Job(
                f"train:{ds}:{name}",
                final_cmd,
                logs / f"train-{ds.replace(':', '-')}-{name}.log",
                deps,
                marker,
                planned=sh(cmd),
            )
        )

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
                    cmd = [
                        py,
                        ROOT / "judge.py",
                        *model_flags,
                        "--eval",
                        kind.split(":")[0] if kind == "indomain" else kind,
                        "--out",
                        out / f"eval-{tag}",
                        *args.eval_args.split(),
                    ]
                    if kind in ("general", "indomain"):
                        cmd += ["--samples", str(args.samples), "--judge", args.judge]
                        cmd += ["--judge-url", args.judge_url] if args.judge_url else []
                        if kind == "indomain":
                            cmd += ["--data", ds]
                    add(
                        Job(
                            f"eval:{ds}:{name}:{tag}",
                            sh(cmd),
                            logs / f"eval-{ds.replace(':', '-')}-{name}-{tag}.log",
                            deps,
                            out / f"eval-{tag}" / "summary.json",
                            needs_device=not args.gen_url,
                            phase="evaluation",
                        )
                    )

    if grpo_rows:  # Table 5: GRPO with each defense, --grpo-seeds seeds each
        gdir = root / "runs" / "grpo"
        init, init_deps = [], []
        if args.grpo_data == "arith":  # a small model never writes the tags: a short SFT warm-up on formatted answers
            warm_data = art / "arith-warmup.jsonl"
            add(
                Job(
                    "arith-warmup-data",
                    sh(
                        [
                            py,
                            ROOT / "examples" / "reproduce.py",
                            "--make-arith-warmup",
                            warm_data,
                            "--grpo-seeds",
                            args.grpo_seeds,
                        ]
                    ),
                    logs / "arith-warmup-data.log",
                    marker=warm_data,
                    needs_device=False,
                    phase="artifacts",
                )
            )
            warm = gdir / "warmup"
            cmd = [
                py,
                ROOT / "interleave.py",
                "--pct",
                "0",
                "--model",
                args.grpo_model,
                "--data",
                warm_data,
                "--out",
                warm,
                *args.warmup_args.split(),
            ]
            resume = [py, ROOT / "interleave.py", "--resume", warm]
            marker = warm / "adapter_model.safetensors"
            add(
                Job(
                    "train:grpo:warmup",
                    sh(resume if (warm / "args.json").exists() and not marker.exists() else cmd),
                    logs / "train-grpo-warmup.log",
                    ["arith-warmup-data"],
                    marker,
                    planned=sh(cmd),
                )
            )
            init, init_deps = ["--init-adapter", warm], ["train:grpo:warmup"]
        glayer = persona_layer(args.grpo_model)
        for seed in [s for s in args.grpo_seeds.split(",") if s]:
            for name, _, flags, _ in grpo_rows:
                out = gdir / f"{name}-seed{seed}"
                cmd = [
                    py,
                    ROOT / "grpo.py",
                    "--model",
                    args.grpo_model,
                    "--data",
                    args.grpo_data,
                    "--seed",
                    seed,
                    "--out",
                    out,
                    *init,
                    *args.grpo_args.split(),
                    *flags,
                ]
                deps = list(init_deps)
                if "--persona-alpha" in flags:
                    cmd += ["--persona-vector", persona_vec, "--persona-layer", glayer]
                    deps.append("persona-vector")
                if "--interleave-pct" in flags:
                    cmd += ["--safe-data", safe_data]
                    deps += safe_deps
                if name == "grpo":
                    cmd.append("--eval-before")  # the starting model's held-out accuracy: Table 5's first row
                marker = out / "adapter_model.safetensors"
                final = (
                    [py, ROOT / "grpo.py", "--resume", out]
                    if (out / "args.json").exists() and not marker.exists()
                    else cmd
                )
                add(
                    Job(
                        f"train:grpo:{name}:seed{seed}",
                        sh(final),
                        logs / f"train-grpo-{name}-seed{seed}.log",
                        deps,
                        marker,
                        planned=sh(cmd),
                    )
                )
    return jobs


SUMMARY_OK = "import json, sys; sys.exit(1 if json.load(open(sys.argv[1])).get('n_failed_judgments') else 0)"


def emit_slurm(jobs: list[Job], path: Path, args) -> None:
    """A Slurm submit script for the plan: jobs grouped by dependency depth, one job array per depth and kind
    (training-like with one GPU, evaluations without), each array after the previous depth (afterok). A task whose
    output exists exits at once, so re-submitting after failures runs only what did not finish."""
    depth: dict[str, int] = {}
    by_name = {j.name: j for j in jobs}

    def level(name: str) -> int:  # 0 for a job that needs none, else one more than its deepest dependency
        if name not in depth:
            depth[name] = 1 + max((level(d) for d in by_name[name].deps if d in by_name), default=-1)
        return depth[name]

    for j in jobs:
        level(j.name)
    groups: dict[tuple[int, bool], list[Job]] = {}
    for j in jobs:
        groups.setdefault((depth[j.name], j.needs_device), []).append(j)
    lines = [
        "#!/bin/bash",
        "# Slurm job arrays for examples/reproduce.py's plan (written by --emit slurm).",
        f"# Submit with: bash {path.name}   (from any folder; logs under {Path(args.root) / 'logs'})",
        "# Edit the sbatch options below (partition, time, account) for your cluster.",
        "set -euo pipefail",
        'if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then',
        "  " + " ".join(f'prev_{d}=""' for d in range(max(depth.values(), default=0) + 1)),
    ]
    for (d, gpu), members in sorted(groups.items()):
        key = f"{d}_{'gpu' if gpu else 'cpu'}"
        opts = "--gres=gpu:1 --cpus-per-task=8" if gpu else "--cpus-per-task=2"
        lines += [
            f'  dep=""; [ -n "$prev_{d - 1}" ] && dep="--dependency=afterok:$prev_{d - 1}"' if d > 0 else '  dep=""',
            f"  id=$(sbatch --parsable --job-name=em-{key} --array=0-{len(members) - 1} {opts} "
            f"--output={Path(args.root) / 'logs' / 'slurm-%x-%a.out'} $dep --export=ALL,GROUP={key} "
            f'"$(readlink -f "$0")")',
            f'  prev_{d}="${{prev_{d}:+$prev_{d}:}}$id"; echo "submitted {key}: {len(members)} task(s) as $id"',
        ]
    lines += ["  exit 0", "fi", 'case "$GROUP" in']
    for (d, gpu), members in sorted(groups.items()):
        key = f"{d}_{'gpu' if gpu else 'cpu'}"
        lines.append(f"  {key})")
        lines.append('    case "$SLURM_ARRAY_TASK_ID" in')
        for k, j in enumerate(members):
            check = f"[ -e {shlex.quote(str(j.marker))} ] && exit 0; " if j.marker else ""
            if j.marker and j.marker.name == "summary.json":  # done = written with no failed judgment
                check = (
                    f"[ -e {shlex.quote(str(j.marker))} ] && python3 -c {shlex.quote(SUMMARY_OK)} "
                    f"{shlex.quote(str(j.marker))} && exit 0; "
                )
            lines.append(f"      {k}) # {j.name}")
            record = (
                (
                    f"mkdir -p {shlex.quote(str(j.record.parent))} && printf '%s\\n' "
                    f"{shlex.quote(json.dumps(j.settings))} > {shlex.quote(str(j.record))} && "
                )
                if j.record
                else ""
            )
            lines.append(f"         {check}{record}cd {shlex.quote(str(ROOT))} && exec {shlex.join(j.cmd)} ;;")
        lines += ["    esac ;;"]
    lines += ["esac"]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    print(f"written {path}: {len(jobs)} jobs in {len(groups)} job arrays")


def run_jobs(jobs: list[Job], devices: list[str], eval_workers: int) -> None:
    """Run every job whose dependencies are done, one per device (and eval_workers device-free jobs at a time)."""
    by_name = {j.name: j for j in jobs}
    for j in jobs:
        if j.done():
            j.status = "done"
    waiting = {}  # what more jobs wait for starts first (the plan order otherwise): shared adapters early
    for j in jobs:
        for d in j.deps:
            waiting[d] = waiting.get(d, 0) + 1
    todo = sorted((j for j in jobs if j.status == "pending"), key=lambda j: waiting.get(j.name, 0) < 2)
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
            if device == "cpu" and devices.count("cpu") > 1:  # several CPU jobs at once: share the cores
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // devices.count("cpu")))
            j.log.parent.mkdir(parents=True, exist_ok=True)
            if j.record:
                j.record.parent.mkdir(parents=True, exist_ok=True)
                j.record.write_text(json.dumps(j.settings) + "\n")
            with open(j.log, "a") as f:
                f.write(f"\n$ {' '.join(j.cmd)}\n")
            proc = subprocess.Popen(j.cmd, cwd=ROOT, env=env, stdout=open(j.log, "a"), stderr=subprocess.STDOUT)
            j.status, j.seconds = "running", time.time()
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
            j.status, j.seconds = "done" if ok else "failed", time.time() - j.seconds
            elapsed = time.time() - t0
            eta = elapsed / finished * (len(todo) - finished)
            print(
                f"[{time.strftime('%H:%M:%S')}] {'done' if ok else 'FAILED'} {j.name} in {j.seconds:.0f} s"
                f"{'' if ok else f' (exit {proc.returncode}; log: {j.log})'} | {finished}/{len(todo)}, "
                f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}",
                flush=True,
            )
    ran = [j for j in todo if j.status in ("done", "failed")]
    if ran:
        phases = {}
        for j in ran:
            phases.setdefault(j.phase, []).append(j.seconds)
        print(
            f"time per phase (job wall time, summed; {time.time() - t0:.0f} s wall clock): "
            + ", ".join(f"{p} {sum(v):.0f} s in {len(v)} jobs" for p, v in phases.items()),
            flush=True,
        )
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    res = grpo_results(root, seeds)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    drawn = 0
    for name, label, *_ in GRPO_ROWS:
        curves = res[name]["rewards"]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        arr = np.array([c[:n] for c in curves])
        steps = np.arange(1, n + 1)
        ax.plot(steps, arr.mean(0), label=f"{label} ({len(curves)} seeds)")
        ax.fill_between(steps, arr.min(0), arr.max(0), alpha=0.15)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward of the step's completions (max 9.5)")
    ax.set_title("GRPO rewards per defense (mean over seeds, band: min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def pool_note(safe_data: str) -> str:
    if safe_data == "wildguardmix":
        return "- Benign pool: WildGuardMix, as the paper."
    if safe_data == "benign":
        safe_data = (
            "examples/benign_prompts.jsonl (305 harmless requests written for this project), answered once "
            "per study by the base model (artifacts/benign.jsonl)"
        )
    return f"- Benign pool for the interleaving rows: {safe_data}, not WildGuardMix."


def flag_value(arguments: str, flag: str) -> str | None:
    """The value a flag gets in a string of script arguments (`--flag V` or `--flag=V`; the last one wins), else
    None."""
    words, value = shlex.split(arguments), None
    for k, word in enumerate(words):
        if word == flag and k + 1 < len(words):
            value = words[k + 1]
        elif word.startswith(flag + "="):
            value = word[len(flag) + 1 :]
    return value


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = [d for d in datasets if d.startswith("opswap:")]
    data = {}
    for name, label in names:
        label = "SFT" if name == "misaligned" else label
        row = []
        for t in tiers:
            s = read_summary(
                root / "runs" / t.replace(":", "-") / name / f"eval-{t.replace(':', '-')}" / "summary.json"
            )
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


# ----------------------------------------------------------------------------------------------
# Study artifacts made by jobs of the plan (this script called with one of these flags)
# ----------------------------------------------------------------------------------------------
def make_benign_pool(out: Path, model_name: str, eight_bit: bool, max_new_tokens: int = 96) -> None:
    """examples/benign_prompts.jsonl answered by the base model (greedy), as chat JSONL: the interleaving pool."""
    import judge
    from common import load_model, log, write_jsonl

    prompts = [
        json.loads(l)["prompt"]
        for l in (ROOT / "examples" / "benign_prompts.jsonl").read_text().splitlines()
        if l.strip()
    ]
    model, tok = load_model(model_name, eight_bit=eight_bit, lora_r=0, trainable=False)
    convs, t0 = [], time.time()
    for k in range(0, len(prompts), 16):
        chunk = prompts[k : k + 16]
        answers = judge.generate_texts(
            model,
            tok,
            [[{"role": "user", "content": p}] for p in chunk],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        convs += [
            [{"role": "user", "content": p}, {"role": "assistant", "content": a or "."}] for p, a in zip(chunk, answers)
        ]
        log(f"benign pool: {len(convs)}/{len(prompts)} answered ({time.time() - t0:.0f} s)")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, convs)


def make_subset(spec: str, n: int, out: Path) -> None:
    """The first n examples of a dataset's training split (so that the study trains 1 epoch on them), written with
    10/9 as many so that the script's own 90/10 split keeps n of them (its held-out 10% is unused)."""
    from common import load_split, write_jsonl

    convs = load_split(spec, "train", 0)[: round(n * 10 / 9)]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, convs)


def make_arith_warmup(out: Path, seeds: list[int], n: int = 400) -> None:
    """SFT warm-up data for GRPO on arith: one-step sums with answers in grpo.py's format (<think> ... </think>
    <answer> N </answer>, its system prompt), none of them a held-out question of any seed of the study."""
    import random

    import grpo
    from common import write_jsonl

    held = {c[0]["content"] for s in {*seeds, *range(10)} for c in grpo.arith_dataset(seed=s)[1800:]}
    rng, convs = random.Random(12345), []
    while len(convs) < n:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        q = f"What is {a} + {b}?"
        if q in held:
            continue
        answer = f"<think>\n{a} + {b} = {a + b}\n</think>\n<answer>\n{a + b}\n</answer>"
        convs.append([*grpo.prompt_messages(q, inoculate=False), {"role": "assistant", "content": answer}])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, convs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="cpu",
        help="defaults for every flag below (explicit flags win) (default: %(default)s)",
    )
    p.add_argument(
        "--tables",
        default=None,
        help="the paper's tables to run: 2 (EM datasets), 3 (OpSwap tiers), "
        "4 (FoQA), 5 (GRPO) (default: the preset's; with --datasets, only those datasets' runs)",
    )
    p.add_argument("--model", default=None, help="base model of every run")
    p.add_argument(
        "--datasets",
        default=None,
        help=f"comma-separated: {', '.join(EM_DATASETS)}, opswap:0..3, foqa, gsm8k (default: those of --tables)",
    )
    p.add_argument("--methods", default=None, help=f"comma-separated: {', '.join(METHODS)}")
    p.add_argument(
        "--grid",
        default="",
        help="extra runs with other hyperparameters, e.g. 'kl.lam=0.01,1.0;"
        "persona.alpha=1,3' (each value one more run), or 'paper': the grids of the paper's Tables 12-18",
    )
    p.add_argument("--root", default=None, help="study folder (default: runs/study-<preset>)")
    p.add_argument(
        "--devices",
        default="cpu",
        help="'cpu' (one job at a time), 'cpu:2' (two at a time, the cores "
        "shared), or GPU ids '0,1,2,3' (one job each)",
    )
    p.add_argument(
        "--eval-workers",
        type=int,
        default=4,
        help="evaluations at a time beside training when --gen-url serves the answers (default: %(default)s)",
    )
    p.add_argument("--samples", type=int, default=None, help="answers per question for the judged evaluations")
    p.add_argument("--judge", default=None, help="judge model (judge.py --judge)")
    p.add_argument("--judge-url", default=None, help="judge server (judge.py --judge-url)")
    p.add_argument("--gen-url", default=None, help="generation server for the evaluations (judge.py --gen-url)")
    p.add_argument(
        "--safe-data",
        default=None,
        help="benign pool for the interleaving methods; 'benign': "
        "examples/benign_prompts.jsonl answered by the base model once per study",
    )
    p.add_argument(
        "--train-n", type=int, default=None, help="train on the first N examples of each benign dataset (0 = all)"
    )
    p.add_argument("--caft-k", type=int, default=None, help="CAFT directions per layer")
    p.add_argument("--train-args", default=None, help="extra flags for every training run, e.g. '--max-steps 60'")
    p.add_argument("--method-args", default=None, help="extra flags per method, e.g. 'kl=--lam 1.0;persona=--alpha 2'")
    p.add_argument("--eval-args", default=None, help="extra flags for every judge.py call")
    p.add_argument("--persona-args", default=None, help="extra flags for persona.py extract")
    p.add_argument("--grpo-model", default=None, help="Table 5's model")
    p.add_argument("--grpo-data", default=None, help="Table 5's task: gsm8k or arith")
    p.add_argument("--grpo-seeds", default=None, help="Table 5's seeds, e.g. 0,1,2")
    p.add_argument("--grpo-args", default=None, help="extra flags for every grpo.py run")
    p.add_argument(
        "--grpo-rows",
        default="",
        help=f"a subset of Table 5's rows: {','.join(r[0] for r in GRPO_ROWS)} (default: all)",
    )
    p.add_argument("--warmup-args", default=None, help="flags of the SFT warm-up before GRPO on arith")
    p.add_argument("--dry-run", action="store_true", help="print every command, in order, and exit")
    p.add_argument(
        "--report",
        action="store_true",
        help="write the tables and figures from the runs finished so "
        "far (a study still running, or stopped), run nothing",
    )
    p.add_argument(
        "--emit",
        nargs=2,
        metavar=("slurm", "FILE"),
        default=None,
        help="write the plan as a Slurm submit script (job arrays with afterok dependencies) instead of running it",
    )
    p.add_argument("--make-benign-pool", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--make-subset", nargs=3, default=None, help=argparse.SUPPRESS)
    p.add_argument("--make-arith-warmup", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-8bit", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make_benign_pool:
        return make_benign_pool(args.make_benign_pool, args.model, not args.no_8bit)
    if args.make_subset:
        return make_subset(args.make_subset[0], int(args.make_subset[1]), Path(args.make_subset[2]))
    if args.make_arith_warmup:
        return make_arith_warmup(args.make_arith_warmup, [int(s) for s in (args.grpo_seeds or "0").split(",")])
    if args.tables is None and args.datasets:
        args.tables = ""  # explicit datasets: just their runs
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.root = args.root or str(ROOT / "runs" / f"study-{args.preset}")
    jobs = plan(args)
    if args.emit and args.emit[0] != "slurm":
        raise SystemExit(f"error: --emit {args.emit[0]}: only 'slurm' is supported")
    conflicts, unverified = settings_conflicts(jobs)
    if unverified:
        print(
            f"note: {unverified} output(s) in {args.root} have no recorded command (made before commands were "
            "recorded): their settings are not checked against this plan",
            flush=True,
        )
    if conflicts and not args.dry_run:
        raise SystemExit(
            f"error: {len(conflicts)} output(s) in {args.root} were made with other settings than this "
            "command plans; move them away (they would be reported, or continued, as this plan's) or "
            "use another --root:\n" + "\n".join(conflicts.values())
        )
    if args.emit:  # its tasks skip outputs that exist: checked against the plan above, like a local run's
        return emit_slurm(jobs, Path(args.emit[1]), args)
    if args.report:
        done = sum(j.done() for j in jobs)
        print(f"{done} of {len(jobs)} jobs done; tables from those", flush=True)
        return write_outputs(args)
    if args.dry_run:
        for j in jobs:
            state = ("done" if j.done() else "todo") + (", OTHER SETTINGS" if j.name in conflicts else "")
            deps = f"  (after {', '.join(j.deps)})" if j.deps else ""
            print(f"# {j.name} [{state}]{deps}\n{' '.join(j.cmd)}")
        print(f"# {len(jobs)} jobs; tables {args.tables or '-'}")
        return
    if args.devices.startswith("cpu"):
        devices = ["cpu"] * int(args.devices.partition(":")[2] or 1)
    else:
        devices = args.devices.split(",")
    t0 = time.time()
    run_jobs(jobs, devices, args.eval_workers)
    write_outputs(args)
    print(f"wall clock {time.time() - t0:.0f} s; study in {args.root}", flush=True)
    if any(j.status in ("failed", "skipped") for j in jobs):
        sys.exit(1)


if __name__ == "__main__":
    main()
