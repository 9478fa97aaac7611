"""Model-zoo conformance of the three bundles: the zoo's own ``ci/verify_bundle.py`` run on them, and MONAI's checks."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ignite.distributed as idist
import preloaded_python
import pytest
import torch
import yaml
import zoo
from conftest import REPO, SCHEMA, SMALL, SMALL_ROI, released_layout, write_msd_task
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out
from monai.networks.nets import SwinUNETR

import swin_unetr_kit
from swin_unetr_kit.msd import task_metadata, task_settings

MSD_TASKS = REPO / "bundles" / "swin_unetr_msd" / "configs" / "tasks.json"

BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if p.is_dir())
# the sections of the model zoo's bundle README template
README_SECTIONS = (
    "Model Overview",
    "Data",
    "Training configuration",
    "Performance",
    "MONAI Bundle Commands",
    "License",
)


def test_the_three_bundles():
    assert [b.name for b in BUNDLES] == ["swin_unetr_btcv_seg", "swin_unetr_msd", "swin_unetr_ssl_pretrain"]


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_required_files_metadata_and_readme(bundle):
    for name in (
        "LICENSE",
        "configs/metadata.json",
        "configs/train.json",
        "configs/multi_gpu_train.json",
        "configs/logging.conf",
        "docs/README.md",
        "docs/data_license.txt",
    ):
        assert (bundle / name).is_file(), name
    assert (bundle / "configs" / "inference.json").is_file()  # the zoo's preferred file (SSL: what it learned)
    if bundle.name != "swin_unetr_ssl_pretrain":  # pre-training has no labels to evaluate against
        assert (bundle / "configs" / "evaluate.json").is_file()
    if not SCHEMA.is_file():
        pytest.skip(f"schema copy not found at {SCHEMA}")
    # MONAI's check; given the schema's local copy, it downloads nothing
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    headings = re.findall(r"^#+ (.+)$", (bundle / "docs" / "README.md").read_text(), flags=re.MULTILINE)
    for section in README_SECTIONS:
        assert any(h.startswith(section) for h in headings), f"{bundle.name} README lacks '{section}'"
    # what a zoo pull request carries: the tracked files, not a user's run outputs (git-ignored models/, eval/)
    large = [name for name, path in zoo.bundle_files(bundle).items() if path.stat().st_size > zoo.LARGE_FILE_BYTES]
    assert not large, f"files over 25 MB belong in large_files.yml, not the bundle: {large}"


def distributions_of(module: str) -> list[str]:
    """The installed distributions that provide the top-level ``module``."""
    found = importlib.metadata.packages_distributions().get(module)
    if found:
        return found
    # Python 3.10 reads only top_level.txt, which some wheels (pytorch-ignite) lack: look at the files they installed
    return [
        d.metadata["Name"]
        for d in importlib.metadata.distributions()
        if any(str(f).startswith(f"{module}/") for f in d.files or [])
    ]


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_metadata_lists_every_package_the_bundles_code_imports(bundle):
    """The zoo's CI installs a bundle's ``required_packages_version`` (besides monai, torch and numpy) and nothing
    else: every package imported at module level by the kit modules the bundle's configs use must be listed, and at
    a version that installs on the zoo CI's Python 3.10 (numpy 2.3 and matplotlib 3.11 need 3.11)."""
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    configs = "".join(p.read_text() for p in (bundle / "configs").glob("*.json"))
    # `$import swin_unetr_kit` runs the package's __init__, which imports its core modules
    used = set(re.findall(r"swin_unetr_kit\.(\w+)", configs)) | set(swin_unetr_kit.__all__) | {"__init__"}
    imported = set()
    for module in used:
        for node in ast.parse((REPO / "swin_unetr_kit" / f"{module}.py").read_text()).body:
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    imported -= set(sys.stdlib_module_names) | {"__future__", "swin_unetr_kit"}
    needed = {name for module in imported for name in distributions_of(module)}
    assert needed - {"monai", "torch", "numpy"} <= set(meta["required_packages_version"]), needed
    assert meta["required_packages_version"]["matplotlib"].startswith("3.10.")
    assert tuple(int(v) for v in meta["numpy_version"].split(".")[:2]) <= (2, 2)


# the workflows each bundle's README runs, as MONAI's property check types them; train, inference and
# train + evaluate of the segmentation bundles are checked in test_btcv_bundle.py and test_msd_bundle.py
SEGMENTATION_WORKFLOWS = [
    (("train", "multi_gpu_train"), "train"),
    (("train", "swinmm"), "train"),
    (("train", "evaluate", "swinmm"), "infer"),
    (("inference", "swinmm"), "infer"),
    (("inference", "inference_trt"), "infer"),
]
WORKFLOWS = [
    *[("swin_unetr_btcv_seg", *w) for w in SEGMENTATION_WORKFLOWS],
    *[("swin_unetr_msd", *w) for w in SEGMENTATION_WORKFLOWS],
    ("swin_unetr_ssl_pretrain", ("train",), "train"),
    ("swin_unetr_ssl_pretrain", ("train", "multi_gpu_train"), "train"),
    ("swin_unetr_ssl_pretrain", ("train", "smart_cache"), "train"),
    ("swin_unetr_ssl_pretrain", ("train", "swinmm"), "train"),
    ("swin_unetr_ssl_pretrain", ("inference",), "infer"),
]


def tiny_data(bundle: str, synthetic_dataset: Path, tmp_path: Path) -> dict:
    """Overrides that point ``bundle`` at tiny data and a small network, with its outputs in ``tmp_path``."""
    small = {**SMALL, "bundle_root": str(tmp_path), "smart_cache_num": 2, "val_fraction": 0.34}
    if bundle == "swin_unetr_msd":
        task = write_msd_task(tmp_path / "data", "Task09_Spleen", task_settings("Task09_Spleen", MSD_TASKS), 5)
        small.pop("pixdim")
        return {
            **small,
            "bundle_root": str(REPO / "bundles" / bundle),
            "dataset_dir": str(task),
            "ckpt_dir": str(tmp_path / "models"),
            "output_dir": str(tmp_path / "eval"),
        }
    if bundle == "swin_unetr_ssl_pretrain":
        return {**small, "dataset_dir": str(synthetic_dataset / "imagesTr")}
    return {**small, "dataset_dir": str(synthetic_dataset)}


@pytest.mark.parametrize(
    ("bundle", "names", "workflow_type"), WORKFLOWS, ids=lambda v: "+".join(v) if isinstance(v, tuple) else v
)
def test_check_properties_of_every_workflow(bundle, names, workflow_type, synthetic_dataset, tmp_path, monkeypatch):
    if "multi_gpu_train" in names:  # a one-process group, as torchrun would give rank 0
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29541", "RANK": "0", "WORLD_SIZE": "1"}.items():
            monkeypatch.setenv(key, value)
    files = [str(REPO / "bundles" / bundle / "configs" / f"{n}.json") for n in names]
    workflow = ConfigWorkflow(
        config_file=files, workflow_type=workflow_type, **tiny_data(bundle, synthetic_dataset, tmp_path)
    )
    workflow.initialize()
    try:
        workflow.parser.get_parsed_content("setup")  # what run() does first: the process group of multi_gpu_train
        assert not workflow.check_properties()
    finally:
        if "multi_gpu_train" in names:
            idist.finalize()  # ends the group, as the config's finalize would, and resets ignite's view of it


ZOO_CI = Path(__file__).parent / "zoo_ci"
# the model zoo's ci/ files, unmodified (tests/zoo_ci/README.md says from which commit)
ZOO_CI_SHA256 = {
    "verify_bundle.py": "38711ea9671c6eccca54329bfe26ed8a7d63aa26acd40d7575646d2ae507d135",
    "utils.py": "15bdd3e4af8fdc4a4408f550763cf550b30d9b30708794e9f63764f140d001ea",
    "bundle_custom_data.py": "b5d58063fc05ded6c675b5c4c41855c4af3a4db8b0cbd9ea7d4adefb6d3097b3",
}
# What a zoo pull request adds to ci/bundle_custom_data.py for these bundles. Swin UNETR does not script: the zoo
# lists its own Swin UNETR bundle in exclude_verify_torchscript_list. The MSD bundle has no trained weights anyone has
# released (it trains any of ten tasks; its models/model.pt is what a user's run writes), so models/model.pt, a
# preferred file, is excluded as the zoo's list says to for a bundle without one.
PR_EXCLUSIONS = {
    "exclude_verify_torchscript_list": [b.name for b in BUNDLES],
    "exclude_verify_preferred_files_list": ["swin_unetr_msd"],
}
# `python verify_bundle.py <args>` in an interpreter where swin_unetr_kit can come only from the bundle folder the
# script puts on sys.path (not from the editable install or PYTHONPATH); says where it came from
ONLY_BUNDLED_KIT = """
import importlib.machinery, os, runpy, sys

class BundledKitOnly:
    def find_spec(self, name, path=None, target=None):
        if name != "swin_unetr_kit":
            return None
        bundles = [p for p in sys.path if os.path.abspath(p).startswith(os.path.abspath("models") + os.sep)]
        spec = importlib.machinery.PathFinder.find_spec(name, bundles)
        if spec is None:
            raise ImportError("swin_unetr_kit is not in the bundle folder")
        return spec

sys.meta_path.insert(0, BundledKitOnly())
sys.argv = ["verify_bundle.py", *sys.argv[1:]]
sys.path[0] = os.path.abspath("ci")  # as `python ci/verify_bundle.py` has it
runpy.run_path("ci/verify_bundle.py", run_name="__main__")
if "swin_unetr_kit" in sys.modules:
    print("swin_unetr_kit from", os.path.dirname(sys.modules["swin_unetr_kit"].__file__))
"""


def test_the_vendored_zoo_check_is_unmodified():
    for name, digest in ZOO_CI_SHA256.items():
        assert hashlib.sha256((ZOO_CI / name).read_bytes()).hexdigest() == digest, name


def stand_in_downloads(bundle: Path, served: Path) -> None:
    """Point the files ``bundle``'s ``large_files.yml`` lists at stand-ins under ``served`` (``file://`` URLs; nothing
    downloads here), with their hashes: the state dict of a small network of the bundle's kind in the layout of the
    release (the SSL encoder's: ``module.``-prefixed keys)."""
    listing = bundle / "large_files.yml"
    entries = yaml.safe_load(listing.read_text())["large_files"]
    torch.manual_seed(0)
    network = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)
    for entry in entries:
        stand_in = served / bundle.name / entry["path"]
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        if bundle.name == "swin_unetr_ssl_pretrain":
            encoder = {f"swinViT.{k}": v for k, v in network.swinViT.state_dict().items()}
            torch.save(released_layout(encoder), stand_in)
        else:
            torch.save(network.state_dict(), stand_in)
        entry["url"] = stand_in.as_uri()
        if "hash_type" in entry:
            entry["hash_val"] = hashlib.new(entry["hash_type"], stand_in.read_bytes()).hexdigest()
    listing.write_text(yaml.safe_dump({"large_files": entries}, sort_keys=False))


@pytest.fixture(scope="module")
def zoo_pull_request(tmp_path_factory) -> Path:
    """A model-zoo checkout with the bundles added as a pull request adds them (``tools/zoo.py export``), the schema
    where the zoo's ``ci/prepare_schema.py`` puts it (the local copy) and the large files served from local files."""
    if not SCHEMA.is_file():
        pytest.skip(f"schema copy not found at {SCHEMA}")
    root = tmp_path_factory.mktemp("model-zoo")
    (root / "ci").mkdir()
    for name in ZOO_CI_SHA256:
        shutil.copyfile(ZOO_CI / name, root / "ci" / name)
    zoo.export(out=str(root / "models"))
    (root / "models" / "model_info.json").write_text("{}")  # no earlier versions of these bundles in the zoo
    for bundle in BUNDLES:
        checkout = root / "models" / bundle.name
        meta = json.loads((checkout / "configs" / "metadata.json").read_text())
        assert meta["schema"].endswith(f"/{SCHEMA.name}")
        (checkout / "eval").mkdir()
        shutil.copyfile(SCHEMA, checkout / "eval" / "schema.json")
        if (checkout / "large_files.yml").is_file():
            stand_in_downloads(checkout, root / "served")
    return root


def verify_bundle(root: Path, bundle: str, mode: str) -> subprocess.CompletedProcess:
    """The zoo's ``python ci/verify_bundle.py -b <bundle> -m <mode>`` from the checkout's root."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-c", ONLY_BUNDLED_KIT, "-b", bundle, "-p", "models", "-m", mode]
    return preloaded_python.run(cmd, cwd=root, env=env, timeout=600)


def with_exclusions(root: Path, exclusions: dict[str, list[str]]) -> None:
    """``ci/bundle_custom_data.py`` as the zoo has it, plus ``exclusions`` added to its lists."""
    text = (ZOO_CI / "bundle_custom_data.py").read_text()
    added = "".join(f"{name} += {bundles!r}\n" for name, bundles in exclusions.items())
    (root / "ci" / "bundle_custom_data.py").write_text(text + "\n# added by the pull request\n" + added)


def test_the_zoo_check_min_names_the_msd_bundles_missing_weights(zoo_pull_request):
    """``-m min``, the zoo's check of every pull request, with the zoo's own lists: the MSD bundle stops at its missing
    models/model.pt, hence its exclusion. (The BTCV and SSL bundles need none in ``-m min``: their large_files.yml gives
    models/model.pt, and the torchscript list plays no part there; see the next test.)"""
    with_exclusions(zoo_pull_request, {})
    result = verify_bundle(zoo_pull_request, "swin_unetr_msd", "min")
    assert result.returncode != 0
    assert result.stderr.strip().endswith("ValueError: necessary file models/model.pt is not existing.")


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_the_zoo_check_min_and_full_with_the_pull_requests_exclusions(bundle, zoo_pull_request):
    """``-m min`` and ``-m full`` (the data-shape check of the inference network at the bundle's own size; no
    TorchScript export, as for the zoo's Swin UNETR bundle), with the kit imported from the bundle folder."""
    with_exclusions(zoo_pull_request, PR_EXCLUSIONS)
    result = verify_bundle(zoo_pull_request, bundle.name, "min")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "metadata format is verified correctly." in result.stdout
    if bundle.name != "swin_unetr_msd":  # the released weights its large_files.yml names, as the zoo's CI fetches them
        assert (zoo_pull_request / "models" / bundle.name / "models" / "model.pt").is_file()
    result = verify_bundle(zoo_pull_request, bundle.name, "full")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "data shape is verified correctly." in result.stdout
    assert f"bundle: {bundle.name} does not support torchscript, skip verifying." in result.stdout
    assert f"swin_unetr_kit from {zoo_pull_request / 'models' / bundle.name / 'swin_unetr_kit'}" in result.stdout


def test_each_msd_task_metadata_passes_the_zoo_data_shape_check(tmp_path):
    """The MSD bundle's metadata describes its default task; tools/msd_metadata.py writes it for the other nine. The
    zoo's full check runs MONAI's ``verify_net_in_out`` on it: here for each task, at feature size 12."""
    zoo.export(out=str(tmp_path / "models"))
    checkout = tmp_path / "models" / "swin_unetr_msd"
    small = {"network_def#feature_size": 12, "_meta_#network_data_format#inputs#image#spatial_shape": SMALL_ROI}
    for task in (t for t in json.loads(MSD_TASKS.read_text()) if not t.startswith("_")):
        meta = task_metadata(task, checkout / "configs" / "tasks.json")
        (checkout / "configs" / "metadata.json").write_text(json.dumps(meta))
        # the task's channels through the network on a SMALL_ROI patch (a fast stand-in for its ROI, which need only
        # divide by 32 as SwinUNETR's patch merging asks)
        assert all(s % 32 == 0 for s in meta["network_data_format"]["inputs"]["image"]["spatial_shape"]), task
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(checkout / "configs" / "metadata.json"),
            config_file=str(checkout / "configs" / "inference.json"),
            bundle_root=str(checkout),
            task=task,
            **small,
        )
