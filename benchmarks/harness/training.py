"""One run of a race mode for a wall-clock budget, and the held-out evaluation it is judged by.

* Budget: every mode trains for ``--budget-seconds`` of *step* time (forward + backward + optimizer,
  the device synchronised after each step). Held-out evaluations are not counted. The first
  ``--warmup-steps`` steps of each mode (where ``torch.compile`` compiles) are not counted either;
  they are real training steps (counted in steps and tokens, the same number for every mode) and
  their time is reported as ``warmup_s``, with ``compile_s`` = ``warmup_s`` minus as many median steps.
* Held-out loss: the full model's plain forward in eval mode (no CGGR), mean next-token loss over a
  fixed set of ``--eval-sequences`` held-out sequences (``harness/race_data.py``), at 0 s, every
  ``--eval-every-seconds`` of counted training time and at the end. Checkpoint noise:
  ``checkpoint_std``, the std of a run's held-out loss over its last ``--checkpoint-window`` checkpoints.
* Learnability probe (every run, ``probe``): each held-out sequence's loss drop over the run against
  scores taken at its start: the full model's initial loss, initial minus the reference's loss (when
  there is a reference), and for the CGGR modes the router's own score; per score, its Spearman with
  the drop and the mean drop of the quarter it ranks highest (``docs/learnability.md`` reads them).
* For the CGGR modes, at the end: the Spearman rank correlation between the router's per-sequence
  difficulty (``cg.sequence_difficulty``) and the trained full model's per-sequence held-out loss.
* In the noisy regimes, ``noise_share_trained``: the share of the rows the counted steps trained on that
  were noise (a truncation probe of a skipped row fits the exit only and does not count).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import sync
from benchmarks.harness.race_modes import REDUCIBLE_MODES, ModeRunner, autocast_ctx, mode_lr, subset_k
from benchmarks.harness.stats import checkpoint_std, learnability_probe, load_avg, spearman


class Progress:
    """tqdm over the mode's time budget when importable, else a plain carriage-return line."""

    def __init__(self, total: float, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.done, self.post = total, desc, enabled, 0.0, ""
        self.bar, self.last = None, 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=round(total, 1), desc=desc, unit="s", file=sys.stderr,
                                mininterval=0.5, dynamic_ncols=True,
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f}s "
                                           "[{elapsed}{postfix}]")
            except ImportError:
                self.bar = None

    def update(self, dt: float, **post) -> None:
        if not self.enabled:
            return
        self.done += dt
        if post:
            self.post = ", ".join(f"{k}={v}" for k, v in post.items())
        if self.bar is not None:
            self.bar.update(min(dt, max(0.0, self.total - self.bar.n)))
            if post:
                self.bar.set_postfix_str(self.post, refresh=False)
        elif time.monotonic() - self.last > 0.5:
            self.last = time.monotonic()
            sys.stderr.write(f"\r{self.desc}: {min(self.done, self.total):6.1f}/{self.total:.1f}s {self.post}   ")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")


@torch.no_grad()
def heldout_losses(model, seqs: torch.Tensor, batch: int, device, dtype) -> torch.Tensor:
    """Per-sequence mean next-token loss of the plain model (eval mode), float32 on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, seqs.shape[0], batch):
        x = seqs[i:i + batch].to(device, non_blocking=True)
        with autocast_ctx(device, dtype):
            logits = model(input_ids=x).logits
        lp = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:], reduction="none")
        out.append(lp.mean(dim=1).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def eval_summary(losses: torch.Tensor, n_new) -> dict:
    """``heldout_loss`` (the headline); with ``n_new`` (finetune-mixed: the first ``n_new`` eval
    sequences are the new domain's, the rest the replayed domain's) also ``heldout_new`` and
    ``heldout_replay``, and ``heldout_loss`` is their mean."""
    if n_new is None:
        return dict(heldout_loss=float(losses.mean()))
    new, old = float(losses[:n_new].mean()), float(losses[n_new:].mean())
    return dict(heldout_loss=(new + old) / 2, heldout_new=new, heldout_replay=old)


class BatchOrder:
    """Seeded epochs of random permutations of the train sequences; the same for every mode."""

    def __init__(self, n: int, batch: int, seed: int):
        if n < batch:
            raise ValueError(f"{n} train sequences, fewer than one batch of {batch}")
        self.n, self.batch, self.seed = n, batch, seed
        self.epoch, self.pos, self.perm = 0, 0, self._perm(0)

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.epoch += 1
            self.pos, self.perm = 0, self._perm(self.epoch)
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx

    def epochs(self) -> float:
        return self.epoch + self.pos / self.n


def dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"].get("unique_graphs", 0))
    except Exception:
        return 0


def train_mode(mode: str, init_state: dict, train_seqs: torch.Tensor, eval_seqs: torch.Tensor,
               init_eval: torch.Tensor, args, device, vocab_size: int, log=print, runner: ModeRunner | None = None,
               lr: float | None = None, seed: int | None = None, ref_loss: torch.Tensor | None = None) -> dict:
    """One run of ``mode``: ``runner`` (built here if None) reset to ``init_state``, learning rate
    ``lr`` (default: the lr rule on ``--lr``), batch order and random subset seeded by ``seed``."""
    B, T = args.batch_size, args.seq_len
    k = B if mode == "full" else subset_k(args.ratio, B)
    lr = mode_lr(mode, args, k) if lr is None else lr
    seed = args.seed if seed is None else seed
    if runner is None:
        runner = ModeRunner(mode, init_state, args, device, vocab_size)
    first_run = runner.runs == 0
    runner.reset(init_state, lr, seed)
    model, cg = runner.model, runner.cg
    if mode in REDUCIBLE_MODES and ref_loss is None:
        raise ValueError(f"{mode} needs the reference losses (a pretrained regime)")

    def step(idx):
        x = train_seqs[idx].to(device, non_blocking=True)
        r = None if ref_loss is None else ref_loss[idx.to(ref_loss.device)]
        return runner.step(x, r, k)

    order = BatchOrder(train_seqs.shape[0], B, seed)
    ebatch = args.eval_batch_size or B

    n_new = getattr(args, "eval_n_new", None)
    curve = [dict(time_s=0.0, steps=0, tokens_seen=0, tokens_trained=0, epochs=0.0,
                  **eval_summary(init_eval, n_new), train_loss=None)]
    steps = 0
    step_times: list[float] = []
    loss_sum = torch.zeros((), device=device)
    loss_n = 0

    def checkpoint(t: float) -> float:
        nonlocal loss_sum, loss_n
        ev = eval_summary(heldout_losses(model, eval_seqs, ebatch, device, args.dtype), n_new)
        tl = float(loss_sum) / loss_n if loss_n else None
        loss_sum, loss_n = torch.zeros((), device=device), 0
        curve.append(dict(time_s=round(t, 3), steps=steps, tokens_seen=steps * B * T,
                          tokens_trained=steps * k * T, epochs=round(order.epochs(), 4),
                          **ev, train_loss=tl))
        return ev["heldout_loss"]

    # the router's scores of the held-out sequences at the start (outside the budget), for the
    # learnability probe: do the rows it ranks hardest now lose the most loss by the end?
    ref_eval = getattr(args, "ref_eval", None) if mode in REDUCIBLE_MODES else None
    init_scores = None if cg is None else router_scores(cg, eval_seqs, ebatch, device, args.dtype, ref_eval)

    # warm-up (compilation on a mode's first run): real steps, not counted in the budget
    load0 = load_avg()
    graphs0 = dynamo_graphs()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup_steps):
        loss_sum += step(order.next())
        loss_n += 1
        steps += 1
    sync(device)
    warmup_s = time.perf_counter() - t0
    graphs_warm = dynamo_graphs()
    if cg is not None and args.warmup_steps > 0:  # the library's k must be ours (read outside the budget)
        lib_k = int(cg.metrics().get("k", k)) if callable(getattr(cg, "metrics", None)) else k
        if lib_k != k:
            log(f"warning: {mode}: the library selects k={lib_k} rows, not ceil(ratio*B)={k}")
            k = lib_k

    n_new_train = getattr(args, "n_new_train", None)
    n_clean_train = getattr(args, "n_clean_train", None)
    replay_rows = noise_rows = trained_rows = 0
    prog = Progress(args.budget_seconds, f"{mode:>13}", args.progress)
    t_train = 0.0
    next_eval = args.eval_every_seconds
    last_eval = None
    while t_train < args.budget_seconds:
        idx = order.next()
        t0 = time.perf_counter()
        loss_sum += step(idx)
        sync(device)
        dt = time.perf_counter() - t0
        t_train += dt
        step_times.append(dt)
        if n_new_train is not None or n_clean_train is not None:  # which rows trained (outside the timed step)
            rows, trains = runner.state.get("rows"), runner.state.get("trains")
            rows = idx if rows is None else idx[rows.cpu()]
            if trains is not None:
                rows = rows[trains.cpu()]
            if n_new_train is not None:  # finetune-mixed: replayed (part A) rows
                replay_rows += int((rows >= n_new_train).sum())
            if n_clean_train is not None:  # noisy regime: noise rows
                noise_rows += int((rows >= n_clean_train).sum())
            trained_rows += int(rows.numel())
        steps += 1
        loss_n += 1
        post = {}
        if t_train >= next_eval or t_train >= args.budget_seconds:
            last_eval = checkpoint(t_train)
            while next_eval <= t_train:
                next_eval += args.eval_every_seconds
            post = {"step": steps, "heldout": f"{last_eval:.3f}"}
        prog.update(dt, **post)
    prog.close()
    graphs_end = dynamo_graphs()

    med = float(np.median(step_times)) if step_times else float("nan")
    final = curve[-1]["heldout_loss"]
    res = dict(
        mode=mode, k=k, batch_size=B, lr=lr, seed=seed, run_of_mode=runner.runs, steps=steps,
        warmup_steps=args.warmup_steps, budget_s=round(t_train, 3), warmup_s=round(warmup_s, 3),
        compile_s=round(max(0.0, warmup_s - args.warmup_steps * med), 3) if step_times else None,
        compiled_now=first_run and bool(args.compile),
        step_ms_median=round(1000 * med, 3), step_ms_mean=round(1000 * t_train / max(1, len(step_times)), 3),
        tokens_seen=steps * B * T, tokens_trained=steps * k * T, epochs=round(order.epochs(), 4),
        final_heldout_loss=final, best_heldout_loss=min(c["heldout_loss"] for c in curve),
        checkpoint_std=checkpoint_std(curve, args.checkpoint_window),
        graphs_compiled_warmup=graphs_warm - graphs0, graphs_compiled_in_budget=graphs_end - graphs_warm,
        spearman=None, load_avg_start=load0, load_avg_end=load_avg(), curve=curve,
    )
    if n_new is not None:
        for part in ("new", "replay"):
            res[f"final_heldout_{part}"] = curve[-1][f"heldout_{part}"]
            res[f"best_heldout_{part}"] = min(c[f"heldout_{part}"] for c in curve)
        # share of the rows the counted steps trained on that were replayed (part A) sequences
        res["replay_share_trained"] = round(replay_rows / max(1, trained_rows), 4)
    if n_clean_train is not None:
        res["noise_share_trained"] = round(noise_rows / max(1, trained_rows), 4)
    final_losses = heldout_losses(model, eval_seqs, ebatch, device, args.dtype)
    scores = {"initial_loss": init_eval}
    if getattr(args, "ref_eval", None) is not None:
        scores["initial_reducible"] = init_eval - args.ref_eval
    if init_scores is not None:
        scores["router_initial"] = init_scores
    res["probe"] = learnability_probe(init_eval, final_losses, scores)
    if cg is not None:
        # reducible modes: the router's difficulty with the reference's losses of the eval rows
        res["spearman"] = spearman(router_scores(cg, eval_seqs, ebatch, device, args.dtype, ref_eval).numpy(),
                                   final_losses.numpy())
        metrics = getattr(cg, "metrics", None)
        metrics = metrics() if callable(metrics) else metrics
        if isinstance(metrics, dict):
            try:
                res["cggr_metrics"] = {kk: (v.item() if torch.is_tensor(v) and v.numel() == 1 else
                                            (v if isinstance(v, (int, float, str)) else str(v)))
                                       for kk, v in metrics.items()}
            except Exception as e:  # metrics are informative only
                res["cggr_metrics"] = f"unreadable: {e}"
    return res


def best_base_lr(runs: list[dict], lr_values: list[float]) -> float:
    """The base learning rate whose runs have the lowest mean final held-out loss."""
    tried = [lr_ for lr_ in lr_values if any(r["base_lr"] == lr_ for r in runs)]
    return min(tried, key=lambda lr_: float(np.mean([r["final_heldout_loss"] for r in runs if r["base_lr"] == lr_])))


def router_scores(cg, seqs, batch, device, dtype, ref_losses=None) -> torch.Tensor:
    """The router's per-sequence difficulty of ``seqs`` (float32 on the CPU), as it selects now."""
    diffs = []
    with torch.no_grad():
        for i in range(0, seqs.shape[0], batch):
            x = seqs[i:i + batch].to(device)
            kw = {} if ref_losses is None else {"reference_loss": ref_losses[i:i + batch].to(device)}
            with autocast_ctx(device, dtype):
                d = cg.sequence_difficulty(input_ids=x, labels=x, **kw)
            diffs.append(d.float().cpu())
    return torch.cat(diffs)


def train_for_budget(step: Callable[[torch.Tensor], torch.Tensor], seqs: torch.Tensor, order: "BatchOrder",
                     budget_s: float, warmup_steps: int, label: str, args, device, loss_every: int) -> dict:
    """Full-batch steps ``step(rows)`` until ``budget_s`` of step time past the first
    ``warmup_steps`` steps (their time, compiles included, is counted apart): the loop of the base
    model and of the reference model. Returns steps, train_seconds, warmup_seconds, wall_seconds."""
    prog = Progress(budget_s, label, args.progress)
    t_train, steps, t_wall, warm_s = 0.0, 0, time.perf_counter(), 0.0
    while t_train < budget_s:
        t0 = time.perf_counter()
        loss = step(seqs[order.next()].to(device))
        sync(device)
        dt = time.perf_counter() - t0
        if steps >= warmup_steps:
            t_train += dt
        else:
            warm_s += dt
        steps += 1
        prog.update(dt if steps > warmup_steps else 0.0,
                    step=steps, loss=f"{float(loss):.3f}" if steps % loss_every == 0 else "…")
    prog.close()
    return dict(steps=steps, train_seconds=round(t_train, 2), warmup_seconds=round(warm_s, 2),
                wall_seconds=round(time.perf_counter() - t_wall, 2))


def run_line(mode: str, r: dict, tagged: bool, cpu: bool) -> str:
    """One run's line of the race's log: steps, held-out loss, and what the regime measures."""
    sp = "" if r["spearman"] is None else f", spearman {r['spearman']:.3f}"
    if cpu and r["load_avg_end"]:
        sp += (f", load average {r['load_avg_start'][0]:.1f} -> {r['load_avg_end'][0]:.1f} "
               f"on {os.cpu_count()} cores")
    if "final_heldout_new" in r:
        sp = (f", new (B) {r['final_heldout_new']:.4f}, replay (A) {r['final_heldout_replay']:.4f}, "
              f"replay share of trained rows {r['replay_share_trained']:.2f}" + sp)
    if "noise_share_trained" in r:
        sp = f", noise share of trained rows {r['noise_share_trained']:.3f}" + sp
    pr = r.get("probe") or {}
    sp += "; held-out loss drop {:.4f}".format(pr.get("mean_drop", float("nan"))) + "".join(
        f", {name}: rho {v['spearman_with_drop']:.3f} top-quarter drop {v['top_quarter_mean_drop']:.4f}"
        for name, v in pr.items() if isinstance(v, dict))
    tag = f" [lr {r['lr']:.2e}, seed {r['seed']}]" if tagged else ""
    return (f"{mode}{tag}: {r['steps']} steps, held-out {r['final_heldout_loss']:.4f} "
            f"(best {r['best_heldout_loss']:.4f}, last-checkpoint std {r['checkpoint_std']}), "
            f"{r['step_ms_median']:.1f} ms/step{sp}")


def sweep_mode(mode: str, runner: ModeRunner, init_state: dict, train: torch.Tensor, eval_seqs: torch.Tensor,
               init_eval: torch.Tensor, args, device, vocab_size: int, log=print,
               ref_loss: torch.Tensor | None = None) -> dict:
    """Every run of ``mode``: each base learning rate of the sweep on the sweep seeds, then the other
    seeds at the best of them. Returns the best learning rate's first run, with the whole ``sweep``
    and that rate's ``runs_by_seed``."""
    k = args.batch_size if mode == "full" else subset_k(args.ratio, args.batch_size)
    tagged = len(args.lr_values) * len(args.seed_values) > 1
    runs = []
    t0 = time.perf_counter()
    confirm = [sd for sd in args.seed_values if sd not in args.sweep_seed_values]
    plan = [(lr_, sd) for lr_ in args.lr_values for sd in args.sweep_seed_values] + [(None, sd) for sd in confirm]
    for base_lr, seed in plan:
        if base_lr is None:  # a confirmation seed: the best base lr on the sweep seeds
            base_lr = best_base_lr([r for r in runs if r["seed"] in args.sweep_seed_values], args.lr_values)
        r = train_mode(mode, init_state, train, eval_seqs, init_eval, args, device, vocab_size, log,
                       runner=runner, lr=mode_lr(mode, args, k, base_lr), seed=seed, ref_loss=ref_loss)
        r["base_lr"] = base_lr
        runs.append(r)
        log(run_line(mode, r, tagged, device.type == "cpu"))
    best_lr = best_base_lr([r for r in runs if r["seed"] in args.sweep_seed_values], args.lr_values)
    best_runs = [r for r in runs if r["base_lr"] == best_lr]
    chosen = dict(best_runs[0], wall_s=round(time.perf_counter() - t0, 2), best_base_lr=best_lr)
    chosen["sweep"] = [dict(base_lr=r["base_lr"], lr=r["lr"], seed=r["seed"], final=r["final_heldout_loss"],
                            best=r["best_heldout_loss"], steps=r["steps"], ms_per_step=r["step_ms_median"],
                            checkpoint_std=r["checkpoint_std"], noise_share_trained=r.get("noise_share_trained"),
                            compile_s=r["compile_s"]) for r in runs]
    chosen["runs_by_seed"] = {str(r["seed"]): r for r in best_runs}
    return chosen
