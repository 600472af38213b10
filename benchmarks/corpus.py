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
its ``<|endoftext|>`` or EOS token, no BOS added) instead of training a BPE. ``make_noise`` makes the
noisy regime's unlearnable sequences (token-shuffled train sequences; base64 / hex dumps of the
interpreter's shared objects), tokenized with the same tokenizer; ``make_scraped_noise`` makes realistic
noise instead (``race.py --noise-kind scraped``): minified / generated code, data dumps, translation
catalogs and license boilerplate, read from this machine's files that no corpus source reads.

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

import functools
import hashlib
import json
import os
import random
import re
import stat
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


# ------------------------------------------------------------------------------ unlearnable noise
def binary_files() -> list[Path]:
    """Shared objects (``*.so``, ``*.so.*``) of this interpreter: its ``lib-dynload`` and its
    installed packages (``platlib``), sorted; the source of the noise regime's binary dumps."""
    paths = sysconfig.get_paths()
    roots = [Path(paths["platstdlib"]) / "lib-dynload", Path(paths["platlib"])]
    out, seen = [], set()
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            for name in sorted(filenames):
                if name.endswith(".so") or ".so." in name:
                    p = Path(dirpath) / name
                    try:
                        real = os.path.realpath(p)
                        if real in seen or not os.path.isfile(real) or os.path.getsize(real) < 4096:
                            continue
                    except OSError:
                        continue
                    seen.add(real)
                    out.append(p)
    return sorted(out)


def _binary_chunk(files: list[Path], rnd: random.Random, nbytes: int) -> tuple[bytes, str]:
    """A seeded chunk of a binary file that does not compress below half its size (machine code,
    compressed data: no runs of zeros, no string tables), at most 20 tries."""
    import zlib

    chunk, name = b"", ""
    for _ in range(20):
        p = files[rnd.randrange(len(files))]
        size = os.path.getsize(p)
        off = rnd.randrange(0, max(1, size - nbytes))
        with open(p, "rb") as f:
            f.seek(off)
            chunk = f.read(nbytes)
        name = p.name
        if len(chunk) == nbytes and len(zlib.compress(chunk)) > 0.5 * nbytes:
            break
    return chunk, name


def _noise_cache_path(cache_dir: Path | None, prefix: str, key: list, extra: bytes = b"") -> Path:
    """``<cache dir>/<prefix>_<hash>.pt``: the hash of ``key`` (as JSON) and ``extra``."""
    h = hashlib.sha256(json.dumps(key).encode())
    h.update(extra)
    return Path(cache_dir or CACHE_DIR) / f"{prefix}_{h.hexdigest()[:16]}.pt"


def _cached_rows(path: Path, build) -> tuple[torch.Tensor, dict]:
    """``build()`` -> (rows, info), saved at ``path``; loaded from it instead when it exists.
    The returned info says which (``cached``)."""
    if path.exists():
        blob = torch.load(path)
        return blob["seqs"], dict(blob["info"], cached=True)
    seqs, info = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"seqs": seqs, "info": info}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return seqs, dict(info, cached=False)


def texts_to_rows(tok, texts: list[str], seq_len: int) -> torch.Tensor:
    """One row of ``seq_len + 1`` tokens per text, int64: the text's ids under ``tok`` (a
    ``tokenizers.Tokenizer`` or a transformers fast tokenizer; no special tokens), repeated to fill the
    row when short, cut when long; an empty text gives a row of zeros."""
    backend = getattr(tok, "backend_tokenizer", tok)
    rows = torch.zeros(len(texts), seq_len + 1, dtype=torch.long)
    for i in range(0, len(texts), 256):
        for j, enc in enumerate(backend.encode_batch(texts[i:i + 256], add_special_tokens=False)):
            ids = torch.tensor(enc.ids, dtype=torch.long)
            reps = -(-(seq_len + 1) // max(1, ids.numel()))
            rows[i + j] = ids.repeat(reps)[: seq_len + 1] if ids.numel() else 0
    return rows


def _token_shuffled_rows(clean: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` seeded rows of ``clean``, each with its tokens permuted within the row."""
    g = torch.Generator().manual_seed(seed + 31)
    rows = torch.randint(0, clean.shape[0], (n,), generator=g)
    shuf = clean[rows].clone()
    for i in range(n):
        shuf[i] = shuf[i][torch.randperm(shuf.shape[1], generator=g)]
    return shuf


def _binary_dump_texts(files: list[Path], n: int, seq_len: int, seed: int) -> tuple[list[str], set]:
    """``n`` dumps of seeded binary chunks, alternately base64 (76-character lines) and hex (``xxd``-like),
    and the names of the files they came from."""
    import base64

    rnd = random.Random(seed + 37)
    texts, names = [], set()
    for i in range(n):
        if i % 2 == 0:  # base64: ~1 token per 1.5-3 characters; read enough bytes to fill a row
            chunk, name = _binary_chunk(files, rnd, 3 * (seq_len + 1))
            b = base64.b64encode(chunk).decode()
            texts.append("\n".join(b[j:j + 76] for j in range(0, len(b), 76)))
        else:
            chunk, name = _binary_chunk(files, rnd, 2 * (seq_len + 1))
            lines = []
            for j in range(0, len(chunk), 16):
                row = chunk[j:j + 16].hex()
                lines.append(f"{j:08x}: " + " ".join(row[q:q + 4] for q in range(0, len(row), 4)))
            texts.append("\n".join(lines))
        names.add(name)
    return texts, names


def make_noise(tok, n_sequences: int, seq_len: int, clean: torch.Tensor, seed: int = 0,
               cache_dir: Path | None = None, tok_key: str = "", log=print) -> tuple[torch.Tensor, dict]:
    """``n_sequences`` unlearnable sequences of ``seq_len + 1`` tokens, for the noisy regime.

    Half (rounded down) are *token-shuffled text*: seeded clean train sequences (``clean``) whose
    tokens are permuted within the row (the unigram mix of the corpus, no order). The other half are
    *dumps of binary files found on this machine* (:func:`binary_files`: the interpreter's shared
    objects), alternately base64 (76-character lines) and hex (``xxd``-like: 16 bytes a line, in
    groups of 2 bytes), of a seeded high-entropy chunk, tokenized with ``tok`` and cut to
    ``seq_len + 1`` tokens. Cached by (tokenizer, n, seq_len, seed, clean-stream hash, file list).
    """
    n_shuf = n_sequences // 2
    n_bin = n_sequences - n_shuf
    files = binary_files() if n_bin else []
    if n_bin and not files:
        log("noise: no shared objects found; all noise sequences are token-shuffled text")
        n_shuf, n_bin = n_sequences, 0
    path = _noise_cache_path(cache_dir, "noise", [tok_key, n_sequences, seq_len, seed, [str(f) for f in files]],
                             clean[: min(len(clean), 64)].numpy().tobytes())
    info = dict(sequences=n_sequences, token_shuffled=n_shuf, binary_dumps=n_bin, binary_files=len(files),
                binary_source="lib-dynload + platlib *.so", kinds_binary="base64 / hex, alternating")

    def build():
        out = [_token_shuffled_rows(clean, n_shuf, seed)]
        if n_bin:
            texts, names = _binary_dump_texts(files, n_bin, seq_len, seed)
            out.append(texts_to_rows(tok, texts, seq_len))
            info["binary_files_used"] = len(names)
        return torch.cat(out).long(), info

    return _cached_rows(path, build)


# ------------------------------------------------------------------------------ scraped noise
SCRAPED_KINDS = ("generated", "data", "translations", "boilerplate")
_MINIFIED_SUFFIXES = (".min.js", ".min.css", ".js.map", ".css.map")
_TABLE_SUFFIXES = (".csv", ".tsv", ".arff", ".dat")
_CODE_SUFFIXES = (".h", ".hpp", ".hh", ".c", ".cc", ".cpp", ".cu", ".cuh", ".js", ".css", ".pyi", ".pyx", ".pxd",
                  ".sh", ".cmake", "_pb2.py", "_pb2_grpc.py")
_NOT_LICENSE_SUFFIXES = (".gz", ".bz2", ".xz", ".zip", ".py", ".pyc", ".so")
_LICENSE_NAME = re.compile(r"(licen[cs]e|copying|notice|copyright)([._-].*)?$", re.I)
_GENERATED_HEAD = re.compile(r"@generated|auto-?generated|generated (?:by|from|automatically)|"
                             r"automatically generated|do not edit", re.I)
_SCRAPED_SUFFIXES = _MINIFIED_SUFFIXES + (".po", ".mo", ".json") + _TABLE_SUFFIXES + _CODE_SUFFIXES
_CONTINUATION_BYTES = bytes(range(0x80, 0xC0))
_LEGAL_WORDS = re.compile(r"copyright|licen[cs]|warrant|permission|redistribut|rights reserved|spdx", re.I)


def scraped_roots() -> list[tuple[str, Path]]:
    """Where :func:`scraped_sources` looks: the interpreter's stdlib folder (its ``site-packages``
    pruned) and installed packages (``purelib``, ``platlib``), its ``share`` folder, ``/usr/share`` and
    ``/usr/local/share``; the ones that exist, each folder once."""
    extra = [("share", Path(sysconfig.get_paths()["data"]) / "share"), ("usr-share", Path("/usr/share")),
             ("usr-local-share", Path("/usr/local/share"))]
    out, seen = [], set()
    for label, p in python_roots(True) + extra:
        if p.is_dir() and p.resolve() not in seen:
            seen.add(p.resolve())
            out.append((label, p))
    return out


def _head(path: str, n: int = 400) -> str:
    with open(path, "rb") as fh:
        return fh.read(n).decode("utf-8", errors="replace")


def _scraped_group(path: str, name: str, folders: list[str], size: int) -> tuple[str, str] | None:
    """(kind, group) of a file for the scraped noise, or None; ``folders``: its folders below its root.
    Reads at most the first 4 KB (code files: for a "generated" or a copyright line; JSON files of
    16 KB or more outside a ``data`` folder: for a newline)."""
    low = name.lower()
    if low.endswith(_MINIFIED_SUFFIXES):
        return "generated", "minified"
    if low.endswith((".po", ".mo")):
        return "translations", low[-2:]
    if (_LICENSE_NAME.match(name) or folders[-1:] == ["common-licenses"]) and not low.endswith(_NOT_LICENSE_SUFFIXES):
        return "boilerplate", "license-files"
    if low.endswith(_TABLE_SUFFIXES):
        return "data", "tables"
    if low.endswith(".json"):
        if "data" in folders:
            return "data", "json"
        if size >= 16384 and "\n" not in _head(path, 4096):
            return "generated", "minified"
    elif low.endswith(_CODE_SUFFIXES):
        head = _head(path)
        if _GENERATED_HEAD.search(head):
            return "generated", "generated-code"
        if "copyright" in "\n".join(head.splitlines()[:3]).lower():
            return "boilerplate", "code-headers"
    return None


def _corpus_dirs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(folders whose ``*.py`` a built-in corpus source reads, folders whose docs ``stdlib+site+docs`` reads)."""
    py = tuple(str(p) + os.sep for _, p in python_roots(True))
    return py, tuple(str(p) + os.sep for _, p in doc_roots())


def _scraped_name(path: str, name: str, folders: list[str], corpus_dirs: tuple) -> bool:
    """Whether a file's name makes it a candidate, and no built-in corpus source reads it."""
    low = name.lower()
    if name.startswith(".") or not (low.endswith(_SCRAPED_SUFFIXES) or _LICENSE_NAME.match(name)
                                    or folders[-1:] == ["common-licenses"]):
        return False
    py_dirs, doc_dirs = corpus_dirs
    return not (name.endswith(".py") and path.startswith(py_dirs)
                or low.endswith(DOC_SUFFIXES) and path.startswith(doc_dirs))


def _walk_scraped(root: Path, label: str, found: dict, seen: set, max_file_bytes: int) -> None:
    corpus_dirs = _corpus_dirs()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        folders = [] if rel == "." else rel.split(os.sep)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not _scraped_name(path, name, folders, corpus_dirs):
                continue
            try:
                st = os.stat(path)
                ok = (stat.S_ISREG(st.st_mode) and 0 < st.st_size <= max_file_bytes
                      and (st.st_dev, st.st_ino) not in seen)
                group = _scraped_group(path, name, folders, st.st_size) if ok else None
            except OSError:
                continue
            if group:
                seen.add((st.st_dev, st.st_ino))
                f = SourceFile(key="/".join([label, *folders, name]), path=path, size=st.st_size)
                found.setdefault(group[0], {}).setdefault(group[1], []).append(f)


@functools.lru_cache(maxsize=2)
def scraped_sources(max_file_bytes: int = 20_000_000) -> dict[str, dict[str, list[SourceFile]]]:
    """kind -> group -> files (sorted by key): this machine's files for :func:`make_scraped_noise`,
    found under :func:`scraped_roots` by name and first bytes (:func:`_scraped_group`). Never a file
    that a built-in corpus source reads (the ``*.py`` of the stdlib and site-packages, the
    ``.md`` / ``.rst`` / ``.txt`` of site-packages and ``/usr/share/doc``), so ``*_pb2.py`` and
    generated ``.py`` files are left out there. Memoised per process: do not modify the result."""
    found: dict = {}
    seen: set = set()
    for label, root in scraped_roots():
        _walk_scraped(root, label, found, seen, max_file_bytes)
    return {k: dict(sorted(found[k].items())) for k in SCRAPED_KINDS if k in found}


def _decode_text(data: bytes) -> str | None:
    """UTF-8 text of ``data`` (a character cut at the end is dropped), or None if it is not text."""
    import codecs

    if b"\x00" in data:
        return None
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data)  # final=False: holds back a cut tail
    except UnicodeDecodeError:
        return None


def _window_text(f: SourceFile, rnd: random.Random, nbytes: int) -> str | None:
    """About ``nbytes`` of a text file from a seeded offset, starting at a line start (a character
    start in a file without newlines there)."""
    off = rnd.randrange(0, max(1, f.size - nbytes))
    with open(f.path, "rb") as fh:
        fh.seek(off)
        data = fh.read(nbytes)
    if off:
        nl = data.find(b"\n", 0, len(data) // 4)
        data = data[nl + 1:] if nl >= 0 else data.lstrip(_CONTINUATION_BYTES)
    return _decode_text(data)


@functools.lru_cache(maxsize=256)
def _mo_strings(path: str) -> tuple[str, ...]:
    """The translated strings of a compiled gettext catalog (``.mo``), in file order; untranslated
    entries and the header left out."""
    import gettext
    import struct

    try:
        with open(path, "rb") as fh:
            catalog = gettext.GNUTranslations(fh)._catalog  # the parsed msgid -> msgstr table
    except (OSError, struct.error, UnicodeDecodeError, ValueError, LookupError):
        return ()
    return tuple(v for k, v in catalog.items() if k and v and v != k)


def _mo_text(f: SourceFile, rnd: random.Random, nbytes: int) -> str | None:
    """Consecutive translated strings of a ``.mo`` catalog from a seeded entry (wrapping), one a line,
    about ``nbytes`` in all."""
    strings = _mo_strings(f.path)
    if not strings:
        return None
    i, out, n = rnd.randrange(len(strings)), [], 0
    while n < nbytes and len(out) < len(strings):
        out.append(strings[(i + len(out)) % len(strings)])
        n += len(out[-1].encode()) + 1
    return "\n".join(out)


def _boilerplate_text(f: SourceFile, rnd: random.Random, nbytes: int, header_only: bool = False) -> str | None:
    """The first 8-30 lines (seeded) of a license file, or (``header_only``) of a code file's opening
    copyright notice, up to its last line among them that names a copyright, license, warranty or
    permission; repeated (a blank line between) to about ``nbytes``: many scraped files, one header."""
    with open(f.path, "rb") as fh:
        lines = (_decode_text(fh.read(16384)) or "").splitlines()[: rnd.randint(8, 30)]
    if header_only:
        legal = [i for i, line in enumerate(lines) if _LEGAL_WORDS.search(line)]
        lines = lines[: legal[-1] + 1] if legal else []
    block = "\n".join(lines).strip()
    return "\n\n".join([block] * -(-nbytes // (len(block.encode()) + 2))) if block else None


_SCRAPED_TEXT = {"mo": _mo_text, "license-files": _boilerplate_text,
                 "code-headers": functools.partial(_boilerplate_text, header_only=True)}


def _scraped_text(groups: dict[str, list[SourceFile]], rnd: random.Random, nbytes: int) -> tuple[str, set]:
    """(text, keys of the files it came from) of one kind, about ``nbytes``: a group drawn uniformly,
    then a file of it, its text (drawn again unless it holds 64 non-blank characters); texts short of
    ``nbytes`` are joined (a blank line between) with further draws, at most 20 draws in all."""
    names = sorted(groups)
    parts, keys, size = [], set(), 0
    for _ in range(20):
        if size >= nbytes:
            break
        group = names[rnd.randrange(len(names))]
        f = groups[group][rnd.randrange(len(groups[group]))]
        try:
            text = _SCRAPED_TEXT.get(group, _window_text)(f, rnd, max(nbytes - size, nbytes // 4)) or ""
        except OSError:
            text = ""
        if len(text.strip()) >= 64:
            parts.append(text)
            keys.add(f.key)
            size += len(text.encode()) + 2
    return "\n\n".join(parts), keys


def make_scraped_noise(tok, n_sequences: int, seq_len: int, seed: int = 0, cache_dir: Path | None = None,
                       tok_key: str = "", log=print) -> tuple[torch.Tensor, dict]:
    """``n_sequences`` sequences of ``seq_len + 1`` tokens of *realistic* noise: what a web / code
    scraper would keep, text a model can partly model but junk for learning the corpus.

    Read from this machine's files only (:func:`scraped_sources`, under :func:`scraped_roots`: the
    interpreter's stdlib and site-packages folders, its ``share`` folder, ``/usr/share``,
    ``/usr/local/share``; never a file a built-in corpus source reads), in up to four kinds:

    * ``generated``: minified files (``*.min.js``, ``*.min.css``, source maps, JSON files of 16 KB or
      more without a newline in their first 4 KB) and generated code (C / C++ headers and sources,
      ``.pyi`` stubs, Cython, shell and CMake files, ``*_pb2.py``, whose first 400 bytes say
      "@generated", "auto-generated", "generated by / from", "do not edit"...): a seeded window;
    * ``data``: data dumps, tables (``.csv``, ``.tsv``, ``.arff``, ``.dat``) and ``.json`` files in a
      ``data`` folder: a seeded window from a line start;
    * ``translations``: gettext catalogs, ``.po`` (a window of the text) and compiled ``.mo`` (their
      translated strings, consecutive from a seeded entry, one a line);
    * ``boilerplate``: license files (``LICENSE*``, ``COPYING*``, ``NOTICE*``, ``copyright``,
      ``common-licenses/*``) and code files with a copyright notice in their first 3 lines: their first
      8-30 lines, repeated to fill the row.

    The rows are split as evenly as possible over the kinds found (the first kinds take the
    remainder), in blocks in the order above; within a kind each row draws a group (e.g. minified /
    generated-code) uniformly, then a file; a row's text is about ``6 * (seq_len + 1)`` bytes (short
    files are joined with further draws of the kind), tokenized with ``tok`` like :func:`make_noise`'s
    dumps (:func:`texts_to_rows`: cut to ``seq_len + 1`` tokens, repeated if short). Seeded and cached by
    (tokenizer key, n, seq_len, seed, the candidate files). ``info["kinds"]``: per kind found, its
    rows, its candidate files, the files its rows came from and its groups' candidate counts.
    """
    sources = scraped_sources()
    kinds = list(sources)
    if not kinds:
        raise ValueError("scraped noise: no minified / generated file, data dump, translation catalog or license "
                         f"file found under {[str(p) for _, p in scraped_roots()]}")
    if len(kinds) < len(SCRAPED_KINDS):
        log(f"scraped noise: not found on this machine: {[k for k in SCRAPED_KINDS if k not in sources]}")
    counts = [n_sequences // len(kinds) + (i < n_sequences % len(kinds)) for i in range(len(kinds))]
    key = ["scraped-v1", tok_key, n_sequences, seq_len, seed,  # bump the version when the texts change
           {k: {g: files_hash(fs) for g, fs in sources[k].items()} for k in kinds}]

    def build():
        rnd, texts, per_kind = random.Random(seed + 41), [], {}
        for kind, n in zip(kinds, counts):
            drawn = [_scraped_text(sources[kind], rnd, 6 * (seq_len + 1)) for _ in range(n)]
            texts += [t for t, _ in drawn]
            per_kind[kind] = dict(rows=n, files=sum(map(len, sources[kind].values())),
                                  files_used=len(set().union(*(keys for _, keys in drawn))),
                                  groups={g: len(fs) for g, fs in sources[kind].items()})
        info = dict(sequences=n_sequences, kinds=per_kind, layout="one block of rows per kind, in this order",
                    roots=[str(p) for _, p in scraped_roots()])
        return texts_to_rows(tok, texts, seq_len), info

    return _cached_rows(_noise_cache_path(cache_dir, "scraped", key), build)


if __name__ == "__main__":  # python benchmarks/corpus.py [source]: print what would be read
    import sys

    c = build_corpus(sys.argv[1] if len(sys.argv) > 1 else "stdlib", seq_len=128, vocab_size=2048,
                     max_bytes=4_000_000)
    print(json.dumps(c.describe(), indent=1))
