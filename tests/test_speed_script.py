"""The speed benchmark script runs end to end (tiny preset, CPU) and reports every mode.

It checks the script, not figures: one subprocess run of ``benchmarks/speed.py --preset tiny`` on the
CPU with a second router depth that the 2-layer model cannot have (``--router-layers 1 5``), so the
run must also show that a failing mode records its error while the others still run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "speed.py"
MODES = ("eager", "compiled", "random_subset", "router_only", "cggr_backend", "cggr_transform")
# Modes allowed to record an error instead of a time on the CPU with the tiny preset's defaults.
# None: on the CPU the compiled modes use Dynamo with the eager backend and the cggr backend runs its
# rewritten graph with eager ops, so every mode must produce a finite step time.
CPU_SKIPPED: frozenset[str] = frozenset()
TIMEOUT_S = 300  # the run takes well under 90 s on an idle 2-core machine; this only stops a hang


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny", "--device", "cpu", "--router-layers", "1", "5",
           "--out-dir", str(out), "--name", "test"]
    env = dict(os.environ)
    env.pop("OUT", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, f"speed.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    json_files = list(out.glob("speed_test_*.json"))
    assert len(json_files) == 1, f"expected one JSON in {out}: {sorted(p.name for p in out.iterdir())}"
    data = json.loads(json_files[0].read_text())
    return dict(data=data, out=out, stdout=proc.stdout, wall=wall, stem=json_files[0].stem)


def _records(data, router_layers):
    """Records that apply to a router depth (eager/compiled/random_subset do not depend on it)."""
    out = {}
    for r in data["records"]:
        if r["mode"] in ("eager", "compiled", "random_subset") or r.get("router_layers") == router_layers:
            out[r["mode"]] = r
    return out


def test_every_mode_has_a_finite_step_time(run):
    recs = _records(run["data"], 1)
    assert set(recs) == set(MODES), f"modes in the JSON: {sorted(recs)}"
    for mode in MODES:
        r = recs[mode]
        if mode in CPU_SKIPPED:
            assert r["status"] == "ok" or r.get("error"), f"{mode}: neither a time nor a recorded error"
            continue
        assert r["status"] == "ok", f"{mode}: {r.get('status')}: {r.get('error')}\n{r.get('traceback', '')}"
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0, (mode, r["median_ms"])
        assert len(r["step_ms"]) == run["data"]["meta"]["settings"]["steps"]
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["cold_compile_s"] > 0
        assert r["host_sync"] == {"syncs": None, "note": "n/a on cpu"}
        assert "compile_counts" in r
    # Every model is freed after its mode (no mode's peak memory carries an earlier model).
    for r in run["data"]["records"] + run["data"]["schedules"]:
        assert r.get("model_freed") is True, (r["mode"], r.get("router_layers"), r.get("model_freed"))


def test_cggr_modes_train_k_rows(run):
    recs = _records(run["data"], 1)
    k = math.ceil(0.25 * 8)
    for mode in ("random_subset", "router_only", "cggr_backend", "cggr_transform"):
        assert recs[mode]["k"] == k, (mode, recs[mode]["k"])
    for mode in ("cggr_backend", "cggr_transform"):
        assert recs[mode]["k_observed"] == k, (mode, recs[mode].get("k_observed"))
    assert recs["cggr_backend"]["routed_graph_compiles"] == 1
    assert recs["cggr_backend"]["selected_rows"] == k
    assert all(math.isfinite(recs[m]["last_loss"]) for m in ("eager", "compiled", "random_subset",
                                                             "cggr_backend", "cggr_transform"))


def test_a_failing_mode_records_its_error_and_the_rest_run(run):
    # router_layers=5 on a 2-layer model: the router cannot be built.
    bad = _records(run["data"], 5)
    for mode in ("router_only", "cggr_transform"):
        assert bad[mode]["status"] == "error", (mode, bad[mode]["status"])
        assert "router_layers" in bad[mode]["error"], bad[mode]["error"]
    # The backend warns and compiles the graph unmodified (SPEC.md); the script must not pass that
    # off as a CGGR time.
    assert bad["cggr_backend"]["status"] in ("not_routed", "error"), bad["cggr_backend"]
    # Modes after the failures still ran (the order is router 1 first, then router 5, then schedules).
    assert run["data"]["schedules"], "the schedule runs did not happen"


def test_schedule_compilations_are_counted(run):
    scheds = {s["mode"]: s for s in run["data"]["schedules"]}
    assert set(scheds) == {"cggr_backend", "cggr_transform"}
    # warmup_steps=2, B=8, ratio 0.25: ratio 1, 0.625, 0.25, 0.25, rounded up to the 8 levels
    # 0.25 + i * 0.75 / 7 (1, 0.679, 0.25, 0.25): k = ceil(level * 8) = 8, 6, 2, 2.
    expected_k = [8, 6, 2, 2]
    for mode, s in scheds.items():
        assert s["status"] == "ok", (mode, s.get("error"), s.get("traceback"))
        assert s["k_per_step"] == expected_k, (mode, s["k_per_step"])
        assert s["distinct_k"] == 3
        assert not s["recompile_limit_hit"]
    # One compilation per level, no more: the backend's routed graphs, the transform's Dynamo graphs.
    assert scheds["cggr_backend"]["routed_graph_compiles"] == 3
    assert scheds["cggr_transform"]["compile_counts"]["unique_graphs"] == 3


def test_metadata_predictions_and_tables(run):
    data, out, stem = run["data"], run["out"], run["stem"]
    meta = data["meta"]
    assert meta["argv"][-1] == "test" and "--preset" in meta["argv"]
    assert meta["versions"]["torch"] == __import__("torch").__version__
    assert "transformers" in meta["versions"]
    assert meta["settings"]["force_disable_caches"] in (True, "1")
    assert data["predictions"] and data["predictions"][0]["full"]["flops_total"] > \
        data["predictions"][0]["random_subset"]["flops_total"] > 0
    md_path = out / f"{stem}.md"
    assert md_path.exists()
    md = md_path.read_text()
    assert "| model | B×T | ratio | router | k | mode |" in md
    for mode in MODES:
        assert f"| {mode} |" in md, mode
    # The markdown table is printed last.
    assert run["stdout"].rstrip().endswith(md.rstrip().splitlines()[-1])
    assert "predicted work per step" in run["stdout"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / f"{stem}.png").exists()
    print(f"speed.py --preset tiny ran in {run['wall']:.1f} s")


def test_merge_writes_one_report(run):
    out = run["out"]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--merge", str(out / f"{run['stem']}.json"),
                           "--out-dir", str(out), "--name", "merged", "--no-png"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = list(out.glob("speed_merged_*.json"))
    assert len(merged) == 1
    data = json.loads(merged[0].read_text())
    assert len(data["records"]) == len(run["data"]["records"])
    assert (out / f"{merged[0].stem}.md").exists()


def test_benchmarks_say_what_to_run_without_the_installed_passes(monkeypatch):
    """No import workaround: without an importable cggr_compile.passes (a checkout not installed) or
    with the passes of another checkout, the benchmarks exit naming the install command."""
    sys.path.insert(0, str(REPO))
    import cggr_compile.passes

    from benchmarks import common

    assert common.require_cggr_compile() is sys.modules["cggr_compile"]
    assert "_PassesFinder" not in SCRIPT.read_text()
    monkeypatch.setitem(sys.modules, "cggr_compile.passes", None)  # what a checkout without install sees
    with pytest.raises(SystemExit, match=r"cannot import cggr_compile.passes.*pip install --no-deps -e \."):
        common.require_cggr_compile()
    other = type(cggr_compile.passes)("cggr_compile.passes")
    other.__file__ = "/elsewhere/passes/__init__.py"
    monkeypatch.setitem(sys.modules, "cggr_compile.passes", other)
    monkeypatch.setattr(sys.modules["cggr_compile"], "passes", other)
    with pytest.raises(SystemExit, match="another checkout's install"):
        common.require_cggr_compile()
