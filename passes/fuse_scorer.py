"""Pass: the router's output head and softmax scoring become one ``cggr::fused_token_stats`` call.

Precondition: a rewritten step graph from ``trace_routed_step``, traced with the router's scoring
unfused (a ``RoutedPlan`` with ``fuse_scorer=False``, as the backend traces it): pre-dispatch ATen nodes
with fake tensors in ``meta["val"]``, where the router's statistics are ``scoring.token_stats`` of
the head's logits::

    z = linear(h, W, b)  |  matmul(h, t(W))        the head, on the router's final hidden state
    z = mul(tanh(div(z, c)), c)                    optional: logit soft-capping (Gemma2)
    z = to(z, float32)                             zero or more casts to float32
    logp = log_softmax(z, -1);  p = exp(logp)
    entropy = neg(sum(mul(p, logp), [-1]))
    top = topk(p, 2)[0];  p1 = select(top, -1, 0);  p2 = select(top, -1, 1)
    nll = neg(squeeze(gather(logp, -1, unsqueeze(clamp(target, 0), -1)), -1)),
          read only through where(target != -100, nll, ...)

Guarantees: where the pattern is found and the fusion pays (:func:`fusion_pays`), ``entropy``,
``p1``, ``p2`` and ``nll`` are read from one ``fused_token_stats(h.reshape(N, H), W, b,
target.reshape(N), c)`` node instead, and the logits, ``log_softmax``, ``exp``, ``topk`` and
``gather`` are erased, so the ``N x V`` logits are never written. The numbers are the unfused ones
up to float rounding (the op's ``nll`` is 0 where the label is -100, which the ``where`` above
already selected). Every node it adds has a ``meta["val"]`` computed by running the op under the
graph's fake mode; it sits in the same grad-mode region as the unfused scoring (no grad: the op
has no backward); nothing is mutated, and the only views it adds are reshapes of the op's inputs
(read only) and of its fresh outputs, so no graph input or output gains an alias. The soft-cap
constant becomes the op's ``softcap`` argument (the op implements it), so Gemma2 fuses too. For a
head with more than one layer (BERT's transform + decoder) only the final linear is fused; what
comes before it stays in the graph.

Where it does not apply it changes nothing; the result (and a debug log line) says why.

The pattern above is what ``cggr_compile.scoring.token_stats`` traces to (tests/test_pass_fuse_scorer.py
traces that very function and asserts the matcher takes all of it, so the two cannot drift). As
Inductor's pattern matcher does, the pass counts in ``torch._dynamo.utils.counters["cggr"]``:
``fuse_scorer_candidates`` (``log_softmax`` nodes looked at), ``fuse_scorer_matched`` (scoring
subgraphs recognised) and ``fuse_scorer_fused`` (replaced by the op).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from cggr_compile.ops import fused_scorer as fs
from cggr_compile.passes.pass_context import PassContext, record_pass
from cggr_compile.scoring import IGNORE_INDEX

log = logging.getLogger(__name__)
aten = torch.ops.aten

# Smallest vocabulary for which the Triton kernel replaces Inductor's unfused kernels. Below it the
# logits are small next to the rest of the router, and most of each of the kernel's vocabulary
# tiles (64 to 256 columns) would be padding.
MIN_VOCAB = 1024


@dataclass
class FuseScorerResult:
    """What the pass did: ``fused`` subgraphs replaced, and a line that says why (or what)."""

    fused: int
    reason: str

    def __bool__(self) -> bool:
        return self.fused > 0


class _NoMatch(Exception):
    """The candidate is not the router's scoring subgraph (the message says where it differs)."""


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_call(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _last_dim(node: fx.Node, dim: Any) -> bool:
    val = _val(node)
    return isinstance(dim, int) and isinstance(val, torch.Tensor) and dim in (-1, val.dim() - 1)


def _dims_last(node: fx.Node, dims: Any) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and _last_dim(node, dims[0])


def _only_user(node: fx.Node, what: str) -> fx.Node:
    if len(node.users) != 1:
        raise _NoMatch(
            f"{what} ({node.name}) has {len(node.users)} users "
            f"({', '.join(u.name for u in node.users)}): fusing would still materialise it"
        )
    return next(iter(node.users))


_CASTS = (aten.to.dtype, aten._to_copy.default)


def _is_float32_cast(node: fx.Node) -> bool:
    if not _is_call(node, *_CASTS):
        return False
    val = _val(node)
    extra = {k: v for k, v in node.kwargs.items() if k not in ("dtype", "non_blocking", "copy")}
    return isinstance(val, torch.Tensor) and val.dtype == torch.float32 and not extra


@dataclass
class _Match:
    hidden: fx.Node
    weight: fx.Node
    bias: Optional[fx.Node]
    softcap: Optional[float]
    target: Optional[fx.Node]  # the aligned labels [B, T] (None: the graph has no label NLL)
    log_softmax: fx.Node
    outputs: dict  # "entropy" / "p1" / "p2" / "nll" -> node whose value the op's output replaces
    dead: list  # nodes left without users once the outputs are replaced (erased, last first)


def _match_head(z: fx.Node, dead: list) -> tuple[fx.Node, fx.Node, Optional[fx.Node], Optional[float]]:
    """Walk back from the log_softmax input: float32 casts, soft-capping, then the head."""
    _only_user(z, "the router's logits")
    while _is_float32_cast(z):
        dead.append(z)
        z = z.args[0]
        _only_user(z, "the router's logits")
    softcap = None
    if _is_call(z, aten.mul.Tensor, aten.mul.Scalar):
        a, b = z.args[:2]
        tanh, c = (a, b) if isinstance(a, fx.Node) else (b, a)
        div = tanh.args[0] if _is_call(tanh, aten.tanh.default) else None
        if not (isinstance(c, (int, float)) and _is_call(div, aten.div.Tensor, aten.div.Scalar)
                and div.args[1] == c and c > 0):
            raise _NoMatch(f"the logits come from {z.target} ({z.name}), not from the head or c * tanh(z / c)")
        softcap = float(c)
        dead.append(z)
        _only_user(tanh, "the soft-capped logits")
        dead.append(tanh)
        _only_user(div, "the soft-capped logits")
        dead.append(div)
        z = div.args[0]
        _only_user(z, "the router's logits")
    while _is_float32_cast(z):  # (a cast between the head and the soft-capping)
        dead.append(z)
        z = z.args[0]
        _only_user(z, "the router's logits")
    if _is_call(z, aten.linear.default):
        hidden, weight = z.args[:2]
        bias = z.args[2] if len(z.args) > 2 else z.kwargs.get("bias")
        dead.append(z)
    elif _is_call(z, aten.matmul.default) and _is_call(z.args[1], aten.t.default):
        hidden, wt = z.args[:2]
        weight, bias = wt.args[0], None
        dead.append(z)
        if len(wt.users) == 1:
            dead.append(wt)
    else:
        what = z.target if isinstance(z, fx.Node) and z.op == "call_function" else getattr(z, "op", type(z).__name__)
        raise _NoMatch(f"the logits are not the output of one linear layer (they come from {what})")
    h, w, b = _val(hidden), _val(weight), _val(bias) if bias is not None else None
    if not (isinstance(h, torch.Tensor) and isinstance(w, torch.Tensor) and w.dim() == 2 and h.dim() >= 1
            and h.shape[-1] == w.shape[1]):
        raise _NoMatch("the head's weight is not a [V, H] matrix applied to [..., H] hidden states")
    if bias is not None and not (isinstance(bias, fx.Node) and isinstance(b, torch.Tensor)
                                 and tuple(b.shape) == (w.shape[0],)):
        raise _NoMatch("the head's bias is not a [V] vector")
    if w.dtype not in fs._SUPPORTED_DTYPES or h.dtype != w.dtype:
        raise _NoMatch(f"the head runs in {h.dtype} x {w.dtype}; the op takes float32, bfloat16 or "
                       "float16 hidden states of the weight's dtype")
    return hidden, weight, bias, softcap


def _users_by_op(node: fx.Node, ops: dict, what: str, skip: Optional[fx.Node] = None) -> dict:
    """``{name: user}``: each user of ``node`` (but ``skip``) must be the one call of one of ``ops``."""
    found: dict = {}
    for u in node.users:
        if u is skip:
            continue
        name = next((n for n, op in ops.items() if n not in found and _is_call(u, op)), None)
        if name is None:
            raise _NoMatch(f"{what} are also read by {u.target} ({u.name})")
        found[name] = u
    return found


def _match(ls: fx.Node) -> _Match:
    """The scoring subgraph around one ``log_softmax`` node, or :class:`_NoMatch`."""
    z = ls.args[0]
    if not (len(ls.args) >= 2 and _last_dim(ls, ls.args[1]) and not (len(ls.args) > 2 and ls.args[2])
            and not ls.kwargs):
        raise _NoMatch("log_softmax is not over the last dim in float32")
    if not isinstance(z, fx.Node) or _val(ls).dtype != torch.float32:
        raise _NoMatch("log_softmax is not over float32 logits")
    dead: list = []
    outputs: dict = {}
    users = _users_by_op(ls, {"exp": aten.exp.default, "mul": aten.mul.Tensor, "gather": aten.gather.default},
                         "the log-probabilities")
    exp, mul, gather = users.get("exp"), users.get("mul"), users.get("gather")
    if exp is None:
        raise _NoMatch("no softmax probabilities (exp of log_softmax)")
    if mul is not None and set(mul.args[:2]) != {exp, ls}:
        raise _NoMatch(f"{mul.name} is not p * log p")
    topk = _users_by_op(exp, {"topk": aten.topk.default}, "the probabilities", skip=mul).get("topk")
    if topk is None:
        raise _NoMatch("no top-2 of the probabilities")
    k = topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    largest = topk.args[3] if len(topk.args) > 3 else topk.kwargs.get("largest", True)
    if k != 2 or not _last_dim(exp, dim) or not largest:
        raise _NoMatch("the top-k of the probabilities is not their two largest over the last dim")

    # entropy = neg(sum(p * logp, [-1]))
    if mul is not None:
        s = _only_user(mul, "p * log p")
        if not (_is_call(s, aten.sum.dim_IntList) and _dims_last(mul, s.args[1])
                and not (len(s.args) > 2 and s.args[2]) and not s.kwargs.get("keepdim")
                and s.kwargs.get("dtype") is None):
            raise _NoMatch(f"p * log p is reduced by {s.target} ({s.name}), not summed over the last dim")
        ent = _only_user(s, "sum(p * log p)")
        if not _is_call(ent, aten.neg.default):
            raise _NoMatch(f"sum(p * log p) is read by {ent.target} ({ent.name}), not negated")
        outputs["entropy"] = ent
        dead += [ent, s, mul]

    # p1, p2 = topk(p, 2).values[..., 0], [..., 1]
    for u in topk.users:
        if not (_is_call(u, operator.getitem) and u.args[1] == 0):
            raise _NoMatch(f"the top-2 indices are read by {u.name}")
        for sel in u.users:
            if not (_is_call(sel, aten.select.int) and _last_dim(u, sel.args[1]) and sel.args[2] in (0, 1)):
                raise _NoMatch(f"the top-2 values are read by {sel.target} ({sel.name})")
            name = "p1" if sel.args[2] == 0 else "p2"
            if name in outputs:
                raise _NoMatch(f"two reads of {name}")
            outputs[name] = sel
            dead.append(sel)
        dead.append(u)
    dead += [topk, exp]

    # nll = neg(squeeze(gather(logp, -1, unsqueeze(clamp(target, 0), -1)), -1)), read through a -100 mask
    target = None
    if gather is not None:
        idx = gather.args[2] if len(gather.args) > 2 else None
        clamp = idx.args[0] if _is_call(idx, aten.unsqueeze.default) and _last_dim(idx, idx.args[1]) else None
        if not (_last_dim(ls, gather.args[1]) and _is_call(clamp, aten.clamp.default, aten.clamp_min.default)
                and clamp.args[1:2] == (0,) and not (len(clamp.args) > 2 and clamp.args[2] is not None)):
            raise _NoMatch("the gathered log-probabilities are not at the labels clamped to >= 0")
        target = clamp.args[0]
        tval = _val(target)
        if not (isinstance(tval, torch.Tensor) and tval.dtype == torch.int64
                and tuple(tval.shape) == tuple(_val(ls).shape[:-1])):
            raise _NoMatch("the labels are not int64 and shaped like the positions")
        sq = _only_user(gather, "the gathered log-probability")
        nll = _only_user(sq, "the gathered log-probability") if _is_call(sq, aten.squeeze.dim) else None
        if nll is None or not _is_call(nll, aten.neg.default):
            raise _NoMatch("the gathered log-probability is not negated into an NLL")
        for u in nll.users:
            masked = _is_call(u, aten.where.self) and u.args[1] is nll and _is_ignore_mask(u.args[0], target)
            if not (masked or _is_call(u, aten.zeros_like.default)):
                raise _NoMatch(f"the label NLL is read by {u.target} ({u.name}) without its -100 mask")
        outputs["nll"] = nll
        dead += [nll, sq, gather]
        if len(idx.users) == 1:
            dead.append(idx)
            if len(clamp.users) == 1:
                dead.append(clamp)
    dead.append(ls)
    if not outputs:
        raise _NoMatch("none of entropy, p1, p2 or the NLL is used")
    hidden, weight, bias, softcap = _match_head(z, dead)
    # Everything erased must be read only by what is erased with it (the outputs' readers move to the op).
    gone = set(dead)
    for node in gone:
        if node not in outputs.values() and not set(node.users) <= gone:
            raise _NoMatch(f"{node.name} is also read outside the scoring "
                           f"({', '.join(u.name for u in node.users if u not in gone)})")
    return _Match(hidden, weight, bias, softcap, target, ls, outputs, dead)


def _is_ignore_mask(node: Any, target: fx.Node) -> bool:
    return _is_call(node, aten.ne.Scalar) and node.args[0] is target and node.args[1] == IGNORE_INDEX


def fusion_pays(hidden: torch.Tensor, vocab: int, tokens: int) -> Optional[str]:
    """None when the fused op beats the unfused scoring for these (fake) inputs, else why not.

    On CUDA with Triton the op is the fused kernel, which never writes the ``N x V`` logits: it pays
    from ``MIN_VOCAB`` columns on. Elsewhere it is the chunked torch computation of the same math,
    which saves memory only once the logits exceed one of its chunks (below, it is the unfused
    computation in a different order, and a little slower).
    """
    if fs._use_triton(hidden):
        if vocab < MIN_VOCAB:
            return (f"the vocabulary ({vocab}) is below MIN_VOCAB={MIN_VOCAB}: the logits are small and "
                    "Inductor's unfused kernels are as fast as the fused kernel there")
        return None
    if tokens * vocab <= fs._TORCH_CHUNK_ELEMS:
        return (f"on {hidden.device.type} the op is the chunked torch computation, which saves memory only "
                f"when the logits exceed one chunk; these are {tokens} x {vocab} <= {fs._TORCH_CHUNK_ELEMS} elements")
    return None


def _grad_modes(graph: fx.Graph) -> dict:
    """Grad mode in force at each node (None: the caller's, unknown), from ``_set_grad_enabled`` nodes."""
    mode, modes = None, {}
    for node in graph.nodes:
        modes[node] = mode
        if _is_call(node, torch._C._set_grad_enabled) and isinstance(node.args[0], bool):
            mode = node.args[0]
    return modes


def _set_val(node: fx.Node, val: Any) -> None:
    node.meta["val"] = val
    if isinstance(val, torch.Tensor):
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        node.meta["tensor_meta"] = _extract_tensor_metadata(val)


def _rewrite(gm: fx.GraphModule, m: _Match, order: dict, modes: dict, autocast_dtype: Optional[torch.dtype]) -> None:
    graph = gm.graph
    h_val, w_val = _val(m.hidden), _val(m.weight)
    # A pre-dispatch graph traced under autocast still shows the head in float32 (autocast applies
    # below it, when the graph is compiled); the unfused head would run in the autocast dtype, so the
    # op must get its inputs in that dtype too, or its matmul runs in float32 (~10x slower). The op's
    # autocast rule would cast them when the graph runs; the pass writes the casts into the graph
    # instead, so that every node's meta["val"] states the dtype that actually runs (the invariant of
    # passes/README.md) and the rewrite does not depend on an autocast region at lowering time.
    cast = autocast_dtype if autocast_dtype is not None and h_val.dtype == torch.float32 else None
    lead = tuple(h_val.shape[:-1])
    n = 1
    for d in lead:
        n *= d
    inputs = [x for x in (m.hidden, m.weight, m.bias, m.target) if x is not None]
    anchor = max(inputs, key=lambda x: order[x])
    first_read = min(order[u] for out in m.outputs.values() for u in out.users) if any(
        out.users for out in m.outputs.values()) else len(order)
    if order[anchor] >= first_read:
        raise _NoMatch("the labels are computed after the scores are first used")
    at = anchor.next
    if modes.get(at) is not False or modes.get(m.log_softmax) is not False:
        raise _NoMatch("the scoring does not run under no_grad (the op has no backward)")

    fake_mode = getattr(h_val, "fake_mode", None) or torch._guards.detect_fake_mode([h_val])
    if fake_mode is None:
        raise _NoMatch("the graph carries no fake tensors")
    b_val = _val(m.bias)
    try:
        with fake_mode:
            h2_val = h_val.reshape(n, h_val.shape[-1])
            if cast is not None:
                h2_val, w_val = h2_val.to(cast), w_val.to(cast)
                b_val = b_val.to(cast) if b_val is not None else None
            if m.target is not None:
                lab_val = _val(m.target).reshape(n)
            else:
                lab_val = torch.full((n,), IGNORE_INDEX, dtype=torch.int64, device=h_val.device)
            outs_val = torch.ops.cggr.fused_token_stats.default(h2_val, w_val, b_val, lab_val, m.softcap)
            views_val = [o.reshape(lead) for o in outs_val]
    except Exception as err:  # noqa: BLE001 - never break the step: leave the scoring unfused
        raise _NoMatch(f"the op did not run on the graph's fake tensors ({type(err).__name__}: {err})") from err

    with graph.inserting_before(at):
        h2 = graph.call_function(aten.reshape.default, (m.hidden, [n, h_val.shape[-1]]))
        weight, bias = m.weight, m.bias
        if cast is not None:
            h2 = graph.call_function(aten._to_copy.default, (h2,), dict(dtype=cast))
            weight = graph.call_function(aten._to_copy.default, (weight,), dict(dtype=cast))
            _set_val(weight, w_val)
            if bias is not None:
                bias = graph.call_function(aten._to_copy.default, (bias,), dict(dtype=cast))
                _set_val(bias, b_val)
        _set_val(h2, h2_val)
        if m.target is not None:
            lab = graph.call_function(aten.reshape.default, (m.target, [n]))
        else:
            lab = graph.call_function(aten.full.default, ([n], IGNORE_INDEX),
                                      dict(dtype=torch.int64, device=h_val.device, pin_memory=False))
        _set_val(lab, lab_val)
        op_args = (h2, weight, bias, lab) + ((m.softcap,) if m.softcap is not None else ())
        op = graph.call_function(torch.ops.cggr.fused_token_stats.default, op_args)
        _set_val(op, tuple(outs_val))
        for i, name in enumerate(("lse", "entropy", "p1", "p2", "nll")):
            if name not in m.outputs:
                continue
            item = graph.call_function(operator.getitem, (op, i))
            _set_val(item, outs_val[i])
            view = graph.call_function(aten.reshape.default, (item, list(lead)))
            _set_val(view, views_val[i])
            m.outputs[name].replace_all_uses_with(view)
    for node in sorted(set(m.dead), key=order.__getitem__, reverse=True):  # users first
        if node.users:
            raise AssertionError(f"fuse_scorer: {node.name} still has users after the rewrite")
        graph.erase_node(node)


def fuse_scorer(gm: fx.GraphModule, enabled: bool = True, force: bool = False,
                autocast_dtype: Optional[torch.dtype] = None) -> FuseScorerResult:
    """Replace the router's head + scoring by ``cggr::fused_token_stats`` where it pays.

    ``autocast_dtype``: the dtype autocast gives the head where the graph will run (the graph was
    traced under autocast, which a pre-dispatch graph does not show): float32 inputs of the op are
    cast to it, as the unfused head's would be.
    ``enabled=False`` (``CGGRConfig.fused_scorer=False``) leaves the graph alone; ``force=True``
    fuses wherever the pattern matches, paying or not (tests, and users who want the chunked path's
    memory bound on any device). Returns how many subgraphs were fused and why (not).
    """
    if not enabled:
        return _done(gm, FuseScorerResult(0, "the fused scorer is off (fused_scorer=False)"))
    candidates = [n for n in gm.graph.nodes if _is_call(n, aten.log_softmax.int)]
    if not candidates:
        return _done(gm, FuseScorerResult(0, "no softmax scoring in the graph (a router that returns difficulties?)"))
    reasons, fused, what = [], 0, []
    counters["cggr"]["fuse_scorer_candidates"] += len(candidates)
    for ls in candidates:
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        try:
            m = _match(ls)
            counters["cggr"]["fuse_scorer_matched"] += 1
            h_val, w_val = _val(m.hidden), _val(m.weight)
            tokens = h_val.numel() // h_val.shape[-1]
            why = None if force else fusion_pays(h_val, w_val.shape[0], tokens)
            if why is not None:
                reasons.append(why)
                continue
            _rewrite(gm, m, order, _grad_modes(gm.graph), autocast_dtype)
        except _NoMatch as err:
            reasons.append(f"{ls.name}: {err}")
            continue
        fused += 1
        counters["cggr"]["fuse_scorer_fused"] += 1
        what.append(f"{tokens} tokens x vocabulary {w_val.shape[0]} on {h_val.device.type}"
                    + (f", softcap {m.softcap}" if m.softcap is not None else ""))
    if fused:
        gm.graph.lint()
        gm.recompile()
        return _done(gm, FuseScorerResult(fused, "fused: " + "; ".join(what)))
    return _done(gm, FuseScorerResult(0, "; ".join(reasons)))


def _done(gm: fx.GraphModule, result: FuseScorerResult) -> FuseScorerResult:
    gm.meta["cggr_fuse_scorer"] = result.reason
    if result.fused:
        log.debug("fuse_scorer: %s", result.reason)
    else:
        log.debug("fuse_scorer: the router's scoring stays unfused: %s", result.reason)
    return result


def fuse_scorer_pass(gm: fx.GraphModule, context: PassContext) -> fx.GraphModule:
    """Pipeline entry: :func:`fuse_scorer` as the core's config asks (in place)."""
    result = fuse_scorer(gm, enabled=context.core.cggr_config.fused_scorer, autocast_dtype=context.autocast_dtype)
    record_pass(gm, "fuse_scorer", result.reason, changed=bool(result))
    return gm
