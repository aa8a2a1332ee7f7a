"""Pieces shared by every feature-distillation loss, written once.

Notation: S = student feature (N x Cs x H x W), T = teacher feature
(N x Ct x H x W, same H x W), f_align = 1x1 conv Cs -> Ct (identity if Cs == Ct).
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ('sum_over_batch', 'mean')


def make_align(student_channels: int, teacher_channels: int) -> nn.Module:
    """f_align: a 1x1 conv (with bias, as MGD/FGD) when Cs != Ct, identity otherwise."""
    if student_channels == teacher_channels:
        return nn.Identity()
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1)


def make_generation(channels: int) -> nn.Sequential:
    """MGD's generation block G: conv3x3 -> ReLU -> conv3x3 (channels = teacher channels)."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1))


class SEBlock(nn.Module):
    """Squeeze-excite: x * sigmoid(W2 ReLU(W1 avgpool_{h,w}(x))), hidden = max(1, C // ratio)."""

    def __init__(self, channels: int, ratio: int = 16):
        super().__init__()
        hidden = max(1, channels // ratio)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        w = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(w))))


def spatial_attention(feat: Tensor, tau: float) -> Tensor:
    """A^S = H*W * softmax_{h,w}(mean_c |feat| / tau), shape N x 1 x H x W (sums to H*W)."""
    n, _, h, w = feat.shape
    logits = feat.abs().mean(dim=1).reshape(n, h * w) / tau
    return (h * w * F.softmax(logits, dim=1)).reshape(n, 1, h, w)


def channel_attention(feat: Tensor, tau: float) -> Tensor:
    """A^C = C * softmax_c(mean_{h,w} |feat| / tau), shape N x C x 1 x 1 (sums to C)."""
    n, c = feat.shape[:2]
    logits = feat.abs().mean(dim=(2, 3)) / tau
    return (c * F.softmax(logits, dim=1)).reshape(n, c, 1, 1)


def num_masked(ratio: float, total: int) -> int:
    """round(ratio * total), rounding halves up (not Python's banker's rounding)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f'mask ratio must be in [0, 1], got {ratio}')
    return min(total, int(ratio * total + 0.5))


def sample_attention_mask(attention: Tensor, ratio: float) -> Tensor:
    """Keep-mask (1 = keep, 0 = masked) of the same shape N x M as ``attention``.

    Per row, exactly ``num_masked(ratio, M)`` entries are masked, drawn WITHOUT
    replacement with probability proportional to the attention (torch.multinomial,
    torch's global RNG).  Weights are clamped at 1e-12 of the row maximum so that
    underflowed softmax entries can still be drawn last (multinomial without
    replacement needs enough non-zero weights).
    """
    n, m = attention.shape
    keep = torch.ones(n, m, device=attention.device, dtype=attention.dtype)
    k = num_masked(ratio, m)
    if k == 0:
        return keep
    weights = attention.detach().float()
    weights = torch.maximum(weights, 1e-12 * weights.amax(dim=1, keepdim=True))
    idx = torch.multinomial(weights, k, replacement=False)
    return keep.scatter_(1, idx, 0.0)


def channel_normalize(feat: Tensor, eps: float = 1e-6) -> Tensor:
    """Per channel, zero mean and unit (population) std over (N, H, W): (x - mu) / (std + eps)."""
    mean = feat.mean(dim=(0, 2, 3), keepdim=True)
    std = feat.var(dim=(0, 2, 3), unbiased=False, keepdim=True).sqrt()
    return (feat - mean) / (std + eps)


def reconstruction_loss(pred: Tensor, target: Tensor, reduction: str) -> Tensor:
    """Squared error between reconstruction and teacher.

    'sum_over_batch': sum over C, H, W, mean over N (MGD's sum(...)/N);
    'mean':           mean over all N*C*H*W elements (Eq. 8's 1/N_l).
    """
    sq = (pred - target) ** 2
    if reduction == 'sum_over_batch':
        return sq.sum() / pred.shape[0]
    if reduction == 'mean':
        return sq.mean()
    raise ValueError(f'reduction must be one of {REDUCTIONS}, got {reduction!r}')


def check_no_reduction(reduction: Optional[str], name: str) -> None:
    """Losses with a single fixed normalisation accept only reduction=None."""
    if reduction is not None:
        raise ValueError(f'{name} has a fixed reduction; got reduction={reduction!r}')


def boxes_to_cells(boxes: Tensor, feat_hw: Tuple[int, int], stride: Optional[int] = None,
                   img_shape: Optional[Tuple[int, int]] = None) -> List[Tuple[int, int, int, int]]:
    """Map k x 4 xyxy pixel boxes to feature-cell ranges (row0, row1, col0, col1), ends exclusive.

    Feature coordinates are box / stride when ``stride`` is given; otherwise FGD's
    scaling box / img_shape * (H, W).  A box covers every cell it overlaps:
    rows floor(y1) .. ceil(y2) - 1 (at least one cell), clipped to the map.
    """
    h, w = feat_hw
    if boxes.numel() == 0:
        return []
    b = boxes.detach().float().cpu()
    if stride is not None:
        b = b / float(stride)
    elif img_shape is not None:
        sy, sx = h / float(img_shape[0]), w / float(img_shape[1])
        b = b * torch.tensor([sx, sy, sx, sy])
    else:
        raise ValueError('boxes_to_cells needs stride or img_shape')
    cells = []
    for x1, y1, x2, y2 in b.tolist():
        r0, c0 = math.floor(y1), math.floor(x1)
        r1, c1 = max(math.ceil(y2), r0 + 1), max(math.ceil(x2), c0 + 1)
        r0, r1 = max(r0, 0), min(r1, h)
        c0, c1 = max(c0, 0), min(c1, w)
        if r1 > r0 and c1 > c0:
            cells.append((r0, r1, c0, c1))
    return cells


def per_image(seq: Optional[Sequence], n: int, name: str) -> Sequence:
    """Validate a per-image list (gt_bboxes / img_shapes) of length N; None -> [None]*N."""
    if seq is None:
        return [None] * n
    if len(seq) != n:
        raise ValueError(f'{name} has {len(seq)} entries for a batch of {n}')
    return seq
