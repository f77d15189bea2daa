"""Every command a script's docstring documents runs as written (issue 38): each one's script, subcommand, flags and
files are checked against the script's --help and the repository, and the quick CPU ones (offline: --model smollm2)
run end to end here, on the tiny test model instead of SmolLM2 and shortened (fewer steps, samples and tokens, the
layers within the tiny model's depth, run folders under a temp folder). The README's commands have their own test
(tests/test_readme.py)."""

import re
import shlex

import pytest
from conftest import ROOT, run_script
from test_readme import SUBCOMMANDS, help_text

SCRIPTS = ["interleave.py", "kl.py", "ldifs.py", "inoculate.py", "persona.py", "npo_unlearn.py", "grpo.py", "caft.py"]
SCRIPTS += ["judge.py", "geometry.py"]


def docstring_commands(script: str) -> list[tuple[bool, str]]:
    """(quick, command) for every `python SCRIPT ...` line of the docstring's run sections, continuation lines joined;
    quick: the command is in a section meant to run offline on the CPU (Quick ...)."""
    text = (ROOT / script).read_text()
    doc = text[text.index('"""') + 3 : text.index('"""', text.index('"""') + 3)]
    doc = re.sub(r"\\\\?\n\s*", lambda m: " " if m.group(0).startswith("\\") else m.group(0), doc)
    commands, quick = [], False
    for line in doc.splitlines():
        if re.match(r"^(Quick|Paper|Run)", line.strip()):
            quick = line.strip().startswith("Quick")
        for command in re.findall(r"python \S+\.py[^\n]*", line):
            commands.append((quick, command.strip()))
    return commands


ALL = [(script, quick, cmd) for script in SCRIPTS for quick, cmd in docstring_commands(script)]


def test_every_method_script_documents_a_paper_run_and_a_quick_cpu_run():
    for script in SCRIPTS:
        kinds = {quick for quick, _ in docstring_commands(script)}
        assert kinds == {True, False}, (script, docstring_commands(script))


@pytest.mark.parametrize("script,quick,command", ALL, ids=[f"{s}:{i}" for i, (s, _, _) in enumerate(ALL)])
def test_a_documented_command_matches_its_script(script, quick, command):
    words = shlex.split(command)
    target = words[1]
    assert (ROOT / target).is_file(), command
    sub = words[2] if target in SUBCOMMANDS else None
    if target in SUBCOMMANDS:
        assert sub in SUBCOMMANDS[target], command
    helptext = help_text(target, sub)
    for word in words[2:]:
        if word.startswith("--"):
            assert word.split("=")[0] in helptext, f"{command}: {word} is not in {target} {sub or ''} --help"
    for flag, value in zip(words[2:], words[3:]):
        if flag in ("--data", "--questions", "--prompts") and "/" in value and not value.startswith("runs/"):
            assert (ROOT / value).exists(), f"{command}: {value} does not exist"


def shortened(command: str, tiny: str, tmp: str) -> list[str]:
    """The command on the tiny model, shortened: what the quick run does, in seconds. Its run folders move under
    tmp; flags that shrink it are appended (argparse keeps the last value), each only where the script has it."""
    words = [f"{tmp}/{w}" if w.startswith("runs/") else w for w in shlex.split(command)[1:]]
    sub = words[1] if words[0] in SUBCOMMANDS else None
    usage = help_text(words[0], sub).split("\n\n")[0]  # the usage lines: the flags the script takes
    overrides = {"--model": tiny, "--no-8bit": None, "--max-steps": "2", "--lora-r": "4", "--lora-alpha": "8"}
    overrides |= {"--max-len": "128", "--batch-size": "4", "--grad-accum": "1", "--samples": "1"}
    overrides |= {"--max-new-tokens": "6", "--gen-max-new-tokens": "6", "--eval-n": "2", "--num-generations": "2"}
    overrides |= {"--max-prompts": "4", "--per-domain": "4", "--layer": "2", "--layers": "2"}
    if "--judge" in words:
        overrides["--judge"] = f"local:{tiny}"
    if "--out" not in words:  # its default folder would be under the repository's runs/
        overrides["--out"] = f"{tmp}/default-out"
    extra = []
    for flag, value in overrides.items():
        if re.search(rf"{re.escape(flag)}\b", usage) and (flag not in ("--layer", "--layers") or flag in words):
            extra += [flag] if value is None else [flag, value]
    return [*words, *extra]


QUICK = [(s, c) for s, q, c in ALL if q]


@pytest.mark.parametrize("script", sorted({s for s, _ in QUICK}))
def test_the_quick_cpu_commands_run_on_the_tiny_model(script, tiny_model, tmp_path):
    """In the docstring's order (a later command uses an earlier one's run folder or vector file)."""
    for s, command in QUICK:
        if s != script:
            continue
        argv = shortened(command, str(tiny_model), str(tmp_path))
        proc = run_script(argv[0], *argv[1:], check=False)
        assert proc.returncode == 0, f"{command}\n-> {' '.join(argv)}\n{proc.stderr[-3000:]}"
