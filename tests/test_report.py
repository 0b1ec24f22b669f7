"""compt.report renders summary.json + metrics.jsonl files (written here with the documented schema)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compt.cli import main as cli_main
from compt.report import (
    collect_runs,
    load_run,
    member_curve,
    read_metrics,
    render_markdown,
    report_warnings,
    seed_curves,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(
    root: Path,
    kind: str,
    members: list[tuple[str, float, float, float, float]],
    evals: int = 3,
    seed: int = 0,
) -> Path:
    """A run folder: summary.json plus one metrics.jsonl per member (train lines and eval lines).

    members: (name, epochs, train_macs, wall_s, final top-1); the first member of a chain has no teacher.
    """
    root.mkdir(parents=True)
    entries, acc_macs, acc_wall = [], 0.0, 0.0
    for i, (name, epochs, macs, wall, top1) in enumerate(members):
        acc_macs += macs
        acc_wall += wall
        folder = root / name.replace("/", "-")
        folder.mkdir()
        lines = []
        steps = 10 * evals
        for step in range(1, steps + 1):
            frac = step / steps
            lines.append(
                {
                    "step": step,
                    "epoch": epochs * frac,
                    "samples_seen": 8 * step,
                    "train_macs": macs * frac,
                    "wall_s": wall * frac,
                    "loss": 2.0 - frac,
                    "task_loss": 1.5,
                    "distill_loss": 0.5,
                    "lr": 1e-3,
                }
            )
            if step % 10 == 0:  # eval lines without train_macs: report interpolates it from the step
                lines.append(
                    {
                        "step": step,
                        "mean_zeroshot_top1": top1 * frac,
                        "mean_retrieval_r1": top1 / 2 * frac,
                        "zeroshot/shapes/top1": top1 * frac,
                    }
                )
        text = "\n".join(json.dumps(x) for x in lines) + "\n"
        (folder / "metrics.jsonl").write_text(text + '{"step": 99, "mean_zero')  # truncated last line (crash)
        entries.append(
            {
                "name": name,
                "teacher": members[i - 1][0] if kind == "chain" and i else None,
                "epochs": epochs,
                "steps": steps,
                "samples_seen": 8 * steps,
                "train_macs": macs,
                "accumulated_train_macs": acc_macs,
                "wall_s": wall,
                "accumulated_wall_s": acc_wall,
                "metrics": {
                    "mean_zeroshot_top1": top1,
                    "mean_retrieval_r1": top1 / 2,
                    "zeroshot/shapes/top1": top1,
                },
                "metrics_file": f"{folder.name}/metrics.jsonl",
                "export": f"{folder.name}/export",
                "until_lossless": {"stopped_at_step": steps, "epochs_needed": epochs * 0.8}
                if kind == "chain" and i
                else None,
            }
        )
    summary = {"kind": kind, "family": "tiny", "members": entries, "config": {"train": {"seed": seed}}}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return root


@pytest.fixture
def runs(tmp_path):
    chain = _write_run(
        tmp_path / "chain",
        "chain",
        [
            ("tiny-XS", 8, 1.0e12, 60.0, 20.0),
            ("tiny-S", 4, 1.5e12, 50.0, 26.0),
            ("tiny-M", 2, 2.0e12, 40.0, 30.0),
        ],
    )
    base = _write_run(
        tmp_path / "base",
        "individual",
        [
            ("tiny-XS", 8, 1.0e12, 60.0, 20.0),
            ("tiny-S", 8, 4.0e12, 150.0, 25.0),
            ("tiny-M", 8, 9.0e12, 300.0, 30.2),
        ],
    )
    return chain, base


def _table_rows(md: str) -> dict[str, list[str]]:
    """Model name -> cells of the Table 2 rows."""
    section = md.split("## Table 2")[1].split("###")[0].split("##")[0]
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("|")
    ]
    head, body = rows[0], rows[2:]
    return {r[0]: dict(zip(head, r, strict=True)) for r in body}


def test_read_metrics_skips_a_truncated_last_line_but_not_a_bad_middle_line(runs, tmp_path):
    chain, _ = runs
    recs = read_metrics(chain / "tiny-S" / "metrics.jsonl")
    assert recs[-1]["step"] == 30 and all(isinstance(r, dict) for r in recs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_metrics(bad)


def test_curve_is_offset_by_earlier_members_and_interpolates_macs(runs):
    run = load_run(runs[0])
    curve = member_curve(run, run.members[1], "mean_zeroshot_top1")
    # tiny-S starts after tiny-XS's 1e12 MACs; its eval at step 10 of 30 sits at 1/3 of its own 1.5e12.
    assert [round(x / 1e12, 6) for x, _ in curve] == [1.5, 2.0, 2.5]
    assert curve[-1][1] == pytest.approx(26.0)


def test_table2_gaps_ratios_and_lossless(runs):
    run, base = load_run(runs[0]), load_run(runs[1])
    md = render_markdown(run, base)
    rows = _table_rows(md)
    assert list(rows) == ["tiny-XS", "tiny-S", "tiny-M"]
    s, m = rows["tiny-S"], rows["tiny-M"]
    assert s["Teacher"] == "tiny-XS" and rows["tiny-XS"]["Teacher"] == "—"
    assert s["Zero-shot top-1"] == "26.00" and s["Zero-shot top-1 baseline"] == "25.00"
    # The gap is how much worse than the baseline: negative when the chain is better (issue 12).
    assert s["Zero-shot top-1 gap"] == "-1.00" and s["Retrieval R@1 gap"] == "-0.50"
    assert m["Zero-shot top-1 gap"] == "+0.20" and m["Lossless"] == "yes"  # within 0.5 points
    # Individual and accumulated ratios: 4e12/1.5e12, (1+4)/(1+1.5); hours: 150/50.
    macs_col = next(k for k in s if k.startswith("MACs indiv."))
    assert s[macs_col] == "1.50 (2.67×)"
    assert s["MACs accum."] == "2.50 (2.00×)"
    assert s["Wall-clock min indiv."].endswith("(3.00×)")
    assert "×10^12" in macs_col
    assert "Lossless for every member: yes" in md
    assert "`zeroshot/shapes/top1`" in md and "(25.00)" in md


def test_lossy_member_is_flagged(tmp_path):
    chain = _write_run(
        tmp_path / "c", "chain", [("tiny-XS", 8, 1e12, 60, 20.0), ("tiny-S", 4, 1e12, 50, 24.0)]
    )
    base = _write_run(
        tmp_path / "b", "individual", [("tiny-XS", 8, 1e12, 60, 20.0), ("tiny-S", 8, 3e12, 90, 25.0)]
    )
    md = render_markdown(load_run(chain), load_run(base))
    assert _table_rows(md)["tiny-S"]["Lossless"] == "no"
    assert "Lossless for every member: no" in md


def _lm_summary(root: Path, kind: str, losses: list[float], tolerance: float) -> Path:
    """An LM run's summary.json: val_loss lower is better, its tolerance in nats (as chain.py writes)."""
    root.mkdir(parents=True)
    members = [
        {
            "name": f"llama-cpu-{tag}",
            "teacher": None,
            "epochs": 1.0,
            "steps": 10,
            "samples_seen": 160,
            "train_macs": 1e12,
            "accumulated_train_macs": 1e12 * (i + 1),
            "wall_s": 10.0,
            "accumulated_wall_s": 10.0 * (i + 1),
            "metrics": {"val_loss": loss},
        }
        for i, (tag, loss) in enumerate(zip("SML", losses, strict=False))
    ]
    summary = {"kind": kind, "family": "llama-cpu", "metric": "val_loss", "members": members}
    rule = {"higher_is_better": False, "tolerance": {"absolute": tolerance, "relative": 0.0}, "unit": "nats"}
    summary |= {"paradigm": "lm", "metric_rules": {"val_loss": rule}}
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def test_lossless_follows_the_metrics_direction_and_the_runs_tolerance(tmp_path):
    # A loss above the twin's is worse: 4.03 vs 4.00 is within 0.05, 4.10 is not, 3.50 is better.
    base = load_run(_lm_summary(tmp_path / "b", "individual", [4.0, 4.0, 4.0], 0.05))
    chain = load_run(_lm_summary(tmp_path / "c", "chain", [4.0, 4.03, 4.10], 0.05))
    rows = _table_rows(render_markdown(chain, base))
    assert [rows[f"llama-cpu-{t}"]["Lossless"] for t in "SML"] == ["yes", "yes", "no"]
    assert rows["llama-cpu-M"]["Val. loss gap"] == "+0.030"
    better = load_run(_lm_summary(tmp_path / "d", "chain", [4.0, 3.5, 3.9], 0.05))
    assert "Lossless for every member: yes" in render_markdown(better, base)


def test_write_report_makes_markdown_and_valid_pngs(runs, tmp_path):
    chain, base = runs
    out = tmp_path / "rep"
    report = write_report(chain, base, out)
    assert report == out / "report.md"
    for name in ("metric_vs_macs.png", "epochs_per_link.png", "acceleration.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000, name
        assert f"![{name}]({name})" in report.read_text()


def test_chain_alone_has_no_baseline_columns(runs):
    chain, _ = runs
    report = write_report(chain)  # default folder: <run>/report
    assert report == chain / "report" / "report.md"
    md = report.read_text()
    assert not any("baseline" in k or "gap" in k for k in _table_rows(md)["tiny-S"])
    assert not (chain / "report" / "acceleration.png").exists()
    assert (chain / "report" / "metric_vs_macs.png").read_bytes()[:8] == PNG_MAGIC


def test_bad_summary_names_file_and_field(tmp_path):
    run = _write_run(tmp_path / "r", "chain", [("tiny-XS", 8, 1e12, 60, 20.0)])
    doc = json.loads((run / "summary.json").read_text())
    del doc["members"][0]["train_macs"]
    (run / "summary.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"summary\.json: members\[0\] lacks 'train_macs'"):
        load_run(run)
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/summary\.json does not exist"):
        load_run(tmp_path / "empty")


def test_cli_report(runs, tmp_path, capsys):
    chain, base = runs
    assert cli_main(["report", str(chain), str(base), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "report.md").is_file()
    out = capsys.readouterr().out
    assert str(tmp_path / "o" / "report.md") in out
    # One sentence says lossless or not and the saving: (1 + 4 + 9) / (1 + 1.5 + 2) = 3.11x (issue 12).
    assert "CoM-PT: lossless for every member: yes, at 3.11× fewer training MACs than its baseline." in out
    assert cli_main(["report", str(chain), "--metric", "no/such/metric"]) == 2
    assert "no/such/metric" in capsys.readouterr().err


def test_cli_report_on_a_chain_output_tree(tmp_path, capsys):
    """`compt report OUT` renders OUT/chain against OUT/individual, the layout `compt chain run` writes."""
    _write_run(
        tmp_path / "out" / "chain", "chain", [("tiny-XS", 8, 1e12, 60, 20.0), ("tiny-S", 4, 1e12, 50, 26.0)]
    )
    _write_run(
        tmp_path / "out" / "individual",
        "individual",
        [("tiny-XS", 8, 1e12, 60, 20.0), ("tiny-S", 8, 3e12, 90, 25.0)],
    )
    assert cli_main(["report", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "vs baseline" in md and (tmp_path / "out" / "report" / "acceleration.png").is_file()


def test_members_without_metrics_still_render(tmp_path):
    run = _write_run(tmp_path / "r", "chain", [("tiny-XS", 8, 1e12, 60, 20.0), ("tiny-S", 4, 1e12, 50, 26.0)])
    doc = json.loads((run / "summary.json").read_text())
    for m in doc["members"]:
        m["metrics"], m["metrics_file"] = {}, None
    (run / "summary.json").write_text(json.dumps(doc))
    report = write_report(run)
    assert "tiny-S" in report.read_text()
    assert not (report.parent / "metric_vs_macs.png").exists()
    assert (report.parent / "epochs_per_link.png").read_bytes()[:8] == PNG_MAGIC


def test_report_reads_a_real_training_run(tmp_path):
    """metrics.jsonl as the engine writes it (eval lines without train_macs) places eval points by step."""
    torch = pytest.importorskip("torch")
    from compt.engine.train import TrainConfig, train_member
    from compt.families import get_member
    from compt.paradigms.clip.data import DataConfig
    from compt.paradigms.clip.evaluate import build_evaluator

    torch.manual_seed(0)
    member = get_member("debug-S")
    cfg = TrainConfig(
        member=member.name,
        out_dir=str(tmp_path / "run" / "debug-S"),
        steps=6,
        global_batch_size=8,
        warmup_steps=1,
        log_every_steps=2,
        eval_every_steps=3,
        save_every_steps=0,
        data=DataConfig(kind="synthetic", num_samples=64),
    )
    evaluate = build_evaluator(member.image_size, member.context_length, num_images=16)
    result = train_member(cfg, evaluate=evaluate)
    summary = {
        "kind": "individual",
        "family": "debug",
        "config": {},
        "members": [
            {
                "name": member.name,
                "teacher": None,
                "epochs": result.samples_seen / 64,
                "steps": result.steps,
                "samples_seen": result.samples_seen,
                "train_macs": result.train_macs,
                "accumulated_train_macs": result.train_macs,
                "wall_s": result.wall_s,
                "accumulated_wall_s": result.wall_s,
                "metrics": result.metrics,
                "metrics_file": "debug-S/metrics.jsonl",
                "export": None,
                "until_lossless": None,
            }
        ],
    }
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    run = load_run(tmp_path / "run")
    curve = member_curve(run, run.members[0], "mean_zeroshot_top1")
    assert [round(x / result.train_macs, 6) for x, _ in curve] == [0.5, 1.0]  # evals at steps 3 and 6 of 6
    assert curve[-1][1] == pytest.approx(result.metrics["mean_zeroshot_top1"])
    assert write_report(run).is_file()


def _with(
    run: Path, chance: float | None = None, config: dict | None = None, top1: dict | None = None
) -> Path:
    """Rewrite a run's summary with chance levels beside its metrics, another config, or other top-1s."""
    doc = json.loads((run / "summary.json").read_text())
    for m in doc["members"]:
        if top1 and m["name"] in top1:
            m["metrics"]["mean_zeroshot_top1"] = top1[m["name"]]
        if chance is not None:
            m["metrics"]["chance/mean_zeroshot_top1"] = chance
            m["metrics"]["chance/mean_retrieval_r1"] = 0.2
            m["metrics"]["chance/zeroshot/shapes/top1"] = chance
    if config is not None:
        doc["config"] = config
    (run / "summary.json").write_text(json.dumps(doc))
    return run


def test_both_sides_at_chance_is_not_lossless_and_is_named(runs):
    chain, base = runs
    # tiny-XS at chance on both sides (12.9 vs 12.5 chance): its zero-shot gap of 0 says nothing.
    _with(chain, chance=12.5, top1={"tiny-XS": 12.9})
    _with(base, chance=12.5, top1={"tiny-XS": 13.1})
    run, baseline = load_run(chain), load_run(base)
    md = render_markdown(run, baseline)
    rows = _table_rows(md)
    assert rows["tiny-XS"]["Zero-shot top-1"] == "12.90 (at chance)"
    assert rows["tiny-XS"]["Lossless"] == "yes (mean_zeroshot_top1 at chance)"  # judged on R@1 alone
    assert rows["tiny-S"]["Lossless"] == "yes" and rows["tiny-S"]["Zero-shot top-1"] == "26.00"
    assert "Chance level (a blind guess): Zero-shot top-1 12.50, Retrieval R@1 0.20" in md
    warnings = report_warnings(run, baseline)
    assert len(warnings) == 1 and warnings[0].startswith("tiny-XS: CoM-PT and baseline are at chance")
    assert f"> **Warning:** {warnings[0]}" in md
    (shapes,) = [line for line in md.splitlines() if line.startswith("| `zeroshot/shapes/top1` |")]
    assert shapes.endswith("| 30.00 (30.20) | 12.50 |")  # the chance column


def test_a_member_at_chance_on_every_metric_has_no_verdict(tmp_path):
    chain = _write_run(
        tmp_path / "c", "chain", [("tiny-XS", 8, 1e12, 60, 13.0), ("tiny-S", 4, 1e12, 50, 30.0)]
    )
    base = _write_run(
        tmp_path / "b", "individual", [("tiny-XS", 8, 1e12, 60, 1.0), ("tiny-S", 8, 3e12, 90, 30.0)]
    )
    _with(chain, chance=12.5)  # tiny-XS: R@1 6.5 is far above its 0.2 chance, so pin it to chance too
    _with(base, chance=12.5, top1={"tiny-XS": 12.0})
    for run in (chain, base):
        doc = json.loads((run / "summary.json").read_text())
        doc["members"][0]["metrics"]["mean_retrieval_r1"] = 0.5
        (run / "summary.json").write_text(json.dumps(doc))
    md = render_markdown(load_run(chain), load_run(base))
    assert _table_rows(md)["tiny-XS"]["Lossless"] == "n/a (both at chance)"
    assert "Lossless for every member: not established (tiny-XS: see the warnings)." in md


def test_a_baseline_trained_on_other_data_is_named_and_not_judged(runs, capsys, tmp_path):
    chain, base = runs
    data = {"kind": "synthetic", "num_samples": 12800, "workers": 2, "synthetic": {"colours": ["red"]}}
    _with(chain, config={"data": data, "eval": {"seed": 0, "metric": "mean_zeroshot_top1"}})
    other = {**data, "num_samples": 6400, "workers": 0}  # workers differ too: not a data difference
    _with(base, config={"data": other, "eval": {"seed": 0, "metric": "mean_retrieval_r1"}})
    md = render_markdown(load_run(chain), load_run(base))
    assert {r["Lossless"] for r in _table_rows(md).values()} == {"n/a (different data)"}
    assert "data.num_samples: 12800 vs 6400" in md and "workers" not in md.split("## Table 2")[0]
    assert cli_main(["report", str(chain), str(base), "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("compt report: warning: the baseline") and "data.num_samples: 12800 vs 6400" in err


def test_report_out_on_an_unwritable_path_is_one_line(runs, tmp_path, capsys):
    chain, base = runs
    (tmp_path / "blocker").write_text("")
    assert cli_main(["report", str(chain), str(base), "--out", str(tmp_path / "blocker" / "rep")]) == 2
    err = capsys.readouterr().err
    assert "report folder" in err and "blocker/rep cannot be written" in err and "--out" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# --- metric direction (issue 12 item 5) ----------------------------------------------------------


def _loss_run(root: Path, kind: str, losses: list[float], rules: bool = True) -> Path:
    """A CLIP run whose headline is val_loss (lower is better), with metric_rules as chain.py writes them
    (``rules=False``: a summary written before them, read through the CLIP paradigm)."""
    run = _write_run(
        root, kind, [(f"tiny-{t}", 4, 1e12 * (i + 1), 60, 30.0) for i, t in enumerate(("XS", "S", "M"))]
    )
    doc = json.loads((run / "summary.json").read_text())
    for m, loss in zip(doc["members"], losses, strict=True):
        m["metrics"] |= {"val_loss": loss, "chance/val_loss": 5.545}
    doc["metric"] = "val_loss"
    if rules:
        tol = {"absolute": 0.01, "relative": 0.0}
        doc["metric_rules"] = {"val_loss": {"higher_is_better": False, "tolerance": tol, "unit": "nats"}}
    (run / "summary.json").write_text(json.dumps(doc))
    return run


@pytest.mark.parametrize("rules", [True, False])
def test_a_loss_is_judged_lower_is_better_in_nats(tmp_path, rules):
    base = _loss_run(tmp_path / "b", "individual", [4.149, 4.127, 4.112], rules)
    chain = _loss_run(tmp_path / "c", "chain", [4.149, 4.132, 4.136], rules)
    md = render_markdown(load_run(chain), load_run(base))
    rows = _table_rows(md)
    s, m = rows["tiny-S"], rows["tiny-M"]
    assert (s["Val. loss"], s["Val. loss baseline"], s["Val. loss gap"]) == ("4.132", "4.127", "+0.005")
    assert m["Val. loss gap"] == "+0.024" and s["Lossless"] == "yes" and m["Lossless"] == "no"
    assert "Lossless for every member: no (tiny-M: Val. loss 0.024 nats worse (tolerance 0.01 nats))." in md
    # The verdict on the headline metric and the saving in one sentence at the top (issue 12); the
    # twins here cost what the chain costs.
    assert md.splitlines()[2] == (
        "**CoM-PT: lossless for every member on Val. loss: no (tiny-M: Val. loss 0.024 nats worse "
        "(tolerance 0.01 nats)), at 1.00× fewer training MACs than its baseline.**"
    )
    assert "Val. loss in nats" in md and "Val. loss 0.01 nats" in md and "Val. loss 5.545" in md
    better = _loss_run(tmp_path / "d", "chain", [4.149, 4.100, 4.090], rules)
    rows = _table_rows(render_markdown(load_run(better), load_run(base)))
    assert rows["tiny-M"]["Val. loss gap"] == "-0.022" and rows["tiny-M"]["Lossless"] == "yes"


def test_a_loss_near_its_chance_level_is_marked_and_a_spec_tolerance_applies(tmp_path):
    base = _loss_run(tmp_path / "b", "individual", [5.540, 4.127, 4.112])
    chain = _loss_run(tmp_path / "c", "chain", [5.530, 4.160, 4.136])
    doc = json.loads((chain / "summary.json").read_text())
    doc["metric_rules"]["val_loss"]["tolerance"] = {"absolute": 0.0, "relative": 0.01}  # 1 % of the twin
    (chain / "summary.json").write_text(json.dumps(doc))
    rows = _table_rows(render_markdown(load_run(chain), load_run(base)))
    assert rows["tiny-XS"]["Val. loss"] == "5.530 (at chance)"  # less than 1 % below ln(256)
    assert rows["tiny-XS"]["Lossless"] == "yes (val_loss at chance)"  # judged on the accuracies
    assert rows["tiny-S"]["Lossless"] == "yes" and rows["tiny-M"]["Lossless"] == "yes"  # 0.033 < 0.041


# --- Fig. 1: curves and seeds ---------------------------------------------------------------------


def test_curves_of_chain_and_baseline_one_seed(runs):
    chain, base = load_run(runs[0]), load_run(runs[1])
    c = {x.member: x.points for x in seed_curves(chain, "mean_zeroshot_top1")}
    b = {x.member: x.points for x in seed_curves(base, "mean_zeroshot_top1")}
    # The chain's tiny-S starts after tiny-XS's 1e12 MACs; the baseline's after its own 1e12.
    assert [(round(x / 1e12, 6), y, sd, n) for x, y, sd, n in c["tiny-S"]] == [
        (1.5, pytest.approx(26 / 3), 0.0, 1),
        (2.0, pytest.approx(52 / 3), 0.0, 1),
        (2.5, pytest.approx(26.0), 0.0, 1),
    ]
    assert [round(x / 1e12, 6) for x, *_ in b["tiny-M"]] == [8.0, 11.0, 14.0]


def _seeds(tmp_path: Path, top1s: list[tuple[float, float]]) -> Path:
    """Output trees seed0/, seed1/, ... (chain/ + individual/), member tiny-S's final top-1 per seed."""
    for seed, (ours, theirs) in enumerate(top1s):
        tree = tmp_path / "seeds" / f"seed{seed}"
        _write_run(
            tree / "chain",
            "chain",
            [("tiny-XS", 8, 1e12, 60, 20.0), ("tiny-S", 4, 1e12, 50, ours)],
            seed=seed,
        )
        base = [("tiny-XS", 8, 1e12, 60, 20.0), ("tiny-S", 8, 3e12, 90, theirs)]
        _write_run(tree / "individual", "individual", base, seed=seed)
    return tmp_path / "seeds"


def test_curves_pool_seeds_by_step_with_their_spread(tmp_path):
    folder = _seeds(tmp_path, [(24.0, 25.0), (26.0, 25.5), (28.0, 26.0)])
    run, base = collect_runs([folder])
    assert [str(r.root) for r in run.seeds] == [str(folder / f"seed{i}" / "chain") for i in range(3)]
    (xs, s) = seed_curves(run, "mean_zeroshot_top1")
    assert xs.points[-1][1:] == (20.0, 0.0, 3)  # the same in every seed: no spread
    # Per step, the mean and sample std over seeds of top1 * step/30: 26 ± 2 at the end.
    assert [(round(x / 1e12, 6), y, sd, n) for x, y, sd, n in s.points] == [
        (1.333333, pytest.approx(26 / 3), pytest.approx(2 / 3), 3),
        (1.666667, pytest.approx(52 / 3), pytest.approx(4 / 3), 3),
        (2.0, pytest.approx(26.0), pytest.approx(2.0), 3),
    ]
    rows = _table_rows(render_markdown(run, base))
    assert (
        rows["tiny-S"]["Zero-shot top-1"] == "26.00 ± 2.00"
        and rows["tiny-S"]["Zero-shot top-1 gap"] == "-0.50"
    )
    assert rows["tiny-S"]["Zero-shot top-1 baseline"] == "25.50 ± 0.50"


def test_report_over_seeds_from_the_cli(tmp_path, capsys):
    folder = _seeds(tmp_path, [(24.0, 25.0), (26.0, 25.5)])
    assert cli_main(["report", str(folder)]) == 0
    md = (folder / "report" / "report.md").read_text()
    assert "CoM-PT: the mean ± standard deviation over 2 seeds" in md and "over 2 seeds" in md
    assert (folder / "report" / "metric_vs_macs.png").read_bytes()[:8] == PNG_MAGIC
    # The same seeds named one by one, chain then baseline with --baseline.
    chains = [str(folder / f"seed{i}" / "chain") for i in range(2)]
    bases = [str(folder / f"seed{i}" / "individual") for i in range(2)]
    out = tmp_path / "o"
    assert cli_main(["report", *chains, "--baseline", *bases, "--out", str(out)]) == 0
    assert _table_rows((out / "report.md").read_text()) == _table_rows(md)
    # Legacy form: a chain and its baseline (two kinds) are run and baseline, not two seeds.
    run, base = collect_runs([chains[0], bases[0]])
    assert (run.seeds, base.seeds, base.summary["kind"]) == ((), (), "individual")


def test_seeds_of_another_experiment_or_the_same_seed_are_named(tmp_path):
    folder = _seeds(tmp_path, [(24.0, 25.0), (26.0, 25.5)])
    doc = json.loads((folder / "seed1" / "chain" / "summary.json").read_text())
    doc["config"]["train"]["seed"] = 0
    (folder / "seed1" / "chain" / "summary.json").write_text(json.dumps(doc))
    run, base = collect_runs([folder])
    (warning,) = report_warnings(run, base)
    assert "have train.seed 0, 0" in warning
    _write_run(tmp_path / "other", "chain", [("tiny-XS", 8, 1e12, 60, 20.0)])
    with pytest.raises(ValueError, match="is not a seed of"):
        collect_runs([folder / "seed0" / "chain", tmp_path / "other"])
    with pytest.raises(FileNotFoundError, match="no run folders"):
        collect_runs([tmp_path / "seeds" / "seed0" / "chain" / "tiny-S"])
