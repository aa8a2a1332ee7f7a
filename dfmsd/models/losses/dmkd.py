"""Dual attention masking + reconstruction (DMKD, the base DFMSD builds on; method notes §3),
and AMD's single attention-guided masking with SE channel cues."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.registry import MODELS
from torch import Tensor

from .common import (
    MaskedReconstructionLoss,
    SEBlock,
    channel_attention,
    make_align,
    make_generation,
    sample_attention_mask,
    spatial_attention,
)


def attention_masks(
    preds_T: Tensor, tau: float, lambda_s: float, lambda_c: float | None, generator=None
) -> tuple[Tensor, Tensor | None]:
    """Teacher-attention-guided keep-masks: spatial N x 1 x H x W and channel N x C x 1 x 1
    (None when lambda_c is None), masked entries drawn without replacement ~ attention."""
    n, c, h, w = preds_T.shape
    with torch.no_grad():
        a_s = spatial_attention(preds_T, tau).reshape(n, h * w)
        m_s = sample_attention_mask(a_s, lambda_s, generator).reshape(n, 1, h, w)
        if lambda_c is None:
            return m_s, None
        a_c = channel_attention(preds_T, tau).reshape(n, c)
        m_c = sample_attention_mask(a_c, lambda_c, generator).reshape(n, c, 1, 1)
    return m_s, m_c


@MODELS.register_module()
class DMKDLoss(MaskedReconstructionLoss):
    """L = loss_weight * error(F_hat, T), error = sum_{c,h,w}(.)^2 / N ('sum_over_batch', DMKD's
    and MGD's reduction) or mean_{n,c,h,w}(.)^2 ('mean': DFMSD's Eq. 7, the same as Eq. 8).

    S' = f_align(S);  A^S, A^C = spatial / channel attention of the teacher (temperature tau);
    M_s: per image, round(lambda_s*H*W) positions drawn without replacement ~ A^S, set to 0;
    M_c: per image, round(lambda_c*C) channels drawn without replacement ~ A^C, set to 0;
    F_hat = w_s * G_s(S' * M_s) + w_c * G_c(SE(S' * M_c)),  (w_s, w_c) = softmax(logits),
    logits learnable, initialised equal (0, 0).  G = conv3x3 -> ReLU -> conv3x3 (MGD's).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        loss_weight: float = 2e-5,
        tau: float = 0.5,
        lambda_s: float = 0.5,
        lambda_c: float = 0.5,
        se_ratio: int = 16,
        reduction: str = 'sum_over_batch',
    ):
        super().__init__(loss_weight, reduction)
        self.align = make_align(student_channels, teacher_channels)
        self.gen_s = make_generation(teacher_channels)
        self.gen_c = make_generation(teacher_channels)
        self.se = SEBlock(teacher_channels, se_ratio)
        self.fusion_logits = nn.Parameter(torch.zeros(2))
        self.tau, self.lambda_s, self.lambda_c = tau, lambda_s, lambda_c

    def masks(self, preds_T: Tensor, generator=None) -> tuple[Tensor, Tensor]:
        return attention_masks(preds_T, self.tau, self.lambda_s, self.lambda_c, generator)

    def reconstruct(self, preds_S: Tensor, preds_T: Tensor, generator=None) -> Tensor:
        s = self.align(preds_S)
        m_s, m_c = self.masks(preds_T.detach(), generator)
        w_s, w_c = F.softmax(self.fusion_logits, dim=0)
        return w_s * self.gen_s(s * m_s.to(s.dtype)) + w_c * self.gen_c(self.se(s * m_c.to(s.dtype)))


@MODELS.register_module()
class AMDLoss(MaskedReconstructionLoss):
    """AMD (Yang et al., 2023): one attention-guided spatial mask, SE channel cues, one G.

    L = loss_weight * sum_{c,h,w} (G(SE(f_align(S) * M_s)) - T)^2 / N, with M_s as DMKD's
    spatial mask. AMD's code is not public: this reading follows its abstract ("spatially
    adaptive feature masking instead of random masking", "channel-adaptive cues") and
    MGD's reconstruction it builds on (docs/method.md).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        loss_weight: float = 2e-5,
        tau: float = 0.5,
        lambda_s: float = 0.65,
        se_ratio: int = 16,
        reduction: str = 'sum_over_batch',
    ):
        super().__init__(loss_weight, reduction)
        self.align = make_align(student_channels, teacher_channels)
        self.generation = make_generation(teacher_channels)
        self.se = SEBlock(teacher_channels, se_ratio)
        self.tau, self.lambda_s = tau, lambda_s

    def reconstruct(self, preds_S: Tensor, preds_T: Tensor, generator=None) -> Tensor:
        s = self.align(preds_S)
        m_s, _ = attention_masks(preds_T.detach(), self.tau, self.lambda_s, None, generator)
        return self.generation(self.se(s * m_s.to(s.dtype)))
