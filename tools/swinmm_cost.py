"""Extra cost of the SwinMM variants over the plain Swin UNETR ones: seconds and peak memory per training step
(pre-training and fine-tuning) and per sliding window (inference), each in a fresh process.

A step here is what the bundles' trainers do per iteration, on random input of the configured size: forward,
loss, backward and an AdamW step, for one crop (pre-training: the plain recipe's 2 views vs SwinMM's 4; fine-tuning:
``SwinUNETR`` vs ``CrossViewSwinUNETR``, two views). Inference: one window through ``SwinUNETR`` vs through
``CrossViewSwinUNETR`` over all its view pairs (six view passes for a cubic window, SwinMM's multi-view inference).
The first ``warmup`` steps are not timed. Peak memory is the process's peak RSS (CPU) or peak allocated GPU memory.

Usage:
    python tools/swinmm_cost.py                        # feature_size 12, 64^3 windows (CPU-friendly)
    python tools/swinmm_cost.py --feature_size 48 --roi 96 --steps 3 --out cost.json
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import fire

CASES = ("pretrain_plain", "pretrain_swinmm", "finetune_plain", "finetune_crossview", "infer_plain", "infer_crossview")


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(case: str, roi: int, device):
    """The network, a callable computing the loss (None for inference) and its input for ``case``."""
    import numpy as np
    import torch
    from monai.data import list_data_collate
    from monai.losses import DiceCELoss

    from swin_unetr_kit.ssl import SSLBatch, SSLLoss, SSLViewsd
    from swin_unetr_kit.swinmm import CrossViewLoss, SwinMMLoss, SwinMMViewsd, prepare_swinmm_batch

    crop = {"image": torch.rand(1, roi, roi, roi)}
    if case.startswith("pretrain"):
        views, prepare = (SSLViewsd(), SSLBatch()) if case.endswith("plain") else (SwinMMViewsd(), None)
        views.set_random_state(0)
        batch = list_data_collate([views(crop)])
        x, target = (prepare or prepare_swinmm_batch)(batch, device)
        target = {k: v.to(device) for k, v in target.items()}
        loss = SSLLoss() if case.endswith("plain") else SwinMMLoss()
        return x, lambda out: loss(out, target)
    x = crop["image"][None].to(device)
    label = torch.from_numpy(np.random.RandomState(0).randint(0, 14, (1, 1, roi, roi, roi))).to(device)
    loss = CrossViewLoss() if case == "finetune_crossview" else DiceCELoss(to_onehot_y=True, softmax=True)
    return x, (lambda out: loss(out, label)) if case.startswith("finetune") else None


def worker(case: str, feature_size: int, roi: int, steps: int, warmup: int) -> None:
    """(child process) Time ``steps`` steps of ``case`` after ``warmup``; print JSON."""
    import torch
    from monai.networks.nets import SwinUNETR

    from swin_unetr_kit.ssl import SSLHead
    from swin_unetr_kit.swinmm import CrossViewSwinUNETR

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if case.startswith("pretrain"):
        network = SSLHead(feature_size=feature_size)
    elif case.endswith("crossview"):
        network = CrossViewSwinUNETR(roi_size=[roi] * 3, in_channels=1, out_channels=14, feature_size=feature_size)
    else:
        network = SwinUNETR(in_channels=1, out_channels=14, feature_size=feature_size)
    network = network.to(device)
    x, loss = _inputs(case, roi, device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    inference = case.startswith("infer")
    if inference:
        network.eval()  # a cross-view network then predicts every view of every pair and fuses them
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        if inference:
            with torch.no_grad():
                network(x)
        else:
            optimizer.zero_grad(set_to_none=True)
            loss(network(x)).backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steady = times[warmup:]
    print(json.dumps({"seconds": sum(steady) / len(steady), "peak_mb": _peak_mb(device), "device": str(device)}))


def main(feature_size: int = 12, roi: int = 64, steps: int = 3, warmup: int = 1, out: str | None = None) -> None:
    """Measure every case in a fresh process; print a table of seconds and peak memory with the SwinMM/plain ratios."""
    results = {}
    for case in CASES:
        cmd = [sys.executable, str(Path(__file__).resolve()), "worker", case, str(feature_size), str(roi)]
        result = subprocess.run([*cmd, str(steps), str(warmup)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{case} failed:\n{result.stderr[-3000:]}")
        results[case] = json.loads(result.stdout.strip().splitlines()[-1])
    rows = [
        ("pre-training step", "pretrain_plain", "pretrain_swinmm"),
        ("fine-tuning step", "finetune_plain", "finetune_crossview"),
        ("inference window", "infer_plain", "infer_crossview"),
    ]
    print(f"feature_size {feature_size}, {roi}^3, device {results[CASES[0]]['device']}, mean of {steps} steps")
    print(f"{'':18} {'plain s':>9} {'SwinMM s':>9} {'ratio':>6} {'plain MB':>9} {'SwinMM MB':>10} {'ratio':>6}")
    for title, plain, swinmm in rows:
        a, b = results[plain], results[swinmm]
        print(
            f"{title:18} {a['seconds']:9.2f} {b['seconds']:9.2f} {b['seconds'] / a['seconds']:6.2f} "
            f"{a['peak_mb']:9.0f} {b['peak_mb']:10.0f} {b['peak_mb'] / a['peak_mb']:6.2f}"
        )
    report = {"feature_size": feature_size, "roi": roi, "steps": steps, "warmup": warmup, "results": results}
    if out:
        Path(out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], *(int(a) for a in sys.argv[3:7]))
    else:
        fire.Fire(main)
