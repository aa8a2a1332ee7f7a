"""Dual attention masking + reconstruction (DMKD, the base DFMSD builds on; method-notes §3)."""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.registry import MODELS
from torch import Tensor

from .common import (SEBlock, channel_attention, make_align, make_generation,
                     reconstruction_loss, sample_attention_mask, spatial_attention)


@MODELS.register_module()
class DMKDLoss(nn.Module):
    """L = loss_weight * sum_{c,h,w} (F_hat - T)^2 / N   ('sum_over_batch', default)
    or  loss_weight * mean_{n,c,h,w} (F_hat - T)^2       ('mean', Eq. 8's 1/N_l).

    S' = f_align(S);  A^S, A^C = spatial / channel attention of the teacher (temperature tau);
    M_s: per image, round(lambda_s*H*W) positions drawn without replacement ~ A^S, set to 0;
    M_c: per image, round(lambda_c*C) channels drawn without replacement ~ A^C, set to 0;
    F_hat = w_s * G_s(S' * M_s) + w_c * G_c(SE(S' * M_c)),  (w_s, w_c) = softmax(logits),
    logits learnable, initialised equal (0, 0).  G = conv3x3 -> ReLU -> conv3x3 (MGD's).
    """

    def __init__(self, student_channels: int, teacher_channels: int,
                 loss_weight: float = 2e-5, tau: float = 0.5, lambda_s: float = 0.5,
                 lambda_c: float = 0.5, se_ratio: int = 16,
                 reduction: str = 'sum_over_batch'):
        super().__init__()
        self.align = make_align(student_channels, teacher_channels)
        self.gen_s = make_generation(teacher_channels)
        self.gen_c = make_generation(teacher_channels)
        self.se = SEBlock(teacher_channels, se_ratio)
        self.fusion_logits = nn.Parameter(torch.zeros(2))
        self.loss_weight, self.tau = loss_weight, tau
        self.lambda_s, self.lambda_c = lambda_s, lambda_c
        self.reduction = reduction

    def masks(self, preds_T: Tensor) -> Tuple[Tensor, Tensor]:
        """Teacher-attention-guided keep-masks: spatial N x 1 x H x W, channel N x C x 1 x 1."""
        n, c, h, w = preds_T.shape
        with torch.no_grad():
            a_s = spatial_attention(preds_T, self.tau).reshape(n, h * w)
            a_c = channel_attention(preds_T, self.tau).reshape(n, c)
            m_s = sample_attention_mask(a_s, self.lambda_s).reshape(n, 1, h, w)
            m_c = sample_attention_mask(a_c, self.lambda_c).reshape(n, c, 1, 1)
        return m_s, m_c

    def reconstruct(self, preds_S: Tensor, preds_T: Tensor) -> Tensor:
        """F_hat (N x Ct x H x W) from the student, masks drawn from the teacher's attention."""
        s = self.align(preds_S)
        m_s, m_c = self.masks(preds_T.detach())
        w_s, w_c = F.softmax(self.fusion_logits, dim=0)
        m_s, m_c = m_s.to(s.dtype), m_c.to(s.dtype)
        return w_s * self.gen_s(s * m_s) + w_c * self.gen_c(self.se(s * m_c))

    def forward(self, preds_S: Tensor, preds_T: Tensor, *,
                gt_bboxes: Optional[List[Tensor]] = None,
                img_shapes: Optional[List[Tuple[int, int]]] = None,
                stride: Optional[int] = None, reduction: Optional[str] = None) -> Tensor:
        preds_T = preds_T.detach()
        loss = reconstruction_loss(self.reconstruct(preds_S, preds_T), preds_T,
                                   reduction or self.reduction)
        return self.loss_weight * loss


def aug_reconstruction_loss(dmkd: DMKDLoss, preds_S: Tensor, preds_T: Tensor,
                            beta: float) -> Tensor:
    """Masking-enhancement loss L_aug (Eq. 8) on one level of the augmented images:
    beta * mean_{n,c,h,w} (T~ - F_hat(S~))^2, with the SAME DMKD module (same G_s, G_c,
    SE, fusion weights; fresh masks from T~'s attention).  dmkd.loss_weight is NOT applied:
    beta is L_aug's own weight.  Sum the returned values over levels.
    """
    preds_T = preds_T.detach()
    return beta * reconstruction_loss(dmkd.reconstruct(preds_S, preds_T), preds_T, 'mean')
