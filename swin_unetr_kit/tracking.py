"""What ``--tracking mlflow`` records of a run, beyond MONAI's defaults.

MONAI's bundle tracking settings (``monai.bundle.utils.DEFAULT_MLFLOW_SETTINGS``) append an ``MLFlowHandler`` to the
trainer's, validator's and evaluator's handler lists, with arguments the bundle config cannot reach: a timestamp as the
run's name, ``max_epochs``/``epoch_length`` as its only parameters, the executed config as its only artifact, and the
loss of a decollated output. The top-level items it reads (``tracking_uri``, ``experiment_name``) are set by the
bundles' configs; the rest is set here, on the handlers the settings created, before the engine runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from monai.handlers import MLFlowHandler


def describe_mlflow_run(
    handlers: Iterable,
    run_name: str,
    params: Mapping | None = None,
    artifacts: Sequence[str] = (),
    output_transform: Callable | None = None,
) -> None:
    """Give the ``MLFlowHandler`` s in ``handlers`` (none without ``--tracking mlflow``: then nothing happens) the run's
    name, its settings as parameters (logged when the engine starts), files and folders to keep as artifacts (logged
    when it completes, beside the executed config) and, where given, the transform of the engine's output into the
    values logged every iteration (a trainer whose output is not decollated gives its loss terms this way).
    """
    for handler in handlers:
        if not isinstance(handler, MLFlowHandler):
            continue
        handler.run_name = run_name
        if params:
            handler.experiment_param = dict(params)
        handler.artifacts = (*handler.artifacts, *artifacts)
        if output_transform is not None:
            handler.output_transform = output_transform
