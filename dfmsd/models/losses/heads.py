"""Head-level distillation: dense class logits, PCD, CrossKD, and MAR's relation term.

Dense class logits of one FPN level, written once for every supported mmdet dense head:

    z = cls_branch(x)              N x (A*C) x H x W   (the head's own modules)
    z -> N x A x C x H x W         (mmdet's channel order: index a*C + c)
    per-location logits = max_a z  N x C x H x W       (ours: anchors reduced by max)

``cls_branch`` is the classification half of the head's ``forward_single``: ``cls_convs``
then ``retina_cls`` (RetinaHead), ``gfl_cls`` (GFLHead; its ``Scale`` only scales the box
branch), ``atss_cls`` (ATSSHead), ``conv_cls`` (AnchorFreeHead / FCOSHead: FCOS's
centerness is not folded in), ``conv_cls`` alone (AnchorHead). A head is supported when
its class's ``forward_single`` and ``forward`` are one of those; heads with their own
forward (VFNet, TOOD, SSD, RPN, ...) and two-stage detectors raise a DistillError.
C = ``cls_out_channels``: the classes for sigmoid heads, C + 1 (background last) otherwise.

The heads come from the distiller (``student_head``: trainable; ``teacher_head``: frozen,
eval mode, None for a detector without a dense ``bbox_head``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmdet.registry import MODELS
from mmdet.structures.bbox import bbox_overlaps
from mmdet.utils import reduce_mean
from torch import Tensor

from dfmsd.core.errors import DistillError

from .common import DistillLoss, make_align


# ------------------------------------------------------------------ dense class logits
def _cls_branches() -> dict:
    """forward_single -> (name of the cls tower or None, name of the final cls conv)."""
    from mmdet.models.dense_heads import AnchorFreeHead, AnchorHead, ATSSHead, FCOSHead, GFLHead, RetinaHead

    return {
        RetinaHead.forward_single: ('cls_convs', 'retina_cls'),
        GFLHead.forward_single: ('cls_convs', 'gfl_cls'),
        ATSSHead.forward_single: ('cls_convs', 'atss_cls'),
        FCOSHead.forward_single: ('cls_convs', 'conv_cls'),
        AnchorFreeHead.forward_single: ('cls_convs', 'conv_cls'),
        AnchorHead.forward_single: (None, 'conv_cls'),
    }


def _known_forwards() -> set:
    from mmdet.models.dense_heads import AnchorFreeHead, AnchorHead, ATSSHead, FCOSHead, GFLHead

    return {AnchorHead.forward, AnchorFreeHead.forward, GFLHead.forward, ATSSHead.forward, FCOSHead.forward}


SUPPORTED = 'RetinaHead, GFLHead, ATSSHead, FCOSHead, AnchorHead and their subclasses'


def checked_head(head: nn.Module | None, role: str, user: str) -> nn.Module:
    """``head`` if its cls branch can run alone, else a DistillError naming its class."""
    if head is None:
        raise DistillError(
            f'{user} needs a dense-head {role}: the {role} has no dense bbox_head (a two-stage '
            f'detector classifies RoIs, not FPN locations); supported: {SUPPORTED}'
        )
    cls = type(head)
    if cls.forward_single not in _cls_branches() or cls.forward not in _known_forwards():
        raise DistillError(
            f'{user} needs a dense-head {role} with a plain classification branch ({SUPPORTED}); '
            f"the {role}'s {cls.__name__} has its own forward"
        )
    return head


def dense_head(detector: nn.Module, role: str = 'detector') -> nn.Module:
    """The detector's dense head, checked (a two-stage detector raises, naming its class)."""
    head = getattr(detector, 'bbox_head', None)
    if head is None:
        raise DistillError(
            f'head-level distillation needs a dense-head teacher/student: the {role} '
            f'{type(detector).__name__} has no dense class head (a two-stage detector '
            f'classifies RoIs, not FPN locations)'
        )
    return checked_head(head, role, 'head-level distillation')


def split_anchors(cls_score: Tensor, num_classes: int) -> Tensor:
    """N x (A*C) x H x W -> N x A x C x H x W."""
    n, channels, h, w = cls_score.shape
    if channels % num_classes:
        raise DistillError(f'{channels} cls channels are not anchors x {num_classes} classes')
    return cls_score.reshape(n, channels // num_classes, num_classes, h, w)


def head_class_logits(head: nn.Module, x: Tensor, reduce_anchors: bool = True) -> Tensor:
    """One level: N x C x H x W (anchors reduced by max) or N x A x C x H x W."""
    tower, final = _cls_branches()[type(head).forward_single]
    for layer in getattr(head, tower) if tower else ():
        x = layer(x)
    z = split_anchors(getattr(head, final)(x), head.cls_out_channels)
    return z.amax(dim=1) if reduce_anchors else z


def dense_class_logits(detector: nn.Module, feats: Sequence[Tensor], reduce_anchors: bool = True) -> list[Tensor]:
    """Per-location class logits of every FPN level, with the detector's own cls branch."""
    head = dense_head(detector)
    return [head_class_logits(head, x, reduce_anchors) for x in feats]


# ------------------------------------------------------------------ PCD
def valid_locations(
    n: int, hw: tuple[int, int], img_shapes: Sequence | None = None, stride: int | None = None, device=None
) -> Tensor:
    """N x H x W bool: cells whose top-left pixel lies inside the unpadded image
    (row * stride < img_h and col * stride < img_w); all cells without shapes or stride."""
    h, w = hw
    valid = torch.ones(n, h, w, dtype=torch.bool, device=device)
    if img_shapes is None or stride is None:
        return valid
    if len(img_shapes) != n:
        raise ValueError(f'img_shapes has {len(img_shapes)} entries for a batch of {n}')
    for i, shape in enumerate(img_shapes):
        valid[i, math.ceil(shape[0] / stride) :] = False
        valid[i, :, math.ceil(shape[1] / stride) :] = False
    return valid


def class_kd(student: Tensor, teacher: Tensor, temperature: float, sigmoid: bool) -> Tensor:
    """M x C logits -> M per-location KD terms, teacher detached (zero when s == t):
    sigmoid: sum_c T^2 KL(Bern(sigma(t_c/T)) || Bern(sigma(s_c/T))) (binary KD, the BCE form
    minus the teacher's entropy); softmax: T^2 KL(softmax(t/T) || softmax(s/T))."""
    t, s = teacher.detach() / temperature, student / temperature
    if sigmoid:
        p_t = torch.sigmoid(t)
        kl = p_t * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))
        return temperature**2 * kl.sum(dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    return temperature**2 * (log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=-1))).sum(dim=-1)


def pcd_num_active_groups(progress: float | None, num_groups: int, num_stages: int) -> int:
    """k(p): training cut into S equal stages i = min(S-1, floor(p*S)); k rises 1 -> G, then falls
    back: k_i = 1 + round_half_up((G-1) (1 - |2i/(S-1) - 1|)) (S = 2G-1: 1, 2, .., G, .., 2, 1).
    S = 1 or p None (unknown): all G groups."""
    if num_groups < 1 or num_stages < 1:
        raise ValueError(f'num_groups and num_stages must be >= 1, got {num_groups}, {num_stages}')
    if progress is None or num_stages == 1:
        return num_groups
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f'progress must be in [0, 1], got {progress}')
    stage = min(num_stages - 1, int(math.floor(progress * num_stages)))
    tri = 1.0 - abs(2.0 * stage / (num_stages - 1) - 1.0)
    return 1 + int(math.floor((num_groups - 1) * tri + 0.5))


@MODELS.register_module()
class PCDLoss(DistillLoss):
    """Progressive Class-level Distillation on dense per-location class logits (one level).

    s = the student head's own logits of this level (``student_head_out``, anchors reduced by
    max), t = the teacher head's cls branch on T (no grad, anchors reduced by max), V = the
    cells inside the unpadded image, p = training progress:

        d_c = mean_{(n,h,w) in V} |t_c - s_c|            (detached, over the batch)
        G_1..G_K = classes ranked by d_c (largest first, ties: lower index), split into K groups
        A(p) = G_1 u ... u G_k(p),  k(p) = pcd_num_active_groups(p, K, num_stages)
        L = loss_weight * 1/|V| sum_{(n,h,w) in V} KD_{A(p)}(s_nhw, t_nhw)

    KD: ``class_kd`` over the active classes (binary KD for sigmoid heads, softmax KD otherwise).
    Ours: ranking redone per batch and level; stages are equal slices of p; anchors reduced by
    max so heads with different anchor counts compare. Student and teacher heads must have the
    same classes and sigmoid-ness.
    """

    needs = frozenset({'student_head_out', 'student_head', 'teacher_head', 'progress', 'img_shapes', 'stride'})

    def __init__(
        self,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        loss_weight: float = 1.0,
        temperature: float = 1.0,
        num_groups: int = 3,
        num_stages: int = 5,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f'temperature must be > 0, got {temperature}')
        pcd_num_active_groups(None, num_groups, num_stages)  # validates the counts
        self.loss_weight, self.temperature = loss_weight, temperature
        self.num_groups, self.num_stages = num_groups, num_stages

    def active_classes(self, s_rows: Tensor, t_rows: Tensor, progress: float | None) -> Tensor:
        """Sorted indices of the classes counted at this progress, from M x C valid rows."""
        diff = (t_rows - s_rows).detach().abs().mean(dim=0) if len(s_rows) else s_rows.new_zeros(s_rows.shape[1])
        order = torch.sort(diff, descending=True, stable=True).indices
        groups = torch.tensor_split(order, min(self.num_groups, order.numel()))
        k = min(len(groups), pcd_num_active_groups(progress, self.num_groups, self.num_stages))
        return torch.cat(groups[:k]).sort().values

    def logit_loss(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        sigmoid: bool,
        progress: float | None = None,
        img_shapes=None,
        stride: int | None = None,
    ) -> Tensor:
        """L from N x C x H x W logits."""
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f'student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ'
            )
        n, _, h, w = student_logits.shape
        valid = valid_locations(n, (h, w), img_shapes, stride, student_logits.device)
        s = student_logits.permute(0, 2, 3, 1)[valid]  # M x C
        t = teacher_logits.detach().permute(0, 2, 3, 1)[valid]
        active = self.active_classes(s, t, progress)
        terms = class_kd(s[:, active], t[:, active], self.temperature, sigmoid)
        return self.loss_weight * (terms.mean() if terms.numel() else student_logits.sum() * 0.0)

    def forward(
        self,
        preds_S: Tensor,
        preds_T: Tensor,
        *,
        student_head_out,
        student_head,
        teacher_head,
        progress: float | None = None,
        img_shapes=None,
        stride: int | None = None,
    ) -> Tensor:
        teacher = checked_head(teacher_head, 'teacher', 'PCDLoss')
        student = checked_head(student_head, 'student', 'PCDLoss')
        if (student.cls_out_channels, student.use_sigmoid_cls) != (teacher.cls_out_channels, teacher.use_sigmoid_cls):
            raise DistillError(
                f'PCDLoss needs the same classes on both heads: student {type(student).__name__} has '
                f'{student.cls_out_channels} cls outputs (sigmoid {student.use_sigmoid_cls}), teacher '
                f'{type(teacher).__name__} {teacher.cls_out_channels} (sigmoid {teacher.use_sigmoid_cls})'
            )
        s = split_anchors(student_head_out[0], student.cls_out_channels).amax(dim=1)
        with torch.no_grad():
            t = head_class_logits(teacher, preds_T.detach())
        return self.logit_loss(s, t, teacher.use_sigmoid_cls, progress, img_shapes, stride)


# ------------------------------------------------------------------ CrossKD
def crosskd_teacher_kind(head: nn.Module | None) -> str:
    """'retina' or 'gfl' (the teacher heads CrossKD's code and our presets cover), else DistillError."""
    from mmdet.models.dense_heads import GFLHead, RetinaHead

    cls = type(head)
    if head is not None and cls.forward is RetinaHead.forward and cls.forward_single is RetinaHead.forward_single:
        return 'retina'
    if head is not None and cls.forward is GFLHead.forward and cls.forward_single is GFLHead.forward_single:
        return 'gfl'
    name = 'no dense bbox_head (a two-stage detector?)' if head is None else cls.__name__
    raise DistillError(f'CrossKDLoss supports RetinaHead and GFLHead teachers; the teacher has {name}')


def head_level_indices(head: nn.Module, strides: Sequence[int]) -> list[int]:
    """The head's level index (prior generator, Scale) of each stride."""
    own = [int(s[0]) if isinstance(s, Sequence) else int(s) for s in head.prior_generator.strides]
    missing = [s for s in strides if s not in own]
    if missing:
        raise DistillError(f'{type(head).__name__} has no level of stride {missing} (its strides: {own})')
    return [own.index(s) for s in strides]


def crosskd_targets(head: nn.Module, featmap_sizes: Sequence, level_indices: Sequence[int], samples, device=None):
    """The head's own label assignment (``get_targets``) on its anchors of the given levels.

    Returns per level anchors N x A_l x 4 and label_weights N x A_l, and avg_factor (positives,
    at least one per image, as mmdet's SamplingResult counts them).
    """
    from mmdet.models.utils import unpack_gt_instances

    if getattr(head, 'assigner', None) is None:
        raise DistillError(
            f'CrossKDLoss: the teacher {type(head).__name__} has no assigner (its config has no '
            f'train_cfg); the KD targets come from its label assignment'
        )
    gen = head.prior_generator
    gts, gts_ignore, metas = unpack_gt_instances(samples)
    anchors = [
        gen.single_level_grid_priors(tuple(size), level_idx=i, device=device)
        for size, i in zip(featmap_sizes, level_indices)
    ]
    flags = []
    for meta in metas:  # as AnchorGenerator.valid_flags, for the chosen levels
        pad_h, pad_w = meta['pad_shape'][:2]
        flags.append(
            [
                gen.single_level_valid_flags(
                    (h, w),
                    (min(math.ceil(pad_h / gen.strides[i][1]), h), min(math.ceil(pad_w / gen.strides[i][0]), w)),
                    gen.num_base_anchors[i],
                    device=device,
                )
                for (h, w), i in zip(featmap_sizes, level_indices)
            ]
        )
    out = head.get_targets([list(anchors) for _ in metas], flags, gts, metas, gts_ignore)
    if crosskd_teacher_kind(head) == 'gfl':
        anchors_list, _, label_weights, _, _, avg_factor = out
    else:
        _, label_weights, _, _, avg_factor = out
        anchors_list = [a.expand(len(metas), -1, -1) for a in anchors]
    return anchors_list, label_weights, float(avg_factor)


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


def kd_quality_focal_sum(pred: Tensor, target_logits: Tensor, weight: Tensor, beta: float) -> Tensor:
    """sum_{i,c} w_i BCE(pred_ic; sigma(t_ic)) |sigma(pred_ic) - sigma(t_ic)|^beta (KDQualityFocalLoss)."""
    target = target_logits.detach().sigmoid()
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction='none')
    return (loss * (pred.sigmoid() - target).abs().pow(beta) * weight[:, None]).sum()


def giou_sum(pred: Tensor, target: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """sum_i w_i (1 - GIoU(pred_i, target_i)) over rows with w_i > 0 (GIoULoss, eps 1e-6)."""
    keep = weight > 0
    if not keep.any():
        return pred.sum() * 0.0
    giou = bbox_overlaps(pred[keep], target[keep], mode='giou', is_aligned=True, eps=eps)
    return ((1 - giou) * weight[keep]).sum()


def distribution_kl_sum(pred: Tensor, target_logits: Tensor, weight: Tensor) -> Tensor:
    """sum_i w_i KL(softmax(t_i) || softmax(pred_i)) (KnowledgeDistillationKLDivLoss, T = 1, class sum)."""
    target = F.softmax(target_logits.detach(), dim=1)
    return (F.kl_div(F.log_softmax(pred, dim=1), target, reduction='none').sum(dim=1) * weight).sum()


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
    Returns {'cls', 'reg'} (+ 'bbox' for GFL), each times loss_weight.

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
    needs = frozenset({'student_head', 'teacher_head', 'samples', 'strides'})

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
        n_cls = teacher_head.cls_out_channels
        reg_weight = self.loss_reg_weight if self.loss_reg_weight is not None else {'retina': 1.0, 'gfl': 3.0}[kind]
        cls = reg = bbox = weight_sum = 0.0
        for (r_cls, r_reg, t_cls, t_reg), a, lw, lvl in zip(outs, anchors, label_weights, levels):
            t_flat, lw, a = _flat(t_cls, n_cls), lw.reshape(-1), a.reshape(-1, 4)
            cls = cls + kd_quality_focal_sum(_flat(r_cls, n_cls), t_flat, lw, self.beta)
            w = t_flat.max(dim=1).values.sigmoid() * (lw != 0)
            if kind == 'retina':
                coder = teacher_head.bbox_coder
                reg = reg + giou_sum(*(coder.decode(a, _flat(x, coder.encode_size)) for x in (r_reg, t_reg)), w)
                continue
            bins = teacher_head.reg_max + 1
            reg = reg + distribution_kl_sum(_flat(r_reg, bins), _flat(t_reg, bins), w.repeat_interleave(4)) / 4.0
            centers = teacher_head.anchor_center(a) / teacher_head.prior_generator.strides[lvl][0]
            bbox = bbox + giou_sum(
                *(
                    teacher_head.bbox_coder.decode(centers, teacher_head.integral(_flat(x, 4 * bins)))
                    for x in (r_reg, t_reg)
                ),
                w,
            )
            weight_sum = weight_sum + w.sum()
        k = self.loss_weight
        if kind == 'retina':
            return dict(cls=k * self.loss_cls_weight * cls / avg_factor, reg=k * reg_weight * reg / avg_factor)
        avg_factor = reduce_mean(torch.tensor(avg_factor, device=t_flat.device)).item()
        weight_sum = weight_sum.clamp(min=1e-12)
        return dict(
            cls=k * self.loss_cls_weight * cls / avg_factor,
            reg=k * reg_weight * reg / weight_sum,
            bbox=k * self.loss_bbox_weight * bbox / weight_sum,
        )


# ------------------------------------------------------------------ MAR relation
def pool_to_max_pixels(x: Tensor, max_pixels: int) -> Tensor:
    """x itself if H*W <= max_pixels, else avg_pool2d with the smallest k such that
    ceil(H/k) * ceil(W/k) <= max_pixels (ceil mode: edge windows average their in-map cells)."""
    h, w = x.shape[-2:]
    k = 1
    while math.ceil(h / k) * math.ceil(w / k) > max_pixels:
        k += 1
    return x if k == 1 else F.avg_pool2d(x, k, k, ceil_mode=True)


def pixel_relation(x: Tensor) -> Tensor:
    """N x C x H x W -> N x P x P cosine similarities between the P = H*W pixel vectors."""
    v = F.normalize(x.flatten(2), dim=1)
    return v.transpose(1, 2) @ v


def cls_tower(head: nn.Module | None, x: Tensor, role: str) -> Tensor:
    """The head's classification tower (``cls_convs``, with activations) on x."""
    head = checked_head(head, role, 'MARRelationLoss')
    if _cls_branches()[type(head).forward_single][0] is None:
        raise DistillError(
            f"MARRelationLoss needs a cls tower (cls_convs); the {role}'s {type(head).__name__} has none"
        )
    for layer in head.cls_convs:
        x = layer(x)
    return x


@MODELS.register_module()
class MARRelationLoss(DistillLoss):
    """MAR's relation term on the classification head (one level):

        F_S = student cls tower(S) (with grad),  F_T = teacher cls tower(T) (no grad)
        R_x = cosine similarities of the pixel vectors of pool(F_x), N x P x P
        L = loss_weight * mean_{n,i,j} (R_S - R_T)^2

    pool: average pooling to at most ``max_pixels`` positions (``pool_to_max_pixels``).
    MAR's code is not public; ours: the layer is the cls tower output (after ``cls_convs``, before
    the final cls conv), relations are cosines, and large maps are pooled. P x P relations need no
    align, so the towers may differ in width.
    """

    needs = frozenset({'student_head', 'teacher_head'})

    def __init__(
        self,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        loss_weight: float = 1.0,
        max_pixels: int = 256,
    ):
        super().__init__()
        if max_pixels < 1:
            raise ValueError(f'max_pixels must be >= 1, got {max_pixels}')
        self.loss_weight, self.max_pixels = loss_weight, max_pixels

    def relation_error(self, feat_S: Tensor, feat_T: Tensor) -> Tensor:
        r_s = pixel_relation(pool_to_max_pixels(feat_S, self.max_pixels))
        r_t = pixel_relation(pool_to_max_pixels(feat_T.detach(), self.max_pixels))
        return self.loss_weight * ((r_s - r_t) ** 2).mean()

    def forward(self, preds_S: Tensor, preds_T: Tensor, *, student_head, teacher_head) -> Tensor:
        with torch.no_grad():
            feat_T = cls_tower(teacher_head, preds_T.detach(), 'teacher')
        return self.relation_error(cls_tower(student_head, preds_S, 'student'), feat_T)
