"""Feature distillation losses (dfmsd.models.losses): hand-worked values on tiny tensors,
attention-guided mask sampling, seeded draws, gradient flow, PKD's standardisation, FGD's and
MAR's masks. Every expected number is worked out here, not taken from the implementation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from mmdet.registry import MODELS

import dfmsd.models  # noqa: F401  (registers the losses)
from dfmsd.models.losses import (
    AMDLoss,
    DMKDLoss,
    FeatureKDLoss,
    FGDLoss,
    MARLoss,
    MGDLoss,
    PKDLoss,
)
from dfmsd.models.losses.common import channel_attention, sample_attention_mask, spatial_attention
from dfmsd.models.losses.fgd import fgd_masks
from dfmsd.models.losses.mar import mar_mask

pytestmark = pytest.mark.fast


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@torch.no_grad()
def identity_conv3x3(conv: nn.Conv2d):
    """3x3 conv that copies its input: centre tap = identity matrix, zero bias."""
    conv.weight.zero_()
    for i in range(conv.out_channels):
        conv.weight[i, i, 1, 1] = 1.0
    conv.bias.zero_()


@torch.no_grad()
def identity_generation(g: nn.Sequential):
    """G(x) = conv(ReLU(conv(x))) with identity convs, i.e. G(x) = relu(x)."""
    identity_conv3x3(g[0])
    identity_conv3x3(g[2])


@torch.no_grad()
def halving_se(se: nn.Module):
    """SE with zero weights: x * sigmoid(0) = x / 2."""
    for p in se.parameters():
        p.zero_()


# Tiny fixed inputs: N=1, C=2, H=W=2.
S1 = t([[[[1.0, -2.0], [3.0, 0.0]], [[0.5, 1.0], [-1.0, 2.0]]]])
T1 = t([[[[0.0, 1.0], [1.0, 2.0]], [[1.0, 0.0], [2.0, -1.0]]]])
RELU_S1 = t([[[[1.0, 0.0], [3.0, 0.0]], [[0.5, 1.0], [0.0, 2.0]]]])


# ----------------------------------------------------------------- FKD
def test_fkd_value_by_hand():
    # (T-S)^2: ch0 1, 9, 4, 4 -> 18; ch1 .25, 1, 9, 9 -> 19.25; mean over N*C*H*W = 8
    assert FeatureKDLoss(2, 2, loss_weight=1.0)(S1, T1).item() == pytest.approx((18 + 19.25) / 8)
    s, tt = torch.cat([S1, torch.zeros_like(S1)]), torch.cat([T1, torch.zeros_like(T1)])
    assert FeatureKDLoss(2, 2, loss_weight=3.0)(s, tt).item() == pytest.approx(3.0 * 37.25 / 16)


def test_fkd_align_conv_when_channels_differ():
    m = FeatureKDLoss(1, 2)
    assert isinstance(m.align, nn.Conv2d) and isinstance(FeatureKDLoss(2, 2).align, nn.Identity)
    with torch.no_grad():
        m.align.weight.copy_(t([[[[1.0]]], [[[2.0]]]]))
        m.align.bias.zero_()
    s = t([[[[1.0, 2.0], [0.0, -1.0]]]])
    # aligned: ch0 = s, ch1 = 2s against T = 0 -> squares 1+4+0+1 = 6 and 4+16+0+4 = 24
    assert m(s, torch.zeros(1, 2, 2, 2)).item() == pytest.approx((6 + 24) / 8)


# ----------------------------------------------------------------- MGD
def test_mgd_values_by_hand():
    m = MGDLoss(2, 2, loss_weight=1.0, lambda_mgd=0.0)
    identity_generation(m.generation)
    # nothing masked: G(S) = relu(S); sum over C, H, W / N
    # ch0: [1,0,3,0] vs [0,1,1,2]: 1+1+4+4 = 10; ch1: [.5,1,0,2] vs [1,0,2,-1]: .25+1+4+9 = 14.25
    assert m(S1, T1, generator=gen(0)).item() == pytest.approx(24.25)
    m = MGDLoss(2, 2, loss_weight=0.5, lambda_mgd=1.0)
    identity_generation(m.generation)
    # everything masked: G(0) = 0 -> sum T^2 = 6 + 6
    assert m(S1, T1, generator=gen(0)).item() == pytest.approx(0.5 * 12)
    assert MGDLoss(2, 2).loss_weight == pytest.approx(2e-5)


def test_mgd_masks_positions_independently_at_rate_lambda():
    m = MGDLoss(1, 1, loss_weight=1.0, lambda_mgd=0.65)
    identity_generation(m.generation)
    s = torch.ones(4, 1, 50, 50)
    # with T = 0 the loss is (kept positions) / N
    kept = m(s, torch.zeros_like(s), generator=gen(1)).item() * 4 / (4 * 50 * 50)
    assert kept == pytest.approx(0.35, abs=0.02)


# ----------------------------------------------------------------- attention and mask sampling
def test_attention_maps_by_hand():
    # spatial attention of a 1x1x1x2 map [0, 1] at tau = .5: 2 * softmax([0, 2])
    e2 = math.exp(2.0)
    assert spatial_attention(t([[[[0.0, 1.0]]]]), 0.5).flatten().tolist() == pytest.approx(
        [2 / (1 + e2), 2 * e2 / (1 + e2)]
    )
    # channel attention of channels with mean |x| 1 and 0.5 at tau = .5: 2 * softmax([2, 1])
    x = t([[[[1.0, -1.0]], [[0.5, 0.5]]]])
    e = math.e
    assert channel_attention(x, 0.5).flatten().tolist() == pytest.approx([2 * e2 / (e2 + e), 2 * e / (e2 + e)])


@pytest.mark.parametrize(
    'ratio,m,expected', [(0.5, 5, 3), (0.5, 9, 5), (0.25, 6, 2), (0.65, 20, 13), (0.3, 7, 2), (0.0, 9, 0), (1.0, 9, 9)]
)
def test_mask_takes_exactly_round_half_up(ratio, m, expected):
    keep = sample_attention_mask(torch.rand(4, m, generator=gen(1)) + 0.01, ratio, gen(2))
    assert keep.shape == (4, m) and set(keep.unique().tolist()) <= {0.0, 1.0}
    assert (keep == 0).sum(dim=1).tolist() == [expected] * 4


def test_mask_follows_attention():
    att = torch.ones(1, 16)
    att[0, [3, 7, 11, 12]] = 1000.0  # four peaked positions, mask 4 of 16
    g = gen(3)
    hits = sum(
        set((sample_attention_mask(att, 0.25, g)[0] == 0).nonzero().flatten().tolist()) == {3, 7, 11, 12}
        for _ in range(200)
    )
    assert hits >= 190
    att = torch.ones(1, 8)
    att[0, :2] = 4.0  # mildly peaked: masked more often than the rest
    counts = sum(1 - sample_attention_mask(att, 0.25, g)[0] for _ in range(400))
    assert counts[:2].min() > counts[2:].max()
    # underflowed softmax entries can still be drawn, after the peak
    logits = torch.zeros(1, 10)
    logits[0, 0] = 1e4
    keep = sample_attention_mask(10 * torch.softmax(logits, dim=1), 0.5, g)
    assert (keep == 0).sum() == 5 and keep[0, 0] == 0


# ----------------------------------------------------------------- DMKD / AMD
def make_dmkd(lambda_s, lambda_c, **kw):
    m = DMKDLoss(2, 2, loss_weight=1.0, lambda_s=lambda_s, lambda_c=lambda_c, **kw)
    identity_generation(m.gen_s)
    identity_generation(m.gen_c)
    halving_se(m.se)
    return m


def test_dmkd_no_mask_by_hand_both_reductions():
    # F_hat = 0.5 relu(S) + 0.5 relu(S / 2) = 0.75 relu(S)
    # ch0: [.75,0,2.25,0] vs [0,1,1,2]: .5625+1+1.5625+4 = 7.125
    # ch1: [.375,.75,0,1.5] vs [1,0,2,-1]: .390625+.5625+4+6.25 = 11.203125
    total = 7.125 + 11.203125
    m = make_dmkd(0.0, 0.0)
    assert torch.allclose(m.reconstruct(S1, T1, gen(0)), 0.75 * RELU_S1)
    assert m(S1, T1, generator=gen(0)).item() == pytest.approx(total)  # sum_over_batch, N = 1
    assert make_dmkd(0.0, 0.0, reduction='mean')(S1, T1, generator=gen(0)).item() == pytest.approx(total / 8)
    with pytest.raises(ValueError):
        DMKDLoss(2, 2, reduction='sum')


def test_dmkd_full_masks_and_fusion_weights():
    assert torch.allclose(make_dmkd(1.0, 0.0).reconstruct(S1, T1, gen(0)), 0.25 * RELU_S1)  # G_s(0) = 0
    m = make_dmkd(0.0, 1.0)
    assert torch.allclose(m.reconstruct(S1, T1, gen(0)), 0.5 * RELU_S1)  # G_c(SE(0)) = 0
    with torch.no_grad():
        m.fusion_logits.copy_(t([math.log(3.0), 0.0]))  # (w_s, w_c) = (.75, .25)
    assert torch.allclose(m.reconstruct(S1, T1, gen(0)), 0.75 * RELU_S1)


def test_dmkd_teacher_attention_decides_what_is_masked():
    m = make_dmkd(0.25, 0.5, tau=0.01)  # 1 of 4 positions, 1 of 2 channels
    tt = torch.zeros(1, 2, 2, 2)
    tt[0, 1, 1, 0] = 50.0  # the teacher peaks at channel 1, position (1, 0)
    s = torch.ones(1, 2, 2, 2)
    # spatial: (1,0) zeroed, relu(1) = 1 elsewhere, weight .5; channel: ch1 zeroed, SE halves
    # -> relu(.5) on ch0, 0 on ch1, weight .5
    expected = t([[[[0.75, 0.75], [0.25, 0.75]], [[0.5, 0.5], [0.0, 0.5]]]])
    for seed in range(5):
        assert torch.allclose(m.reconstruct(s, tt, gen(seed)), expected)
    m_s, m_c = DMKDLoss(8, 8, lambda_s=0.5, lambda_c=0.65).masks(torch.randn(3, 8, 5, 7, generator=gen(4)), gen(5))
    assert (m_s == 0).sum(dim=(1, 2, 3)).tolist() == [18] * 3  # 17.5 -> 18
    assert (m_c == 0).sum(dim=(1, 2, 3)).tolist() == [5] * 3  # 5.2 -> 5


def test_amd_values_by_hand():
    m = AMDLoss(2, 2, loss_weight=2.0, lambda_s=0.0)
    identity_generation(m.generation)
    halving_se(m.se)
    # G(SE(S)) = relu(S / 2): ch0 [.5,0,1.5,0] vs [0,1,1,2]: .25+1+.25+4 = 5.5
    #                         ch1 [.25,.5,0,1] vs [1,0,2,-1]: .5625+.25+4+4 = 8.8125
    assert m(S1, T1, generator=gen(0)).item() == pytest.approx(2.0 * (5.5 + 8.8125))
    m = AMDLoss(2, 2, loss_weight=1.0, lambda_s=0.25, tau=0.01)
    identity_generation(m.generation)
    halving_se(m.se)
    tt = torch.zeros(1, 2, 2, 2)
    tt[0, 0, 0, 1] = 50.0  # peak at (0, 1): that position is masked
    s = torch.ones(1, 2, 2, 2)
    # relu(S/2) = .5 except 0 at (0,1); against T: ch0 (0,1): (0 - 50)^2, others .25 x 3; ch1 .25 x 3
    assert m(s, tt, generator=gen(1)).item() == pytest.approx(2500 + 6 * 0.25)


# ----------------------------------------------------------------- the masked reconstruction interface
@pytest.mark.parametrize('type_', ['MGDLoss', 'DMKDLoss', 'AMDLoss'])
def test_forward_is_weight_times_error_of_reconstruction(type_):
    torch.manual_seed(0)
    m = MODELS.build(dict(type=type_, student_channels=4, teacher_channels=6, loss_weight=0.3))
    s, tt = torch.randn(2, 4, 5, 3, generator=gen(1)), torch.randn(2, 6, 5, 3, generator=gen(2))
    rebuilt = m.reconstruct(s, tt, gen(7))
    assert m(s, tt, generator=gen(7)).item() == pytest.approx(0.3 * m.error(rebuilt, tt).item(), rel=1e-6)
    # by hand: sum_over_batch = sum / N
    assert m.error(rebuilt, tt).item() == pytest.approx(((rebuilt - tt) ** 2).sum().item() / 2, rel=1e-6)
    mean = MODELS.build(dict(type=type_, student_channels=4, teacher_channels=6, loss_weight=0.3, reduction='mean'))
    mean.load_state_dict(m.state_dict())
    ratio = m(s, tt, generator=gen(7)) / mean(s, tt, generator=gen(7))
    assert ratio.item() == pytest.approx(6 * 5 * 3, rel=1e-5)  # C * H * W


@pytest.mark.parametrize('type_', ['MGDLoss', 'DMKDLoss', 'AMDLoss'])
def test_same_seed_same_loss_other_seed_other_loss(type_):
    torch.manual_seed(0)
    m = MODELS.build(dict(type=type_, student_channels=4, teacher_channels=4))
    s, tt = torch.randn(2, 4, 6, 6, generator=gen(1)), torch.randn(2, 4, 6, 6, generator=gen(2))
    a, b, c = m(s, tt, generator=gen(11)), m(s, tt, generator=gen(11)), m(s, tt, generator=gen(12))
    assert a.item() == b.item() and a.item() != c.item()


# ----------------------------------------------------------------- PKD
def standardise(x: torch.Tensor) -> torch.Tensor:
    """Per channel over (N, H, W): (x - mean) / (unbiased std + 1e-6), channel by channel."""
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        v = x[:, c]
        n = v.numel()
        mean = v.sum() / n
        std = math.sqrt(((v - mean) ** 2).sum().item() / (n - 1))
        out[:, c] = (v - mean) / (std + 1e-6)
    return out


def test_pkd_value_by_hand():
    s, tt = t([[[[1.0, 2.0], [3.0, 4.0]]]]), t([[[[1.0, 3.0], [2.0, 4.0]]]])
    # mean 2.5, unbiased variance 5/3; normalised differences [0, -1, 1, 0] / sd
    # -> mean square 2 / (5/3) / 4 = .3, times 1/2
    assert PKDLoss(1, 1)(s, tt).item() == pytest.approx(0.15, abs=1e-5)
    # against -s: differences 2 * normalised s, mean square 4 * (5 / (5/3)) / 4 = 3 -> 1.5, times 0.5
    assert PKDLoss(1, 1, loss_weight=0.5)(s, -s).item() == pytest.approx(0.75, abs=1e-5)


def test_pkd_against_independent_standardisation_and_invariance():
    s, tt = torch.randn(2, 3, 5, 4, generator=gen(0)), torch.randn(2, 3, 5, 4, generator=gen(1))
    m = PKDLoss(3, 3, loss_weight=2.0)
    expected = 2.0 * 0.5 * ((standardise(s) - standardise(tt)) ** 2).mean()
    assert m(s, tt).item() == pytest.approx(expected.item(), rel=1e-5)
    shifted = 7.5 * s + t([-3.0, 0.5, 100.0]).view(1, 3, 1, 1)
    assert m(shifted, 0.1 * tt - 4).item() == pytest.approx(expected.item(), rel=1e-4)
    assert m(s * t([1.0, -1.0, 1.0]).view(1, 3, 1, 1), tt).item() != pytest.approx(expected.item(), rel=1e-2)


# ----------------------------------------------------------------- FGD
def test_fgd_masks_by_hand():
    # map 3 x 4 of an image 24 x 32 (scale 1/8):
    #   box A [16, 0, 30, 8]  -> x 2 .. 3.75: cols 2..ceil = 4 (unclipped), y 0 .. 1: rows 0..1
    #                            area 1 / ((1+1-0) (4+1-2)) = 1/6
    #   box B [0, 8, 4, 20]   -> x 0 .. .5: cols 0..1, y 1 .. 2.5: rows 1..3 (unclipped) -> 1/(3*2) = 1/6
    #   box C [8, 8, 12, 12]  -> x 1 .. 1.5: cols 1..2, y 1 .. 1.5: rows 1..2 -> 1/4, wins the overlaps
    # image 2: map 3 x 4 of an image 12 x 16 (scale 1/4): box [0, 0, 4, 4] -> cols 0..1, rows 0..1 -> 1/4
    boxes = [t([[16.0, 0.0, 30.0, 8.0], [0.0, 8.0, 4.0, 20.0], [8.0, 8.0, 12.0, 12.0]]), t([[0.0, 0.0, 4.0, 4.0]])]
    fg, bg = fgd_masks(boxes, (3, 4), [(24, 32), (12, 16)])
    a, c = 1 / 6, 1 / 4
    assert torch.allclose(fg[0, 0], t([[0, 0, a, a], [a, c, c, a], [a, c, c, 0]]))
    assert torch.allclose(bg[0, 0], t([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]) / 3)
    assert torch.allclose(fg[1, 0], t([[c, c, 0, 0], [c, c, 0, 0], [0, 0, 0, 0]]))
    assert torch.allclose(bg[1, 0], (fg[1, 0] == 0).float() / 8)
    # every cell covered: no background at all
    fg, bg = fgd_masks([t([[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 10.0, 10.0]])], (4, 4), [(40, 40)])
    assert fg[0, 0, 0, 0].item() == pytest.approx(1 / 4) and fg[0, 0, 3, 3].item() == pytest.approx(1 / 25)
    assert bg.sum().item() == 0.0


def gc_identity(m: FGDLoss):
    with torch.no_grad():  # context term zero: GC(x) = x
        for gc in (m.gc_s, m.gc_t):
            gc.channel_add[-1].weight.zero_()
            gc.channel_add[-1].bias.zero_()


def test_fgd_value_by_hand():
    m = FGDLoss(2, 2, temp=0.5, alpha_fgd=1.0, beta_fgd=2.0, gamma_fgd=3.0, lambda_fgd=4.0)
    gc_identity(m)
    tt = torch.ones(1, 2, 2, 3)  # teacher attention: all ones, spatial and channel
    s = torch.zeros(1, 2, 2, 3)
    s[0, 0] = 1.0
    s[0, 1, 0, 0] = -1.0
    # box [0, 0, 1, 1] on a 2 x 3 map of a 2 x 3 image: cols 0..1, rows 0..1 -> 1/4 on 4 cells;
    # background: column 2, 1/2 each. (S-T)^2 summed over channels: 4 at (0,0), 1 elsewhere
    fg = 0.25 * (4 + 1 + 1 + 1)
    bg = 0.5 * (1 + 1)
    # student spatial attention: mean_c |S| = 1 at (0,0), .5 elsewhere -> 6 softmax([2, 1 x 5])
    e = math.e
    z = e**2 + 5 * e
    a00, a_other = 6 * e**2 / z, 6 * e / z
    # student channel attention: mean_hw |S| = [1, 1/6] -> 2 softmax([2, 1/3])
    y = e**2 + e ** (1 / 3)
    c0, c1 = 2 * e**2 / y, 2 * e ** (1 / 3) / y
    att = abs(c0 - 1) + abs(c1 - 1) + abs(a00 - 1) + 5 * abs(a_other - 1)
    glob = 4 + 5 * 1  # GC = identity: sum (S-T)^2
    loss = m(s, tt, boxes=[t([[0.0, 0.0, 1.0, 1.0]])], img_shapes=[(2, 3)])
    assert loss.item() == pytest.approx(1.0 * fg + 2.0 * bg + 3.0 * att + 4.0 * glob, rel=1e-6)


def test_fgd_focal_terms_weighted_by_teacher_attention():
    m = FGDLoss(2, 2, temp=0.5, alpha_fgd=1.0, beta_fgd=1.0, gamma_fgd=0.0, lambda_fgd=0.0, loss_weight=2.0)
    tt = t([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # N=1, C=2, H=1, W=2
    s = t([[[[0.0, 0.0]], [[0.0, 1.0]]]])
    # teacher spatial: mean_c|T| = [1, 0] -> 2 softmax([2, 0]); channel: mean_hw|T| = [1, 0] -> the same
    e2 = math.exp(2.0)
    hi, lo = 2 * e2 / (e2 + 1), 2 / (e2 + 1)
    # the (degenerate) box [0,0,0,0] covers cell (0,0) only (area 1); cell (0,1) is the background (1/1)
    # (S-T)^2: ch0 [4, 0], ch1 [0, 1]
    fg = hi * hi * 4 + hi * lo * 0
    bg = lo * hi * 0 + lo * lo * 1
    loss = m(s, tt, boxes=[t([[0.0, 0.0, 0.0, 0.0]])], img_shapes=[(1, 2)])
    assert loss.item() == pytest.approx(2.0 * (fg + bg), rel=1e-6)


# ----------------------------------------------------------------- MAR
def test_mar_mask_by_hand():
    # 6 x 6 map, stride 1, box [2,2,4,4]: inside rows/cols 2..3; near_ratio .5 grows by 1 -> 1..4
    exp = torch.full((6, 6), 0.1)
    exp[1:5, 1:5] = 0.5
    exp[2:4, 2:4] = 1.0
    assert torch.allclose(mar_mask([t([[2.0, 2.0, 4.0, 4.0]])], (6, 6), 1)[0, 0], exp)
    # stride 4, 4 x 4 map: box [4, 4, 12, 8] -> x 1..3: cols 1, 2; y 1..2: row 1
    # grown by (4, 2) px: [0, 2, 16, 10] -> x 0..4: cols 0..3; y .5..2.5: rows 0..2
    exp = torch.full((4, 4), 0.2)
    exp[0:3, :] = 0.5
    exp[1, 1:3] = 1.0
    assert torch.allclose(mar_mask([t([[4.0, 4.0, 12.0, 8.0]])], (4, 4), 4, background=0.2)[0, 0], exp)
    assert torch.allclose(mar_mask([torch.zeros(0, 4)], (2, 3), 4), torch.full((1, 1, 2, 3), 0.1))


def test_mar_value_by_hand():
    m = MARLoss(2, 2, loss_weight=2.0, near_ratio=1.0)
    # 2x2 map, stride 1: box [0,0,1,1] is cell (0,0); grown by 1 it covers the map: M = [[1,.5],[.5,.5]]
    s = torch.zeros(1, 2, 2, 2)
    s[0, 0, 0, 0], s[0, 0, 1, 1] = 1.0, 2.0
    # sum M (S-T)^2 = 1*1 + .5*4 = 3; / (C * sum M) = 3 / (2 * 2.5)
    loss = m(s, torch.zeros_like(s), boxes=[t([[0.0, 0.0, 1.0, 1.0]])], stride=1)
    assert loss.item() == pytest.approx(2.0 * 0.6)


# ----------------------------------------------------------------- gradients, registry
GT = [t([[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 30.0, 24.0]]), t([[4.0, 4.0, 12.0, 20.0]])]
INPUTS = dict(boxes=GT, img_shapes=[(32, 32), (32, 24)], stride=8)
FEATURE_TYPES = ['FeatureKDLoss', 'MGDLoss', 'DMKDLoss', 'AMDLoss', 'PKDLoss', 'FGDLoss', 'MARLoss']


@pytest.mark.parametrize('type_', FEATURE_TYPES)
@pytest.mark.parametrize('cs', [4, 6])
def test_gradients_reach_student_and_learnable_parts_not_teacher(type_, cs):
    torch.manual_seed(0)
    m = MODELS.build(dict(type=type_, student_channels=cs, teacher_channels=4, loss_weight=0.5))
    assert m.loss_weight == 0.5
    assert isinstance(m.align, nn.Conv2d if cs != 4 else nn.Identity)
    s = torch.randn(2, cs, 4, 4, requires_grad=True)
    tt = torch.randn(2, 4, 4, 4, requires_grad=True)  # the losses detach the teacher
    extra = {'generator': gen(0), **INPUTS}
    loss = m(s, tt, **{k: extra[k] for k in m.needs})
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert tt.grad is None
    for name, p in m.named_parameters():
        assert p.grad is not None, name
    if cs != 4:
        assert m.align.weight.grad.abs().sum() > 0
