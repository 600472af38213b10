"""Write the README's and docs/results.md's result tables from the committed result files.

    python benchmarks/readme_tables.py            # rewrite every table between its markers
    python benchmarks/readme_tables.py --check    # exit 1 if a table differs from the JSON (CI)

A table lives between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in a markdown file; NAME is
one of ``TABLES``. Sources:

- quality: ``benchmarks/results/quality_summary.json`` (written by ``benchmarks/race.py
  --commit-results`` / ``--merge``). Runs are grouped by regime and every other run-level setting
  (device, preset, budget, and any key a newer race adds, such as a batch size); inside a group,
  each mode is reported at its best learning rate (the lr with the lowest mean final loss over the
  seeds, so the choice is the same for every seed; a race with ``--sweep-seeds`` records only each
  mode's chosen lr, and its ``lr_values`` are listed as tried), as mean ± sample std over seeds, with the number
  of seeds where it ends below the random subset and below the full batch of the same seed.
- speed: ``SPEED_SOURCE``, the merged canonical speed run (``benchmarks/speed.py --cudagraphs
  --fused-loss``, one process per shape; its ``meta.merged_from`` names the per-shape files): the
  compiled full batch with and without the fused loss, the random subset and CGGR with it.
- speed-canon and speed-sweep: ``SPEED_UNFUSED_SOURCE``, the earlier canonical run without the fused
  loss (with eager, the transform, and the other ratios and router depths).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
QUALITY_SOURCE = RESULTS / "quality_summary.json"
SPEED_SOURCE = RESULTS / "speed_gpu-fused-all-cudagraphs_nvidia-h200.json"
SPEED_UNFUSED_SOURCE = RESULTS / "speed_gpu-canon-all-cudagraphs_nvidia-h200.json"
# Files whose tables this script owns; README.md must hold the verdict's two tables.
TARGETS = (REPO / "README.md", REPO / "docs" / "results.md")
REQUIRED = {REPO / "README.md": ("speed-table", "quality-table")}

# Run-level keys that are not part of a run's setting: they vary per seed or only describe the file.
_NOT_SETTING = {"seed", "modes", "initial", "lr_values", "source", "default_mode", "note"}
_SETTING_ORDER = ("regime", "device", "preset", "budget_s")

MODEL_NAMES = {"smollm135m": "SmolLM-135M", "smollm360m": "SmolLM-360M", "llama1b": "Llama-3.2-1B"}
MODE_LABELS = {
    "full": "full batch",
    "random": "random subset of k",
    "cggr-loss-importance": "`loss` + `importance`",
    "cggr-reducible-importance": "`reducible` + `importance`",
    "cggr-reducible": "`reducible` top-k",
    "cggr-loss": "`loss` top-k",
}


# --------------------------------------------------------------------------------------- quality
def _setting(run: dict) -> tuple[tuple[str, Any], ...]:
    """The run's group key: every run-level scalar except the per-seed ones, in a stable order."""
    keys = [k for k in run if k not in _NOT_SETTING and not isinstance(run[k], (dict, list))]
    keys.sort(key=lambda k: (_SETTING_ORDER.index(k) if k in _SETTING_ORDER else len(_SETTING_ORDER), k))
    return tuple((k, run[k]) for k in keys)


def quality_groups(summary: dict) -> list[dict]:
    """Per group of runs (one setting, any number of seeds and learning rates), per mode: the
    best-lr finals by seed and the comparison with random and full of the same seed."""
    groups: dict[tuple, dict] = {}
    for run in summary.get("runs", []):
        for key in ("regime", "seed", "modes"):
            if key not in run:
                raise SystemExit(f"{QUALITY_SOURCE.name}: a run without {key!r}: {run!r:.200}; "
                                 "regenerate it with benchmarks/race.py --merge")
        g = groups.setdefault(_setting(run), dict(finals={}, ms={}, extra={}, default=None, order=[], swept=set()))
        g["default"] = g["default"] or run.get("default_mode")
        # the learning rates the race swept (the summary keeps each mode's chosen one per seed)
        g["swept"].update(run.get("lr_values") or ())
        for mode, r in run["modes"].items():
            if mode not in g["order"]:
                g["order"].append(mode)
            cell = (mode, r.get("lr"), run["seed"])
            if cell in g["finals"]:
                raise SystemExit(f"{QUALITY_SOURCE.name}: mode {mode} at lr {r.get('lr')} seed {run['seed']} "
                                 f"appears twice in setting {dict(_setting(run))}; the summary keeps one run "
                                 "per (regime, seed, device, batch size): merge the races with benchmarks/race.py --merge")
            g["finals"][cell] = float(r["final"])
            g["ms"][cell] = r.get("ms_per_step")
            g["extra"][cell] = r
    out = []
    for key, g in groups.items():
        best: dict[str, dict[Any, float]] = {}  # mode -> {seed: final at the mode's best lr}
        info: dict[str, dict] = {}
        for mode in g["order"]:
            by_lr: dict[Any, dict] = {}
            for (m, lr, seed), v in g["finals"].items():
                if m == mode:
                    by_lr.setdefault(lr, {})[seed] = v
            # the lr with the lowest mean over its seeds; ties to the smaller lr (sorted first)
            lr = min(sorted(by_lr, key=lambda x: (x is None, x)), key=lambda x: statistics.fmean(by_lr[x].values()))
            best[mode] = dict(sorted(by_lr[lr].items()))
            ms = [g["ms"][(mode, lr, s)] for s in best[mode] if g["ms"][(mode, lr, s)] is not None]
            noise = [g["extra"][(mode, lr, s)].get("noise_share_trained") for s in best[mode]]
            tried = set(by_lr) | g["swept"]
            info[mode] = dict(lr=lr, lrs=sorted(tried, key=lambda x: (x is None, x)),
                              ms=statistics.median(ms) if ms else None,
                              steps=[g["extra"][(mode, lr, s)].get("steps") for s in best[mode]],
                              noise=[n for n in noise if n is not None])
        rows = []
        order = sorted(g["order"], key=lambda m: (m != "full", m != "random", m != g["default"]))
        for mode in order:
            finals = best[mode]
            vals = list(finals.values())
            row = dict(mode=mode, default=mode == g["default"], seeds=list(finals), finals=vals,
                       mean=statistics.fmean(vals), std=statistics.stdev(vals) if len(vals) > 1 else None,
                       **info[mode])
            for ref in ("random", "full"):
                if ref in best and mode != ref:
                    both = [s for s in finals if s in best[ref]]
                    row[f"beats_{ref}"] = (sum(finals[s] < best[ref][s] for s in both), len(both))
            rows.append(row)
        out.append(dict(setting=dict(key), rows=rows))
    # numbers as numbers (B=32 before B=128), the rest as text
    out.sort(key=lambda grp: tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))
                                   for v in grp["setting"].values()))
    return out


# How a setting's key reads in the regime column.
_SETTING_NAMES = {"batch_size": "B={}"}


def _setting_label(setting: dict, show_budget: bool = False) -> str:
    """The regime, then the settings that tell its groups apart (the budget where budgets differ)."""
    extra = [_SETTING_NAMES.get(k, k + "={}").format(v) for k, v in setting.items() if k not in _SETTING_ORDER]
    if show_budget and setting.get("budget_s") is not None:
        extra.append(f"{setting['budget_s']:g} s")
    return f"{setting.get('regime')}" + (f" ({', '.join(extra)})" if extra else "")


def _budgets_differ(groups: list[dict]) -> bool:
    return len({g["setting"].get("budget_s") for g in groups}) > 1


def _mode_label(row: dict) -> str:
    label = MODE_LABELS.get(row["mode"], f"`{row['mode']}`")
    return f"**default**: {label}" if row["default"] else label


def _beats(row: dict, ref: str) -> str:
    if f"beats_{ref}" not in row:
        return "–"
    n, m = row[f"beats_{ref}"]
    return f"{n}/{m}"


def _mean_std(row: dict) -> str:
    return f"{row['mean']:.3f} ± {row['std']:.3f}" if row["std"] is not None else f"{row['mean']:.3f}"


def _lr(lr: Any) -> str:
    return "–" if lr is None else f"{lr:g}"


def _group_header(groups: list[dict]) -> str:
    devs = sorted({str(g["setting"].get("device")) for g in groups})
    presets = sorted({str(g["setting"].get("preset")) for g in groups})
    budgets = sorted({g["setting"].get("budget_s") for g in groups}, key=str)
    budget = ("the step time per run in the regime column" if _budgets_differ(groups)
              else f"{', '.join(f'{b:g}' for b in budgets)} s of step time per run")
    return (f"preset {', '.join(presets)} on {', '.join(devs)}, {budget}; held-out loss of the full model, mean ± std over seeds at each mode's best lr; "
            "beats = seeds where it ends below that baseline of the same seed")


def _fmt_ms(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.1f}"


def markdown_table(columns: list[tuple[str, Callable[[Any], str]]], rows: Iterable[Any]) -> list[str]:
    """A markdown table's lines: the header, its rule, then per row each column's cell of it."""
    lines = ["| " + " | ".join(head for head, _ in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]


def _group_rows(groups: list[dict]) -> list[tuple[dict, dict]]:
    """(group, row) for every mode's row of every group, in order."""
    return [(g, r) for g in groups for r in g["rows"]]


def quality_table(summary: dict) -> str:
    """One row per (setting, mode): the verdict's quality table."""
    groups = quality_groups(summary)

    def loss(gr: tuple[dict, dict]) -> str:
        g, r = gr
        best = r["mean"] == min(x["mean"] for x in g["rows"])
        return f"**{_mean_std(r)}**" if best else _mean_std(r)

    budgets = _budgets_differ(groups)
    columns = [("regime", lambda gr: _setting_label(gr[0]["setting"], budgets)), ("mode", lambda gr: _mode_label(gr[1])),
               ("final loss", loss), ("seeds", lambda gr: str(len(gr[1]["seeds"]))),
               ("beats random", lambda gr: _beats(gr[1], "random")), ("beats full", lambda gr: _beats(gr[1], "full")),
               ("ms/step", lambda gr: _fmt_ms(gr[1]["ms"]))]
    return "\n".join([f"*{_group_header(groups)}.*", ""] + markdown_table(columns, _group_rows(groups)))


def _noise_share(r: dict) -> str:
    lo, hi = (f"{min(r['noise']):.2f}", f"{max(r['noise']):.2f}") if r["noise"] else ("–", "–")
    return lo if lo == hi else f"{lo}–{hi}"


def _best_lr(r: dict) -> str:
    """The chosen lr, and the others tried when there were any."""
    tried = f" (of {', '.join(_lr(x) for x in r['lrs'])})" if len(r["lrs"]) > 1 else ""
    return _lr(r["lr"]) + tried


def quality_detail_table(summary: dict) -> str:
    """Every seed's final, the steps, the chosen lr and (noisy regimes) the share of noise trained on."""
    groups = quality_groups(summary)
    budgets = _budgets_differ(groups)
    columns = [
        ("regime", lambda gr: _setting_label(gr[0]["setting"], budgets)), ("mode", lambda gr: _mode_label(gr[1])),
        ("final by seed", lambda gr: " / ".join(f"{s}: {v:.3f}" for s, v in zip(gr[1]["seeds"], gr[1]["finals"]))),
        ("mean ± std", lambda gr: _mean_std(gr[1])), ("best lr", lambda gr: _best_lr(gr[1])),
        ("steps", lambda gr: " / ".join("–" if s is None else str(s) for s in gr[1]["steps"])),
        ("ms/step", lambda gr: _fmt_ms(gr[1]["ms"])), ("noise share trained", lambda gr: _noise_share(gr[1])),
    ]
    return "\n".join(markdown_table(columns, _group_rows(groups)))


# ----------------------------------------------------------------------------------------- speed
def _records(speed: dict, model: str, mode: str, ratio: Optional[float], router: Optional[int]) -> Optional[dict]:
    for r in speed["records"]:
        if r["model"] != model or r["mode"] != mode or r.get("status") != "ok":
            continue
        if mode in ("compiled", "eager") or (r.get("ratio") == ratio and r.get("router_layers") in (router, None)):
            return r
    return None


def _speed_rows(speed: dict, main: bool) -> list[dict]:
    """The derived rows: the canonical setting (ratio 0.25, router 4) or the others (the sweep)."""
    return [d for d in speed["derived"] if (d["ratio"] == 0.25 and d["router_layers"] == 4) == main]


def _cold(speed: dict, d: dict) -> str:
    full = _records(speed, d["model"], "compiled", None, None)
    cg = _records(speed, d["model"], "cggr_backend", d["ratio"], d["router_layers"])
    if not full or not cg or not full.get("cold_compile_s") or not cg.get("cold_compile_s"):
        return "–"
    return f"{cg['cold_compile_s'] / full['cold_compile_s']:.2f}x"


def _speedup(d: dict, key: str) -> str:
    v = d.get(f"{key}_speedup_vs_compiled")
    return "–" if v is None else f"{v:.2f}"


def _gap(d: dict) -> str:
    v = d.get("cggr_backend_gap_ms")
    return "–" if v is None else f"{v:+.1f} ms".replace("-", "−")


def _shape(speed: dict, d: dict) -> str:
    full = _records(speed, d["model"], "compiled", None, None)
    return f"{MODEL_NAMES.get(d['model'], d['model'])} ({full['batch']} x {full['seq']})" if full else d["model"]


def _ms_of(mode: str, bold: bool = False) -> Callable[[dict], str]:
    """The cell of a mode's median step time in a derived row."""
    return lambda d: f"**{_fmt_ms(d.get(f'{mode}_ms'))}**" if bold else _fmt_ms(d.get(f"{mode}_ms"))


def _caption(speed: dict, source: Path) -> str:
    s = speed["meta"]["settings"]
    return (f"*{speed['meta']['device_name']}, torch {speed['meta']['versions']['torch']}, bf16 autocast, "
            f"fused AdamW in the step, CUDA graphs in every compiled mode, scoring {s['scoring']}, "
            f"ratio 0.25, router 4 layers; median step ms over {s['steps']} steps (`{source.name}`).*")


def _own_peak(speed: dict, mode: str) -> Callable[[dict], str]:
    """A mode's peak memory less what was allocated when it started: a mode whose model the
    benchmark could not free (its record says ``model_freed: false``) leaves memory to the next."""
    def cell(d: dict) -> str:
        r = _records(speed, d["model"], mode, d["ratio"], d["router_layers"])
        if not r or r.get("peak_mem_gib") is None:
            return "–"
        return f"{r['peak_mem_gib'] - (r.get('mem_at_start_gib') or 0.0):.2f}"
    return cell


def speed_table(speed: dict) -> str:
    """Step times (median ms) at the canonical setting with the fused loss, one row per shape."""
    columns = [("shape", lambda d: _shape(speed, d)),
               ("`torch.compile` full batch", _ms_of("compiled")),
               ("+ fused loss", _ms_of("compiled_fused_loss")),
               ("random subset of k (fused loss)", _ms_of("random_subset")),
               ("router alone", _ms_of("router_only")),
               ('`backend="cggr"` (fused loss)', _ms_of("cggr_backend", bold=True)),
               ("x compiled", lambda d: f"**{_speedup(d, 'cggr_backend')}**"), ("CGGR − (subset + router)", _gap),
               ("peak GiB: subset / CGGR", lambda d: f"{_own_peak(speed, 'random_subset')(d)} / "
                                                      f"{_own_peak(speed, 'cggr_backend')(d)}"),
               ("cold compile vs full", lambda d: _cold(speed, d))]
    return "\n".join([_caption(speed, SPEED_SOURCE), ""] + markdown_table(columns, _speed_rows(speed, main=True)))


def speed_canon_table(speed: dict) -> str:
    """The earlier canonical run without the fused loss, with eager and the transform."""
    columns = [("shape", lambda d: _shape(speed, d)), ("eager", _ms_of("eager")),
               ("`torch.compile` full batch", _ms_of("compiled")), ("random subset of k", _ms_of("random_subset")),
               ("router alone", _ms_of("router_only")), ('`backend="cggr"`', _ms_of("cggr_backend", bold=True)),
               ("`compile(transform(model))`", _ms_of("cggr_transform")),
               ("x compiled", lambda d: f"**{_speedup(d, 'cggr_backend')}**"), ("CGGR − (subset + router)", _gap),
               ("cold compile vs full", lambda d: _cold(speed, d))]
    return "\n".join([_caption(speed, SPEED_UNFUSED_SOURCE), ""]
                     + markdown_table(columns, _speed_rows(speed, main=True)))


def speed_sweep_table(speed: dict) -> str:
    """The other ratios and router depths of the same run, against its compiled full batch."""
    columns = [("model", lambda d: MODEL_NAMES.get(d["model"], d["model"])),
               ("ratio, router layers", lambda d: f"{d['ratio']:g}, {d['router_layers']}"),
               ("compiled full batch", _ms_of("compiled")), ("random subset of k", _ms_of("random_subset")),
               ("router alone", _ms_of("router_only")), ('`backend="cggr"`', _ms_of("cggr_backend")),
               ("x compiled", lambda d: _speedup(d, "cggr_backend")), ("CGGR − (subset + router)", _gap)]
    rows = sorted(_speed_rows(speed, main=False), key=lambda d: (d["model"], d["router_layers"], d["ratio"]))
    return "\n".join(markdown_table(columns, rows))


# ---------------------------------------------------------------------------------------- rewrite
def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path}: missing; the tables are generated from it (restore it from git)") from None
    except ValueError as e:
        raise SystemExit(f"{path}: not valid JSON ({e}); restore it from git or rerun its benchmark") from None


def tables() -> dict[str, Callable[[], str]]:
    """Table name -> its renderer (sources are read once, on first use)."""
    cache: dict[Path, dict] = {}

    def src(path: Path) -> dict:
        if path not in cache:
            cache[path] = _load(path)
        return cache[path]

    return {
        "speed-table": lambda: speed_table(src(SPEED_SOURCE)),
        "speed-canon-table": lambda: speed_canon_table(src(SPEED_UNFUSED_SOURCE)),
        "speed-sweep-table": lambda: speed_sweep_table(src(SPEED_UNFUSED_SOURCE)),
        "quality-table": lambda: quality_table(src(QUALITY_SOURCE)),
        "quality-detail-table": lambda: quality_detail_table(src(QUALITY_SOURCE)),
    }


MARKER = re.compile(r"(<!-- ([a-z-]+):start -->\n)(.*?)(<!-- \2:end -->)", re.S)


def render(text: str, path: Path, renderers: dict[str, Callable[[], str]]) -> str:
    """``text`` with every marked table replaced by its generated content."""
    def sub(m: re.Match) -> str:
        name = m.group(2)
        if name not in renderers:
            raise SystemExit(f"{path}: unknown table marker {name!r}; known: {', '.join(sorted(renderers))}")
        return f"{m.group(1)}{renderers[name]()}\n{m.group(4)}"

    found = {m.group(2) for m in MARKER.finditer(text)}
    starts = set(re.findall(r"<!-- ([a-z-]+):start -->", text))
    if starts - found:
        raise SystemExit(f"{path}: marker(s) {', '.join(sorted(starts - found))} start without a matching "
                         "'<!-- NAME:end -->' on its own line")
    missing = [n for n in REQUIRED.get(path, ()) if n not in found]
    if missing:
        raise SystemExit(f"{path}: the table(s) {', '.join(missing)} are missing; put "
                         f"'<!-- NAME:start -->' and '<!-- NAME:end -->' lines where they belong")
    return MARKER.sub(sub, text)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale")
    args = p.parse_args(argv)
    renderers = tables()
    stale = []
    for path in TARGETS:
        if not path.exists():
            raise SystemExit(f"{path}: missing; it holds generated tables (restore it from git)")
        old = path.read_text()
        new = render(old, path, renderers)
        if new != old:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    for path in stale:
        rel = path.relative_to(REPO)
        print(f"{rel}: {'stale' if args.check else 'rewritten'}", file=sys.stderr if args.check else sys.stdout)
    if args.check and stale:
        print("the tables differ from the result files: run python benchmarks/readme_tables.py and commit",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
