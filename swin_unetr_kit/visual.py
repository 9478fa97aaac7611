"""Pictures of long work for the person waiting on it: the training curves as a PNG, and overlays of a few evaluated
cases. Both are ignite handlers the bundles' configs attach; MONAI records the values (``MetricLogger``), plots them
(``plot_metric_graph``) and blends the overlays (``blend_images``); what is here saves them as files.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from matplotlib import colormaps
from matplotlib.figure import Figure  # a bare Figure renders to files without pyplot or a display
from matplotlib.patches import Patch
from monai.data.utils import create_file_basename
from monai.handlers import MetricLogger
from monai.utils.jupyter_utils import plot_metric_graph
from monai.visualize import blend_images

logger = logging.getLogger(__name__)


def save_figure(figure: Figure, path: Path) -> None:
    """Write ``figure`` to ``path`` through a temporary file, so a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, format="png", dpi=100)
    os.replace(partial, path)


def _loss_value(output: object) -> float:
    """The loss of a trainer's output, decollated (a list of dicts) or not (a dict)."""
    item = output[0] if isinstance(output, list) else output
    return float(item["loss"])


class TrainingCurves:
    """Save the training loss (per iteration, with its running mean) and the validation metrics (per validation) as
    ``<output_dir>/<filename>``, after every epoch and at the end, so an interrupted run has its curves too.

    Args:
        output_dir: folder of the PNG.
        evaluator: the validation engine whose metrics to plot.
        filename: the PNG's name.
    """

    def __init__(self, output_dir: str, evaluator: Engine | None = None, filename: str = "training_curves.png") -> None:
        self.path = Path(output_dir) / filename
        self.evaluator = evaluator
        self.logger = MetricLogger(loss_transform=_loss_value)

    def attach(self, engine: Engine) -> None:
        self.logger.attach(engine)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, self._log_validation, engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def _log_validation(self, evaluator: Engine, trainer: Engine) -> None:
        """Record the validation metrics at the trainer's iteration: MetricLogger's own evaluator hook uses the last
        iteration it logged, one behind where validation runs before it within an iteration."""
        self.logger.iteration = trainer.state.iteration
        self.logger.log_metrics(evaluator)

    def save(self, engine: Engine | None = None) -> None:
        figure = Figure(figsize=(12, 4.5), tight_layout=True)
        loss_axis, metric_axis = figure.subplots(1, 2)
        if self.logger.loss:
            plot_metric_graph(loss_axis, "training loss", {"loss": self.logger.loss}, yscale="log", avg_keys=("loss",))
        overall = {name: values for name, values in self.logger.metrics.items() if "/" not in name}  # not per organ
        if overall:
            plot_metric_graph(metric_axis, "validation", overall, yscale="linear", avg_keys=())
        loss_axis.set_xlabel("iteration")
        metric_axis.set_xlabel("iteration")
        save_figure(figure, self.path)


class TimeLeft:
    """Log, after every epoch, how far the whole run is and the time left at the pace of the epochs (validation
    included) run by this process, so that a resumed run is not estimated from the epochs it did not run:
    ``run: epoch 3/120 (2.5 %), 0:01:12 elapsed, about 0:46:48 left``."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _start(self, engine: Engine) -> None:
        self.started, self.first_epoch = time.perf_counter(), engine.state.epoch

    def __call__(self, engine: Engine) -> None:
        epoch, epochs = engine.state.epoch, engine.state.max_epochs
        elapsed = time.perf_counter() - self.started
        left = elapsed / max(1, epoch - self.first_epoch) * (epochs - epoch)
        logger.info(
            f"run: epoch {epoch}/{epochs} ({100 * epoch / epochs:.1f} %), {_clock(elapsed)} elapsed, "
            f"about {_clock(left)} left"
        )


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} days"


def _label_map(volume: torch.Tensor) -> np.ndarray:
    """[1, X, Y, Z] labels, [C, X, Y, Z] one-hot, or [C, X, Y, Z] overlapping binary regions (sigmoid outputs, where a
    voxel is drawn with its highest-numbered region) → [X, Y, Z] labels."""
    volume = torch.as_tensor(volume).detach().cpu().float()
    if volume.shape[0] == 1:
        return volume[0].numpy().astype(np.int64)
    if bool((volume.sum(0) == 1).all()):
        return volume.argmax(0).numpy().astype(np.int64)
    numbers = torch.arange(1, volume.shape[0] + 1, dtype=volume.dtype).view(-1, 1, 1, 1)
    return ((volume > 0.5) * numbers).amax(0).numpy().astype(np.int64)


def overlay_figure(
    image: torch.Tensor,
    pred: torch.Tensor,
    label: torch.Tensor | None,
    title: str,
    class_names: Sequence[str] = (),
) -> Figure:
    """Image, ground truth (if any) and prediction on the axial slice (last axis) with the most labelled voxels, and a
    legend of the colours of the labels on that slice, named by ``class_names`` (of labels 1, 2, ...)."""
    pred_map = _label_map(pred)
    label_map = _label_map(label) if label is not None else None
    reference = label_map if label_map is not None and label_map.any() else pred_map
    z = int(np.argmax((reference > 0).sum(axis=(0, 1))))
    picture = torch.as_tensor(image).detach().cpu()[:1].float()
    span = picture.max() - picture.min()
    picture = (picture - picture.min()) / (span if span > 0 else 1)
    panels = [("image", picture[0, ..., z].numpy().T, "gray")]
    hues = max(int(pred_map.max()), int(label_map.max()) if label_map is not None else 0) + 1  # one hue per label
    for name, labels in (("ground truth", label_map), ("prediction", pred_map)):
        if labels is not None:
            colour = torch.from_numpy(labels / hues).float()[None]  # blend_images colours floats in [0, 1]
            blended = blend_images(picture, colour, alpha=0.5, cmap="hsv", rescale_arrays=False)
            panels.append((name, np.moveaxis(blended[..., z].numpy(), 0, -1).transpose(1, 0, 2), None))
    shown = set(np.unique(pred_map[..., z]).tolist())
    if label_map is not None:
        shown |= set(np.unique(label_map[..., z]).tolist())
    legend = [Patch(color=colormaps["hsv"](v / hues), label=_class_name(v, class_names)) for v in sorted(shown) if v]
    figure = Figure(figsize=(4 * len(panels) + 2.5 * bool(legend), 4.4), tight_layout=True)
    for axis, (name, data, cmap) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        axis.imshow(data, cmap=cmap, origin="lower")
        axis.set_title(name)
        axis.axis("off")
    if legend:  # beside the last panel, where the tight layout makes room for it
        axis.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    figure.suptitle(f"{title} (slice {z})")
    return figure


def _class_name(value: int, class_names: Sequence[str]) -> str:
    return class_names[value - 1] if value <= len(class_names) else f"label {value}"


class CaseOverlays:
    """Save PNG overlays of the first ``num_cases`` evaluated cases (image, ground truth, prediction on the slice with
    the most labelled voxels) into ``output_dir``, named after each case's image file; below ``data_root_dir`` (see
    :func:`swin_unetr_kit.data.output_root`) images keep their sub-folders, so that cases of the same name do not
    share one PNG.

    Reads the evaluator's decollated output after post-processing: ``image`` and ``pred`` (and ``label`` when there is
    one) in the same, resampled, geometry, as labels or one-hot. ``class_names`` name labels 1, 2, ... in the legend.
    """

    def __init__(
        self,
        output_dir: str,
        num_cases: int = 3,
        image_key: str = "image",
        pred_key: str = "pred",
        label_key: str = "label",
        class_names: Sequence[str] = (),
        data_root_dir: str = "",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.data_root_dir = data_root_dir
        self.num_cases = num_cases
        self.image_key, self.pred_key, self.label_key = image_key, pred_key, label_key
        self.saved = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self.saved = 0

    def __call__(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in outputs:
            if self.saved >= self.num_cases or not isinstance(item, Mapping):
                return
            image, pred = item.get(self.image_key), item.get(self.pred_key)
            if image is None or pred is None or tuple(image.shape[1:]) != tuple(pred.shape[1:]):
                logger.warning(
                    "overlays skipped: no %r and %r of the same shape in the evaluator's output",
                    self.image_key,
                    self.pred_key,
                )
                self.saved = self.num_cases
                return
            source = getattr(image, "meta", {}).get("filename_or_obj", f"case{self.saved}")
            path = create_file_basename("", str(source), self.output_dir, self.data_root_dir, False, makedirs=False)
            figure = overlay_figure(image, pred, item.get(self.label_key), Path(path).name, self.class_names)
            save_figure(figure, Path(f"{path}.png"))
            self.saved += 1
