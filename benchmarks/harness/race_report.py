"""The race's outputs: the table it prints, the plot, merged reports, and the quality summary that
the README's quality table is made from (``benchmarks/results/quality_summary.json``)."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

from benchmarks.common import write_json
from benchmarks.harness.race_modes import REDUCIBLE_MODES

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"  # committed results: written only when asked


def loss_at(curve: list[dict], t: float) -> float:
    """Held-out loss of the last checkpoint at or before training time ``t``."""
    out = curve[0]["heldout_loss"]
    for c in curve:
        if c["time_s"] <= t + 1e-9:
            out = c["heldout_loss"]
    return out


def all_in_comparison(results: dict, ref_cost_s: float, budget_s: float) -> dict:
    """Charge the reference's cost (training + offline scoring) to the reducible modes: their held-out
    loss at ``budget - cost`` of their own curve, against every mode's at the full budget."""
    out = {"reference_cost_s": round(ref_cost_s, 2), "budget_s": budget_s, "modes": {}}
    for m, r in results.items():
        cost = ref_cost_s if m in REDUCIBLE_MODES else 0.0
        if cost == 0:
            at = r["final_heldout_loss"]
        else:  # the run's own counted time (its last step overshoots the budget a little) minus the cost
            left = r.get("budget_s", budget_s) - cost
            at = loss_at(r["curve"], left) if left > 0 else r["curve"][0]["heldout_loss"]
        out["modes"][m] = dict(charged_s=round(cost, 2), heldout_all_in=at, heldout_at_budget=r["final_heldout_loss"])
    return out


def summary_table(results: dict) -> str:
    mixed = any("final_heldout_new" in r for r in results.values())
    noisy = any("noise_share_trained" in r for r in results.values())
    head = ("| mode | lr | steps | step ms | tokens trained | final held-out | best held-out | "
            + ("final new (B) | final replay (A) | replay share trained | " if mixed else "")
            + ("noise share trained | " if noisy else "")
            + "compile s | spearman | ckpt std |")
    lines = [head, "|" + "---|" * (10 + 3 * mixed + noisy)]
    for m, r in results.items():
        sp = "" if r["spearman"] is None else f"{r['spearman']:.3f}"
        cs = "" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
        parts = (f"{r['final_heldout_new']:.4f} | {r['final_heldout_replay']:.4f} | "
                 f"{r.get('replay_share_trained', float('nan')):.2f} | " if mixed else "")
        if noisy:
            parts += f"{r.get('noise_share_trained', float('nan')):.3f} | "
        std = "" if r.get("checkpoint_std") is None else f"{r['checkpoint_std']:.4f}"
        lines.append(f"| {m} | {r['lr']:.2e} | {r['steps']} | {r['step_ms_median']:.1f} | "
                     f"{r['tokens_trained']:,} | {r['final_heldout_loss']:.4f} | "
                     f"{r['best_heldout_loss']:.4f} | {parts}{cs} | {sp} | {std} |")
    return "\n".join(lines)



def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixed = any("heldout_new" in r["curve"][0] for r in results.values())
    fig, axes = plt.subplots(1, 3 if mixed else 2, figsize=(18 if mixed else 12, 4.5))
    for i, (m, r) in enumerate(results.items()):
        xs = [c["time_s"] for c in r["curve"]]
        ys = [c["heldout_loss"] for c in r["curve"]]
        style = "-" if m.startswith("cggr") else "--"
        line, = axes[0].plot(xs, ys, style, marker=".", label=m)
        axes[1].plot([c["steps"] for c in r["curve"]], ys, style, marker=".", label=m)
        if mixed:
            axes[2].plot(xs, [c["heldout_new"] for c in r["curve"]], style, color=line.get_color(),
                         label=f"{m}: new (B)")
            axes[2].plot(xs, [c["heldout_replay"] for c in r["curve"]], ":", color=line.get_color(),
                         label=f"{m}: replay (A)")
    axes[0].set_xlabel("training wall-clock (s, step time only)")
    axes[1].set_xlabel("optimizer steps")
    for ax in axes[:2]:
        ax.set_ylabel("held-out loss (full model)" + (", mean of new and replay" if mixed else ""))
        ax.grid(alpha=0.3)
    if mixed:
        axes[2].set_xlabel("training wall-clock (s, step time only)")
        axes[2].set_ylabel("held-out loss: new domain B (solid), replayed A (dotted)")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=6)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_reports(paths: list[str], out_dir: str | None = None) -> dict:
    """Union of the modes of several reports of one race (same preset, corpus, weights, device).

    For machines that limit a job's length: run the modes in several commands (``--modes``), then
    ``python benchmarks/race.py --merge a.json b.json``. Refuses reports whose race differs.
    """
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    same = ("preset", "regime", "device_name", "initial_heldout_loss", "k", "lr_rule")
    for r in reports[1:]:
        for key in same:
            if r.get(key) != first.get(key):
                raise SystemExit(f"--merge: {key} differs ({first.get(key)!r} vs {r.get(key)!r})")
        if r["corpus"]["splits"] != first["corpus"]["splits"] or r["corpus"]["tokenizer"] != first["corpus"]["tokenizer"]:
            raise SystemExit("--merge: the reports were made on different corpora")
    merged = copy.deepcopy(first)
    merged["modes"] = {}
    for r in reports:
        merged["modes"].update(r["modes"])
    merged["seeds"] = sorted({sd for r in reports for sd in (r.get("seeds") or [r["args"]["seed"]])})
    merged["merged_from"] = [dict(path=str(p), command=r["command"], modes=list(r["modes"]),
                                  total_seconds=r["total_seconds"]) for p, r in zip(paths, reports)]
    merged["command"] = " ; ".join(r["command"] for r in reports)
    merged["total_seconds"] = round(sum(r["total_seconds"] for r in reports), 2)
    merged["summary_table"] = summary_table(merged["modes"])
    stem = Path(paths[0]).stem
    out = Path(out_dir) if out_dir else Path(paths[0]).parent
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"-part\d+", "", stem)
    write_json(out / f"{stem}.json", merged)
    plot(merged["modes"], out / f"{stem}.png", f"CGGR race (merged), preset {first['preset']}, {first['device_name']}")
    print(merged["summary_table"])
    print(f"wrote {out / (stem + '.json')} and {stem}.png")
    if out.resolve() == RESULTS_DIR.resolve():
        merged["json_name"] = f"{stem}.json"
        print(f"updated {update_quality_summary(merged, RESULTS_DIR / 'quality_summary.json')}")
    merged["json_path"], merged["png_path"] = str(out / f"{stem}.json"), str(out / f"{stem}.png")
    return merged


def quality_entries(report: dict) -> list[dict]:
    """One entry per seed of a race report, for ``benchmarks/results/quality_summary.json``: every
    mode at its best learning rate, held-out losses of the full model at equal wall-clock."""
    out = []
    seeds = report.get("seeds") or [report["args"]["seed"]]
    for seed in seeds:
        modes = {}
        for m, r in report["modes"].items():
            run = (r.get("runs_by_seed") or {}).get(str(seed), r if r.get("seed", seed) == seed else None)
            if run is None:
                continue
            modes[m] = dict(final=run["final_heldout_loss"], best=run["best_heldout_loss"], steps=run["steps"],
                            ms_per_step=run["step_ms_median"], lr=run["lr"],
                            checkpoint_std=run.get("checkpoint_std"))
            if "noise_share_trained" in run:
                modes[m]["noise_share_trained"] = run["noise_share_trained"]
        out.append(dict(regime=report["regime"], seed=seed, device=report["device_name"],
                        preset=report["preset"], budget_s=report["args"]["budget_seconds"],
                        batch_size=report["args"].get("batch_size"),
                        default_mode=report.get("default_mode"), initial=report["initial_heldout_loss"],
                        lr_values=report.get("lr_values"), source=report.get("json_name"), modes=modes))
    return out


def update_quality_summary(report: dict, path: Path) -> Path:
    """Merge the report's entries into ``path`` (``{"runs": [...]}``), replacing entries of the same
    (regime, seed, device, batch size) and keeping every other."""
    data = {"runs": []}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            raise SystemExit(f"{path}: not JSON; fix or remove it") from None
    new = quality_entries(report)
    def key(e: dict) -> tuple:
        return e.get("regime"), e.get("seed"), e.get("device"), e.get("batch_size")

    keys = {key(e) for e in new}
    runs = [e for e in data.get("runs", []) if key(e) not in keys]
    runs.extend(new)
    runs.sort(key=lambda e: (str(e.get("regime")), str(e.get("device")), e.get("seed", 0)))
    data["runs"] = runs
    data["note"] = ("held-out loss of the full model (plain forward, eval mode) after budget_s seconds of step "
                    "time per mode; each mode at its best learning rate; written by benchmarks/race.py")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path

