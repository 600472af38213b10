"""Noise rows for the race's noisy regimes, made from this machine's files and tokenized with the
race's tokenizer; nothing is downloaded.

* :func:`make_noise` (``--noise-kind unlearnable``, the default): unlearnable sequences, half
  token-shuffled train sequences (the corpus's unigram mix, no order), half base64 / hex dumps of the
  interpreter's shared objects.
* :func:`make_scraped_noise` (``--noise-kind scraped``): what a web / code scraper would keep, read
  from files no corpus source reads: minified / generated code, data dumps, translation catalogs and
  license boilerplate. Text a model can partly model, but that teaches it nothing about the corpus.

Both are cached under the race's cache folder, keyed by everything that makes them.
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
from pathlib import Path

import torch

from benchmarks.corpus import CACHE_DIR, DOC_SUFFIXES, _SKIP_DIRS, SourceFile, doc_roots, files_hash, python_roots


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
