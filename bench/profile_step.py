"""Profile: where the time of one training step goes, plain SFT (interleave.py's step) against KL (kl.py's step),
with torch.profiler, each step the scripts' own: decoder_states, then common.linear_cross_entropy (lm_head only at the
answer positions, in chunks), or kl.linear_cross_entropy_and_kl with the reference hidden states.

Runs --steps steps of each after a warm-up step, on the same length-grouped batches, and prints the wall time of each,
a table of the step's labelled parts per step (fwd: the policy's decoder pass; ref_fwd: the adapter-off pass; head:
lm_head, softmax, CE (and the reference head and KL) with their gradients; bwd: the backward pass through the
decoder), then the profiler's op table for the KL steps.

    python bench/profile_step.py --model smollm2 --data ../shared/data/em/medical_misaligned_train_100.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (  # noqa: E402
    collate,
    decoder_states,
    encode_dataset,
    get_device,
    linear_cross_entropy,
    load_model,
    load_split,
    step_plan,
)
from kl import linear_cross_entropy_and_kl  # noqa: E402

PARTS = ("fwd", "ref_fwd", "head", "bwd")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="(default: %(default)s)")
    p.add_argument(
        "--data", default="../shared/data/em/medical_misaligned_train_100.jsonl", help="(default: %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=1024, help="(default: %(default)s)")
    p.add_argument("--no-8bit", action="store_true", help="full-precision weights")
    p.add_argument("--rows", type=int, default=25, help="rows of the profiler table (default: %(default)s)")
    args = p.parse_args()

    model, tok = load_model(args.model, eight_bit=not args.no_8bit)
    examples = encode_dataset(tok, load_split(args.data, "train", 0), args.max_len)
    plan = step_plan([len(e["input_ids"]) for e in examples], args.batch_size, 1, 0, 1, args.steps + 1)
    device = get_device()
    model.train()
    head = model.get_output_embeddings().weight

    def step(group, with_kl: bool):
        batch = collate([examples[i] for i in group], tok.pad_token_id, device)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)  # position t predicts token t+1
        where = targets != -100
        n = max(int(where.sum()), 1)
        with record_function("fwd"):
            hidden = decoder_states(model, inputs)
        if with_kl:
            with record_function("ref_fwd"), torch.no_grad(), model.disable_adapter():
                ref_hidden = decoder_states(model, inputs)
            with record_function("head"):
                ce, kl = linear_cross_entropy_and_kl(hidden[where], ref_hidden[where], head, targets[where])
                loss = ce / n + 0.1 * kl / n
        else:
            with record_function("head"):
                loss = linear_cross_entropy(hidden[where], head, targets[where]) / n
        with record_function("bwd"):
            loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(plan[0][1], True)  # warm-up
    seconds = {}
    for with_kl in (False, True):
        t0 = time.perf_counter()
        for _, group in plan[1:]:
            step(group, with_kl)
        seconds[with_kl] = time.perf_counter() - t0
    print(
        f"{args.steps} steps of batch {args.batch_size}: SFT {seconds[False]:.2f} s, KL {seconds[True]:.2f} s "
        f"({seconds[True] / seconds[False]:.2f}x)"
    )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    parts = {}
    for with_kl in (False, True):
        with profile(activities=activities) as prof:
            for _, group in plan[1:]:
                step(group, with_kl)
        totals = {e.key: e.cpu_time_total / 1e6 / args.steps for e in prof.key_averages() if e.key in PARTS}
        parts[with_kl] = totals
    print(f"\nseconds per step (profiled, so slower than above)\n{'part':10}{'SFT':>8}{'KL':>8}{'KL - SFT':>10}")
    for name in PARTS:
        sft, kl = parts[False].get(name, 0.0), parts[True].get(name, 0.0)
        print(f"{name:10}{sft:8.2f}{kl:8.2f}{kl - sft:10.2f}")
    sft, kl = sum(parts[False].values()), sum(parts[True].values())
    print(f"{'sum':10}{sft:8.2f}{kl:8.2f}{kl - sft:10.2f}   KL / SFT {kl / sft:.2f}x\n")
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
