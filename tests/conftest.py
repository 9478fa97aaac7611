"""Shared fixtures: synthetic CT cases, the real sample CT, and a runner for bundle workflows with small overrides."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import preloaded_python
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BTCV_BUNDLE = REPO / "bundles" / "swin_unetr_btcv_seg"
SCHEMA = REPO.parent / "shared" / "schema" / "meta_schema_20240725.json"
sys.path.insert(0, str(REPO / "tools"))

# pytest-xdist (pyproject addopts) runs the tests in several workers: each worker, and the processes it starts, gets
# an equal share of the cores, so that workers do not fight over them
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, (os.cpu_count() or 1) // WORKERS)
torch.set_num_threads(THREADS)
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

# the smallest windows SwinUNETR trains in: its five halvings need sides of 32 voxels or more, and training needs more
# than one voxel left at the bottleneck (a 32^3 window fails in its instance norm), so one side is 64; a step costs a
# third of a 64^3 window's. Each keeps square the plane its crops are turned in: segmentation's first two axes
# (RandRotate90d, and SwinMM's cross views), the SSL rotation task's last two
SMALL_ROI = [32, 32, 64]
SSL_SMALL_ROI = [64, 32, 32]
# the smallest configuration SwinUNETR runs at: feature_size 12 in SMALL_ROI windows
SMALL = {
    "network_def#feature_size": 12,
    "roi_size": SMALL_ROI,
    "pixdim": [3.0, 3.0, 3.0],
    "num_samples": 1,
    "num_workers": 0,
    "cache_rate": 0.0,
    "sw_batch_size": 2,
    "sw_overlap": 0.25,
    # PyTorch runs the windows, so that label maps compare exactly with those computed in the tests; the CPU default
    # (OpenVINO where installed) has tests of its own: test_cpu_inference.py, and the demo's run
    "cpu_runtime": "torch",
}
# one iteration per epoch, validation after it: the least that writes model.pt and latest.pt
ONE_STEP = {"train#trainer#epoch_length": 1, "train#trainer#max_epochs": 1, "val_interval": 1}


def write_ct_case(
    folder: Path,
    name: str,
    shape: tuple[int, int, int] = (32, 30, 48),
    spacing: float = 3.0,
    seed: int = 0,
    channels: int = 1,
    label_name: str | None = None,
) -> dict:
    """A synthetic abdomen: a soft-tissue body in air with 13 spherical organs of distinct HU, and its label map. The
    default shape at 3 mm fits one SMALL_ROI window: validation and inference cost one window a case. Each organ is
    placed where it overlaps no other (20 draws at most), so that all 13 are there to score."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    centre = np.array(shape) / 2
    body = (((grid - centre) / (centre * 0.9)) ** 2).sum(-1) < 1
    image = np.where(body, 40.0, -1000.0) + rng.normal(0, 20, shape)
    label = np.zeros(shape, np.uint8)
    for organ in range(1, 14):
        for _ in range(20):
            c = centre + rng.uniform(-0.45, 0.45, 3) * np.array(shape)
            r = rng.uniform(2.5, 5.0)
            sphere = ((grid - c) ** 2).sum(-1) < r**2
            if (sphere & body).sum() > 8 and not label[sphere].any():
                break
        label[sphere & body] = organ
        image[sphere & body] = -150 + 25 * organ + rng.normal(0, 5, int((sphere & body).sum()))
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    if channels > 1:
        image = np.stack([image] * channels, -1)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    image_path = folder / "imagesTr" / f"{name}.nii.gz"
    label_path = folder / "labelsTr" / f"{label_name or name}.nii.gz"
    nib.save(nib.Nifti1Image(image.astype(np.int16), affine), image_path)
    nib.save(nib.Nifti1Image(label, affine), label_path)
    return {"image": str(image_path), "label": str(label_path)}


# the pages a user reads: tests/test_docs.py checks their commands and links
DOC_PAGES = sorted([REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("bundles/*/docs/*.md")])
# the tests that run the READMEs' command lines as typed: each bundle's training, evaluation and inference from its
# folder, and the demo
AS_TYPED = ("tests/test_commands.py::", "tests/test_demo.py::test_demo_writes_a_complete_report")


@pytest.fixture(autouse=True)
def _printed_commands_in_new_interpreters(request):
    """The tests of :data:`AS_TYPED` start each command in a new interpreter, as a user's shell does; every other
    test's commands are forked from one that has imported torch and MONAI already (``preloaded_python``)."""
    preloaded_python.fresh_interpreters = request.node.nodeid.startswith(AS_TYPED)
    yield
    preloaded_python.fresh_interpreters = False


@pytest.fixture(autouse=True)
def _run_in_a_temporary_folder(tmp_path, monkeypatch):
    """Relative paths (bundle_root "." and its models/ and eval/) land in a temporary folder, never in the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """Four synthetic cases in imagesTr/labelsTr (one smaller than the 64^3 window), split 2/2 by datalist."""
    root = tmp_path_factory.mktemp("synthetic")
    cases = [write_ct_case(root, f"case{i}", seed=i) for i in range(3)]
    cases.append(write_ct_case(root, "case3", shape=(30, 28, 24), seed=3))  # smaller than the ROI: padded
    (root / "imagesTs").mkdir()
    shutil.copy(cases[0]["image"], root / "imagesTs" / "test0.nii.gz")
    relative = [{k: os.path.relpath(v, root) for k, v in c.items()} for c in cases]
    (root / "dataset_0.json").write_text(
        json.dumps({"training": relative[:2], "validation": relative[2:], "test": [{"image": "imagesTs/test0.nii.gz"}]})
    )
    return root


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory) -> Path:
    """The real sample CT (fetched once through pip, then cached): see tools/sample_data.py."""
    import sample_data
    from filelock import FileLock

    with FileLock(tmp_path_factory.getbasetemp().parent / "sample_data.lock"):  # one xdist worker builds it
        return Path(sample_data.prepare())


@pytest.fixture(scope="session")
def btcv_trained_run(synthetic_dataset, tmp_path_factory) -> Path:
    """A BTCV run folder (``bundle_root``) trained once per session: two epochs of :data:`SMALL` on the synthetic
    cases, validation every epoch. Tests that add to it or resume it work on a copy (:func:`copy_run`)."""
    root = tmp_path_factory.mktemp("btcv_run")
    common = {**SMALL, "bundle_root": str(root), "dataset_dir": str(synthetic_dataset)}
    run_workflow(configs("train"), **common, **{"train#trainer#max_epochs": 2, "val_interval": 1})
    return root


def copy_run(run: Path, destination: Path) -> Path:
    """A private copy of a shared run folder, to evaluate, infer or resume in without touching the original."""
    return Path(shutil.copytree(run, destination, dirs_exist_ok=True))


def configs(*names: str, bundle: Path = BTCV_BUNDLE) -> list[str]:
    return [str(bundle / "configs" / f"{n}.json") for n in names]


def torchrun_bundle(config_files: list[str], port: int, **overrides) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m monai.bundle run training`` on the CPU (gloo), as the READMEs show it."""
    args = [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += ["-m", "monai.bundle", "run", "training", "--config_file", json.dumps(config_files), *args]
    result = preloaded_python.run(cmd, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def crops_probe(bundle: Path, folder: Path) -> str:
    """A config over the bundle's training ``run``: right after the setup (process group, seed + rank) each rank saves
    its crops of three epochs to ``folder/crops<rank>.pt``, then trains as usual."""
    run = json.loads((bundle / "configs" / "train.json").read_text())["run"]
    assert run[0] == "@setup", run
    crops = "[b['image'].as_tensor() for _ in range(3) for b in @train#dataloader]"
    save = f"$torch.save({crops}, '{folder}/crops' + str(dist.get_rank()) + '.pt')"
    probe = folder / "crops_probe.json"
    probe.write_text(json.dumps({"run": [run[0], save, *run[1:]]}))
    return str(probe)


def assert_own_crops(folder: Path, channels: int = 1) -> None:
    """The two ranks' crops (:func:`crops_probe`) are windows of SMALL_ROI, and no two of the same epoch are equal."""
    rank0, rank1 = (torch.load(folder / f"crops{rank}.pt") for rank in (0, 1))
    assert [c.shape for c in rank0] == [c.shape for c in rank1] == [torch.Size([1, channels, *SMALL_ROI])] * 3
    assert all(not torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True))


def released_layout(encoder_state: dict) -> dict:
    """An encoder state dict as the released model_swinvit.pt stores it: module.-prefixed keys, fc1/fc2 MLP names."""
    renamed = (k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.") for k in encoder_state)
    return {"state_dict": {f"module.{k}": v for k, v in zip(renamed, encoder_state.values(), strict=True)}}


@pytest.fixture(autouse=True, scope="session")
def lean_in_process_allocator():
    """Bundle workflows run in this one process a hundred times; the freed memory their CPU default keeps
    (``cpu_keep_freed_memory``) would pile up here, so in-process runs call the allocator set-up with it off
    (docs/testing.md has the trial of keeping it). Subprocess runs keep the default; test_fast_settings.py checks the
    set-up."""
    from swin_unetr_kit import runtime

    tune = runtime.tune_cpu_allocator
    runtime.tune_cpu_allocator = lambda device, keep_freed_memory=True: tune(device, keep_freed_memory=False)
    yield
    runtime.tune_cpu_allocator = tune


def run_workflow(config_files: list[str], workflow_type: str = "train", **overrides):
    """Run a bundle workflow in-process the way ``python -m monai.bundle run`` does; return the workflow."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=config_files, workflow_type=workflow_type, **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


# per MSD task: (spatial shape, spacing) of a small generated case with the task's typical geometry
MSD_GEOMETRY = {
    "Task01_BrainTumour": ((48, 56, 40), (1.0, 1.0, 1.0)),
    "Task02_Heart": ((48, 48, 36), (1.25, 1.25, 1.37)),
    "Task03_Liver": ((56, 56, 48), (0.77, 0.77, 1.0)),
    "Task04_Hippocampus": ((36, 50, 35), (1.0, 1.0, 1.0)),  # smaller than the 64^3 window
    "Task05_Prostate": ((64, 64, 16), (0.62, 0.62, 3.6)),
    "Task06_Lung": ((56, 56, 48), (0.79, 0.79, 1.24)),
    "Task07_Pancreas": ((56, 56, 24), (0.8, 0.8, 2.5)),
    "Task08_HepaticVessel": ((56, 56, 40), (0.8, 0.8, 1.5)),
    "Task09_Spleen": ((56, 56, 36), (0.79, 0.79, 1.6)),
    "Task10_Colon": ((56, 56, 20), (0.78, 0.78, 3.0)),
}


def write_msd_task(root: Path, task: str, settings: dict, num_cases: int = 2) -> Path:
    """An MSD-layout data set of ``task`` (dataset.json, imagesTr, labelsTr, imagesTs) with small generated cases:
    the task's channel count (4D NIfTI for several), label values and geometry, every label present as nested
    spheres in a body, CT in HU and MRI as positive values on a zero background."""
    shape, spacing = MSD_GEOMETRY[task]
    folder = root / task
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    training = []
    for i in range(num_cases + 1):
        rng = np.random.default_rng(i)
        centre = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
        body = (((grid - centre) / (np.array(shape) / 2 * 0.9)) ** 2).sum(-1) < 1
        label = np.zeros(shape, np.uint8)
        for value in range(1, settings["num_labels"]):
            radius = min(shape) * (0.35 - 0.08 * value)
            label[(((grid - centre) ** 2).sum(-1) < radius**2) & body] = value
        ct = settings["modality"] == "CT"
        channels = []
        for c in range(settings["in_channels"]):
            image = np.where(body, 40.0 if ct else 300.0 + 50 * c, -1000.0 if ct else 0.0)
            image = image + np.where(label > 0, 30.0 * label + 10 * c, 0.0) + rng.normal(0, 5, shape) * body
            channels.append(image)
        image = np.stack(channels, -1) if len(channels) > 1 else channels[0]
        affine = np.diag([*spacing, 1.0])
        name = f"{task.split('_')[1].lower()}_{i:03d}.nii.gz"
        if i == num_cases:  # the last case is the unlabelled test image
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / "imagesTs" / name)
            continue
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    description = {
        "name": task.split("_")[1],
        "modality": {str(i): c for i, c in enumerate(settings["channels"])},
        "labels": settings["labels"],
        "numTraining": num_cases,
        "training": training,
        "test": [f"./imagesTs/{task.split('_')[1].lower()}_{num_cases:03d}.nii.gz"],
    }
    (folder / "dataset.json").write_text(json.dumps(description, indent=4))
    return folder


# modules of about a minute or more (``--durations``, 2026-12-07), longest first: pytest-xdist's ``loadscope`` hands a
# worker whole modules in collection order, so a long module collected last kept one worker busy while the other waited
LONG_MODULES = ["test_commands.py", "test_demo.py", "test_ssl.py", "test_msd_bundle.py", "test_cpu_inference.py"]
LONG_MODULES += ["test_monai_label.py", "test_swinmm.py", "test_btcv_bundle.py", "test_ddp.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))
