"""Head-level (logit) distillation: dense class-logit maps, PCD and CrossKD (cls branch).

Dense class logits, written once for every supported mmdet dense head:

    z = cls_branch(x)                    N x (A*C) x H x W   (the head's own modules)
    z -> N x A x C x H x W               (mmdet's channel order: index a*C + c)
    per-location logits = max_a z        N x C x H x W       (ours: anchors reduced by max)

``cls_branch`` is exactly the classification half of the head's ``forward_single``:
``cls_convs`` then ``retina_cls`` (RetinaHead), ``gfl_cls`` (GFLHead; GFL's ``Scale``
only scales the box branch), ``atss_cls`` (ATSSHead), ``conv_cls`` (AnchorFreeHead /
FCOSHead: FCOS's centerness is NOT folded into the logits, ours), ``conv_cls`` alone
(AnchorHead). A head is supported when its class's ``forward_single`` *and* ``forward``
are one of those (so subclasses such as PAA, LD, FreeAnchor, NAS-FCOS work; VFNet, TOOD,
RetinaSepBN, SSD, RPN and two-stage detectors are refused with a DistillError).
C is the head's ``cls_out_channels``: the classes for sigmoid heads; for softmax heads
C + 1 with mmdet's background column last (kept as one more class).

Logit losses are built per matched FPN level like the feature losses
(``student_channels`` / ``teacher_channels`` given) and declare in ``needs`` what the
distiller has to compute for them (``LOGIT_INPUTS``):

- ``student_logits``: the student's per-location logits of this level (with grad);
- ``teacher_logits``: the teacher's per-location logits of this level (no grad);
- ``teacher_head_fn``: a callable x -> N x A x C x H x W running the TEACHER's cls
  branch on a (teacher-channel) feature x; frozen weights, but differentiable in x.

Every logit loss is called as ``loss(preds_S, preds_T, *, <needs>, sigmoid, img_shapes,
stride, progress, gt_bboxes)``; ``preds_S`` / ``preds_T`` are the level's FPN features;
``sigmoid`` says whether the heads are sigmoid heads; ``progress`` is the training
progress iter / max_iters in [0, 1] (None when unknown).

Class KD of one location (temperature T, ours: written as a KL, i.e. zero when the
student equals the teacher):
    sigmoid heads: sum_c T^2 * [BCE(sigma(s_c/T); target sigma(t_c/T)) - H(sigma(t_c/T))]
                   = sum_c T^2 * KL(Bern(sigma(t_c/T)) || Bern(sigma(s_c/T)))
                   (per-class binary KD; the subtracted teacher entropy has no gradient,
                   so the gradient is exactly that of the BCE form)
    softmax heads: T^2 * KL(softmax(t/T) || softmax(s/T))   over the classes counted.
Locations: only cells inside the image (row * stride < img_h and col * stride < img_w,
ours), all cells when ``img_shapes`` or ``stride`` is missing.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.registry import MODELS
from torch import Tensor

from .common import make_align

LOGIT_INPUTS = frozenset({'student_logits', 'teacher_logits', 'teacher_head_fn'})


def _distill_error(message: str) -> Exception:
    from dfmsd.models.distiller import DistillError  # lazy: the distiller imports this module
    return DistillError(message)


# ------------------------------------------------------------------ dense class logits
def _cls_branches() -> dict:
    """forward_single -> (name of the cls tower or None, name of the final cls conv)."""
    from mmdet.models.dense_heads import (AnchorFreeHead, AnchorHead, ATSSHead, FCOSHead,
                                          GFLHead, RetinaHead)
    return {RetinaHead.forward_single: ('cls_convs', 'retina_cls'),
            GFLHead.forward_single: ('cls_convs', 'gfl_cls'),
            ATSSHead.forward_single: ('cls_convs', 'atss_cls'),
            FCOSHead.forward_single: ('cls_convs', 'conv_cls'),
            AnchorFreeHead.forward_single: ('cls_convs', 'conv_cls'),
            AnchorHead.forward_single: (None, 'conv_cls')}


def _known_forwards() -> set:
    from mmdet.models.dense_heads import (AnchorFreeHead, AnchorHead, ATSSHead, FCOSHead,
                                          GFLHead)
    return {AnchorHead.forward, AnchorFreeHead.forward, GFLHead.forward, ATSSHead.forward,
            FCOSHead.forward}


def dense_head(detector: nn.Module, role: str = 'detector') -> nn.Module:
    """The detector's dense head, checked to be one whose cls branch we can run alone."""
    head = getattr(detector, 'bbox_head', None)
    name = type(detector).__name__
    if head is None:
        raise _distill_error(
            f'logit distillation needs a dense-head teacher/student: the {role} {name} has no '
            f'dense class head (a two-stage detector classifies RoIs, not FPN locations)')
    cls = type(head)
    if cls.forward_single not in _cls_branches() or cls.forward not in _known_forwards():
        raise _distill_error(
            f'logit distillation needs a dense-head teacher/student with a plain classification '
            f'branch (RetinaHead, GFLHead, ATSSHead, FCOSHead and their subclasses); the {role} '
            f"{name}'s {cls.__name__} has its own forward")
    return head


def head_class_logits(head: nn.Module, x: Tensor, reduce_anchors: bool = True) -> Tensor:
    """One level: N x C x H x W (anchors reduced by max) or N x A x C x H x W."""
    tower, final = _cls_branches()[type(head).forward_single]
    feat = x
    for layer in (getattr(head, tower) if tower else ()):
        feat = layer(feat)
    z = getattr(head, final)(feat)
    n, channels, h, w = z.shape
    c = head.cls_out_channels
    if channels % c:
        raise _distill_error(f'{type(head).__name__}: {channels} cls channels are not '
                             f'anchors x {c} classes')
    z = z.reshape(n, channels // c, c, h, w)
    return z.amax(dim=1) if reduce_anchors else z


def dense_class_logits(detector: nn.Module, feats: Sequence[Tensor],
                       reduce_anchors: bool = True) -> List[Tensor]:
    """Per-location class logits of every FPN level: list of N x C x H x W.

    Runs the detector's own classification branch (its modules, its weights) on each
    level; anchors reduced by max over A (ours). Gradients flow as the caller allows.
    """
    head = dense_head(detector)
    return [head_class_logits(head, x, reduce_anchors) for x in feats]


# ------------------------------------------------------------------ shared KD pieces
def valid_locations(n: int, hw: Tuple[int, int], img_shapes: Optional[Sequence] = None,
                    stride: Optional[int] = None, device=None) -> Tensor:
    """N x H x W bool: cells whose top-left pixel lies inside the (unpadded) image."""
    h, w = hw
    valid = torch.ones(n, h, w, dtype=torch.bool, device=device)
    if img_shapes is None or stride is None:
        return valid
    if len(img_shapes) != n:
        raise ValueError(f'img_shapes has {len(img_shapes)} entries for a batch of {n}')
    for i, shape in enumerate(img_shapes):
        rows, cols = math.ceil(shape[0] / stride), math.ceil(shape[1] / stride)
        valid[i, rows:] = False
        valid[i, :, cols:] = False
    return valid


def logit_rows(logits: Tensor, valid: Tensor) -> Tensor:
    """N x C x H x W or N x A x C x H x W -> M x C, the valid locations (and anchors)."""
    z = logits.movedim(-3, -1)  # ..., H, W, C
    mask = valid.view(valid.shape[0], *([1] * (z.dim() - 4)), *valid.shape[1:])
    return z[mask.expand(z.shape[:-1])]


def class_kd(student: Tensor, teacher: Tensor, temperature: float, sigmoid: bool) -> Tensor:
    """M x C logits -> M per-location KD terms (see the module docstring), teacher detached."""
    t = teacher.detach() / temperature
    s = student / temperature
    if sigmoid:
        # KL(Bern(p_t) || Bern(p_s)) = BCE(s; p_t) - BCE(t; p_t), in log-sigmoid form
        # (log p = logsigmoid(z), log(1 - p) = logsigmoid(-z)) for accuracy near s = t.
        p_t = torch.sigmoid(t)
        kl = (p_t * (F.logsigmoid(t) - F.logsigmoid(s))
              + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s)))
        return temperature ** 2 * kl.sum(dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=-1))).sum(dim=-1)
    return temperature ** 2 * kl


def _mean_or_zero(terms: Tensor, like: Tensor) -> Tensor:
    return terms.mean() if terms.numel() else like.sum() * 0.0


# ------------------------------------------------------------------ PCD
def pcd_num_active_groups(progress: Optional[float], num_groups: int, num_stages: int) -> int:
    """k(progress): how many of the top-ranked class groups are active.

    Training is cut into ``num_stages`` equal stages, stage i = min(S-1, floor(p*S)).
    k rises 1 -> G over the first half (fine-to-coarse) and falls back G -> 1 over the
    second (coarse-to-fine refinement): k_i = 1 + round((G-1) * (1 - |2 i/(S-1) - 1|)),
    halves rounded up; with S = 2G-1 that is 1, 2, ..., G, ..., 2, 1. S = 1: k = G.
    progress None (unknown): all groups.
    """
    if num_groups < 1 or num_stages < 1:
        raise ValueError(f'num_groups and num_stages must be >= 1, got {num_groups}, {num_stages}')
    if progress is None or num_stages == 1:
        return num_groups
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f'progress must be in [0, 1], got {progress}')
    stage = min(num_stages - 1, int(math.floor(progress * num_stages)))
    tri = 1.0 - abs(2.0 * stage / (num_stages - 1) - 1.0)
    return 1 + int(math.floor((num_groups - 1) * tri + 0.5))


def pcd_class_groups(difference: Tensor, num_groups: int) -> List[Tensor]:
    """Class indices ranked by descending per-class difference (ties: lower index first),
    split into min(G, C) groups of near-equal size (the first groups take the extra)."""
    order = torch.sort(difference.detach(), descending=True, stable=True).indices
    return list(torch.tensor_split(order, min(num_groups, order.numel())))


@MODELS.register_module()
class PCDLoss(nn.Module):
    """Progressive Class-level Distillation (PCD) on dense per-location class logits.

    With s, t the student / teacher per-location class logits of a level (anchors
    reduced by max), V its valid locations and p the training progress:

        d_c  = mean_{(n,h,w) in V} |t_c - s_c|                 (detached, over the batch)
        G_1..G_K = classes ranked by d_c (largest first), split into K = num_groups groups
        A(p) = G_1 u ... u G_k(p),  k(p) = pcd_num_active_groups(p, K, num_stages)
        L = loss_weight * 1/|V| sum_{(n,h,w) in V} KD_{A(p)}(s_{nhw}, t_{nhw})

    KD_A: sigmoid heads sum_{c in A} T^2 KL(Bern(sigma(t_c/T)) || Bern(sigma(s_c/T)))
    (per-class binary KD, the BCE form minus the teacher's entropy); softmax heads
    T^2 KL(softmax(t_A/T) || softmax(s_A/T)) over the active classes only.
    Ours: the ranking is redone on every batch and level; stages are equal slices of
    the training progress; the KD sums over classes and averages over locations.
    """

    needs = frozenset({'student_logits', 'teacher_logits'})

    def __init__(self, student_channels: Optional[int] = None,
                 teacher_channels: Optional[int] = None, loss_weight: float = 1.0,
                 temperature: float = 1.0, num_groups: int = 3, num_stages: int = 5):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f'temperature must be > 0, got {temperature}')
        pcd_num_active_groups(None, num_groups, num_stages)  # validates the counts
        self.loss_weight, self.temperature = loss_weight, temperature
        self.num_groups, self.num_stages = num_groups, num_stages

    def active_classes(self, student_logits: Tensor, teacher_logits: Tensor,
                       progress: Optional[float], valid: Optional[Tensor] = None) -> Tensor:
        """Sorted indices of the classes whose KD terms count at this progress."""
        if valid is None:
            valid = torch.ones(student_logits.shape[0], *student_logits.shape[-2:],
                               dtype=torch.bool, device=student_logits.device)
        s, t = logit_rows(student_logits.detach(), valid), logit_rows(teacher_logits.detach(), valid)
        difference = (t - s).abs().mean(dim=0) if s.shape[0] else s.new_zeros(s.shape[1])
        groups = pcd_class_groups(difference, self.num_groups)
        k = min(len(groups), pcd_num_active_groups(progress, self.num_groups, self.num_stages))
        return torch.cat(groups[:k]).sort().values

    def forward(self, preds_S: Optional[Tensor] = None, preds_T: Optional[Tensor] = None, *,
                student_logits: Tensor, teacher_logits: Tensor, sigmoid: bool = True,
                progress: Optional[float] = None,
                img_shapes: Optional[List[Tuple[int, int]]] = None, stride: Optional[int] = None,
                gt_bboxes: Optional[List[Tensor]] = None) -> Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f'student logits {tuple(student_logits.shape)} and teacher logits '
                             f'{tuple(teacher_logits.shape)} differ')
        valid = valid_locations(student_logits.shape[0], student_logits.shape[-2:], img_shapes,
                                stride, student_logits.device)
        active = self.active_classes(student_logits, teacher_logits, progress, valid).to(
            student_logits.device)
        s = logit_rows(student_logits, valid).index_select(-1, active)
        t = logit_rows(teacher_logits, valid).index_select(-1, active)
        terms = class_kd(s, t, self.temperature, sigmoid)
        return self.loss_weight * _mean_or_zero(terms, student_logits)


# ------------------------------------------------------------------ CrossKD
@MODELS.register_module()
class CrossKDLoss(nn.Module):
    """CrossKD (Wang et al., CVPR 2024), classification branch only (ours).

    The student's FPN feature S, channel-aligned to the teacher (f_align: 1x1 conv when
    Cs != Ct), goes through the TEACHER's cls branch (frozen weights; gradients flow back
    to S and f_align), giving cross-head logits x = cls_T(f_align(S)); the target is the
    teacher's own logits t = cls_T(T) (no grad). Both keep the teacher head's A anchors:

        L = loss_weight * 1/|V_A| sum_{(n,a,h,w) in V_A} sum_c T^2 KL(Bern(sigma(t_c/T)) || Bern(sigma(x_c/T)))

    (softmax heads: T^2 KL(softmax(t/T) || softmax(x/T))), V_A the valid locations times
    the anchors. Ours: crossing at the head's input (the paper can cross after any of
    the head's convs), the box branch is not distilled, binary KD instead of the head's
    own (quality-focal) loss.
    """

    needs = frozenset({'teacher_head_fn'})

    def __init__(self, student_channels: int, teacher_channels: int, loss_weight: float = 1.0,
                 temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f'temperature must be > 0, got {temperature}')
        self.align = make_align(student_channels, teacher_channels)
        self.loss_weight, self.temperature = loss_weight, temperature

    def forward(self, preds_S: Tensor, preds_T: Tensor, *,
                teacher_head_fn: Callable[[Tensor], Tensor], sigmoid: bool = True,
                progress: Optional[float] = None,
                img_shapes: Optional[List[Tuple[int, int]]] = None, stride: Optional[int] = None,
                gt_bboxes: Optional[List[Tensor]] = None) -> Tensor:
        cross = teacher_head_fn(self.align(preds_S))
        with torch.no_grad():
            target = teacher_head_fn(preds_T.detach())
        if cross.shape != target.shape:
            raise ValueError(f'cross-head logits {tuple(cross.shape)} and teacher logits '
                             f'{tuple(target.shape)} differ')
        valid = valid_locations(cross.shape[0], cross.shape[-2:], img_shapes, stride, cross.device)
        terms = class_kd(logit_rows(cross, valid), logit_rows(target, valid), self.temperature,
                         sigmoid)
        return self.loss_weight * _mean_or_zero(terms, cross)
