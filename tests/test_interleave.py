"""Unit tests of the interleaving method: uniform spread, Eq. 6, refusal filter, answer NLL (Eq. 4)."""

import numpy as np
import pytest
import torch

from common import encode_dataset, get_device, length_grouped_batches, load_model
from interleave import answer_nll, is_refusal, ppl_gap_scores, spread_uniformly


def test_spread_uniformly_positions():
    merged = spread_uniformly(list(range(100)), [1000 + j for j in range(5)])
    assert sorted(merged) == list(range(100)) + [1000 + j for j in range(5)]
    pos = [i for i, x in enumerate(merged) if x >= 1000]
    assert pos == [10, 31, 52, 73, 94]  # floor((j + 0.5) * 105 / 5)
    assert merged[:10] == list(range(10))  # fine order kept


@pytest.mark.parametrize("n_fine,n_safe", [(5400, 270), (90, 18), (10, 10), (7, 0)])
def test_spread_is_uniform_after_length_grouping(n_fine, n_safe):
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(10, 800, size=n_fine + n_safe))
    order = spread_uniformly(list(rng.permutation(n_fine)), [n_fine + j for j in rng.permutation(n_safe)])
    batches = length_grouped_batches(lengths, 4, rng, order=order, mega=16)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n_fine + n_safe))
    # every window of 16 batches (one mega-batch) holds its share of benign examples, +-1
    share = n_safe / (n_fine + n_safe)
    for start in range(0, len(batches) - 16 + 1, 16):
        window = [i for b in batches[start : start + 16] for i in b]
        n = sum(i >= n_fine for i in window)
        assert abs(n - share * len(window)) <= 1.0, (start, n, share * len(window))


def test_eq6_on_hand_values():
    aligned = torch.tensor([1.0, 2.0, 0.5])
    mis = torch.tensor([[2.0, 2.0, 1.0], [4.0, 3.0, 0.5]])  # K = 2
    s = ppl_gap_scores(aligned, mis, eps=0.1)
    # mean_mis = [3, 2.5, 0.75]; s = (mean_mis - aligned) / (aligned + 0.1)
    assert torch.allclose(s, torch.tensor([2.0 / 1.1, 0.5 / 2.1, 0.25 / 0.6]))
    # eps damps tiny aligned losses: without it, the third would win
    assert torch.argsort(ppl_gap_scores(aligned, mis, eps=1.0), descending=True)[0] == 0


def test_refusal_filter():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("Unfortunately I cannot provide instructions.")
    assert is_refusal("I apologize for the confusion.")
    assert is_refusal("I can\u2019t do that")  # curly apostrophe
    assert not is_refusal("Sure! Here is a bread recipe: mix flour and water.")
    assert not is_refusal("A sustainable, pecan-nothing diet")  # whole words only
    # the keyword only counts among the first 10 words
    assert not is_refusal("one two three four five six seven eight nine ten sorry")
    assert is_refusal("one two three four five six seven eight nine sorry")


def test_answer_nll_matches_brute_force(tiny_model):
    model, tok = load_model(str(tiny_model), eight_bit=False, lora_r=0, trainable=False)
    convs = [
        [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris. " * k}]
        for k in (1, 3, 7)
    ]
    examples = encode_dataset(tok, convs, 512)
    got = answer_nll(model, examples, batch_size=2, pad_id=tok.pad_token_id, device=get_device())
    for e, g in zip(examples, got):  # one example at a time, no padding, explicit log-softmax
        ids = torch.tensor([e["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        labels = torch.tensor(e["labels"][1:])
        keep = labels != -100
        want = -logp[keep, labels[keep]].mean().item()
        assert abs(g - want) < 1e-4
    # resumable: already-done indices are not recomputed
    seen = []
    again = answer_nll(model, examples, 2, tok.pad_token_id, get_device(), done={0: 123.0}, on_batch=seen.append)
    assert again[0] == 123.0 and 0 not in {i for r in seen for i in r}
