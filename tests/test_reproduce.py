"""Smoke test of the benchmark machinery (benchmarks/reproduce.py) on the debug family: a few seconds.

The --quick mode and the full run are not part of the suite (minutes to an hour); this runs every
phase -- baseline sweep, link-length sweep, seeds, ablations, report -- with a handful of steps.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from compt.families import get_family

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import reproduce  # noqa: E402
from reproduce_lib import METRIC, Protocol, metric_value, replace_proto, restore_runs  # noqa: E402

DEBUG = dict(
    family="debug",
    members=("debug-S", "debug-L"),
    three=(),
    prepend="",
    seeds=(0, 1),
    baseline_steps=(2, 4),
    reference_steps=2,  # the baseline of comparisons; 4 is its doubling (the convergence check)
    link_fractions=(0.5, 1.0),
    alphas=(0.0,),
    ablations=True,  # off in the benchmark's defaults (budget); the machinery stays tested
    batch=8,
    num_samples=64,
    eval_images=8,
    eval_retrieval=8,
    val_images=16,
    val_batch=8,
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    proto = replace_proto(Protocol(), **DEBUG)
    res = reproduce.run(proto, out, workers=1, log=lambda *a: None)
    reproduce_report_path = __import__("reproduce_report").write_report(res, out)
    return res, out, reproduce_report_path


def test_every_phase_ran_with_the_engine(results):
    res, out, _ = results
    runs = res["runs"]
    # baselines: seed 0 at both lengths, seed 1 at the reference (2 steps) only
    assert {"base_debug-S_2_s0", "base_debug-S_4_s0", "base_debug-S_2_s1", "base_debug-L_2_s1"} <= set(runs)
    assert "base_debug-L_4_s1" not in runs
    for key, run in runs.items():
        assert (out / "runs" / key / "final.pt").is_file()  # the engine wrote it
        assert run["train_macs"] > 0 and run["metrics"][METRIC] > 0 and "mean_zeroshot_top1" in run["metrics"]
    # a link trains fraction x the member's reference schedule and costs its teacher's forward too
    link = runs["chain-debug-S_f1_a500_debug-L_s0"]
    base = runs["base_debug-L_2_s0"]
    assert link["steps"] == 2 and link["job"]["teacher"] == "base_debug-S_2_s0"
    assert link["train_macs"] > base["train_macs"]


def test_tables_are_consistent(results):
    res, _, _ = results
    assert res["metric"] == METRIC and not res["higher_is_better"]  # a loss: lower is better
    b = res["baselines"]["debug-L"]
    assert len(b["per_seed"]) == 2 and b["tolerance"] >= Protocol().loss_tolerance
    # convergence (criterion 2): what doubling 2 -> 4 steps bought at seed 0, positive when the loss fell
    assert b["doubling_gain"] == pytest.approx(b["sweep"][2] - b["sweep"][4])
    assert b["converged"] == (abs(b["doubling_gain"]) < b["tolerance"])
    fam = res["family"][0]  # criterion 1: the smaller member's loss minus the larger one's
    small = res["baselines"]["debug-S"]
    assert fam["gap"] == pytest.approx(small["mean"] - b["mean"])
    assert fam["separated"] == (fam["gap"] > 0 and fam["gap"] >= 3 * max(small["std"], b["std"]))
    rows = res["main"]["rows"]
    assert rows[0]["first"] and rows[0]["accumulated_macs_x"] == pytest.approx(1.0)
    last = rows[-1]
    assert last["gap"] == pytest.approx(last["chain_mean"] - b["mean"])  # positive: the chain is worse
    assert last["lossless"] == (last["gap"] <= last["tolerance"])
    assert set(res["informative"]) == {
        "zeroshot/shape/top1",
        "zeroshot/colour/top1",
        "zeroshot/count/top1",
        "zeroshot/binding/top1",
    }
    assert res["chance"]["zeroshot/colour/top1"] == pytest.approx(100 / len(Protocol().spec.colours))
    assert math.isclose(res["main"]["summary"]["worst_gap"], last["gap"])
    assert res["chosen_fraction"] in (0.5, 1.0)
    tags = {(v["tag"], str(v["alpha"])) for v in res["ablations"]}
    assert ("chain", "0.0") in tags and ("from-smallest", "500.0") in tags


def test_report_and_rerun_resumes(results, tmp_path):
    res, out, md = results
    text = md.read_text()
    assert "Headline" in text and "Table 4a" in text and "baselines.png" in text
    for png in ("baselines.png", "link_sweep.png", "headline.png", "ablations.png"):
        assert (out / png).stat().st_size > 1000
    json.dumps(res, default=str)  # serializable
    again = reproduce.run(replace_proto(Protocol(), **DEBUG), out, workers=1, log=lambda *a: None)
    assert again["runs"] == json.loads(json.dumps(res["runs"]))  # every run read back, none retrained
    # Finished runs of another setup are never mixed in: a changed lr into the same folder is an error.
    with pytest.raises(RuntimeError, match=r"another protocol \(lr differ"):
        reproduce.run(replace_proto(Protocol(), **DEBUG, lr=1e-3), out, workers=1, log=lambda *a: None)


def test_quick_line_names_metric_baselines_and_direction(results):
    res, _, _ = results
    line = reproduce.summary_line(res, "quick")
    b = [res["baselines"][m]["mean"] for m in ("debug-S", "debug-L")]
    s = res["main"]["summary"]
    assert line == (
        f"quick: metric={METRIC} baselines={b[0]:.3f}/{b[1]:.3f} acceleration={s['accumulated_macs_x']:.2f}x "
        f"worst_gap={s['worst_gap']:.3f} lossless={'yes' if s['lossless'] else 'no'}"
    )


def test_the_benchmark_family_fits_every_caption_and_the_grid():
    """The bench family's 20-token context holds every caption of BENCH_SPEC (none truncated), and
    its 8 px patches on 32 px images are the 4 x 4 grid the objects are centred on."""
    from open_clip.tokenizer import SimpleTokenizer

    from compt.paradigms.clip.data.scene_captions import all_captions
    from compt.paradigms.clip.data.synthetic import sample_scene, scene_rng

    proto, tok = Protocol(), SimpleTokenizer()
    members = get_family(proto.family).members
    longest = max(
        len(tok.encode(c)) + 2  # start and end tokens
        for i in range(300)
        for c in (lambda p, subs: [p, *subs])(*all_captions(sample_scene(scene_rng(0, 0, i), proto.spec)))
    )
    for m in members:
        assert longest <= m.context_length, (m.name, longest)
        assert m.image_size // m.model_cfg["vision_cfg"]["patch_size"] == proto.spec.grid


def test_unknown_protocol_field_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown protocol field 'bogus'"):
        reproduce.main(["--set", "bogus=1"])


def test_rescoring_with_a_derived_metric_reuses_the_runs(results, tmp_path):
    res, out, _ = results
    proto = replace_proto(Protocol(), **DEBUG, metric="mean_retrieval_r10")
    again = reproduce.run(proto, out, workers=1, log=lambda *a: None, report_dir=tmp_path)
    assert again["metric"] == "mean_retrieval_r10" and (tmp_path / "results.json").is_file()
    run = again["runs"]["base_debug-L_4_s0"]["metrics"]
    expected = (run["retrieval/synthetic/i2t_r10"] + run["retrieval/synthetic/t2i_r10"]) / 2
    assert again["baselines"]["debug-L"]["sweep"][4] == pytest.approx(expected)
    assert again["higher_is_better"] and again["base_tolerance"] == Protocol().tolerance
    last = again["main"]["rows"][-1]  # a percentage: the gap is baseline minus chain
    assert last["gap"] == pytest.approx(again["baselines"]["debug-L"]["mean"] - last["chain_mean"])
    with pytest.raises(KeyError, match="neither in the run's metrics"):
        metric_value(run, "bogus")


def test_restored_runs_are_reused_and_a_changed_member_retrains_only_what_depends_on_it(results, tmp_path):
    """A new checkout has results.json but no runs/: --restore brings the records back; after a change
    of the smallest member, the other member's baselines stay, its chain links are retrained."""
    res, _, _ = results
    committed = tmp_path / "results.json"
    committed.write_text(json.dumps({"runs": res["runs"]}))
    proto = replace_proto(Protocol(), **DEBUG)
    out = tmp_path / "new"
    assert restore_runs(committed, out, proto) == (len(res["runs"]), 0)
    again = reproduce.run(proto, out, workers=1, log=lambda *a: None)
    assert again["runs"] == json.loads(json.dumps(res["runs"]))  # nothing retrained

    members = [{"name": m.name, **m.model_cfg} for m in get_family("debug").members]
    members[0]["text_cfg"] = {**members[0]["text_cfg"], "mlp_ratio": 2.0}  # another debug-S
    family = tmp_path / "family.yaml"
    family.write_text(yaml.safe_dump({"name": "debug2", "members": members}))
    changed = replace_proto(proto, family=str(family))
    out2 = tmp_path / "changed"
    kept, skipped = restore_runs(committed, out2, changed)
    kept_keys = {p.parent.name for p in (out2 / "runs").glob("*/result.json")}
    assert kept_keys == {k for k in res["runs"] if k.startswith("base_debug-L")}
    assert (kept, skipped) == (len(kept_keys), len(res["runs"]) - len(kept_keys))
    rerun = reproduce.run(changed, out2, workers=1, log=lambda *a: None)
    for key, record in rerun["runs"].items():
        reused = record == json.loads(json.dumps(res["runs"][key]))
        assert reused == (key in kept_keys), key  # debug-L baselines reused; debug-S and every link new


def test_a_restored_run_cannot_teach_and_says_what_to_do(results, tmp_path):
    res, _, _ = results
    baselines = {k: v for k, v in res["runs"].items() if k.startswith("base_")}
    committed = tmp_path / "results.json"
    committed.write_text(json.dumps({"runs": baselines}))
    proto = replace_proto(Protocol(), **DEBUG)
    restore_runs(committed, tmp_path / "out", proto)
    with pytest.raises(FileNotFoundError, match=r"has a result but no weights.*delete its folder"):
        reproduce.run(proto, tmp_path / "out", workers=1, log=lambda *a: None)


_POOL_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, {bench!r})
from reproduce_lib import Job, Protocol, run_jobs

OUT = Path({out!r})

def slow(proto, job, out):
    # what the engine does in a worker: SIGTERM is recorded, the run saves and stops (exit 143)
    def saved(signum, frame):
        (OUT / f"{{job.key}}.saved").write_text(str(os.getpid()))
        raise SystemExit(143)
    signal.signal(signal.SIGTERM, saved)
    (OUT / f"{{job.key}}.tmp").write_text(str(os.getpid()))
    os.replace(OUT / f"{{job.key}}.tmp", OUT / f"{{job.key}}.pid")  # whole, for the test to read
    time.sleep(120)
    return {{"wall_s": 0.0}}

if __name__ == "__main__":
    jobs = [Job(f"j{{i}}", "debug-S", 1, 0) for i in range(3)]
    run_jobs(Protocol(), jobs, str(OUT), workers=2, runner=slow)
"""


def test_sigterm_to_a_pool_stops_its_workers_after_they_save(tmp_path):
    """A scheduler's SIGTERM to the benchmark's parent reaches the jobs it runs, which save their step
    checkpoint and stop, and no worker outlives the parent (before: two orphans kept running)."""
    import os
    import signal
    import subprocess
    import time

    script = tmp_path / "pool.py"
    script.write_text(_POOL_SCRIPT.format(bench=str(BENCH), out=str(tmp_path)))
    env = dict(os.environ, PYTHONPATH=str(BENCH.parent / "src"))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    if len(pids) < 2:
        proc.kill()
        pytest.fail(f"the two workers did not start: {proc.communicate()[1]}")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert sorted(int(p.read_text()) for p in tmp_path.glob("*.saved")) == sorted(pids)
    assert not list(tmp_path.glob("j2.*")), "a job was started after the stop"
    time.sleep(0.5)
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert not alive, f"workers {alive} outlived the stopped pool"


def test_the_deep_family_grows_width_then_depth_then_width():
    """benchmarks/bench_deep_family.yaml: its bench-XS and bench-S are the one-block family's (their
    runs are reused), each neighbour costs 3-4x the training MACs (§3.1.2), and the chain's two new
    links grow as the YAML says: bench-S -> S4 duplicates the one block (depth), S4 -> M4 inserts
    the teacher into a wider model (width), every teacher tensor inherited."""
    import torch

    from compt.cost import member_cost
    from compt.families import create, load_family_yaml
    from compt.grow import grow

    deep = load_family_yaml(BENCH / "bench_deep_family.yaml")
    one_block = {m.name: m.model_cfg for m in get_family(Protocol().family).members}
    assert [m.name for m in deep.members] == ["bench-XS", "bench-S", "bench-S4", "bench-M4"]
    for m in deep.members[:2]:
        assert m.model_cfg == one_block[m.name]
    macs = [member_cost(m, num_captions=4).train_macs for m in deep.members]
    assert all(3.0 < b / a < 4.0 for a, b in zip(macs, macs[1:], strict=False)), macs

    torch.manual_seed(0)
    s, s4, m4 = (create(m) for m in deep.members[1:])
    report = grow(s, s4)
    assert report.depth_maps and all(set(v) == {0} for v in report.depth_maps.values()), report.depth_maps
    block = s.visual.transformer.resblocks[0].state_dict()
    for grown in s4.visual.transformer.resblocks:
        assert all(torch.equal(grown.state_dict()[k], v) for k, v in block.items())
    report = grow(s4, m4)
    assert report.summary()["fresh"] == 0 and report.summary()["params_inherited"] == sum(
        p.numel() for p in s4.parameters()
    )


def test_a_doubling_inside_the_lossless_tolerance_is_converged():
    """Criterion 2 of issue 12: converged when doubling moves the metric by less than the lossless
    tolerance, max(0.02 nats, 2 x the reference's seed std), the rule a chain is judged by. A member
    whose seeds spread by 0.1 nats cannot be told from its doubling by a 0.05-nat change."""
    proto = replace_proto(
        Protocol(), members=("a", "b"), seeds=(0, 1, 2), baseline_steps=(8, 16), reference_steps=8
    )

    def record(loss: float) -> dict:
        return {"metrics": {METRIC: loss}, "train_macs": 1, "wall_s": 1.0}

    runs = {}
    for member, losses, doubled in (("a", (3.0, 3.1, 3.2), 2.95), ("b", (2.0, 2.001, 2.002), 1.95)):
        for seed, loss in enumerate(losses):
            runs[f"base_{member}_8_s{seed}"] = record(loss)
        runs[f"base_{member}_16_s0"] = record(doubled)
    table = reproduce.baseline_table(proto, runs)
    noisy, quiet = table["a"], table["b"]
    assert noisy["tolerance"] == pytest.approx(0.2) and noisy["doubling_gain"] == pytest.approx(0.05)
    assert noisy["converged"]  # 0.05 < 2 x its 0.1 seed std
    assert quiet["tolerance"] == pytest.approx(0.02) and not quiet["converged"]  # 0.05 > 0.02
