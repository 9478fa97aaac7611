"""Every module of the kit and every tool imports (under Python 3.10 too when run there: docs/python310.md)."""

from __future__ import annotations

import importlib

import pytest
from conftest import REPO

MODULES = sorted(f"swin_unetr_kit.{p.stem}" for p in (REPO / "swin_unetr_kit").glob("*.py")) + sorted(
    p.stem
    for p in (REPO / "tools").glob("*.py")  # conftest puts tools/ on sys.path
)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports(module):
    importlib.import_module(module)
