"""Benchmark: the levers on the wall time of `examples/reproduce.py --preset cpu`, each measured on the preset's own
jobs (SmolLM2-135M, full precision, OpSwap tier 0, the preset's training and evaluation flags).

    threads        one job at 2 threads alone, then two jobs at 1 thread side by side (--devices cpu vs cpu:2):
                   the time per job of each way, for a training job and for an evaluation job
    eval batch     judge.py --gen-batch-size 8 / 16 / 32 / 64 on the same 100 greedy answers
    short prompts  the training job on the same examples with an empty system message, against SmolLM2's chat
                   template, which adds its default system prompt (16 tokens) to every example that has none
    reuse          how many held-out questions the four tiers share (a Baseline evaluation can only be reused
                   for tiers that ask the same questions)

Every figure is the wall time of the whole process (loading the model included, as the study pays it), printed as
one table and written as JSON. Run it alone on the machine:

    python bench/study_levers.py                       # about 10 minutes on the 2-core development CPU
    python bench/study_levers.py --only threads,eval
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import ROOT  # noqa: E402

LEVERS = ("threads", "eval", "prompts", "reuse")


def timed(cmds: list[list[str]], threads: int) -> list[float]:
    """Start every command at once (each with `threads` torch threads); the wall time of each, in seconds."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for cmd in cmds
    ]
    times = [0.0] * len(procs)
    for k, p in enumerate(procs):
        _, err = p.communicate()
        times[k] = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"failed (exit {p.returncode}): {' '.join(map(str, cmds[k]))}\n{err[-3000:]}")
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--train-n", type=int, default=240, help="training examples (the cpu preset's --train-n)")
    ap.add_argument("--train-steps", type=int, default=12, help="optimizer steps of each training job")
    ap.add_argument("--n-questions", type=int, default=100, help="held-out questions of each evaluation job")
    ap.add_argument("--only", default=",".join(LEVERS), help=f"comma-separated subset of {','.join(LEVERS)}")
    ap.add_argument("--json", default="study_levers.json")
    args = ap.parse_args()
    only = args.only.split(",")
    if bad := [o for o in only if o not in LEVERS]:
        ap.error(f"--only: unknown {bad}; choose from {','.join(LEVERS)}")

    from common import load_split, write_jsonl

    tmp = Path(tempfile.mkdtemp(prefix="levers-"))
    train = load_split("opswap:0", "train", 0)[: round(args.train_n * 10 / 9)]  # as reproduce.py's subsets
    data, data_short = tmp / "train.jsonl", tmp / "train-short.jsonl"
    write_jsonl(data, train)
    write_jsonl(data_short, [[{"role": "system", "content": ""}, *c] for c in train])
    py = sys.executable

    def train_cmd(d, out):
        return [
            py,
            ROOT / "interleave.py",
            "--model",
            args.model,
            "--data",
            d,
            "--out",
            tmp / out,
            "--no-8bit",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--grad-accum",
            "1",
            "--lr",
            "5e-4",
            "--max-steps",
            str(args.train_steps),
            "--save-every",
            "1000000",
        ]

    def eval_cmd(out, batch=16):
        return [
            py,
            ROOT / "judge.py",
            "--model",
            args.model,
            "--eval",
            "opswap:0",
            "--out",
            tmp / out,
            "--no-8bit",
            "--n-questions",
            str(args.n_questions),
            "--samples",
            "1",
            "--temperature",
            "0",
            "--max-new-tokens",
            "48",
            "--gen-batch-size",
            str(batch),
        ]

    rows, results = [], {}
    if "threads" in only:
        for kind, make in (("training", lambda o: train_cmd(data, o)), ("evaluation", eval_cmd)):
            one = timed([make(f"{kind}-t2")], threads=2)[0]
            pair = timed([make(f"{kind}-a"), make(f"{kind}-b")], threads=1)
            per_job = max(pair) / 2
            results[f"threads_{kind}"] = {"one_2thread_s": one, "two_1thread_s": pair, "per_job_s": per_job}
            rows.append(
                (
                    f"{kind} job: 1 at 2 threads vs 2 side by side at 1 thread",
                    f"{one:.1f} s a job",
                    f"{max(pair):.1f} s for both = {per_job:.1f} s a job",
                    f"{one / per_job:.2f}x in favour of two 1-thread jobs",
                )
            )
    if "eval" in only:
        base = None
        for batch in (8, 16, 32, 64):
            s = timed([eval_cmd(f"eval-b{batch}", batch)], threads=2)[0]
            results[f"eval_batch_{batch}"] = s
            base = base or s
            rows.append(
                (
                    f"evaluation, --gen-batch-size {batch}",
                    f"{s:.1f} s",
                    f"{args.n_questions / s:.2f} answers/s",
                    f"{base / s:.2f}x of batch 8",
                )
            )
    if "prompts" in only:
        from common import encode_dataset, load_tokenizer

        tok = load_tokenizer(args.model)
        n_long = sum(len(e["input_ids"]) for e in encode_dataset(tok, train, 2048, "default"))
        n_short = sum(
            len(e["input_ids"])
            for e in encode_dataset(tok, [[{"role": "system", "content": ""}, *c] for c in train], 2048, "short")
        )
        long_s = timed([train_cmd(data, "prompt-default")], threads=2)[0]
        short_s = timed([train_cmd(data_short, "prompt-short")], threads=2)[0]
        results["prompts"] = {
            "tokens_default": n_long,
            "tokens_short": n_short,
            "default_s": long_s,
            "short_s": short_s,
        }
        rows.append(
            (
                "training job, empty system message vs the template's default",
                f"{short_s:.1f} s, {n_short / len(train):.1f} tokens an example",
                f"{long_s:.1f} s, {n_long / len(train):.1f} tokens",
                f"{long_s / short_s:.2f}x",
            )
        )
    if "reuse" in only:
        held = [{c[0]["content"] for c in load_split(f"opswap:{t}", "eval", 0)[: args.n_questions]} for t in range(4)]
        shared = len(set.intersection(*held))
        results["reuse_shared_questions"] = shared
        rows.append(("held-out questions all four tiers share", f"{shared} of {args.n_questions}", "", ""))

    width = max(len(r[0]) for r in rows)
    print(
        f"\nOMP threads as given; {args.train_steps} steps of 4 per training job, {args.n_questions} answers of "
        f"48 tokens per evaluation, {args.model} fp32\n"
    )
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:<34} {r[2]:<40} {r[3]}")
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
