"""Every command in the README runs as written from the repository root: its script exists, every flag it uses is in
that script's --help, and every repository file it names exists."""

import re
import shlex
from functools import cache

from conftest import ROOT, run_script

SUBCOMMANDS = {
    "persona.py": {"extract", "train", "steer", "shift", "screen"},
    "npo_unlearn.py": {"train", "eval", "entangle"},
    "caft.py": {"directions", "train"},
}


def readme_commands() -> list[str]:
    """`python SCRIPT ...` commands of the README's code blocks, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            for part in re.split(r"&&|;", line):
                part = part.strip()
                if re.match(r"python3? (?!-m )\S+\.py\b", part):
                    cmds.append(part)
    return cmds


@cache
def help_text(script: str, sub: str | None) -> str:
    proc = run_script(script, *([sub] if sub else []), "--help", check=False)
    assert proc.returncode == 0, f"{script} {sub or ''} --help failed: {proc.stderr[-1000:]}"
    return proc.stdout


def test_readme_has_commands():
    cmds = readme_commands()
    assert len(cmds) > 20
    scripts = {shlex.split(c)[1] for c in cmds}
    assert {
        "interleave.py",
        "kl.py",
        "ldifs.py",
        "judge.py",
        "persona.py",
        "npo_unlearn.py",
        "grpo.py",
        "caft.py",
    } <= scripts, scripts


def test_every_readme_command_matches_its_script():
    problems = []
    for cmd in readme_commands():
        words = shlex.split(cmd)
        script = words[1]
        if not (ROOT / script).is_file():
            problems.append(f"{cmd}: no script {script}")
            continue
        sub = words[2] if script in SUBCOMMANDS and len(words) > 2 and words[2] in SUBCOMMANDS[script] else None
        if script in SUBCOMMANDS and sub is None:
            problems.append(f"{cmd}: {script} needs a subcommand")
            continue
        helptext = help_text(script, sub)
        for flag, value in zip(words[2:], words[3:]):  # input files must be there
            if (
                flag in ("--data", "--questions", "--safe-data", "--pool", "--prompts")
                and value.endswith((".jsonl", ".yaml"))
                and not value.startswith("../shared/")
            ):  # the developers' benchmark data, not shipped
                if not (ROOT / value).exists():
                    problems.append(f"{cmd}: {flag} {value} does not exist (from the repository root)")
        for w in words[2:]:
            flag = w.split("=")[0]
            if flag.startswith("--") and not re.search(re.escape(flag) + r"\b", helptext):
                problems.append(f"{cmd}: {flag} is not in `{script} {sub or ''} --help`")
            for path in re.findall(r"\b(?:examples|bench|tests)/[\w./-]+", w):
                if not (ROOT / path).exists():
                    problems.append(f"{cmd}: {path} does not exist in the repository")
    assert not problems, "\n".join(problems)
