"""The local model zoo: reproducible bundle zips and index, MONAI's download from a file:// URL, checksum and
archive-safety refusals, and inference from the installed bundle."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import preloaded_python
import pytest
import torch
import yaml
import zoo
from conftest import SMALL
from monai.apps.utils import HashCheckError
from monai.networks.nets import SwinUNETR

BUNDLES = ("swin_unetr_btcv_seg", "swin_unetr_msd", "swin_unetr_ssl_pretrain")
# `python -m monai.bundle <args>` in an interpreter where swin_unetr_kit can come only from the current folder
ONLY_BUNDLED_KIT = """
import importlib.machinery, os, runpy, sys

class BundledKitOnly:
    def find_spec(self, name, path=None, target=None):
        if name != "swin_unetr_kit":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [os.getcwd()])
        if spec is None:
            raise ImportError("swin_unetr_kit is not in the bundle folder")
        return spec

sys.meta_path.insert(0, BundledKitOnly())
import swin_unetr_kit
print("swin_unetr_kit from", os.path.dirname(swin_unetr_kit.__file__), flush=True)
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def local_zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    weights = root / "btcv_model.pt"
    torch.save(SwinUNETR(in_channels=1, out_channels=14, feature_size=12).state_dict(), weights)
    zoo.package(out=str(root / "zoo"), weights={"swin_unetr_btcv_seg": str(weights)})
    return root / "zoo"


def test_a_bundle_carries_its_tracked_files_and_the_linked_kit(tmp_path):
    """What the zip and a zoo pull request carry: tracked files, a link to a folder followed (each bundle's
    ``swin_unetr_kit`` links to the one source), and none of a user's git-ignored run outputs."""
    (tmp_path / "kit").mkdir()
    (tmp_path / "kit" / "code.py").write_text("x = 1\n")
    bundle = tmp_path / "bundles" / "b"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text("{}")
    (bundle / "swin_unetr_kit").symlink_to(Path("..", "..", "kit"))
    (tmp_path / ".gitignore").write_text("bundles/*/models/\n")
    (bundle / "models").mkdir()
    with open(bundle / "models" / "latest.pt", "wb") as f:  # a user's run output over 25 MB (sparse)
        f.truncate(zoo.LARGE_FILE_BYTES + 1)
    for cmd in (["init", "-q"], ["add", "."]):
        subprocess.run(["git", *cmd], cwd=tmp_path, check=True)
    assert zoo.bundle_files(bundle) == {
        "configs/metadata.json": bundle / "configs" / "metadata.json",
        "swin_unetr_kit/code.py": tmp_path / "kit" / "code.py",
    }
    for name in BUNDLES:  # the repository's bundles: their kit is the root's
        assert (zoo.BUNDLES / name / "swin_unetr_kit").resolve() == zoo.REPO / "swin_unetr_kit"
        assert "swin_unetr_kit/record.py" in zoo.bundle_files(zoo.BUNDLES / name)


def test_zips_are_reproducible_and_indexed(local_zoo, tmp_path):
    index = json.loads((local_zoo / "model_info.json").read_text())
    versions = {
        name: json.loads((zoo.BUNDLES / name / "configs" / "metadata.json").read_text())["version"] for name in BUNDLES
    }
    assert set(index) == {f"{name}_v{version}" for name, version in versions.items()}
    for key, entry in index.items():
        path = local_zoo / f"{key}.zip"
        assert entry["source"] == path.as_uri() and entry["checksum"] == zoo.sha256(path)
        name = key.rsplit("_v", 1)[0]
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            assert names == sorted(names) and all(n.startswith(f"{name}/") for n in names)
            assert {f"{name}/LICENSE", f"{name}/configs/metadata.json", f"{name}/docs/README.md"} <= set(names)
            assert all(info.date_time == zoo.FIXED_TIME for info in archive.infolist())
            assert (f"{name}/models/model.pt" in names) == (name == "swin_unetr_btcv_seg")
            # the packaged model.pt replaced the released BTCV weights; the SSL bundle's released encoder stays listed
            assert (f"{name}/large_files.yml" in names) == (name == "swin_unetr_ssl_pretrain")
    again = zoo.package_bundle(zoo.BUNDLES / "swin_unetr_msd", tmp_path)
    assert again.read_bytes() == (local_zoo / again.name).read_bytes()  # same sources, same bytes


def test_monai_download_from_the_local_zoo_then_inference(local_zoo, synthetic_dataset, tmp_path):
    key, entry = zoo.lookup(str(local_zoo / "model_info.json"), "swin_unetr_btcv_seg")
    installed = tmp_path / "installed"
    cmd = [sys.executable, "-m", "monai.bundle", "download", "--name", "swin_unetr_btcv_seg", "--url", entry["source"]]
    result = preloaded_python.run([*cmd, "--bundle_dir", str(installed)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert zoo.sha256(installed / "swin_unetr_btcv_seg.zip") == entry["checksum"]
    bundle = installed / "swin_unetr_btcv_seg"
    assert (bundle / "models" / "model.pt").is_file()

    assert (bundle / "swin_unetr_kit" / "__init__.py").is_file()  # the shared code travels inside the zip

    # the README's command from the installed bundle's folder, with this checkout's kit made unimportable: the
    # editable install and PYTHONPATH are bypassed by a finder that serves swin_unetr_kit from the bundle folder only
    overrides = {k: v for k, v in SMALL.items() if k in ("network_def#feature_size", "roi_size", "pixdim")}
    args = ["--config_file", "configs/inference.json", "--input", str(synthetic_dataset / "imagesTs")]
    args += ["--num_workers", "0", *(f"--{k}={json.dumps(v)}" for k, v in overrides.items())]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = preloaded_python.run([sys.executable, "-c", ONLY_BUNDLED_KIT, "run", *args], cwd=bundle, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"swin_unetr_kit from {bundle / 'swin_unetr_kit'}" in result.stdout
    out = nib.load(bundle / "eval" / "test0_seg.nii.gz")
    assert out.shape == nib.load(synthetic_dataset / "imagesTs" / "test0.nii.gz").shape


def test_install_checks_the_checksum(local_zoo, tmp_path):
    installed = zoo.install("swin_unetr_msd", str(local_zoo / "model_info.json"), str(tmp_path / "ok"))
    assert (Path(installed) / "configs" / "tasks.json").is_file()

    index = json.loads((local_zoo / "model_info.json").read_text())
    key, _ = zoo.lookup(str(local_zoo / "model_info.json"), "swin_unetr_msd")
    index[key]["checksum"] = "0" * 64
    tampered = tmp_path / "model_info.json"
    tampered.write_text(json.dumps(index))
    with pytest.raises(zoo.ZooError, match="checksum"):
        zoo.install("swin_unetr_msd", str(tampered), str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / "swin_unetr_msd").exists()
    with pytest.raises(zoo.ZooError, match="no bundle named"):
        zoo.install("spleen_ct_segmentation", str(tampered), str(tmp_path / "bad"))
    with pytest.raises(zoo.ZooError, match="no version"):
        zoo.install("swin_unetr_msd", str(tampered), str(tmp_path / "bad"), version="9.9.9")


def test_path_traversal_archive_is_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("evil/configs/metadata.json", "{}")
        archive.writestr("../outside.txt", "escaped")
    cmd = [sys.executable, "-m", "monai.bundle", "download", "--name", "evil", "--url", evil.as_uri()]
    result = preloaded_python.run([*cmd, "--bundle_dir", str(tmp_path / "dest")], timeout=300)
    assert result.returncode != 0 and "Unsafe path" in result.stderr
    assert not (tmp_path / "outside.txt").exists()

    index = tmp_path / "model_info.json"
    index.write_text(json.dumps({"evil_v0.1.0": {"checksum": zoo.sha256(evil), "source": evil.as_uri()}}))
    with pytest.raises(ValueError, match="Unsafe path"):
        zoo.install("evil", str(index), str(tmp_path / "dest2"))
    assert not (tmp_path / "outside.txt").exists()


def test_weights_over_25_mb_go_beside_the_zip_in_large_files_yml(tmp_path):
    weights = tmp_path / "f48_model.pt"
    weights.write_bytes(os.urandom(zoo.LARGE_FILE_BYTES + 1))
    zoo.package(out=str(tmp_path / "zoo"), weights={"swin_unetr_btcv_seg": str(weights)})
    index = str(tmp_path / "zoo" / "model_info.json")
    key, entry = zoo.lookup(index, "swin_unetr_btcv_seg")
    with zipfile.ZipFile(tmp_path / "zoo" / f"{key}.zip") as archive:
        assert "swin_unetr_btcv_seg/models/model.pt" not in archive.namelist()
        listing = yaml.safe_load(archive.read("swin_unetr_btcv_seg/large_files.yml"))
    large = tmp_path / "zoo" / f"{key}_model.pt"
    assert listing == {
        "large_files": [
            {"path": "models/model.pt", "url": large.as_uri(), "hash_val": zoo.sha256(weights), "hash_type": "sha256"}
        ]
    }

    installed = Path(zoo.install("swin_unetr_btcv_seg", index, str(tmp_path / "ok")))
    assert (installed / "models" / "model.pt").read_bytes() == weights.read_bytes()

    large.write_bytes(os.urandom(1024))  # the served weights no longer match the bundle's hash
    with pytest.raises(HashCheckError, match="sha256 hash check"):
        zoo.install("swin_unetr_btcv_seg", index, str(tmp_path / "bad"))


def test_bundles_name_the_released_weights_in_large_files_yml():
    """The entries MONAI's download_large_files passes to download_url (an unknown key would break it); nothing is
    downloaded here."""
    import inspect

    from monai.apps.utils import download_url
    from monai.bundle import ConfigParser

    accepted = set(inspect.signature(download_url).parameters) | {"path"}
    listed = {}
    for name in BUNDLES:
        path = zoo.BUNDLES / name / "large_files.yml"
        if path.is_file():
            parser = ConfigParser()
            parser.read_config(str(path))
            for entry in parser.get()["large_files"]:
                assert set(entry) <= accepted, entry
                listed[(name, entry["path"])] = entry
    btcv = listed.pop(("swin_unetr_btcv_seg", "models/model.pt"))
    assert btcv["url"].endswith("/model_swin_unetr_btcv_segmentation_v1.pt") and btcv["url"].startswith("https://")
    assert (btcv["hash_type"], len(btcv["hash_val"])) == ("md5", 32)
    ssl = listed.pop(("swin_unetr_ssl_pretrain", "models/model.pt"))
    assert (
        ssl["url"] == "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt"
    )
    assert not listed


def test_install_without_the_internet_leaves_large_files_when_asked(local_zoo, tmp_path):
    """``tools/zoo.py install ... --large_files false``, as the MONAI Label check runs it offline: the SSL bundle's
    released encoder (a web URL in its large_files.yml) is not fetched, and the install succeeds."""
    cmd = [sys.executable, str(zoo.__file__), "install", "swin_unetr_ssl_pretrain"]
    cmd += ["--index", str(local_zoo / "model_info.json"), "--bundle_dir", str(tmp_path), "--large_files", "false"]
    result = preloaded_python.run(cmd, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    installed = tmp_path / "swin_unetr_ssl_pretrain"
    assert (installed / "large_files.yml").is_file() and not (installed / "models" / "model.pt").exists()
    assert "not fetched (--large_files false)" in result.stdout


def test_the_readme_names_each_zip_at_its_bundles_version():
    """The docs' install commands name ``<bundle>_v<version>.zip``: the version ``tools/zoo.py package`` writes."""
    pages = [zoo.REPO / "README.md", *sorted((zoo.REPO / "docs").glob("*.md"))]
    named = [m for page in pages for m in re.findall(r"(swin_unetr_\w+?)_v(\d+\.\d+\.\d+)\.zip", page.read_text())]
    assert named
    for bundle, version in named:
        metadata = json.loads((zoo.REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())
        assert version == metadata["version"], f"README: {bundle}_v{version}.zip, bundle at {metadata['version']}"
