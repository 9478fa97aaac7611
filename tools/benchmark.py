"""Speed and memory of the BTCV bundle against the reference configuration, measured side by side in one run.

Both pipelines are the same bundle configs run through MONAI's ``ConfigWorkflow``; they differ only in settings:

* reference: the model zoo's Swin UNETR BTCV bundle's values: fp32, sliding window with sw_batch_size 4, overlap 0.5
  and constant blending; training batches of 2 volumes x 2 crops from a plain ``Dataset`` (no caching); glibc's
  default allocator settings;
* ours: the bundle's defaults (Gaussian blending, 1 volume x 4 crops from a ``CacheDataset``, AMP on CUDA) and, on
  the CPU, ``MALLOC_MMAP_MAX_=0`` (glibc keeps freed blocks instead of unmapping them after every window).

Every measurement runs in a fresh process (clean peak memory, the allocator setting applied before Python starts),
on the same input volume and the same network weights, and reports wall time, peak memory and, for inference, the
Dice agreement of the two label maps. Timings on a shared CPU vary from run to run: compare the ratios of one run.

Usage:
    python tools/benchmark.py                   # small configuration (feature_size 12, 64^3) on this machine
    python tools/benchmark.py --size paper      # feature_size 48, 96^3 (the paper's; slow on a CPU)
    python tools/benchmark.py --out benchmark.json --iterations 6
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "swin_unetr_btcv_seg"
SIZES = {
    "small": {"network_def#feature_size": 12, "roi_size": [64, 64, 64], "pixdim": [3.0, 3.0, 3.0]},
    "paper": {"network_def#feature_size": 48, "roi_size": [96, 96, 96], "pixdim": [1.5, 1.5, 2.0]},
}
REFERENCE = {
    "infer": {"sw_batch_size": 4, "sw_overlap": 0.5, "inferer#mode": "constant", "amp": False},
    "train": {"batch_size": 2, "num_samples": 2, "cache_rate": 0.0, "amp": False},  # cache_rate 0: nothing cached
}
OURS: dict[str, dict] = {"infer": {}, "train": {}}  # the bundle's defaults
ENV = {"reference": {}, "ours": {"MALLOC_MMAP_MAX_": "0"}}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _gpu_peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def infer_worker(overrides_file: str) -> None:
    """(child process) Run the inference workflow once and print its timing and peak memory as JSON."""
    from monai.bundle import ConfigWorkflow

    settings = json.loads(Path(overrides_file).read_text())
    workflow = ConfigWorkflow(config_file=str(BUNDLE / "configs" / "inference.json"), workflow_type="infer", **settings)
    workflow.initialize()
    evaluator = workflow.parser.get_parsed_content("evaluator")
    start = time.perf_counter()
    workflow.run()
    seconds = time.perf_counter() - start
    workflow.finalize()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "volumes": evaluator.state.iteration,
                "peak_rss_mb": _peak_rss_mb(),
                "peak_gpu_mb": _gpu_peak_mb(),
            }
        )
    )


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
    workflow.run()
    workflow.finalize()
    steady = range(warmup, len(marks["end"]))
    total = marks["end"][-1] - marks["end"][warmup - 1]
    waiting = sum(marks["batch"][i] - marks["start"][i] for i in steady)
    crops = workflow.parser["batch_size"] * workflow.parser["num_samples"]
    print(
        json.dumps(
            {
                "seconds_per_iteration": total / len(steady),
                "data_share": waiting / total,
                "crops_per_iteration": crops,
                "peak_rss_mb": _peak_rss_mb(),
                "peak_gpu_mb": _gpu_peak_mb(),
            }
        )
    )


def _child(pipeline: str, worker: str, overrides: dict, *args: str) -> dict:
    """Run ``worker`` with ``overrides`` (passed in a file) in a fresh process with ``pipeline``'s environment."""
    overrides_file = Path(overrides["bundle_root"]) / f"{worker}_overrides.json"
    overrides_file.parent.mkdir(parents=True, exist_ok=True)
    overrides_file.write_text(json.dumps(overrides))
    cmd = [sys.executable, str(Path(__file__).resolve()), worker, str(overrides_file), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # only the pipeline's own setting
    result = subprocess.run(cmd, capture_output=True, text=True, env={**env, **ENV[pipeline]})
    if result.returncode != 0:
        raise RuntimeError(f"{pipeline} {worker} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
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


def main(
    size: str = "small",
    iterations: int = 6,
    warmup: int = 2,
    out: str | None = None,
    ckpt: str | None = None,
    dataset_dir: str | None = None,
) -> dict:
    """Benchmark inference and training of both pipelines; print a table, write JSON to ``out``."""
    import sample_data
    import torch
    from monai.bundle import ConfigWorkflow

    base = {**SIZES[size], "num_workers": 0}
    dataset_dir = dataset_dir or sample_data.prepare()
    work = Path(tempfile.mkdtemp(prefix="swin_unetr_benchmark_"))
    if ckpt is None:  # the same seeded random weights for both pipelines
        torch.manual_seed(0)
        parser = ConfigWorkflow(
            config_file=str(BUNDLE / "configs" / "inference.json"), workflow_type="infer", **base
        ).parser
        ckpt = str(work / "weights.pt")
        torch.save(parser.get_parsed_content("network_def").state_dict(), ckpt)
    volume = str(Path(dataset_dir) / "imagesTr" / "ts_torso.nii.gz")
    case = {"image": volume, "label": volume.replace("imagesTr", "labelsTr")}
    datalist = work / "datalist.json"  # the sample CT twice, so that the reference's batch of 2 volumes is full
    datalist.write_text(json.dumps({"training": [case, case], "validation": [case]}))
    results: dict = {
        "size": size,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "input": volume,
        "torch_threads": torch.get_num_threads(),
    }
    for pipeline, settings in (("reference", REFERENCE), ("ours", OURS)):
        infer = {**base, **settings["infer"], "input": volume, "ckpt_path": ckpt, "output_dir": str(work / pipeline)}
        infer["bundle_root"] = str(work / f"{pipeline}_infer")
        results[f"{pipeline}_infer"] = _child(pipeline, "infer_worker", infer)
        train = {
            **base,
            **settings["train"],
            "dataset_dir": dataset_dir,
            "datalist": str(datalist),
            "bundle_root": str(work / f"{pipeline}_train"),
            "check_data": False,
            "resume": False,
        }
        results[f"{pipeline}_train"] = _child(pipeline, "train_worker", train, str(iterations), str(warmup))
    (ref_seg,), (our_seg,) = (list((work / p).glob("*_seg.nii.gz")) for p in ("reference", "ours"))
    results["dice_agreement"] = _dice_agreement(ref_seg, our_seg)
    ri, oi, rt, ot = (results[k] for k in ("reference_infer", "ours_infer", "reference_train", "ours_train"))
    results["ratios"] = {
        "inference_speedup": ri["seconds"] / oi["seconds"],
        "inference_peak_rss": oi["peak_rss_mb"] / ri["peak_rss_mb"],
        "training_speedup": rt["seconds_per_iteration"] / ot["seconds_per_iteration"],
        "training_peak_rss": ot["peak_rss_mb"] / rt["peak_rss_mb"],
    }
    rows = [
        ("inference s/volume", ri["seconds"], oi["seconds"]),
        ("inference peak RSS MB", ri["peak_rss_mb"], oi["peak_rss_mb"]),
        ("training s/iteration (4 crops)", rt["seconds_per_iteration"], ot["seconds_per_iteration"]),
        ("training data-wait share", rt["data_share"], ot["data_share"]),
        ("training peak RSS MB", rt["peak_rss_mb"], ot["peak_rss_mb"]),
    ]
    print(f"{'':32}{'reference':>12}{'ours':>12}{'ours/ref':>10}")
    for name, ref, ours in rows:
        print(f"{name:32}{ref:12.3f}{ours:12.3f}{ours / ref:10.2f}")
    print(f"Dice agreement of the two label maps: {results['dice_agreement']:.4f}")
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    fire.Fire(
        {"main": main, "infer_worker": infer_worker, "train_worker": train_worker}
        if len(sys.argv) > 1 and sys.argv[1] in ("infer_worker", "train_worker")
        else main
    )
