"""MAR (Zeng et al., IJCSE 2024): multi-value-mask feature distillation + pixel relations."""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.registry import MODELS
from torch import Tensor

from .common import boxes_to_cells, check_no_reduction, make_align, per_image


def mar_mask(gt_bboxes: Sequence[Tensor], feat_hw: Tuple[int, int], stride: Optional[int],
             img_shapes: Optional[Sequence[Tuple[int, int]]], inside: float = 1.0,
             near: float = 0.5, background: float = 0.1, near_ratio: float = 0.5,
             device=None) -> Tensor:
    """Multi-value mask N x 1 x H x W: ``inside`` on cells of any box; ``near`` on cells of any
    box grown by near_ratio * (box w, box h) on every side that are in no box; else
    ``background``.  Cells as in ``boxes_to_cells`` (every cell a region overlaps)."""
    h, w = feat_hw
    n = len(gt_bboxes)
    shapes = per_image(img_shapes, n, 'img_shapes')
    in_box = torch.zeros(n, 1, h, w, dtype=torch.bool, device=device)
    in_near = torch.zeros_like(in_box)
    for i, boxes in enumerate(gt_bboxes):
        boxes = boxes.detach().float()
        size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2) * near_ratio
        grown = boxes + size * size.new_tensor([-1, -1, 1, 1])
        for r0, r1, c0, c1 in boxes_to_cells(boxes, feat_hw, stride, shapes[i]):
            in_box[i, 0, r0:r1, c0:c1] = True
        for r0, r1, c0, c1 in boxes_to_cells(grown, feat_hw, stride, shapes[i]):
            in_near[i, 0, r0:r1, c0:c1] = True
    mask = torch.full((n, 1, h, w), background, device=device)
    mask[in_near] = near
    mask[in_box] = inside
    return mask


@MODELS.register_module()
class MARLoss(nn.Module):
    """L = loss_weight * sum_{n,c,h,w} M * (T - f_align(S))^2 / (C * sum_{n,h,w} M),

    i.e. the M-weighted mean of the squared error over elements; M = ``mar_mask``.
    """

    def __init__(self, student_channels: int, teacher_channels: int,
                 loss_weight: float = 1.0, inside: float = 1.0, near: float = 0.5,
                 background: float = 0.1, near_ratio: float = 0.5):
        super().__init__()
        self.align = make_align(student_channels, teacher_channels)
        self.loss_weight = loss_weight
        self.values = dict(inside=inside, near=near, background=background,
                           near_ratio=near_ratio)

    def forward(self, preds_S: Tensor, preds_T: Tensor, *,
                gt_bboxes: Optional[List[Tensor]] = None,
                img_shapes: Optional[List[Tuple[int, int]]] = None,
                stride: Optional[int] = None, reduction: Optional[str] = None) -> Tensor:
        check_no_reduction(reduction, 'MARLoss')
        if gt_bboxes is None:
            raise ValueError('MARLoss needs gt_bboxes')
        s, t = self.align(preds_S), preds_T.detach()
        m = mar_mask(gt_bboxes, s.shape[-2:], stride, img_shapes, device=s.device,
                     **self.values).to(s.dtype)
        loss = (m * (s - t) ** 2).sum() / (s.shape[1] * m.sum()).clamp(min=1e-12)
        return self.loss_weight * loss


def pixel_relation(feat: Tensor, max_pixels: int) -> Tensor:
    """Per image, P x P cosine similarity of the C-dim pixel vectors (N x P x P).  If
    H*W > max_pixels the map is first average-pooled (adaptive) to
    floor(H*r) x floor(W*r), r = sqrt(max_pixels / (H*W)) (each side at least 1)."""
    n, c, h, w = feat.shape
    if h * w > max_pixels:
        r = math.sqrt(max_pixels / (h * w))
        feat = F.adaptive_avg_pool2d(feat, (max(1, int(h * r)), max(1, int(w * r))))
    v = F.normalize(feat.reshape(n, c, -1), dim=1, eps=1e-12)
    return v.transpose(1, 2) @ v


@MODELS.register_module()
class MARRelationLoss(nn.Module):
    """L = loss_weight * mean_{n,i,j} (cos(S'_i, S'_j) - cos(T_i, T_j))^2, S' = f_align(S),
    i, j over the (pooled, <= max_pixels) positions of each image; see ``pixel_relation``."""

    def __init__(self, student_channels: int, teacher_channels: int,
                 loss_weight: float = 1.0, max_pixels: int = 256):
        super().__init__()
        self.align = make_align(student_channels, teacher_channels)
        self.loss_weight, self.max_pixels = loss_weight, max_pixels

    def forward(self, preds_S: Tensor, preds_T: Tensor, *,
                gt_bboxes: Optional[List[Tensor]] = None,
                img_shapes: Optional[List[Tuple[int, int]]] = None,
                stride: Optional[int] = None, reduction: Optional[str] = None) -> Tensor:
        check_no_reduction(reduction, 'MARRelationLoss')
        rel_s = pixel_relation(self.align(preds_S), self.max_pixels)
        rel_t = pixel_relation(preds_T.detach(), self.max_pixels)
        return self.loss_weight * ((rel_s - rel_t) ** 2).mean()
