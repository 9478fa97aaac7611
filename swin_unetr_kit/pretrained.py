"""Initialise a SwinUNETR encoder from pre-trained weights, and say exactly what was loaded.

Two checkpoint layouts are accepted:

* the released Swin UNETR self-supervised checkpoint (``model_swinvit.pt``): ``{"state_dict": {"module.patch_embed...",
  "module.layers1.0.blocks.0.mlp.fc1.weight", ...}}``, the layout ``SwinUNETR.load_from`` reads;
* the encoder checkpoint written by ``bundles/swin_unetr_ssl_pretrain`` (keys as in ``SwinUNETR.swinViT``, possibly
  under ``swinViT.``), and any full SwinUNETR ``model.pt`` whose encoder should be reused.

The reference fine-tuning code loads such files with ``strict=False`` and silently loads nothing when the prefixes do
not match; here every encoder tensor is accounted for, and a load of zero tensors or of a tensor with another shape is
an error naming the file.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMergingV2
from monai.networks.utils import copy_model_state

from swin_unetr_kit.settings import network_flags

logger = logging.getLogger(__name__)

# containers under which trainers store a network's weights
_WRAPPER_KEYS = ("state_dict", "model", "network", "encoder", "model_state_dict")
# prefixes to strip from keys: DataParallel/DDP wrappers, then the encoder attribute of a full network
_KEY_PREFIXES = ("module.", "swinViT.", "encoder.")
# the released checkpoint names the MLP layers like timm, MONAI's MLPBlock names them linear1/linear2
_RENAMES = ((".mlp.fc1.", ".mlp.linear1."), (".mlp.fc2.", ".mlp.linear2."))
# the only encoder tensor whose shape depends on the number of input channels
PATCH_EMBED_KEY = "patch_embed.proj.weight"


class PretrainedWeightsError(ValueError):
    """A checkpoint that cannot initialise the encoder; the message names the file and the problem."""


class LegacyPatchMerging(PatchMergingV2):
    """3D patch merging in the sub-voxel order of MONAI < 1.5, for weights trained with it.

    MONAI 1.5 (PR #8285) fixed the 3D ``"merging"`` layer, which concatenated the eight 2x2x2 sub-voxels with
    (0,1,0) and (0,0,1) taken twice and (1,1,0) and (0,1,1) never. Weights trained before the fix, the released Swin
    UNETR SSL weights among them, load with identical shapes into the fixed layer but their ``reduction`` matrix then
    sees other inputs; pass this class as ``SwinUNETR(downsample=LegacyPatchMerging)`` to use them as trained.
    """

    # (depth, height, width) offset of each concatenated sub-voxel, in the order of MONAI < 1.5
    OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:  # 2D merging never changed
            return super().forward(x)
        if x.ndim != 5:
            raise ValueError(f"expected a 5D channels-last tensor, got shape {tuple(x.shape)}")
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in self.OFFSETS], -1)
        return self.reduction(self.norm(x))


def _unwrap(checkpoint: Mapping) -> Mapping:
    """Return the mapping of tensors inside the usual trainer containers."""
    for key in _WRAPPER_KEYS:
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return checkpoint


def _normalise_key(key: str) -> str:
    for prefix in _KEY_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def encoder_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """Map a checkpoint in any accepted layout to keys of ``SwinUNETR.swinViT.state_dict()``.

    Keys that cannot belong to the encoder (heads, decoders) are kept under their normalised names; the caller
    decides what matches.
    """
    tensors = _unwrap(checkpoint)
    return {_normalise_key(k): v for k, v in tensors.items() if isinstance(v, torch.Tensor)}


def _read_checkpoint(path: str, mmap: bool = False) -> object:
    """The tensors of the checkpoint at ``path`` (``weights_only``: no pickled code runs), memory-mapped where asked
    and the file is in torch's zip format.

    Raises:
        PretrainedWeightsError: a file that is no PyTorch checkpoint (empty, random bytes, a pickle of objects).
    """
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not torch's zip format: read it whole, which says what it is
            pass
    if os.path.getsize(path) == 0:
        raise PretrainedWeightsError(f"{path}: cannot be read as a PyTorch checkpoint (an empty file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's message is a page about weights_only; this is what it means
        raise PretrainedWeightsError(
            f"{path}: cannot be read as a PyTorch checkpoint (no tensors file, or one holding Python objects, which "
            "are not loaded)"
        ) from exc
    except Exception as exc:
        raise PretrainedWeightsError(f"{path}: cannot be read as a PyTorch checkpoint ({exc})") from exc


def checkpoint_feature_size(ckpt_paths: str | os.PathLike | list, default: int) -> int:
    """The ``feature_size`` of the SwinUNETR stored in the first of ``ckpt_paths`` that exists, else ``default``.

    A config builds its network with this so that it always fits the weights it will load: MONAI Label loads
    ``models/model.pt`` into the bundle's ``network_def`` after a user trained a smaller network from its UI. The
    training configs pass no path with ``--resume false``, whose run replaces those weights. A size other than
    ``default`` is logged.
    """
    for path in [ckpt_paths] if isinstance(ckpt_paths, (str, os.PathLike)) else ckpt_paths:
        if os.path.isfile(path):
            tensors = encoder_state_dict(_read_checkpoint(str(path), mmap=True))
            if PATCH_EMBED_KEY not in tensors:
                raise PretrainedWeightsError(
                    f"{path}: no SwinUNETR patch embedding ({PATCH_EMBED_KEY}) in the checkpoint"
                )
            size = int(tensors[PATCH_EMBED_KEY].shape[0])
            if size != default:
                logger.info("feature_size %d, that of %s (the bundle's is %d)", size, path, default)
            return size
    return default


def load_pretrained_encoder(network: SwinUNETR, ckpt_path: str | None, adapt_in_channels: bool = True) -> SwinUNETR:
    """Return ``network`` with its encoder initialised from ``ckpt_path``; nothing is loaded when the path is empty.

    A config routes its network through this function so that one override (``--pretrained_ckpt PATH``) turns the
    initialisation on; the network's switches set as strings are read as booleans (:func:`network_flags`).
    """
    if ckpt_path:
        load_encoder_weights(network.swinViT, ckpt_path, adapt_in_channels)
    return network_flags(network)


def _fit_input_channels(
    matched: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], adapt: bool, ckpt_path: str
) -> None:
    """Fit the patch embedding of a checkpoint trained on another number of input channels (the 1-channel CT weights
    into a 4-channel MRI network): spread its summed kernel evenly over the network's channels, so that an input
    repeated on every channel gives the pre-trained response, or leave it out when ``adapt`` is False. Logs which."""
    key = PATCH_EMBED_KEY
    if key not in matched or matched[key].shape == expected[key].shape:
        return
    weight, target = matched[key], expected[key]
    if weight.shape[:1] + weight.shape[2:] != target.shape[:1] + target.shape[2:]:
        return  # another feature_size or patch size: reported as a shape mismatch
    if not adapt:
        del matched[key]
        logger.warning(
            "pretrained encoder: %s has %d input channels, the network %d: patch embedding skipped (random init)",
            ckpt_path,
            weight.shape[1],
            target.shape[1],
        )
        return
    channels = target.shape[1]
    matched[key] = weight.sum(1, keepdim=True).repeat(1, channels, *([1] * (weight.ndim - 2))) / channels
    logger.warning(
        "pretrained encoder: %s has %d input channels, the network %d: patch embedding adapted (summed kernel spread "
        "evenly over the channels)",
        ckpt_path,
        weight.shape[1],
        channels,
    )


def load_encoder_weights(encoder: torch.nn.Module, ckpt_path: str, adapt_in_channels: bool = True) -> int:
    """Copy the encoder tensors in ``ckpt_path`` into ``encoder`` (a ``SwinTransformer``), log and return their count.

    A checkpoint with another number of input channels has its patch embedding adapted (``adapt_in_channels``) or
    skipped; every other difference in shape is an error.

    Raises:
        PretrainedWeightsError: the file is missing or unreadable, a tensor's shape differs from the network's (another
            feature_size, in_channels or use_v2), or no encoder tensor matched.
    """
    if not os.path.isfile(ckpt_path):
        raise PretrainedWeightsError(f"{ckpt_path}: pretrained checkpoint not found")
    checkpoint = _read_checkpoint(ckpt_path)
    if not isinstance(checkpoint, Mapping):
        raise PretrainedWeightsError(f"{ckpt_path}: expected a dict of tensors, found {type(checkpoint).__name__}")

    expected = encoder.state_dict()
    found = encoder_state_dict(checkpoint)
    matched = {k: v for k, v in found.items() if k in expected}
    _fit_input_channels(matched, expected, adapt_in_channels, ckpt_path)
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs network {tuple(expected[k].shape)}"
        for k, v in matched.items()
        if v.shape != expected[k].shape
    ]
    if mismatched:
        shown = "; ".join(mismatched[:5]) + (f"; ... {len(mismatched) - 5} more" if len(mismatched) > 5 else "")
        raise PretrainedWeightsError(
            f"{ckpt_path}: {len(mismatched)} encoder tensors have another shape than the network's ({shown}). "
            "Check feature_size, in_channels and use_v2 against the checkpoint."
        )
    if not matched:
        sample = ", ".join(list(found)[:3]) or "none"
        raise PretrainedWeightsError(
            f"{ckpt_path}: none of its {len(found)} tensors match the SwinUNETR encoder "
            f"(first keys after normalisation: {sample})"
        )
    # MONAI's copy; the legacy renames and the shape and count checks above are ours (it skips mismatches silently)
    _, loaded, missing = copy_model_state(encoder, matched)
    logger.info(
        "pretrained encoder: loaded %d of %d encoder tensors from %s (%d other tensors in the file ignored)",
        len(loaded),
        len(expected),
        ckpt_path,
        len(found) - len(loaded),
    )
    if missing:
        logger.warning(
            "pretrained encoder: %d encoder tensors keep their random init, e.g. %s", len(missing), sorted(missing)[0]
        )
    return len(loaded)
