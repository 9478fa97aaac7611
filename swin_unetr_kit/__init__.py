"""Shared pieces of the Swin UNETR bundle collection, for the places where MONAI has no component.

Bundles reach them from their configs as ``swin_unetr_kit.<module>.<name>``. Importing the package (every bundle's
first expression, ``$import swin_unetr_kit``) installs :func:`swin_unetr_kit.errors.excepthook`, so that a failed
run's last line is the package's own message, not MONAI's wrapper around it.
"""

from swin_unetr_kit import (
    checkpoint,
    cpu_inference,
    data,
    data_record,
    errors,
    metrics,
    monailabel,
    msd,
    plan,
    pretrained,
    record,
    runtime,
    settings,
    tracking,
)

errors.install()

__all__ = [
    "checkpoint",
    "cpu_inference",
    "data",
    "data_record",
    "errors",
    "metrics",
    "monailabel",
    "msd",
    "plan",
    "pretrained",
    "record",
    "runtime",
    "settings",
    "tracking",
]
