"""Small helpers the benchmark scripts share: run a training script in its own process and read its
metrics.jsonl, and the throughput over a window of steps measured the same way for every trainer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_logged(cmd: list[str], what: str) -> None:
    """Run cmd from the repository root; its stderr (progress, errors) passes through, a failure stops the benchmark."""
    print(f"[{what}] {' '.join(str(c) for c in cmd)}", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        sys.exit(f"[{what}] failed (exit {proc.returncode}); its messages are above")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def last_epoch(metrics: list[dict]) -> dict:
    """Figures over the last epoch of a run: time from the end of the last step of the earlier epochs to the end
    of the last step (wall clock, so it includes all a trainer does between steps: collation, logging), tokens
    the real (non-padding) tokens of those steps. The earlier epochs are the warm-up (lazy initialisation,
    allocator growth), and every trainer is timed over the whole data set once.

    `epoch` is our scripts' 0-based epoch index (int) or the Trainer's fractional epoch (float, in (k-1, k] during
    epoch k)."""
    epochs = [m["epoch"] + 1 if isinstance(m["epoch"], int) else math.ceil(m["epoch"] - 1e-6) for m in metrics]
    first = epochs.index(epochs[-1])
    if first == 0:
        raise ValueError("only one epoch was logged: the first epoch is the warm-up, run two or more")
    timed = metrics[first:]
    seconds = metrics[-1]["time"] - metrics[first - 1]["time"]
    tokens = sum(m["tokens"] for m in timed)
    padded = sum(m["tokens"] / m["padding_efficiency"] for m in timed)
    return {
        "steps": len(timed),
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / len(timed),
        "padding_efficiency": tokens / padded,
        "peak_mem_mb": max(m["peak_mem_mb"] for m in metrics),
    }


def after_first(metrics: list[dict]) -> dict:
    """Figures over the steps after the first (warm-up), by the wall clock between step ends."""
    if len(metrics) < 2:
        raise ValueError("need at least 2 logged steps (the first is the warm-up)")
    seconds = metrics[-1]["time"] - metrics[0]["time"]
    return {
        "steps": len(metrics) - 1,
        "seconds": seconds,
        "step_s": seconds / (len(metrics) - 1),
        "peak_mem_mb": max(m["peak_mem_mb"] for m in metrics),
    }


def matmul_params(config) -> int:
    """Weights every token multiplies through: the decoder blocks' linear layers and the output head."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_block = 2 * h * h + 2 * h * kv + 3 * h * i  # q and o, k and v, gate/up/down
    return layers * per_block + h * config.vocab_size


def lora_sft_flops_per_token(model: str) -> float:
    """Model FLOPs of one LoRA SFT token: 2P forward + 2P backward to the activations (the frozen weights get
    no gradient), P = matmul_params; attention scores and the small LoRA matrices are left out."""
    from transformers import AutoConfig

    from common import resolve_model

    return 4.0 * matmul_params(AutoConfig.from_pretrained(resolve_model(model)))


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float) -> float:
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)
