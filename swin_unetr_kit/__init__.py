"""Shared pieces of the Swin UNETR bundle collection, for the places where MONAI has no component.

Bundles reach them from their configs as ``swin_unetr_kit.<module>.<name>``.
"""

from swin_unetr_kit import (
    checkpoint,
    cpu_inference,
    data,
    metrics,
    msd,
    plan,
    pretrained,
    record,
    runtime,
    settings,
    tracking,
)

__all__ = [
    "checkpoint",
    "cpu_inference",
    "data",
    "metrics",
    "msd",
    "plan",
    "pretrained",
    "record",
    "runtime",
    "settings",
    "tracking",
]
