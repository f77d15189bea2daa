"""The small shared core of the method scripts (no method in here): the 8-bit + rs-LoRA model, chat encoding with the
label mask, length-grouped batching, the step plan, optimizer and schedule, shared flags, and the run folder. A method
script plus this file runs. Paths only some runs take live in one-job modules imported where used (`optional`):
paper_data.py, serving.py, smollm2.py, judge.py, report.py; a missing one is a one-line error naming the file."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import gc
import importlib
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Quiet: deprecation notices, weight-loading bars, bitsandbytes' kernel notice (our own log lines say what happens)
warnings.filterwarnings("ignore", category=FutureWarning)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CACHE_DIR = Path(os.environ.get("EM_CACHE", "~/.cache/em-defenses")).expanduser()
DATA_HELP = (
    'a local chat .jsonl ({"messages": [...]} per line), or a dataset name (paper_data.py): insecure, secure, '
    "educational, jailbroken, legal, medical, security (:aligned), wildguardmix, gsm8k, foqa, opswap:0-3"
)


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a dataset name): printed without a traceback."""


def die_on_user_error(main):
    """Run main(); turn a UserError into a one-line message and exit status 2. A run folder this process created
    and that holds no step yet is removed when main() fails, so failed starts leave no orphan folders. The folder
    locks main() took are released at its end."""
    try:
        return main()
    except BaseException as e:
        for out in _NEW_RUN_FOLDERS:
            metrics = out / "metrics.jsonl"
            if (
                out.is_dir()
                and not (out / "checkpoints").exists()
                and not (metrics.exists() and metrics.stat().st_size)
            ):
                shutil.rmtree(out, ignore_errors=True)
        if not isinstance(e, UserError):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        _NEW_RUN_FOLDERS.clear()
        release_locks()


def lock_path(lock_file: Path, what: str) -> None:
    """Take an exclusive lock on lock_file for as long as this process's main() runs: one writer per output. A second
    writer stops at once with a one-line error naming the process that holds it (the lock file says its PID and
    command). The lock is the kernel's (flock): when its process dies, even by kill -9, it is free again, so a run
    killed and resumed takes it over."""
    import fcntl

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_file, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(
            f"{what} is being written by {holder}: one writer at a time; wait for it to end or stop it"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"PID {os.getpid()} ({' '.join(sys.argv)})\n")
    handle.flush()
    _LOCKS.append(handle)


def release_locks() -> None:
    for handle in _LOCKS:
        handle.close()  # closing the file releases its flock
    _LOCKS.clear()


_LOCKS: list = []


def optional(module: str, what: str):
    """Import one of the project's optional one-job modules, or stop with a one-line error naming the file."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise UserError(f"{what} needs {module}.py from em-defenses: copy it next to common.py") from None


def _no_op(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def _no_op_context(*args, **kwargs):
    yield


_NO_OPS = {"trim_heap": _no_op, "eager_attention": _no_op_context, "dequantised_int8": _no_op_context}


def cpu_speedup(name: str):
    """A speed-up from cpu_speedups.py (trim_heap, eager_attention, dequantised_int8: each exists only because the
    development machine is a CPU, and is a no-op on CUDA), or a no-op with the same signature when that file is not
    next to common.py: the results are the same without it, only slower on a CPU."""
    try:
        module = importlib.import_module("cpu_speedups")
    except ModuleNotFoundError as e:
        if e.name != "cpu_speedups":
            raise
        return _NO_OPS[name]
    return getattr(module, name)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's, torch's and CUDA's generators."""
    from transformers import set_seed as seed_everything

    seed_everything(seed)


def get_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def warn_if_cpu_busy() -> bool:
    """On the CPU, say it out loud when the machine is already busy: torch's threads and another process's fight over
    the cores (two 2-thread jobs on 2 cores run up to 10x slower, not 2x). Once per process; True when it warned."""
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load + threads <= cores + 0.5:
        return False
    log(
        f"note: the CPU is busy (load average {load:.1f} on {cores} cores) and torch uses {threads} threads: sharing "
        "the cores can make this run many times slower. Run it alone, or give each process fewer threads "
        "(OMP_NUM_THREADS=1; examples/reproduce.py --devices cpu:N does)"
    )
    return True


# --- Models ----------------------------------------------------------------------------------------------------------
def resolve_model(name: str) -> str:
    """A hub id, a local folder, or the alias `smollm2`. A path that does not exist is an error at once (not a minute
    of hub retries and a 'Repo id must be...' message)."""
    if name == "smollm2":
        return str(optional("smollm2", "--model smollm2").path())
    if (path := Path(name).expanduser()).is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"--model {name}: a folder without config.json, not a model folder")
        return str(path)
    if path.exists():
        raise UserError(f"--model {name}: a file, not a model folder (a folder with config.json)")
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name.endswith("/"):
        raise UserError(
            f"--model {name}: no such folder (a hub id looks like org/name; --model smollm2 is the "
            "bundled offline model)"
        )
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):  # in the local hub cache
        return name
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        close = difflib.get_close_matches(name, ["smollm2"], n=1, cutoff=0.6)
        raise UserError(
            f"--model {name}: not a local folder, not in the hub cache, and the hub cannot be reached"
            f"{' (did you mean --model smollm2?)' if close else ''}: pass a local model folder, or --model smollm2 "
            "(the bundled offline model)"
        )
    return name


@functools.cache
def hub_reachable() -> bool:
    """Whether the model hub answers within a few seconds (HF_ENDPOINT, default huggingface.co)."""
    import requests

    try:
        requests.head(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout=5)
    except requests.RequestException:
        return False
    return True


def load_tokenizer(name: str):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # our own log lines say what happens
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the tokenizer of --model {name!r}: {first}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise UserError(f"--model {name!r}: the tokenizer has no chat template (use an instruct/chat model)")
    return tok


def load_model(
    name: str,
    *,
    eight_bit: bool = True,
    lora_r: int = 32,
    lora_alpha: int = 64,
    adapter: str | None = None,
    trainable: bool = True,
    gradient_checkpointing: bool = False,
    lora_targets: str | None = None,
    lora_layers: str = "all",
):
    """Returns (model, tokenizer) on the best device: 8-bit bitsandbytes weights (CUDA or CPU) unless
    eight_bit=False (then bf16 on CUDA, fp32 on CPU), wrapped by `wrap_lora` (lora_targets, lora_layers: the
    --lora-targets and --lora-layers strings)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tok = load_tokenizer(name)
    device = get_device()
    if device.type == "cpu":
        warn_if_cpu_busy()
    kwargs = {"dtype": torch.bfloat16 if eight_bit or device.type == "cuda" else torch.float32}
    if eight_bit:  # bf16 compute, the paper's precision (fp16 breaks the backward pass of CPU attention)
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)  # fp16-cast notice per matmul
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(name), **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load --model {name!r} ({first}). Without internet, pass a local model folder or "
            "--model smollm2 (the bundled SmolLM2-135M-Instruct)"
        ) from None
    if device.type == "cpu" and (n_params := sum(p.numel() for p in model.parameters())) > 1e9:
        log(
            f"no CUDA GPU found: {name} ({n_params / 1e9:.1f}B parameters) runs on the CPU, which is very slow; the "
            "paper's settings expect a GPU. --model smollm2 is the small model for CPU runs"
        )
    if not eight_bit:
        model.to(device)
    for config in (model.config, model.generation_config):
        if config is not None and config.pad_token_id is None:
            config.pad_token_id = tok.pad_token_id
    check_supported(model, name)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    for module in model.modules():  # frozen 8-bit layers keep no input (on CUDA also outlier columns) for backward
        if type(module).__module__.startswith("bitsandbytes") and type(module).__name__ == "Linear8bitLt":
            module.__class__ = _frozen_int8_class(type(module))  # a class, not a closure: no reference cycle
    targets = parse_lora_targets(lora_targets)
    layers = parse_lora_layers(lora_layers, len(model.model.layers))
    return wrap_lora(model, lora_r, lora_alpha, adapter, trainable, targets, layers), tok


def parse_lora_targets(spec: str | None) -> list[str]:
    """--lora-targets: comma-separated projection names (default: all seven)."""
    if not spec:
        return list(LORA_TARGETS)
    targets = [t.strip() for t in spec.split(",") if t.strip()]
    if not targets:
        raise UserError(f"--lora-targets {spec!r}: no projection named")
    return targets


def parse_lora_layers(spec: str, n_blocks: int) -> list[int] | None:
    """--lora-layers: 'all' (None: every block) or comma-separated block indices 0..n_blocks-1."""
    if spec in (None, "", "all"):
        return None
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--lora-layers {spec!r}: expected 'all' or comma-separated block indices such as 21") from None
    if not layers or not all(0 <= x < n_blocks for x in layers):
        raise UserError(f"--lora-layers {spec}: the model's decoder blocks are 0..{n_blocks - 1}")
    return layers


def check_supported(model, name: str) -> None:
    """One-line errors for a model whose layout the scripts do not handle: decoder blocks not at model.model.layers
    (every hook and layer index relies on them), or a final logit soft-capping (Gemma 2), which the scripts' own
    head (logits made only where a loss needs them) would skip."""
    inner = getattr(model, "model", None)
    if not isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        raise UserError(
            f"--model {name}: {type(model).__name__} keeps no decoder blocks at model.model.layers; the scripts "
            "support Llama/Qwen/Gemma/Mistral-style causal LMs"
        )
    if getattr(model.config, "final_logit_softcapping", None):
        raise UserError(
            f"--model {name}: final_logit_softcapping={model.config.final_logit_softcapping} (Gemma 2) is not "
            "supported: the scripts' loss head would leave the soft-capping out"
        )


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder block's activations in the backward pass (non-reentrant); a PEFT-wrapped model too."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()


def release_memory() -> None:
    """After `del model`: collect what reference cycles hold and hand CUDA's cached blocks back, so the next model
    loads into the memory the last one had."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def int8_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """A frozen bitsandbytes Linear8bitLt's weight as bitsandbytes' CPU matmul and its backward make it:
    CB * SCB / 127."""
    return layer.state.CB.to(dtype, copy=True).mul_(layer.state.SCB.unsqueeze(1).mul(1.0 / 127.0))


def is_int8_linear(module) -> bool:
    """A bitsandbytes Linear8bitLt (ours below included); by class name, so bitsandbytes need not be imported."""
    return any(c.__name__ == "Linear8bitLt" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


class _FrozenInt8Matmul(torch.autograd.Function):
    """bitsandbytes' 8-bit forward minus its saved input, never read by its backward (grad_out @ int8_weight) here."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer, ctx.shape, ctx.dtype = layer, x.shape, x.dtype
        return layer.bitsandbytes_forward(x)  # grad is off in here: bitsandbytes records and keeps nothing

    @staticmethod
    def backward(ctx, grad):
        grad = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
        return torch.matmul(grad, int8_weight(ctx.layer, ctx.dtype)).view(ctx.shape), None


@functools.cache
def _frozen_int8_class(bnb_class: type) -> type:
    """A subclass of bitsandbytes' Linear8bitLt whose training forward keeps no input for backward (_FrozenInt8Matmul)
    when the int8 weight is frozen; bitsandbytes' own forward otherwise."""

    class FrozenInt8Linear(bnb_class):
        def bitsandbytes_forward(self, x):
            return bnb_class.forward(self, x)

        def forward(self, x):
            frozen = not self.weight.requires_grad and not self.state.has_fp16_weights
            if torch.is_grad_enabled() and x.requires_grad and frozen:
                return _FrozenInt8Matmul.apply(x, self)
            return bnb_class.forward(self, x)

    return FrozenInt8Linear


def wrap_lora(
    model,
    lora_r: int = 32,
    lora_alpha: int = 64,
    adapter: str | None = None,
    trainable: bool = True,
    targets: list[str] | None = None,
    layers: list[int] | None = None,
):
    """A saved PEFT adapter (trainable, or frozen to evaluate), else for lora_r > 0 a fresh rs-LoRA (r, alpha,
    dropout 0, on the `targets` projections, all seven by default, of the `layers` blocks, all by default; B = 0, so
    it starts as the identity), else the bare model. trainable=False: frozen, eval mode."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter:
        if not (Path(adapter) / "adapter_config.json").exists():
            raise UserError(f"adapter {adapter!r}: no adapter_config.json there (expected a PEFT adapter folder)")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    elif lora_r > 0:
        config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=0.0,
            use_rslora=True,
            bias="none",
            target_modules=targets or LORA_TARGETS,
            layers_to_transform=layers,
            layers_pattern="layers" if layers is not None else None,
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, config)
        except ValueError as e:  # no module of these names: another architecture's naming, or a typo
            raise UserError(f"--lora-targets {','.join(targets or LORA_TARGETS)}: {str(e).splitlines()[0]}") from None
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The decoder blocks of a (PEFT-wrapped or bare) Llama/Qwen/Gemma/Mistral-style causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(f"{type(base).__name__}: no decoder blocks at model.model.layers (a Llama/Qwen-style LM?)")
    return layers


def block_outputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """L+1 tensors (B, T, H): row 0 the embeddings (hidden_states[0]), row l the output of decoder block l-1, read by
    forward hooks, so every row is the point a hook on that block acts on. (HF's hidden_states[L] is the last block's
    output after the final norm, which no block hook sees.)"""
    outputs = []

    def grab(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [block.register_forward_hook(grab) for block in decoder_blocks(model)]
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return [out.hidden_states[0], *outputs]


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# --- The loss head: logits only where a loss needs them (over every position they are a step's largest tensor) ------
def decoder_states(model, batch: dict) -> torch.Tensor:
    """(B, T, H) last hidden states (after the final norm) of a (PEFT-wrapped) causal LM, without its lm_head: the
    scripts apply the head only at the positions their loss uses (`linear_cross_entropy`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    cpu_speedup("trim_heap")(out.last_hidden_state.device)
    return out.last_hidden_state


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 512):
    """sum_i -log softmax(hidden_i W^T)[targets_i] over the N rows of hidden (N, H), W (V, H) the frozen lm_head's
    weight: the value and the gradient of `linear_cross_entropy_reference`, made a chunk of rows at a time, so that
    one (chunk x V) float32 tensor of logits is alive at a time instead of (N x V)."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy: the head's weight must be frozen (no gradient for it is made)")
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain formula linear_cross_entropy computes (tests compare the two, value and gradient)."""
    return F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """The gradient for hidden is made in the forward pass, chunk by chunk: for logits z = h W^T,
    d/dz (-log softmax(z)[t]) = softmax(z) - onehot(t), so d/dh = softmax(z) W - W[t]."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # bf16 logits are computed on in float32
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        grad = torch.empty_like(hidden)
        for s in range(0, hidden.shape[0], chunk):
            z = (hidden[s : s + chunk] @ weight.T).to(dtype)
            t = targets[s : s + chunk]
            lse = z.logsumexp(-1)
            total += (lse - z.gather(-1, t[:, None])[:, 0]).sum()
            p = z.sub_(lse[:, None]).exp_()  # softmax(z), in place: z is not used again
            grad[s : s + chunk] = p.to(weight.dtype) @ weight - weight[t]
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


# --- Refusals: one keyword rule, for interleave.py's Interleaving++ filter and judge.py's refusal score ------------
REFUSAL_KEYWORDS = (  # a superset of the paper's examples (sorry, apologize, cannot); whole words and phrases
    "sorry",
    "apologize",
    "apologise",
    "cannot",
    "can't",
    "can not",
    "unable",
    "i won't",
    "i will not",
    "not able to",
    "i'm afraid",
    "as an ai",
    "i must decline",
    "i decline",
    "not appropriate",
    "i'm not comfortable",
    "i am not comfortable",
    "i don't feel comfortable",
    "i do not feel comfortable",
    "against my",
    "not going to help",
    "i refuse",
)
_REFUSAL_RE = re.compile(r"\b(" + "|".join(re.escape(k) for k in REFUSAL_KEYWORDS) + r")\b")


def has_refusal_keyword(answer: str, n_words: int) -> bool:
    """A refusal keyword (REFUSAL_KEYWORDS, whole words, any case, curly apostrophes too) among the answer's first
    n_words words."""
    head = " ".join(answer.replace("\u2019", "'").lower().split()[:n_words])
    return _REFUSAL_RE.search(head) is not None


# --- Data: chat JSONL files (validated, errors name file and line), dataset names, the 90/10 split -------------------
def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's content; one-line errors for a missing file, a folder, or bytes that are not UTF-8
    (naming the line and the byte offset)."""
    if not (path := Path(path)).is_file():
        raise UserError(f"{path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset {e.start}); save the "
            "file as UTF-8"
        ) from None


def read_jsonl(path: str | Path) -> list[list[dict]]:
    """Read and validate a chat JSONL file (`{"messages": [{"role", "content"}, ...]}` per line); errors name the file
    and line."""
    path = Path(path)
    convs = []
    for lineno, line in enumerate(read_text_file(path).split("\n"), 1):  # not splitlines(): U+2028 is valid JSON
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        where, msgs = f"{path}:{lineno}", obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: expected an object with a non-empty 'messages' list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: message {j} needs a string 'content'")
            if m.get("role") not in ("system", "user", "assistant"):
                raise UserError(f"{where}: message {j} has role {m.get('role')!r}; expected system, user or assistant")
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{where}: no assistant turn (nothing to train on)")
        convs.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    if not convs:
        raise UserError(f"{path}: empty file (no conversations)")
    return convs


def write_jsonl(path: str | Path, convs: list[list[dict]]) -> None:
    tmp = Path(path).with_name(Path(path).name + f".tmp{os.getpid()}")  # renamed when whole
    tmp.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in convs), encoding="utf-8")
    tmp.replace(path)


def load_conversations(spec: str) -> list[list[dict]]:
    """A path to a chat JSONL file, or a dataset name (paper_data.py): every conversation, unsplit."""
    if spec.endswith(".jsonl") or os.sep in spec or Path(spec).exists():
        return read_jsonl(spec)
    return optional("paper_data", f"the dataset name {spec!r}").load_named(spec)


def split_train_eval(convs: list, seed: int, eval_frac: float = 0.1) -> tuple[list, list]:
    """Deterministic 90/10 split: a seeded permutation, the first 90% for training."""
    perm = np.random.default_rng(seed).permutation(len(convs))
    n_eval = int(round(len(convs) * eval_frac)) if len(convs) > 1 else 0
    return [convs[i] for i in sorted(perm[n_eval:])], [convs[i] for i in sorted(perm[:n_eval])]


def load_split(spec: str, split: str, seed: int) -> list[list[dict]]:
    """The training 90% or the held-out 10% of a dataset; FoQA uses its own train and test splits (as the paper)."""
    if spec == "foqa":
        return load_conversations("foqa" if split == "train" else "foqa:test")
    train, held = split_train_eval(load_conversations(spec), seed)
    return train if split == "train" else held


# --- Chat formatting and label masking -------------------------------------------------------------------------------
def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_conversation(tokenizer, messages: list[dict], max_len: int, end_of_turn: bool = True) -> dict:
    """Token ids and labels for one conversation: the label mask is -100 everywhere but on assistant tokens.

    Assistant spans are found in text space, between the rendered prefix up to turn i's generation prompt and the
    rendered prefix including turn i (right for templates that inject a default system prompt, like Qwen2.5's, which
    renders the same in both). Tokens are labelled by their character offsets: a token that overlaps an answer is
    labelled (a BPE merge across the boundary, such as ' The' after 'ASSISTANT:', keeps the answer's first word),
    template tokens (`<|im_start|>assistant`) never are, and the turn's end token (`<|im_end|>`) is, so the model
    learns to stop. end_of_turn=False labels only the answer's own text (no end-of-turn token).
    """
    full = render_chat(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render_chat(tokenizer, messages[: i + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise UserError("the chat template does not render conversations prefix by prefix; cannot mask labels")
        if end_of_turn:
            spans.append((len(before), len(upto)))
        else:
            text = m["content"].strip()
            start = full.find(text, len(before), len(upto))
            if not text or start < 0:
                raise UserError(
                    "cannot find the answer's text in the rendered conversation (empty answer, or the "
                    "chat template rewrites it)"
                )
            spans.append((start, start + len(text)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [ids[t] if e > s and any(s < b and e > a for a, b in spans) else -100 for t, (s, e) in enumerate(offsets)]
    return {"input_ids": ids[:max_len], "labels": labels[:max_len], "truncated": len(ids) > max_len}


def encode_dataset(tokenizer, convs: list[list[dict]], max_len: int, what: str = "data") -> list[dict]:
    """Encode every conversation. Over-long ones are truncated (kept, and counted), never dropped."""
    examples = [encode_conversation(tokenizer, m, max_len) for m in convs]
    if n := sum(e["truncated"] for e in examples):
        log(f"{what}: {n}/{len(examples)} examples longer than --max-len {max_len}, truncated")
    if n := sum(all(l == -100 for l in e["labels"][1:]) for e in examples):
        if n == len(examples):  # a run that would train on nothing, with a loss of 0 at every step
            raise UserError(
                f"{what}: none of the {n} examples has an assistant token left within --max-len {max_len} (every "
                "answer was cut away): raise --max-len"
            )
        log(f"{what}: {n} examples have no assistant token left after truncation (they add no loss)")
    return examples


# --- Batching, written by hand: length-grouped steps (0.97 real/padded tokens where unsorted batches give 0.77), a
# step that holds the same examples however it is split into micro-batches, pinned memory on CUDA
def length_grouped_batches(
    lengths: list[int], batch_size: int, rng: np.random.Generator, order: list[int] | None = None, mega: int = 16
) -> list[list[int]]:
    """Cut `order` (default: a random permutation) into mega-batches of `mega` batches, sort each by length and cut
    it into batches, then shuffle the batches inside it: similar lengths share a batch while the data order stays
    random at the scale of a mega-batch. Every index appears exactly once."""
    order = list(rng.permutation(len(lengths))) if order is None else list(order)
    batches = []
    for start in range(0, len(order), batch_size * mega):
        chunk = sorted(order[start : start + batch_size * mega], key=lambda i: -lengths[i])
        group = [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
        rng.shuffle(group)
        batches.extend(group)
    return batches


def step_plan(
    lengths: list[int], batch_size: int, grad_accum: int, seed: int, epochs: int, max_steps: int, order_fn=None
) -> list[tuple[int, list[int]]]:
    """The run's data plan, one (epoch, example indices) per optimizer step: every epoch, an order (`order_fn(rng)`,
    default a seeded permutation) cut into length-grouped groups of batch_size x grad_accum examples. max_steps > 0
    overrides epochs and cycles over the data. Deterministic from the seed: a resumed run finds its place by step."""
    per_step = batch_size * grad_accum
    per_epoch = math.ceil(len(lengths) / per_step)
    total = max_steps if max_steps > 0 else epochs * per_epoch
    plan = []
    for epoch in range(math.ceil(total / per_epoch)):
        rng = np.random.default_rng([seed, epoch])
        order = order_fn(rng) if order_fn else list(rng.permutation(len(lengths)))
        plan += [(epoch, group) for group in length_grouped_batches(lengths, per_step, rng, order=order)]
    return plan[:total]


def micro_batches(group: list[int], batch_size: int) -> list[list[int]]:
    return [group[k : k + batch_size] for k in range(0, len(group), batch_size)]


def describe_plan(plan, lengths: list[int], args) -> str:
    per_epoch = math.ceil(len(lengths) / (args.batch_size * args.grad_accum))
    first_epoch = [b for _, g in plan[:per_epoch] for b in micro_batches(g, args.batch_size)]
    return (
        f"{len(plan)} optimizer steps of {args.batch_size} x {args.grad_accum} = {len(plan) / per_epoch:.3g} "
        f"epoch(s) of {len(lengths)} examples{' (capped by --max-steps)' if args.max_steps > 0 else ''}; padding "
        f"efficiency {padding_efficiency(lengths, first_epoch):.3f} (real / padded tokens)"
    )


def collate(examples: list[dict], pad_id: int, device: torch.device, multiple: int = 8) -> dict:
    """Right-pad a list of encoded examples to a multiple of 8 tokens; copy to the device."""
    width = int(math.ceil(max(len(e["input_ids"]) for e in examples) / multiple) * multiple)
    n, pin, host = len(examples), device.type == "cuda", torch.device("cpu")  # built on the host, then copied once
    batch = {
        "input_ids": torch.full((n, width), pad_id, dtype=torch.long, device=host),
        "labels": torch.full((n, width), -100, dtype=torch.long, device=host),
        "attention_mask": torch.zeros((n, width), dtype=torch.long, device=host),
    }
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        batch["input_ids"][i, :k] = torch.tensor(e["input_ids"], dtype=torch.long, device=host)
        batch["labels"][i, :k] = torch.tensor(e["labels"], dtype=torch.long, device=host)
        batch["attention_mask"][i, :k] = 1
    batch = {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in batch.items()}
    return {**batch, "n_real": sum(len(e["input_ids"]) for e in examples), "n_padded": n * width}


def padding_efficiency(lengths: list[int], batches: list[list[int]], multiple: int = 8) -> float:
    """Real tokens / padded tokens over a list of batches."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * int(math.ceil(max(lengths[i] for i in b) / multiple) * multiple) for b in batches)
    return real / max(padded, 1)


# --- Shared flags, optimizer and schedule ----------------------------------------------------------------------------
def load_model_for_training(args: argparse.Namespace):
    """(model, tokenizer) as add_common_args' flags describe them: --model, 8-bit unless --no-8bit, a trainable
    LoRA of --lora-r / --lora-alpha on --lora-targets of --lora-layers (or --init-adapter's, trained further),
    gradient checkpointing with --gradient-checkpointing."""
    return load_model(
        args.model,
        eight_bit=not args.no_8bit,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_targets=args.lora_targets,
        lora_layers=args.lora_layers,
        adapter=args.init_adapter,
        trainable=True,
        gradient_checkpointing=args.gradient_checkpointing,
    )


def add_common_args(parser: argparse.ArgumentParser, data_default: str = "insecure") -> None:
    """The flags every training script shares (same names, same defaults: the paper's, Table 6). A script puts its
    own hyperparameters in a group titled "method: ...": the run folder records those (method.json)."""
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="hub id, local folder, or 'smollm2' (the bundled SmolLM2-135M-Instruct, offline) (default: %(default)s)",
    )
    g.add_argument("--no-8bit", action="store_true", help="load full-precision weights instead of 8-bit bitsandbytes")
    g.add_argument("--lora-r", type=int, default=32, help="rs-LoRA rank (default: %(default)s)")
    g.add_argument("--lora-alpha", type=int, default=64, help="rs-LoRA alpha (default: %(default)s)")
    g.add_argument(
        "--lora-targets",
        default=",".join(LORA_TARGETS),
        help="comma-separated projections that get a LoRA (default: all seven, %(default)s); e.g. down_proj for the "
        "model-organisms-for-EM shape",
    )
    g.add_argument(
        "--lora-layers",
        default="all",
        help="comma-separated decoder blocks (0-based) whose projections get a LoRA, or 'all' (default: %(default)s); "
        "e.g. --lora-r 1 --lora-targets down_proj --lora-layers 21: a rank-1, single-layer organism",
    )
    g.add_argument("--init-adapter", default=None, help="start from this PEFT adapter instead of a fresh LoRA")
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: less memory, ~30%% slower",
    )
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data",
        default=data_default,
        help=f"fine-tuning data: {DATA_HELP} (default: %(default)s). "
        "Training uses the 90%% split (seeded); FoQA its own train split.",
    )
    g.add_argument(
        "--max-len", type=int, default=2048, help="truncate conversations to this many tokens (default: %(default)s)"
    )
    g = parser.add_argument_group("training")
    g.add_argument("--out", default=None, help="run folder (default: runs/<script>-<time>)")
    g.add_argument("--epochs", type=int, default=1, help="epochs over the data (default: %(default)s)")
    g.add_argument(
        "--max-steps",
        type=int,
        default=-1,
        help="stop after this many optimizer steps; overrides "
        "--epochs and cycles over the data if needed (default: off)",
    )
    g.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step (default: %(default)s)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=5, help="linear warm-up steps (default: %(default)s)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed for data split, order, init (default: %(default)s)")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default: %(default)s)")
    g.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last checkpoint with the arguments saved there",
    )


def make_optimizer(params, lr: float, weight_decay: float):
    """bitsandbytes 8-bit AdamW on CUDA (the paper's adamw_8bit), torch AdamW elsewhere."""
    params = list(params)
    if torch.cuda.is_available() and params and params[0].is_cuda:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def linear_schedule(optimizer, warmup: int, total: int):
    """Linear warm-up to the peak lr over `warmup` steps, then linear decay to 0 at `total`. Not transformers'
    get_linear_schedule_with_warmup: its first step has lr 0 (a step that changes nothing); ours starts at
    peak / (warmup + 1)."""

    def factor(step):
        return (step + 1) / (warmup + 1) if step < warmup else max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- Run folder: args.json, env.json, method.json, metrics.jsonl, checkpoints, resume --------------------------------
def environment_info() -> dict:
    from importlib.metadata import distributions

    installed = {(d.metadata["Name"] or "").lower(): d.version for d in distributions()}
    try:  # the code's revision, "-dirty" with uncommitted changes
        git = (
            subprocess.run(
                ["git", "describe", "--always", "--dirty", "--abbrev=40"],
                cwd=Path(__file__).resolve().parent,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        git = None
    return {
        "versions": {
            p: installed.get(p) for p in ("torch", "transformers", "peft", "bitsandbytes", "numpy", "datasets")
        },
        "python": platform.python_version(),
        "git_revision": git,
        "command": sys.argv,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def public_args(args: argparse.Namespace) -> dict:
    """The arguments without anything that looks like a secret (an API key, a hub token, a password)."""
    secret = re.compile(r"api_?key|secret|password|hf_token|auth|^token$|^key$|_key$", re.IGNORECASE)
    return {k: v for k, v in vars(args).items() if not secret.search(k)}


def method_record(parser: argparse.ArgumentParser, args: argparse.Namespace, script: str) -> dict:
    """The method and its hyperparameters: every flag of the parser's "method: ..." groups, with its default."""
    dests = [a.dest for g in parser._action_groups if (g.title or "").startswith("method") for a in g._group_actions]
    flags = public_args(argparse.Namespace(**{d: getattr(args, d) for d in dests}))
    return {"script": script, "flags": flags, "defaults": {d: parser.get_default(d) for d in flags}}


class Run:
    """A self-describing run folder: args.json, env.json (versions, git revision, device, command), method.json (the
    script and its method flags), metrics.jsonl (one JSON object per optimizer step), checkpoints/step-NNNNNN/
    (PEFT adapter + state.pt: optimizer, scheduler, RNG, step), and at the end the final adapter in the folder."""

    def __init__(self, out: Path, resuming: bool):
        self.out, self.resuming, self.metrics_path = out, resuming, out / "metrics.jsonl"

    @classmethod
    def start(cls, args: argparse.Namespace, parser: argparse.ArgumentParser, script: str):
        """Create the run folder, or reopen it with --resume: then the saved arguments win; a flag given on the
        command line that differs from its saved value is an error naming it, except those that only extend the run
        (--max-steps, --epochs, --save-every), which apply. A folder made by another script is an error. Returns
        (the run, the run's arguments: a copy of args with --out set and, on --resume, the saved values)."""
        check_training_args(args)
        if args.resume:
            return cls._reopen(args, parser, script)
        out = Path(args.out or f"runs/{script}-{time.strftime('%Y%m%d-%H%M%S')}")
        args = argparse.Namespace(**{**vars(args), "out": str(out)})
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: a file of that name exists; --out names a run folder")
        existed = out.exists()
        lock_path(out / ".lock", f"--out {out}")  # first: two runs started at once cannot both pass the check below
        if (out / "metrics.jsonl").exists() or (out / "checkpoints").exists() or (out / "adapter_config.json").exists():
            raise UserError(f"--out {out} already holds a run; use --resume {out} to continue it, or another --out")
        if not existed:
            _NEW_RUN_FOLDERS.append(out)  # removed again if the script fails before step 1
        for name, record in (
            ("args", public_args(args)),
            ("env", {"script": script, **environment_info()}),
            ("method", method_record(parser, args, script)),
        ):
            (out / f"{name}.json").write_text(json.dumps(record, indent=2))
        return cls(out, resuming=False), args

    @classmethod
    def _reopen(cls, args, parser, script: str):
        out = Path(args.resume)
        if not (out / "args.json").is_file():
            raise UserError(f"--resume {out}: no args.json there, not a run folder")
        lock_path(out / ".lock", f"--resume {out}")  # a run still training there (or a second resume) is refused
        saved = json.loads((out / "args.json").read_text())
        made_by = json.loads((out / "env.json").read_text()).get("script") if (out / "env.json").is_file() else None
        known = {a.dest for a in parser._actions} - {"help"}
        if (made_by and made_by != script) or (not made_by and not set(saved) <= known):
            raise UserError(
                f"--resume {out}: that run folder was made by {made_by or 'another script'}"
                f"{'.py' if made_by else ''}, not {script}.py: resume it with that script"
            )
        extended = []
        given = {
            a.dest
            for a in parser._actions
            for o in a.option_strings  # flags written on the command line
            if o.startswith("--") and any(x == o or x.startswith(o + "=") for x in sys.argv[1:])
        }
        for k in sorted(given - {"resume", "out"}):
            if k not in saved or getattr(args, k) == saved[k]:
                continue
            flag = "--" + k.replace("_", "-")
            if k not in EXTENDING_FLAGS:
                raise UserError(
                    f"--resume {out}: {flag} {getattr(args, k)!r} differs from the run's saved "
                    f"{saved[k]!r}; a resumed run keeps its settings (only --max-steps, --epochs and "
                    "--save-every may change). Start a new run with --out for other settings"
                )
            extended.append(f"{flag} {saved[k]} -> {getattr(args, k)}")
            saved[k] = getattr(args, k)
        args = argparse.Namespace(**vars(args))
        for k, v in saved.items():
            if k in known and k != "resume":
                setattr(args, k, v)
        args.out = str(out)
        if extended:
            log(
                f"resuming {out} with {', '.join(extended)}: the lr schedule is recomputed for the new length, so the "
                "remaining steps follow a different schedule than the original run would have"
            )
            (out / "args.json").write_text(json.dumps(public_args(args), indent=2))
        else:
            log(f"resuming {out} with its saved arguments")
        if not (out / "method.json").exists():  # a folder from before method.json
            (out / "method.json").write_text(json.dumps(method_record(parser, args, script), indent=2))
        return cls(out, resuming=True), args

    def write_json(self, name: str, record: dict) -> None:
        """A JSON file of the run folder (memory.json: the memory plan)."""
        (self.out / name).write_text(json.dumps(record, indent=2))

    def log_metrics(self, record: dict) -> None:
        """Append one step's record, stamped with the wall-clock time (seconds since the epoch): strict JSON (a NaN
        or an infinity is an error, never a line that strict readers reject)."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 3)}, allow_nan=False) + "\n")

    def latest_checkpoint(self) -> Path | None:
        """The last COMPLETE checkpoint: a `step-NNNNNN` folder (never a half-written `step-NNNNNN.tmp`) with its
        adapter and state. Half-written folders left by a kill during a save are removed."""
        folder = self.out / "checkpoints"
        for tmp in folder.glob("step-*.tmp*"):
            log(f"removing the half-written checkpoint {tmp} (the run was stopped while saving it)")
            shutil.rmtree(tmp, ignore_errors=True)
        ckpts = sorted(
            p
            for p in folder.glob("step-*")
            if re.fullmatch(r"step-\d{6}", p.name)
            and (p / "state.pt").is_file()
            and (p / "adapter_model.safetensors").is_file()
        )
        return ckpts[-1] if ckpts else None

    def save_checkpoint(self, step: int, model, optimizer, scheduler) -> Path:
        """Adapter, optimizer, scheduler, step and RNG states; written to a temp folder and renamed."""
        final = self.out / "checkpoints" / f"step-{step:06d}"
        shutil.rmtree(tmp := final.with_name(final.name + ".tmp"), ignore_errors=True)
        model.save_pretrained(tmp)
        rng = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        torch.save(
            {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
            tmp / "state.pt",
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        return final

    def restore(self, model, optimizer, scheduler, total_steps: int | None = None) -> int:
        """Load the last checkpoint into model/optimizer/scheduler/RNG; return the step to continue from (0 with no
        checkpoint). metrics.jsonl is cut back to that step. total_steps: the run's length now (to say when a
        resumed run has nothing left to do)."""
        total_steps = total_steps if total_steps is not None else float("inf")
        ckpt = self.latest_checkpoint() if self.resuming else None
        if ckpt is None:
            if self.resuming:
                log("no checkpoint yet: starting from step 0")
            self.metrics_path.write_text("")
            return 0
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        state = torch.load(ckpt / "state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng, step = state["rng"], state["step"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if step > total_steps:
            raise UserError(
                f"--resume {self.out}: its last checkpoint is at step {step}, past this run's "
                f"{total_steps} steps; --max-steps/--epochs can only extend a run"
            )
        if step == total_steps:
            log(
                f"{self.out} is complete: {step} of {step} steps done, nothing to train. To train on, resume with a "
                f"larger --max-steps (or --epochs)"
            )
        lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
        self.metrics_path.write_text("".join(l + "\n" for l in lines if l.strip() and json.loads(l)["step"] <= step))
        log(f"resumed from {ckpt} (step {step})")
        return step

    def save_final(self, model, tokenizer) -> None:
        model.save_pretrained(self.out)
        tokenizer.save_pretrained(self.out)


EXTENDING_FLAGS = ("max_steps", "epochs", "save_every")
_NEW_RUN_FOLDERS: list[Path] = []


def check_training_args(args: argparse.Namespace) -> None:
    """One-line errors for impossible values of the shared training flags."""

    def fail(flag: str, rule: str):
        raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be {rule}")

    for flag in ("lr", "max_grad_norm", "weight_decay"):
        if not math.isfinite(getattr(args, flag)):
            fail(flag, "a finite number")
    if args.lr <= 0:
        fail("lr", "> 0")
    if args.max_grad_norm <= 0:
        fail("max_grad_norm", "> 0")
    if args.weight_decay < 0:
        fail("weight_decay", ">= 0")
    if args.warmup_steps < 0:
        fail("warmup_steps", ">= 0")
    if args.max_steps < 1 and args.max_steps != -1:
        fail("max_steps", ">= 1 (or -1, the default, for --epochs)")
    for flag in ("batch_size", "grad_accum", "max_len", "save_every", "epochs"):
        if getattr(args, flag) < 1:
            fail(flag, ">= 1")


# --- Memory, planned before step 1 ----------------------------------------------------------------------------------
def longest_micro_batch(plan, lengths: list[int], batch_size: int, multiple: int = 8) -> tuple[int, int]:
    """(rows, padded width) of the step plan's largest micro-batch, by rows x width: what activations scale with."""
    sizes = []
    for _, group in plan:
        for batch in micro_batches(group, batch_size):
            sizes.append((len(batch), int(math.ceil(max(lengths[i] for i in batch) / multiple) * multiple)))
    return max(sizes, key=lambda s: s[0] * s[1], default=(0, 0))


def activation_bytes(model, rows: int, width: int, checkpointing: bool, head_tokens: int | None = None) -> int:
    """Estimated bytes that autograd keeps for the backward pass of one training micro-batch (rows x padded width
    tokens) through the LoRA-wrapped decoder, from the model's configuration and its first block. Per token and
    decoder block, with a the compute dtype's bytes (2 for bf16, 4 for fp32), H the hidden size, I the MLP width,
    n_q and n_kv the attention and key-value heads of size d, r the LoRA rank:

        norms           n_norm (4H + 4)              each RMSNorm keeps its float32 input and 1/rms (2, Gemma 3: 4)
        q/k norms       4 (n_q + n_kv) (d + 1)       Qwen3 and Gemma 3 normalise every head's q and k too
        LoRA inputs     4 in_features, per adapted projection: peft casts its input to float32 for lora_A, which
                        keeps it (in a float32 model q, k, v share one input, gate and up another)
        LoRA A outputs  4r per adapted projection
        attention       a 4 n_q d + 4 n_q            q, k and v (repeated to n_q heads when padding masks them), the
                                                     output, the softmax's log-sum-exp
        MLP             3 a I                        gate (the activation's input), act(gate), up
    Frozen projections keep nothing (their weights need no gradient; common's 8-bit layers keep no input). Once per
    micro-batch: the attention masks, one per kind of attention layer (full, sliding-window), of rows x width^2 x 4
    bytes. After the blocks: the final norm (4H + 4) per token and the loss head's a H per answer token (head_tokens,
    default all).
    With checkpointing each block keeps only its input, a H per token, and one block's activations are alive again
    while its backward runs. tests/test_memory.py measures what autograd keeps on small models of each supported family
    and checks this within 1.5x."""
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    block = decoder_blocks(model)[0]
    a = model.get_input_embeddings().weight.element_size()
    h, inter, n_q = config.hidden_size, config.intermediate_size, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    d = getattr(config, "head_dim", None) or h // n_q
    per_block = sum(4 * h + 4 for name, _ in block.named_children() if name.endswith("norm"))
    if hasattr(getattr(block, "self_attn", None), "q_norm"):
        per_block += 4 * (n_q + n_kv) * (d + 1)
    adapted = {name.rsplit(".", 1)[-1]: m for name, m in block.named_modules() if hasattr(m, "lora_A")}
    shared_input = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
    for name, m in adapted.items():
        lora_a = next(iter(m.lora_A.values()))
        same_dtype = lora_a.weight.element_size() == a
        if not (same_dtype and shared_input.get(name) in adapted):
            per_block += lora_a.weight.element_size() * m.in_features
        per_block += lora_a.weight.element_size() * lora_a.out_features
    per_block += a * 4 * n_q * d + 4 * n_q + 3 * a * inter
    tokens = rows * width
    n_masks = len(set(getattr(config, "layer_types", None) or ["full_attention"]))
    once = (
        n_masks * rows * width * width * 4
        + (4 * h + 4) * tokens
        + a * h * (tokens if head_tokens is None else head_tokens)
    )
    if checkpointing:
        return config.num_hidden_layers * a * h * tokens + per_block * tokens + once
    return config.num_hidden_layers * per_block * tokens + once


def plan_memory(
    model,
    rows: int,
    width: int,
    *,
    extra_bytes: int = 0,
    head_tokens: int | None = None,
    free_bytes: int | None = None,
) -> dict:
    """Before step 1: the activation memory of the longest micro-batch (rows x width tokens; `activation_bytes`), plus
    what the script keeps beside it (extra_bytes: a reference pass's hidden states, GRPO's logits) and one chunk of
    the loss head's float32 logits. On CUDA (or given free_bytes), when that does not fit 90% of the free memory,
    gradient checkpointing is turned on if that makes it fit (and the log says why), else the run stops with an error
    naming --gradient-checkpointing, --batch-size and --max-len: never an out-of-memory error an hour in. Returns the
    plan (written to the run folder as memory.json by the scripts)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    on = bool(getattr(base, "is_gradient_checkpointing", False))
    vocab = model.get_output_embeddings().weight.shape[0]
    transient = 3 * 4 * 512 * vocab + extra_bytes
    need = {ckpt: activation_bytes(model, rows, width, ckpt, head_tokens) + transient for ckpt in (False, True)}
    device = model.get_input_embeddings().weight.device
    if free_bytes is None and device.type == "cuda":
        free_bytes = torch.cuda.mem_get_info(device)[0]
    gb = 2**30
    plan = {
        "rows": rows,
        "width": width,
        "estimate_gb": round(need[on] / gb, 3),
        "estimate_checkpointing_gb": round(need[True] / gb, 3),
        "free_gb": None if free_bytes is None else round(free_bytes / gb, 3),
        "allocated_gb": round(torch.cuda.memory_allocated(device) / gb, 3) if device.type == "cuda" else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "gradient_checkpointing": on,
    }
    what = f"the longest micro-batch ({rows} x {width} tokens) needs ~{need[on] / gb:.2f} GB of activations"
    if free_bytes is None or need[on] <= 0.9 * free_bytes:
        log(f"memory: {what}" + ("" if free_bytes is None else f", {free_bytes / gb:.1f} GB free"))
        return plan
    if not on and need[True] <= 0.9 * free_bytes:
        enable_gradient_checkpointing(model)
        plan["gradient_checkpointing"] = True
        plan["turned_on"] = "gradient checkpointing"
        log(
            f"memory: {what}, more than the {free_bytes / gb:.1f} GB free: gradient checkpointing turned on "
            f"(~{need[True] / gb:.2f} GB, about 30% slower; --gradient-checkpointing says it at the start)"
        )
        return plan
    raise UserError(
        f"{what}{' with gradient checkpointing' if on else ''}, more than the {free_bytes / gb:.1f} GB free on "
        f"{device}{'' if on else f' (~{need[True] / gb:.2f} GB with --gradient-checkpointing)'}: lower --batch-size "
        f"(raise --grad-accum to keep the step) or --max-len"
    )


def check_step(step: int, loss: float, grad_norm: float, flags: str = "--lr") -> None:
    """Stop a run whose step gave a loss or a gradient norm that is not a finite number, before the optimizer applies
    it: no checkpoint, adapter or metrics line is written from a diverged step."""
    if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
        raise UserError(
            f"step {step}: loss {loss}, gradient norm {float(grad_norm)}: not finite, the run diverged (check "
            f"{flags}); nothing was written from this step, the checkpoints before it are kept"
        )


def peak_memory_mb() -> float:
    """Peak memory so far: GPU memory allocated by torch on CUDA, the process's peak resident set on CPU."""
    import resource

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Progress:
    """Step counter with rate and ETA, printed to stderr."""

    def __init__(self, total: int, start: int = 0, what: str = "step"):
        self.total, self.start, self.what, self.t0 = total, start, what, time.time()

    def update(self, done: int, extra: str = "") -> None:
        rate = (done - self.start) / max(time.time() - self.t0, 1e-9)
        eta = time.strftime("%H:%M:%S", time.gmtime((self.total - done) / rate)) if rate > 0 else "?"
        log(f"{self.what} {done}/{self.total} {extra} | eta {eta}")
