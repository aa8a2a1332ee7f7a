"""Head-level distillation on small real mmdet heads: dense class logits (losses/dense_heads.py),
PCD (pcd.py), CrossKD with RetinaHead and GFLHead teachers (crosskd.py) and MAR's relation term
(mar.py). References are computed here from the heads' own forward / get_targets and formulas
written out by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import InstanceData

import dfmsd.models  # noqa: F401  (registers the losses)
from dfmsd.core.errors import DistillError
from dfmsd.models.losses import CrossKDLoss, MARRelationLoss, PCDLoss
from dfmsd.models.losses.crosskd import crosskd_targets, kd_quality_focal_loss
from dfmsd.models.losses.dense_heads import dense_head, head_class_logits
from dfmsd.models.losses.mar import pool_to_max_pixels
from dfmsd.models.losses.pcd import pcd_num_active_groups, valid_locations

pytestmark = pytest.mark.fast
init_default_scope('mmdet')

STRIDES = [8, 16, 32, 64, 128]
DISTILLED = STRIDES[:4]  # 128 px inputs: P3-P6 have at least 2x2 cells
GN = dict(type='GN', num_groups=16, requires_grad=True)
FOCAL = dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0)
RETINA_TRAIN = dict(
    assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0, ignore_iof_thr=-1),
    sampler=dict(type='PseudoSampler'),
    allowed_border=-1,
    pos_weight=-1,
    debug=False,
)
HEADS = {  # as configs/small/*.py, at 16 channels
    'retina': dict(
        type='RetinaHead',
        stacked_convs=2,
        feat_channels=16,
        anchor_generator=dict(
            type='AnchorGenerator', octave_base_scale=2, scales_per_octave=3, ratios=[0.5, 1.0, 2.0], strides=STRIDES
        ),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=FOCAL,
        loss_bbox=dict(type='L1Loss', loss_weight=1.0),
        train_cfg=RETINA_TRAIN,
    ),
    'gfl': dict(
        type='GFLHead',
        stacked_convs=2,
        feat_channels=16,
        norm_cfg=GN,
        reg_max=16,
        anchor_generator=dict(
            type='AnchorGenerator', ratios=[1.0], octave_base_scale=4, scales_per_octave=1, strides=STRIDES
        ),
        loss_cls=dict(type='QualityFocalLoss', use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_dfl=dict(type='DistributionFocalLoss', loss_weight=0.25),
        loss_bbox=dict(type='GIoULoss', loss_weight=2.0),
        train_cfg=dict(assigner=dict(type='ATSSAssigner', topk=9), allowed_border=-1, pos_weight=-1, debug=False),
    ),
    'atss': dict(
        type='ATSSHead',
        stacked_convs=2,
        feat_channels=16,
        norm_cfg=GN,
        anchor_generator=dict(
            type='AnchorGenerator', ratios=[1.0], octave_base_scale=8, scales_per_octave=1, strides=STRIDES
        ),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
        loss_cls=FOCAL,
    ),
    'fcos': dict(type='FCOSHead', stacked_convs=2, feat_channels=16, norm_cfg=GN, strides=STRIDES, loss_cls=FOCAL),
}


def build_head(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return MODELS.build({'num_classes': 5, 'in_channels': 16, **HEADS[kind], **overrides})


def frozen(head):
    head.eval()
    head.requires_grad_(False)
    return head


def feats(seed: int, channels: int = 16, n: int = 2, strides=DISTILLED, scale: float = 1.0, dtype=torch.float32):
    g = torch.Generator()
    g.manual_seed(seed)
    return [scale * torch.randn(n, channels, 128 // s, 128 // s, generator=g, dtype=dtype) for s in strides]


def sample(boxes, labels, img_shape=(128, 128)) -> DetDataSample:
    s = DetDataSample(metainfo=dict(img_shape=img_shape, pad_shape=(128, 128), batch_input_shape=(128, 128)))
    s.gt_instances = InstanceData(bboxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor(labels))
    return s


SAMPLES = [
    sample([[10.0, 20.0, 50.0, 60.0], [60.0, 60.0, 120.0, 100.0]], [1, 3]),
    sample([[30.0, 5.0, 70.0, 90.0]], [0], img_shape=(120, 100)),
]


def align_ref(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """CrossKD's align_scale, channel by channel: (s - mean) / (std + 1e-6) * std_t + mean_t."""
    out = torch.empty_like(s)
    for c in range(s.shape[1]):
        a, b = s[:, c], t[:, c]
        out[:, c] = (a - a.mean()) / (a.std() + 1e-6) * b.std() + b.mean()
    return out


def giou_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise GIoU of xyxy boxes, from areas by hand."""
    area = lambda x: (x[:, 2] - x[:, 0]).clamp(min=0) * (x[:, 3] - x[:, 1]).clamp(min=0)  # noqa: E731
    inter = ((torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)).prod(dim=1)
    union = area(a) + area(b) - inter
    enclose = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).prod(dim=1)
    return inter / union.clamp(min=1e-6) - (enclose - union) / enclose.clamp(min=1e-6)


def kdqfl_ref(r: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum w_i [-(p log sigma(r) + (1-p) log(1 - sigma(r)))] |sigma(r) - p|, p = sigma(t)."""
    p = torch.sigmoid(t)
    bce = -(p * F.logsigmoid(r) + (1 - p) * F.logsigmoid(-r))
    return (w[:, None] * bce * (torch.sigmoid(r) - p).abs()).sum()


def rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """N x (A*width) x H x W -> rows (n, h, w, a) x width, as mmdet flattens its outputs."""
    return x.permute(0, 2, 3, 1).reshape(-1, width)


# ----------------------------------------------------------------- dense class logits
@pytest.mark.parametrize('kind', ['retina', 'gfl', 'atss', 'fcos'])
def test_dense_class_logits_match_the_heads_own_forward(kind):
    head = frozen(build_head(kind))
    with torch.no_grad():
        for m in head.modules():  # non-trivial logits
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.normal_()
        x = feats(1)
        cls_scores = head(x)[0]
        ours = [head_class_logits(head, level) for level in x]
        raw = [head_class_logits(head, level, reduce_anchors=False) for level in x]
    c = 5
    for got, got_raw, ref in zip(ours, raw, cls_scores):
        n, ac, h, w = ref.shape
        per_anchor = ref.permute(0, 2, 3, 1).reshape(n, h, w, ac // c, c)  # mmdet: channel a*C + c
        assert torch.allclose(got, per_anchor.amax(dim=3).permute(0, 3, 1, 2), atol=1e-6)
        assert torch.allclose(got_raw, per_anchor.permute(0, 3, 4, 1, 2), atol=1e-6)
    if kind == 'retina':  # nine anchors: the max reduces something
        assert raw[0].shape[1] == 9 and not torch.allclose(raw[0][:, 0], ours[0])


def test_two_stage_detectors_and_heads_with_their_own_forward_are_refused():
    cfg = Config.fromfile('configs/small/faster_rcnn.py')
    model = MODELS.build(cfg.model)
    with pytest.raises(DistillError, match='FasterRCNN'):
        dense_head(model, 'teacher')
    rpn = MODELS.build(
        dict(
            type='RPNHead',
            in_channels=16,
            feat_channels=16,
            anchor_generator=dict(type='AnchorGenerator', scales=[4], ratios=[1.0], strides=STRIDES),
        )
    )
    s, tt = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    student = build_head('retina')
    out = (torch.zeros(1, 45, 4, 4), torch.zeros(1, 36, 4, 4))
    for loss, kw in ((PCDLoss(), dict(student_head_out=out, stride=8)), (MARRelationLoss(), {})):
        with pytest.raises(DistillError, match='RPNHead'):
            loss(s, tt, student_head=student, teacher_head=rpn, **kw)
        with pytest.raises(DistillError, match='two-stage'):
            loss(s, tt, student_head=student, teacher_head=None, **kw)


# ----------------------------------------------------------------- PCD
def test_pcd_schedule_rises_then_falls():
    # G=3 groups, S=5 stages: k = 1, 2, 3, 2, 1 over equal fifths of training
    assert [pcd_num_active_groups(p, 3, 5) for p in (0.0, 0.19, 0.2, 0.5, 0.7, 0.8, 1.0)] == [1, 1, 2, 3, 2, 1, 1]
    # G=2, S=4: stages 0..3 -> triangle 0, 2/3, 2/3, 0 -> k = 1, 2, 2, 1
    assert [pcd_num_active_groups(p, 2, 4) for p in (0.0, 0.3, 0.6, 0.9)] == [1, 2, 2, 1]
    assert pcd_num_active_groups(None, 3, 5) == 3 and pcd_num_active_groups(0.1, 3, 1) == 3
    with pytest.raises(ValueError):
        pcd_num_active_groups(1.5, 3, 5)


def test_valid_locations_leave_out_padding():
    # stride 8: a 9 x 17 image covers rows 0-1 and columns 0-2 of a 3 x 4 map
    valid = valid_locations(2, (3, 4), img_shapes=[(9, 17), (24, 32)], stride=8)
    assert valid[0].tolist() == [[True, True, True, False]] * 2 + [[False] * 4]
    assert valid[1].all() and valid_locations(1, (2, 2)).all()  # no shapes: every cell counts


def test_pcd_active_classes_ranked_by_mean_logit_difference():
    # |t - s| = [.1, .6, .3, .5, .2, .4] -> ranking 1, 3, 5, 2, 4, 0 -> groups {1,3}, {5,2}, {4,0}
    s, tt = torch.zeros(1, 6), torch.tensor([[0.1, -0.6, 0.3, 0.5, -0.2, 0.4]])
    loss = PCDLoss(num_groups=3, num_stages=5)
    got = {p: loss.active_classes(s, tt, p).tolist() for p in (0.0, 0.25, 0.5, 0.7, 1.0)}
    assert got == {0.0: [1, 3], 0.25: [1, 2, 3, 5], 0.5: [0, 1, 2, 3, 4, 5], 0.7: [1, 2, 3, 5], 1.0: [1, 3]}
    # the mean over the batch's locations decides: a second row reorders the ranking
    assert loss.active_classes(
        torch.zeros(2, 6), torch.cat([tt, torch.tensor([[2.0, 0, 0, 0, 0, 0]])]), 0.0
    ).tolist() == [0, 1]


def binary_kl(t_logit: float, s_logit: float, temp: float) -> float:
    pt, ps = 1 / (1 + math.exp(-t_logit / temp)), 1 / (1 + math.exp(-s_logit / temp))
    return temp**2 * (pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps)))


def softmax_kl(t_logits, s_logits, temp: float) -> float:
    pt = [math.exp(v / temp) for v in t_logits]
    ps = [math.exp(v / temp) for v in s_logits]
    pt, ps = [v / sum(pt) for v in pt], [v / sum(ps) for v in ps]
    return temp**2 * sum(a * math.log(a / b) for a, b in zip(pt, ps))


def test_pcd_value_by_hand_sigmoid_padding_excluded():
    temp = 2.0
    # N=1, C=4, H=1, W=2; stride 8, image 8 px wide: column 1 is padding
    s = torch.tensor([[[[0.0, 9.0]], [[1.0, 9.0]], [[-1.0, 9.0]], [[2.0, 9.0]]]])
    tt = torch.tensor([[[[3.0, -9.0]], [[1.5, -9.0]], [[1.0, -9.0]], [[2.2, -9.0]]]])
    # valid |t - s| = [3, .5, 2, .2] -> ranking 0, 2, 1, 3 -> groups {0, 2}, {1, 3}
    loss = PCDLoss(loss_weight=0.5, temperature=temp, num_groups=2, num_stages=3)
    kw = dict(sigmoid=True, img_shapes=[(8, 8)], stride=8)
    assert loss.logit_loss(s, tt, progress=0.0, **kw).item() == pytest.approx(
        0.5 * (binary_kl(3.0, 0.0, temp) + binary_kl(1.0, -1.0, temp)), rel=1e-5
    )
    every = 0.5 * sum(binary_kl(a, b, temp) for a, b in [(3.0, 0.0), (1.5, 1.0), (1.0, -1.0), (2.2, 2.0)])
    assert loss.logit_loss(s, tt, progress=0.5, **kw).item() == pytest.approx(every, rel=1e-5)
    # without the padding mask column 1 (a huge disagreement) would count
    assert loss.logit_loss(s, tt, sigmoid=True, progress=0.5).item() > 10 * every
    s_grad = s.clone().requires_grad_(True)  # gradients reach the active classes only
    loss.logit_loss(s_grad, tt, progress=1.0, **kw).backward()
    assert s_grad.grad[0, [0, 2], 0, 0].abs().min() > 0
    assert s_grad.grad[0, [1, 3]].abs().sum() == 0 and s_grad.grad[..., 1].abs().sum() == 0


def test_pcd_value_by_hand_softmax():
    temp = 1.5
    s = torch.tensor([[[[0.2, -1.0]], [[1.0, 0.5]]]])  # N=1, C=2, H=1, W=2
    tt = torch.tensor([[[[2.0, 0.0]], [[-1.0, 0.3]]]])
    loss = PCDLoss(temperature=temp, num_groups=2, num_stages=3)
    expected = (softmax_kl([2.0, -1.0], [0.2, 1.0], temp) + softmax_kl([0.0, 0.3], [-1.0, 0.5], temp)) / 2
    assert loss.logit_loss(s, tt, sigmoid=False, progress=0.5).item() == pytest.approx(expected, rel=1e-5)
    # one class active: a softmax over one class has nothing to distil
    assert loss.logit_loss(s, tt, sigmoid=False, progress=0.0).item() == pytest.approx(0.0, abs=1e-7)


def test_pcd_forward_uses_the_students_output_and_the_teachers_head():
    teacher = frozen(build_head('retina', seed=1))  # 9 anchors
    student = build_head('gfl', seed=2)  # 1 anchor: compared after the max over anchors
    s, tt = feats(3, strides=[16])[0], feats(4, strides=[16])[0]
    out = student.forward_single(s, student.scales[1])
    with torch.no_grad():
        ref_t = teacher.forward_single(tt)[0]  # N x (9*5) x 8 x 8
    n, _, h, w = ref_t.shape
    t_logits = ref_t.permute(0, 2, 3, 1).reshape(n, h, w, 9, 5).amax(dim=3).permute(0, 3, 1, 2)
    loss = PCDLoss(temperature=2.0)
    kw = dict(progress=0.3, img_shapes=[(128, 100), (90, 128)], stride=16)
    got = loss(s, tt, student_head_out=out, student_head=student, teacher_head=teacher, **kw)
    assert got.item() == pytest.approx(loss.logit_loss(out[0], t_logits, True, **kw).item(), rel=1e-6)
    assert got.item() > 0
    got.backward()
    assert student.gfl_cls.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    same = PCDLoss()(
        tt, tt, student_head_out=teacher.forward_single(tt), student_head=teacher, teacher_head=teacher, progress=0.5
    )
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_pcd_refuses_heads_of_other_classes():
    teacher = frozen(build_head('retina'))
    s, tt = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    for student in (
        build_head('retina', num_classes=4),
        build_head('retina', loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False)),
    ):
        with pytest.raises(DistillError, match='RetinaHead'):
            PCDLoss()(s, tt, student_head_out=student.forward_single(s), student_head=student, teacher_head=teacher)


# ----------------------------------------------------------------- CrossKD
def amplified(head, k: float = 1e4):
    """The same function, with held (pre-activation) features k times larger, so that the 1e-6 of
    align_scale is negligible: the last tower op before ReLU scaled by k, the final convs by 1/k."""
    with torch.no_grad():
        for convs in (head.cls_convs, head.reg_convs):
            last = convs[-1]
            op = last.norm if last.with_norm else last.conv
            op.weight.mul_(k)
            op.bias.mul_(k)
        for name in ('retina_cls', 'retina_reg', 'gfl_cls', 'gfl_reg'):
            if hasattr(head, name):
                getattr(head, name).weight.div_(k)
    return head


@pytest.mark.parametrize('kind', ['retina', 'gfl'])
def test_crosskd_is_zero_for_a_copy_of_the_teacher_and_positive_otherwise(kind):
    teacher = frozen(amplified(build_head(kind, seed=1).double()))
    tt = feats(2, dtype=torch.float64)
    loss = CrossKDLoss([16] * 4, [16] * 4).double()
    same = loss(tt, tt, student_head=copy.deepcopy(teacher), teacher_head=teacher, samples=SAMPLES, strides=DISTILLED)
    assert set(same) == ({'cls', 'reg'} if kind == 'retina' else {'cls', 'reg', 'bbox'})
    assert all(abs(v.item()) <= 1e-6 for v in same.values()), same
    other = loss(
        feats(3, dtype=torch.float64),
        tt,
        student_head=build_head(kind, seed=5).double(),
        teacher_head=teacher,
        samples=SAMPLES,
        strides=DISTILLED,
    )
    assert all(v.item() > 1e-3 for v in other.values()), other


@pytest.mark.parametrize('kind', ['retina', 'gfl'])
def test_crosskd_reused_idx_zero_is_the_teachers_forward_on_the_aligned_feature(kind):
    teacher, student = frozen(build_head(kind, seed=1)), build_head(kind, seed=2)
    loss = CrossKDLoss([16] * 4, [16] * 4, reused_idx=0)
    s, tt = feats(3)[1], feats(4)[1]  # stride 16: the teacher's level 1
    r_cls, r_reg, t_cls, t_reg = loss.cross_level(s, tt, student, teacher, 0, 1)
    args = (teacher.scales[1],) if kind == 'gfl' else ()
    ref_r = teacher.forward_single(align_ref(s, tt), *args)
    ref_t = teacher.forward_single(tt, *args)
    for got, ref in zip((r_cls, r_reg, t_cls, t_reg), (*ref_r, *ref_t)):
        assert torch.allclose(got, ref, atol=1e-5)


def official_reused(student, teacher, s, t, idx):
    """jbwang1997/CrossKD crosskd_retinanet.py (forward_crosskd_single, reuse_teacher_head, align_scale),
    transcribed line by line for one level."""

    def forward_crosskd_single(x, module):
        cls_feat, reg_feat = x, x
        cls_feat_hold, reg_feat_hold = x, x
        for i, cls_conv in enumerate(module.cls_convs):
            cls_feat = cls_conv(cls_feat, activate=False)
            if i + 1 == idx:
                cls_feat_hold = cls_feat
            cls_feat = cls_conv.activate(cls_feat)
        for i, reg_conv in enumerate(module.reg_convs):
            reg_feat = reg_conv(reg_feat, activate=False)
            if i + 1 == idx:
                reg_feat_hold = reg_feat
            reg_feat = reg_conv.activate(reg_feat)
        return module.retina_cls(cls_feat), module.retina_reg(reg_feat), cls_feat_hold, reg_feat_hold

    def align_scale(stu_feat, tea_feat):
        N, C, H, W = stu_feat.size()
        stu_feat = stu_feat.permute(1, 0, 2, 3).reshape(C, -1)
        stu_mean = stu_feat.mean(dim=-1, keepdim=True)
        stu_std = stu_feat.std(dim=-1, keepdim=True)
        stu_feat = (stu_feat - stu_mean) / (stu_std + 1e-6)
        tea_feat = tea_feat.permute(1, 0, 2, 3).reshape(C, -1)
        tea_mean = tea_feat.mean(dim=-1, keepdim=True)
        tea_std = tea_feat.std(dim=-1, keepdim=True)
        stu_feat = stu_feat * tea_std + tea_mean
        return stu_feat.reshape(C, N, H, W).permute(1, 0, 2, 3)

    tea_cls, tea_reg, tea_cls_hold, tea_reg_hold = forward_crosskd_single(t, teacher)
    _, _, stu_cls_hold, stu_reg_hold = forward_crosskd_single(s, student)
    reused_cls_feat = align_scale(stu_cls_hold, tea_cls_hold)
    reused_reg_feat = align_scale(stu_reg_hold, tea_reg_hold)
    if idx != 0:
        reused_cls_feat = F.relu(reused_cls_feat)
        reused_reg_feat = F.relu(reused_reg_feat)
    for i in range(idx, teacher.stacked_convs):
        reused_cls_feat = teacher.cls_convs[i](reused_cls_feat)
        reused_reg_feat = teacher.reg_convs[i](reused_reg_feat)
    return teacher.retina_cls(reused_cls_feat), teacher.retina_reg(reused_reg_feat), tea_cls, tea_reg


@pytest.mark.parametrize('idx', [0, 1, 2])
def test_crosskd_reused_path_is_the_official_codes(idx):
    # (mmcv's ConvModule activation is an in-place ReLU: the official "hold" ends up activated)
    teacher, student = frozen(build_head('retina', seed=1)), build_head('retina', seed=2)
    s, tt = feats(3)[0], feats(4)[0]
    ours = CrossKDLoss([16] * 4, [16] * 4, reused_idx=idx).cross_level(s, tt, student, teacher, idx, 0)
    for got, ref in zip(ours, official_reused(student, teacher, s, tt, idx)):
        assert torch.allclose(got, ref, atol=1e-5)
    if idx:  # the pre-activation reading gives other outputs
        pre = CrossKDLoss([16] * 4, [16] * 4, reused_idx=idx, hold_activated=False).cross_level(
            s, tt, student, teacher, idx, 0
        )
        assert not torch.allclose(pre[0], ours[0], atol=1e-3)


def test_crosskd_retina_value_against_an_independent_reference():
    teacher, student = frozen(build_head('retina', seed=1)), build_head('retina', seed=2)
    S, T = feats(5), feats(6)
    got = CrossKDLoss([16] * 4, [16] * 4, reused_idx=0, loss_weight=0.5, loss_reg_weight=2.0)(
        S, T, student_head=student, teacher_head=teacher, samples=SAMPLES, strides=DISTILLED
    )
    # the head's own anchors and targets over all five levels (P7 holds no positive for these boxes)
    sizes = [x.shape[-2:] for x in T] + [(1, 1)]
    metas = [s.metainfo for s in SAMPLES]
    anchors, flags = teacher.get_anchors(sizes, metas, device='cpu')
    _, label_weights, _, _, avg = teacher.get_targets(anchors, flags, [s.gt_instances for s in SAMPLES], metas)
    cls = reg = 0.0
    for lvl, (s, tt) in enumerate(zip(S, T)):
        r_cls, r_reg = teacher.forward_single(align_ref(s, tt))
        t_cls, t_reg = teacher.forward_single(tt)
        lw = label_weights[lvl].reshape(-1)
        cls = cls + kdqfl_ref(rows(r_cls, 5), rows(t_cls, 5), lw)
        w = torch.sigmoid(rows(t_cls, 5).max(dim=1).values) * (lw > 0)
        a = torch.cat([anchors[i][lvl] for i in range(2)])  # images in turn, as the rows
        boxes_r, boxes_t = (teacher.bbox_coder.decode(a, rows(x, 4)) for x in (r_reg, t_reg))
        reg = reg + (w * (1 - giou_ref(boxes_r, boxes_t))).sum()
    assert got['cls'].item() == pytest.approx(0.5 * cls.item() / avg, rel=1e-4)
    assert got['reg'].item() == pytest.approx(0.5 * 2.0 * reg.item() / avg, rel=1e-4)


@pytest.mark.parametrize('activated', [True, False])
def test_crosskd_gfl_value_against_an_independent_reference(activated):
    teacher, student = frozen(build_head('gfl', seed=1)), build_head('gfl', seed=2)
    S, T = feats(5), feats(6)
    got = CrossKDLoss([16] * 4, [16] * 4, hold_activated=activated)(
        S, T, student_head=student, teacher_head=teacher, samples=SAMPLES, strides=DISTILLED
    )
    act = F.relu if activated else (lambda x: x)
    assert all(torch.isfinite(v) and v.item() > 0 for v in got.values())
    # targets: the head's get_targets on the four distilled levels' anchors
    gen = teacher.prior_generator
    level_anchors = [gen.single_level_grid_priors(tuple(x.shape[-2:]), i, device='cpu') for i, x in enumerate(T)]
    metas = [s.metainfo for s in SAMPLES]
    flags = [[torch.ones(len(a), dtype=torch.bool) for a in level_anchors] for _ in metas]
    anchors, _, label_weights, _, _, avg = teacher.get_targets(
        [list(level_anchors) for _ in metas], flags, [s.gt_instances for s in SAMPLES], metas
    )
    cls = kl = giou = weights = 0.0
    bins = torch.arange(17, dtype=torch.float32)
    for lvl, (s, tt) in enumerate(zip(S, T)):
        scale = teacher.scales[lvl]
        # held: tower conv 2 (default reused_idx) = conv -> GN, then (if activated) its ReLU
        held = [act(c[1].norm(c[1].conv(c[0](s)))) for c in (student.cls_convs, student.reg_convs)]
        t_held = [act(c[1].norm(c[1].conv(c[0](tt)))) for c in (teacher.cls_convs, teacher.reg_convs)]
        r_cls = teacher.gfl_cls(F.relu(align_ref(held[0], t_held[0])))
        r_reg = scale(teacher.gfl_reg(F.relu(align_ref(held[1], t_held[1]))))
        t_cls, t_reg = teacher.forward_single(tt, scale)
        lw = label_weights[lvl].reshape(-1)
        cls = cls + kdqfl_ref(rows(r_cls, 5), rows(t_cls, 5), lw)
        w = torch.sigmoid(rows(t_cls, 5).max(dim=1).values) * (lw > 0)
        p_t, p_r = F.softmax(rows(t_reg, 17), dim=1), F.softmax(rows(r_reg, 17), dim=1)
        kl = kl + (w.repeat_interleave(4) * (p_t * (p_t.log() - p_r.log())).sum(dim=1)).sum() / 4
        a = anchors[lvl].reshape(-1, 4)
        centre = torch.stack([(a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2], dim=1) / STRIDES[lvl]
        boxes = []
        for p in (p_r, p_t):
            d = (p @ bins).reshape(-1, 4)  # distances left, top, right, bottom in stride units
            boxes.append(torch.cat([centre - d[:, :2], centre + d[:, 2:]], dim=1))
        giou = giou + (w * (1 - giou_ref(*boxes))).sum()
        weights = weights + w.sum()
    assert got['cls'].item() == pytest.approx(cls.item() / avg, rel=1e-4)
    assert got['reg'].item() == pytest.approx(3.0 * kl.item() / weights.item(), rel=1e-4)
    assert got['bbox'].item() == pytest.approx(2.0 * giou.item() / weights.item(), rel=1e-4)


def test_crosskd_term_formulas_by_hand():
    # BCE(0; sigma(t)) = log 2 for any target; |sigma(0) - sigma(t)| with t = log 3: |.5 - .75| = .25
    r, tt = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    # class 0: log 2 * .25; class 1: log 2 * 0; weight 2, averaged over avg_factor 4
    got = kd_quality_focal_loss(r, tt, torch.tensor([[2.0]]), avg_factor=4.0, beta=1.0)
    assert got.item() == pytest.approx(2 * math.log(2) * 0.25 / 4)


def test_crosskd_gradients_reach_student_and_align_not_the_teacher():
    teacher = frozen(build_head('gfl', seed=1))
    student = build_head('retina', seed=2, feat_channels=8)  # heterogeneous head and width
    before = copy.deepcopy(teacher.state_dict())
    loss = CrossKDLoss([16] * 4, [16] * 4, student_feat_channels=8)  # held features: 8 -> 16 channels
    S = [x.requires_grad_(True) for x in feats(7)]
    out = loss(S, feats(8), student_head=student, teacher_head=teacher, samples=SAMPLES, strides=DISTILLED)
    sum(out.values()).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in S)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    assert student.cls_convs[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    with pytest.raises(DistillError, match='student_feat_channels'):
        CrossKDLoss([16] * 4, [16] * 4)(
            S, feats(8), student_head=student, teacher_head=teacher, samples=SAMPLES, strides=DISTILLED
        )


def ious(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (torch.min(a[:, None, 2:], b[None, :, 2:]) - torch.max(a[:, None, :2], b[None, :, :2])).clamp(min=0)
    inter = inter.prod(dim=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def test_crosskd_targets_ignore_band_and_the_heads_own_assignment():
    head = frozen(build_head('retina'))
    sizes = [(16, 16), (8, 8), (4, 4), (2, 2)]
    anchors, label_weights, avg = crosskd_targets(head, sizes, [0, 1, 2, 3], SAMPLES)
    # the head's own get_targets over all five levels gives the same weights on P3-P6
    metas = [s.metainfo for s in SAMPLES]
    all_anchors, flags = head.get_anchors(sizes + [(1, 1)], metas, device='cpu')
    _, direct, _, _, direct_avg = head.get_targets(all_anchors, flags, [s.gt_instances for s in SAMPLES], metas)
    for lvl in range(4):
        assert torch.equal(label_weights[lvl], direct[lvl])
    assert avg == direct_avg
    # by hand, image 0: max IoU in [.4, .5) -> ignored (weight 0) unless it is a gt's best anchor
    a = torch.cat([x[0] for x in anchors])
    overlaps = ious(a, SAMPLES[0].gt_instances.bboxes)  # anchors x gts
    best = overlaps.max(dim=1).values
    gt_best = (overlaps == overlaps.max(dim=0).values[None]).any(dim=1)
    lw = torch.cat([x[0] for x in label_weights])
    band = (best >= 0.4) & (best < 0.5) & ~gt_best
    assert band.sum() > 5 and (lw[band] == 0).all()
    assert (lw[~band] == 1).all()
    positives = [
        ((ious(torch.cat([x[i] for x in anchors]), s.gt_instances.bboxes) >= 0.5).any(dim=1)).sum()
        for i, s in enumerate(SAMPLES)
    ]
    assert avg >= sum(max(int(p), 1) for p in positives)


def test_crosskd_refuses_unsupported_set_ups():
    s, tt = feats(1), feats(2)
    retina = frozen(build_head('retina'))
    for teacher, match in ((frozen(build_head('atss')), 'ATSSHead'), (None, 'two-stage')):
        with pytest.raises(DistillError, match=match):
            CrossKDLoss([16] * 4, [16] * 4)(
                s, tt, student_head=build_head('retina'), teacher_head=teacher, samples=SAMPLES, strides=DISTILLED
            )
    with pytest.raises(DistillError, match='reused_idx 3.*RetinaHead has 2'):
        CrossKDLoss([16] * 4, [16] * 4, reused_idx=3)(
            s, tt, student_head=build_head('retina'), teacher_head=retina, samples=SAMPLES, strides=DISTILLED
        )
    short = build_head('retina', stacked_convs=1)
    with pytest.raises(DistillError, match='student RetinaHead'):
        CrossKDLoss([16] * 4, [16] * 4)(
            s, tt, student_head=short, teacher_head=retina, samples=SAMPLES, strides=DISTILLED
        )
    assert CrossKDLoss.per_level is False
    built = MODELS.build(dict(type='CrossKDLoss', student_channels=[16] * 4, teacher_channels=[32] * 4))
    assert isinstance(built.align_cls, torch.nn.Conv2d) and built.align_cls.in_channels == 16


# ----------------------------------------------------------------- MAR relation
def cls_tower_output(head, x):
    """The cls tower output, caught from the head's own forward."""
    caught = []
    handle = head.cls_convs[-1].register_forward_hook(lambda m, i, o: caught.append(o))
    head.forward_single(x)
    handle.remove()
    return caught[0]


def cosine_ref(x: torch.Tensor) -> torch.Tensor:
    v = x.flatten(2)  # N x C x P
    dots = torch.einsum('ncp,ncq->npq', v, v)
    norms = v.norm(dim=1).clamp(min=1e-12)
    return dots / (norms[:, :, None] * norms[:, None, :])


def test_mar_relation_zero_for_identical_towers_and_a_direct_cosine_reference():
    teacher = frozen(build_head('retina', seed=1))
    x = feats(1, strides=[16])[0]
    loss = MARRelationLoss(16, 16, loss_weight=2.0)
    assert loss(x, x, student_head=copy.deepcopy(teacher), teacher_head=teacher).item() == pytest.approx(0.0, abs=1e-7)
    student = build_head('retina', seed=2, feat_channels=8)  # narrower tower: P x P needs no align
    s = feats(2, strides=[16])[0].requires_grad_(True)
    got = loss(s, x, student_head=student, teacher_head=teacher)  # 8x8 = 64 <= 256: no pooling
    with torch.no_grad():
        expected = (
            2.0 * ((cosine_ref(cls_tower_output(student, s)) - cosine_ref(cls_tower_output(teacher, x))) ** 2).mean()
        )
    assert got.item() == pytest.approx(expected.item(), rel=1e-5) and got.item() > 0
    got.backward()
    assert s.grad.abs().sum() > 0 and student.cls_convs[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_mar_relation_pools_above_max_pixels():
    # 1 x 5 map, at most 3 positions: k = 2 -> windows [0,1], [2,3], [4] (the last one alone)
    x = torch.tensor([[[[1.0, 3.0, 5.0, 7.0, 9.0]]]])
    assert pool_to_max_pixels(x, 3).flatten().tolist() == [2.0, 6.0, 9.0]
    assert torch.equal(pool_to_max_pixels(x, 5), x)
    # 4 x 4 at most 4 positions: 2 x 2 average pooling first
    head = frozen(build_head('retina', seed=1))
    s, tt = feats(1, strides=[32])[0], feats(2, strides=[32])[0]
    got = MARRelationLoss(max_pixels=4)(s, tt, student_head=head, teacher_head=head)
    with torch.no_grad():
        ps, pt = (F.avg_pool2d(cls_tower_output(head, x), 2) for x in (s, tt))
    assert got.item() == pytest.approx(((cosine_ref(ps) - cosine_ref(pt)) ** 2).mean().item(), rel=1e-5)
    assert got.item() != pytest.approx(MARRelationLoss()(s, tt, student_head=head, teacher_head=head).item(), rel=1e-3)
