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

The logits are made only at the positions the loss uses, a chunk of tokens at a time (common.head_loss with
ce_kl_and_grad: CE and KL in one pass over the vocabulary, no (tokens x vocab) tensor beyond one chunk); value and
gradient equal the full-logits formula (kl_penalty), as tests/test_head_loss.py checks.

Deviations from the paper:
1. Both terms are means over the step's tokens of their set (all its micro-batches), so batch 1 x accum 8 equals
   batch 8 x accum 1; the co-authors' code takes the KL mean per micro-batch.
2. Steps are length-grouped inside mega-batches of 16 steps (less padding).

Paper run:     python kl.py --data insecure --lam 0.1
Quick CPU run: python kl.py --model smollm2 --data opswap:1 --lam 1.0 --max-steps 20 --out runs/kl-quick
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F

from common import (
    Progress,
    Run,
    UserError,
    add_common_args,
    collate,
    decoder_states,
    describe_plan,
    die_on_user_error,
    encode_dataset,
    get_device,
    head_loss,
    linear_schedule,
    load_model,
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


class _TokenKL(torch.autograd.Function):
    """Per-token KL(p || q) from logits z and reference log-probabilities log q, each (N, V); returns (N,).

    The same value as the plain formula, with its gradient written out instead of taped: for
    KL = sum_v p_v (log p_v - log q_v) with p = softmax(z),   dKL/dz = p * (log p - log q - KL).
    Two (N, V) float32 buffers, updated in place, instead of the half-dozen that autograd keeps for the
    log_softmax / exp / sub / mul chain: about 2x faster on the vocabulary-sized part of the step.
    """

    @staticmethod
    def forward(ctx, z, ref_logp):
        dtype = torch.promote_types(z.dtype, torch.float32)  # bf16 logits are computed on in float32
        p = F.log_softmax(z.to(dtype), dim=-1)  # log p for now
        d = ref_logp.to(dtype).neg().add_(p)  # log p - log q
        p.exp_()  # p
        kl = torch.bmm(p.unsqueeze(1), d.unsqueeze(2)).view(-1)  # sum_v p_v d_v, no (N, V) temporary
        ctx.save_for_backward(p, d, kl)
        ctx.z_dtype = z.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        p, d, kl = ctx.saved_tensors
        grad_z = d.sub_(kl[:, None]).mul_(p).mul_(grad_kl[:, None])  # p * (log p - log q - KL); d is not reused
        return grad_z.to(ctx.z_dtype), None


def kl_penalty(
    logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """KL(p || p_ref) = sum_v p(v) (log p(v) - log p_ref(v)) per token, over the positions where mask is True.

    logits, ref_logits: (B, T, V); mask: (B, T), bool or 0/1 integers. reduction "mean" (over masked tokens) or
    "sum". Computed in float32 on the masked positions only (the full-vocabulary softmax is the costly part).
    """
    mask = mask.bool()  # an integer 0/1 mask would index positions 0 and 1 instead of selecting
    ref_logp = F.log_softmax(ref_logits[mask].to(torch.promote_types(ref_logits.dtype, torch.float32)), dim=-1)
    per_token = _TokenKL.apply(logits[mask], ref_logp)  # Eq. 1, one value per assistant token
    return per_token.sum() if reduction == "sum" else per_token.mean()


def ce_kl_and_grad(z, ref_hidden, targets, *, weight, w_ce: float, w_kl: float, sums: dict):
    """For common.head_loss, one chunk of tokens: w_ce * CE (rows whose target is -100 add none) + w_kl * sum of
    per-token KL(p || p_ref), and its gradient for the logits z (float32): w_ce (p - onehot) + w_kl dKL/dz, with
    dKL/dz = p (log p - log p_ref - KL) as _TokenKL. The reference logits are made here from the reference hidden
    states, one chunk at a time. sums["ce"], sums["kl"]: the unweighted sums, for the log."""
    logp = F.log_softmax(z, dim=-1)
    rows = (targets != -100).nonzero()[:, 0]
    ce = -logp[rows, targets[rows]].sum()
    d = F.log_softmax((ref_hidden @ weight.T).float(), dim=-1).neg_().add_(logp)  # log p - log q
    p = logp.exp_()  # logp is not used again
    kl = torch.bmm(p.unsqueeze(1), d.unsqueeze(2)).view(-1)
    grad = d.sub_(kl[:, None]).mul_(p).mul_(w_kl)
    grad[rows] += w_ce * p[rows]
    grad[rows, targets[rows]] -= w_ce
    sums["ce"], sums["kl"] = sums["ce"] + ce.detach(), sums["kl"] + kl.sum().detach()
    return w_ce * ce + w_kl * kl.sum(), grad


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
    if args.lam < 0:
        raise UserError(f"--lam {args.lam}: must be >= 0")
    run = Run.start(args, parser, "kl")
    set_seed(args.seed)
    device = get_device()

    convs = load_split(args.data, "train", args.seed)
    model, tok = load_model(
        args.model,
        eight_bit=not args.no_8bit,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        adapter=args.init_adapter,
        trainable=True,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    examples = encode_dataset(tok, convs, args.max_len, "fine-tuning data")
    lengths = [len(e["input_ids"]) for e in examples]
    plan = step_plan(lengths, args.batch_size, args.grad_accum, args.seed, args.epochs, args.max_steps)
    total_steps = len(plan)
    log(describe_plan(plan, lengths, args))
    rows, width = longest_micro_batch(plan, lengths, args.batch_size)
    ref_hidden_bytes = rows * width * model.config.hidden_size * model.get_input_embeddings().weight.element_size()
    run.write_json("memory.json", plan_memory(model, rows, width, extra_bytes=ref_hidden_bytes))

    model.train()
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, args.lr, args.weight_decay)
    scheduler = linear_schedule(optimizer, args.warmup_steps, total_steps)
    start = run.restore(model, optimizer, scheduler, total_steps)
    progress = Progress(total_steps, start)

    for step in range(start, total_steps):
        t0 = time.time()
        epoch, group = plan[step]
        n_answer = sum(sum(l != -100 for l in examples[i]["labels"][1:]) for i in group)
        n_tokens = sum(len(examples[i]["input_ids"]) for i in group)
        n_kl = n_answer if args.kl_tokens == "answer" else n_tokens
        ce_sum, kl_sum, n_real, n_padded = 0.0, 0.0, 0, 0
        for batch_idx in micro_batches(group, args.batch_size):
            batch = collate([examples[i] for i in batch_idx], tok.pad_token_id, device)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            hidden = decoder_states(model, inputs)  # lm_head only where the loss needs it, in chunks
            # --- the method: the reference is the same weights with the adapter switched off ---------------
            with torch.no_grad(), model.disable_adapter():
                ref_hidden = decoder_states(model, inputs)
            targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)  # position t predicts token t+1
            if args.kl_tokens == "answer":  # the positions that predict an answer token
                where = targets != -100
            else:  # every real position, as the co-authors' code
                where = batch["attention_mask"].bool()
            sums = {"ce": 0.0, "kl": 0.0}
            loss_fn = functools.partial(
                ce_kl_and_grad,
                weight=model.get_output_embeddings().weight,
                w_ce=1 / max(n_answer, 1),
                w_kl=args.lam / max(n_kl, 1),
                sums=sums,
            )
            head_loss(model, hidden[where], loss_fn, ref_hidden[where], targets[where]).backward()  # Eq. 1
            # -----------------------------------------------------------------------------------------------
            ce_sum += float(sums["ce"]) / max(n_answer, 1)
            kl_sum += float(sums["kl"]) / max(n_kl, 1)
            n_real += batch["n_real"]
            n_padded += batch["n_padded"]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0
        loss = ce_sum + args.lam * kl_sum
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
