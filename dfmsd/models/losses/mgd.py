"""Masked Generative Distillation (Yang et al., ECCV 2022), MGD's own semantics."""

from __future__ import annotations

import torch
from mmdet.registry import MODELS
from torch import Tensor

from .common import MaskedReconstructionLoss, make_align, make_generation


@MODELS.register_module()
class MGDLoss(MaskedReconstructionLoss):
    """L = loss_weight * sum_{c,h,w} (G(f_align(S) * M) - T)^2 / N.

    M (N x 1 x H x W) is MGD's random mask, exactly as in MGD's code: u ~ U[0, 1) per
    position, M = 0 (masked) where u > 1 - lambda_mgd, else 1 (kept); so each position is
    masked independently with probability lambda_mgd. G = conv3x3 -> ReLU -> conv3x3.
    loss_weight = MGD's alpha_mgd (2e-5 for RetinaNet); lambda_mgd default 0.65.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        loss_weight: float = 2e-5,
        lambda_mgd: float = 0.65,
        reduction: str = 'sum_over_batch',
    ):
        super().__init__(loss_weight, reduction)
        self.align = make_align(student_channels, teacher_channels)
        self.generation = make_generation(teacher_channels)
        self.lambda_mgd = lambda_mgd

    def reconstruct(self, preds_S: Tensor, preds_T: Tensor, generator=None) -> Tensor:
        s = self.align(preds_S)
        n, _, h, w = s.shape
        u = torch.rand(n, 1, h, w, device=s.device, generator=generator)
        return self.generation(s * (u <= 1 - self.lambda_mgd).to(s.dtype))
