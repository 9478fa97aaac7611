"""End-to-end check of the segmentation bundles in the real MONAI Label server, from what a new user has.

Builds (once) a separate virtual environment from ``requirements-monailabel.txt`` (docs/monai_label.md), WITHOUT this
repository in it; packages the bundles into the local zoo (``tools/zoo.py package``), installs the zips without
weights into the ``monaibundle`` sample app's model folder, starts the server on 127.0.0.1 offline, and checks through
its REST API, one result per line:

- ``/info`` answers with both bundles listed (as trainers: MONAI Label serves no model without ``models/model.pt``);
- ``/train`` with only ``max_epochs``: monailabel 0.8.5's known KeyError (every displayed option must be sent);
- ``/train`` with the CPU-sized options (BTCV) writes the first ``models/model.pt``; a second ``/train`` trains again
  from it; a ``/train`` with changed options trains at them; a window edge the network cannot take is refused with
  the reason in the task's status;
- after a restart (with MSD weights of other data settings copied in, as a user would): ``/info`` lists both models;
  ``/infer`` on the full sample CT (NIfTI) and the full 20-slice DICOM series (sent as a session without
  ``result_extension``) returns uint8 label maps in the input's geometry (BTCV and MSD);
- the server log names the CPU inference runtime (OpenVINO) and the settings a model is served at where they differ
  from the config's;
- a data set of one's own (three organs of the sample CT renumbered 1..3, nnU-Net v2 layout): the MSD bundle plans
  and trains it briefly (``--task Dataset042_Torso``), ``tools/zoo.py package --own_data`` packages the run as the
  bundle ``swin_unetr_msd_dataset042_torso``, and the server lists it with the label names of its ``dataset.json``
  and answers ``/infer`` (NIfTI and DICOM) with label maps of those labels.

It needs the sample CT (``python tools/sample_data.py``) and is too slow for the test suite (the environment alone
takes many minutes to build); docs/monai_label.md records its last result.

Usage (from the repository root, in the project's environment):
    python tools/monailabel_check.py [--work DIR] [--venv DIR] [--port 8765]
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from sample_data import cache_dir  # noqa: E402

BUNDLES = ("swin_unetr_btcv_seg", "swin_unetr_msd")
REQUIREMENTS = REPO / "requirements-monailabel.txt"  # docs/monai_label.md's environment, as written
TRAIN_HALF_SIZE = (24, 24, 16)  # training studies: 3 mm voxels, a 144 x 144 x 96 mm block of the torso CT
# what a CPU user picks in the training options (train.json's displayable_configs)
CPU_TRAINING = {"num_samples": 1, "num_workers": 0, "cache_rate": 0.0, "roi_edge": 64, "feature_size": 12}
INFER_PARAMS = {"device": "cpu", "sw_batch_size": 2, "sw_overlap": 0.25, "num_views": 1}
OWN_TASK = "Dataset042_Torso"
OWN_ORGANS = {"spleen": 1, "liver": 6, "right kidney": 2}  # name -> the sample label's value; renumbered 1..3
OWN_BUNDLE = f"swin_unetr_msd_{OWN_TASK.lower()}"
# a short CPU training run of the own data set: 6 mm voxels, the smallest network and window, one epoch
OWN_TRAINING = {"pixdim": [6.0, 6.0, 6.0], "roi_size": [64, 64, 64], "network_def#feature_size": 12, "num_samples": 1}
OWN_TRAINING.update({"num_workers": 0, "cache_rate": 0.0, "num_folds": 3, "val_interval": 1, "progress": False})
OWN_TRAINING.update({"train#trainer#max_epochs": 1, "sw_batch_size": 2, "cpu_runtime": "torch"})


def log(message: str) -> None:
    print(f"[monailabel_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def clean_env(venv: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a user's shell with ``venv`` activated: no PYTHONPATH, no other virtual environment on the
    PATH, so nothing of this checkout is importable (the ``monailabel`` launcher runs the ``python`` it finds)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if not Path(p, "activate").is_file()]
    if venv is not None:
        path.insert(0, str(venv / "bin"))
        env["VIRTUAL_ENV"] = str(venv)
    env.update(PATH=os.pathsep.join(path), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), **extra)
    return env


def build_env(venv: Path) -> Path:
    """Create ``venv`` with ``pip install -r requirements-monailabel.txt``, as docs/monai_label.md says (skipped
    when its marker holds the same requirements)."""
    marker = venv / "monailabel_check_requirements.txt"
    python = venv / "bin" / "python"
    wanted = REQUIREMENTS.read_text()
    if marker.is_file() and marker.read_text() == wanted:
        return python
    log(f"building {venv} from {REQUIREMENTS.name} (many minutes: torch, monailabel and sam2's build)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    env = clean_env()
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS)], check=True, env=env)
    subprocess.run([str(python), "-c", "import torch, torchvision, monailabel, monai"], check=True, env=env, cwd="/")
    marker.write_text(wanted)
    return python


def request(
    url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 1800, method: str | None = None
) -> bytes:
    method = method or ("POST" if data is not None else "GET")
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise CheckError(f"{url}: HTTP {e.code} {e.read()[-2000:].decode(errors='replace')}") from e
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as e:
        raise CheckError(f"{url}: no answer ({e}); the server log says why (a server killed for memory: dmesg)") from e


def multipart(fields: dict[str, str], files: list[tuple[str, Path]]) -> tuple[bytes, dict]:
    """A multipart/form-data body (stdlib only) of text ``fields`` and ``(field name, file)`` uploads."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, path in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + path.read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class CheckError(RuntimeError):
    """A check of the running server failed; the message says which and what was found."""


def write_weights_of_other_settings(python: Path, bundle: Path, out_channels: int, labels: list[str]) -> dict:
    """A seeded feature_size 12 SwinUNETR as ``models/model.pt`` with the record of data settings other than the
    bundle's (3 mm voxels, 64^3 windows), as weights trained elsewhere and copied in (written in MONAI Label's
    environment, in the bundles' checkpoint layout)."""
    settings = {"pixdim": [3.0, 3.0, 3.0], "roi_size": [64, 64, 64], "labels": labels}
    settings["intensity"] = {"window": [-175.0, 250.0]}
    code = (
        "import json, sys, torch; from monai.networks.nets import SwinUNETR; torch.manual_seed(0); "
        "net = SwinUNETR(in_channels=1, out_channels=int(sys.argv[2]), feature_size=12); "
        "torch.save({'model': net.state_dict(), 'data_record': json.loads(sys.argv[3])}, sys.argv[1])"
    )
    (bundle / "models").mkdir(exist_ok=True)
    args = [str(bundle / "models" / "model.pt"), str(out_channels), json.dumps(settings)]
    subprocess.run([str(python), "-c", code, *args], check=True, env=clean_env(), cwd="/")
    return settings


def training_studies(sample: Path, studies: Path) -> Path:
    """Two labelled studies (one to train on, one to validate), cut from the sample CT so that a CPU epoch takes
    seconds, and the uncut CT unlabelled, for inference (returned)."""
    import nibabel as nib

    image, label = nib.load(sample / "imagesTr" / "ts_torso.nii.gz"), nib.load(sample / "labelsTr" / "ts_torso.nii.gz")
    centre = [s // 2 for s in image.shape]
    crop = tuple(slice(c - h, c + h) for c, h in zip(centre, TRAIN_HALF_SIZE, strict=True))
    shutil.rmtree(studies, ignore_errors=True)
    (studies / "labels" / "final").mkdir(parents=True)
    for study in ("ct_a", "ct_b"):
        nib.save(image.slicer[crop], studies / f"{study}.nii.gz")
        nib.save(label.slicer[crop], studies / "labels" / "final" / f"{study}.nii.gz")
    full = studies / "ct_full.nii.gz"
    shutil.copyfile(sample / "imagesTr" / "ts_torso.nii.gz", full)
    return full


def own_data_set(sample: Path, root: Path) -> Path:
    """A data set of one's own in nnU-Net v2's raw layout: three organs of the sample CT renumbered 1..3, three
    training cases (slabs along the last axis) with their ``dataset.json``."""
    import nibabel as nib
    import numpy as np

    image, label = nib.load(sample / "imagesTr" / "ts_torso.nii.gz"), nib.load(sample / "labelsTr" / "ts_torso.nii.gz")
    voxels, original = np.asarray(image.dataobj).astype(np.int16), np.asarray(label.dataobj)
    renumbered = np.zeros(original.shape, np.uint8)
    for new, old in enumerate(OWN_ORGANS.values(), 1):
        renumbered[original == old] = new
    shutil.rmtree(root, ignore_errors=True)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i, (start, stop) in enumerate([(0, 112), (0, 80), (24, 112)]):
        affine = image.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, start], [0, 0, 0, 1]])
        nib.save(nib.Nifti1Image(voxels[..., start:stop], affine), root / "imagesTr" / f"torso_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(renumbered[..., start:stop], affine), root / "labelsTr" / f"torso_{i:03d}.nii.gz")
    labels = {"background": 0, **{name: i for i, name in enumerate(OWN_ORGANS, 1)}}
    description = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 3, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(description, indent=4))
    return root


def train_own_data(dataset: Path, runs: Path) -> Path:
    """Plan and train the MSD bundle on ``dataset`` as its README says (``--task``, ``--dataset_dir``; outputs under
    ``--bundle_root runs``), in this project's environment; returns the run folder that ``--own_data`` packages."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json"]
    settings = {"task": OWN_TASK, "dataset_dir": str(dataset), "bundle_root": str(runs), **OWN_TRAINING}
    cmd += [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in settings.items()]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log(f"planning and training {OWN_TASK} (one epoch) in the MSD bundle")
    result = subprocess.run(cmd, cwd=REPO / "bundles" / "swin_unetr_msd", env=env, capture_output=True, text=True)
    (runs / "training.log").parent.mkdir(parents=True, exist_ok=True)
    (runs / "training.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise CheckError(f"training {OWN_TASK} failed: {(result.stdout + result.stderr)[-1500:]}")
    return runs / "models" / OWN_TASK / "fold0of3"


def same_geometry(label_file: Path, reference: Path) -> dict:
    """Shape and voxel-to-world matrix of the returned label map against the input (both read by MONAI)."""
    import numpy as np
    from monai.transforms import LoadImage

    loader = LoadImage(image_only=True)
    label, image = loader(str(label_file)), loader(str(reference))
    shape_ok = tuple(label.shape[:3]) == tuple(image.shape[:3])
    affine_ok = bool(np.allclose(np.asarray(label.affine), np.asarray(image.affine), atol=1e-3))
    values = sorted(int(v) for v in np.unique(np.asarray(label)))
    return {
        "label_shape": list(label.shape[:3]),
        "input_shape": list(image.shape[:3]),
        "same_shape": shape_ok,
        "same_affine": affine_ok,
        "label_values": values,
    }


@contextmanager
def server(monailabel: Path, venv: Path, app: Path, studies: Path, port: int, log_file: Path, models: tuple = BUNDLES):
    """The MONAI Label server serving ``models``, offline, on 127.0.0.1; stopped (its whole process group) on
    leaving."""
    cmd = [str(monailabel), "start_server", "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--conf", "models", ",".join(models), "--conf", "zoo_source", "github"]
    cmd += ["--conf", "sam2", "false", "--conf", "preload", "false"]
    log(f"starting the server (log: {log_file})")
    with open(log_file, "a") as out:
        process = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(venv),
            cwd=app.parent.parent,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def main(work: str | None = None, venv: str | None = None, port: int = 8765, keep: bool = False) -> int:
    """Run every check; print and write ``<work>/result.json``; return 0 when all passed."""
    started = time.time()
    venv_dir = Path(venv or cache_dir() / "monailabel-venv")
    python = build_env(venv_dir)
    monailabel = venv_dir / "bin" / "monailabel"
    work_dir = Path(work or tempfile.mkdtemp(prefix="monailabel_check_")).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    sample = cache_dir() / "btcv_sample"
    if not (sample / "imagesTr" / "ts_torso.nii.gz").is_file():
        subprocess.run([sys.executable, str(REPO / "tools" / "sample_data.py")], check=True)
    studies = work_dir / "studies"
    full_ct = training_studies(sample, studies)
    dicom_series = sample / "imagesTs" / "ts_slab_dicom"

    own_run = train_own_data(own_data_set(sample, work_dir / "own_data" / OWN_TASK), work_dir / "own_runs")
    log("packaging the bundles into a local zoo and installing them, without weights, into the monaibundle app")
    zoo_dir, apps = work_dir / "zoo", work_dir / "apps"
    cmd = [sys.executable, str(REPO / "tools" / "zoo.py"), "package", "--out", str(zoo_dir)]
    subprocess.run([*cmd, "--own_data", json.dumps({OWN_TASK: str(own_run)})], check=True)
    if not (apps / "monaibundle").is_dir():
        cmd = [str(monailabel), "apps", "--download", "--name", "monaibundle", "--output", str(apps)]
        subprocess.run(cmd, check=True, env=clean_env(venv_dir), cwd=work_dir)
    app = apps / "monaibundle"
    for name in (*BUNDLES, OWN_BUNDLE):
        shutil.rmtree(app / "model" / name, ignore_errors=True)
    for name in BUNDLES:
        install(zoo_dir, name, app)

    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "checks": {}}
    checks = results["checks"]
    base, log_file = f"http://127.0.0.1:{port}", work_dir / "server.log"
    btcv, msd = (app / "model" / name for name in BUNDLES)
    try:
        with server(monailabel, venv_dir, app, studies, port, log_file) as process:
            info = wait_for_info(base, process)
            checks["info_without_weights"] = check_info(info, models=False)
            checks["train_only_max_epochs"] = train_only_max_epochs(base, btcv, log_file)
            options = {**info["trainers"][btcv.name]["config"], **CPU_TRAINING, "device": "cpu", "multi_gpu": False}
            options.update(tracking="None", model_filename="model.pt", val_split=0.5, max_epochs=1)
            checks["train_first"] = train(base, btcv, options, "first /train, no model.pt before")
            checks["train_again"] = train(base, btcv, options, "second /train, the same options")
            changed = {**options, "num_samples": 2, "val_interval": 1}
            checks["train_changed_options"] = train(base, btcv, changed, "/train with num_samples 2, val_interval 1")
            checks["train_refused_option"] = train_refused(base, btcv, {**options, "roi_edge": 80})
            refusal = "roi_edge 80: the window's edge must be a multiple of 32"
            checks["train_refused_option"]["reason_in_server_log"] = refusal in log_file.read_text(errors="replace")
        msd_settings = write_weights_of_other_settings(python, msd, 2, ["background", "spleen"])
        install(zoo_dir, OWN_BUNDLE, app)  # with the weights packaged from the own-data run
        with server(monailabel, venv_dir, app, studies, port, log_file, (*BUNDLES, OWN_BUNDLE)) as process:
            info = wait_for_info(base, process)
            checks["info_with_weights"] = check_info(info, models=True)
            checks["own_data_info"] = check_own_labels(info, app / "model" / OWN_BUNDLE)
            for name in (*BUNDLES, OWN_BUNDLE):
                checks[f"infer_full_nifti_{name}"] = infer_study(base, name, "ct_full", full_ct, work_dir)
                checks[f"infer_full_dicom_{name}"] = infer_dicom(base, name, dicom_series, work_dir)
            for kind in ("nifti", "dicom"):
                check = checks[f"infer_full_{kind}_{OWN_BUNDLE}"]
                check["own_labels_only"] = set(check["label_values"]) <= set(range(len(OWN_ORGANS) + 1))
                check["passed"] = check["passed"] and check["own_labels_only"]
        checks["server_log"] = check_log(log_file, msd_settings)
    except CheckError as e:
        results["error"] = str(e)
    results["passed"] = "error" not in results and all(c.get("passed") for c in checks.values())
    results["seconds"] = round(time.time() - started)
    (work_dir / "result.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    if not keep and results["passed"] and work is None:
        shutil.rmtree(work_dir)
    return 0 if results["passed"] else 1


def install(zoo_dir: Path, name: str, app: Path) -> None:
    """``tools/zoo.py install`` into the app's model folder, offline: the released weights that a bundle's
    ``large_files.yml`` names are not fetched."""
    cmd = [sys.executable, str(REPO / "tools" / "zoo.py"), "install", name, "--index"]
    cmd += [str(zoo_dir / "model_info.json"), "--bundle_dir", str(app / "model"), "--large_files", "false"]
    subprocess.run(cmd, check=True)


def check_own_labels(info: dict, bundle: Path) -> dict:
    """``/info`` lists the own-data bundle with the label names of its ``dataset.json``; the served model's record
    holds the spacing it was trained at and those names; the zip carried no file of the user's data."""
    import torch

    labels = info.get("models", {}).get(bundle.name, {}).get("labels")
    record = torch.load(bundle / "models" / "model.pt", weights_only=True, map_location="cpu").get("data_record", {})
    files = {p.name for p in bundle.rglob("*") if p.is_file()}
    result = {
        "labels": labels,
        "recorded_labels": record.get("labels"),
        "recorded_pixdim": record.get("pixdim"),
        "plan": (bundle / "models" / OWN_TASK / "plan.json").is_file(),
        "user_files": sorted(files & {"datalist.json", "fingerprint.json", "latest.pt", "dataset.json"}),
    }
    result["passed"] = (
        labels == {name: i for i, name in enumerate(OWN_ORGANS, 1)}
        and record.get("labels") == ["background", *OWN_ORGANS]
        and record.get("pixdim") == OWN_TRAINING["pixdim"]
        and result["plan"]
        and not result["user_files"]
    )
    log(f"/info of the own-data bundle: {result}")
    return result


def wait_for_info(base: str, server: subprocess.Popen, timeout: float = 900) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise CheckError(f"the server exited with code {server.returncode} (see server.log)")
        try:
            return json.loads(request(f"{base}/info/", timeout=30))
        except (urllib.error.URLError, ConnectionError, CheckError):
            time.sleep(5)
    raise CheckError(f"no answer from {base}/info/ within {timeout} s")


def check_info(info: dict, models: bool) -> dict:
    """Both bundles listed: as trainers always, as models once they have weights (MONAI Label serves none before)."""
    names, trainers = sorted(info.get("models", {})), sorted(info.get("trainers", {}))
    listed = set(BUNDLES) <= set(trainers) and (set(BUNDLES) <= set(names) if models else True)
    result = {"passed": listed, "models": names, "trainers": trainers}
    log(f"/info: {result}")
    return result


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def post_train(base: str, model: str, params: dict, run_sync: bool = True) -> bytes:
    query = "?run_sync=true" if run_sync else ""
    body = json.dumps(params).encode()
    return request(f"{base}/train/{model}{query}", body, {"Content-Type": "application/json"})


def train_only_max_epochs(base: str, bundle: Path, log_file: Path) -> dict:
    """``/train`` with only ``max_epochs``: monailabel 0.8.5's ``BundleTrainTask.__call__`` builds the bundle's
    ``displayable_configs`` override as ``{c: request[c] for c in displayable_configs}``, so any option shown in
    ``/info`` and left out of the request is a ``KeyError`` before the bundle runs; no bundle can change that short of
    showing no options at all. Passed when it fails exactly so (HTTP 500, that KeyError in monailabel's bundle.py in
    the server log): the workaround, sending every option ``/info`` lists for the trainer with ``max_epochs`` changed
    (what the viewers send), is what the next checks do."""
    before = log_file.read_text(errors="replace")
    try:
        post_train(base, bundle.name, {"max_epochs": 1})
        outcome = "trained"
    except CheckError as e:
        outcome = str(e)[-300:]
    time.sleep(2)  # the server's traceback reaches its log file
    logged = log_file.read_text(errors="replace")[len(before) :]
    known = "overrides[k] = {c: request[c] for c in displayable_configs.keys()}"
    result = {
        "outcome": outcome,
        "http_500": "HTTP 500" in outcome,
        "known_keyerror": known in logged and "KeyError: 'num_samples'" in logged,
        "workaround": "send every option of GET /info trainers[<name>].config, max_epochs changed",
    }
    result["passed"] = result["http_500"] and result["known_keyerror"]
    log(f"/train with only max_epochs: {result}")
    return result


def train(base: str, bundle: Path, params: dict, what: str) -> dict:
    """A synchronous ``/train``: it must write a new ``models/model.pt`` and a ``latest.pt`` of a run of its own
    (the asked epochs, not resumed), the model recorded at the asked window."""
    import torch

    model_pt, latest = bundle / "models" / "model.pt", bundle / "models" / "latest.pt"
    before = digest(model_pt)
    t = time.time()
    post_train(base, bundle.name, params)
    trainer = torch.load(latest, weights_only=False, map_location="cpu")["trainer"] if latest.is_file() else {}
    saved = torch.load(model_pt, weights_only=True, map_location="cpu") if model_pt.is_file() else {}
    record = saved.get("data_record", {})
    result = {
        "seconds": round(time.time() - t, 1),
        "model_pt_replaced": digest(model_pt) not in (None, before),
        "epochs_run": trainer["iteration"] // trainer["epoch_length"] if trainer else None,
        "recorded_roi_size": record.get("roi_size"),
        "recorded_pixdim": record.get("pixdim"),
    }
    result["passed"] = (
        result["model_pt_replaced"]
        and result["epochs_run"] == params["max_epochs"]
        and record.get("roi_size") == [float(params["roi_edge"])] * 3
    )
    log(f"{what}: {result}")
    return result


def train_refused(base: str, bundle: Path, params: dict, timeout: float = 600) -> dict:
    """An asynchronous ``/train`` with a window edge SwinUNETR cannot take: the task must end in error, its status
    naming the option and the reason, and the served model must stay."""
    before = digest(bundle / "models" / "model.pt")
    post_train(base, bundle.name, params, run_sync=False)
    deadline, status = time.time() + timeout, {}
    while time.time() < deadline:
        time.sleep(3)
        status = json.loads(request(f"{base}/train/", timeout=30))
        if status.get("status") not in ("RUNNING", "QUEUED", None):
            break
    details = "\n".join(status.get("details", []))
    reason = f"roi_edge {params['roi_edge']!r}: the window's edge must be a multiple of 32"
    result = {
        "status": status.get("status"),
        "reason_in_status": reason in details,  # the status keeps the last 20 lines of the task's output
        "option_named_in_status": "window_edge" in details and "roi_edge" in details,
        "reason_in_server_log": None,
        "model_pt_unchanged": digest(bundle / "models" / "model.pt") == before,
        "status_tail": status.get("details", [])[-3:],
    }
    result["passed"] = (
        result["status"] == "ERROR"
        and result["model_pt_unchanged"]
        and result["reason_in_status"]  # the kit's message is the task's last line (swin_unetr_kit.errors)
    )
    log(f"/train with roi_edge {params['roi_edge']}: {result}")
    return result


def label_result(label: Path, reference: Path, started: float, what: str) -> dict:
    """The check of a returned label map: in the reference's geometry (shape and affine), stored as uint8; logged
    with ``what``."""
    import nibabel as nib

    result = {**same_geometry(label, reference), "seconds": round(time.time() - started, 1), "label_file": str(label)}
    result["dtype"] = str(nib.load(label).get_data_dtype())
    result["passed"] = result["same_shape"] and result["same_affine"] and result["dtype"] == "uint8"
    log(f"{what}: {result}")
    return result


def infer_study(base: str, model: str, image_id: str, reference: Path, work_dir: Path) -> dict:
    """``/infer`` on a study of the datastore (a NIfTI file); the label map must be in the study's geometry."""
    t = time.time()
    query = urllib.parse.urlencode({"image": image_id, "output": "image"})
    body, headers = multipart({"params": json.dumps(INFER_PARAMS)}, [])
    out = work_dir / f"{model}_{image_id}_label.nii.gz"
    out.write_bytes(request(f"{base}/infer/{model}?{query}", body, headers))
    return label_result(out, reference, t, f"/infer {model} on NIfTI study {image_id}")


def infer_dicom(base: str, model: str, series: Path, work_dir: Path) -> dict:
    """``/infer`` on a DICOM series uploaded as a session (what a viewer without a DICOMweb server does), without
    naming the result's file type: the bundle's default (NIfTI) applies."""
    t = time.time()
    files = [("files", f) for f in sorted(series.iterdir()) if f.is_file()]
    body, headers = multipart({}, files)
    session = json.loads(request(f"{base}/session/?uncompress=false", body, headers, method="PUT"))["session_id"]
    query = urllib.parse.urlencode({"session_id": session, "output": "image"})
    body, headers = multipart({"params": json.dumps(INFER_PARAMS)}, [])
    out = work_dir / f"{model}_dicom_label.nii.gz"
    out.write_bytes(request(f"{base}/infer/{model}?{query}", body, headers))
    return label_result(out, series, t, f"/infer {model} on a {len(files)}-file DICOM series")


def check_log(log_file: Path, msd_settings: dict) -> dict:
    """The server log names the CPU inference runtime, and the data settings the MSD weights are served at."""
    text = log_file.read_text(errors="replace")
    runtime = [line.strip()[-200:] for line in text.splitlines() if "CPU inference:" in line or "cpu_runtime=" in line][
        :4
    ]
    served = f"pixdim {msd_settings['pixdim']}, as the model was trained"
    result = {"runtime_lines": runtime, "openvino": any("OpenVINO" in line for line in runtime)}
    result["served_at_trained_settings"] = served in text
    result["passed"] = result["openvino"] and result["served_at_trained_settings"]
    log(f"server log: {result}")
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="folder for the zoo, app, studies, results (default: a temporary folder)")
    parser.add_argument("--venv", help="MONAI Label environment (default: <cache>/monailabel-venv)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    args = parser.parse_args()
    sys.exit(main(args.work, args.venv, args.port, args.keep))
