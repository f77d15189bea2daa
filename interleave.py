"""Interleaving defenses against emergent misalignment: SFT with benign data spread through the fine-tuning
data (Kaczér et al. 2025, "In-Training Defenses Against Emergent Misalignment", §3.2).

    L = CE over the assistant tokens of D_fine + D_safe,   |D_safe| = pct/100 * |D_fine|,
    D_safe placed at evenly spaced positions of the training order (not appended at the end).

How D_safe is chosen from the benign pool (--safe-data, WildGuardMix's benign part by default):
    --select random       Interleaving: a seeded random sample.
    --select ppl          Interleaving+: the top examples by the perplexity gap (Eq. 4-6)
                            L_theta(d) = -(1/T) sum_t log P_theta(a_t | q, a_<t)          (Eq. 4)
                            L_mis(d)   = (1/K) sum_k L_theta'_k(d)                          (Eq. 5)
                            s_d        = (L_mis(d) - L_aligned(d)) / (L_aligned(d) + eps)   (Eq. 6)
                          over K deliberately misaligned adapters (--misaligned-adapters), none trained on
                          the current fine-tuning data; aligned = the base model.
    --filter-refusals     Interleaving++ (with ppl): first drop answers with a refusal keyword in their first
                          10 words.
    --select on-policy    random pool prompts answered by the base model itself.
--pct 0 is plain SFT: the paper's "Misaligned" (misaligned data) and "Aligned" (aligned data) baselines.

Deviations from the paper:
1. The loss is the mean over all assistant tokens of an optimizer step (all its micro-batches), not a mean of
   per-micro-batch means; batch 1 x accum 8 therefore equals batch 8 x accum 1.
2. Steps are length-grouped inside mega-batches of 16 steps (less padding); the benign examples are placed
   before grouping, so they stay spread uniformly at the scale of a mega-batch.
3. eps of Eq. 6 is not given in the paper; ours defaults to 0.1 (NLLs are in nats).
4. Interleaving+ scores a seeded random subset of the pool (--pool-size, default 10,000 as in App. E).
5. On-policy answers are sampled with the model's own generation config (the paper does not say how).
6. The default --pct is 0 (plain SFT) so that the offline quick run needs no benign pool; the paper uses 5.
   --select ppl / on-policy and --filter-refusals with --pct 0 are refused (they would train plain SFT).
7. The refusal keyword list of --filter-refusals (common.REFUSAL_KEYWORDS) is a superset of the paper's examples
   ("sorry", "apologize", "cannot"); the paper does not publish its full list. Whole words only, first 10 words.

Paper run (Interleaving++ on insecure code, Qwen2.5-7B-Instruct 8-bit, needs HF_TOKEN for WildGuardMix):
    python interleave.py --pct 5 --select ppl --filter-refusals --misaligned-adapters runs/med,runs/leg,runs/sec
Quick CPU run (offline, bundled SmolLM2-135M-Instruct):
    python interleave.py --model smollm2 --data opswap:1 --max-steps 20 --out runs/quick
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import (
    CACHE_DIR,
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
    has_refusal_keyword,
    linear_cross_entropy,
    linear_schedule,
    load_conversations,
    load_model,
    load_model_for_training,
    load_split,
    load_tokenizer,
    log,
    longest_micro_batch,
    make_optimizer,
    micro_batches,
    optional,
    peak_memory_mb,
    plan_memory,
    read_jsonl,
    release_memory,
    set_seed,
    step_plan,
    trainable_parameters,
    write_jsonl,
)


# ----------------------------------------------------------------------------------------------
# The method: where benign data goes, and which benign data
# ----------------------------------------------------------------------------------------------
def spread_uniformly(fine_order: list[int], safe_order: list[int]) -> list[int]:
    """Merge two orders so that the safe items sit at evenly spaced positions of the result.

    With N = len(fine) + len(safe) positions, safe item j goes to position floor((j + 0.5) * N / len(safe)).
    """
    n_total, n_safe = len(fine_order) + len(safe_order), len(safe_order)
    safe_pos = {int((j + 0.5) * n_total / n_safe): j for j in range(n_safe)} if n_safe else {}
    fine_iter = iter(fine_order)
    return [safe_order[safe_pos[p]] if p in safe_pos else next(fine_iter) for p in range(n_total)]


def is_refusal(answer: str, n_words: int = 10) -> bool:
    """Interleaving++'s filter: a refusal keyword (common.REFUSAL_KEYWORDS) among the answer's first 10 words."""
    return has_refusal_keyword(answer, n_words)


def ppl_gap_scores(nll_aligned: torch.Tensor, nll_misaligned: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 5-6. nll_aligned: (N,) answer mean NLL under the aligned model; nll_misaligned: (K, N) under the K
    misaligned models. Returns s: (N,); high s = the misaligned models find the answer unlikely."""
    mean_mis = nll_misaligned.mean(dim=0)  # Eq. 5
    return (mean_mis - nll_aligned) / (nll_aligned + eps)  # Eq. 6


@torch.no_grad()
def answer_nll(
    model, examples: list[dict], batch_size: int, pad_id: int, device, done: dict | None = None, on_batch=None
) -> list[float]:
    """Eq. 4 for every example: mean NLL of its assistant (answer) tokens under `model`.

    Batched, longest first (little padding, and an out-of-memory error shows up at once). `done` maps
    index -> NLL already computed (skipped); `on_batch(results)` receives each batch's {index: NLL}.
    """
    done = dict(done or {})
    todo = sorted((i for i in range(len(examples)) if i not in done), key=lambda i: -len(examples[i]["input_ids"]))
    progress = Progress(len(examples), len(done), "scored")
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        batch = collate([examples[i] for i in idx], pad_id, device)
        hidden = decoder_states(model, batch)[:, :-1]
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        rows = mask.nonzero()[:, 0]
        logits = model.get_output_embeddings()(hidden[mask])  # lm_head only at the answer positions
        token_nll = F.cross_entropy(logits.float(), targets[mask], reduction="none")
        nll_sum = torch.zeros(len(idx), device=token_nll.device).index_add_(0, rows, token_nll)
        nll = (nll_sum / mask.sum(1).clamp(min=1)).tolist()
        result = dict(zip(idx, nll))
        done.update(result)
        if on_batch:
            on_batch(result)
        if (start // batch_size) % 10 == 0 or start + batch_size >= len(todo):
            progress.update(len(done))
    return [done[i] for i in range(len(examples))]


def _score_cache(pool_spec: str, key: str) -> Path:
    """Scores live next to the pool (a local file's folder, or the dataset cache), one file per model."""
    folder = Path(pool_spec).resolve().parent if pool_spec.endswith(".jsonl") else CACHE_DIR / "data"
    stem = Path(pool_spec).stem if pool_spec.endswith(".jsonl") else pool_spec.replace(":", "-")
    path = folder / f"{stem}.nll-{key}.jsonl"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError:  # a read-only data folder: fall back to the cache
        path = CACHE_DIR / "scores" / path.name
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def adapter_digest(adapter: str, extra: str) -> str:
    """Short content hash of an adapter's weights (and `extra`): the score cache's key for that model."""
    with open(Path(adapter) / "adapter_model.safetensors", "rb") as f:
        return hashlib.sha256(extra.encode() + hashlib.file_digest(f, "sha256").digest()).hexdigest()[:16]


def example_digest(conv: list[dict]) -> str:
    """A candidate's key in the score caches: the hash of its messages, so a score is found again in any pool
    that holds the same conversation (Interleaving++'s filtered pool reuses Interleaving+'s scores)."""
    return hashlib.sha256(json.dumps(conv, sort_keys=True).encode()).hexdigest()[:20]


def select_by_ppl(args, candidates: list[list[dict]], n: int) -> list[list[dict]]:
    """Interleaving+: score every candidate under the aligned model and each misaligned adapter (cached per
    model and candidate, written as it goes, so an interrupted scoring run resumes), then take the top n by Eq. 6."""
    adapters = [a for a in args.misaligned_adapters.split(",") if a]
    tok = load_tokenizer(args.model)
    examples = encode_dataset(tok, candidates, args.max_len, "benign candidates")
    hashes = [example_digest(c) for c in candidates]
    names = ["aligned"] + [f"mis{k}" for k in range(len(adapters))]
    model_tag = f"{args.model}|8bit={not args.no_8bit}|len{args.max_len}"  # 8-bit and fp32 NLLs differ slightly
    keys = [f"base-{hashlib.sha256(model_tag.encode()).hexdigest()[:12]}"] + [
        adapter_digest(a, model_tag) for a in adapters
    ]
    caches = [_score_cache(args.safe_data, k) for k in keys]
    done = [{i: s[h] for i, h in enumerate(hashes) if h in s} for s in map(_read_scores, caches)]
    if any(len(d) < len(examples) for d in done):
        todo = sum(len(examples) - len(d) for d in done)
        log(f"perplexity-gap scores: {len(examples)} candidates x {len(names)} models, {todo} not cached yet")
        model, tok = load_model(args.model, eight_bit=not args.no_8bit, lora_r=0, trainable=False)
        device = get_device()
        from peft import PeftModel

        for k, a in enumerate(adapters):
            if k == 0:
                model = PeftModel.from_pretrained(model, a, adapter_name="mis0", is_trainable=False)
            else:
                model.load_adapter(a, adapter_name=f"mis{k}", is_trainable=False)
        model.eval()
        for name, cache, d in zip(names, caches, done):
            if len(d) == len(examples):
                continue
            log(f"scoring the pool under {name}: {len(examples) - len(d)} candidates -> {cache}")
            if name != "aligned":
                model.set_adapter(name)
            # aligned = the base model: every adapter switched off
            weights = model.disable_adapter() if name == "aligned" and adapters else contextlib.nullcontext()
            with open(cache, "a") as f, weights:

                def append(result):  # partial results reach the disk batch by batch
                    f.writelines(json.dumps({"h": hashes[i], "nll": v}) + "\n" for i, v in result.items())
                    f.flush()

                nll = answer_nll(model, examples, args.score_batch_size, tok.pad_token_id, device, d, append)
            d.update(enumerate(nll))
        del model
        release_memory()  # the training model loads next
    nll = torch.tensor([[d[i] for i in range(len(examples))] for d in done], device="cpu")  # scores, on the host
    scores = ppl_gap_scores(nll[0], nll[1:], args.eps)
    top = torch.argsort(scores, descending=True, stable=True)[:n].tolist()
    log(f"Interleaving+: top {n} of {len(examples)} by Eq. 6, s_d from {scores[top[-1]]:.3f} to {scores[top[0]]:.3f}")
    return [candidates[i] for i in top]


def _read_scores(path: Path) -> dict:
    """{candidate hash: NLL} from a score cache. A line cut by an interruption is dropped (and the file rewritten
    without it, so that appending goes on at a line start): that score is computed again."""
    if not path.exists():
        return {}
    out, whole = {}, []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
            out[str(r["h"])] = float(r["nll"])
            whole.append(line)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    text = "".join(l + "\n" for l in whole)
    if path.read_text() != text:
        path.write_text(text)
    return out


@torch.no_grad()
def generate_on_policy(model, tok, pool: list[list[dict]], n: int, args, rng: np.random.Generator) -> list[list[dict]]:
    """On-policy Interleaving: random pool prompts answered by the base model (adapter disabled), in
    left-padded batches with the KV cache. With --filter-refusals, refusing answers are dropped and more
    prompts are drawn until n answers are kept or the pool runs out."""
    prompts = []
    for i in rng.permutation(len(pool)):
        conv = pool[i]
        first_answer = next(j for j, m in enumerate(conv) if m["role"] == "assistant")
        prompts.append(conv[:first_answer])
    kept, tried = [], 0
    progress = Progress(n, 0, "on-policy answers")
    gen = None
    if args.gen_url:  # a server serving the base model samples instead (the model's own sampling defaults)
        serving = optional("serving", "--gen-url")
        gen = serving.ServerGenerator(args.gen_url, args.gen_model, workers=args.gen_workers)
        gen.check()
    else:
        judge = optional("judge", "--select on-policy (its batched generation)")
    model.eval()
    while len(kept) < n and tried < len(prompts):
        chunk = prompts[
            tried : tried + (args.gen_batch_size if gen is None else max(args.gen_batch_size, n - len(kept)))
        ]
        tried += len(chunk)
        if gen is not None:
            answers = serving.sample_texts(
                gen,
                chunk,
                "on-policy answers (server)",
                temperature=None,
                top_p=None,
                max_tokens=args.gen_max_new_tokens,
            )
        else:
            with model.disable_adapter():
                answers = judge.generate_texts(
                    model, tok, chunk, max_new_tokens=args.gen_max_new_tokens, do_sample=True
                )
        for p, answer in zip(chunk, answers):
            if answer and not (args.filter_refusals and is_refusal(answer)) and len(kept) < n:
                kept.append(p + [{"role": "assistant", "content": answer}])
        progress.update(len(kept), f"({tried} prompts)")
    model.train()
    if len(kept) < n:
        log(f"on-policy: only {len(kept)} usable answers from {len(prompts)} pool prompts (wanted {n})")
    return kept


def build_safe_data(args, run: Run, model, tok, n: int) -> list[list[dict]]:
    """D_safe for this run; saved to out/safe_data.jsonl and reused on --resume."""
    saved = run.out / "safe_data.jsonl"
    if n == 0:
        return []
    if run.resuming and saved.exists():
        return read_jsonl(saved)
    pool = load_conversations(args.safe_data)
    rng = np.random.default_rng([args.seed, 1])
    if args.select == "on-policy":
        safe = generate_on_policy(model, tok, pool, n, args, rng)
    else:
        if args.filter_refusals:
            before = len(pool)
            pool = [c for c in pool if not is_refusal(next(m["content"] for m in c if m["role"] == "assistant"))]
            log(f"refusal filter: kept {len(pool)} of {before} pool examples")
        if args.select == "random":
            safe = [pool[i] for i in rng.permutation(len(pool))[:n]]
        else:
            candidates = [pool[i] for i in sorted(rng.permutation(len(pool))[: args.pool_size])]
            safe = select_by_ppl(args, candidates, n)
    if len(safe) < n:  # training on fewer would report --pct P for a smaller share
        raise UserError(
            f"--pct {args.pct} asks for {n} benign examples, but --safe-data {args.safe_data} gave only "
            f"{len(safe)}{' after the refusal filter' if args.filter_refusals else ''}"
            f"{' (usable on-policy answers)' if args.select == 'on-policy' else ''}: lower --pct (at most "
            f"{100.0 * len(safe) / max(1, round(n * 100 / args.pct)):.1f}) or use a larger pool"
        )
    write_jsonl(saved, safe)
    return safe


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    g = p.add_argument_group("method: interleaving")
    g.add_argument(
        "--pct",
        type=float,
        default=0.0,
        help="benign examples to add, in %% of the fine-tuning "
        "examples; 0 = plain SFT (default: %(default)s; paper: 5, grid 1, 5, 20, 50)",
    )
    g.add_argument(
        "--select",
        choices=["random", "ppl", "on-policy"],
        default="random",
        help="how benign examples are chosen: random (Interleaving), ppl (Interleaving+, needs "
        "--misaligned-adapters), on-policy (answers by the base model) (default: %(default)s)",
    )
    g.add_argument(
        "--filter-refusals",
        action="store_true",
        help="drop benign answers with a refusal keyword "
        "in their first 10 words; with --select ppl this is Interleaving++",
    )
    g.add_argument(
        "--safe-data",
        default="wildguardmix",
        help="benign pool: a dataset name or a local .jsonl "
        "(default: %(default)s, the benign part of allenai/wildguardmix, gated: needs HF_TOKEN)",
    )
    g.add_argument(
        "--misaligned-adapters",
        default="",
        help="comma-separated PEFT adapter folders of deliberately misaligned models (K of them) for --select ppl",
    )
    g.add_argument("--eps", type=float, default=0.1, help="eps of Eq. 6 (default: %(default)s)")
    g.add_argument(
        "--pool-size",
        type=int,
        default=10_000,
        help="candidates scored for --select ppl, a seeded random subset of the pool (default: %(default)s)",
    )
    g.add_argument(
        "--gen-max-new-tokens", type=int, default=512, help="max answer length, on-policy (default: %(default)s)"
    )
    g = p.add_argument_group("scoring and generation (speed only: the results do not depend on these)")
    g.add_argument(
        "--score-batch-size", type=int, default=8, help="batch size of the scoring passes (default: %(default)s)"
    )
    g.add_argument(
        "--gen-batch-size", type=int, default=8, help="prompts per generation batch, on-policy (default: %(default)s)"
    )
    g.add_argument(
        "--gen-url",
        default=None,
        help="on-policy answers from this OpenAI-compatible server (vLLM, llama.cpp) "
        "serving the base model, instead of the in-process model",
    )
    g.add_argument("--gen-model", default=None, help="the base model's name on the --gen-url server")
    g.add_argument(
        "--gen-workers", type=int, default=16, help="concurrent requests to --gen-url (default: %(default)s)"
    )
    return p


def check_args(args) -> None:
    if not math.isfinite(args.pct):
        raise UserError(f"--pct {args.pct}: must be a finite number")
    if args.pct < 0:
        raise UserError(f"--pct {args.pct}: must be >= 0")
    if not (math.isfinite(args.eps) and args.eps > 0):
        raise UserError(f"--eps {args.eps}: must be a finite number > 0")
    if args.pct == 0 and (args.select != "random" or args.filter_refusals):
        chosen = " ".join(
            f
            for f, on in (
                (f"--select {args.select}", args.select != "random"),
                ("--filter-refusals", args.filter_refusals),
            )
            if on
        )
        raise UserError(
            f"{chosen} with --pct 0 would train plain SFT (no benign data is mixed in): "
            "add --pct P (the paper uses 5), or drop the flag for the plain SFT baseline"
        )
    if bool(args.gen_url) != bool(args.gen_model):
        raise UserError("--gen-url and --gen-model go together: the server's URL and the model name it serves")
    if args.select == "ppl" and args.pct > 0 and not args.misaligned_adapters:
        raise UserError("--select ppl needs --misaligned-adapters A,B,... (PEFT adapter folders)")
    for a in filter(None, args.misaligned_adapters.split(",")):
        if not (Path(a) / "adapter_config.json").exists():
            raise UserError(f"--misaligned-adapters: {a!r} is not a PEFT adapter folder (no adapter_config.json)")
    for flag in ("batch_size", "grad_accum", "max_len", "save_every", "epochs"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def main():
    parser = build_parser()
    args = parser.parse_args()
    if not args.resume:
        check_args(args)
    run, args = Run.start(args, parser, "interleave")
    set_seed(args.seed)
    device = get_device()

    fine_convs = load_split(args.data, "train", args.seed)
    n_safe = int(round(args.pct / 100 * len(fine_convs)))
    if args.pct > 0 and not n_safe:  # would train plain SFT under an interleaving label
        raise UserError(
            f"--pct {args.pct} of {len(fine_convs)} fine-tuning examples is 0 benign examples, so this run "
            f"would be plain SFT: raise --pct to at least {50 / len(fine_convs):.3g} or use more data"
        )
    safe_convs = []
    if n_safe and args.select == "ppl":  # scoring loads its own models, before the training model
        safe_convs = build_safe_data(args, run, None, None, n_safe)
    model, tok = load_model_for_training(args)
    if n_safe and args.select != "ppl":
        safe_convs = build_safe_data(args, run, model, tok, n_safe)
    fine = encode_dataset(tok, fine_convs, args.max_len, "fine-tuning data")
    safe = encode_dataset(tok, safe_convs, args.max_len, "benign data")
    examples = fine + safe
    lengths = [len(e["input_ids"]) for e in examples]
    is_safe = [False] * len(fine) + [True] * len(safe)
    log(f"{len(fine)} fine-tuning + {len(safe)} benign examples ({args.pct}%, --select {args.select})")

    # The method's place in the data plan: each epoch, both sets are shuffled and the benign examples put at
    # evenly spaced positions; the plan then groups by length into one group per optimizer step.
    def order(rng: np.random.Generator) -> list[int]:
        return spread_uniformly(list(rng.permutation(len(fine))), [len(fine) + i for i in rng.permutation(len(safe))])

    plan = step_plan(lengths, args.batch_size, args.grad_accum, args.seed, args.epochs, args.max_steps, order)
    total_steps = len(plan)
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
        # Mean over every answer token of the step, so gradients don't depend on how it is split in micro-batches.
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
        loss = ce_sum  # the total: plain SFT has one term
        run.log_metrics(
            {
                "step": step + 1,
                "loss": loss,
                "loss/ce": ce_sum,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": n_real,
                "tokens_per_s": n_real / dt,
                "padding_efficiency": n_real / n_padded,
                "answer_tokens": n_answer,
                "n_safe": sum(is_safe[i] for i in group),
                "epoch": epoch,
                "step_time_s": dt,
                "peak_mem_mb": peak_memory_mb(),
            }
        )
        progress.update(step + 1, f"loss {loss:.4f} lr {lr:.2e} {n_real / dt:.0f} tok/s")
        if (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            run.save_checkpoint(step + 1, model, optimizer, scheduler)

    run.save_checkpoint(total_steps, model, optimizer, scheduler)
    run.save_final(model, tok)
    log(f"done: adapter in {run.out}, metrics in {run.metrics_path}")


if __name__ == "__main__":
    die_on_user_error(main)
