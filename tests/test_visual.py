"""Training curves and evaluation overlays as PNG files (the handlers the bundles attach)."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from matplotlib.image import imread
from monai.data import MetaTensor

from swin_unetr_kit.visual import CaseOverlays, TrainingCurves


def test_training_curves_written_every_epoch_from_loss_and_validation_metrics(tmp_path):
    evaluator = Engine(lambda engine, batch: None)
    evaluator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update({"val_mean_dice": 0.5}))
    losses = iter(torch.linspace(2.0, 0.5, 6))
    decollated = Engine(lambda engine, batch: [{"loss": next(losses)}])  # MONAI's default trainer output
    curves = TrainingCurves(str(tmp_path), evaluator=evaluator)
    curves.attach(decollated)
    decollated.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))
    written = []
    decollated.add_event_handler(Events.EPOCH_COMPLETED, lambda _: written.append(curves.path.stat().st_mtime_ns))
    decollated.run([0, 1, 2], max_epochs=2)
    assert [round(v, 3) for _, v in curves.logger.loss] == [round(float(v), 3) for v in torch.linspace(2.0, 0.5, 6)]
    assert [i for i, _ in curves.logger.metrics["val_mean_dice"]] == [3, 6]  # logged at the trainer's iteration
    picture = imread(curves.path)
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.std() > 0  # a real, non-blank image
    assert len(written) == 2 and not list(tmp_path.glob(".*partial"))

    plain = Engine(lambda engine, batch: {"loss": torch.tensor(1.0)})  # the SSL trainer's output: not decollated
    TrainingCurves(str(tmp_path / "ssl")).attach(plain)
    plain.run([0], max_epochs=1)
    assert (tmp_path / "ssl" / "training_curves.png").is_file()


def test_case_overlays_of_the_first_cases(tmp_path):
    image = torch.rand(1, 16, 16, 8)
    label = torch.zeros(1, 16, 16, 8)
    label[0, 4:10, 4:10, 5] = 2
    onehot = torch.nn.functional.one_hot(label[0].long(), 3).permute(3, 0, 1, 2).float()
    outputs = [
        {"image": MetaTensor(image, meta={"filename_or_obj": f"/data/case{i}.nii.gz"}), "pred": onehot, "label": onehot}
        for i in range(4)
    ]
    evaluator = Engine(lambda engine, batch: [outputs[batch]])
    CaseOverlays(str(tmp_path), num_cases=3).attach(evaluator)
    evaluator.run([0, 1, 2, 3])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["case0.png", "case1.png", "case2.png"]
    picture = imread(tmp_path / "case0.png")
    assert picture.shape[1] > 2 * picture.shape[0]  # three panels side by side
    width = picture.shape[1]
    coloured = (abs(picture[..., 0] - picture[..., 1]) > 0.1) | (abs(picture[..., 1] - picture[..., 2]) > 0.1)
    assert not coloured[:, : width // 3].any() and coloured[:, width // 3 :].any()  # labels in colour, image in grey

    unlabelled = Engine(lambda engine, batch: [{"image": image, "pred": onehot}])
    CaseOverlays(str(tmp_path / "unlabelled"), num_cases=1).attach(unlabelled)
    unlabelled.run([0])
    assert len(list((tmp_path / "unlabelled").glob("*.png"))) == 1


def test_validation_within_an_iteration_is_plotted_at_that_iteration(tmp_path):
    """SSL pre-training validates every ``val_interval`` iterations, from a handler that runs before the curves'."""
    evaluator = Engine(lambda engine, batch: None)
    evaluator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update({"val_loss": 1.0}))
    trainer = Engine(lambda engine, batch: {"loss": torch.tensor(1.0)})
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=2), lambda _: evaluator.run([0]))
    curves = TrainingCurves(str(tmp_path), evaluator=evaluator)
    curves.attach(trainer)
    trainer.run([0, 1, 2, 3], max_epochs=1)
    assert [i for i, _ in curves.logger.metrics["val_loss"]] == [2, 4]


def test_overlay_legend_names_the_organs_on_the_slice():
    from swin_unetr_kit.visual import overlay_figure

    label = torch.zeros(1, 16, 16, 8)
    label[0, 2:6, 2:6, 4] = 1
    label[0, 8:12, 8:12, 4] = 3
    figure = overlay_figure(torch.rand(1, 16, 16, 8), label, label, "case", ["spleen", "right kidney", "left kidney"])
    (legend,) = [axis.get_legend() for axis in figure.axes if axis.get_legend() is not None]
    assert [text.get_text() for text in legend.get_texts()] == ["spleen", "left kidney"]
    unnamed = overlay_figure(torch.rand(1, 16, 16, 8), label, None, "case")
    assert [t.get_text() for a in unnamed.axes if a.get_legend() for t in a.get_legend().get_texts()] == [
        "label 1",
        "label 3",
    ]


def test_time_left_of_the_whole_run_after_every_epoch(caplog):
    """The run-level estimate the bundles log: epochs done of all, and the time left at this process's pace."""
    import logging
    import re

    from swin_unetr_kit.visual import TimeLeft

    trainer = Engine(lambda engine, batch: None)
    TimeLeft().attach(trainer)
    with caplog.at_level(logging.INFO, logger="swin_unetr_kit.visual"):
        trainer.run([0, 1], max_epochs=4)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run: ")]
    assert [re.match(r"run: epoch (\d)/4 \(([\d.]+) %\)", line).groups() for line in lines] == [
        ("1", "25.0"),
        ("2", "50.0"),
        ("3", "75.0"),
        ("4", "100.0"),
    ]
    assert re.search(r"\d\d:\d\d:\d\d elapsed, about \d\d:\d\d:\d\d left$", lines[0])
    assert lines[-1].endswith("about 00:00:00 left")
