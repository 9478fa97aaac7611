"""The CPU inference path the segmentation bundles take by default (``cpu_runtime auto``: OpenVINO on the network
exported to ONNX) is what users of the runtime environment and of MONAI Label get, not only the dev environment."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# the modules the default path imports: OpenVINO runs the network, torch.onnx's exporter needs onnx
DEFAULT_PATH_NEEDS = {"openvino", "onnx"}

DEFAULT_PATH = """
import torch
from monai.networks.nets import SwinUNETR
from swin_unetr_kit.cpu_inference import CpuInference

torch.manual_seed(0)
network = SwinUNETR(in_channels=1, out_channels=2, feature_size=12).eval()
window = torch.rand(1, 1, 64, 64, 64)
runner = CpuInference(runtime="auto")
print(runner.describe())
with torch.no_grad():
    assert runner(network, window.shape)(window).shape == (1, 2, 64, 64, 64)
"""


def requirement_names(path: Path) -> set[str]:
    """The distribution names a requirements file lists (lower-case, without versions, markers or comments)."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {re.split(r"[<>=!~;\[ ]", line)[0].lower() for line in lines if line and not line.startswith("-")}


@pytest.mark.parametrize("requirements", ["requirements.txt", "requirements-monailabel.txt"])
def test_the_default_cpu_path_is_in_the_runtime_requirements(requirements):
    assert requirement_names(REPO / requirements) >= DEFAULT_PATH_NEEDS


@pytest.mark.slow
def test_the_default_cpu_path_runs_in_an_environment_from_requirements_txt_alone(tmp_path):
    """A fresh virtual environment made as ``tools/setup_env.sh`` makes it (the CPU torch wheel, then
    requirements.txt) runs the default CPU path with OpenVINO, not PyTorch's fallback."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0", "-r", str(REPO / "requirements.txt")], check=True, timeout=3000)
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", DEFAULT_PATH], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OpenVINO" in result.stdout and "cannot run this network" not in result.stderr
