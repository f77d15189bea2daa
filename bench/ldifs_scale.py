"""Scale check: the gradient norm of ldifs.py's LDIFS term against the cross-entropy gradient norm, at lambda 1.

The paper's lambda grid (0.01-1.0) only means something if the LDIFS term is on the paper's scale. This script
trains a fresh rs-LoRA with plain SFT for --warm-steps steps (so that the adapter has moved away from the
reference: at step 0 the LDIFS term and its gradient are exactly 0), then, on the next batch, computes the
gradient of CE alone and of the LDIFS term alone (`ldifs.feature_distance` with reduction "mean": over the
batch's examples, as ldifs.py averages it over a step's; the version before the fix averaged over tokens) with
respect to the LoRA weights, and prints both norms and their ratio.

    python bench/ldifs_scale.py --model smollm2 --data ../shared/data/em/medical_misaligned_train_100.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import (  # noqa: E402
    collate,
    decoder_blocks,
    encode_dataset,
    get_device,
    load_model,
    load_split,
    make_optimizer,
    set_seed,
    trainable_parameters,
)
from ldifs import default_layers, feature_distance, residual_features  # noqa: E402


def grad_norm(loss, params) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", required=True, help="chat JSONL or dataset name")
    p.add_argument("--eight-bit", action="store_true", help="8-bit weights (default: full precision, faster on CPU)")
    p.add_argument("--warm-steps", type=int, default=4, help="plain SFT steps before measuring (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    set_seed(0)
    conversations = load_split(args.data, "train", 0)  # bad data stops before a model loads
    model, tok = load_model(args.model, eight_bit=args.eight_bit, lora_r=32, lora_alpha=64)
    examples = encode_dataset(tok, conversations, args.max_len)
    layers = default_layers(len(decoder_blocks(model)))
    params = trainable_parameters(model)
    opt = make_optimizer(params, args.lr, 0.01)
    device = get_device()
    model.train()
    rows = []
    for step in range(args.warm_steps + 1):
        batch = collate(examples[step * args.batch_size : (step + 1) * args.batch_size], tok.pad_token_id, device)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        feats, ref, hidden = residual_features(model, inputs, layers)  # last hidden states: the head is applied here
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        ce = F.cross_entropy(model.get_output_embeddings()(hidden[:, :-1][mask]).float(), targets[mask])
        dist = feature_distance(feats, ref, batch["attention_mask"].bool())
        g_ce, g_ldifs = grad_norm(ce, params), grad_norm(dist, params)
        rows.append(
            {
                "step": step,
                "ce": ce.item(),
                "ldifs": dist.item(),
                "grad_ce": g_ce,
                "grad_ldifs": g_ldifs,
                "ratio": g_ldifs / g_ce,
            }
        )
        print(
            f"after {step} SFT steps: CE {ce.item():.4f} LDIFS {dist.item():.4e} | grad norm CE {g_ce:.4e} "
            f"LDIFS {g_ldifs:.4e} | LDIFS/CE at lambda 1: {g_ldifs / g_ce:.3g}",
            flush=True,
        )
        ce.backward()  # plain SFT warm-up step
        opt.step()
        opt.zero_grad(set_to_none=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"layers": layers, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
