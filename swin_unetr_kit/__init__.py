"""Shared pieces of the Swin UNETR bundle collection, for the places where MONAI has no component.

Bundles reach them from their configs as ``swin_unetr_kit.<module>.<name>``.
"""

from swin_unetr_kit import (
    checkpoint,
    cpu_inference,
    data,
    data_record,
    metrics,
    monailabel,
    msd,
    pretrained,
    record,
    runtime,
    settings,
)

__all__ = [
    "checkpoint",
    "cpu_inference",
    "data",
    "data_record",
    "metrics",
    "monailabel",
    "msd",
    "pretrained",
    "record",
    "runtime",
    "settings",
]
