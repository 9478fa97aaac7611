"""TorchScript and ONNX export of the segmentation bundles' networks with MONAI's ``ckpt_export`` and ``onnx_export``,
checked against the eager network on the same input (Swin UNETR does not script, so the exports trace it at the
window size)."""

from __future__ import annotations

import json
import sys

import preloaded_python
import pytest
import torch
from conftest import BTCV_BUNDLE, REPO
from monai.bundle import ConfigWorkflow
from monai.networks.nets import SwinUNETR

from swin_unetr_kit.pretrained import LegacyPatchMerging
from swin_unetr_kit.record import RECORD_KEY, describe

MSD_BUNDLE = REPO / "bundles" / "swin_unetr_msd"


def test_ckpt_export_by_trace_matches_the_eager_network(tmp_path):
    """TorchScript of the MSD network, built in the patch-merging order its checkpoint records (the BTCV bundle's is
    exported to ONNX below: one export per bundle config)."""
    bundle, overrides = MSD_BUNDLE, {"bundle_root": str(MSD_BUNDLE)}
    config = str(bundle / "configs" / "inference.json")
    overrides = {**overrides, "network_def#feature_size": 12}
    torch.manual_seed(0)
    # weights trained in the legacy patch-merging order, saved as the bundle saves model.pt: with their record
    network = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, downsample=LegacyPatchMerging)
    torch.save({"model": network.state_dict(), RECORD_KEY: describe(network)}, tmp_path / "model.pt")
    overrides["ckpt_path"] = str(tmp_path / "model.pt")  # the config builds network_def in that file's order
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(tmp_path / "model.ts")]
    cmd += ["--ckpt_file", str(tmp_path / "model.pt"), "--meta_file", str(bundle / "configs" / "metadata.json")]
    cmd += ["--config_file", config, "--use_trace", "True", "--input_shape", "[1, 1, 64, 64, 64]"]
    cmd += ["--key_in_ckpt", "model", *[f"--{k}={v}" for k, v in overrides.items()]]
    result = preloaded_python.run(cmd, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    extra = {"metadata.json": ""}
    exported = torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"]  # the bundle's metadata travels inside the file
    image = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(image), network.eval()(image), rtol=1e-4, atol=1e-4)


def test_onnx_export_matches_the_eager_network(tmp_path):
    """``python -m monai.bundle onnx_export`` of the BTCV network, run with ONNX Runtime against the eager network."""
    ort = pytest.importorskip("onnxruntime")
    config = str(BTCV_BUNDLE / "configs" / "inference.json")
    overrides = {"network_def#feature_size": 12}
    torch.manual_seed(0)
    network = ConfigWorkflow(config_file=config, workflow_type="infer", **overrides).parser.get_parsed_content(
        "network_def"
    )
    torch.save(network.state_dict(), tmp_path / "model.pt")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "onnx_export",
        "network_def",
        "--filepath",
        str(tmp_path / "model.onnx"),
    ]
    # 64^3, not the tests' SMALL_ROI: with a side of 32 the exporter cannot size the bottleneck's instance norm
    cmd += ["--ckpt_file", str(tmp_path / "model.pt"), "--config_file", config, "--input_shape", "[2, 1, 64, 64, 64]"]
    cmd += ["--use_trace", "True", "--converter_kwargs", "{'dynamo': False}"]  # the TorchScript-based exporter
    cmd += [f"--{k}={v}" for k, v in overrides.items()]
    result = preloaded_python.run(cmd, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    assert model_input.shape == [2, 1, 64, 64, 64]  # windows of the ROI, sw_batch_size at a time
    image = torch.rand(2, 1, 64, 64, 64)
    (output,) = session.run(None, {model_input.name: image.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(output), network.eval()(image), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bundle", [BTCV_BUNDLE, MSD_BUNDLE])
def test_inference_trt_config_resolves(bundle):
    """``inference_trt.json`` over ``inference.json``: MONAI's ``trt_compile`` wraps the network on a CUDA machine with
    TensorRT; here (no TensorRT) it leaves the network as it is, so the config is checked for what it resolves to."""
    workflow = ConfigWorkflow(
        config_file=[str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "inference_trt.json")],
        workflow_type="infer",
        bundle_root=str(bundle),
        **{"network_def#feature_size": 12},
    )
    parser = workflow.parser
    assert "$from monai.networks import trt_compile" in parser["imports"]  # appended, not replacing the bundle's
    args = parser.get_parsed_content("trt_args")
    assert args == {"precision": "fp16", "dynamic_batchsize": [1, 4, 4]}
    network = parser.get_parsed_content("network")
    assert type(network).__name__ == "SwinUNETR" and not hasattr(network, "_trt_compiler")
