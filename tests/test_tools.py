"""The user tools: the datalist writer and the real sample data set."""

from __future__ import annotations

import json
from pathlib import Path

import datalist
import nibabel as nib
import numpy as np
import sample_data
from conftest import write_ct_case


def test_datalist_tool_writes_a_seeded_relative_datalist(tmp_path):
    for i in range(5):
        write_ct_case(tmp_path, f"case{i}", seed=i)
    out = datalist.make_datalist(str(tmp_path), val_fraction=0.4, seed=3)
    content = json.loads(Path(out).read_text())
    assert len(content["training"]) == 3 and len(content["validation"]) == 2
    for entry in content["training"] + content["validation"]:
        assert not entry["image"].startswith("/") and (tmp_path / entry["label"]).is_file()
    again = datalist.make_datalist(str(tmp_path), out=str(tmp_path / "again.json"), val_fraction=0.4, seed=3)
    assert json.loads(Path(again).read_text())["validation"] == content["validation"]


def test_sample_data_is_real_ct_with_btcv_labels(sample_dataset):
    content = json.loads((sample_dataset / "dataset.json").read_text())
    image = nib.load(sample_dataset / content["training"][0]["image"])
    hu = np.asarray(image.dataobj)
    assert image.shape == (122, 101, 112) and hu.min() < -900 and hu.max() > 1000  # air to bone, in HU
    label = np.asarray(nib.load(sample_dataset / content["training"][0]["label"]).dataobj)
    organs = set(np.unique(label).tolist())
    assert organs <= set(range(14))
    assert 5 not in organs  # the esophagus is outside these organ maps
    assert {1, 2, 3, 6, 7, 8, 11} <= organs  # spleen, kidneys, liver, stomach, aorta, pancreas
    assert (label == 6).sum() > (label == 1).sum()  # the liver is larger than the spleen
    dicom = sample_dataset / content["test"][0]["image"]
    assert dicom.is_dir() and len(list(dicom.iterdir())) == 20
    assert sample_data.TOTAL_TO_BTCV[5] == 6  # TotalSegmentator's liver is BTCV's 6


def test_benchmark_dice_agreement(tmp_path):
    import nibabel as nib
    import numpy as np
    from benchmark import _dice_agreement

    a = np.zeros((4, 4, 4), np.uint8)
    a[:2] = 1
    a[2:, :2] = 6
    b = a.copy()
    b[3, :2] = 0  # half of label 6 lost
    for name, data in (("a", a), ("b", b)):
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
    assert _dice_agreement(tmp_path / "a.nii.gz", tmp_path / "a.nii.gz") == 1.0
    assert abs(_dice_agreement(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz") - (1.0 + 2 * 4 / (8 + 4)) / 2) < 1e-9


def test_benchmark_native_resolution_volume_keeps_the_field_of_view(tmp_path):
    from benchmark import native_resolution_ct

    case = write_ct_case(tmp_path, "ct", shape=(20, 16, 12))
    source = nib.load(case["image"])
    out = nib.load(native_resolution_ct(Path(case["image"]), tmp_path / "big.nii.gz", shape=(40, 48, 18)))
    assert out.shape == (40, 48, 18) and out.get_data_dtype() == np.int16
    for corner in ([-0.5, -0.5, -0.5], [19.5, 15.5, 11.5]):  # outer faces of the first and last voxels
        scaled = np.array(corner) + 0.5
        scaled = scaled * np.array(out.shape) / np.array(source.shape) - 0.5
        assert np.allclose(source.affine @ [*corner, 1], out.affine @ [*scaled, 1])


def test_benchmark_counts_network_flops():
    from benchmark import network_flops
    from monai.networks.nets import SwinUNETR

    flops = network_flops(SwinUNETR(in_channels=1, out_channels=14, feature_size=12), [1, 64, 64, 64])
    assert flops["forward"] > 1e10  # feature_size 12 at 64^3: tens of GFLOPs
    assert 2 * flops["forward"] < flops["training"] < 4 * flops["forward"]  # backward costs about twice the forward


def test_benchmark_softmax_difference_and_confidence(tmp_path):
    from benchmark import _softmax_agreement

    reference = np.zeros((1, 3, 2, 2, 2), np.float16)
    reference[:, 0] = 1.0  # every voxel sure of class 0
    other = reference.copy()
    other[:, 0], other[:, 1] = 0.5, 0.5
    np.save(tmp_path / "a.npy", reference)
    np.save(tmp_path / "b.npy", other)
    agreement = _softmax_agreement(tmp_path / "a.npy", tmp_path / "b.npy")
    assert agreement == {"softmax_mean_abs_difference": 1.0 / 3, "reference_confidence": 1.0}


def test_benchmark_levers_skip_bf16_on_a_cpu_without_native_bf16(monkeypatch):
    from benchmark import _compute_dtype, _pipelines

    from swin_unetr_kit import cpu_inference

    monkeypatch.setattr(cpu_inference, "native_bf16", lambda flags=None: False)
    pipelines = _pipelines("cpu")
    assert pipelines["ours + bf16"].startswith("not applicable")
    assert pipelines["ours, int8 in PyTorch"][0] == {"infer": {"cpu_precision": "int8"}}
    assert pipelines["ours, ONNX Runtime"][0] == {"infer": {"cpu_runtime": "onnxruntime"}}
    assert pipelines["ours in PyTorch"][0] == {"infer": {"cpu_runtime": "torch"}}
    assert pipelines["ours, overlap 0.25"][0] == {"infer": {"sw_overlap": 0.25}}
    assert _compute_dtype({"cpu_precision": "int8"}, "cpu") == "int8"
    assert _compute_dtype({}, "cpu") == "float32"
    monkeypatch.setattr(cpu_inference, "native_bf16", lambda flags=None: True)
    assert _pipelines("cpu")["ours + bf16"][0] == {"infer": {"cpu_precision": "bf16"}}
    assert _pipelines("cuda").keys().isdisjoint({"ours + bf16", "ours, int8 in PyTorch"})  # GPU runs: as they are


def test_benchmark_gpu_levers_name_settings_the_bundle_has():
    """Every GPU lever's config overrides name a setting of train.json/inference.json, or a component argument that
    MONAI's engine takes (``compile``), so that each runs as the one-line override the README shows."""
    import inspect

    from benchmark import BUNDLE, CHANNELS_LAST, DATA_ON_GPU, _compute_dtype, _pipelines
    from monai.bundle import ConfigParser
    from monai.engines import SupervisedEvaluator, SupervisedTrainer

    pipelines = _pipelines("cuda")
    assert {"ours, no AMP (fp32)", "ours, TF32 instead of AMP", "ours, torch.compile", "ours, channels-last"} <= set(
        pipelines
    )
    configs = {"infer": "inference.json", "train": "train.json"}
    for name, (settings, _) in pipelines.items():
        for workflow, overrides in settings.items():
            parser = ConfigParser()
            parser.read_config(str(BUNDLE / "configs" / configs[workflow]))
            for key in overrides:
                if key in (CHANNELS_LAST, DATA_ON_GPU):
                    continue
                parent, _, leaf = key.rpartition("#")
                if leaf == "compile":
                    engine = SupervisedEvaluator if workflow == "infer" else SupervisedTrainer
                    assert parser[parent]["_target_"] == engine.__name__
                    assert "compile" in inspect.signature(engine).parameters
                else:
                    assert key in parser, f"{name}: {configs[workflow]} has no {key}"
    tf32 = pipelines["ours, TF32 instead of AMP"]
    assert _compute_dtype(tf32[0]["train"], "cuda", tf32[1]) == "tf32"
    assert _compute_dtype({"amp": False}, "cuda") == "float32"
    assert _compute_dtype({"amp_dtype": "bfloat16"}, "cuda") == "bfloat16"
    assert _compute_dtype({}, "cuda") == "float16"  # the bundle's AMP


def test_benchmark_worker_levers_change_the_network_and_the_data(sample_dataset):
    """channels-last converts the network's weights in place; data on the GPU moves the cached volumes to the
    configured device (here the CPU, the same code path)."""
    import torch
    from benchmark import CHANNELS_LAST, DATA_ON_GPU, SIZES, _initialized_workflow

    settings = {**SIZES["small"], "dataset_dir": str(sample_dataset), "bundle_root": str(sample_dataset / "run")}
    settings.update({CHANNELS_LAST: True, DATA_ON_GPU: True, "device": "$torch.device('cpu')"})
    workflow = _initialized_workflow("train.json", "train", settings)
    network = workflow.parser.get_parsed_content("network")
    weight = next(p for p in network.parameters() if p.dim() == 5 and p.shape[1] > 1 and p.shape[2] > 1)
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    assert workflow.parser["deterministic_transforms"][-1]["_target_"] == "ToDeviced"
    assert workflow.parser["train"]["preprocessing"]["transforms"].startswith("$@deterministic_transforms")


def test_benchmark_reports_a_failed_pipeline_and_goes_on(tmp_path):
    """A pipeline that breaks is a row saying why, not the end of a benchmark that has run for half an hour."""
    from benchmark import _child

    row = _child({}, "infer_worker", {"bundle_root": str(tmp_path), "network_def#feature_size": 5}, timeout=300)
    assert row["failed"].startswith("exit 1: ") and "Error" in row["failed"]


def test_benchmark_make_weights_saves_loadable_fine_tuned_weights(sample_dataset, tmp_path):
    """``python tools/benchmark.py make_weights`` at the small size, one iteration: weights the benchmark can load."""
    import torch
    from benchmark import make_weights
    from monai.networks.nets import SwinUNETR

    out = tmp_path / "weights" / "small.pt"
    make_weights(size="small", iterations=1, out=str(out), dataset_dir=str(sample_dataset))
    assert out.is_file() and not out.with_suffix(".partial").exists()
    network = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)
    network.load_state_dict(torch.load(out, weights_only=True))


def test_benchmark_reference_runs_the_zoo_settings_on_the_cpu():
    """The reference is the zoo's configuration whatever the bundle's CPU defaults: fp32 PyTorch, overlap 0.5,
    constant blending, sw_batch_size 4."""
    from benchmark import BUNDLE, REFERENCE
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), "device": "cpu", **REFERENCE["infer"]})
    inferer = parser.get_parsed_content("inferer")
    assert (inferer.overlap, inferer.sw_batch_size, inferer.mode) == (0.5, 4, "constant")
    assert parser.get_parsed_content("cpu_inference").describe().startswith("CPU inference: fp32, PyTorch eager")
    assert parser["network_def"]["use_flash_attention"] is False


def test_benchmark_gpu_script_names_known_pipelines():
    """``tools/benchmark_gpu.sh`` parses, and every pipeline it asks for by name is one the benchmark has on a GPU."""
    import re
    import subprocess

    from benchmark import REPO, _names, _pipelines

    script = REPO / "tools" / "benchmark_gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    named = re.findall(r'--pipelines "([^"]+)"', script.read_text())
    assert named and {name for names in named for name in _names(names)} <= set(_pipelines("cuda"))
    assert _names("ours,ours, reference blending") == ["ours", "ours, reference blending"]
