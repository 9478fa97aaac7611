"""Speed and memory of the BTCV bundle against the reference configuration, measured side by side in one run.

All pipelines are the same bundle configs run through MONAI's ``ConfigWorkflow``; they differ only in settings:

* reference: the model zoo's Swin UNETR BTCV bundle's values: fp32, sliding window with sw_batch_size 4, overlap 0.5
  and constant blending, attention without SDPA; training batches of 2 volumes x 2 crops from a plain dataset (no
  caching); glibc's malloc as it comes;
* ours: the bundle's defaults: SDPA attention at inference, on the CPU the inference path that ``cpu_runtime`` and
  ``cpu_precision`` ``auto`` choose (OpenVINO where installed; ``swin_unetr_kit.cpu_inference``), Gaussian blending,
  1 volume x 4 crops from a ``CacheDataset``, AMP on CUDA and, on the CPU, glibc keeping freed memory
  (``swin_unetr_kit.runtime``);
* ours, malloc as it comes (CPU): ours without the allocator setting, to separate its effect from the others';
* ours + tcmalloc (CPU, where ``libtcmalloc_minimal.so.4`` is installed): ours with tcmalloc preloaded;
* ours, reference blending (inference only): ours with constant blending, to show what the speed levers alone do to
  the label map (the blending is a choice of accuracy, not of speed);
* ours (+ tcmalloc on the CPU), checkpointing (training only): with gradient checkpointing, the user's trade of
  speed for memory;
* on a GPU, each GPU lever changed on its own from ours: no AMP (fp32), TF32 matmuls instead of AMP, AMP in bf16,
  no SDPA, channels-last memory, ``torch.compile``, the training data cached on the GPU, a larger sliding-window batch.

Inference runs on two inputs: the real sample torso CT (resampled by the pipeline to the size's spacing) and a
512 x 512 x 150 volume at a native CT spacing made from it (the size of a BTCV scan as stored). Every measurement
runs in a fresh process (clean peak memory, the allocator chosen before Python starts), on the same input and the
same network weights, and reports wall time, peak memory and FLOP/s (the network's FLOPs counted with PyTorch's
FlopCounterMode, recomputation by checkpointing not counted; peak = a dense matmul measured on the same device);
inference also the Dice agreement of the label maps with the reference's. Timings on a shared CPU vary from run to
run: compare the ratios of one run.

Usage:
    python tools/benchmark.py                   # small configuration (feature_size 12, 64^3) on this machine
    python tools/benchmark.py --size paper      # feature_size 48, 96^3 (the paper's; slow on a CPU)
    python tools/benchmark.py --out benchmark.json --iterations 6
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import fire
import torch

from swin_unetr_kit.runtime import tcmalloc_env

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "swin_unetr_btcv_seg"
SIZES = {
    "small": {"network_def#feature_size": 12, "roi_size": [64, 64, 64], "pixdim": [3.0, 3.0, 3.0]},
    "paper": {"network_def#feature_size": 48, "roi_size": [96, 96, 96], "pixdim": [1.5, 1.5, 2.0]},
}
NATIVE_SHAPE = (512, 512, 150)
REFERENCE = {
    "infer": {
        "sw_batch_size": 4,
        "sw_overlap": 0.5,
        "inferer#mode": "constant",
        "cpu_precision": "fp32",
        "cpu_runtime": "torch",
        "amp": False,
        "network_def#use_flash_attention": False,
        "cpu_keep_freed_memory": False,
    },
    "train": {"batch_size": 2, "num_samples": 2, "cache_rate": 0.0, "amp": False, "cpu_keep_freed_memory": False},
}
OURS: dict = {"infer": {}, "train": {}}  # the bundle's defaults
# what --size paper runs unless asked for more: the reference and the bundle's defaults (each a volume of ten
# minutes or so in fp32 on 2 CPU cores); the levers one at a time: ``levers``, or --pipelines all
PAPER_PIPELINES = ("ours", "ours, reference blending")
MALLOC_AS_IT_COMES = {"infer": {"cpu_keep_freed_memory": False}, "train": {"cpu_keep_freed_memory": False}}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _kernel_share(before: resource.struct_rusage, after: resource.struct_rusage) -> dict:
    """Where the CPU time between two ``getrusage`` readings went: the kernel's share (mostly handing out and zeroing
    fresh memory pages) and the minor page faults taken."""
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"kernel_time_share": system / (user + system), "minor_page_faults": after.ru_minflt - before.ru_minflt}


def _gpu_peak_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _gpu_math() -> dict:
    """How the GPU's float32 matmuls ran (TF32 or full fp32): the ``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE`` lever's
    effect, read back."""
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32} if torch.cuda.is_available() else {}


# settings the workers apply themselves (not config ids): what a user does to the network or the data in a line of
# Python, measured without adding a switch to the bundle for it
CHANNELS_LAST = "benchmark:channels_last"  # network weights in channels-last-3d memory order
DATA_ON_GPU = "benchmark:data_on_gpu"  # the deterministic transforms' output moved to the device, so cached there


def _initialized_workflow(config: str, workflow_type: str, settings: dict):
    """A ``ConfigWorkflow`` of the bundle's ``config`` with ``settings``, initialized, the worker-side levers
    applied."""
    from monai.bundle import ConfigWorkflow

    settings = dict(settings)
    channels_last, data_on_gpu = settings.pop(CHANNELS_LAST, False), settings.pop(DATA_ON_GPU, False)
    workflow = ConfigWorkflow(config_file=str(BUNDLE / "configs" / config), workflow_type=workflow_type, **settings)
    if data_on_gpu:  # CacheDataset then caches on the GPU and the random crops run there, in the main process
        to_device = {"_target_": "ToDeviced", "keys": ["image", "label"], "device": "@device"}
        workflow.parser["deterministic_transforms"] = [*workflow.parser["deterministic_transforms"], to_device]
    workflow.initialize()
    workflow.parser.get_parsed_content("setup")  # the bundle's seed and allocator, before its components
    if channels_last:
        workflow.parser.get_parsed_content("network").to(memory_format=torch.channels_last_3d)  # in place
    return workflow


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def infer_worker(overrides_file: str, softmax_file: str | None = None) -> None:
    """(child process) Run the inference workflow once; print its time (the whole volume, and the part spent in the
    network), windows run and peak memory as JSON, and save the softmax of the (one) volume to ``softmax_file``
    (float16 .npy; the saving is not timed)."""
    import numpy as np

    settings = json.loads(Path(overrides_file).read_text())
    workflow = _initialized_workflow("inference.json", "infer", settings)
    evaluator = workflow.parser.get_parsed_content("evaluator")
    inferer, windows, in_network, saving = evaluator.inferer, [], [], []
    prepare = inferer.prepare_network  # what runs the windows may be a conversion of the network: count its calls

    def counted(network: torch.nn.Module, window_shape: Sequence[int]):
        run = prepare(network, window_shape) if prepare else network

        def timed(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            _synchronize()  # on a GPU the window's kernels run asynchronously: time them, not their launch
            start = time.perf_counter()
            output = run(x, *args, **kwargs)
            _synchronize()
            windows.append(x.shape[0])
            in_network.append(time.perf_counter() - start)
            return output

        return timed

    def saved(inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        output = inferer(inputs, network, *args, **kwargs)
        if softmax_file:
            start = time.perf_counter()
            np.save(softmax_file, torch.softmax(torch.as_tensor(output).float(), 1).half().cpu().numpy())
            saving.append(time.perf_counter() - start)
        return output

    inferer.prepare_network, evaluator.inferer = counted, saved
    usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    workflow.run()
    seconds = time.perf_counter() - start - sum(saving)
    kernel = _kernel_share(usage, resource.getrusage(resource.RUSAGE_SELF))
    workflow.finalize()
    result = {"seconds": seconds, "network_seconds": sum(in_network), "windows": sum(windows)}
    result.update({"peak_rss_mb": _peak_rss_mb(), "peak_gpu_mb": _gpu_peak_mb(), **_gpu_math()})
    print(json.dumps({**result, **kernel}))


def train_worker(overrides_file: str, iterations: int, warmup: int) -> None:
    """(child process) Train for ``iterations`` iterations; print the steady-state time per iteration (after
    ``warmup``), the share of it spent waiting for data, and peak memory as JSON."""
    from ignite.engine import Events

    settings = json.loads(Path(overrides_file).read_text())
    settings.update({"train#trainer#max_epochs": 1, "train#trainer#epoch_length": iterations, "val_interval": 10**6})
    workflow = _initialized_workflow("train.json", "train", settings)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    marks: dict[str, list[float]] = {"start": [], "batch": [], "end": []}
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: marks["batch"].append(time.perf_counter()))
    trainer.add_event_handler(Events.GET_BATCH_STARTED, lambda _: marks["start"].append(time.perf_counter()))
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda _: _synchronize() or marks["end"].append(time.perf_counter())
    )
    usage = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(once=warmup), lambda _: usage.update(warm=resource.getrusage(resource.RUSAGE_SELF))
    )
    workflow.run()
    usage["end"] = resource.getrusage(resource.RUSAGE_SELF)
    workflow.finalize()
    steady = range(warmup, len(marks["end"]))
    seconds = (marks["end"][-1] - marks["end"][warmup - 1]) / len(steady)
    waiting = sum(marks["batch"][i] - marks["start"][i] for i in steady) / len(steady)
    volumes, crops_per_volume = (workflow.parser.get_parsed_content(key) for key in ("batch_size", "num_samples"))
    result = {
        "seconds_per_iteration": seconds,
        "volumes_per_second": volumes / seconds,
        "crops_per_second": volumes * crops_per_volume / seconds,
        "crops_per_iteration": volumes * crops_per_volume,
        "data_share": waiting / seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_gpu_mb": _gpu_peak_mb(),
        **_gpu_math(),
    }
    kernel = _kernel_share(usage["warm"], usage["end"])
    kernel["minor_page_faults"] /= len(steady)  # per iteration
    print(json.dumps({**result, **kernel}))


def _child(env: dict, worker: str, overrides: dict, *args: str, timeout: float | None = None) -> dict:
    """Run ``worker`` with ``overrides`` (passed in a file) in a fresh process with the extra environment ``env``;
    its JSON result, or ``{"failed": why}`` (a pipeline that breaks or outlasts ``timeout`` seconds is reported in the
    table, and the others still run)."""
    overrides_file = Path(overrides["bundle_root"]) / f"{worker}_overrides.json"
    overrides_file.parent.mkdir(parents=True, exist_ok=True)
    overrides_file.write_text(json.dumps(overrides))
    cmd = [sys.executable, str(Path(__file__).resolve()), worker, str(overrides_file), *args]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env={**clean, **env}, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"stopped after {timeout:.0f} s"}
    if result.returncode != 0:
        killed = " (killed by SIGKILL: out of memory?)" if result.returncode == -9 else ""
        print(f"{worker} {overrides_file} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}", file=sys.stderr)
        errors = [line for line in result.stderr.splitlines() if re.match(r"[\w.]+(Error|Exception)\b", line)]
        return {"failed": f"exit {result.returncode}{killed}: {(errors or [''])[-1][:300]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _dice_agreement(a: Path, b: Path) -> float:
    """Mean over labels present in either map of the Dice between two label maps."""
    import nibabel as nib
    import numpy as np

    x, y = np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj)
    scores = [
        2 * np.sum((x == v) & (y == v)) / (np.sum(x == v) + np.sum(y == v))
        for v in np.union1d(np.unique(x), np.unique(y))
        if v != 0
    ]
    return float(np.mean(scores)) if scores else 1.0


def native_resolution_ct(source: Path, out: Path, shape: tuple[int, int, int] = NATIVE_SHAPE) -> Path:
    """Write ``source`` resampled (trilinear) to ``shape`` voxels over the same field of view, as int16 HU: the
    sample CT at the matrix size of a clinical scan (512 x 512 in-plane)."""
    import nibabel as nib
    import numpy as np

    image = nib.load(source)
    volume = torch.as_tensor(np.asarray(image.dataobj, dtype=np.float32))[None, None]
    resized = torch.nn.functional.interpolate(volume, size=shape, mode="trilinear", align_corners=False)[0, 0]
    scale = np.array(image.shape[:3]) / np.array(shape)  # old voxels per new voxel, per axis
    index_map = np.eye(4)  # new voxel centre -> old voxel coordinates
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = (scale - 1) / 2
    nib.save(nib.Nifti1Image(resized.round().numpy().astype(np.int16), image.affine @ index_map), out)
    return out


def network_flops(network: torch.nn.Module, window: Sequence[int]) -> dict:
    """FLOPs of ``network`` for one window of shape ``window`` (channels first): inference forward, training
    forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, *window, device=next(network.parameters()).device)
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        network.eval()(x)
    with FlopCounterMode(display=False) as training:
        network.train()(x).sum().backward()
    network.zero_grad(set_to_none=True)
    return {"forward": forward.get_total_flops(), "training": training.get_total_flops()}


def matmul_peak_flops(device: str, dtype: str = "float32", repeats: int = 10) -> float:
    """FLOP/s of a dense square matmul on ``device``: the practical peak the network's FLOP/s is compared with."""
    n = 8192 if device == "cuda" else 2048  # large enough to saturate each
    a = torch.rand(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.rand(n, n, device=device, dtype=getattr(torch, dtype))
    a @ b  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def levers(
    size: str = "paper",
    repeats: int = 3,
    batch: int = 1,
    ckpt: str | None = None,
    out: str | None = None,
    only: str | Sequence[str] | None = None,
) -> None:
    """Time each CPU inference lever on the same window(s) in ONE process, the levers interleaved (every round runs
    each once), so that other load on a shared machine slows all of them alike: ratios to the reference's time, not
    absolute speeds. Agreement is with the reference's output on the same window (random weights unless ``ckpt``).
    ``only``: the levers to time (comma-separated names; the reference always runs)."""
    from monai.networks.nets import SwinUNETR

    from swin_unetr_kit.cpu_inference import CpuInference, native_bf16

    feature_size, roi = SIZES[size]["network_def#feature_size"], SIZES[size]["roi_size"]
    torch.manual_seed(0)
    reference = SwinUNETR(in_channels=1, out_channels=14, feature_size=feature_size).eval()
    if ckpt:
        reference.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    sdpa = SwinUNETR(in_channels=1, out_channels=14, feature_size=feature_size, use_flash_attention=True).eval()
    sdpa.load_state_dict(reference.state_dict())
    window = torch.rand(batch, 1, *roi)
    shape, threads = tuple(window.shape), torch.get_num_threads()
    variants: dict[str, tuple] = {  # name -> (network, settings of CpuInference, threads)
        "reference (fp32, no SDPA)": (reference, {}, threads),
        "SDPA": (sdpa, {}, threads),
        "SDPA + int8": (sdpa, {"precision": "int8"}, threads),
        "ONNX Runtime": (sdpa, {"runtime": "onnxruntime"}, threads),
        "OpenVINO": (sdpa, {"runtime": "openvino"}, threads),
    }
    if native_bf16():
        variants["SDPA + bf16"] = (sdpa, {"precision": "bf16"}, threads)
    if threads > 1:
        variants["SDPA, 1 thread"] = (sdpa, {}, 1)
    if only:
        wanted = {"reference (fp32, no SDPA)", *(_names(only) if isinstance(only, str) else only)}
        variants = {name: variant for name, variant in variants.items() if name in wanted}
    runners, setup = {}, {}
    with torch.no_grad():
        for name, (network, settings, _) in variants.items():
            start = time.perf_counter()
            runners[name] = CpuInference(**settings)(network, shape)
            setup[name] = time.perf_counter() - start
            print(f"{name}: ready in {setup[name]:.1f} s", file=sys.stderr, flush=True)
        times: dict[str, list[float]] = {name: [] for name in variants}
        outputs, names = {}, list(variants)
        for round_ in range(repeats + 1):  # round 0 warms up each; the order rotates so none always runs first
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                torch.set_num_threads(variants[name][2])
                start = time.perf_counter()
                outputs[name] = runners[name](window).float()
                if round_:
                    times[name].append(time.perf_counter() - start)
                print(f"round {round_}, {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
                torch.set_num_threads(threads)
    expected = torch.softmax(outputs["reference (fp32, no SDPA)"], 1)
    ref_seconds = min(times["reference (fp32, no SDPA)"])
    results = {
        "contended": "one process, levers interleaved; other load slows all alike: compare ratios only",
        "size": size,
        "window": list(shape),
        "threads": threads,
        "native_bf16": native_bf16(),
        "bf16": "measured" if native_bf16() else "not applicable: the CPU has no native bf16 (avx512_bf16/amx_bf16)",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "levers": {},
    }
    for name in variants:
        probabilities = torch.softmax(outputs[name], 1)
        results["levers"][name] = {
            "seconds_per_window": [t / batch for t in times[name]],
            "speed_vs_reference": ref_seconds / min(times[name]),
            "setup_seconds": setup[name],
            "label_agreement": (probabilities.argmax(1) == expected.argmax(1)).float().mean().item(),
            "softmax_mean_abs_difference": (probabilities - expected).abs().mean().item(),
        }
    print(json.dumps(results, indent=2))
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")


def _names(text: str) -> list[str]:
    """The names in a comma-separated list of pipeline or lever names, which have commas of their own, each followed
    by a space (``"ours,ours, reference blending"``: two names)."""
    return re.split(r",(?! )", text)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text)


def _inference_levers(device: str) -> dict[str, tuple[dict, dict] | str]:
    """The CPU inference levers (``swin_unetr_kit.cpu_inference``, the window overlap, threads, sliding-window batch),
    each changed on its own from the bundle's defaults (which combine the fastest): name -> (settings, environment), or
    the reason it does not apply on this machine."""
    from swin_unetr_kit.cpu_inference import native_bf16

    if device != "cpu":
        return {}
    no_bf16 = "not applicable: the CPU has no native bf16 (avx512_bf16/amx_bf16), PyTorch would emulate it"
    levers: dict[str, tuple[dict, dict] | str] = {
        "ours + bf16": ({"cpu_precision": "bf16"}, {}) if native_bf16() else no_bf16,
        "ours, int8 in PyTorch": ({"cpu_precision": "int8"}, {}),
        "ours, ONNX Runtime": ({"cpu_runtime": "onnxruntime"}, {}),
        "ours in PyTorch": ({"cpu_runtime": "torch"}, {}),
        "ours, overlap 0.25": ({"sw_overlap": 0.25}, {}),
        "ours, sw_batch_size 1": ({"sw_batch_size": 1}, {}),
        "ours, sw_batch_size 8": ({"sw_batch_size": 8}, {}),
    }
    logical = os.cpu_count() or 1
    if logical != torch.get_num_threads():  # PyTorch defaults to the physical cores: try the logical CPUs too
        levers[f"ours, {logical} threads"] = ({"cpu_threads": logical}, {})
    return levers


def _gpu_levers() -> dict[str, tuple[dict, dict]]:
    """The GPU levers, each changed on its own from the bundle's defaults (AMP fp16, SDPA, the data cached in host
    memory and loaded by 4 workers): name -> (settings of the inference and/or the training run, environment)."""
    tf32 = {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}  # PyTorch's switch for TF32 in cuBLAS (cuDNN uses it already)
    return {
        "ours, no AMP (fp32)": ({"infer": {"amp": False}, "train": {"amp": False}}, {}),
        "ours, TF32 instead of AMP": ({"infer": {"amp": False}, "train": {"amp": False}}, tf32),
        "ours, AMP in bf16": ({"infer": {"amp_dtype": "bfloat16"}, "train": {"amp_dtype": "bfloat16"}}, {}),
        "ours, no SDPA": (
            {"infer": {"network_def#use_flash_attention": False}, "train": {"network_def#use_flash_attention": False}},
            {},
        ),
        "ours, channels-last": ({"infer": {CHANNELS_LAST: True}, "train": {CHANNELS_LAST: True}}, {}),
        "ours, data cached on the GPU": ({"train": {DATA_ON_GPU: True, "train#dataloader#num_workers": 0}}, {}),
        "ours, sw_batch_size 16": ({"infer": {"sw_batch_size": 16}}, {}),
        # last: compiling takes minutes, and a volume's windows include a smaller last batch (a second compilation)
        "ours, torch.compile": ({"infer": {"evaluator#compile": True}, "train": {"train#trainer#compile": True}}, {}),
    }


def _pipelines(device: str) -> dict[str, tuple[dict, dict] | str]:
    """name -> (settings of the inference and/or the training run, environment), or why it does not apply here."""
    fast_malloc = tcmalloc_env() if device == "cpu" else {}
    pipelines: dict[str, tuple[dict, dict] | str] = {"reference": (REFERENCE, {}), "ours": (OURS, {})}
    if device == "cpu":
        pipelines["ours, malloc as it comes"] = (MALLOC_AS_IT_COMES, {})
        if fast_malloc:
            pipelines["ours + tcmalloc"] = (OURS, fast_malloc)
    pipelines["ours, reference blending"] = ({"infer": {"inferer#mode": "constant"}}, {})
    for name, lever in _inference_levers(device).items():
        pipelines[name] = lever if isinstance(lever, str) else ({"infer": lever[0]}, lever[1])
    checkpointing = "ours + tcmalloc, checkpointing" if fast_malloc else "ours, checkpointing"
    pipelines[checkpointing] = ({"train": {"network_def#use_checkpoint": True}}, fast_malloc)
    if device == "cuda":
        pipelines.update(_gpu_levers())
    return pipelines


def int8_linear_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a dynamically quantized int8 Linear layer on an n x n input: the practical peak of the int8 lever."""
    layer = torch.ao.nn.quantized.dynamic.Linear(n, n, dtype=torch.qint8)
    x = torch.rand(n, n)
    layer(x)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        layer(x)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def _peaks(device: str) -> dict[str, float]:
    """The practical peak FLOP/s per compute dtype the pipelines use on ``device``."""
    from swin_unetr_kit.cpu_inference import native_bf16

    if device == "cuda":
        peaks = {dtype: matmul_peak_flops(device, dtype) for dtype in ("float32", "float16", "bfloat16")}
        tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, True
        peaks["tf32"] = matmul_peak_flops(device)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        return peaks
    peaks = {"float32": matmul_peak_flops(device), "int8": int8_linear_peak_flops()}
    if native_bf16():
        peaks["bfloat16"] = matmul_peak_flops(device, "bfloat16")
    return peaks


def _compute_dtype(settings: dict, device: str, env: dict | None = None) -> str:
    from swin_unetr_kit.cpu_inference import choose_precision

    precision = choose_precision(settings.get("cpu_precision", "auto"))[0]  # the configs' default: auto
    if device == "cuda":
        if settings.get("amp") is False:
            return "tf32" if (env or {}).get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE") == "1" else "float32"
        return settings.get("amp_dtype", "float16")
    return {"bf16": "bfloat16", "int8": "int8"}.get(precision, "float32")


def _softmax_agreement(reference: Path, other: Path, chunk: int = 1) -> dict:
    """Mean absolute difference of two saved softmax outputs (channels first), and the reference's mean confidence
    (its top probability averaged over voxels: near 1 for confident weights, near 1/classes for random ones)."""
    import numpy as np

    a, b = np.load(reference, mmap_mode="r"), np.load(other, mmap_mode="r")
    if a.shape != b.shape:
        return {"softmax_mean_abs_difference": None}
    total = sum(float(np.abs(a[i].astype(np.float32) - b[i].astype(np.float32)).sum()) for i in range(a.shape[0]))
    confidence = float(np.mean(np.max(a[0], axis=0), dtype=np.float64))
    return {"softmax_mean_abs_difference": total / a.size, "reference_confidence": confidence}


def default_weights(size: str) -> Path:
    """Where ``make_weights`` keeps the fine-tuned network of ``size`` (outside git), and the benchmark looks for it."""
    import sample_data

    return sample_data.cache_dir() / "benchmark" / f"{size}_finetuned.pt"


def make_weights(
    size: str = "paper",
    iterations: int = 60,
    learning_rate: float = 2e-3,
    crop: int = 64,
    out: str | None = None,
    dataset_dir: str | None = None,
) -> None:
    """Fine-tune the network of ``size`` briefly on the sample CT with the bundle's train.json, from its random
    initialisation, and save its weights to ``out`` (default: :func:`default_weights`): weights whose predictions are
    confident, so that the benchmark's agreement figures mean something (random weights give near-ties everywhere).
    Trains on one ``crop``^3 crop a step at the size's spacing (a paper-size step on 96^3 windows takes about half a
    minute on 2 CPU cores; the network is the same at any window). Not a model to segment with: it has seen one
    volume."""
    import sample_data
    from monai.bundle import ConfigWorkflow

    dataset_dir = dataset_dir or sample_data.prepare()
    target = Path(out) if out else default_weights(size)
    # the run's folder (datalist, checkpoints, logs) is scratch: only the weights below are kept
    with tempfile.TemporaryDirectory(prefix="swin_unetr_weights_") as scratch:
        work = Path(scratch)
        torso = Path(dataset_dir) / "imagesTr" / "ts_torso.nii.gz"
        datalist = work / "datalist.json"
        case = {"image": str(torso), "label": str(torso).replace("imagesTr", "labelsTr")}
        datalist.write_text(json.dumps({"training": [case], "validation": [case]}))
        overrides = {**SIZES[size], "num_workers": 0, "dataset_dir": dataset_dir, "datalist": str(datalist)}
        overrides.update({"bundle_root": str(work), "check_data": False, "resume": False, "val_interval": 10**6})
        overrides["allow_datalist_overlap"] = True  # the one sample CT is both parts: weights to time, not to validate
        overrides.update({"learning_rate": learning_rate, "train#trainer#max_epochs": 1, "warmup_epochs": 0})
        overrides.update({"roi_size": [crop] * 3, "num_samples": 1})
        overrides["train#trainer#epoch_length"] = iterations
        torch.manual_seed(0)
        workflow = ConfigWorkflow(
            config_file=str(BUNDLE / "configs" / "train.json"), workflow_type="train", **overrides
        )
        workflow.initialize()
        workflow.run()
        network = workflow.parser.get_parsed_content("network")
        workflow.finalize()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    torch.save(network.state_dict(), partial)
    partial.replace(target)  # atomic: a run that stops leaves no half-written weights
    print(f"fine-tuned {size} weights ({iterations} iterations on the sample CT): {target}")


def main(
    size: str = "small",
    workflow: str = "all",
    iterations: int = 6,
    warmup: int = 2,
    out: str | None = None,
    ckpt: str | None = None,
    dataset_dir: str | None = None,
    pipelines: str | Sequence[str] | None = None,
    train_overrides: dict | None = None,
    pipeline_timeout: float = 3600.0,
    inputs: str | Sequence[str] = ("sample", "native"),
) -> None:
    """Benchmark inference and/or training (``workflow``: inference, training or all) of the pipelines (the
    comma-separated names in ``pipelines``, no space after the separating commas, or ``all``; default: all at the
    small size, PAPER_PIPELINES at paper size; the reference always runs); print a table, write JSON to ``out``.

    ``train_overrides``: settings applied to every training pipeline, the reference's too (e.g. ``{"batch_size": 1,
    "num_samples": 1}`` where the reference's batch of 2 volumes x 2 crops does not fit in memory: at paper size it
    needs more than 24 GB on a CPU).

    The network's weights: ``ckpt``, else those of ``make_weights`` for ``size`` where they exist, else seeded random
    weights (agreement figures then mean little; the results say which).

    ``inputs``: the inference inputs, ``sample`` (the sample CT) and/or ``native`` (it at 512 x 512 x 150).

    Each pipeline runs in a fresh process, stopped after ``pipeline_timeout`` seconds; one that fails or is stopped is
    reported as such and the others still run. ``out`` is rewritten after every pipeline, so a benchmark that is cut
    short keeps what it measured."""
    import sample_data
    from monai.bundle import ConfigWorkflow

    from swin_unetr_kit.cpu_inference import cpu_flags, native_bf16

    if workflow not in ("inference", "training", "all"):
        raise ValueError(f"workflow must be inference, training or all, got {workflow!r}")
    wanted_inputs = inputs.split(",") if isinstance(inputs, str) else list(inputs)
    if not wanted_inputs or set(wanted_inputs) - {"sample", "native"}:
        raise ValueError(f"inputs must name sample and/or native, got {inputs!r}")
    began = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = {**SIZES[size]}
    if device == "cpu":  # data workers would compete with the network for the few cores; a GPU host has them to spare
        base["num_workers"] = 0
    dataset_dir = dataset_dir or sample_data.prepare()
    work = Path(tempfile.mkdtemp(prefix="swin_unetr_benchmark_"))
    torch.manual_seed(0)
    config = str(BUNDLE / "configs" / "inference.json")
    parser = ConfigWorkflow(config_file=config, workflow_type="infer", **base).parser
    network = parser.get_parsed_content("network_def")
    if ckpt is None and default_weights(size).is_file():
        ckpt = str(default_weights(size))
    weights = ckpt or "seeded random (run make_weights for confident ones)"
    if ckpt is None:  # the same seeded random weights for every pipeline
        ckpt = str(work / "weights.pt")
        torch.save(network.state_dict(), ckpt)
    else:
        network.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    flops = network_flops(network.to(device), [parser["in_channels"], *parser["roi_size"]])
    torso = Path(dataset_dir) / "imagesTr" / "ts_torso.nii.gz"
    case = {"image": str(torso), "label": str(torso).replace("imagesTr", "labelsTr")}
    datalist = work / "datalist.json"  # the sample CT twice, so that the reference's batch of 2 volumes is full
    datalist.write_text(json.dumps({"training": [case, case], "validation": [case]}))
    flags = cpu_flags()
    results: dict = {
        "size": size,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        "cpu": {
            "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native_bf16(),
            "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
        },
        "weights": weights,
        "train_overrides": train_overrides,
        "network_flops_per_window": flops,
        "peak_flops": _peaks(device),
        "inference": {},
        "training": {},
    }
    chosen = _pipelines(device)
    if pipelines is None and size == "paper":
        pipelines = PAPER_PIPELINES
    if pipelines and pipelines != "all":
        wanted = {"reference", *(_names(pipelines) if isinstance(pipelines, str) else pipelines)}
        unknown = wanted - set(chosen)
        if unknown:
            raise ValueError(f"unknown pipelines {sorted(unknown)}; known: {list(chosen)}")
        chosen = {name: value for name, value in chosen.items() if name in wanted}
    not_applicable = {name: reason for name, reason in chosen.items() if isinstance(reason, str)}
    runnable = {name: value for name, value in chosen.items() if not isinstance(value, str)}
    inference = {name: (settings["infer"], env) for name, (settings, env) in runnable.items() if "infer" in settings}
    training = {name: (settings["train"], env) for name, (settings, env) in runnable.items() if "train" in settings}

    def save() -> None:
        results["benchmark_seconds"] = time.perf_counter() - began
        if out:
            Path(out).write_text(json.dumps(results, indent=2) + "\n")

    if workflow in ("inference", "all"):
        volumes = {}
        if "sample" in wanted_inputs:
            volumes["sample CT"] = torso
        if "native" in wanted_inputs:
            volumes["512x512x150"] = native_resolution_ct(torso, work / "native_ct.nii.gz")
        for input_name, path in volumes.items():
            rows = results["inference"][input_name] = {}
            for name, (settings, env) in inference.items():
                folder = work / "infer" / _slug(f"{input_name} {name}")
                overrides = {**base, **settings, "input": str(path), "ckpt_path": ckpt}
                overrides.update({"output_dir": str(folder), "bundle_root": str(folder)})
                row = rows[name] = _child(
                    env, "infer_worker", overrides, str(folder / "softmax.npy"), timeout=pipeline_timeout
                )
                if "failed" not in row:
                    applied = {**REFERENCE["infer"], **settings} if name == "reference" else settings
                    row["compute_dtype"] = dtype = _compute_dtype(applied, device, env)
                    row["flops_per_second"] = row["windows"] * flops["forward"] / row["seconds"]
                    row["share_of_peak"] = row["flops_per_second"] / results["peak_flops"][dtype]
                    network_flops_per_second = row["windows"] * flops["forward"] / row["network_seconds"]
                    row["network_share_of_peak"] = network_flops_per_second / results["peak_flops"][dtype]
                    row["label_map"] = str(next(folder.glob("*_seg.nii.gz")))
                save()
            reference_folder = work / "infer" / _slug(f"{input_name} reference")
            measured = [name for name in inference if "failed" not in rows[name]]
            if "reference" in measured:
                for name in measured:
                    folder = work / "infer" / _slug(f"{input_name} {name}")
                    rows[name]["dice_agreement"] = _dice_agreement(
                        Path(rows["reference"]["label_map"]), Path(rows[name]["label_map"])
                    )
                    rows[name].update(_softmax_agreement(reference_folder / "softmax.npy", folder / "softmax.npy"))
            for name in measured:
                if name != "reference":
                    (work / "infer" / _slug(f"{input_name} {name}") / "softmax.npy").unlink()  # ~100s of MB each
            rows.update({name: {"not_applicable": reason} for name, reason in not_applicable.items()})
            save()
    if workflow in ("training", "all"):
        for name, (settings, env) in training.items():
            folder = work / "train" / _slug(name)
            overrides = {**base, **settings, **(train_overrides or {}), "dataset_dir": dataset_dir}
            overrides["datalist"] = str(datalist)
            overrides.update({"bundle_root": str(folder), "check_data": False, "resume": False})
            overrides["allow_datalist_overlap"] = True  # the sample CT twice, meant (see the datalist above)
            row = results["training"][name] = _child(
                env, "train_worker", overrides, str(iterations), str(warmup), timeout=pipeline_timeout
            )
            if "failed" not in row:
                row["flops_per_second"] = row["crops_per_second"] * flops["training"]
                applied = {**REFERENCE["train"], **settings} if name == "reference" else settings
                dtype = row["compute_dtype"] = _compute_dtype(applied, device, env)
                row["share_of_peak"] = row["flops_per_second"] / results["peak_flops"][dtype]
            save()
    save()
    _print_table(results)


def _print_table(results: dict) -> None:
    """Print every figure, one line per pipeline, with its ratio to the reference."""
    peaks = ", ".join(f"{dtype} {flops / 1e9:.1f}" for dtype, flops in results["peak_flops"].items())
    print(f"{results['size']} configuration on {results['device']}; weights: {results['weights']}")
    print(f"practical peak GFLOP/s: {peaks}; benchmark took {results['benchmark_seconds'] / 60:.1f} min")

    def block(title: str, rows: dict, figures: list[tuple[str, str]]) -> None:
        width = max(len(name) for name in rows) + 2
        print(f"\n{title}\n{'':{width}}" + "".join(f"{label:>24}" for label, _ in figures))
        for name, row in rows.items():
            if "not_applicable" in row or "failed" in row:
                print(f"{name:{width}}{row.get('not_applicable') or 'failed: ' + row['failed']}")
                continue
            cells = []
            for _, key in figures:
                value, ref = row.get(key), rows.get("reference", {}).get(key)
                if value is None:
                    cells.append(f"{'-':>24}")
                elif ref and "share" not in key and key not in ("dice_agreement", "softmax_mean_abs_difference"):
                    cells.append(f"{value:>15.3f} ({value / ref:5.2f}x)")
                else:
                    cells.append(f"{value:>24.4f}")
            print(f"{name:{width}}" + "".join(cells))

    gpu = [("peak GPU MB", "peak_gpu_mb")] if not results["device"].startswith("cpu") else []
    for input_name, rows in results["inference"].items():
        confidence = rows.get("reference", {}).get("reference_confidence", float("nan"))
        title = f"inference, {input_name} (reference's mean top softmax probability {confidence:.3f})"
        figures = [("s per volume", "seconds"), ("s in the network", "network_seconds")]
        figures += [("peak RSS MB", "peak_rss_mb"), *gpu]
        figures += [("Dice agreement", "dice_agreement"), ("softmax mean abs diff", "softmax_mean_abs_difference")]
        figures += [("share of dtype peak", "share_of_peak"), ("network share of peak", "network_share_of_peak")]
        figures += [("kernel share of CPU", "kernel_time_share")]
        block(title, rows, figures)
    if results["training"]:
        block(
            "training",
            results["training"],
            [
                ("s per iteration", "seconds_per_iteration"),
                ("crops per s", "crops_per_second"),
                ("data-wait share", "data_share"),
                ("kernel share of CPU", "kernel_time_share"),
                ("peak RSS MB", "peak_rss_mb"),
                ("share of dtype peak", "share_of_peak"),
                *gpu,
            ],
        )


if __name__ == "__main__":
    commands = {"infer_worker": infer_worker, "train_worker": train_worker, "levers": levers}
    commands["make_weights"] = make_weights
    fire.Fire({"main": main, **commands} if len(sys.argv) > 1 and sys.argv[1] in commands else main)
