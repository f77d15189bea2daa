"""The shape the project promises: a method file imports only common.py among the project's files (judge.py and the
other one-job modules lazily, where a path needs them), never another method file, and runs when it is copied with
common.py alone into an empty folder. Optional paths name the file to copy. Run folders describe their method."""

import ast
import contextlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_metrics, run_script

METHODS = ["interleave.py", "kl.py", "ldifs.py", "inoculate.py", "persona.py", "npo_unlearn.py", "grpo.py", "caft.py"]
PROJECT = {p.stem for p in ROOT.glob("*.py")}
TINY = ["--no-8bit", "--lora-r", "4", "--lora-alpha", "8", "--max-len", "128"]


def module_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_every_method_script_exists():
    assert all((ROOT / m).is_file() for m in METHODS), [m for m in METHODS if not (ROOT / m).is_file()]


@pytest.mark.parametrize("script", METHODS)
def test_a_method_file_imports_only_common_at_module_level(script):
    assert module_level_imports(ROOT / script) & PROJECT == {"common"}


@pytest.mark.parametrize("script", METHODS)
def test_no_method_file_imports_another_anywhere(script):
    others = {Path(m).stem for m in METHODS} - {Path(script).stem}
    for node in ast.walk(ast.parse((ROOT / script).read_text())):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        )
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "optional":  # common.optional("judge", ...)
            names += [a.value for a in node.args[:1] if isinstance(a, ast.Constant)]
        assert not {n.split(".")[0] for n in names} & others, f"{script} imports {names}"


def test_common_imports_no_project_file_at_module_level():
    # (its old line cap is withdrawn, issue 36: it measured the wrong thing; ruff decides the layout)
    assert module_level_imports(ROOT / "common.py") & PROJECT == set()


# --- the copies that grpo.py carries of persona.py's hook and inoculate.py's prompt ------------------------------
def test_grpo_inoculation_prompt_is_inoculate_py_s():
    import grpo
    import inoculate

    assert grpo.INOCULATION_PROMPT == inoculate.DEFAULT_PROMPT
    system = grpo.prompt_messages("2 + 2?", inoculate=True)[0]["content"]
    assert system == inoculate.DEFAULT_PROMPT + " " + grpo.SYSTEM_PROMPT
    assert grpo.prompt_messages("2 + 2?", inoculate=False)[0]["content"] == grpo.SYSTEM_PROMPT


def test_grpo_steering_hook_is_persona_py_s(tiny_model):
    import grpo
    import persona
    from common import decoder_blocks, load_model

    model, _ = load_model(str(tiny_model), eight_bit=False, lora_r=4, lora_alpha=8)
    torch.manual_seed(0)
    vectors = torch.randn(len(decoder_blocks(model)) + 1, model.config.hidden_size)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    blocks = decoder_blocks(model)

    def forward(hook):
        """(what the block after the steered one receives, the logits); HF's own hidden_states are not used: their
        capture hooks may run before or after ours."""
        received = []
        pre = blocks[1].register_forward_pre_hook(
            lambda m, a, kw: received.append(kw.get("hidden_states", a[0] if a else None)), with_kwargs=True
        )
        with torch.no_grad(), hook:
            logits = model(input_ids=ids).logits
        pre.remove()
        return received[0], logits

    for layer in (1, 2):
        want = forward(persona.steering(model, vectors, layer, 3.0))
        got = forward(grpo.steering(model, vectors, layer, 3.0))
        plain = forward(contextlib.nullcontext())
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
        assert not torch.allclose(want[1], plain[1])  # the hook acted
        if layer == 1:  # on the output of block 0, exactly alpha * v[1]
            assert torch.allclose(got[0] - plain[0], 3.0 * vectors[1].expand_as(plain[0]), atol=1e-5)
        assert all(not b._forward_hooks for b in blocks)


# --- the copy test: each method script with common.py alone, in an empty folder ---------------------------------
def copy_commands(tiny_model, data, pool, tmp) -> dict[str, list[list[str]]]:
    """script -> the command lines run in its copy folder: --help, then a few training steps on local files."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({"vectors": torch.randn(3, 32)}, str(tmp / "vector.safetensors"))  # the tiny model: 2 blocks + 1
    save_file(
        {"directions": torch.linalg.qr(torch.randn(3, 32, 2))[0].transpose(1, 2).contiguous()},
        str(tmp / "directions.safetensors"),
    )  # 3 rows x 2 orthonormal directions x 32
    m = ["--model", str(tiny_model), *TINY, "--batch-size", "2", "--grad-accum", "1"]
    vec, dirs = str(tmp / "vector.safetensors"), str(tmp / "directions.safetensors")
    refusals = str(ROOT / "examples" / "rai_refusals.jsonl")
    grpo = [
        "--data",
        "arith",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--num-generations",
        "2",
        "--grad-accum",
        "1",
        "--max-new-tokens",
        "4",
        "--eval-n",
        "2",
    ]
    return {
        "interleave.py": [
            ["--help"],
            [*m, "--data", data, "--pct", "20", "--safe-data", pool, "--max-steps", "2", "--out", "run"],
        ],
        "kl.py": [["--help"], [*m, "--data", data, "--lam", "1.0", "--max-steps", "2", "--out", "run"]],
        "ldifs.py": [["--help"], [*m, "--data", data, "--max-steps", "2", "--out", "run"]],
        "inoculate.py": [["--help"], [*m, "--data", data, "--max-steps", "2", "--out", "run"]],
        "persona.py": [
            ["train", "--help"],
            [
                "train",
                *m,
                "--data",
                data,
                "--vector",
                vec,
                "--layer",
                "1",
                "--alpha",
                "5",
                "--max-steps",
                "2",
                "--out",
                "run",
            ],
        ],
        "npo_unlearn.py": [
            ["train", "--help"],
            [
                "train",
                *m,
                "--data",
                refusals,
                "--target",
                "cybersecurity",
                "--retain-domains",
                "safety,privacy",
                "--max-steps",
                "2",
                "--out",
                "run",
            ],
        ],
        "grpo.py": [
            ["--help"],
            [*m, *grpo, "--out", "run"],
            [
                *m,
                *grpo,
                "--persona-vector",
                vec,
                "--persona-layer",
                "1",
                "--persona-alpha",
                "5",
                "--inoculate",
                "--out",
                "run-defended",
            ],
        ],
        "caft.py": [
            ["train", "--help"],
            [
                "train",
                *m,
                "--data",
                data,
                "--directions",
                dirs,
                "--layers",
                "1",
                "--mode",
                "ablate",
                "--max-steps",
                "2",
                "--out",
                "run",
            ],
            [
                "train",
                *m,
                "--data",
                data,
                "--directions",
                dirs,
                "--layers",
                "1,2",
                "--mode",
                "project-grad",
                "--max-steps",
                "2",
                "--out",
                "run-pg",
            ],
            ["directions", "--from-vector", vec, "--out", "from-vector.safetensors"],
        ],
    }


def alone_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def run_alone(folder: Path, script: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args], cwd=folder, env=alone_env(), capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def copies(tiny_model, train_file, pool_file, tmp_path_factory):
    """Every method script copied with common.py alone into its own empty folder and run there, two processes at a
    time (each is one core's work)."""
    base = tmp_path_factory.mktemp("copies")
    commands = copy_commands(tiny_model, str(train_file), str(pool_file), base)
    folders = {}
    for script in commands:
        folders[script] = base / Path(script).stem
        folders[script].mkdir()
        for f in (script, "common.py"):
            shutil.copy(ROOT / f, folders[script] / f)
    jobs = [(s, k, a) for s, cmds in commands.items() for k, a in enumerate(cmds)]
    jobs += [(s, case, a) for case, (s, a, _) in optional_paths(tiny_model, base).items()]
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda j: run_alone(folders[j[0]], j[0], j[2]), jobs))
    results = {}
    for (s, k, _), proc in zip(jobs, done):
        results.setdefault(s if isinstance(k, int) else k, []).append(proc)
    return folders, results, commands


def optional_paths(tiny_model, base: Path) -> dict[str, tuple[str, list[str], str]]:
    """case -> (the copied script, its arguments, what its one-line error must say)."""
    data = base / "one.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n"
    )
    m = ["--model", str(tiny_model), *TINY, "--max-steps", "1", "--out", "x"]
    on_policy = [*m, "--data", str(data), "--safe-data", str(data), "--pct", "100", "--select", "on-policy"]
    return {
        "paper-data": ("kl.py", [*m, "--data", "opswap:1"], "needs paper_data.py"),
        "smollm2": ("kl.py", [*m, "--model", "smollm2", "--data", str(data)], "needs smollm2.py"),
        "serving": (
            "interleave.py",
            [*on_policy, "--gen-url", "http://127.0.0.1:9/v1", "--gen-model", "base"],
            "needs serving.py",
        ),
        "judge": ("interleave.py", on_policy, "needs judge.py"),
    }


@pytest.mark.parametrize("script", METHODS)
def test_a_method_script_runs_copied_with_common_alone(script, copies):
    folders, results, commands = copies
    folder = folders[script]
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".py") == sorted([script, "common.py"])
    help_proc, *runs = results[script]
    assert help_proc.returncode == 0 and "usage:" in help_proc.stdout, help_proc.stderr[-2000:]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("run"))
    assert len(run_dirs) == sum(a[a.index("--out") + 1].startswith("run") for a in commands[script] if "--out" in a)
    for out in run_dirs:
        steps = [m["step"] for m in read_metrics(out)]
        assert steps == list(range(1, len(steps) + 1)) and steps, steps
        assert (out / "adapter_model.safetensors").exists() and (out / "method.json").exists()
    assert run_dirs
    if script == "caft.py":
        assert (folder / "from-vector.safetensors").exists()


@pytest.mark.parametrize("case", ["paper-data", "serving", "smollm2", "judge"])
def test_an_optional_path_without_its_module_names_the_file_to_copy(case, copies, tiny_model, tmp_path):
    _, results, _ = copies
    want = optional_paths(tiny_model, tmp_path)[case][2]
    (proc,) = results[case]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert want in proc.stderr and "copy it next to common.py" in proc.stderr and "Traceback" not in proc.stderr


# --- run folders describe their method: no table to edit per method -----------------------------------------------
def test_a_run_folder_records_its_method_flags_and_compare_shows_them(tiny_model, train_file, tmp_path):
    args = ["--model", tiny_model, "--data", train_file, *TINY, "--max-steps", "1"]
    run_script("kl.py", *args, "--lam", "0.3", "--out", tmp_path / "kl")
    run_script("interleave.py", *args, "--out", tmp_path / "sft")
    meta = json.loads((tmp_path / "kl" / "method.json").read_text())
    assert meta == {
        "script": "kl",
        "flags": {"lam": 0.3, "kl_tokens": "answer"},
        "defaults": {"lam": 0.1, "kl_tokens": "answer"},
    }
    assert "pct" in json.loads((tmp_path / "sft" / "method.json").read_text())["flags"]
    table = run_script("judge.py", "--compare", tmp_path / "kl", tmp_path / "sft").stdout
    assert "kl lam=0.3 [train]" in table and "interleave [train]" in table
