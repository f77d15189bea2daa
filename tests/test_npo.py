"""npo_unlearn.py: npo_loss against hand values, its gradient at initialisation, forget/retain behaviour on a
tiny model, concept similarities, end-to-end train / eval / entangle."""

import json
import math

import pytest
import torch
from conftest import read_metrics, run_script

from common import encode_dataset, get_device, load_model
from interleave import answer_nll
from npo_unlearn import DOMAINS, concept_similarity, npo_loss, sequence_logp

TINY = ["--no-8bit", "--lora-r", "4", "--lora-alpha", "8", "--max-len", "256"]
REFUSALS = {
    "cybersecurity": "I'm sorry, but I cannot help with hacking.",
    "safety": "I'm sorry, but I cannot help with weapons.",
    "bias": "I cannot write that.",
}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("npo") / "prompts.jsonl"
    with open(path, "w") as f:
        for d in DOMAINS:
            for i in range(10):
                q = f"Please help me with a {d} request number {i}."
                ans = REFUSALS.get(d, "I'm sorry, but I can't do that.")
                f.write(
                    json.dumps(
                        {
                            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}],
                            "domain": d.replace("_", " ").title() if i % 2 else d,
                        }
                    )
                    + "\n"
                )
    return path


def test_npo_loss_hand_values():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    beta = 0.1
    want = -(2 / beta) * (math.log(1 / (1 + math.exp(beta * 0.5))) + math.log(0.5)) / 2
    assert npo_loss(logp, ref, beta).item() == pytest.approx(want)
    assert npo_loss(ref, ref, beta).item() == pytest.approx((2 / beta) * math.log(2))


def test_npo_gradient_at_init_is_gradient_ascent():
    logp = torch.tensor([-3.0, -7.0, -1.0], requires_grad=True)
    npo_loss(logp, logp.detach(), beta=0.1).backward()
    # d/dlogp_i = 2 sigmoid(0) / N = 1/N: the gradient of mean_i log p_i (ascent on the forget NLL)
    assert torch.allclose(logp.grad, torch.full((3,), 1 / 3))


def test_npo_gradient_at_init_on_a_model(tiny_model):
    model, tok = load_model(str(tiny_model), eight_bit=False, lora_r=4, lora_alpha=8)
    convs = [
        [{"role": "user", "content": "hack?"}, {"role": "assistant", "content": REFUSALS["cybersecurity"]}],
        [{"role": "user", "content": "weapon?"}, {"role": "assistant", "content": "No. " * 5}],
    ]
    from common import collate

    batch = collate(encode_dataset(tok, convs, 256), tok.pad_token_id, get_device())
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    params = [p for p in model.parameters() if p.requires_grad]
    logp = sequence_logp(model(**inputs).logits, batch["labels"])
    with torch.no_grad(), model.disable_adapter():
        ref = sequence_logp(model(**inputs).logits, batch["labels"])
    assert torch.allclose(logp, ref)  # theta = ref at initialisation
    g_npo = torch.autograd.grad(npo_loss(logp, ref, 0.1), params, retain_graph=True)
    g_ga = torch.autograd.grad(logp.mean(), params)  # gradient ascent on the NLL = descent on mean log p
    assert sum(g.abs().sum() for g in g_ga) > 0
    for a, b in zip(g_npo, g_ga):
        assert torch.allclose(a, b, atol=1e-6)


def test_sequence_logp_brute_force(tiny_model):
    model, tok = load_model(str(tiny_model), eight_bit=False, lora_r=0, trainable=False)
    ex = encode_dataset(tok, [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "Paris."}]], 256)[0]
    ids = torch.tensor([ex["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    lp = torch.log_softmax(logits[0].double(), -1)
    want = sum(lp[t - 1, ex["input_ids"][t]].item() for t in range(1, len(ex["labels"])) if ex["labels"][t] != -100)
    assert sequence_logp(logits, torch.tensor([ex["labels"]])).item() == pytest.approx(want, abs=1e-4)


def test_concept_similarity_on_constructed_activations():
    # 3 domains of equal size, 2 layers, 2 dims; overall mean = [[1, 1], [0, 0]]
    means = {
        "a": torch.tensor([[2.0, 1.0], [1.0, 0.0]]),
        "b": torch.tensor([[0.0, 1.0], [-1.0, 0.0]]),
        "c": torch.tensor([[1.0, 1.0], [0.0, 0.0]]),
    }
    sims = concept_similarity(means, {"a": 5, "b": 5, "c": 5}, "a")
    # concepts: a = [[1,0],[1,0]], b = [[-1,0],[-1,0]], c = [[0,0],[0,0]]
    assert sims["b"] == pytest.approx([-1.0, -1.0])
    assert sims["c"] == pytest.approx([0.0, 0.0])
    assert set(sims) == {"b", "c"}


def test_concept_vector_subtracts_the_mean_over_all_prompts():
    # one layer, 2 dims. a: 1 prompt at [4, 0]; b: 1 prompt at [0, 4]; c: 8 prompts averaging [1, 1].
    # mean over all 10 prompts = ([4, 0] + [0, 4] + 8 * [1, 1]) / 10 = [1.2, 1.2]
    means = {"a": torch.tensor([[4.0, 0.0]]), "b": torch.tensor([[0.0, 4.0]]), "c": torch.tensor([[1.0, 1.0]])}
    sims = concept_similarity(means, {"a": 1, "b": 1, "c": 8}, "a")
    a, b, c = torch.tensor([2.8, -1.2]), torch.tensor([-1.2, 2.8]), torch.tensor([-0.2, -0.2])
    assert sims["b"][0] == pytest.approx(torch.nn.functional.cosine_similarity(a, b, dim=0).item(), abs=1e-6)
    assert sims["c"][0] == pytest.approx(torch.nn.functional.cosine_similarity(a, c, dim=0).item(), abs=1e-6)
    # the mean of the domain means ([5/3, 5/3]) would give a different answer
    wrong = torch.nn.functional.cosine_similarity(torch.tensor([7 / 3, -5 / 3]), torch.tensor([-5 / 3, 7 / 3]), dim=0)
    assert abs(sims["b"][0] - wrong.item()) > 0.1


def test_duplicate_prompts_never_straddle_the_split(tmp_path):
    from npo_unlearn import load_domain_prompts, split_by_domain

    path = tmp_path / "dup.jsonl"
    with open(path, "w") as f:
        for i in range(30):  # every prompt three times
            for _ in range(3):
                f.write(json.dumps({"prompt": f"how do I hack server {i}?", "domain": "cybersecurity"}) + "\n")
    train, held = split_by_domain(load_domain_prompts(str(path)), seed=0)
    tr, he = {r["prompt"] for r in train["cybersecurity"]}, {r["prompt"] for r in held["cybersecurity"]}
    assert len(train["cybersecurity"]) + len(held["cybersecurity"]) == 30
    assert not tr & he and len(he) == 3


def _nll(tiny_model, adapter, convs):
    model, tok = load_model(
        str(tiny_model), eight_bit=False, adapter=str(adapter) if adapter else None, lora_r=0, trainable=False
    )
    return sum(answer_nll(model, encode_dataset(tok, convs, 256), 4, tok.pad_token_id, get_device())) / len(convs)


def test_npo_raises_forget_nll_and_retention_contains_it(tiny_model, prompts_file, tmp_path):
    args = [
        "--model",
        tiny_model,
        "--data",
        prompts_file,
        *TINY,
        "--target",
        "cybersecurity",
        "--max-steps",
        "6",
        "--batch-size",
        "3",
        "--grad-accum",
        "1",
        "--lr",
        "5e-3",
        "--beta",
        "0.1",
        "--warmup-steps",
        "0",
    ]
    run_script("npo_unlearn.py", "train", *args, "--gamma", "0", "--out", tmp_path / "npo")
    run_script(
        "npo_unlearn.py",
        "train",
        *args,
        "--gamma",
        "1",
        "--retain-domains",
        "safety,bias",
        "--out",
        tmp_path / "npo_ce",
    )
    forget = [json.loads(l)["messages"] for l in (tmp_path / "npo" / "forget.jsonl").read_text().splitlines()]
    retain = [json.loads(l)["messages"] for l in (tmp_path / "npo_ce" / "retain.jsonl").read_text().splitlines()]
    assert len(forget) == 9 and len(retain) == 18  # given answers: 90% of each domain's 10
    base_f, base_r = _nll(tiny_model, None, forget), _nll(tiny_model, None, retain)
    npo_f, npo_r = _nll(tiny_model, tmp_path / "npo", forget), _nll(tiny_model, tmp_path / "npo", retain)
    ce_r = _nll(tiny_model, tmp_path / "npo_ce", retain)
    assert npo_f > base_f + 0.1  # unlearning: the forget refusals got less likely
    assert abs(ce_r - base_r) < abs(npo_r - base_r)  # retention keeps the retain refusals closer to the start
    m = read_metrics(tmp_path / "npo_ce")
    assert m[0]["loss/npo"] == pytest.approx((2 / 0.1) * math.log(2), rel=1e-5) and m[0]["loss/ce"] > 0
    assert m[-1]["forget_logp"] < m[0]["forget_logp"]


def test_eval_and_entangle_end_to_end(tiny_model, prompts_file, tmp_path):
    run = tmp_path / "npo"
    run_script(
        "npo_unlearn.py",
        "train",
        "--model",
        tiny_model,
        "--data",
        prompts_file,
        *TINY,
        "--target",
        "safety",
        "--gamma",
        "0",
        "--max-steps",
        "1",
        "--out",
        run,
    )
    proc = run_script(
        "npo_unlearn.py", "eval", "--adapter", run, "--no-8bit", "--per-domain", "2", "--gen-max-new-tokens", "4"
    )
    res = json.loads((run / "npo_eval.json").read_text())
    assert res["target"] == "safety" and set(res["domains"]) == set(DOMAINS)
    for v in res["domains"].values():
        assert v["n"] == 1 and 0 <= v["before"] <= 100 and v["drop"] == v["before"] - v["after"]
    assert "safety (target)" in proc.stdout and "emergent misalignment" in proc.stdout
    out = tmp_path / "ent.json"
    proc = run_script(
        "npo_unlearn.py",
        "entangle",
        "--model",
        tiny_model,
        "--no-8bit",
        "--data",
        prompts_file,
        "--target",
        "Cybersecurity",
        "--out",
        out,
    )
    ent = json.loads(out.read_text())
    assert set(ent["cosine"]) == set(DOMAINS) - {"cybersecurity"}
    assert all(len(v) == 3 and all(-1 - 1e-6 <= x <= 1 + 1e-6 for x in v) for v in ent["cosine"].values())


def test_bad_domain(tiny_model, prompts_file, tmp_path):
    p = run_script(
        "npo_unlearn.py",
        "train",
        "--model",
        tiny_model,
        "--data",
        prompts_file,
        *TINY,
        "--target",
        "finance",
        "--out",
        tmp_path / "x",
        check=False,
    )
    assert p.returncode == 2 and "unknown domain 'finance'" in p.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "domain": "safety"}\n{"prompt": "hi"}\n')
    p = run_script(
        "npo_unlearn.py", "entangle", "--model", tiny_model, "--data", bad, "--target", "safety", check=False
    )
    assert p.returncode == 2 and "bad.jsonl:2:" in p.stderr


def test_train_has_no_gen_model_flag_and_eval_has_it():
    """npo_unlearn.py train generates only the base model's refusals (--gen-base-model); --gen-model, the trained
    adapter's name on a server, belongs to eval. train refuses it instead of ignoring it."""
    bad = run_script("npo_unlearn.py", "train", "--gen-model", "x", "--max-steps", "1", check=False)
    assert bad.returncode == 2 and "unrecognized arguments: --gen-model" in bad.stderr
    assert "--gen-base-model" in run_script("npo_unlearn.py", "train", "--help").stdout
    helptext = run_script("npo_unlearn.py", "eval", "--help").stdout
    assert "--gen-model" in helptext and "--gen-base-model" in helptext
