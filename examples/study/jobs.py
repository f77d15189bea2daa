"""A job of a study (a command, its log, what it needs, the file whose existence means done), the settings record
that ties an output to the command that made it, and the parsing of the study's flags."""

from __future__ import annotations

import difflib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .presets import EM_DATASETS, PAPER_GRID, ROOT, TABLE_DATASETS


@dataclass
class Job:
    name: str
    cmd: list[str]
    log: Path
    deps: list[str] = field(default_factory=list)
    marker: Path | None = None  # the file whose existence means done (summary.json: also no failed judgment)
    needs_device: bool = True
    phase: str = "training"  # artifacts, training, evaluation (for the time summary)
    status: str = "pending"  # pending, running, done, failed, skipped
    seconds: float = 0.0
    planned: list[str] | None = None  # the command that sets the output's settings (cmd may be its --resume)
    settings: list[str] = field(default_factory=list)  # planned, comparable across folders (see settings_words)

    @property
    def record(self) -> Path | None:
        """Next to the output, the settings it was made with: written when the job starts."""
        return self.marker.with_name(self.marker.name + ".cmd") if self.marker else None

    def done(self) -> bool:
        return self.marker is not None and (
            summary_done(self.marker) if self.marker.name == "summary.json" else self.marker.exists()
        )


def sh(words) -> list[str]:
    return [str(w) for w in words]


def settings_words(words: list[str], root: Path) -> list[str]:
    """A command without its interpreter, the study and repository folders as placeholders: what an output made
    earlier is checked against (the same study run from another venv or clone still matches)."""
    return [w.replace(str(root), "<root>").replace(str(ROOT), "<repo>") for w in words[1:]]


def settings_conflicts(jobs: list[Job]) -> tuple[dict[str, str], int]:
    """Outputs (finished, or a run begun) whose recorded command differs from the plan's: reusing them would report
    a number for other settings. Returns ({job name: message}, how many outputs have no record to check)."""
    conflicts, unverified = {}, 0
    for j in jobs:
        if j.record is None:
            continue
        folder = j.marker.parent  # a run's or an evaluation's own folder (artifacts share theirs: done or not)
        begun = j.done() or (
            j.phase != "artifacts" and folder.is_dir() and any(p.name != j.record.name for p in folder.iterdir())
        )
        if not begun:  # nothing made yet (a record left by a job that failed at once is rewritten at its start)
            continue
        if not j.record.exists():
            unverified += 1
            continue
        old = json.loads(j.record.read_text())
        if old != j.settings:  # each differing stretch of words, with the word before it (usually the flag)
            ops = difflib.SequenceMatcher(a=old, b=j.settings, autojunk=False).get_opcodes()
            diff = [
                f"{' '.join(old[max(a0 - 1, 0) : a1]) or '-'} -> {' '.join(j.settings[max(b0 - 1, 0) : b1])}"
                for tag, a0, a1, b0, b1 in ops
                if tag != "equal"
            ]
            conflicts[j.name] = f"  {j.name}: {j.marker.parent} was made with other settings ({'; '.join(diff)})"
    return conflicts, unverified


def eval_kinds(dataset: str) -> list[str]:
    if dataset in EM_DATASETS or dataset.endswith(".jsonl"):
        return ["general", "indomain"]
    if dataset.startswith("opswap:"):
        return [dataset]
    if dataset in ("foqa", "gsm8k"):
        return [dataset]
    raise SystemExit(f"error: --datasets: unknown dataset {dataset!r}")


def eval_tag(kind: str, dataset: str) -> str:
    return f"indomain-{dataset.replace(':', '-')}" if kind == "indomain" else kind.replace(":", "-")


def summary_done(path: Path) -> bool:
    if not path.exists():
        return False
    s = json.loads(path.read_text())
    return not s.get("n_failed_judgments")


def flag_value(arguments: str | list[str], flag: str) -> str | None:
    """The value a flag gets in script arguments, a string or its words (`--flag V` or `--flag=V`; the last one
    wins), else None."""
    words, value = shlex.split(arguments) if isinstance(arguments, str) else arguments, None
    for k, word in enumerate(words):
        if word == flag and k + 1 < len(words):
            value = words[k + 1]
        elif word.startswith(flag + "="):
            value = word[len(flag) + 1 :]
    return value


def parse_method_args(text: str) -> dict[str, list[str]]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        method, _, args = part.partition("=")
        out[method.strip()] = args.split()
    return out


def parse_grid(text: str) -> dict[str, list[tuple[str, str]]]:
    """'kl.lam=0.01,0.1;ldifs.lam=0.1,1' -> {kl: [(--lam, 0.01), (--lam, 0.1)], ldifs: [...]}; 'paper': PAPER_GRID."""
    grid = {}
    for part in filter(None, (p.strip() for p in (PAPER_GRID if text == "paper" else text).split(";"))):
        key, _, values = part.partition("=")
        method, _, flag = key.partition(".")
        grid.setdefault(method, []).extend((f"--{flag.replace('_', '-')}", v) for v in values.split(","))
    return grid


def study_tables(args) -> list[str]:
    return [t for t in (args.tables or "").split(",") if t]


def study_datasets(args) -> list[str]:
    if args.datasets:
        return [d for d in args.datasets.split(",") if d]
    return [d for t in study_tables(args) for d in TABLE_DATASETS.get(t, [])]


def flag_groups(arguments: str) -> list[tuple[str, list[str]]]:
    """'--a 1 --b=2 --c' -> [('--a', ['1']), ('--b', ['2']), ('--c', [])]; words before the first flag under ''."""
    groups: list[tuple[str, list[str]]] = []
    for word in shlex.split(arguments):
        if word.startswith("--"):
            flag, eq, value = word.partition("=")
            groups.append((flag, [value] if eq else []))
        elif groups:
            groups[-1][1].append(word)
        else:
            groups.append(("", [word]))
    return groups


def merge_flags(preset: str, given: str) -> str:
    """The preset's flags extended by the given ones: a flag given again replaces that flag's value only (in its
    place), a new flag is added after the preset's. '--no-8bit --lr 5e-4' + '--lr 1e-3 --max-steps 6' ->
    '--no-8bit --lr 1e-3 --max-steps 6'."""
    given_groups = dict(flag_groups(given))
    merged = []
    for flag, values in flag_groups(preset):
        merged.append((flag, given_groups.pop(flag) if flag in given_groups else values))
    merged += list(given_groups.items())
    return shlex.join([word for flag, values in merged for word in ([flag] if flag else []) + values])


def merge_method_args(preset: str, given: str) -> str:
    """The same per method: 'kl=--lam 0.3;persona=--alpha 2' + 'kl=--kl-tokens all' -> 'kl=--lam 0.3 --kl-tokens
    all;persona=--alpha 2'."""
    merged = {m: " ".join(words) for m, words in parse_method_args(preset).items()}
    for method, words in parse_method_args(given).items():
        merged[method] = merge_flags(merged.get(method, ""), shlex.join(words))
    return ";".join(f"{m}={a}" for m, a in merged.items())
