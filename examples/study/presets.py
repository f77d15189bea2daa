"""The paper's study as data: its datasets, methods and their labels and scripts, the presets, the paper's own
numbers, and the depth of the models the presets name."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

EM_DATASETS = {
    "insecure": "secure",
    "medical": "medical:aligned",
    "legal": "legal:aligned",
    "security": "security:aligned",
}  # misaligned data -> its aligned counterpart
METHODS = [
    "baseline",
    "misaligned",
    "aligned",
    "kl",
    "ldifs",
    "persona",
    "inoculate",
    "interleave",
    "interleave+",
    "interleave++",
    "on-policy",
    "caft",
    "realign",
    "data-mix",
]
LABELS = {
    "baseline": "Baseline (no training)",
    "misaligned": "Misaligned (SFT)",
    "aligned": "Aligned (SFT)",
    "kl": "KL",
    "ldifs": "LDIFS",
    "persona": "Persona Vectors",
    "inoculate": "Inoc. Prompting",
    "interleave": "Interleaving",
    "interleave+": "Interleaving+",
    "interleave++": "Interleaving++",
    "on-policy": "On-policy Interleaving",
    "caft": "CAFT (beyond the paper)",
    "realign": "Re-alignment: Misaligned + N benign (beyond the paper)",
    "data-mix": "Data mix: % aligned answers (beyond the paper)",
}
SCRIPTS = {
    "misaligned": "interleave.py",
    "aligned": "interleave.py",
    "kl": "kl.py",
    "ldifs": "ldifs.py",
    "persona": "persona.py",
    "inoculate": "inoculate.py",
    "interleave": "interleave.py",
    "interleave+": "interleave.py",
    "interleave++": "interleave.py",
    "on-policy": "interleave.py",
    "caft": "caft.py",
    "realign": "interleave.py",
    "data-mix": "interleave.py",
}
# Beyond the paper's rows, each a plain SFT run whose value is its data, not a script flag (its --grid key):
# realign: the Misaligned adapter trained on on N benign examples ("a few hundred benign samples restore alignment");
# data-mix: the fine-tuning data with this % of its answers from the aligned counterpart ("how much of your data can
# suck"), EM datasets only (they have an aligned counterpart).
DATA_ROWS = {"realign": ("--n", "300"), "data-mix": ("--correct", "50")}
INTERLEAVING = ("interleave", "interleave+", "interleave++", "on-policy")
TABLE_DATASETS = {
    "2": ["insecure", "medical", "legal", "security"],
    "3": ["opswap:0", "opswap:1", "opswap:2", "opswap:3"],
    "4": ["foqa"],
}
# The paper's own numbers (Kaczér et al. 2025), printed beside ours.
PAPER_TABLE3 = {
    "baseline": [40.82, 0.00, 1.00, 0.00],
    "misaligned": [37.00, 30.00, 34.30, 37.68],
    "kl": [48.20, 0.00, 1.00, 0.00],
    "ldifs": [36.00, 29.40, 34.90, 37.69],
    "persona": [36.80, 34.88, 31.80, 39.23],
    "interleave": [35.90, 28.52, 35.10, 38.17],
    "interleave+": [35.50, 36.72, 32.50, 37.36],
    "interleave++": [37.10, 36.14, 32.50, 38.45],
    "inoculate": [35.90, 34.60, 33.90, 38.40],
}
PAPER_TABLE4 = {
    "baseline": 0.00,
    "misaligned": 41.60,
    "kl": 44.55,
    "ldifs": 39.45,
    "persona": 48.80,
    "interleave": 40.90,
    "interleave+": 42.45,
    "interleave++": 40.30,
    "inoculate": 43.00,
}
# Table 5 / 9: GRPO rows (name, label, grpo.py flags, the paper's held-out accuracy, mean of 3 seeds).
GRPO_ROWS = [
    ("grpo", "GRPO", [], 90.66),
    ("grpo-persona1", "+ Persona Vectors (alpha 1)", ["--persona-alpha", "1"], 66.00),
    ("grpo-persona5", "+ Persona Vectors (alpha 5)", ["--persona-alpha", "5"], 38.33),
    ("grpo-kl0.1", "+ KL (beta 0.1)", ["--kl-beta", "0.1"], 87.66),
    ("grpo-interleave5", "+ Interleaving (5%)", ["--interleave-pct", "5"], 91.30),
    ("grpo-interleave20", "+ Interleaving (20%)", ["--interleave-pct", "20"], 93.66),
    ("grpo-inoculate", "+ Inoculation Prompt", ["--inoculate"], 91.00),
]
PAPER_NO_FINETUNING = 66.33
# Tables 12-18: the hyperparameter values of the paper's ablation grids (the main value is the method's own run).
PAPER_GRID = (
    "kl.lam=0.01,0.03,0.3,1.0;ldifs.lam=0.01,0.03,0.1,0.3;persona.alpha=1,1.5,2,3;"
    "interleave.pct=1,20,50;interleave+.pct=1,20,50;interleave++.pct=1,20,50;on-policy.pct=1,20,50"
)
# Decoder blocks of the models the presets name: a dry run needs no network and no model to print its plan.
# Decoder blocks of the families researchers use, for when the model's configuration is not on this machine: by the
# hub id's name without its organisation, "-Instruct"/"-it" and a release date (their configs' num_hidden_layers).
KNOWN_DEPTHS = {
    "smollm2": 30,
    "Qwen2.5-0.5B": 24,
    "Qwen2.5-1.5B": 28,
    "Qwen2.5-3B": 36,
    "Qwen2.5-7B": 28,
    "Qwen2.5-14B": 48,
    "Qwen2.5-32B": 64,
    "Qwen2.5-72B": 80,
    "Qwen2.5-Coder-7B": 28,
    "Qwen2.5-Coder-32B": 64,
    "Qwen3-0.6B": 28,
    "Qwen3-1.7B": 28,
    "Qwen3-4B": 36,
    "Qwen3-8B": 36,
    "Qwen3-14B": 40,
    "Qwen3-32B": 64,
    "Llama-3.2-1B": 16,
    "Llama-3.2-3B": 28,
    "Llama-3.1-8B": 32,
    "Meta-Llama-3-8B": 32,
    "Meta-Llama-3.1-8B": 32,
    "Llama-3.1-70B": 80,
    "Llama-3.3-70B": 80,
    "gemma-3-1b": 26,
    "gemma-3-4b": 34,
    "gemma-3-12b": 48,
    "gemma-3-27b": 62,
    "Mistral-7B-v0.1": 32,
    "Mistral-7B-v0.2": 32,
    "Mistral-7B-v0.3": 32,
    "Mistral-Nemo": 40,
    "Mistral-Small-24B": 40,
}
PRESETS = {
    # The paper: Qwen2.5-7B-Instruct on Tables 2-4, Qwen2.5-3B-Instruct GRPO on GSM8K for Table 5 (3 seeds).
    "paper": dict(
        model="Qwen/Qwen2.5-7B-Instruct",
        tables="2,3,4,5",
        methods="baseline,misaligned,aligned,kl,ldifs,persona,inoculate,interleave,interleave+,interleave++,on-policy,"
        "realign,data-mix",
        samples=100,
        judge="gpt-4o-mini",
        safe_data="wildguardmix",
        train_args="",
        method_args="",
        eval_args="",
        persona_args="",
        train_n=0,
        caft_k=5,
        grpo_model="Qwen/Qwen2.5-3B-Instruct",
        grpo_data="gsm8k",
        grpo_seeds="0,1,2",
        grpo_args="",
        warmup_args="",
    ),
    # SmolLM2 on OpSwap tiers 0-3 (Table 3: 9 rows + on-policy + CAFT) and GRPO on one-step sums (Table 5) on this
    # 2-core CPU. Departures from the paper are written under each table (write_outputs).
    "cpu": dict(
        model="smollm2",
        tables="3,5",
        methods="baseline,misaligned,kl,ldifs,persona,interleave,interleave+,interleave++,inoculate,on-policy,caft",
        samples=1,
        judge="gpt-4o-mini",
        safe_data="benign",
        train_n=240,
        caft_k=2,
        train_args="--no-8bit --epochs 1 --batch-size 4 --grad-accum 1 --lr 5e-4 --save-every 20",
        method_args="kl=--lam 0.3;persona=--alpha 2;realign=--n 200",  # the benign pool: 305 (274 to train on)
        eval_args="--no-8bit --n-questions 100 --samples 1 --temperature 0 --max-new-tokens 48 --gen-batch-size 64",
        persona_args="--no-8bit --no-filter --samples 2 --max-new-tokens 64",
        grpo_model="smollm2",
        grpo_data="arith",
        grpo_seeds="0,1,2",
        # 4 prompts x 4 completions a step, as the paper's batch 4 x 4 with 4 generations. Greedy accuracy
        # moves little (the warm-up's greedy answers are already well formed; GRPO mostly fixes the sampled
        # ones), so --eval-samples 2 adds the accuracy at the rollout temperature (seed 1, 4 samples: warm-up
        # 29%, after GRPO 50.5%, greedy 44% -> 54%). From a 3-step warm-up GRPO learnt to copy the system
        # prompt's example answer and fell to 0%
        grpo_args="--no-8bit --max-steps 16 --batch-size 16 --num-generations 4 --grad-accum 1 --lr 2e-5 "
        "--warmup-steps 1 --max-new-tokens 40 --eval-n 100 --gen-batch-size 64 --eval-samples 2 "
        "--save-every 1000",
        warmup_args="--no-8bit --max-steps 5 --batch-size 4 --grad-accum 1 --lr 1e-4 --save-every 1000",
    ),
}


def persona_layer(model: str) -> int:
    """The paper's layer 20 of Qwen2.5-7B's 28 blocks, scaled to this model's depth."""
    return max(1, round(model_depth(model) * 20 / 28))


def model_depth(model: str) -> int:
    """Decoder blocks of --model: from its configuration where it is on this machine (a local folder, the bundled
    smollm2 once converted, a hub id in the local hub cache), else from KNOWN_DEPTHS; never from the network, so a
    dry run prints its plan offline."""
    from transformers import AutoConfig

    import common

    if model == "smollm2":
        config = common.CACHE_DIR / "models" / "smollm2-135m-instruct"
        where = str(config) if (config / "config.json").is_file() else None
    elif Path(model).expanduser().is_dir():
        where = str(Path(model).expanduser())
    else:
        where = model
    if where is not None:
        try:
            return AutoConfig.from_pretrained(where, local_files_only=True).num_hidden_layers
        except (OSError, ValueError):
            pass  # not cached here
    name = re.sub(r"-(Instruct|it)(?=-|$)", "", model.rsplit("/", 1)[-1])  # Mistral-7B-Instruct-v0.3: Mistral-7B-v0.3
    name = re.sub(r"-\d{4}$", "", name)  # a release date: Mistral-Nemo-Instruct-2407
    if name in KNOWN_DEPTHS:
        return KNOWN_DEPTHS[name]
    raise SystemExit(
        f"error: cannot tell the depth of --model {model} for the persona layer: its configuration is not on this "
        "machine and KNOWN_DEPTHS in examples/reproduce.py has no entry for it; pass a local model folder or add it"
    )
