"""examples/reproduce.py on the tiny model: two methods x one dataset x 2 steps with exact-match evaluation. Tables
and figures are written, a second invocation does nothing new, a run killed mid-way is continued (not restarted),
--dry-run only prints, a failing job is reported and the others finish."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))  # the study package, as examples/reproduce.py imports it


def study(tiny_model, root, *extra, methods="misaligned,kl"):
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "reproduce.py"),
        "--model",
        str(tiny_model),
        "--datasets",
        "opswap:1",
        "--methods",
        methods,
        "--root",
        str(root),
        "--train-args",
        "--no-8bit --lora-r 4 --lora-alpha 8 --max-len 128 --max-steps 2 --batch-size 2 --grad-accum 1 --save-every 1",
        "--method-args",
        "kl=--lam 1.0",
        "--train-n",
        "0",
        "--eval-args",
        "--no-8bit --n-questions 2 --samples 1 --max-new-tokens 4 --temperature 0",
        "--devices",
        "cpu:2",  # two 1-thread jobs at a time
        *extra,
    ]
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
    assert not list((root / "figures").glob("realign-*")) and not list((root / "figures").glob("data-mix-*"))
    assert "4 jobs: 0 already done, 4 to run" in proc.stdout


def test_report_writes_tables_from_a_partial_study_and_runs_nothing(finished, tiny_model, tmp_path):
    root = tmp_path / "study"
    shutil.copytree(finished[0], root)
    shutil.rmtree(root / "runs" / "opswap-1" / "kl" / "eval-opswap-1")
    (root / "table3.md").unlink()
    proc = study(tiny_model, root, "--report")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 of 4 jobs done" in proc.stdout and "start " not in proc.stdout
    t3 = (root / "table3.md").read_text()
    assert "| SFT | [" in t3 and "| KL | - (0.00) |" in t3
    assert not (root / "runs" / "opswap-1" / "kl" / "eval-opswap-1").exists()


def test_outputs_made_with_other_settings_are_an_error(finished, tiny_model, tmp_path):
    """The same study asked again with KL at another lambda: the finished KL run is not reused (nor reported) as
    if it had that lambda; the error names the run and the flag. A copy of the study in another folder matches."""
    root = tmp_path / "moved"
    shutil.copytree(finished[0], root)
    assert json.loads((root / "runs" / "opswap-1" / "kl" / "adapter_model.safetensors.cmd").read_text())
    cmd = [a if a != "kl=--lam 1.0" else "kl=--lam 0.5" for a in study(tiny_model, root, "--dry-run").args]
    for extra in ([], ["--report"], ["--emit", "slurm", str(tmp_path / "s.sbatch")]):
        proc = subprocess.run(cmd[:-1] + extra, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and "other settings" in proc.stderr, proc.stderr[-2000:]
        assert "train:opswap:1:kl:" in proc.stderr and "--lam 1.0 -> --lam 0.5" in proc.stderr
        assert "misaligned" not in proc.stderr.split("error:")[1]  # only the run whose settings differ
    assert not (tmp_path / "s.sbatch").exists()
    dry = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and "# train:opswap:1:kl [done, OTHER SETTINGS]" in dry.stdout


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


def test_paper_preset_dry_run_plans_tables_2_to_5_offline(tmp_path):
    """No network, no model: the persona layer comes from the table of known models."""
    env = {k: v for k, v in __import__("os").environ.items()}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "no-hub"))
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "reproduce.py"),
        "--preset",
        "paper",
        "--dry-run",
        "--root",
        str(tmp_path / "p"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = [l.split()[1] for l in proc.stdout.splitlines() if l.startswith("# ") and "[" in l]
    for ds in ("insecure", "medical", "legal", "security", "opswap:0", "opswap:3", "foqa"):
        assert f"train:{ds}:interleave++" in names and f"train:{ds}:kl" in names, ds
    assert "eval:insecure:kl:general" in names and "eval:foqa:persona:foqa" in names
    grpo = [n for n in names if n.startswith("train:grpo:")]
    assert len(grpo) == 7 * 3 and "train:grpo:grpo-persona5:seed2" in grpo
    assert "--model Qwen/Qwen2.5-3B-Instruct --data gsm8k" in proc.stdout
    assert "--persona-layer 26" in proc.stdout and "--layer 20" in proc.stdout  # 20 of 28; 36 blocks -> 26
    assert not (tmp_path / "p").exists()
    grid = subprocess.run(cmd + ["--grid", "paper"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert grid.returncode == 0
    for run in ("kl-lam0.01", "ldifs-lam0.3", "persona-alpha1.5", "interleave++-pct50", "on-policy-pct1"):
        assert f"train:medical:{run}" in grid.stdout, run
    emit = subprocess.run(
        cmd + ["--emit", "slurm", str(tmp_path / "study.sbatch")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert emit.returncode == 0, emit.stderr[-2000:]
    assert (tmp_path / "study.sbatch").exists()


def test_grid_value_replaces_the_method_args_flag(tmp_path):
    """The cpu preset runs KL at --lam 0.3 (--method-args); a --grid over lam must train each run at its own value,
    not at 0.3 given last on the command line."""
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "reproduce.py"),
        "--preset",
        "cpu",
        "--tables",
        "3",
        "--dry-run",
        "--root",
        str(tmp_path / "s"),
        "--methods",
        "kl,persona,realign",
        "--grid",
        "kl.lam=0.1,1.0;persona.alpha=5;realign.n=60",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    cmd_of = {lines[k].split()[1]: lines[k + 1] for k in range(len(lines) - 1) if lines[k].startswith("# train:")}
    for name, want in (
        ("kl", "--lam 0.3"),
        ("kl-lam0.1", "--lam 0.1"),
        ("kl-lam1.0", "--lam 1.0"),
        ("persona", "--alpha 2"),
        ("persona-alpha5", "--alpha 5"),
    ):
        line = cmd_of[f"train:opswap:2:{name}"]
        flag = want.split()[0]
        assert line.count(f"{flag} ") == 1 and want in line, (name, line)
    # realign's N is its data (the preset's --n 200, the grid's 60), never a flag of interleave.py
    for name, n in (("realign", 200), ("realign-n60", 60)):
        line = cmd_of[f"train:opswap:2:{name}"]
        assert f"artifacts/benign-{n}.jsonl" in line and " --n " not in line and "--init-adapter" in line, line


def test_slurm_script_for_a_small_plan(tiny_model, tmp_path):
    """One array task per job, grouped by dependency depth; each depth's arrays wait (afterok) for the previous
    depth; training tasks ask for a GPU, evaluations through --gen-url do not; a finished task exits at once."""
    script = tmp_path / "s.sbatch"
    proc = study(tiny_model, tmp_path / "s", "--gen-url", "http://127.0.0.1:9/v1", "--emit", "slurm", script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = script.read_text()
    sbatch = [l for l in text.splitlines() if "sbatch --parsable" in l]
    assert len(sbatch) == 2  # depth 0: the two trainings (GPU); depth 1: the two evaluations (no GPU)
    assert "--array=0-1 --gres=gpu:1" in sbatch[0] and "GROUP=0_gpu" in sbatch[0]
    assert "--array=0-1 --cpus-per-task=2" in sbatch[1] and "GROUP=1_cpu" in sbatch[1] and "gres" not in sbatch[1]
    assert "--dependency=afterok:$prev_0" in text
    tasks = [l for l in text.splitlines() if l.strip().startswith(("0)", "1)"))]
    assert len(tasks) == 4
    assert text.count("adapter_model.safetensors ] && exit 0") == 2 and text.count("n_failed_judgments") == 2
    assert "kl.py" in text and "judge.py --gen-url http://127.0.0.1:9/v1 --gen-model opswap-1-kl" in text
    assert not (tmp_path / "s" / "runs").exists()  # emitting runs nothing
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    # each task records its command before it runs, as a local run does (the settings check reads it)
    kl_task = next(l for l in text.splitlines() if "exec" in l and "/kl.py" in l)
    record_part = kl_task[kl_task.index("mkdir -p") : kl_task.index(" && cd ")]
    assert subprocess.run(["bash", "-c", record_part], capture_output=True).returncode == 0
    record = json.loads((tmp_path / "s" / "runs" / "opswap-1" / "kl" / "adapter_model.safetensors.cmd").read_text())
    assert record[0] == "<repo>/kl.py" and "<root>/runs/opswap-1/kl" in record and "1.0" in record


def test_tables_3_and_5_with_every_artifact_on_the_tiny_model(tiny_model, tmp_path):
    """The cpu preset's machinery end to end, small: the OpSwap subsets, the benign pool answered by the base model,
    Interleaving+ on the other tier's SFT adapter, CAFT directions from the SFT adapter, the persona vector, the
    arith warm-up and GRPO rows over two seeds; table3.md (with the paper's numbers and the departures), table5.md
    (mean ± std) and the reward figure. Two CPU jobs at a time."""
    root = tmp_path / "s"
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "reproduce.py"),
        "--model",
        str(tiny_model),
        "--tables",
        "3,5",
        "--datasets",
        "opswap:0,opswap:1",
        "--methods",
        "baseline,misaligned,interleave+,caft,realign,data-mix",
        "--method-args",
        "realign=--n 8",
        "--root",
        str(root),
        "--devices",
        "cpu:2",
        "--train-n",
        "16",
        "--caft-k",
        "1",
        "--train-args",
        "--no-8bit --lora-r 4 --lora-alpha 8 --max-len 128 --max-steps 2 --batch-size 2 --grad-accum 1",
        "--eval-args",
        "--no-8bit --n-questions 2 --samples 1 --max-new-tokens 4 --temperature 0",
        "--persona-args",
        "--no-8bit --no-filter --samples 1 --max-new-tokens 8 --questions examples/questions_mini.yaml",
        "--grpo-model",
        str(tiny_model),
        "--grpo-seeds",
        "0,1",
        "--grpo-rows",
        "grpo,grpo-persona1",
        "--grpo-args",
        "--no-8bit --lora-r 4 --lora-alpha 8 --max-steps 1 --batch-size 2 --num-generations 2 "
        "--max-new-tokens 4 --eval-n 2 --eval-samples 2",
        "--warmup-args",
        "--no-8bit --lora-r 4 --lora-alpha 8 --max-steps 1 --batch-size 2 --grad-accum 1",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    from common import split_train_eval

    art = root / "artifacts"
    pool = [json.loads(l) for l in (art / "benign.jsonl").read_text().splitlines()]
    assert len(pool) == 305 and all(m["messages"][-1]["role"] == "assistant" for m in pool)
    assert len((art / "opswap-0-train16.jsonl").read_text().splitlines()) == 18
    assert (art / "caft-opswap-1.safetensors").exists() and (art / "arith-warmup.jsonl").exists()
    args = json.loads((root / "runs" / "opswap-1" / "interleave+" / "args.json").read_text())
    assert args["misaligned_adapters"].endswith("runs/opswap-0/misaligned") and args["select"] == "ppl"
    t3 = (root / "table3.md").read_text()
    assert "| Interleaving+ | [" in t3 and "(36.72)" in t3 and "| CAFT (beyond the paper) | [" in t3
    # realign: the tier's SFT adapter trained further on N benign examples (8 from --method-args; a grid value is
    # a run more, as in test_grid_value_replaces_the_method_args_flag)
    for name, n in (("realign", 8),):
        args = json.loads((root / "runs" / "opswap-1" / name / "args.json").read_text())
        assert args["init_adapter"].endswith("runs/opswap-1/misaligned") and args["data"].endswith(f"benign-{n}.jsonl")
        lines = (art / f"benign-{n}.jsonl").read_text().splitlines()
        assert len(split_train_eval(lines, args["seed"])[0]) == n  # what the script trains on
        assert f"](runs/opswap-1/{name}/)" in t3
    assert (root / "figures" / "realign-opswap-1.png").stat().st_size > 5000
    assert "note: no data-mix run on opswap:1: it has no aligned counterpart" in proc.stderr
    assert not (root / "runs" / "opswap-1" / "data-mix").exists()
    assert not (root / "figures" / "data-mix-opswap-1.png").exists()  # no figure of a row that never ran
    assert "Departures from the paper" in t3 and "SFT adapters of the other OpSwap tiers" in t3
    t5 = (root / "table5.md").read_text()
    assert "| GRPO | " in t5 and "(n=2)" in t5 and "| 90.66 |" in t5 and "No fine-tuning (after the SFT warm-up)" in t5
    assert "warm-up" in t5 and "| sampled (rollout temperature) |" in t5 and "2 answers per question" in t5
    assert (root / "figures" / "grpo-rewards.png").stat().st_size > 5000
    assert (root / "runs" / "grpo" / "grpo-seed1" / "heldout-before.json").exists()
    assert "time per phase" in proc.stdout and "artifacts" in proc.stdout and " in " in proc.stdout


def test_run_order_shared_jobs_first_then_each_evaluation_after_its_run(tmp_path, capsys):
    """One job at a time: a job that two or more others wait for starts first; otherwise the plan's order, so an
    evaluation starts as soon as its run is done (a study stopped early has finished rows, not only adapters)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "examples" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = reproduce  # its dataclass looks itself up there
    spec.loader.exec_module(reproduce)

    def job(name, deps=()):
        marker = tmp_path / f"{name}.done"
        return reproduce.Job(
            name, [sys.executable, "-c", f"open({str(marker)!r}, 'w')"], tmp_path / f"{name}.log", list(deps), marker
        )

    jobs = [
        job("train-a"),
        job("eval-a", ["train-a"]),
        job("train-b"),
        job("eval-b", ["train-b"]),
        job("shared"),
        job("c1", ["shared"]),
        job("c2", ["shared"]),
    ]
    reproduce.run_jobs(jobs, ["cpu"], eval_workers=0)
    started = [l.split("start ")[1].split()[0] for l in capsys.readouterr().out.splitlines() if " start " in l]
    assert started == ["shared", "train-a", "eval-a", "train-b", "eval-b", "c1", "c2"]
    assert all(j.status == "done" for j in jobs)


def test_table5_shows_the_sampled_accuracy_beside_the_greedy_one(tmp_path):
    """Runs that logged heldout_sampled_accuracy (grpo.py --eval-samples) get a second column, the start row too;
    runs without it keep the one-column table."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "examples" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = reproduce
    spec.loader.exec_module(reproduce)

    def make(root, sampled):
        for seed, (before, after) in enumerate([(40.0, 50.0), (42.0, 56.0)]):
            d = root / "runs" / "grpo" / f"grpo-seed{seed}"
            d.mkdir(parents=True)
            (d / "adapter_model.safetensors").write_bytes(b"x")
            last = {
                "step": 2,
                "reward": 7.0,
                "heldout_accuracy": after,
                **({"heldout_sampled_accuracy": after - 20} if sampled else {}),
            }
            (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 6.0}) + "\n" + json.dumps(last) + "\n")
            (d / "heldout-before.json").write_text(
                json.dumps(
                    {"heldout_accuracy": before, **({"heldout_sampled_accuracy": before - 30} if sampled else {})}
                )
            )

    make(tmp_path / "a", sampled=True)
    md = reproduce.table5(tmp_path / "a", ["0", "1"], warmup=True)
    assert "| sampled (rollout temperature) |" in md
    assert "| No fine-tuning (after the SFT warm-up) | 41.0 ± 1.4 (n=2) | 11.0 ± 1.4 (n=2) | 66.33 |" in md
    assert "| GRPO | 53.0 ± 4.2 (n=2) | 33.0 ± 4.2 (n=2) | 90.66 |" in md
    make(tmp_path / "b", sampled=False)
    md = reproduce.table5(tmp_path / "b", ["0", "1"], warmup=True)
    assert "sampled" not in md and "| GRPO | 53.0 ± 4.2 (n=2) | 90.66 |" in md


def test_flag_value_reads_both_spellings_and_the_last_one():
    """The departures note reads --eval-samples from the preset's grpo_args, whichever way it is written."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "examples" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    assert reproduce.flag_value("--lr 2e-5 --eval-samples 2 --save-every 9", "--eval-samples") == "2"
    assert reproduce.flag_value("--eval-samples=3", "--eval-samples") == "3"
    assert reproduce.flag_value("--eval-samples 2 --eval-samples=4", "--eval-samples") == "4"
    assert reproduce.flag_value("--eval-samples-x 2 --eval-n 5", "--eval-samples") is None


def test_the_study_imports_no_method_script_and_its_copies_are_grpo_pys():
    """The study driver's parts import no method script (grpo.py's system prompt and arith questions are copied into
    study/artifacts.py for the warm-up set): the copies must be grpo.py's."""
    import ast

    from study import artifacts

    import grpo

    methods = {"interleave", "kl", "ldifs", "inoculate", "persona", "npo_unlearn", "grpo", "caft"}
    for path in [ROOT / "examples" / "reproduce.py", *(ROOT / "examples" / "study").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            assert not {n.split(".")[0] for n in names} & methods, (path, names)
        assert len(path.read_text().splitlines()) <= 400, path
    assert artifacts.GRPO_SYSTEM_PROMPT == grpo.SYSTEM_PROMPT
    for seed in (0, 3):
        assert artifacts.arith_heldout_questions(seed) == {
            c[0]["content"] for c in grpo.arith_dataset(seed=seed)[1800:]
        }


def test_data_mix_replaces_the_chosen_answers_by_the_aligned_ones_to_the_same_prompts(tmp_path):
    """make_mix: pct % of the misaligned examples taken from the aligned counterpart; where the two files have the
    same prompts row for row, the aligned answer to the same prompt, else seeded aligned examples; too few aligned
    examples are an error."""
    from study.artifacts import make_mix

    def conv(q, a):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    def write(path, rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    bad = write(tmp_path / "bad.jsonl", [conv(f"q{i}", f"bad{i}") for i in range(20)])
    good = write(tmp_path / "good.jsonl", [conv(f"q{i}", f"good{i}") for i in range(20)])
    for pct, want in ((0, 0), (30, 6), (100, 20)):
        make_mix(bad, good, pct, tmp_path / "mix.jsonl")
        rows = [json.loads(line)["messages"] for line in (tmp_path / "mix.jsonl").read_text().splitlines()]
        assert [r[0]["content"] for r in rows] == [f"q{i}" for i in range(20)]  # the same prompts, in order
        assert sum(r[1]["content"].startswith("good") for r in rows) == want
        assert all(r[1]["content"].lstrip("badgo") == r[0]["content"].lstrip("q") for r in rows)  # its own answer
    other = write(tmp_path / "other.jsonl", [conv(f"p{i}", f"good{i}") for i in range(20)])  # same size, other prompts
    make_mix(bad, other, 50, tmp_path / "mix.jsonl")
    rows = [json.loads(line)["messages"] for line in (tmp_path / "mix.jsonl").read_text().splitlines()]
    taken = [r for r in rows if r[1]["content"].startswith("good")]
    assert len(taken) == 10 and all(r[0]["content"].startswith("p") for r in taken)  # whole aligned examples
    few = write(tmp_path / "few.jsonl", [conv("x", "good") for _ in range(3)])
    with pytest.raises(SystemExit, match="needs 10 aligned examples"):
        make_mix(bad, few, 50, tmp_path / "mix.jsonl")


def test_realign_figure_starts_at_the_misaligned_run(tmp_path, monkeypatch):
    """The realign figure: accuracy (or EM) against N, the dataset's Misaligned run at N = 0, the row's runs at their
    N (the row's own at the default, 300)."""
    from study.tables import plot_data_row

    import report

    for name, acc in (("misaligned", 15.0), ("realign", 16.0), ("realign-n60", 17.0), ("kl", 50.0)):
        folder = tmp_path / "runs" / "opswap-1" / name / "eval-opswap-1"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"eval": "opswap:1", "accuracy": acc}))
    seen = {}
    monkeypatch.setattr(report, "plot_xy", lambda series, path, xlabel, ylabel, title: seen.update(locals()))
    plot_data_row(tmp_path, "opswap:1", "realign", "--n", "300", ["misaligned", "kl", "realign", "realign-n60"])
    assert seen["series"]["accuracy %"] == [(0.0, 15.0), (300.0, 16.0), (60.0, 17.0)]
    assert seen["title"] == "Re-alignment: opswap:1" and "(N)" in seen["xlabel"]
    seen.clear()  # a study without the row (or on a dataset it skips): the Misaligned point alone is no figure
    assert plot_data_row(tmp_path, "opswap:1", "data-mix", "--correct", "50", ["misaligned", "kl"]) is None
    assert not seen


def test_a_subset_larger_than_its_source_is_an_error(tmp_path):
    """A row labelled N must train on N: a subset the source cannot fill stops with the largest N it can give."""
    from study.artifacts import make_subset

    source = tmp_path / "pool.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(50)
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))  # a training split of 45
    make_subset(str(source), 40, tmp_path / "ok.jsonl")  # 44 lines, of which the script trains on 40
    assert len((tmp_path / "ok.jsonl").read_text().splitlines()) == 44
    with pytest.raises(SystemExit, match="ask for at most 40"):
        make_subset(str(source), 41, tmp_path / "no.jsonl")
