"""Plain feature distillation (FKD, DFMSD Eq. 1)."""
from typing import List, Optional, Tuple

import torch.nn as nn
from mmdet.registry import MODELS
from torch import Tensor

from .common import make_align, reconstruction_loss


@MODELS.register_module()
class FeatureKDLoss(nn.Module):
    """L = loss_weight * 1/(N*C*H*W) * sum_{n,c,h,w} (T - f_align(S))^2   (one FPN level).

    Eq. 1's 1/(C*H*W) * sum over one image, averaged over the batch N (i.e. the mean
    over all elements: reduction 'mean'); the distiller sums the levels.
    ``reduction='sum_over_batch'`` gives MGD's sum/N instead.
    """

    def __init__(self, student_channels: int, teacher_channels: int,
                 loss_weight: float = 1.0, reduction: str = 'mean'):
        super().__init__()
        self.align = make_align(student_channels, teacher_channels)
        self.loss_weight = loss_weight
        self.reduction = reduction

    def forward(self, preds_S: Tensor, preds_T: Tensor, *,
                gt_bboxes: Optional[List[Tensor]] = None,
                img_shapes: Optional[List[Tuple[int, int]]] = None,
                stride: Optional[int] = None, reduction: Optional[str] = None) -> Tensor:
        loss = reconstruction_loss(self.align(preds_S), preds_T.detach(),
                                   reduction or self.reduction)
        return self.loss_weight * loss
