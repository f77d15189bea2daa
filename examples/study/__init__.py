"""The study driver of examples/reproduce.py, in parts that each read alone: presets (the paper's datasets, methods,
presets and numbers), jobs (a job and its settings record), plan (the jobs of a study), runner (running them here),
slurm (the same plan as Slurm job arrays), tables (the paper's tables and figures, through report.py), artifacts (the
files a plan makes first: the benign pool, training subsets, the GRPO warm-up set)."""
