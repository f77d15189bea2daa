"""The plan as a Slurm submit script: one job array per dependency depth and kind."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from .jobs import Job
from .presets import ROOT

SUMMARY_OK = "import json, sys; sys.exit(1 if json.load(open(sys.argv[1])).get('n_failed_judgments') else 0)"


def emit_slurm(jobs: list[Job], path: Path, args) -> None:
    """A Slurm submit script for the plan: jobs grouped by dependency depth, one job array per depth and kind
    (training-like with one GPU, evaluations without), each array after the previous depth (afterok). A task whose
    output exists exits at once, so re-submitting after failures runs only what did not finish."""
    depth: dict[str, int] = {}
    by_name = {j.name: j for j in jobs}

    def level(name: str) -> int:  # 0 for a job that needs none, else one more than its deepest dependency
        if name not in depth:
            depth[name] = 1 + max((level(d) for d in by_name[name].deps if d in by_name), default=-1)
        return depth[name]

    for j in jobs:
        level(j.name)
    groups: dict[tuple[int, bool], list[Job]] = {}
    for j in jobs:
        groups.setdefault((depth[j.name], j.needs_device), []).append(j)
    lines = [
        "#!/bin/bash",
        "# Slurm job arrays for examples/reproduce.py's plan (written by --emit slurm).",
        f"# Submit with: bash {path.name}   (from any folder; logs under {Path(args.root) / 'logs'})",
        "# Edit the sbatch options below (partition, time, account) for your cluster.",
        "set -euo pipefail",
        'if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then',
        "  " + " ".join(f'prev_{d}=""' for d in range(max(depth.values(), default=0) + 1)),
    ]
    for (d, gpu), members in sorted(groups.items()):
        key = f"{d}_{'gpu' if gpu else 'cpu'}"
        opts = "--gres=gpu:1 --cpus-per-task=8" if gpu else "--cpus-per-task=2"
        lines += [
            f'  dep=""; [ -n "$prev_{d - 1}" ] && dep="--dependency=afterok:$prev_{d - 1}"' if d > 0 else '  dep=""',
            f"  id=$(sbatch --parsable --job-name=em-{key} --array=0-{len(members) - 1} {opts} "
            f"--output={Path(args.root) / 'logs' / 'slurm-%x-%a.out'} $dep --export=ALL,GROUP={key} "
            f'"$(readlink -f "$0")")',
            f'  prev_{d}="${{prev_{d}:+$prev_{d}:}}$id"; echo "submitted {key}: {len(members)} task(s) as $id"',
        ]
    lines += ["  exit 0", "fi", 'case "$GROUP" in']
    for (d, gpu), members in sorted(groups.items()):
        key = f"{d}_{'gpu' if gpu else 'cpu'}"
        lines.append(f"  {key})")
        lines.append('    case "$SLURM_ARRAY_TASK_ID" in')
        for k, j in enumerate(members):
            check = f"[ -e {shlex.quote(str(j.marker))} ] && exit 0; " if j.marker else ""
            if j.marker and j.marker.name == "summary.json":  # done = written with no failed judgment
                check = (
                    f"[ -e {shlex.quote(str(j.marker))} ] && python3 -c {shlex.quote(SUMMARY_OK)} "
                    f"{shlex.quote(str(j.marker))} && exit 0; "
                )
            lines.append(f"      {k}) # {j.name}")
            record = (
                (
                    f"mkdir -p {shlex.quote(str(j.record.parent))} && printf '%s\\n' "
                    f"{shlex.quote(json.dumps(j.settings))} > {shlex.quote(str(j.record))} && "
                )
                if j.record
                else ""
            )
            lines.append(f"         {check}{record}cd {shlex.quote(str(ROOT))} && exec {shlex.join(j.cmd)} ;;")
        lines += ["    esac ;;"]
    lines += ["esac"]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    print(f"written {path}: {len(jobs)} jobs in {len(groups)} job arrays")
