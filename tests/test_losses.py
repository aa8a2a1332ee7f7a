"""Tests for dfmsd.models.losses: hand-computed values on tiny tensors, attention maps,
mask sampling, gradient flow, PKD invariance, registry building."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dfmsd.models.losses import (DMKDLoss, FeatureKDLoss, FGDLoss, MARLoss, MARRelationLoss,
                                 MGDLoss, PKDLoss, SFALoss, aug_reconstruction_loss,
                                 channel_attention, fgd_masks, mar_mask,
                                 sample_attention_mask, spatial_attention)
from mmdet.registry import MODELS

ALL_TYPES = ['FeatureKDLoss', 'MGDLoss', 'DMKDLoss', 'PKDLoss', 'SFALoss', 'FGDLoss',
             'MARLoss', 'MARRelationLoss']


def t(values):
    return torch.tensor(values, dtype=torch.float32)


@torch.no_grad()
def identity_conv3x3(conv: nn.Conv2d):
    """3x3 conv that copies its input: centre tap = identity matrix, zero bias."""
    conv.weight.zero_()
    for i in range(conv.out_channels):
        conv.weight[i, i, 1, 1] = 1.0
    conv.bias.zero_()


@torch.no_grad()
def identity_generation(gen: nn.Sequential):
    """G(x) = conv(ReLU(conv(x))) with identity convs, i.e. G(x) = relu(x)."""
    identity_conv3x3(gen[0])
    identity_conv3x3(gen[2])


# Tiny fixed inputs: N=1, C=2, H=W=2.
S1 = t([[[[1., -2.], [3., 0.]], [[0.5, 1.], [-1., 2.]]]])
T1 = t([[[[0., 1.], [1., 2.]], [[1., 0.], [2., -1.]]]])
RELU_S1 = t([[[[1., 0.], [3., 0.]], [[0.5, 1.], [0., 2.]]]])


# ----------------------------------------------------------------- FKD
def test_fkd_value_by_hand():
    loss = FeatureKDLoss(2, 2, loss_weight=1.0)(S1, T1)
    # (T-S)^2: ch0 (0-1)^2=1, (1+2)^2=9, (1-3)^2=4, (2-0)^2=4 -> 18
    #          ch1 (1-.5)^2=.25, (0-1)^2=1, (2+1)^2=9, (-1-2)^2=9 -> 19.25
    expected = (18 + 19.25) / (2 * 2 * 2)
    assert loss.item() == pytest.approx(expected)


def test_fkd_batch_mean_and_weight():
    s = torch.cat([S1, torch.zeros_like(S1)])
    tt = torch.cat([T1, torch.zeros_like(T1)])
    loss = FeatureKDLoss(2, 2, loss_weight=3.0)(s, tt)
    # image 1: 37.25/8, image 2: 0 -> mean over N
    assert loss.item() == pytest.approx(3.0 * (37.25 / 8 + 0.0) / 2)


def test_fkd_align_conv_when_channels_differ():
    m = FeatureKDLoss(1, 2)
    assert isinstance(m.align, nn.Conv2d)
    with torch.no_grad():
        m.align.weight.copy_(t([[[[1.]]], [[[2.]]]]))
        m.align.bias.zero_()
    s = t([[[[1., 2.], [0., -1.]]]])
    tt = torch.zeros(1, 2, 2, 2)
    # aligned: ch0 = s, ch1 = 2s -> squares 1+4+0+1=6 and 4+16+0+4=24
    assert m(s, tt).item() == pytest.approx((6 + 24) / 8)
    assert isinstance(FeatureKDLoss(2, 2).align, nn.Identity)


# ----------------------------------------------------------------- MGD
def test_mgd_lambda_zero_keeps_everything():
    m = MGDLoss(2, 2, loss_weight=1.0, lambda_mgd=0.0)
    identity_generation(m.generation)
    # G(S) = relu(S); sum over C,H,W, divided by N=1
    # ch0: relu(S)=[1,0,3,0] vs T=[0,1,1,2]: 1+1+4+4 = 10
    # ch1: relu(S)=[.5,1,0,2] vs T=[1,0,2,-1]: .25+1+4+9 = 14.25
    assert m(S1, T1).item() == pytest.approx(10 + 14.25)


def test_mgd_lambda_one_masks_everything_and_weight():
    m = MGDLoss(2, 2, loss_weight=0.5, lambda_mgd=1.0)
    identity_generation(m.generation)
    # all positions masked -> G(0) = 0 -> sum T^2 = (0+1+1+4) + (1+0+4+1) = 12
    assert m(S1, T1).item() == pytest.approx(0.5 * 12)
    assert MGDLoss(2, 2).loss_weight == pytest.approx(2e-5)


def test_mgd_mask_is_bernoulli_with_rate_lambda():
    torch.manual_seed(0)
    m = MGDLoss(1, 1, loss_weight=1.0, lambda_mgd=0.65)
    identity_generation(m.generation)
    s = torch.ones(4, 1, 50, 50)
    # with T = 0 the loss is the number of kept positions / N
    kept = m(s, torch.zeros_like(s)).item() * 4 / (4 * 50 * 50)
    assert kept == pytest.approx(0.35, abs=0.02)


# ----------------------------------------------------------------- attention maps
def test_attention_maps_sum_order_and_temperature():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 6)
    a_s, a_c = spatial_attention(x, 0.5), channel_attention(x, 0.5)
    assert a_s.shape == (3, 1, 4, 6) and a_c.shape == (3, 5, 1, 1)
    assert torch.allclose(a_s.sum(dim=(1, 2, 3)), torch.full((3,), 24.0))
    assert torch.allclose(a_c.sum(dim=(1, 2, 3)), torch.full((3,), 5.0))
    # larger |x| (mean over channels / positions) -> larger attention: same order
    mag_s = x.abs().mean(dim=1).flatten(1)
    assert torch.equal(a_s.flatten(1).argsort(dim=1), mag_s.argsort(dim=1))
    mag_c = x.abs().mean(dim=(2, 3))
    assert torch.equal(a_c.flatten(1).argsort(dim=1), mag_c.argsort(dim=1))
    # explicit value: spatial attention of a 1x1x1x2 map [0, 1] at tau=0.5
    a = spatial_attention(t([[[[0., 1.]]]]), 0.5).flatten()
    e2 = math.exp(2.0)
    assert a.tolist() == pytest.approx([2 / (1 + e2), 2 * e2 / (1 + e2)])
    # lower temperature sharpens: larger max, smaller min
    sharp, flat = spatial_attention(x, 0.1), spatial_attention(x, 2.0)
    assert (sharp.flatten(1).max(1).values > a_s.flatten(1).max(1).values).all()
    assert (a_s.flatten(1).max(1).values > flat.flatten(1).max(1).values).all()
    assert (sharp.flatten(1).min(1).values < flat.flatten(1).min(1).values).all()


# ----------------------------------------------------------------- mask sampling
@pytest.mark.parametrize('ratio,m', [(0.5, 16), (0.65, 20), (0.3, 7), (0.0, 9), (1.0, 9),
                                     (0.5, 5)])
def test_mask_takes_exact_fraction(ratio, m):
    torch.manual_seed(1)
    att = torch.rand(4, m) + 0.01
    keep = sample_attention_mask(att, ratio)
    expected = math.floor(ratio * m + 0.5)          # round half up
    assert keep.shape == (4, m)
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert ((keep == 0).sum(dim=1) == expected).all()


def test_mask_follows_attention():
    torch.manual_seed(2)
    att = torch.ones(1, 16)
    att[0, [3, 7, 11, 12]] = 1000.0       # four peaked positions, mask 4 of 16
    hits = 0
    for _ in range(200):
        keep = sample_attention_mask(att, 0.25)
        hits += int(set((keep[0] == 0).nonzero().flatten().tolist()) == {3, 7, 11, 12})
    assert hits >= 190
    # mildly peaked: positions with 4x the weight are masked more often than the rest
    att = torch.ones(1, 8)
    att[0, :2] = 4.0
    counts = torch.zeros(8)
    for _ in range(400):
        counts += 1 - sample_attention_mask(att, 0.25)[0]
    assert counts[:2].min() > counts[2:].max()


def test_mask_uses_global_rng():
    att = torch.rand(2, 30)
    torch.manual_seed(5)
    a = sample_attention_mask(att, 0.5)
    torch.manual_seed(5)
    b = sample_attention_mask(att, 0.5)
    assert torch.equal(a, b)


def test_mask_handles_underflowed_attention():
    logits = torch.zeros(1, 10)
    logits[0, 0] = 1e4
    att = 10 * F.softmax(logits, dim=1)      # nine exact zeros
    keep = sample_attention_mask(att, 0.5)
    assert (keep == 0).sum() == 5 and keep[0, 0] == 0


# ----------------------------------------------------------------- DMKD
def make_dmkd(lambda_s, lambda_c, **kw):
    m = DMKDLoss(2, 2, loss_weight=1.0, lambda_s=lambda_s, lambda_c=lambda_c, **kw)
    identity_generation(m.gen_s)
    identity_generation(m.gen_c)
    with torch.no_grad():                     # SE(x) = x * sigmoid(0) = x / 2
        for p in m.se.parameters():
            p.zero_()
    return m


def test_dmkd_no_mask_by_hand():
    m = make_dmkd(0.0, 0.0)
    # F_hat = 0.5 * relu(S) + 0.5 * relu(0.5 S) = 0.75 relu(S)
    f_hat = 0.75 * RELU_S1
    assert torch.allclose(m.reconstruct(S1, T1), f_hat)
    # ch0: .75*[1,0,3,0]=[.75,0,2.25,0] vs [0,1,1,2]: .5625+1+1.5625+4 = 7.125
    # ch1: [.375,.75,0,1.5] vs [1,0,2,-1]: .390625+.5625+4+6.25 = 11.203125
    total = 7.125 + 11.203125
    assert m(S1, T1).item() == pytest.approx(total)
    assert m(S1, T1, reduction='mean').item() == pytest.approx(total / 8)
    assert aug_reconstruction_loss(m, S1, T1, beta=2.0).item() == pytest.approx(2 * total / 8)


def test_dmkd_full_masks_and_fusion_weights():
    m = make_dmkd(1.0, 0.0)               # spatial branch sees zeros -> G_s(0) = 0
    assert torch.allclose(m.reconstruct(S1, T1), 0.25 * RELU_S1)
    m = make_dmkd(0.0, 1.0)               # channel branch sees zeros -> G_c(SE(0)) = 0
    assert torch.allclose(m.reconstruct(S1, T1), 0.5 * RELU_S1)
    with torch.no_grad():
        m.fusion_logits.copy_(t([math.log(3.0), 0.0]))   # (w_s, w_c) = (.75, .25)
    assert torch.allclose(m.reconstruct(S1, T1), 0.75 * RELU_S1)


def test_dmkd_attention_decides_which_position_and_channel_is_masked():
    m = make_dmkd(0.25, 0.5, tau=0.01)    # mask 1 of 4 positions, 1 of 2 channels
    tt = torch.zeros(1, 2, 2, 2)
    tt[0, 1, 1, 0] = 50.0                 # teacher peaks at channel 1, position (1, 0)
    s = torch.ones(1, 2, 2, 2)
    for _ in range(5):
        f_hat = m.reconstruct(s, tt)
        # spatial: position (1,0) zeroed -> relu = 1 elsewhere, 0 there; weight 0.5
        # channel: channel 1 zeroed, SE halves -> relu(0.5) on ch0, 0 on ch1; weight 0.5
        expected = t([[[[0.5 + 0.25, 0.5 + 0.25], [0.0 + 0.25, 0.5 + 0.25]],
                       [[0.5, 0.5], [0.0, 0.5]]]])
        assert torch.allclose(f_hat, expected)


def test_dmkd_defaults_and_seeded_determinism():
    m = DMKDLoss(8, 8)
    assert (m.loss_weight, m.tau, m.lambda_s, m.lambda_c) == (2e-5, 0.5, 0.5, 0.5)
    assert torch.allclose(F.softmax(m.fusion_logits, 0), t([0.5, 0.5]))
    s, tt = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    torch.manual_seed(3)
    a = m(s, tt)
    torch.manual_seed(3)
    b = m(s, tt)
    assert a.item() == b.item()
    with pytest.raises(ValueError):
        m(s, tt, reduction='sum')


def test_dmkd_masks_exact_counts():
    torch.manual_seed(4)
    m = DMKDLoss(8, 8, lambda_s=0.5, lambda_c=0.65)
    m_s, m_c = m.masks(torch.randn(3, 8, 5, 7))
    assert ((m_s == 0).sum(dim=(1, 2, 3)) == 18).all()                               # 17.5 -> 18
    assert ((m_c == 0).sum(dim=(1, 2, 3)) == 5).all()                                # 5.2 -> 5


# ----------------------------------------------------------------- PKD / SFA
def test_pkd_value_by_hand():
    s = t([[[[1., 2.], [3., 4.]]]])
    tt = t([[[[1., 3.], [2., 4.]]]])
    # both: mean 2.5, population var 1.25; deviations s: [-1.5,-.5,.5,1.5], t: [-1.5,.5,-.5,1.5]
    sd = math.sqrt(1.25)
    ns = [-1.5 / sd, -0.5 / sd, 0.5 / sd, 1.5 / sd]
    nt = [-1.5 / sd, 0.5 / sd, -0.5 / sd, 1.5 / sd]
    expected = 0.5 * sum((a - b) ** 2 for a, b in zip(ns, nt)) / 4   # = 1 - r = 0.2
    assert expected == pytest.approx(0.2)
    assert PKDLoss(1, 1)(s, tt).item() == pytest.approx(expected, abs=1e-5)
    # perfectly anti-correlated -> 1 - (-1) = 2
    assert PKDLoss(1, 1, loss_weight=0.5)(s, -s).item() == pytest.approx(1.0, abs=1e-5)


def test_pkd_invariance_to_scale_and_channel_shift():
    torch.manual_seed(0)
    s, tt = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    m = PKDLoss(3, 3)
    base = m(s, tt)
    shifted = 7.5 * s + t([-3., 0.5, 100.]).view(1, 3, 1, 1)
    assert m(shifted, tt).item() == pytest.approx(base.item(), rel=1e-4)
    assert not m(s * t([1., -1., 1.]).view(1, 3, 1, 1), tt).item() == pytest.approx(base.item())


def test_sfa_is_pkd():
    assert issubclass(SFALoss, PKDLoss)
    s, tt = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert SFALoss(3, 3)(s, tt).item() == pytest.approx(PKDLoss(3, 3)(s, tt).item())


# ----------------------------------------------------------------- FGD
def test_fgd_masks_by_hand_non_square_with_stride():
    # feature map 3 x 4 at stride 8; box [16, 0, 30, 8] px -> x [2, 3.75) -> cols 2..3,
    # y [0, 1) -> row 0 (2 cells); box [0, 8, 4, 20] px -> col 0, y [1, 2.5) -> rows 1..2
    boxes = [t([[16., 0., 30., 8.], [0., 8., 4., 20.]])]
    fg, bg = fgd_masks(boxes, (3, 4), 8, None)
    exp_fg = t([[0., 0., .5, .5], [.5, 0., 0., 0.], [.5, 0., 0., 0.]])
    assert torch.allclose(fg[0, 0], exp_fg)
    assert torch.allclose(bg[0, 0], (exp_fg == 0).float() / 8)
    # nested boxes: the smaller box's larger value wins; img_shape fallback (FGD scaling)
    boxes = [t([[0., 0., 40., 40.], [0., 0., 10., 10.]])]
    fg, bg = fgd_masks(boxes, (4, 4), None, [(40, 40)])
    assert fg[0, 0, 0, 0].item() == pytest.approx(1.0)
    assert fg[0, 0, 3, 3].item() == pytest.approx(1 / 16)
    assert bg.sum().item() == 0.0


def test_fgd_value_by_hand():
    m = FGDLoss(2, 2, loss_weight=1.0, temp=0.5, alpha_fgd=1., beta_fgd=2., gamma_fgd=3.,
                lambda_fgd=4.)
    with torch.no_grad():
        for gc in (m.gc_s, m.gc_t):       # context term zero -> GC(x) = x
            gc.channel_add[-1].weight.zero_()
            gc.channel_add[-1].bias.zero_()
    tt = torch.ones(1, 2, 2, 2)           # teacher attention: all ones (spatial and channel)
    s = torch.zeros(1, 2, 2, 2)
    s[0, 0] = 1.0                         # student ch0 = 1 everywhere
    s[0, 1, 0, 0] = -1.0                  # student ch1 = [[-1, 0], [0, 0]]
    # fg: box covers cell (0,0) only (weight 1/(1*1)); (S-T)^2 there: ch0 0, ch1 (-2)^2 = 4
    fg = 1.0 * 4
    # bg: other 3 cells, weight 1/3 each; (S-T)^2 there: ch0 0, ch1 1
    bg = 3 * (1 / 3) * 1
    # student spatial attention: mean_c|S| = [1, .5, .5, .5] / .5 = [2, 1, 1, 1]
    e = math.e
    z = e ** 2 + 3 * e
    a00, a_other = 4 * e ** 2 / z, 4 * e / z
    # student channel attention: mean_hw|S| = [1, .25] / .5 = [2, .5]
    y = e ** 2 + e ** 0.5
    c0, c1 = 2 * e ** 2 / y, 2 * e ** 0.5 / y
    att = abs(c0 - 1) + abs(c1 - 1) + abs(a00 - 1) + 3 * abs(a_other - 1)
    # global: GC(x) = x -> sum (S-T)^2 = 4 + 3 = 7
    glob = 7.0
    expected = 1. * fg + 2. * bg + 3. * att + 4. * glob
    loss = m(s, tt, gt_bboxes=[t([[0., 0., 1., 1.]])], img_shapes=[(2, 2)], stride=1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_fgd_focal_terms_weighted_by_teacher_attention():
    m = FGDLoss(2, 2, temp=0.5, alpha_fgd=1., beta_fgd=1., gamma_fgd=0., lambda_fgd=0.)
    tt = t([[[[2., 0.]], [[0., 0.]]]])    # N=1, C=2, H=1, W=2
    s = t([[[[0., 0.]], [[0., 1.]]]])
    # teacher spatial: mean_c|T| = [1, 0] / .5 = [2, 0] -> 2*softmax = [2e^2, 2] / (e^2+1)
    # teacher channel: mean_hw|T| = [1, 0] / .5 = [2, 0] -> same numbers
    e2 = math.exp(2.0)
    hi, lo = 2 * e2 / (e2 + 1), 2 / (e2 + 1)
    # (S-T)^2: ch0 [4, 0], ch1 [0, 1]; box -> cell (0,0) is fg (weight 1), (0,1) bg (1/1)
    fg = 1.0 * hi * hi * 4 + 1.0 * hi * lo * 0
    bg = 1.0 * lo * hi * 0 + 1.0 * lo * lo * 1
    loss = m(s, tt, gt_bboxes=[t([[0., 0., 1., 1.]])], stride=1)
    assert loss.item() == pytest.approx(fg + bg, rel=1e-6)


def test_fgd_defaults():
    m = FGDLoss(4, 4)
    assert (m.temp, m.alpha_fgd, m.beta_fgd, m.gamma_fgd, m.lambda_fgd) == \
        (0.5, 0.001, 0.0005, 0.0005, 0.000005)


# ----------------------------------------------------------------- MAR
def test_mar_mask_by_hand():
    # 6 x 6 map, stride 1, box [2,2,4,4]: inside rows/cols 2..3; near_ratio .5 grows by 1
    mask = mar_mask([t([[2., 2., 4., 4.]])], (6, 6), 1, None)
    exp = torch.full((6, 6), 0.1)
    exp[1:5, 1:5] = 0.5
    exp[2:4, 2:4] = 1.0
    assert torch.allclose(mask[0, 0], exp)
    # no boxes -> all background; custom values
    mask = mar_mask([torch.zeros(0, 4)], (2, 3), 4, None, background=0.2)
    assert torch.allclose(mask, torch.full((1, 1, 2, 3), 0.2))


def test_mar_value_by_hand():
    m = MARLoss(2, 2, loss_weight=2.0, near_ratio=1.0)
    # 2x2 map, box [0,0,1,1] grown by 1 on each side covers the whole map:
    # mask [[1, .5], [.5, .5]], sum = 2.5
    s = torch.zeros(1, 2, 2, 2)
    s[0, 0, 0, 0], s[0, 0, 1, 1] = 1.0, 2.0
    tt = torch.zeros_like(s)
    # sum M (S-T)^2 = 1*1 + .5*4 = 3; / (C * sum M) = 3 / (2 * 2.5) = .6
    loss = m(s, tt, gt_bboxes=[t([[0., 0., 1., 1.]])], img_shapes=[(2, 2)], stride=1)
    assert loss.item() == pytest.approx(2.0 * 0.6)


def test_mar_relation_by_hand():
    m = MARRelationLoss(2, 2, loss_weight=1.0)
    s = t([[[[1., 0.]], [[0., 1.]]]])      # pixel vectors (1,0), (0,1): cos [[1,0],[0,1]]
    tt = t([[[[1., 3.]], [[0., 0.]]]])     # pixel vectors (1,0), (3,0): cos [[1,1],[1,1]]
    assert m(s, tt).item() == pytest.approx((0 + 1 + 1 + 0) / 4)
    # scale of each pixel vector does not matter (cosine)
    assert m(s * 5, tt).item() == pytest.approx(0.5)


def test_mar_relation_pools_to_max_pixels():
    torch.manual_seed(0)
    s, tt = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    pooled = MARRelationLoss(3, 3, max_pixels=4)(s, tt)
    ps, pt = F.avg_pool2d(s, 2), F.avg_pool2d(tt, 2)      # 2x2 = 4 positions
    vs = F.normalize(ps.flatten(2), dim=1)[0]
    vt = F.normalize(pt.flatten(2), dim=1)[0]
    expected = ((vs.T @ vs - vt.T @ vt) ** 2).mean()
    assert pooled.item() == pytest.approx(expected.item(), rel=1e-5)
    # 32 x 32 -> 16 x 16 = 256 positions by default
    s2 = torch.randn(1, 3, 32, 32)
    full = MARRelationLoss(3, 3)(s2, s2.flip(-1))
    assert full.item() > 0


# ----------------------------------------------------------------- gradients
GT = [t([[0., 0., 16., 16.], [8., 8., 30., 24.]]), t([[4., 4., 12., 20.]])]


@pytest.mark.parametrize('type_', ALL_TYPES)
@pytest.mark.parametrize('cs', [4, 6])
def test_gradients_reach_student_and_learnable_parts_not_teacher(type_, cs):
    torch.manual_seed(0)
    m = MODELS.build(dict(type=type_, student_channels=cs, teacher_channels=4))
    s = torch.randn(2, cs, 4, 4, requires_grad=True)
    tt = torch.randn(2, 4, 4, 4, requires_grad=True)   # modules detach the teacher
    loss = m(s, tt, gt_bboxes=GT, img_shapes=[(32, 32), (32, 24)], stride=8)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert tt.grad is None
    for name, p in m.named_parameters():
        assert p.grad is not None, name
    if cs != 4:
        assert m.align.weight.grad.abs().sum() > 0


def test_teacher_without_grad_stays_without_grad():
    m = DMKDLoss(4, 4)
    s = torch.randn(2, 4, 4, 4, requires_grad=True)
    tt = torch.randn(2, 4, 4, 4)
    m(s, tt).backward()
    assert tt.grad is None and not tt.requires_grad
    for part in (m.gen_s, m.gen_c, m.se):
        assert sum(p.grad.abs().sum() for p in part.parameters()) > 0
    assert m.fusion_logits.grad is not None


# ----------------------------------------------------------------- registry
@pytest.mark.parametrize('type_', ALL_TYPES)
def test_registered_and_buildable(type_):
    assert MODELS.get(type_) is not None
    for cs in (8, 16):
        m = MODELS.build(dict(type=type_, student_channels=cs, teacher_channels=8,
                              loss_weight=0.5))
        assert m.loss_weight == 0.5
        assert isinstance(m.align, nn.Conv2d if cs != 8 else nn.Identity)
        out = m(torch.randn(1, cs, 3, 5), torch.randn(1, 8, 3, 5),
                gt_bboxes=[t([[0., 0., 10., 10.]])], img_shapes=[(24, 40)], stride=8)
        assert out.dim() == 0


def test_unsupported_reduction_rejected():
    for cls in (PKDLoss, FGDLoss, MARLoss, MARRelationLoss):
        with pytest.raises(ValueError):
            cls(2, 2)(S1, T1, gt_bboxes=[t([[0., 0., 1., 1.]])], stride=1, reduction='mean')
