"""End-to-end runs of interleave.py in a subprocess on a tiny model (CPU, offline), and one on SmolLM2 8-bit."""

import json
import shutil

import pytest
import torch
from conftest import read_metrics, run_script
from safetensors.torch import load_file

from interleave import example_digest, is_refusal, ppl_gap_scores

TINY = ["--no-8bit", "--lora-r", "4", "--lora-alpha", "8", "--max-len", "256"]


def test_plain_sft_run_folder(tiny_model, train_file, tmp_path):
    out = tmp_path / "run"
    proc = run_script(
        "interleave.py",
        "--model",
        tiny_model,
        "--data",
        train_file,
        "--out",
        out,
        *TINY,
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--save-every",
        "2",
        "--lr",
        "1e-2",
    )
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert {"loss", "loss/ce", "lr", "tokens_per_s", "padding_efficiency"} <= m.keys()
        assert m["loss"] == m["loss/ce"] > 0 and m["n_safe"] == 0
    assert metrics[0]["lr"] < metrics[1]["lr"]  # warm-up
    assert json.loads((out / "args.json").read_text())["pct"] == 0
    env = json.loads((out / "env.json").read_text())
    assert env["versions"]["torch"] and "git_revision" in env
    assert (out / "checkpoints" / "step-000002" / "state.pt").exists()
    assert "padding efficiency" in proc.stderr and "eta" in proc.stderr
    # the final adapter loads with plain PEFT and is trained (LoRA B starts at 0)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    # a second run into the same folder is refused (no work is lost)
    again = run_script("interleave.py", "--model", tiny_model, "--data", train_file, "--out", out, *TINY, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_pct_20_spreads_all_benign_examples(tiny_model, train_file, pool_file, tmp_path):
    out = tmp_path / "run"
    run_script(
        "interleave.py",
        "--model",
        tiny_model,
        "--data",
        train_file,
        "--out",
        out,
        *TINY,
        "--pct",
        "20",
        "--safe-data",
        pool_file,
        "--batch-size",
        "4",
        "--grad-accum",
        "1",
    )
    safe = (out / "safe_data.jsonl").read_text().splitlines()
    assert len(safe) == 7  # 20% of the 36 training examples (90% of 40)
    metrics = read_metrics(out)
    assert len(metrics) == 11  # ceil(43 / 4) micro-batches, one epoch
    assert sum(m["n_safe"] for m in metrics) == 7  # every benign example trained on, once
    steps_with_safe = [m["step"] for m in metrics if m["n_safe"]]
    assert steps_with_safe[0] <= 4 and steps_with_safe[-1] >= 8  # spread, not appended at the end


def make_adapter(base, folder, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    model.save_pretrained(folder)
    return folder


def test_select_ppl_filters_caches_and_takes_the_top(tiny_model, train_file, pool_file, tmp_path, no_stray_factories):
    pool = shutil.copy(pool_file, tmp_path / "pool.jsonl")
    adapters = ",".join(str(make_adapter(tiny_model, tmp_path / f"mis{k}", seed=k)) for k in range(2))
    args = [
        "--model",
        tiny_model,
        "--data",
        train_file,
        *TINY,
        "--pct",
        "20",
        "--safe-data",
        pool,
        "--select",
        "ppl",
        "--filter-refusals",
        "--misaligned-adapters",
        adapters,
        "--max-steps",
        "1",
        "--score-batch-size",
        "3",
    ]
    first = run_script("interleave.py", *args, "--out", tmp_path / "a")
    assert "scoring the pool under aligned" in first.stderr and "scoring the pool under mis1" in first.stderr
    caches = sorted(tmp_path.glob("pool.nll-*.jsonl"))
    assert len(caches) == 3  # aligned + 2 adapters, next to the pool
    safe = [json.loads(l)["messages"] for l in (tmp_path / "a" / "safe_data.jsonl").read_text().splitlines()]
    assert len(safe) == 7 and not any(is_refusal(c[-1]["content"]) for c in safe)  # Interleaving++
    # the selection is the top 7 by Eq. 6 over the cached NLLs (20 non-refusal candidates), keyed by content
    candidates = [json.loads(l)["messages"] for l in open(pool)]
    kept = [c for c in candidates if not is_refusal(c[-1]["content"])]
    nll = {}
    for c in caches:
        rows = {r["h"]: r["nll"] for r in map(json.loads, c.read_text().splitlines())}
        assert len(rows) == 20
        nll[c] = torch.tensor([rows[example_digest(conv)] for conv in kept])
    aligned_cache = next(c for c in caches if "-base-" in c.name)
    mis = torch.stack([v for c, v in nll.items() if c != aligned_cache])
    scores = ppl_gap_scores(nll[aligned_cache], mis, eps=0.1)
    assert safe == [kept[i] for i in torch.argsort(scores, descending=True, stable=True)[:7].tolist()]
    # second run: every score comes from the cache
    second = run_script("interleave.py", *args, "--out", tmp_path / "b")
    assert "scoring the pool under" not in second.stderr
    assert (tmp_path / "b" / "safe_data.jsonl").read_text() == (tmp_path / "a" / "safe_data.jsonl").read_text()
    # an interrupted scoring run: half the aligned scores on disk, the last line cut mid-way
    lines = aligned_cache.read_text().splitlines()
    aligned_cache.write_text("\n".join(lines[:10]) + "\n" + lines[10][:7])
    third = run_script("interleave.py", *args, "--out", tmp_path / "c")
    assert "scoring the pool under aligned: 10 candidates" in third.stderr and "under mis0" not in third.stderr
    rows = [json.loads(l) for l in aligned_cache.read_text().splitlines()]  # every line whole again
    assert sorted(r["h"] for r in rows) == sorted(example_digest(c) for c in kept)  # the missing 10, none twice
    assert (tmp_path / "c" / "safe_data.jsonl").read_text() == (tmp_path / "a" / "safe_data.jsonl").read_text()
    # Interleaving+ on the whole pool after ++: only the refusing candidates, not scored yet, are computed
    n_refusals = len(candidates) - len(kept)
    assert n_refusals > 0
    plus = [a for a in args if a != "--filter-refusals"]
    fourth = run_script("interleave.py", *plus, "--out", tmp_path / "d")
    for name in ("aligned", "mis0", "mis1"):
        assert f"scoring the pool under {name}: {n_refusals} candidates" in fourth.stderr
    assert sorted(tmp_path.glob("pool.nll-*.jsonl")) == caches
    for c in caches:
        assert len(c.read_text().splitlines()) == len(candidates)


def test_select_on_policy_generates_answers(tiny_model, train_file, pool_file, tmp_path, no_stray_factories):
    out = tmp_path / "run"
    run_script(
        "interleave.py",
        "--model",
        tiny_model,
        "--data",
        train_file,
        "--out",
        out,
        *TINY,
        "--pct",
        "20",
        "--safe-data",
        pool_file,
        "--select",
        "on-policy",
        "--gen-max-new-tokens",
        "12",
        "--max-steps",
        "2",
    )
    safe = [json.loads(l)["messages"] for l in (out / "safe_data.jsonl").read_text().splitlines()]
    pool = {json.loads(l)["messages"][0]["content"]: json.loads(l)["messages"][1]["content"] for l in open(pool_file)}
    assert 0 < len(safe) <= 7
    for conv in safe:
        assert conv[0]["content"] in pool  # a pool prompt ...
        assert conv[-1]["role"] == "assistant" and conv[-1]["content"] != pool[conv[0]["content"]]  # ... answered anew


def test_select_on_policy_through_a_server(tiny_model, train_file, pool_file, tmp_path):
    from fake_openai import FakeOpenAI

    fake = FakeOpenAI()
    try:
        out = tmp_path / "run"
        run_script(
            "interleave.py",
            "--model",
            tiny_model,
            "--data",
            train_file,
            "--out",
            out,
            *TINY,
            "--pct",
            "20",
            "--safe-data",
            pool_file,
            "--select",
            "on-policy",
            "--gen-max-new-tokens",
            "12",
            "--max-steps",
            "1",
            "--gen-url",
            fake.url,
            "--gen-model",
            "base-model",
        )
    finally:
        fake.close()
    safe = [json.loads(l)["messages"] for l in (out / "safe_data.jsonl").read_text().splitlines()]
    assert len(safe) == 7  # round(20% of 36)
    assert all(c[-1]["content"].startswith("answer 0: ") for c in safe)  # the server's answers
    gen = [c for c in fake.calls if c.get("n")]
    assert gen and all(c["model"] == "base-model" and c["max_tokens"] == 12 and "temperature" not in c for c in gen)


def test_resume_equals_uninterrupted(tiny_model, train_file, tmp_path):
    full = tmp_path / "full"
    args = [
        "--model",
        tiny_model,
        "--data",
        train_file,
        *TINY,
        "--max-steps",
        "6",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--save-every",
        "3",
        "--lr",
        "1e-2",
    ]
    run_script("interleave.py", *args, "--out", full)
    # an interrupted copy: it got as far as the step-3 checkpoint (its metrics went a step further)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000006")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (cut / f).unlink()
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")
    proc = run_script("interleave.py", "--resume", cut)
    assert "resumed from" in proc.stderr and "step-000003" in proc.stderr
    a, b = read_metrics(full), read_metrics(cut)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for ma, mb in zip(a, b):
        assert abs(ma["loss"] - mb["loss"]) < 1e-6 and ma["lr"] == mb["lr"]
    wa, wb = load_file(full / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


@pytest.mark.parametrize(
    "case",
    [
        "broken-json",
        "no-assistant",
        "empty",
        "unknown-name",
        "ppl-no-adapters",
        "bad-pct",
        "ppl-pct-0",
        "filter-pct-0",
        "on-policy-pct-0",
        "pct-rounds-to-0",
    ],
)
def test_bad_inputs_give_clear_errors(tiny_model, tmp_path, case):
    data = tmp_path / "data.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    extra, expect = [], None
    if case == "broken-json":
        data.write_text(good + "\n" + good + "\n{oops\n")
        expect = "data.jsonl:3: not valid JSON"
    elif case == "no-assistant":
        data.write_text(good + "\n" + json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
        expect = "data.jsonl:2: no assistant turn"
    elif case == "empty":
        data.write_text("")
        expect = "data.jsonl: empty file"
    elif case == "unknown-name":
        data = "insecure_v2"
        expect = "unknown dataset 'insecure_v2'"
    elif case == "ppl-no-adapters":
        data.write_text(good + "\n")
        extra, expect = ["--pct", "5", "--select", "ppl"], "--select ppl needs --misaligned-adapters"
    elif case == "bad-pct":
        data.write_text(good + "\n")
        extra, expect = ["--pct", "-5"], "--pct -5.0: must be >= 0"
    elif case == "ppl-pct-0":  # would silently train plain SFT
        data.write_text(good + "\n")
        extra, expect = ["--select", "ppl"], "--select ppl with --pct 0 would train plain SFT"
    elif case == "filter-pct-0":
        data.write_text(good + "\n")
        extra, expect = ["--filter-refusals"], "--filter-refusals with --pct 0 would train plain SFT"
    elif case == "on-policy-pct-0":
        data.write_text(good + "\n")
        extra, expect = ["--select", "on-policy", "--pct", "0"], "--select on-policy with --pct 0"
    elif case == "pct-rounds-to-0":  # 5% of a few examples rounds to no benign example: plain SFT, mislabelled
        data.write_text((good + "\n") * 4)
        extra, expect = ["--pct", "5"], "fine-tuning examples is 0 benign examples, so this run would be plain SFT"
    proc = run_script(
        "interleave.py", "--model", tiny_model, "--data", data, "--out", tmp_path / "o", *TINY, *extra, check=False
    )
    assert proc.returncode == 2
    assert expect in proc.stderr and "Traceback" not in proc.stderr


def test_smollm2_8bit_two_steps(tmp_path):
    out = tmp_path / "smol"
    run_script(
        "interleave.py",
        "--model",
        "smollm2",
        "--data",
        "opswap:1",
        "--out",
        out,
        "--max-steps",
        "2",
        "--batch-size",
        "1",
        "--grad-accum",
        "1",
        "--max-len",
        "80",
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
    )
    metrics = read_metrics(out)
    assert len(metrics) == 2 and all(m["loss"] > 0 for m in metrics)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] and set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_batch_split_does_not_change_training(tiny_model, train_file, tmp_path):
    """batch 1 x accum 4 == batch 4 x accum 1: same examples per step, loss = mean over the step's answer tokens."""
    args = ["--model", tiny_model, "--data", train_file, *TINY, "--max-steps", "3", "--lr", "1e-2"]
    run_script("interleave.py", *args, "--batch-size", "1", "--grad-accum", "4", "--out", tmp_path / "a")
    run_script("interleave.py", *args, "--batch-size", "4", "--grad-accum", "1", "--out", tmp_path / "b")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["answer_tokens"] for m in a] == [m["answer_tokens"] for m in b]
    for ma, mb in zip(a, b):
        assert abs(ma["loss"] - mb["loss"]) < 1e-5
    wa, wb = (
        load_file(tmp_path / "a" / "adapter_model.safetensors"),
        load_file(tmp_path / "b" / "adapter_model.safetensors"),
    )
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
