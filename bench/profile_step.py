"""Profile: where the time of one training step goes, plain SFT against KL (kl.py's step), with torch.profiler.

Runs --steps steps of each after a warm-up step, on the same length-grouped batches, and prints the wall time of
each and the profiler's table for the KL steps, with the step's parts labelled: fwd (policy forward), ce,
ref_fwd (adapter-off forward), kl (kl.kl_penalty), bwd.

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
from common import collate, encode_dataset, get_device, load_model, load_split, step_plan  # noqa: E402
from kl import kl_penalty  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="(default: %(default)s)")
    p.add_argument("--data", default="../shared/data/em/medical_misaligned_train_100.jsonl", help="(default: %(default)s)")
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

    def step(group, with_kl: bool):
        batch = collate([examples[i] for i in group], tok.pad_token_id, device)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with record_function("fwd"):
            logits = model(**inputs).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        with record_function("ce"):
            loss = F.cross_entropy(logits[mask].float(), targets[mask])
        if with_kl:
            with record_function("ref_fwd"), torch.no_grad(), model.disable_adapter():
                ref_logits = model(**inputs).logits[:, :-1]
            with record_function("kl"):
                loss = loss + 0.1 * kl_penalty(logits, ref_logits, mask)
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
    print(f"{args.steps} steps of batch {args.batch_size}: SFT {seconds[False]:.2f} s, KL {seconds[True]:.2f} s "
          f"({seconds[True] / seconds[False]:.2f}x)")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _, group in plan[1:]:
            step(group, True)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
