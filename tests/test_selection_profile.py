"""benchmarks/selection_profile.py: which rows each selection rule takes, by where they come from."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import corpus as C  # noqa: E402
from benchmarks import selection_profile as SP  # noqa: E402


def test_file_kinds_follow_the_scan_roots():
    assert SP.file_kind("stdlib/os.py") == "stdlib .py"
    assert SP.file_kind("purelib/torch/nn/functional.py") == "site-packages .py"
    assert SP.file_kind("purelib-docs/numpy/README.md") == "docs and other text"
    assert SP.file_kind("mycorpus/a.py") == ".py elsewhere"


def test_rows_take_the_kind_of_the_file_most_of_their_tokens_come_from(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(8):  # files much longer than a row, .py and text alternating, each line naming its file
        lines = [f"m{i}q_{j} {'=' if i % 2 else 'is'} {j}" for j in range(60 + 15 * i)]
        if i == 2:  # the separator token inside a file's text: counting separators would misplace files
            lines.insert(5, "<|endoftext|>")
        (src / (f"m{i}.py" if i % 2 else f"doc{i}.txt")).write_text("\n".join(lines))
    c = C.build_corpus(str(src), seq_len=32, vocab_size=300, max_bytes=None, cache_dir=tmp_path / "c",
                       log=lambda *a: None)
    train = c.splits["train"].sequences
    kinds = SP.row_kinds(c, train, train.shape[0], None)
    # independently: the file a row's text names most often
    files = {int(re.search(r"(\d+)", Path(f.path).stem).group(1)): f for f in c.splits["train"].files}
    want = []
    for row in train:
        named = Counter(int(m) for m in re.findall(r"m(\d+)q", c.tokenizer.decode(row.tolist())))
        want.append(SP.file_kind(files[named.most_common(1)[0][0]].key))
    agree = sum(k == w for k, w in zip(kinds, want)) / len(kinds)
    assert agree >= 0.95, agree  # rows across a file boundary may name the other file as often
    assert {"docs and other text", ".py elsewhere"} <= set(kinds)
    noise = {"token_shuffled": 2}
    kinds = SP.row_kinds(c, torch.cat([train, train[:3]]), train.shape[0], noise)
    assert kinds[-3:] == [SP.NOISE_SHUFFLED, SP.NOISE_SHUFFLED, SP.NOISE_BINARY]


def test_profile_counts_topk_importance_and_the_stream():
    kinds = ["a", "a", "b", "noise"]
    batches = [torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])]
    scores = [torch.tensor([1.0, 1.0, 2.0, 5.0]), torch.tensor([5.0, 2.0, 1.0, 1.0])]
    out = SP.profile(kinds, scores, batches, k=1, floor=0.5, seq_len=8)
    assert out["noise"]["topk_share"] == 1.0 and out["a"]["topk_share"] == 0.0  # the hardest row, each time
    assert out["a"]["stream_share"] == 0.5 and out["a"]["rows"] == 4
    # importance: p = 0.5 * s / sum(s) + 0.5 / 4 per row; k = 1 draws in expectation per batch
    assert out["noise"]["importance_share"] == pytest.approx(0.5 * 5 / 9 + 0.125, abs=1e-4)
    assert sum(r["importance_share"] for r in out.values()) == pytest.approx(1.0, abs=1e-3)
    full = [torch.tensor([2.0, 2.0, 3.0, 9.0])]  # the whole model's losses of the first batch's rows
    with_full = SP.profile(kinds, scores, batches, k=1, floor=0.5, seq_len=8, full=full)
    assert with_full["noise"]["mean_model_loss"] == 9.0 and with_full["a"]["mean_model_loss"] == 2.0
    agree = SP.score_agreement(scores, full, kinds, batches)
    assert agree["rows"] == 4 and agree["spearman_all"] == pytest.approx(1.0)
    assert out["b"]["mean_router_loss"] == pytest.approx(2.0) and out["a"]["mean_router_loss"] == pytest.approx(1.0)


def test_the_script_runs_and_writes_its_report(tmp_path):
    report = SP.main(["--preset", "tiny", "--batches", "2", "--model-loss-batches", "1", "--depths", "1", "--max-bytes", "300000", "--device", "cpu",
                      "--cache-dir", str(tmp_path / "c"), "--results-dir", str(tmp_path)])
    assert report["k"] >= 1 and report["kinds"] and report["router_vs_model_loss"]["rows"] == report["batch_size"]
    assert sum(r["topk_share"] for r in report["kinds"].values()) == pytest.approx(1.0)
    depths = report["router_depths_clean"]
    assert [r["layers"] for r in depths] == [1, 2, 4] and depths[-1]["whole_model"]  # tiny: 4 layers, router 2
    assert all(r["loss"] > 0 and 0 <= r["top1_is_next"] <= 1 and 0 < r["top5_tokens_share"] <= 1 for r in depths)
    assert list(tmp_path.glob("selection_profile_tiny-scratch_cpu.json"))


def test_row_agreement_ranks_clean_and_noise_rows_apart_per_batch_and_pooled():
    model_loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 9.0, 5.0, 6.0, 7.0, 8.0, 10.0])
    noise = torch.tensor([False] * 4 + [True] + [False] * 3 + [True, True])
    exact = model_loss * 2 + 1  # ranks like the model everywhere
    flipped = torch.where(noise, -model_loss, model_loss)  # right on clean rows, reversed on noise
    out = SP.row_agreement({"exact": exact, "flipped": flipped}, model_loss, noise, batch=5)
    assert (out["rows"], out["clean_rows"], out["noise_rows"], out["batches"]) == (10, 7, 3, 2)
    assert out["model_loss_clean_mean"] == pytest.approx(4.0)
    assert out["exact"]["spearman_clean"] == pytest.approx(1.0) and out["exact"]["spearman_clean_per_batch"] == [1.0, 1.0]
    assert out["flipped"]["spearman_clean"] == pytest.approx(1.0)
    assert out["flipped"]["spearman_noise"] == pytest.approx(-1.0) and out["exact"]["spearman_noise"] == pytest.approx(1.0)
    assert out["flipped"]["spearman_all"] < 1.0 and out["exact"]["spearman_all"] == pytest.approx(1.0)
    assert out["exact"]["mean_clean"] == pytest.approx(9.0)
    assert len(SP.row_agreement({"exact": exact}, model_loss, noise, batch=2)["exact"]["spearman_clean_per_batch"]) == 0
    clean_only = SP.row_agreement({"exact": exact}, model_loss, torch.zeros(10, dtype=torch.bool), batch=5)
    assert "spearman_noise" not in clean_only["exact"] and clean_only["noise_rows"] == 0
    assert SP.calibration(model_loss, model_loss) == {"r2": 1.0, "mean_error": 0.0}
    assert SP.calibration(model_loss + 1, model_loss)["mean_error"] == pytest.approx(1.0)


def test_the_agreement_mode_fine_tunes_through_the_exit_and_scores_rows_it_never_trained_on(tmp_path):
    steps, batch = 6, 4
    report = SP.main(["--preset", "tiny", "--finetune-steps", str(steps), "--heldout-batches", "2", "--batch-size",
                      str(batch), "--seq-len", "32", "--max-bytes", "300000", "--device", "cpu",
                      "--cache-dir", str(tmp_path / "c"), "--results-dir", str(tmp_path), "--tag", "t"])
    summary, agreement = report["summary"], report["agreement"]
    assert summary["steps"] == steps and len(report["finetune_steps"]) == steps
    # the library's default curriculum (warmup_steps=1000): k = B on every one of these steps
    assert report["library_defaults"]["warmup_steps"] == 1000 and summary["steps_at_k_equal_b"] == steps
    assert report["cggr_options"] == {"scoring": "predicted", "router_layers": 2}
    # the exit fits once per step and ranks once it has exit_min_fits (4) fits
    fits = [s["exit_fits"] for s in report["finetune_steps"]]
    assert fits == [float(i + 1) for i in range(steps)]
    assert summary["steps_exit_ready"] == steps - report["library_defaults"]["exit_min_fits"]
    assert summary["final_metrics"]["exit_ready"] == 1.0 and -1 <= summary["final_metrics"]["exit_rank_agreement"] <= 1
    assert summary["rows"] == summary["clean_rows"] == 2 * batch and summary["noise_rows"] == 0
    assert len(set(report["heldout_rows"])) == 2 * batch
    for name in ("exit", "head_router"):
        r = agreement[name]
        assert -1 <= r["spearman_clean"] <= 1 and len(r["spearman_clean_per_batch"]) == 2
    assert summary["exit_spearman_clean"] == agreement["exit"]["spearman_clean"]
    assert agreement["exit"]["calibration_clean"]["r2"] is not None
    assert report["versions"]["torch"] and "library_diff_sha256" in report["versions"]
    assert list(tmp_path.glob("selection_profile_t-scratch-exit-agreement_cpu.json"))
