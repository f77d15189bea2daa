"""grpo.py: reward parts on hand-written completions, advantages, surrogate and KL against hand values, and
2-step end-to-end runs on a tiny model with each defense."""

import contextlib
import itertools
import json
import math
from unittest import mock

import pytest
import torch
from conftest import read_metrics, run_script

from grpo import Sampling, completion_mean, group_advantages, k3_kl, policy_loss, reward_parts, sft_after, trim_padding

TINY = ["--no-8bit", "--lora-r", "4", "--lora-alpha", "8", "--max-len", "256"]
PERFECT = "<think>\n2 + 2 = 4\n</think>\n<answer>\n4\n</answer>"


def test_reward_parts_maximum_and_minimum():
    best = reward_parts(PERFECT, "4")
    assert best == {"format_exact": 3.0, "format_approx": 2.0, "correct": 3.0, "number": 1.5}
    assert sum(best.values()) == 9.5
    worst = reward_parts("<think><think></answer></answer> no answer tag pair", "4")
    assert worst == {"format_exact": 0.0, "format_approx": -2.0, "correct": -0.5, "number": 0.0}
    assert sum(worst.values()) == -2.5


def test_reward_parts_each():
    # exact format: anything after </answer> breaks it; approx format still counts the tags
    r = reward_parts(PERFECT + " trailing", "4")
    assert r["format_exact"] == 0.0 and r["format_approx"] == 2.0
    # correctness: exact 3, same number written differently 1.5, wrong or missing -0.5
    assert reward_parts("<answer>4</answer>", "4")["correct"] == 3.0
    assert reward_parts("<answer>4.0</answer>", "4")["correct"] == 1.5
    assert reward_parts("<answer>$4</answer>", "4")["correct"] == 1.5
    assert reward_parts("<answer>5</answer>", "4")["correct"] == -0.5
    assert reward_parts("4", "4")["correct"] == -0.5
    # number: a plain number inside the answer tags
    assert reward_parts("<answer>-12.5</answer>", "1")["number"] == 1.5
    assert reward_parts("<answer>12 apples</answer>", "12")["number"] == 0.0
    # approx format: +0.5 per tag present exactly once
    assert reward_parts("<think></think>", "1")["format_approx"] == 0.0
    assert reward_parts("<think></think><answer>1</answer><answer>", "1")["format_approx"] == 1.0  # 3 once, 1 twice


def test_total_reward_range_over_many_completions():
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "7", "x", " "]
    totals = [sum(reward_parts("".join(c), "7").values()) for c in itertools.product(pieces, repeat=5)]
    assert min(totals) >= -2.5 and max(totals) <= 9.5
    assert max(totals) == 9.5


def test_group_advantages():
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 0.0, 2.0]), 4)
    assert torch.equal(adv[:4], torch.zeros(4))  # equal rewards: 0, no NaN
    # mean 1, deviations -1, 1, -1, 1: Bessel std = sqrt(4 / 3) (TRL), not the population std 1
    s = math.sqrt(4 / 3)
    assert torch.allclose(adv[4:], torch.tensor([-1.0, 1.0, -1.0, 1.0]) / (s + 1e-4))
    # rewards 0, 1, 2, 5: mean 2, sum of squared deviations 4 + 1 + 0 + 9 = 14, std sqrt(14 / 3)
    adv = group_advantages(torch.tensor([0.0, 1.0, 2.0, 5.0]), 4)
    assert torch.allclose(adv, torch.tensor([-2.0, -1.0, 0.0, 3.0]) / (math.sqrt(14 / 3) + 1e-4))
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, 2.0]), 1)


def grpo_loss(logp, old, adv, mask, eps=0.2, kl_beta=0.0, ref_logp=None):
    """grpo.py's loss as its training loop builds it, and the logged KL per token."""
    kl_tokens = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    loss = policy_loss(logp, old, adv, mask, eps) + kl_beta * completion_mean(kl_tokens, mask)
    return loss, (kl_tokens * mask).sum() / mask.sum()


def test_grpo_loss_takes_bool_int_and_float_masks():
    torch.manual_seed(0)
    logp, old, ref = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    want = grpo_loss(logp, old, adv, mask.float(), kl_beta=0.1, ref_logp=ref)
    for m in (mask, mask.bool()):
        got = grpo_loss(logp, old, adv, m, kl_beta=0.1, ref_logp=ref)
        assert got[0].item() == pytest.approx(want[0].item()) and got[1].item() == pytest.approx(want[1].item())


def test_grpo_loss_hand_values():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.25, 0.25], [0.5, 0.5]]))
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, kl = grpo_loss(logp, old, adv, mask, eps=0.2)
    # completion 0: ratios [2, 1] -> min(2*1, 1.2*1) = 1.2 and 1 -> mean 1.1; completion 1: ratio 1 -> -2
    assert loss.item() == pytest.approx(-(1.1 + -2.0) / 2)
    assert kl.item() == 0.0
    ref = torch.log(torch.tensor([[0.25, 0.25], [0.5, 0.5]]))
    loss_kl, kl = grpo_loss(logp, logp, adv, mask, eps=0.2, kl_beta=0.5, ref_logp=ref)
    k3 = (
        math.exp(math.log(0.5) - math.log(0.5) + math.log(0.25) - math.log(0.5)) - math.log(0.5) - 1
    )  # = 0.5 - ln 0.5 - 1
    assert kl.item() == pytest.approx(k3 / 3)  # one non-zero token of three
    assert loss_kl.item() == pytest.approx(-((1 - 0.5 * k3 + 1) / 2 + -2.0) / 2)


@pytest.mark.parametrize("defense", ["none", "kl", "persona", "interleave", "inoculate"])
def test_two_steps_with_each_defense(defense, tiny_model, pool_file, tmp_path):
    extra = {
        "none": [],
        "kl": [],
        "interleave": ["--interleave-pct", "50", "--safe-data", pool_file],
        "inoculate": ["--inoculate"],
        "persona": [],
    }[defense]
    if defense == "persona":
        from safetensors.torch import save_file

        save_file({"vectors": torch.randn(3, 32)}, str(tmp_path / "v.safetensors"))
        extra = ["--persona-vector", tmp_path / "v.safetensors", "--persona-layer", "1", "--persona-alpha", "5"]
    if defense == "kl":  # start from a random adapter, so the policy differs from the reference at once
        from test_interleave_e2e import make_adapter

        extra = ["--kl-beta", "0.1", "--init-adapter", make_adapter(tiny_model, tmp_path / "init", seed=3)]
    out = tmp_path / "run"
    proc = run_script(
        "grpo.py",
        "--model",
        tiny_model,
        "--data",
        "arith",
        *TINY,
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--num-generations",
        "2",
        "--grad-accum",
        "2",
        "--max-new-tokens",
        "8",
        "--eval-n",
        "4",
        "--lr",
        "1e-3",
        "--out",
        out,
        *extra,
    )
    assert "held-out questions 4/4" in proc.stderr  # the evaluation shows progress
    m = read_metrics(out)
    assert [x["step"] for x in m] == [1, 2]
    for x in m:
        assert -2.5 <= x["reward"] <= 9.5 and 0 <= x["zero_std_groups"] <= 1
        assert {
            "reward/format_exact",
            "reward/format_approx",
            "reward/correct",
            "reward/number",
            "kl",
            "accuracy",
        } <= x.keys()
    assert "heldout_accuracy" in m[-1] and m[-1]["heldout_s"] > 0 and "heldout_s" not in m[0]
    if defense == "kl":
        assert all(x["kl"] > 0 for x in m)
    else:
        assert all(x["kl"] == 0 for x in m)
    if defense == "interleave":
        assert all(x["loss/ce"] > 0 for x in m)  # 50%: one SFT micro-batch per two RL micro-batches
    else:
        assert all(x["loss/ce"] == 0 for x in m)


@pytest.mark.parametrize(
    "n,pct,count",
    [(16, 5, 1), (16, 20, 3), (16, 50, 8), (100, 5, 5), (7, 30, 2), (40, 12.5, 5), (3, 100, 3), (8, 5, 0)],
)
def test_interleaving_schedule_gives_the_nearest_count_evenly_spread(n, pct, count):
    after = [k for k in range(n) if sft_after(k, pct)]
    assert len(after) == count  # the nearest count: 5% of 16 is 1, not 0; 5% of 8 (0.4) is 0
    gaps = [b - a for a, b in zip(after, after[1:])]
    assert not gaps or max(gaps) - min(gaps) <= 1  # evenly spread


def test_interleaving_too_rare_for_the_run_is_an_error(tiny_model, pool_file, tmp_path):
    # 5% of 4 micro-batches rounds to 0 SFT micro-batches: the run would be plain GRPO under an interleaving label
    proc = run_script(
        "grpo.py",
        "--model",
        tiny_model,
        "--data",
        "arith",
        *TINY,
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--num-generations",
        "2",
        "--grad-accum",
        "2",
        "--max-new-tokens",
        "8",
        "--eval-n",
        "4",
        "--interleave-pct",
        "5",
        "--safe-data",
        pool_file,
        "--out",
        tmp_path / "run",
        check=False,
    )
    assert proc.returncode != 0 and "--interleave-pct 5" in proc.stderr and "plain GRPO" in proc.stderr
    assert "at least 12.5%" in proc.stderr  # the smallest rate that gives one: 50 / 4 micro-batches
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_no_completion_tokens_is_an_error(tiny_model, tmp_path):
    proc = run_script(
        "grpo.py",
        "--model",
        tiny_model,
        "--data",
        "arith",
        *TINY,
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--num-generations",
        "2",
        "--max-new-tokens",
        "0",
        "--out",
        tmp_path / "run",
        check=False,
    )
    assert proc.returncode == 2 and "--max-new-tokens 0" in proc.stderr, proc.stderr[-500:]


def test_trim_padding_keeps_every_real_token():
    # 2 rows of a rollout batch: prompts left-padded to width 4, completions right-padded to 4
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0]])
    seqs = torch.arange(16).view(2, 8) * attention
    comp = attention[:, 4:].bool()
    s, a, n_prompt, c = trim_padding(seqs, attention, 4, comp)
    assert n_prompt == 3 and a.shape == (2, 5) and c.shape == (2, 2)
    assert s.sum() == seqs.sum() and a.sum() == attention.sum() and c.sum() == comp.sum()
    assert s[0].tolist() == [0, 2, 3, 4, 5] and c[0].tolist() == [True, True]
    # a row of one-token completions keeps its completion column
    s, a, n_prompt, c = trim_padding(seqs[1:], attention[1:], 4, comp[1:])
    assert n_prompt == 3 and c.tolist() == [[True]]


def test_zero_reward_spread_is_reported_loudly(tiny_model, tmp_path):
    """A random tiny model never earns different rewards within a group: every advantage is 0, and the run says so
    once N steps in a row are flat (and says nothing when a group had spread)."""
    out = tmp_path / "flat"
    proc = run_script(
        "grpo.py",
        "--model",
        tiny_model,
        "--data",
        "arith",
        *TINY,
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--num-generations",
        "2",
        "--grad-accum",
        "1",
        "--max-new-tokens",
        "4",
        "--eval-n",
        "2",
        "--warn-zero-spread",
        "2",
        "--out",
        out,
    )
    m = read_metrics(out)
    flat = [x["zero_std_groups"] == 1 for x in m]
    warned = "every advantage is 0 and GRPO cannot learn" in proc.stderr
    assert warned == any(a and b for a, b in zip(flat, flat[1:])), (flat, proc.stderr[-1500:])
    assert flat[0] and flat[1]  # the case this test is about: this seed gives two flat steps
    assert proc.stderr.count("GRPO cannot learn") == 1  # once, not every step


def test_sampling_mode_samples_from_the_trained_function_on_8bit(tiny_model):
    """bitsandbytes' CPU 8-bit layers compute another function in eval mode (int8 activations) than in training mode
    (dequantised weights): rollouts in sampling_mode must give the logits of the training pass exactly (rho = 1), and
    a plain eval() must not (else this test could not fail)."""
    from common import is_int8_linear, load_model
    from grpo import sampling_mode

    model, tok = load_model(str(tiny_model), eight_bit=True, lora_r=4, lora_alpha=8)
    ids = tok("def add(a, b): return a + b  # insecure code example 0123456789", return_tensors="pt")
    model.train()
    int8 = [m for m in model.modules() if is_int8_linear(m)]
    before = [vars(m).get("forward") for m in int8]
    assert int8
    with torch.no_grad():
        trained = model(**ids).logits
        with sampling_mode(model):
            assert not model.training
            assert all("forward" in vars(m) for m in int8)  # each weight dequantised once, and reused ...
            sampled = model(**ids).logits
            assert torch.equal(model(**ids).logits, sampled)  # ... at the next call too
        assert model.training  # back in training mode afterwards
        assert [vars(m).get("forward") for m in int8] == before  # and on the forward each had (common's)
        model.eval()
        plain_eval = model(**ids).logits
    assert torch.equal(sampled, trained)
    assert (plain_eval - trained).abs().max() > 1e-3


def _tiny_policy(tiny_model):
    """The tiny model with a LoRA that is not zero, and a persona vector for it."""
    from common import load_model

    model, tok = load_model(str(tiny_model), eight_bit=False, lora_r=4, lora_alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    vector = torch.randn(len(model.get_base_model().model.layers) + 1, model.config.hidden_size)
    return model, tok, vector


QUESTIONS = ["What is 2 + 3?", "What is the sum of 17 and 25, written as a number?"]  # two lengths: left padding


@pytest.mark.parametrize("steer", [False, True])
def test_rollout_with_each_prompt_prefilled_once_samples_what_prefilling_each_copy_samples(tiny_model, steer):
    """rollout() prefills each prompt once and continues its copies from that cache: with the same seed it must sample
    exactly the completions of prefilling every copy, on prompts of different lengths (left padding), with a LoRA
    that is not zero, and with the persona hook on (it acts on the prefill too)."""

    from grpo import rollout, sampling_mode, steering

    model, tok, vector = _tiny_policy(tiny_model)
    args = Sampling(generations=3, max_new_tokens=12, temperature=0.9, top_p=0.9)
    out = {}
    for share in (False, True):
        torch.manual_seed(7)
        with sampling_mode(model), steering(model, vector, 1, 2.0) if steer else contextlib.nullcontext():
            out[share] = rollout(model, tok, QUESTIONS, args, inoculate=False, share_prompt=share)
    (s0, a0, w0, m0, t0), (s1, a1, w1, m1, t1) = out[False], out[True]
    assert w0 == w1 and torch.equal(s0, s1) and torch.equal(a0, a1) and torch.equal(m0, m1) and t0 == t1
    assert len(set(t0)) > 2  # really sampled: the copies of a prompt differ


@pytest.mark.parametrize("steer", [False, True])
def test_rollout_decodes_what_generate_decodes(tiny_model, steer):
    """rollout()'s own KV-cache loop against transformers' generate on the same prompts (left padding, a LoRA that is
    not zero, the persona hook on and off): greedy, the same tokens; sampling with a top-p so small that the nucleus
    is the most probable token, each prompt's copies (continued from its one prefill) all equal generate's greedy
    answer. Sequences, attention and completion mask are laid out as generate's output would be."""

    from common import render_chat
    from grpo import prompt_messages, rollout, sampling_mode, steering

    model, tok, vector = _tiny_policy(tiny_model)
    args = Sampling(generations=3, max_new_tokens=12, temperature=0.9, top_p=1e-6)
    texts = [render_chat(tok, prompt_messages(q, False), add_generation_prompt=True) for q in QUESTIONS]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "right"
    with sampling_mode(model), steering(model, vector, 1, 2.0) if steer else contextlib.nullcontext():
        want = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        greedy, att, width, mask, texts = rollout(model, tok, QUESTIONS, args, inoculate=False, greedy=True)
        sampled, *_ = rollout(model, tok, QUESTIONS, args, inoculate=False)
    assert width == enc["input_ids"].shape[1]
    assert torch.equal(greedy, want[:, : greedy.shape[1]]) and (want[:, greedy.shape[1] :] == tok.pad_token_id).all()
    assert torch.equal(sampled, greedy.repeat_interleave(3, 0))
    assert torch.equal(att[:, :width], enc["attention_mask"])
    completion = greedy[:, width:]
    for row, m, text in zip(completion, mask, texts):
        n = int(m.sum())
        ends = (row == tok.eos_token_id).nonzero()
        assert n == (int(ends[0]) + 1 if len(ends) else len(row))  # up to and including the first end token
        assert text == tok.decode(row[:n], skip_special_tokens=True)


def test_rollout_decodes_with_eager_attention_and_puts_the_models_back(tiny_model):
    """The prefill runs the model's own attention, each one-token decoding step the plain (eager) one, and the
    model's attention is put back after the rollout, and after a failure inside it."""

    import grpo

    model, tok, _ = _tiny_policy(tiny_model)
    base = model.get_base_model()
    own = base.config._attn_implementation
    assert own != "eager"
    seen = []  # (query tokens, attention implementation) of each call of layer 0's attention
    hook = base.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["hidden_states"].shape[1], m.config._attn_implementation)), with_kwargs=True
    )
    args = Sampling(generations=2, max_new_tokens=5, min_new_tokens=5, temperature=1.0, top_p=1.0)
    try:
        with grpo.sampling_mode(model):
            grpo.rollout(model, tok, QUESTIONS[:2], args, inoculate=False)
    finally:
        hook.remove()
    assert seen[0][0] > 1 and seen[0][1] == own  # the prefill
    assert seen[1:] == [(1, "eager")] * 4  # tokens 2..5
    assert base.config._attn_implementation == own
    with pytest.raises(RuntimeError, match="boom"), grpo.sampling_mode(model):
        with mock.patch.object(grpo, "nucleus", side_effect=RuntimeError("boom")):
            grpo.rollout(model, tok, QUESTIONS[:2], args, inoculate=False)
    assert base.config._attn_implementation == own


def test_rollout_min_new_tokens_and_every_stop_token(tiny_model):
    """An end token of the generation config ends a completion as the tokenizer's does (here question 0's first
    greedy token is made one); --min-new-tokens holds every end token back until that length."""

    from grpo import rollout, sampling_mode

    model, tok, _ = _tiny_policy(tiny_model)
    args = Sampling(generations=2, max_new_tokens=10, temperature=1.0, top_p=1.0)
    with sampling_mode(model):
        seqs, _, width, mask, _ = rollout(model, tok, QUESTIONS, args, inoculate=False, greedy=True)
        first = int(seqs[0, width])
        assert int(mask[0].sum()) > 1 and first != tok.eos_token_id
        model.generation_config.eos_token_id = [tok.eos_token_id, first]
        seqs, _, width, mask, texts = rollout(model, tok, QUESTIONS, args, inoculate=False, greedy=True)
        assert int(mask[0].sum()) == 1 and texts[0] == tok.decode([first], skip_special_tokens=True)
        assert (seqs[0, width + 1 :] == tok.pad_token_id).all()  # padded after its end, as generate pads
        args.min_new_tokens = 10
        for greedy in (True, False):
            seqs, _, width, mask, _ = rollout(model, tok, QUESTIONS, args, inoculate=False, greedy=greedy)
            assert (mask.sum(1) == 10).all() and int(seqs[0, width]) != first


def test_nucleus_is_transformers_temperature_then_top_p():
    """grpo.nucleus against transformers' TemperatureLogitsWarper + TopPLogitsWarper + softmax on the same logits:
    the same probabilities over the whole vocabulary, for peaked rows (the nucleus inside the top k), flat ones
    (the fallback to a full sort) and top-p 1 (no cut)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from grpo import nucleus

    torch.manual_seed(0)
    vocab = 3000
    logits = torch.randn(6, vocab) * torch.tensor([[8.0], [4.0], [2.0], [1.0], [0.3], [0.05]])
    for top_p, k in ((0.9, 256), (0.5, 256), (0.9, 8), (1.0, 256)):
        scores = TemperatureLogitsWarper(0.7)(None, logits.clone())
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        want = scores.softmax(-1)
        p, ids = nucleus(logits, 0.7, top_p, k=k)
        got = torch.zeros_like(want).scatter_(1, ids, p)
        assert torch.allclose(got, want, atol=1e-6), (top_p, k, (got - want).abs().max())
        assert torch.equal(got > 0, want > 0)
        assert ((want > 0).sum(1) > 1).any() and ((want > 0).sum(1) < vocab).any() or top_p == 1.0


def test_sampled_heldout_accuracy_is_logged(tiny_model, tmp_path):
    """--eval-samples K logs heldout_sampled_accuracy before GRPO and at each evaluation, beside the greedy one."""
    out = tmp_path / "sampled"
    proc = run_script(
        "grpo.py",
        "--model",
        tiny_model,
        "--data",
        "arith",
        *TINY,
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--num-generations",
        "2",
        "--grad-accum",
        "1",
        "--max-new-tokens",
        "6",
        "--eval-n",
        "4",
        "--eval-every",
        "1",
        "--eval-before",
        "--eval-samples",
        "3",
        "--out",
        out,
    )
    before = json.loads((out / "heldout-before.json").read_text())
    assert "held-out questions x 3 samples 4/4" in proc.stderr
    assert before["samples"] == 3 and 0 <= before["heldout_sampled_accuracy"] <= 100 and "heldout_accuracy" in before
    assert all(0 <= x["heldout_sampled_accuracy"] <= 100 and "heldout_accuracy" in x for x in read_metrics(out))


def test_sampled_heldout_accuracy_is_one_fixed_draw_that_leaves_the_run_rng_alone(tiny_model):
    """The sampled evaluation draws from its own fixed seed: the same answers every time it runs on the same model
    (evaluations compare like for like), and the training run's random stream is where it was (a run evaluated with
    samples trains on the same rollouts as one evaluated greedily)."""

    from common import load_model
    from grpo import heldout_accuracy, rollout

    model, tok = load_model(str(tiny_model), eight_bit=False, lora_r=4, lora_alpha=8)
    args = Sampling(generations=2, max_new_tokens=6, temperature=0.9, top_p=0.9)
    held = [
        [{"role": "user", "content": f"What is {a} + 1?"}, {"role": "assistant", "content": f"#### {a + 1}"}]
        for a in range(5)
    ]
    calls = []
    real = rollout

    def spy(*a, **kw):
        result = real(*a, **kw)
        calls.append(result[-1])
        return result

    import grpo

    grpo.rollout = spy
    try:
        for seed in (0, 1):  # two evaluations at different points of the run's random stream
            torch.manual_seed(seed)
            state = torch.get_rng_state()
            heldout_accuracy(model, tok, held, args, 4, samples=3)
            assert torch.equal(torch.get_rng_state(), state)
    finally:
        grpo.rollout = real
    half = len(calls) // 2
    assert calls[:half] == calls[half:] and sum(len(t) for t in calls[:half]) == 15  # 5 questions x 3 answers
    assert len({t for texts in calls for t in texts}) > 1  # sampled, not one answer repeated
