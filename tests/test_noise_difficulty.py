"""``benchmarks/noise_difficulty.py``: the losses of each kind of row of the noisy stream as the model
trains (the evidence for when loss truncation can find the noise), on the ci preset."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("tokenizers")

from benchmarks import noise_difficulty  # noqa: E402
from test_race import _standin_model, _write_toy_corpus  # noqa: E402


def test_measures_every_kind_at_each_checkpoint(tmp_path):
    rep = noise_difficulty.main(["--preset", "ci", "--steps", "4", "--every", "2", "--sample", "8",
                                 "--max-bytes", "120000", "--cache-dir", str(tmp_path / "cache"),
                                 "--results-dir", str(tmp_path / "res"), "--device", "cpu"])
    assert [r["step"] for r in rep["rows"]] == [0, 2, 4]
    assert rep["samples"] == {"clean": 8, "token_shuffled": 4, "dumps": 4}
    for r in rep["rows"]:
        for key in ("clean", "clean_q75", "clean_q95", "token_shuffled", "dumps"):
            assert math.isfinite(r[key]) and r[key] > 0, (r, key)
        assert r["clean_q75"] <= r["clean_q95"]
    # the model trains: clean rows' loss falls from the first checkpoint to the last
    assert rep["rows"][-1]["clean"] < rep["rows"][0]["clean"]
    (path,) = (tmp_path / "res").glob("noise_difficulty_*.json")
    assert json.loads(path.read_text())["command"].startswith("python benchmarks/noise_difficulty.py")


def test_a_cggr_mode_reports_its_routers_scores_of_each_kind(tmp_path):
    rep = noise_difficulty.main(["--preset", "ci", "--mode", "default", "--steps", "2", "--every", "2",
                                 "--sample", "8", "--max-bytes", "120000", "--cache-dir", str(tmp_path / "cache"),
                                 "--results-dir", str(tmp_path / "res"), "--device", "cpu"])
    assert rep["mode"] == "cggr-predicted-truncation"
    for r in rep["rows"]:
        assert set(r["router"]) == {"clean", "token_shuffled", "dumps", "clean_q95"}
        assert all(math.isfinite(v) for v in r["router"].values()), r
    assert "router" not in noise_difficulty.main(["--preset", "ci", "--steps", "0", "--every", "1", "--sample", "8",
                                                  "--max-bytes", "120000", "--cache-dir", str(tmp_path / "cache"),
                                                  "--results-dir", str(tmp_path / "res"),
                                                  "--device", "cpu"])["rows"][0]


def test_a_pretrained_model_from_a_folder(tmp_path):
    """The pretrained regimes load the model and its tokenizer (here a stand-in folder, as in the race's test)."""
    src = tmp_path / "toy"
    _write_toy_corpus(src)
    folder = _standin_model(tmp_path, src)
    rep = noise_difficulty.main(["--preset", "ci", "--regime", "pretrained-noisy", "--model", str(folder),
                                 "--corpus", str(src), "--max-bytes", "0", "--mode", "default", "--steps", "2",
                                 "--every", "2", "--sample", "8", "--cache-dir", str(tmp_path / "cache"),
                                 "--results-dir", str(tmp_path / "res"), "--device", "cpu"])
    assert rep["regime"] == "pretrained-noisy" and len(rep["rows"]) == 2 and "router" in rep["rows"][-1]


def test_without_noise_it_says_what_to_give():
    with pytest.raises(SystemExit, match="--noise-fraction > 0"):
        noise_difficulty.main(["--preset", "ci", "--noise-fraction", "0"])
