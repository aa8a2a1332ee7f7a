"""What every distillation loss shares: the interface, and the pieces written once.

Interface. A loss is built once per distilled FPN level as
``MODELS.build(dict(type=..., student_channels=Cs, teacher_channels=Ct, **kwargs))`` and
called as ``loss(S, T, **inputs)``, where S (N x Cs x H x W, with grad) and T (N x Ct x H x W)
are the level's student and teacher features. The keyword-only parameters of its ``forward``
say which of :data:`INPUTS` it takes (``needs``, read from the signature); the distiller
computes exactly those. The result is a scalar already multiplied by ``loss_weight``; teacher
features are detached inside.

A :class:`MaskedReconstructionLoss` (MGD, DMKD, AMD) also exposes ``reconstruct`` and
``error``: the stage loss is ``loss_weight * error(reconstruct(S, T), T)`` and DFMSD's ME
loss (Eq. 8) is ``beta * error(reconstruct(S~, T~), T~)`` on the enhanced views, with the
same modules, so the formula exists once.

Notation: f_align = 1x1 conv Cs -> Ct (identity if Cs == Ct).
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .inputs import INPUTS

REDUCTIONS = ('sum_over_batch', 'mean')


class DistillLoss(nn.Module):
    """Base class of the distillation losses; ``needs``: the keyword-only parameters of ``forward``,
    each one of INPUTS.

    ``per_level = False``: built once for the whole pyramid (``student_channels`` and
    ``teacher_channels`` are then lists over the distilled levels), called with the lists of
    S and T, and per-level inputs as lists; it may return a dict of named terms.
    """

    is_distill_loss: ClassVar[bool] = True
    per_level: ClassVar[bool] = True
    needs: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        params = inspect.signature(cls.forward).parameters.values()
        cls.needs = frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY)
        unknown = cls.needs - set(INPUTS)
        if unknown:
            raise TypeError(f'{cls.__name__}.forward takes unknown inputs {sorted(unknown)} (known: {sorted(INPUTS)})')


def reduce_squared_error(pred: Tensor, target: Tensor, reduction: str) -> Tensor:
    """'sum_over_batch': sum over C, H, W, mean over N (MGD's sum(...) / N);
    'mean': mean over all N*C*H*W elements (Eq. 1, 7 and 8's per-element normalisation)."""
    sq = (pred - target) ** 2
    if reduction == 'sum_over_batch':
        return sq.sum() / pred.shape[0]
    if reduction == 'mean':
        return sq.mean()
    raise ValueError(f'reduction must be one of {REDUCTIONS}, got {reduction!r}')


class MaskedReconstructionLoss(DistillLoss):
    """L = loss_weight * error(reconstruct(S, T), T)."""

    def __init__(self, loss_weight: float, reduction: str):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f'reduction must be one of {REDUCTIONS}, got {reduction!r}')
        self.loss_weight, self.reduction = loss_weight, reduction

    def reconstruct(self, preds_S: Tensor, preds_T: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def error(self, rebuilt: Tensor, preds_T: Tensor) -> Tensor:
        return reduce_squared_error(rebuilt, preds_T.detach(), self.reduction)

    def forward(self, preds_S: Tensor, preds_T: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        return self.loss_weight * self.error(self.reconstruct(preds_S, preds_T.detach(), generator), preds_T)


def make_align(student_channels: int, teacher_channels: int) -> nn.Module:
    """f_align: a 1x1 conv (with bias, as MGD/FGD) when Cs != Ct, identity otherwise."""
    if student_channels == teacher_channels:
        return nn.Identity()
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1)


def make_generation(channels: int) -> nn.Sequential:
    """MGD's generation block G: conv3x3 -> ReLU -> conv3x3 (channels = teacher channels)."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
    )


class SEBlock(nn.Module):
    """Squeeze-excite: x * sigmoid(W2 ReLU(W1 avgpool_{h,w}(x))), hidden = max(1, C // ratio)."""

    def __init__(self, channels: int, ratio: int = 16):
        super().__init__()
        hidden = max(1, channels // ratio)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * w[:, :, None, None]


def spatial_attention(feat: Tensor, tau: float) -> Tensor:
    """A^S = H*W * softmax_{h,w}(mean_c |feat| / tau), shape N x 1 x H x W (sums to H*W)."""
    n, _, h, w = feat.shape
    logits = feat.abs().mean(dim=1).reshape(n, h * w) / tau
    return (h * w * F.softmax(logits, dim=1)).reshape(n, 1, h, w)


def channel_attention(feat: Tensor, tau: float) -> Tensor:
    """A^C = C * softmax_c(mean_{h,w} |feat| / tau), shape N x C x 1 x 1 (sums to C)."""
    n, c = feat.shape[:2]
    logits = feat.abs().mean(dim=(2, 3)) / tau
    return (c * F.softmax(logits, dim=1)).reshape(n, c, 1, 1)


def num_masked(ratio: float, total: int) -> int:
    """round(ratio * total), rounding halves up (not Python's banker's rounding)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f'mask ratio must be in [0, 1], got {ratio}')
    return min(total, int(ratio * total + 0.5))


def sample_attention_mask(attention: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Keep-mask (1 = keep, 0 = masked) of the same shape N x M as ``attention``.

    Per row, exactly ``num_masked(ratio, M)`` entries are masked, drawn WITHOUT
    replacement with probability proportional to the attention. Weights are clamped at
    1e-12 of the row maximum so that underflowed softmax entries can still be drawn last.
    """
    n, m = attention.shape
    keep = torch.ones(n, m, device=attention.device, dtype=attention.dtype)
    k = num_masked(ratio, m)
    if k == 0:
        return keep
    weights = attention.detach().float()
    weights = torch.maximum(weights, 1e-12 * weights.amax(dim=1, keepdim=True))
    idx = torch.multinomial(weights, k, replacement=False, generator=generator)
    return keep.scatter_(1, idx, 0.0)


def channel_normalize(feat: Tensor, eps: float = 1e-6) -> Tensor:
    """Per channel, zero mean and unit (unbiased, as mmrazor's PKDLoss) std over (N, H, W):
    (x - mu) / (std + eps)."""
    n, c, h, w = feat.shape
    flat = feat.transpose(0, 1).reshape(c, -1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True)
    return ((flat - mean) / (std + eps)).reshape(c, n, h, w).transpose(0, 1)
