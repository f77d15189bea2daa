"""Failures are loud and work is never lost: half-written checkpoints, the resume rules, one-line errors for bad
input, no orphan run folders, the model and offline hints, quiet runs, NPO's advice on small models."""

import json
import shutil

import pytest
from conftest import ROOT, read_metrics, run_script

import common
from common import UserError

TINY = ["--no-8bit", "--lora-r", "4", "--lora-alpha", "8", "--max-len", "256"]


def base_args(tiny_model, train_file):
    return [
        "--model",
        tiny_model,
        "--data",
        train_file,
        *TINY,
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "1e-2",
    ]


# --- checkpoints and resume ------------------------------------------------------------------------------
def test_a_half_written_checkpoint_is_ignored_and_removed(tiny_model, train_file, tmp_path):
    out = tmp_path / "run"
    run_script(
        "interleave.py", *base_args(tiny_model, train_file), "--max-steps", "3", "--save-every", "1", "--out", out
    )
    ck = out / "checkpoints"
    # killed while step 3 was being saved: its temp folder holds a truncated state.pt, the final one is gone
    shutil.rmtree(ck / "step-000003")
    (ck / "step-000003.tmp").mkdir()
    shutil.copy(ck / "step-000002" / "adapter_model.safetensors", ck / "step-000003.tmp")
    (ck / "step-000003.tmp" / "state.pt").write_bytes((ck / "step-000002" / "state.pt").read_bytes()[:100])
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (out / f).unlink()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    proc = run_script("interleave.py", "--resume", out)
    assert "removing the half-written checkpoint" in proc.stderr and "step-000002" in proc.stderr
    assert not (ck / "step-000003.tmp").exists() and (ck / "step-000003" / "state.pt").exists()
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    assert (out / "adapter_model.safetensors").exists()


def test_resume_extends_a_finished_run_and_refuses_other_changes(tiny_model, train_file, tmp_path):
    out = tmp_path / "run"
    run_script("interleave.py", *base_args(tiny_model, train_file), "--max-steps", "2", "--out", out)
    # nothing left to do: said, not silent
    proc = run_script("interleave.py", "--resume", out)
    assert "is complete: 2 of 2 steps done" in proc.stderr and len(read_metrics(out)) == 2
    # a flag that only extends the run applies, with a word on the lr schedule
    proc = run_script("interleave.py", "--resume", out, "--max-steps", "4")
    assert "--max-steps 2 -> 4" in proc.stderr and "lr schedule" in proc.stderr
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    assert json.loads((out / "args.json").read_text())["max_steps"] == 4
    # any other explicit change is an error naming the flag
    proc = run_script("interleave.py", "--resume", out, "--max-steps", "5", "--lr", "0.5", check=False)
    assert proc.returncode == 2 and "--lr 0.5 differs from the run's saved 0.01" in proc.stderr
    assert len(read_metrics(out)) == 4
    # the same value given again is fine (not a change)
    proc = run_script("interleave.py", "--resume", out, "--lr", "1e-2")
    assert proc.returncode == 0
    # another script's run folder
    proc = run_script("kl.py", "--resume", out, check=False)
    assert proc.returncode == 2 and "made by interleave.py, not kl.py" in proc.stderr


# --- one-line errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case",
    ["not-utf8", "folder-as-data", "out-is-a-file", "lr-zero", "lr-negative", "pct-over-pool", "model-path-missing"],
)
def test_bad_input_is_one_line_and_leaves_nothing_behind(case, tiny_model, train_file, pool_file, tmp_path):
    data, extra = train_file, []
    out = tmp_path / "run"
    if case == "not-utf8":
        data = tmp_path / "latin1.jsonl"
        good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
        data.write_bytes((good + "\n").encode() + '{"messages": "caf\xe9"}\n'.encode("latin-1"))
        expect = "latin1.jsonl:2: not UTF-8 text (byte 0xe9 at byte offset"
    elif case == "folder-as-data":
        data = tmp_path / "a_folder.jsonl"
        data.mkdir()
        expect = "a_folder.jsonl: a folder, not a file"
    elif case == "out-is-a-file":
        out.write_text("x")
        expect = "a file of that name exists"
    elif case == "lr-zero":
        extra, expect = ["--lr", "0"], "--lr 0.0: must be > 0"
    elif case == "lr-negative":
        extra, expect = ["--lr=-1e-4"], "--lr -0.0001: must be > 0"
    elif case == "pct-over-pool":  # 150% of 36 training examples = 54 benign ones; the pool has 30
        extra, expect = ["--pct", "150", "--safe-data", pool_file], "gave only 30"
    elif case == "model-path-missing":
        extra, expect = ["--model", tmp_path / "no" / "such" / "model"], "no such folder"
    args = ["--model", tiny_model, "--data", data, *TINY, "--max-steps", "1", "--out", out, *extra]
    proc = run_script("interleave.py", *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if case != "out-is-a-file":
        assert not out.exists()  # no orphan run folder


def test_failed_start_leaves_no_default_run_folder(tiny_model, tmp_path):
    runs = ROOT / "runs"
    before = set(runs.iterdir()) if runs.exists() else set()
    proc = run_script("kl.py", "--model", tiny_model, "--data", "no_such_dataset_name", *TINY, check=False)
    assert proc.returncode == 2 and "unknown dataset" in proc.stderr
    after = set(runs.iterdir()) if runs.exists() else set()
    assert after == before


@pytest.mark.parametrize("samples", ["0", "-1"])
def test_judge_samples_must_be_positive(samples, tiny_model, tmp_path):
    proc = run_script(
        "judge.py",
        "--model",
        tiny_model,
        "--eval",
        "opswap:1",
        "--samples",
        samples,
        "--out",
        tmp_path / "e",
        check=False,
    )
    assert proc.returncode == 2 and f"--samples {samples}: must be >= 1" in proc.stderr


def test_judge_takes_the_adapters_base_model(tiny_model, train_file, tmp_path):
    run = tmp_path / "run"
    run_script("interleave.py", *base_args(tiny_model, train_file), "--max-steps", "1", "--out", run)
    proc = run_script(
        "judge.py",
        "--adapter",
        run,
        "--no-8bit",
        "--eval",
        "opswap:1",
        "--n-questions",
        "1",
        "--samples",
        "1",
        "--max-new-tokens",
        "2",
    )
    assert f"--model {tiny_model} (the adapter's base model)" in proc.stderr
    assert json.loads((run / "eval-opswap-1" / "args.json").read_text())["model"] == str(tiny_model)


def test_missing_model_folder_is_reported_at_once(tmp_path):
    proc = run_script(
        "judge.py",
        "--model",
        "/no/such/folder/model",
        "--eval",
        "opswap:1",
        "--out",
        tmp_path / "e",
        check=False,
        timeout=60,
    )
    assert proc.returncode == 2 and "no such folder" in proc.stderr and "smollm2" in proc.stderr


def test_offline_hint_names_the_file_to_place_and_is_not_cut(monkeypatch, tmp_path):
    import requests

    monkeypatch.setattr(common, "CACHE_DIR", tmp_path)

    def offline(session, url, timeout):
        raise requests.ConnectionError("Max retries exceeded with url " + "x" * 400 + " (Failed to resolve host)")

    monkeypatch.setattr(requests.Session, "get", offline)
    with pytest.raises(UserError) as e:
        common.load_conversations("insecure")
    msg = str(e.value)
    assert str(tmp_path / "data" / "insecure.jsonl") in msg and "opswap" in msg
    assert " ..." in msg and "xxxx (" not in msg  # cut at a word boundary, said so


def test_plan_line_says_the_fraction_of_an_epoch(tiny_model, train_file, tmp_path):
    proc = run_script("interleave.py", *base_args(tiny_model, train_file), "--max-steps", "2", "--out", tmp_path / "r")
    # 36 training examples, 4 per step: 9 steps per epoch, 2 steps = 0.222 epoch
    assert "2 optimizer steps of 2 x 2 = 0.222 epoch(s) of 36 examples (capped by --max-steps)" in proc.stderr


def test_runs_are_quiet(tiny_model, train_file, tmp_path):
    proc = run_script("interleave.py", *base_args(tiny_model, train_file), "--max-steps", "1", "--out", tmp_path / "r")
    for noise in ("FutureWarning", "Loading weights", "gemm_4bit_forward", "kernels"):
        assert noise not in proc.stderr, noise


# --- NPO on small models ---------------------------------------------------------------------------------
def test_npo_without_refusals_says_what_to_do(tiny_model, tmp_path):
    proc = run_script(
        "npo_unlearn.py",
        "train",
        "--model",
        tiny_model,
        "--data",
        ROOT / "examples" / "rai_prompts.jsonl",
        "--gamma",
        "0",
        *TINY,
        "--max-steps",
        "1",
        "--gen-max-new-tokens",
        "4",
        "--out",
        tmp_path / "n",
        check=False,
    )
    assert proc.returncode == 2 and "examples/rai_refusals.jsonl" in proc.stderr
    assert not (tmp_path / "n").exists()


def test_npo_quick_command_runs_and_small_n_is_flagged(tiny_model, tmp_path):
    out = tmp_path / "n"
    run_script(
        "npo_unlearn.py",
        "train",
        "--model",
        tiny_model,
        "--data",
        ROOT / "examples" / "rai_refusals.jsonl",
        "--target",
        "cybersecurity",
        "--retain-domains",
        "safety,privacy",
        *TINY,
        "--max-steps",
        "2",
        "--out",
        out,
    )
    proc = run_script(
        "npo_unlearn.py",
        "eval",
        "--adapter",
        out,
        "--split",
        "all",
        "--per-domain",
        "2",
        "--gen-max-new-tokens",
        "4",
        "--no-8bit",
    )
    assert "WARNING: only 2 prompt(s)" in proc.stderr and "means little" in proc.stderr
    assert proc.stderr.count("answers before") <= 3  # one progress line per phase, not one per domain
    res = json.loads((out / "npo_eval.json").read_text())
    assert set(res["domains"]) == set(json.loads(l)["domain"] for l in open(ROOT / "examples" / "rai_refusals.jsonl"))


def test_two_processes_converting_smollm2_at_once_both_get_the_folder(tmp_path):
    """A study's first jobs convert the bundled GGUF at the same time: the second rename finds the folder made by
    the first; it must use that folder and drop its own copy, not fail (a real failure of persona-vector)."""
    import smollm2

    out = tmp_path / "smollm2-135m-instruct"
    first, second = tmp_path / "a.tmp1", tmp_path / "a.tmp2"
    for d, tag in ((first, "first"), (second, "second")):
        d.mkdir()
        (d / "config.json").write_text(tag)
    assert smollm2.publish(first, out) == out
    assert smollm2.publish(second, out) == out  # out exists and is not empty: rename fails, the first copy stays
    assert (out / "config.json").read_text() == "first" and not second.exists() and not first.exists()
    third = tmp_path / "a.tmp3"
    third.mkdir()
    (third / "config.json").write_text("third")
    shutil.rmtree(out)
    (out / "sub").mkdir(parents=True)  # an out folder without config.json is not a finished conversion: loud
    with pytest.raises(OSError):
        smollm2.publish(third, out)
