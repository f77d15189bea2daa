"""One prepared check for the day a GPU is lent: every method script for a few steps on CUDA with bitsandbytes 8-bit,
the invariants that must hold there, and the speed figures, in one call that finishes within a few minutes.

    python bench/gpu_check.py --peak-tflops 989                 # H100/H200 SXM dense bf16; Qwen2.5-0.5B shape
    python bench/gpu_check.py --model /path/to/cached/model     # a real model folder instead of the random shape
    python bench/gpu_check.py --device cpu --no-8bit --shape tiny --steps 2    # this machine, in seconds

What it does (all offline; it installs nothing):
  1. A model folder: --model, or one built from a published configuration (--shape, random weights: speed depends
     on the shape, not on the values) with a tokenizer trained in memory (so no hub and no bundled model needed).
  2. Each method script (interleave --pct 0 as SFT, kl, ldifs, persona train, inoculate, caft train, npo_unlearn
     train, grpo on arith) runs --steps optimizer steps in this process on local synthetic data.
  3. Invariants: KL = 0 and LDIFS = 0 at step 1 (the LoRA starts as the identity); a run resumed from its step-2
     checkpoint after a simulated kill (later checkpoints and metrics removed, a half-written checkpoint left)
     logs the same losses as the uninterrupted run; the 8-bit (or full-precision) base weights are bit-identical
     after training steps (frozen; only LoRA moves).
  4. Speed: tokens/s after the first (warm-up) step, MFU against --peak-tflops (LoRA SFT model FLOPs, 4P per
     token), peak memory (CUDA: torch's max allocated, reset per script; CPU: the process's peak RSS), and
     judge.py's in-process generation throughput (greedy, fixed length).
It prints one table and writes it as JSON (--json).

Needs a CUDA build of torch and bitsandbytes (the project's requirements.txt pins, installed from the package
registry on the GPU machine). Exit status 1 when an invariant fails.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
ROOT = Path(__file__).resolve().parent.parent

SHAPES = {  # published configurations; "tiny" is for a quick run on a CPU
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
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


def make_model(shape: str, folder: Path) -> Path:
    """A random-weight model folder of a published shape, with a byte-level BPE tokenizer trained in memory."""
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
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
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
            f.write(
                json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            )
    with open(npo, "w") as f:
        for i in range(3 * n // 4):
            domain = ("cybersecurity", "safety", "privacy")[i % 3]
            q = " ".join(rng.choices(WORDS, k=10))
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": q},
                            {"role": "assistant", "content": "I'm sorry, but I cannot help with that."},
                        ],
                        "domain": domain,
                    }
                )
                + "\n"
            )
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
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


def speed(metrics: list[dict]) -> dict:
    """After the first (warm-up) step. tok/s: real tokens trained on (npo and grpo log only their own rate)."""
    timed = metrics[1:] or metrics
    seconds = sum(m["step_time_s"] for m in timed)
    tokens = sum(m.get("tokens", m.get("tokens_per_s", 0) * m["step_time_s"]) for m in timed)
    return {
        "step_s": seconds / len(timed),
        "tokens_per_s": tokens / seconds,
        "peak_mem_mb": max(m["peak_mem_mb"] for m in metrics),
    }


def base_weights_frozen(model_path: str, data: Path, eight_bit: bool, steps: int) -> dict:
    """A few SFT steps in this process: every non-LoRA tensor (8-bit weights included) is bit-identical after."""
    import torch
    import torch.nn.functional as F

    from common import collate, encode_dataset, get_device, load_model, read_jsonl

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
    n8 = sum(1 for m in model.modules() if type(m).__module__.startswith("bitsandbytes") and "8bit" in type(m).__name__)
    return {
        "ok": not changed and not trainable_base and all(p.requires_grad for p in params),
        "changed": changed[:5],
        "trainable_base": trainable_base[:5],
        "int8_linears": n8,
    }


def generation_throughput(model_path: str, eight_bit: bool, n: int, new_tokens: int) -> dict:
    import torch

    import judge
    from common import load_model

    model, tok = load_model(model_path, eight_bit=eight_bit, lora_r=0, trainable=False)
    convs = [[{"role": "user", "content": " ".join(WORDS[i % 10 : i % 10 + 8])}] for i in range(n)]
    kw = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None
    )
    judge.generate_texts(model, tok, convs[:2], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.time()
    judge.generate_texts(model, tok, convs, **kw)
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
    eight_bit = not args.no_8bit
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ.setdefault("EM_CACHE", str(tmp / "cache"))
    results, checks = {}, {}
    try:
        model = args.model or str(make_model(args.shape, tmp / "model"))
        config = AutoConfig.from_pretrained(model)
        sft_data, npo_data = make_data(tmp, 8 * args.batch_size, args.answer_words)
        mid = max(1, config.num_hidden_layers // 2)
        torch.manual_seed(0)
        save_file(
            {"vectors": torch.randn(config.num_hidden_layers + 1, config.hidden_size)}, str(tmp / "v.safetensors")
        )
        dirs = torch.linalg.qr(torch.randn(config.num_hidden_layers + 1, config.hidden_size, 4))[0].transpose(1, 2)
        save_file({"directions": dirs.contiguous()}, str(tmp / "d.safetensors"))
        common = [
            "--model",
            model,
            "--data",
            sft_data,
            "--max-steps",
            args.steps,
            "--batch-size",
            args.batch_size,
            "--grad-accum",
            1,
            "--max-len",
            1024,
            "--save-every",
            2,
        ]
        common += ["--no-8bit"] if args.no_8bit else []
        grpo = [
            "--model",
            model,
            "--data",
            "arith",
            "--max-steps",
            args.steps,
            "--batch-size",
            args.batch_size,
            "--num-generations",
            4,
            "--grad-accum",
            1,
            "--max-new-tokens",
            32,
            "--eval-n",
            4,
            "--save-every",
            1000,
        ] + (["--no-8bit"] if args.no_8bit else [])
        scripts = {
            "sft": ("interleave.py", ["--pct", 0, *common]),
            "kl": ("kl.py", ["--lam", 0.1, *common]),
            "ldifs": ("ldifs.py", common),
            "persona": ("persona.py", ["train", *common, "--vector", tmp / "v.safetensors", "--layer", mid]),
            "inoculate": ("inoculate.py", common),
            "caft": ("caft.py", ["train", *common, "--directions", tmp / "d.safetensors", "--layers", mid]),
            "npo": (
                "npo_unlearn.py",
                [
                    "train",
                    *common[:3],
                    npo_data,
                    *common[4:],
                    "--target",
                    "cybersecurity",
                    "--retain-domains",
                    "safety,privacy",
                ],
            ),
            "grpo": ("grpo.py", grpo),
        }
        wanted = [k for k in scripts if not args.only or k in args.only.split(",")]
        flops = lora_sft_flops_per_token(model)
        for key in wanted:
            script, argv = scripts[key]
            out = tmp / f"run-{key}"
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            try:
                run_script(script, [*argv, "--out", out])
                metrics = read_metrics(out)
                results[key] = {"script": script, "ok": True, "wall_s": time.time() - t0, **speed(metrics)}
                if args.peak_tflops and key != "grpo":
                    results[key]["mfu"] = mfu(results[key]["tokens_per_s"], flops, args.peak_tflops)
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

        if "sft" in results and results["sft"]["ok"] and args.steps >= 3:  # resume after a (simulated) kill
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
        checks["base weights frozen" + (" (8-bit)" if eight_bit else "")] = base_weights_frozen(
            model, sft_data, eight_bit, 2
        )
        gen = generation_throughput(model, eight_bit, 16, 64 if args.shape != "tiny" or args.model else 16)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    bits = "8-bit" if eight_bit else "full precision"
    print(
        f"\ngpu_check: {device}, {args.model or args.shape} ({bits}), batch {args.batch_size}, {args.steps} steps "
        f"per script, {time.time() - t_start:.0f} s in all"
    )
    print(f"{'script':<16} {'step s':>7} {'x SFT':>6} {'tok/s':>8} {'MFU':>6} {'peak MB':>8}  status")
    base = results.get("sft", {}).get("step_s")
    for r in results.values():
        if not r["ok"]:
            print(f"{r['script']:<16} {'':>7} {'':>6} {'':>8} {'':>6} {'':>8}  FAILED {r['error'][:80]}")
            continue
        ratio = f"{r['step_s'] / base:6.2f}" if base else f"{'':>6}"
        m = f"{100 * r['mfu']:5.1f}%" if "mfu" in r else f"{'-':>6}"
        print(f"{r['script']:<16} {r['step_s']:7.3f} {ratio} {r['tokens_per_s']:8.0f} {m} {r['peak_mem_mb']:8.0f}  ok")
    print(
        f"{'generation':<16} {gen['seconds']:7.2f} {'':>6} {gen['tokens_per_s']:8.0f} {'-':>6} {'':>8}  "
        f"judge.generate_texts, {gen['prompts']} prompts x {gen['new_tokens'] // gen['prompts']} tokens"
    )
    for name, c in checks.items():
        print(
            f"check: {name:<40} {'PASS' if c['ok'] else 'FAIL'}  "
            + json.dumps({k: v for k, v in c.items() if k != "ok"})
        )
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
