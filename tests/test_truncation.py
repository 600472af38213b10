"""selection='truncation' (the default with the learned exit): skip the rows (tokens) scored hardest,
draw k uniformly among the rest, and fit the exit with inverse-inclusion weights.

The rule against a hand reference (median / MAD and shares counted in Python), the draw's inclusion
probabilities against Monte Carlo, gradient parity on both entry points, the skipped rows in the
metrics, the defaults, bad options, and an end-to-end run where it must skip the junk rows.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

import cggr_compile
from cggr_compile import scoring as S
from cggr_compile.exit import ExitLayout
from models import batch, tiny_model
from test_exit import reference_fit, reference_hidden, reference_token_loss, run_entry, warm_state
from test_parity import reference_step, reference_targets

K_ROWS, PROBE_SHARE, SHARE = 4, 0.25, 0.25  # B=8 rows: 2 skipped, 3 drawn among the 6 kept, 1 probe


def hand_skips(scores: list[float], keep: int, share=None, spread=3.0) -> set[int]:
    """Truncation's skipped entries, counted in Python."""
    n = len(scores)
    ranked = sorted(range(n), key=lambda i: (-scores[i], i))
    room = max(0, n - keep)
    if share is not None:
        return set(ranked[: min(math.floor(share * n + 1e-9), room)])
    ordered = sorted(scores)
    median = ordered[(n - 1) // 2]
    mad = sorted(abs(x - median) for x in scores)[(n - 1) // 2]
    if mad == 0:
        return set()
    above = [i for i in ranked[:room] if scores[i] > median + spread * 1.4826 * mad]
    return set(above)


@pytest.mark.parametrize("share", [None, 0.25])
def test_skips_match_the_hand_count(share):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(40, generator=g)
    scores[[3, 17, 29]] += torch.tensor([9.0, 12.0, 7.0])  # outliers
    valid = torch.ones(40, dtype=torch.bool)
    got = S.truncation_skips(scores, valid, 10, share, 3.0)
    want = hand_skips(scores.tolist(), 10, share)
    assert set(torch.nonzero(got).flatten().tolist()) == want
    if share is None:
        assert want == {3, 17, 29}


def test_skips_leave_at_least_keep_and_ignore_invalid_entries():
    scores = torch.tensor([50.0, 40.0, 30.0, 0.1, 0.2, 0.0, 0.3, 99.0])
    valid = torch.tensor([True] * 7 + [False])
    skip = S.truncation_skips(scores, valid, keep=5, share=None, spread=1.0)
    # 3 outliers, but only 7 - 5 = 2 may go: the two highest; the invalid 99 is never skipped
    assert skip.tolist() == [True, True] + [False] * 6
    assert not S.truncation_skips(torch.full((6,), 2.0), torch.ones(6, dtype=torch.bool), 1, None, 3.0).any()


def test_clean_scores_skip_almost_nothing():
    g = torch.Generator().manual_seed(0)
    shares = [float(S.truncation_skips(torch.randn(128, generator=g), torch.ones(128, dtype=torch.bool), 32,
                                       None, 3.0).float().mean()) for _ in range(50)]
    assert statistics.mean(shares) < 0.01


def test_draw_inclusion_probabilities_match_monte_carlo():
    b, k, probes = 16, 6, 2
    valid = torch.ones(b, dtype=torch.bool)
    valid[15] = False
    skip = torch.zeros(b, dtype=torch.bool)
    skip[[0, 4, 9]] = True
    counts = torch.zeros(b)
    runs = 3000
    for step in range(runs):
        idx, inclusion = S.truncated_draw(valid, skip, k, probes, seed=5, step=torch.tensor(step))
        assert idx.unique().numel() == k and torch.equal(idx, idx.sort().values)
        assert not (idx == 15).any()
        counts[idx] += 1
    idx, inclusion = S.truncated_draw(valid, skip, k, probes, seed=5, step=torch.tensor(0))
    # 15 valid rows, 12 kept: 4 of them drawn, then 2 of the 11 valid rows left; a skipped row: only then
    p_kept, p_skip = 4 / 12 + (8 / 12) * (2 / 11), 2 / 11
    want = torch.tensor([p_skip if skip[i] else p_kept for i in idx.tolist()])
    torch.testing.assert_close(inclusion, want)
    empirical = counts / runs
    assert abs(float(empirical[skip].mean()) - p_skip) < 0.02
    assert abs(float(empirical[~skip & valid].mean()) - p_kept) < 0.02


def hand_draw(skip: set[int], b: int, k: int, probes: int, seed: int, step: int) -> tuple[list[int], dict]:
    """The two-stage draw by hand from the library's counter-based uniforms (tested in test_scoring)."""
    u1 = S.hash_uniform(torch.arange(b), seed, torch.tensor(step)).tolist()
    u2 = S.hash_uniform(torch.arange(b), seed + 2, torch.tensor(step)).tolist()
    first = sorted(range(b), key=lambda i: (i in skip, u1[i], i))[: k - probes]
    second = sorted((i for i in range(b) if i not in first), key=lambda i: (u2[i], i))[:probes]
    kept = b - len(skip)
    p_first = (k - probes) / kept
    p_second = probes / (b - (k - probes))
    p = {i: (p_second if i in skip else p_first + (1 - p_first) * p_second) for i in range(b)}
    return sorted(first + second), p


OPTIONS = dict(selection="truncation", truncation_share=SHARE, truncation_probe=PROBE_SHARE,
               min_tokens_ratio=K_ROWS / 8)


@pytest.mark.parametrize("entry", ["transform", "backend"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])  # the rule is the model's; test_exit covers all 15
def test_parity_sequences(name, entry):
    """The exit's scores skip the hardest quarter, the rest are drawn by hand; loss and gradients are
    the plain model's on the drawn rows that were not skipped, and the exit refits on every drawn
    row, each weighted 1 / p."""
    model = tiny_model(name)
    b = batch(name, b=8)
    target, valid = reference_targets(name, b)
    h = reference_hidden(name, model, b)
    state = warm_state(h.shape[-1])
    weights = ExitLayout(h.shape[-1]).weights(state).double()
    pred = h @ weights[:-1] + weights[-1]
    seq = (torch.where(valid, pred, torch.zeros_like(pred)).sum(1) / valid.sum(1)).tolist()
    skip = hand_skips(seq, K_ROWS, SHARE)
    assert len(skip) == 2
    rows, p = hand_draw(skip, 8, K_ROWS, 1, seed=0, step=0)
    rows_t = torch.tensor(rows)
    # a probe that drew a skipped row runs for the exit's fit only: it adds nothing to the loss
    trains = valid & ~torch.tensor([i in skip for i in range(8)])[:, None]
    ref_loss, ref_grads = reference_step(model, b, rows_t, target, trains, "sequences")
    fit_w = valid[rows_t].double() / torch.tensor([p[i] for i in rows], dtype=torch.float64)[:, None]
    ref_weights = reference_fit(state, h[rows_t], reference_token_loss(name, model, b, rows_t, target), fit_w)

    model.zero_grad()
    out, core, selection = run_entry(entry, model, b, state, h.shape[-1], **OPTIONS)
    assert selection.cpu().tolist() == rows
    torch.testing.assert_close(out.loss.detach(), ref_loss.float(), rtol=1e-5, atol=1e-6)
    for n, prm in model.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(prm.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    torch.testing.assert_close(core.exit.layout.weights(core.exit.state).double(), ref_weights, rtol=2e-3, atol=2e-4)
    metrics = core.metrics()
    assert set(torch.nonzero(metrics["skipped"]).flatten().tolist()) == skip
    assert float(metrics["skipped_share"]) == pytest.approx(0.25)


@pytest.mark.parametrize("entry", ["transform", "backend"])
def test_parity_tokens(entry):
    """Tokens: the hardest quarter of the valid positions by the exit is skipped, ceil(ratio * n) of
    the rest are drawn uniformly; none of the skipped ones enters the loss."""
    name = "llama"
    model = tiny_model(name)
    b = batch(name, b=8)
    target, valid = reference_targets(name, b)
    h = reference_hidden(name, model, b)
    state = warm_state(h.shape[-1], seed=1)
    weights = ExitLayout(h.shape[-1]).weights(state).double()
    pred = (h @ weights[:-1] + weights[-1]).flatten()
    vflat = valid.flatten()
    n = int(vflat.sum())
    budget = math.ceil(0.5 * n)
    positions = [i for i in range(pred.numel()) if vflat[i]]
    skipped = hand_skips([pred[i].item() for i in positions], budget, SHARE)
    skip = {positions[j] for j in skipped}
    u = S.hash_uniform(torch.arange(pred.numel()), 0, torch.tensor(0)).tolist()
    chosen = sorted(positions, key=lambda i: (i in skip, u[i], i))[:budget]
    mask = torch.zeros(pred.numel(), dtype=torch.bool)
    mask[chosen] = True
    mask = mask.view_as(valid)
    ref_loss, _ = reference_step(model, b, mask, target, valid, "tokens")

    model.zero_grad()
    out, core, selection = run_entry(entry, model, b, state, h.shape[-1], granularity="tokens",
                                     selection="truncation", truncation_share=SHARE, min_tokens_ratio=0.5)
    assert torch.equal(selection.cpu(), mask)
    torch.testing.assert_close(out.loss.detach(), ref_loss.float(), rtol=1e-5, atol=1e-6)
    got_skip = core.metrics()["skipped"].cpu()
    assert set(torch.nonzero(got_skip.flatten()).flatten().tolist()) == skip
    assert not (got_skip & selection.cpu()).any()


def test_cold_exit_skips_nothing():
    """Until the exit is fitted its scores mean nothing: no row is skipped, the draw is uniform."""
    model = tiny_model("llama")
    cg = cggr_compile.transform(model, router_layers=1, min_tokens_ratio=0.5, warmup_steps=0, strict=True,
                                truncation_share=0.5)
    out = cg(**batch("llama", b=8))
    m = cg.metrics()
    assert float(m["exit_ready"]) == 0.0 and not m["skipped"].any() and float(m["skipped_share"]) == 0.0
    assert out["selected_indices"].numel() == 4


def test_defaults_are_the_learned_exit_with_truncation():
    c = cggr_compile.CGGRConfig()
    assert (c.scoring, c.selection, c.truncation_share) == ("predicted", "truncation", None)
    assert cggr_compile.CGGRConfig(granularity="tokens").selection == "truncation"
    # a user router gives no hidden states: the default scoring reads its logits' loss instead
    assert cggr_compile.CGGRConfig(router=lambda ids, mask: ids.float()).scoring == "loss"
    # the original's classes keep the original's defaults
    orig = cggr_compile.CGGRModel(tiny_model("llama"), router_layers=1)
    assert (orig.cggr_config.scoring, orig.cggr_config.selection) == ("combined", "topk")


@pytest.mark.parametrize("option,value,needle", [
    ("truncation_share", 1.0, "truncation_share must be None"),
    ("truncation_share", -0.1, "truncation_share must be None"),
    ("truncation_spread", 0, "truncation_spread must be a number > 0"),
    ("truncation_probe", 1.0, "truncation_probe must be a number in [0, 1)"),
    ("truncation_probe", True, "truncation_probe must be a number in [0, 1)"),
])
def test_bad_truncation_options_say_what_to_change(option, value, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace(")", r"\)")):
        cggr_compile.CGGRConfig(**{option: value})


def junk_and_text_batches(steps: int, b: int = 16, t: int = 32, vocab: int = 128, junk: int = 4, seed: int = 0):
    """Batches whose first ``junk`` rows are uniform random tokens (unlearnable) and the rest one of
    four fixed token cycles (learnable within a few steps), rows shuffled per batch."""
    g = torch.Generator().manual_seed(seed)
    cycles = [torch.randperm(vocab - 2, generator=g)[:7] + 2 for _ in range(4)]
    for _ in range(steps):
        rows = [torch.randint(2, vocab, (t,), generator=g) for _ in range(junk)]
        for _ in range(b - junk):
            c = cycles[int(torch.randint(0, 4, (1,), generator=g))]
            start = int(torch.randint(0, 7, (1,), generator=g))
            rows.append(c.repeat(t // 7 + 2)[start:start + t])
        perm = torch.randperm(b, generator=g)
        ids = torch.stack(rows)[perm]
        yield {"input_ids": ids, "labels": ids.clone()}, perm < junk


def test_the_default_skips_unlearnable_rows_once_the_exit_knows():
    """End to end with the defaults: a quarter of each batch is random tokens. Once the exit has
    fitted, truncation skips those rows and trains on (almost) none of them."""
    import transformers as T

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    cg = cggr_compile.transform(model, router_layers=1, min_tokens_ratio=0.25, warmup_steps=0, strict=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    caught = trained_junk = trained = 0
    for step, (b, is_junk) in enumerate(junk_and_text_batches(70)):
        out = cg(**b)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        cg.step()
        if step >= 50:
            m = cg.metrics()
            skipped = m["skipped"]
            caught += int((skipped & is_junk).sum())
            rows = out["selected_indices"]
            rows = rows[~skipped[rows]]  # a probe of a skipped row only fits the exit
            trained_junk += int(is_junk[rows].sum())
            trained += rows.numel()
    assert float(cg.metrics()["exit_ready"]) == 1.0
    assert caught >= 0.9 * 20 * 4, caught  # of the 80 junk rows of the last 20 steps
    assert trained_junk / trained <= 0.1, (trained_junk, trained)
