"""Python 3.10, which the model zoo's CI runs (3.10.14) and pyproject.toml allows: every source file compiles under a
real 3.10 interpreter, and vermin finds no standard-library call newer than 3.10 (``hashlib.file_digest`` was one).

Why not a 3.10 test run in CI: the only torch wheel for 3.10 this machine can install is PyPI's CUDA build (a 7 GB
environment, about 45 minutes to build here); the subset that differed by version was run under 3.10 by hand
(docs/python310.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

SOURCES = ["swin_unetr_kit", "tools", "tests", "bundles"]


def python310() -> str | None:
    """A Python 3.10 interpreter that runs (pyenv's shim is on PATH even where 3.10 is not its active version)."""
    candidates = [
        shutil.which("python3.10"),
        *map(str, sorted(Path.home().glob(".pyenv/versions/3.10*/bin/python3.10"))),
    ]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    return None


PY310 = python310()


@pytest.mark.skipif(PY310 is None, reason="no Python 3.10 interpreter on this machine")
def test_every_source_file_compiles_under_python_310(tmp_path):
    files = [str(p) for folder in SOURCES for p in (REPO / folder).rglob("*.py") if "zoo_ci" not in p.parts]
    code = "import sys\nfor f in sys.argv[1:]: compile(open(f, encoding='utf-8').read(), f, 'exec')"
    result = subprocess.run([PY310, "-c", code, *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_no_standard_library_call_newer_than_python_310():
    vermin = Path(sys.executable).with_name("vermin")
    folders = [str(REPO / f) for f in SOURCES]
    cmd = [str(vermin), "-t=3.10-", "--violations", "--no-tips", "--eval-annotations", "--exclude-regex", "zoo_ci"]
    result = subprocess.run([*cmd, *folders], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_vermin_catches_a_311_call(tmp_path):
    """The check above is not vacuous: the call that broke 3.10 before is reported."""
    (tmp_path / "uses_311.py").write_text("import hashlib\n\ndef h(f):\n    return hashlib.file_digest(f, 'sha256')\n")
    vermin = Path(sys.executable).with_name("vermin")
    result = subprocess.run([str(vermin), "-t=3.10-", "--violations", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode != 0 and "hashlib.file_digest" in result.stdout
