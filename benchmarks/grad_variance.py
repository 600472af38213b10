"""Gradient variance of k-row estimators of the full-batch gradient: random subset vs importance sampling.

    python benchmarks/grad_variance.py finetune     # the tiny preset's base model, on the race's train split
    python benchmarks/grad_variance.py scratch      # a model after 60 full-batch steps from scratch

For 6 train batches (B=16) it computes every row's gradient, then the exact mean squared error
against the full batch's gradient of: a random subset of k=4 rows (without replacement, closed form),
and ``selection="importance"``'s systematic sampling (averaged over 512 evenly spaced offsets) with
the router's loss (2 layers) and floors 1, 0.5, 0, and with an oracle ``p`` proportional to each
row's true gradient norm (the best any per-row score can do). Prints the variances relative to the
random subset, and the coefficient of variation of the per-row router loss and gradient norm.
Writes ``benchmarks/results/grad_variance_tiny-<regime>_cpu.json``.
"""
import sys, json, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent)); torch.set_num_threads(1)
from benchmarks import corpus as corpus_mod
from benchmarks.harness.race_modes import build_model
from benchmarks.harness.race_options import parse_args
from benchmarks.harness.references import base_model_state
from benchmarks.harness.training import BatchOrder
import cggr_compile
from cggr_compile import scoring as S

regime = sys.argv[1] if len(sys.argv) > 1 else "finetune"
args = parse_args(["--preset", "tiny", "--regime", regime, "--no-progress"])
args.compile, args.dtype = False, "fp32"
corpus = corpus_mod.build_corpus("stdlib", seq_len=args.seq_len, vocab_size=args.vocab_size, seed=args.seed,
    heldout_fraction=args.heldout_fraction, max_bytes=args.max_bytes or None, max_file_bytes=args.max_file_bytes,
    tokenizer_max_bytes=args.tokenizer_max_bytes or None, regime=args.regime, cache_dir=Path(args.cache_dir),
    log=lambda *a: None, race_packages=None)
torch.manual_seed(args.seed)
model, _ = build_model(args, corpus.vocab_size)
if regime == "finetune":
    init = {k: v.clone() for k, v in model.state_dict().items()}
    state, _ = base_model_state(args, corpus, init, torch.device("cpu"), log=lambda *a: None)
    model.load_state_dict(state)
else:  # from scratch: 60 full-batch steps first (the loss has left its initial plateau)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = BatchOrder(corpus.splits["train"].sequences.shape[0], 16, 99)
    for i in range(60):
        x = corpus.splits["train"].sequences[order.next()]
        model(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad()
model.train()
train = corpus.splits["train"].sequences
B, k = 16, 4
cg = cggr_compile.transform(model, min_tokens_ratio=0.25, router_layers=2, scoring="loss", warmup_steps=0,
                            dynamic_threshold=False)
params = [p for p in model.parameters()]
order = BatchOrder(train.shape[0], B, 123)
U = (torch.arange(512, dtype=torch.float64) + 0.5) / 512

def systematic_var(g, G, p):
    cdf = torch.cumsum(p, 0); cdf = cdf / cdf[-1]
    errs = []
    for u in U:
        pts = (torch.arange(k, dtype=torch.float64) + u) / k
        idx = torch.searchsorted(cdf, pts, right=True).clamp(max=B - 1)
        est = (g[idx] / (B * p[idx]).unsqueeze(-1)).mean(0)
        errs.append(float(((est - G) ** 2).sum()))
    return sum(errs) / len(errs)

out = []
for batch_no in range(6):
    x = train[order.next()]
    g = []
    for i in range(B):
        model.zero_grad()
        model(input_ids=x[i:i + 1], labels=x[i:i + 1]).loss.backward()
        g.append(torch.cat([p.grad.flatten() for p in params]).double())
    g = torch.stack(g)
    G = g.mean(0)
    sigma2 = float(((g - G) ** 2).sum(1).mean())
    var_random = sigma2 / k * (B - k) / (B - 1)
    with torch.no_grad():
        d = cg.sequence_difficulty(x, labels=x)
    n = torch.full((B,), x.shape[1] - 1)
    row = dict(var_random=var_random, loss_cv=float(d.std() / d.mean()),
               gnorm_cv=float(g.norm(dim=1).std() / g.norm(dim=1).mean()))
    for floor in (1.0, 0.5, 0.0):
        p = S.importance_probabilities(d, n, floor).double()
        row[f"var_is_floor{floor}"] = systematic_var(g, G, p)
    pg = g.norm(dim=1); pg = pg / pg.sum()
    row["var_is_gradnorm_oracle"] = systematic_var(g, G, pg)
    row["var_is_gradnorm_oracle_floor0.5"] = systematic_var(g, G, 0.5 * pg + 0.5 / B)
    out.append(row)
    print({kk: round(v / row["var_random"], 3) if kk.startswith("var") else round(v, 3) for kk, v in row.items()}, flush=True)
mean = {kk: sum(r[kk] / r["var_random"] if kk.startswith("var") else r[kk] for r in out) / len(out) for kk in out[0]}
print("MEAN (variance relative to the random subset without replacement):", {kk: round(v, 3) for kk, v in mean.items()})
dest = Path(__file__).resolve().parent / "results" / f"grad_variance_tiny-{regime}_cpu.json"
dest.write_text(json.dumps(dict(command=f"python benchmarks/grad_variance.py {regime}", regime=regime, B=B, k=k,
                                batches=out, mean_relative=mean), indent=1))
