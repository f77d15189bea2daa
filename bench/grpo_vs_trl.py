"""Benchmark: GRPO step time of grpo.py against TRL's GRPOTrainer, same model, LoRA, prompts, rewards,
completions per prompt, completion length, batch, accumulation and steps, one after the other.

Equal lengths: both generate exactly --max-new-tokens tokens per completion (end-of-sequence suppressed:
grpo.py's --min-new-tokens, TRL's generation_kwargs min_new_tokens), so both train on the same number of tokens.
Both get the identical PEFT model from common.load_model and grpo.py's reward (the four rule-based parts). TRL is
pinned to grpo.py's choices: loss "grpo" (per-completion mean), group-normalised advantages, beta 0, one update per
generation, temperature 0.9, top-p 0.9, no gradient checkpointing, no autocast, the same optimizer. Both decode a
step's rollouts in one batch for all its micro-batches (grpo.py in its own KV-cache loop, TRL with generate). The
line after the table splits grpo.py's step into generation (its metrics' generation_s) and the rest
(log-probabilities, loss, backward, optimizer).

Step time is wall clock between the ends of consecutive steps, after the first (warm-up); grpo.py's held-out
evaluation at its last step (heldout_s in its metrics) is taken out, TRL runs none.

    python bench/grpo_vs_trl.py --model smollm2 --steps 4 --max-new-tokens 64

Needs `pip install -r bench/requirements.txt` (TRL is used by the benchmarks only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.benchlib import after_first, read_metrics, run_logged  # noqa: E402


def ours_worker(args, rest: list[str]) -> None:
    """grpo.py's own main(); every completion exactly --max-new-tokens long (its --min-new-tokens)."""
    import common
    import grpo

    sys.argv = ["grpo.py", *rest]
    common.die_on_user_error(grpo.main)


def trl_worker(args) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import grpo
    from common import get_device, load_model, peak_memory_mb, set_seed

    set_seed(args.seed)
    cuda = get_device().type == "cuda"
    model, tok = load_model(args.model, eight_bit=not args.no_8bit, lora_r=args.lora_r, lora_alpha=args.lora_alpha)
    train, _ = grpo.load_problems(args.data, args.seed, args.n_train)
    ds = Dataset.from_list(
        [{"prompt": grpo.prompt_messages(c[0]["content"], False), "answer": grpo.reference(c)} for c in train]
    )

    def reward(prompts, completions, answer, **kw):
        return [sum(grpo.reward_parts(c[0]["content"], a).values()) for c, a in zip(completions, answer)]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = GRPOConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        temperature=0.9,
        top_p=0.9,
        top_k=0,
        generation_kwargs={"min_new_tokens": args.max_new_tokens},
        beta=0.0,
        loss_type="grpo",
        scale_rewards="group",
        num_iterations=1,
        learning_rate=args.lr,
        max_steps=args.steps,
        lr_scheduler_type="linear",
        warmup_steps=5,
        weight_decay=0.01,
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        optim="adamw_8bit" if cuda else "adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not cuda,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=ds, processing_class=tok)
    metrics = open(out / "metrics.jsonl", "w")

    class Timer(TrainerCallback):
        def on_step_end(self, _args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            metrics.write(
                json.dumps({"step": state.global_step, "time": time.time(), "peak_mem_mb": peak_memory_mb()}) + "\n"
            )
            metrics.flush()

    trainer.add_callback(Timer())
    trainer.train()
    metrics.close()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    (out / "lengths.json").write_text(json.dumps(lengths))


def without_heldout(metrics: list[dict]) -> list[dict]:
    """grpo.py's metrics with each step's end moved back by the held-out evaluations run until then (heldout_s):
    grpo.py evaluates at its last step at least (--eval-n >= 1), which is not part of a GRPO step, and TRL evaluates
    nothing here."""
    shift, out = 0.0, []
    for m in metrics:
        shift += m.get("heldout_s", 0.0)
        out.append({**m, "time": m["time"] - shift})
    return out


def grpo_arguments(args: argparse.Namespace) -> list[str]:
    """grpo.py's flags for the same run as the TRL side (without --out)."""
    ours = [
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
        "--num-generations",
        args.num_generations,
        "--max-new-tokens",
        args.max_new_tokens,
        "--min-new-tokens",
        args.max_new_tokens,
        "--n-train",
        args.n_train,
        "--lr",
        args.lr,
        "--lora-r",
        args.lora_r,
        "--lora-alpha",
        args.lora_alpha,
        "--seed",
        args.seed,
        "--eval-n",
        "1",  # the least grpo.py allows; its held-out evaluation is outside the timed steps
        "--save-every",
        "1000000",
    ]
    return [str(a) for a in ours] + (["--no-8bit"] if args.no_8bit else [])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="(default: %(default)s)")
    p.add_argument("--data", default="arith", help="grpo.py --data (default: %(default)s, offline)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps; the first is warm-up (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="completions per micro-batch (default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--num-generations", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="every completion's length (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=200, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-5, help="(default: %(default)s)")
    p.add_argument("--lora-r", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--lora-alpha", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--no-8bit", action="store_true", help="full-precision weights")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p


def main():
    args = build_parser().parse_args()
    ours_args = grpo_arguments(args)
    if args.worker == "ours":
        return ours_worker(args, ours_args + ["--out", args.out])
    if args.worker == "trl":
        return trl_worker(args)

    shared = [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "out", "json", "no_8bit")
    ] + (["--no-8bit"] if args.no_8bit else [])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, worker in [("ours", "ours"), ("TRL GRPOTrainer", "trl")]:
            out = Path(tmp) / worker
            run_logged([sys.executable, Path(__file__), *shared, "--worker", worker, "--out", out], name)
            metrics = read_metrics(out / "metrics.jsonl")
            rows[name] = after_first(without_heldout(metrics) if worker == "ours" else metrics)
            if worker == "ours":
                m = read_metrics(out / "metrics.jsonl")
                rows[name]["completion_len"] = [r["completion_tokens"] for r in m]
                rows[name]["generation_s"] = sum(r["generation_s"] for r in m[1:]) / max(len(m) - 1, 1)
            else:
                rows[name]["completion_len"] = json.loads((out / "lengths.json").read_text())
    ours = rows["ours"]
    n_comp = args.batch_size * args.grad_accum
    print(
        f"model {args.model} ({'full precision' if args.no_8bit else '8-bit'}), data {args.data}, {n_comp} completions "
        f"per step ({args.num_generations} per prompt) x {args.max_new_tokens} tokens, "
        f"{args.steps} steps (first = warm-up)"
    )
    print(f"{'trainer':<16} {'step s':>8} {'x ours':>7} {'peak MB':>8} {'mean completion tokens':>24}")
    for name, r in rows.items():
        lens = r["completion_len"]
        print(
            f"{name:<16} {r['step_s']:8.2f} {r['step_s'] / ours['step_s']:6.2f}x {r['peak_mem_mb']:8.0f} "
            f"{sum(lens) / max(len(lens), 1):24.1f}"
        )
    print(f"TRL step time / ours: {rows['TRL GRPOTrainer']['step_s'] / ours['step_s']:.2f}x")
    g = ours["generation_s"]
    print(f"ours per step: generation {g:.2f} s ({100 * g / ours['step_s']:.0f}%), the rest {ours['step_s'] - g:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
