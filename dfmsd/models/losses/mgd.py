"""Masked Generative Distillation (Yang et al., ECCV 2022), MGD's own semantics."""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from mmdet.registry import MODELS
from torch import Tensor

from .common import make_align, make_generation, reconstruction_loss


@MODELS.register_module()
class MGDLoss(nn.Module):
    """L = loss_weight * sum_{c,h,w} (G(f_align(S) * M) - T)^2 / N.

    M (N x 1 x H x W) is MGD's random mask, exactly as in MGD's code:
    u ~ U[0, 1) per position, M = 0 (masked) where u > 1 - lambda_mgd, else 1 (kept).
    So each position is masked independently with probability lambda_mgd (the masked
    count is Binomial, not a fixed fraction).  G = conv3x3 -> ReLU -> conv3x3.
    loss_weight = MGD's alpha_mgd (2e-5 for RetinaNet); lambda_mgd default 0.65.
    """

    def __init__(self, student_channels: int, teacher_channels: int,
                 loss_weight: float = 2e-5, lambda_mgd: float = 0.65,
                 reduction: str = 'sum_over_batch'):
        super().__init__()
        self.align = make_align(student_channels, teacher_channels)
        self.generation = make_generation(teacher_channels)
        self.loss_weight = loss_weight
        self.lambda_mgd = lambda_mgd
        self.reduction = reduction

    def random_mask(self, feat: Tensor) -> Tensor:
        n, _, h, w = feat.shape
        u = torch.rand(n, 1, h, w, device=feat.device)
        return (u <= 1 - self.lambda_mgd).to(feat.dtype)

    def forward(self, preds_S: Tensor, preds_T: Tensor, *,
                gt_bboxes: Optional[List[Tensor]] = None,
                img_shapes: Optional[List[Tuple[int, int]]] = None,
                stride: Optional[int] = None, reduction: Optional[str] = None) -> Tensor:
        s = self.align(preds_S)
        new_fea = self.generation(s * self.random_mask(s))
        loss = reconstruction_loss(new_fea, preds_T.detach(), reduction or self.reduction)
        return self.loss_weight * loss
