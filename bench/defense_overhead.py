"""Benchmark: step time and peak memory of kl.py, ldifs.py and inoculate.py relative to plain SFT
(interleave.py --pct 0), same model, data, batch and steps. Each script runs in its own process; the figures
come from its metrics.jsonl (median step time over the steps after the first; peak memory: GPU memory allocated
by torch on CUDA, peak resident set on CPU).

    python bench/defense_overhead.py --model smollm2 --data ../shared/data/em/medical_misaligned_train_100.jsonl
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [("plain SFT", "interleave.py", ["--pct", "0"]), ("KL", "kl.py", []), ("LDIFS", "ldifs.py", []),
           ("inoculation", "inoculate.py", [])]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model for every run (default: %(default)s)")
    p.add_argument("--data", default="opswap:1", help="training data for every run (default: %(default)s)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--max-len", type=int, default=1024, help="(default: %(default)s)")
    p.add_argument("--no-8bit", action="store_true", help="full-precision weights")
    args = p.parse_args()
    common = ["--model", args.model, "--data", args.data, "--max-steps", str(args.steps), "--batch-size",
              str(args.batch_size), "--grad-accum", str(args.grad_accum), "--max-len", str(args.max_len),
              "--save-every", "1000000"] + (["--no-8bit"] if args.no_8bit else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, script, extra in SCRIPTS:
            out = Path(tmp) / script.removesuffix(".py")
            cmd = [sys.executable, str(ROOT / script), *common, *extra, "--out", str(out)]
            print(f"running {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{script} failed:\n{proc.stderr[-3000:]}")
            m = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
            times = [x["step_time_s"] for x in m[1:]] or [m[0]["step_time_s"]]
            rows.append((name, statistics.median(times), max(x["peak_mem_mb"] for x in m),
                         statistics.median(x["tokens_per_s"] for x in m[1:] or m)))
    base_t, base_m = rows[0][1], rows[0][2]
    print(f"model {args.model}, data {args.data}, batch {args.batch_size} x {args.grad_accum}, {args.steps} steps, "
          f"{'full precision' if args.no_8bit else '8-bit'}")
    print(f"{'method':<12} {'step s':>8} {'x SFT':>6} {'peak MB':>9} {'x SFT':>6} {'tok/s':>7}")
    for name, t, mem, tps in rows:
        print(f"{name:<12} {t:8.3f} {t / base_t:6.2f} {mem:9.0f} {mem / base_m:6.2f} {tps:7.0f}")


if __name__ == "__main__":
    main()
