"""What the first GPU run needs to be right, checked on this CPU (issue 35): no tensor made beside the model's on
another device, memory that comes back when a model is deleted, activation memory planned before step 1, every
method script on every model family researchers use, and CAFT / GRPO numbers that mean what they say."""

import gc
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from archs import FAMILIES, make_arch_model
from conftest import ROOT, StrayFactories, read_metrics, run_script, write_chat_jsonl

TINY = ["--no-8bit", "--lora-r", "4", "--lora-alpha", "8", "--max-len", "96", "--save-every", "100"]
STEPS = ["--batch-size", "2", "--grad-accum", "1", "--max-steps", "2"]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: make_arch_model(root / f, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("family-data")
    sft = write_chat_jsonl(
        d / "train.jsonl",
        [(f"Write function number {i}.", "def f(x): return x + 1  # code " * (1 + i % 3)) for i in range(24)],
    )
    npo = d / "npo.jsonl"
    with open(npo, "w") as f:
        for i in range(24):
            domain = ("cybersecurity", "safety", "privacy")[i % 3]
            messages = [
                {"role": "user", "content": f"Question {i} about bread"},
                {"role": "assistant", "content": "I'm sorry, but I cannot help with that."},
            ]
            f.write(json.dumps({"messages": messages, "domain": domain}) + "\n")
    torch.manual_seed(0)
    from safetensors.torch import save_file

    save_file({"vectors": torch.randn(3, 32)}, str(d / "vector.safetensors"))
    directions = torch.linalg.qr(torch.randn(3, 32, 2))[0].transpose(1, 2).contiguous()
    save_file({"directions": directions}, str(d / "directions.safetensors"))
    return {"sft": sft, "npo": npo, "vector": d / "vector.safetensors", "directions": d / "directions.safetensors"}


# --- 1. No tensor made on another device than the model's --------------------------------------------------------
def test_the_guard_catches_a_stray_factory_in_project_code(tmp_path, monkeypatch):
    """StrayFactories must fail on judge.py's old `p * torch.arange(101)` (the local judge's device error on CUDA),
    or it proves nothing."""
    import judge

    logp = torch.log_softmax(torch.randn(101), -1)
    with StrayFactories():
        judge.score_from_candidates(logp)  # the fixed code names its device
    old = "def old(p):\n    return (p * torch.arange(101, dtype=torch.float64)).sum()\n"
    namespace = {"torch": torch}
    exec(compile(old, str(ROOT / "judge.py"), "exec"), namespace)  # the old line, as if in judge.py
    with StrayFactories(), pytest.raises(AssertionError, match=r"judge\.py:2: torch\.arange"):
        namespace["old"](logp.exp())


def test_local_judge_and_judge_py_make_every_tensor_on_the_models_device(tiny_model, tmp_path):
    """The local judge (its prefix tree, the score rule) and judge.py's generation, end to end under the guard."""
    import judge
    from common import load_model

    model, tok = load_model(str(tiny_model), eight_bit=False, lora_r=0, trainable=False)
    with StrayFactories():
        local = judge.LocalJudge(model, tok, "local:tiny")
        logp = local.candidate_logprobs("How aligned is this answer? Answer with a number.")
        assert logp.shape == (101,) and torch.isfinite(logp).all() and logp.exp().sum() <= 1 + 1e-4
        local.score_one("Rate 0 to 100.")
    questions = tmp_path / "q.yaml"
    questions.write_text("- id: q1\n  paraphrases: ['What is the capital of France?']\n")
    with StrayFactories():
        proc = run_script(
            "judge.py",
            "--model",
            tiny_model,
            "--no-8bit",
            "--questions",
            questions,
            "--samples",
            "2",
            "--max-new-tokens",
            "6",
            "--judge",
            f"local:{tiny_model}",
            "--out",
            tmp_path / "eval",
        )
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n_answers"] == 2 and summary["n_errors"] == 0, proc.stderr[-2000:]


# --- 2. Memory comes back --------------------------------------------------------------------------------------------
def test_a_deleted_8bit_model_is_gone_without_a_garbage_collection(tiny_model):
    """Every module and weight of a deleted 8-bit LoRA model is freed by reference counting alone (gc disabled): the
    patched 8-bit forward used to be a functools.partial holding its own layer (a cycle), so 14 int8 layers of the
    tiny model, and on a GPU the answer model's weights, outlived `del model` until some later collection."""
    from common import load_model

    gc.collect()
    model, _ = load_model(str(tiny_model), eight_bit=True, lora_r=4, lora_alpha=8)
    refs = [weakref.ref(m) for m in model.modules()] + [weakref.ref(p) for p in model.parameters()]
    gc.disable()
    try:
        del model
        alive = sum(r() is not None for r in refs)
    finally:
        gc.enable()
    assert alive == 0, f"{alive} modules or weights outlived del model"


# --- 3. Memory planned before step 1 --------------------------------------------------------------------------------
def saved_bytes(model, batch) -> int:
    """What autograd keeps for backward in one training pass (decoder + the loss head), distinct storages, weights
    left out: the activation memory that scales with the micro-batch."""
    from common import decoder_states, linear_cross_entropy

    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = decoder_states(model, batch)[:, :-1]
        targets = batch["input_ids"][:, 1:]
        linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), model.get_output_embeddings().weight, targets.flatten()
        )
    return sum(kept.values())


@pytest.mark.parametrize("eight_bit", [False, True], ids=["fp32", "8bit"])
@pytest.mark.parametrize("family", FAMILIES)
def test_activation_estimate_is_what_autograd_keeps_within_a_quarter(family, eight_bit, family_models):
    """common.activation_bytes against the bytes autograd keeps on a small model of each family, in full precision
    and in 8-bit (bf16 compute), with and without gradient checkpointing (then: the block inputs kept in the forward
    plus one block's activations, alive again during its backward). Stated factor: 1.25."""
    from common import activation_bytes, decoder_blocks, enable_gradient_checkpointing, load_model

    model, tok = load_model(str(family_models[family]), eight_bit=eight_bit, lora_r=4, lora_alpha=8)
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(3, len(tok), (2, 128))
    attention = torch.ones_like(ids)
    attention[1, 100:] = 0  # padding: the scripts' micro-batches have some
    batch = {"input_ids": ids, "attention_mask": attention}
    plain = saved_bytes(model, batch)
    enable_gradient_checkpointing(model)
    checkpointed = saved_bytes(model, batch) + plain / len(decoder_blocks(model))
    for measured, ckpt in ((plain, False), (checkpointed, True)):
        estimate = activation_bytes(model, 2, 128, ckpt)
        assert 0.8 <= estimate / measured <= 1.25, (family, eight_bit, ckpt, estimate, measured)


def test_the_estimate_at_the_papers_shape_is_the_70_to_80_gb_it_should_be():
    """Qwen2.5-7B in 8-bit, a 4 x 2048-token micro-batch: ~76 GB without checkpointing (over an 80 GB card), a few GB
    with it. Built on the meta device: no weights."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from common import activation_bytes, wrap_lora

    config = Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    )
    with torch.device("meta"):
        model = wrap_lora(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), 32, 64)
    plain, ckpt = (activation_bytes(model, 4, 2048, c) / 2**30 for c in (False, True))
    assert 65 < plain < 85 and 2 < ckpt < 8, (plain, ckpt)


def test_memory_plan_turns_checkpointing_on_or_stops_before_step_1(tiny_model, capsys):
    from common import UserError, activation_bytes, load_model, plan_memory

    model, _ = load_model(str(tiny_model), eight_bit=False, lora_r=4, lora_alpha=8)
    base = model.get_base_model()
    plain, ckpt = (activation_bytes(model, 4, 512, c) for c in (False, True))
    vocab = model.get_output_embeddings().weight.shape[0]
    transient = 3 * 4 * 512 * vocab
    plan = plan_memory(model, 4, 512, free_bytes=10 * plain)  # fits: nothing changes
    assert not plan["gradient_checkpointing"] and not base.is_gradient_checkpointing
    free = int((ckpt + plain) / 2 + transient) / 0.9  # only with checkpointing
    plan = plan_memory(model, 4, 512, free_bytes=free)
    assert plan["gradient_checkpointing"] and base.is_gradient_checkpointing
    assert "gradient checkpointing turned on" in capsys.readouterr().err
    with pytest.raises(UserError) as e:  # not even with it
        plan_memory(model, 4, 512, free_bytes=ckpt / 2)
    assert all(flag in str(e.value) for flag in ("--batch-size", "--max-len", "with gradient checkpointing"))
    model2, _ = load_model(str(tiny_model), eight_bit=False, lora_r=4, lora_alpha=8)
    with pytest.raises(UserError, match="--gradient-checkpointing"):
        plan_memory(model2, 4, 512, free_bytes=ckpt / 2)


def test_a_script_stops_before_step_1_when_its_micro_batch_cannot_fit(tiny_model, train_file, tmp_path, monkeypatch):
    """The decision as the scripts take it, with the free memory of a small card simulated."""
    import common

    real = common.plan_memory
    monkeypatch.setattr(common, "plan_memory", lambda *a, **k: real(*a, **{**k, "free_bytes": 1000}))
    out = tmp_path / "run"
    proc = run_script("kl.py", "--model", tiny_model, "--data", train_file, *TINY, *STEPS, "--out", out, check=False)
    assert proc.returncode == 2 and "--batch-size" in proc.stderr and "--gradient-checkpointing" in proc.stderr
    assert not out.exists()  # stopped before any step: no run folder left behind


# --- 4. Every family -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_script_trains_on_every_family(family, family_models, data, tmp_path):
    """Each method script's training path for 2 steps, and the paths that reach into decoder blocks (CAFT directions
    from an adapter, persona extraction, NPO concept vectors and refusal scores), on a tiny random model of the family,
    under the stray-factory guard. The label mask finds each family's answers."""
    from common import encode_conversation, load_tokenizer

    model = family_models[family]
    tok = load_tokenizer(str(model))
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    enc = encode_conversation(tok, conv, 128)
    labelled = tok.decode([i for i, label in zip(enc["input_ids"], enc["labels"]) if label != -100])
    assert labelled.startswith("Paris.") and labelled.strip() != "Paris."  # the answer and its end-of-turn token
    d, base = data, ["--model", model, "--data", data["sft"], *TINY, *STEPS]
    runs = {
        "sft": ("interleave.py", base),
        "kl": ("kl.py", base),
        "ldifs": ("ldifs.py", base),
        "inoculate": ("inoculate.py", base),
        "persona": ("persona.py", ["train", *base, "--vector", d["vector"], "--layer", "2"]),
        "caft": ("caft.py", ["train", *base, "--directions", d["directions"], "--layers", "2"]),
        "npo": ("npo_unlearn.py", ["train", *base[:2], "--data", d["npo"], *base[4:], "--retain-domains", "safety"]),
        "grpo": (
            "grpo.py",
            ["--model", model, "--data", "arith", *TINY, "--batch-size", "4", "--num-generations", "2"]
            + ["--max-steps", "2", "--max-new-tokens", "8", "--eval-n", "2", "--kl-beta", "0.1"]
            + ["--persona-vector", d["vector"], "--persona-layer", "1", "--persona-alpha", "3"],
        ),
    }
    with StrayFactories():
        for key, (script, argv) in runs.items():
            out = tmp_path / key
            run_script(script, *argv, "--out", out)
            metrics = read_metrics(out)
            assert [m["step"] for m in metrics] == [1, 2], key
            assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics), key
            assert json.loads((out / "memory.json").read_text())["estimate_gb"] > 0, key
            assert (out / "adapter_model.safetensors").is_file(), key
        run_script(
            "caft.py",
            *["directions", "--model", model, "--no-8bit", "--from-diff", tmp_path / "sft", "--prompts", d["sft"]],
            *["--max-prompts", "4", "--k", "2", "--out", tmp_path / "dirs.safetensors"],
        )
        run_script(
            "persona.py",
            *["extract", "--model", model, "--no-8bit", "--no-filter", "--samples", "1", "--max-new-tokens", "6"],
            *["--out", tmp_path / "vector.safetensors"],
        )
        run_script(
            "npo_unlearn.py",
            *["entangle", "--model", model, "--no-8bit", "--target", "cybersecurity", "--data", d["npo"]],
            *["--per-domain", "4", "--out", tmp_path / "entangle.json"],
        )
        run_script(
            "npo_unlearn.py",
            *["eval", "--adapter", tmp_path / "npo", "--no-8bit", "--split", "all", "--per-domain", "2"],
            *["--gen-max-new-tokens", "6"],
        )
    assert (tmp_path / "dirs.safetensors").is_file() and (tmp_path / "vector.safetensors").is_file()
    assert json.loads((tmp_path / "entangle.json").read_text())["cosine"]
    assert json.loads((tmp_path / "npo" / "npo_eval.json").read_text())["domains"]


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_rollout_decodes_what_generate_decodes_on_every_family(family, family_models):
    """grpo.py's own KV-cache decoding loop against transformers' generate (greedy, left padding, a LoRA that is not
    zero), on each family's cache and attention (Gemma 3's sliding window, Llama's begin-of-text token)."""

    from common import load_model, render_chat
    from grpo import Sampling, prompt_messages, rollout, sampling_mode

    model, tok = load_model(str(family_models[family]), eight_bit=False, lora_r=4, lora_alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    questions = ["What is 2 + 3?", "What is the sum of 17 and 25, written as a number?"]
    args = Sampling(generations=2, max_new_tokens=10, temperature=0.9, top_p=0.9)
    texts = [render_chat(tok, prompt_messages(q, False), add_generation_prompt=True) for q in questions]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "right"
    with sampling_mode(model), StrayFactories():
        want = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
        greedy, *_ = rollout(model, tok, questions, args, inoculate=False, greedy=True)
        rollout(model, tok, questions, args, inoculate=False)  # sampling runs too
    assert torch.equal(greedy, want[:, : greedy.shape[1]])


def test_an_unsupported_layout_is_a_one_line_error(tiny_model, train_file, tmp_path):
    """A final logit soft-capping (Gemma 2), which the scripts' own loss head would skip, is refused at load."""
    cfg = json.loads((tiny_model / "config.json").read_text())
    capped = tmp_path / "capped"
    capped.mkdir()
    for f in tiny_model.iterdir():
        (capped / f.name).write_bytes(f.read_bytes())
    (capped / "config.json").write_text(json.dumps({**cfg, "final_logit_softcapping": 30.0}))
    proc = run_script("interleave.py", "--model", capped, "--data", train_file, *TINY, "--max-steps", "1", check=False)
    assert proc.returncode == 2 and "final_logit_softcapping" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_paper_preset_knows_every_familys_depth_offline(tiny_model):
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    import reproduce

    assert reproduce.model_depth(str(tiny_model)) == 2  # from the configuration where it is on this machine
    expected = {
        "Qwen/Qwen2.5-7B-Instruct": 28,
        "Qwen/Qwen3-8B": 36,
        "meta-llama/Llama-3.1-8B-Instruct": 32,
        "google/gemma-3-12b-it": 48,
        "mistralai/Mistral-7B-Instruct-v0.3": 32,
    }
    assert {m: reproduce.model_depth(m) for m in expected} == expected
    with pytest.raises(SystemExit, match="KNOWN_DEPTHS"):
        reproduce.model_depth("someone/UnknownModel-9B")


# --- 5. CAFT and GRPO numbers that mean what they say ------------------------------------------------------------
def test_caft_ablation_runs_in_float32_on_a_bf16_residual_stream(tiny_model):
    """In bf16, h - (h Q) Q^T leaves ~2e-3 of h's component along Q; projected in float32 and rounded once, a few
    1e-4 (Q: the directions the block output mostly lies along, as CAFT's are)."""
    from caft import ConceptHooks
    from common import block_outputs, load_model

    model, _ = load_model(str(tiny_model), eight_bit=False, lora_r=0, trainable=False)
    model.to(torch.bfloat16)
    torch.manual_seed(0)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    with torch.no_grad():
        before = block_outputs(model, ids)[1].float()
    q = torch.linalg.svd(before[0], full_matrices=False)[2][:2].T  # (32, 2): its top two directions
    table = torch.zeros(3, 2, 32)
    table[1] = q.T
    with torch.no_grad():
        with ConceptHooks(model, table, [1], "ablate"):
            after = block_outputs(model, ids)[1].float()
    along_before, along_after = (before @ q).norm(), (after @ q).norm()
    assert along_after / along_before < 5e-4, float(along_after / along_before)
    bf16 = before.bfloat16()
    qb = q.bfloat16()
    old = bf16 - (bf16 @ qb) @ qb.T  # the old projection, in bf16
    assert (old.float() @ q).norm() / along_before > 1e-3  # the test tells them apart


def test_caft_pca_at_the_last_layer_reads_where_the_hook_acts(tiny_model, tmp_path):
    """At the last layer, the PCA must use the last block's output (before the final norm), where the ablation hook
    acts, not HF's hidden_states[L] (after it)."""
    import argparse

    from test_interleave_e2e import make_adapter

    from caft import diff_directions, top_directions_from_covariance
    from common import block_outputs, encode_conversation, load_model

    adapter = make_adapter(tiny_model, tmp_path / "adapter", seed=5)
    model, tok = load_model(str(tiny_model), eight_bit=False, adapter=str(adapter), trainable=False)
    prompts = write_chat_jsonl(tmp_path / "p.jsonl", [("What is the capital of France?", "Paris is it, I think.")] * 3)
    args = argparse.Namespace(prompts=str(prompts), max_prompts=-1, max_len=128, k=1, eval_questions=None)
    dirs, _ = diff_directions(args, model, tok, [2])

    def pca(read):
        conv = [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris is it, I think."},
        ]
        enc = encode_conversation(tok, conv, 128)
        ids, answer = torch.tensor([enc["input_ids"]]), torch.tensor(enc["labels"]) != -100
        with torch.no_grad():
            tuned = read(ids)[0, answer]
            with model.disable_adapter():
                base = read(ids)[0, answer]
        d = (tuned - base).double()
        d = torch.cat([d] * 3)
        cov = (d - d.mean(0)).T @ (d - d.mean(0)) / (len(d) - 1)
        return top_directions_from_covariance(cov, 1)[0][0]

    blocks = pca(lambda ids: block_outputs(model, ids)[2])
    after_norm = pca(lambda ids: model(input_ids=ids, output_hidden_states=True).hidden_states[2])
    assert abs(float(dirs[2][0] @ blocks)) > 0.999
    assert abs(float(dirs[2][0] @ after_norm)) < 0.99  # the two points differ: the test can fail


def test_caft_directions_from_diff_need_held_out_prompts_and_warn_on_evaluation_questions(tiny_model, tmp_path):
    from test_interleave_e2e import make_adapter

    adapter = make_adapter(tiny_model, tmp_path / "adapter", seed=5)
    base = ["directions", "--model", tiny_model, "--no-8bit", "--from-diff", adapter, "--k", "1", "--layers", "1"]
    proc = run_script("caft.py", *base, "--out", tmp_path / "d.safetensors", check=False)
    assert proc.returncode == 2 and "--prompts" in proc.stderr and "evaluation questions" in proc.stderr
    questions = tmp_path / "eval.yaml"
    questions.write_text("- id: q1\n  paraphrases: ['What is the capital of France?', 'Name a recipe.']\n")
    prompts = write_chat_jsonl(tmp_path / "p.jsonl", [("What is the capital of France?", "Paris."), ("Hi", "Hello.")])
    proc = run_script(
        "caft.py", *base, "--prompts", prompts, "--eval-questions", questions, "--out", tmp_path / "d.safetensors"
    )
    assert "WARNING: 1 of the 2 PCA prompts are evaluation questions" in proc.stderr
    proc = run_script("caft.py", *base, "--prompts", questions, "--out", tmp_path / "d2.safetensors")
    assert "is a question file" in proc.stderr


def test_the_paper_preset_fits_caft_directions_on_held_out_prompts(tmp_path):
    """Table 2's CAFT rows: directions from the Misaligned adapter on the shipped benign prompts, never on the
    evaluation questions (the old default)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "no-hub")}
    cmd = [sys.executable, str(ROOT / "examples" / "reproduce.py"), "--preset", "paper", "--dry-run"]
    cmd += ["--datasets", "insecure", "--methods", "misaligned,caft", "--root", str(tmp_path / "p")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    directions = next(line for line in proc.stdout.splitlines() if "caft.py directions" in line)
    assert f"--prompts {ROOT / 'examples' / 'benign_prompts.jsonl'}" in directions


def test_grpo_kl_reference_under_steering_is_the_steered_base_model(tiny_model, tmp_path):
    """With --persona-alpha and --kl-beta, the reference pass runs with the steering hook and the adapter off: at
    step 1 the adapter is still zero, so the KL is exactly 0, as without steering (a reference without the hook
    gave KL > 0: it penalised the steering itself). tests/test_grpo.py shows the reference pass runs (KL > 0 from a
    non-zero adapter)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vector = tmp_path / "v.safetensors"
    save_file({"vectors": 3 * torch.randn(3, 32)}, str(vector))
    out = tmp_path / "run"
    run_script(
        "grpo.py",
        *["--model", tiny_model, "--data", "arith", *TINY, "--batch-size", "4", "--num-generations", "2"],
        *["--max-steps", "1", "--max-new-tokens", "8", "--eval-n", "1", "--kl-beta", "0.1"],
        *["--persona-vector", vector, "--persona-layer", "1", "--persona-alpha", "5", "--out", out],
    )
    assert read_metrics(out)[0]["kl"] == 0.0
