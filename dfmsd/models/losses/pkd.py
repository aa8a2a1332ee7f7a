"""Pearson-correlation feature alignment (PKD, Cao et al. 2022) = DFMSD's SFA (Eq. 5)."""
from typing import List, Optional, Tuple

import torch.nn as nn
from mmdet.registry import MODELS
from torch import Tensor

from .common import channel_normalize, check_no_reduction, make_align


@MODELS.register_module()
class PKDLoss(nn.Module):
    """L = loss_weight * 1/2 * mean_{n,c,h,w} (norm(f_align(S)) - norm(T))^2.

    norm: per channel, zero mean and unit population std over (N, H, W), plus 1e-6 on
    the std.  With the population std this equals loss_weight * (1 - r) with r the
    Pearson correlation of S and T averaged over channels.  Invariant to a positive
    scale and a per-channel shift of S (and of T).
    """

    def __init__(self, student_channels: int, teacher_channels: int,
                 loss_weight: float = 1.0, eps: float = 1e-6):
        super().__init__()
        self.align = make_align(student_channels, teacher_channels)
        self.loss_weight = loss_weight
        self.eps = eps

    def forward(self, preds_S: Tensor, preds_T: Tensor, *,
                gt_bboxes: Optional[List[Tensor]] = None,
                img_shapes: Optional[List[Tuple[int, int]]] = None,
                stride: Optional[int] = None, reduction: Optional[str] = None) -> Tensor:
        check_no_reduction(reduction, type(self).__name__)
        norm_s = channel_normalize(self.align(preds_S), self.eps)
        norm_t = channel_normalize(preds_T.detach(), self.eps)
        return self.loss_weight * 0.5 * ((norm_s - norm_t) ** 2).mean()


@MODELS.register_module()
class SFALoss(PKDLoss):
    """DFMSD's semantic feature alignment (SFA): the same loss as PKDLoss, another name."""
