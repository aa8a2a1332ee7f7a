"""Focal and Global Distillation, feature part (Yang et al., CVPR 2022), as FGD's code does it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.registry import MODELS
from torch import Tensor

from .common import DistillLoss, channel_attention, make_align, spatial_attention


def fgd_masks(
    boxes: Sequence[Tensor], feat_hw: tuple[int, int], img_shapes: Sequence[tuple[int, int]], device=None
) -> tuple[Tensor, Tensor]:
    """FGD's scale-normalised foreground / background masks, each N x 1 x H x W.

    As FGD's code (yzd-v/FGD, losses/fgd.py): box coordinates are scaled by
    (W / img_w, H / img_h) onto the feature map; a box covers cells floor(x1) .. ceil(x2)
    INCLUSIVE (and the same for y), and its cells get 1 / ((hmax + 1 - hmin)(wmax + 1 - wmin))
    from the unclipped indices, the max over overlapping boxes. Background: 1 on cells no
    box covers, divided by their count (all 0 when every cell is covered).
    """
    h, w = feat_hw
    n = len(boxes)
    fg = torch.zeros(n, 1, h, w, device=device)
    for i in range(n):
        img_h, img_w = img_shapes[i][:2]
        for x1, y1, x2, y2 in boxes[i].detach().float().cpu().tolist():
            wmin, wmax = math.floor(x1 / img_w * w), math.ceil(x2 / img_w * w)
            hmin, hmax = math.floor(y1 / img_h * h), math.ceil(y2 / img_h * h)
            area = 1.0 / (hmax + 1 - hmin) / (wmax + 1 - wmin)
            cells = fg[i, 0, max(hmin, 0) : hmax + 1, max(wmin, 0) : wmax + 1]
            cells.clamp_(min=area)
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
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
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
class FGDLoss(DistillLoss):
    """L = loss_weight * (alpha*L_fg + beta*L_bg + gamma*L_att + lambda*L_global), per level:

    S' = f_align(S); A^S_x, A^C_x = spatial/channel attention of x in {S', T}, temperature temp;
    L_fg  = sum M_fg * A^S_T * A^C_T * (S' - T)^2 / N   (L_bg: same with M_bg);
    L_att = sum |A^C_S' - A^C_T| / N + sum |A^S_S' - A^S_T| / N;
    L_global = sum (GC_s(S') - GC_t(T))^2 / N   (two GcBlocks, both learnable).
    Masks from the boxes (``fgd_masks``). Defaults = FGD's RetinaNet config.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        loss_weight: float = 1.0,
        temp: float = 0.5,
        alpha_fgd: float = 0.001,
        beta_fgd: float = 0.0005,
        gamma_fgd: float = 0.0005,
        lambda_fgd: float = 0.000005,
    ):
        super().__init__()
        self.align = make_align(student_channels, teacher_channels)
        self.gc_s, self.gc_t = GcBlock(teacher_channels), GcBlock(teacher_channels)
        self.loss_weight, self.temp = loss_weight, temp
        self.alpha_fgd, self.beta_fgd = alpha_fgd, beta_fgd
        self.gamma_fgd, self.lambda_fgd = gamma_fgd, lambda_fgd

    def forward(self, preds_S: Tensor, preds_T: Tensor, *, boxes, img_shapes) -> Tensor:
        s, t = self.align(preds_S), preds_T.detach()
        n = s.shape[0]
        sa_s, ca_s = spatial_attention(s, self.temp), channel_attention(s, self.temp)
        sa_t, ca_t = spatial_attention(t, self.temp), channel_attention(t, self.temp)
        m_fg, m_bg = fgd_masks(boxes, s.shape[-2:], img_shapes, s.device)
        sq = sa_t * ca_t * (s - t) ** 2
        loss_fg = (m_fg * sq).sum() / n
        loss_bg = (m_bg * sq).sum() / n
        loss_att = ((ca_s - ca_t).abs().sum() + (sa_s - sa_t).abs().sum()) / n
        loss_global = ((self.gc_s(s) - self.gc_t(t)) ** 2).sum() / n
        return self.loss_weight * (
            self.alpha_fgd * loss_fg
            + self.beta_fgd * loss_bg
            + self.gamma_fgd * loss_att
            + self.lambda_fgd * loss_global
        )
