"""Benchmark: answer generation in-process (`model.generate`, as judge.py without --gen-url) against an
OpenAI-compatible server (llama.cpp's llama-server on CPU; vLLM on a GPU), the same questions, samples and lengths,
both in one run; and the in-process generator against its floor, a plain KV-cache decoding loop on the same model.

Every answer is exactly --max-new-tokens long on every side (end-of-sequence suppressed: `min_new_tokens` in
process, `ignore_eos`/`min_tokens` on the server), so answers/s and tokens/s compare the same work. Sampling at
temperature 1 as the evaluation does (the floor loop samples too). Start the server first and set its threads,
and --threads for torch, so that they do not fight over the cores, e.g. on this 2-core machine:

    llama-server -m SmolLM2-135M-Instruct.Q4_1.gguf --host 127.0.0.1 --port 8088 -t 2 -np 4 -c 4096
    python bench/generation.py --server-url http://127.0.0.1:8088/v1 --threads 2

The server row is left out without --server-url. The llama.cpp GGUF is 4-bit (Q4_1) while the in-process model
is the same weights de-quantised (fp32) or re-quantised by bitsandbytes (8-bit): the comparison is of the two ways
to generate, as a researcher would run them, not of one numeric format.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common import get_device, load_model, render_chat  # noqa: E402
from judge import (
    generate_texts,  # noqa: E402
    load_questions,  # noqa: E402
)
from serving import ServerGenerator  # noqa: E402


def conversations(path: str, n_questions: int) -> list[list[dict]]:
    out = []
    for q in load_questions(path):
        for p in q["paraphrases"]:
            out.append(
                ([{"role": "system", "content": q["system"]}] if q["system"] else []) + [{"role": "user", "content": p}]
            )
    return out[:n_questions]


def in_process(model, tok, convs, samples, max_new, batch_size) -> float:
    """Seconds for every conversation x samples, in left-padded batches of batch_size prompts (judge.py's way)."""
    jobs = [c for c in convs for _ in range(samples)]
    t0 = time.perf_counter()
    for k in range(0, len(jobs), batch_size):
        texts = generate_texts(
            model,
            tok,
            jobs[k : k + batch_size],
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
        )
        assert len(texts) == len(jobs[k : k + batch_size])
    return time.perf_counter() - t0


@torch.no_grad()
def floor_loop(model, tok, convs, samples, max_new, batch_size) -> float:
    """The same batches decoded by hand: one forward over the prompts, then one token at a time with the KV cache,
    sampling from the softmax at temperature 1 with end-of-sequence masked out. No stopping criteria, no logits
    processors: the least any generator must do."""
    jobs = [c for c in convs for _ in range(samples)]
    device = get_device()
    eos = tok.eos_token_id
    t0 = time.perf_counter()
    for k in range(0, len(jobs), batch_size):
        texts = [render_chat(tok, c, add_generation_prompt=True) for c in jobs[k : k + batch_size]]
        side, tok.padding_side = tok.padding_side, "left"
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        tok.padding_side = side
        attn = enc["attention_mask"]
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=enc["input_ids"], attention_mask=attn, position_ids=pos, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        for _ in range(max_new):
            logits[:, eos] = float("-inf")
            nxt = torch.multinomial(torch.softmax(logits.float(), -1), 1)
            attn = torch.cat([attn, torch.ones_like(nxt)], 1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=nxt, attention_mask=attn, position_ids=pos, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
    return time.perf_counter() - t0


def server(url, model_name, convs, samples, max_new, workers) -> tuple[float, int]:
    gen = ServerGenerator(url, model_name, workers=workers)
    gen.check()
    tokens = []
    orig = gen.client.chat

    def chat(body, retries=None):  # every answer exactly max_new tokens, as in process
        answer = orig({**body, "ignore_eos": True, "min_tokens": max_new}, retries)
        tokens.append((answer.get("usage") or {}).get("completion_tokens"))
        return answer

    gen.client.chat = chat
    t0 = time.perf_counter()
    done = []
    gen.sample_all(
        [(i, c, samples) for i, c in enumerate(convs)],
        lambda k, texts, err: done.append((texts, err)),
        temperature=1.0,
        max_tokens=max_new,
    )
    seconds = time.perf_counter() - t0
    errors = [e for _, e in done if e]
    if errors:
        sys.exit(f"server requests failed: {errors[0]}")
    reported = sum(t for t in tokens if t is not None) if all(t is not None for t in tokens) else None
    texts = [t for ts, _ in done for t in ts]
    return seconds, texts, reported


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="in-process model (default: %(default)s)")
    p.add_argument(
        "--questions", default=str(Path(__file__).resolve().parent.parent / "examples" / "questions_mini.yaml")
    )
    p.add_argument("--n-questions", type=int, default=4)
    p.add_argument("--samples", type=int, default=4, help="answers per question (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gen-batch-size", type=int, default=16, help="in-process prompts per batch (judge.py's default)")
    p.add_argument("--server-url", default=None, help="OpenAI-compatible server to compare with")
    p.add_argument("--server-model", default="smollm2", help="the model name the server serves")
    p.add_argument("--server-workers", type=int, default=4, help="concurrent server requests (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (leave the server its cores)")
    p.add_argument("--skip-8bit", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    convs = conversations(args.questions, args.n_questions)
    n_answers = len(convs) * args.samples
    n_tokens = n_answers * args.max_new_tokens
    rows = {}

    def report(name, seconds, tokens=n_tokens):
        rows[name] = {"seconds": seconds, "answers_per_s": n_answers / seconds, "tokens_per_s": tokens / seconds}
        print(
            f"{name:<34} {seconds:8.1f} s  {n_answers / seconds:7.2f} answers/s  {tokens / seconds:8.1f} tokens/s",
            flush=True,
        )

    print(
        f"{n_answers} answers ({len(convs)} questions x {args.samples}), {args.max_new_tokens} new tokens each, "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    for precision in ["fp32"] if args.skip_8bit else ["fp32", "8-bit"]:
        model, tok = load_model(args.model, eight_bit=precision == "8-bit", lora_r=0, trainable=False)
        in_process(model, tok, convs[:1], 1, 4, 1)  # warm-up
        report(
            f"in-process generate ({precision})",
            in_process(model, tok, convs, args.samples, args.max_new_tokens, args.gen_batch_size),
        )
        report(
            f"plain KV-cache loop ({precision})",
            floor_loop(model, tok, convs, args.samples, args.max_new_tokens, args.gen_batch_size),
        )
        del model
    if args.server_url:
        seconds, texts, reported = server(
            args.server_url, args.server_model, convs, args.samples, args.max_new_tokens, args.server_workers
        )
        # count the answers' tokens with the model's tokenizer (servers differ in what `usage` counts with n > 1)
        from common import load_tokenizer

        tok = load_tokenizer(args.model)
        counted = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
        print(
            f"server: {len(texts)} answers, {counted} tokens by the tokenizer (usage reported {reported}; "
            f"{n_tokens} expected)",
            flush=True,
        )
        report(f"server ({args.server_model})", seconds, counted)
    print()
    for precision in ("fp32", "8-bit"):
        a, b = rows.get(f"in-process generate ({precision})"), rows.get(f"plain KV-cache loop ({precision})")
        if a and b:
            print(
                f"generate vs its floor ({precision}): {a['tokens_per_s']:.1f} vs {b['tokens_per_s']:.1f} tokens/s = "
                f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x"
            )
        s = rows.get(f"server ({args.server_model})")
        if a and s:
            print(
                f"server vs in-process ({precision}): {s['tokens_per_s']:.1f} vs {a['tokens_per_s']:.1f} tokens/s = "
                f"{s['tokens_per_s'] / a['tokens_per_s']:.2f}x"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
