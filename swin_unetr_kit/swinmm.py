"""SwinMM (Wang et al., MICCAI 2023): masked multi-view pre-training, cross-view fine-tuning and multi-view inference,
as parts the bundles' configs can name.

* :class:`View` (an axis ordering followed by quarter turns in one plane) and :data:`INFERENCE_VIEWS`;
* pre-training: :func:`grid_mask`, :class:`SwinMMViewsd`, :func:`prepare_swinmm_batch` and :class:`SwinMMLoss`, used
  with the same :class:`~swin_unetr_kit.ssl.SSLHead` as the Swin UNETR pre-training, so the checkpoint is the same;
* fine-tuning: :class:`CrossViewSwinUNETR` (a ``SwinUNETR`` run on two views with cross-attention between them at the
  bottleneck) and :class:`CrossViewLoss`;
* inference: :class:`MultiViewSlidingWindowInferer`, softmax (or sigmoid) averaging over views of every window.

Choices where the released SwinMM code and the paper differ are documented on each piece: the mask hides exactly
``mask_ratio`` of the cells (the released code hides 1 - ratio), and the cross-view network and the multi-view
inferer return log-probabilities of the fused prediction, so the bundles' softmax/argmax post-processing stays as it is.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.networks.blocks import CrossAttentionBlock
from monai.networks.nets import SwinUNETR
from monai.transforms import MapTransform, Randomizable
from monai.utils import ensure_tuple_rep
from torch import nn

from swin_unetr_kit.ssl import SSLLoss, gather_rows

IDENTITY = (0, 1, 2)


@dataclass(frozen=True)
class View:
    """A view of a volume: its spatial axes reordered by ``permutation``, then turned by ``quarter_turns`` × 90° in
    the plane of the last two spatial axes (the plane of the Swin UNETR pre-training's rotation).

    Works on any tensor whose last three dimensions are spatial ([C, X, Y, Z] or [B, C, X, Y, Z]);
    :meth:`invert` maps a view-frame tensor back to the original frame exactly.
    """

    permutation: tuple[int, int, int] = IDENTITY
    quarter_turns: int = 0

    def __post_init__(self) -> None:
        if sorted(self.permutation) != [0, 1, 2]:
            raise ValueError(f"permutation must order the spatial axes 0, 1, 2, got {self.permutation}")

    def _dims(self, x: torch.Tensor, order: Sequence[int]) -> list[int]:
        lead = x.ndim - 3
        return list(range(lead)) + [lead + a for a in order]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(self._dims(x, self.permutation))
        return torch.rot90(x, self.quarter_turns % 4, (-2, -1))

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.rot90(x, -self.quarter_turns % 4, (-2, -1))
        return x.permute(self._dims(x, np.argsort(self.permutation).tolist()))

    @property
    def is_identity(self) -> bool:
        return self.permutation == IDENTITY and self.quarter_turns % 4 == 0


# the axial, coronal and sagittal orderings of a cubic window (identity, then a swap of two axes, then another pair)
ORDERINGS = (IDENTITY, (0, 2, 1), (2, 1, 0))
# views of multi-view inference, in the order ``num_views`` takes them (skipping those that change the window's shape):
# the orderings, then the in-plane turns
INFERENCE_VIEWS = (
    View(),
    View((0, 2, 1)),
    View((2, 1, 0)),
    View(IDENTITY, 1),
    View(IDENTITY, 2),
    View(IDENTITY, 3),
    View((1, 0, 2)),
)


def keeps_shape(view: View, spatial_size: Sequence[int]) -> bool:
    """Whether ``view`` maps a window of ``spatial_size`` to a window of the same shape."""
    return tuple(view.apply(torch.empty(0, *spatial_size)).shape[1:]) == tuple(spatial_size)


def grid_mask(
    spatial_size: Sequence[int], cell_size: int, mask_ratio: float, rng: np.random.RandomState
) -> torch.Tensor:
    """A boolean [X, Y, Z] mask made of whole ``cell_size``³ cubes: exactly ``round(mask_ratio × cells)`` of the grid's
    cells are True (masked), chosen at random without replacement.

    Raises:
        ValueError: a spatial size not divisible by ``cell_size``, or a ratio outside [0, 1].
    """
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    if any(s % cell_size for s in spatial_size):
        raise ValueError(f"the crop {tuple(spatial_size)} is not divisible into {cell_size}^3 mask cells")
    grid = [s // cell_size for s in spatial_size]
    cells = math.prod(grid)
    chosen = np.zeros(cells, dtype=bool)
    chosen[rng.choice(cells, size=int(round(mask_ratio * cells)), replace=False)] = True
    mask = torch.from_numpy(chosen.reshape(grid))
    for axis in range(3):
        mask = mask.repeat_interleave(cell_size, dim=axis)
    return mask


class SwinMMViewsd(Randomizable, MapTransform):
    """Masked multi-view inputs of SwinMM pre-training for each crop.

    One :func:`grid_mask` per crop zeroes its masked cells; the masked crop is then seen through four views: two
    random quarter turns (views 1 and 2, as in the Swin UNETR pre-training), and the same two turns applied after a
    random non-identity axis ordering (views 3 and 4). Because every view is taken of the one masked crop, the mask is
    the same physical region in all of them.

    Writes ``views`` [4, C, X, Y, Z], ``rotation`` [4] (the quarter turns, the rotation head's labels),
    ``permutation`` [4, 3], ``mask`` [1, X, Y, Z] (1 = masked) and ``target`` (the unmasked crop, original frame).
    """

    def __init__(self, keys: KeysCollection = "image", mask_ratio: float = 0.5, cell_size: int = 16) -> None:
        MapTransform.__init__(self, keys)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1) for masked reconstruction, got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.cell_size = cell_size

    def randomize(self, data: object = None) -> None:
        turns = [int(self.R.randint(0, 4)) for _ in range(2)]
        orderings = [ORDERINGS[1 + int(self.R.randint(0, len(ORDERINGS) - 1))] for _ in range(2)]
        self.views = [View(IDENTITY, turns[0]), View(IDENTITY, turns[1]), View(orderings[0], turns[0])]
        self.views.append(View(orderings[1], turns[1]))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            crop = torch.as_tensor(d[key]).float()
            spatial = crop.shape[1:]
            if len(set(spatial)) != 1:
                raise ValueError(f"SwinMM views need a cubic crop (axis orderings), got {tuple(spatial)}")
            mask = grid_mask(spatial, self.cell_size, self.mask_ratio, self.R)
            masked = crop * (~mask).to(crop.dtype)
            d["views"] = torch.stack([view.apply(masked) for view in self.views])
            d["rotation"] = torch.tensor([view.quarter_turns for view in self.views])
            d["permutation"] = torch.tensor([view.permutation for view in self.views])
            d["mask"] = mask[None].float()
            d["target"] = crop
        return d


def prepare_swinmm_batch(
    batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs
):
    """``prepare_batch`` for MONAI's trainers: the views of a batch as one batch, view-major (all samples' view 1, then
    view 2, ...), with what :class:`SwinMMLoss` needs to map each reconstruction back to the original frame."""

    def to(x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(x).to(device=device, non_blocking=non_blocking)

    views = batchdata["views"]  # B, V, C, X, Y, Z
    inputs = views.transpose(0, 1).flatten(0, 1)
    targets = {
        "rotation": to(batchdata["rotation"].transpose(0, 1).flatten().long()),
        "permutation": batchdata["permutation"].transpose(0, 1).flatten(0, 1),
        "reconstruction": to(batchdata["target"]),
        "mask": to(batchdata["mask"]),
    }
    return to(inputs), targets


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked voxels (``mask`` [B, 1, ...], 1 = masked): the MSE over all voxels of
    ``mask · (a - b)²`` divided by the mask ratio, which is what SwinMM's normalisation amounts to."""
    squared = (a.float() - b.float()) ** 2 * mask
    return squared.sum() / (mask.sum() * a.shape[1]).clamp_min(1.0)


class SwinMMLoss(SSLLoss):
    """SwinMM pre-training loss on :class:`~swin_unetr_kit.ssl.SSLHead` predictions of a
    :func:`prepare_swinmm_batch` batch:

    λ_rot · CE(rotation, all views) + λ_con · NT-Xent(view 1 vs 2, view 3 vs 4, averaged) + λ_rec · masked MSE of each
    view's reconstruction mapped back to the original frame against the unmasked crop + λ_mut · masked MSE between
    the mapped-back reconstructions of every pair of views of a sample (mutual learning: zero when the views agree).
    """

    def __init__(
        self,
        rotation_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
        mutual_weight: float = 1.0,
        temperature: float = 0.5,
    ) -> None:
        super().__init__(rotation_weight, contrastive_weight, reconstruction_weight, temperature)
        self.weights["mutual"] = mutual_weight

    def compute_terms(
        self, pred: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        batch = target["reconstruction"].shape[0]
        mask = target["mask"]
        views = [
            View(tuple(int(a) for a in order), int(turns)).invert(rec[None])[0]
            for rec, order, turns in zip(
                pred["reconstruction"], target["permutation"], target["rotation"].cpu(), strict=True
            )
        ]
        reconstructions = torch.stack(views).unflatten(0, (-1, batch))  # V, B, C, X, Y, Z (original frame)
        z = F.normalize(pred["contrastive"].float(), dim=1).unflatten(0, (-1, batch))
        contrastive = [self.contrastive(gather_rows(z[i]), gather_rows(z[i + 1])) for i in range(0, len(z) - 1, 2)]
        pairs = list(itertools.combinations(range(len(reconstructions)), 2))
        return {
            "rotation": F.cross_entropy(pred["rotation"].float(), target["rotation"]),
            "contrastive": torch.stack(contrastive).mean(),
            "reconstruction": torch.stack(
                [masked_mse(rec, target["reconstruction"], mask) for rec in reconstructions]
            ).mean(),
            "mutual": torch.stack([masked_mse(reconstructions[i], reconstructions[j], mask) for i, j in pairs]).mean(),
            "rotation_accuracy": (pred["rotation"].argmax(1) == target["rotation"]).float().mean().detach(),
        }


def fuse_views(outputs: Sequence[torch.Tensor], activation: str = "softmax") -> torch.Tensor:
    """Average the views' probabilities (softmax over channels, or per-channel sigmoid) and return them as
    log-probabilities (softmax) or logits (sigmoid), so softmax/sigmoid and argmax/threshold afterwards give the
    averaged probabilities and their labels."""
    if activation == "softmax":
        probabilities = torch.stack([o.float().softmax(1) for o in outputs]).mean(0)
        return probabilities.clamp_min(torch.finfo(torch.float32).tiny).log()
    if activation == "sigmoid":
        probabilities = torch.stack([o.float().sigmoid() for o in outputs]).mean(0)
        return torch.logit(probabilities, eps=1e-7)
    raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")


class CrossViewFusion(nn.Module):
    """Bidirectional cross-attention between two views' bottleneck features (given in the same frame): each view's
    tokens attend to the other's, through one shared :class:`~monai.networks.blocks.CrossAttentionBlock`, with a
    learnable position embedding of the bottleneck's token grid; residual, pre-norm."""

    def __init__(self, dim: int, num_tokens: int, num_heads: int = 24) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.zeros(1, num_tokens, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.norm = nn.LayerNorm(dim)
        self.attention = CrossAttentionBlock(hidden_size=dim, num_heads=num_heads, qkv_bias=True)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens_a, tokens_b = (x.flatten(2).transpose(1, 2) for x in (a, b))
        if tokens_a.shape[1] != self.position.shape[1]:
            raise ValueError(
                f"cross-view fusion was built for {self.position.shape[1]} bottleneck tokens (roi_size / 32), got "
                f"{tokens_a.shape[1]} from a window of {tuple(a.shape[2:])} tokens: use the network's roi_size"
            )
        query_a, query_b = self.norm(tokens_a) + self.position, self.norm(tokens_b) + self.position
        fused_a = tokens_a + self.attention(query_a, context=query_b)
        fused_b = tokens_b + self.attention(query_b, context=query_a)
        return fused_a.transpose(1, 2).reshape(a.shape), fused_b.transpose(1, 2).reshape(b.shape)


class CrossViewSwinUNETR(SwinUNETR):
    """SwinMM's fine-tuning network: one ``SwinUNETR`` (shared encoder and decoder) applied to the window and to a
    second view of it, with :class:`CrossViewFusion` exchanging information between the two at the bottleneck.

    It is a ``SwinUNETR`` subclass with the same state dict keys plus ``fusion.*``, so pre-trained encoders (from
    either pre-training) load into it as into the plain network. Output, in the original frame of the window:

    * training mode: both views' logits concatenated on the channel axis ([B, 2 × out_channels, ...]), for
      :class:`CrossViewLoss`;
    * eval mode: the fused prediction, :func:`fuse_views` of the two (log-probabilities), for the unchanged
      softmax/argmax (or sigmoid/threshold) post-processing of the bundles.

    Args:
        roi_size: the training and sliding-window size; fixes the fusion's position embedding.
        second_view_permutation: the axis ordering of the second view; by default the first of (0, 2, 1), (2, 1, 0),
            (1, 0, 2) that keeps the window's shape (the first for a cubic window; (1, 0, 2) for 128 x 128 x 32).
        fusion_heads: attention heads of the fusion (divides ``16 × feature_size``).
        activation: ``softmax`` or ``sigmoid``, how the eval-mode fusion turns logits into probabilities.
        kwargs: ``SwinUNETR``'s arguments.
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        in_channels: int,
        out_channels: int,
        feature_size: int = 48,
        second_view_permutation: Sequence[int] | None = None,
        fusion_heads: int = 24,
        activation: str = "softmax",
        **kwargs,
    ) -> None:
        super().__init__(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size, **kwargs)
        if second_view_permutation is None:
            candidates = [View(order) for order in (*ORDERINGS[1:], (1, 0, 2)) if keeps_shape(View(order), roi_size)]
            if not candidates:
                raise ValueError(f"no axis re-ordering keeps the shape of the window {tuple(roi_size)}")
            self.view = candidates[0]
        else:
            self.view = View(tuple(int(a) for a in second_view_permutation))
        if not keeps_shape(self.view, roi_size):
            raise ValueError(f"the second view {self.view.permutation} changes the shape of the window {roi_size}")
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        self.activation = activation
        tokens = math.prod(int(s) // 32 for s in roi_size)
        self.fusion = CrossViewFusion(16 * feature_size, tokens, fusion_heads)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self._check_input_size(x_in.shape[2:])
        x = torch.cat([x_in, self.view.apply(x_in)])
        hidden = self.swinViT(x, self.normalize)
        first, second = hidden[4].chunk(2)
        first, second = self.fusion(first, self.view.invert(second))
        bottleneck = torch.cat([first, self.view.apply(second)])
        enc0 = self.encoder1(x)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        dec3 = self.decoder5(self.encoder10(bottleneck), hidden[3])
        dec0 = self.decoder2(self.decoder3(self.decoder4(dec3, enc3), enc2), enc1)
        logits = self.out(self.decoder1(dec0, enc0))
        first, second = logits.chunk(2)
        views = [first, self.view.invert(second)]
        if self.training:
            return torch.cat(views, 1)
        return fuse_views(views, self.activation)


class CrossViewLoss(nn.Module):
    """Dice-CE of each view's prediction (averaged over the views) + ``consistency_weight`` × the symmetric KL
    divergence between the two views' probabilities (softmax over classes, or per-channel Bernoulli for sigmoid).

    ``pred`` is the training-mode output of :class:`CrossViewSwinUNETR`; ``kwargs`` go to MONAI's ``DiceCELoss``.
    The terms of the last call are in :attr:`terms`, for logging.
    """

    def __init__(self, consistency_weight: float = 1.0, sigmoid: bool = False, num_views: int = 2, **kwargs) -> None:
        super().__init__()
        self.consistency_weight = consistency_weight
        self.sigmoid = sigmoid
        self.num_views = num_views
        self.dice_ce = DiceCELoss(to_onehot_y=not sigmoid, softmax=not sigmoid, sigmoid=sigmoid, **kwargs)
        self.terms: dict[str, float] = {}

    def _log_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        if self.sigmoid:  # each channel a Bernoulli variable: [log p, log (1 - p)] on a new last axis
            return torch.stack([F.logsigmoid(logits), F.logsigmoid(-logits)], -1)
        return logits.log_softmax(1)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape[1] % self.num_views:
            raise ValueError(f"expected {self.num_views} views' logits on the channel axis, got {pred.shape[1]}")
        views = pred.float().chunk(self.num_views, 1)
        segmentation = torch.stack([self.dice_ce(view, target) for view in views]).mean()
        log_p = [self._log_probabilities(view) for view in views]
        reduce = 1 if not self.sigmoid else -1  # the axis the distribution is over
        kl = [
            (F.kl_div(log_p[j], log_p[i], log_target=True, reduction="none").sum(reduce).mean())
            for i, j in itertools.permutations(range(self.num_views), 2)
        ]
        consistency = torch.stack(kl).mean()
        self.terms = {"segmentation": float(segmentation.detach()), "consistency": float(consistency.detach())}
        return segmentation + self.consistency_weight * consistency


class MultiViewSlidingWindowInferer(SlidingWindowInferer):
    """MONAI's sliding-window inference with every window predicted under ``num_views`` views (the first of
    :data:`INFERENCE_VIEWS`, or ``views``), mapped back to the window's frame and fused by :func:`fuse_views`.

    Test-time augmentation for a plain ``SwinUNETR`` and SwinMM's multi-view inference for either network. With the
    identity view alone it gives the softmax (and labels) of plain sliding-window inference: the fused output is the
    log-softmax of the logits, which differs from them by a per-voxel constant that blending and softmax cancel.
    Only views that keep the window's shape are taken: all seven for a cubic ``roi_size``, three for 128 x 128 x 32.
    ``prepare_network(network, window_shape)``, once per volume, gives what runs the windows instead of the network
    (the bundles pass :class:`~swin_unetr_kit.cpu_inference.CpuInference`).
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        num_views: int = 1,
        activation: str = "softmax",
        views: Sequence[View] | None = None,
        prepare_network: Callable[[nn.Module, Sequence[int]], Callable[..., torch.Tensor]] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(roi_size=roi_size, **kwargs)
        window = tuple(ensure_tuple_rep(roi_size, 3))
        if views is None:
            possible = [v for v in INFERENCE_VIEWS if keeps_shape(v, window)]
            if not 1 <= num_views <= len(possible):
                raise ValueError(
                    f"num_views must be 1 to {len(possible)} for a {window} window (the views that keep its shape), "
                    f"got {num_views}"
                )
            views = possible[:num_views]
        if not views:
            raise ValueError("at least one view is needed")
        changed = [v for v in views if not keeps_shape(v, window)]
        if changed:
            raise ValueError(f"views {changed} change the shape of the window {window}")
        fuse_views([torch.zeros(1, 1)], activation)  # checks the activation's name
        self.views = list(views)
        self.activation = activation
        self.prepare_network = prepare_network

    def predict_views(self, window: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs):
        outputs = [view.invert(network(view.apply(window), *args, **kwargs)) for view in self.views]
        return fuse_views(outputs, self.activation)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs):
        if self.prepare_network is not None and isinstance(network, nn.Module):
            network = self.prepare_network(network, (self.sw_batch_size, inputs.shape[1], *self.roi_size))

        def fused(window: torch.Tensor, *a, **k) -> torch.Tensor:
            return self.predict_views(window, network, *a, **k)

        return super().__call__(inputs, fused, *args, **kwargs)
