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


def runtime_closure() -> set[str]:
    """The distributions an environment from ``torch`` and requirements.txt alone holds: the requirements and, through
    the installed metadata (the same pins), everything they require, extras and markers evaluated."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = (line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines())
    todo = [(Requirement(line), "") for line in lines if line and not line.startswith("-")]
    todo.append((Requirement("torch"), ""))
    seen: dict[str, set[str]] = {}
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        extras = set(requirement.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen.setdefault(name, set()).update(extras)
        for line in metadata.requires(name) or []:
            todo += [(Requirement(line), e) for e in ("", *extras)]
    return set(seen)


def runtime_environment(folder: Path) -> Path:
    """A virtual environment holding only :func:`runtime_closure`: links to this environment's copies of those
    distributions (nothing is installed); its Python."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    closure = runtime_closure()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    (site,) = (folder / "lib").glob("python*/site-packages")
    for dist in metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) in closure:
            for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
                source = Path(dist.locate_file(top))
                if source.exists() and not (site / top).exists():
                    (site / top).symlink_to(source)
    return folder / "bin" / "python"


def test_the_default_cpu_path_runs_with_the_runtime_requirements_alone(tmp_path):
    """The default CPU path runs with OpenVINO, not PyTorch's fallback, in an environment of only what
    ``tools/setup_env.sh`` installs without ``--dev`` (the CPU torch wheel, then requirements.txt): onnxruntime, pytest
    and the other dev packages are absent. Seconds, where installing such an environment afresh took 286 s."""
    python = runtime_environment(tmp_path / "venv")
    assert not list(python.parent.parent.glob("lib/python*/site-packages/onnxruntime"))
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([str(python), "-c", DEFAULT_PATH], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OpenVINO" in result.stdout and "cannot run this network" not in result.stderr
