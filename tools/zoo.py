"""A local model zoo for the bundles: reproducible ``<name>_v<version>.zip`` files and a ``model_info.json`` index in
the model zoo's format, and a checksum-verified install.

``package`` zips each bundle's tracked files (configs, docs, LICENSE, its ``large_files.yml``; optionally a trained
``models/model.pt``) under a top-level ``<name>/`` folder with fixed timestamps, permissions and order, so the same
sources give the same bytes and the same checksum. The index maps ``<name>_v<version>`` to the zip's SHA-256
``checksum`` and its ``source`` URL (``file://`` here; an ``https://`` base URL for a served zoo). A bundle's tracked
``large_files.yml`` names released weights (the BTCV bundle: the model zoo's trained ``models/model.pt``); weights
given to ``package`` take that ``models/model.pt`` entry's place, its other entries stay. Weights over the zoo's 25 MB
limit (feature_size 48 is about 250 MB) stay out of the zip, as the zoo asks: they are written beside it as
``<name>_v<version>_model.pt`` and listed in ``large_files.yml`` with their URL and SHA-256, which MONAI's
``download_large_files`` fetches and checks; smaller ones go inside the zip.

MONAI installs a zip with ``python -m monai.bundle download --name <name> --url <source> --bundle_dir <dir>`` (it
refuses archive members that escape the folder) but checks no checksum, and fetches large files only when asked:
``python -m monai.bundle download_large_files --bundle_path <dir>/<name>``. ``install`` checks the index's checksum,
extracts with MONAI's own extraction and then fetches the large files (MONAI checks their hashes).

A bundle is self-contained: the ``swin_unetr_kit`` package its configs import is in its folder, where the bundle's own
code is looked for (MONAI Label and the model zoo's ``ci/verify_bundle.py`` put the bundle folder on ``sys.path``;
``python -m monai.bundle run`` started in the bundle folder has it as the current folder). In this repository each
bundle's ``swin_unetr_kit`` is a symbolic link to the one source at the root, so the three bundles cannot drift apart
and a change to the kit needs no copying; a zoo pull request and the zip carry the linked files themselves
(``bundle_files`` follows the link), so an environment with MONAI (and the bundle's listed packages) runs them without
this repository.

A model the MSD bundle trained on a data set of one's own (``--task Dataset042_Mine``) is packaged with
``--own_data {task: run folder}`` as a bundle of its own, ``swin_unetr_msd_<task>`` (lower case): the MSD bundle's
files with ``"task"`` set in the configs that declare it (MONAI Label passes no ``--task``), the task's metadata
(``channel_def``: the label names of its ``dataset.json``, which MONAI Label shows), its plan as
``models/<task>/plan.json`` (where the configs look for it) and the run's ``model.pt`` as ``models/model.pt`` (whose
``data_record`` holds the spacing, window size and intensity it was trained at). The plan goes without what names
the user's data (its folder, ``dataset.json`` path, datalist and fingerprint, which list the cases); nothing of the
data set itself is packed.

``export`` writes the folders a model-zoo pull request adds (``models/<name>/`` of the zoo's repository): the same
files as the zip, without weights.

Usage (from the repository root):
    python tools/zoo.py package --out zoo/                          # every bundle, index in zoo/model_info.json
    python tools/zoo.py package --out zoo/ --weights "{'swin_unetr_btcv_seg': 'runs/btcv/models/model.pt'}"
    python tools/zoo.py package --out zoo/ --own_data "{'Dataset042_Mine': 'runs/msd/models/Dataset042_Mine/fold0of5'}"
    python tools/zoo.py install swin_unetr_btcv_seg --index zoo/model_info.json --bundle_dir models/
    (an existing install is refused unless ``--overwrite true``)
    python tools/zoo.py export --out pr/models                      # the bundle folders of a model-zoo pull request
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import fire
import yaml
from packaging.version import InvalidVersion, Version

from swin_unetr_kit.msd import task_metadata
from swin_unetr_kit.plan import planned_settings
from swin_unetr_kit.record import file_hash
from swin_unetr_kit.settings import flag

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
MSD_BUNDLE = BUNDLES / "swin_unetr_msd"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can store
LARGE_FILE_BYTES = 25 * 2**20  # the model zoo's limit for files inside a bundle


class ZooError(RuntimeError):
    """A bundle that cannot be packaged or installed: unknown name, checksum mismatch, unsafe archive."""


def sha256(path: Path) -> str:
    return file_hash(path, "sha256")


def _tracked(folder: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--", "."], cwd=folder, capture_output=True, text=True, check=True
    ).stdout
    return sorted(name for name in listed.split("\0") if name)


def bundle_files(bundle: Path) -> dict[str, Path]:
    """``{path inside the bundle: file}`` of what a zoo pull request and the zip carry: the folder's files under
    version control (run outputs such as models/ and eval/ are not), with a link to a folder (the bundle's
    ``swin_unetr_kit``) replaced by that folder's tracked files."""
    files = {}
    for name in _tracked(bundle):
        path = bundle / name
        if path.is_symlink() and path.is_dir():
            files.update({f"{name}/{inner}": path.resolve() / inner for inner in _tracked(path.resolve())})
        else:
            files[name] = path
    if not files:
        raise ZooError(f"{bundle}: no tracked files to package")
    return dict(sorted(files.items()))


def export(out: str = "pr/models") -> None:
    """Write each bundle's folder as a model-zoo pull request adds it, ``<out>/<name>/`` (``--out`` the zoo
    repository's ``models/``); nothing in ``<out>/<name>/`` that the bundle does not carry is kept."""
    for bundle in sorted(p for p in BUNDLES.iterdir() if (p / "configs" / "metadata.json").is_file()):
        target = Path(out) / bundle.name
        shutil.rmtree(target, ignore_errors=True)
        for name, path in bundle_files(bundle).items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / name)
        print(f"{target}")


def _add(archive: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=FIXED_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--, whatever the checkout's modes
    archive.writestr(info, data)


def _url(path: Path, base_url: str | None) -> str:
    return f"{base_url.rstrip('/')}/{path.name}" if base_url else path.as_uri()


def package_bundle(
    bundle: Path,
    out_dir: Path,
    weights: str | None = None,
    base_url: str | None = None,
    name: str | None = None,
    changed: Mapping[str, bytes] | None = None,
) -> Path:
    """Write ``<name>_v<version>.zip`` of ``bundle`` (its ``swin_unetr_kit`` included) into ``out_dir`` and return its
    path. Weights over ``LARGE_FILE_BYTES`` go beside the zip and are described in its ``large_files.yml`` (served from
    ``base_url``). ``name`` (default: the folder's) names the packaged bundle; ``changed`` maps paths inside it to the
    bytes that replace or add to the bundle's files."""
    contents = {inner: path.read_bytes() for inner, path in bundle_files(bundle).items()}
    contents.update(changed or {})
    version = json.loads(contents["configs/metadata.json"])["version"]
    name = name or bundle.name
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}_v{version}.zip"
    contents = {f"{name}/{inner}": data for inner, data in contents.items()}
    if weights:
        if not Path(weights).is_file():
            raise ZooError(f"{weights}: weights file not found")
        listing_name = f"{name}/large_files.yml"
        # the packaged weights replace the released ones the bundle's own large_files.yml names as models/model.pt
        listed = yaml.safe_load(contents.get(listing_name, b"")) or {}
        entries = [e for e in listed.get("large_files", []) if e["path"] != "models/model.pt"]
        if Path(weights).stat().st_size > LARGE_FILE_BYTES:
            large = out_dir / f"{name}_v{version}_model.pt"
            shutil.copyfile(weights, large)
            entry = {"path": "models/model.pt", "url": _url(large, base_url), "hash_val": sha256(large)}
            entries.append({**entry, "hash_type": "sha256"})
        else:
            contents[f"{name}/models/model.pt"] = Path(weights).read_bytes()
        contents.pop(listing_name, None)
        if entries:
            contents[listing_name] = yaml.safe_dump({"large_files": entries}, sort_keys=False).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for arcname in sorted(contents):
            _add(archive, arcname, contents[arcname])
    return target


def own_data_bundle_name(task: str) -> str:
    """The name of the bundle packaged for ``task``, a data set of one's own: ``swin_unetr_msd_<task>``, lower case."""
    return f"{MSD_BUNDLE.name}_{task.lower()}"


def _json_bytes(content: Mapping) -> bytes:
    return (json.dumps(content, indent=4, ensure_ascii=False) + "\n").encode()


def own_data_files(task: str, run_dir: str | os.PathLike) -> dict[str, bytes]:
    """The files that make the MSD bundle the bundle of ``task``, a data set of one's own trained in ``run_dir`` (the
    run folder, ``models/<task>/<run>/``, holding ``model.pt`` and the ``plan.json`` training copied there): configs
    whose default task is ``task``, its metadata and its plan without the entries that name the user's data.

    Raises:
        ZooError: the run folder lacks ``model.pt`` or ``plan.json``, or the plan is not ``task``'s.
    """
    run = Path(run_dir)
    for needed in ("model.pt", "plan.json"):
        if not (run / needed).is_file():
            raise ZooError(
                f"{run / needed}: not found; --own_data names a training run folder of {task} (its ckpt_dir)"
            )
    plan = json.loads((run / "plan.json").read_text())
    if task not in plan:
        raise ZooError(
            f"{run / 'plan.json'}: a plan for {', '.join(k for k in plan if not k.startswith('_'))}, not {task}"
        )
    configs = MSD_BUNDLE / "configs"
    settings = planned_settings(task, configs / "tasks.json", run / "plan.json")
    metadata = task_metadata(
        task, configs / "tasks.json", json.loads((configs / "metadata.json").read_text()), settings
    )
    entry = {k: v for k, v in plan[task].items() if k != "datalist"}  # the case list stays with the data
    kept = ("layout", "training_cases", "fingerprint_seconds", "why")
    shipped_plan = {"_plan": {k: v for k, v in plan.get("_plan", {}).items() if k in kept}, task: entry}
    changed = {}
    for config in sorted(set(configs.glob("*.json")) - {configs / "metadata.json"}):
        content = json.loads(config.read_text())
        if "task" in content:  # the default task of train.json and inference.json (the others build on them)
            changed[f"configs/{config.name}"] = _json_bytes({**content, "task": task})
    changed["configs/metadata.json"] = _json_bytes(metadata)
    changed[f"models/{task}/plan.json"] = _json_bytes(shipped_plan)
    return changed


def package(
    out: str = "zoo",
    weights: Mapping[str, str] | None = None,
    base_url: str | None = None,
    own_data: Mapping[str, str] | None = None,
) -> None:
    """Package every bundle into ``out`` and write ``out/model_info.json``.

    Args:
        out: output folder.
        weights: bundle name → a ``model.pt`` to ship as that bundle's ``models/model.pt`` (in the zip, or beside
            it with a ``large_files.yml`` entry when over 25 MB).
        base_url: where the zips and large files will be served (default: their ``file://`` URLs in ``out``).
        own_data: task → run folder of the MSD bundle trained on a data set of one's own: each packaged as the
            bundle ``swin_unetr_msd_<task>`` with that run's ``model.pt`` (:func:`own_data_files`).
    """
    out_dir = Path(out).resolve()
    weights, own_data = dict(weights or {}), dict(own_data or {})
    unknown = set(weights) - {b.name for b in BUNDLES.iterdir()}
    if unknown:
        raise ZooError(f"weights given for unknown bundles: {sorted(unknown)}")
    bundles = [(p, p.name, weights.get(p.name), None) for p in sorted(BUNDLES.iterdir())]
    bundles = [b for b in bundles if (b[0] / "configs" / "metadata.json").is_file()]
    for task, run_dir in sorted(own_data.items()):
        model = str(Path(run_dir) / "model.pt")
        bundles.append((MSD_BUNDLE, own_data_bundle_name(task), model, own_data_files(task, run_dir)))
    index = {}
    for bundle, name, model, changed in bundles:
        zip_path = package_bundle(bundle, out_dir, model, base_url, name, changed)
        index[zip_path.stem] = {"checksum": sha256(zip_path), "source": _url(zip_path, base_url)}
        print(f"{zip_path}  sha256 {index[zip_path.stem]['checksum']}")
    (out_dir / "model_info.json").write_text(json.dumps(index, indent=4) + "\n")


def _version_key(version: str, index: str) -> Version:
    try:
        return Version(version)
    except InvalidVersion as exc:
        raise ZooError(f"{index}: {version!r} is not a version (as in 0.5.2 or 0.6.0rc1)") from exc


def lookup(index: str, name: str, version: str | None = None) -> tuple[str, dict]:
    """The index entry of ``name`` at ``version`` (default: the highest version listed, by PEP 440's order)."""
    entries = json.loads(Path(index).read_text())
    versions = {key.rsplit("_v", 1)[1]: key for key in entries if key.rsplit("_v", 1)[0] == name}
    if not versions:
        raise ZooError(f"{index}: no bundle named {name!r} (listed: {sorted(entries)})")
    if version is None:
        version = max(versions, key=lambda v: _version_key(v, index))
    if version not in versions:
        raise ZooError(f"{index}: {name} has no version {version} (listed: {sorted(versions)})")
    return versions[version], entries[versions[version]]


def install(
    name: str,
    index: str,
    bundle_dir: str = ".",
    version: str | None = None,
    large_files: bool | str = True,
    overwrite: bool | str = False,
) -> str:
    """Fetch ``name`` from the zoo described by ``index``, check its checksum, extract it into ``bundle_dir`` with
    MONAI's extraction (which refuses members that escape the folder) and fetch the files its ``large_files.yml``
    lists (MONAI checks their hashes; ``--large_files false`` leaves them, for machines without the internet, where
    the weights come another way). Returns the installed bundle's path.

    The zip is extracted into a temporary folder beside the target and moved into place only when it holds exactly
    the bundle's ``<name>/`` folder, so a refused archive leaves nothing behind. An existing, non-empty
    ``<bundle_dir>/<name>`` (and the ``models/model.pt`` trained in it) is refused unless ``--overwrite true``, as
    MONAI's own ``download`` leaves a non-empty folder alone."""
    from monai.apps.utils import check_hash, download_url, extractall
    from monai.bundle import download_large_files

    key, entry = lookup(index, name, version)
    installed = Path(bundle_dir) / name
    if installed.is_dir() and any(installed.iterdir()) and not flag(overwrite, "overwrite"):
        raise ZooError(f"{installed}: already installed (not empty); pass --overwrite true to replace it")
    installed.parent.mkdir(parents=True, exist_ok=True)
    # download, check, extract as three calls: MONAI's download_and_extract cannot read the local zoo's file:// URLs
    # (it probes the file type with requests)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(prefix=".tmp_", dir=bundle_dir) as staging:
        local = Path(tmp) / f"{key}.zip"
        if urlparse(entry["source"]).scheme == "file":
            local.write_bytes(Path(url2pathname(urlparse(entry["source"]).path)).read_bytes())
        else:
            download_url(entry["source"], local, progress=False)
        if not check_hash(str(local), entry["checksum"], "sha256"):
            found, expected = sha256(local), entry["checksum"]
            raise ZooError(f"{entry['source']}: checksum {found} does not match the index's {expected}")
        extractall(filepath=local, output_dir=staging, has_base=True)
        top = sorted(p.name for p in Path(staging).iterdir())
        if top != [name]:
            raise ZooError(f"{entry['source']}: holds {top}, expected one folder {name}/; nothing installed")
        if installed.exists():
            shutil.rmtree(installed)
        os.replace(Path(staging) / name, installed)
    if (installed / "large_files.yml").is_file():
        if flag(large_files, "large_files"):
            download_large_files(bundle_path=str(installed))
        else:
            print(f"{installed / 'large_files.yml'}: its files not fetched (--large_files false)")
    print(f"installed {key} into {installed}")
    return str(installed)


if __name__ == "__main__":
    fire.Fire({"package": package, "install": install, "export": export})
