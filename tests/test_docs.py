"""The documentation cannot drift from the code and the result files.

- every ``path.py:name`` / ``path.py::name`` the docs cite names a file that exists and a function,
  class, method or constant defined in it (``Class.method`` is looked up inside the class);
- every markdown link is relative, resolves inside the repository to a file that exists, and its
  ``#anchor`` names a heading of that file;
- the result tables equal what ``benchmarks/readme_tables.py`` generates from the JSON (``--check``);
- ``benchmarks/results/README.md`` lists every result file, and only files that exist; so does the index
  of each subfolder (``benchmarks/results/archive/README.md``, the superseded runs), whose every entry
  also names the file above that superseded it.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ARCHIVE = RESULTS / "archive"
DOCS = sorted([REPO / "README.md", RESULTS / "README.md", *RESULTS.glob("*/README.md"), *(REPO / "docs").glob("*.md")])

# `cggr_compile/transform.py:CGGRModel.forward`, `tests/test_backend.py::TestSnapshot::test_x`
CODE_REF = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.py)((?:::?[A-Za-z_][\w.]*)*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _load_tables():
    spec = importlib.util.spec_from_file_location("readme_tables", REPO / "benchmarks" / "readme_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@lru_cache(maxsize=None)
def _defined(path: Path) -> dict:
    """Top-level names of a Python file -> their AST node (functions, classes, assigned names)."""
    tree = ast.parse(path.read_text(), str(path))
    return _names(tree.body)


def _names(body: list) -> dict:
    out = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def _resolve(path: Path, dotted: str) -> bool:
    scope = _defined(path)
    for part in dotted.split("."):
        node = scope.get(part)
        if node is None:
            return False
        scope = _names(node.body) if isinstance(node, ast.ClassDef) else {}
    return True


def code_references(text: str) -> list[tuple[str, list[str]]]:
    """``(path, [name, ...])`` for every ``.py`` path the text cites, with the names after it."""
    out = []
    for m in CODE_REF.finditer(text):
        names = [n for n in re.split(r"::?", m.group(2)) if n]
        out.append((m.group(1), names))
    return out


def _problems_in_refs(doc: Path, text: str | None = None) -> list[str]:
    problems = []
    for rel, names in code_references(doc.read_text() if text is None else text):
        path = REPO / rel
        if not path.is_file():
            # a bare script name (``race.py``) next to its folder's name is how commands are quoted
            if "/" not in rel and any(REPO.glob(f"*/{rel}")):
                continue
            problems.append(f"{doc.relative_to(REPO)}: {rel} does not exist")
            continue
        dotted = ".".join(names)  # path:Class.method and path::Class::method alike
        if dotted and not _resolve(path, dotted):
            problems.append(f"{doc.relative_to(REPO)}: {rel} defines no {dotted!r}")
    return problems


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    body = FENCE.sub("", path.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", body, re.M)}


def _problems_in_links(doc: Path, text: str | None = None) -> list[str]:
    problems = []
    text = FENCE.sub("", doc.read_text() if text is None else text)
    for m in LINK.finditer(text):
        target = m.group(1)
        where = f"{doc.relative_to(REPO)}: link {target!r}"
        if re.match(r"https?://", target):
            continue  # a public page, reachable from anywhere
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            problems.append(f"{where} is not a path inside the repository")
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc.resolve()
        if not dest.is_relative_to(REPO):
            problems.append(f"{where} points outside the repository; copy what it needs into docs/")
        elif not dest.exists():
            problems.append(f"{where}: {dest.relative_to(REPO)} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{where}: {dest.relative_to(REPO)} has no heading with anchor #{anchor}")
    return problems


def expand_braces(token: str) -> list[str]:
    """``a-{x,y}.{json,md}`` -> ``a-x.json, a-x.md, a-y.json, a-y.md`` (shell-style, innermost first)."""
    m = re.search(r"\{([^{}]*)\}", token)
    if not m:
        return [token]
    return [e for part in m.group(1).split(",")
            for e in expand_braces(token[:m.start()] + part + token[m.end():])]


# --------------------------------------------------------------------------------------- tests
def test_code_references_exist():
    problems = [p for doc in DOCS for p in _problems_in_refs(doc)]
    assert not problems, "stale code references in the docs:\n" + "\n".join(problems)


def test_links_stay_inside_the_repository():
    problems = [p for doc in DOCS for p in _problems_in_links(doc)]
    assert not problems, "bad markdown links:\n" + "\n".join(problems)


def test_reference_checker_catches_what_it_should():
    """The checks above flag a missing function, a missing method, a missing file and a link out."""
    text = ("`cggr_compile/scoring.py:token_stats` `cggr_compile/scoring.py:no_such_function` "
            "`cggr_compile/transform.py:CGGRModel.forward` `cggr_compile/transform.py:CGGRModel.nope` "
            "`cggr_compile/gone.py:x` [spec](../../shared/SPEC.md) [ok](semantics.md#selection) "
            "[bad anchor](semantics.md#nowhere) [abs](/work/shared/SPEC.md)")
    doc = REPO / "docs" / "probe.md"  # never written: the text is checked as if it lived there
    refs, links = _problems_in_refs(doc, text), _problems_in_links(doc, text)
    assert any("no_such_function" in p for p in refs)
    assert any("'CGGRModel.nope'" in p for p in refs)
    assert any("gone.py does not exist" in p for p in refs)
    assert not any("token_stats" in p or "'CGGRModel.forward'" in p for p in refs)
    assert any("'../../shared/SPEC.md' points outside" in p for p in links)
    assert any("'/work/shared/SPEC.md' is not a path inside" in p for p in links)
    assert any("#nowhere" in p for p in links)
    assert not any("#selection" in p for p in links)


def test_readme_tables_are_current():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "readme_tables.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_tables_check_sees_a_stale_table():
    t = _load_tables()
    readme = (REPO / "README.md").read_text()
    rendered = t.render(readme, REPO / "README.md", t.tables())
    assert rendered == readme
    # a hand edit of the table's last row (as when a figure is typed in instead of generated)
    end = readme.index("\n<!-- quality-table:end -->")
    stale = readme[:end] + " edited" + readme[end:]
    assert t.render(stale, REPO / "README.md", t.tables()) == readme
    with pytest.raises(SystemExit, match="quality-table"):
        t.render(readme.replace("<!-- quality-table:start -->", ""), REPO / "README.md", t.tables())


def test_quality_groups_best_lr_and_extra_settings():
    """Several learning rates per mode, and a run key (batch size) that tells settings apart: sorted
    as a number (32 before 128), named in the regime column, with the budget where budgets differ."""
    t = _load_tables()

    def run(seed, lr, batch, full, random, cggr):
        modes = {"full": dict(final=full, best=full, steps=10, ms_per_step=60.0, lr=lr),
                 "random": dict(final=random, best=random, steps=30, ms_per_step=20.0, lr=lr),
                 "cggr-loss-importance": dict(final=cggr, best=cggr, steps=25, ms_per_step=25.0, lr=lr)}
        return dict(regime="pretrained", seed=seed, device="GPU", preset="p", budget_s=8.0,
                    default_mode="cggr-loss-importance", batch_size=batch, modes=modes)

    runs = []
    for seed in (0, 1, 2):
        runs.append(run(seed, 1e-3, 32, 1.70, 1.80, 1.79 if seed < 2 else 1.81))  # best lr for all
        runs.append(run(seed, 3e-4, 32, 1.75, 1.85, 1.70))  # cggr's mean is lower here: its best lr
        runs.append(run(seed, 1e-3, 128, 1.60, 1.90, 1.95))
    # several learning rates of one seed as separate runs, and two batch sizes: two settings
    groups = t.quality_groups({"runs": runs})
    assert [g["setting"]["batch_size"] for g in groups] == [32, 128]
    rows = {r["mode"]: r for r in groups[0]["rows"]}
    assert [r["mode"] for r in groups[0]["rows"]] == ["full", "random", "cggr-loss-importance"]
    assert rows["full"]["lr"] == 1e-3 and rows["full"]["mean"] == pytest.approx(1.70)
    assert rows["cggr-loss-importance"]["lr"] == 3e-4
    assert rows["cggr-loss-importance"]["beats_random"] == (3, 3)
    assert rows["cggr-loss-importance"]["beats_full"] == (0, 3)
    assert rows["random"]["std"] == pytest.approx(0.0)
    table = t.quality_table({"runs": runs})
    assert "pretrained (B=32)" in table and "pretrained (B=128)" in table
    other_budget = [dict(r, budget_s=10.0) if r["batch_size"] == 128 else r for r in runs]
    table = t.quality_table({"runs": other_budget})
    assert "pretrained (B=32, 8 s)" in table and "pretrained (B=128, 10 s)" in table
    assert "the step time per run in the regime column" in table
    dup = copy.deepcopy(runs) + [copy.deepcopy(runs[0])]
    with pytest.raises(SystemExit, match="appears twice"):
        t.quality_groups({"runs": dup})


def _index_problems(folder: Path) -> list[str]:
    """What the folder's ``README.md`` gets wrong about the folder's files (subfolders aside): a file it
    does not list, or a file name it lists that is not there (a name with a ``/`` points elsewhere)."""
    index = folder / "README.md"
    if not index.is_file():
        return [f"{folder.relative_to(REPO)} has no README.md indexing its files"]
    text = index.read_text()
    names = {e for tok in re.findall(r"`([^`\s]+)`", text) for e in expand_braces(tok)}
    files = {p.name for p in folder.iterdir() if p.is_file() and p.name != "README.md"}
    problems = []
    unlisted = sorted(files - names)
    if unlisted:
        problems.append(f"{index.relative_to(REPO)} does not list: {', '.join(unlisted)}; add each under "
                        "its experiment (device, command, what it shows)")
    listed = {n for n in names if re.fullmatch(r"[\w.-]+\.(json|md|png|log)", n)}
    missing = sorted(listed - files - {"README.md"})
    if missing:
        problems.append(f"{index.relative_to(REPO)} lists files that do not exist: {', '.join(missing)}")
    return problems


def _result_folders() -> list[Path]:
    return [RESULTS, *sorted(p for p in RESULTS.iterdir() if p.is_dir())]


def test_results_index_lists_every_file():
    """The top-level index lists exactly the top-level files; each subfolder (the archive) has its own
    index that lists exactly its files, so an archived run is never listed as a current one."""
    assert ARCHIVE in _result_folders()
    problems = [p for folder in _result_folders() for p in _index_problems(folder)]
    assert not problems, "\n".join(problems)
    top = {p.name for p in RESULTS.iterdir() if p.is_file()} - {"README.md"}
    both = sorted(top & {p.name for p in ARCHIVE.iterdir() if p.is_file()} - {"README.md"})
    assert not both, f"in benchmarks/results/ and in its archive at once: {', '.join(both)}"


def _table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row except header and rule rows."""
    rows = []
    for line in FENCE.sub("", text).splitlines():
        if not line.startswith("|") or re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line.strip()):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] != "file":
            rows.append(cells)
    return rows


def test_archive_entries_name_what_superseded_them():
    """Every row of the archive's index ends with the current file(s) that superseded it: at least
    one ``../name`` there names a file at the top of benchmarks/results/."""
    top = {p.name for p in RESULTS.iterdir() if p.is_file()}
    rows = _table_rows((ARCHIVE / "README.md").read_text())
    assert rows, "benchmarks/results/archive/README.md has no table of archived files"
    problems = []
    for cells in rows:
        refs = [e for tok in re.findall(r"`([^`\s]+)`", cells[-1]) for e in expand_braces(tok)]
        above = [r[3:] for r in refs if r.startswith("../")]
        if not above:
            problems.append(f"{cells[0]}: its last column names no superseding file (`../name`)")
        elif not all(r in top for r in above):
            problems.append(f"{cells[0]}: superseded by files not in benchmarks/results/: "
                            f"{', '.join(r for r in above if r not in top)}")
    assert not problems, "\n".join(problems)


def test_results_index_check_catches_what_it_should(tmp_path, monkeypatch):
    """An unlisted file, a listed file that is gone, and a folder without an index are flagged."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    folder = tmp_path / "r"
    (folder / "sub").mkdir(parents=True)
    (folder / "a_cpu.json").write_text("{}")
    (folder / "b_cpu.json").write_text("{}")
    (folder / "README.md").write_text("| `a_cpu.{json,md}` | `sub/c_cpu.json` |\n")
    problems = _index_problems(folder)
    assert any("does not list: b_cpu.json" in p for p in problems)
    assert any("do not exist: a_cpu.md" in p for p in problems)
    assert not any("c_cpu" in p for p in problems)
    assert _index_problems(folder / "sub") == ["r/sub has no README.md indexing its files"]


def test_readme_is_short_and_leads_with_the_verdict():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 160, (f"README.md has {len(lines)} lines; keep it near 150 and move detail into "
                               "docs/usage.md, docs/architecture.md or docs/results.md")
    verdict = [i for i, line in enumerate(lines) if line.strip() == "## Verdict"]
    assert verdict and verdict[0] < 30, "the README's verdict belongs on its first screen, right after the set-up"


def test_readme_opening_block_is_the_ci_command():
    """.ci/run reads the test command from the README's first ```bash block."""
    text = (REPO / "README.md").read_text()
    first = re.search(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
    assert first and first.group(1) == "bash"
    assert "python -m pytest" in first.group(2) and "benchmarks/race.py --preset tiny" in first.group(2)


def test_quality_summary_is_the_schema_the_tables_read():
    summary = json.loads((RESULTS / "quality_summary.json").read_text())
    for run in summary["runs"]:
        assert {"regime", "seed", "device", "modes"} <= set(run)
        for r in run["modes"].values():
            assert {"final", "best", "steps", "ms_per_step", "lr"} <= set(r)
