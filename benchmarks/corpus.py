"""The race's corpus: files on this machine, a byte-level BPE tokenizer, packed causal-LM sequences.

Nothing is downloaded. What is read, exactly:

* Default source (``source="stdlib"``): every ``*.py`` file under the standard library directory of the
  interpreter that runs the race, ``sysconfig.get_paths()["stdlib"]``, walked recursively with
  ``site-packages`` and ``dist-packages`` folders pruned.
* ``--include-site-packages`` (``source="stdlib+site"``): the same, plus every ``*.py`` file under the
  interpreter's ``purelib`` and ``platlib`` directories (its installed packages), each directory read
  once.
* ``stdlib+site+docs`` (the ``smollm2-135m`` preset's): the same ``*.py`` files, plus installed
  documentation: the ``.md``, ``.rst`` and ``.txt`` files under ``purelib`` / ``platlib`` (READMEs and
  docs shipped inside packages; ``RECORD``, ``SOURCES.txt``, ``top_level.txt``, ``entry_points.txt``
  skipped) and under ``/usr/share/doc`` (uncompressed ones: ``.gz`` is not text).
* ``--corpus PATH`` (``source=PATH``): a folder, walked recursively, every *text* file in it; or a text
  file that lists one path per line (blank lines and lines starting with ``#`` skipped; relative
  paths are taken relative to the list's folder; a listed folder is walked like ``--corpus FOLDER``).
  A file is *text* when its bytes decode as UTF-8 and contain no NUL byte. Hidden folders and files
  (names starting with ``.``) and ``__pycache__`` are skipped.

Every file must decode as strict UTF-8 (files that do not are skipped and counted), be non-empty and
be at most ``max_file_bytes`` long (default 1 MB; larger ones are skipped and counted). Symlinks to
files are followed, symlinked folders are not.

Split, by file (never by line, so no held-out file is seen in training):

1. The surviving files are sorted by their key (the path relative to the root they were found under,
   prefixed by that root's label, e.g. ``stdlib/json/decoder.py``), then shuffled with
   ``random.Random(seed)``.
2. ``max_bytes`` (optional) keeps the first files of that shuffled order while the running total of
   their sizes stays within the cap, so a cap gives a random but reproducible subset.
3. The kept files are sorted and shuffled again (same seed); the shortest prefix of that order that
   holds at least ``heldout_fraction`` of their bytes (at least 1 file, at most n-1) is the held-out
   split, the rest the train split.

In the ``finetune`` regime (:func:`partition_by_package`), the kept files are first divided by their
top-level package (``json/decoder.py`` -> ``json``; ``os.py`` -> ``os``; for site-packages the first
folder below it; each prefixed by its root's label, ``stdlib:json``). Either ``race_packages`` names the
race part's packages (``--race-packages test,unittest``), or the sorted package names are cut once where
the *base* part (the names before the cut) comes closest to half of the bytes, the rest forming the
*race* part. The base model trains on every file of the
base part; the race's train / held-out split (above) is made on the race part alone.

The ``finetune-mixed`` regime makes the same base / race partition, then also splits the base part
into train / held-out (the same rule, same seed): the base model trains on the base part's train
files only (split ``base``), and ``heldout_base`` (the base part's held-out files, never trained on)
measures retention. The race's training stream itself (a mix of ``base`` and ``train`` sequences) is
made in ``benchmarks/race.py`` (``--replay-fraction``).

The ``pretrained`` regimes (``pretrained``, ``pretrained-noisy``) split like ``scratch``, then carve a
``reference`` split out of the *train* files (``reference_fraction`` of their bytes, the same
shortest-prefix rule on a second shuffle, seed + 1): the reference model's files, which the race's
stream never contains; the held-out files are the same as without the carve. They take the
pretrained model's own tokenizer (``tokenizer=``, a transformers fast tokenizer; files separated by
its ``<|endoftext|>`` or EOS token, no BOS added) instead of training a BPE. The noisy regimes' noise
rows are made by ``benchmarks/harness/noise.py``, with the same tokenizer.

Tokenizer: a byte-level BPE (``tokenizers``: BPE model, ByteLevel pre-tokenizer without prefix space,
ByteLevel decoder, the 256 byte symbols as the initial alphabet, special token ``<|endoftext|>`` with
id 0) trained on the train files only (in the finetune regime: base part + race train split), at most
``tokenizer_max_bytes`` of them (first files of their shuffled order). It is cached under
``benchmarks/.cache/`` by a key that hashes the exact list of (file key, size) it was trained on and
the vocabulary size.

Packing: each file is encoded and followed by ``<|endoftext|>``; the files of a split are concatenated
in their shuffled order and cut into non-overlapping chunks of ``seq_len + 1`` tokens (the tail that
does not fill a chunk is dropped). A chunk is both ``input_ids`` and ``labels``: the model shifts the
labels itself, so each sequence holds ``seq_len`` next-token predictions. Encoded splits are cached
too (by tokenizer key and file-list hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

EOT = "<|endoftext|>"
CACHE_DIR = Path(__file__).resolve().parent / ".cache"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
PRETRAINED_REGIMES = ("pretrained", "pretrained-noisy")


@dataclass(frozen=True)
class SourceFile:
    key: str  # "<root label>/<relative path>", sorted and hashed on
    path: str  # absolute path read
    size: int  # bytes

    @property
    def package(self) -> str:
        """Top-level package of the file: first component below its root (``os.py`` -> ``os``)."""
        parts = self.key.split("/")
        top = parts[1] if len(parts) > 1 else parts[0]
        if len(parts) == 2 and top.endswith(".py"):
            top = top[:-3]
        return parts[0] + ":" + top


@dataclass
class Scan:
    files: list[SourceFile]
    roots: list[str]
    skipped_not_text: int = 0
    skipped_too_large: int = 0
    skipped_empty: int = 0

    def describe(self) -> str:
        return (f"roots: {', '.join(self.roots)}; {len(self.files)} files kept, skipped: "
                f"{self.skipped_not_text} not UTF-8 text, {self.skipped_too_large} too large, "
                f"{self.skipped_empty} empty")


def _is_text(data: bytes) -> bool:
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _walk(root: Path, label: str, only_py: bool, scan: Scan, max_file_bytes: int, seen: set) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if only_py and not name.endswith(".py"):
                continue
            p = Path(dirpath) / name
            _add_file(p, label + "/" + p.relative_to(root).as_posix(), scan, max_file_bytes, seen)


def _add_file(p: Path, key: str, scan: Scan, max_file_bytes: int, seen: set) -> None:
    try:
        real = os.path.realpath(p)
        if real in seen or not os.path.isfile(real):
            return
        size = os.path.getsize(real)
    except OSError:
        return
    seen.add(real)
    if size == 0:
        scan.skipped_empty += 1
        return
    if size > max_file_bytes:
        scan.skipped_too_large += 1
        return
    with open(real, "rb") as f:
        data = f.read()
    if not _is_text(data):
        scan.skipped_not_text += 1
        return
    scan.files.append(SourceFile(key=key, path=str(p), size=size))


def python_roots(include_site_packages: bool) -> list[tuple[str, Path]]:
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    if include_site_packages:
        for name in ("purelib", "platlib"):
            p = Path(paths[name])
            if p.is_dir() and all(p.resolve() != r.resolve() for _, r in roots):
                roots.append((name, p))
    return roots


DOC_SUFFIXES = (".md", ".rst", ".txt")


def doc_roots() -> list[tuple[str, Path]]:
    """Installed documentation: the interpreter's site-packages (READMEs, docs shipped in packages)
    and ``/usr/share/doc`` (uncompressed files only: ``.gz`` is not UTF-8 text)."""
    roots = [(lab + "-docs", p) for lab, p in python_roots(True)[1:]]
    if Path("/usr/share/doc").is_dir():
        roots.append(("usr-share-doc", Path("/usr/share/doc")))
    return roots


def _walk_docs(root: Path, label: str, scan: Scan, max_file_bytes: int, seen: set) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(DOC_SUFFIXES):
                continue
            if name in ("RECORD", "top_level.txt", "entry_points.txt", "SOURCES.txt") or name.endswith(".dist-info"):
                continue
            p = Path(dirpath) / name
            _add_file(p, label + "/" + p.relative_to(root).as_posix(), scan, max_file_bytes, seen)


def scan_files(source: str = "stdlib", max_file_bytes: int = 1_000_000) -> Scan:
    """List the corpus files of ``source`` ("stdlib", "stdlib+site", "stdlib+site+docs", or a folder /
    list-file path)."""
    seen: set = set()
    if source in ("stdlib", "stdlib+site", "stdlib+site+docs"):
        roots = python_roots(source != "stdlib")
        scan = Scan(files=[], roots=[f"{lab}={p}" for lab, p in roots])
        for label, root in roots:
            _walk(root, label, True, scan, max_file_bytes, seen)
        if source.endswith("+docs"):
            for label, root in doc_roots():
                scan.roots.append(f"{label}={root}")
                _walk_docs(root, label, scan, max_file_bytes, seen)
    else:
        src = Path(source).expanduser().resolve()
        scan = Scan(files=[], roots=[str(src)])
        if src.is_dir():
            _walk(src, src.name or "corpus", False, scan, max_file_bytes, seen)
        elif src.is_file():
            base = src.parent
            for i, line in enumerate(src.read_text(encoding="utf-8").splitlines()):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                p = Path(line).expanduser()
                if not p.is_absolute():
                    p = base / p
                if p.is_dir():
                    _walk(p, f"list{i}-{p.name}", False, scan, max_file_bytes, seen)
                else:
                    _add_file(p, f"list/{line}", scan, max_file_bytes, seen)
        else:
            raise FileNotFoundError(f"--corpus {source}: no such folder or file")
    # keys must be unique for a deterministic sort
    scan.files.sort(key=lambda f: f.key)
    if not scan.files:
        raise ValueError(f"corpus {source!r}: no usable text file found ({scan.describe()})")
    return scan


def shuffled(files: list[SourceFile], seed: int) -> list[SourceFile]:
    out = sorted(files, key=lambda f: f.key)
    random.Random(seed).shuffle(out)
    return out


def cap_bytes(files: list[SourceFile], max_bytes: int | None) -> list[SourceFile]:
    """Keep the leading files (in the given order) whose running total stays within ``max_bytes``."""
    if not max_bytes:
        return list(files)
    out, total = [], 0
    for f in files:
        if total + f.size > max_bytes:
            continue
        out.append(f)
        total += f.size
    return out


def split_files(files: list[SourceFile], heldout_fraction: float, seed: int) -> tuple[list, list]:
    """(train, heldout): seeded file-level split of ``files`` (independent of their order).

    Held-out = the shortest prefix of the shuffled order holding at least ``heldout_fraction`` of the
    bytes (at least 1 file, at most n - 1).
    """
    order = shuffled(files, seed)
    n = len(order)
    if n < 2:
        raise ValueError(f"need at least 2 files to split train / held-out, got {n}")
    want, acc, n_held = heldout_fraction * sum(f.size for f in order), 0, 0
    while n_held < n - 1 and (n_held == 0 or acc < want):
        acc += order[n_held].size
        n_held += 1
    return order[n_held:], order[:n_held]


def partition_by_package(files: list[SourceFile], race_packages: list[str] | None = None
                         ) -> tuple[list, list, list[str], list[str]]:
    """(base files, race files, base packages, race packages).

    With ``race_packages`` (top-level names, with or without their root label: ``test`` or
    ``stdlib:test``), the race part is the files of those packages and the base part the rest.
    Otherwise the sorted package names are cut once, where the base part's bytes come closest to
    half of the total (both parts non-empty): base = the packages before the cut.
    """
    by_pkg: dict[str, list[SourceFile]] = {}
    for f in files:
        by_pkg.setdefault(f.package, []).append(f)
    names = sorted(by_pkg)
    if len(names) < 2:
        raise ValueError(f"finetune regime: need at least 2 top-level packages, got {names}")
    if race_packages:
        wanted = set(race_packages)
        race_names = [n for n in names if n in wanted or n.split(":", 1)[1] in wanted]
        if not race_names or len(race_names) == len(names):
            raise ValueError(f"--race-packages {sorted(wanted)}: matches {len(race_names)} of {len(names)} packages")
        base_names = [n for n in names if n not in race_names]
    else:
        sizes = [sum(f.size for f in by_pkg[n]) for n in names]
        total, acc, best, cut = sum(sizes), 0, None, 1
        for i in range(1, len(names)):
            acc += sizes[i - 1]
            if best is None or abs(acc - total / 2) < best:
                best, cut = abs(acc - total / 2), i
        base_names, race_names = names[:cut], names[cut:]
    base = [f for n in base_names for f in by_pkg[n]]
    race = [f for n in race_names for f in by_pkg[n]]
    return base, race, base_names, race_names


def files_hash(files: list[SourceFile]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.key}\t{f.size}\n".encode())
    return h.hexdigest()[:16]


def read_text(f: SourceFile) -> str:
    with open(f.path, "rb") as fh:
        return fh.read().decode("utf-8")


def train_tokenizer(files: list[SourceFile], vocab_size: int, max_bytes: int | None = None,
                    cache_dir: Path | None = None, log=print):
    """Byte-level BPE trained on ``files`` (at most ``max_bytes`` of them, leading files first), cached."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    used = cap_bytes(files, max_bytes)
    key = f"tok_v{vocab_size}_{files_hash(used)}"
    cache_dir = Path(cache_dir or CACHE_DIR)
    path = cache_dir / f"{key}.json"
    if path.exists():
        log(f"tokenizer: cached {path.name} (trained on {len(used)} files, "
            f"{sum(f.size for f in used):,} bytes)")
        return Tokenizer.from_file(str(path)), key, False
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((read_text(f) for f in used), trainer=trainer, length=len(used))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    log(f"tokenizer: trained {path.name} on {len(used)} files, {sum(f.size for f in used):,} bytes, "
        f"vocab {tok.get_vocab_size()}")
    return tok, key, True


def encode_files(tok, files: list[SourceFile], tok_key: str, cache_dir: Path | None = None,
                 eot_id: int | None = None) -> torch.Tensor:
    """One int32 token stream: each file's tokens followed by EOT (``eot_id``, default the id of
    ``<|endoftext|>``), files in the given order, no special tokens added (no BOS). Cached.

    ``tok`` is a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (its backend is used)."""
    tok = getattr(tok, "backend_tokenizer", tok)
    cache_dir = Path(cache_dir or CACHE_DIR)
    path = cache_dir / f"enc_{tok_key}_{files_hash(files)}.pt"
    if path.exists():
        return torch.load(path)
    eot = tok.token_to_id(EOT) if eot_id is None else eot_id
    ids: list[int] = []
    batch = 256
    for i in range(0, len(files), batch):
        chunk = files[i:i + batch]
        for enc in tok.encode_batch([read_text(f) for f in chunk], add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eot)
    stream = torch.tensor(ids, dtype=torch.int32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(stream, tmp)
    os.replace(tmp, path)
    return stream


def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping chunks of ``seq_len + 1`` tokens, int64 [N, seq_len + 1]; the tail is dropped."""
    n = stream.numel() // (seq_len + 1)
    return stream[: n * (seq_len + 1)].view(n, seq_len + 1).long()


@dataclass
class Split:
    name: str
    files: list[SourceFile]
    tokens: int = 0
    sequences: torch.Tensor | None = None

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def summary(self) -> dict:
        return {"files": len(self.files), "bytes": self.bytes, "tokens": self.tokens,
                "sequences": 0 if self.sequences is None else int(self.sequences.shape[0]),
                "files_hash": files_hash(self.files)}


@dataclass
class Corpus:
    source: str
    scan_description: str
    tokenizer: object
    tokenizer_key: str
    vocab_size: int
    seq_len: int
    splits: dict[str, Split] = field(default_factory=dict)
    base_packages: list[str] = field(default_factory=list)
    race_packages: list[str] = field(default_factory=list)
    tokenizer_seconds: float = 0.0
    tokenizer_trained: bool = False

    def describe(self) -> dict:
        return {"source": self.source, "scan": self.scan_description, "tokenizer": self.tokenizer_key,
                "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "tokenizer_seconds": round(self.tokenizer_seconds, 2),
                "tokenizer_trained_now": self.tokenizer_trained,
                "splits": {k: s.summary() for k, s in self.splits.items()},
                "base_packages": self.base_packages, "race_packages": self.race_packages}


def build_corpus(source: str = "stdlib", *, seq_len: int, vocab_size: int, seed: int = 0,
                 heldout_fraction: float = 0.05, max_bytes: int | None = None,
                 max_file_bytes: int = 1_000_000, tokenizer_max_bytes: int | None = None,
                 regime: str = "scratch", race_packages: list[str] | None = None,
                 cache_dir: Path | None = None, log=print, tokenizer=None,
                 reference_fraction: float = 0.0) -> Corpus:
    """Scan, cap, split, train (or load) the tokenizer, encode and pack.

    Splits: ``train`` and ``heldout`` (and ``base`` in the finetune regimes; ``heldout_base`` in the
    finetune-mixed regime). In the ``pretrained`` regimes (``pretrained``, ``pretrained-noisy``) the
    files are split like ``scratch``, and with ``reference_fraction > 0`` a ``reference`` split is
    carved out of the *train* files (the shortest prefix of a second seeded shuffle of them that
    holds that share of their bytes, by file): the files the race's reference model trains on,
    never the held-out files, and never in the race's ``train`` split.

    ``tokenizer``: a given tokenizer (a transformers fast tokenizer: the pretrained model's own)
    instead of training a BPE; files are then separated by its ``<|endoftext|>`` (or EOS) token.
    """
    import time

    scan = scan_files(source, max_file_bytes=max_file_bytes)
    kept = cap_bytes(shuffled(scan.files, seed), max_bytes)
    base_names: list[str] = []
    race_names: list[str] = []
    splits: dict[str, Split] = {}
    if regime == "finetune":
        base, race, base_names, race_names = partition_by_package(kept, race_packages)
        if len(race) < 2 or not base:
            raise ValueError("finetune regime: too few files to make a base part and a race part")
        train, held = split_files(race, heldout_fraction, seed)
        splits["base"] = Split("base", shuffled(base, seed))
    elif regime == "finetune-mixed":
        base, race, base_names, race_names = partition_by_package(kept, race_packages)
        if len(race) < 2 or len(base) < 2:
            raise ValueError("finetune-mixed regime: too few files to split both the base part and the race part")
        train, held = split_files(race, heldout_fraction, seed)
        base_train, base_held = split_files(base, heldout_fraction, seed)
        splits["base"] = Split("base", base_train)
        splits["heldout_base"] = Split("heldout_base", base_held)
    elif regime in ("scratch",) + PRETRAINED_REGIMES:
        train, held = split_files(kept, heldout_fraction, seed)
        if regime in PRETRAINED_REGIMES and reference_fraction > 0:
            train, ref = split_files(train, reference_fraction, seed + 1)
            splits["reference"] = Split("reference", ref)
    else:
        raise ValueError(f"unknown regime {regime!r} (scratch|finetune|finetune-mixed|pretrained|pretrained-noisy)")
    splits["train"] = Split("train", train)
    splits["heldout"] = Split("heldout", held)
    t0 = time.perf_counter()
    eot_id = None
    if tokenizer is not None:
        from benchmarks.pretrained import separator_id, tokenizer_key

        tok, tok_key, trained, eot_id = tokenizer, tokenizer_key(tokenizer), False, separator_id(tokenizer)
    else:
        tok_files = (splits["base"].files if "base" in splits else []) + train
        tok, tok_key, trained = train_tokenizer(tok_files, vocab_size, tokenizer_max_bytes, cache_dir, log)
    tok_s = time.perf_counter() - t0
    for s in splits.values():
        stream = encode_files(tok, s.files, tok_key, cache_dir, eot_id)
        s.tokens = int(stream.numel())
        s.sequences = pack(stream, seq_len)
        if s.sequences.shape[0] == 0:
            raise ValueError(f"split {s.name}: {s.tokens} tokens, fewer than one sequence of {seq_len + 1}")
    vocab = len(tok) if tokenizer is not None else tok.get_vocab_size()
    return Corpus(source=source, scan_description=scan.describe(), tokenizer=tok, tokenizer_key=tok_key,
                  vocab_size=vocab, seq_len=seq_len, splits=splits,
                  base_packages=base_names, race_packages=race_names, tokenizer_seconds=tok_s,
                  tokenizer_trained=trained)


if __name__ == "__main__":  # python benchmarks/corpus.py [source]: print what would be read
    import sys

    c = build_corpus(sys.argv[1] if len(sys.argv) > 1 else "stdlib", seq_len=128, vocab_size=2048,
                     max_bytes=4_000_000)
    print(json.dumps(c.describe(), indent=1))
