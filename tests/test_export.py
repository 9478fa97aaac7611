"""TorchScript export of the segmentation bundles' networks with MONAI's ``ckpt_export``, checked against the eager
network on the same input (Swin UNETR does not script, so the export traces it at the window size)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import BTCV_BUNDLE, REPO
from monai.bundle import ConfigWorkflow

MSD_BUNDLE = REPO / "bundles" / "swin_unetr_msd"


@pytest.mark.parametrize(("bundle", "overrides"), [(BTCV_BUNDLE, {}), (MSD_BUNDLE, {"bundle_root": str(MSD_BUNDLE)})])
def test_ckpt_export_by_trace_matches_the_eager_network(bundle, overrides, tmp_path):
    config = str(bundle / "configs" / "inference.json")
    overrides = {**overrides, "network_def#feature_size": 12}
    torch.manual_seed(0)
    network = ConfigWorkflow(config_file=config, workflow_type="infer", **overrides).parser.get_parsed_content(
        "network_def"
    )
    torch.save(network.state_dict(), tmp_path / "model.pt")
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(tmp_path / "model.ts")]
    cmd += ["--ckpt_file", str(tmp_path / "model.pt"), "--meta_file", str(bundle / "configs" / "metadata.json")]
    cmd += ["--config_file", config, "--use_trace", "True", "--input_shape", "[1, 1, 64, 64, 64]"]
    cmd += [f"--{k}={v}" for k, v in overrides.items()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    extra = {"metadata.json": ""}
    exported = torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"]  # the bundle's metadata travels inside the file
    image = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(image), network.eval()(image), rtol=1e-4, atol=1e-4)
