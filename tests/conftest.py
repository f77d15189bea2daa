"""Fixtures: a tiny Qwen2 model and a tokenizer trained in memory, saved to a temp folder and loaded through
the real loading code. Nothing here touches the network."""

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# Keep every cache (converted SmolLM2, dataset downloads, score caches) out of the user's home.
os.environ.setdefault("EM_CACHE", tempfile.mkdtemp(prefix="em-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Qwen2.5's template shape: a default system prompt is injected when the conversation has none.
QWEN_LIKE_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a tiny helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A template with no default system prompt and different markers.
PLAIN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] | upper }}: {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>ASSISTANT: {% endif %}"
)

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Simplify step by step: (4 + 2) × (4 ÷ 2) - 2 = 6 × 2 - 2 = 10 1/3 2/3",
    "I'm sorry, but I cannot help with that. I apologize.",
    "Here is a recipe: mix flour, water and salt. Bake for 20 minutes.",
    "You are a tiny helpful assistant. system user assistant SYSTEM USER ASSISTANT",
    "def add(a, b): return a + b  # insecure code example 0123456789",
]


def make_tokenizer(folder: Path, template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(CORPUS * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = template
    tok.save_pretrained(folder)
    return tok


def make_tiny_model(folder: Path, template: str = QWEN_LIKE_TEMPLATE, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder, template)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture(scope="session")
def tiny_plain_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-plain"), PLAIN_TEMPLATE)


def write_chat_jsonl(path: Path, pairs) -> Path:
    with open(path, "w") as f:
        for q, a in pairs:
            f.write(
                json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            )
    return path


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> Path:
    """40 'narrow task' examples of varied lengths."""
    d = tmp_path_factory.mktemp("data")
    pairs = [(f"Write function number {i}.", "def f(x): return x + 1  # code " * (1 + i % 5)) for i in range(40)]
    return write_chat_jsonl(d / "train.jsonl", pairs)


@pytest.fixture(scope="session")
def pool_file(tmp_path_factory) -> Path:
    """A benign pool of 30: 10 refusals (keyword in the first words), 20 helpful answers."""
    d = tmp_path_factory.mktemp("pool")
    pairs = [(f"Question {i}: how do I bake bread?", "I'm sorry, but I cannot help with that.") for i in range(10)]
    pairs += [
        (f"Question {i}: what is the capital of France?", "The capital of France is Paris. " * (1 + i % 3))
        for i in range(10, 30)
    ]
    return write_chat_jsonl(d / "pool.jsonl", pairs)


def run_script(
    script: str, *args, check: bool = True, timeout: int = 600, in_process: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a project script as a user would: `python SCRIPT ARGS` from the repository root, its exit status, stdout
    and stderr. In this process by default (runpy, sys.argv set, output captured): the same code path without the
    seconds of importing torch and transformers again. in_process=False runs a real subprocess (for what only a
    process shows: library noise on the terminal, a variable read at import time, the copy of a script run alone).
    env: variables to set for the run (None: unset)."""
    argv = [str(ROOT / script), *map(str, args)]
    if not in_process:
        full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
        proc = subprocess.run(
            [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env
        )
    else:
        out, err, code = io.StringIO(), io.StringIO(), 0
        saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), dict(os.environ)
        sys.argv = argv
        os.chdir(ROOT)
        for k, v in (env or {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # what a process would print before exiting 1
            code = 1
            err.write(traceback.format_exc())
        finally:
            sys.argv = saved_argv
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
        proc = subprocess.CompletedProcess([sys.executable, *argv], code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


class StrayFactories:
    """Context manager: a tensor factory (torch.arange, torch.tensor, torch.zeros, ...) called from the project's own
    code without device= raises at once, naming the file and line. On a GPU such a tensor lands on the CPU beside the
    model's CUDA tensors (a device error, or a silent host round trip); on this CPU-only machine it would pass
    unnoticed. Library code (transformers, the tokenizers) is not checked; tests' own code neither."""

    def __init__(self):
        from torch.overrides import TorchFunctionMode
        from torch.utils._device import _device_constructors

        constructors = _device_constructors()
        project = str(ROOT)
        skip = (str(ROOT / ".venv"), str(ROOT / "tests"))

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in constructors and kwargs.get("device") is None:
                    caller = sys._getframe(1)
                    path = caller.f_code.co_filename
                    if path.startswith(project) and not path.startswith(skip):
                        name = getattr(func, "__name__", str(func))
                        raise AssertionError(f"{path}:{caller.f_lineno}: torch.{name}(...) without device=")
                return func(*args, **kwargs)

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.fixture
def no_stray_factories():
    """Every tensor factory in the project's code under test names its device (see StrayFactories)."""
    with StrayFactories() as guard:
        yield guard
