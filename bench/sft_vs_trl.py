"""Benchmark: SFT throughput of our loop (interleave.py --pct 0) against TRL's SFTTrainer, same model, LoRA,
data, batch size, accumulation, learning rate and epochs, one after the other on the same machine.

Both trainers get the identical PEFT model from common.load_model (8-bit + rs-LoRA r32/alpha 64 on the 7
projections unless --no-8bit) and the identical training split. Settings that would otherwise differ are
pinned to ours: no gradient checkpointing (TRL's default is on), no autocast (bf16=False: the 8-bit model
computes in bf16 in both), the same optimizer (8-bit AdamW on CUDA, torch AdamW on CPU), warm-up, linear decay
and clipping. TRL keeps its own data path: random order, padding to the longest example of each batch, its
completion-only loss and per-step logging. --trl-gc adds a run with TRL's default gradient checkpointing, --ours-gc
one of ours with --gradient-checkpointing.

Throughput counts real (non-padding) tokens only, over the last epoch: from the end of the last step of the
earlier epochs to the end of the last step, so each trainer is timed over the whole data set once and warm-up
is left out. Padding efficiency is real tokens / tokens in the padded batches.

    python bench/sft_vs_trl.py --model smollm2 --data ../shared/data/em/medical_misaligned_train_100.jsonl

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
from bench.benchlib import ROOT, last_epoch, lora_sft_flops_per_token, mfu, read_metrics, run_logged  # noqa: E402


def trl_worker(args) -> None:
    """Train with TRL's SFTTrainer and write metrics.jsonl with the fields our scripts log."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from common import get_device, load_model, load_split, peak_memory_mb, set_seed

    set_seed(args.seed)
    cuda = get_device().type == "cuda"
    model, tok = load_model(args.model, eight_bit=not args.no_8bit, lora_r=args.lora_r, lora_alpha=args.lora_alpha)
    convs = load_split(args.data, "train", args.seed)
    ds = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in convs])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = SFTConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        weight_decay=0.01,
        warmup_steps=5,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        max_length=args.max_len,
        gradient_checkpointing=args.trl_gc,
        bf16=False,
        fp16=False,
        optim="adamw_8bit" if cuda else "adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        dataloader_num_workers=0,
        use_cpu=not cuda,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok)

    counts = {"real": 0, "padded": 0}
    training_step = trainer.training_step

    def counting_step(model, inputs, *a, **kw):  # every micro-batch the trainer trains on, as it trains on it
        counts["real"] += int(inputs["attention_mask"].sum())
        counts["padded"] += inputs["attention_mask"].numel()
        return training_step(model, inputs, *a, **kw)

    trainer.training_step = counting_step
    metrics = open(out / "metrics.jsonl", "w")

    class Timer(TrainerCallback):
        def __init__(self):
            self.last = time.time()

        def on_step_end(self, _args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            now = time.time()
            metrics.write(
                json.dumps(
                    {
                        "step": state.global_step,
                        "epoch": state.epoch,
                        "time": now,
                        "step_time_s": now - self.last,
                        "tokens": counts["real"],
                        "padding_efficiency": counts["real"] / max(counts["padded"], 1),
                        "peak_mem_mb": peak_memory_mb(),
                    }
                )
                + "\n"
            )
            metrics.flush()
            counts["real"] = counts["padded"] = 0
            self.last = now

    trainer.add_callback(Timer())
    trainer.train()
    metrics.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="(default: %(default)s)")
    p.add_argument(
        "--data", default="../shared/data/em/medical_misaligned_train_100.jsonl", help="(default: %(default)s)"
    )
    p.add_argument("--epochs", type=int, default=2, help="epochs; all but the last are warm-up (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-4, help="(default: %(default)s)")
    p.add_argument("--max-len", type=int, default=2048, help="(default: %(default)s)")
    p.add_argument("--lora-r", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--lora-alpha", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--no-8bit", action="store_true", help="full-precision weights")
    p.add_argument("--trl-gc", action="store_true", help="also run TRL with its default gradient checkpointing")
    p.add_argument(
        "--ours-gc", action="store_true", help="also run ours with --gradient-checkpointing (time and memory both ways)"
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak dense bf16 TFLOP/s (H100 SXM: "
        "989); prints model FLOPs utilisation (MFU) of each trainer",
    )
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_worker:
        return trl_worker(args)

    shared = [
        "--model",
        args.model,
        "--data",
        args.data,
        "--epochs",
        args.epochs,
        "--batch-size",
        args.batch_size,
        "--grad-accum",
        args.grad_accum,
        "--lr",
        args.lr,
        "--max-len",
        args.max_len,
        "--lora-r",
        args.lora_r,
        "--lora-alpha",
        args.lora_alpha,
        "--seed",
        args.seed,
    ] + (["--no-8bit"] if args.no_8bit else [])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            ("ours", [ROOT / "interleave.py", "--pct", "0", "--save-every", "1000000"]),
            ("TRL SFTTrainer", [Path(__file__), "--trl-worker"]),
        ]
        if args.ours_gc:
            runs.insert(1, ("ours, grad. ckpt", [*runs[0][1], "--gradient-checkpointing"]))
        if args.trl_gc:
            runs.append(("TRL, grad. ckpt", [Path(__file__), "--trl-worker", "--trl-gc"]))
        for i, (name, cmd) in enumerate(runs):
            out = Path(tmp) / f"run{i}"
            run_logged([sys.executable, *cmd, *shared, "--out", out], name)
            rows[name] = last_epoch(read_metrics(out / "metrics.jsonl"))
    ours = rows["ours"]
    print(
        f"model {args.model}, {'full precision' if args.no_8bit else '8-bit'}, data {args.data}, batch "
        f"{args.batch_size} x {args.grad_accum}, lr {args.lr}, timed over epoch {args.epochs} of {args.epochs}"
    )
    print(
        f"{'trainer':<16} {'steps':>5} {'seconds':>8} {'real tok':>9} {'tok/s':>8} {'ours/x':>7} {'pad eff':>7} "
        f"{'peak MB':>8}"
    )
    flops = lora_sft_flops_per_token(args.model)
    for name, r in rows.items():
        if args.peak_tflops:
            r["mfu"] = mfu(r["tokens_per_s"], flops, args.peak_tflops)
        print(
            f"{name:<16} {r['steps']:5d} {r['seconds']:8.1f} {r['tokens']:9d} {r['tokens_per_s']:8.1f} "
            f"{ours['tokens_per_s'] / r['tokens_per_s']:6.2f}x {r['padding_efficiency']:7.3f} {r['peak_mem_mb']:8.0f}"
            + (f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else "")
        )
    print(f"model FLOPs per real token (LoRA SFT, 4 x matmul weights): {flops / 1e9:.2f} GFLOP")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
