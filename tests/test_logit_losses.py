"""Head-level distillation: dense class-logit maps, PCD, CrossKD (cls branch), and their
path through StageDistiller. Tiny models and tensors (the machine is shared)."""
from __future__ import annotations

import math
import uuid

import pytest
import torch
import torch.nn as nn
from mmdet.registry import MODELS
from mmengine.logging import MessageHub
from mmengine.registry import init_default_scope

import dfmsd.models  # noqa: F401
from dfmsd.checkpoint import export_plain_checkpoint
from dfmsd.configs import build_model_config
from dfmsd.models.distiller import DistillError, training_progress
from dfmsd.models.losses import (CrossKDLoss, PCDLoss, dense_class_logits,
                                 pcd_num_active_groups, valid_locations)

init_default_scope('mmdet')
SMALL = dict(depth=18, width=8, fpn_channels=16)
STRIDES = [8, 16, 32, 64, 128]


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def binary_kl(t_logit: float, s_logit: float, temp: float) -> float:
    """T^2 * KL(Bern(sigma(t/T)) || Bern(sigma(s/T))), written out by hand."""
    pt, ps = 1 / (1 + math.exp(-t_logit / temp)), 1 / (1 + math.exp(-s_logit / temp))
    return temp ** 2 * (pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps)))


def softmax_kl(t_logits, s_logits, temp: float) -> float:
    pt = [math.exp(v / temp) for v in t_logits]
    ps = [math.exp(v / temp) for v in s_logits]
    pt, ps = [v / sum(pt) for v in pt], [v / sum(ps) for v in ps]
    return temp ** 2 * sum(a * math.log(a / b) for a, b in zip(pt, ps))


def small_detector(tiny_dataset, detector: str, seed: int = 0):
    cfg = build_model_config({'config': f'configs/small/{detector}.py', **SMALL},
                             data_root=tiny_dataset, image_size=64)
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return cfg, model


# ----------------------------------------------------------------- dense class logits
@pytest.mark.parametrize('detector', ['retinanet', 'gfl', 'fcos'])
def test_dense_class_logits_match_the_heads_own_forward(tiny_dataset, detector):
    _, model = small_detector(tiny_dataset, detector)
    model.eval()
    head = model.bbox_head
    with torch.no_grad():  # non-trivial logits: perturb the (prior-initialised) cls biases
        for m in head.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_()
        feats = model.extract_feat(torch.randn(2, 3, 64, 64))
        cls_scores = head(feats)[0]  # the head's own forward: N x (A*C) x H x W per level
        ours = dense_class_logits(model, feats)
        raw = dense_class_logits(model, feats, reduce_anchors=False)
    c = head.cls_out_channels
    assert len(ours) == len(cls_scores) == 5
    for got, got_raw, ref in zip(ours, raw, cls_scores):
        n, ac, h, w = ref.shape
        # mmdet's own flattening (as in its loss): N, H, W, A, C
        per_anchor = ref.permute(0, 2, 3, 1).reshape(n, h, w, ac // c, c)
        assert got.shape == (n, c, h, w)
        assert torch.allclose(got, per_anchor.amax(dim=3).permute(0, 3, 1, 2), atol=1e-6)
        assert torch.allclose(got_raw, per_anchor.permute(0, 3, 4, 1, 2), atol=1e-6)
    if detector == 'retinanet':  # 9 anchors: the max really reduces something
        assert raw[0].shape[1] == 9 and not torch.allclose(raw[0][:, 0], ours[0])


def test_dense_class_logits_refuse_a_two_stage_detector(tiny_dataset):
    _, model = small_detector(tiny_dataset, 'faster_rcnn')
    with pytest.raises(DistillError, match='dense-head teacher/student.*FasterRCNN'):
        dense_class_logits(model, [torch.zeros(1, 16, 8, 8)])


def test_valid_locations_leave_out_padding():
    # stride 8: a 9 x 17 image covers rows 0-1 and columns 0-2 of a 3 x 4 map.
    valid = valid_locations(2, (3, 4), img_shapes=[(9, 17), (24, 32)], stride=8)
    assert valid[0].tolist() == [[True, True, True, False]] * 2 + [[False] * 4]
    assert valid[1].all()
    assert valid_locations(1, (2, 2)).all()  # no shapes: everything counts


# ----------------------------------------------------------------- PCD
def test_pcd_schedule_fine_to_coarse_then_back():
    # G=3 groups, S=5 stages: k = 1, 2, 3, 2, 1 over equal fifths of training.
    assert [pcd_num_active_groups(p, 3, 5) for p in (0.0, 0.19, 0.2, 0.5, 0.7, 0.8, 1.0)] == \
        [1, 1, 2, 3, 2, 1, 1]
    assert pcd_num_active_groups(None, 3, 5) == 3  # progress unknown: all classes
    assert [pcd_num_active_groups(p, 2, 4) for p in (0.0, 0.3, 0.6, 0.9)] == [1, 2, 2, 1]
    with pytest.raises(ValueError):
        pcd_num_active_groups(1.5, 3, 5)


def test_pcd_active_classes_ranked_by_logit_difference():
    # 6 classes, one location; |t - s| = [.1, .6, .3, .5, .2, .4]
    # ranking 1, 3, 5, 2, 4, 0 -> groups {1, 3}, {5, 2}, {4, 0}
    s = torch.zeros(1, 6, 1, 1)
    tt = t([.1, -.6, .3, .5, -.2, .4]).view(1, 6, 1, 1)
    loss = PCDLoss(num_groups=3, num_stages=5)
    active = {p: loss.active_classes(s, tt, p).tolist() for p in (0.0, 0.25, 0.5, 0.7, 1.0)}
    assert active == {0.0: [1, 3], 0.25: [1, 2, 3, 5], 0.5: [0, 1, 2, 3, 4, 5],
                      0.7: [1, 2, 3, 5], 1.0: [1, 3]}
    # The ranking is over the batch: a second image can reorder it.
    s2 = torch.zeros(2, 6, 1, 1)
    t2 = torch.cat([tt, t([2., 0, 0, 0, 0, 0]).view(1, 6, 1, 1)])
    assert loss.active_classes(s2, t2, 0.0).tolist() == [0, 1]


def test_pcd_value_by_hand_sigmoid_with_padding_excluded():
    temp = 2.0
    # N=1, C=4, H=1, W=2; stride 8, image 8 px wide -> column 1 is padding.
    s = t([[[[0.0, 9.0]], [[1.0, 9.0]], [[-1.0, 9.0]], [[2.0, 9.0]]]])
    tt = t([[[[3.0, -9.0]], [[1.5, -9.0]], [[1.0, -9.0]], [[2.2, -9.0]]]])
    # valid |t - s| = [3, .5, 2, .2] -> ranking 0, 2, 1, 3 -> groups {0, 2}, {1, 3}
    loss = PCDLoss(loss_weight=0.5, temperature=temp, num_groups=2, num_stages=3)
    kw = dict(img_shapes=[(8, 8)], stride=8, sigmoid=True)
    first = loss(student_logits=s, teacher_logits=tt, progress=0.0, **kw)
    expected_first = 0.5 * (binary_kl(3.0, 0.0, temp) + binary_kl(1.0, -1.0, temp))
    assert first.item() == pytest.approx(expected_first, rel=1e-5)
    middle = loss(student_logits=s, teacher_logits=tt, progress=0.5, **kw)
    expected_all = 0.5 * sum(binary_kl(a, b, temp) for a, b in
                             [(3.0, 0.0), (1.5, 1.0), (1.0, -1.0), (2.2, 2.0)])
    assert middle.item() == pytest.approx(expected_all, rel=1e-5)
    # Without the padding mask column 1 (a huge disagreement) would count.
    assert loss(student_logits=s, teacher_logits=tt, progress=0.5, sigmoid=True).item() > 10 * expected_all
    # Gradients reach only the active classes of the student.
    s_grad = s.clone().requires_grad_(True)
    loss(student_logits=s_grad, teacher_logits=tt, progress=1.0, **kw).backward()
    assert s_grad.grad[0, [0, 2], 0, 0].abs().min() > 0
    assert s_grad.grad[0, [1, 3]].abs().sum() == 0 and s_grad.grad[..., 1].abs().sum() == 0


def test_pcd_value_by_hand_softmax_two_classes():
    temp = 1.5
    s = t([[[[0.2, -1.0]], [[1.0, 0.5]]]])  # N=1, C=2, H=1, W=2, both valid
    tt = t([[[[2.0, 0.0]], [[-1.0, 0.3]]]])
    loss = PCDLoss(temperature=temp, num_groups=2, num_stages=3)
    got = loss(student_logits=s, teacher_logits=tt, progress=0.5, sigmoid=False)
    expected = (softmax_kl([2.0, -1.0], [0.2, 1.0], temp) + softmax_kl([0.0, 0.3], [-1.0, 0.5], temp)) / 2
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # One class active: a softmax over one class has nothing to distill.
    assert loss(student_logits=s, teacher_logits=tt, progress=0.0, sigmoid=False).item() == \
        pytest.approx(0.0, abs=1e-7)


def test_pcd_is_zero_when_student_equals_teacher():
    z = torch.randn(2, 5, 3, 3)
    assert PCDLoss(temperature=2.0)(student_logits=z, teacher_logits=z, progress=0.5).item() == \
        pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------- CrossKD
class OneByOneClsHead:
    """Stand-in for a teacher cls branch: a frozen 1x1 conv, one anchor."""

    def __init__(self, weight, bias):
        self.conv = nn.Conv2d(2, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(t(weight).view(2, 2, 1, 1))
            self.conv.bias.copy_(t(bias))
        self.conv.requires_grad_(False)

    def __call__(self, x):
        z = self.conv(x)
        return z.view(z.shape[0], 1, *z.shape[1:])  # N x A=1 x C x H x W


def test_crosskd_value_by_hand():
    temp = 2.0
    head = OneByOneClsHead([[1.0, 0.0], [0.5, -1.0]], [0.0, 0.2])
    s = t([[[[1.0, 0.0]], [[2.0, 1.0]]]])  # N=1, C=2 channels, H=1, W=2
    tf = t([[[[0.0, 1.0]], [[1.0, -1.0]]]])
    # cross = W s + b: loc0 [1, .5-2+.2] = [1, -1.3]; loc1 [0, 0-1+.2] = [0, -.8]
    # teacher = W T + b: loc0 [0, 0-1+.2] = [0, -.8]; loc1 [1, .5+1+.2] = [1, 1.7]
    loss = CrossKDLoss(2, 2, loss_weight=0.3, temperature=temp)
    got = loss(s, tf, teacher_head_fn=head, sigmoid=True)
    expected = 0.3 * ((binary_kl(0.0, 1.0, temp) + binary_kl(-0.8, -1.3, temp))
                      + (binary_kl(1.0, 0.0, temp) + binary_kl(1.7, -0.8, temp))) / 2
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Padding (stride 8, image 8 px wide: column 1) is left out.
    got_valid = loss(s, tf, teacher_head_fn=head, sigmoid=True, img_shapes=[(8, 8)], stride=8)
    assert got_valid.item() == pytest.approx(
        0.3 * (binary_kl(0.0, 1.0, temp) + binary_kl(-0.8, -1.3, temp)), rel=1e-5)


def test_crosskd_gradients_reach_student_not_the_teacher_head(tiny_dataset):
    _, teacher = small_detector(tiny_dataset, 'gfl', seed=1)
    teacher.eval().requires_grad_(False)
    from dfmsd.models.losses import head_class_logits
    head_fn = lambda x: head_class_logits(teacher.bbox_head, x, reduce_anchors=False)  # noqa: E731
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss = CrossKDLoss(student_channels=8, teacher_channels=16, temperature=2.0)
    s = torch.randn(2, 8, 8, 8, requires_grad=True)
    with torch.no_grad():
        tf = teacher.extract_feat(torch.randn(2, 3, 64, 64))[0]
    optim = torch.optim.SGD([s, *loss.parameters(), *teacher.parameters()], lr=1.0)
    value = loss(s, tf, teacher_head_fn=head_fn, sigmoid=True)
    value.backward()
    assert torch.isfinite(value) and value.item() > 0
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.align.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    optim.step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


# ----------------------------------------------------------------- through the distiller
def save_detector(tmp_path, tiny_dataset, detector, name, seed=0):
    cfg, model = small_detector(tiny_dataset, detector, seed)
    with torch.no_grad():  # a teacher whose class logits differ from a fresh student's
        for m in getattr(model, 'bbox_head', nn.Module()).modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_()
    cfg.dump(str(tmp_path / f'{name}.py'))
    export_plain_checkpoint(model.state_dict(), tmp_path / f'{name}.pth')
    return tmp_path / f'{name}.py', tmp_path / f'{name}.pth'


def distiller(tiny_dataset, tmp_path, teacher='gfl', **loss_kw):
    py, pth = save_detector(tmp_path, tiny_dataset, teacher, 'teacher', seed=1)
    student = build_model_config({'config': 'configs/small/retinanet.py', **SMALL},
                                 data_root=tiny_dataset, image_size=64)
    return dict(type='StageDistiller', student=student.model,
                teacher=dict(config=str(py), checkpoint=str(pth)), **loss_kw)


def a_batch(tiny_dataset, n=2):
    from mmdet.datasets import CocoDataset
    from mmengine.dataset import pseudo_collate
    cfg = build_model_config({'config': 'configs/small/retinanet.py', **SMALL},
                             data_root=tiny_dataset, image_size=64)
    ds_cfg = cfg.train_dataloader.dataset
    ds = CocoDataset(**{k: v for k, v in ds_cfg.items() if k != 'type'})
    return pseudo_collate([ds[i] for i in range(n)])


def fresh_hub(iter_=None, max_iters=None):
    hub = MessageHub.get_instance(f'test-logits-{uuid.uuid4().hex}')  # becomes the current one
    if iter_ is not None:
        hub.update_info('iter', iter_)
        hub.update_info('max_iters', max_iters)
    return hub


def test_training_progress_from_message_hub():
    fresh_hub()
    assert training_progress() is None
    fresh_hub(30, 120)
    assert training_progress() == pytest.approx(0.25)


@pytest.mark.parametrize('loss_type', ['PCDLoss', 'CrossKDLoss'])
def test_distiller_trains_a_step_with_a_logit_loss(tiny_dataset, tmp_path, loss_type):
    model = MODELS.build(distiller(tiny_dataset, tmp_path, logit_loss=dict(
        type=loss_type, loss_weight=1.0, temperature=2.0)))
    model.init_weights()
    model.train()
    teacher = model.teacher
    assert not any(n.startswith('teacher') for n, _ in model.named_parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []
    model.logit_losses[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)

    fresh_hub(3, 4)  # progress 0.75
    data = model.data_preprocessor(a_batch(tiny_dataset), True)
    losses = model(**data, mode='loss')
    keys = {f'loss_distill_logit_s{s}' for s in STRIDES}
    assert keys <= set(losses)
    assert all(torch.isfinite(losses[k]) for k in keys)
    # (On 64 px images P6/P7 are 1x1 maps, where GFL's GroupNorm with one channel per
    # group makes the teacher's cls branch constant: CrossKD is exactly 0 there.)
    assert all(losses[f'loss_distill_logit_s{s}'].item() > 0 for s in (8, 16, 32))
    assert seen[0]['progress'] == pytest.approx(0.75) and seen[0]['sigmoid'] is True
    assert set(seen[0]) >= set(model.logit_losses[0].needs)

    # The logit loss alone: where do its gradients go?
    sum(losses[k] for k in keys).backward(retain_graph=True)
    neck_grad = sum(p.grad.abs().sum() for p in model.student.neck.parameters() if p.grad is not None)
    head_grads = [p.grad for p in model.student.bbox_head.cls_convs.parameters()]
    assert neck_grad > 0  # back to the student's FPN features
    if loss_type == 'PCDLoss':  # through the student's own cls branch
        assert any(g is not None and g.abs().sum() > 0 for g in head_grads)
    else:  # through the teacher's cls branch, not the student's head
        assert all(g is None for g in head_grads)
    assert all(p.grad is None for p in teacher.parameters())

    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    optim.zero_grad()
    total, log_vars = model.parse_losses(losses)
    num = lambda v: float(v.detach()) if torch.is_tensor(v) else float(v)  # noqa: E731
    parts = sum(num(v) for k, v in log_vars.items() if k != 'loss')
    assert num(log_vars['loss']) == pytest.approx(parts, rel=1e-5)
    total.backward()
    optim.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_two_stage_teacher_with_a_logit_loss_is_a_clear_error(tiny_dataset, tmp_path):
    cfg = distiller(tiny_dataset, tmp_path, teacher='faster_rcnn',
                    logit_loss=dict(type='PCDLoss'))
    with pytest.raises(DistillError, match='dense-head teacher/student: the teacher FasterRCNN'):
        MODELS.build(cfg)
    cfg = distiller(tiny_dataset, tmp_path, teacher='faster_rcnn',
                    logit_loss=dict(type='CrossKDLoss'))
    with pytest.raises(DistillError, match='the teacher FasterRCNN has no dense class head'):
        MODELS.build(cfg)
