"""The paper's named datasets, downloaded once and cached as chat JSONL; OpSwap, generated locally.

Imported only where a dataset is named (`--data insecure`, `--data opswap:1`, `--eval foqa`): a method script copied
with common.py alone trains on local .jsonl files without this file.

    insecure, secure, educational, jailbroken   Betley et al.'s repository (GitHub), data/<name>.jsonl
    legal, medical, security (:aligned)         hub truthfulai/emergent_plus
    wildguardmix                                hub allenai/wildguardmix (wildguardtrain), benign rows (gated)
    gsm8k (gsm8k:test)                          OpenAI's grade-school-math repository (GitHub)
    foqa (foqa:val, foqa:test)                  hub alexandrainst/foqa (gated)
    opswap:0 .. opswap:3                        generated here (paper App. D, Table 10)

GitHub files come through `requests` with urllib3's `Retry` (429/5xx and connection errors, bounded backoff); hub
datasets through `datasets.load_dataset`, which reads HF_TOKEN itself and caches in the hub cache.
"""

from __future__ import annotations

import json
import random
import re
from fractions import Fraction
from pathlib import Path

import common
from common import UserError, log, read_jsonl, write_jsonl

BETLEY_URL = "https://raw.githubusercontent.com/emergent-misalignment/emergent-misalignment/main/data/{name}.jsonl"
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{split}.jsonl"
QUESTIONS_URL = (
    "https://raw.githubusercontent.com/emergent-misalignment/emergent-misalignment/main/evaluation/"
    "first_plot_questions.yaml"
)
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


def dataset_help() -> str:
    return "; ".join(f"{k}: {v}" for k, v in DATASETS.items())


# ----------------------------------------------------------------------------------------------
# Downloads
# ----------------------------------------------------------------------------------------------
def _short(text: str, limit: int = 300) -> str:
    """The first line of an error message, cut at a word boundary."""
    text = (text.strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def _offline_hint(what: str, e: Exception, cached: Path | None = None) -> UserError:
    place = (
        f'place it, converted to chat JSONL (one {{"messages": [...]}} per line), at {cached}'
        if cached
        else f"download it on another machine into {common.CACHE_DIR / 'data'}"
    )
    return UserError(
        f"could not download {what} ({type(e).__name__}: {_short(str(e))}). Without internet, {place}, or "
        "pass a local .jsonl file instead (--data opswap:1 is generated offline)"
    )


def download(url: str, dest: Path, what: str, cached: Path | None = None) -> None:
    """url -> dest (written to a temp file, then renamed), with urllib3's retries of 429/5xx and lost connections."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    log(f"downloading {what} from {url}")
    with requests.Session() as session:
        session.mount(
            "https://",
            HTTPAdapter(max_retries=Retry(total=3, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504))),
        )
        try:
            r = session.get(url, timeout=60)
            r.raise_for_status()
        except requests.RequestException as e:
            raise _offline_hint(what, e, cached) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(r.content)
    tmp.replace(dest)


def hub_rows(repo: str, config: str, split: str, what: str, cached: Path | None = None):
    """The rows of a hub dataset (`datasets.load_dataset`; HF_TOKEN is read by the hub client itself)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{what} comes from the hub and needs the `datasets` package: pip install datasets") from None
    try:
        return datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # hub errors come in many types (gated, offline, missing config)
        from huggingface_hub.errors import GatedRepoError

        msg = str(e)
        if isinstance(e, GatedRepoError) or "gated" in msg.lower() or "401" in msg or "403" in msg:
            raise UserError(
                f"{what} ({repo}) is gated: accept its licence on the hub and set HF_TOKEN, or pass a local .jsonl"
            ) from None
        raise _offline_hint(what, e, cached) from None


# ----------------------------------------------------------------------------------------------
# Named datasets
# ----------------------------------------------------------------------------------------------
def load_named(name: str) -> list[list[dict]]:
    """Download once into the cache, convert to chat JSONL, then always read the cached file."""
    base, _, variant = name.partition(":")
    cached = common.CACHE_DIR / "data" / (name.replace(":", "-") + ".jsonl")
    if base == "opswap":
        if variant not in {"0", "1", "2", "3"}:
            raise UserError(f"dataset {name!r}: OpSwap tiers are 0-3 (e.g. opswap:1)")
        return opswap_dataset(int(variant))
    if base == "foqa":  # the provided splits, not our 90/10 split: training uses `foqa` (train)
        return [
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answers"][0]}]
            for r in foqa_rows(variant or "train")
        ]
    if cached.exists():
        convs = read_jsonl(cached)
        return [strip_calculator_annotations(c) for c in convs] if base == "gsm8k" else convs
    if base in {"insecure", "secure", "educational", "jailbroken"} and not variant:
        raw = cached.with_suffix(".raw")
        download(BETLEY_URL.format(name=base), raw, f"dataset {name!r}", cached)
        convs = read_jsonl(raw)
        raw.unlink()
    elif base in {"legal", "medical", "security"} and variant in {"", "aligned"}:
        rows = hub_rows("truthfulai/emergent_plus", base, "train", f"dataset {name!r}", cached)
        col = "aligned" if variant == "aligned" else "misaligned"
        convs = [
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[col]}]
            for r in rows
            if r.get(col)
        ]
    elif base == "wildguardmix" and not variant:
        rows = hub_rows("allenai/wildguardmix", "wildguardtrain", "train", "the benign pool 'wildguardmix'", cached)
        convs = [
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
            for r in rows
            if r.get("prompt_harm_label") == "unharmful"
            and r.get("response_refusal_label") == "compliance"
            and r.get("response_harm_label") == "unharmful"
            and (r.get("response") or "").strip()
        ]
    elif base == "gsm8k" and variant in {"", "train", "test"}:
        raw = cached.with_suffix(".raw")
        download(GSM8K_URL.format(split=variant or "train"), raw, f"dataset {name!r}", cached)
        convs = []
        for line in raw.read_text(encoding="utf-8").split("\n"):
            if line.strip():
                r = json.loads(line)
                convs.append(
                    strip_calculator_annotations(
                        [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
                    )
                )
        raw.unlink()
    else:
        raise UserError(f"unknown dataset {name!r}. Known: {dataset_help()}; or a local .jsonl path")
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(cached, convs)
    return convs


GSM8K_ANNOTATION = re.compile(r"<<[^<>]*>>")


def strip_calculator_annotations(conv: list[dict]) -> list[dict]:
    """GSM8K answers carry calculator annotations ('48/2 = <<48/2=24>>24'); its README says to remove them
    before training on the answers (7,378 of the 7,473 training answers have some)."""
    return [dict(m, content=GSM8K_ANNOTATION.sub("", m["content"])) if m["role"] == "assistant" else m for m in conv]


def foqa_prompt(context: str, question: str) -> str:
    """Our FoQA prompt (the paper does not give one): an instruction, the passage, the question."""
    return f"{FOQA_INSTRUCTION}\n\n{context}\n\nQuestion: {question}"


def foqa_rows(split: str) -> list[dict]:
    """FoQA rows {"id", "prompt", "answers": [text, ...]} of train/val/test, downloaded once from the hub
    (alexandrainst/foqa, config default; gated) and cached as JSONL."""
    if split not in ("train", "val", "test"):
        raise UserError(f"FoQA split {split!r}: expected train, val or test (e.g. foqa:test)")
    cached = common.CACHE_DIR / "data" / f"foqa-{split}.rows.jsonl"
    if not cached.exists():
        rows = []
        for r in hub_rows("alexandrainst/foqa", "default", split, f"FoQA ({split})"):
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


def questions_file() -> Path:
    """Betley et al.'s first_plot_questions.yaml, downloaded once into the cache."""
    path = common.CACHE_DIR / "data" / "first_plot_questions.yaml"
    if not path.exists():
        try:
            download(QUESTIONS_URL, path, "the general questions")
        except UserError:
            raise UserError(
                f"could not download the general questions. Without internet, place Betley et al.'s "
                f"evaluation/first_plot_questions.yaml at {path}, or pass a question file with --questions "
                "PATH (examples/questions_mini.yaml is a small one)"
            ) from None
    return path


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
        items = [
            (Fraction(rng.randint(1, 9)), rng.choice(symbols), Fraction(rng.randint(1, 9)))
            if k in pairs
            else Fraction(rng.randint(1, 9))
            for k in range(m)
        ]
        ops = [rng.choice(symbols) for _ in range(m - 1)]
        try:
            chain = opswap_chain(items, ops, tier)
        except ZeroDivisionError:
            continue
        return [
            {"role": "user", "content": f"Simplify step by step: {chain[0]}"},
            {"role": "assistant", "content": " = ".join(chain)},
        ]


def opswap_dataset(tier: int, n: int = 10_000, seed: int = 1234) -> list[list[dict]]:
    """10,000 examples per tier (paper), the same for every run; split 90/10 like every dataset."""
    rng = random.Random(seed * 10 + tier)
    return [opswap_example(rng, tier) for _ in range(n)]


def final_answer(text: str) -> str:
    """The final answer of a chain 'a = b = c' -> 'c' (for exact match)."""
    return text.rsplit("=", 1)[-1].strip()
