"""LDIFS: l2 distance in feature space to the original model (Kaczér et al. 2025, §3.1, Eq. 2; Mukhoti et al. 2024).

    L = CE(theta) + lambda * d(x_theta, x_ref)
    d = (1 / |batch|) sum_examples  sum_layers  || x_l / ||x_l||  -  x_ref,l / ||x_ref,l|| ||^2

x_l is the residual stream after decoder block l (the block's output) at --layers (default 5 evenly spaced
blocks, floor(linspace(0, L-1, 5)): [0, 6, 13, 20, 27] for 28 blocks); for one example and one layer, the
features at all its real (non-padding) positions are flattened into one vector and L2-normalised. This is the
normalisation of the paper's co-authors' code (magnus-joergenvag/EMA_RL, `featextract.py`,
`compute_feature_space_distance_v1`: per example, the 5 normalised layer vectors concatenated, squared L2
distance, mean over the batch), so the paper's lambda grid (0.01-1.0) has the paper's meaning. Each layer's term
lies in [0, 4]. x_ref comes from the same network with the LoRA adapter disabled, under no_grad; the trained
side keeps its graph, so the term's gradient reaches the LoRA weights.

Deviations from the paper / the co-authors' code:
1. Gradient. The co-authors' public LDIFS code computes BOTH feature sets under `torch.no_grad()` and
   `.detach()`es them, so its LDIFS term has no gradient at all: it is a logged number that never changes the
   weights. That would explain the paper's finding that "LDIFS has almost no effect and no sensitivity to
   lambda" (Tables 2 and 13). Ours has a gradient (the trained side is not detached), as Eq. 2 and Mukhoti et
   al. intend, so our LDIFS runs are not expected to reproduce the paper's LDIFS rows.
2. Padding. The co-authors' code runs one example at a time (batch 1), so no padding is ever flattened in; we
   run padded micro-batches and mask the padding positions out, which gives the same per-example vectors.
3. Averaging. d is a mean over all examples of the optimizer step (all its micro-batches), and CE a mean over
   its assistant tokens, so batch 1 x accum 8 equals batch 8 x accum 1.
4. Earlier versions of this script used the unnormalised mean squared difference per token (||x - x_ref||^2 / H),
   which grows with the square of the residual norm: about 100x the CE gradient at lambda 1 on SmolLM2.

Paper run:     python ldifs.py --data insecure --lam 1.0
Quick CPU run: python ldifs.py --model smollm2 --data opswap:1 --max-steps 20 --out runs/ldifs-quick
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from common import (
    Progress,
    Run,
    UserError,
    add_common_args,
    check_step,
    collate,
    decoder_blocks,
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


def feature_distance(
    feats: list[torch.Tensor], ref_feats: list[torch.Tensor], mask: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Eq. 2 with the co-authors' normalisation: per example b and layer l, the features at the real positions,
    flattened and L2-normalised, u = x_l[b, mask_b] / ||x_l[b, mask_b]||; d_b = sum_l ||u - u_ref||^2. Returns
    the mean (or sum) of d_b over the examples.

    feats, ref_feats: one (B, T, H) tensor per layer; mask: (B, T), bool or 0/1 integers, true at real tokens.
    """
    keep = mask.bool()[..., None]
    per_example = 0.0
    for x, r in zip(feats, ref_feats):
        dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 features are computed on in float32
        x = x.to(dtype).masked_fill(~keep, 0.0)  # padding positions add nothing to the norm or the distance
        r = r.to(dtype).masked_fill(~keep, 0.0)
        x = x / x.square().sum((1, 2), keepdim=True).sqrt().clamp_min(1e-12)  # as F.normalize (eps 1e-12)
        r = r / r.square().sum((1, 2), keepdim=True).sqrt().clamp_min(1e-12)
        per_example = per_example + (x - r).square().sum((1, 2))  # (B,)
    return per_example.sum() if reduction == "sum" else per_example.mean()


def default_layers(n_blocks: int, k: int = 5) -> list[int]:
    """k evenly spaced decoder blocks: floor(linspace(0, n_blocks - 1, k)), without repeats."""
    return sorted({int(x) for x in np.linspace(0, n_blocks - 1, k)})


def residual_features(
    model, inputs: dict, layers: list[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """One training forward pass (with graph) and one reference pass (adapter off, no graph) of the decoder only
    (no lm_head); returns (block outputs of the trained model, of the reference, last hidden states)."""
    captured = []

    def grab(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    blocks = decoder_blocks(model)
    handles = [blocks[l].register_forward_hook(grab) for l in layers]
    try:
        hidden = decoder_states(model, inputs)
        feats = captured[:]
        captured.clear()
        with torch.no_grad(), model.disable_adapter():
            decoder_states(model, inputs)  # the decoder alone: no need for the vocabulary projection
        ref_feats = captured[:]
    finally:
        for h in handles:
            h.remove()
    return feats, ref_feats, hidden


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    g = p.add_argument_group("method: LDIFS")
    g.add_argument(
        "--lam",
        type=float,
        default=1.0,
        help="lambda_LDIFS (default: %(default)s; paper grid 0.01, 0.03, 0.1, 0.3, 1.0)",
    )
    g.add_argument(
        "--layers",
        default="auto",
        help="comma-separated decoder block indices (0-based) whose outputs "
        "are compared, or 'auto' for 5 evenly spaced blocks (default: %(default)s)",
    )
    return p


def main():
    parser = build_parser()
    args = parser.parse_args()
    if not math.isfinite(args.lam):
        raise UserError(f"--lam {args.lam}: must be a finite number")
    if args.lam < 0:
        raise UserError(f"--lam {args.lam}: must be >= 0")
    run, args = Run.start(args, parser, "ldifs")
    set_seed(args.seed)
    device = get_device()

    convs = load_split(args.data, "train", args.seed)
    model, tok = load_model_for_training(args)
    n_blocks = len(decoder_blocks(model))
    try:
        layers = default_layers(n_blocks) if args.layers == "auto" else [int(x) for x in args.layers.split(",")]
    except ValueError:
        raise UserError(f"--layers {args.layers!r}: expected 'auto' or comma-separated integers") from None
    if not all(0 <= l < n_blocks for l in layers):
        raise UserError(f"--layers {args.layers}: the model has decoder blocks 0..{n_blocks - 1}")
    log(f"LDIFS on the outputs of decoder blocks {layers} (of {n_blocks})")
    examples = encode_dataset(tok, convs, args.max_len, "fine-tuning data")
    lengths = [len(e["input_ids"]) for e in examples]
    plan = step_plan(lengths, args.batch_size, args.grad_accum, args.seed, args.epochs, args.max_steps)
    total_steps = len(plan)
    log(describe_plan(plan, lengths, args))
    rows, width = longest_micro_batch(plan, lengths, args.batch_size)
    per_layer = (model.get_input_embeddings().weight.element_size() + 24) * model.config.hidden_size  # ref + fp32 work
    run.write_json("memory.json", plan_memory(model, rows, width, extra_bytes=len(layers) * per_layer * rows * width))

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
        # CE: a mean over the step's answer tokens; the distance: a mean over its examples
        n_answer = max(sum(sum(l != -100 for l in examples[i]["labels"][1:]) for i in group), 1)
        n_tokens = sum(len(examples[i]["input_ids"]) for i in group)
        loss_sum, ce_sum, dist_sum, n_padded = 0.0, 0.0, 0.0, 0
        for batch_idx in micro_batches(group, args.batch_size):
            batch = collate([examples[i] for i in batch_idx], tok.pad_token_id, device)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            # --- the method: block outputs of the trained model vs the adapter-disabled model --------------
            feats, ref_feats, hidden = residual_features(model, inputs, layers)
            dist = feature_distance(feats, ref_feats, batch["attention_mask"], reduction="sum") / len(group)
            # -----------------------------------------------------------------------------------------------
            targets = batch["labels"][:, 1:]
            mask = targets != -100
            ce = linear_cross_entropy(hidden[:, :-1][mask], head, targets[mask]) / n_answer
            loss = ce + args.lam * dist  # Eq. 2
            loss.backward()
            loss_sum += loss.item()
            ce_sum += ce.item()
            dist_sum += dist.item()
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
                "loss/ldifs": dist_sum,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": n_tokens,
                "tokens_per_s": n_tokens / dt,
                "padding_efficiency": n_tokens / n_padded,
                "answer_tokens": n_answer,
                "epoch": epoch,
                "step_time_s": dt,
                "peak_mem_mb": peak_memory_mb(),
            }
        )
        progress.update(
            step + 1, f"loss {loss:.4f} (ce {ce_sum:.4f} ldifs {dist_sum:.3e}) lr {lr:.2e} {n_tokens / dt:.0f} tok/s"
        )
        if (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            run.save_checkpoint(step + 1, model, optimizer, scheduler)

    run.save_checkpoint(total_steps, model, optimizer, scheduler)
    run.save_final(model, tok)
    log(f"done: adapter in {run.out}, metrics in {run.metrics_path}")


if __name__ == "__main__":
    die_on_user_error(main)
