"""Token difficulty, per-sequence aggregation, selection and the selective loss.

The single source of SPEC.md's math. Everything here is plain, traceable torch with static
shapes and no host synchronisation, so the module transform, the Dynamo backend's rewritten
graph, Inductor and the CPU all compute the same numbers (up to float rounding).

Conventions: ``labels`` are the user's labels ``[B, T]``; :func:`aligned_labels` turns them into
the label each *position* is scored against (``t+1`` for causal LMs, ``t`` for masked LMs), with
-100 where there is none. A position is *valid* when its attention mask is 1 and its aligned label
is not -100 (or, without labels, when its attention mask is 1 and it is not the last position of a
causal sequence).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

IGNORE_INDEX = -100


class TokenStats(NamedTuple):
    """Per-position statistics of the router's distribution, all float32 ``[B, T]``."""

    entropy: Tensor
    p1: Tensor
    p2: Tensor
    nll: Tensor  # -log p[label]; 0 where there is no label


def aligned_labels(labels: Tensor, causal: bool) -> Tensor:
    """The label each position is scored against: ``labels[:, t+1]`` (causal) or ``labels[:, t]``."""
    if not causal:
        return labels
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def valid_positions(
    attention_mask: Optional[Tensor], target: Optional[Tensor], shape: torch.Size, causal: bool,
    device: torch.device,
) -> Tensor:
    """Boolean ``[B, T]``: attention mask 1 and an aligned label that is not -100."""
    if target is not None:
        valid = target != IGNORE_INDEX
    else:
        valid = torch.ones(shape, dtype=torch.bool, device=device)
        if causal:  # the last position has nothing to predict
            valid = torch.cat([valid[:, :-1], torch.zeros_like(valid[:, :1])], dim=1)
    if attention_mask is not None:
        valid = valid & (attention_mask != 0)
    return valid


def token_stats(logits: Tensor, target: Optional[Tensor]) -> TokenStats:
    """Entropy, top-2 probabilities and label NLL of ``softmax(logits)``, in float32."""
    z = logits.float()
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    top2 = torch.topk(p, 2, dim=-1).values if z.shape[-1] >= 2 else torch.cat(
        [p, torch.zeros_like(p)], dim=-1
    )
    if target is None:
        nll = torch.zeros_like(entropy)
    else:
        safe = target.clamp(min=0).unsqueeze(-1)
        nll = -logp.gather(-1, safe).squeeze(-1)
        nll = torch.where(target != IGNORE_INDEX, nll, torch.zeros_like(nll))
    return TokenStats(entropy, top2[..., 0], top2[..., 1], nll)


def _zscore(x: Tensor, valid: Tensor) -> Tensor:
    w = valid.to(x.dtype)
    n = w.sum().clamp(min=1.0)
    mean = (x * w).sum() / n
    var = (((x - mean) ** 2) * w).sum() / n
    std = var.sqrt()
    # A constant signal carries no ranking information: its z-score is 0, not NaN.
    return torch.where(std > 0, (x - mean) / std.clamp(min=1e-12), torch.zeros_like(x))


def reference_per_position(reference_loss: Tensor, shape: torch.Size) -> Tensor:
    """A reference loss per sequence ``[B]`` or per position ``[B, T]`` as float32 ``[B, T]``.

    Per position, entry ``t`` is the reference model's loss at the position the router scores at
    ``t`` (causal LMs: predicting token ``t+1``, the loss's shift; what :func:`reference_losses`
    returns with ``per_token=True``). A per-sequence value is spread over the row's positions, so a
    row's mean reducible loss is its mean router loss minus its reference loss.
    """
    b, t = shape
    if not isinstance(reference_loss, Tensor) or not reference_loss.is_floating_point() \
            or tuple(reference_loss.shape) not in ((b,), (b, t)):
        got = tuple(reference_loss.shape) if isinstance(reference_loss, Tensor) else type(reference_loss).__name__
        raise ValueError(
            f"cggr: reference_loss must be a float tensor of shape ({b},) (one loss per sequence) or "
            f"({b}, {t}) (per position, aligned like the router's scores), got {got}; compute it with "
            "cggr_compile.reference_losses(reference_model, data)."
        )
    ref = reference_loss.float()
    return ref.unsqueeze(1).expand(b, t) if ref.dim() == 1 else ref


def token_difficulty(
    stats: TokenStats, valid: Tensor, scoring: str, has_labels: bool, reference: Optional[Tensor] = None,
) -> Tensor:
    """Difficulty per position (float32 ``[B, T]``), 0 at invalid positions (SPEC.md, Scoring).

    ``reference`` (``[B, T]``, :func:`reference_per_position`) is the reference loss that
    ``scoring='reducible'`` subtracts from the router's loss (RHO-LOSS's reducible loss, JEST's
    learnability): high where the learner is still wrong but a reference shows the text learnable.
    """
    if scoring == "reducible":
        if not has_labels:
            raise ValueError("scoring='reducible' needs labels: it is the router's loss on them minus a reference's.")
        if reference is None:
            raise ValueError(
                "scoring='reducible' needs a reference loss: pass reference_loss= with the batch "
                "(computed once with cggr_compile.reference_losses(reference_model, data)), or "
                "reference=<a reference model> in the options."
            )
        d = stats.nll - reference
        return torch.where(valid, d.float(), torch.zeros_like(d, dtype=torch.float32))
    margin = 1.0 - (stats.p1 - stats.p2)
    if scoring == "entropy":
        d = stats.entropy
    elif scoring == "margin":
        d = margin
    elif scoring == "loss":
        if not has_labels:
            raise ValueError("scoring='loss' needs labels; pass labels or choose 'entropy'.")
        d = stats.nll
    elif scoring == "combined":
        parts = [_zscore(stats.entropy, valid), _zscore(margin, valid)]
        if has_labels:
            parts.append(_zscore(stats.nll, valid))
        d = torch.stack(parts).mean(0)
    else:
        raise ValueError(f"unknown scoring {scoring!r}")
    return torch.where(valid, d.float(), torch.zeros_like(d, dtype=torch.float32))


def sequence_difficulty(difficulty: Tensor, valid: Tensor) -> Tensor:
    """Mean difficulty over each row's valid positions; ``-inf`` for a row with none."""
    w = valid.to(difficulty.dtype)
    n = w.sum(-1)
    mean = (difficulty * w).sum(-1) / n.clamp(min=1.0)
    return torch.where(n > 0, mean, torch.full_like(mean, -math.inf))


def hash_uniform(index: Tensor, seed: int, step: Tensor) -> Tensor:
    """Counter-based uniform numbers in [0, 1): the same on every device and inside graphs.

    A seeded ``torch.Generator`` cannot live inside a compiled graph; this integer hash of
    (seed, step, index) can, and it does not repeat across steps.

    The index (an ``arange``, which Inductor turns into index arithmetic, in int32 where the sizes
    allow) is first only added to: a salt below 2**30 and the step, a tensor, so that every product
    is int64 tensor math on every backend. Multiplying the index by a large constant first made
    Inductor emit int32 index code with an out-of-range constant (a Triton compile error on the H100
    for ``seed >= 1``) or, below that range, a product that overflows int32 where the CPU's does not.
    """
    mask = (1 << 31) - 1
    salt = (seed * 2654435761 + 12345) & ((1 << 30) - 1)
    h = (index.to(torch.int64) + salt + step.to(torch.int64) * 2246822519) & mask
    h = (h * 1103515245 + 12345) & mask
    for mult in (747796405, 277803737):
        h = (h ^ (h >> 15)) & mask
        h = (h * mult) & mask
    h = h ^ (h >> 13)
    return (h & mask).to(torch.float32) / float(1 << 31)


def _minimum(a: int | Tensor, b: int | Tensor) -> int | Tensor:
    return torch.minimum(a, b) if isinstance(a, Tensor) else min(a, b)


def _indicator(cond: bool | Tensor) -> int | Tensor:
    return cond.to(torch.int64) if isinstance(cond, Tensor) else int(cond)


def _stratum_plan(total: int | Tensor, budget: int | Tensor, s: int) -> tuple[list, list, list]:
    """``(bounds, sizes, quotas)`` of ``s`` strata over ``total`` ranked items (0 = hardest stratum).

    The one quota computation of both selections: ``total`` and ``budget`` are Python ints
    (sequences: static, see :func:`stratum_quotas`) or int64 tensors (tokens: the valid count is
    data, see :func:`_stratified_token_mask`); every step below means the same on both, so the two
    cannot drift. Stratum ``i`` holds ranks ``[floor(i*total/s), floor((i+1)*total/s))`` and gets a
    share of ``budget`` proportional to ``s - i`` (rounded down, the rounding leftover handed to the
    harder strata first); a quota larger than its stratum passes the excess on to the next stratum,
    and what the last stratum cannot take wraps to the hardest strata that still have room.
    """
    bounds = [(total * i) // s for i in range(s + 1)]
    sizes = [bounds[i + 1] - bounds[i] for i in range(s)]
    weights = [s - i for i in range(s)]
    total_w = sum(weights)
    # Integer floor division: exact, where a float quotient could round up to the next integer.
    quota = [(budget * w) // total_w for w in weights]
    left = budget - sum(quota)  # < s: one more for each of the hardest ``left`` strata
    quota = [q + _indicator(left > i) for i, q in enumerate(quota)]
    carry = 0
    for i in range(s):
        want = quota[i] + carry
        quota[i] = _minimum(want, sizes[i])
        carry = want - quota[i]
    for i in range(s):  # leftover (only when the easy strata are small): fill from the top
        extra = _minimum(carry, sizes[i] - quota[i])
        quota[i] = quota[i] + extra
        carry = carry - extra
    return bounds, sizes, quota


def stratum_quotas(total: int, budget: int, num_strata: int) -> list[tuple[int, int, int]]:
    """Static (start, size, quota) per stratum for ``total`` ranked items (0 = hardest stratum).

    ``min(num_strata, total)`` strata, split as :func:`_stratum_plan` says.
    """
    bounds, sizes, quota = _stratum_plan(total, budget, min(num_strata, total))
    return list(zip(bounds[:-1], sizes, quota))


def select_sequences(
    seq_difficulty: Tensor, k: int, selection: str, num_strata: int = 4, seed: int = 0,
    step: Optional[Tensor] = None,
) -> Tensor:
    """Indices (int64 ``[k]``, ascending) of the rows to train on. ``k`` is a static int.

    Ties break towards the lower index; rows with no valid position (``-inf``) are never chosen
    while others remain.
    """
    b = seq_difficulty.shape[0]
    order = torch.sort(seq_difficulty, descending=True, stable=True).indices
    if selection in ("topk", "fixed_quota") or k >= b:
        chosen = order[:k]
    elif selection == "stratified":
        step_t = step if step is not None else torch.zeros((), dtype=torch.int64, device=order.device)
        picks = []
        for start, size, quota in stratum_quotas(b, k, num_strata):
            if quota == 0:
                continue
            members = order[start : start + size]
            keys = hash_uniform(members, seed, step_t)
            within = torch.sort(keys, stable=True).indices[:quota]
            picks.append(members[within])
        drawn = torch.cat(picks)
        # A row without valid positions may have been drawn from the last stratum: swap it for
        # the hardest undrawn valid row, keeping the count static.
        picked = torch.zeros(b, dtype=torch.bool, device=order.device).index_fill(0, drawn, True)
        has_valid = torch.isfinite(seq_difficulty)
        priority = picked.to(torch.int64) * 2 + has_valid.to(torch.int64) * 4
        rank_of = _positions_in(order)
        key = priority * (b + 1) + (b - rank_of)
        chosen = torch.sort(key, descending=True, stable=True).indices[:k]
    else:
        raise ValueError(
            f"selection {selection!r} does not apply to sequences; use 'topk', 'stratified' or "
            "'fixed_quota'."
        )
    return torch.sort(chosen).values


def token_budget(valid: Tensor, ratio: float | Tensor) -> Tensor:
    """``ceil(ratio * n)`` of the ``n`` valid positions (int64 tensor), at least 1 when ``n > 0``."""
    n = valid.sum()
    ratio_t = torch.as_tensor(ratio, dtype=torch.float64, device=valid.device)
    budget = torch.ceil(ratio_t * n.to(torch.float64) - 1e-9).to(torch.int64)
    return torch.where(n > 0, budget.clamp(min=1), budget).clamp(max=n)


def _positions_in(order: Tensor) -> Tensor:
    """The inverse of the permutation ``order`` (1-D): each entry's position in it."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))


def _descending_rank(flat: Tensor) -> Tensor:
    """Each entry's rank (0 = largest; ties towards the lower index) of a 1-D tensor."""
    return _positions_in(torch.sort(flat, descending=True, stable=True).indices)


def _lower_median(x: Tensor, valid: Tensor, n: Tensor) -> Tensor:
    """The lower median of ``x`` over ``valid`` (1-D), by sorting: no host sync, static shapes."""
    ascending = torch.sort(torch.where(valid, x, torch.full_like(x, math.inf))).values
    return ascending.index_select(0, ((n - 1).clamp(min=0) // 2).reshape(1)).squeeze(0)


def truncation_skips(
    scores: Tensor, valid: Tensor, keep: int | Tensor, share: Optional[float], spread: float,
) -> Tensor:
    """Boolean mask (``scores``' shape) of the entries loss truncation drops: the hardest ones.

    ``share`` given: the ``floor(share * n)`` highest of the ``n`` valid entries. None: the batch's
    outliers, the valid entries above ``median + spread * 1.4826 * MAD`` (the median absolute
    deviation, scaled to a normal's standard deviation): robust to up to half of the batch being
    junk, and on data without junk it drops almost nothing; nothing where ``MAD`` is 0. Either way
    at most ``n - keep`` entries are dropped (highest first), so at least ``keep`` stay to draw from.
    """
    flat = scores.reshape(-1).float()
    v = valid.reshape(-1)
    n = v.sum()
    rank = _descending_rank(torch.where(v, flat, torch.full_like(flat, -math.inf)))
    room = (n - keep).clamp(min=0)
    if share is not None:
        cut = torch.floor(n.to(torch.float64) * float(share) + 1e-9).to(torch.int64)
        skip = rank < torch.minimum(cut, room)
    else:
        median = _lower_median(flat, v, n)
        mad = _lower_median((flat - median).abs(), v, n)
        threshold = median + float(spread) * 1.4826 * mad
        skip = (flat > threshold) & (mad > 0) & (rank < room)
    return (skip & v).reshape(scores.shape)


def _uniform_rank(valid: Tensor, skip: Tensor, seed: int, step: Optional[Tensor], avoid: Optional[Tensor] = None) -> Tensor:
    """A uniformly random rank of each entry (1-D), the kept valid entries first, then the skipped
    ones, then ``avoid`` (already drawn) ones, then the invalid ones: ``rank < c`` draws ``c`` uniformly
    among the kept entries (the skipped ones only once those run out)."""
    dev = valid.device
    step_t = step if step is not None else torch.zeros((), dtype=torch.int64, device=dev)
    key = hash_uniform(torch.arange(valid.shape[0], device=dev), seed, step_t) + 2.0 * skip.float() \
        + 8.0 * (~valid).float()
    if avoid is not None:
        key = key + 4.0 * avoid.float()
    return _positions_in(torch.sort(key, stable=True).indices)


def probe_rows(k: int, probe_share: float) -> int:
    """How many of the ``k`` rows a truncation draws uniformly from the whole batch: ``ceil(share * k)``,
    at most ``k - 1`` (0 for ``k = 1``)."""
    if probe_share <= 0 or k < 2:
        return 0
    return min(k - 1, math.ceil(probe_share * k - 1e-9))


def truncated_draw(
    rows_valid: Tensor, skip: Tensor, k: int, probes: int, seed: int = 0, step: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``selection='truncation'`` over rows: ``(idx, inclusion)``, ``k`` row indices (int64,
    ascending, distinct) and each drawn row's probability of having been drawn.

    ``k - probes`` rows are drawn uniformly among the valid rows outside ``skip``; then ``probes``
    rows uniformly among all the valid rows not drawn yet, skipped ones included, so that the
    learned exit keeps seeing some of what truncation skips (it only fits on trained rows). The
    inclusion probabilities are exact for this two-stage draw: the exit's fit weighs each row by
    their inverse, which makes its fit the whole batch's regression, skipped rows included.
    """
    dev = rows_valid.device
    step_t = step if step is not None else torch.zeros((), dtype=torch.int64, device=dev)
    regular = k - probes
    first = _uniform_rank(rows_valid, skip, seed, step_t) < regular
    second = _uniform_rank(rows_valid, torch.zeros_like(skip), seed + 2, step_t, avoid=first) < probes
    drawn = first | second  # disjoint: the second draw ranks the first's rows after every other row
    idx = torch.sort(torch.sort(drawn.to(torch.int8), descending=True, stable=True).indices[:k]).values
    n_valid = rows_valid.sum().to(torch.float32)
    n_kept = (rows_valid & ~skip).sum().to(torch.float32)
    took = torch.minimum(n_kept, torch.tensor(float(regular), device=dev))
    p_first = took / n_kept.clamp(min=1.0)
    rest = (n_valid - took).clamp(min=1.0)
    p_second = torch.minimum(rest, torch.tensor(float(probes), device=dev)) / rest
    inclusion = torch.where(skip, p_second, p_first + (1.0 - p_first) * p_second)
    return idx, inclusion.index_select(0, idx)


def importance_probabilities(seq_difficulty: Tensor, counts: Tensor, floor: float | Tensor) -> Tensor:
    """Sampling probability of each row (float32 ``[B]``, summing to 1) for ``selection='importance'``.

    ``p_i = (1 - floor) * n_i s_i / sum_j n_j s_j + floor * n_i / N``: the row's share of the batch's
    total difficulty (its mean difficulty ``s_i`` times its ``n_i`` valid positions), mixed with its
    share of the ``N`` valid positions. Scores are made nonnegative first by shifting them up by the
    batch's lowest row score when that is negative (``combined`` z-scores); rows without valid
    positions get 0. When every score is 0 the token share alone is used; with no valid position
    at all, uniform.
    """
    n = counts.to(torch.float32)
    has = n > 0
    s = torch.where(has, seq_difficulty.float(), torch.zeros_like(n))
    lowest = torch.where(has, s, torch.full_like(s, math.inf)).amin()
    shift = torch.where(torch.isfinite(lowest), lowest.clamp(max=0.0), torch.zeros_like(lowest))
    s = torch.where(has, s - shift, torch.zeros_like(s))
    mass = n * s
    total_n = n.sum()
    total_mass = mass.sum()
    share = n / total_n.clamp(min=1.0)
    rel = torch.where(total_mass > 0, mass / total_mass.clamp(min=1e-30), share)
    f = floor if isinstance(floor, Tensor) else float(floor)  # a tensor: a cold exit's 1.0 (selection.py)
    p = (1.0 - f) * rel + f * share
    uniform = torch.full_like(p, 1.0 / p.shape[0])
    return torch.where(total_n > 0, p, uniform)


def sample_importance(probs: Tensor, k: int, seed: int = 0, step: Optional[Tensor] = None) -> Tensor:
    """``k`` row indices (int64, ascending, repeats allowed) drawn with probabilities ``probs``.

    Systematic sampling: one counter-based uniform ``U`` per (seed, step), points ``(m + U) / k``
    for ``m = 0..k-1`` mapped through the inverse CDF. Each row is drawn ``floor(k p_i)`` or
    ``ceil(k p_i)`` times, ``k p_i`` times on average, which is all the weights of
    :func:`importance_weights` need to make the loss unbiased. Static shapes, no host sync; a
    row with ``p_i = 0`` is never drawn.
    """
    b = probs.shape[0]
    dev = probs.device
    step_t = step if step is not None else torch.zeros((), dtype=torch.int64, device=dev)
    u = hash_uniform(torch.zeros(1, dtype=torch.int64, device=dev), seed, step_t)
    cdf = torch.cumsum(probs.float(), 0)
    points = (torch.arange(k, device=dev, dtype=torch.float32) + u) / k * cdf[-1]
    idx = torch.searchsorted(cdf, points, right=True)
    # Float rounding may point past the last row that can be drawn: clamp to it.
    last = (torch.arange(b, device=dev) * (probs > 0).to(torch.int64)).amax()
    return torch.minimum(idx, last)


def importance_weights(valid_rows: Tensor, probs: Tensor, idx: Tensor) -> Tensor:
    """Loss weight ``1 / (k p_i)`` on each valid position of the drawn rows (float32 ``[k, T]``).

    Summed over the drawn rows, ``weight * token loss`` is an unbiased estimate of the whole batch's
    summed token loss (and ``weight.sum()`` of its valid positions): divided by the batch's valid
    positions it estimates the full batch's mean loss without bias.
    """
    k = idx.shape[0]
    scale = 1.0 / (k * probs.index_select(0, idx).clamp(min=1e-30))
    return valid_rows.to(torch.float32) * scale.unsqueeze(-1)


def select_tokens(
    difficulty: Tensor, valid: Tensor, ratio: float | Tensor, selection: str, num_strata: int = 4,
    min_tokens_per_sequence: int = 1, seed: int = 0, step: Optional[Tensor] = None,
    skip: Optional[Tensor] = None,
) -> Tensor:
    """Boolean ``[B, T]`` mask of the selected positions: ``ceil(ratio * n)`` of the ``n`` valid ones.

    ``n`` is data, so the count is a tensor and selection is done by ranking (static shapes).
    ``selection='truncation'`` draws them uniformly among the valid positions outside ``skip``
    (``[B, T]`` bool, :func:`truncation_skips`, which leaves at least that many).
    """
    flat = torch.where(valid, difficulty, torch.full_like(difficulty, -math.inf)).reshape(-1)
    n = valid.sum()
    budget = token_budget(valid, ratio)
    vflat = valid.reshape(-1)
    if selection in ("topk", "fixed_quota", "sequence_aware"):
        chosen = _descending_rank(flat) < budget
    elif selection == "stratified":
        chosen = _stratified_token_mask(_descending_rank(flat), n, budget, num_strata, seed, step)
    elif selection == "truncation":  # ranks by its own draw, not by difficulty
        if skip is None:
            raise ValueError("selection='truncation' needs the skipped positions (scoring.truncation_skips)")
        chosen = _uniform_rank(vflat, skip.reshape(-1), seed, step) < budget
    else:
        raise ValueError(f"unknown selection {selection!r}")
    chosen = (chosen & vflat).reshape(valid.shape)
    if selection == "sequence_aware" and min_tokens_per_sequence > 0:
        row = torch.where(valid, difficulty, torch.full_like(difficulty, -math.inf))
        row_order = torch.sort(row, dim=1, descending=True, stable=True).indices
        t = valid.shape[1]
        ar = torch.arange(t, device=flat.device).expand_as(row_order)
        row_rank = torch.empty_like(row_order).scatter_(1, row_order, ar)
        chosen = chosen | ((row_rank < min_tokens_per_sequence) & valid)
    return chosen


def _stratified_token_mask(
    rank: Tensor, n: Tensor, budget: Tensor, num_strata: int, seed: int, step: Optional[Tensor]
) -> Tensor:
    """Stratified selection over the ``n`` valid ranks with tensor (data-dependent) quotas."""
    dev = rank.device
    s = num_strata
    nf = n.to(torch.int64)
    bounds, _, quota = _stratum_plan(nf, budget.to(torch.int64), s)
    stratum = torch.zeros_like(rank)
    for i in range(1, s):
        stratum = stratum + (rank >= bounds[i]).to(torch.int64)
    step_t = step if step is not None else torch.zeros((), dtype=torch.int64, device=dev)
    keys = hash_uniform(torch.arange(rank.shape[0], device=dev), seed, step_t)
    # Rank within the stratum by random key: sort by (stratum, key).
    composite = stratum.to(torch.float64) * 2.0 + keys.to(torch.float64)
    composite = torch.where(rank < nf, composite, torch.full_like(composite, math.inf))
    order = torch.sort(composite, stable=True).indices
    pos = _positions_in(order)
    stratum_start = torch.stack(bounds[:-1])[stratum.clamp(max=s - 1)]
    within = pos - stratum_start
    q = torch.stack(quota)[stratum.clamp(max=s - 1)]
    return (rank < nf) & (within < q)


def selective_cross_entropy(
    logits: Tensor, target: Tensor, weight: Tensor, denominator: Optional[Tensor | int | float] = None,
    return_token_loss: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mean next-token cross-entropy over the positions where ``weight`` is true.

    ``target`` is aligned with the positions (see :func:`aligned_labels`). No position gives a
    zero that is still connected to the graph, never NaN. ``denominator`` replaces the count of
    selected positions (gradient accumulation, data parallelism: the selected tokens of every
    micro-batch and rank, so that each selected token weighs the same). A floating ``weight``
    (``selection='importance'``) weighs each position's loss: ``sum(weight * loss) / denominator``,
    the denominator defaulting to ``weight.sum()``.

    ``return_token_loss=True`` returns ``(loss, token_loss)``: ``token_loss`` shaped like ``target``,
    detached, the cross-entropy at every position with a label (selected or not), 0 at -100;
    float32, or float64 (the loss too) for float64 logits.
    """
    v = logits.shape[-1]
    if return_token_loss:
        # One cross-entropy over every labelled position: the selected ones are summed, and all
        # of them come back detached.
        flat = logits.reshape(-1, v)
        flat = flat if flat.dtype == torch.float64 else flat.float()
        per = torch.nn.functional.cross_entropy(flat, target.reshape(-1), ignore_index=IGNORE_INDEX,
                                                reduction="none")
        w = weight.reshape(-1)
        # where, not multiply: the unselected positions' losses are computed now (0 * inf is NaN)
        if weight.is_floating_point():
            total = torch.where(w != 0, per * w.to(per.dtype), torch.zeros_like(per)).sum()
            if denominator is None:
                loss = total / weight.sum().to(total.dtype).clamp(min=1e-12)
            else:
                loss = total / torch.as_tensor(denominator, device=total.device).clamp(min=1).to(total.dtype)
        else:
            total = torch.where(w, per, torch.zeros_like(per)).sum()
            count = weight.sum() if denominator is None else torch.as_tensor(denominator, device=total.device)
            loss = total / count.clamp(min=1).to(total.dtype)
        return loss, per.detach().reshape(target.shape)
    flat = logits.reshape(-1, v).float()
    if weight.is_floating_point():
        tgt = torch.where(weight != 0, target, torch.full_like(target, IGNORE_INDEX)).reshape(-1)
        per = torch.nn.functional.cross_entropy(flat, tgt, ignore_index=IGNORE_INDEX, reduction="none")
        total = (per * weight.reshape(-1).float()).sum()
        if denominator is None:
            return total / weight.sum().to(total.dtype).clamp(min=1e-12)
        return total / torch.as_tensor(denominator, device=total.device).clamp(min=1).to(total.dtype)
    tgt = torch.where(weight, target, torch.full_like(target, IGNORE_INDEX)).reshape(-1)
    total = torch.nn.functional.cross_entropy(flat, tgt, ignore_index=IGNORE_INDEX, reduction="sum")
    count = weight.sum() if denominator is None else torch.as_tensor(denominator, device=total.device)
    return total / count.clamp(min=1).to(total.dtype)


def batch_metrics(stats: TokenStats, difficulty: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """Mean confidence (top-1 probability), entropy and difficulty over the valid positions."""
    w = valid.to(torch.float32)
    n = w.sum().clamp(min=1.0)
    return {
        "avg_confidence": (stats.p1 * w).sum() / n,
        "avg_entropy": (stats.entropy * w).sum() / n,
        "avg_difficulty": (difficulty * w).sum() / n,
    }
