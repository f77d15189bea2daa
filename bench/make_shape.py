"""Make a randomly initialised model folder with the shape of a real chat model, for speed and memory
benchmarks where the real weights cannot be downloaded (an offline GPU machine). Throughput depends on the
shape, not on the weight values; the tokenizer (and its chat template) is copied from --tokenizer.

    python bench/make_shape.py --shape qwen2.5-0.5b --out /tmp/qwen05-shape
    python bench/sft_vs_trl.py --model /tmp/qwen05-shape --peak-tflops 989

On a machine without the bundled SmolLM2 package, copy its tokenizer files (tokenizer.json,
tokenizer_config.json, chat_template.jinja from ~/.cache/em-defenses/models/smollm2-135m-instruct/) into a
folder and pass that folder as --tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Published configurations (hidden size, MLP width, blocks, heads, KV heads, vocabulary).
SHAPES = {
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--out", required=True, help="folder to write (config, bf16 weights, tokenizer)")
    p.add_argument(
        "--tokenizer", default="smollm2", help="tokenizer to copy: 'smollm2' or a folder (default: %(default)s)"
    )
    args = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from bench.benchlib import matmul_params
    from common import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    config = Qwen2Config(
        **SHAPES[args.shape],
        max_position_embeddings=32768,
        rope_theta=1e6,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"{args.out}: {args.shape} shape, {n / 1e6:.0f}M parameters ({matmul_params(config) / 1e6:.0f}M in "
        f"matmuls per token), tokenizer from {args.tokenizer}"
    )


if __name__ == "__main__":
    main()
