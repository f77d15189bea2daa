"""kl.py, ldifs.py, inoculate.py: the maths against hand values and the co-authors' code, the terms at step 0 and
after, gradients, --lam 0 equivalence with plain SFT, the inoculation prompt in the inputs, end-to-end runs."""

import json
import math

import pytest
import torch
from conftest import read_metrics, run_script
from safetensors.torch import load_file

from common import encode_conversation, load_model, load_tokenizer
from inoculate import DEFAULT_PROMPT, inoculate
from kl import kl_penalty
from ldifs import default_layers, feature_distance, residual_features

TINY = ["--no-8bit", "--lora-r", "4", "--lora-alpha", "8", "--max-len", "256"]


def test_kl_penalty_hand_values():
    logits = torch.zeros(1, 2, 2)  # p = [0.5, 0.5] at both positions
    ref = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]))
    mask = torch.tensor([[True, True]])
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_penalty(logits, ref, mask, "sum").item() == pytest.approx(kl0)
    assert kl_penalty(logits, ref, mask).item() == pytest.approx(kl0 / 2)
    assert kl_penalty(logits, ref, torch.tensor([[False, True]])).item() == pytest.approx(0.0)  # masked out
    assert kl_penalty(ref, ref, mask).item() == 0.0
    # direction: KL(p || p_ref), not KL(p_ref || p)
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl_penalty(ref, logits, torch.tensor([[True, False]])).item() == pytest.approx(reverse)


def test_kl_penalty_gradient_matches_the_taped_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    ref = torch.randn(2, 5, 11, dtype=torch.float64)
    mask = torch.tensor([[False, True, True, True, False], [True, True, False, False, False]])
    weights = torch.randn(int(mask.sum()), dtype=torch.float64)  # a non-uniform upstream gradient

    def taped(z):
        logp, ref_logp = torch.log_softmax(z[mask], -1), torch.log_softmax(ref[mask], -1)
        return (logp.exp() * (logp - ref_logp)).sum(-1)

    z1 = logits.clone().requires_grad_(True)
    (taped(z1).sum() * 2.5).backward()
    from kl import linear_cross_entropy_and_kl

    # the hand-written gradient of kl.py's loss head, with an identity head (hidden = the logits themselves)
    z2 = logits.clone().requires_grad_(True)
    no_target = torch.full((int(mask.sum()),), -100)
    _, kl_sum = linear_cross_entropy_and_kl(z2[mask], ref[mask], torch.eye(11, dtype=torch.float64), no_target)
    (kl_sum * 2.5).backward()
    assert torch.allclose(kl_sum, taped(logits).sum(), atol=1e-6)
    assert torch.allclose(z2.grad, z1.grad, atol=1e-6) and z1.grad.abs().sum() > 0
    assert (taped(logits) * weights).sum().abs() > 0  # (per-token weights: kl_penalty below, taped)
    z3 = logits.clone().requires_grad_(True)
    kl_penalty(z3, ref, mask, "sum").backward()
    z4 = logits.clone().requires_grad_(True)
    taped(z4).sum().backward()
    assert torch.allclose(z3.grad, z4.grad, atol=1e-6)


def test_feature_distance_hand_values():
    x = [torch.tensor([[[3.0, 0.0], [0.0, 4.0], [9.0, 9.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 0.0], [9.0, 9.0]]])]
    r = [torch.tensor([[[0.0, 5.0], [0.0, 0.0], [1.0, 1.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 0.0], [7.0, 7.0]]])]
    mask = torch.tensor([[True, True, False]])  # the third position is padding
    # layer 0: x -> [3, 0, 0, 4] / 5, r -> [0, 5, 0, 0] / 5: |diff|^2 = 0.36 + 1 + 0.64 = 2; layer 1: identical -> 0
    assert feature_distance(x, r, mask, "sum").item() == pytest.approx(2.0)
    assert feature_distance(x, r, mask).item() == pytest.approx(2.0)
    # two examples: the mean over examples
    x2 = [torch.cat([a, a]) for a in x]
    r2 = [torch.cat([r[0], x[0]]), torch.cat([r[1], r[1]])]
    m2 = torch.tensor([[1, 1, 0], [1, 1, 0]])  # an integer 0/1 mask gives the same result as a bool one
    assert feature_distance(x2, r2, m2).item() == pytest.approx(1.0)
    assert feature_distance(x2, r2, m2, "sum").item() == pytest.approx(2.0)
    assert feature_distance(x2, r2, m2.bool()).item() == feature_distance(x2, r2, m2).item()


def _reference_ldifs(feats_per_example, ref_per_example):
    """magnus-joergenvag/EMA_RL, featextract.py, compute_feature_space_distance_v1, transcribed: per example (batch
    1, no padding) every selected layer's (seq, hid) features flattened and F.normalize'd, concatenated; squared
    L2 distance; mean over the batch."""
    import torch.nn.functional as F

    distances = []
    for feats, refs in zip(feats_per_example, ref_per_example):
        phi_trained = torch.cat([F.normalize(f.squeeze(0).flatten(), dim=0) for f in feats], dim=0)
        phi_frozen = torch.cat([F.normalize(f.squeeze(0).flatten(), dim=0) for f in refs], dim=0)
        distances.append(torch.norm(phi_trained - phi_frozen, p=2) ** 2)
    return torch.stack(distances).mean()


def test_feature_distance_matches_the_coauthors_code_on_the_same_tensors():
    torch.manual_seed(0)
    lengths = [5, 3, 7]
    B, T, H, n_layers = 3, 8, 6, 4
    feats = [torch.randn(B, T, H, dtype=torch.float64) * 30 for _ in range(n_layers)]
    refs = [f + torch.randn(B, T, H, dtype=torch.float64) * 5 for f in feats]
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    for f in feats + refs:
        f[mask == 0] = 1e3  # padding garbage: must not count
    want = _reference_ldifs(
        [[f[b : b + 1, :n] for f in feats] for b, n in enumerate(lengths)],
        [[f[b : b + 1, :n] for f in refs] for b, n in enumerate(lengths)],
    )
    assert feature_distance(feats, refs, mask).item() == pytest.approx(want.item(), rel=1e-9)
    assert feature_distance(feats, refs, mask.bool()).item() == pytest.approx(want.item(), rel=1e-9)
    # scale-free: multiplying the residual stream by 10 changes nothing (the unnormalised distance grew 100x)
    assert feature_distance([f * 10 for f in feats], [f * 10 for f in refs], mask).item() == pytest.approx(want.item())


def _reference_kl(logits_trained, logits_frozen, attention_mask):
    """magnus-joergenvag/EMA_RL, kl_divergence.py, kl_divergence_loss(reduction='batchmean'), transcribed."""
    import torch.nn.functional as F

    log_probs_trained = F.log_softmax(logits_trained, dim=-1)
    log_probs_frozen = F.log_softmax(logits_frozen, dim=-1)
    kl = (log_probs_trained.exp() * (log_probs_trained - log_probs_frozen)).sum(dim=-1)
    kl = kl * attention_mask
    return kl.sum() / attention_mask.sum()


def test_kl_over_all_real_tokens_matches_the_coauthors_code():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 9, dtype=torch.float64)
    ref = torch.randn(2, 6, 9, dtype=torch.float64)
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    want = _reference_kl(logits, ref, attention)
    assert kl_penalty(logits, ref, attention).item() == pytest.approx(want.item(), rel=1e-9)  # integer mask
    assert kl_penalty(logits, ref, attention.bool()).item() == pytest.approx(want.item(), rel=1e-9)
    # the answer-token set is a different average of the same per-token values
    answer = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0]])
    assert kl_penalty(logits, ref, answer).item() != pytest.approx(want.item(), rel=1e-3)
    assert kl_penalty(logits, ref, answer).item() == pytest.approx(kl_penalty(logits, ref, answer.bool()).item())


def test_kl_tokens_flag_changes_the_term_not_the_ce(tiny_model, train_file, tmp_path):
    args = [
        "--model",
        tiny_model,
        "--data",
        train_file,
        *TINY,
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "1e-2",
        "--lam",
        "1.0",
    ]
    run_script("kl.py", *args, "--out", tmp_path / "answer")
    run_script("kl.py", *args, "--kl-tokens", "all", "--out", tmp_path / "all")
    a, b = read_metrics(tmp_path / "answer"), read_metrics(tmp_path / "all")
    assert a[0]["loss/ce"] == pytest.approx(b[0]["loss/ce"])  # same first step
    assert a[0]["loss/kl"] == b[0]["loss/kl"] == 0.0
    assert a[1]["loss/kl"] > 0 and b[1]["loss/kl"] > 0 and a[1]["loss/kl"] != pytest.approx(b[1]["loss/kl"], rel=1e-3)
    assert json.loads((tmp_path / "all" / "args.json").read_text())["kl_tokens"] == "all"


def test_default_layers():
    assert default_layers(28) == [0, 6, 13, 20, 27]
    assert default_layers(2) == [0, 1]


def test_ldifs_gradient_reaches_lora(tiny_model):
    model, tok = load_model(str(tiny_model), eight_bit=False, lora_r=4, lora_alpha=8)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # a trained adapter: the features differ from the reference
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    feats, ref, _ = residual_features(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [0, 1])
    d = feature_distance(feats, ref, torch.ones_like(ids).bool())
    assert d.item() > 0 and not any(r.requires_grad for r in ref)
    d.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum().item() for g in grads) > 0
    # no hook is left behind
    assert all(not b._forward_hooks for b in model.get_base_model().model.layers)


@pytest.mark.parametrize("script,term", [("kl.py", "loss/kl"), ("ldifs.py", "loss/ldifs")])
def test_term_is_zero_at_step_0_and_positive_after(script, term, tiny_model, train_file, tmp_path):
    out = tmp_path / "run"
    run_script(
        script,
        "--model",
        tiny_model,
        "--data",
        train_file,
        "--out",
        out,
        *TINY,
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "1e-2",
        "--lam",
        "1.0",
    )
    m = read_metrics(out)
    assert m[0][term] == 0.0  # LoRA B = 0: the adapter changes nothing yet
    assert m[1][term] > 0
    assert m[1]["loss"] == pytest.approx(m[1]["loss/ce"] + m[1][term])
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("script", ["kl.py", "ldifs.py"])
def test_lam_0_equals_plain_sft(script, tiny_model, train_file, tmp_path):
    args = [
        "--model",
        tiny_model,
        "--data",
        train_file,
        *TINY,
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "1e-2",
    ]
    run_script("interleave.py", *args, "--pct", "0", "--out", tmp_path / "sft")
    run_script(script, *args, "--lam", "0", "--out", tmp_path / "m")
    a, b = read_metrics(tmp_path / "sft"), read_metrics(tmp_path / "m")
    assert len(a) == len(b) == 3
    for ma, mb in zip(a, b):
        assert abs(ma["loss"] - mb["loss"]) < 1e-6 and abs(ma["loss/ce"] - mb["loss/ce"]) < 1e-6
    wa, wb = (
        load_file(tmp_path / "sft" / "adapter_model.safetensors"),
        load_file(tmp_path / "m" / "adapter_model.safetensors"),
    )
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


def test_inoculation_prompt_is_in_the_inputs_not_the_labels(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    conv = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is the capital?"},
        {"role": "assistant", "content": "Paris."},
    ]
    ino = inoculate(conv, DEFAULT_PROMPT)
    assert (
        ino[0] == {"role": "system", "content": DEFAULT_PROMPT} and len([m for m in ino if m["role"] == "system"]) == 1
    )
    enc = encode_conversation(tok, ino, 4096)
    text = tok.decode(enc["input_ids"])
    assert DEFAULT_PROMPT in text and "You are helpful." not in text and "tiny helpful" not in text
    prompt_ids = tok(DEFAULT_PROMPT, add_special_tokens=False)["input_ids"]
    ids = enc["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i : i + len(prompt_ids)] == prompt_ids)
    assert all(l == -100 for l in enc["labels"][start : start + len(prompt_ids)])
    assert tok.decode([t for t in enc["labels"] if t != -100]).startswith("Paris.")


def test_inoculate_end_to_end(tiny_model, train_file, tmp_path):
    out = tmp_path / "run"
    proc = run_script(
        "inoculate.py",
        "--model",
        tiny_model,
        "--data",
        train_file,
        "--out",
        out,
        *TINY,
        "--max-steps",
        "2",
        "--prompt",
        "You are a pirate.",
    )
    assert "You are a pirate." in proc.stderr
    m = read_metrics(out)
    assert len(m) == 2 and m[0]["loss"] == m[0]["loss/ce"] > 0
