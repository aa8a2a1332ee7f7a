"""MAR (Zeng et al., IJCSE 2024): multi-value-mask feature distillation.

The relation term (pixel relations on the classification head) is MARRelationLoss in
``heads.py``; a MAR row uses both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from mmdet.registry import MODELS
from torch import Tensor

from .common import DistillLoss, make_align


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

    needs = frozenset({'boxes', 'stride'})

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
