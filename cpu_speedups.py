"""Speed-ups that exist only because the development machine is a CPU. Each is a no-op on CUDA, and none changes a
result: a method script copied without this file runs the same, only slower on a CPU (common.cpu_speedup returns a
no-op then). Measured on the 2-core development CPU with SmolLM2-135M-Instruct; bench/RESULTS.md has the figures.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys

import torch

# glibc's malloc_trim, where there is one (Linux)
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform == "linux" else None


def trim_heap(device: torch.device) -> None:
    """After a CPU training pass, hand the heap's free pages back to the OS: glibc keeps a pass's freed temporaries in
    holes between the saved activations. Buys: peak RSS of the SFT benchmark 5.5-5.7 GB -> 4.0-4.3 GB, for ~6% of a
    step."""
    if _MALLOC_TRIM is not None and device.type == "cpu" and torch.is_grad_enabled():
        _MALLOC_TRIM(0)


@contextlib.contextmanager
def eager_attention(base):
    """The model's plain attention while decoding one token a step on the CPU (torch's CPU SDPA kernel is slow for a
    single query token); the model's own attention is put back after. Buys: GRPO rollouts ~10% faster."""
    before = base.config._attn_implementation
    if base.get_input_embeddings().weight.device.type == "cpu":
        base.set_attn_implementation("eager")
    try:
        yield
    finally:
        base.set_attn_implementation(before)


@contextlib.contextmanager
def dequantised_int8(model):
    """While sampling on the CPU, each frozen bitsandbytes 8-bit layer in training mode dequantises its weight once
    and keeps it, instead of at every call (the same formula, common.int8_weight, so the same outputs bit for bit;
    2 bytes a weight until the context closes). Buys: most of a decoding step's time with an 8-bit model."""
    from common import int8_weight, is_int8_linear

    patched = [m for m in model.modules() if is_int8_linear(m) and m.weight.device.type == "cpu"]
    for layer in patched:
        layer.forward = _forward_with_one_dequantisation(layer, int8_weight)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward  # the class's forward again; the dequantised copy is freed


def _forward_with_one_dequantisation(layer, int8_weight):
    """bitsandbytes' CPU training-mode forward, linear(x, int8_weight(layer, x.dtype), bias), with that weight made
    on the first call and kept. Anything else (eval mode, trainable int8 weights) goes to the layer's own forward."""
    kept = {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not layer.training or layer.state.has_fp16_weights or x.device.type != "cpu":
            return type(layer).forward(layer, x)
        if layer.weight.CB is not None:
            layer.init_8bit_state()  # as bitsandbytes' forward does first: the int8 weight and scales move to .state
        if layer.bias is not None and layer.bias.dtype != x.dtype:
            layer.bias.data = layer.bias.data.to(x.dtype)  # as bitsandbytes' forward does
        if x.dtype not in kept:
            kept[x.dtype] = int8_weight(layer, x.dtype)
        return torch.nn.functional.linear(x, kept[x.dtype], layer.bias)

    return forward
