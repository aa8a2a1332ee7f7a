"""MAR (Zeng et al., IJCSE 2024): multi-value-mask feature distillation (MARLoss) and its relation
term on the classification head (MARRelationLoss); a MAR row uses both."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.registry import MODELS
from torch import Tensor

from dfmsd.core.errors import DistillError

from .common import DistillLoss, make_align
from .dense_heads import checked_head, cls_features, has_cls_tower


def box_cells(box: Sequence[float], stride: int, hw: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(row0, row1, col0, col1), ends exclusive: every cell of the map the xyxy box overlaps."""
    h, w = hw
    x1, y1, x2, y2 = (v / stride for v in box)
    r0, c0 = max(math.floor(y1), 0), max(math.floor(x1), 0)
    r1, c1 = min(max(math.ceil(y2), math.floor(y1) + 1), h), min(max(math.ceil(x2), math.floor(x1) + 1), w)
    return (r0, r1, c0, c1) if r1 > r0 and c1 > c0 else None


def mar_mask(
    boxes: Sequence[Tensor],
    feat_hw: tuple[int, int],
    stride: int,
    inside: float = 1.0,
    near: float = 0.5,
    background: float = 0.1,
    near_ratio: float = 0.5,
    device=None,
) -> Tensor:
    """Multi-value mask N x 1 x H x W: ``inside`` on cells of any box; ``near`` on cells of any
    box grown by near_ratio * (box w, box h) on every side that are in no box; else
    ``background``. A region covers every cell it overlaps (``box_cells``)."""
    n = len(boxes)
    in_box = torch.zeros(n, 1, *feat_hw, dtype=torch.bool, device=device)
    in_near = torch.zeros_like(in_box)
    for i, image_boxes in enumerate(boxes):
        for x1, y1, x2, y2 in image_boxes.detach().float().cpu().tolist():
            gw, gh = (x2 - x1) * near_ratio, (y2 - y1) * near_ratio
            for target, box in ((in_box, (x1, y1, x2, y2)), (in_near, (x1 - gw, y1 - gh, x2 + gw, y2 + gh))):
                cells = box_cells(box, stride, feat_hw)
                if cells:
                    r0, r1, c0, c1 = cells
                    target[i, 0, r0:r1, c0:c1] = True
    mask = torch.full((n, 1, *feat_hw), background, device=device)
    mask[in_near] = near
    mask[in_box] = inside
    return mask


@MODELS.register_module()
class MARLoss(DistillLoss):
    """L = loss_weight * sum_{n,c,h,w} M * (T - f_align(S))^2 / (C * sum_{n,h,w} M),

    the M-weighted mean of the squared error over elements; M = ``mar_mask``.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        loss_weight: float = 1.0,
        inside: float = 1.0,
        near: float = 0.5,
        background: float = 0.1,
        near_ratio: float = 0.5,
    ):
        super().__init__()
        self.align = make_align(student_channels, teacher_channels)
        self.loss_weight = loss_weight
        self.values = dict(inside=inside, near=near, background=background, near_ratio=near_ratio)

    def forward(self, preds_S: Tensor, preds_T: Tensor, *, boxes, stride) -> Tensor:
        s, t = self.align(preds_S), preds_T.detach()
        m = mar_mask(boxes, s.shape[-2:], stride, device=s.device, **self.values).to(s.dtype)
        return self.loss_weight * (m * (s - t) ** 2).sum() / (s.shape[1] * m.sum()).clamp(min=1e-12)


def pool_to_max_pixels(x: Tensor, max_pixels: int) -> Tensor:
    """x itself if H*W <= max_pixels, else avg_pool2d with the smallest k such that
    ceil(H/k) * ceil(W/k) <= max_pixels (ceil mode: edge windows average their in-map cells)."""
    h, w = x.shape[-2:]
    k = 1
    while math.ceil(h / k) * math.ceil(w / k) > max_pixels:
        k += 1
    return x if k == 1 else F.avg_pool2d(x, k, k, ceil_mode=True)


def pixel_relation(x: Tensor) -> Tensor:
    """N x C x H x W -> N x P x P cosine similarities between the P = H*W pixel vectors."""
    v = F.normalize(x.flatten(2), dim=1)
    return v.transpose(1, 2) @ v


def cls_tower(head: nn.Module | None, x: Tensor, role: str) -> Tensor:
    """The head's classification tower (``cls_convs``, with activations) on x."""
    head = checked_head(head, role, 'MARRelationLoss')
    if not has_cls_tower(head):
        raise DistillError(
            f"MARRelationLoss needs a cls tower (cls_convs); the {role}'s {type(head).__name__} has none"
        )
    return cls_features(head, x)


@MODELS.register_module()
class MARRelationLoss(DistillLoss):
    """MAR's relation term on the classification head (one level):

        F_S = student cls tower(S) (with grad),  F_T = teacher cls tower(T) (no grad)
        R_x = cosine similarities of the pixel vectors of pool(F_x), N x P x P
        L = loss_weight * mean_{n,i,j} (R_S - R_T)^2

    pool: average pooling to at most ``max_pixels`` positions (``pool_to_max_pixels``).
    MAR's code is not public; ours: the layer is the cls tower output (after ``cls_convs``, before
    the final cls conv), relations are cosines, and large maps are pooled. P x P relations need no
    align, so the towers may differ in width.
    """

    def __init__(
        self,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        loss_weight: float = 1.0,
        max_pixels: int = 256,
    ):
        super().__init__()
        if max_pixels < 1:
            raise ValueError(f'max_pixels must be >= 1, got {max_pixels}')
        self.loss_weight, self.max_pixels = loss_weight, max_pixels

    def relation_error(self, feat_S: Tensor, feat_T: Tensor) -> Tensor:
        r_s = pixel_relation(pool_to_max_pixels(feat_S, self.max_pixels))
        r_t = pixel_relation(pool_to_max_pixels(feat_T.detach(), self.max_pixels))
        return self.loss_weight * ((r_s - r_t) ** 2).mean()

    def forward(self, preds_S: Tensor, preds_T: Tensor, *, student_head, teacher_head) -> Tensor:
        with torch.no_grad():
            feat_T = cls_tower(teacher_head, preds_T.detach(), 'teacher')
        return self.relation_error(cls_tower(student_head, preds_S, 'student'), feat_T)
