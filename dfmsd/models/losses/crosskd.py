"""CrossKD (Wang et al., CVPR 2024): the student's head features through the teacher's head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmdet.models.dense_heads import GFLHead, RetinaHead
from mmdet.models.losses import GIoULoss
from mmdet.models.losses.utils import weighted_loss
from mmdet.models.utils import unpack_gt_instances
from mmdet.registry import MODELS
from mmdet.utils import reduce_mean
from torch import Tensor

from dfmsd.core.errors import DistillError

from .common import DistillLoss, make_align
from .dense_heads import branch_class

#: the teacher heads CrossKD's code and our presets cover
TEACHER_KINDS = {RetinaHead: 'retina', GFLHead: 'gfl'}


def crosskd_teacher_kind(head: nn.Module | None) -> str:
    """'retina' or 'gfl', else DistillError."""
    if head is not None and branch_class(head) in TEACHER_KINDS:
        return TEACHER_KINDS[branch_class(head)]
    name = 'no dense bbox_head (a two-stage detector?)' if head is None else type(head).__name__
    raise DistillError(f'CrossKDLoss supports RetinaHead and GFLHead teachers; the teacher has {name}')


def head_level_indices(head: nn.Module, strides: Sequence[int]) -> list[int]:
    """The head's level index (prior generator, Scale) of each stride."""
    own = [int(s[0]) if isinstance(s, Sequence) else int(s) for s in head.prior_generator.strides]
    missing = [s for s in strides if s not in own]
    if missing:
        raise DistillError(f'{type(head).__name__} has no level of stride {missing} (its strides: {own})')
    return [own.index(s) for s in strides]


def crosskd_targets(head: nn.Module, featmap_sizes: Sequence, level_indices: Sequence[int], samples, device=None):
    """The head's own anchors and label assignment (``get_anchors``, ``get_targets``) on the given
    levels alone: the head's other levels are given 0 x 0 maps, so they hold no anchors.

    Returns per given level anchors N x A_l x 4 and label_weights N x A_l, and avg_factor (positives,
    at least one per image, as mmdet's SamplingResult counts them).
    """
    if getattr(head, 'assigner', None) is None:
        raise DistillError(
            f'CrossKDLoss: the teacher {type(head).__name__} has no assigner (its config has no '
            f'train_cfg); the KD targets come from its label assignment'
        )
    gts, gts_ignore, metas = unpack_gt_instances(samples)
    sizes = [(0, 0)] * head.prior_generator.num_levels
    for size, i in zip(featmap_sizes, level_indices):
        sizes[i] = tuple(size)
    anchors, flags = head.get_anchors(sizes, metas, device=device)
    out = head.get_targets(anchors, flags, gts, metas, gts_ignore)
    if crosskd_teacher_kind(head) == 'gfl':
        anchors, _, label_weights, _, _, avg_factor = out  # anchors per level, N x A_l x 4
    else:
        _, label_weights, _, _, avg_factor = out
        anchors = [a.expand(len(metas), -1, -1) for a in anchors[0]]  # every image has the same anchors
    return [anchors[i] for i in level_indices], [label_weights[i] for i in level_indices], float(avg_factor)


def align_scale(stu: Tensor, tea: Tensor) -> Tensor:
    """CrossKD's align_scale: per channel over (N, H, W), (s - mean_s) / (std_s + 1e-6) * std_t + mean_t
    (unbiased stds; the student's statistics keep their gradient)."""
    n, c, h, w = stu.shape
    s, t = stu.transpose(0, 1).reshape(c, -1), tea.transpose(0, 1).reshape(c, -1)
    s = (s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-6)
    s = s * t.std(1, keepdim=True) + t.mean(1, keepdim=True)
    return s.reshape(c, n, h, w).transpose(0, 1)


def _towers(head: nn.Module, x: Tensor, idx: int, activated: bool, stop: int | None = None):
    """Run cls_convs and reg_convs (the first ``stop``); held = the output of tower conv idx (1-based;
    x itself for idx 0), after its activation if ``activated`` else before it.
    Returns (cls_held, reg_held, cls_feat, reg_feat)."""
    out = []
    for convs in (head.cls_convs, head.reg_convs):
        feat = held = x
        for i, conv in enumerate(list(convs)[:stop]):
            feat = conv(feat, activate=False)
            if i + 1 == idx and not activated:
                held = feat.clone()  # before mmcv's in-place activation
            feat = conv.activate(feat) if conv.with_activation else feat
            if i + 1 == idx and activated:
                held = feat
        out += [held, feat]
    return out[0], out[2], out[1], out[3]


def _final(head: nn.Module, cls_feat: Tensor, reg_feat: Tensor, level: int) -> tuple[Tensor, Tensor]:
    if crosskd_teacher_kind(head) == 'gfl':
        return head.gfl_cls(cls_feat), head.scales[level](head.gfl_reg(reg_feat)).float()
    return head.retina_cls(cls_feat), head.retina_reg(reg_feat)


def _flat(x: Tensor, width: int) -> Tensor:
    """N x (A*width) x H x W -> (N*H*W*A) x width (mmdet's order)."""
    return x.permute(0, 2, 3, 1).reshape(-1, width)


@weighted_loss
def kd_quality_focal_loss(pred: Tensor, target_logits: Tensor, beta: float = 1.0) -> Tensor:
    """BCE(pred; sigma(t)) |sigma(pred) - sigma(t)|^beta per element: CrossKD's KDQualityFocalLoss,
    which mmdet does not ship (its QualityFocalLoss takes labels and IoU scores, not soft logits)."""
    target = target_logits.detach().sigmoid()
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction='none')
    return loss * (pred.sigmoid() - target).abs().pow(beta)


@weighted_loss
def distribution_kl(pred: Tensor, target_logits: Tensor) -> Tensor:
    """KL(softmax(t) || softmax(pred)) per row, summed over the bins: CrossKD's GFL config runs its
    KnowledgeDistillationKLDivLoss with class_reduction='sum' and T = 1; mmdet's averages over the
    bins instead (a factor 1 / (reg_max + 1)), so it is not used."""
    target = F.softmax(target_logits.detach(), dim=1)
    return F.kl_div(F.log_softmax(pred, dim=1), target, reduction='none').sum(dim=1)


@MODELS.register_module()
class CrossKDLoss(DistillLoss):
    """CrossKD (Wang et al., CVPR 2024), as jbwang1997/CrossKD's crosskd_retinanet.py / crosskd_gfl.py.

    Per distilled level l, k = reused_idx:
        h_S = output of the student's cls (reg) tower conv k (k = 0: S itself), see hold_activated
        h_T = the same of the teacher's tower on T (no grad)
        x   = align_scale(f_align(h_S), h_T), ReLU'd if k > 0
        (c~, r~) = the TEACHER's tower convs k.. and final cls / reg convs on x (frozen, grad to x)
        (c, r)   = the teacher's own outputs on T
    Targets: the teacher head's get_targets on its anchors -> label weights lw, avg_factor A.
    w_i = sigmoid(max_c c_ic) where lw_i > 0, else 0 (per anchor).
        cls  = loss_cls_weight * sum_l sum_{i,c} lw_i BCE(c~_ic; sigma(c_ic)) |sigma(c~_ic) - sigma(c_ic)| / A
    RetinaHead teacher (delta boxes decoded by its bbox_coder on the anchors):
        reg  = loss_reg_weight (1.0) * sum_l sum_i w_i (1 - GIoU(box(r~_i), box(r_i))) / A
    GFLHead teacher (W = sum_l sum_i w_i):
        reg  = loss_reg_weight (3.0) * sum_l sum_{i,side} w_i KL(softmax(r_i) || softmax(r~_i)) / 4 / W
        bbox = loss_bbox_weight (2.0) * sum_l sum_i w_i (1 - GIoU(B(r~_i), B(r_i))) / W,
               B = DistancePointBBoxCoder(anchor centre / stride, integral(r)) (stride units)
    Returns {'cls', 'reg'} (+ 'bbox' for GFL), each times loss_weight. Each level's term is reduced
    as the official code does (mmdet's weight / avg_factor reduction: the sum over (avg_factor + eps)).

    The held feature: the official code keeps the tower conv's output taken with activate=False and
    then calls the ConvModule's activation on it, which is mmcv's in-place ReLU, so what it holds
    (and align_scale standardises) is the ACTIVATED output; ``hold_activated=True`` (default) does
    that, ``False`` holds the pre-activation output its source reads as.

    Deviations from the official code (ours):
    - reused_idx defaults to the teacher's conv count (official 3 of 4 convs; our small heads have 2);
      0 <= reused_idx <= stacked_convs of the teacher (and the student's tower length) is checked;
    - f_align: a 1x1 conv on h_S (one for cls, one for reg, shared by the levels) when the held
      widths differ (the official code assumes equal channels); widths are the FPN channels unless
      student_feat_channels / teacher_feat_channels say otherwise;
    - student and teacher heads may differ in type (any student head with ConvModule towers);
    - only the distilled levels (at least 2x2 cells: P3-P6 at 128 px, not P7) take part, in the
      assignment too (ATSS's per-level top-k has no P7 candidates);
    - the GFL version is the one with the GIoU term (KL weight 3.0 + GIoU 2.0, commit 9f695b4 "Update
      GFL", kept on the repo's later branches); its master branch has the KL alone with weight 4.0
      (loss_reg_weight=4.0, loss_bbox_weight=0 gives that); W is clamped at 1e-12 (no NaN without
      valid anchors);
    - the student's towers run again on S (up to conv k) instead of sharing the detection forward.
    """

    per_level = False

    def __init__(
        self,
        student_channels: int | Sequence[int],
        teacher_channels: int | Sequence[int],
        loss_weight: float = 1.0,
        reused_idx: int | None = None,
        loss_cls_weight: float = 1.0,
        loss_reg_weight: float | None = None,
        loss_bbox_weight: float = 2.0,
        beta: float = 1.0,
        student_feat_channels: int | None = None,
        teacher_feat_channels: int | None = None,
        hold_activated: bool = True,
    ):
        super().__init__()
        cs, ct = ({c} if isinstance(c, int) else set(c) for c in (student_channels, teacher_channels))
        if len(cs) != 1 or len(ct) != 1:
            raise DistillError(
                f'CrossKDLoss needs one FPN width per model, got student {sorted(cs)}, teacher {sorted(ct)}'
            )
        self.widths = (student_feat_channels or cs.pop(), teacher_feat_channels or ct.pop())
        self.align_cls, self.align_reg = make_align(*self.widths), make_align(*self.widths)
        if reused_idx is not None and reused_idx < 0:
            raise DistillError(f'CrossKDLoss: reused_idx must be >= 0, got {reused_idx}')
        self.loss_weight, self.reused_idx, self.beta = loss_weight, reused_idx, beta
        self.hold_activated = hold_activated
        self.loss_cls_weight, self.loss_reg_weight, self.loss_bbox_weight = (
            loss_cls_weight,
            loss_reg_weight,
            loss_bbox_weight,
        )
        self.giou = GIoULoss(eps=1e-6)  # what the official code builds: weight, then sum / (avg_factor + eps)

    def resolve_idx(self, student_head: nn.Module, teacher_head: nn.Module) -> int:
        n_t = len(teacher_head.cls_convs)
        idx = n_t if self.reused_idx is None else self.reused_idx
        if not 0 <= idx <= n_t:
            raise DistillError(
                f'CrossKDLoss: reused_idx {idx} is outside 0..{n_t}, the teacher '
                f'{type(teacher_head).__name__} has {n_t} tower convs'
            )
        towers = [getattr(student_head, name, None) for name in ('cls_convs', 'reg_convs')]
        if any(t is None or len(t) < idx or not all(isinstance(c, ConvModule) for c in t) for t in towers):
            raise DistillError(
                f'CrossKDLoss: the student {type(student_head).__name__} needs cls_convs and '
                f'reg_convs of at least reused_idx = {idx} ConvModules'
            )
        return idx

    def cross_level(
        self, s: Tensor, t: Tensor, student_head: nn.Module, teacher_head: nn.Module, idx: int, level: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(reused cls, reused reg, teacher cls, teacher reg) of one level, in the teacher head's format."""
        s_cls, s_reg, _, _ = _towers(student_head, s, idx, self.hold_activated, stop=idx)
        with torch.no_grad():
            t_cls_held, t_reg_held, t_cls_feat, t_reg_feat = _towers(teacher_head, t.detach(), idx, self.hold_activated)
            tea_cls, tea_reg = _final(teacher_head, t_cls_feat, t_reg_feat, level)
        if (s_cls.shape[1], t_cls_held.shape[1]) != self.widths:
            raise DistillError(
                f'CrossKDLoss: the held features have {s_cls.shape[1]} (student) and {t_cls_held.shape[1]} '
                f'(teacher) channels at reused_idx {idx}, the align expects {self.widths}; set '
                f'student_feat_channels / teacher_feat_channels'
            )
        x_cls = align_scale(self.align_cls(s_cls), t_cls_held)
        x_reg = align_scale(self.align_reg(s_reg), t_reg_held)
        if idx:
            x_cls, x_reg = F.relu(x_cls), F.relu(x_reg)
        for conv in list(teacher_head.cls_convs)[idx:]:
            x_cls = conv(x_cls)
        for conv in list(teacher_head.reg_convs)[idx:]:
            x_reg = conv(x_reg)
        return (*_final(teacher_head, x_cls, x_reg, level), tea_cls, tea_reg)

    def forward(
        self,
        preds_S: Sequence[Tensor],
        preds_T: Sequence[Tensor],
        *,
        student_head,
        teacher_head,
        samples,
        strides: Sequence[int],
    ) -> dict[str, Tensor]:
        kind = crosskd_teacher_kind(teacher_head)
        idx = self.resolve_idx(student_head, teacher_head)
        levels = head_level_indices(teacher_head, strides)
        outs = [
            self.cross_level(s, t, student_head, teacher_head, idx, lvl) for s, t, lvl in zip(preds_S, preds_T, levels)
        ]
        anchors, label_weights, avg_factor = crosskd_targets(
            teacher_head, [t.shape[-2:] for t in preds_T], levels, samples, preds_T[0].device
        )
        if kind == 'gfl':  # as GFLHead.loss_by_feat: the mean over the processes
            avg_factor = reduce_mean(torch.tensor(avg_factor, device=preds_T[0].device)).item()
        n_cls = teacher_head.cls_out_channels
        reg_weight = self.loss_reg_weight if self.loss_reg_weight is not None else {'retina': 1.0, 'gfl': 3.0}[kind]
        cls = reg = bbox = weight_sum = 0.0
        for (r_cls, r_reg, t_cls, t_reg), a, lw, lvl in zip(outs, anchors, label_weights, levels):
            t_flat, lw, a = _flat(t_cls, n_cls), lw.reshape(-1), a.reshape(-1, 4)
            cls = cls + kd_quality_focal_loss(
                _flat(r_cls, n_cls), t_flat, lw[:, None], avg_factor=avg_factor, beta=self.beta
            )
            w = t_flat.max(dim=1).values.sigmoid() * (lw != 0)
            if kind == 'retina':
                coder = teacher_head.bbox_coder
                boxes = (coder.decode(a, _flat(x, coder.encode_size)) for x in (r_reg, t_reg))
                reg = reg + self.giou(*boxes, w, avg_factor=avg_factor)
                continue
            bins = teacher_head.reg_max + 1
            reg = reg + distribution_kl(_flat(r_reg, bins), _flat(t_reg, bins), w.repeat_interleave(4), avg_factor=4.0)
            centers = teacher_head.anchor_center(a) / teacher_head.prior_generator.strides[lvl][0]
            integral = (teacher_head.integral(_flat(x, 4 * bins)) for x in (r_reg, t_reg))
            bbox = bbox + self.giou(*(teacher_head.bbox_coder.decode(centers, d) for d in integral), w, avg_factor=1.0)
            weight_sum = weight_sum + w.sum()
        k = self.loss_weight
        if kind == 'retina':
            return dict(cls=k * self.loss_cls_weight * cls, reg=k * reg_weight * reg)
        weight_sum = weight_sum.clamp(min=1e-12)
        return dict(
            cls=k * self.loss_cls_weight * cls,
            reg=k * reg_weight * reg / weight_sum,
            bbox=k * self.loss_bbox_weight * bbox / weight_sum,
        )
