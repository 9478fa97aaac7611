"""Self-supervised pre-training of the Swin UNETR encoder (Tang et al., CVPR 2022): the network with its three heads,
the proxy-task views, and the combined loss.

MONAI has the encoder (``SwinTransformer``, the ``swinViT`` of ``SwinUNETR``) and the contrastive loss; what it lacks
is here:

* :class:`SSLHead`: the encoder under the attribute name ``swinViT``, so its state dict keys are those of
  ``SwinUNETR`` and the checkpoint loads into the segmentation bundles as it is; with a rotation classifier (4 classes)
  and a contrastive projection (512-d) on two bottleneck tokens, and a convolutional decoder back to the input size;
* :func:`rotate` and :class:`SSLViewsd`: two independently rotated views of each crop; :func:`cutout` and
  :class:`SSLBatch`: their masking per batch, as the reference's ``aug_rand`` (noise boxes, then boxes pasted from
  another crop of the batch);
* :class:`SSLLoss`: rotation cross-entropy + NT-Xent contrastive + L1 reconstruction, each weighted and logged; the
  contrastive negatives are each process's own batch, as in the reference, or, on request, gathered across processes;
* :class:`SSLPredictor`, :class:`SSLFirstViewBatch` and :class:`SSLPredictionWriter`: the inference workflow's network,
  input and output, showing what pre-training learned (a masked, rotated view, its reconstruction and the predicted
  rotation).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.engine import Engine
from ignite.metrics import Average
from matplotlib.figure import Figure
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import create_file_basename
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.losses import ContrastiveLoss
from monai.networks.nets.swin_unetr import SwinTransformer
from monai.transforms import MapTransform, Randomizable, SaveImage
from torch import nn

from swin_unetr_kit.pretrained import LegacyPatchMerging
from swin_unetr_kit.visual import save_figure

logger = logging.getLogger(__name__)

# the plane of the reference code's rotation: the 2nd and 3rd spatial axes (tensor dims of a [C, X, Y, Z] crop)
ROTATION_PLANE = (2, 3)


class SSLHead(nn.Module):
    """Swin UNETR encoder with the three self-supervised heads of the paper.

    Args:
        in_channels: image channels.
        feature_size: embedding size of the encoder, a multiple of 12 (48 in the paper).
        legacy_patch_merging: build the encoder with the patch-merging order of MONAI < 1.5, as the released weights
            were trained with (see :class:`~swin_unetr_kit.pretrained.LegacyPatchMerging`).
        use_checkpoint: gradient checkpointing in the encoder (less memory, slower).
        use_v2: MONAI's SwinUNETR v2 encoder (extra residual blocks).
        contrastive_dim: size of the contrastive embedding.
    """

    def __init__(
        self,
        in_channels: int = 1,
        feature_size: int = 48,
        legacy_patch_merging: bool = False,
        use_checkpoint: bool = False,
        use_v2: bool = False,
        contrastive_dim: int = 512,
    ) -> None:
        super().__init__()
        if feature_size % 12:
            raise ValueError(f"feature_size must be a multiple of 12, got {feature_size}")
        # the same hyper-parameters as SwinUNETR's encoder, so the weights transfer one to one
        self.swinViT = SwinTransformer(  # noqa: N815 (SwinUNETR's attribute name, kept so state dict keys match)
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=(7, 7, 7),
            patch_size=(2, 2, 2),
            depths=(2, 2, 2, 2),
            num_heads=(3, 6, 12, 24),
            mlp_ratio=4.0,
            qkv_bias=True,
            use_checkpoint=use_checkpoint,
            spatial_dims=3,
            downsample=LegacyPatchMerging if legacy_patch_merging else "merging",
            use_v2=use_v2,
        )
        dim = 16 * feature_size
        self.rotation_head = nn.Linear(dim, 4)
        self.contrastive_head = nn.Linear(dim, contrastive_dim)
        channels = [dim, dim // 2, dim // 4, dim // 8, dim // 16, dim // 16]
        stages = []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            stages += [
                nn.Conv3d(c_in, c_out, kernel_size=3, padding=1),
                nn.InstanceNorm3d(c_out),
                nn.LeakyReLU(),
                nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
            ]
        stages.append(nn.Conv3d(channels[-1], in_channels, kernel_size=1))
        self.reconstruction_head = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``rotation`` logits [B, 4], ``contrastive`` embeddings [B, 512] and ``reconstruction`` [B, C, ...]."""
        bottleneck = self.swinViT(x.contiguous())[4]
        tokens = bottleneck.flatten(2).transpose(1, 2)  # B, tokens, 16 * feature_size
        return {
            "rotation": self.rotation_head(tokens[:, 0]),
            "contrastive": self.contrastive_head(tokens[:, 1]),
            "reconstruction": self.reconstruction_head(bottleneck),
        }


class SSLPredictor(SSLHead):
    """:class:`SSLHead` for inference, answering with one tensor [B, C + 4, ...]: the reconstruction's C channels,
    then the probabilities of the 4 rotation classes, each constant over space.

    One tensor is what MONAI's inferers, post-transforms and ``verify_net_in_out`` take; the state dict is
    :class:`SSLHead`'s, so the pre-training checkpoint loads as it is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        heads = super().forward(x)
        reconstruction = heads["reconstruction"]
        spatial = reconstruction.shape[2:]
        probabilities = heads["rotation"].float().softmax(1).to(reconstruction.dtype)
        return torch.cat([reconstruction, probabilities[(..., *[None] * len(spatial))].expand(-1, -1, *spatial)], 1)


def rotate(volume: torch.Tensor, k: int, plane: tuple[int, int] = ROTATION_PLANE) -> torch.Tensor:
    """``volume`` ([C, X, Y, Z]) turned by ``k`` quarter turns in ``plane``; :func:`rotate` with ``-k`` undoes it."""
    return torch.rot90(volume, k, plane)


def drop_boxes(
    volume: torch.Tensor,
    rng: np.random.RandomState,
    donor: torch.Tensor | None = None,
    max_fraction: float = 0.3,
    box_fraction: tuple[float, float] = (0.05, 0.25),
    generator: torch.Generator | None = None,
) -> None:
    """One pass of the reference's masked-volume inpainting (``patch_rand_drop``), in place on ``volume`` ([C, X, Y,
    Z]): random boxes until their summed volumes (overlaps counted again) reach a fraction of the voxels drawn
    uniformly in [0, ``max_fraction``].

    A box starts anywhere but the last ``box_fraction[0]`` of each dimension, its sides are drawn in
    [``box_fraction[0]``, ``box_fraction[1]``) of the dimension and cut at the border. It is filled with
    standard-normal noise min-max scaled to [0, 1] over the box, or, when ``donor`` is given, with ``donor``'s voxels
    at the same place.
    """
    spatial = volume.shape[1:]
    lows = [max(1, int(box_fraction[0] * s)) for s in spatial]
    highs = [max(low + 1, int(box_fraction[1] * s)) for low, s in zip(lows, spatial, strict=True)]
    target = rng.uniform(0.0, max_fraction) * math.prod(spatial)
    covered = 0
    while covered < target:
        starts = [rng.randint(0, s - low) for s, low in zip(spatial, lows, strict=True)]
        ends = [
            min(start + rng.randint(low, high), s)
            for start, low, high, s in zip(starts, lows, highs, spatial, strict=True)
        ]
        box = (slice(None), *(slice(a, b) for a, b in zip(starts, ends, strict=True)))
        if donor is None:
            shape = (volume.shape[0], *(b - a for a, b in zip(starts, ends, strict=True)))
            noise = torch.randn(shape, generator=generator, device=volume.device, dtype=torch.float32)
            volume[box] = ((noise - noise.min()) / (noise.max() - noise.min()).clamp_min(1e-12)).to(volume.dtype)
        else:
            volume[box] = donor[box]
        covered += math.prod(b - a for a, b in zip(starts, ends, strict=True))


def cutout(
    views: torch.Tensor,
    rng: np.random.RandomState,
    max_fraction: float = 0.3,
    box_fraction: tuple[float, float] = (0.05, 0.25),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The reference's masking of a batch of views ([B, C, X, Y, Z], ``aug_rand``), on a copy: each view in turn gets
    a pass of noise boxes (:func:`drop_boxes`), then, unless the draw is the view itself, a pass of boxes pasted from
    a view of the batch drawn at random, in the state it has at that moment (already masked if it came earlier)."""
    masked = views.detach().clone()
    for i in range(masked.shape[0]):
        drop_boxes(masked[i], rng, None, max_fraction, box_fraction, generator)
        other = int(rng.randint(0, masked.shape[0]))
        if other != i:
            drop_boxes(masked[i], rng, masked[other], max_fraction, box_fraction, generator)
    return masked


class SSLViewsd(Randomizable, MapTransform):
    """The rotations of the two views of each crop: for view ``i`` in (1, 2), ``target{i}`` is the crop turned by a
    random quarter turn (the reconstruction target) and ``rotation{i}`` the number of turns (0-3). The views are
    masked per batch, by :class:`SSLBatch`, since the masking pastes boxes from other crops of the batch."""

    def __init__(self, keys: KeysCollection = "image", plane: Sequence[int] = ROTATION_PLANE) -> None:
        MapTransform.__init__(self, keys)
        self.plane = (int(plane[0]), int(plane[1]))

    def randomize(self, data: object = None) -> None:
        self.rotations = [int(self.R.randint(0, 4)) for _ in range(2)]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            crop = torch.as_tensor(d[key]).float()
            for i, k in enumerate(self.rotations, start=1):
                d[f"target{i}"] = rotate(crop, k, self.plane)
                d[f"rotation{i}"] = torch.tensor(k)
        return d


class SSLBatch(Randomizable, PrepareBatch):
    """``prepare_batch`` for MONAI's trainers: the two views of :class:`SSLViewsd` masked on the device by
    :func:`cutout` (each view batch on its own, as the reference masks ``x1`` and ``x2``) and stacked as one batch
    (view 1 rows, then view 2 rows), with the unmasked rotated crops and the rotation classes as the label.

    Its random state is drawn from NumPy's global one at the first batch (so ``set_determinism`` and a per-process
    seed decide it) unless :meth:`set_random_state` was called.
    """

    def __init__(self, max_mask_fraction: float = 0.3, box_fraction: Sequence[float] = (0.05, 0.25)) -> None:
        self.max_mask_fraction = max_mask_fraction
        self.box_fraction = (float(box_fraction[0]), float(box_fraction[1]))
        self.R: np.random.RandomState | None = None  # type: ignore[assignment]

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> SSLBatch:
        if seed is None and state is None:
            seed = int(np.random.randint(0, 2**31))
        return Randomizable.set_random_state(self, seed, state)

    def __call__(
        self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.R is None:
            self.set_random_state()
        generator = torch.Generator(device=device or "cpu")
        generator.manual_seed(int(self.R.randint(0, 2**31)))
        inputs, targets, rotations = [], [], []
        for i in (1, 2):
            target = torch.as_tensor(batchdata[f"target{i}"]).to(device=device, non_blocking=non_blocking)
            inputs.append(cutout(target, self.R, self.max_mask_fraction, self.box_fraction, generator))
            targets.append(target)
            rotations.append(torch.as_tensor(batchdata[f"rotation{i}"]).to(device=device, non_blocking=non_blocking))
        return torch.cat(inputs), {"reconstruction": torch.cat(targets), "rotation": torch.cat(rotations).long()}


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All processes' rows of ``x``, keeping the gradient of this process's rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()))


class SSLFirstViewBatch(SSLBatch):
    """``prepare_batch`` for inference: view 1 of :class:`SSLViewsd`, masked as training masks it
    (:class:`SSLBatch`), as the input; no label."""

    def __call__(
        self, batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs
    ) -> tuple[torch.Tensor, None]:
        inputs, _ = super().__call__(batchdata, device, non_blocking, **kwargs)
        return inputs[: inputs.shape[0] // 2], None


class SSLLoss(nn.Module):
    """λ_rot · CE(rotation) + λ_con · NT-Xent(view 1, view 2) + λ_rec · L1(reconstruction, unmasked rotated crop).

    Predictions come from :class:`SSLHead` on the batch of :class:`SSLBatch` (view 1 rows, then view 2 rows).
    Under ``torch.distributed`` the contrastive term contrasts each process's own batch, as the reference code does
    (DDP then averages the processes' gradients). With ``gather_negatives`` it sees the embeddings of every process
    as negatives instead, which makes the loss independent of how a batch is split across GPUs: every process
    computes the same global loss, the gather's backward sums the processes' gradients for each one's rows, and
    DDP's averaging turns that sum back into the global loss's gradient. With one process both are the same.
    The terms of the last call are in :attr:`terms`, for logging.
    """

    def __init__(
        self,
        rotation_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
        temperature: float = 0.5,
        gather_negatives: bool = False,
    ) -> None:
        super().__init__()
        self.weights = {
            "rotation": rotation_weight,
            "contrastive": contrastive_weight,
            "reconstruction": reconstruction_weight,
        }
        self.contrastive = ContrastiveLoss(temperature=temperature)
        self.gather_negatives = gather_negatives
        self.terms: dict[str, float] = {}

    def compute_terms(
        self, pred: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The unweighted loss terms, and the rotation accuracy (no gradient)."""
        return ssl_terms(pred, target, self.contrastive, self.gather_negatives)

    def forward(self, pred: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        terms = self.compute_terms(pred, target)
        self.terms = {name: float(value.detach()) for name, value in terms.items()}
        total = sum(self.weights[name] * terms[name] for name in self.weights)
        self.terms["total"] = float(total.detach())
        return total


def ssl_terms(
    pred: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    contrastive: nn.Module,
    gather_negatives: bool = False,
) -> dict[str, torch.Tensor]:
    """The three unweighted loss terms, and the rotation accuracy (no gradient); the contrastive term over this
    process's rows, or over every process's with ``gather_negatives``."""
    half = pred["contrastive"].shape[0] // 2
    z = F.normalize(pred["contrastive"].float(), dim=1)
    z1, z2 = (gather_rows(z[:half]), gather_rows(z[half:])) if gather_negatives else (z[:half], z[half:])
    rotation = F.cross_entropy(pred["rotation"].float(), target["rotation"])
    return {
        "rotation": rotation,
        "contrastive": contrastive(z1, z2),
        "reconstruction": F.l1_loss(pred["reconstruction"].float(), target["reconstruction"].float()),
        "rotation_accuracy": (pred["rotation"].argmax(1) == target["rotation"]).float().mean().detach(),
    }


def ssl_metric(name: str, loss: SSLLoss) -> Average:
    """Validation metric: the batch-averaged ``name`` term of ``loss.compute_terms`` (``total``: the weighted sum)."""

    def select(output: Mapping) -> torch.Tensor:
        terms = loss.compute_terms(output["pred"], output["label"])
        if name == "total":
            return sum(loss.weights[k] * terms[k] for k in loss.weights).detach()
        return terms[name].detach()

    return Average(output_transform=select)


class GradientClipping:
    """Clip the gradient norm after the backward pass of MONAI's trainers, before the optimiser step (AMP-aware)."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        if self.max_norm and self.max_norm > 0:
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)


def decay_param_groups(network: nn.Module, weight_decay: float) -> list[dict]:
    """Optimiser parameter groups with ``weight_decay`` on weight matrices and kernels only: norms, biases (1-D
    parameters) and the relative-position bias tables of the Swin blocks are not decayed, as in SwinMM and most
    transformer recipes (decay would pull the position biases and normalisation gains towards zero)."""
    decay, no_decay = [], []
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or "relative_position_bias_table" in name:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class SSLPredictionWriter:
    """Post-processing of the inference workflow: for each case, what the network was shown and what it answered.

    Writes into ``output_dir``, named after the case's image: ``<case>_view.nii.gz`` (the rotated, masked crop the
    network saw), ``<case>_reconstruction.nii.gz`` (its reconstruction), ``<case>_target.nii.gz`` (the rotated crop
    before masking, what the reconstruction aims at), ``<case>_ssl.png`` (the three on the central slices of each
    axis) and ``<case>_rotation.json`` (the rotation applied and the one predicted, with the class probabilities, and
    the L1 distance to the target of the reconstruction and of the masked view). Volumes are written in Hounsfield
    units when ``hu_window`` (the scaling of the pre-processing) is given, else in the network's [0, 1] scale. As
    MONAI's ``SaveImage`` with ``data_root_dir``, a case keeps its folder below ``data_root_dir``, so that
    ``p1/img.nii.gz`` and ``p2/img.nii.gz`` get an output each (:func:`swin_unetr_kit.data.inference_inputs` refuses
    inputs that would still share one).

    Args:
        output_dir: output folder.
        in_channels: image channels (the first channels of the prediction are the reconstruction).
        hu_window: the HU range that pre-processing scaled to [0, 1], to undo it in the written volumes.
        data_root_dir: the folder the inputs have in common (:func:`swin_unetr_kit.data.input_root`).
    """

    def __init__(
        self,
        output_dir: str,
        in_channels: int = 1,
        hu_window: Sequence[float] | None = None,
        data_root_dir: str = "",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.in_channels = in_channels
        self.hu_window = (float(hu_window[0]), float(hu_window[1])) if hu_window is not None else None
        self.data_root_dir = data_root_dir

    def _volume(self, data: torch.Tensor, meta: dict) -> MetaTensor:
        volume = torch.as_tensor(data).detach().cpu().float()
        if self.hu_window is not None:
            volume = volume * (self.hu_window[1] - self.hu_window[0]) + self.hu_window[0]
        return MetaTensor(volume, meta=dict(meta))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        # "image" is the network's input (the masked view 1 of :class:`SSLFirstViewBatch`), "target1" the unmasked one
        view, target, pred = d["image"], d["target1"], torch.as_tensor(d["pred"]).detach().cpu().float()
        meta = dict(getattr(target, "meta", {}))
        source = str(meta.get("filename_or_obj", "case")).rstrip("/")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        base = create_file_basename("", source, str(self.output_dir), self.data_root_dir, False)  # <out>/<sub>/<case>
        name = Path(base).name
        volumes = {
            "view": self._volume(view, meta),
            "reconstruction": self._volume(pred[: self.in_channels], meta),
            "target": self._volume(target, meta),
        }
        for postfix, volume in volumes.items():
            writer = SaveImage(
                output_dir=str(self.output_dir),
                output_postfix=postfix,
                output_dtype=np.float32,
                resample=False,
                separate_folder=False,
                data_root_dir=self.data_root_dir,
                print_log=False,
            )
            writer(volume, meta_data={**meta, "filename_or_obj": source})
        probabilities = pred[self.in_channels :].flatten(1)[:, 0]
        applied, predicted = int(d["rotation1"]), int(probabilities.argmax())
        target_scaled = torch.as_tensor(target).detach().cpu().float()
        summary = {
            "case": source,
            "rotation_plane": "sagittal (the y-z plane of the RAS-oriented crop)",
            "rotation_applied_degrees": 90 * applied,
            "rotation_predicted_degrees": 90 * predicted,
            "rotation_probabilities": {str(90 * k): round(float(p), 4) for k, p in enumerate(probabilities)},
            "reconstruction_l1": float((pred[: self.in_channels] - target_scaled).abs().mean()),
            "masked_view_l1": float((torch.as_tensor(view).detach().cpu().float() - target_scaled).abs().mean()),
        }
        Path(f"{base}_rotation.json").write_text(json.dumps(summary, indent=2) + "\n")
        save_figure(_views_figure(volumes, name, summary), Path(f"{base}_ssl.png"))
        logger.info(
            "%s: rotation %d° applied, %d° predicted (p=%.2f); L1 to the unmasked crop: reconstruction %.4f, "
            "masked view %.4f",
            name,
            summary["rotation_applied_degrees"],
            summary["rotation_predicted_degrees"],
            float(probabilities.max()),
            summary["reconstruction_l1"],
            summary["masked_view_l1"],
        )
        return d


def _views_figure(volumes: Mapping[str, torch.Tensor], name: str, summary: Mapping) -> Figure:
    """The first channel of each volume on the central slice of each spatial axis (a row per axis)."""
    target = volumes["target"][0]
    low, high = float(target.min()), float(target.max())
    figure = Figure(figsize=(3.2 * len(volumes), 9.6), tight_layout=True)
    axes = figure.subplots(3, len(volumes), squeeze=False)
    for row, axis_name in enumerate(("x (sagittal)", "y (coronal)", "z (axial)")):
        for col, (title, volume) in enumerate(volumes.items()):
            plane = volume[0].select(row, volume.shape[row + 1] // 2).numpy()
            axes[row, col].imshow(plane.T, cmap="gray", vmin=low, vmax=high, origin="lower")
            axes[row, col].set_title(f"{title}, central {axis_name}", fontsize=9)
            axes[row, col].axis("off")
    figure.suptitle(
        f"{name}: rotation {summary['rotation_applied_degrees']}° applied, "
        f"{summary['rotation_predicted_degrees']}° predicted"
    )
    return figure
