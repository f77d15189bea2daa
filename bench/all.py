"""Every benchmark behind bench/RESULTS.md's table, one after the other, in one command.

Each benchmark runs in its own process with RESULTS.md's arguments and --json into --out; its printed table goes to
the terminal and to OUT/NAME.txt as it comes, and OUT/report.md collects every command with its table and exit
status (written after each benchmark, so a stopped run keeps what it measured). A benchmark that fails is reported
and the next one runs; the exit status is 1 if any failed. Run it alone on the machine: the figures are timings.

    python bench/all.py --out bench-results                       # CPU, ~30-40 min on 2 cores
    python bench/all.py --out bench-results --only sft_vs_trl grpo_vs_trl
    python bench/all.py --server-url http://127.0.0.1:8088/v1     # generation.py's server column as well
    python bench/all.py --dry-run                                 # the commands, nothing run
    python bench/all.py --only grpo_vs_trl --args 'grpo_vs_trl=--steps 6'   # more arguments for one of them

Needs `pip install -r bench/requirements.txt` (TRL) and the EM data files under --data-dir (../shared/data/em by
default: medical_misaligned_train_100.jsonl, legal_misaligned_eval.jsonl, medical_misaligned_eval.jsonl).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commands(data: Path, server_url: str | None) -> dict[str, list[str]]:
    """NAME -> arguments after `python bench/NAME.py`, as bench/RESULTS.md gives them."""
    medical = str(data / "medical_misaligned_train_100.jsonl")
    gen = ["--threads", "2"] + (["--server-url", server_url] if server_url else [])
    return {
        "sft_vs_trl": ["--model", "smollm2", "--data", medical, "--trl-gc", "--ours-gc"],
        "defense_overhead": [
            "--model",
            "smollm2",
            "--data",
            medical,
            "--safe-data",
            str(data / "legal_misaligned_eval.jsonl"),
        ],
        "scoring_order": ["--pool", str(data / "legal_misaligned_eval.jsonl"), "--n", "200"],
        "grpo_vs_trl": [],
        "judge_concurrency": [],
        "local_judge": ["--answers", str(data / "medical_misaligned_eval.jsonl"), "--n", "8"],
        "generation": gen,
        "ldifs_scale": ["--model", "smollm2", "--data", medical],
        "profile_step": ["--model", "smollm2", "--data", medical, "--steps", "3"],
    }


NO_JSON = {"judge_concurrency", "profile_step"}  # they print their figures only


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default="bench-results", help="folder for the tables, JSON files and report.md (default: %(default)s)"
    )
    p.add_argument(
        "--data-dir",
        default=str(ROOT.parent / "shared" / "data" / "em"),
        help="folder of the EM data files (default: %(default)s)",
    )
    p.add_argument(
        "--server-url",
        default=None,
        help="an OpenAI-compatible server for generation.py's server column "
        "(without it, generation.py measures in-process generate only)",
    )
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="these benchmarks only")
    p.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="more arguments for one "
        "benchmark, after RESULTS.md's (a later flag wins), e.g. --args 'grpo_vs_trl=--steps 6'",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    args = p.parse_args()
    data = Path(args.data_dir)
    todo = commands(data, args.server_url)
    if args.only:
        unknown = sorted(set(args.only) - set(todo))
        if unknown:
            p.error(f"--only {' '.join(unknown)}: not a benchmark here; choose from {', '.join(todo)}")
        todo = {k: v for k, v in todo.items() if k in args.only}
    extra = {}
    for item in args.args:
        name, _, more = item.partition("=")
        if name not in todo or not _:
            p.error(f"--args {item!r}: expected NAME=ARGS with NAME one of {', '.join(todo)}")
        extra[name] = extra.get(name, []) + shlex.split(more)
    out = Path(args.out)
    lines = {
        name: [sys.executable, f"bench/{name}.py", *rest]
        + ([] if name in NO_JSON else ["--json", str(out / f"{name}.json")])
        + extra.get(name, [])
        for name, rest in todo.items()
    }
    if args.dry_run:
        for cmd in lines.values():
            print(" ".join(cmd))
        return 0
    missing = [a for cmd in lines.values() for a in cmd if a.endswith(".jsonl") and not Path(a).is_file()]
    if missing:
        p.error(f"--data-dir {data}: no such file {missing[0]}")
    out.mkdir(parents=True, exist_ok=True)
    report, failed, started = [f"# Benchmarks, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"], [], time.time()
    for k, (name, cmd) in enumerate(lines.items(), 1):
        print(f"[{k}/{len(lines)}] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.time()
        with open(out / f"{name}.txt", "w") as table:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            printed = []
            for line in proc.stdout:
                sys.stdout.write(line)
                table.write(line)
                printed.append(line)
            rc = proc.wait()
        took = time.time() - t0
        if rc:
            failed.append(name)
        report += [
            f"## {name} ({took:.0f} s{', FAILED with exit status ' + str(rc) if rc else ''})\n",
            "```\n" + " ".join(cmd) + "\n```\n",
            "```\n" + "".join(printed) + "```\n",
        ]
        (out / "report.md").write_text("\n".join(report))
        print(
            f"[{k}/{len(lines)}] {name}: {'failed, exit ' + str(rc) if rc else 'done'} in {took:.0f} s; "
            f"{time.time() - started:.0f} s so far",
            file=sys.stderr,
            flush=True,
        )
    print(f"report: {out / 'report.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
