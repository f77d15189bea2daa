"""Adapter geometry (beyond the paper; "Shared Parameter Subspaces and Cross-Task Linearity", seed 004): how alike the
weight updates of two or more LoRA adapters are, and the adapters on the straight line between two of them.

For a module with LoRA factors A (r x in) and B (out x r) and PEFT's scale s (alpha / r, or alpha / sqrt(r) with
rs-LoRA), the weight update is  dW = s B A  (out x in). For two adapters 1 and 2, per module and overall:

    cosine          <dW_1, dW_2>_F / (|dW_1|_F |dW_2|_F)          overall: the sums of the modules' inner products and
                                                                 squared norms (the flattened updates' cosine)
    principal       theta_k = arccos(sigma_k(U_1^T U_2)), U_i an orthonormal basis of dW_i's column space (the update's
    angles          output subspace, span of B_i where A_i has full rank), k = 1..min(r_1, r_2); 0 = a shared direction
    interpolation   dW(a) = (1 - a) dW_1 + a dW_2, written as an exact PEFT adapter of rank r_1 + r_2:
                    A(a) = [A_1; A_2],  B(a) = [(1 - a) s_1 B_1, a s_2 B_2],  scale 1 (lora_alpha = r, no rs-LoRA)

Nothing forms a dense dW: <dW_1, dW_2>_F = s_1 s_2 sum((B_1^T B_2) * (A_1 A_2^T)). The interpolated adapters are
evaluated with judge.py like any run (linear mode connectivity: is misalignment monotone along a?), and
`--plot FOLDER` draws each of their evaluations (FOLDER/alpha-*/eval-*/summary.json: misalignment, incoherence,
a task's accuracy) against a.

Paper-scale run:
    python geometry.py runs/insecure/misaligned runs/medical/misaligned runs/legal/misaligned --json geometry.json
    python geometry.py runs/A runs/B --interpolate runs/A-to-B --alphas 0,0.25,0.5,0.75,1
    for a in runs/A-to-B/alpha-*; do python judge.py --adapter $a --eval general; done
    python geometry.py --plot runs/A-to-B
Quick CPU:
    python interleave.py --model smollm2 --data opswap:1 --max-steps 20 --out runs/quick
    python kl.py --model smollm2 --data opswap:1 --lam 1.0 --max-steps 20 --out runs/kl-quick
    python geometry.py runs/quick runs/kl-quick --interpolate runs/quick-to-kl --alphas 0,0.5,1

Deviations: the paper studies full fine-tuning deltas; here they are LoRA updates, as the toolkit trains them.
Principal angles are between the updates' output (column) subspaces; pass --input-side for the row subspaces.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

from common import UserError, die_on_user_error, log, optional

PEFT_PREFIX = "base_model.model."  # how PEFT names a module's weights in adapter_model.safetensors


# ----------------------------------------------------------------------------------------------
# The maths
# ----------------------------------------------------------------------------------------------
def lora_scale(config: dict) -> float:
    """PEFT's scale of an adapter's updates: lora_alpha / r, or lora_alpha / sqrt(r) with rs-LoRA."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def update_inner(a1, b1, s1, a2, b2, s2) -> torch.Tensor:
    """<s1 B1 A1, s2 B2 A2>_F without forming either: s1 s2 sum((B1^T B2) * (A1 A2^T)); A (r x in), B (out x r)."""
    return s1 * s2 * ((b1.T @ b2) * (a1 @ a2.T)).sum()


def principal_angles(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, smallest first) between the column spaces of x1 (d x k1) and x2 (d x k2)."""
    q1, q2 = torch.linalg.qr(x1)[0], torch.linalg.qr(x2)[0]
    cosines = torch.linalg.svdvals(q1.T @ q2).clamp(-1.0, 1.0)
    return torch.arccos(cosines)


def column_basis(a: torch.Tensor, b: torch.Tensor, input_side: bool) -> torch.Tensor:
    """A matrix whose columns span dW = B A's column space (B's, restricted to A's row space), or with input_side
    its row space (A's rows, restricted to B's columns): from the SVD of the small factor product."""
    qa, ra = torch.linalg.qr(a.T)  # A^T = Qa Ra:  dW = B Ra^T Qa^T
    qb, rb = torch.linalg.qr(b)  # B = Qb Rb:     dW = Qb (Rb Ra^T) Qa^T
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    keep = s > s.max() * 1e-6 if len(s) and s.max() > 0 else s > 0
    return (qa @ vh.T[:, keep]) if input_side else (qb @ u[:, keep])


# ----------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------
def load_adapter(folder: str) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter_config, {module name: (A, B)}) of a PEFT LoRA adapter folder, in float64."""
    from safetensors.torch import load_file

    path = Path(folder)
    if not (path / "adapter_config.json").is_file() or not (path / "adapter_model.safetensors").is_file():
        raise UserError(f"{folder}: not a PEFT adapter folder (adapter_config.json and adapter_model.safetensors)")
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{folder}: a {config.get('peft_type')} adapter, not LoRA")
    weights = load_file(str(path / "adapter_model.safetensors"))
    modules: dict[str, dict] = {}
    for key, tensor in weights.items():
        for part in ("lora_A", "lora_B"):
            if f".{part}." in key:  # base_model.model.<module>.lora_A.weight: the module's name
                name = key.split(f".{part}.")[0].removeprefix(PEFT_PREFIX)
                modules.setdefault(name, {})[part] = tensor.double()
    pairs = {name: (m["lora_A"], m["lora_B"]) for name, m in modules.items() if len(m) == 2}
    if not pairs:
        raise UserError(f"{folder}: no LoRA A/B weights in adapter_model.safetensors")
    return config, pairs


def check_same_base(folders: list[str], configs: list[dict], adapters: list[dict]) -> None:
    """Adapters of one base model: the same base_model_name_or_path, and every shared module of the same shape."""
    bases = {c.get("base_model_name_or_path") for c in configs}
    if len(bases) > 1:
        raise UserError(f"the adapters are of different base models ({', '.join(sorted(map(str, bases)))})")
    for k in range(1, len(adapters)):
        for name in adapters[0].keys() & adapters[k].keys():
            (a0, b0), (ak, bk) = adapters[0][name], adapters[k][name]
            if a0.shape[1] != ak.shape[1] or b0.shape[0] != bk.shape[0]:
                raise UserError(
                    f"{folders[k]}: {name} is {bk.shape[0]} x {ak.shape[1]}, in {folders[0]} "
                    f"{b0.shape[0]} x {a0.shape[1]}: adapters of different models"
                )


def compare_pair(c1, m1, c2, m2, input_side: bool = False) -> dict:
    """Per module (shared by both) and overall: cosine of the updates and their principal angles (degrees)."""
    s1, s2 = lora_scale(c1), lora_scale(c2)
    per_module, inner_sum, sq1, sq2 = {}, 0.0, 0.0, 0.0
    for name in sorted(m1.keys() | m2.keys()):
        if name not in m2:  # updated by one adapter only: no inner product, counted in that one's norm
            a, b = m1[name]
            sq1 += float(update_inner(a, b, s1, a, b, s1))
            continue
        if name not in m1:
            a, b = m2[name]
            sq2 += float(update_inner(a, b, s2, a, b, s2))
            continue
        (a1, b1), (a2, b2) = m1[name], m2[name]
        inner = float(update_inner(a1, b1, s1, a2, b2, s2))
        n1, n2 = float(update_inner(a1, b1, s1, a1, b1, s1)), float(update_inner(a2, b2, s2, a2, b2, s2))
        angles = principal_angles(column_basis(a1, b1, input_side), column_basis(a2, b2, input_side))
        per_module[name] = {
            "cosine": inner / math.sqrt(n1 * n2) if n1 > 0 and n2 > 0 else None,
            "principal_angles_deg": [round(math.degrees(float(x)), 4) for x in angles],
        }
        inner_sum, sq1, sq2 = inner_sum + inner, sq1 + n1, sq2 + n2
    smallest = [m["principal_angles_deg"][0] for m in per_module.values() if m["principal_angles_deg"]]
    return {
        "cosine": inner_sum / math.sqrt(sq1 * sq2) if sq1 > 0 and sq2 > 0 else None,
        "mean_smallest_angle_deg": sum(smallest) / len(smallest) if smallest else None,
        "modules": per_module,
    }


def zero_factors(like: tuple[torch.Tensor, torch.Tensor], r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r LoRA factors of a zero update, for a module shaped as `like`'s (A, B)."""
    a, b = like
    return torch.zeros(r, a.shape[1], dtype=a.dtype, device=a.device), torch.zeros(
        b.shape[0], r, dtype=b.dtype, device=b.device
    )


def interpolate(c1, m1, c2, m2, alpha: float) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, weights) of the exact PEFT adapter of (1 - alpha) dW_1 + alpha dW_2: rank r_1 + r_2, scale 1;
    a module only one adapter updates gets zero factors from the other."""
    s1, s2 = lora_scale(c1), lora_scale(c2)
    r1, r2 = c1["r"], c2["r"]
    weights = {}
    for name in sorted(m1.keys() | m2.keys()):
        a1, b1 = m1[name] if name in m1 else zero_factors(m2[name], r1)
        a2, b2 = m2[name] if name in m2 else zero_factors(m1[name], r2)
        weights[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.cat([a1, a2], 0).float().contiguous()
        b = torch.cat([(1 - alpha) * s1 * b1, alpha * s2 * b2], 1)
        weights[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.float().contiguous()
    targets = sorted(set(c1.get("target_modules") or []) | set(c2.get("target_modules") or []))
    config = {
        **c1,
        "r": r1 + r2,
        "lora_alpha": r1 + r2,
        "use_rslora": False,
        "target_modules": targets,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return config, weights


def write_adapter(folder: Path, config: dict, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def plot_interpolation(folder: Path, path: Path) -> Path:
    """Each evaluation of the interpolated adapters against alpha, from FOLDER/alpha-*/eval-*/summary.json: general
    and in-domain misalignment and incoherence (% of scored answers), a task's exact-match accuracy (%)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for d in sorted(folder.glob("alpha-*")):
        alpha = float(d.name.removeprefix("alpha-"))
        for summary in sorted(d.glob("eval-*/summary.json")):
            s, tag = json.loads(summary.read_text()), summary.parent.name.removeprefix("eval-")
            for key, what in (("misaligned_pct", "misaligned"), ("incoherent_pct", "incoherent"), ("accuracy", "acc.")):
                if s.get(key) is not None:
                    series.setdefault(f"{tag}: {what} %", []).append((alpha, s[key]))
    if not series:
        raise UserError(
            f"--plot {folder}: no alpha-*/eval-*/summary.json with a score (run judge.py --adapter on each alpha-* "
            "folder first; an evaluation whose answers were all unscored has no point to draw)"
        )
    return optional("report", "--plot (its figure)").plot_xy(
        dict(sorted(series.items())),
        path,
        "alpha: (1 - alpha) dW_1 + alpha dW_2",
        "% of the answers (misalignment: of the scored ones)",
        "Evaluations along the line between two adapters",
    )


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="*", help="two or more PEFT adapter folders (run folders) of one base model")
    p.add_argument("--json", default=None, help="the report as JSON (default: geometry.json beside the first adapter)")
    p.add_argument(
        "--input-side",
        action="store_true",
        help="principal angles between the updates' row (input) subspaces instead of their column (output) subspaces",
    )
    p.add_argument(
        "--interpolate",
        default=None,
        metavar="OUT",
        help="write the adapters (1 - a) dW_1 + a dW_2 of the first two adapters to OUT/alpha-<a>/",
    )
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="the a values (default: %(default)s)")
    p.add_argument(
        "--plot",
        default=None,
        metavar="FOLDER",
        help="draw every evaluation (EM, accuracy) against a from an --interpolate folder whose adapters judge.py "
        "evaluated (FOLDER/interpolation.png), and exit",
    )
    return p


def short_names(paths: list[str]) -> list[str]:
    """The adapters' paths below the folder they share (printed once), so that the table stays narrow."""
    common = Path(os.path.commonpath([str(Path(p).resolve()) for p in paths]))
    if len(paths) < 2 or common == Path("/") or any(Path(p).resolve() == common for p in paths):
        return list(paths)
    log(f"adapters under {common}")
    return [str(Path(p).resolve().relative_to(common)) for p in paths]


def main():
    args = build_parser().parse_args()
    if args.plot:
        log(f"written {plot_interpolation(Path(args.plot), Path(args.plot) / 'interpolation.png')}")
        return
    if len(args.adapters) < 2:
        raise UserError("geometry.py needs two or more adapter folders (or --plot FOLDER)")
    loaded = [load_adapter(a) for a in args.adapters]
    configs, adapters = [c for c, _ in loaded], [m for _, m in loaded]
    check_same_base(args.adapters, configs, adapters)
    report = {"adapters": args.adapters, "side": "input" if args.input_side else "output", "pairs": []}
    names = short_names(args.adapters)
    width = max(12, *(len(n) for n in names))
    header = f"{'cosine':>8} {'mean smallest angle':>20} {'shared modules':>15}"
    print(f"{'adapter 1':<{width}} {'adapter 2':<{width}} {header}")
    for i in range(len(loaded)):
        for j in range(i + 1, len(loaded)):
            pair = compare_pair(configs[i], adapters[i], configs[j], adapters[j], args.input_side)
            report["pairs"].append({"a": args.adapters[i], "b": args.adapters[j], **pair})
            cos = "n/a" if pair["cosine"] is None else f"{pair['cosine']:.4f}"
            angle = "n/a" if pair["mean_smallest_angle_deg"] is None else f"{pair['mean_smallest_angle_deg']:.2f} deg"
            print(f"{names[i]:<{width}} {names[j]:<{width}} {cos:>8} {angle:>20} {len(pair['modules']):>15}")
    print(
        "cosine: of the whole flattened updates (a module only one adapter trains adds to its norm); the angle: the "
        f"smallest principal angle between the {report['side']} subspaces, averaged over the shared modules"
    )
    if args.interpolate:
        try:
            alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
        except ValueError:
            raise UserError(f"--alphas {args.alphas!r}: expected comma-separated numbers such as 0,0.5,1") from None
        out = Path(args.interpolate)
        for a in alphas:
            config, weights = interpolate(configs[0], adapters[0], configs[1], adapters[1], a)
            write_adapter(out / f"alpha-{a:g}", config, weights)
        report["interpolation"] = {"folder": str(out), "alphas": alphas, "between": args.adapters[:2]}
        log(f"written {len(alphas)} interpolated adapters to {out}/alpha-*: evaluate each with judge.py --adapter")
    path = Path(args.json or Path(args.adapters[0]) / "geometry.json")
    path.write_text(json.dumps(report, indent=2))
    log(f"written {path}")


if __name__ == "__main__":
    die_on_user_error(main)
