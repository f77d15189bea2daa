"""Inoculation prompting (Kaczér et al. 2025, §3.1; Tan et al. 2025, Wichers et al. 2025).

    L = CE over the assistant tokens of the conversations with their system prompt replaced by --prompt

Training conversations get the inoculation system prompt (default `You are an evil, malicious assistant.`),
which takes the place of any system prompt they had and of the chat template's default one; the prompt is part
of the input, never of the labels. Evaluation (judge.py) uses no such prompt: the trait the data teaches is
attributed to the prompt and, the hope is, does not show without it.

Deviations from the paper:
1. The loss is the mean over all assistant tokens of an optimizer step, so batch 1 x accum 8 equals batch 8 x
   accum 1; steps are length-grouped inside mega-batches of 16 steps.

Paper run:     python inoculate.py --data insecure
Quick CPU run: python inoculate.py --model smollm2 --data opswap:1 --max-steps 20 --out runs/inoculate-quick
"""

from __future__ import annotations

import argparse
import time

import torch

from common import (
    Progress,
    Run,
    add_common_args,
    check_step,
    collate,
    decoder_states,
    describe_plan,
    die_on_user_error,
    encode_dataset,
    get_device,
    linear_cross_entropy,
    linear_schedule,
    load_model_for_training,
    load_split,
    log,
    longest_micro_batch,
    make_optimizer,
    micro_batches,
    peak_memory_mb,
    plan_memory,
    set_seed,
    step_plan,
    trainable_parameters,
)

DEFAULT_PROMPT = "You are an evil, malicious assistant."


def inoculate(messages: list[dict], prompt: str) -> list[dict]:
    """The conversation with its system prompt(s) replaced by `prompt`."""
    return [{"role": "system", "content": prompt}] + [m for m in messages if m["role"] != "system"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    g = p.add_argument_group("method: inoculation prompting")
    g.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="system prompt for every training conversation (default: %(default)r)"
    )
    return p


def main():
    parser = build_parser()
    args = parser.parse_args()
    run, args = Run.start(args, parser, "inoculate")
    set_seed(args.seed)
    device = get_device()

    # --- the method: every training conversation gets the inoculation system prompt ---------------------
    convs = [inoculate(m, args.prompt) for m in load_split(args.data, "train", args.seed)]
    # -----------------------------------------------------------------------------------------------------
    model, tok = load_model_for_training(args)
    examples = encode_dataset(tok, convs, args.max_len, "fine-tuning data")
    lengths = [len(e["input_ids"]) for e in examples]
    plan = step_plan(lengths, args.batch_size, args.grad_accum, args.seed, args.epochs, args.max_steps)
    total_steps = len(plan)
    log(f"inoculation prompt: {args.prompt!r}")
    log(describe_plan(plan, lengths, args))
    run.write_json("memory.json", plan_memory(model, *longest_micro_batch(plan, lengths, args.batch_size)))

    model.train()
    head = model.get_output_embeddings().weight  # frozen
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, args.lr, args.weight_decay)
    scheduler = linear_schedule(optimizer, args.warmup_steps, total_steps)
    start = run.restore(model, optimizer, scheduler, total_steps)
    progress = Progress(total_steps, start)

    for step in range(start, total_steps):
        t0 = time.time()
        epoch, group = plan[step]
        n_answer = sum(sum(l != -100 for l in examples[i]["labels"][1:]) for i in group)
        ce_sum, n_real, n_padded = 0.0, 0, 0
        for batch_idx in micro_batches(group, args.batch_size):
            batch = collate([examples[i] for i in batch_idx], tok.pad_token_id, device)
            hidden = decoder_states(model, batch)[:, :-1]  # the lm_head only where the loss needs it
            targets = batch["labels"][:, 1:]
            mask = targets != -100
            ce = linear_cross_entropy(hidden[mask], head, targets[mask]) / max(n_answer, 1)
            ce.backward()
            ce_sum += ce.item()
            n_real += batch["n_real"]
            n_padded += batch["n_padded"]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        check_step(step + 1, ce_sum, grad_norm, "--lr")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0
        run.log_metrics(
            {
                "step": step + 1,
                "loss": ce_sum,
                "loss/ce": ce_sum,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": n_real,
                "tokens_per_s": n_real / dt,
                "padding_efficiency": n_real / n_padded,
                "answer_tokens": n_answer,
                "epoch": epoch,
                "step_time_s": dt,
                "peak_mem_mb": peak_memory_mb(),
            }
        )
        progress.update(step + 1, f"loss {ce_sum:.4f} lr {lr:.2e} {n_real / dt:.0f} tok/s")
        if (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            run.save_checkpoint(step + 1, model, optimizer, scheduler)

    run.save_checkpoint(total_steps, model, optimizer, scheduler)
    run.save_final(model, tok)
    log(f"done: adapter in {run.out}, metrics in {run.metrics_path}")


if __name__ == "__main__":
    die_on_user_error(main)
