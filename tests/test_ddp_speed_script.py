"""The data-parallel benchmark script runs end to end on the CPU (tiny preset, 2 gloo processes).

It checks the script, not figures: every mode of world 2 trains (the CGGR modes on k rows per rank,
read back from their metrics), and the report is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "ddp_speed.py"


def test_ddp_speed_tiny_runs_every_mode_on_two_processes(tmp_path):
    env = dict(os.environ)
    env.pop("OUT", None)
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny", "--device", "cpu", "--worlds", "2",
           "--bucket-view", "--out-dir", str(tmp_path), "--name", "test"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads((tmp_path / "ddp_test_cpu.json").read_text())
    records = {r["mode"]: r for r in data["records"]}
    assert set(records) == {"compiled", "cggr_transform", "cggr_backend"}
    for mode, r in records.items():
        assert r["status"] == "ok", (mode, r.get("error"), r.get("traceback"))
        assert r["median_ms_slowest_rank"] > 0 and r["world"] == 2
    assert records["cggr_transform"]["k_observed"] == records["cggr_backend"]["k_observed"] == 2  # ceil(0.25 * 8)
    md = (tmp_path / "ddp_test_cpu.md").read_text()
    assert "| cggr_backend | 2 |" in md and "(gradient_as_bucket_view)" in md

    # Runs side by side on other GPUs become one report: their records, both commands
    sys.path.insert(0, str(REPO))
    from benchmarks.ddp_speed import main

    (tmp_path / "ddp_other_cpu.json").write_text(json.dumps(dict(meta=dict(data["meta"], command="other"),
                                                                 records=data["records"][:1])))
    assert main(["--merge", str(tmp_path / "ddp_test_cpu.json"), str(tmp_path / "ddp_other_cpu.json"),
                 "--name", "both", "--out-dir", str(tmp_path)]) == 0
    both = json.loads((tmp_path / "ddp_both_cpu.json").read_text())
    assert len(both["records"]) == len(data["records"]) + 1 and both["meta"]["command"].endswith(" ; other")
    assert (tmp_path / "ddp_both_cpu.md").read_text().count("| compiled | 2 |") == 2
