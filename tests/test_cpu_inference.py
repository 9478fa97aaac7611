"""The CPU inference levers of ``swin_unetr_kit.cpu_inference``: each agrees with the eager fp32 network, ``auto``
picks bf16 only on a CPU with native bf16 and says so in one line, and the bundle's and MONAI Label's inference get
the same choice from ``inference.json``.

Tolerances, on a feature_size-12 network with random weights (its logits are small and many voxels near-ties, the
hardest case for label agreement): int8 dynamic quantization rounds each Linear layer's input and weights to 8 bits
(about 1 % of their range), so the softmax moves by ~1e-4 on average; bf16 keeps 8 bits of mantissa (~0.4 %
relative per operation), a few times more; ONNX Runtime and OpenVINO compute in fp32 like PyTorch (1e-4, as the
export tests).
"""

from __future__ import annotations

import ctypes.util
import json
import logging
import os
import sys
from pathlib import Path

import preloaded_python
import pytest
import torch
from conftest import BTCV_BUNDLE, REPO, SMALL, configs
from monai.bundle import ConfigParser
from monai.networks.nets import SwinUNETR

from swin_unetr_kit import cpu_inference
from swin_unetr_kit.cpu_inference import CpuInference, choose_precision, choose_runtime, cpu_flags, native_bf16

MSD_BUNDLE = REPO / "bundles" / "swin_unetr_msd"
# 64^3, not the tests' SMALL_ROI: at a side of 32 the ONNX export behind both levers cannot size the bottleneck's
# instance norm (auto then falls back to PyTorch, saying so)
WINDOW = (2, 1, 64, 64, 64)
LOGGER = "swin_unetr_kit.cpu_inference"


@pytest.fixture(scope="module")
def network_and_window():
    torch.manual_seed(0)
    network = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, use_flash_attention=True).eval()
    window = torch.rand(*WINDOW)
    with torch.no_grad():
        expected = torch.softmax(network(window), 1)
    return network, window, expected


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16 avx_vnni\n\nprocessor\t: 1\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16", "avx_vnni"}
    assert cpu_flags(tmp_path / "absent") == frozenset()


@pytest.mark.parametrize(
    ("flags", "chosen"),
    [
        ({"avx2", "fma"}, "fp32"),
        ({"avx2", "avx512f", "avx512_vnni"}, "fp32"),
        ({"avx512_bf16"}, "bf16"),
        ({"amx_bf16"}, "bf16"),
    ],
)
def test_auto_picks_bf16_only_on_a_cpu_with_native_bf16(flags, chosen):
    assert native_bf16(flags) == (chosen == "bf16")
    precision, reason = choose_precision("auto", flags)
    assert precision == chosen and "cpu_precision=auto" in reason
    assert CpuInference("auto", flags=flags).precision == chosen


def test_bf16_is_refused_without_native_bf16_and_bad_settings_are_named():
    with pytest.raises(ValueError, match="native bf16"):
        CpuInference("bf16", flags={"avx2"})
    with pytest.raises(ValueError, match="cpu_precision"):
        CpuInference("fp16")
    with pytest.raises(ValueError, match="cpu_runtime"):
        CpuInference(runtime="tensorrt")
    with pytest.raises(ValueError, match="fp32 only"):
        CpuInference("int8", runtime="onnxruntime")


def test_auto_runtime_takes_the_fastest_installed_that_runs_the_precision(monkeypatch):
    installed = {"openvino", "onnxruntime"}
    monkeypatch.setattr(cpu_inference.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert choose_runtime("auto", "fp32")[0] == "openvino"
    assert choose_runtime("auto", "bf16")[0] == "openvino"
    assert choose_runtime("auto", "int8") == (
        "torch",
        "cpu_runtime=auto and neither openvino nor onnxruntime runs int8 here",
    )
    installed.remove("openvino")
    assert choose_runtime("auto", "fp32") == ("onnxruntime", "cpu_runtime=auto and onnxruntime is installed")
    assert choose_runtime("auto", "bf16")[0] == "torch"
    installed.clear()
    assert choose_runtime("auto", "fp32")[0] == "torch"
    assert choose_runtime("onnxruntime", "fp32") == ("onnxruntime", "cpu_runtime=onnxruntime")  # asked for: as asked


class _TwoInputs(torch.nn.Module):
    """A network whose forward needs a second input: no exporter can trace it from one window."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + other


def test_auto_runtime_falls_back_to_pytorch_where_the_network_does_not_export(caplog):
    pytest.importorskip("onnxruntime")
    network, window = _TwoInputs().eval(), torch.rand(1, 1, 4, 4, 4)
    with caplog.at_level(logging.INFO, logger=LOGGER), torch.no_grad():
        runner = CpuInference(runtime="auto", flags={"avx2"})(network, window.shape)
        assert runner is network
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert messages[0].startswith("CPU inference: exporting the network to")  # before the export's silence
    assert "cannot run this network" in messages[1] and messages[-1].startswith("CPU inference: fp32, PyTorch eager")
    with pytest.raises(Exception):  # noqa: B017 (the exporter's own error, whatever its type): asked for, not replaced
        CpuInference(runtime="onnxruntime")(network, window.shape)


def test_auto_on_this_machine_logs_one_line(network_and_window, caplog):
    network, window, _ = network_and_window
    inference = CpuInference("auto")
    with caplog.at_level(logging.INFO, logger=LOGGER), torch.no_grad():
        for _ in range(3):  # three volumes: one line (and one before an export)
            inference(network, WINDOW)(window[:1])
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    if inference.runtime != "torch":
        assert (
            lines.pop(0) == f"CPU inference: exporting the network to {inference._runtime_name()} (once per network)..."
        )
    assert len(lines) == 1
    assert lines[0].startswith("CPU inference: " + ("bf16" if native_bf16() else "fp32"))
    assert "cpu_precision=auto" in lines[0]


@pytest.mark.parametrize(
    ("settings", "max_mean_difference", "min_agreement"),
    [
        ({"precision": "fp32"}, 0.0, 1.0),
        ({"precision": "int8"}, 1e-3, 0.98),
        pytest.param(
            {"precision": "bf16"},
            5e-3,
            0.95,
            marks=pytest.mark.skipif(not native_bf16(), reason="no native bf16: emulated, minutes at this size"),
        ),
    ],
)
def test_each_lever_agrees_with_the_eager_network(network_and_window, settings, max_mean_difference, min_agreement):
    network, window, expected = network_and_window
    with torch.no_grad():
        runner = CpuInference(**settings)(network, WINDOW)
        output = runner(window)
    assert output.dtype == torch.float32 and output.shape == expected.shape
    probabilities = torch.softmax(output, 1)
    assert (probabilities - expected).abs().mean() <= max_mean_difference
    assert (probabilities.argmax(1) == expected.argmax(1)).float().mean() >= min_agreement
    assert all(p.dtype == torch.float32 for p in network.parameters())  # the network itself is left as it was


def test_bf16_lever_computes_in_bf16_and_returns_fp32():
    """The bf16 wrapper on any CPU (emulated where not native, hence a small layer): products rounded to bf16, the
    output back in fp32 for the blending."""
    torch.manual_seed(0)
    layer = torch.nn.Conv3d(1, 4, 3).eval()
    window = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        runner = CpuInference("bf16", flags={"avx512_bf16"})(layer, window.shape)
        output, expected = runner(window), layer(window)
    assert output.dtype == torch.float32 and not torch.equal(output, expected)
    torch.testing.assert_close(output, expected, rtol=2e-2, atol=2e-2)  # bf16 keeps 8 bits of mantissa


def test_onnxruntime_lever_matches_the_eager_network_at_any_batch(network_and_window):
    pytest.importorskip("onnxruntime")
    network, window, expected = network_and_window
    runner = CpuInference(runtime="onnxruntime")(network, WINDOW)
    assert CpuInference(runtime="onnxruntime")(network, WINDOW) is runner  # exported once per network and weights
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(runner(window), 1), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.softmax(runner(window[:1]), 1), expected[:1], rtol=1e-4, atol=1e-4)


def test_openvino_lever_matches_the_eager_network_at_any_batch(network_and_window):
    pytest.importorskip("openvino")
    network, window, expected = network_and_window
    runner = CpuInference(runtime="openvino", flags={"avx2"})(network, WINDOW)
    assert CpuInference(runtime="openvino", flags={"avx2"})(network, WINDOW) is runner  # converted once
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(runner(window), 1), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.softmax(runner(window[:1]), 1), expected[:1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="calibration"):
        CpuInference("int8", runtime="openvino")


def test_a_conversion_follows_new_weights(caplog):
    """A network trained further (or reloaded) is converted again, not served with its old weights."""
    torch.manual_seed(1)
    network = SwinUNETR(in_channels=1, out_channels=3, feature_size=12).eval()
    window = torch.rand(1, 1, 64, 64, 64)
    inference = CpuInference("int8")
    with torch.no_grad():
        first = inference(network, window.shape)
        assert inference(network, window.shape) is first
        network.out.conv.conv.bias.add_(1.0)
        second = inference(network, window.shape)
        assert second is not first
        torch.testing.assert_close(second.out.conv.conv.bias, network.out.conv.conv.bias)


def _monai_label_inference(bundle, caplog, **overrides) -> list[str]:
    """What MONAI Label's BundleInferTask does with inference.json: ``network_def`` and ``inferer`` from the config,
    then ``inferer(image, network)`` under no_grad; returns the cpu_inference log lines."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.config.update({"bundle_root": str(bundle), "roi_size": [64, 64, 64], "sw_batch_size": 1, **overrides})
    parser["network_def"]["feature_size"] = 12
    network = parser.get_parsed_content("network_def", instantiate=True).eval()
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    with caplog.at_level(logging.INFO, logger=LOGGER), torch.no_grad():
        inferer(torch.rand(1, 1, 64, 64, 64), network)
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_monai_label_gets_the_configs_choice(caplog):
    """BTCV's inference.json as MONAI Label runs it (the MSD bundle's wires ``@cpu_inference`` the same way, checked
    below, and runs through MONAI Label's path in test_monai_label.py)."""
    bundle = BTCV_BUNDLE
    default = CpuInference("auto", "auto")  # the configs' CPU default, as chosen on this machine
    assert _monai_label_inference(bundle, caplog)[-1] == default.describe()
    caplog.clear()
    lines = _monai_label_inference(bundle, caplog, cpu_precision="int8")
    assert len(lines) == 1 and lines[0].startswith("CPU inference: int8")


@pytest.mark.parametrize("bundle", [BTCV_BUNDLE, MSD_BUNDLE])
def test_every_lever_is_a_one_line_override_and_the_cpu_default_is_automatic(bundle):
    """inference.json and evaluate.json choose the precision and runtime by the machine on the CPU."""
    for files, inferer in ((["inference"], "inferer"), (["train", "evaluate"], "validate#inferer")):
        parser = ConfigParser()
        parser.read_config(configs(*files, bundle=bundle))
        assert (parser["cpu_precision"], parser["cpu_runtime"], parser["cpu_threads"]) == ("auto", "auto", 0)
        assert parser[inferer]["prepare_network"] == "@cpu_inference"


@pytest.mark.parametrize("bundle", [BTCV_BUNDLE, MSD_BUNDLE])
def test_freed_memory_is_kept_only_where_pytorch_runs_the_network(bundle):
    """glibc keeps freed memory (faster PyTorch eager, more memory) only where PyTorch runs the windows: with OpenVINO
    it added up to 1.7 GB of peak for ~3 % of speed (README, Performance); a user's true/false still decides."""
    pytest.importorskip("openvino")
    for files in (["inference"], ["train", "evaluate"]):
        for runtime, kept in (("torch", True), ("openvino", False), ("auto", False)):
            parser = ConfigParser()
            parser.read_config(configs(*files, bundle=bundle))
            parser.update({"device": "$torch.device('cpu')", "cpu_runtime": runtime})
            assert parser.get_parsed_content("cpu_keep_freed_memory") is kept, (files, runtime)
        parser.update({"cpu_keep_freed_memory": "true"})
        assert parser.get_parsed_content("cpu_keep_freed_memory") == "true"  # the flag() of initialize reads it


def _bundle_inference_command(dataset: Path, tmp_path: Path, *args: str, **env: str) -> str:
    """``python -m monai.bundle run`` of the BTCV inference from the bundle folder, as the README shows it; its log."""
    torch.manual_seed(0)
    torch.save(SwinUNETR(in_channels=1, out_channels=14, feature_size=12).state_dict(), tmp_path / "model.pt")
    overrides = {**SMALL, "ckpt_path": str(tmp_path / "model.pt"), "output_dir": str(tmp_path / "out")}
    overrides["input"] = str(dataset / "imagesTs" / "test0.nii.gz")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs("inference")[0]]
    cmd += [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
    environment = {**os.environ, **env}
    result = preloaded_python.run(cmd + list(args), timeout=600, cwd=BTCV_BUNDLE, env=environment)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "out" / "test0_seg.nii.gz").is_file()
    return result.stdout + result.stderr


def test_bundle_inference_command_logs_the_choice(synthetic_dataset, tmp_path):
    """The command with ``--cpu_precision int8``: the choice is logged once, and the path of the file written."""
    output = _bundle_inference_command(synthetic_dataset, tmp_path, "--cpu_precision", "int8")
    assert output.count("CPU inference: int8") == 1
    assert f"writing: {tmp_path / 'out' / 'test0_seg.nii.gz'}" in output


@pytest.mark.skipif(not ctypes.util.find_library("tcmalloc_minimal"), reason="libtcmalloc-minimal4 not installed")
def test_the_default_runtime_runs_under_a_preloaded_tcmalloc(synthetic_dataset, tmp_path):
    """``LD_PRELOAD=libtcmalloc_minimal.so.4 python -m monai.bundle run ...``, as the READMEs advise for the CPU, at
    the default runtime: OpenVINO's oneTBB used to abort the process there ("free(): invalid pointer")."""
    pytest.importorskip("openvino")
    env = {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}
    output = _bundle_inference_command(synthetic_dataset, tmp_path, "--cpu_runtime", "auto", **env)  # tests pin torch
    assert "OpenVINO" in next(line for line in output.splitlines() if "CPU inference: " in line)
