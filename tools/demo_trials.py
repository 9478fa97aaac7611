"""Trials for the demo's settings: how far each candidate setting fits the training CT after a number of iterations.

Each trial trains the BTCV bundle's own config with the demo's overrides (``tools/demo.py``) plus the trial's, in
this process, and every ``every`` iterations predicts the whole training CT (sliding window at the trial's spacing)
and records the Dice of each organ present, their mean and how many reach 0.7. Dice after a given number of
iterations does not depend on how busy the machine is; the seconds per iteration are recorded too, but only a run
alone on the machine tells the demo's wall time.

Usage (from the repository root):
    python tools/demo_trials.py --trials "['demo', 'unweighted_6mm']" --iterations 200 --every 40
Writes one JSON line per evaluation to ``<out>/<trial>.jsonl`` and prints it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import demo
import fire
import sample_data
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms import Compose

# each trial: overrides on top of the demo's (tools/demo.py SMALL and SHORT_RUN: 6 mm, the background weighted
# BACKGROUND_WEIGHT); None removes one of the demo's overrides, leaving the bundle's own setting
UNWEIGHTED = {"loss#weight": None}
AT_4MM = {"pixdim": [4.0, 4.0, 4.0], **UNWEIGHTED}  # the demo before the trials below: 4 mm, plain Dice-CE


TRIALS = {
    "demo": {},
    "before_4mm": AT_4MM,
    "pos_neg_crops_4mm": {**AT_4MM, "train#random_transforms": None},  # the bundle's own crops and flips
    "lr_1e-2_4mm": {**AT_4MM, "learning_rate": 0.01},
    "lr_1e-3_4mm": {**AT_4MM, "learning_rate": 0.001},
    "two_crops_4mm": {**AT_4MM, "num_samples": 2},
    "unweighted_6mm": UNWEIGHTED,  # the torso in one window: every organ in every step
    "dice_focal_6mm": {**UNWEIGHTED, "loss": {"_target_": "DiceFocalLoss", "to_onehot_y": True, "softmax": True}},
    "background_weight_0.1_6mm": demo.background_weight(0.1),
    "background_weight_0.01_6mm": demo.background_weight(0.01),
}


def run_trial(name: str, iterations: int, every: int, out: Path) -> None:
    data = Path(sample_data.prepare())
    overrides = {**demo.SMALL, **demo.SHORT_RUN, **TRIALS[name]}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    workflow = ConfigWorkflow(
        config_file=str(demo.CONFIGS / "train.json"),
        workflow_type="train",
        **overrides,
        bundle_root=str(out / name),
        dataset_dir=str(data),
        resume=False,
        progress=False,
        val_interval=10**9,
        **{"train#trainer#max_epochs": iterations},
    )
    workflow.initialize()
    parser = workflow.parser
    trainer, network = parser.get_parsed_content("train#trainer"), parser.get_parsed_content("network")
    case = Compose(parser.get_parsed_content("deterministic_transforms"))(
        {"image": str(data / "imagesTr" / "ts_torso.nii.gz"), "label": str(data / "labelsTr" / "ts_torso.nii.gz")}
    )
    image, label = case["image"][None].float(), case["label"][None].long()
    present = [int(c) for c in torch.unique(label) if c > 0]
    classes = parser["num_classes"]
    log = open(out / f"{name}.jsonl", "w")  # noqa: SIM115 (written to as the trial goes)
    started = time.perf_counter()

    def evaluate(engine: Engine) -> None:
        network.eval()
        with torch.no_grad():
            logits = sliding_window_inference(image, parser["roi_size"], 2, network, overlap=0.25, mode="gaussian")
        network.train()
        dice = DiceMetric(include_background=False, reduction="none")(
            one_hot(logits.argmax(1, keepdim=True), classes), one_hot(label, classes)
        )[0]
        organs = {c: round(float(dice[c - 1]), 3) for c in present}
        row = {
            "trial": name,
            "iteration": engine.state.iteration,
            "seconds": round(time.perf_counter() - started),
            "mean_dice": round(sum(organs.values()) / len(organs), 3),
            "organs_at_0.7": sum(v >= 0.7 for v in organs.values()),
            "dice": organs,
        }
        print(json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=every), evaluate)
    trainer.run()
    log.close()


def main(trials: list[str] | str = "demo", iterations: int = 120, every: int = 20, out: str = "demo_trials") -> None:
    """Run each of ``trials`` (names in TRIALS) for ``iterations``, evaluating every ``every``."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in [trials] if isinstance(trials, str) else trials:
        if name not in TRIALS:
            raise SystemExit(f"unknown trial {name!r}; known: {sorted(TRIALS)}")
        run_trial(name, iterations, every, out_dir)


if __name__ == "__main__":
    fire.Fire(main)
