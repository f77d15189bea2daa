"""Concept ablation during fine-tuning (beyond the paper): CAFT (Casademunt et al. 2025, arXiv 2507.16795) and its
gradient-projection variant, with directions found from activations, from a naive LoRA, or from a persona vector.

Let Q_l (H x k, orthonormal columns) be the chosen directions at layer l (persona.py's numbering: l = hidden_states
index, the output of decoder block l-1). Training is SFT, L = CE over assistant tokens, with one of two hooks on
the residual stream h = hidden_states[l] of every chosen layer, at every position (prompt tokens included), during
the training forward/backward passes only:

    ablate        (CAFT)            forward   h <- h - (h Q) Q^T        (not detached: value and gradient along Q
                                                                         are both removed)
    project-grad  (GRASP's idea)    forward   h unchanged;  backward  dL/dh <- dL/dh - (dL/dh Q) Q^T
                                    the model keeps what it computes along Q and cannot build new reliance on it.

Both projections run in float32 and are rounded to the model's dtype once (in bf16, ~2e-3 of h's component along Q
survived; in float32, a few 1e-4). h is the output of the decoder block at every layer, the last one included (its
output before the final norm: the hook's point, which is also where the directions are measured).

The hooks are removed before anything is saved: checkpoints, the final adapter and every evaluation run without
them. `caft/removed_norm` in metrics.jsonl is the removed component's size per step: for ablate the root mean square
over real tokens of |(h Q) Q^T| (averaged over the hooked layers), for project-grad the same of the gradient's
removed part |(g Q) Q^T|.

directions:   --from-diff ADAPTER --prompts HELD_OUT: PCA of the per-token residual differences h_l(adapter) -
                  h_l(base) on the answer tokens of the same prompts, centred; the top k principal directions per
                  layer (exact, from the streamed H x H covariance). Prompts without answers are answered first by
                  the adapter (greedy). The prompts must not be the evaluation questions (CAFT used held-out LMSYS
                  chat prompts): --prompts is required, and a warning counts prompts that are questions of
                  --eval-questions (default: Betley et al.'s file, where it is cached).
              --from-lora ADAPTER: per layer, the top k left singular vectors of the adapter's updates that write
                  into the residual stream, [dW(o_proj) dW(down_proj)] with dW = s B A (s the adapter's LoRA scale)
                  of decoder block l-1.
              --from-vector FILE: a persona.py vector file as a 1-direction set, v_l / |v_l|.
              The explained fraction printed per layer: of the difference's variance (--from-diff), of the update's
              squared Frobenius norm (--from-lora).

Deviations from CAFT's code and from the seed paper:
1. CAFT's directions are chosen by a human among PCA components or SAE latents; here the top k components are
   taken as they come (pick rows yourself with --k or by editing the file). SAE directions are not built in.
2. CAFT's PCA uses svd_lowrank of the centred difference; here the exact eigen-decomposition of its covariance,
   streamed over prompts (same directions up to sign, no sampling noise).
3. --from-lora and project-grad are the gradient-projection variant of CAFT with LoRA-derived directions, an
   implementation of the idea in GRASP's abstract (seed 004; arXiv 2605.27676): not the authors' exact algorithm,
   which is not public here.
4. Defaults are the project's shared ones (lr 1e-4, Table 6 of Kaczér et al.), not CAFT's lr 1e-5, so that CAFT
   rows compare with the other defenses at equal training; pass --lr 1e-5 for CAFT's.
5. The loss is the mean over all assistant tokens of an optimizer step, as in the other scripts.

Paper-scale run:  python caft.py directions --from-diff runs/misaligned --prompts examples/benign_prompts.jsonl \\
                      --k 20 --out dirs.safetensors
                  python caft.py train --directions dirs.safetensors --layers 12,20 --k 5 --mode ablate --data insecure
Quick CPU:        python interleave.py --pct 0 --model smollm2 --data opswap:1 --max-steps 20 --out runs/sft-quick
                  python caft.py directions --model smollm2 --from-diff runs/sft-quick \\
                      --prompts examples/benign_prompts.jsonl --max-prompts 32 --k 2 --out runs/caft-dirs.safetensors
                  python caft.py train --model smollm2 --directions runs/caft-dirs.safetensors --layers 15,20 \\
                      --mode ablate --data opswap:1 --max-steps 20 --out runs/caft-quick
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import (
    Progress,
    Run,
    UserError,
    add_common_args,
    block_outputs,
    check_step,
    collate,
    decoder_blocks,
    decoder_states,
    describe_plan,
    die_on_user_error,
    encode_conversation,
    encode_dataset,
    get_device,
    linear_cross_entropy,
    linear_schedule,
    load_conversations,
    load_model,
    load_model_for_training,
    load_split,
    log,
    longest_micro_batch,
    make_optimizer,
    micro_batches,
    optional,
    peak_memory_mb,
    plan_memory,
    read_text_file,
    resolve_model,
    set_seed,
    step_plan,
    trainable_parameters,
)

LAYER_CONVENTION = (
    "row l = hidden_states[l]: 0 = embeddings, l = output of decoder block l-1 (k orthonormal "
    "directions per row; an all-zero row was not computed)"
)


# ----------------------------------------------------------------------------------------------
# The method: the two hooks
# ----------------------------------------------------------------------------------------------
def remove_along(x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x - (x Q) Q^T and the removed part (x Q) Q^T, for Q (H, k) with orthonormal columns."""
    removed = (x @ q) @ q.T
    return x - removed, removed


class ConceptHooks:
    """Context manager: the `mode` hook on hidden_states[l] for every l in `layers` (Q_l = directions[l].T);
    `removed` collects (sum of squared norms over real tokens, number of real tokens) of what was removed."""

    def __init__(self, model, directions: torch.Tensor, layers: list[int], mode: str):
        self.model, self.layers, self.mode, self.mask = model, layers, mode, None
        self.q = {l: directions[l].T.contiguous() for l in layers if directions[l].shape[0] > 0}
        self.removed_sq, self.tokens = 0.0, 0

    def _record(self, removed: torch.Tensor) -> None:
        sq = removed.detach().float().pow(2).sum(-1)
        m = self.mask if self.mask is not None and self.mask.shape == sq.shape else torch.ones_like(sq)
        self.removed_sq += float((sq * m).sum())
        self.tokens += int(m.sum())

    def _hook(self, layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            q = self.q[layer] = self.q[layer].to(device=h.device, dtype=torch.float32)  # moved once, kept there
            if self.mode == "ablate":  # in float32: a bf16 projection leaves ~1e-3 of the component along Q
                kept, removed = remove_along(h.float(), q)
                h = kept.to(h.dtype)
                self._record(removed)
            elif h.requires_grad:  # project-grad: identity forward, projected gradient

                def project(g):
                    kept, removed = remove_along(g.float(), q)
                    self._record(removed)
                    return kept.to(g.dtype)

                h = h.view_as(h)  # a new tensor node so the hook acts on this output alone
                h.register_hook(project)
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

        return hook

    def __enter__(self):
        blocks = decoder_blocks(self.model)
        self.handles = [blocks[l - 1].register_forward_hook(self._hook(l)) for l in self.q]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def take_rms(self) -> float:
        """sqrt(mean over hooked (layer, token) pairs of |removed|^2) since the last call; resets."""
        rms = (self.removed_sq / self.tokens) ** 0.5 if self.tokens else 0.0
        self.removed_sq, self.tokens = 0.0, 0
        return rms


def orthonormal(rows: torch.Tensor) -> torch.Tensor:
    """(k, H) rows -> (k, H) orthonormal rows spanning the same space (QR, as CAFT for SAE directions)."""
    if rows.shape[0] == 0:
        return rows
    q, r = torch.linalg.qr(rows.double().T)
    if (r.diagonal().abs() < 1e-8 * r.diagonal().abs().max().clamp_min(1e-30)).any():
        raise UserError("the directions are linearly dependent (or one is zero): cannot orthonormalise them")
    return q.T.float()


# ----------------------------------------------------------------------------------------------
# directions
# ----------------------------------------------------------------------------------------------
def top_directions_from_covariance(cov: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """(k, H) top-k eigenvectors of a centred covariance (largest first) and the variance fraction they explain."""
    evals, evecs = torch.linalg.eigh(cov.double())
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    total = float(evals.sum())
    return evecs[:, :k].T.float().contiguous(), float(evals[:k].sum()) / total if total > 0 else 0.0


def lora_residual_directions(adapter: str, n_blocks: int, k: int) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    """Per layer l = i+1: the top-k left singular vectors of [s B_o A_o, s B_d A_d] (o_proj and down_proj of block
    i, the two LoRA updates that write into the residual stream), computed without forming dW: with A^T = Q_A R_A,
    dW = s B R_A^T Q_A^T has the left singular vectors of the small s B R_A^T."""
    from safetensors.torch import load_file

    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        raise UserError(
            f"--from-lora {adapter}: not a PEFT adapter folder (adapter_config.json and adapter_model.safetensors)"
        )
    config = json.loads((folder / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / r**0.5 if config.get("use_rslora") else alpha / r
    weights = load_file(str(folder / "adapter_model.safetensors"))
    dirs, explained = {}, {}
    for i in range(n_blocks):
        factors = []
        for proj in ("self_attn.o_proj", "mlp.down_proj"):
            a = [v for key, v in weights.items() if f"layers.{i}.{proj}.lora_A" in key]
            b = [v for key, v in weights.items() if f"layers.{i}.{proj}.lora_B" in key]
            if a and b:
                _, r_a = torch.linalg.qr(a[0].double().T)  # A (r, in): A^T = Q R
                factors.append(scale * b[0].double() @ r_a.T)  # (H, r)
        if not factors:
            continue
        u, s, _ = torch.linalg.svd(torch.cat(factors, dim=1), full_matrices=False)
        energy = float((s**2).sum())
        dirs[i + 1] = u[:, :k].T.float().contiguous()
        explained[i + 1] = float((s[:k] ** 2).sum()) / energy if energy > 0 else 0.0
    if not dirs:
        raise UserError(
            f"--from-lora {adapter}: the adapter has no o_proj or down_proj LoRA weights (the updates that "
            "write into the residual stream)"
        )
    return dirs, explained


def diff_prompts(args, model, tok) -> list[list[dict]]:
    """Conversations whose answer tokens the differences are taken on. Prompts without answers (a question yaml, a
    JSONL of {"prompt"} records or of records ending with a user turn) are answered first by the adapter."""
    judge = None
    if args.prompts.endswith((".yaml", ".yml")):
        judge = optional("judge", "--from-diff on questions (loading and answering them)")
        convs = [
            [*([{"role": "system", "content": q["system"]}] if q["system"] else []), {"role": "user", "content": p}]
            for q in judge.load_questions(args.prompts)
            for p in q["paraphrases"]
        ]
    else:
        convs = load_conversations(args.prompts) if not args.prompts.endswith(".jsonl") else _read_prompts(args.prompts)
    convs = convs[: args.max_prompts] if args.max_prompts > 0 else convs
    warn_on_evaluation_overlap(convs, args.prompts, args.eval_questions)
    todo = [i for i, c in enumerate(convs) if c[-1]["role"] != "assistant"]
    if todo:
        judge = judge or optional("judge", "--from-diff on prompts without answers (answering them)")
        log(f"answering {len(todo)} prompts with the adapter (greedy, {args.max_new_tokens} new tokens)")
        for start in range(0, len(todo), args.gen_batch_size):
            chunk = todo[start : start + args.gen_batch_size]
            answers = judge.generate_greedy(model, tok, [convs[i] for i in chunk], args.max_new_tokens)
            for i, a in zip(chunk, answers):
                convs[i] = convs[i] + [{"role": "assistant", "content": a or "."}]
    return convs


def warn_on_evaluation_overlap(convs: list[list[dict]], prompts: str, eval_questions: str | None) -> int:
    """Warn when the PCA prompts are evaluation questions: a question file, or user turns that are questions of
    --eval-questions (default: Betley et al.'s file where it is cached). Returns how many overlap."""
    if prompts.endswith((".yaml", ".yml")):
        log(
            f"WARNING: --prompts {prompts} is a question file, the format of evaluation sets: directions fitted on "
            "the questions an evaluation asks make CAFT look better than it is; use held-out chat prompts"
        )
    if eval_questions is None:
        import common

        cached = common.CACHE_DIR / "data" / "first_plot_questions.yaml"
        eval_questions = str(cached) if cached.is_file() else None
    if eval_questions is None:
        return 0
    judge = optional("judge", "--eval-questions (reading a question file)")
    asked = {p.strip() for q in judge.load_questions(eval_questions) for p in q["paraphrases"]}
    users = {m["content"].strip() for c in convs for m in c if m["role"] == "user"}
    overlap = len(users & asked)
    if overlap:
        log(
            f"WARNING: {overlap} of the {len(users)} PCA prompts are evaluation questions of {eval_questions}: "
            "directions fitted on the questions an evaluation asks make CAFT look better than it is"
        )
    return overlap


def _read_prompts(path: str) -> list[list[dict]]:
    """A JSONL of chat records ({"messages": [...]}, which may end with a user turn or hold answers) or of
    {"prompt": ...} records (examples/benign_prompts.jsonl)."""
    convs = []
    for lineno, line in enumerate(read_text_file(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("prompt"), str):
                convs.append([{"role": "user", "content": record["prompt"]}])
                continue
            convs.append([{"role": m["role"], "content": m["content"]} for m in record["messages"]])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(
                f'{path}:{lineno}: expected {{"messages": [{{"role", "content"}}, ...]}} or {{"prompt": ...}} ({e})'
            ) from None
    if not convs:
        raise UserError(f"{path}: no prompts")
    return convs


@torch.no_grad()
def diff_directions(args, model, tok, layers: list[int]) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    """Top-k principal directions of the centred per-token difference adapter - base at each layer, on the answer
    tokens of the prompts, from the exactly accumulated sums (sum d, sum d d^T, count)."""
    convs = diff_prompts(args, model, tok)
    device = get_device()
    hsize = model.config.hidden_size
    cpu = torch.device("cpu")  # the sums are accumulated on the host, in float64
    sums = {l: torch.zeros(hsize, dtype=torch.float64, device=cpu) for l in layers}
    outer = {l: torch.zeros(hsize, hsize, dtype=torch.float64, device=cpu) for l in layers}
    count = 0
    progress = Progress(len(convs), 0, "prompts (base and adapter passes)")
    for n, conv in enumerate(convs, 1):
        enc = encode_conversation(tok, conv, args.max_len)
        answer = torch.tensor(enc["labels"], device=device) != -100
        if not answer.any():
            continue
        ids = torch.tensor([enc["input_ids"]], device=device)
        tuned = block_outputs(model, ids)  # row l: the output of block l-1, where the hook on it acts
        with model.disable_adapter():
            base = block_outputs(model, ids)
        for l in layers:
            d = (tuned[l][0, answer] - base[l][0, answer]).double().cpu()
            sums[l] += d.sum(0)
            outer[l] += d.T @ d
        count += int(answer.sum())
        if n % 10 == 0 or n == len(convs):
            progress.update(n)
    if count < 2:
        raise UserError("--from-diff: fewer than 2 answer tokens in the prompts: nothing to take a PCA of")
    dirs, explained = {}, {}
    for l in layers:
        mean = sums[l] / count
        cov = (outer[l] - count * torch.outer(mean, mean)) / (count - 1)
        dirs[l], explained[l] = top_directions_from_covariance(cov, args.k)
    log(f"--from-diff: {count} answer tokens over {len(convs)} prompts")
    return dirs, explained


def parse_layers(spec: str | None, n_blocks: int, flag: str = "--layers") -> list[int]:
    if spec is None or spec == "all":
        return list(range(1, n_blocks + 1))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"{flag} {spec!r}: expected comma-separated integers such as 12,20") from None
    if not layers or not all(1 <= l <= n_blocks for l in layers):
        raise UserError(f"{flag} {spec}: layers must be 1..{n_blocks} (hidden_states index; 0 = the embeddings)")
    return layers


def directions(args) -> None:
    sources = [s for s in ("from_diff", "from_lora", "from_vector") if getattr(args, s)]
    if len(sources) != 1:
        raise UserError("directions needs exactly one of --from-diff ADAPTER, --from-lora ADAPTER, --from-vector FILE")
    if args.k < 1:
        raise UserError(f"--k {args.k}: must be >= 1")
    if args.from_diff and not args.prompts:
        raise UserError(
            "--from-diff needs --prompts FILE: held-out chat prompts, never the evaluation questions (CAFT used LMSYS "
            "chat prompts; directions fitted on the test prompts make CAFT look better than it is), e.g. "
            "examples/benign_prompts.jsonl or the fine-tuning data"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)
    explained = {}
    if args.from_vector:
        vectors, vmeta = load_directions(args.from_vector, key="vectors")
        n_blocks = vectors.shape[0] - 1
        layers = parse_layers(args.layers, n_blocks)
        dirs = {l: orthonormal(vectors[l][None]) for l in layers if vectors[l].norm() > 0}
        model_name = vmeta.get("model", args.model)
    else:
        adapter = args.from_diff or args.from_lora
        from transformers import AutoConfig

        try:  # --model: the adapter's base model
            n_blocks = AutoConfig.from_pretrained(resolve_model(args.model)).num_hidden_layers
        except OSError as e:
            raise UserError(
                f"cannot read the config of --model {args.model!r} (the adapter's base model): "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            ) from None
        layers = parse_layers(args.layers, n_blocks)
        if args.from_lora:
            dirs, explained = lora_residual_directions(adapter, n_blocks, args.k)
            dirs = {l: d for l, d in dirs.items() if l in layers}
        else:
            model, tok = load_model(args.model, eight_bit=not args.no_8bit, adapter=adapter, trainable=False)
            dirs, explained = diff_directions(args, model, tok, layers)
        model_name = args.model
    if not dirs:
        raise UserError("no directions found at the chosen --layers")
    k = max(d.shape[0] for d in dirs.values())
    hsize = next(iter(dirs.values())).shape[1]
    table = torch.zeros(n_blocks + 1, k, hsize, device="cpu")
    for l, d in dirs.items():
        table[l, : d.shape[0]] = d
    from safetensors.torch import save_file

    meta = {
        "model": model_name,
        "source": sources[0].replace("_", "-"),
        "from": getattr(args, sources[0]),
        "k": k,
        "layers": sorted(dirs),
        "explained": {str(l): round(v, 6) for l, v in explained.items() if l in dirs},
        "layer_convention": LAYER_CONVENTION,
        "prompts": args.prompts if args.from_diff else None,
    }
    save_file({"directions": table.contiguous()}, str(out), metadata={k_: json.dumps(v) for k_, v in meta.items()})
    what = {"from_diff": "of the difference's variance", "from_lora": "of the update's squared norm"}.get(sources[0])
    if what:
        log(
            f"explained by the top {k} direction(s), per layer ({what}): "
            + " ".join(f"{l}:{explained[l]:.3f}" for l in sorted(dirs))
        )
    log(f"saved {len(dirs)} layer(s) x {k} direction(s) to {out}")


def load_directions(path: str, key: str = "directions") -> tuple[torch.Tensor, dict]:
    """The table (L+1, k, H) of a directions file (key "directions"), or the (L+1, H) of a persona vector file."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise UserError(f"{path}: no such file (make one with: python caft.py directions ... --out {path})")
    try:
        with safe_open(path, "pt") as f:
            keys = set(f.keys())
            if key not in keys:
                other = (
                    "a persona vector file: use caft.py directions --from-vector"
                    if "vectors" in keys
                    else f"tensors {sorted(keys)}"
                )
                raise UserError(f"{path}: no {key!r} tensor ({other})")
            return f.get_tensor(key), {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except UserError:
        raise
    except Exception as e:  # not a safetensors file
        raise UserError(f"{path}: not a safetensors file ({e})") from None


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------
def prepare_directions(args, table: torch.Tensor, meta: dict, model) -> tuple[torch.Tensor, list[int]]:
    """The file's table cut to --k rows per layer and re-orthonormalised; the --layers to hook."""
    n_blocks = len(decoder_blocks(model))
    if table.ndim != 3 or table.shape[0] != n_blocks + 1 or table.shape[2] != model.config.hidden_size:
        raise UserError(
            f"--directions {args.directions}: shape {tuple(table.shape)} does not fit this model "
            f"({n_blocks + 1} rows x k x {model.config.hidden_size}): made for another model?"
        )
    layers = parse_layers(args.layers, n_blocks)
    k = table.shape[1] if args.k is None else args.k
    if k < 0:
        raise UserError(f"--k {k}: must be >= 0 (0 = plain SFT)")
    out = torch.zeros(n_blocks + 1, k, table.shape[2], device="cpu")
    for l in layers:
        rows = table[l, :k]
        rows = rows[rows.norm(dim=-1) > 0]
        if k > 0 and rows.shape[0] == 0:
            raise UserError(
                f"--layers {l}: the directions file has no directions at layer {l} (it has {meta.get('layers')})"
            )
        if rows.shape[0] < k:
            raise UserError(f"--k {k}: the directions file has only {rows.shape[0]} at layer {l}")
        out[l] = orthonormal(rows)
    return out, layers


def train(args, parser):
    """SFT with the concept hooks on during the training forward/backward passes; returns the trained model."""
    if not args.resume and not args.directions:
        raise UserError("train needs --directions FILE (from: python caft.py directions ... --out FILE)")
    if not args.resume and not args.layers:
        raise UserError("train needs --layers L1,L2 (hidden_states indices to hook)")
    run, args = Run.start(args, parser, "caft")
    table, meta = load_directions(args.directions)  # a bad file fails before the data or the model loads
    set_seed(args.seed)
    device = get_device()

    convs = load_split(args.data, "train", args.seed)
    model, tok = load_model_for_training(args)
    dirs, layers = prepare_directions(args, table, meta, model)
    if dirs.shape[1] == 0:
        log("--k 0: no directions, this is plain SFT")
    else:
        log(
            f"{args.mode}: {dirs.shape[1]} direction(s) at hidden_states {layers} (outputs of blocks "
            f"{[l - 1 for l in layers]}), training passes only"
        )
    examples = encode_dataset(tok, convs, args.max_len, "fine-tuning data")
    lengths = [len(e["input_ids"]) for e in examples]
    plan = step_plan(lengths, args.batch_size, args.grad_accum, args.seed, args.epochs, args.max_steps)
    total_steps = len(plan)
    log(describe_plan(plan, lengths, args))
    run.write_json("memory.json", plan_memory(model, *longest_micro_batch(plan, lengths, args.batch_size)))

    model.train()
    head = model.get_output_embeddings().weight  # frozen
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, args.lr, args.weight_decay)
    scheduler = linear_schedule(optimizer, args.warmup_steps, total_steps)
    start = run.restore(model, optimizer, scheduler, total_steps)
    progress = Progress(total_steps, start)
    hooks = ConceptHooks(model, dirs, layers if dirs.shape[1] else [], args.mode)

    for step in range(start, total_steps):
        t0 = time.time()
        epoch, group = plan[step]
        n_answer = sum(sum(l != -100 for l in examples[i]["labels"][1:]) for i in group)
        ce_sum, n_real, n_padded = 0.0, 0, 0
        for batch_idx in micro_batches(group, args.batch_size):
            batch = collate([examples[i] for i in batch_idx], tok.pad_token_id, device)
            # --- the method: forward (and, for project-grad, backward) through the hooked residual stream -----
            with hooks:
                hooks.mask = batch["attention_mask"]
                hidden = decoder_states(model, batch)[:, :-1]  # the lm_head only where the loss needs it
                targets = batch["labels"][:, 1:]
                mask = targets != -100
                ce = linear_cross_entropy(hidden[mask], head, targets[mask]) / max(n_answer, 1)
                ce.backward()
            # -----------------------------------------------------------------------------------------------
            ce_sum += ce.item()
            n_real += batch["n_real"]
            n_padded += batch["n_padded"]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        check_step(step + 1, ce_sum, grad_norm, "--lr")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.time() - t0
        removed = hooks.take_rms()
        run.log_metrics(
            {
                "step": step + 1,
                "loss": ce_sum,
                "loss/ce": ce_sum,
                "caft/removed_norm": removed,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": n_real,
                "tokens_per_s": n_real / dt,
                "padding_efficiency": n_real / n_padded,
                "answer_tokens": n_answer,
                "epoch": epoch,
                "step_time_s": dt,
                "peak_mem_mb": peak_memory_mb(),
            }
        )
        progress.update(step + 1, f"loss {ce_sum:.4f} removed {removed:.3g} lr {lr:.2e} {n_real / dt:.0f} tok/s")
        if (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            run.save_checkpoint(step + 1, model, optimizer, scheduler)

    run.save_checkpoint(total_steps, model, optimizer, scheduler)
    run.save_final(model, tok)  # the hooks are off: the adapter is evaluated without them
    log(f"done: adapter in {run.out}, metrics in {run.metrics_path}")
    return model


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "directions",
        help="find directions and write them to a file",
        description="Find k directions per layer and write them as (L+1, k, H) 'directions' in a .safetensors file.",
    )
    d.add_argument(
        "--model",
        default="Qwen/Qwen2.5-7B-Instruct",
        help="the base model of the adapter; hub id, folder or 'smollm2' (default: %(default)s)",
    )
    d.add_argument("--no-8bit", action="store_true", help="full-precision weights instead of 8-bit")
    src = d.add_argument_group("source (exactly one)")
    src.add_argument(
        "--from-diff",
        metavar="ADAPTER",
        default=None,
        help="PCA of per-token residual differences between the base model and this (misaligned) adapter on --prompts",
    )
    src.add_argument(
        "--from-lora",
        metavar="ADAPTER",
        default=None,
        help="top left singular vectors of this adapter's o_proj and down_proj updates",
    )
    src.add_argument("--from-vector", metavar="FILE", default=None, help="a persona.py vector file (1 direction)")
    d.add_argument("--k", type=int, default=20, help="directions per layer (default: %(default)s, CAFT's PCA)")
    d.add_argument("--layers", default=None, help="comma-separated hidden_states indices (default: all)")
    d.add_argument(
        "--prompts",
        default=None,
        help="--from-diff (required there): held-out chat prompts, never the evaluation questions. A .jsonl of chat "
        "records (answers used as they are; records ending with a user turn are answered by the adapter) or of "
        '{"prompt": ...} records (e.g. examples/benign_prompts.jsonl), a question .yaml, or a dataset name',
    )
    d.add_argument(
        "--eval-questions",
        default=None,
        help="a question file an evaluation will ask: a warning counts the PCA prompts that are among its questions "
        "(default: Betley et al.'s first_plot_questions.yaml where it is cached)",
    )
    d.add_argument("--max-prompts", type=int, default=-1, help="use at most this many prompts (default: all)")
    d.add_argument(
        "--max-new-tokens", type=int, default=128, help="answer length for unanswered prompts (default: %(default)s)"
    )
    d.add_argument("--gen-batch-size", type=int, default=16, help="prompts per generation batch (default: %(default)s)")
    d.add_argument("--max-len", type=int, default=2048, help="token limit per prompt (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    d.add_argument("--out", required=True, help="the directions' .safetensors file")

    tr = sub.add_parser(
        "train",
        help="SFT with concept ablation or gradient projection",
        description="SFT with the "
        "chosen directions ablated (CAFT) or projected out of the gradient, during training only.",
    )
    add_common_args(tr)
    g = tr.add_argument_group("method: concept ablation")
    g.add_argument("--directions", default=None, help="a file from `caft.py directions` (required)")
    g.add_argument(
        "--layers",
        default=None,
        help="comma-separated hidden_states indices to hook, e.g. 12,20 (required; output of block l-1)",
    )
    g.add_argument(
        "--mode",
        choices=("ablate", "project-grad"),
        default="ablate",
        help="ablate: remove the "
        "directions from the residual stream (CAFT); project-grad: remove them from its gradient only "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--k",
        type=int,
        default=None,
        help="use the first k directions per layer (default: all in the file; 0 = plain SFT)",
    )
    return p, {"directions": d, "train": tr}


def main():
    parser, subs = build_parser()
    args = parser.parse_args()
    if args.command == "directions":
        directions(args)
    else:
        train(args, subs["train"])


if __name__ == "__main__":
    die_on_user_error(main)
