"""KL-divergence regularisation toward the original model (Kaczér et al. 2025, §3.1, Eq. 1; Jaques et al. 2017).

    L = CE(theta) + lambda * KL(p_theta || p_ref)

per token over the full vocabulary, where p_ref is the same network with the LoRA adapter disabled (no second
copy of the weights): the reference pass runs under `torch.no_grad()` and `model.disable_adapter()`. At step 0
the LoRA update is zero, so the KL is exactly 0; it grows as the adapter learns.

Which tokens the KL is averaged over (--kl-tokens):
  answer (default)  the positions that predict an assistant token, the same set as CE: Eq. 1 as the paper reads.
  all               every real (non-padding) position of the sequence (system prompt, question, template
                    tokens, answer), as the paper's co-authors' KL code does (magnus-joergenvag/EMA_RL,
                    `kl_divergence.py`: (KL * attention_mask).sum() / attention_mask.sum(), on the full logits).
                    Prompt positions barely move under SFT, so the mean is smaller and the same lambda pulls
                    differently: lambda's effective strength depends on this choice.

The two terms come from `linear_cross_entropy_and_kl`: the logits only at the positions the loss uses, a chunk of
tokens at a time, CE and KL in one pass over the vocabulary; each term's value and gradient equal the full-logits
formulas beside it (kl_penalty), as tests/test_head_loss.py checks.

Deviations from the paper:
1. Both terms are means over the step's tokens of their set (all its micro-batches), so batch 1 x accum 8 equals
   batch 8 x accum 1; the co-authors' code takes the KL mean per micro-batch.
2. Steps are length-grouped inside mega-batches of 16 steps (less padding).

Paper run:     python kl.py --data insecure --lam 0.1
Quick CPU run: python kl.py --model smollm2 --data opswap:1 --lam 1.0 --max-steps 20 --out runs/kl-quick
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from common import (
    Progress,
    Run,
    UserError,
    add_common_args,
    check_step,
    collate,
    decoder_states,
    describe_plan,
    die_on_user_error,
    encode_dataset,
    get_device,
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


def kl_penalty(
    logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Eq. 1's penalty, the plain formula: KL(p || p_ref) = sum_v p(v) (log p(v) - log p_ref(v)) per token, over the
    positions where mask is True, in float32.

    logits, ref_logits: (B, T, V); mask: (B, T), bool or 0/1 integers. reduction "mean" (over masked tokens) or "sum".
    """
    mask = mask.bool()  # an integer 0/1 mask would index positions 0 and 1 instead of selecting
    dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 logits are computed on in float32
    logp = F.log_softmax(logits[mask].to(dtype), dim=-1)
    ref_logp = F.log_softmax(ref_logits[mask].to(dtype), dim=-1)
    per_token = (logp.exp() * (logp - ref_logp)).sum(-1)
    return per_token.sum() if reduction == "sum" else per_token.mean()


def linear_cross_entropy_and_kl(hidden, ref_hidden, weight, targets, chunk: int = 512):
    """The two terms of Eq. 1 from hidden states, as sums over the N rows (N, H) of hidden and ref_hidden, W (V, H)
    the frozen lm_head's weight, z = hidden W^T, z_ref = ref_hidden W^T:

        ce = sum over rows with targets != -100 of -log softmax(z)[target]
        kl = sum over all rows of KL(softmax(z) || softmax(z_ref))

    Returns (ce, kl), each a tensor with its own gradient for hidden: the values and gradients of
    `linear_cross_entropy_and_kl_reference` (tests/test_head_loss.py), made a chunk of rows at a time, so that two
    (chunk x V) float32 tensors are alive at a time instead of the full logits and their autograd chain."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy_and_kl: the head's weight must be frozen")
    return _LinearCrossEntropyAndKL.apply(hidden, ref_hidden, weight, targets, chunk)


def linear_cross_entropy_and_kl_reference(hidden, ref_hidden, weight, targets):
    """The plain formulas linear_cross_entropy_and_kl computes (tests compare the two, values and gradients)."""
    logits, ref_logits = (hidden @ weight.T)[None], (ref_hidden @ weight.T)[None]
    rows = targets != -100
    ce = F.cross_entropy(logits[0][rows].float(), targets[rows], reduction="sum")
    kl = kl_penalty(logits, ref_logits, torch.ones_like(rows)[None], reduction="sum")
    return ce, kl


class _LinearCrossEntropyAndKL(torch.autograd.Function):
    """The gradients for hidden are made in the forward pass, chunk by chunk. With p = softmax(z):
        d ce / dz = p - onehot(target)                  so  d ce / dh = p W - W[target]   (rows with a target)
        d kl / dz = p * (log p - log p_ref - kl_row)    so  d kl / dh = (that) W
    and the backward pass weighs the two by the gradients of whatever loss they enter (ce + lam * kl)."""

    @staticmethod
    def forward(ctx, hidden, ref_hidden, weight, targets, chunk):
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # bf16 logits are computed on in float32
        ce_total = torch.zeros((), dtype=dtype, device=hidden.device)
        kl_total = torch.zeros((), dtype=dtype, device=hidden.device)
        d_ce, d_kl = torch.empty_like(hidden), torch.empty_like(hidden)
        for s in range(0, hidden.shape[0], chunk):
            t = targets[s : s + chunk]
            has_target = t != -100
            logp = F.log_softmax((hidden[s : s + chunk] @ weight.T).to(dtype), dim=-1)
            rows = has_target.nonzero()[:, 0]
            ce_total += -logp[rows, t[rows]].sum()
            d = F.log_softmax((ref_hidden[s : s + chunk] @ weight.T).to(dtype), dim=-1)
            d = d.neg_().add_(logp)  # log p - log p_ref
            p = logp.exp_()  # logp is not used again
            kl = torch.bmm(p.unsqueeze(1), d.unsqueeze(2)).view(-1)  # sum_v p_v (log p_v - log p_ref_v), per row
            kl_total += kl.sum()
            grad_ce = p.to(weight.dtype) @ weight
            grad_ce[rows] -= weight[t[rows]]
            grad_ce[~has_target] = 0
            d_ce[s : s + chunk] = grad_ce
            d_kl[s : s + chunk] = d.sub_(kl[:, None]).mul_(p).to(weight.dtype) @ weight
        ctx.save_for_backward(d_ce, d_kl)
        return ce_total, kl_total

    @staticmethod
    def backward(ctx, grad_ce, grad_kl):
        d_ce, d_kl = ctx.saved_tensors
        return d_ce * grad_ce.to(d_ce.dtype) + d_kl * grad_kl.to(d_kl.dtype), None, None, None, None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    g = p.add_argument_group("method: KL penalty")
    g.add_argument(
        "--lam", type=float, default=0.1, help="lambda_KL (default: %(default)s; paper grid 0.01, 0.03, 0.1, 0.3, 1.0)"
    )
    g.add_argument(
        "--kl-tokens",
        choices=["answer", "all"],
        default="answer",
        help="average the KL over the "
        "assistant tokens (Eq. 1) or over every real token, as the co-authors' code does (default: "
        "%(default)s)",
    )
    return p


def main():
    parser = build_parser()
    args = parser.parse_args()
    if not math.isfinite(args.lam):
        raise UserError(f"--lam {args.lam}: must be a finite number")
    if args.lam < 0:
        raise UserError(f"--lam {args.lam}: must be >= 0")
    run, args = Run.start(args, parser, "kl")
    set_seed(args.seed)
    device = get_device()

    convs = load_split(args.data, "train", args.seed)
    model, tok = load_model_for_training(args)
    examples = encode_dataset(tok, convs, args.max_len, "fine-tuning data")
    lengths = [len(e["input_ids"]) for e in examples]
    plan = step_plan(lengths, args.batch_size, args.grad_accum, args.seed, args.epochs, args.max_steps)
    total_steps = len(plan)
    log(describe_plan(plan, lengths, args))
    rows, width = longest_micro_batch(plan, lengths, args.batch_size)
    ref_hidden_bytes = rows * width * model.config.hidden_size * model.get_input_embeddings().weight.element_size()
    run.write_json("memory.json", plan_memory(model, rows, width, extra_bytes=ref_hidden_bytes))

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
        # both terms are means over the step's tokens of their set, whatever its split into micro-batches
        n_answer = max(sum(sum(l != -100 for l in examples[i]["labels"][1:]) for i in group), 1)
        n_tokens = sum(len(examples[i]["input_ids"]) for i in group)
        n_kl = n_answer if args.kl_tokens == "answer" else n_tokens
        loss_sum, ce_sum, kl_sum, n_real, n_padded = 0.0, 0.0, 0.0, 0, 0
        for batch_idx in micro_batches(group, args.batch_size):
            batch = collate([examples[i] for i in batch_idx], tok.pad_token_id, device)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            hidden = decoder_states(model, inputs)  # the lm_head only where the loss needs it
            # --- the method: the reference is the same weights with the adapter switched off ---------------
            with torch.no_grad(), model.disable_adapter():
                ref_hidden = decoder_states(model, inputs)
            targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)  # position t predicts token t+1
            if args.kl_tokens == "answer":  # the positions that predict an answer token
                where = targets != -100
            else:  # every real position, as the co-authors' code
                where = batch["attention_mask"].bool()
            ce_tokens, kl_tokens = linear_cross_entropy_and_kl(hidden[where], ref_hidden[where], head, targets[where])
            ce = ce_tokens / n_answer
            kl = kl_tokens / n_kl
            loss = ce + args.lam * kl  # Eq. 1
            loss.backward()
            # -----------------------------------------------------------------------------------------------
            loss_sum += loss.item()
            ce_sum += ce.item()
            kl_sum += kl.item()
            n_real += batch["n_real"]
            n_padded += batch["n_padded"]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        check_step(step + 1, loss_sum, grad_norm, "--lr and --lam")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0
        loss = loss_sum
        run.log_metrics(
            {
                "step": step + 1,
                "loss": loss,
                "loss/ce": ce_sum,
                "loss/kl": kl_sum,
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
        progress.update(
            step + 1, f"loss {loss:.4f} (ce {ce_sum:.4f} kl {kl_sum:.5f}) lr {lr:.2e} {n_real / dt:.0f} tok/s"
        )
        if (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            run.save_checkpoint(step + 1, model, optimizer, scheduler)

    run.save_checkpoint(total_steps, model, optimizer, scheduler)
    run.save_final(model, tok)
    log(f"done: adapter in {run.out}, metrics in {run.metrics_path}")


if __name__ == "__main__":
    die_on_user_error(main)
