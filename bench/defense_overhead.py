"""Benchmark: step time and peak memory of each in-training defense relative to plain SFT (interleave.py
--pct 0), same model, data, batch, accumulation and steps, one script after the other, each in its own process.

    plain SFT      interleave.py --pct 0
    KL             kl.py (one extra no-grad forward pass with the adapter off)
    LDIFS          ldifs.py (that pass keeps the hidden states of 10 layers)
    persona        persona.py train (a forward hook adds alpha * v to one layer's output)
    inoculation    inoculate.py (a system prompt: longer sequences)
    interleave 5%  interleave.py --pct 5 --select random (per step like SFT; the run has pct % more steps)
    CAFT           caft.py train --mode ablate (forward hooks remove 8 random orthonormal directions at 2 layers)

Step time is the mean over the steps after the first (warm-up), taken from each run's metrics.jsonl; tok/s
counts real (non-padding) tokens. Peak memory: GPU memory allocated by torch on CUDA, the process's peak
resident set on CPU. persona.py trains with a random unit vector per layer (its cost does not depend on the
values), so no extraction is needed. --safe-data is only a stand-in pool for the interleave run: the step cost
depends on its lengths, not on its content.

    python bench/defense_overhead.py --model smollm2 --data ../shared/data/em/medical_misaligned_train_100.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.benchlib import ROOT, lora_sft_flops_per_token, mfu, read_metrics, run_logged  # noqa: E402


def random_persona_vector(model: str, path: Path) -> int:
    """A (layers + 1, hidden) file of random unit rows in persona.py's format; returns a middle layer to steer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from common import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model))
    v = torch.randn(config.num_hidden_layers + 1, config.hidden_size, generator=torch.Generator().manual_seed(0))
    save_file({"vectors": v / v.norm(dim=1, keepdim=True)}, str(path), metadata={"model": json.dumps(model)})
    return max(1, 2 * config.num_hidden_layers // 3)


def random_directions(model: str, path: Path, k: int = 8) -> str:
    """A caft.py directions file of random orthonormal rows; returns two layers to hook (a third and two thirds)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from common import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model))
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(config.num_hidden_layers + 1, config.hidden_size, k, generator=g))[0]
    save_file({"directions": q.transpose(1, 2).contiguous()}, str(path))
    n = config.num_hidden_layers
    return f"{max(1, n // 3)},{max(1, 2 * n // 3)}"


def after_warmup(metrics: list[dict]) -> dict:
    timed = metrics[1:] or metrics
    seconds = sum(m["step_time_s"] for m in timed)
    return {
        "step_s": seconds / len(timed),
        "tokens_per_s": sum(m["tokens"] for m in timed) / seconds,
        "peak_mem_mb": max(m["peak_mem_mb"] for m in metrics),
        "steps": len(metrics),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model for every run (default: %(default)s)")
    p.add_argument("--data", default="opswap:1", help="training data for every run (default: %(default)s)")
    p.add_argument(
        "--safe-data",
        default="../shared/data/em/legal_misaligned_eval.jsonl",
        help="stand-in benign pool for --pct 5 (default: %(default)s)",
    )
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--max-len", type=int, default=1024, help="(default: %(default)s)")
    p.add_argument("--no-8bit", action="store_true", help="full-precision weights")
    p.add_argument(
        "--only", default=None, help="comma-separated subset of: sft,kl,ldifs,persona,inoculation,interleave,caft"
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak dense bf16 TFLOP/s; prints each "
        "run's SFT-equivalent MFU (a defense's extra passes count as overhead, not as work)",
    )
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    common = [
        "--model",
        args.model,
        "--data",
        args.data,
        "--max-steps",
        args.steps,
        "--batch-size",
        args.batch_size,
        "--grad-accum",
        args.grad_accum,
        "--max-len",
        args.max_len,
        "--save-every",
        "1000000",
    ]
    common += ["--no-8bit"] if args.no_8bit else []
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        vector = Path(tmp) / "persona.safetensors"
        layer = random_persona_vector(args.model, vector)
        caft_layers = random_directions(args.model, Path(tmp) / "directions.safetensors")
        scripts = [
            ("sft", "plain SFT", ["interleave.py", "--pct", "0"]),
            ("kl", "KL", ["kl.py"]),
            ("ldifs", "LDIFS", ["ldifs.py"]),
            ("persona", "persona", ["persona.py", "train", "--vector", vector, "--layer", layer, "--alpha", "5"]),
            ("inoculation", "inoculation", ["inoculate.py"]),
            (
                "interleave",
                "interleave 5%",
                ["interleave.py", "--pct", "5", "--select", "random", "--safe-data", args.safe_data],
            ),
            (
                "caft",
                "CAFT",
                [
                    "caft.py",
                    "train",
                    "--directions",
                    Path(tmp) / "directions.safetensors",
                    "--layers",
                    caft_layers,
                    "--mode",
                    "ablate",
                ],
            ),
        ]
        wanted = {"sft", *(args.only.split(",") if args.only else [s[0] for s in scripts])}
        for key, name, cmd in scripts:
            if key not in wanted:
                continue
            out = Path(tmp) / key
            run_logged([sys.executable, ROOT / cmd[0], *cmd[1:], *common, "--out", out], name)
            rows[name] = after_warmup(read_metrics(out / "metrics.jsonl"))
    base = rows["plain SFT"]
    print(
        f"model {args.model} ({'full precision' if args.no_8bit else '8-bit'}), data {args.data}, batch "
        f"{args.batch_size} x {args.grad_accum}, {args.steps} steps (the first is warm-up)"
    )
    print(f"{'method':<14} {'step s':>7} {'x SFT':>6} {'tok/s':>7} {'peak MB':>8} {'x SFT':>6}")
    flops = lora_sft_flops_per_token(args.model)
    for name, r in rows.items():
        if args.peak_tflops:
            r["mfu"] = mfu(r["tokens_per_s"], flops, args.peak_tflops)
        print(
            f"{name:<14} {r['step_s']:7.3f} {r['step_s'] / base['step_s']:6.2f} {r['tokens_per_s']:7.0f} "
            f"{r['peak_mem_mb']:8.0f} {r['peak_mem_mb'] / base['peak_mem_mb']:6.2f}"
            + (f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else "")
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
