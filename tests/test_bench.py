"""The benchmarks' arithmetic (no timing is asserted) and the rule that method scripts never import TRL."""

import ast
from pathlib import Path

import pytest
import torch

from bench.benchlib import after_first, last_epoch

ROOT = Path(__file__).resolve().parent.parent


def test_last_epoch_times_only_the_last_epoch_from_the_end_of_the_one_before():
    # our scripts: 0-based int epochs; step 3 ends epoch 0 at t=30
    ours = [
        {"epoch": 0, "time": 10.0 * k, "tokens": 100, "padding_efficiency": 1.0, "peak_mem_mb": 5} for k in (1, 2, 3)
    ]
    ours += [
        {"epoch": 1, "time": 30.0 + 5 * k, "tokens": 50, "padding_efficiency": 0.5, "peak_mem_mb": 7} for k in (1, 2)
    ]
    r = last_epoch(ours)
    assert r["steps"] == 2 and r["seconds"] == pytest.approx(10.0) and r["tokens"] == 100
    assert r["tokens_per_s"] == pytest.approx(10.0) and r["padding_efficiency"] == pytest.approx(0.5)
    assert r["peak_mem_mb"] == 7
    # the Trainer: fractional epochs, the last step of epoch 1 at exactly 1.0 (or a hair above)
    trl = [
        {"epoch": e, "time": t, "tokens": 10, "padding_efficiency": 1.0, "peak_mem_mb": 1}
        for e, t in [(0.5, 1.0), (1.0000000001, 2.0), (1.5, 4.0), (2.0, 6.0)]
    ]
    r = last_epoch(trl)
    assert r["steps"] == 2 and r["seconds"] == pytest.approx(4.0)


def test_last_epoch_refuses_a_single_epoch():
    with pytest.raises(ValueError, match="one epoch"):
        last_epoch([{"epoch": 0, "time": 1.0, "tokens": 1, "padding_efficiency": 1.0, "peak_mem_mb": 1}] * 3)


def test_after_first_leaves_out_the_warm_up_step():
    m = [{"time": t, "peak_mem_mb": p} for t, p in [(100.0, 1), (103.0, 4), (105.0, 2)]]
    r = after_first(m)
    assert r["steps"] == 2 and r["step_s"] == pytest.approx(2.5) and r["peak_mem_mb"] == 4


def test_method_scripts_never_import_trl():
    scripts = sorted(ROOT.glob("*.py"))
    assert {p.name for p in scripts} >= {"common.py", "interleave.py", "grpo.py", "judge.py"}
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            assert not any(n == "trl" or n.startswith("trl.") for n in names), f"{path.name} imports {names}"


def test_matmul_params_counts_every_linear_weight_a_token_goes_through(tiny_model):
    from transformers import AutoModelForCausalLM

    from bench.benchlib import lora_sft_flops_per_token, matmul_params

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(model.config) == linear  # blocks + output head (tied or not, it is multiplied through)
    assert lora_sft_flops_per_token(str(tiny_model)) == 4 * linear


def test_gpu_check_runs_on_cpu_and_reports_every_script(tmp_path):
    """bench/gpu_check.py as the README gives it for this machine: every method script, the invariants, the table."""
    import json
    import subprocess
    import sys

    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [
            sys.executable,
            "bench/gpu_check.py",
            "--device",
            "cpu",
            "--no-8bit",
            "--shape",
            "tiny",
            "--steps",
            "3",
            "--json",
            str(out),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    scripts = {"sft", "kl", "ldifs", "persona", "inoculate", "caft", "npo", "grpo"}
    assert set(report["scripts"]) == scripts | {"sft-checkpointing"}
    assert all(r["ok"] and r["tokens_per_s"] > 0 for r in report["scripts"].values())
    assert set(report["checks"]) == {
        "kl = 0 at step 1",
        "ldifs = 0 at step 1",
        "resume after a kill: same losses",
        "base weights frozen",
        *(f"{s}: losses and gradient norms finite" for s in scripts | {"sft-checkpointing"}),
        "--gradient-checkpointing: on, the same losses",
        "memory returned between scripts",
        "caft directions, persona extract, npo eval",
        "8-bit input gradient = bitsandbytes' (outliers planted)",
        "GRPO update with reward spread and KL",
        "local judge on the device",
        "tiny SFT step: activations within 1.25x the plan",
    }
    assert all(c["ok"] for c in report["checks"].values())
    assert report["generation"]["tokens_per_s"] > 0
    for script in ("interleave.py", "kl.py", "caft.py", "grpo.py", "generation", "check: resume"):
        assert script in proc.stdout


def test_study_levers_counts_shared_questions_and_refuses_an_unknown_lever(tmp_path):
    """The model-free lever: the held-out questions the four OpSwap tiers share, against a direct count."""
    import json
    import subprocess
    import sys

    from common import load_split

    out = tmp_path / "levers.json"
    cmd = [sys.executable, str(ROOT / "bench" / "study_levers.py"), "--n-questions", "30", "--json", str(out)]
    proc = subprocess.run(cmd + ["--only", "reuse"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    held = [{c[0]["content"] for c in load_split(f"opswap:{t}", "eval", 0)[:30]} for t in range(4)]
    assert json.loads(out.read_text()) == {"reuse_shared_questions": len(set.intersection(*held))}
    assert f"{len(set.intersection(*held))} of 30" in proc.stdout
    bad = subprocess.run(cmd + ["--only", "reuse,speed"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown ['speed']" in bad.stderr


def test_bench_all_runs_the_readme_commands_and_keeps_a_report(tmp_path):
    """bench/all.py: its commands are bench/RESULTS.md's (every benchmark of its table, one line each); a run
    writes each table and report.md as it goes; a failing benchmark is reported, the next one still runs, exit 1."""
    import re
    import subprocess
    import sys

    readme = (ROOT / "bench" / "RESULTS.md").read_text()
    block = readme[readme.index("Commands (each printed the row's figures)") :]
    block = block[: block.index("```", block.index("```bash") + 7)]
    listed = re.findall(r"python bench/(\w+)\.py", block)
    dry = subprocess.run([sys.executable, "bench/all.py", "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    ran = re.findall(r"bench/(\w+)\.py", dry.stdout)
    assert dry.returncode == 0 and set(ran) == set(listed) - {"all"} and len(ran) == len(dry.stdout.splitlines())
    assert "all" in listed  # the README names the one command too

    data = tmp_path / "data"
    data.mkdir()
    (data / "medical_misaligned_train_100.jsonl").write_text("not json\n")
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "bench/all.py",
            "--out",
            str(out),
            "--data-dir",
            str(data),
            "--only",
            "ldifs_scale",
            "judge_concurrency",
            "--args",
            "judge_concurrency=--n 16 --delay 0.01",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = (out / "report.md").read_text()
    assert proc.returncode == 1 and "failed: ldifs_scale" in proc.stderr
    assert "## ldifs_scale" in report and "FAILED with exit status" in report
    assert "## judge_concurrency" in report and "--n 16 --delay 0.01" in report
    assert "16 judgments" in (out / "judge_concurrency.txt").read_text()

    bad = subprocess.run([sys.executable, "bench/all.py", "--only", "sft"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--only sft: not a benchmark" in bad.stderr


def test_grpo_vs_trl_gives_grpo_py_flags_it_accepts():
    """The benchmark's grpo.py run passes grpo.py's own flag checks (a value grpo.py refuses, such as --eval-n 0,
    fails the benchmark only when it runs: after half an hour of bench/all.py)."""
    import grpo
    from bench.grpo_vs_trl import build_parser, grpo_arguments

    argv = grpo_arguments(build_parser().parse_args([]))
    args = grpo.build_parser().parse_args([*argv, "--out", "unused"])
    grpo.check_args(args)
    assert args.eval_n >= 1 and args.min_new_tokens == args.max_new_tokens == 64
    with pytest.raises(grpo.UserError, match="--eval-n 0"):
        grpo.check_args(grpo.build_parser().parse_args([*argv, "--eval-n", "0"]))


def test_grpo_step_times_leave_out_the_held_out_evaluation():
    """Each step's end moves back by the held-out evaluations logged until then, so the last step (evaluated) counts
    only its GRPO work."""
    from bench.grpo_vs_trl import without_heldout

    metrics = [{"time": 10.0}, {"time": 20.0}, {"time": 38.0, "heldout_s": 8.0}]
    metrics = [{**m, "step": k + 1, "peak_mem_mb": 1.0} for k, m in enumerate(metrics)]
    assert [m["time"] for m in without_heldout(metrics)] == [10.0, 20.0, 30.0]
    assert after_first(without_heldout(metrics))["step_s"] == 10.0
