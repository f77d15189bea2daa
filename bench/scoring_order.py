"""Benchmark: the one-time cost of Interleaving+ scoring (Eq. 4, the mean answer NLL of every benign candidate)
with length-sorted batches, as interleave.answer_nll does it, against the same batches in a random order.

Both passes use interleave.answer_nll itself on the same model and examples: the unsorted pass feeds it one
random batch at a time (sorting inside one batch changes nothing). Both must give the same NLLs; the largest
difference is printed next to the speed-up.

    python bench/scoring_order.py --model smollm2 --pool ../shared/data/em/legal_misaligned_eval.jsonl --n 200
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import encode_dataset, get_device, load_conversations, load_model, padding_efficiency  # noqa: E402
from interleave import answer_nll  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="(default: %(default)s)")
    p.add_argument(
        "--pool",
        default="../shared/data/em/legal_misaligned_eval.jsonl",
        help="candidates to score: a dataset name or .jsonl (default: %(default)s)",
    )
    p.add_argument("--n", type=int, default=200, help="candidates, a seeded sample of the pool (default: %(default)s)")
    p.add_argument(
        "--batch-size", type=int, default=8, help="as interleave.py --score-batch-size (default: %(default)s)"
    )
    p.add_argument("--max-len", type=int, default=2048, help="(default: %(default)s)")
    p.add_argument("--no-8bit", action="store_true", help="full-precision weights")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()

    model, tok = load_model(args.model, eight_bit=not args.no_8bit, lora_r=0, trainable=False)
    device = get_device()
    pool = load_conversations(args.pool)
    rng = np.random.default_rng(args.seed)
    convs = [pool[i] for i in rng.permutation(len(pool))[: args.n]]
    examples = encode_dataset(tok, convs, args.max_len, "candidates")
    lengths = [len(e["input_ids"]) for e in examples]
    # answer_nll prints progress lines per call: kept out of the output here
    with contextlib.redirect_stderr(io.StringIO()):  # warm-up: one batch of the longest examples (allocations, kernels)
        answer_nll(
            model,
            sorted(examples, key=lambda e: -len(e["input_ids"]))[: args.batch_size],
            args.batch_size,
            tok.pad_token_id,
            device,
        )

    order = list(rng.permutation(len(examples)))
    random_batches = [order[k : k + args.batch_size] for k in range(0, len(order), args.batch_size)]
    by_length = sorted(range(len(examples)), key=lambda i: -lengths[i])
    sorted_batches = [by_length[k : k + args.batch_size] for k in range(0, len(by_length), args.batch_size)]

    def timed(fn):
        if device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            out = fn()
        return out, time.perf_counter() - t0

    nll_sorted, t_sorted = timed(lambda: answer_nll(model, examples, args.batch_size, tok.pad_token_id, device))

    def unsorted():
        nll = [0.0] * len(examples)
        for b in random_batches:
            for i, v in zip(b, answer_nll(model, [examples[i] for i in b], len(b), tok.pad_token_id, device)):
                nll[i] = v
        return nll

    nll_unsorted, t_unsorted = timed(unsorted)
    diff = max(abs(a - b) for a, b in zip(nll_sorted, nll_unsorted))
    rows = {
        "sorted": {"seconds": t_sorted, "padding_efficiency": padding_efficiency(lengths, sorted_batches)},
        "unsorted": {"seconds": t_unsorted, "padding_efficiency": padding_efficiency(lengths, random_batches)},
    }
    print(
        f"model {args.model} ({'full precision' if args.no_8bit else '8-bit'}), {len(examples)} candidates from "
        f"{args.pool}, batch {args.batch_size}, {sum(lengths)} tokens"
    )
    print(f"{'batches':<10} {'seconds':>8} {'examples/s':>10} {'pad eff':>8}")
    for name, r in rows.items():
        r["examples_per_s"] = len(examples) / r["seconds"]
        print(f"{name:<10} {r['seconds']:8.1f} {r['examples_per_s']:10.2f} {r['padding_efficiency']:8.3f}")
    print(f"speed-up of length-sorted batches: {t_unsorted / t_sorted:.2f}x; largest NLL difference {diff:.2e}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"args": vars(args), "results": rows, "speedup": t_unsorted / t_sorted, "max_nll_diff": diff}, indent=2
            )
        )


if __name__ == "__main__":
    main()
