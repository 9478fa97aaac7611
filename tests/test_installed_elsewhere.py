"""An installed bundle run from another folder, as a user of the zoo runs it: the zip installed into one folder, the
commands typed in another with ``--bundle_root`` and an absolute ``--config_file``, in an interpreter where the kit
comes only from the installed bundle (no checkout on ``sys.path``, no editable install, ``PYTHONPATH`` unset)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import preloaded_python
import pytest
import zoo
from conftest import ONE_STEP, SMALL, SSL_SMALL_ROI, write_ct_case, write_msd_task

from swin_unetr_kit.msd import task_settings

INFERENCE_SMALL = {k: v for k, v in SMALL.items() if k not in ("num_samples", "cache_rate")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The three bundles packaged (without weights) and installed with ``tools/zoo.py install``."""
    root = tmp_path_factory.mktemp("installed")
    zoo.package(out=str(root / "zoo"))
    for name in ("swin_unetr_btcv_seg", "swin_unetr_msd", "swin_unetr_ssl_pretrain"):
        zoo.install(name, str(root / "zoo" / "model_info.json"), str(root / "bundles"), large_files=False)
    return root / "bundles"


@pytest.fixture(scope="module")
def python_without_the_kit(tmp_path_factory) -> str:
    """A virtual environment that sees this interpreter's site-packages folders (monai, torch, ...) through a path
    file, but not their own path files, so that the checkout's editable install of ``swin_unetr_kit`` is not there."""
    folder = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(folder)
    python = str(folder / "bin" / "python")
    ask = [python, "-c", "import site; print(site.getsitepackages()[0])"]
    own = subprocess.run(ask, capture_output=True, text=True)
    Path(own.stdout.strip()).mkdir(parents=True, exist_ok=True)
    packages = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    (Path(own.stdout.strip()) / "packages.pth").write_text("\n".join(packages) + "\n")
    probe = subprocess.run(
        [python, "-c", "import monai, importlib.util; print(importlib.util.find_spec('swin_unetr_kit'))"],
        cwd=folder,
        env=_without_pythonpath(),
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == "None", probe.stdout + probe.stderr  # monai imports, the kit does not
    return python


def _without_pythonpath() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run_elsewhere(python: str, cwd: Path, bundle: Path, run_id: str, config: str, **overrides) -> str:
    """``python -m monai.bundle run <run_id> --config_file <bundle>/configs/<config> --bundle_root <bundle> ...``
    from ``cwd``; its log."""
    cmd = [python, "-m", "monai.bundle", "run", run_id, "--config_file", str(bundle / "configs" / config)]
    cmd += ["--bundle_root", str(bundle), *(f"--{k}={json.dumps(v)}" for k, v in overrides.items())]
    cwd.mkdir(exist_ok=True)
    # forked from a Python of that environment that has imported torch and MONAI (never the kit): see preloaded_python
    result = preloaded_python.run(cmd, cwd=cwd, env=_without_pythonpath(), timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{run_id} {config}:\n{log[-4000:]}"
    return log


def test_btcv_installed_bundle_trains_and_infers_from_another_folder(
    installed, python_without_the_kit, synthetic_dataset, tmp_path
):
    bundle = installed / "swin_unetr_btcv_seg"
    small = {**SMALL, "dataset_dir": str(synthetic_dataset)}
    run_elsewhere(python_without_the_kit, tmp_path / "here", bundle, "training", "train.json", **small, **ONE_STEP)
    assert (bundle / "models" / "model.pt").is_file()
    inference = {**INFERENCE_SMALL, "input": str(synthetic_dataset / "imagesTs")}
    run_elsewhere(python_without_the_kit, tmp_path / "here", bundle, "evaluating", "inference.json", **inference)
    assert (bundle / "eval" / "test0_seg.nii.gz").is_file()


def test_msd_installed_bundle_trains_and_infers_from_another_folder(installed, python_without_the_kit, tmp_path):
    bundle = installed / "swin_unetr_msd"
    task = "Task09_Spleen"
    dataset = write_msd_task(tmp_path / "data", task, task_settings(task, bundle / "configs" / "tasks.json"), 3)
    small = {k: v for k, v in SMALL.items() if k != "pixdim"} | {"dataset_dir": str(dataset), "num_folds": 3}
    run_elsewhere(python_without_the_kit, tmp_path / "here", bundle, "training", "train.json", **small, **ONE_STEP)
    assert (bundle / "models" / task / "fold0of3" / "model.pt").is_file()
    inference = {k: v for k, v in small.items() if k not in ("num_samples", "cache_rate")}
    run_elsewhere(python_without_the_kit, tmp_path / "here", bundle, "evaluating", "inference.json", **inference)
    assert list((bundle / "predictions" / task).rglob("*.nii.gz"))


def test_ssl_installed_bundle_trains_and_infers_from_another_folder(installed, python_without_the_kit, tmp_path):
    bundle = installed / "swin_unetr_ssl_pretrain"
    for i in range(3):
        write_ct_case(tmp_path / "ct", f"ct{i}", seed=i)
    small = {"dataset_dir": str(tmp_path / "ct"), "feature_size": 12, "roi_size": SSL_SMALL_ROI, "num_workers": 0}
    training = {"num_samples": 1, "val_num_samples": 1, "batch_size": 1, "val_fraction": 0.34, "num_steps": 1}
    run_elsewhere(
        python_without_the_kit, tmp_path / "here", bundle, "training", "train.json", **small, **training, val_interval=1
    )
    assert (bundle / "models" / "model.pt").is_file()
    inference = {**small, "input": str(tmp_path / "ct" / "imagesTr" / "ct0.nii.gz"), "progress": False}
    run_elsewhere(python_without_the_kit, tmp_path / "here", bundle, "evaluating", "inference.json", **inference)
    assert (bundle / "eval" / "inference" / "ct0_rotation.json").is_file()


def test_no_config_resolves_anything_before_monai_puts_the_bundle_on_sys_path():
    """``monai.bundle run`` adds the config folder's bundle to ``sys.path`` in ``run()``; a step in ``initialize``
    would first evaluate ``$import swin_unetr_kit`` (every import of a config is evaluated at the first step) while
    the kit is not importable from another folder. The set-up steps are ``setup``, the first step of each ``run``."""
    for config in sorted(Path(zoo.BUNDLES).glob("*/configs/*.json")):
        content = json.loads(config.read_text())
        assert "initialize" not in content, config
        assert "run" not in content or content["run"][0] == "@setup", config
