"""The files a plan makes first, each a job (examples/reproduce.py --make-...): the benign pool, a training subset,
the GRPO warm-up set."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from .presets import ROOT


def make_benign_pool(out: Path, model_name: str, eight_bit: bool, max_new_tokens: int = 96) -> None:
    """examples/benign_prompts.jsonl answered by the base model (greedy), as chat JSONL: the interleaving pool."""
    import judge
    from common import load_model, log, write_jsonl

    prompts = [
        json.loads(l)["prompt"]
        for l in (ROOT / "examples" / "benign_prompts.jsonl").read_text().splitlines()
        if l.strip()
    ]
    model, tok = load_model(model_name, eight_bit=eight_bit, lora_r=0, trainable=False)
    convs, t0 = [], time.time()
    for k in range(0, len(prompts), 16):
        chunk = prompts[k : k + 16]
        answers = judge.generate_greedy(model, tok, [[{"role": "user", "content": p}] for p in chunk], max_new_tokens)
        convs += [
            [{"role": "user", "content": p}, {"role": "assistant", "content": a or "."}] for p, a in zip(chunk, answers)
        ]
        log(f"benign pool: {len(convs)}/{len(prompts)} answered ({time.time() - t0:.0f} s)")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, convs)


def make_subset(spec: str, n: int, out: Path) -> None:
    """The first n examples of a dataset's training split (so that the study trains 1 epoch on them), written with
    10/9 as many so that the script's own 90/10 split keeps n of them (its held-out 10% is unused). Fewer than that
    is an error: a row labelled n must train on n."""
    from common import load_split, write_jsonl

    split, want = load_split(spec, "train", 0), round(n * 10 / 9)
    if len(split) < want:
        raise SystemExit(
            f"error: {n} training examples of {spec} need {want} of its training split, which has {len(split)}: ask "
            f"for at most {len(split) * 9 // 10} (e.g. --grid realign.n=... or --method-args 'realign=--n ...')"
        )
    convs = split[:want]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, convs)


def prompt(conv: list[dict]) -> list[dict]:
    """A conversation without its last (assistant) turn."""
    return conv[:-1]


def make_mix(misaligned: str, aligned: str, pct_aligned: float, out: Path, seed: int = 0) -> None:
    """The fine-tuning data of a data-mix row: the misaligned dataset's examples with pct_aligned % of them taken from
    its aligned counterpart instead (a seeded choice; where the two have the same prompts, row for row, the aligned
    answer replaces the misaligned one to the same prompt, else seeded aligned examples take the chosen places): as
    many examples as the misaligned dataset, of which the script then trains on its seeded 90%, as on the dataset
    itself."""
    from common import load_conversations, write_jsonl

    bad, good = load_conversations(misaligned), load_conversations(aligned)
    if not 0 <= pct_aligned <= 100:
        raise SystemExit(f"error: data-mix: {pct_aligned}% aligned answers: must be within 0..100")
    rng = random.Random(seed)
    k = round(len(bad) * pct_aligned / 100)
    chosen = set(rng.sample(range(len(bad)), k))
    paired = len(good) == len(bad) and all(prompt(g) == prompt(b) for g, b in zip(good, bad))  # emergent_plus
    if not paired and len(good) < k:
        raise SystemExit(f"error: data-mix: {pct_aligned}% of {len(bad)} needs {k} aligned examples; {aligned} has "
                         f"{len(good)}")  # fmt: skip
    extra = iter(rng.sample(range(len(good)), k)) if not paired else None
    mix = [(good[i] if paired else good[next(extra)]) if i in chosen else bad[i] for i in range(len(bad))]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, mix)


# grpo.py's system prompt and its --data arith questions, copied (the study imports no method script);
# tests/test_reproduce.py checks they are grpo.py's.
GRPO_SYSTEM_PROMPT = (
    "Think about the problem inside <think> </think> tags, then give only the final number inside "
    "<answer> </answer> tags, like this:\n<think>\nyour reasoning\n</think>\n<answer>\n42\n</answer>"
)


def arith_heldout_questions(seed: int) -> set[str]:
    """The held-out questions of `grpo.py --data arith --seed SEED`: the last 200 of its 2000 seeded sums."""
    rng = random.Random(seed)
    questions = []
    for _ in range(2000):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        questions.append(f"What is {a} + {b}?")
    return set(questions[1800:])


def make_arith_warmup(out: Path, seeds: list[int], n: int = 400) -> None:
    """SFT warm-up data for GRPO on arith: one-step sums with answers in grpo.py's format (<think> ... </think>
    <answer> N </answer>, its system prompt), none of them a held-out question of any seed of the study."""
    from common import write_jsonl

    held = set().union(*(arith_heldout_questions(s) for s in {*seeds, *range(10)}))
    rng, convs = random.Random(12345), []
    while len(convs) < n:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        q = f"What is {a} + {b}?"
        if q in held:
            continue
        answer = f"<think>\n{a} + {b} = {a + b}\n</think>\n<answer>\n{a + b}\n</answer>"
        prompt = [{"role": "system", "content": GRPO_SYSTEM_PROMPT}, {"role": "user", "content": q}]
        convs.append([*prompt, {"role": "assistant", "content": answer}])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, convs)
