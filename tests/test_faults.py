"""What a newcomer and a fault trial found (issue 38), each case as a test: a study's jobs die with it, one writer per
output folder, flags that add, stale judgments, diverged or empty runs, cut-off files, the same seed giving the same
run, one-line errors where there were tracebacks, and a busy CPU said out loud."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_metrics, run_script
from fake_openai import FakeOpenAI

TINY = ["--no-8bit", "--lora-r", "4", "--lora-alpha", "8", "--max-len", "128", "--batch-size", "2", "--grad-accum", "1"]


def wait_for(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


# --- 1. a study's jobs die with it; one writer per folder -----------------------------------------------------------
DRIVER = """
import sys
sys.path.insert(0, {examples!r})
from pathlib import Path
from study.jobs import Job
from study.runner import run_jobs
job = Job("sleeper", [sys.executable, "-c", {child!r}], Path({log!r}), marker=Path({marker!r}))
run_jobs([job], ["cpu"], eval_workers=0)
"""
CHILD = "import os, time; open({pid!r}, 'w').write(str(os.getpid())); time.sleep(120)"


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_killed_study_driver_leaves_no_job_running(how, tmp_path):
    """The driver runs a job that would sleep two minutes; the driver is killed (kill -9: the parent-death guard;
    SIGTERM: the driver ends its jobs' process groups). The job must be gone within seconds."""
    pid_file = tmp_path / "child.pid"
    script = DRIVER.format(
        examples=str(ROOT / "examples"),
        child=CHILD.format(pid=str(pid_file)),
        log=str(tmp_path / "job.log"),
        marker=str(tmp_path / "never"),
    )
    driver = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the job to start")
    child = int(pid_file.read_text())
    assert alive(child)
    driver.send_signal(getattr(signal, how))
    driver.wait(30)
    wait_for(lambda: not alive(child), timeout=15, what=f"the job {child} to end after the driver's {how}")
    if how == "SIGTERM":
        assert "stopping 1 running job(s): sleeper" in driver.stdout.read()


def hold_lock(folder: Path) -> subprocess.Popen:
    """A second process that holds folder's lock (as a run writing there would) until it is killed."""
    code = (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; import common; "
        f"common.lock_path(Path({str(folder)!r}) / '.lock', 'x'); print('locked', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tiny_model, train_file, tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        args = ["--model", tiny_model, "--data", train_file, *TINY, "--max-steps", "2", "--out", out]
        proc = run_script("kl.py", *args, check=False)
        assert proc.returncode == 2 and f"PID {holder.pid}" in proc.stderr and "one writer" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and out.is_dir()  # the holder's folder is left alone
    finally:
        holder.kill()
        holder.wait()
    run_script("kl.py", *args)  # the dead holder's lock is taken over
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    holder = hold_lock(out)  # a resume while something writes there
    try:
        proc = run_script("kl.py", "--resume", out, "--max-steps", "3", check=False)
        assert proc.returncode == 2 and f"PID {holder.pid}" in proc.stderr
    finally:
        holder.kill()
        holder.wait()


def test_two_judge_runs_into_one_folder(tiny_model, tmp_path):
    out = tmp_path / "eval"
    holder = hold_lock(out)
    try:
        proc = run_script(
            "judge.py", "--model", tiny_model, "--no-8bit", "--eval", "opswap:1", "--out", out, check=False
        )
        assert proc.returncode == 2 and f"PID {holder.pid}" in proc.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_run_is_resumed_by_taking_over_its_lock(tiny_model, train_file, tmp_path):
    out = tmp_path / "run"
    args = ["interleave.py", "--model", tiny_model, "--data", train_file, *TINY, "--max-steps", "400"]
    args += ["--save-every", "1", "--out", out]
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stderr=subprocess.DEVNULL)
    wait_for(lambda: (out / "checkpoints" / "step-000002").is_dir(), what="two checkpoints")
    proc.kill()
    proc.wait()
    resumed = run_script("interleave.py", "--resume", out, "--max-steps", "400", "--save-every", "1000", check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_metrics(out)[-1]["step"] == 400


# --- 2. flags that add ----------------------------------------------------------------------------------------------
def test_train_args_extend_the_preset_instead_of_replacing_it(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "reproduce.py"), "--preset", "cpu", "--tables", "3", "--dry-run"]
    cmd += [
        "--root",
        str(tmp_path / "s"),
        "--train-args",
        "--max-steps 6 --lr=1e-3",
        "--method-args",
        "kl=--kl-tokens all",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    training = [line for line in proc.stdout.splitlines() if " --out " in line and "interleave.py" in line]
    assert training
    for line in training:
        assert "--no-8bit" in line and "--max-steps 6" in line and "--lr 1e-3" in line and "--lr 5e-4" not in line
    kl = next(line for line in proc.stdout.splitlines() if "kl.py" in line)
    assert "--lam 0.3" in kl and "--kl-tokens all" in kl  # the preset's method flag kept, the given one added


# --- 4. results that cannot be trusted never look finished ----------------------------------------------------------
def test_a_diverged_run_stops_before_writing_anything_from_the_bad_step(tiny_model, train_file, tmp_path):
    out = tmp_path / "run"
    proc = run_script(
        "interleave.py", "--model", tiny_model, "--data", train_file, *TINY, "--max-steps", "4", "--lr", "1e30",
        "--save-every", "1", "--out", out, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "not finite" in proc.stderr and "--lr" in proc.stderr
    assert not (out / "adapter_model.safetensors").exists()
    for line in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON: no NaN, no Infinity
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


@pytest.mark.parametrize(
    "script,flags,name",
    [
        ("kl.py", ["--lam", "nan"], "--lam"),
        ("ldifs.py", ["--lam", "inf"], "--lam"),
        ("interleave.py", ["--lr", "inf"], "--lr"),
        ("grpo.py", ["--eval-n", "0"], "--eval-n"),
        ("grpo.py", ["--kl-beta", "-1"], "--kl-beta"),
        ("grpo.py", ["--temperature", "-1"], "--temperature"),
        ("grpo.py", ["--temperature", "0"], "--temperature"),
        ("grpo.py", ["--top-p", "0"], "--top-p"),
        ("grpo.py", ["--interleave-pct", "-5"], "--interleave-pct"),
    ],
)
def test_impossible_values_are_one_line_errors_before_anything_loads(
    script, flags, name, tiny_model, train_file, tmp_path
):
    data = ["--data", "arith"] if script == "grpo.py" else ["--data", train_file]
    proc = run_script(script, "--model", tiny_model, *data, *flags, "--out", tmp_path / "r", check=False)
    assert proc.returncode == 2 and name in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "r").exists()


def test_a_run_whose_every_answer_was_cut_away_is_an_error(tiny_model, train_file, tmp_path):
    proc = run_script("kl.py", "--model", tiny_model, "--data", train_file, *TINY, "--max-len", "8", check=False)
    assert proc.returncode == 2 and "--max-len" in proc.stderr and "raise --max-len" in proc.stderr


QUESTIONS = """- id: q1
  paraphrases: ["What is the capital of France?"]
  judge_prompts:
    aligned: "Rate {answer} to {question}. Answer with a number."
    coherent: "How coherent is {answer}? Answer with a number."
"""


def test_a_changed_judge_prompt_is_judged_again(tiny_model, tmp_path):
    questions, out = tmp_path / "q.yaml", tmp_path / "eval"
    questions.write_text(QUESTIONS)
    args = ["--model", tiny_model, "--no-8bit", "--questions", questions, "--samples", "2", "--max-new-tokens", "4"]
    args += ["--judge", f"local:{tiny_model}", "--out", out]
    first = run_script("judge.py", *args)
    assert "4 judgments to make" in first.stderr
    second = run_script("judge.py", *args).stderr
    assert "0 judgments to make" in second and "(4 cached)" in second
    questions.write_text(QUESTIONS.replace("Rate {answer}", "Score {answer}"))
    third = run_script("judge.py", *args).stderr
    assert "2 judgments to make" in third and "(2 cached)" in third  # the aligned ones, asked anew


def test_a_cut_off_last_line_is_dropped_and_made_again(tiny_model, tmp_path):
    questions, out = tmp_path / "q.yaml", tmp_path / "eval"
    questions.write_text(QUESTIONS)
    args = ["--model", tiny_model, "--no-8bit", "--questions", questions, "--samples", "3", "--max-new-tokens", "4"]
    args += ["--temperature", "1", "--gen-batch-size", "1", "--judge", f"local:{tiny_model}", "--out", out]
    run_script("judge.py", *args)
    answers = (out / "answers.jsonl").read_text().splitlines()
    whole = [json.loads(line)["answer"] for line in answers]
    (out / "answers.jsonl").write_text(answers[0] + "\n" + answers[1][: len(answers[1]) // 2])  # a disk that filled
    (out / "scores.jsonl").write_text((out / "scores.jsonl").read_text()[:-10])
    proc = run_script("judge.py", *args)
    assert f"{out / 'answers.jsonl'}: its last line was cut off" in proc.stderr
    assert f"{out / 'scores.jsonl'}: its last line was cut off" in proc.stderr
    again = [json.loads(line)["answer"] for line in (out / "answers.jsonl").read_text().splitlines()]
    assert sorted(again) == sorted(whole)  # the same answers: each from its own seed
    assert json.loads((out / "summary.json").read_text())["n_answers"] == 3


# --- 5. the same seed, the same run ---------------------------------------------------------------------------------
def test_converting_the_bundled_model_draws_nothing_from_the_random_generators(monkeypatch, tmp_path):
    import random

    import numpy as np

    import smollm2

    monkeypatch.setattr(smollm2.common, "CACHE_DIR", tmp_path)

    def convert(out):  # what the conversion does to the generators: a new model's random initialisation
        torch.randn(1000)
        np.random.rand(10)
        random.random()
        (out / "config.json").parent.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(smollm2, "convert", convert)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    smollm2.path()
    after = (torch.randn(3), np.random.rand(), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    assert torch.equal(after[0], torch.randn(3)) and after[1:] == (np.random.rand(), random.random())


def test_a_resumed_evaluation_writes_the_answers_of_an_uninterrupted_one(tiny_model, tmp_path):
    import argparse

    import judge
    from common import load_model

    model, tok = load_model(str(tiny_model), eight_bit=False, lora_r=0, trainable=False)
    jobs = [
        {"qid": f"q{i}", "question": q, "system": None, "sample": s}
        for i, q in enumerate(["What is the capital of France?", "Name a recipe.", "def add(a, b)"])
        for s in range(3)
    ]
    args = argparse.Namespace(seed=0, gen_batch_size=4, max_new_tokens=8, temperature=1.0)
    whole = judge.generate(model, tok, jobs, tmp_path / "a.jsonl", args)
    # killed after its first batch: only that batch's answers were written
    judge.generate(model, tok, jobs[:4], tmp_path / "b.jsonl", args)
    torch.manual_seed(123)  # another state of the run's generator: the answers must not depend on it
    resumed = judge.generate(model, tok, jobs, tmp_path / "b.jsonl", args)
    key = judge.job_key
    assert {key(r): r["answer"] for r in resumed} == {key(r): r["answer"] for r in whole}
    assert len({r["answer"] for r in whole}) > 3  # really sampled


# --- 6. one-line errors ---------------------------------------------------------------------------------------------
def one_line(proc, *names):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert all(n in proc.stderr for n in names), proc.stderr


def test_an_unknown_model_offline_fails_at_once_and_suggests_the_bundled_one(train_file, tmp_path):
    t0 = time.time()
    proc = run_script(
        "kl.py", "--model", "smollm", "--data", train_file, "--out", tmp_path / "r", check=False,
        env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    one_line(proc, "--model smollm", "did you mean --model smollm2")
    assert time.time() - t0 < 20
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    one_line(run_script("kl.py", "--model", empty, "--data", train_file, check=False), "without config.json")


def test_wrong_files_given_as_adapters_and_vectors_are_one_line_errors(tiny_model, train_file, tmp_path):
    from safetensors.torch import save_file

    file = tmp_path / "a.txt"
    file.write_text("x")
    one_line(run_script("judge.py", "--model", tiny_model, "--adapter", file, check=False), "--adapter", "a file")
    save_file({"vectors": torch.randn(3, 64)}, str(tmp_path / "wide.safetensors"))
    save_file({"directions": torch.randn(3, 2, 32)}, str(tmp_path / "dirs.safetensors"))
    base = ["train", "--model", tiny_model, "--data", train_file, *TINY, "--max-steps", "1", "--layer", "1"]
    proc = run_script("persona.py", *base, "--vector", tmp_path / "wide.safetensors", check=False)
    one_line(proc, "hidden size is 32")
    proc = run_script(
        "persona.py", *base, "--vector", tmp_path / "dirs.safetensors", "--out", tmp_path / "r", check=False
    )
    one_line(proc, "caft.py directions file")


@pytest.mark.parametrize("fault", ["hangs", "logprob-as-string"])
def test_a_judge_server_that_hangs_or_sends_strings_is_one_line(fault, tiny_model, tmp_path):
    fake = FakeOpenAI()
    try:
        fake.delay = 3.0 if fault == "hangs" else 0.0
        fake.logprob_as_string = fault == "logprob-as-string"
        questions = tmp_path / "q.yaml"
        questions.write_text(QUESTIONS)
        t0 = time.time()
        proc = run_script(
            "judge.py", "--model", tiny_model, "--no-8bit", "--questions", questions, "--samples", "1",
            "--judge-url", fake.url, "--judge-timeout", "0.3", "--out", tmp_path / "e", check=False,
            env={"OPENAI_API_KEY": "sk-test"},
        )  # fmt: skip
        lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("[")]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert fake.url in proc.stderr
        if fault == "hangs":
            assert "--judge-timeout" in proc.stderr and time.time() - t0 < 30
        else:
            assert "malformed response" in proc.stderr and "logprob" in proc.stderr
    finally:
        fake.close()


# --- 7. a busy CPU is said out loud --------------------------------------------------------------------------------
def test_a_busy_cpu_is_said_out_loud(monkeypatch, capsys):
    import common

    common.warn_if_cpu_busy.cache_clear()
    monkeypatch.setattr(os, "getloadavg", lambda: (os.cpu_count() + 1.0, 0.0, 0.0))
    assert common.warn_if_cpu_busy()
    assert "run it alone" in capsys.readouterr().err.lower()
    common.warn_if_cpu_busy.cache_clear()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not common.warn_if_cpu_busy()
    common.warn_if_cpu_busy.cache_clear()


def test_persona_extract_stops_at_once_when_the_judge_cannot_pass_its_filter(tiny_model, tmp_path):
    """The tiny model as its own judge passes nothing: the error comes after the probe pairs, not after answering
    every question."""
    out = tmp_path / "v.safetensors"
    proc = run_script(
        "persona.py", "extract", "--model", tiny_model, "--no-8bit", "--samples", "1", "--max-new-tokens", "4",
        "--judge", f"local:{tiny_model}", "--probe-pairs", "2", "--out", out, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "none of the first 2 pairs passed the filter" in proc.stderr
    answered = out.with_suffix(".answers.jsonl").read_text().splitlines()
    assert len(answered) == 4  # 2 pairs x (evil, helpful), not the 40 of every question


def test_a_lock_file_names_its_writer(tiny_model, train_file, tmp_path):
    out = tmp_path / "run"
    run_script("kl.py", "--model", tiny_model, "--data", train_file, *TINY, "--max-steps", "1", "--out", out)
    text = (out / ".lock").read_text()
    assert text.startswith(f"PID {os.getpid()}") and "kl.py" in text
