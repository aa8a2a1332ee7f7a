"""Progressive Class-level Distillation (PCD) on dense per-location class logits."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from mmdet.registry import MODELS
from torch import Tensor

from dfmsd.core.errors import DistillError

from .common import DistillLoss
from .dense_heads import checked_head, head_class_logits, split_anchors


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
    minus the teacher's entropy); softmax: T^2 KL(softmax(t/T) || softmax(s/T)).

    Not mmdet's KnowledgeDistillationKLDivLoss: that one averages the KL over the classes (a
    factor 1/C) and has no sigmoid form."""
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
