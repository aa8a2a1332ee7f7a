"""Focal and Global Distillation, feature part (Yang et al., CVPR 2022)."""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.registry import MODELS
from torch import Tensor

from .common import (boxes_to_cells, channel_attention, check_no_reduction, make_align,
                     per_image, spatial_attention)


def fgd_masks(gt_bboxes: Sequence[Tensor], feat_hw: Tuple[int, int], stride: Optional[int],
              img_shapes: Optional[Sequence[Tuple[int, int]]],
              device=None) -> Tuple[Tensor, Tensor]:
    """Scale-normalised fg/bg masks, each N x 1 x H x W.

    fg: cells of a box get 1/(rows * cols) of that box (max over overlapping boxes);
    bg: 1/N_bg on the N_bg cells outside every box, 0 inside (all 0 if N_bg = 0).
    """
    h, w = feat_hw
    n = len(gt_bboxes)
    shapes = per_image(img_shapes, n, 'img_shapes')
    fg = torch.zeros(n, 1, h, w, device=device)
    for i in range(n):
        for r0, r1, c0, c1 in boxes_to_cells(gt_bboxes[i], feat_hw, stride, shapes[i]):
            fg[i, 0, r0:r1, c0:c1].clamp_(min=1.0 / ((r1 - r0) * (c1 - c0)))
    bg = (fg == 0).float()
    bg = bg / bg.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)
    return fg, bg


class GcBlock(nn.Module):
    """GCNet context block as in FGD: x + Conv(ReLU(LN(Conv(sum_hw softmax(Wk x) * x)))).

    conv_mask: Kaiming-normal fan_in init; last conv zero-initialised (block starts as identity).
    """

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(1, channels // 2)
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1), nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, kernel_size=1))
        nn.init.kaiming_normal_(self.conv_mask.weight, mode='fan_in', nonlinearity='relu')
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        weights = F.softmax(self.conv_mask(x).reshape(n, 1, h * w), dim=2)  # N x 1 x HW
        context = (x.reshape(n, c, h * w) * weights).sum(dim=2).reshape(n, c, 1, 1)
        return x + self.channel_add(context)


@MODELS.register_module()
class FGDLoss(nn.Module):
    """L = loss_weight * (alpha*L_fg + beta*L_bg + gamma*L_att + lambda*L_global), per level:

    S' = f_align(S); A^S_x, A^C_x = spatial/channel attention of x in {S', T}, temperature temp;
    L_fg  = sum M_fg * A^S_T * A^C_T * (S' - T)^2 / N   (L_bg: same with M_bg);
    L_att = sum |A^C_S' - A^C_T| / N + sum |A^S_S' - A^S_T| / N;
    L_global = sum (GC_s(S') - GC_t(T))^2 / N   (two GcBlocks, both learnable).
    Masks from gt_bboxes (see ``fgd_masks``).  Defaults = FGD's RetinaNet config.
    """

    def __init__(self, student_channels: int, teacher_channels: int,
                 loss_weight: float = 1.0, temp: float = 0.5, alpha_fgd: float = 0.001,
                 beta_fgd: float = 0.0005, gamma_fgd: float = 0.0005,
                 lambda_fgd: float = 0.000005):
        super().__init__()
        self.align = make_align(student_channels, teacher_channels)
        self.gc_s, self.gc_t = GcBlock(teacher_channels), GcBlock(teacher_channels)
        self.loss_weight, self.temp = loss_weight, temp
        self.alpha_fgd, self.beta_fgd = alpha_fgd, beta_fgd
        self.gamma_fgd, self.lambda_fgd = gamma_fgd, lambda_fgd

    def forward(self, preds_S: Tensor, preds_T: Tensor, *,
                gt_bboxes: Optional[List[Tensor]] = None,
                img_shapes: Optional[List[Tuple[int, int]]] = None,
                stride: Optional[int] = None, reduction: Optional[str] = None) -> Tensor:
        check_no_reduction(reduction, 'FGDLoss')
        if gt_bboxes is None:
            raise ValueError('FGDLoss needs gt_bboxes')
        s, t = self.align(preds_S), preds_T.detach()
        n = s.shape[0]
        sa_s, ca_s = spatial_attention(s, self.temp), channel_attention(s, self.temp)
        sa_t, ca_t = spatial_attention(t, self.temp), channel_attention(t, self.temp)
        m_fg, m_bg = fgd_masks(gt_bboxes, s.shape[-2:], stride, img_shapes, s.device)
        sq = sa_t * ca_t * (s - t) ** 2
        loss_fg = (m_fg * sq).sum() / n
        loss_bg = (m_bg * sq).sum() / n
        loss_att = ((ca_s - ca_t).abs().sum() + (sa_s - sa_t).abs().sum()) / n
        loss_global = ((self.gc_s(s) - self.gc_t(t)) ** 2).sum() / n
        return self.loss_weight * (self.alpha_fgd * loss_fg + self.beta_fgd * loss_bg
                                   + self.gamma_fgd * loss_att + self.lambda_fgd * loss_global)
