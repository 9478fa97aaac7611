"""Checkpoints that say how to rebuild their network, and networks built in the patch-merging order of their weights.

MONAI 1.5 changed the sub-voxel order of SwinUNETR's 3D ``"merging"`` layer (see
:class:`~swin_unetr_kit.pretrained.LegacyPatchMerging`). Weights load into either order without an error, but compute
what they were trained to compute only in theirs. So every checkpoint the bundles write carries, beside the weights, a
record under :data:`RECORD_KEY` (``{"patch_merging": "legacy" | "merging" | "mergingv2", "network": {...}}``), and the
bundles build their network in the order :func:`resolve_patch_merging` finds for the checkpoint they will load:

1. ``legacy_patch_merging`` true or false on the command line: that order, whatever the checkpoint says;
2. the checkpoint's record;
3. the released self-supervised layout (``module.``-prefixed keys, ``fc1``/``fc2`` MLP names): legacy, as trained;
4. a file whose md5 the bundle lists in ``known_weights`` (the released weights its ``large_files.yml`` names): the
   order listed there;
5. any other checkpoint: MONAI's current order, said in one log line with the override that changes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence

import torch
from monai.networks.nets.swin_unetr import PatchMerging, PatchMergingV2

from swin_unetr_kit.pretrained import LegacyPatchMerging, _unwrap
from swin_unetr_kit.settings import optional_flag

logger = logging.getLogger(__name__)

RECORD_KEY = "network_record"
LEGACY, CURRENT = "legacy", "merging"
# merging modules by the name the record gives their order; the most derived class first
_ORDERS = ((LegacyPatchMerging, LEGACY), (PatchMerging, CURRENT), (PatchMergingV2, "mergingv2"))


class RecordError(ValueError):
    """A network the record cannot describe, or a checkpoint whose record contradicts the network it is loaded into."""


def _bare(network: torch.nn.Module) -> torch.nn.Module:
    """The network inside DataParallel/DistributedDataParallel."""
    return getattr(network, "module", network)


def patch_merging_order(network: torch.nn.Module) -> str:
    """The name of the patch-merging order ``network`` is built with: ``legacy``, ``merging`` or ``mergingv2``."""
    for module in _bare(network).modules():
        for cls, name in _ORDERS:
            if isinstance(module, cls):
                return name
    raise RecordError(f"{type(_bare(network)).__name__} has no Swin patch-merging layer to record")


def describe(network: torch.nn.Module) -> dict:
    """The record of ``network``: its patch-merging order and the settings that rebuild it, read from the built network
    (so the record tells what was trained, not what a config meant)."""
    net = _bare(network)
    encoder = getattr(net, "swinViT", net)
    embedding = encoder.patch_embed.proj.weight
    settings = {
        "class": type(net).__name__,
        "spatial_dims": embedding.ndim - 2,
        "in_channels": embedding.shape[1],
        "feature_size": embedding.shape[0],
        "depths": [len(getattr(encoder, f"layers{i}")[0].blocks) for i in range(1, encoder.num_layers + 1)],
        "num_heads": [
            getattr(encoder, f"layers{i}")[0].blocks[0].attn.num_heads for i in range(1, encoder.num_layers + 1)
        ],
        "use_v2": hasattr(encoder, "layers1c"),
    }
    head = getattr(getattr(getattr(net, "out", None), "conv", None), "conv", None)
    if head is not None:
        settings["out_channels"] = head.out_channels
    return {"patch_merging": patch_merging_order(net), "network": settings}


class NetworkRecord:
    """The record of ``network`` as an item of a checkpoint's ``save_dict``: ignite saves its ``state_dict()`` beside
    the weights (``{"model": ..., "network_record": ...}``)."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network

    def state_dict(self) -> dict:
        return describe(self.network)


def check_record(network: torch.nn.Module, record: Mapping, source: str) -> None:
    """Raise when ``network`` cannot hold the weights ``record`` describes (other settings; a recorded class that is
    the network's own or one of its bases is the same network); warn when it is built in another patch-merging order
    (possible only when ``legacy_patch_merging`` was forced)."""
    built = describe(network)
    # a subclass that changes only what the network answers (SSLPredictor of SSLHead) holds its base's weights
    lineage = {cls.__name__ for cls in type(_bare(network)).__mro__}
    differ = {
        k: (v, built["network"].get(k))
        for k, v in record.get("network", {}).items()
        if k in built["network"] and built["network"][k] != v and not (k == "class" and v in lineage)
    }
    if differ:
        shown = ", ".join(f"{k} {saved} (network: {now})" for k, (saved, now) in differ.items())
        raise RecordError(
            f"{source} holds the weights of another network: {shown}; set these in the config or its overrides"
        )
    if record.get("patch_merging") not in (None, built["patch_merging"]):
        logger.warning(
            "%s was trained with patch merging %r but the network uses %r (legacy_patch_merging forces it)",
            source,
            record["patch_merging"],
            built["patch_merging"],
        )


def read_record(path: str) -> dict | None:
    """The record stored in the checkpoint at ``path``, or None when it has none."""
    return _record_of(_load(path))


def _record_of(checkpoint: object) -> dict | None:
    record = checkpoint.get(RECORD_KEY) if isinstance(checkpoint, Mapping) else None
    return dict(record) if isinstance(record, Mapping) else None


def _load(path: str) -> object:
    try:  # memory-mapped: the keys are read, not the 250 MB of weights (files in torch's zip format)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RecordError(f"{path}: cannot be read as a PyTorch checkpoint ({exc})") from exc


def _is_released_ssl_layout(checkpoint: object) -> bool:
    if not isinstance(checkpoint, Mapping):
        return False
    keys = [k for k, v in _unwrap(checkpoint).items() if isinstance(v, torch.Tensor)]
    return bool(keys) and all(k.startswith("module.") for k in keys) and any(".mlp.fc1." in k for k in keys)


def is_released_encoder(path: str) -> bool:
    """Whether ``path`` holds the released self-supervised encoder alone (no record; ``module.`` keys, fc1/fc2 names):
    what the SSL bundle's ``large_files.yml`` fetches as its ``models/model.pt``."""
    return _is_released_ssl_layout(_load(path))


def file_hash(path: str | os.PathLike, hash_type: str = "sha256") -> str:
    """The hex digest of the file at ``path``, read in 1 MiB chunks. Ours because MONAI's ``check_hash`` only compares
    with a given value, and ``hashlib.file_digest`` needs Python 3.11 (the model zoo's CI runs 3.10)."""
    digest = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_order(path: str, known_weights: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The patch-merging order the checkpoint at ``path`` was trained in, and why that order (for the log)."""
    checkpoint = _load(path)
    record = _record_of(checkpoint)
    if record is not None and record.get("patch_merging"):
        return record["patch_merging"], "as its record says"
    if _is_released_ssl_layout(checkpoint):
        return LEGACY, "the released self-supervised layout (module. prefix, fc1/fc2 names), trained with MONAI < 1.5"
    if known_weights:
        digest = file_hash(path, "md5")
        if digest in known_weights:
            return known_weights[digest], f"the released weights with md5 {digest} listed in the bundle's known_weights"
    return CURRENT, ""


def resolve_patch_merging(
    legacy_patch_merging: bool | None,
    checkpoints: Sequence[str | None],
    known_weights: Mapping[str, str] | None = None,
) -> str:
    """The patch-merging order to build the network in: ``legacy``, ``merging`` (or ``mergingv2`` if recorded).

    Args:
        legacy_patch_merging: True or False forces that order; None (the bundles' default) follows the weights. Read
            with :func:`~swin_unetr_kit.settings.optional_flag`, so the words the command line passes work.
        checkpoints: the files whose weights the network will hold, most authoritative first (the resume checkpoint,
            then the pretrained one, ...); the first that exists decides, missing or empty ones are skipped.
        known_weights: md5 → order of released checkpoints that carry no record.
    """
    legacy_patch_merging = optional_flag(legacy_patch_merging, "legacy_patch_merging")
    if legacy_patch_merging is not None:
        order = LEGACY if legacy_patch_merging else CURRENT
        logger.info("patch merging: %s (legacy_patch_merging %s)", order, str(bool(legacy_patch_merging)).lower())
        return order
    for path in checkpoints:
        if not path or not os.path.isfile(path):
            continue
        order, reason = checkpoint_order(path, known_weights)
        if reason:
            logger.info("patch merging: %s for %s: %s", order, path, reason)
        else:
            logger.warning(
                "patch merging: %s has no record of its patch-merging order; assuming MONAI's current order "
                "('merging', MONAI >= 1.5). Pass --legacy_patch_merging true if it was trained with MONAI < 1.5.",
                path,
            )
        return order
    return CURRENT
