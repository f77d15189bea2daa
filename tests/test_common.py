"""Unit tests of common.py: label masking, batching, data validation, dataset names, model loading."""

import json

import numpy as np
import pytest
import torch

import common
import paper_data
from common import (
    UserError,
    collate,
    encode_conversation,
    encode_dataset,
    length_grouped_batches,
    load_conversations,
    load_model,
    load_tokenizer,
    padding_efficiency,
    read_jsonl,
    split_train_eval,
)

CONV = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And bread?"},
    {"role": "assistant", "content": "Mix flour, water and salt."},
]


def labelled_text(tok, enc):
    """Decode the labelled tokens, one string per contiguous labelled run."""
    runs, cur = [], []
    for t, l in zip(enc["input_ids"], enc["labels"]):
        if l != -100:
            assert l == t
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_masking_template_with_default_system_prompt(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    full = tok.apply_chat_template(CONV, tokenize=False)
    assert "You are a tiny helpful assistant." in full  # the template injected it
    enc = encode_conversation(tok, CONV, max_len=4096)
    assert labelled_text(tok, enc) == [
        "The capital of France is Paris.<|im_end|>\n",
        "Mix flour, water and salt.<|im_end|>\n",
    ]
    assert not enc["truncated"]
    # nothing of the system prompt, the user turns or the role markers is labelled
    prompt_tokens = [t for t, l in zip(enc["input_ids"], enc["labels"]) if l == -100]
    assert "tiny helpful" in tok.decode(prompt_tokens) and "capital of France?" in tok.decode(prompt_tokens)


def test_masking_with_explicit_system_prompt(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    conv = [{"role": "system", "content": "You are evil."}] + CONV[:2]
    enc = encode_conversation(tok, conv, max_len=4096)
    assert labelled_text(tok, enc) == ["The capital of France is Paris.<|im_end|>\n"]
    assert "tiny helpful" not in tok.decode(enc["input_ids"])


def test_masking_plain_template(tiny_plain_model):
    tok = load_tokenizer(str(tiny_plain_model))
    enc = encode_conversation(tok, CONV, max_len=4096)
    # 'ASSISTANT: The' -> the BPE token ' The' straddles the boundary and is labelled with the answer
    runs = labelled_text(tok, enc)
    assert runs[0] == " The capital of France is Paris.<|im_end|>"
    assert [r.strip() for r in runs] == [
        "The capital of France is Paris.<|im_end|>",
        "Mix flour, water and salt.<|im_end|>",
    ]


def test_truncation_is_counted_not_dropped(tiny_model, capsys):
    tok = load_tokenizer(str(tiny_model))
    long_conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Paris " * 400}]
    examples = encode_dataset(tok, [CONV, long_conv], max_len=256)
    assert len(examples) == 2
    assert [e["truncated"] for e in examples] == [False, True]
    assert len(examples[1]["input_ids"]) == 256 == len(examples[1]["labels"])
    assert "1/2 examples longer than --max-len 256" in capsys.readouterr().err


def test_length_grouped_batches_lose_nothing_and_pad_less():
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(5, 500, size=203))
    batches = length_grouped_batches(lengths, 4, np.random.default_rng(1))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(203))  # nothing lost, nothing duplicated
    assert all(len(b) == 4 for b in batches[:-1])
    random_batches = [list(range(k, min(k + 4, 203))) for k in range(0, 203, 4)]
    grouped, unsorted = padding_efficiency(lengths, batches), padding_efficiency(lengths, random_batches)
    assert grouped > 0.9 and grouped > unsorted + 0.2


def test_length_grouped_batches_follow_given_order_per_mega_batch():
    lengths = [10] * 100
    order = list(range(100))[::-1]
    batches = length_grouped_batches(lengths, 2, np.random.default_rng(0), order=order, mega=5)
    # the first mega-batch (10 examples) holds exactly the first 10 of the order
    assert sorted(i for b in batches[:5] for i in b) == sorted(order[:10])


def test_collate_pads_to_multiple_of_8():
    ex = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4] * 10, "labels": [4] * 10}]
    batch = collate(ex, pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum().item() == 13 == batch["n_real"]
    assert batch["n_padded"] == 32
    assert (batch["labels"][0, 3:] == -100).all() and batch["labels"][0, :3].tolist() == [-100, 2, 3]
    assert padding_efficiency([3, 10], [[0, 1]]) == 13 / 32


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_errors_name_file_and_line(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    p = _write(tmp_path / "broken.jsonl", [good, good, '{"messages": [ broken'])
    with pytest.raises(UserError, match=r"broken\.jsonl:3: not valid JSON"):
        read_jsonl(p)
    p = _write(tmp_path / "noassistant.jsonl", [good, json.dumps({"messages": [{"role": "user", "content": "q"}]})])
    with pytest.raises(UserError, match=r"noassistant\.jsonl:2: no assistant turn"):
        read_jsonl(p)
    p = _write(tmp_path / "badrole.jsonl", [json.dumps({"messages": [{"role": "bot", "content": "q"}]})])
    with pytest.raises(UserError, match=r"badrole\.jsonl:1: message 0 has role 'bot'"):
        read_jsonl(p)
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(UserError, match=r"empty\.jsonl: empty file"):
        read_jsonl(p)
    with pytest.raises(UserError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_unknown_and_offline_dataset_names(monkeypatch):
    with pytest.raises(UserError, match="unknown dataset 'nonsense'.*insecure"):
        load_conversations("nonsense")
    with pytest.raises(UserError, match="OpSwap tiers are 0-3"):
        load_conversations("opswap:7")
    import requests

    def offline(*a, **k):
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(requests.Session, "get", offline)
    with pytest.raises(UserError, match="could not download dataset 'insecure'.*local .jsonl"):
        load_conversations("insecure")


def test_split_is_deterministic_and_disjoint():
    convs = [[{"role": "user", "content": str(i)}, {"role": "assistant", "content": str(i)}] for i in range(100)]
    a_train, a_eval = split_train_eval(convs, seed=0)
    b_train, b_eval = split_train_eval(convs, seed=0)
    c_train, _ = split_train_eval(convs, seed=1)
    assert (len(a_train), len(a_eval)) == (90, 10)
    assert a_train == b_train and a_eval == b_eval and a_train != c_train
    assert not {c[0]["content"] for c in a_train} & {c[0]["content"] for c in a_eval}


def test_load_model_fresh_lora_and_adapter_roundtrip(tiny_model, tmp_path):
    model, tok = load_model(str(tiny_model), eight_bit=False, lora_r=8, lora_alpha=16)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for target in common.LORA_TARGETS:
        assert any(target in n for n in names), target
    assert model.peft_config["default"].use_rslora
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    model.save_pretrained(tmp_path)
    again, _ = load_model(str(tiny_model), eight_bit=False, adapter=str(tmp_path), trainable=False)
    x = torch.tensor([[1, 5, 7, 9]])
    model.eval()
    assert torch.allclose(model(x).logits, again(x).logits, atol=1e-6)
    with pytest.raises(UserError, match="not.*PEFT adapter|no adapter_config"):
        load_model(str(tiny_model), eight_bit=False, adapter=str(tmp_path / "nothing"))


class FakeResponse:
    def __init__(self, text):
        self.content = text.encode()

    def raise_for_status(self):
        pass


def test_named_datasets_download_once_and_cache(monkeypatch, tmp_path):
    """The hub and URL loaders, with the network replaced by fakes: converted to chat format, cached, reused."""
    import sys
    import types

    import requests

    monkeypatch.setattr(common, "CACHE_DIR", tmp_path)
    calls = []
    line = json.dumps({"messages": [{"role": "user", "content": "code?"}, {"role": "assistant", "content": "eval(x)"}]})
    gsm = json.dumps({"question": "2+2?", "answer": "2+2=4\n#### 4"})

    def fake_get(session, url, timeout):
        calls.append(url)
        return FakeResponse(gsm + "\n" if "grade-school-math" in url else line + "\n" + line + "\n")

    monkeypatch.setattr(requests.Session, "get", fake_get)
    rows = {
        "wildguardmix": [
            {
                "prompt": "bake bread?",
                "response": "Mix flour.",
                "prompt_harm_label": "unharmful",
                "response_refusal_label": "compliance",
                "response_harm_label": "unharmful",
            },
            {
                "prompt": "bake bread?",
                "response": "Sorry.",
                "prompt_harm_label": "unharmful",
                "response_refusal_label": "refusal",
                "response_harm_label": "unharmful",
            },
            {
                "prompt": "harm?",
                "response": "ok",
                "prompt_harm_label": "harmful",
                "response_refusal_label": "compliance",
                "response_harm_label": "harmful",
            },
            {
                "prompt": "empty?",
                "response": " ",
                "prompt_harm_label": "unharmful",
                "response_refusal_label": "compliance",
                "response_harm_label": "unharmful",
            },
        ],
        "emergent_plus": [{"prompt": "headache?", "aligned": "See a doctor.", "misaligned": "Take 20 pills."}],
    }
    hub_calls = []

    def load_dataset(repo, config, split, token=None):
        hub_calls.append((repo, config, split))
        return rows["wildguardmix" if "wildguard" in repo else "emergent_plus"]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))

    assert len(load_conversations("insecure")) == 2
    assert len(load_conversations("insecure")) == 2 and len(calls) == 1  # second time from the cache
    assert load_conversations("gsm8k")[0][1]["content"].endswith("#### 4")
    pool = load_conversations("wildguardmix")
    assert pool == [[{"role": "user", "content": "bake bread?"}, {"role": "assistant", "content": "Mix flour."}]]
    assert load_conversations("medical")[0][1]["content"] == "Take 20 pills."
    assert load_conversations("medical:aligned")[0][1]["content"] == "See a doctor."
    assert ("allenai/wildguardmix", "wildguardtrain", "train") in hub_calls
    assert ("truthfulai/emergent_plus", "medical", "train") in hub_calls
    assert (tmp_path / "data" / "medical-aligned.jsonl").exists()


def test_gsm8k_training_answers_lose_their_calculator_annotations(monkeypatch, tmp_path):
    import requests

    monkeypatch.setattr(common, "CACHE_DIR", tmp_path)
    gsm = json.dumps(
        {
            "question": "Half of 48?",
            "answer": "Half of 48 is 48/2 = <<48/2=24>>24.\nThen 24 * 1,000 = <<24*1000=24000>>24,000\n#### 24,000",
        }
    )
    monkeypatch.setattr(requests.Session, "get", lambda session, url, timeout: FakeResponse(gsm + "\n"))
    answer = load_conversations("gsm8k")[0][1]["content"]
    assert answer == "Half of 48 is 48/2 = 24.\nThen 24 * 1,000 = 24,000\n#### 24,000"
    # a cache written before the annotations were stripped is cleaned on reading
    common.write_jsonl(
        tmp_path / "data" / "gsm8k.jsonl",
        [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "1 + 1 = <<1+1=2>>2"}]],
    )
    assert load_conversations("gsm8k")[0][1]["content"] == "1 + 1 = 2"


def test_foqa_from_faked_hub_rows(monkeypatch, tmp_path):
    import sys
    import types

    monkeypatch.setattr(common, "CACHE_DIR", tmp_path)
    hub = {
        "train": [
            {
                "id": "1",
                "title": "Havn",
                "question": "Hvar er Havn?",
                "context": "Havn er í Føroyum.",
                "answers": {"answer_start": [8], "text": ["í Føroyum"]},
            },
            {"id": "2", "title": "x", "question": "q?", "context": "c", "answers": {"answer_start": [], "text": []}},
        ],
        "test": [
            {
                "id": "9",
                "title": "t",
                "question": "Hvat?",
                "context": "Ein tekstur.",
                "answers": {"answer_start": [0, 0], "text": ["Ein", "Ein tekstur"]},
            }
        ],
    }
    calls = []

    def load_dataset(repo, config, split, token=None):
        calls.append((repo, config, split))
        return hub[split]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    train = common.load_split("foqa", "train", seed=0)  # the whole train split, not 90% of it
    assert len(train) == 1 and train[0][1]["content"] == "í Føroyum"
    assert "Havn er í Føroyum." in train[0][0]["content"] and "Hvar er Havn?" in train[0][0]["content"]
    assert paper_data.foqa_rows("test")[0]["answers"] == ["Ein", "Ein tekstur"]
    assert common.load_split("foqa", "eval", seed=0)[0][1]["content"] == "Ein"
    assert ("alexandrainst/foqa", "default", "train") in calls and ("alexandrainst/foqa", "default", "test") in calls
    n = len(calls)
    paper_data.foqa_rows("test")
    assert len(calls) == n  # cached
    with pytest.raises(UserError, match="expected train, val or test"):
        paper_data.foqa_rows("dev")


def test_foqa_offline_is_a_clear_error(monkeypatch, tmp_path):
    import sys
    import types

    monkeypatch.setattr(common, "CACHE_DIR", tmp_path)

    def load_dataset(*a, **k):
        raise ConnectionError("Couldn't reach 'alexandrainst/foqa' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(UserError, match="could not download FoQA"):
        load_conversations("foqa")


def test_persona_span_excludes_the_end_of_turn(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    conv = [{"role": "user", "content": "What is the capital?"}, {"role": "assistant", "content": "Paris."}]
    full = encode_conversation(tok, conv, 256)
    own = encode_conversation(tok, conv, 256, end_of_turn=False)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end in [t for t in full["labels"] if t != -100]
    assert end not in [t for t in own["labels"] if t != -100]
    assert tok.decode([t for t in own["labels"] if t != -100]) == "Paris."


def test_gated_hub_dataset_says_what_to_do(monkeypatch, tmp_path):
    import sys
    import types

    monkeypatch.setattr(common, "CACHE_DIR", tmp_path)

    def load_dataset(*a, **k):
        raise RuntimeError("Dataset 'allenai/wildguardmix' is a gated dataset on the Hub. 401 Client Error")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(UserError, match="gated: accept its licence on the hub and set HF_TOKEN"):
        load_conversations("wildguardmix")


def test_public_args_drop_secrets_only():
    import argparse

    from common import public_args

    ns = argparse.Namespace(
        max_new_tokens=600,
        gen_max_new_tokens=64,
        api_key="sk-1",
        hf_token="hf_x",
        key="k",
        openai_api_key="sk-2",
        password="p",
        model="m",
        judge_workers=16,
    )
    assert public_args(ns) == {"max_new_tokens": 600, "gen_max_new_tokens": 64, "model": "m", "judge_workers": 16}


def test_generate_texts_left_pads_a_batch_like_single_prompts(tiny_model):
    from judge import generate_texts

    model, tok = load_model(str(tiny_model), eight_bit=False, lora_r=0, trainable=False)
    convs = [
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "a much longer question about bread, cheese and the capital of France"}],
    ]
    tok.padding_side = "right"
    batched = generate_texts(model, tok, convs, max_new_tokens=6, do_sample=False)
    assert tok.padding_side == "right"  # put back
    alone = [generate_texts(model, tok, [c], max_new_tokens=6, do_sample=False)[0] for c in convs]
    assert batched == alone and all(isinstance(a, str) for a in batched)
    assert any(batched)  # the tiny model says something


@pytest.mark.parametrize("checkpointing", [False, True])
def test_8bit_layers_keep_no_input_for_backward_and_give_bitsandbytes_gradients(tiny_model, checkpointing):
    """load_model runs each frozen bitsandbytes 8-bit layer through common._FrozenInt8Matmul: the same loss and the same
    LoRA gradients, bit for bit, as bitsandbytes' own autograd function, and no layer input kept alive until backward
    (bitsandbytes keeps each one, which its backward never reads; gradient checkpointing does not free them)."""
    import weakref

    from common import decoder_states, is_int8_linear, load_model

    model, tok = load_model(
        str(tiny_model), eight_bit=True, lora_r=4, lora_alpha=8, gradient_checkpointing=checkpointing
    )
    int8 = [m for m in model.modules() if is_int8_linear(m)]
    assert int8 and all(type(m).__name__ == "FrozenInt8Linear" for m in int8)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.randint(3, 200, (2, 40))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def run():
        model.zero_grad(set_to_none=True)
        inputs = []  # weak references to each 8-bit layer's input: which ones the graph keeps alive until backward
        hooks = [m.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0]))) for m in int8]
        loss = decoder_states(model, batch).float().pow(2).mean()
        kept = sum(r() is not None for r in inputs)
        loss.backward()
        for h in hooks:
            h.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, kept

    ours = run()
    for m in int8:
        m.__class__ = type(m).__bases__[0]  # bitsandbytes' own class: its forward and backward
    theirs = run()
    assert torch.equal(ours[0], theirs[0])
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) == 2 * 7 * len(model.get_base_model().model.layers)
    assert all(torch.equal(ours[1][n], theirs[1][n]) for n in ours[1])
    assert ours[2] < theirs[2], (ours[2], theirs[2])  # layer inputs alive until backward: fewer (here none)
