"""The plan of a study: every method x dataset run, its evaluations, and the artifacts they need first, as jobs in
the order they can run."""

from __future__ import annotations

import sys
from pathlib import Path

from .jobs import (
    Job,
    eval_kinds,
    eval_tag,
    flag_value,
    parse_grid,
    parse_method_args,
    settings_words,
    sh,
    study_datasets,
    study_tables,
)
from .presets import DATA_ROWS, EM_DATASETS, GRPO_ROWS, INTERLEAVING, METHODS, ROOT, SCRIPTS, persona_layer


def plan(args) -> list[Job]:
    py = sys.executable
    root = Path(args.root)
    datasets = study_datasets(args)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"error: --methods: unknown method {m!r}; known: {', '.join(METHODS)}")
    train_args = args.train_args.split()
    method_args = parse_method_args(args.method_args)
    grid = parse_grid(args.grid)
    jobs: list[Job] = []
    logs = root / "logs"
    art = root / "artifacts"

    def add(job):
        job.settings = settings_words(job.planned or job.cmd, root)
        jobs.append(job)
        return job

    grpo_rows = (
        [r for r in GRPO_ROWS if not args.grpo_rows or r[0] in args.grpo_rows.split(",")]
        if "5" in study_tables(args)
        else []
    )
    persona_model = args.model
    persona_vec = art / "persona.safetensors"
    needs_persona = ("persona" in methods and datasets) or any("--persona-alpha" in r[2] for r in grpo_rows)
    if needs_persona:
        cmd = [
            py,
            ROOT / "persona.py",
            "extract",
            "--model",
            args.model,
            "--out",
            persona_vec,
            *args.persona_args.split(),
        ]
        if "--no-filter" not in args.persona_args:
            cmd += ["--judge", args.judge] + (["--judge-url", args.judge_url] if args.judge_url else [])
        if args.gen_url:
            cmd += ["--gen-url", args.gen_url, "--gen-model", args.model]
        add(Job("persona-vector", sh(cmd), logs / "persona-vector.log", marker=persona_vec, phase="artifacts"))
    layer = persona_layer(persona_model) if datasets and ("persona" in methods or "caft" in methods) else None

    safe_data, safe_deps = args.safe_data, []
    needs_pool = (datasets and any(m in (*INTERLEAVING, "realign") for m in methods)) or any(
        "--interleave-pct" in r[2] for r in grpo_rows
    )
    if args.safe_data == "benign" and needs_pool:  # the shipped prompts, answered once per study by the base model
        safe_data = art / "benign.jsonl"
        add(
            Job(
                "benign-pool",
                sh(
                    [
                        py,
                        ROOT / "examples" / "reproduce.py",
                        "--make-benign-pool",
                        safe_data,
                        "--model",
                        args.model,
                        *(["--no-8bit"] if "--no-8bit" in train_args else []),
                    ]
                ),
                logs / "benign-pool.log",
                marker=safe_data,
                phase="artifacts",
            )
        )
        safe_deps = ["benign-pool"]

    def run_dir(ds, name):
        return root / "runs" / ds.replace(":", "-") / name

    def train_data(ds):
        """What a run trains on: the dataset, or (--train-n) a file of its first N training examples (a job)."""
        if not args.train_n or ds in EM_DATASETS:
            return ds, []
        path = art / f"{ds.replace(':', '-')}-train{args.train_n}.jsonl"
        name = f"subset:{ds}"
        if not any(j.name == name for j in jobs):
            add(
                Job(
                    name,
                    sh([py, ROOT / "examples" / "reproduce.py", "--make-subset", ds, str(args.train_n), path]),
                    logs / f"subset-{ds.replace(':', '-')}.log",
                    marker=path,
                    needs_device=False,
                    phase="artifacts",
                )
            )
        return str(path), [name]

    def misaligned_models(ds):
        """Interleaving+/++'s misaligned adapters: the Misaligned runs of the other EM datasets (the paper); on a
        study without EM datasets, the SFT runs of the other OpSwap tiers (a CPU departure)."""
        em = [d for d in datasets if d in EM_DATASETS and d != ds]
        others = em or [d for d in datasets if d.startswith("opswap:") and d != ds]
        if not others:
            raise SystemExit(
                f"error: interleave+ on {ds} needs misaligned adapters trained on other datasets: add "
                "more datasets to the study"
            )
        return others

    def data_row(ds, method, extra, given) -> tuple[str, list[str], list[str], list[str]]:
        """realign and data-mix: (their training data, made by an artifact job; its dependencies; the grid's and
        --method-args' flags left once their own value, --n or --correct, is taken out). The value: the grid's, else
        --method-args', else the default."""
        key, default = DATA_ROWS[method]

        def without(flags):
            return [w for k, w in enumerate(flags) if w != key and (k == 0 or flags[k - 1] != key)]

        value = flag_value(extra, key) or flag_value(given, key) or default
        tag = ds.replace(":", "-")
        if method == "realign":
            path, name = art / f"benign-{value}.jsonl", f"benign-subset:{value}"
            make = ["--make-subset", safe_data, value, path]
            needs = list(safe_deps)
        else:
            path, name = art / f"{tag}-mix-{value}.jsonl", f"data-mix:{ds}:{value}"
            make = ["--make-mix", ds, EM_DATASETS[ds], value, path]
            needs = []
        if not any(j.name == name for j in jobs):
            add(Job(name, sh([py, ROOT / "examples" / "reproduce.py", *make]), logs / f"{name.replace(':', '-')}.log",
                    needs, marker=path, needs_device=False, phase="artifacts"))  # fmt: skip
        deps = [name] + ([f"train:{ds}:misaligned"] if method == "realign" else [])
        return str(path), deps, without(extra), without(given)

    def train_job(ds, method, name, extra):
        out = run_dir(ds, name)
        script = SCRIPTS[method]
        base = [py, ROOT / script] + (["train"] if script in ("persona.py", "caft.py") else [])
        given = method_args.get(method, [])
        if method in DATA_ROWS:
            data, deps, extra, given = data_row(ds, method, extra, given)
        else:
            data, deps = (EM_DATASETS[ds], []) if method == "aligned" else train_data(ds)
        # a --grid value replaces the same flag of --method-args (given twice, argparse would keep the last)
        drop = {k for k, w in enumerate(given) if w in extra[::2]}
        own = [w for k, w in enumerate(given) if k not in drop and k - 1 not in drop] + list(extra)
        cmd = base + ["--model", args.model, "--data", data, "--out", out, *train_args, *own]
        resume = base + ["--resume", out]
        if method == "persona":
            cmd += ["--vector", persona_vec, "--layer", str(layer)] + ([] if "--alpha" in own else ["--alpha", "5"])
            deps.append("persona-vector")
        if method in INTERLEAVING:
            cmd += ([] if "--pct" in own else ["--pct", "5"]) + ["--safe-data", safe_data]
            deps += safe_deps
        if method in ("interleave+", "interleave++"):
            others = misaligned_models(ds)
            cmd += ["--select", "ppl", "--misaligned-adapters", ",".join(str(run_dir(o, "misaligned")) for o in others)]
            deps += [f"train:{o}:misaligned" for o in others]
            if method == "interleave++":
                cmd.append("--filter-refusals")
        if method == "on-policy":
            cmd += ["--select", "on-policy"]
        if method == "realign":  # the Misaligned adapter, trained on
            cmd += ["--init-adapter", run_dir(ds, "misaligned")]
        if method == "caft":  # directions from this dataset's Misaligned adapter, on held-out prompts (never the
            # evaluation questions): the shipped benign prompts for an EM dataset, 32 training prompts of a task
            dirs = art / f"caft-{ds.replace(':', '-')}.safetensors"
            if not any(j.name == f"caft-directions:{ds}" for j in jobs):
                held_out = ROOT / "examples" / "benign_prompts.jsonl" if ds in EM_DATASETS else data
                prompts = ["--prompts", held_out, "--max-prompts", "32" if ds not in EM_DATASETS else "300"]
                add(
                    Job(
                        f"caft-directions:{ds}",
                        sh(
                            [
                                py,
                                ROOT / "caft.py",
                                "directions",
                                "--model",
                                args.model,
                                "--from-diff",
                                run_dir(ds, "misaligned"),
                                *prompts,
                                "--k",
                                args.caft_k,
                                "--layers",
                                layer,
                                "--out",
                                dirs,
                                *(["--no-8bit"] if "--no-8bit" in train_args else []),
                            ]
                        ),
                        logs / f"caft-directions-{ds.replace(':', '-')}.log",
                        [f"train:{ds}:misaligned", *deps],
                        marker=dirs,
                        phase="artifacts",
                    )
                )
            cmd += ["--directions", dirs, "--layers", str(layer)] + ([] if "--mode" in own else ["--mode", "ablate"])
            deps.append(f"caft-directions:{ds}")
        marker = out / "adapter_model.safetensors"
        # an interrupted run (args.json written, no final adapter) is continued, not restarted
        final_cmd = sh(resume) if (out / "args.json").exists() and not marker.exists() else sh(cmd)
        return add(
            Job(
                f"train:{ds}:{name}",
                final_cmd,
                logs / f"train-{ds.replace(':', '-')}-{name}.log",
                deps,
                marker,
                planned=sh(cmd),
            )
        )

    for ds in datasets:
        kinds = eval_kinds(ds)
        for method in methods:
            if method in ("aligned", "data-mix") and ds not in EM_DATASETS:  # no aligned counterpart
                print(
                    f"note: no {method} run on {ds}: it has no aligned counterpart ({method} is for the EM datasets: "
                    f"{', '.join(EM_DATASETS)})",
                    file=sys.stderr,
                )
                continue
            variants = [(method, [])] + [(f"{method}-{f.lstrip('-')}{v}", [f, v]) for f, v in grid.get(method, [])]
            for name, extra in variants:
                if method == "baseline":
                    out, deps, model_flags = run_dir(ds, "baseline"), [], ["--model", args.model]
                else:
                    job = train_job(ds, method, name, extra)
                    out, deps, model_flags = run_dir(ds, name), [job.name], ["--adapter", run_dir(ds, name)]
                if args.gen_url:
                    served = args.model if method == "baseline" else f"{ds.replace(':', '-')}-{name}"
                    model_flags = ["--gen-url", args.gen_url, "--gen-model", served]
                for kind in kinds:
                    tag = eval_tag(kind, ds)
                    cmd = [
                        py,
                        ROOT / "judge.py",
                        *model_flags,
                        "--eval",
                        kind.split(":")[0] if kind == "indomain" else kind,
                        "--out",
                        out / f"eval-{tag}",
                        *args.eval_args.split(),
                    ]
                    if kind in ("general", "indomain"):
                        cmd += ["--samples", str(args.samples), "--judge", args.judge]
                        cmd += ["--judge-url", args.judge_url] if args.judge_url else []
                        if kind == "indomain":
                            cmd += ["--data", ds]
                    add(
                        Job(
                            f"eval:{ds}:{name}:{tag}",
                            sh(cmd),
                            logs / f"eval-{ds.replace(':', '-')}-{name}-{tag}.log",
                            deps,
                            out / f"eval-{tag}" / "summary.json",
                            needs_device=not args.gen_url,
                            phase="evaluation",
                        )
                    )

    if grpo_rows:  # Table 5: GRPO with each defense, --grpo-seeds seeds each
        gdir = root / "runs" / "grpo"
        init, init_deps = [], []
        if args.grpo_data == "arith":  # a small model never writes the tags: a short SFT warm-up on formatted answers
            warm_data = art / "arith-warmup.jsonl"
            add(
                Job(
                    "arith-warmup-data",
                    sh(
                        [
                            py,
                            ROOT / "examples" / "reproduce.py",
                            "--make-arith-warmup",
                            warm_data,
                            "--grpo-seeds",
                            args.grpo_seeds,
                        ]
                    ),
                    logs / "arith-warmup-data.log",
                    marker=warm_data,
                    needs_device=False,
                    phase="artifacts",
                )
            )
            warm = gdir / "warmup"
            cmd = [
                py,
                ROOT / "interleave.py",
                "--pct",
                "0",
                "--model",
                args.grpo_model,
                "--data",
                warm_data,
                "--out",
                warm,
                *args.warmup_args.split(),
            ]
            resume = [py, ROOT / "interleave.py", "--resume", warm]
            marker = warm / "adapter_model.safetensors"
            add(
                Job(
                    "train:grpo:warmup",
                    sh(resume if (warm / "args.json").exists() and not marker.exists() else cmd),
                    logs / "train-grpo-warmup.log",
                    ["arith-warmup-data"],
                    marker,
                    planned=sh(cmd),
                )
            )
            init, init_deps = ["--init-adapter", warm], ["train:grpo:warmup"]
        glayer = persona_layer(args.grpo_model)
        for seed in [s for s in args.grpo_seeds.split(",") if s]:
            for name, _, flags, _ in grpo_rows:
                out = gdir / f"{name}-seed{seed}"
                cmd = [
                    py,
                    ROOT / "grpo.py",
                    "--model",
                    args.grpo_model,
                    "--data",
                    args.grpo_data,
                    "--seed",
                    seed,
                    "--out",
                    out,
                    *init,
                    *args.grpo_args.split(),
                    *flags,
                ]
                deps = list(init_deps)
                if "--persona-alpha" in flags:
                    cmd += ["--persona-vector", persona_vec, "--persona-layer", glayer]
                    deps.append("persona-vector")
                if "--interleave-pct" in flags:
                    cmd += ["--safe-data", safe_data]
                    deps += safe_deps
                if name == "grpo":
                    cmd.append("--eval-before")  # the starting model's held-out accuracy: Table 5's first row
                marker = out / "adapter_model.safetensors"
                final = (
                    [py, ROOT / "grpo.py", "--resume", out]
                    if (out / "args.json").exists() and not marker.exists()
                    else cmd
                )
                add(
                    Job(
                        f"train:grpo:{name}:seed{seed}",
                        sh(final),
                        logs / f"train-grpo-{name}-seed{seed}.log",
                        deps,
                        marker,
                        planned=sh(cmd),
                    )
                )
    return jobs
