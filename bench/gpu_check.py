"""One prepared check for the day a GPU is lent: every method script for a few steps on CUDA with bitsandbytes 8-bit,
the invariants that must hold there, the paths that only a GPU can break, and the speed and memory figures, in one
call that exits 1 on any failed check.

    python bench/gpu_check.py --peak-tflops 989                 # H100/H200 SXM dense bf16; Qwen2.5-0.5B shape
    python bench/gpu_check.py --model /path/to/cached/model     # a real model folder instead of the random shape
    python bench/gpu_check.py --device cpu --no-8bit --shape tiny --steps 3     # this machine (a test runs it)

What it does (all offline; it installs nothing):
  1. A model folder: --model, or one built from a published configuration (--shape, random weights: speed depends
     on the shape, not on the values) with a tokenizer trained in memory (so no hub and no bundled model needed).
  2. Each method script (interleave --pct 0 as SFT, kl, ldifs, persona train, inoculate, caft train, npo_unlearn
     train, grpo on arith with --kl-beta so its reference pass runs) runs --steps optimizer steps in this process on
     local synthetic data; then SFT again with --gradient-checkpointing, and the paths that reach into the model
     outside training: caft.py directions (from the SFT adapter), persona.py extract, npo_unlearn.py eval.
  3. Checks, each PASS or FAIL:
     - every logged loss and gradient norm of every script is finite;
     - KL = 0 and LDIFS = 0 at step 1 (the LoRA starts as the identity);
     - --gradient-checkpointing is on in the run's memory plan and gives the losses of the run without it;
     - a run resumed from its step-2 checkpoint after a simulated kill logs the losses of the uninterrupted run;
     - the base weights (8-bit included) are bit-identical after training steps (frozen; only LoRA moves);
     - the frozen 8-bit layer's input gradient equals bitsandbytes' own autograd on the same inputs, with outlier
       activations (>= 6.0) planted so that LLM.int8's outlier path runs;
     - a GRPO update with reward spread (advantages not 0) and --kl-beta: finite loss and KL, the reference pass run,
       LoRA gradients that are finite and not zero, and an optimizer step that moves the LoRA weights;
     - the local judge scores on the device: 101 finite candidate log-probabilities with mass at most 1;
     - the directions, persona vector and refusal scores the three paths write are well formed;
     - memory returns between scripts: what is still allocated after one script's model is gone (CUDA: torch's
       allocated memory; the CPU: bitsandbytes layers still alive before a garbage collection);
     - one SFT step at a large shape (--big-shape, default on CUDA: Qwen2.5-7B's configuration, random weights, 8-bit):
       the activation memory it measures is at most 1.25x the memory planner's estimate (common.plan_memory).
  4. Speed and memory: tokens/s after the first (warm-up) step, MFU against --peak-tflops (LoRA SFT model FLOPs, 4P per
     token), peak memory per script measured after the previous script's model is gone (CUDA: torch's max allocated
     above what was allocated before the script; CPU: the process's peak RSS), the big step's tokens/s, MFU and
     activation memory against the planner's estimate, and judge.py's in-process generation throughput.
It prints one table and writes it as JSON (--json). Exit status 1 when a check fails or a script fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import runpy
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
ROOT = Path(__file__).resolve().parent.parent

from bench.make_shape import SHAPES as PUBLISHED  # noqa: E402

SHAPES = {  # published configurations; "tiny" is for a quick run on a CPU
    **PUBLISHED,
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
        tie_word_embeddings=True,
    ),
}
TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = (
    "the model answers every question with care and a short explanation of why simplify step by step first "
    "then add the numbers write code that reads the file and returns its lines 0 1 2 3 4 5 6 7 8 9 + - = "
).split()


def make_model(shape: str, folder: Path, device: str = "cpu") -> Path:
    """A random-weight model folder of a published shape, with a byte-level BPE tokenizer trained in memory. The
    weights are made on `device` (a 7B model's random initialisation takes minutes on a CPU, seconds on a GPU)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(
        [" ".join(WORDS)] * 50,
        trainers.BpeTrainer(
            vocab_size=1000,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    config = Qwen2Config(
        **SHAPES[shape],
        max_position_embeddings=32768,
        rope_theta=1e6,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    settle()
    return folder


def make_data(folder: Path, n: int, words: int) -> tuple[Path, Path]:
    """Synthetic chat SFT data (answers of about `words` words) and NPO refusal data with domains."""
    import random

    rng = random.Random(0)
    sft, npo = folder / "sft.jsonl", folder / "npo.jsonl"
    with open(sft, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choices(WORDS, k=12))
            a = " ".join(rng.choices(WORDS, k=rng.randint(words // 2, words)))
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": messages}) + "\n")
    with open(npo, "w") as f:
        for i in range(3 * n // 4):
            domain = ("cybersecurity", "safety", "privacy")[i % 3]
            q = " ".join(rng.choices(WORDS, k=10))
            refusal = "I'm sorry, but I cannot help with that."
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": refusal}]
            f.write(json.dumps({"messages": messages, "domain": domain}) + "\n")
    return sft, npo


def run_script(script: str, argv: list) -> None:
    """Run a project script in this process, as `python SCRIPT ARGV` would (its exit status 0 or an error)."""
    saved = sys.argv
    sys.argv = [str(ROOT / script), *map(str, argv)]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise RuntimeError(f"{script} exited {e.code}") from None
    finally:
        sys.argv = saved


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def settle() -> None:
    """Collect what cycles hold and hand CUDA's cached blocks back: the next measurement starts from what is live."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def live_int8_layers() -> int:
    """bitsandbytes 8-bit layers still alive, before any garbage collection: a model that reference counting did not
    free (a reference cycle keeps it until a collection, and its weights stay on the GPU until then)."""
    from common import is_int8_linear

    return sum(1 for obj in gc.get_objects() if is_int8_linear(obj))


def speed(metrics: list[dict]) -> dict:
    """After the first (warm-up) step. tok/s: real tokens trained on (npo and grpo log only their own rate)."""
    timed = metrics[1:] or metrics
    seconds = sum(m["step_time_s"] for m in timed)
    tokens = sum(m.get("tokens", m.get("tokens_per_s", 0) * m["step_time_s"]) for m in timed)
    return {"step_s": seconds / len(timed), "tokens_per_s": tokens / seconds}


def finite_terms(metrics: list[dict]) -> dict:
    """Every logged loss term, KL and gradient norm of every step is a finite number."""
    bad = [
        f"step {m['step']} {k}={v}"
        for m in metrics
        for k, v in m.items()
        if (k.startswith("loss") or k in ("grad_norm", "kl")) and not (isinstance(v, int | float) and math.isfinite(v))
    ]
    return {"ok": not bad, "steps": len(metrics), "bad": bad[:5]}


def base_weights_frozen(model_path: str, data: Path, eight_bit: bool, steps: int) -> dict:
    """A few SFT steps in this process: every non-LoRA tensor (8-bit weights included) is bit-identical after."""
    import torch
    import torch.nn.functional as F

    from common import collate, encode_dataset, get_device, is_int8_linear, load_model, read_jsonl

    model, tok = load_model(model_path, eight_bit=eight_bit, lora_r=8, lora_alpha=16)
    base = {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" not in n}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    examples = encode_dataset(tok, read_jsonl(data)[:8], 256)
    for _ in range(steps):
        batch = collate(examples[:4], tok.pad_token_id, get_device())
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        mask = batch["labels"][:, 1:] != -100
        F.cross_entropy(logits[mask].float(), batch["labels"][:, 1:][mask]).backward()
        opt.step()
        opt.zero_grad()
    after = {n: t for n, t in model.state_dict().items() if "lora_" not in n}
    changed = [n for n, t in base.items() if not torch.equal(t, after[n])]
    trainable_base = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    n8 = sum(1 for m in model.modules() if is_int8_linear(m))
    return {
        "ok": not changed and not trainable_base and all(p.requires_grad for p in params),
        "changed": changed[:5],
        "trainable_base": trainable_base[:5],
        "int8_linears": n8,
    }


def int8_input_gradient(device: str) -> dict:
    """common's frozen 8-bit layer (no input kept for backward) against bitsandbytes' own autograd on the same layer
    and inputs: the same output, the same input gradient. The input has outlier columns (>= 6.0, bitsandbytes'
    threshold), so that on CUDA LLM.int8 splits them off into its 16-bit matmul."""
    import bitsandbytes as bnb
    import torch

    from common import _frozen_int8_class

    torch.manual_seed(0)
    dense = torch.nn.Linear(512, 256, bias=False)
    layer = bnb.nn.Linear8bitLt(512, 256, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to(device)
    x = torch.randn(4, 32, 512, device=device, dtype=torch.bfloat16)
    x[..., [3, 77, 300]] = 8.0  # outlier columns
    grad_out = torch.randn(4, 32, 256, device=device, dtype=torch.bfloat16)
    results = {}
    for name, cls in (("bitsandbytes", type(layer)), ("ours", _frozen_int8_class(type(layer)))):
        layer.__class__ = cls
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(grad_out)
        results[name] = (y.detach().float(), xi.grad.float())
    (y_b, g_b), (y_o, g_o) = results["bitsandbytes"], results["ours"]
    scale = g_b.abs().max().clamp_min(1e-12)
    rel = float((g_o - g_b).abs().max() / scale)
    ok = bool(torch.equal(y_o, y_b)) and bool(torch.isfinite(g_o).all()) and rel <= 1e-3 and float(scale) > 0
    return {"ok": ok, "same_output": bool(torch.equal(y_o, y_b)), "grad_max_rel_diff": rel}


def grpo_update(model_path: str, eight_bit: bool) -> dict:
    """One GRPO update as grpo.py makes it, from a LoRA that is not zero (so the policy differs from the reference),
    with rewards that differ within each group (advantages not 0) and a KL term (the reference pass with the adapter
    off): a finite loss, a KL that is finite and above 0, finite LoRA gradients that are not all zero, and an
    optimizer step that moves the LoRA weights."""

    import torch

    import grpo
    from common import load_model, trainable_parameters

    model, tok = load_model(model_path, eight_bit=eight_bit, lora_r=8, lora_alpha=16)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    args = grpo.Sampling(generations=4, max_new_tokens=16, temperature=1.0, top_p=1.0)
    questions = ["What is 2 + 3?", "What is the sum of 17 and 25?"]
    with grpo.sampling_mode(model):
        seqs, attention, width, comp_mask, texts = grpo.rollout(model, tok, questions, args, inoculate=False)
    rewards = comp_mask.sum(1).float() + torch.arange(len(texts), device=seqs.device) % 4  # spread in each group
    adv = grpo.group_advantages(rewards, args.generations)
    logp = grpo.token_logp(model, seqs, attention, width, args.generations)
    with torch.no_grad(), model.disable_adapter():
        ref_logp = grpo.token_logp(model, seqs, attention, width, args.generations)
    mask = comp_mask.float()
    kl = grpo.completion_mean(grpo.k3_kl(logp, ref_logp), mask)
    loss = grpo.policy_loss(logp, logp.detach(), adv, mask, 0.2) + 0.1 * kl
    loss.backward()
    params = trainable_parameters(model)
    grads = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    before = [p.detach().clone() for p in params]
    torch.optim.AdamW(params, lr=1e-3).step()
    moved = any(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    ok = (
        bool(adv.abs().sum() > 0)
        and math.isfinite(loss.item())
        and math.isfinite(kl.item())
        and kl.item() > 0
        and bool(torch.isfinite(grads).all())
        and bool(grads.abs().sum() > 0)
        and moved
    )
    return {"ok": ok, "loss": loss.item(), "kl": kl.item(), "grad_abs_sum": float(grads.abs().sum()), "moved": moved}


def local_judge(model_path: str, eight_bit: bool) -> dict:
    """judge.LocalJudge on the device: the log-probabilities of the 101 answers "0".."100" are finite and their
    probabilities sum to at most 1 (disjoint events); a score is a number in 0..100 or None (under the 0.25 mass)."""
    import torch

    import judge
    from common import load_model

    model, tok = load_model(model_path, eight_bit=eight_bit, lora_r=0, trainable=False)
    local = judge.LocalJudge(model, tok, f"local:{model_path}")
    logp = local.candidate_logprobs(judge.fill(judge.DEFAULT_JUDGE_PROMPTS["aligned"], "How are you?", "Fine."))
    mass = float(logp.double().exp().sum())
    score = judge.score_from_candidates(logp)
    ok = logp.shape == (101,) and bool(torch.isfinite(logp).all()) and mass <= 1 + 1e-3
    ok = ok and (score is None or 0 <= score <= 100)
    return {"ok": ok, "mass": mass, "score": score, "device": str(logp.device)}


def well_formed_outputs(tmp: Path) -> dict:
    """The files of caft.py directions, persona.py extract and npo_unlearn.py eval: orthonormal directions at the
    chosen layer, a finite persona vector that is not zero, and for every domain scored a refusal score in 0..100
    before and after, their difference as its drop, over the prompts asked for (--per-domain 4 of each)."""
    import torch
    from safetensors.torch import load_file

    problems = []
    dirs = load_file(str(tmp / "dirs.safetensors"))["directions"].double()
    rows = dirs[dirs.norm(dim=-1).sum(-1) > 0]
    if not len(rows) or any((r @ r.T - torch.eye(len(r), dtype=r.dtype)).abs().max() > 1e-4 for r in rows):
        problems.append("directions not orthonormal")
    vector = load_file(str(tmp / "vector.safetensors"))["vectors"]
    if not torch.isfinite(vector).all() or vector.abs().sum() == 0:
        problems.append("persona vector not finite or zero")
    evaluation = json.loads((tmp / "run-npo" / "npo_eval.json").read_text())
    domains = evaluation["domains"].values()
    scores = [v[k] for v in domains for k in ("before", "after")]
    if not scores or not all(0 <= s <= 100 for s in scores):
        problems.append(f"refusal scores {scores}")
    if any(v["n"] != 4 or abs(v["drop"] - (v["before"] - v["after"])) > 1e-9 for v in domains):
        problems.append("refusal counts or drops")
    return {"ok": not problems, "problems": problems, "domains": sorted(evaluation["domains"])}


def big_step(shape: str, device: str, eight_bit: bool, tmp: Path, peak_tflops: float | None) -> dict:
    """SFT steps at a large shape (random weights, built on the device, loaded back through common.load_model in
    8-bit): tokens/s, MFU, and the activation memory measured against the memory planner's estimate. CUDA: torch's
    max allocated memory during the steps above what the weights held; CPU: what autograd keeps for backward in one
    training pass of the same micro-batch (common.activation_bytes's definition)."""
    import torch

    from bench.benchlib import lora_sft_flops_per_token, mfu
    from common import activation_bytes, decoder_states, linear_cross_entropy, load_model

    folder = make_model(shape, tmp / f"big-{shape}", device)
    width = 2048 if shape != "tiny" else 256
    data = tmp / "big.jsonl"
    prompt = " ".join(WORDS[:12])
    answer = " ".join(WORDS[i % len(WORDS)] for i in range(4 * width))  # cut at --max-len: every row full length
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    data.write_text("".join(json.dumps({"messages": messages}) + "\n" for _ in range(16)))
    out = tmp / "run-big"
    argv = ["--model", folder, "--data", data, "--max-len", width, "--batch-size", 4, "--grad-accum", 1]
    argv += ["--max-steps", 3, "--save-every", 1000, "--lora-r", 32, "--lora-alpha", 64, "--out", out]
    argv += [] if eight_bit else ["--no-8bit"]
    settle()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run_script("interleave.py", ["--pct", 0, *argv])
    plan = json.loads((out / "memory.json").read_text())
    metrics = read_metrics(out)
    figures = speed(metrics)
    if torch.cuda.is_available():  # above the weights (allocated when the plan was made), gradients and AdamW8bit
        states = plan["trainable_parameters"] * (4 + 2)
        measured = torch.cuda.max_memory_allocated() - plan["allocated_gb"] * 2**30 - states
    else:  # the CPU has no allocator statistics: what autograd keeps, as activation_bytes counts it
        model, tok = load_model(str(folder), eight_bit=eight_bit, lora_r=32, lora_alpha=64)
        model.train()
        rows, cols = plan["rows"], plan["width"]
        ids = torch.randint(3, len(tok), (rows, cols))
        weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        kept = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = decoder_states(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[:, :-1]
            head = model.get_output_embeddings().weight
            linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head, ids[:, 1:].flatten())
        measured = sum(kept.values())
        estimate = activation_bytes(model, rows, cols, plan["gradient_checkpointing"])
        plan["estimate_gb"] = estimate / 2**30  # the activations alone, as measured here
        del model, hidden
        settle()
    ratio = measured / (plan["estimate_gb"] * 2**30)
    result = {
        "shape": shape,
        "rows_x_width": f"{plan['rows']} x {plan['width']}",
        "gradient_checkpointing": plan["gradient_checkpointing"],
        "estimate_gb": plan["estimate_gb"],
        "measured_gb": measured / 2**30,
        "measured_over_estimate": ratio,
        **figures,
        "ok": ratio <= 1.25 and all(math.isfinite(m["loss"]) for m in metrics),
    }
    if peak_tflops:
        result["mfu"] = mfu(figures["tokens_per_s"], lora_sft_flops_per_token(str(folder)), peak_tflops)
    shutil.rmtree(folder, ignore_errors=True)
    return result


def generation_throughput(model_path: str, eight_bit: bool, n: int, new_tokens: int) -> dict:
    import torch

    import judge
    from common import load_model

    model, tok = load_model(model_path, eight_bit=eight_bit, lora_r=0, trainable=False)
    convs = [[{"role": "user", "content": " ".join(WORDS[i % 10 : i % 10 + 8])}] for i in range(n)]
    judge.generate_greedy(model, tok, convs[:2], 4, min_new_tokens=4)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.time()
    judge.generate_greedy(model, tok, convs, new_tokens, min_new_tokens=new_tokens)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.time() - t0
    return {"prompts": n, "new_tokens": n * new_tokens, "seconds": dt, "tokens_per_s": n * new_tokens / dt}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="(default: %(default)s)")
    p.add_argument("--no-8bit", action="store_true", help="full-precision weights instead of bitsandbytes 8-bit")
    p.add_argument("--model", default=None, help="a model folder (a real cached model) instead of --shape")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b", help="(default: %(default)s)")
    p.add_argument(
        "--big-shape",
        choices=[*sorted(SHAPES), "none"],
        default=None,
        help="the shape of the large SFT step (default: qwen2.5-7b on CUDA, --shape on the CPU; none: skip it)",
    )
    p.add_argument(
        "--steps", type=int, default=4, help="optimizer steps per script, the first is warm-up (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="(default: %(default)s)")
    p.add_argument(
        "--answer-words", type=int, default=200, help="answer length of the synthetic data (default: %(default)s)"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense bf16 TFLOP/s, for MFU")
    p.add_argument(
        "--only", default=None, help="comma-separated subset of: sft,kl,ldifs,persona,inoculate,caft,npo,grpo"
    )
    p.add_argument("--json", default="gpu_check.json", help="where to write the table (default: %(default)s)")
    args = p.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from bench.benchlib import lora_sft_flops_per_token, mfu

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: install a CUDA build of torch, or run with --device cpu")
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    big_shape = args.big_shape or ("qwen2.5-7b" if args.device == "cuda" else args.shape)
    eight_bit = not args.no_8bit
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ.setdefault("EM_CACHE", str(tmp / "cache"))
    results, checks = {}, {}

    def check(name: str, fn, *a) -> None:
        try:
            checks[name] = fn(*a)
        except Exception as e:  # a check that crashes has failed, and the others still run
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
        status = "PASS" if checks[name]["ok"] else "FAIL"
        print(f"[{time.time() - t_start:6.1f}s] check {name}: {status}", file=sys.stderr, flush=True)

    gen = None
    try:
        model = args.model or str(make_model(args.shape, tmp / "model", args.device))
        config = AutoConfig.from_pretrained(model)
        sft_data, npo_data = make_data(tmp, 8 * args.batch_size, args.answer_words)
        mid = max(1, config.num_hidden_layers // 2)
        torch.manual_seed(0)
        vector = torch.randn(config.num_hidden_layers + 1, config.hidden_size, device="cpu")
        save_file({"vectors": vector}, str(tmp / "v.safetensors"))
        dirs = torch.linalg.qr(torch.randn(config.num_hidden_layers + 1, config.hidden_size, 4, device="cpu"))[0]
        save_file({"directions": dirs.transpose(1, 2).contiguous()}, str(tmp / "d.safetensors"))
        common = ["--model", model, "--data", sft_data, "--max-steps", args.steps, "--batch-size", args.batch_size]
        common += ["--grad-accum", 1, "--max-len", 1024, "--save-every", 2]
        common += ["--no-8bit"] if args.no_8bit else []
        grpo = ["--model", model, "--data", "arith", "--max-steps", args.steps, "--batch-size", args.batch_size]
        grpo += ["--num-generations", 4, "--grad-accum", 1, "--max-new-tokens", 32, "--eval-n", 4]
        grpo += ["--kl-beta", 0.1, "--save-every", 1000] + (["--no-8bit"] if args.no_8bit else [])
        npo = ["train", *common[:3], npo_data, *common[4:], "--target", "cybersecurity"]
        scripts = {
            "sft": ("interleave.py", ["--pct", 0, *common]),
            "kl": ("kl.py", ["--lam", 0.1, *common]),
            "ldifs": ("ldifs.py", common),
            "persona": ("persona.py", ["train", *common, "--vector", tmp / "v.safetensors", "--layer", mid]),
            "inoculate": ("inoculate.py", common),
            "caft": ("caft.py", ["train", *common, "--directions", tmp / "d.safetensors", "--layers", mid]),
            "npo": ("npo_unlearn.py", [*npo, "--retain-domains", "safety,privacy"]),
            "grpo": ("grpo.py", grpo),
            "sft-checkpointing": ("interleave.py", ["--pct", 0, *common, "--gradient-checkpointing"]),
        }
        wanted = [k for k in scripts if not args.only or k.split("-")[0] in args.only.split(",")]
        flops = lora_sft_flops_per_token(model)
        leftover = {}
        for key in wanted:
            script, argv = scripts[key]
            out = tmp / f"run-{key}"
            leftover[key] = {"int8_layers_alive": live_int8_layers()}  # before a collection: cycles show here
            settle()
            before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
            leftover[key]["allocated_mb"] = before / 2**20
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            try:
                run_script(script, [*argv, "--out", out])
                metrics = read_metrics(out)
                peak = (
                    (torch.cuda.max_memory_allocated() - before) / 2**20
                    if torch.cuda.is_available()
                    else max(m["peak_mem_mb"] for m in metrics)
                )
                results[key] = {"script": script, "ok": True, "wall_s": time.time() - t0, **speed(metrics)}
                results[key]["peak_mem_mb"] = peak
                if args.peak_tflops and key != "grpo":
                    results[key]["mfu"] = mfu(results[key]["tokens_per_s"], flops, args.peak_tflops)
                checks[f"{key}: losses and gradient norms finite"] = finite_terms(metrics)
                if key in ("kl", "ldifs"):
                    term = metrics[0]["loss/kl" if key == "kl" else "loss/ldifs"]
                    checks[f"{key} = 0 at step 1"] = {"ok": term == 0.0, "value": term}
            except Exception as e:  # one script's failure must not hide the others' figures
                results[key] = {"script": script, "ok": False, "error": f"{type(e).__name__}: {e}"}
            print(
                f"[{time.time() - t_start:6.1f}s] {key}: {'ok' if results[key]['ok'] else results[key]['error']}",
                file=sys.stderr,
                flush=True,
            )
        alive = {k: v for k, v in leftover.items() if v["int8_layers_alive"] or v["allocated_mb"] > 64}
        checks["memory returned between scripts"] = {
            "ok": not alive,
            "before_each_script": {k: v for k, v in leftover.items()},
        }

        if results.get("sft", {}).get("ok") and results.get("sft-checkpointing", {}).get("ok"):
            a, b = read_metrics(tmp / "run-sft"), read_metrics(tmp / "run-sft-checkpointing")
            diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
            on = json.loads((tmp / "run-sft-checkpointing" / "memory.json").read_text())["gradient_checkpointing"]
            checks["--gradient-checkpointing: on, the same losses"] = {
                "ok": on and len(a) == len(b) and diff <= 1e-3 * abs(a[-1]["loss"]),
                "on": on,
                "max_abs_diff": diff,
                "peak_mb_without_and_with": [
                    results["sft"]["peak_mem_mb"],
                    results["sft-checkpointing"]["peak_mem_mb"],
                ],
            }
        if results.get("sft", {}).get("ok") and args.steps >= 3:  # resume after a (simulated) kill
            out = tmp / "run-sft-resumed"
            shutil.copytree(tmp / "run-sft", out)
            for ck in (out / "checkpoints").glob("step-*"):
                if int(ck.name.split("-")[1]) > 2:
                    shutil.rmtree(ck)
            for f in out.glob("adapter_*"):
                f.unlink()
            (out / "checkpoints" / "step-000003.tmp").mkdir()  # a save the kill interrupted
            run_script("interleave.py", ["--resume", out])
            a, b = read_metrics(tmp / "run-sft"), read_metrics(out)
            diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
            checks["resume after a kill: same losses"] = {
                "ok": len(a) == len(b) and diff <= 1e-3 * abs(a[-1]["loss"]),
                "max_abs_diff": diff,
                "steps": len(b),
            }
        if results.get("sft", {}).get("ok") and results.get("npo", {}).get("ok") and not args.only:

            def paths():
                eight = [] if eight_bit else ["--no-8bit"]
                run_script(
                    "caft.py",
                    ["directions", "--model", model, *eight, "--from-diff", tmp / "run-sft", "--prompts", sft_data]
                    + ["--max-prompts", 8, "--k", 2, "--layers", mid, "--out", tmp / "dirs.safetensors"],
                )
                run_script(
                    "persona.py",
                    ["extract", "--model", model, *eight, "--no-filter", "--samples", 1, "--max-new-tokens", 16]
                    + ["--out", tmp / "vector.safetensors"],
                )
                run_script(
                    "npo_unlearn.py",
                    ["eval", "--adapter", tmp / "run-npo", *eight, "--split", "all", "--per-domain", 4]
                    + ["--gen-max-new-tokens", 16],
                )
                return well_formed_outputs(tmp)

            check("caft directions, persona extract, npo eval", paths)
        check(
            "base weights frozen" + (" (8-bit)" if eight_bit else ""),
            base_weights_frozen,
            model,
            sft_data,
            eight_bit,
            2,
        )
        check("8-bit input gradient = bitsandbytes' (outliers planted)", int8_input_gradient, args.device)
        check("GRPO update with reward spread and KL", grpo_update, model, eight_bit)
        check("local judge on the device", local_judge, model, eight_bit)
        settle()
        gen = generation_throughput(model, eight_bit, 16, 64 if args.shape != "tiny" or args.model else 16)
        if big_shape != "none":
            check(
                f"{big_shape} SFT step: activations within 1.25x the plan",
                big_step,
                big_shape,
                args.device,
                eight_bit,
                tmp,
                args.peak_tflops,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    bits = "8-bit" if eight_bit else "full precision"
    print(
        f"\ngpu_check: {device}, {args.model or args.shape} ({bits}), batch {args.batch_size}, {args.steps} steps "
        f"per script, {time.time() - t_start:.0f} s in all"
    )
    print(f"{'script':<20} {'step s':>7} {'x SFT':>6} {'tok/s':>8} {'MFU':>6} {'peak MB':>8}  status")
    base = results.get("sft", {}).get("step_s")
    for key, r in results.items():
        name = r["script"] + (" +ckpt" if key.endswith("checkpointing") else "")
        if not r["ok"]:
            print(f"{name:<20} {'':>7} {'':>6} {'':>8} {'':>6} {'':>8}  FAILED {r['error'][:80]}")
            continue
        ratio = f"{r['step_s'] / base:6.2f}" if base else f"{'':>6}"
        m = f"{100 * r['mfu']:5.1f}%" if "mfu" in r else f"{'-':>6}"
        print(f"{name:<20} {r['step_s']:7.3f} {ratio} {r['tokens_per_s']:8.0f} {m} {r['peak_mem_mb']:8.0f}  ok")
    if gen:
        print(
            f"{'generation':<20} {gen['seconds']:7.2f} {'':>6} {gen['tokens_per_s']:8.0f} {'-':>6} {'':>8}  "
            f"judge.generate_texts, {gen['prompts']} prompts x {gen['new_tokens'] // gen['prompts']} tokens"
        )
    for name, c in checks.items():
        details = json.dumps({k: v for k, v in c.items() if k != "ok"}, default=str)
        print(f"check: {name:<58} {'PASS' if c['ok'] else 'FAIL'}  {details[:300]}")
    Path(args.json).write_text(
        json.dumps(
            {
                "device": device,
                "model": args.model or args.shape,
                "eight_bit": eight_bit,
                "args": vars(args),
                "scripts": results,
                "generation": gen,
                "checks": checks,
            },
            indent=2,
            default=str,
        )
    )
    print(f"written: {args.json}")
    failed = [k for k, r in results.items() if not r["ok"]] + [k for k, c in checks.items() if not c["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
