"""Speed and memory of the BTCV bundle against the reference configuration, measured side by side in one run.

All pipelines are the same bundle configs run through MONAI's ``ConfigWorkflow``; they differ only in settings:

* reference: the model zoo's Swin UNETR BTCV bundle's values: fp32, sliding window with sw_batch_size 4, overlap 0.5
  and constant blending, attention without SDPA; training batches of 2 volumes x 2 crops from a plain dataset (no
  caching); glibc's malloc as it comes;
* ours: the bundle's defaults: SDPA attention at inference, Gaussian blending, 1 volume x 4 crops from a
  ``CacheDataset``, AMP on CUDA and, on the CPU, glibc keeping freed memory (``swin_unetr_kit.runtime``);
* ours, malloc as it comes (CPU): ours without the allocator setting, to separate its effect from the others';
* ours + tcmalloc (CPU, where ``libtcmalloc_minimal.so.4`` is installed): ours with tcmalloc preloaded;
* ours, reference blending (inference only): ours with constant blending, to show what the speed levers alone do to
  the label map (the blending is a choice of accuracy, not of speed);
* ours (+ tcmalloc on the CPU), checkpointing (training only): with gradient checkpointing, the user's trade of
  speed for memory.

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
        "amp": False,
        "network_def#use_flash_attention": False,
        "cpu_keep_freed_memory": False,
    },
    "train": {"batch_size": 2, "num_samples": 2, "cache_rate": 0.0, "amp": False, "cpu_keep_freed_memory": False},
}
OURS: dict = {"infer": {}, "train": {}}  # the bundle's defaults
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


def infer_worker(overrides_file: str) -> None:
    """(child process) Run the inference workflow once; print its time, windows run and peak memory as JSON."""
    from monai.bundle import ConfigWorkflow

    settings = json.loads(Path(overrides_file).read_text())
    workflow = ConfigWorkflow(config_file=str(BUNDLE / "configs" / "inference.json"), workflow_type="infer", **settings)
    workflow.initialize()
    evaluator = workflow.parser.get_parsed_content("evaluator")
    windows = []
    evaluator.network.register_forward_hook(lambda module, args, output: windows.append(args[0].shape[0]))
    usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    workflow.run()
    seconds = time.perf_counter() - start
    kernel = _kernel_share(usage, resource.getrusage(resource.RUSAGE_SELF))
    workflow.finalize()
    result = {"seconds": seconds, "windows": sum(windows), "peak_rss_mb": _peak_rss_mb(), "peak_gpu_mb": _gpu_peak_mb()}
    print(json.dumps({**result, **kernel}))


def train_worker(overrides_file: str, iterations: int, warmup: int) -> None:
    """(child process) Train for ``iterations`` iterations; print the steady-state time per iteration (after
    ``warmup``), the share of it spent waiting for data, and peak memory as JSON."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    settings = json.loads(Path(overrides_file).read_text())
    settings.update({"train#trainer#max_epochs": 1, "train#trainer#epoch_length": iterations, "val_interval": 10**6})
    workflow = ConfigWorkflow(config_file=str(BUNDLE / "configs" / "train.json"), workflow_type="train", **settings)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    marks: dict[str, list[float]] = {"start": [], "batch": [], "end": []}
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: marks["batch"].append(time.perf_counter()))
    trainer.add_event_handler(Events.GET_BATCH_STARTED, lambda _: marks["start"].append(time.perf_counter()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: marks["end"].append(time.perf_counter()))
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
    volumes, crops_per_volume = workflow.parser["batch_size"], workflow.parser["num_samples"]
    result = {
        "seconds_per_iteration": seconds,
        "volumes_per_second": volumes / seconds,
        "crops_per_second": volumes * crops_per_volume / seconds,
        "crops_per_iteration": volumes * crops_per_volume,
        "data_share": waiting / seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_gpu_mb": _gpu_peak_mb(),
    }
    kernel = _kernel_share(usage["warm"], usage["end"])
    kernel["minor_page_faults"] /= len(steady)  # per iteration
    print(json.dumps({**result, **kernel}))


def _child(env: dict, worker: str, overrides: dict, *args: str) -> dict:
    """Run ``worker`` with ``overrides`` (passed in a file) in a fresh process with the extra environment ``env``."""
    overrides_file = Path(overrides["bundle_root"]) / f"{worker}_overrides.json"
    overrides_file.parent.mkdir(parents=True, exist_ok=True)
    overrides_file.write_text(json.dumps(overrides))
    cmd = [sys.executable, str(Path(__file__).resolve()), worker, str(overrides_file), *args]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    result = subprocess.run(cmd, capture_output=True, text=True, env={**clean, **env})
    if result.returncode != 0:
        raise RuntimeError(f"{worker} {overrides_file} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
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

    x = torch.rand(1, *window)
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text)


def _pipelines(device: str) -> dict[str, tuple[dict, dict]]:
    """name -> (settings of the inference and/or the training run, environment)."""
    fast_malloc = tcmalloc_env() if device == "cpu" else {}
    pipelines = {"reference": (REFERENCE, {}), "ours": (OURS, {})}
    if device == "cpu":
        pipelines["ours, malloc as it comes"] = (MALLOC_AS_IT_COMES, {})
        if fast_malloc:
            pipelines["ours + tcmalloc"] = (OURS, fast_malloc)
    pipelines["ours, reference blending"] = ({"infer": {"inferer#mode": "constant"}}, {})
    checkpointing = "ours + tcmalloc, checkpointing" if fast_malloc else "ours, checkpointing"
    pipelines[checkpointing] = ({"train": {"network_def#use_checkpoint": True}}, fast_malloc)
    return pipelines


def main(
    size: str = "small",
    iterations: int = 6,
    warmup: int = 2,
    out: str | None = None,
    ckpt: str | None = None,
    dataset_dir: str | None = None,
) -> None:
    """Benchmark inference and training of the pipelines; print a table, write JSON to ``out``."""
    import sample_data
    from monai.bundle import ConfigWorkflow

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = {**SIZES[size], "num_workers": 0}
    dataset_dir = dataset_dir or sample_data.prepare()
    work = Path(tempfile.mkdtemp(prefix="swin_unetr_benchmark_"))
    torch.manual_seed(0)
    config = str(BUNDLE / "configs" / "inference.json")
    parser = ConfigWorkflow(config_file=config, workflow_type="infer", **base).parser
    network = parser.get_parsed_content("network_def")
    if ckpt is None:  # the same seeded random weights for every pipeline
        ckpt = str(work / "weights.pt")
        torch.save(network.state_dict(), ckpt)
    flops = network_flops(network, [parser["in_channels"], *parser["roi_size"]])
    torso = Path(dataset_dir) / "imagesTr" / "ts_torso.nii.gz"
    inputs = {"sample CT": torso, "512x512x150": native_resolution_ct(torso, work / "native_ct.nii.gz")}
    case = {"image": str(torso), "label": str(torso).replace("imagesTr", "labelsTr")}
    datalist = work / "datalist.json"  # the sample CT twice, so that the reference's batch of 2 volumes is full
    datalist.write_text(json.dumps({"training": [case, case], "validation": [case]}))
    amp_dtype = "float16" if device == "cuda" else "float32"
    results: dict = {
        "size": size,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        "network_flops_per_window": flops,
        "matmul_peak_flops": matmul_peak_flops(device, amp_dtype),
        "inference": {},
        "training": {},
    }
    pipelines = _pipelines(device)
    inference = {name: (settings["infer"], env) for name, (settings, env) in pipelines.items() if "infer" in settings}
    training = {name: (settings["train"], env) for name, (settings, env) in pipelines.items() if "train" in settings}
    for input_name, path in inputs.items():
        rows = results["inference"][input_name] = {}
        for name, (settings, env) in inference.items():
            folder = work / "infer" / _slug(f"{input_name} {name}")
            overrides = {**base, **settings, "input": str(path), "ckpt_path": ckpt}
            rows[name] = _child(
                env, "infer_worker", {**overrides, "output_dir": str(folder), "bundle_root": str(folder)}
            )
            rows[name]["flops_per_second"] = rows[name]["windows"] * flops["forward"] / rows[name]["seconds"]
            rows[name]["label_map"] = str(next(folder.glob("*_seg.nii.gz")))
        for name in inference:
            rows[name]["dice_agreement"] = _dice_agreement(
                Path(rows["reference"]["label_map"]), Path(rows[name]["label_map"])
            )
    for name, (settings, env) in training.items():
        folder = work / "train" / _slug(name)
        overrides = {**base, **settings, "dataset_dir": dataset_dir, "datalist": str(datalist)}
        overrides.update({"bundle_root": str(folder), "check_data": False, "resume": False})
        row = results["training"][name] = _child(env, "train_worker", overrides, str(iterations), str(warmup))
        row["flops_per_second"] = row["crops_per_second"] * flops["training"]
    _print_table(results)
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")


def _print_table(results: dict) -> None:
    """Print every figure with its ratio to the reference."""
    peak = results["matmul_peak_flops"]
    print(f"{results['size']} configuration on {results['device']}; matmul peak {peak / 1e9:.1f} GFLOP/s")

    def block(title: str, rows: dict, figures: list[tuple[str, str]]) -> None:
        names = list(rows)
        width = max(27, *(len(n) + 2 for n in names))
        print(f"\n{title:34}" + "".join(f"{n:>{width}}" for n in names))
        for label, key in figures:
            ref = rows["reference"][key]
            cells = "".join(
                f"{rows[n][key]:>{width - 9}.3f} ({rows[n][key] / ref:5.2f}x)" if ref else f"{rows[n][key]:>{width}.3f}"
                for n in names
            )
            print(f"{label:34}" + cells)
        print(
            f"{'share of matmul peak':34}" + "".join(f"{rows[n]['flops_per_second'] / peak:>{width}.3f}" for n in names)
        )

    gpu = [("peak GPU MB", "peak_gpu_mb")] if not results["device"].startswith("cpu") else []
    for input_name, rows in results["inference"].items():
        figures = [("s per volume", "seconds"), ("kernel share of CPU time", "kernel_time_share")]
        figures += [("minor page faults", "minor_page_faults"), ("peak RSS MB", "peak_rss_mb"), *gpu]
        block(f"inference, {input_name}", rows, [*figures, ("Dice agreement with reference", "dice_agreement")])
    block(
        "training",
        results["training"],
        [
            ("s per iteration", "seconds_per_iteration"),
            ("volumes per s", "volumes_per_second"),
            ("crops per s", "crops_per_second"),
            ("data-wait share", "data_share"),
            ("kernel share of CPU time", "kernel_time_share"),
            ("minor page faults per iteration", "minor_page_faults"),
            ("peak RSS MB", "peak_rss_mb"),
            *gpu,
        ],
    )


if __name__ == "__main__":
    fire.Fire(
        {"main": main, "infer_worker": infer_worker, "train_worker": train_worker}
        if len(sys.argv) > 1 and sys.argv[1] in ("infer_worker", "train_worker")
        else main
    )
