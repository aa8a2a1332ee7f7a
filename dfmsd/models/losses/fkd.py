"""Plain feature imitation (DFMSD's Eq. 1, which DFMSD labels FKD). Zhang & Ma's FKD (ICLR 2021), the
method behind the FKD rows of DFMSD's tables, is ``FBKDLoss`` (fbkd.py)."""

from __future__ import annotations

from mmdet.registry import MODELS
from torch import Tensor

from .common import DistillLoss, make_align, reduce_squared_error


@MODELS.register_module()
class FeatureKDLoss(DistillLoss):
    """L = loss_weight * 1/(N*C*H*W) * sum_{n,c,h,w} (T - f_align(S))^2   (one FPN level).

    Eq. 1's 1/(C*H*W) sum over one image, averaged over the batch N; the distiller sums
    the levels.
    """

    def __init__(self, student_channels: int, teacher_channels: int, loss_weight: float = 1.0):
        super().__init__()
        self.align = make_align(student_channels, teacher_channels)
        self.loss_weight = loss_weight

    def forward(self, preds_S: Tensor, preds_T: Tensor) -> Tensor:
        return self.loss_weight * reduce_squared_error(self.align(preds_S), preds_T.detach(), 'mean')
