"""Pearson-correlation feature alignment (PKD, Cao et al. 2022) = DFMSD's SFA (Eq. 5)."""

from __future__ import annotations

from mmdet.registry import MODELS
from torch import Tensor

from .common import DistillLoss, channel_normalize, make_align


@MODELS.register_module()
class PKDLoss(DistillLoss):
    """L = loss_weight * 1/2 * mean_{n,c,h,w} (norm(f_align(S)) - norm(T))^2.

    norm: per channel, zero mean and unit std over (N, H, W), the std unbiased plus 1e-6,
    as mmrazor's PKDLoss. Invariant to a positive scale and a per-channel shift of S and T.
    """

    def __init__(self, student_channels: int, teacher_channels: int, loss_weight: float = 1.0, eps: float = 1e-6):
        super().__init__()
        self.align = make_align(student_channels, teacher_channels)
        self.loss_weight, self.eps = loss_weight, eps

    def forward(self, preds_S: Tensor, preds_T: Tensor) -> Tensor:
        norm_s = channel_normalize(self.align(preds_S), self.eps)
        norm_t = channel_normalize(preds_T.detach(), self.eps)
        return self.loss_weight * 0.5 * ((norm_s - norm_t) ** 2).mean()
