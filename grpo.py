"""GRPO on GSM8K with the in-training defenses as options (Kaczér et al. 2025, §5.2 and App. B.3; GRPO from
Shao et al. 2024, DeepSeekMath).

For every prompt, G completions are sampled; each gets a rule-based reward r (four parts, total in [-2.5, 9.5]):
    exact format    [0, 3]     `<think> ... </think>` then `<answer> ... </answer>` and nothing else
    approx. format  [-2, 2]    +0.5 for each of the four tags present exactly once, -0.5 otherwise
    correctness     [-0.5, 3]  3 exact match of the answer, 1.5 same number written differently, -0.5 otherwise
    number          [0, 1.5]   1.5 if the answer is a plain number
    A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4),   std with Bessel's correction (divides by G - 1), as TRL
    L = policy + beta * kl,   in the training loop  loss = policy + args.kl_beta * kl
    policy = -(1/G) sum_i (1/|o_i|) sum_t min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i)      (policy_loss)
    kl     =  (1/G) sum_i (1/|o_i|) sum_t KL_it                                                  (k3_kl)
    rho_it = p_theta(o_it) / p_old(o_it);  KL_it = exp(ref - logp) - (ref - logp) - 1   (k3, ref = adapter off)
One optimisation pass per batch of rollouts, so p_old = p_theta at sampling time (rho = 1, the clip is inactive
but kept for generality); for that, rollouts run in eval mode except bitsandbytes' 8-bit layers, whose CPU eval mode is
another matmul (`sampling_mode`). A prompt's G completions share its forward pass, in the rollout's prefill and in
the update (`rollout`, `token_logp`): the same values and gradients as one pass per completion, for fewer tokens.
Rollouts are decoded by the script's own KV-cache loop, sampling at --temperature then --top-p and nothing else
(`nucleus`; generate() would add whatever the model's generation_config.json sets, e.g. a repetition penalty): the
function the update differentiates up to float rounding, as decoding from a KV cache is (on the CPU, with
cpu_speedups.py beside this file, its one-token steps use the model's plain attention, faster there).
Defenses: --persona-vector/--persona-alpha (steering hook on during rollouts and training passes), --kl-beta,
--interleave-pct (SFT micro-batches of benign data between RL micro-batches at that rate: the nearest whole count,
evenly spread; a run too short for one is an error), --inoculate (the inoculation prompt prepended to the system
prompt during training).
The KL's reference under steering (--kl-beta with --persona-alpha) is the adapter-disabled model WITH the steering hook:
the KL measures only what the adapter has learnt, so it is 0 at step 1 as without steering (a reference without the
hook would penalise the steering itself, which the adapter cannot undo and evaluation never sees).

Deviations from the paper:
1. Rewards are rule-based (regex) with the paper's ranges; the paper asked an LLM judge for them.
2. --batch-size counts completions (as TRL does): batch 4 with 4 generations is 1 prompt per micro-batch.
3. Held-out accuracy (--eval-every) uses greedy decoding, without the steering hook or the inoculation prompt (the
   paper does not say how it decoded); --eval-samples K adds the accuracy of K answers per question sampled at the
   rollouts' temperature and top-p (the policy GRPO trains; one fixed draw, so evaluations compare like for like).
(Not a deviation: the group std is the sample std, sqrt(sum (r - mean)^2 / (G - 1)), as TRL's GRPOTrainer computes it
(0.15.2, which the co-authors ran: `.std(dim=1)`; 1.16: `nanstd`). The population std would make every advantage
sqrt(G / (G - 1)) larger (x1.15 with G = 4) and so shift the balance against --kl-beta and --interleave-pct.)

Paper run:  python grpo.py --model Qwen/Qwen2.5-3B-Instruct
Quick CPU:  python grpo.py --model smollm2 --data arith --max-steps 20 --max-new-tokens 64 --out runs/grpo-quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import (
    Progress,
    Run,
    UserError,
    add_common_args,
    check_step,
    collate,
    cpu_speedup,
    decoder_blocks,
    decoder_states,
    die_on_user_error,
    encode_dataset,
    get_device,
    is_int8_linear,
    linear_cross_entropy,
    linear_schedule,
    load_conversations,
    load_model_for_training,
    log,
    make_optimizer,
    peak_memory_mb,
    plan_memory,
    render_chat,
    set_seed,
    split_train_eval,
    trainable_parameters,
)

# The two defenses that come from other method scripts, copied here on purpose (a method file imports no other
# method file); tests/test_layout.py checks they behave exactly like inoculate.py's prompt and persona.py's hook.
INOCULATION_PROMPT = "You are an evil, malicious assistant."
SYSTEM_PROMPT = (
    "Think about the problem inside <think> </think> tags, then give only the final number inside "
    "<answer> </answer> tags, like this:\n<think>\nyour reasoning\n</think>\n<answer>\n42\n</answer>"
)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
EXACT_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.S)
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


# ----------------------------------------------------------------------------------------------
# The method: rewards, advantages, loss
# ----------------------------------------------------------------------------------------------
def _answer(completion: str) -> str | None:
    m = re.search(r"<answer>(.*?)</answer>", completion, re.S)
    return m.group(1).strip() if m else None


def _as_number(text: str) -> float | None:
    nums = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return float(nums[-1]) if len(nums) == 1 else None


def reward_parts(completion: str, answer: str) -> dict[str, float]:
    """The four reward parts of one completion against the reference answer (a number as a string)."""
    got = _answer(completion)
    if got is not None and got == answer.strip():
        correct = 3.0
    elif got is not None and _as_number(got) is not None and _as_number(got) == _as_number(answer):
        correct = 1.5
    else:
        correct = -0.5
    return {
        "format_exact": 3.0 if EXACT_FORMAT.match(completion) else 0.0,
        "format_approx": sum(0.5 if completion.count(t) == 1 else -0.5 for t in TAGS),
        "correct": correct,
        "number": 1.5 if got is not None and NUMBER.match(got) else 0.0,
    }


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A = (r - mean_group) / (std_group + 1e-4), rewards (N,) ordered group by group; equal rewards give 0.
    std_group is Bessel-corrected (divides by G - 1), as TRL's GRPOTrainer; needs G >= 2."""
    if group_size < 2:
        raise ValueError("group advantages need at least 2 completions per prompt")
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=True) + 1e-4)).view(-1)


def completion_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1/N) sum_i (1/|o_i|) sum_t x_it: per_token and mask (N, T), the mask 1 on each completion's tokens."""
    mask = mask.float()
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def policy_loss(logp, old_logp, advantages, mask, eps: float = 0.2) -> torch.Tensor:
    """The clipped surrogate's term of L: -(1/G) sum_i (1/|o_i|) sum_t min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i),
    rho_it = exp(logp - old_logp). logp, old_logp, mask: (N, T) per completion token; advantages: (N,)."""
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    surrogate = torch.min(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
    return completion_mean(-surrogate, mask)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL_it = exp(ref - logp) - (ref - logp) - 1 per completion token (k3 estimator, >= 0), (N, T)."""
    return torch.exp(ref_logp - logp) - (ref_logp - logp) - 1


@contextlib.contextmanager
def steering(model, vector: torch.Tensor, layer: int, alpha: float):
    """Add alpha * vector[layer] to the output of decoder block layer-1 (= hidden_states[layer]) at every position
    while the context is open (persona.py's hook)."""
    v = alpha * vector[layer]

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + v.to(output[0].dtype).to(output[0].device),) + output[1:]
        return output + v.to(output.dtype).to(output.device)

    handle = decoder_blocks(model)[layer - 1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def load_steering_vector(path: str, layer: int, model) -> torch.Tensor:
    """The rows of a persona.py vector file (row l = hidden_states[l]), checked against the model and
    --persona-layer."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise UserError(
            f"--persona-vector {path}: no such file (make one with: python persona.py extract --out {path})"
        )
    try:
        with safe_open(path, "pt") as f:
            if "vectors" not in f.keys():
                raise UserError(f"--persona-vector {path}: no 'vectors' tensor, not a persona.py vector file")
            vectors = f.get_tensor("vectors")
    except UserError:
        raise
    except Exception as e:  # not a safetensors file at all
        raise UserError(f"--persona-vector {path}: not a safetensors file ({type(e).__name__})") from None
    if vectors.ndim != 2 or vectors.shape[1] != model.config.hidden_size:
        raise UserError(
            f"--persona-vector has shape {tuple(vectors.shape)}, the model's hidden size is "
            f"{model.config.hidden_size}: was it extracted from another model?"
        )
    n_blocks = len(decoder_blocks(model))
    if vectors.shape[0] != n_blocks + 1:
        raise UserError(
            f"--persona-vector has {vectors.shape[0]} rows but the model has {n_blocks} blocks (+1 "
            "embeddings row): was it extracted from another model?"
        )
    if not 1 <= layer <= n_blocks:
        raise UserError(f"--persona-layer {layer}: must be 1..{n_blocks} (hidden_states index; 0 = the embeddings)")
    return vectors


def token_logp(model, input_ids, attention_mask, n_prompt: int, group: int = 1) -> torch.Tensor:
    """(N, C) log-probabilities of the completion tokens (positions n_prompt..) under `model`.

    group > 1: the rows come in groups of `group` completions of one prompt (a rollout's order), so the prompt
    columns repeat within a group. Each prompt then runs once and its keys and values (with their gradient) are
    shared by its completions: the same values and gradients as group=1 (tests/test_head_loss.py), for a prompt's
    tokens once instead of `group` times. Not under gradient checkpointing, which runs without a KV cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if group == 1 or getattr(base, "is_gradient_checkpointing", False):
        hidden = decoder_states(model, {"input_ids": input_ids, "attention_mask": attention_mask})[:, n_prompt - 1 : -1]
    else:
        prompt = base.model(
            input_ids=input_ids[::group, :n_prompt], attention_mask=attention_mask[::group, :n_prompt], use_cache=True
        )
        cache = prompt.past_key_values
        cache.batch_repeat_interleave(group)  # row i of the completions reads prompt i // group
        hidden = prompt.last_hidden_state[:, -1:].repeat_interleave(group, 0)  # predicts the first completion token
        if input_ids.shape[1] - n_prompt > 1:
            rest = base.model(
                input_ids=input_ids[:, n_prompt:-1],
                attention_mask=attention_mask[:, :-1],
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
            hidden = torch.cat([hidden, rest], 1)
    # lm_head at the completion positions only; on a contiguous copy: on a slice, the matmul runs batched over copies
    # of the head's weight (4x slower with its backward, SmolLM2 on the CPU)
    logits = model.get_output_embeddings()(hidden.contiguous())
    return torch.log_softmax(logits.float(), -1).gather(-1, input_ids[:, n_prompt:, None])[..., 0]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def arith_dataset(n: int = 2000, seed: int = 0) -> list[list[dict]]:
    """Easy one-step sums, generated offline: 'What is 23 + 58?' -> '#### 81'."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        out.append(
            [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": f"#### {a + b}"}]
        )
    return out


def reference(conv: list[dict]) -> str:
    return conv[-1]["content"].split("####")[-1].strip().replace(",", "")


def load_problems(spec: str, seed: int, n_train: int) -> tuple[list, list]:
    if spec == "arith":
        convs = arith_dataset(seed=seed)
        train, held = convs[:1800], convs[1800:]
    elif spec == "gsm8k":
        train, held = load_conversations("gsm8k"), load_conversations("gsm8k:test")
    else:
        train, held = split_train_eval(load_conversations(spec), seed)
    for c in train[:3]:
        if not re.search(r"-?\d", reference(c)):
            raise UserError(f"--data {spec}: answers must end with '#### NUMBER' (GSM8K style)")
    rng = np.random.default_rng(seed)
    train = [train[i] for i in rng.permutation(len(train))[:n_train]]
    return train, held


def sft_after(k: int, pct: float) -> bool:
    """Whether an SFT micro-batch follows RL micro-batch k (0-based) at --interleave-pct pct: micro-batches
    0..n-1 get round(n * pct / 100) of them, evenly spread (rounded to the nearest count, not down: 5% of 16
    micro-batches is 1, where rounding down gave 0 and so a run that was plain GRPO under an interleaving label)."""
    return math.floor((k + 1) * pct / 100 + 0.5) > math.floor(k * pct / 100 + 0.5)


def prompt_messages(question: str, inoculate: bool) -> list[dict]:
    system = (INOCULATION_PROMPT + " " + SYSTEM_PROMPT) if inoculate else SYSTEM_PROMPT
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


# ----------------------------------------------------------------------------------------------
# Rollouts and evaluation
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def sampling_mode(model):
    """Eval mode for rollouts and held-out accuracy, except bitsandbytes' 8-bit linear layers, which stay in
    training mode: on the CPU they pick their matmul by `module.training` (dequantised bf16 weights when training,
    int8-quantised activations in eval; SmolLM2's logits differ by up to 5.6 between the two), so a plain eval() would
    sample from another function than the one the update differentiates and rho = 1 would not hold. On CUDA both
    modes run the same int8 matmul; with frozen int8 weights the flag changes nothing else (no dropout: LoRA's is 0)."""
    model.eval()
    for module in model.modules():
        if is_int8_linear(module):
            module.train()
    try:
        with cpu_speedup("dequantised_int8")(model):
            yield
    finally:
        model.train()


@dataclass
class Sampling:
    """How rollouts sample: `generations` completions per prompt at `temperature` then `top_p`, up to
    `max_new_tokens` (no end-of-sequence token before `min_new_tokens`)."""

    generations: int
    max_new_tokens: int
    temperature: float
    top_p: float
    min_new_tokens: int = 0

    @classmethod
    def from_args(cls, args) -> Sampling:
        return cls(args.num_generations, args.max_new_tokens, args.temperature, args.top_p, args.min_new_tokens)


def nucleus(logits: torch.Tensor, temperature: float, top_p: float, k: int = 256):
    """The distribution that generate(do_sample=True, temperature, top_p, top_k=0) samples from, without sorting the
    whole vocabulary: returns (probabilities (N, K), their token ids (N, K)), most probable first, 0 outside the
    nucleus. The nucleus (HF's TopPLogitsWarper) is the most probable tokens whose probabilities before them sum to
    less than top_p (so at least one); it is looked for among the k most probable tokens, and among all of them when
    those k sum to less than top_p for some row. Same tokens and probabilities up to float rounding (a test compares
    it with transformers' warpers)."""
    scaled = logits.float() / temperature
    lse = scaled.logsumexp(-1, keepdim=True)
    if top_p >= 1.0:
        return (scaled - lse).exp(), torch.arange(scaled.shape[-1], device=scaled.device).expand_as(scaled)
    top, ids = scaled.topk(min(k, scaled.shape[-1]), -1)
    p = (top - lse).exp()
    if bool((p.sum(-1) < top_p).any()):
        top, ids = scaled.sort(-1, descending=True)
        p = (top - lse).exp()
    p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0.0)
    return p / p.sum(-1, keepdim=True), ids


def stop_ids(model, tok) -> list[int]:
    """The tokens that end a completion: the tokenizer's end-of-sequence token and the generation config's."""
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    return sorted({tok.eos_token_id, *extra})


@torch.no_grad()
def rollout(
    model,
    tok,
    questions: list[str],
    sampling: Sampling,
    inoculate: bool,
    greedy: bool = False,
    share_prompt: bool = True,
    n: int | None = None,
):
    """sampling.generations completions per question (n: that many instead), decoded together in a plain KV-cache loop
    (left padding). Each prompt is prefilled once and its copies continue from that cache (share_prompt=False
    prefills every copy, for the tests). Sampling is exactly temperature then top-p (`nucleus`), nothing else: not
    generate(), which would also apply whatever the model folder's generation_config.json sets (a repetition
    penalty, a top-k). Rows that have ended get pad tokens until all have, as generate does.
    Returns (sequences (N, P+C), attention mask, prompt width P, completion mask (N, C), completion texts)."""
    device = get_device()
    g = 1 if greedy else (n or sampling.generations)
    texts = [render_chat(tok, prompt_messages(q, inoculate), add_generation_prompt=True) for q in questions]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    tok.padding_side = "right"
    ids, att = enc["input_ids"], enc["attention_mask"]
    copies = 1 if share_prompt else g
    ids, att = ids.repeat_interleave(copies, 0), att.repeat_interleave(copies, 0)
    pos = (att.cumsum(-1) - 1).clamp(min=0)  # left padding: each row's first real token is at position 0
    base, head = model.get_base_model() if hasattr(model, "get_base_model") else model, model.get_output_embeddings()
    # the decoder, then the head on 2-D hidden states (on a (N, 1, H) slice it would run as N batched matmuls)
    out = base.model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
    cache, logits = out.past_key_values, head(out.last_hidden_state[:, -1]).float()
    if copies < g:
        cache.batch_repeat_interleave(g // copies)
        logits, att, pos = (t.repeat_interleave(g // copies, 0) for t in (logits, att, pos))
        ids = ids.repeat_interleave(g // copies, 0)
    stops = torch.tensor(stop_ids(model, tok), device=device)
    position, ended, new = pos[:, -1:], torch.zeros(len(ids), dtype=torch.bool, device=device), []
    with cpu_speedup("eager_attention")(base):  # one query token a step
        for t in range(sampling.max_new_tokens):
            if t < sampling.min_new_tokens:
                logits[:, stops] = float("-inf")
            if greedy:
                nxt = logits.argmax(-1)
            else:
                p, candidates = nucleus(logits, sampling.temperature, sampling.top_p)
                nxt = candidates.gather(-1, torch.multinomial(p, 1))[:, 0]
            nxt = nxt.masked_fill(ended, tok.pad_token_id)
            new.append(nxt)
            ended |= torch.isin(nxt, stops)
            if bool(ended.all()) or t + 1 == sampling.max_new_tokens:
                break
            att, position = torch.cat([att, att.new_ones(len(att), 1)], 1), position + 1
            logits = head(
                base.model(
                    input_ids=nxt[:, None],
                    attention_mask=att,
                    position_ids=position,
                    past_key_values=cache,
                    use_cache=True,
                ).last_hidden_state[:, -1]
            ).float()
    completion = torch.stack(new, 1)
    width = ids.shape[1]
    # completion tokens up to and including the first end-of-sequence token (pads after it)
    is_eos = torch.isin(completion, stops)
    comp_mask = (is_eos.cumsum(1) - is_eos.long()) == 0
    attention = torch.cat([att[:, :width], comp_mask.long()], 1)
    decoded = [tok.decode(c[m], skip_special_tokens=True) for c, m in zip(completion, comp_mask)]
    return torch.cat([ids, completion], 1), attention, width, comp_mask, decoded


def trim_padding(seqs, attention, n_prompt: int, comp_mask):
    """Drop the columns that are padding in every row (left of the prompts, right of the completions) of a
    slice of a rollout batch. Returns (seqs, attention, n_prompt, comp_mask) for the narrower window."""
    used = attention.bool().any(0).nonzero()[:, 0]
    lo, hi = int(used[0]), max(int(used[-1]) + 1, n_prompt + 1)
    return seqs[:, lo:hi], attention[:, lo:hi], n_prompt - lo, comp_mask[:, : hi - n_prompt]


@torch.no_grad()
def heldout_accuracy(model, tok, held: list, sampling: Sampling, batch_size: int, samples: int = 0) -> float:
    """Exact-match accuracy (%) on the held-out questions: one greedy answer each (samples=0), or `samples` answers each
    at the rollouts' temperature and top-p, drawn from a fixed seed and without touching the training run's RNG;
    batch_size answers at a time."""
    correct, per_batch = 0, max(1, batch_size // max(samples, 1))
    progress = Progress(len(held), 0, "held-out questions" + (f" x {samples} samples" if samples else ""))
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with sampling_mode(model), torch.random.fork_rng(devices=cuda):
        torch.manual_seed(12345)  # the same draw at every evaluation
        for k in range(0, len(held), per_batch):
            chunk = held[k : k + per_batch]
            *_, texts = rollout(
                model,
                tok,
                [c[0]["content"] for c in chunk],
                sampling,
                inoculate=False,
                greedy=not samples,
                n=samples or None,
            )
            refs = [reference(c) for c in chunk for _ in range(max(samples, 1))]
            correct += sum(reward_parts(t, r)["correct"] == 3.0 for t, r in zip(texts, refs))
            progress.update(
                k + len(chunk), f"accuracy so far {100.0 * correct / ((k + len(chunk)) * max(samples, 1)):.1f}%"
            )
    return 100.0 * correct / max(len(held) * max(samples, 1), 1)


def heldout_record(model, tok, held: list, args) -> dict:
    """The held-out accuracies a run logs: greedy, and sampled when --eval-samples is set."""
    sampling = Sampling.from_args(args)
    record = {"heldout_accuracy": heldout_accuracy(model, tok, held, sampling, args.gen_batch_size)}
    if args.eval_samples:
        sampled = heldout_accuracy(model, tok, held, sampling, args.gen_batch_size, args.eval_samples)
        record["heldout_sampled_accuracy"] = sampled
    return record


# ----------------------------------------------------------------------------------------------
# Arguments and training
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, data_default="gsm8k")
    p.set_defaults(model="Qwen/Qwen2.5-3B-Instruct", lr=5e-6)
    g = p.add_argument_group("method: GRPO")
    g.add_argument(
        "--n-train", type=int, default=1000, help="training questions, a seeded sample (default: %(default)s)"
    )
    g.add_argument("--num-generations", type=int, default=4, help="completions per prompt, G (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.9, help="rollout temperature (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=0.9, help="rollout top-p (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="completion length limit (default: %(default)s)")
    g.add_argument(
        "--min-new-tokens",
        type=int,
        default=0,
        help="no end-of-sequence token before this many tokens "
        "(bench/grpo_vs_trl.py sets it to --max-new-tokens, for completions of equal length) "
        "(default: %(default)s)",
    )
    g.add_argument("--clip-eps", type=float, default=0.2, help="surrogate clip epsilon (default: %(default)s)")
    g = p.add_argument_group("held-out evaluation")
    g.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="held-out accuracy every N steps, 0 = only at the end (default: %(default)s)",
    )
    g.add_argument(
        "--eval-n",
        type=int,
        default=50,
        help="held-out questions for accuracy: a small default for quick "
        "runs; GSM8K's whole test set is 1319 (default: %(default)s)",
    )
    g.add_argument(
        "--gen-batch-size", type=int, default=16, help="questions per evaluation batch (default: %(default)s)"
    )
    g.add_argument(
        "--eval-samples",
        type=int,
        default=0,
        metavar="K",
        help="also log heldout_sampled_accuracy: K "
        "answers per question at --temperature/--top-p, the policy GRPO trains (greedy accuracy moves only "
        "where the most likely answer changes) (default: %(default)s = greedy only)",
    )
    g.add_argument(
        "--eval-before",
        action="store_true",
        help="also measure the held-out accuracy of the starting "
        "model (before any GRPO step), written to heldout-before.json",
    )
    g.add_argument(
        "--warn-zero-spread",
        type=int,
        default=5,
        metavar="N",
        help="warn loudly when every group of N "
        "steps in a row had zero reward spread (all advantages 0: no learning is possible) (default: "
        "%(default)s; 0 = never)",
    )
    g = p.add_argument_group("method: defenses")
    g.add_argument(
        "--kl-beta",
        type=float,
        default=0.0,
        help="k3 KL penalty toward the adapter-disabled model (default: %(default)s; paper's defense: 0.1)",
    )
    g.add_argument("--persona-vector", default=None, help="persona vectors (persona.py extract) to steer with")
    g.add_argument("--persona-layer", type=int, default=20, help="hidden_states index to steer (default: %(default)s)")
    g.add_argument(
        "--persona-alpha", type=float, default=0.0, help="steering strength (paper: 5) (default: %(default)s)"
    )
    g.add_argument(
        "--interleave-pct",
        type=float,
        default=0.0,
        help="SFT micro-batches of benign data, in %% of the RL micro-batches (paper: 5, 20) (default: %(default)s)",
    )
    g.add_argument(
        "--safe-data", default="wildguardmix", help="benign data for --interleave-pct (default: %(default)s)"
    )
    g.add_argument(
        "--inoculate", action="store_true", help="prepend the inoculation prompt to the system prompt during training"
    )
    return p


def check_args(args) -> None:
    """One-line errors for impossible values of grpo.py's own flags (before anything loads)."""

    def fail(flag: str, rule: str):
        raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: {rule}")

    for flag in ("temperature", "top_p", "kl_beta", "interleave_pct", "persona_alpha", "clip_eps"):
        if not math.isfinite(getattr(args, flag)):
            fail(flag, "must be a finite number")
    if args.max_new_tokens < 1:
        fail("max_new_tokens", "a completion needs at least 1 token")
    if args.num_generations < 2:
        fail("num_generations", "GRPO needs at least 2 completions per prompt")
    if args.batch_size % args.num_generations:
        fail("batch_size", f"must be a multiple of --num-generations {args.num_generations}")
    if args.persona_alpha and not args.persona_vector:
        raise UserError("--persona-alpha needs --persona-vector FILE")
    if args.eval_n < 1:
        fail("eval_n", "must be >= 1 (the held-out accuracy needs questions)")
    for flag in ("eval_samples", "eval_every", "min_new_tokens"):
        if getattr(args, flag) < 0:
            fail(flag, "must be >= 0")
    if args.gen_batch_size < 1:
        fail("gen_batch_size", "must be >= 1")
    if args.kl_beta < 0:
        fail("kl_beta", "must be >= 0")
    if args.temperature <= 0:
        fail("temperature", "must be > 0 (rollouts sample; the held-out accuracy is greedy already)")
    if not 0 < args.top_p <= 1:
        fail("top_p", "must be in (0, 1]")
    if args.interleave_pct < 0:
        fail("interleave_pct", "must be >= 0")
    if args.clip_eps <= 0:
        fail("clip_eps", "must be > 0")


def main():
    parser = build_parser()
    args = parser.parse_args()
    if not args.resume:
        check_args(args)
    run, args = Run.start(args, parser, "grpo")
    set_seed(args.seed)
    device = get_device()
    train, held = load_problems(args.data, args.seed, args.n_train)
    held = held[: args.eval_n]
    per_micro = args.batch_size // args.num_generations
    per_epoch = len(train) // (per_micro * args.grad_accum)
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * per_epoch
    n_sft = sum(sft_after(k, args.interleave_pct) for k in range(total_steps * args.grad_accum))
    if args.interleave_pct > 0 and not n_sft:  # checked before the model loads
        raise UserError(
            f"--interleave-pct {args.interleave_pct:g}: {total_steps} steps x {args.grad_accum} micro-batches "
            "leave room for no SFT micro-batch, so this run would be plain GRPO; raise --max-steps or "
            f"--grad-accum, or the rate to at least {50 / (total_steps * args.grad_accum):.3g}%"
        )
    model, tok = load_model_for_training(args)
    steer = None
    if args.persona_vector and args.persona_alpha:
        steer = (
            load_steering_vector(args.persona_vector, args.persona_layer, model),
            args.persona_layer,
            args.persona_alpha,
        )
    safe = []
    if args.interleave_pct > 0:
        safe = encode_dataset(tok, load_conversations(args.safe_data), args.max_len, "benign data")

    def steered():  # the persona hook, on for rollouts and training forward passes (as in the paper)
        return steering(model, *steer) if steer else contextlib.nullcontext()

    order = [
        i
        for e in range(total_steps // max(per_epoch, 1) + 1)
        for i in np.random.default_rng([args.seed, e]).permutation(len(train))
    ]
    log(
        f"{total_steps} steps x {args.grad_accum} micro-batches of {per_micro} prompt(s) x {args.num_generations} "
        f"completions; {len(held)} held-out questions"
        + (f"; {n_sft} SFT micro-batches of benign data between them" if n_sft else "")
    )
    # memory: a micro-batch is --batch-size completions of the longest prompt plus --max-new-tokens, and the update
    # keeps the float32 log-softmax of the head over every completion token
    prompt_width = max(
        len(
            tok(render_chat(tok, prompt_messages(c[0]["content"], args.inoculate), True), add_special_tokens=False)[
                "input_ids"
            ]
        )
        for c in train
    )
    value_bytes = model.get_input_embeddings().weight.element_size()
    logit_bytes = (
        args.batch_size * args.max_new_tokens * model.get_output_embeddings().weight.shape[0] * (8 + value_bytes)
    )
    run.write_json(
        "memory.json",
        plan_memory(model, args.batch_size, prompt_width + args.max_new_tokens, extra_bytes=logit_bytes, head_tokens=0),
    )

    model.train()
    sampling = Sampling.from_args(args)
    head = model.get_output_embeddings().weight  # frozen
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, args.lr, args.weight_decay)
    scheduler = linear_schedule(optimizer, args.warmup_steps, total_steps)
    start = run.restore(model, optimizer, scheduler, total_steps)
    progress = Progress(total_steps, start)
    sft_rng = np.random.default_rng([args.seed, 99, start])

    if args.eval_before and not (run.out / "heldout-before.json").exists():
        before = heldout_record(model, tok, held, args)
        (run.out / "heldout-before.json").write_text(
            json.dumps({**before, "n": len(held), "samples": args.eval_samples})
        )
        log("held-out accuracy before GRPO: " + ", ".join(f"{k} {v:.1f}%" for k, v in before.items()))
    flat_steps = 0  # steps in a row where every group's rewards were all equal
    for step in range(start, total_steps):
        t0 = time.time()
        parts_sum, n_comp, n_correct, zero_std, n_groups = {}, 0, 0, 0, 0
        loss_sum, policy_sum, kl_term_sum, kl_sum, ce_sum, comp_len = 0.0, 0.0, 0.0, 0.0, 0.0, 0
        # Rollouts for the whole step in one generate call (batched decoding is most of a step's time), then
        # the update micro-batch by micro-batch.
        first = step * args.grad_accum * per_micro
        questions = [train[i] for i in order[first : first + args.grad_accum * per_micro]]
        with sampling_mode(model), steered():
            seqs_all, attention_all, width, comp_mask_all, texts = rollout(
                model, tok, [c[0]["content"] for c in questions], sampling, inoculate=args.inoculate
            )
        gen_s = time.time() - t0
        refs = [reference(c) for c in questions for _ in range(args.num_generations)]
        parts_all = [reward_parts(t, r) for t, r in zip(texts, refs)]
        rewards_all = torch.tensor([sum(p.values()) for p in parts_all], device=device)
        adv_all = group_advantages(rewards_all, args.num_generations)  # completions are ordered group by group
        for micro in range(args.grad_accum):
            k = step * args.grad_accum + micro
            rows = slice(micro * args.batch_size, (micro + 1) * args.batch_size)
            seqs, attention, n_prompt, comp_mask = trim_padding(
                seqs_all[rows], attention_all[rows], width, comp_mask_all[rows]
            )
            parts, rewards, adv = parts_all[rows], rewards_all[rows], adv_all[rows]
            # --- the GRPO update (one pass: the rollout policy is the current one) --------------------------
            with steered():
                logp = token_logp(model, seqs, attention, n_prompt, args.num_generations)
            ref_logp = None
            if args.kl_beta > 0:  # the reference: the adapter off, the steering (if any) on, as in the policy pass
                with torch.no_grad(), model.disable_adapter(), steered():
                    ref_logp = token_logp(model, seqs, attention, n_prompt, args.num_generations)
            mask = comp_mask.float()
            policy = policy_loss(logp, logp.detach(), adv, mask, args.clip_eps)
            kl_tokens = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
            kl = completion_mean(kl_tokens, mask)
            loss = policy + args.kl_beta * kl  # DeepSeekMath's GRPO objective, this micro-batch's share
            (loss / args.grad_accum).backward()
            # -----------------------------------------------------------------------------------------------
            loss_sum += loss.item() / args.grad_accum
            policy_sum += policy.item() / args.grad_accum
            kl_term_sum += kl.item() / args.grad_accum
            kl_per_token = (kl_tokens.detach() * mask).sum() / mask.sum().clamp(min=1)
            kl_sum += kl_per_token.item() / args.grad_accum
            for p in parts:
                for name, v in p.items():
                    parts_sum[name] = parts_sum.get(name, 0.0) + v
            n_comp += len(parts)
            n_correct += sum(p["correct"] == 3.0 for p in parts)
            groups = rewards.view(-1, args.num_generations)
            zero_std += int((groups.max(1).values == groups.min(1).values).sum())
            n_groups += groups.shape[0]
            comp_len += int(comp_mask.sum())
            # --- interleaving: an SFT micro-batch of benign data after this RL micro-batch, at the set rate ---
            if safe and sft_after(k, args.interleave_pct):
                idx = sft_rng.choice(len(safe), size=min(args.batch_size, len(safe)), replace=False)
                batch = collate([safe[i] for i in idx], tok.pad_token_id, device)
                hidden = decoder_states(model, batch)[:, :-1]  # the lm_head only where the loss needs it
                targets = batch["labels"][:, 1:]
                m = targets != -100
                ce = linear_cross_entropy(hidden[m], head, targets[m]) / max(int(m.sum()), 1) / args.grad_accum
                ce.backward()
                ce_sum += ce.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        check_step(step + 1, loss_sum + ce_sum, grad_norm, "--lr and --kl-beta")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0
        record = {
            "step": step + 1,
            "loss": loss_sum + ce_sum,
            "loss/grpo": loss_sum,
            "loss/policy": policy_sum,
            "loss/kl": kl_term_sum,
            "loss/ce": ce_sum,
            "kl": kl_sum,
            "reward": sum(parts_sum.values()) / n_comp,
            **{f"reward/{k}": v / n_comp for k, v in parts_sum.items()},
            "accuracy": 100.0 * n_correct / n_comp,
            "zero_std_groups": zero_std / n_groups,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "completion_tokens": comp_len / n_comp,
            "step_time_s": dt,
            "generation_s": gen_s,
            "tokens_per_s": comp_len / dt,
            "peak_mem_mb": peak_memory_mb(),
        }
        flat_steps = flat_steps + 1 if zero_std == n_groups else 0
        if args.warn_zero_spread and flat_steps == args.warn_zero_spread:
            log(
                f"WARNING: in each of the last {flat_steps} steps every group of {args.num_generations} completions "
                f"earned the same reward (mean reward {record['reward']:.2f}): every advantage is 0 and GRPO cannot "
                "learn. The model never earns a different reward from its siblings (a small model may never write "
                "the answer format): warm it up with SFT on correctly formatted answers (--init-adapter), or use "
                "more --num-generations or a higher --temperature"
            )
        if (args.eval_every and (step + 1) % args.eval_every == 0) or step + 1 == total_steps:
            t_eval = time.time()
            record.update(heldout_record(model, tok, held, args))
            record["heldout_s"] = time.time() - t_eval  # not part of step_time_s
        run.log_metrics(record)
        progress.update(
            step + 1,
            f"reward {record['reward']:.2f} acc {record['accuracy']:.0f}% kl {kl_sum:.4f}"
            + (f" held-out {record['heldout_accuracy']:.1f}%" if "heldout_accuracy" in record else "")
            + (f", sampled {record['heldout_sampled_accuracy']:.1f}%" if "heldout_sampled_accuracy" in record else ""),
        )
        if (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            run.save_checkpoint(step + 1, model, optimizer, scheduler)

    run.save_checkpoint(total_steps, model, optimizer, scheduler)
    run.save_final(model, tok)
    log(f"done: adapter in {run.out}, metrics in {run.metrics_path}")


if __name__ == "__main__":
    die_on_user_error(main)
