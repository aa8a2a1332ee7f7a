"""Feature-based KD of Zhang & Ma (ICLR 2021; "FBKD" in mmrazor): attention-guided and non-local
distillation, as the authors' code computes it (mmrazor's FBKDLoss and FBKD connectors port it term
for term). DFMSD's tables call it FKD; our ``FeatureKDLoss`` is DFMSD's plain Eq. 1 instead."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.registry import MODELS
from torch import Tensor

from .common import DistillLoss, spatial_attention


class NonLocalBlock(nn.Module):
    """The authors' dot-product non-local block: z = x + BN(W y),  y_i = 1/M sum_j (theta_i . phi_j) g_j,

    theta = 1x1 conv of x, phi and g = max-pool(1x1 conv of x) with kernel = stride = ``pool`` (clamped
    to the map's size), M = cells after pooling, W = 1x1 conv C_inter -> C. BN's weight and bias start
    at 0, so the block starts as the identity."""

    def __init__(self, channels: int, inter_channels: int, pool: int):
        super().__init__()
        self.theta, self.phi, self.g = (nn.Conv2d(channels, inter_channels, kernel_size=1) for _ in range(3))
        self.out = nn.Sequential(nn.Conv2d(inter_channels, channels, kernel_size=1), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        k = min(self.pool, h, w)
        theta = self.theta(x).flatten(2).transpose(1, 2)  # N x HW x Ci
        phi = F.max_pool2d(self.phi(x), k).flatten(2)  # N x Ci x M
        g = F.max_pool2d(self.g(x), k).flatten(2).transpose(1, 2)  # N x M x Ci
        y = (theta @ phi / phi.shape[-1]) @ g  # N x HW x Ci
        return x + self.out(y.transpose(1, 2).reshape(n, -1, h, w))


def fbkd_mask(s: Tensor, t: Tensor, spatial_T: float) -> Tensor:
    """M = (A(S) + A(T)) / 2, N x 1 x H x W, detached; A = ``spatial_attention`` (H*W softmax of
    mean_c |x| / spatial_T): the student's and the teacher's attention count equally."""
    return ((spatial_attention(s, spatial_T) + spatial_attention(t, spatial_T)) / 2).detach()


@MODELS.register_module()
class FBKDLoss(DistillLoss):
    """Per distilled level (S: N x Cs x H x W, T: N x Ct x H x W), ||.|| the L2 norm over the whole batch:

        M          = (A(S) + A(T)) / 2, detached;  A(x) = H*W softmax_hw(mean_c |x| / spatial_T)  (fbkd_mask)
        L_feat     = sqrt(sum_{n,c,h,w} M (T - f_adapt(S))^2)      f_adapt: 1x1 conv Cs -> Ct
        L_channel  = ||mean_hw T - f_channel(mean_hw S)||           f_channel: Linear Cs -> Ct
        L_spatial  = ||mean_c T - f_spatial(mean_c S)||             f_spatial: 3x3 conv 1 -> 1
        L_nonlocal = ||f_nl(NL_S(S)) - NL_T(T)||                    f_nl: 1x1 conv Cs -> Ct
        L = loss_weight * (mask_l2_weight L_feat + channel_weight L_channel + spatial_weight L_spatial
                           + nonlocal_weight L_nonlocal),   returned per level as {'s<stride>': L}

    NL_S, NL_T: ``NonLocalBlock`` with C // nonlocal_reduction[l] inner channels and max-pool
    nonlocal_pool[l], l counted from the finest distilled level (the last entry for further levels).
    All adapters, both non-local blocks included, are learnable (T is detached). Built once for the
    pyramid only because the blocks differ by level. Defaults: the authors' constants (docs/method.md).
    """

    per_level = False

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        loss_weight: float = 1.0,
        spatial_T: float = 0.5,
        mask_l2_weight: float = 7e-5,
        channel_weight: float = 4e-3,
        spatial_weight: float = 4e-3,
        nonlocal_weight: float = 7e-5,
        nonlocal_reduction: Sequence[int] = (4, 4, 2, 2, 2),
        nonlocal_pool: Sequence[int] = (8, 4, 2, 2, 2),
    ):
        super().__init__()
        pairs = list(zip(student_channels, teacher_channels))
        self.adapt = nn.ModuleList(nn.Conv2d(cs, ct, kernel_size=1) for cs, ct in pairs)
        self.channel_adapt = nn.ModuleList(nn.Linear(cs, ct) for cs, ct in pairs)
        self.spatial_adapt = nn.ModuleList(nn.Conv2d(1, 1, kernel_size=3, padding=1) for _ in pairs)
        self.nonlocal_adapt = nn.ModuleList(nn.Conv2d(cs, ct, kernel_size=1) for cs, ct in pairs)

        def block(level: int, c: int) -> NonLocalBlock:
            reduction, pool = (v[min(level, len(v) - 1)] for v in (nonlocal_reduction, nonlocal_pool))
            return NonLocalBlock(c, max(1, c // reduction), pool)

        self.nonlocal_s = nn.ModuleList(block(i, cs) for i, (cs, _) in enumerate(pairs))
        self.nonlocal_t = nn.ModuleList(block(i, ct) for i, (_, ct) in enumerate(pairs))
        self.loss_weight, self.spatial_T = loss_weight, spatial_T
        self.mask_l2_weight, self.channel_weight = mask_l2_weight, channel_weight
        self.spatial_weight, self.nonlocal_weight = spatial_weight, nonlocal_weight

    def level_terms(self, level: int, s: Tensor, t: Tensor) -> dict[str, Tensor]:
        """L_feat, L_channel, L_spatial, L_nonlocal of one level (unweighted); ``t`` detached."""
        norm = torch.linalg.vector_norm
        mask = fbkd_mask(s, t, self.spatial_T)
        return {
            'feat': norm((t - self.adapt[level](s)) * mask.sqrt()),
            'channel': norm(t.mean(dim=(2, 3)) - self.channel_adapt[level](s.mean(dim=(2, 3)))),
            'spatial': norm(t.mean(dim=1, keepdim=True) - self.spatial_adapt[level](s.mean(dim=1, keepdim=True))),
            'nonlocal': norm(self.nonlocal_adapt[level](self.nonlocal_s[level](s)) - self.nonlocal_t[level](t)),
        }

    def forward(self, preds_S: list[Tensor], preds_T: list[Tensor], *, strides) -> dict[str, Tensor]:
        out = {}
        for level, (s, t, stride) in enumerate(zip(preds_S, preds_T, strides)):
            terms = self.level_terms(level, s, t.detach())
            out[f's{stride}'] = self.loss_weight * (
                self.mask_l2_weight * terms['feat']
                + self.channel_weight * terms['channel']
                + self.spatial_weight * terms['spatial']
                + self.nonlocal_weight * terms['nonlocal']
            )
        return out
