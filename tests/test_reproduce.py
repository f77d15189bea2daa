"""examples/reproduce.py on the tiny model: two methods x one dataset x 2 steps with exact-match evaluation. Tables
and figures are written, a second invocation does nothing new, a run killed mid-way is continued (not restarted),
--dry-run only prints, a failing job is reported and the others finish."""
import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT


def study(tiny_model, root, *extra, methods="misaligned,kl"):
    cmd = [sys.executable, str(ROOT / "examples" / "reproduce.py"), "--model", str(tiny_model), "--datasets", "opswap:1",
           "--methods", methods, "--root", str(root),
           "--train-args", "--no-8bit --lora-r 4 --lora-alpha 8 --max-len 128 --max-steps 2 --batch-size 2 "
                           "--grad-accum 1 --save-every 1",
           "--method-args", "kl=--lam 1.0",
           "--eval-args", "--no-8bit --n-questions 2 --samples 1 --max-new-tokens 4 --temperature 0",
           *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    proc = study(tiny_model, root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc


def test_study_writes_tables_and_figures(finished):
    root, proc = finished
    t3 = (root / "table3.md").read_text()
    assert "| SFT |" in t3 and "| KL |" in t3 and "Tier 1" in t3
    assert "(runs/opswap-1/kl/)" in t3  # each cell links to its run folder
    for run in ("misaligned", "kl"):
        s = json.loads((root / "runs" / "opswap-1" / run / "eval-opswap-1" / "summary.json").read_text())
        assert s["n_answers"] == 2
    assert (root / "figures" / "opswap.png").stat().st_size > 5000
    assert (root / "figures" / "curves-opswap-1.png").stat().st_size > 5000
    assert "4 jobs: 0 already done, 4 to run" in proc.stdout


def test_second_invocation_does_nothing_new(finished, tiny_model):
    root, _ = finished
    mtime = (root / "runs" / "opswap-1" / "kl" / "adapter_model.safetensors").stat().st_mtime
    proc = study(tiny_model, root)
    assert proc.returncode == 0
    assert "4 jobs: 4 already done, 0 to run" in proc.stdout and "start " not in proc.stdout
    assert (root / "runs" / "opswap-1" / "kl" / "adapter_model.safetensors").stat().st_mtime == mtime


def test_killed_run_is_continued_not_restarted(finished, tiny_model, tmp_path):
    root = tmp_path / "study"
    shutil.copytree(finished[0], root)
    kl = root / "runs" / "opswap-1" / "kl"
    # killed after the step-1 checkpoint: no step-2 checkpoint, no final adapter, no evaluation
    shutil.rmtree(kl / "checkpoints" / "step-000002")
    shutil.rmtree(kl / "eval-opswap-1")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (kl / f).unlink()
    (kl / "metrics.jsonl").write_text((kl / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    dry = study(tiny_model, root, "--dry-run")
    assert "kl.py --resume" in dry.stdout
    proc = study(tiny_model, root)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "4 jobs: 2 already done, 2 to run" in proc.stdout
    log = (root / "logs" / "train-opswap-1-kl.log").read_text()
    assert "resumed from" in log and "step-000001" in log
    assert [json.loads(l)["step"] for l in (kl / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_dry_run_lists_every_command_and_runs_nothing(tiny_model, tmp_path):
    proc = study(tiny_model, tmp_path / "s", "--dry-run")
    assert proc.returncode == 0
    lines = [l for l in proc.stdout.splitlines() if not l.startswith("#")]
    assert len(lines) == 4
    assert "interleave.py" in lines[0] and "judge.py" in lines[1] and "kl.py" in lines[2] and "--lam 1.0" in lines[2]
    assert not (tmp_path / "s" / "runs").exists()


def test_a_failing_job_is_reported_and_the_others_finish(tiny_model, tmp_path):
    root = tmp_path / "s"
    proc = study(tiny_model, root, "--method-args", "kl=--lam=-1")
    assert proc.returncode == 1
    assert "FAILED train:opswap:1:kl" in proc.stdout and "train-opswap-1-kl.log" in proc.stdout
    assert "SKIPPED eval:opswap:1:kl" in proc.stdout
    assert (root / "runs" / "opswap-1" / "misaligned" / "eval-opswap-1" / "summary.json").exists()
    assert "--lam -1.0: must be >= 0" in (root / "logs" / "train-opswap-1-kl.log").read_text()
    assert "| SFT |" in (root / "table3.md").read_text()
