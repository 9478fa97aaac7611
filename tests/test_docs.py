"""The docs keep their promises, checked from their text alone (no subprocess, well under a second):

- every command line printed in a fenced block of a README or a ``docs/`` page carries, on the line right above it,
  either ``# tested: tests/<file>.py::<test>`` (that test runs the command's form, on small data) or
  ``# needs: <reason>`` from a short list (real data, a GPU, a long time, ...);
- every relative link of every Markdown file leads to a file that exists, and to a heading of it where it names one;
- every figure of the repository README's Performance table is in ``docs/performance.md``, in one row with the
  row's other figures;
- the root README stays under 250 lines and each bundle README under 12 KB (issue 28)."""

from __future__ import annotations

import ast
import re
import unicodedata
from functools import cache
from pathlib import Path

import pytest
from conftest import DOC_PAGES, REPO

TESTS = REPO / "tests"
# the pages a user reads: the READMEs and the docs/ folders (the vendored zoo CI's README is not ours)
PAGES = DOC_PAGES
MARKDOWN = sorted(
    p
    for p in REPO.rglob("*.md")
    if not {".venv", ".git", "zoo_ci", "node_modules"} & set(p.relative_to(REPO).parts)
    and not any(part.startswith(".") for part in p.relative_to(REPO).parts)
)
# what a command line starts with (after VAR=value assignments and a path to the program)
PROGRAMS = {"python", "python3", "python3.10", "python3.11", "torchrun", "bash", "sh", "monailabel", "mlflow"}
PROGRAMS |= {"tensorboard", "pip", "cp", "pytest"}
# why a printed command cannot run in the suite: the only reasons accepted
REASONS = {
    "BTCV data",
    "MSD data",
    "unlabelled CT",
    "your data",
    "a trained model",
    "a GPU",
    "GPUs",
    "internet",
    "a long time",
    "Python 3.10",
}
MARKER = re.compile(r"^# (tested|needs): (.+)$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def page_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def commands(page: Path) -> list[tuple[int, str, str | None]]:
    """(line number, command, the marker line right above it or None) of every command in ``page``'s fenced blocks."""
    found, inside, previous = [], False, None
    lines = page.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            inside, previous = not inside, None
            continue
        if not inside:
            continue
        words = [w for w in line.split() if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
        if words and Path(words[0]).name in PROGRAMS:
            found.append((number, line, previous))
        previous = line if line.startswith("# ") else None
    return found


@cache
def sources_of_tests(test_file: Path) -> dict[str, str]:
    """Each test function's source in ``test_file``, with the module's top-level constants (what a test may name its
    command lines through), by name."""
    text = test_file.read_text()
    tree = ast.parse(text)
    constants = "\n".join(
        ast.get_source_segment(text, n) or "" for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
    )
    return {
        n.name: constants + (ast.get_source_segment(text, n) or "")
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef) and n.name.startswith("test")
    }


def marker_problem(command: str, marker: str | None) -> str | None:
    """Why ``marker`` does not vouch for ``command`` (None when it does)."""
    match = MARKER.match(marker or "")
    if match is None:
        return "no '# tested: tests/<file>.py::<test>' or '# needs: <reason>' line right above it"
    kind, value = match.groups()
    if kind == "needs":
        unknown = [r for r in (r.strip() for r in value.split(",")) if r not in REASONS]
        return f"unknown reason(s) {unknown}; known: {sorted(REASONS)}" if unknown else None
    file_name, _, test_name = value.partition("::")
    test_file = REPO / file_name
    if not (file_name.startswith("tests/") and test_file.is_file()):
        return f"{file_name}: no such test file"
    sources = sources_of_tests(test_file)
    if test_name and test_name not in sources:
        return f"{file_name} has no test named {test_name}"
    # the test must at least name what the command runs: its configs, its tool, its monai.bundle command
    source = sources[test_name] if test_name else test_file.read_text()
    names = re.findall(r"configs/(\w+)\.json", command) + re.findall(r"tools/(\w+)\.py", command)
    names += [c for c in re.findall(r"monai\.bundle (\w+)", command) if c != "run"]
    missing = [n for n in names if n not in source]
    return f"{value} never mentions {missing}" if missing else None


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_printed_command_runs_in_the_suite_or_says_what_it_needs(page):
    problems = [
        f"{page_id(page)}:{number}: {command[:90]}: {problem}"
        for number, command, marker in commands(page)
        if (problem := marker_problem(command, marker))
    ]
    assert not problems, "\n".join(problems)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation and symbols dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    result = set()
    inside = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
        if inside or not (heading := re.match(r"^#{1,6} (.+)$", line)):
            continue
        base = slug(heading.group(1))
        result.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return frozenset(result)


@pytest.mark.parametrize("page", MARKDOWN, ids=page_id)
def test_every_relative_link_resolves(page):
    problems = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:, file:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            problems.append(f"{target}: {resolved} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading '{anchor}' in {page_id(resolved)}")
    assert not problems, f"{page_id(page)}:\n" + "\n".join(problems)


FIGURE = re.compile(r"^\**(\d[\d,]*(?:\.\d+)?)\s*(?:×|%|s|MB|GB|min)?\**$")


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the Markdown tables in ``text`` (header and separator rows left out), as lists of cells."""
    rows, previous = [], ""
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[-:| ]+\|$", line) and previous.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        previous = line
    return rows


def figures(cells: list[str]) -> list[str]:
    return [m.group(1).replace(",", "") for cell in cells if (m := FIGURE.match(cell))]


def section(text: str, heading: str) -> str:
    match = re.search(rf"^## {heading}\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def test_the_readme_performance_figures_are_those_of_docs_performance():
    summary = [figures(row) for row in table_rows(section((REPO / "README.md").read_text(), "Performance"))]
    assert sum(map(len, summary)) >= 10, "the README's Performance table has lost its figures"
    measured = [set(figures(row)) for row in table_rows((REPO / "docs" / "performance.md").read_text())]
    missing = [row for row in summary if row and not any(set(row) <= figs for figs in measured)]
    assert not missing, f"README Performance rows whose figures no row of docs/performance.md has: {missing}"


def test_the_readmes_stay_short():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= 250, f"README.md: {lines} lines (at most 250: measurements go to docs/)"
    for readme in REPO.glob("bundles/*/docs/README.md"):
        size = readme.stat().st_size
        assert size <= 12 * 1024, f"{page_id(readme)}: {size} bytes (at most 12 KB: details go to the bundle's docs/)"
