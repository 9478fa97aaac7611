"""The checkpoint paths the READMEs' commands pass (``--pretrained_ckpt``, ``--ckpt_path``) lead, from the folder each
README runs its commands in, to where the READMEs' own runs write checkpoints: ``runs/`` at the repository root (the
repository README's ``--bundle_root runs/...``) or a bundle's ``models/`` (its commands from its folder)."""

from __future__ import annotations

import os
import re

import pytest
from conftest import REPO

BUNDLES = REPO / "bundles"
READMES = [REPO / "README.md", *sorted(BUNDLES.glob("*/docs/README.md"))]
CKPT_ARG = re.compile(r"--(pretrained_ckpt|ckpt_path) ([^\s`]+)")


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_checkpoint_paths_in_commands_lead_where_runs_write(readme):
    # the repository README runs commands from the root and from a bundle folder; a bundle README from its folder
    folders = [REPO, *BUNDLES.iterdir()] if readme.parent == REPO else [readme.parents[1]]
    written = [REPO / "runs", *(bundle / "models" for bundle in BUNDLES.iterdir())]
    found = CKPT_ARG.findall(readme.read_text())
    for _, path in found:
        assert path == "PATH" or not os.path.isabs(path), f"{readme}: {path} starts at /"
        if path == "PATH":
            continue
        landing = [os.path.normpath(folder / path) for folder in folders]
        assert any(os.path.commonpath([land, str(w)]) == str(w) for land in landing for w in written), (
            f"{readme}: {path} leads to {landing}, where no README command writes a checkpoint"
        )
