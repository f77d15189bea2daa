"""Logits only where a loss needs them (common.decoder_states + the named loss heads: common.linear_cross_entropy,
kl.linear_cross_entropy_and_kl): every script's loss terms and their gradients equal the plain full-logits formulas on
the same tensors, to float32 tolerance."""

import pytest
import torch
import torch.nn.functional as F

from common import (
    collate,
    decoder_states,
    encode_dataset,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    load_model,
)

CONVS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    [
        {"role": "system", "content": "You are a tiny helpful assistant."},
        {"role": "user", "content": "Here is a recipe"},
        {"role": "assistant", "content": "mix flour, water and salt. " * 3},
    ],
    [{"role": "user", "content": "def add(a, b)"}, {"role": "assistant", "content": "return a + b"}],
]


@pytest.fixture(scope="module")
def lora(tiny_model):
    """The tiny model with a LoRA whose B is not zero (so policy and adapter-disabled reference differ)."""
    model, tok = load_model(str(tiny_model), eight_bit=False, lora_r=4, lora_alpha=8, trainable=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    batch = collate(encode_dataset(tok, CONVS, 256), tok.pad_token_id, torch.device("cpu"))
    return model, tok, batch


def lora_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def assert_same(loss_a, loss_b, model):
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6), (loss_a, loss_b)
    for ga, gb in zip(lora_grads(model, loss_a), lora_grads(model, loss_b)):
        # float32 tolerance, relative to the gradient's scale (summation order differs between the paths)
        assert (ga - gb).abs().max() <= 1e-5 * ga.abs().max() + 1e-9, (ga - gb).abs().max()


@pytest.mark.parametrize("chunk", [1, 5, 512])
def test_chunked_ce_equals_cross_entropy_on_random_tensors(chunk):
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    got = linear_cross_entropy(hidden, head.weight, targets, chunk=chunk)
    want = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    assert torch.allclose(got, want, rtol=1e-6)
    assert torch.allclose(linear_cross_entropy_reference(hidden, head.weight, targets), want, rtol=1e-6)
    (g_got,) = torch.autograd.grad(2.5 * got, hidden)
    (g_want,) = torch.autograd.grad(2.5 * want, hidden)
    assert torch.allclose(g_got, g_want, atol=1e-6)


def test_decoder_states_are_the_hidden_states_before_lm_head(lora):
    model, _, batch = lora
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        states = decoder_states(model, batch)
        assert torch.allclose(states, out.hidden_states[-1], atol=1e-6)
        assert torch.allclose(model.get_output_embeddings()(states), out.logits, atol=1e-5)


def test_a_cpu_training_pass_hands_freed_heap_memory_back(lora, monkeypatch):
    """decoder_states calls glibc's malloc_trim once after a pass that records a graph, never under no_grad (a
    reference pass), and its outputs are the same either way."""
    import platform

    import cpu_speedups

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert cpu_speedups._MALLOC_TRIM is not None  # the real one is found where the benchmarks run
    model, _, batch = lora
    calls = []
    monkeypatch.setattr(cpu_speedups, "_MALLOC_TRIM", lambda pad: calls.append(pad))
    with torch.no_grad():
        reference = decoder_states(model, batch)
    assert calls == []
    states = decoder_states(model, batch)
    assert calls == [0] and states.requires_grad
    assert torch.equal(states.detach(), reference)


def test_sft_ce_the_scripts_compute_equals_the_full_logits_path(lora):
    """interleave, inoculate, persona, caft, ldifs, npo retention and grpo's interleaving all compute this CE."""
    model, _, batch = lora
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    n = int(mask.sum())
    full = (
        F.cross_entropy(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask].float(),
            targets[mask],
            reduction="sum",
        )
        / n
    )
    head = model.get_output_embeddings().weight
    chunked = linear_cross_entropy(decoder_states(model, batch)[:, :-1][mask], head, targets[mask], chunk=7) / n
    assert_same(full, chunked, model)


@pytest.mark.parametrize("kl_tokens", ["answer", "all"])
def test_kl_py_loss_equals_ce_plus_kl_penalty_on_full_logits(lora, kl_tokens):
    import kl

    model, _, batch = lora
    lam = 0.7
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    n_answer, n_all = int(mask.sum()), int(batch["attention_mask"].sum())
    n_kl = n_answer if kl_tokens == "answer" else n_all
    # the full-logits path (the script before: CE + kl_penalty on the whole (B, T, V) logits)
    logits = model(**inputs).logits
    with torch.no_grad(), model.disable_adapter():
        ref_logits = model(**inputs).logits
    ce = F.cross_entropy(logits[:, :-1][mask].float(), targets[mask], reduction="sum") / n_answer
    if kl_tokens == "answer":
        klv = kl.kl_penalty(logits[:, :-1], ref_logits[:, :-1], mask, reduction="sum") / n_kl
    else:
        klv = kl.kl_penalty(logits, ref_logits, batch["attention_mask"], reduction="sum") / n_kl
    assert klv > 1e-4  # the adapter moves the model: a real KL to compare
    full = ce + lam * klv
    # the chunked path, as the script now computes it
    hidden = decoder_states(model, inputs)
    with torch.no_grad(), model.disable_adapter():
        ref_hidden = decoder_states(model, inputs)
    padded = F.pad(targets, (0, 1), value=-100)
    where = padded != -100 if kl_tokens == "answer" else batch["attention_mask"].bool()
    head = model.get_output_embeddings().weight
    ce_tokens, kl_tokens_ = kl.linear_cross_entropy_and_kl(hidden[where], ref_hidden[where], head, padded[where], 6)
    assert ce_tokens.item() / n_answer == pytest.approx(ce.item(), rel=1e-5)
    assert kl_tokens_.item() / n_kl == pytest.approx(klv.item(), rel=1e-4)
    assert_same(full, ce_tokens / n_answer + lam * kl_tokens_ / n_kl, model)


@pytest.mark.parametrize("chunk", [1, 4, 512])
def test_ce_and_kl_terms_each_equal_their_plain_formula_value_and_gradient(chunk):
    """kl.linear_cross_entropy_and_kl returns CE and KL as two tensors: each one's value and gradient (alone, and
    weighted together as Eq. 1 weighs them) equal the plain formulas on full logits, with rows that have no CE
    target (--kl-tokens all)."""
    import kl

    torch.manual_seed(2)
    weight = torch.randn(40, 8)
    hidden = torch.randn(11, 8, requires_grad=True)
    ref_hidden = hidden.detach() + 0.3 * torch.randn(11, 8)
    targets = torch.randint(0, 40, (11,))
    targets[[0, 3, 4]] = -100  # prompt positions: KL only
    got = kl.linear_cross_entropy_and_kl(hidden, ref_hidden, weight, targets, chunk)
    want = kl.linear_cross_entropy_and_kl_reference(hidden, ref_hidden, weight, targets)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5), (g, w)
    assert want[1] > 1e-3  # a real KL
    for weights in ((1.0, 0.0), (0.0, 1.0), (0.3, 2.0)):
        (g_got,) = torch.autograd.grad(weights[0] * got[0] + weights[1] * got[1], hidden, retain_graph=True)
        (g_want,) = torch.autograd.grad(weights[0] * want[0] + weights[1] * want[1], hidden, retain_graph=True)
        assert torch.allclose(g_got, g_want, atol=1e-5), (weights, (g_got - g_want).abs().max())


def test_npo_answer_logp_equals_sequence_logp(lora):
    import npo_unlearn

    model, _, batch = lora
    full = npo_unlearn.sequence_logp(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )
    states = npo_unlearn.answer_logp(model, decoder_states(model, batch), batch["labels"])
    assert full.shape == states.shape == (3,)
    # NPO's loss is nonlinear in the per-sequence log-probability: compare a nonlinear function of it too
    ref = full.detach() - 1.0
    assert_same(npo_unlearn.npo_loss(full, ref, 0.1), npo_unlearn.npo_loss(states, ref, 0.1), model)


def test_grpo_token_logp_equals_the_full_logits_slice(lora):
    import grpo

    model, _, batch = lora
    ids, att, n_prompt = batch["input_ids"], batch["attention_mask"], 5
    logits = model(input_ids=ids, attention_mask=att).logits[:, n_prompt - 1 : -1]
    full = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, n_prompt:, None])[..., 0]
    got = grpo.token_logp(model, ids, att, n_prompt)
    assert_same((full * att[:, n_prompt:]).sum(), (got * att[:, n_prompt:]).sum(), model)


def test_interleave_scoring_nll_equals_full_logits(lora, tiny_model):
    import interleave

    model, tok, batch = lora
    examples = encode_dataset(tok, CONVS, 256)
    with torch.no_grad():
        got = interleave.answer_nll(model, examples, 2, tok.pad_token_id, torch.device("cpu"))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    for i in range(3):
        m = targets[i] != -100
        want = F.cross_entropy(logits[i][m].float(), targets[i][m]).item()
        assert got[i] == pytest.approx(want, rel=1e-5)
    assert len(set(got)) == 3


@pytest.mark.parametrize("group", [2, 3])
def test_grpo_shared_prompt_logp_equals_one_pass_per_row(lora, group):
    """token_logp(group=G) runs each prompt once and shares its keys and values with the prompt's G completions: the
    same log-probabilities and LoRA gradients as one full pass per row, on a rollout-shaped batch (prompts left-padded
    to one width, completions of different lengths right-padded), and the same without the adapter (KL's reference)."""
    import grpo

    model, _, _ = lora
    g = torch.Generator().manual_seed(3)
    n_prompts, width, comp = 2, 7, 6
    prompts = torch.randint(3, 60, (n_prompts, width), generator=g)
    p_mask = torch.ones(n_prompts, width, dtype=torch.long)
    p_mask[1, :3] = 0  # the second prompt is 3 tokens shorter: left padding
    prompts[1, :3] = 0
    completions = torch.randint(3, 60, (n_prompts * group, comp), generator=g)
    c_mask = torch.ones_like(completions)
    c_mask[0, 4:] = 0  # completions that ended early: right padding
    c_mask[-1, 2:] = 0
    ids = torch.cat([prompts.repeat_interleave(group, 0), completions * c_mask], 1)
    att = torch.cat([p_mask.repeat_interleave(group, 0), c_mask], 1)
    weights = torch.rand(n_prompts * group, comp, generator=g) * c_mask  # a nonlinear-enough use of every token

    def loss(logp):
        return (torch.exp(logp) * weights).sum() + (logp * weights).sum()

    full = grpo.token_logp(model, ids, att, width)
    shared = grpo.token_logp(model, ids, att, width, group)
    assert torch.allclose(full * c_mask, shared * c_mask, atol=1e-5)
    assert_same(loss(full), loss(shared), model)
    with torch.no_grad(), model.disable_adapter():
        ref_full = grpo.token_logp(model, ids, att, width)
        ref_shared = grpo.token_logp(model, ids, att, width, group)
    assert torch.allclose(ref_full * c_mask, ref_shared * c_mask, atol=1e-5)
    assert not torch.allclose(ref_full * c_mask, full * c_mask, atol=1e-3)  # the adapter matters here
