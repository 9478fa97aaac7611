"""SwinMM (Wang et al., MICCAI 2023): masked multi-view pre-training, cross-view fine-tuning and multi-view inference,
as parts the bundles' configs can name. Each piece follows the released SwinMM code (UCSC-VLAA/SwinMM, ``Pretrain/``
and ``WORD/``); where it does not, its docstring says so and why.

* :class:`View` (an axis ordering followed by quarter turns in one plane) and :data:`INFERENCE_VIEWS`;
* pre-training: :func:`grid_mask`, :class:`SwinMMViewsd`, :func:`prepare_swinmm_batch` and :class:`SwinMMLoss`, used
  with the same :class:`~swin_unetr_kit.ssl.SSLHead` as the Swin UNETR pre-training, so the checkpoint is the same;
* fine-tuning: :class:`CrossViewSwinUNETR` (a ``SwinUNETR`` run on two axis orderings of a window, cross-attention
  between them after ``encoder10``) and :class:`CrossViewLoss`;
* inference: :class:`MultiViewSlidingWindowInferer`: the cross-view network over all its view pairs (the released
  test script), or test-time views for a plain network.

The cross-view network and the multi-view inferer return log-probabilities of the fused prediction, so the bundles'
softmax/argmax (or sigmoid/threshold) post-processing stays as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.networks.blocks import CrossAttentionBlock, UnetrBasicBlock
from monai.networks.nets import SwinUNETR
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_tensor, ensure_tuple_rep
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


# the released SwinMM code's axis orderings of a cubic window (its ``permutation_transforms`` 0, 1, 2): the identity, a
# swap of the first two spatial axes, a swap of the first and last; pre-training permutes with the last two
ORDERINGS = (IDENTITY, (1, 0, 2), (2, 1, 0))
# test-time views of a plain network, in the order ``num_views`` takes them (skipping those that change the window's
# shape): the orderings, then the in-plane turns
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
    """Masked multi-view inputs of SwinMM pre-training for each crop, as the released code builds them.

    Views 1 and 2 are the crop under two independent random quarter turns (the Swin UNETR pre-training's rotation),
    each masked by its own :func:`grid_mask` drawn in its own frame; view 3 is masked view 1 under a random
    non-identity axis ordering (:data:`ORDERINGS` 1 or 2), view 4 masked view 2 under another, independent draw (the two
    may coincide). So views 1 and 3 share mask 1, views 2 and 4 share mask 2.

    Writes ``views`` [4, C, X, Y, Z]; ``rotation`` [2] (the turns of views 1 and 2, the rotation head's labels);
    ``permutation`` [2, 3] (the orderings of views 3 and 4); ``mask`` [2, 1, X, Y, Z] (1 = masked, in the frames of
    views 1 and 2) and ``target`` [2, C, X, Y, Z] (views 1 and 2 unmasked, the reconstruction targets).

    Differs from the released code in one way: turns, masks and orderings are drawn per crop here, in the data
    pipeline; there the turns are per crop but each mask and ordering is drawn once per batch (an artefact of
    masking on the GPU; per crop gives every crop the same distribution and decorrelates the crops of a batch).
    """

    def __init__(self, keys: KeysCollection = "image", mask_ratio: float = 0.5, cell_size: int = 16) -> None:
        MapTransform.__init__(self, keys)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1) for masked reconstruction, got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.cell_size = cell_size

    def randomize(self, data: object = None) -> None:
        self.turns = [int(self.R.randint(0, 4)) for _ in range(2)]
        self.orderings = [ORDERINGS[1 + int(self.R.randint(0, len(ORDERINGS) - 1))] for _ in range(2)]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            crop = convert_to_tensor(d[key], dtype=torch.float32, track_meta=False)
            spatial = crop.shape[1:]
            if len(set(spatial)) != 1:
                raise ValueError(f"SwinMM views need a cubic crop (axis orderings), got {tuple(spatial)}")
            rotated = [View(IDENTITY, turns).apply(crop) for turns in self.turns]
            masks = [grid_mask(spatial, self.cell_size, self.mask_ratio, self.R) for _ in rotated]
            masked = [x * (~mask).to(x.dtype) for x, mask in zip(rotated, masks, strict=True)]
            permuted = [View(order).apply(x) for order, x in zip(self.orderings, masked, strict=True)]
            d["views"] = torch.stack(masked + permuted)
            d["rotation"] = torch.tensor(self.turns)
            d["permutation"] = torch.tensor(self.orderings)
            d["mask"] = torch.stack(masks)[:, None].float()
            d["target"] = torch.stack(rotated)
        return d


def prepare_swinmm_batch(
    batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs
):
    """``prepare_batch`` for MONAI's trainers: the views of a batch as one batch, view-major (all samples' view 1, then
    view 2, ...), and the targets of the rotated views 1 and 2 in the same order (all view 1 rows, then all view 2
    rows), with the orderings :class:`SwinMMLoss` needs to map views 3 and 4 back onto them."""

    def to(x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(x).to(device=device, non_blocking=non_blocking)

    def view_major(x: torch.Tensor) -> torch.Tensor:  # B, V, ... -> V·B, ...
        return torch.as_tensor(x).transpose(0, 1).flatten(0, 1)

    targets = {
        "rotation": to(view_major(batchdata["rotation"]).long()),
        "permutation": view_major(batchdata["permutation"]),
        "reconstruction": to(view_major(batchdata["target"])),
        "mask": to(view_major(batchdata["mask"])),
    }
    return to(view_major(batchdata["views"])), targets


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked voxels (``mask`` [B, 1, ...], 1 = masked): the sum of ``mask · (a - b)²``
    over the masked voxels' count. The released code takes the mean over all voxels divided by the mask ratio, the same
    value whenever the mask hides exactly that ratio (as :func:`grid_mask` does)."""
    squared = (a.float() - b.float()) ** 2 * mask
    return squared.sum() / (mask.sum() * a.shape[1]).clamp_min(1.0)


def normalise_per_sample(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each sample and channel of ``x`` [B, C, ...] shifted and scaled to zero mean, unit variance over its voxels: the
    released code's ``norm_pix_loss`` target (unbiased variance, ``eps`` added to it)."""
    flat = x.float().flatten(2)
    mean, var = flat.mean(-1, keepdim=True), flat.var(-1, keepdim=True)
    return ((flat - mean) / (var + eps).sqrt()).reshape(x.shape)


class SwinMMLoss(SSLLoss):
    """SwinMM pre-training loss on :class:`~swin_unetr_kit.ssl.SSLHead` predictions of a
    :func:`prepare_swinmm_batch` batch, the released code's terms:

    * ``rotation``: CE of the rotation head on views 1 and 2;
    * ``contrastive``: NT-Xent between views 1 and 2 (temperature 0.5);
    * ``reconstruction``: masked MSE of views 1 and 2 against their unmasked rotated crops;
    * ``permuted_reconstruction``: the same for views 3 and 4, their reconstructions mapped back to the frames of
      views 1 and 2 (no rotation or contrastive term on them);
    * ``mutual``: masked MSE (mask 1) between view 3's mapped-back reconstruction and view 1's.

    Total = λ_rot · rotation + λ_con · contrastive + λ_rec · (reconstruction + permuted_reconstruction)
    + λ_mut · mutual. The contrastive negatives are this process's rows, as in the released code, or every
    process's with ``gather_negatives`` (see :class:`~swin_unetr_kit.ssl.SSLLoss`). With ``norm_pix_loss`` (the
    released run's setting) the reconstruction targets are :func:`normalise_per_sample`; the mutual term compares the
    two reconstructions as they are.
    """

    def __init__(
        self,
        rotation_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
        mutual_weight: float = 1.0,
        temperature: float = 0.5,
        norm_pix_loss: bool = True,
        gather_negatives: bool = False,
    ) -> None:
        super().__init__(rotation_weight, contrastive_weight, reconstruction_weight, temperature, gather_negatives)
        self.weights["permuted_reconstruction"] = reconstruction_weight
        self.weights["mutual"] = mutual_weight
        self.norm_pix_loss = norm_pix_loss

    def compute_terms(
        self, pred: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        rows = target["reconstruction"].shape[0]  # views 1 and 2 of every sample
        batch = rows // 2
        mask = target["mask"]
        goal = normalise_per_sample(target["reconstruction"]) if self.norm_pix_loss else target["reconstruction"]
        rotated = pred["reconstruction"][:rows]
        permuted = torch.cat(
            [
                View(tuple(int(a) for a in order)).invert(rec[None])
                for rec, order in zip(pred["reconstruction"][rows:], target["permutation"], strict=True)
            ]
        )
        z = F.normalize(pred["contrastive"][:rows].float(), dim=1)
        rotation_logits = pred["rotation"][:rows]
        return {
            "rotation": F.cross_entropy(rotation_logits.float(), target["rotation"]),
            "contrastive": self.contrastive(
                *((gather_rows(z[:batch]), gather_rows(z[batch:])) if self.gather_negatives else (z[:batch], z[batch:]))
            ),
            "reconstruction": masked_mse(rotated, goal, mask),
            "permuted_reconstruction": masked_mse(permuted, goal, mask),
            "mutual": masked_mse(permuted[:batch], rotated[:batch], mask[:batch]),
            "rotation_accuracy": (rotation_logits.argmax(1) == target["rotation"]).float().mean().detach(),
        }


def _probabilities(logits: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "softmax":
        return logits.float().softmax(1)
    if activation == "sigmoid":
        return logits.float().sigmoid()
    raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")


def _from_probabilities(probabilities: torch.Tensor, activation: str) -> torch.Tensor:
    """Log-probabilities (softmax) or logits (sigmoid) whose softmax/sigmoid gives ``probabilities`` back."""
    if activation == "softmax":
        return probabilities.clamp_min(torch.finfo(torch.float32).tiny).log()
    return torch.logit(probabilities, eps=1e-7)


def fuse_views(outputs: Sequence[torch.Tensor], activation: str = "softmax") -> torch.Tensor:
    """Average the views' probabilities (softmax over channels, or per-channel sigmoid) and return them as
    log-probabilities (softmax) or logits (sigmoid), so softmax/sigmoid and argmax/threshold afterwards give the
    averaged probabilities and their labels (the argmax of the released code's sum of softmax outputs)."""
    probabilities = torch.stack([_probabilities(o, activation) for o in outputs]).mean(0)
    return _from_probabilities(probabilities, activation)


class CrossViewFusion(nn.Module):
    """The released SwinMM code's one-layer ``TransFusion`` between two views' bottleneck features (given in the
    same frame): a shared 1×1×1 convolution embeds each view's tokens, a learnable position embedding of the token grid
    is added, both are layer-normed and each attends to the other through one shared
    :class:`~monai.networks.blocks.CrossAttentionBlock`; the attention outputs, layer-normed, REPLACE the features
    (no residual add)."""

    def __init__(self, dim: int, num_tokens: int, num_heads: int = 24, dropout_rate: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Conv3d(dim, dim, kernel_size=1)
        self.position = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.dropout = nn.Dropout(dropout_rate)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attention = CrossAttentionBlock(hidden_size=dim, num_heads=num_heads, qkv_bias=True)
        self.out_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens_a, tokens_b = (self.embed(x).flatten(2).transpose(1, 2) for x in (a, b))
        if tokens_a.shape[1] != self.position.shape[1]:
            raise ValueError(
                f"cross-view fusion was built for {self.position.shape[1]} bottleneck tokens (roi_size / 32), got "
                f"{tokens_a.shape[1]} from a window of {tuple(a.shape[2:])} tokens: use the network's roi_size"
            )
        tokens_a = self.norm(self.dropout(tokens_a + self.position))
        tokens_b = self.norm(self.dropout(tokens_b + self.position))
        fused_a = self.out_norm(self.attention(tokens_a, context=tokens_b))
        fused_b = self.out_norm(self.attention(tokens_b, context=tokens_a))
        return fused_a.transpose(1, 2).reshape(a.shape), fused_b.transpose(1, 2).reshape(b.shape)


class CrossViewSwinUNETR(SwinUNETR):
    """SwinMM's fine-tuning network (the released ``WORD/models/swin_unetr.py``): one ``SwinUNETR`` (shared encoder
    and decoder) run on two axis orderings of the window, with

    * ``encoder5``, a residual ``UnetrBasicBlock`` on the 4th hidden state, whose output the decoder takes as its skip
      instead of the raw hidden state;
    * :class:`CrossViewFusion` after ``encoder10``, in the frame of the first view, replacing both views' bottleneck
      features.

    The views are the orderings of :data:`ORDERINGS` that keep the window's shape (all three for a cube; the identity
    and (1, 0, 2) for 128 x 128 x 32). Output, in the original frame of the window:

    * training mode: two distinct orderings drawn at random (torch's generator) at every call, both views' logits
      concatenated on the channel axis ([B, 2 × out_channels, ...]) for :class:`CrossViewLoss`;
    * eval mode: :func:`fuse_views` of every view of every pair of :attr:`view_pairs` (the released test script's six
      outputs for a cube), window by window, for plain inferers and export. :class:`MultiViewSlidingWindowInferer`
      instead stitches each output over the volume before fusing, as the released test script does.

    It is a ``SwinUNETR`` subclass: its state dict has the plain network's keys plus ``encoder5.*`` and ``fusion.*``,
    so pre-trained encoders (from either pre-training) load into it as into the plain network.

    Args:
        roi_size: the training and sliding-window size; fixes the fusion's position embedding.
        fusion_heads: attention heads of the fusion (divides ``16 × feature_size``; the released code uses 24).
        activation: ``softmax`` or ``sigmoid``, how the eval-mode fusion turns logits into probabilities.
        kwargs: ``SwinUNETR``'s arguments.
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        in_channels: int,
        out_channels: int,
        feature_size: int = 48,
        fusion_heads: int = 24,
        activation: str = "softmax",
        **kwargs,
    ) -> None:
        super().__init__(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size, **kwargs)
        self.orderings = [View(order) for order in ORDERINGS if keeps_shape(View(order), roi_size)]
        if len(self.orderings) < 2:
            raise ValueError(
                f"the window {tuple(roi_size)} keeps its shape under only {len(self.orderings)} of the axis orderings "
                f"{ORDERINGS}; cross-view fine-tuning needs two (a cube, or two equal leading sizes)"
            )
        # the released test script's pairs: every ordering once as the first view, with the next one
        self.view_pairs = [(i, (i + 1) % len(self.orderings)) for i in range(len(self.orderings))]
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
        self.activation = activation
        self.encoder5 = UnetrBasicBlock(
            spatial_dims=3,
            in_channels=8 * feature_size,
            out_channels=8 * feature_size,
            kernel_size=3,
            stride=1,
            norm_name=kwargs.get("norm_name", "instance"),
            res_block=True,
        )
        tokens = math.prod(int(s) // 32 for s in roi_size)
        self.fusion = CrossViewFusion(16 * feature_size, tokens, fusion_heads, kwargs.get("drop_rate", 0.0))

    def forward_views(self, x_in: torch.Tensor, pair: Sequence[int]) -> list[torch.Tensor]:
        """The logits of the two views ``pair`` (indices into :attr:`orderings`) of ``x_in``, each mapped back to the
        frame of ``x_in``."""
        first, second = (self.orderings[i] for i in pair)
        x = torch.cat([first.apply(x_in), second.apply(x_in)])
        hidden = self.swinViT(x, self.normalize)
        enc0 = self.encoder1(x)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        enc4 = self.encoder5(hidden[3])
        bottleneck_a, bottleneck_b = self.encoder10(hidden[4]).chunk(2)
        fused_a, fused_b = self.fusion(bottleneck_a, first.apply(second.invert(bottleneck_b)))
        bottleneck = torch.cat([fused_a, second.apply(first.invert(fused_b))])
        dec0 = self.decoder2(self.decoder3(self.decoder4(self.decoder5(bottleneck, enc4), enc3), enc2), enc1)
        logits_a, logits_b = self.out(self.decoder1(dec0, enc0)).chunk(2)
        return [first.invert(logits_a), second.invert(logits_b)]

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self._check_input_size(x_in.shape[2:])
        if self.training:
            pair = torch.randperm(len(self.orderings))[:2].tolist()
            return torch.cat(self.forward_views(x_in, pair), 1)
        return fuse_views([o for pair in self.view_pairs for o in self.forward_views(x_in, pair)], self.activation)


class CrossViewLoss(nn.Module):
    """The released SwinMM fine-tuning loss: the mean over the views of [Dice-CE(view, label) + ``consistency_weight``
    × the mean over the other views of ``KLDivLoss(reduction='mean')(log p_view, p_other)``], i.e. KL averaged over
    every element, the class axis included. ``sigmoid``: each channel a Bernoulli variable, the KL over the stacked
    [p, 1 - p] the same way (the released code has softmax only).

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
        kl = [
            F.kl_div(log_p[i], log_p[j], log_target=True, reduction="none").mean()
            for i in range(self.num_views)
            for j in range(self.num_views)
            if i != j
        ]
        consistency = torch.stack(kl).mean()
        self.terms = {"segmentation": float(segmentation.detach()), "consistency": float(consistency.detach())}
        return segmentation + self.consistency_weight * consistency


def _cross_view_network(network: Callable) -> CrossViewSwinUNETR | None:
    """The :class:`CrossViewSwinUNETR` behind ``network`` (itself, or inside a DDP/DataParallel wrapper), if any."""
    module = getattr(network, "module", network)
    return module if isinstance(module, CrossViewSwinUNETR) else None


class MultiViewSlidingWindowInferer(SlidingWindowInferer):
    """MONAI's sliding-window inference over several views, fused by :func:`fuse_views`.

    * For a :class:`CrossViewSwinUNETR`: SwinMM's multi-view inference as the released test script does it. For each
      of the network's :attr:`~CrossViewSwinUNETR.view_pairs` one sliding-window pass of the two-view network, each
      view's logits mapped back and stitched over the volume (with this inferer's blending, Gaussian in the bundles);
      then the softmax (or sigmoid, the network's ``activation``) of every stitched output, averaged over the six
      outputs (three pairs) and returned as log-probabilities. ``num_views`` must be 1 (the network brings its views).
    * For any other network: test-time augmentation, every window predicted under ``num_views`` views (the first of
      :data:`INFERENCE_VIEWS`, or ``views``), mapped back to the window's frame and fused window by window. With the
      identity view alone it gives the softmax (and labels) of plain sliding-window inference: the fused output is the
      log-softmax of the logits, which differs from them by a per-voxel constant that blending and softmax cancel.
      Only views that keep the window's shape are taken: all seven for a cubic ``roi_size``, three for 128 x 128 x 32.
    ``prepare_network(network, window_shape)``, once per volume, gives what runs the windows instead of a plain
    network (the bundles pass :class:`~swin_unetr_kit.cpu_inference.CpuInference`); a cross-view network runs as it is.
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
        _probabilities(torch.zeros(1, 1), activation)  # checks the activation's name
        self.views = list(views)
        self.activation = activation
        self.prepare_network = prepare_network

    def predict_views(self, window: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs):
        outputs = [view.invert(network(view.apply(window), *args, **kwargs)) for view in self.views]
        return fuse_views(outputs, self.activation)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs):
        cross_view = _cross_view_network(network)
        if cross_view is not None:
            return self.cross_view_inference(inputs, cross_view, *args, **kwargs)
        if self.prepare_network is not None and isinstance(network, nn.Module):
            network = self.prepare_network(network, (self.sw_batch_size, inputs.shape[1], *self.roi_size))

        def fused(window: torch.Tensor, *a, **k) -> torch.Tensor:
            return self.predict_views(window, network, *a, **k)

        return super().__call__(inputs, fused, *args, **kwargs)

    def cross_view_inference(self, inputs: torch.Tensor, network: CrossViewSwinUNETR, *args, **kwargs):
        """The released test script's inference: stitch each view of each pair, then average their probabilities."""
        if self.views != [View()]:
            raise ValueError(
                "a CrossViewSwinUNETR brings its own views (every pair of its orderings, as SwinMM's inference does): "
                f"use num_views 1 with it, got {len(self.views)} views"
            )
        total, count = None, 0
        for pair in network.view_pairs:

            def both_views(window: torch.Tensor, *a, pair: Sequence[int] = pair, **k) -> torch.Tensor:
                return torch.cat(network.forward_views(window, pair), 1)

            stitched = super().__call__(inputs, both_views, *args, **kwargs)
            for output in stitched.chunk(2, 1):
                probabilities = _probabilities(output, network.activation)
                total = probabilities if total is None else total + probabilities
                count += 1
        return _from_probabilities(total / count, network.activation)
