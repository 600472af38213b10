"""The race's scraped noise (``benchmarks/harness/noise.py:make_scraped_noise``): what a web / code scraper
would keep, read from this machine's files, and ``--noise-kind`` in ``benchmarks/race.py``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

import torch  # noqa: E402

from benchmarks import corpus as C  # noqa: E402
from benchmarks import race  # noqa: E402
from benchmarks.harness import noise, race_data  # noqa: E402

N, SEQ = 12, 64


@pytest.fixture(scope="module")
def tok():
    """A tiny byte-level BPE trained on a few strings, built like the corpus's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not noise.scraped_sources():
        pytest.skip("no scraped-noise source files on this machine")
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[C.EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["def f(x):\n    return x + 1\n", "Copyright (c) 2024 The Authors. All rights reserved.",
                           '{"a": [1, 2, 3], "b": "text"}', "a,b,c\n1.5,2.25,-3\n"], trainer=trainer)
    return t


def _make(tok, cache_dir, seed=0):
    return noise.make_scraped_noise(tok, N, SEQ, seed=seed, cache_dir=cache_dir, tok_key="tiny", log=lambda *a: None)


def test_scraped_noise_rows_and_info(tmp_path, tok):
    rows, info = _make(tok, tmp_path)
    assert rows.shape == (N, SEQ + 1) and rows.dtype == torch.long
    assert 0 <= int(rows.min()) and int(rows.max()) < tok.get_vocab_size()
    assert not info["cached"] and info["sequences"] == N
    kinds = info["kinds"]
    assert kinds and set(kinds) <= set(noise.SCRAPED_KINDS)
    counts = [k["rows"] for k in kinds.values()]
    assert sum(counts) == N and max(counts) - min(counts) <= 1  # as even as possible
    assert any(k["rows"] > 0 and 0 < k["files_used"] <= k["files"] for k in kinds.values())
    assert all(len(set(r.tolist())) > 1 for r in rows)  # no constant row


def test_scraped_noise_is_seeded_and_cached(tmp_path, tok):
    rows, _ = _make(tok, tmp_path / "a")
    again, info = _make(tok, tmp_path / "a")
    assert info["cached"] and torch.equal(again, rows)
    assert len(list((tmp_path / "a").glob("scraped_*.pt"))) == 1
    fresh, info = _make(tok, tmp_path / "b")  # rebuilt, not read back
    assert not info["cached"] and torch.equal(fresh, rows)
    other, _ = _make(tok, tmp_path / "b", seed=1)
    assert not torch.equal(other, rows)


def test_race_noise_kind_option(tmp_path, tok):
    assert race.parse_args(["--preset", "ci"]).noise_kind == "unlearnable"
    args = race.parse_args(["--preset", "ci", "--noise-fraction", "0.25", "--noise-kind", "scraped",
                            "--cache-dir", str(tmp_path)])
    assert args.noise_kind == "scraped"
    with pytest.raises(SystemExit):
        race.parse_args(["--preset", "ci", "--noise-kind", "binary"])
    args.seq_len = SEQ
    train = torch.randint(0, 300, (36, SEQ + 1))
    mixed, info = race_data.mix_noise(args, SimpleNamespace(tokenizer=tok, tokenizer_key="tiny"), train,
                                 log=lambda *a: None)
    assert info["kind"] == "scraped" and info["noise_train_sequences"] == N and args.n_clean_train == 36
    assert mixed.shape == (36 + N, SEQ + 1) and torch.equal(mixed[:36], train)
