"""CPU inference levers for the segmentation bundles, each a one-line override of ``inference.json``/``evaluate.json``.

The bundles' sliding-window inferer hands its network to :class:`CpuInference` once per volume; on the CPU it returns
what runs the windows:

* precision ``"fp32"``: the network's own precision;
* ``"bf16"``: bfloat16 (autocast in PyTorch, the inference precision in OpenVINO). Fast only where the CPU computes
  in bf16 natively (AVX512-BF16 or AMX); elsewhere it is emulated and slower than fp32, so it is refused there;
* ``"int8"``: a copy with the Linear layers (all in the Swin transformer: attention and MLP) dynamically quantized to
  int8 (``torch.ao.quantization.quantize_dynamic``), the convolutions fp32, in PyTorch. Needs AVX2; VNNI
  (AVX512-VNNI or AVX-VNNI) makes the int8 products faster;
* ``"auto"`` (the configs' CPU default): ``"bf16"`` where the CPU has native bf16, ``"fp32"`` elsewhere;
* runtime ``"onnxruntime"``: the network exported to ONNX (traced once, batch dimension dynamic) and run by ONNX
  Runtime's CPU provider, fp32;
* runtime ``"openvino"``: the same ONNX export read by OpenVINO and compiled for its CPU plugin (its precision set
  from ``precision``, not left to OpenVINO);
* runtime ``"auto"`` (the configs' CPU default): OpenVINO where it is installed, else ONNX Runtime, else PyTorch,
  among those that run the chosen precision;
* ``threads``: intra-op threads (PyTorch's, ONNX Runtime's, OpenVINO's); 0 leaves each runtime's default.

The choice is logged in one line. On a GPU the network is returned untouched. Conversions are cached per network and
its weights' versions, so a network that is trained further is converted again rather than served stale. This sits in
the inferer, not in the config's ``network``, because MONAI Label builds ``network_def`` and the ``inferer`` from
``inference.json`` and calls ``inferer(image, network)`` itself: both paths get the same choice.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from monai.networks.utils import convert_to_onnx
from torch import nn

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "int8")
RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
AUTO_RUNTIMES = ("openvino", "onnxruntime")  # fastest first, as measured at paper size (docs/performance.md)
# the precisions each runtime runs here (OpenVINO's int8 needs calibration; ONNX Runtime is given fp32 only)
RUNS = {"torch": ("fp32", "bf16", "int8"), "onnxruntime": ("fp32",), "openvino": ("fp32", "bf16")}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

_converted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # network -> {(settings, weights): callable}


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags the (first) CPU reports in ``cpuinfo``; empty where there is no such file."""
    path = Path(cpuinfo)
    if not path.is_file():
        return frozenset()
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(flags: Iterable[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), from ``flags`` or ``/proc/cpuinfo``, or
    from PyTorch's CPU capability where the flags are unknown (not Linux)."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    if flags:
        return any(flag in flags for flag in NATIVE_BF16_FLAGS)
    return torch.backends.cpu.get_cpu_capability() == "AVX512_BF16" or "AMX" in torch.backends.cpu.get_cpu_capability()


def choose_precision(precision: str, flags: Iterable[str] | None = None) -> tuple[str, str]:
    """The precision to run for the setting ``precision`` on this CPU (or one with ``flags``), and why."""
    if precision not in PRECISIONS:
        raise ValueError(f"cpu_precision must be one of {PRECISIONS}, got {precision!r}")
    flags = cpu_flags() if flags is None else frozenset(flags)
    has_bf16 = native_bf16(flags)
    bf16_flags = [f for f in NATIVE_BF16_FLAGS if f in flags] or ["no " + "/".join(NATIVE_BF16_FLAGS)]
    if precision == "auto":
        chosen = "bf16" if has_bf16 else "fp32"
        return chosen, f"cpu_precision=auto and the CPU reports {', '.join(bf16_flags)}"
    if precision == "bf16" and not has_bf16:
        raise ValueError(
            f"cpu_precision=bf16 needs a CPU with native bf16 ({' or '.join(NATIVE_BF16_FLAGS)}); this one reports "
            "neither, so PyTorch would emulate bf16, slower than fp32: use cpu_precision=auto or fp32"
        )
    if precision == "int8":
        vnni = [f for f in VNNI_FLAGS if f in flags]
        return precision, f"cpu_precision=int8 ({'VNNI: ' + ', '.join(vnni) if vnni else 'no VNNI: AVX2 int8 path'})"
    return precision, f"cpu_precision={precision}"


def choose_runtime(runtime: str, precision: str) -> tuple[str, str]:
    """The runtime to run for the setting ``runtime`` at the chosen ``precision``, and why: ``"auto"`` takes the
    first of OpenVINO and ONNX Runtime that is installed and runs ``precision`` (ONNX Runtime: fp32 only; int8 is
    PyTorch's dynamic quantization), else PyTorch."""
    if runtime not in RUNTIMES:
        raise ValueError(f"cpu_runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime != "auto":
        if precision not in RUNS[runtime]:
            calibration = " (its int8 needs calibration)" if runtime == "openvino" else ""
            runs = " or ".join(RUNS[runtime])
            raise ValueError(f"cpu_runtime={runtime} runs {runs} only{calibration}; got cpu_precision={precision}")
        return runtime, f"cpu_runtime={runtime}"
    for candidate in AUTO_RUNTIMES:
        if precision in RUNS[candidate] and importlib.util.find_spec(candidate) is not None:
            return candidate, f"cpu_runtime=auto and {candidate} is installed"
    return "torch", f"cpu_runtime=auto and neither {' nor '.join(AUTO_RUNTIMES)} runs {precision} here"


def _weights_version(network: nn.Module) -> tuple:
    """Identifies the network's current weights: in-place updates (optimiser steps, ``load_state_dict``) bump each
    tensor's version counter."""
    return tuple((t.data_ptr(), t._version) for t in (*network.parameters(), *network.buffers()))


class _Autocast(nn.Module):
    """``network`` under CPU autocast to ``dtype``, its output back in fp32."""

    def __init__(self, network: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.network, self.dtype = network, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=self.dtype):
            return self.network(x).float()


def onnx_model(network: nn.Module, example: torch.Tensor) -> bytes:
    """``network`` exported to ONNX by MONAI's ``convert_to_onnx``, traced on ``example`` with the batch dimension
    dynamic (the TorchScript-based exporter, as the bundles' ``onnx_export`` uses)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes traced as constants: the window's
        warnings.filterwarnings("ignore", message=".*instance_norm.*")
        model = convert_to_onnx(
            network.eval(),
            [example],
            input_names=["image"],
            output_names=["pred"],
            dynamic_axes={"image": {0: "batch"}, "pred": {0: "batch"}},
            dynamo=False,
        )
    return model.SerializeToString()


class OnnxRuntimeNetwork:
    """``network`` exported to ONNX (:func:`onnx_model`) and run by ONNX Runtime's CPU execution provider with
    ``threads`` intra-op threads (0: its default)."""

    def __init__(self, network: nn.Module, example: torch.Tensor, threads: int = 0) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(
            onnx_model(network, example), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (output,) = self.session.run(None, {"image": x.detach().cpu().float().contiguous().numpy()})
        return torch.from_numpy(output).to(x.device)


def _load_tbb_without_deep_binding() -> None:
    """Lets OpenVINO run beside a preloaded malloc (tcmalloc, as the READMEs advise, or jemalloc). oneTBB, OpenVINO's
    threading, loads its hwloc binding with ``RTLD_DEEPBIND``: hwloc then frees with glibc's ``free`` what the
    preloaded ``malloc`` gave, and the process aborts ("free(): invalid pointer", oneTBB issue 1636).
    ``TBB_ENABLE_SANITIZERS=1``, read when oneTBB loads that binding, drops the deep binding; a value the user set
    stays."""
    if os.environ.get("LD_PRELOAD"):
        os.environ.setdefault("TBB_ENABLE_SANITIZERS", "1")


class OpenVinoNetwork:
    """``network`` exported to ONNX (:func:`onnx_model`: its batch dimension stays dynamic, which OpenVINO's own
    tracing of the Swin window partition does not keep), read by OpenVINO and compiled for its CPU plugin in
    ``precision`` (``"fp32"`` or ``"bf16"``) with ``threads`` inference threads (0: its default)."""

    def __init__(self, network: nn.Module, example: torch.Tensor, threads: int = 0, precision: str = "fp32") -> None:
        _load_tbb_without_deep_binding()
        import openvino

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "network.onnx"
            path.write_bytes(onnx_model(network, example))
            core = openvino.Core()
            model = core.read_model(str(path))
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(model, "CPU", config)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the windows of ``x`` one at a time: as fast as a batch here, at less than half the peak memory
        (a batch of four 96^3 windows at feature_size 48: 4.8 GB against 11.2 GB, docs/performance.md)."""
        windows = x.detach().cpu().float().contiguous().numpy()
        outputs = [torch.from_numpy(self.compiled(windows[i : i + 1])[0]) for i in range(len(windows))]
        return torch.cat(outputs).to(x.device)


class CpuInference:
    """Turns a network into what runs inference windows on the CPU, according to the bundle's settings.

    Args:
        precision: ``"fp32"``, ``"bf16"``, ``"int8"`` or ``"auto"`` (see the module's description).
        runtime: ``"torch"``, ``"onnxruntime"`` (fp32 only), ``"openvino"`` (fp32, or bf16 on native-bf16 CPUs) or
            ``"auto"`` (:func:`choose_runtime`).
        threads: intra-op threads for the run; 0 leaves PyTorch's setting.
        flags: the CPU's flags, for tests; ``None`` reads ``/proc/cpuinfo``.
    """

    def __init__(
        self, precision: str = "fp32", runtime: str = "torch", threads: int = 0, flags: Iterable[str] | None = None
    ) -> None:
        self.precision, precision_reason = choose_precision(precision, flags)
        self.runtime_chosen_automatically = runtime == "auto"
        runtime, runtime_reason = choose_runtime(runtime, self.precision)
        self.reason = f"{precision_reason}; {runtime_reason}"
        if threads < 0:
            raise ValueError(f"cpu_threads must be 0 (as it is) or more, got {threads}")
        self.runtime, self.threads = runtime, int(threads)

    def describe(self) -> str:
        """The one-line account of what runs and why."""
        what = {"fp32": "fp32", "bf16": "bf16", "int8": "int8 dynamic quantization of the Linear layers"}
        threads = self.threads or torch.get_num_threads()
        return f"CPU inference: {what[self.precision]}, {self._runtime_name()}, {threads} thread(s) ({self.reason})"

    def _runtime_name(self) -> str:
        return {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}.get(self.runtime, "PyTorch eager")

    def __call__(self, network: nn.Module, window_shape: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        """What runs windows of ``window_shape`` (batch, channels, spatial...) for ``network``: the network itself
        off the CPU, else its conversion (made, and logged, once per network and weights)."""
        if next(network.parameters()).device.type != "cpu":
            return network
        if self.threads:
            torch.set_num_threads(self.threads)
        key = (self.precision, self.runtime, self.threads, tuple(window_shape[1:]), _weights_version(network))
        cache = _converted.setdefault(network, {})
        if key not in cache:
            cache.clear()  # older weights or settings: drop their conversions
            if self.runtime != "torch":  # said before the export's silent half minute (paper size, docs/performance.md)
                logger.info(f"CPU inference: exporting the network to {self._runtime_name()} (once per network)...")
            try:
                cache[key] = self._convert(network, window_shape)
            except Exception as error:  # a network the exporter cannot trace: PyTorch runs it, if the user allowed
                if not self.runtime_chosen_automatically:
                    raise
                logger.warning(f"cpu_runtime=auto: {self.runtime} cannot run this network ({error}); PyTorch runs it")
                self.runtime, self.reason = "torch", f"{self.reason}, which cannot run this network"
                return self(network, window_shape)
            logger.info(self.describe())
        converted = cache[key]
        if self.precision == "bf16" and self.runtime == "torch":
            return _Autocast(network, torch.bfloat16)
        return network if converted is None else converted

    def _convert(self, network: nn.Module, window_shape: Sequence[int]) -> Callable | None:
        """The converted network, or None where the network runs as it is (fp32, bf16: nothing to convert; the
        cache then holds no reference to the network, so it can be freed)."""
        one_window = torch.zeros(1, *window_shape[1:])  # the exporters trace one window (the batch stays dynamic):
        if self.runtime == "onnxruntime":  # tracing a whole batch takes its activations' memory, 10 GB at paper size
            return OnnxRuntimeNetwork(network, one_window, self.threads)
        if self.runtime == "openvino":
            return OpenVinoNetwork(network, one_window, self.threads, self.precision)
        if self.precision == "int8":
            quantized = copy.deepcopy(network).eval()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*deprecated.*")  # torch.ao.quantization's notice
                return torch.ao.quantization.quantize_dynamic(quantized, {nn.Linear}, dtype=torch.qint8, inplace=True)
        return None
