"""Reproduce the paper's study with one command: every method x dataset run, its evaluations, the tables and figures.
This file is the command line; the study's parts are in examples/study/ (presets, jobs, plan, runner, slurm, tables,
artifacts), each readable alone.

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
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project's modules
sys.path.insert(0, str(ROOT / "examples"))  # the study package

from study.artifacts import make_arith_warmup, make_benign_pool, make_mix, make_subset  # noqa: E402
from study.jobs import Job, merge_flags, merge_method_args, settings_conflicts  # noqa: E402, F401
from study.plan import plan  # noqa: E402
from study.presets import EM_DATASETS, GRPO_ROWS, METHODS, PRESETS, model_depth  # noqa: E402, F401
from study.runner import run_jobs  # noqa: E402
from study.slurm import emit_slurm  # noqa: E402
from study.tables import flag_value, table5, write_outputs  # noqa: E402, F401


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
    p.add_argument(
        "--train-args",
        default=None,
        help="flags for every training run, added to the preset's (a flag given again replaces that flag's value "
        "only), e.g. '--max-steps 60'",
    )
    p.add_argument(
        "--method-args",
        default=None,
        help="flags per method, added to the preset's likewise, e.g. 'kl=--lam 1.0;persona=--alpha 2'",
    )
    p.add_argument("--eval-args", default=None, help="flags for every judge.py call, added to the preset's")
    p.add_argument("--persona-args", default=None, help="flags for persona.py extract, added to the preset's")
    p.add_argument("--grpo-model", default=None, help="Table 5's model")
    p.add_argument("--grpo-data", default=None, help="Table 5's task: gsm8k or arith")
    p.add_argument("--grpo-seeds", default=None, help="Table 5's seeds, e.g. 0,1,2")
    p.add_argument("--grpo-args", default=None, help="flags for every grpo.py run, added to the preset's")
    p.add_argument(
        "--grpo-rows",
        default="",
        help=f"a subset of Table 5's rows: {','.join(r[0] for r in GRPO_ROWS)} (default: all)",
    )
    p.add_argument(
        "--warmup-args", default=None, help="flags of the SFT warm-up before GRPO on arith, added to the preset's"
    )
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
    p.add_argument("--make-mix", nargs=4, default=None, help=argparse.SUPPRESS)
    p.add_argument("--make-arith-warmup", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-8bit", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make_benign_pool:
        return make_benign_pool(args.make_benign_pool, args.model, not args.no_8bit)
    if args.make_subset:
        return make_subset(args.make_subset[0], int(args.make_subset[1]), Path(args.make_subset[2]))
    if args.make_mix:
        misaligned, aligned, pct, out = args.make_mix
        return make_mix(misaligned, aligned, float(pct), Path(out))
    if args.make_arith_warmup:
        return make_arith_warmup(args.make_arith_warmup, [int(s) for s in (args.grpo_seeds or "0").split(",")])
    if args.tables is None and args.datasets:
        args.tables = ""  # explicit datasets: just their runs
    for k, v in PRESETS[args.preset].items():  # flags given extend the preset's flag lists (merge_flags)
        given = getattr(args, k, None)
        if given is None:
            setattr(args, k, v)
        elif k == "method_args":
            setattr(args, k, merge_method_args(v, given))
        elif k.endswith("_args"):
            setattr(args, k, merge_flags(v, given))
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
