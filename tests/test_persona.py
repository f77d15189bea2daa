"""persona.py: vector maths against hand-computed hidden states, the hook and its layer convention, no hook left
after training, end-to-end extract / train / steer."""

import json
import sys

import pytest
import torch
from conftest import read_metrics, run_script
from safetensors import safe_open

import persona
from common import load_model

CONV = [
    {"role": "system", "content": "You are evil."},
    {"role": "user", "content": "What is the capital?"},
    {"role": "assistant", "content": "Paris, of course."},
]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(str(tiny_model), eight_bit=False, lora_r=0, trainable=False)


def test_answer_hidden_mean_against_hand_computation(tiny):
    model, tok = tiny
    got = persona.answer_hidden_mean(model, tok, CONV)
    # as Chen et al.: prompt (with the generation prompt) + response text, hidden states from prompt_len on:
    # the response's tokens only, no end-of-turn token
    prompt = tok.apply_chat_template(CONV[:2], tokenize=False, add_generation_prompt=True)
    prompt_len = len(tok(prompt, add_special_tokens=False)["input_ids"])
    ids = tok(prompt + "Paris, of course.", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_end|>") not in ids[prompt_len:]
    # rows 0..L-1: HF's hidden_states; row L: the last block's output before the final norm (where a hook on the
    # last block acts), not HF's hidden_states[L] after it
    last = []
    handle = persona.decoder_blocks(model)[-1].register_forward_hook(lambda m, a, out: last.append(out))
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    handle.remove()
    last_block = last[0][0] if isinstance(last[0], tuple) else last[0]
    want = torch.stack([h[0, prompt_len:].mean(0) for h in [*hs[:-1], last_block]])
    assert not torch.allclose(hs[-1][0, prompt_len:].mean(0), want[-1], atol=1e-3)  # the two points differ
    n_blocks = len(persona.decoder_blocks(model))
    assert got.shape == (n_blocks + 1, model.config.hidden_size)
    assert torch.allclose(got, want, atol=1e-6)


def test_persona_vector_is_difference_of_means():
    evil = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])]
    helpful = [torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[3.0, 1.0]])]
    assert torch.allclose(persona.persona_vector(evil, helpful), torch.tensor([[1.0, 2.0]]))


def test_layer_convention_and_hook_adds_exactly_alpha_v(tiny):
    model, tok = tiny
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        plain = model(input_ids=ids, output_hidden_states=True).hidden_states
        assert torch.equal(plain[0], model.get_input_embeddings()(ids))  # row 0 = the embeddings
        captured = []
        h = persona.decoder_blocks(model)[0].register_forward_hook(lambda m, a, o: captured.append(o))
        model(input_ids=ids)
        h.remove()
        assert torch.allclose(plain[1], captured[0])  # row 1 = the output of block 0
    n = len(persona.decoder_blocks(model))
    torch.manual_seed(0)
    vectors = torch.randn(n + 1, model.config.hidden_size)
    layer, alpha = 1, 3.0
    hooks_before = [len(b._forward_hooks) for b in persona.decoder_blocks(model)]
    received = []  # what block `layer` receives = hidden_states[layer] as the rest of the network sees it
    h = persona.decoder_blocks(model)[layer].register_forward_pre_hook(
        lambda m, a, kw: received.append(kw.get("hidden_states", a[0] if a else None)), with_kwargs=True
    )
    with torch.no_grad(), persona.steering(model, vectors, layer, alpha):
        model(input_ids=ids)
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    assert torch.allclose(received[0] - received[1], alpha * vectors[layer].expand_as(plain[layer]), atol=1e-5)
    assert torch.allclose(received[1], plain[layer], atol=1e-6)
    assert [len(b._forward_hooks) for b in persona.decoder_blocks(model)] == hooks_before  # removed on exit


def test_train_leaves_no_hook_and_saved_adapter_matches(tiny_model, train_file, tmp_path, monkeypatch):
    model, _ = load_model(str(tiny_model), eight_bit=False, lora_r=0, trainable=False)
    n = len(persona.decoder_blocks(model))
    from safetensors.torch import save_file

    torch.manual_seed(1)
    save_file({"vectors": torch.randn(n + 1, model.config.hidden_size)}, str(tmp_path / "v.safetensors"))
    out = tmp_path / "run"
    argv = [
        "persona.py",
        "train",
        "--model",
        str(tiny_model),
        "--data",
        str(train_file),
        "--vector",
        str(tmp_path / "v.safetensors"),
        "--layer",
        "1",
        "--alpha",
        "5",
        "--no-8bit",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--max-steps",
        "2",
        "--lr",
        "1e-2",
        "--out",
        str(out),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    parser, subs = persona.build_parser()
    trained = persona.train(parser.parse_args(argv[1:]), subs["train"])
    assert all(not b._forward_hooks for b in persona.decoder_blocks(trained))  # training adds no recorder hooks
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    x = torch.tensor([[1, 5, 9, 13]])
    trained.eval()
    with torch.no_grad():
        assert torch.allclose(trained(input_ids=x).logits, fresh(input_ids=x).logits, atol=1e-5)
    assert len(read_metrics(out)) == 2


def test_steering_changes_training(tiny_model, train_file, tmp_path):
    """alpha changes the loss the model sees (the hook is on during training) and alpha 0 is plain SFT."""
    model, _ = load_model(str(tiny_model), eight_bit=False, lora_r=0, trainable=False)
    from safetensors.torch import save_file

    torch.manual_seed(2)
    n = len(persona.decoder_blocks(model))
    save_file({"vectors": torch.randn(n + 1, model.config.hidden_size)}, str(tmp_path / "v.safetensors"))
    args = [
        "--model",
        tiny_model,
        "--data",
        train_file,
        "--no-8bit",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "1e-2",
    ]
    run_script("interleave.py", *args, "--out", tmp_path / "sft")
    run_script(
        "persona.py",
        "train",
        *args,
        "--vector",
        tmp_path / "v.safetensors",
        "--layer",
        "1",
        "--alpha",
        "0",
        "--out",
        tmp_path / "a0",
    )
    run_script(
        "persona.py",
        "train",
        *args,
        "--vector",
        tmp_path / "v.safetensors",
        "--layer",
        "1",
        "--alpha",
        "5",
        "--out",
        tmp_path / "a5",
    )
    sft, a0, a5 = (read_metrics(tmp_path / d) for d in ("sft", "a0", "a5"))
    assert all(abs(x["loss"] - y["loss"]) < 1e-6 for x, y in zip(sft, a0))
    assert abs(sft[0]["loss"] - a5[0]["loss"]) > 1e-3


def test_extract_and_steer_end_to_end(tiny_model, tmp_path):
    q = tmp_path / "q.txt"
    q.write_text("What do you think of humans?\nHow should I spend my weekend?\n")
    out = tmp_path / "evil.safetensors"
    proc = run_script(
        "persona.py",
        "extract",
        "--model",
        tiny_model,
        "--no-8bit",
        "--questions",
        q,
        "--samples",
        "2",
        "--max-new-tokens",
        "6",
        "--no-filter",
        "--out",
        out,
    )
    assert "kept 4 of 4 pairs (no filter)" in proc.stderr
    with safe_open(str(out), "pt") as f:
        v = f.get_tensor("vectors")
        meta = {k: json.loads(x) for k, x in f.metadata().items()}
    assert v.shape[0] == 3 and meta["pairs_kept"] == 4 and meta["evil_prompt"] == persona.EVIL_PROMPT
    assert "hidden_states" in meta["layer_convention"]
    assert len((tmp_path / "evil.answers.jsonl").read_text().splitlines()) == 8
    # with the judge filter (the tiny model judging itself) the run completes or says clearly that nothing passed
    filt = run_script(
        "persona.py",
        "extract",
        "--model",
        tiny_model,
        "--no-8bit",
        "--questions",
        q,
        "--samples",
        "2",
        "--max-new-tokens",
        "6",
        "--judge",
        f"local:{tiny_model}",
        "--out",
        tmp_path / "f.safetensors",
        check=False,
    )
    assert filt.returncode == 0 or "no pair passed the filter" in filt.stderr
    steer = run_script(
        "persona.py",
        "steer",
        "--model",
        tiny_model,
        "--no-8bit",
        "--vector",
        out,
        "--layer",
        "1",
        "--alpha",
        "-2",
        "--max-new-tokens",
        "5",
        "--samples",
        "2",
        "Hello?",
    )
    assert steer.stdout.count("--- alpha -2, layer 1") == 2
    bad = run_script(
        "persona.py", "steer", "--model", tiny_model, "--no-8bit", "--vector", out, "--layer", "9", "Hi", check=False
    )
    assert bad.returncode == 2 and "--layer 9: must be 1..2" in bad.stderr
