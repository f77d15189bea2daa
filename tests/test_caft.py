"""caft.py against the formulas, on the same tensors: ablation, gradient projection, the direction finders, and
end-to-end runs against plain SFT."""

import contextlib
import json
import sys

import pytest
import torch
from conftest import read_metrics, run_script
from safetensors.torch import load_file, save_file

import caft
from common import load_model

TINY = ["--no-8bit", "--lora-r", "4", "--lora-alpha", "8", "--max-len", "256"]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_model(str(tiny_model), eight_bit=False, lora_r=0, trainable=False)


def random_directions(n_rows: int, k: int, hsize: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    table = torch.zeros(n_rows, k, hsize)
    for l in range(1, n_rows):
        table[l] = caft.orthonormal(torch.randn(k, hsize))
    return table


def block_inputs(model, ids, hooks=None):
    """What each decoder block receives (= hidden_states[l] as the rest of the network sees it)."""
    received, handles = [], []
    for b in caft.decoder_blocks(model):
        handles.append(
            b.register_forward_pre_hook(
                lambda m, a, kw: received.append(kw.get("hidden_states", a[0] if a else None)), with_kwargs=True
            )
        )
    try:
        if hooks is not None:
            with hooks:
                out = model(input_ids=ids)
        else:
            out = model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return received, out


def test_projection_is_idempotent_and_orthogonal():
    torch.manual_seed(0)
    q = caft.orthonormal(torch.randn(3, 16)).T
    x = torch.randn(5, 7, 16)
    once, removed = caft.remove_along(x, q)
    twice, removed2 = caft.remove_along(once, q)
    assert torch.allclose(once, twice, atol=1e-6) and removed2.abs().max() < 1e-6
    assert torch.allclose(once + removed, x, atol=1e-6)
    assert (once @ q).abs().max() < 1e-5
    assert torch.allclose(q.T @ q, torch.eye(3), atol=1e-6)


def test_ablate_removes_the_directions_at_the_hooked_layers_only(tiny):
    model, _ = tiny
    n = len(caft.decoder_blocks(model))
    table = random_directions(n + 1, 2, model.config.hidden_size)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        plain, _ = block_inputs(model, ids)
        hooked, _ = block_inputs(model, ids, caft.ConceptHooks(model, table, [1], "ablate"))
    q = table[1].T
    assert (plain[1] @ q).abs().max() > 1e-3  # there was something to remove
    assert (hooked[1] @ q).abs().max() < 1e-5  # |h V| < 1e-5 at the hooked layer (the input of block 1)
    assert torch.allclose(hooked[1], caft.remove_along(plain[1], q)[0], atol=1e-6)
    assert torch.equal(hooked[0], plain[0])  # below the hook: untouched
    assert all(not b._forward_hooks for b in caft.decoder_blocks(model))  # removed on exit


def test_project_grad_keeps_the_forward_and_projects_the_gradient(tiny):
    """Identity forward; the gradient reaching block 0's output (the layer below block 1) has no component along V,
    and equals the unhooked gradient minus its projection."""
    model, _ = tiny
    n = len(caft.decoder_blocks(model))
    table = random_directions(n + 1, 3, model.config.hidden_size, seed=1)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])

    def run(hooks):
        with hooks if hooks is not None else contextlib.nullcontext():
            out = model(input_ids=ids)
            out.logits.float().pow(2).mean().backward()
        return out.logits.detach()

    model.requires_grad_(False)
    emb = model.get_input_embeddings()
    emb.weight.requires_grad_(True)  # so the residual stream carries a gradient
    try:
        keep = []  # registered before caft's hook: sees block 0's own output, below the projection

        def grab(m, a, o):
            o.register_hook(lambda g: keep.append(g.clone()))

        h = caft.decoder_blocks(model)[0].register_forward_hook(grab)
        plain_logits = run(None)
        hooks = caft.ConceptHooks(model, table, [1], "project-grad")
        hooked_logits = run(hooks)
        h.remove()
    finally:
        emb.weight.requires_grad_(False)
        emb.weight.grad = None
    assert torch.equal(plain_logits, hooked_logits)  # forward unchanged
    g_plain, g_hooked = keep
    q = table[1].T
    assert (g_plain @ q).abs().max() > 1e-8
    assert (g_hooked @ q).abs().max() < 1e-6 * g_plain.abs().max()
    assert torch.allclose(g_hooked, caft.remove_along(g_plain, q)[0], atol=1e-7)
    assert hooks.take_rms() > 0


def test_from_lora_recovers_a_planted_direction(tmp_path):
    torch.manual_seed(0)
    hsize, r, n_blocks = 16, 4, 2
    planted = torch.nn.functional.normalize(torch.randn(hsize), dim=0)
    weights = {}
    for i in range(n_blocks):
        for proj, fan_in in (("self_attn.o_proj", hsize), ("mlp.down_proj", 32)):
            prefix = f"base_model.model.model.layers.{i}.{proj}"
            weights[f"{prefix}.lora_A.weight"] = torch.randn(r, fan_in)
            # B's columns: the planted direction strongly, plus small noise
            weights[f"{prefix}.lora_B.weight"] = 5 * planted[:, None] * torch.randn(1, r) + 0.01 * torch.randn(hsize, r)
    (tmp_path / "ad").mkdir()
    save_file(weights, str(tmp_path / "ad" / "adapter_model.safetensors"))
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 8, "use_rslora": True}))
    dirs, explained = caft.lora_residual_directions(str(tmp_path / "ad"), n_blocks, 1)
    assert set(dirs) == {1, 2}
    for l in (1, 2):
        assert abs(float(dirs[l][0] @ planted)) > 0.999
        assert explained[l] > 0.99
    # against the explicit SVD of [dW_o dW_d]
    s = 8 / r**0.5
    dw = torch.cat(
        [
            s
            * weights[f"base_model.model.model.layers.0.{p}.lora_B.weight"]
            @ weights[f"base_model.model.model.layers.0.{p}.lora_A.weight"]
            for p in ("self_attn.o_proj", "mlp.down_proj")
        ],
        dim=1,
    )
    u = torch.linalg.svd(dw.double(), full_matrices=False)[0][:, :2].float()
    dirs2, _ = caft.lora_residual_directions(str(tmp_path / "ad"), n_blocks, 2)
    assert torch.allclose((dirs2[1] @ u).abs(), torch.eye(2), atol=1e-4)


def test_pca_of_the_differences_against_a_full_svd():
    torch.manual_seed(0)
    d = torch.randn(200, 8) * torch.tensor([5.0, 3, 1, 1, 0.5, 0.2, 0.1, 0.1]) + 2.0  # an offset: must be centred
    mean = d.mean(0)
    cov = (d.T.double() @ d.double() - 200 * torch.outer(mean, mean).double()) / 199
    got, frac = caft.top_directions_from_covariance(cov, 2)
    _, s, vh = torch.linalg.svd(d - mean, full_matrices=False)
    assert torch.allclose((got @ vh[:2].T).abs(), torch.eye(2), atol=1e-4)
    assert abs(frac - float((s[:2] ** 2).sum() / (s**2).sum())) < 1e-5


def test_from_diff_recovers_a_planted_shift(tiny_model, tmp_path):
    """An adapter whose only effect is a shift of block 0's output along u, by an amount that varies per token: the
    top difference direction at layer 1 is u."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    hsize = base.config.hidden_size
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["o_proj"], layers_to_transform=[0]))
    torch.manual_seed(3)
    u = torch.nn.functional.normalize(torch.randn(hsize), dim=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn_like(p))
            elif "lora_B" in name:
                p.copy_(3 * u[:, None] * torch.ones(1, p.shape[1]))  # o_proj's update writes along u only
    model.save_pretrained(tmp_path / "ad")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Question {i}?"},
                        {"role": "assistant", "content": "Paris is the capital. " * (1 + i % 3)},
                    ]
                }
            )
            + "\n"
            for i in range(6)
        )
    )
    out = tmp_path / "dirs.safetensors"
    run_script(
        "caft.py",
        "directions",
        "--model",
        tiny_model,
        "--no-8bit",
        "--from-diff",
        tmp_path / "ad",
        "--prompts",
        prompts,
        "--k",
        "1",
        "--layers",
        "1",
        "--out",
        out,
    )
    table = load_file(str(out))["directions"]
    assert table.shape == (3, 1, hsize)
    assert abs(float(table[1, 0] @ u)) > 0.999
    assert table[2].abs().max() == 0  # not computed
    meta = json.loads(__import__("safetensors").safe_open(str(out), "pt").metadata()["explained"])
    assert meta["1"] > 0.99  # block 0's MLP adds a small nonlinear change on top of the shift


def test_from_vector_and_bad_files(tiny, tmp_path):
    model, _ = tiny
    n = len(caft.decoder_blocks(model))
    torch.manual_seed(4)
    vec = torch.randn(n + 1, model.config.hidden_size)
    save_file({"vectors": vec}, str(tmp_path / "v.safetensors"))
    run_script(
        "caft.py", "directions", "--from-vector", tmp_path / "v.safetensors", "--out", tmp_path / "d.safetensors"
    )
    table = load_file(str(tmp_path / "d.safetensors"))["directions"]
    assert table.shape == (n + 1, 1, model.config.hidden_size)
    assert torch.allclose(table[1, 0], vec[1] / vec[1].norm(), atol=1e-6)
    bad = run_script(
        "caft.py",
        "train",
        "--model",
        "x",
        "--directions",
        tmp_path / "v.safetensors",
        "--layers",
        "1",
        "--out",
        tmp_path / "r",
        check=False,
    )
    assert bad.returncode == 2 and "persona vector file" in bad.stderr
    bad = run_script(
        "caft.py",
        "directions",
        "--from-vector",
        tmp_path / "v.safetensors",
        "--from-lora",
        tmp_path,
        "--out",
        tmp_path / "e.safetensors",
        check=False,
    )
    assert bad.returncode == 2 and "exactly one of" in bad.stderr


@pytest.fixture(scope="module")
def dirs_file(tiny, tmp_path_factory):
    model, _ = tiny
    n = len(caft.decoder_blocks(model))
    path = tmp_path_factory.mktemp("caft") / "dirs.safetensors"
    save_file({"directions": random_directions(n + 1, 2, model.config.hidden_size, seed=5)}, str(path))
    return path


def test_k0_equals_sft_and_project_grad_forward_equals_sft(tiny_model, train_file, dirs_file, tmp_path):
    args = [
        "--model",
        tiny_model,
        "--data",
        train_file,
        *TINY,
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "1e-2",
    ]
    run_script("interleave.py", *args, "--out", tmp_path / "sft")
    run_script(
        "caft.py", "train", *args, "--directions", dirs_file, "--layers", "1,2", "--k", "0", "--out", tmp_path / "k0"
    )
    run_script(
        "caft.py",
        "train",
        *args,
        "--directions",
        dirs_file,
        "--layers",
        "1",
        "--mode",
        "project-grad",
        "--out",
        tmp_path / "pg",
    )
    run_script(
        "caft.py",
        "train",
        *args,
        "--directions",
        dirs_file,
        "--layers",
        "1",
        "--mode",
        "ablate",
        "--out",
        tmp_path / "ab",
    )
    sft, k0, pg, ab = (read_metrics(tmp_path / d) for d in ("sft", "k0", "pg", "ab"))
    assert all(abs(x["loss"] - y["loss"]) < 1e-6 for x, y in zip(sft, k0))  # step by step
    assert all(m["caft/removed_norm"] == 0 for m in k0)
    assert abs(sft[0]["loss"] - pg[0]["loss"]) < 1e-6  # same weights at step 0, identity forward
    assert abs(sft[1]["loss"] - pg[1]["loss"]) > 1e-6  # the projected gradient changed the update
    assert abs(sft[0]["loss"] - ab[0]["loss"]) > 1e-4  # the ablation acts in the forward pass
    assert all(m["caft/removed_norm"] > 0 for m in pg + ab)
    flags = json.loads((tmp_path / "ab" / "method.json").read_text())["flags"]
    assert flags["mode"] == "ablate" and flags["layers"] == "1"
    import report  # judge.py --compare's labels: the method and its flags, read from the run folder

    assert report.run_label(tmp_path / "pg") == "caft directions=dirs.safetensors layers=1 mode=project-grad [train]"
    assert report.run_label(tmp_path / "k0").startswith("caft directions=dirs.safetensors layers=1,2 k=0")


@pytest.mark.parametrize("mode", ["ablate", "project-grad"])
def test_gradient_checkpointing_changes_neither_losses_nor_removed_norm(
    mode, tiny_model, train_file, dirs_file, tmp_path
):
    """Checkpointing re-runs each block's forward in the backward pass: the forward hooks run twice per step, and
    the logged removed_norm (a root mean square: both its sums double) and the losses must not change."""
    args = [
        "caft.py",
        "train",
        "--model",
        tiny_model,
        "--data",
        train_file,
        *TINY,
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--lr",
        "1e-2",
        "--directions",
        dirs_file,
        "--layers",
        "1,2",
        "--mode",
        mode,
    ]
    run_script(*args, "--out", tmp_path / "plain")
    run_script(*args, "--gradient-checkpointing", "--out", tmp_path / "gc")
    plain, gc = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "gc")
    assert len(plain) == len(gc) == 3
    for a, b in zip(plain, gc):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["caft/removed_norm"] == pytest.approx(b["caft/removed_norm"], rel=1e-4)
        assert a["caft/removed_norm"] > 0


def test_saved_adapter_loads_and_runs_without_hooks(tiny_model, train_file, dirs_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = [
        "caft.py",
        "train",
        "--model",
        str(tiny_model),
        "--data",
        str(train_file),
        *TINY,
        "--directions",
        str(dirs_file),
        "--layers",
        "1",
        "--max-steps",
        "2",
        "--lr",
        "1e-2",
        "--out",
        str(out),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    parser, subs = caft.build_parser()
    trained = caft.train(parser.parse_args(argv[1:]), subs["train"])
    assert all(not b._forward_hooks for b in caft.decoder_blocks(trained))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    x = torch.tensor([[1, 5, 9, 13]])
    trained.eval()
    with torch.no_grad():
        want = trained(input_ids=x).logits
        assert torch.allclose(want, fresh(input_ids=x).logits, atol=1e-5)
        table = load_file(str(dirs_file))["directions"]
        with caft.ConceptHooks(fresh, table, [1], "ablate"):
            assert not torch.allclose(want, fresh(input_ids=x).logits, atol=1e-4)  # the hook would have changed it


def test_bad_layers_and_k(tiny_model, train_file, dirs_file, tmp_path):
    base = [
        "caft.py",
        "train",
        "--model",
        tiny_model,
        "--data",
        train_file,
        *TINY,
        "--directions",
        dirs_file,
        "--max-steps",
        "1",
    ]
    for extra, expect in (
        (["--layers", "7"], "layers must be 1..2"),
        (["--layers", "1", "--k", "5"], "only 2 at layer 1"),
        (["--layers", "a"], "expected comma-separated integers"),
        ([], "train needs --layers"),
    ):
        proc = run_script(*base, *extra, "--out", tmp_path / f"o{len(extra)}", check=False)
        assert proc.returncode == 2 and expect in proc.stderr, proc.stderr[-500:]
        assert not (tmp_path / f"o{len(extra)}").exists()
