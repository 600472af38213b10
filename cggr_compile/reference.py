"""Reference losses for ``scoring='reducible'``, computed once, offline (RHO-LOSS's irreducible loss).

``reducible = router loss - reference loss``: a sequence the learner gets wrong but a reference
model gets right is learnable and worth the backward pass; one both get wrong (noise, a binary dump,
text in a language the data does not teach) is not, however hard. RHO-LOSS (Mindermann et al.,
2022) computes the reference loss of every training example once, with a model trained on a holdout
split of the training data; :func:`reference_losses` does that for any model and data, and the
training batches then carry it as ``reference_loss=`` (a dataset column, or a tensor indexed like
the data). The alternative, ``reference=<model>`` in the options, runs the reference inside every
step instead.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import scoring as S
from .router import _looks_masked, describe

__all__ = ["reference_losses"]


def _is_causal(model: nn.Module) -> bool:
    try:
        return describe(model).causal
    except ValueError:
        return not _looks_masked(model)


def _is_dataset(data: Any) -> bool:
    """A ``datasets.Dataset`` (duck-typed: the library is optional)."""
    return hasattr(data, "column_names") and hasattr(data, "add_column")


def _batches(data: Any, batch_size: int) -> Iterator[dict]:
    """Batches of ``input_ids`` (+ ``attention_mask``, ``labels``) from a tensor, dataset or loader."""
    if isinstance(data, Tensor):
        if data.dim() != 2 or data.is_floating_point():
            raise ValueError(f"reference_losses: a tensor of data must be (N, seq) token ids, got {tuple(data.shape)} "
                             f"{data.dtype}")
        for i in range(0, data.shape[0], batch_size):
            yield {"input_ids": data[i:i + batch_size]}
        return
    if _is_dataset(data):
        if "input_ids" not in data.column_names:
            raise ValueError("reference_losses: the dataset has no input_ids column; tokenize it first.")
        cols = [c for c in ("input_ids", "attention_mask", "labels") if c in data.column_names]
        for i in range(0, len(data), batch_size):
            rows = data[i:i + batch_size]
            yield _pad({c: rows[c] for c in cols})
        return
    for batch in data:  # a DataLoader or any iterable of batches
        if isinstance(batch, Tensor):
            batch = {"input_ids": batch}
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ValueError("reference_losses: each batch must be a dict with input_ids (or a tensor of ids).")
        yield batch


def _pad(columns: dict) -> dict:
    """Right-pad a dataset slice's lists to one length; padding is masked and labelled -100."""
    ids = columns["input_ids"]
    if isinstance(ids, Tensor):
        return columns
    width = max(len(r) for r in ids)
    masks = columns["attention_mask"] if "attention_mask" in columns else [[1] * len(r) for r in ids]
    out = {"input_ids": torch.tensor([list(r) + [0] * (width - len(r)) for r in ids]),
           "attention_mask": torch.tensor([list(m) + [0] * (width - len(m)) for m in masks])}
    if "labels" in columns:
        out["labels"] = torch.tensor([list(r) + [S.IGNORE_INDEX] * (width - len(r)) for r in columns["labels"]])
    out["lengths"] = [len(r) for r in ids]
    return out


def _progress(total: Optional[int], enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; without it, no bar
        return None
    return tqdm(total=total, desc="reference losses", unit="seq", disable=not enabled)


def reference_losses(
    model: nn.Module, data: Union[Tensor, Iterable, Any], *, batch_size: int = 32, per_token: bool = False,
    device: Optional[Union[str, torch.device]] = None, compile: bool = False,
    autocast_dtype: Optional[torch.dtype] = None, progress: bool = True, column: str = "reference_loss",
) -> Any:
    """The reference loss of every sequence of ``data``, computed once, under no-grad.

    ``data`` is a ``(N, T)`` tensor of token ids (labels = the ids), an iterable of batches (dicts
    with ``input_ids`` and optionally ``attention_mask`` and ``labels``, e.g. a ``DataLoader``), or a
    ``datasets.Dataset`` with an ``input_ids`` column. Positions and validity follow the training
    loss (causal LMs predict token ``t+1`` at ``t``; masked, padded and -100 positions are skipped).

    Returns a float32 CPU tensor, ``[N]`` (each sequence's mean loss over its valid positions, 0 for
    a sequence with none) or with ``per_token=True`` ``[N, T]`` (0 at invalid positions), in the
    order of ``data``; for a dataset, the dataset with the values added as the column ``column``
    (per-token values as lists of each row's length). Pass them back with each training batch as
    ``reference_loss=`` (``cggr_compile.transform(model, scoring='reducible')``).
    ``compile=True`` runs the model under ``torch.compile``; ``autocast_dtype`` (e.g. bf16) under
    autocast on ``device``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"reference_losses: batch_size must be an integer >= 1, got {batch_size!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    causal = _is_causal(model)
    was_training = model.training
    model.eval()
    fwd = torch.compile(model) if compile else model
    # rows are countable up front for a tensor or a dataset; a loader's len() counts batches
    total = data.shape[0] if isinstance(data, Tensor) else (len(data) if _is_dataset(data) else None)
    bar = _progress(total, progress)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    results: list[Tensor] = []
    lengths: list[int] = []
    try:
        with torch.no_grad(), amp:
            for batch in _batches(data, batch_size):
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = mask.to(device) if mask is not None else None
                labels = batch.get("labels")
                labels = labels.to(device) if labels is not None else ids
                if mask is not None:
                    labels = labels.masked_fill(mask == 0, S.IGNORE_INDEX)
                out = fwd(input_ids=ids, attention_mask=mask) if mask is not None else fwd(input_ids=ids)
                logits = out if isinstance(out, Tensor) else out.logits
                target = S.aligned_labels(labels, causal)
                valid = S.valid_positions(mask, target, ids.shape, causal, ids.device)
                nll = F.cross_entropy(logits.float().transpose(1, 2), target.clamp(min=0), reduction="none")
                nll = torch.where(valid, nll, torch.zeros_like(nll))
                if per_token:
                    results.append(nll.cpu())
                else:
                    results.append((nll.sum(1) / valid.sum(1).clamp(min=1)).cpu())
                lengths.extend(batch.get("lengths", [ids.shape[1]] * ids.shape[0]))
                if bar is not None:
                    bar.update(ids.shape[0])
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if _is_dataset(data):
        if per_token:
            rows = [r for part in results for r in part]
            values = [row[:n].tolist() for row, n in zip(rows, lengths)]
        else:
            values = torch.cat(results).tolist()
        return data.add_column(column, values)
    if not results:
        return torch.zeros((0, 0) if per_token else (0,))
    if per_token:
        width = max(r.shape[1] for r in results)
        return torch.cat([F.pad(r, (0, width - r.shape[1])) for r in results])
    return torch.cat(results)
