"""The figures: Figure 1(b) and training curves written as PNG files from hand-made run folders (the file is
checked, not the pixels)."""

import json

import pytest

import report
from common import UserError


def make_run(root, name, script, args, general=None, indomain=None, steps=0, terms=("loss/ce",), defaults=None):
    d = root / name
    d.mkdir(parents=True)
    (d / "args.json").write_text(json.dumps(args))
    (d / "env.json").write_text(json.dumps({"script": script}))
    flags = {k: v for k, v in args.items() if k != "data"}  # what common.Run records from the "method: ..." groups
    (d / "method.json").write_text(json.dumps({"script": script, "flags": flags, "defaults": defaults or {}}))
    for tag, pct in (("eval-general", general), ("eval-indomain-medical", indomain)):
        if pct is not None:
            (d / tag).mkdir()
            (d / tag / "summary.json").write_text(json.dumps({"misaligned_pct": pct, "incoherent_pct": 1.0}))
    with open(d / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            rec = {"step": s, "loss": 3.0 / s, "lr": 1e-4 * s / steps, "tokens_per_s": 200 + s}
            rec.update({t: 1.0 / s for t in terms})
            f.write(json.dumps(rec) + "\n")
    return d


def is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_figure_1b_and_curves(tmp_path):
    runs = [
        make_run(tmp_path, "sft", "interleave", {"pct": 0, "select": "random", "data": "medical"}, 30.0, 60.0, 5),
        make_run(
            tmp_path,
            "kl",
            "kl",
            {"lam": 0.3, "kl_tokens": "answer", "filter": True, "data": "medical"},
            5.0,
            20.0,
            5,
            ("loss/ce", "loss/kl"),
            defaults={"lam": 0.1, "kl_tokens": "answer", "filter": False},
        ),
        make_run(
            tmp_path, "noeval", "ldifs", {"lam": 1.0, "data": "medical"}, None, None, 3, ("loss/ce", "loss/ldifs")
        ),
    ]
    # the method flags that differ from the script's defaults (a flag that is on: its name), and the data
    assert report.run_label(runs[1]) == "kl lam=0.3 filter [medical]"
    assert report.run_label(runs[2]) == "ldifs lam=1.0 [medical]"  # no defaults recorded: every flag
    pts = report.em_points([str(r) for r in runs])
    assert [(x, y) for _, x, y in pts] == [(30.0, 60.0), (5.0, 20.0)]  # the run without evaluations is left out
    fig = report.plot_em([str(r) for r in runs], tmp_path / "fig" / "em.png")
    assert is_png(fig)
    curves = report.plot_curves([str(r) for r in runs], tmp_path / "curves.png")
    assert is_png(curves)


def test_nothing_to_plot_is_an_error(tmp_path):
    r = make_run(tmp_path, "empty", "kl", {"lam": 0.1})
    with pytest.raises(UserError, match="nothing to plot"):
        report.plot_em([str(r)], tmp_path / "x.png")
    with pytest.raises(UserError, match="nothing to plot"):
        report.plot_curves([str(r)], tmp_path / "y.png")
