"""The speed benchmark's report: ratios derived from the records, the markdown tables, the plot, the
JSON / markdown / PNG outputs, and the merge of several runs into one report.

Derived per (shape, ratio, router) combination (``derive``; the JSON has them all, the markdown
table the main ones): the speedup over ``compiled`` (``compiled_ms / mode_ms``) and the gap of each
CGGR mode to ``random_subset + router_only`` (the best a sequence-level CGGR step can do).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import copy_to_out, result_stem, write_report
from benchmarks.harness.step_timing import ALL_MODES, CGGR_MODES

# FINDINGS.md, "The numbers to beat" (H200, torch 2.11, ratio 0.25, router 4): median ms.
REFERENCE_H200 = {
    "smollm135m": dict(eager=113.5, compiled=61.6, random_subset=27.1, original_cggr=66.6, router_only=6.0),
    "smollm360m": dict(eager=195.5, compiled=116.7, random_subset=39.4, original_cggr=79.8, router_only=8.8),
    "llama1b": dict(eager=178.8, compiled=134.3, random_subset=46.5, original_cggr=84.3, router_only=18.8),
}


def _fmt(x: Any, spec: str = ".1f", dash: str = "–") -> str:
    """``x`` formatted, or a dash for a missing or non-finite value."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return dash
    return format(x, spec)


def find(records: list[dict], mode: str, model: str, ratio: Optional[float] = None,
         router_layers: Optional[int] = None) -> Optional[dict]:
    """The record of ``mode`` on ``model``, matched on the ratio / router only where the mode depends on them."""
    for r in records:
        if r["mode"] != mode or r["model"] != model:
            continue
        if mode in ("random_subset", "cggr_backend", "cggr_transform") and r.get("ratio") != ratio:
            continue
        if mode in ("router_only", "cggr_backend", "cggr_transform") and r.get("router_layers") != router_layers:
            continue
        return r
    return None


def ok_ms(r: Optional[dict]) -> Optional[float]:
    """A record's median step time when it measured one, else None."""
    if r is None or r.get("status") not in ("ok",) or "median_ms" not in r:
        return None
    return r["median_ms"]


def combos(records: list[dict]) -> list[tuple[str, float, int]]:
    """The ``(model, ratio, router_layers)`` combinations of the records, in their order."""
    seen: list[tuple[str, float, int]] = []
    for r in records:
        if r["mode"] in CGGR_MODES or r["mode"] == "router_only":
            c = (r["model"], r["ratio"], r["router_layers"])
            if c not in seen:
                seen.append(c)
    for r in records:  # shapes run without any CGGR mode
        if not any(c[0] == r["model"] for c in seen):
            c = (r["model"], r.get("ratio"), r.get("router_layers"))
            if c not in seen:
                seen.append(c)
    return seen


def derive(records: list[dict]) -> list[dict]:
    """Speedups over ``compiled`` and gaps of CGGR to random_subset + router_only, per combination."""
    out = []
    for model, ratio, rl in combos(records):
        comp = ok_ms(find(records, "compiled", model))
        rs = ok_ms(find(records, "random_subset", model, ratio))
        ro_rec = None
        for r in records:  # router_only is keyed by router layers; its ratio only sets topk's k
            if r["mode"] == "router_only" and r["model"] == model and r.get("router_layers") == rl:
                ro_rec = r
                break
        ro = ok_ms(ro_rec)
        ceiling = rs + ro if rs is not None and ro is not None else None
        row: dict[str, Any] = dict(model=model, ratio=ratio, router_layers=rl, compiled_ms=comp,
                                   random_subset_ms=rs, router_only_ms=ro, ceiling_ms=ceiling)
        for mode in ALL_MODES:
            r = find(records, mode, model, ratio, rl)
            ms = ok_ms(r)
            row[f"{mode}_ms"] = ms
            row[f"{mode}_speedup_vs_compiled"] = comp / ms if comp and ms else None
        for mode in CGGR_MODES:
            ms = row[f"{mode}_ms"]
            row[f"{mode}_gap_ms"] = ms - ceiling if ms is not None and ceiling is not None else None
            row[f"{mode}_over_ceiling"] = ms / ceiling if ms is not None and ceiling else None
        out.append(row)
    return out


def sync_cell(r: dict) -> str:
    """The table cell of a record's host-sync check."""
    hs = r.get("host_sync")
    if not hs:
        return "–"
    if hs.get("syncs") is None:
        return "n/a"
    if not hs["syncs"]:
        return "no"
    msg = hs.get("error", "")
    return "YES: " + msg.replace("|", "/").replace("\n", " ")[:80]


def compiles_cell(r: dict) -> str:
    """The table cell of a record's compilations: graphs g / AOTAutograd a / routed graphs r."""
    c = r.get("compile_counts")
    if not c:
        return "–"
    s = f"{c['unique_graphs']}g/{c['aot_autograd_compiles']}a"
    if r.get("routed_graph_compiles") is not None:
        s += f"/{r['routed_graph_compiles']}r"
    if c.get("graph_breaks"):
        s += f" ({c['graph_breaks']} breaks)"
    return s


def status_cell(r: dict) -> str:
    """The table cell of a record's status, with the start of its error when it is not ``ok``."""
    status = r.get("status", "?")
    if status != "ok":
        status += ": " + str(r.get("error", "")).replace("|", "/").replace("\n", " ")[:120]
    return status


def markdown(meta: dict, records: list[dict], schedules: list[dict], predictions: list[dict]) -> str:
    """The report: settings, every record, the summary, profiles, references, predictions, schedules."""
    L: list[str] = []
    L.append(f"# Speed: {meta.get('name')} on {meta.get('device_name')}")
    L.append("")
    v = meta.get("versions", {})
    L.append(f"torch {v.get('torch')}, triton {v.get('triton') or v.get('pytorch-triton') or v.get('triton_module')}, "
             f"transformers {v.get('transformers')}, python {v.get('python')}; commit {v.get('git_commit')}"
             f"{' (library modified)' if v.get('library_dirty') else ''}.")
    L.append(f"Command: `{meta.get('command')}`")
    s = meta.get("settings", {})
    L.append(f"Settings: {s.get('warmup')} warm-up + {s.get('steps')} timed steps per mode, "
             f"{'bf16 autocast' if s.get('autocast') else 'fp32, no autocast'}, SDPA, "
             f"{'fused ' if s.get('fused_adamw') else ''}AdamW inside the step, scoring {s.get('scoring')}, "
             f"compile backend {s.get('compile_backend')}"
             f"{' with CUDA graphs (reduce-overhead; cggr: cudagraphs=True)' if s.get('cudagraphs') else ''}, "
             f"TORCHINDUCTOR_FORCE_DISABLE_CACHES="
             f"{s.get('force_disable_caches')}.")
    if meta.get("ceilings"):
        c = meta["ceilings"]
        L.append(f"Measured ceilings: bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s, device copy {c['copy_gbps']:.0f} GB/s.")
    L.append("")
    L.append("Step = forward + backward + optimizer step, median over the timed steps (p10–p90), by CUDA events "
             "(perf_counter on CPU). tok/s = B·T / step (the full batch). Peak = max_memory_allocated over "
             "the timed steps. Cold = first step's wall time, caches disabled. Compiles = Dynamo graphs (g) / "
             "AOTAutograd compilations (a) / routed graphs compiled by the cggr backend (r) during the mode. "
             "Sync = does one step raise under `set_sync_debug_mode(\"error\")`.")
    L.append("")
    L.append("| model | B×T | ratio | router | k | mode | step ms (p10–p90) | tok/s | peak GiB | cold s | compiles | × compiled | sync | status |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        comp = ok_ms(find(records, "compiled", r["model"]))
        ms = ok_ms(r) if r["mode"] != "router_only" else None  # no training step: no speedup
        step = (f"{r['median_ms']:.1f} ({r['p10_ms']:.1f}–{r['p90_ms']:.1f})" if "median_ms" in r else "–")
        L.append(
            f"| {r['model']} | {r['batch']}×{r['seq']} | {_fmt(r.get('ratio'), 'g')} | {_fmt(r.get('router_layers'), 'd')} "
            f"| {r.get('k')} | {r['mode']} | {step} | {_fmt(r.get('tokens_per_s'), ',.0f')} "
            f"| {_fmt(r.get('peak_mem_gib'), '.2f')} | {_fmt(r.get('cold_compile_s'), '.1f')} | {compiles_cell(r)} "
            f"| {_fmt(comp / ms if comp and ms else None, '.2f')} | {sync_cell(r)} | {status_cell(r)} |"
        )
    rows = derive(records)
    if rows:
        L.append("")
        L.append("Summary (median ms). Ceiling = random_subset + router_only: the best a sequence-level CGGR "
                 "step can do. Gap = CGGR − ceiling. × = speedup over compiled.")
        L.append("")
        L.append("| model | ratio | router | eager | compiled | random_subset | router_only | ceiling | cggr_backend | gap | × | cggr_transform | gap | × |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for d in rows:
            L.append(
                f"| {d['model']} | {_fmt(d['ratio'], 'g')} | {_fmt(d['router_layers'], 'd')} | {_fmt(d['eager_ms'])} "
                f"| {_fmt(d['compiled_ms'])} | {_fmt(d['random_subset_ms'])} | {_fmt(d['router_only_ms'])} "
                f"| {_fmt(d['ceiling_ms'])} | {_fmt(d['cggr_backend_ms'])} | {_fmt(d['cggr_backend_gap_ms'], '+.1f')} "
                f"| {_fmt(d['cggr_backend_speedup_vs_compiled'], '.2f')} | {_fmt(d['cggr_transform_ms'])} "
                f"| {_fmt(d['cggr_transform_gap_ms'], '+.1f')} | {_fmt(d['cggr_transform_speedup_vs_compiled'], '.2f')} |"
            )
    profiled = [r for r in records if "wall_ms" in (r.get("profile") or {})]
    if profiled:
        L.append("")
        L.append("Profile (`--profile`, 3 steps under torch.profiler, median): host = time to enqueue a step, "
                 "kernels = device time inside kernels (their sum), busy = kernels / wall. Host ≈ wall with "
                 "low busy means launch-bound.")
        L.append("")
        L.append("| model | mode | wall ms | host ms | kernels ms | busy | kernels/step | top kernels (ms/step) |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in profiled:
            pr = r["profile"]
            top = "; ".join(f"{k['name'][:40].replace('|', '/')} {k['ms_per_step']:.2f}" for k in pr["top_kernels"][:4])
            L.append(f"| {r['model']} | {r['mode']} | {pr['wall_ms']:.1f} | {pr['host_ms']:.1f} | {pr['gpu_busy_ms']:.1f} "
                     f"| {pr['gpu_busy_ms'] / pr['wall_ms']:.0%} | {pr['kernels_per_step']:.0f} | {top} |")
    refs = [m for m in dict.fromkeys(r["model"] for r in records) if m in REFERENCE_H200]
    if refs:
        L.append("")
        L.append("Reference, FINDINGS.md (H200, torch 2.11, ratio 0.25, router 4; one run each), median ms:")
        L.append("")
        L.append("| model | eager | compiled | random_subset | router_only | original CGGR (eager) |")
        L.append("|---|---|---|---|---|---|")
        for m in refs:
            x = REFERENCE_H200[m]
            L.append(f"| {m} | {x['eager']} | {x['compiled']} | {x['random_subset']} | {x['router_only']} | {x['original_cggr']} |")
    if predictions:
        L.append("")
        L.append("Predicted work per step (before measuring): GFLOP = 6·params·tokens (+ attention, lm_head "
                 "separately) for the trained rows, 2·router params·B·T for the router; floor = max(FLOPs / "
                 "measured matmul rate, minimum bytes / measured copy bandwidth), bytes = AdamW's 28 B/param "
                 "+ bf16 logits.")
        L.append("")
        L.append("| model | ratio | router | params (body / emb) | full GFLOP | subset GFLOP | router GFLOP | CGGR GFLOP "
                 "| floor ms full / subset / router / CGGR | measured ms compiled / random_subset / router_only / cggr_backend |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        drows = derive(records)
        for p in predictions:
            pc = p["params"]
            floors = " / ".join(_fmt(p[n].get("floor_ms"), ".1f") for n in ("full", "random_subset", "router_only", "cggr"))
            d = next((x for x in drows if (x["model"], x["ratio"], x["router_layers"]) ==
                      (p["model"], p["ratio"], p["router_layers"])), {})
            measured = " / ".join(_fmt(d.get(f"{n}_ms")) for n in ("compiled", "random_subset", "router_only", "cggr_backend"))
            L.append(
                f"| {p['model']} | {_fmt(p['ratio'], 'g')} | {p['router_layers']} | {pc['body'] / 1e6:.1f}M / {pc['embedding'] / 1e6:.1f}M "
                f"| {p['full']['flops_total'] / 1e9:,.1f} | {p['random_subset']['flops_total'] / 1e9:,.1f} "
                f"| {p['router_only']['flops_total'] / 1e9:,.1f} | {p['cggr']['flops_total'] / 1e9:,.1f} | {floors} | {measured} |"
            )
    if schedules:
        L.append("")
        L.append("Compilations over a warmup schedule (fresh model, `warmup_steps` below, `step()` after every "
                 "step): k per step from the CGGR metrics; g = Dynamo unique graphs, a = AOTAutograd "
                 "compilations, r = routed graphs compiled by the backend (`RoutedGraph.compiled`).")
        L.append("")
        L.append("| mode | model (layers) | B | ratio | router | warmup | k per step | distinct k | compiles | limit hit | schedule wall s | status |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for s_ in schedules:
            ks = ",".join(str(x) for x in s_.get("k_per_step", [])) or "–"
            L.append(
                f"| {s_['mode']} | {s_['model']} ({s_.get('layers')}) | {s_['batch']} | {_fmt(s_['ratio'], 'g')} "
                f"| {s_['router_layers']} | {s_['warmup_steps']} | {ks} | {_fmt(s_.get('distinct_k'), 'd')} "
                f"| {compiles_cell(s_)} | {s_.get('recompile_limit_hit', '–')} | {_fmt(s_.get('wall_s'), '.1f')} | {status_cell(s_)} |"
            )
    L.append("")
    return "\n".join(L)


def plot(path: Path, meta: dict, records: list[dict]) -> Optional[str]:
    """A bar chart of each mode's median step time per combination; returns why not, if it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # noqa: BLE001
        return f"no PNG: {err}"
    groups = combos(records)
    if not groups:
        return "no PNG: nothing measured"
    fig, ax = plt.subplots(figsize=(max(7.0, 2.2 * len(groups) + 2), 4.5))
    width = 0.8 / len(ALL_MODES)
    for j, mode in enumerate(ALL_MODES):
        xs, ys, lo, hi = [], [], [], []
        for i, (model, ratio, rl) in enumerate(groups):
            r = find(records, mode, model, ratio, rl) if mode != "router_only" else next(
                (x for x in records if x["mode"] == mode and x["model"] == model and x.get("router_layers") == rl), None)
            ms = ok_ms(r)
            if ms is None:
                continue
            xs.append(i + (j - (len(ALL_MODES) - 1) / 2) * width)
            ys.append(ms)
            lo.append(ms - r["p10_ms"])
            hi.append(r["p90_ms"] - ms)
        if xs:
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, error_kw=dict(elinewidth=0.8), label=mode)
    labels = [f"{m}\nr={_fmt(r, 'g')} L={_fmt(l, 'd')}" for m, r, l in groups]
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("median step time, ms (p10–p90)")
    ax.set_title(f"{meta.get('name')}: {meta.get('device_name')}", fontsize=10)
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_outputs(out_dir: Path, stem: str, meta: dict, records: list[dict], schedules: list[dict],
                  predictions: list[dict], png: bool) -> str:
    """Writes the JSON, the markdown and (``png``) the plot, copies them to ``$OUT``; returns the markdown."""
    data = dict(meta=meta, records=records, derived=derive(records), schedules=schedules, predictions=predictions)
    md = markdown(meta, records, schedules, predictions)
    paths = write_report(out_dir, stem, data, md)
    if png:
        note = plot(out_dir / f"{stem}.png", meta, records)
        if note:
            meta["png"] = note
        else:
            paths.append(out_dir / f"{stem}.png")
    copy_to_out(paths, out_dir)
    return md



def merge(files: list[str], name: str, out_dir: Path, png: bool) -> str:
    """One report (JSON, markdown, optionally PNG) named ``name`` from several runs' JSON; returns
    the markdown. The first run's meta describes the device; each shape keeps one prediction."""
    records, schedules, predictions, metas = [], [], [], []
    for f in files:
        d = json.loads(Path(f).read_text())
        metas.append(d["meta"])
        records += d["records"]
        schedules += d.get("schedules", [])
        predictions += d.get("predictions", [])
    models = {r["model"] for r in records}
    predictions = list({(p["model"], p["ratio"], p["router_layers"]): p for p in predictions
                        if p["model"] in models}.values())
    meta = dict(metas[0])
    meta["name"] = name
    meta["command"] = " ; ".join(m.get("command", "?") for m in metas)
    meta["merged_from"] = [str(f) for f in files]
    stem = result_stem("speed", meta["name"], meta.get("device_slug", "unknown"))
    return write_outputs(out_dir, stem, meta, records, schedules, predictions, png)


# ------------------------------------------------------------------------------------ progress lines
def prediction_lines(name: str, shape: dict[str, Any], p: dict[str, Any]) -> list[str]:
    """The log lines of one prediction (``step_timing.predict`` with model / ratio / router_layers)."""
    pc = p["params"]
    lines = [f"#   {name} B={shape['batch']} T={shape['seq']} ratio={p['ratio']:g} k={p['k']} "
             f"router={p['router_layers']}: params body {pc['body'] / 1e6:.1f}M + embedding "
             f"{pc['embedding'] / 1e6:.1f}M{' (tied lm_head)' if pc['tied'] else ''}; router body "
             f"{pc['router_body'] / 1e6:.1f}M"]
    for key in ("full", "random_subset", "router_only", "cggr"):
        e = p[key]
        parts = ", ".join(f"{n} {v / 1e9:,.4g}" for n, v in e["flops"].items())
        fl = (f"; floor {e['floor_ms']:.1f} ms (flops {e['floor_ms_flops']:.1f}, bytes {e['floor_ms_bytes']:.1f})"
              if "floor_ms" in e else "")
        lines.append(f"#     {key:13s} {e['flops_total'] / 1e9:9,.4g} GFLOP ({parts}); >= {e['bytes_min'] / 1e9:.3g} GB{fl}")
    return lines


def record_lines(rec: dict[str, Any]) -> list[str]:
    """The log lines of one mode's record: its times and checks, its profile, or its error."""
    if rec["status"] != "ok":
        return [f"#   {rec['status']}: {rec.get('error')}"]
    lines = [f"#   median {rec['median_ms']:.2f} ms (p10 {rec['p10_ms']:.2f}, p90 {rec['p90_ms']:.2f}), "
             f"cold {rec['cold_compile_s']:.1f} s, compiles {compiles_cell(rec)}, sync {sync_cell(rec)}, "
             f"peak {_fmt(rec.get('peak_mem_gib'), '.2f')} GiB, mode {rec['mode_wall_s']:.0f} s"]
    pr = rec.get("profile") or {}
    if "wall_ms" in pr:
        lines.append(f"#   profile: wall {pr['wall_ms']:.1f} ms, host enqueue {pr['host_ms']:.1f} ms, kernels "
                     f"{pr['gpu_busy_ms']:.1f} ms busy in {pr['kernels_per_step']:.0f} kernels; top: " +
                     "; ".join(f"{k['name'][:50]} {k['ms_per_step']:.2f}" for k in pr["top_kernels"][:6]))
    return lines


def schedule_line(s: dict[str, Any]) -> str:
    """The log line of one schedule run: k per step and its compilations."""
    return (f"#   {s['status']}: k per step {s.get('k_per_step')}, compiles {compiles_cell(s)}, "
            f"{s.get('wall_s', 0):.0f} s {s.get('error', '')}")
