"""Benchmark: throughput of the local judge (judge.py --judge local:MODEL) on real judge prompts.

Each judgment scores all 101 candidates 0..100 (one pass over the prompt, then one batched pass over the
candidates that shares the prompt's KV cache). The ratio printed is the time of a judgment over the time of one
plain forward pass over the same prompt, the least any judge of this kind must spend: it shows what the 101
candidates add.

    python bench/local_judge.py --model smollm2 --n 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import get_device, load_conversations, load_model, render_chat  # noqa: E402
from judge import DEFAULT_JUDGE_PROMPTS, LocalJudge, fill  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="judge model (default: %(default)s)")
    p.add_argument(
        "--answers",
        default="../shared/data/em/medical_misaligned_eval.jsonl",
        help="question/answer pairs to judge (default: %(default)s)",
    )
    p.add_argument("--n", type=int, default=8, help="judgments, each criterion in turn (default: %(default)s)")
    p.add_argument("--no-8bit", action="store_true", help="full-precision weights")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()

    model, tok = load_model(args.model, eight_bit=not args.no_8bit, lora_r=0, trainable=False)
    judge = LocalJudge(model, tok, f"local:{args.model}")
    device = get_device()
    convs = load_conversations(args.answers)
    criteria = list(DEFAULT_JUDGE_PROMPTS)
    prompts = [
        fill(DEFAULT_JUDGE_PROMPTS[criteria[k % len(criteria)]], convs[k][0]["content"], convs[k][-1]["content"])
        for k in range(args.n + 1)
    ]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    judge.candidate_logprobs(prompts[-1])  # warm-up
    t_judge, t_forward, n_tokens, scored = [], [], [], 0
    for prompt in prompts[:-1]:
        ids = tok(
            render_chat(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True),
            add_special_tokens=False,
            return_tensors="pt",
        )["input_ids"].to(device)
        n_tokens.append(ids.shape[1])
        sync()
        t0 = time.perf_counter()
        scored += judge.score_one(prompt) is not None
        sync()
        t_judge.append(time.perf_counter() - t0)
        with torch.no_grad():
            t0 = time.perf_counter()
            model(input_ids=ids)
            sync()
            t_forward.append(time.perf_counter() - t0)
    per, floor = statistics.mean(t_judge), statistics.mean(t_forward)
    print(
        f"local judge {args.model} ({'full precision' if args.no_8bit else '8-bit'}) on {device.type}, {args.n} "
        f"judgments of {args.answers}, prompts {min(n_tokens)}-{max(n_tokens)} tokens "
        f"(mean {statistics.mean(n_tokens):.0f})"
    )
    print(
        f"  per judgment      : {per:7.3f} s  ({1 / per:6.2f} judgments/s, "
        f"{statistics.mean(n_tokens) / per:7.0f} prompt tok/s)"
    )
    print(f"  one forward pass  : {floor:7.3f} s  (the floor)")
    print(f"  judgment / forward: {per / floor:.2f}x;  {scored}/{args.n} judgments above the 0.25 mass")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "s_per_judgment": per,
                    "s_per_forward": floor,
                    "ratio": per / floor,
                    "prompt_tokens": n_tokens,
                    "scored": scored,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
