"""End-to-end check of the segmentation bundles in the real MONAI Label server, as a new user would run it.

Builds (once) a separate virtual environment with ``monailabel`` 0.8.5 and pins found to install together, WITHOUT
this repository in it; packages the bundles into the local zoo (``tools/zoo.py package``), installs the zips into the
``monaibundle`` sample app's model folder, starts the server on 127.0.0.1 offline, and checks through its REST API:

- ``/info`` lists both bundles as models and trainers;
- ``/infer`` on a NIfTI CT study and on a DICOM series returns a label map in the input's geometry (BTCV and MSD);
- ``/train`` (BTCV, small settings from its ``displayable_configs``) runs one epoch, and the next ``/infer`` serves the
  newly trained ``models/model.pt``.

The bundles are served with a stand-in seeded ``models/model.pt`` of feature_size 12 (the bundles build the network the
checkpoint was trained with), so CPU inference takes seconds. It needs the sample CT (``python tools/sample_data.py``)
and is too slow for the test suite (the environment alone is a few minutes to build); the README records its last
result.

Usage (from the repository root, in the project's environment):
    python tools/monailabel_check.py [--work DIR] [--venv DIR] [--port 8765]
"""

from __future__ import annotations

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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from sample_data import cache_dir  # noqa: E402

BUNDLES = ("swin_unetr_btcv_seg", "swin_unetr_msd")
NIFTI_HALF_SIZE = (24, 24, 16)  # voxels of 3 mm: a 144 x 144 x 96 mm block of the torso CT
DICOM_SIZE = 160  # pixels of ~1 mm, in-plane, of each slice of the 20-slice series
# Found by trying: monailabel 0.8.5 caps numpy below 2 (numpymaxflow, pydicom-seg) and its DICOM stack breaks on
# pydicom 3; torch and torchvision are pinned as a pair that import together, else monailabel's install replaces torch
# (and sam2, one of its requirements, builds against whatever torch its isolated build environment pulls).
PINS = (
    "monailabel==0.8.5",
    "monai==1.6.1",
    "torch==2.13.0",
    "torchvision==0.28.0",
    "numpy==1.26.4",
    "pydicom<3",
    "pynetdicom<3",
    "dicomweb-client<0.60",
    "pytorch-ignite==0.5.5",
    "einops==0.8.2",
    "fire==0.7.1",
    "openvino==2026.4.1",  # the segmentation bundles' CPU inference path (cpu_runtime auto), as in requirements.txt
)


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
    """Create ``venv`` with MONAI Label and the pins (skipped when its marker says the same pins are installed)."""
    marker = venv / "monailabel_check_pins.txt"
    python = venv / "bin" / "python"
    if marker.is_file() and marker.read_text() == "\n".join(PINS) + "\n":
        return python
    log(f"building {venv} (a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text("\n".join(PINS) + "\n")
    # PIP_CONSTRAINT also reaches the isolated build environments (sam2 builds against torch): the pinned torch there
    env = clean_env(PIP_CONSTRAINT=str(constraints))
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PINS], check=True, env=env)
    if subprocess.run([str(python), "-c", "import torchvision"], env=env, cwd="/").returncode:
        guard_torchvision_fakes(venv)
    subprocess.run([str(python), "-c", "import torch, torchvision, monailabel, monai"], check=True, env=env, cwd="/")
    marker.write_text("\n".join(PINS) + "\n")
    return python


def guard_torchvision_fakes(venv: Path) -> None:
    """Let PyPI's torchvision (a CUDA build) import beside the CPU torch wheel.

    Its compiled operators do not load without CUDA torch, which torchvision tolerates everywhere but in two
    unguarded ``torch.library.register_fake("torchvision::...")`` calls, so ``import torchvision`` fails; MONAI Label
    imports ``torchvision.utils`` (pure Python) at start. Guard those two calls by ``extension._has_ops()`` as
    torchvision guards its other registrations. With a CPU torchvision from PyTorch's own CPU wheel index, or with a
    CUDA torch, it imports as it is and nothing is changed.
    """
    (module,) = venv.glob("lib/python3*/site-packages/torchvision/_meta_registrations.py")
    text = module.read_text()
    guard = (
        "\n\ndef _register_fake_if_ops(name):\n"
        "    return torch.library.register_fake(name) if torchvision.extension._has_ops() else (lambda fn: fn)\n"
    )
    if "_register_fake_if_ops" not in text:
        text = text.replace(
            "import torchvision.extension  # noqa: F401\n", "import torchvision.extension  # noqa: F401\n" + guard, 1
        )
        module.write_text(text.replace("@torch.library.register_fake(", "@_register_fake_if_ops("))
    log(f"torchvision's compiled operators do not load with this torch: guarded their fake registrations in {module}")


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


def write_stand_in_weights(python: Path, bundle: Path, out_channels: int) -> None:
    """A seeded feature_size 12 SwinUNETR as ``models/model.pt`` (written in the MONAI Label environment)."""
    code = (
        "import sys, torch; from monai.networks.nets import SwinUNETR; torch.manual_seed(0); "
        "torch.save(SwinUNETR(in_channels=1, out_channels=int(sys.argv[2]), feature_size=12).state_dict(), sys.argv[1])"
    )
    (bundle / "models").mkdir(exist_ok=True)
    subprocess.run(
        [str(python), "-c", code, str(bundle / "models" / "model.pt"), str(out_channels)],
        check=True,
        env=clean_env(),
        cwd="/",
    )


def small_studies(sample: Path, out: Path) -> tuple[Path, Path, Path]:
    """A NIfTI CT with its label and a DICOM series, both cropped from the sample data to a few sliding windows, so
    that CPU inference takes minutes on a busy machine: (NIfTI image, its label, DICOM series folder)."""
    import nibabel as nib
    import numpy as np
    import pydicom

    out.mkdir(parents=True, exist_ok=True)
    image, label = nib.load(sample / "imagesTr" / "ts_torso.nii.gz"), nib.load(sample / "labelsTr" / "ts_torso.nii.gz")
    centre = [s // 2 for s in image.shape]
    crop = tuple(slice(c - h, c + h) for c, h in zip(centre, NIFTI_HALF_SIZE, strict=True))
    for img, name in ((image, "ct.nii.gz"), (label, "label.nii.gz")):
        nib.save(img.slicer[crop], out / name)
    series = out / "dicom_series"
    series.mkdir(exist_ok=True)
    for i, source in enumerate(sorted(p for p in (sample / "imagesTs" / "ts_slab_dicom").iterdir() if p.is_file())):
        ds = pydicom.dcmread(source)
        ds.decompress()
        r0, c0 = (ds.Rows - DICOM_SIZE) // 2, (ds.Columns - DICOM_SIZE) // 2
        pixels = ds.pixel_array[r0 : r0 + DICOM_SIZE, c0 : c0 + DICOM_SIZE]
        row_dir, col_dir = np.array(ds.ImageOrientationPatient[:3]), np.array(ds.ImageOrientationPatient[3:])
        row_mm, col_mm = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
        origin = np.array(ds.ImagePositionPatient, float) + c0 * col_mm * row_dir + r0 * row_mm * col_dir
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin]
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.save_as(series / f"slice_{i:03d}.dcm")
    return out / "ct.nii.gz", out / "label.nii.gz", series


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
    ct, ct_label, dicom_series = small_studies(sample, work_dir / "inputs")

    log("packaging the bundles into a local zoo and installing them into MONAI Label's monaibundle app")
    zoo_dir, apps = work_dir / "zoo", work_dir / "apps"
    subprocess.run([sys.executable, str(REPO / "tools" / "zoo.py"), "package", "--out", str(zoo_dir)], check=True)
    if not (apps / "monaibundle").is_dir():
        cmd = [str(monailabel), "apps", "--download", "--name", "monaibundle", "--output", str(apps)]
        subprocess.run(cmd, check=True, env=clean_env(venv_dir), cwd=work_dir)
    app = apps / "monaibundle"
    for name, out_channels in zip(BUNDLES, (14, 2), strict=True):
        shutil.rmtree(app / "model" / name, ignore_errors=True)
        cmd = [
            sys.executable,
            str(REPO / "tools" / "zoo.py"),
            "install",
            name,
            "--index",
            str(zoo_dir / "model_info.json"),
        ]
        # offline: the released weights large_files.yml names are not fetched; stand-ins take their place
        subprocess.run([*cmd, "--bundle_dir", str(app / "model"), "--large_files", "false"], check=True)
        write_stand_in_weights(python, app / "model" / name, out_channels)

    studies = work_dir / "studies"
    shutil.rmtree(studies, ignore_errors=True)
    (studies / "labels" / "final").mkdir(parents=True)
    for study in ("ct_a", "ct_b"):  # two labelled studies: one to train on, one to validate
        shutil.copyfile(ct, studies / f"{study}.nii.gz")
        shutil.copyfile(ct_label, studies / "labels" / "final" / f"{study}.nii.gz")

    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "checks": {}}
    with open(work_dir / "server.log", "w") as server_log:
        cmd = [str(monailabel), "start_server", "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--conf", "models", ",".join(BUNDLES), "--conf", "zoo_source", "github"]
        cmd += ["--conf", "sam2", "false", "--conf", "preload", "false"]
        log(f"starting the server (log: {work_dir / 'server.log'})")
        server = subprocess.Popen(
            cmd,
            stdout=server_log,
            stderr=subprocess.STDOUT,
            env=clean_env(venv_dir),
            cwd=work_dir,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            info = wait_for_info(base, server)
            results["checks"]["info"] = check_info(info)
            for name in BUNDLES:
                results["checks"][f"infer_nifti_{name}"] = infer_study(base, name, "ct_a", ct, work_dir)
                results["checks"][f"infer_dicom_{name}"] = infer_dicom(base, name, dicom_series, work_dir)
            results["checks"]["train_btcv"] = train_and_reinfer(
                base, app / "model" / BUNDLES[0], ct, work_dir, results["checks"][f"infer_nifti_{BUNDLES[0]}"]
            )
        except CheckError as e:
            results["error"] = str(e)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    results["passed"] = "error" not in results and all(c.get("passed") for c in results["checks"].values())
    results["seconds"] = round(time.time() - started)
    (work_dir / "result.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    if not keep and results["passed"] and work is None:
        shutil.rmtree(work_dir)
    return 0 if results["passed"] else 1


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


def check_info(info: dict) -> dict:
    models, trainers = sorted(info.get("models", {})), sorted(info.get("trainers", {}))
    labels = {name: sorted(info["models"][name].get("labels", {})) for name in BUNDLES if name in info["models"]}
    passed = set(BUNDLES) <= set(models) and set(BUNDLES) <= set(trainers)
    log(f"/info: models {models}, trainers {trainers}")
    return {"passed": passed, "models": models, "trainers": trainers, "labels": labels}


INFER_PARAMS = {"device": "cpu", "sw_batch_size": 2, "sw_overlap": 0.25, "num_views": 1}


def label_result(label: Path, reference: Path, started: float, what: str) -> dict:
    """The check of a returned label map: in the reference's geometry (shape and affine); logged with ``what``."""
    result = {**same_geometry(label, reference), "seconds": round(time.time() - started, 1), "label_file": str(label)}
    result["passed"] = result["same_shape"] and result["same_affine"]
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
    """``/infer`` on a DICOM series uploaded as a session (what a viewer without a DICOMweb server does)."""
    t = time.time()
    files = [("files", f) for f in sorted(series.iterdir()) if f.is_file()]
    body, headers = multipart({}, files)
    session = json.loads(request(f"{base}/session/?uncompress=false", body, headers, method="PUT"))["session_id"]
    query = urllib.parse.urlencode({"session_id": session, "output": "image"})
    # a folder has no file extension for MONAI Label to write the result with: the client names one, as viewers do
    body, headers = multipart({"params": json.dumps({**INFER_PARAMS, "result_extension": ".nii.gz"})}, [])
    out = work_dir / f"{model}_dicom_label.nii.gz"
    out.write_bytes(request(f"{base}/infer/{model}?{query}", body, headers))
    return label_result(out, series, t, f"/infer {model} on a {len(files)}-file DICOM series")


def train_and_reinfer(base: str, bundle: Path, reference: Path, work_dir: Path, before: dict) -> dict:
    """``/train`` one epoch with CPU-sized options (train.json's displayable_configs), then ``/infer`` again: the
    model file must have changed and the served prediction with it."""
    import hashlib

    import numpy as np
    from monai.transforms import LoadImage

    model_pt = bundle / "models" / "model.pt"
    digest_before = hashlib.sha256(model_pt.read_bytes()).hexdigest()
    params = {
        "max_epochs": 1,
        "val_split": 0.5,
        "device": "cpu",
        "multi_gpu": False,
        "pretrained": True,
        "tracking": "None",
        "model_filename": "model.pt",
        "num_samples": 1,
        "num_workers": 0,
        "cache_rate": 0.0,
        "roi_edge": 64,
        "feature_size": 12,
        "val_interval": 1,
    }
    t = time.time()
    request(
        f"{base}/train/{bundle.name}?run_sync=true", json.dumps(params).encode(), {"Content-Type": "application/json"}
    )
    seconds = round(time.time() - t, 1)
    digest_after = hashlib.sha256(model_pt.read_bytes()).hexdigest()
    latest = bundle / "models" / "latest.pt"
    (work_dir / "after").mkdir(exist_ok=True)
    after = infer_study(base, bundle.name, "ct_a", reference, work_dir / "after")
    loader = LoadImage(image_only=True)
    changed = not np.array_equal(np.asarray(loader(before["label_file"])), np.asarray(loader(after["label_file"])))
    result = {
        "train_seconds": seconds,
        "latest_pt_written": latest.is_file(),
        "model_pt_replaced": digest_after != digest_before,
        "prediction_changed": changed,
        "infer_after": after,
    }
    result["passed"] = result["model_pt_replaced"] and changed and after["passed"]
    log(f"/train {bundle.name} one epoch, then /infer: {result}")
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
