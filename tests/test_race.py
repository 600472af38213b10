"""The training race (benchmarks/race.py) end to end on the `ci` preset, and its corpus split."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

from benchmarks import corpus as C  # noqa: E402
from benchmarks import race  # noqa: E402


def _have_cggr() -> bool:
    try:
        import cggr_compile

        return callable(getattr(cggr_compile, "transform", None))
    except ImportError:
        return False


def _write_toy_corpus(root: Path, n_files: int = 40) -> None:
    """Learnable text: Python-like lines drawn from a small grammar, one seed per file."""
    names = ["alpha", "beta", "gamma", "delta", "value", "index", "count", "total", "item", "result"]
    ops = ["+", "-", "*", "//"]
    for i in range(n_files):
        rnd = random.Random(i)
        lines = [f"# module {i}", "import os", ""]
        for j in range(rnd.randint(30, 60)):
            a, b = rnd.choice(names), rnd.choice(names)
            kind = rnd.random()
            if kind < 0.4:
                lines.append(f"def {a}_{j}({b}):\n    return {b} {rnd.choice(ops)} {rnd.randint(0, 9)}\n")
            elif kind < 0.7:
                lines.append(f"{a} = {b} {rnd.choice(ops)} {rnd.randint(0, 99)}")
            else:
                lines.append(f"for {a} in range({rnd.randint(1, 9)}):\n    print({a}, {b})")
        sub = root / ("pkg%d" % (i % 4))
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i}.py").write_text("\n".join(lines) + "\n")
    (root / "binary.bin").write_bytes(b"\x00\x01\x02garbage")  # not text: skipped
    (root / "bad_utf8.txt").write_bytes(b"caf\xe9\n")  # not UTF-8: skipped


def _check_report(rep: dict, modes: list[str]) -> None:
    assert set(rep["modes"]) == set(modes)
    for m in modes:
        r = rep["modes"][m]
        assert r["steps"] > r["warmup_steps"]
        assert len(r["curve"]) >= 2
        for c in r["curve"]:
            assert math.isfinite(c["heldout_loss"]), (m, c)
        assert math.isfinite(r["final_heldout_loss"]) and math.isfinite(r["best_heldout_loss"])
        assert r["best_heldout_loss"] <= r["final_heldout_loss"]
        assert r["tokens_seen"] == r["steps"] * rep["args"]["batch_size"] * rep["args"]["seq_len"]
        assert r["tokens_trained"] == r["steps"] * r["k"] * rep["args"]["seq_len"]
        # every mode starts from the same weights: the same loss at t = 0
        assert r["curve"][0]["heldout_loss"] == pytest.approx(rep["initial_heldout_loss"])
        if m.startswith("cggr-"):
            assert r["spearman"] is not None and -1.0 <= r["spearman"] <= 1.0
        if m != "full":
            assert r["k"] == race.subset_k(rep["args"]["ratio"], rep["args"]["batch_size"])
    full = rep["modes"]["full"]
    assert full["final_heldout_loss"] < rep["initial_heldout_loss"] - 0.3, full["curve"]
    assert Path(rep["json_path"]).exists() and Path(rep["png_path"]).stat().st_size > 1000
    on_disk = json.loads(Path(rep["json_path"]).read_text())
    assert set(on_disk["modes"]) == set(modes) and on_disk["preset"] == "ci"
    assert on_disk["command"].startswith("python ") and "torch" in on_disk


def test_race_ci_toy_corpus(tmp_path):
    src = tmp_path / "toy"
    _write_toy_corpus(src)
    modes = ["full", "random"] + (["cggr-loss", "cggr-loss-importance"] if _have_cggr() else [])
    rep = race.main(["--preset", "ci", "--corpus", str(src), "--modes", ",".join(modes),
                     "--max-bytes", "0", "--cache-dir", str(tmp_path / "cache"),
                     "--results-dir", str(tmp_path / "res"), "--no-progress", "--device", "cpu"])
    _check_report(rep, modes)
    splits = rep["corpus"]["splits"]
    assert splits["train"]["files"] + splits["heldout"]["files"] == 40  # the two non-text files skipped
    assert "2 not UTF-8 text" in rep["corpus"]["scan"]
    total = splits["train"]["bytes"] + splits["heldout"]["bytes"]
    assert 0.05 * total <= splits["heldout"]["bytes"] < 0.5 * total
    assert Path(rep["json_path"]).name == "race_ci_cpu.json"
    assert not list((tmp_path / "res").glob("*.partial.json"))  # written after each mode, removed at the end
    if _have_cggr():
        assert rep["modes"]["cggr-loss-importance"]["cggr_metrics"]["selection"] == "importance"


def test_race_ci_stdlib_cli(tmp_path):
    """The command line, in a subprocess, on a small slice of the real standard library."""
    modes = ["full", "random"] + (["cggr-entropy"] if _have_cggr() else [])
    cmd = [sys.executable, str(REPO / "benchmarks" / "race.py"), "--preset", "ci", "--modes", ",".join(modes),
           "--max-bytes", "250000", "--cache-dir", str(tmp_path / "cache"),
           "--results-dir", str(tmp_path / "res"), "--no-progress", "--device", "cpu", "--tag", "ci"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| mode | lr | steps |" in proc.stdout
    for split in ("train", "heldout"):
        assert f"  {split}" in proc.stdout  # files / bytes / tokens printed at start
    (json_path,) = (tmp_path / "res").glob("race_ci_*.json")
    rep = json.loads(json_path.read_text())
    rep["json_path"], rep["png_path"] = str(json_path), str(json_path.with_suffix(".png"))
    _check_report(rep, modes)
    assert rep["corpus"]["source"] == "stdlib"


def test_split_is_deterministic_and_file_disjoint(tmp_path):
    scan = C.scan_files("stdlib")
    assert all("site-packages" not in f.path for f in scan.files)
    assert len({f.key for f in scan.files}) == len(scan.files)
    files = C.cap_bytes(C.shuffled(scan.files, 0), 2_000_000)
    assert 0 < sum(f.size for f in files) <= 2_000_000
    train, held = C.split_files(files, 0.05, seed=0)
    reordered = list(files)
    random.Random(123).shuffle(reordered)
    train2, held2 = C.split_files(reordered, 0.05, seed=0)  # input order does not matter
    assert [f.key for f in train] == [f.key for f in train2]
    assert [f.key for f in held] == [f.key for f in held2]
    assert {f.path for f in train}.isdisjoint({f.path for f in held})
    assert len(train) + len(held) == len(files)
    total = sum(f.size for f in files)
    held_bytes = sum(f.size for f in held)
    assert held_bytes >= 0.05 * total and held_bytes - held[-1].size < 0.05 * total  # shortest prefix
    _, held3 = C.split_files(files, 0.05, seed=1)
    assert {f.key for f in held3} != {f.key for f in held}  # the seed matters
    # a second scan gives the same list (and so the same cache keys)
    assert C.files_hash(C.scan_files("stdlib").files) == C.files_hash(scan.files)


def test_finetune_partition_is_disjoint():
    files = C.cap_bytes(C.shuffled(C.scan_files("stdlib").files, 0), 3_000_000)
    base, race_part, base_pk, race_pk = C.partition_by_package(files)
    assert base and race_part and set(base_pk).isdisjoint(race_pk)
    assert {f.package for f in base} == set(base_pk) and {f.package for f in race_part} == set(race_pk)
    assert max(base_pk) < min(race_pk)  # one cut of the sorted names
    total = sum(f.size for f in files)
    assert 0.2 * total < sum(f.size for f in base) < 0.8 * total
    base2, race2, _, race_pk2 = C.partition_by_package(files, ["test", "stdlib:json"])
    assert set(race_pk2) == {"stdlib:test", "stdlib:json"} & {f.package for f in files}
    assert {f.key for f in base2}.isdisjoint({f.key for f in race2}) and len(base2) + len(race2) == len(files)


def test_packing_and_tokenizer(tmp_path):
    src = tmp_path / "toy"
    _write_toy_corpus(src, n_files=12)
    c = C.build_corpus(str(src), seq_len=32, vocab_size=300, max_bytes=None, cache_dir=tmp_path / "c",
                       log=lambda *a: None)
    tok = c.tokenizer
    eot = tok.token_to_id(C.EOT)
    assert eot == 0 and c.vocab_size <= 300
    for s in c.splits.values():
        assert s.sequences.shape[1] == 33 and s.sequences.shape[0] == s.tokens // 33
        assert int(s.sequences.max()) < c.vocab_size
    text = (src / "pkg0" / "mod0.py").read_text()
    assert tok.decode(tok.encode(text).ids) == text  # byte-level round trip
    # cached: a second build trains nothing and gives the same tensors
    c2 = C.build_corpus(str(src), seq_len=32, vocab_size=300, max_bytes=None, cache_dir=tmp_path / "c",
                        log=lambda *a: None)
    assert not c2.tokenizer_trained and c.tokenizer_key == c2.tokenizer_key
    assert (c2.splits["train"].sequences == c.splits["train"].sequences).all()


def test_spearman():
    assert race.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert race.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert list(race.rankdata([3.0, 1.0, 3.0, 2.0])) == [2.5, 0.0, 2.5, 1.0]
    # textbook example with ties: Pearson correlation of the average ranks
    a, b = [1, 2, 2, 3, 4], [2, 1, 3, 3, 5]
    ra, rb = race.rankdata(a), race.rankdata(b)
    ma, mb = sum(ra) / 5, sum(rb) / 5
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    assert race.spearman(a, b) == pytest.approx(num / den)
    assert math.isnan(race.spearman([1, 1, 1], [1, 2, 3]))


def test_race_ci_finetune_regime(tmp_path):
    src = tmp_path / "toy"
    _write_toy_corpus(src)
    cache = tmp_path / "cache"
    argv = ["--preset", "ci", "--regime", "finetune", "--corpus", str(src), "--modes", "full,random",
            "--max-bytes", "0", "--cache-dir", str(cache), "--results-dir", str(tmp_path / "res"),
            "--no-progress", "--device", "cpu", "--budget-seconds", "2", "--base-budget-seconds", "3"]
    rep = race.main(argv)
    assert Path(rep["json_path"]).name == "race_ci-finetune_cpu.json"
    c = rep["corpus"]
    assert c["base_packages"] and c["race_packages"] and set(c["base_packages"]).isdisjoint(c["race_packages"])
    assert c["splits"]["base"]["files"] + c["splits"]["train"]["files"] + c["splits"]["heldout"]["files"] == 40
    base = rep["base"]
    assert base["steps"] > 0 and not base["cached"]
    assert len(list(cache.glob("base_*.pt"))) == 1
    # the race starts from the trained base model, far below a random init's ln(vocab)
    assert rep["initial_heldout_loss"] < math.log(rep["corpus"]["vocab_size"]) - 1.0
    for m in ("full", "random"):
        assert math.isfinite(rep["modes"][m]["final_heldout_loss"])


def test_race_ci_finetune_mixed_regime(tmp_path):
    """finetune-mixed: base trained on A's train files; race stream = B's train + replayed A; held-out
    loss on B (new) and A (replay, held-out files of A) separately; cggr-excess runs (frozen reference)."""
    src = tmp_path / "toy"
    _write_toy_corpus(src)
    modes = ["full", "random"] + (["cggr-loss", "cggr-excess"] if _have_cggr() else [])
    argv = ["--preset", "ci", "--regime", "finetune-mixed", "--corpus", str(src), "--modes", ",".join(modes),
            "--max-bytes", "0", "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "res"),
            "--no-progress", "--device", "cpu", "--budget-seconds", "2", "--base-budget-seconds", "3",
            "--replay-fraction", "0.5"]
    rep = race.main(argv)
    assert Path(rep["json_path"]).name == "race_ci-finetune-mixed_cpu.json"
    c = rep["corpus"]["splits"]
    assert c["base"]["files"] + c["heldout_base"]["files"] + c["train"]["files"] + c["heldout"]["files"] == 40
    mix = rep["mix"]
    assert mix["replay_train_sequences"] > 0 and mix["new_train_sequences"] == c["train"]["sequences"]
    assert 0.3 <= mix["replay_share"] <= 0.5 + 1e-9
    assert mix["eval_new"] > 0 and mix["eval_replay"] > 0
    init = rep["initial_heldout"]
    assert init["heldout_loss"] == pytest.approx((init["heldout_new"] + init["heldout_replay"]) / 2)
    # the base model learned A: its held-out A loss is below its loss on the new domain B
    assert init["heldout_replay"] < init["heldout_new"]
    for m in modes:
        r = rep["modes"][m]
        assert r["final_heldout_loss"] == pytest.approx((r["final_heldout_new"] + r["final_heldout_replay"]) / 2)
        assert 0.0 <= r["replay_share_trained"] <= 1.0
        for cpt in r["curve"]:
            assert math.isfinite(cpt["heldout_new"]) and math.isfinite(cpt["heldout_replay"])
        if m.startswith("cggr-"):
            assert r["spearman"] is not None
    assert "final new (B)" in rep["summary_table"]
    # the full batch trains on every row of the stream: about the stream's replay share
    assert abs(rep["modes"]["full"]["replay_share_trained"] - mix["replay_share"]) < 0.25


def test_excess_loss_router_is_zero_against_its_own_snapshot():
    """cggr-excess: the live router minus a frozen snapshot is 0 at the start, and moves once the
    live weights change (the snapshot does not)."""
    pytest.importorskip("transformers")
    if not _have_cggr():
        pytest.skip("cggr_compile not importable")
    args = race.parse_args(["--preset", "ci"])
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model, _ = race.build_model(args, 64)
    router = race.excess_loss_router(model, 1)
    x = torch.randint(0, 64, (3, 9))
    d0 = router(x)
    assert d0.shape == (3, 9) and torch.allclose(d0, torch.zeros_like(d0), atol=1e-5)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    d1 = router(x)
    assert d1.abs().max() > 1e-3 and not any(p.requires_grad for p in router.reference_model.parameters())
