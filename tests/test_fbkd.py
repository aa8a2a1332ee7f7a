"""FBKDLoss (Zhang & Ma, ICLR 2021, as the authors' code): the attention mask, the masked feature
term, the attention-transfer terms, the non-local block and term, each on tiny tensors with the
learnable parts set to known weights; every expected number is worked out here by hand."""

from __future__ import annotations

import math

import pytest
import torch
from mmdet.registry import MODELS

import dfmsd.models  # noqa: F401  (registers the losses)
from dfmsd.models.losses import LOSS_TYPES, FBKDLoss
from dfmsd.models.losses.fbkd import NonLocalBlock, fbkd_mask

pytestmark = pytest.mark.fast

E2 = math.e**2
# A 2x2 map whose mean_c |x| is [[1, 0], [0, 0]], temperature 0.5: logits [2, 0, 0, 0], so
# A = 4 softmax = P at the peak and Q on the three other cells (P + 3Q = 4)
P, Q = 4 * E2 / (E2 + 3), 4 / (E2 + 3)


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def one_level(s, tt, m: FBKDLoss, stride: int = 8) -> torch.Tensor:
    (value,) = m([s], [tt], strides=[stride]).values()
    return value


@torch.no_grad()
def identity_adapters(m: FBKDLoss, level: int = 0):
    """f_adapt, f_channel, f_nl = identity matrices, f_spatial = centre tap 1; all biases 0."""
    for layer in (m.adapt[level], m.channel_adapt[level], m.nonlocal_adapt[level]):
        layer.weight.copy_(torch.eye(layer.weight.shape[0]).view_as(layer.weight))
        layer.bias.zero_()
    conv = m.spatial_adapt[level]
    conv.weight.zero_()
    conv.weight[0, 0, 1, 1] = 1.0
    conv.bias.zero_()


@torch.no_grad()
def known_block(block: NonLocalBlock, g_weight):
    """theta = phi = identity, g = ``g_weight`` (C x C), W = identity, biases 0; BN in eval mode with
    mean 0, var 1, eps 0, weight 1, bias 0, i.e. the identity."""
    eye = torch.eye(block.theta.weight.shape[0])
    for conv, w in ((block.theta, eye), (block.phi, eye), (block.g, t(g_weight)), (block.out[0], eye)):
        conv.weight.copy_(w.view_as(conv.weight))
        conv.bias.zero_()
    bn = block.out[1]
    bn.eval()
    bn.eps = 0.0
    bn.weight.fill_(1.0)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)


# ----------------------------------------------------------------- the mask
def test_mask_averages_student_and_teacher_attention_by_hand():
    # S peaks at (0,0), T at (1,1) (mean_c |.| = 1 there, 0 elsewhere; N=1, C=2, 2x2):
    # A(S) = [[P, Q], [Q, Q]], A(T) = [[Q, Q], [Q, P]]
    s = torch.zeros(1, 2, 2, 2)
    s[0, 0, 0, 0] = -2.0
    tt = torch.zeros(1, 2, 2, 2)
    tt[0, 0, 1, 1] = 2.0
    mask = fbkd_mask(s, tt, 0.5)
    assert mask.shape == (1, 1, 2, 2)
    torch.testing.assert_close(mask[0, 0], t([[(P + Q) / 2, Q], [Q, (P + Q) / 2]]))
    assert P == pytest.approx(2.84494, abs=1e-5) and Q == pytest.approx(0.385021, abs=1e-6)
    # uniform attention on both sides: M = 1 everywhere; a higher temperature flattens the peak
    torch.testing.assert_close(fbkd_mask(torch.ones(1, 2, 2, 2), -torch.ones(1, 2, 2, 2), 0.5), torch.ones(1, 1, 2, 2))
    # T = 1: logits [1, 0, 0, 0] -> 4 e / (e + 3) at the peak, averaged with the uniform teacher
    flat = fbkd_mask(s, torch.ones(1, 2, 2, 2), 1.0)[0, 0, 0, 0].item()
    assert flat == pytest.approx((4 * math.e / (math.e + 3) + 1) / 2)


def test_mask_is_detached():
    s = torch.randn(1, 2, 3, 3, requires_grad=True)
    assert not fbkd_mask(s, torch.randn(1, 2, 3, 3), 0.5).requires_grad


# ----------------------------------------------------------------- the masked feature term
def test_masked_feature_term_by_hand():
    m = FBKDLoss([2], [2], spatial_T=0.5)
    identity_adapters(m)
    # S peaks at (0,0) (A(S) = [[P, Q], [Q, Q]]); T = +-1 with |T| = 1 everywhere (A(T) = 1)
    s = torch.zeros(1, 2, 2, 2)
    s[0, 0, 0, 0] = -2.0
    tt = t([[[[1.0, -1.0], [1.0, -1.0]], [[-1.0, 1.0], [-1.0, 1.0]]]])
    # (T - S)^2 summed over channels: (0,0): (1+2)^2 + 1 = 10; the three others: 1 + 1 = 2
    # M = (A(S) + 1) / 2: (P+1)/2 at (0,0), (Q+1)/2 elsewhere
    expected = math.sqrt(10 * (P + 1) / 2 + 3 * 2 * (Q + 1) / 2)  # 4.8353; unmasked it would be 4
    assert expected == pytest.approx(4.83527, abs=1e-4)
    assert m.level_terms(0, s, tt)['feat'].item() == pytest.approx(expected, rel=1e-6)
    # the same with the roles swapped: the teacher's attention counts as much as the student's
    assert m.level_terms(0, tt, s)['feat'].item() == pytest.approx(expected, rel=1e-6)
    # the adapter acts on S before the difference: f_adapt = 2 * identity doubles S
    with torch.no_grad():
        m.adapt[0].weight.mul_(2.0)
    # (T - 2S)^2: (0,0): (1+4)^2 + 1 = 26; elsewhere 2
    assert m.level_terms(0, s, tt)['feat'].item() == pytest.approx(math.sqrt(26 * (P + 1) / 2 + 6 * (Q + 1) / 2))


# ----------------------------------------------------------------- the attention-transfer terms
def test_channel_and_spatial_terms_by_hand_norm_over_the_batch():
    m = FBKDLoss([2], [2])
    with torch.no_grad():
        m.channel_adapt[0].weight.copy_(t([[0.0, 1.0], [1.0, 0.0]]))  # swaps the channels
        m.channel_adapt[0].bias.copy_(t([1.0, 0.0]))
        m.spatial_adapt[0].weight.zero_()
        m.spatial_adapt[0].weight[0, 0, 1, 1] = 2.0  # 2x - 1 per cell
        m.spatial_adapt[0].bias.fill_(-1.0)
    s1 = t([[[[1.0, 3.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, -2.0]]]])
    t1 = t([[[[0.0, 4.0], [0.0, 0.0]], [[3.0, 3.0], [3.0, 3.0]]]])
    # channel: mean_hw S = [1, 1] -> swap + [1, 0] = [2, 1]; mean_hw T = [1, 3]; diff [-1, 2] -> 5
    # spatial: mean_c S = [[1.5, 2.5], [1, -1]] -> 2x - 1 = [[2, 4], [1, -3]];
    #          mean_c T = [[1.5, 3.5], [1.5, 1.5]]; diff [[-.5, -.5], [.5, 4.5]] -> .25 * 3 + 20.25 = 21
    terms = m.level_terms(0, s1, t1)
    assert terms['channel'].item() == pytest.approx(math.sqrt(5))
    assert terms['spatial'].item() == pytest.approx(math.sqrt(21))
    # a second image, all zeros: channel diff = 0 - [1, 0] -> +1; spatial diff = 0 - (-1) on 4 cells -> +4
    # one L2 norm over the whole batch (the authors' torch.dist), not a mean over images
    terms = m.level_terms(0, torch.cat([s1, torch.zeros_like(s1)]), torch.cat([t1, torch.zeros_like(t1)]))
    assert terms['channel'].item() == pytest.approx(math.sqrt(6))
    assert terms['spatial'].item() == pytest.approx(5.0)


def test_attention_transfer_uses_signed_means_not_absolute_values():
    m = FBKDLoss([2], [2])
    identity_adapters(m)
    # S = -T: the absolute-value attention maps agree, the signed means do not
    tt = t([[[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    terms = m.level_terms(0, -tt, tt)
    # channel: mean_hw T = [2.5, 1]; diff 2 * [2.5, 1] -> sqrt(25 + 4)
    assert terms['channel'].item() == pytest.approx(math.sqrt(29))
    # spatial: mean_c T = [[1, 1.5], [2, 2.5]]; diff doubled -> 2 sqrt(1 + 2.25 + 4 + 6.25) = 2 sqrt(13.5)
    assert terms['spatial'].item() == pytest.approx(2 * math.sqrt(13.5))


# ----------------------------------------------------------------- the non-local block and term
# four cells (row-major) with 2-vectors p0 = (1, 0), p1 = (0, 1), p2 = (1, 1), p3 = (0, 0)
X = t([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]]])
SWAP = [[0.0, 1.0], [1.0, 0.0]]


def cells(z: torch.Tensor) -> torch.Tensor:
    """N=1 x C x H x W -> HW x C, the cells row-major."""
    return z[0].flatten(1).t()


def test_nonlocal_block_by_hand():
    # no pooling (pool 1, M = 4): y_i = 1/4 sum_j (p_i . p_j) g(p_j), g = swap
    #   Gram rows: p0 [1, 0, 1, 0], p1 [0, 1, 1, 0], p2 [1, 1, 2, 0], p3 0
    #   y0 = ((0,1) + (1,1)) / 4 = (.25, .5); y1 = ((1,0) + (1,1)) / 4 = (.5, .25)
    #   y2 = ((0,1) + (1,0) + 2 (1,1)) / 4 = (.75, .75); y3 = 0;   z = x + y
    block = NonLocalBlock(2, 2, pool=1)
    known_block(block, SWAP)
    expected = [[1.25, 0.5], [0.5, 1.25], [1.75, 1.75], [0.0, 0.0]]
    torch.testing.assert_close(cells(block(X)), t(expected))
    # pool 2 (M = 1): phi = g's input = the channel-wise max over the map, m = (1, 1), g(m) = (1, 1)
    #   y_i = (p_i . m) (1, 1) = 1, 1, 2, 0 times (1, 1)
    block = NonLocalBlock(2, 2, pool=2)
    known_block(block, SWAP)
    pooled = [[2.0, 1.0], [1.0, 2.0], [3.0, 3.0], [0.0, 0.0]]
    torch.testing.assert_close(cells(block(X)), t(pooled))
    # a pool larger than the map is clamped to it: pool 8 on 2 x 2 is pool 2
    block = NonLocalBlock(2, 2, pool=8)
    known_block(block, SWAP)
    torch.testing.assert_close(cells(block(X)), t(pooled))


def test_nonlocal_blocks_start_as_identity_with_the_authors_sizes():
    m = FBKDLoss([64] * 6, [64] * 6)
    # C // (4, 4, 2, 2, 2) inner channels and pools (8, 4, 2, 2, 2), the last entry repeated
    assert [b.theta.out_channels for b in m.nonlocal_s] == [16, 16, 32, 32, 32, 32]
    assert [b.pool for b in m.nonlocal_t] == [8, 4, 2, 2, 2, 2]
    x = torch.randn(2, 64, 16, 16)
    torch.testing.assert_close(m.nonlocal_s[0](x), x)  # BN weight and bias start at 0
    m = FBKDLoss([8, 8], [4, 4], nonlocal_reduction=[2, 8], nonlocal_pool=[3])
    assert [b.theta.out_channels for b in m.nonlocal_s] == [4, 1]  # 8 // 8 = 1
    assert [(b.theta.out_channels, b.pool) for b in m.nonlocal_t] == [(2, 3), (1, 3)]  # max(1, 4 // 8)


def test_nonlocal_term_by_hand():
    m = FBKDLoss([2], [2], nonlocal_reduction=[1])  # 2 inner channels, so that identities fit
    identity_adapters(m)
    known_block(m.nonlocal_s[0], SWAP)  # level 0: pool 8, clamped to the 2 x 2 map
    known_block(m.nonlocal_t[0], SWAP)
    # NL_T(0) = 0 (no biases); NL_S(X) = the pooled cells above: 4+1 + 1+4 + 9+9 + 0 = 28
    assert m.level_terms(0, X, torch.zeros_like(X))['nonlocal'].item() == pytest.approx(math.sqrt(28))
    # f_nl = 2 * identity doubles NL_S(S); NL_T(X) = NL_S(X): sqrt(28) again
    with torch.no_grad():
        m.nonlocal_adapt[0].weight.mul_(2.0)
    assert m.level_terms(0, X, X)['nonlocal'].item() == pytest.approx(math.sqrt(28))


# ----------------------------------------------------------------- the whole loss
def test_loss_value_by_hand_and_per_stride_keys():
    m = FBKDLoss(
        [2, 2], [2, 2], loss_weight=0.5, mask_l2_weight=1.0, channel_weight=2.0, spatial_weight=3.0, nonlocal_weight=5.0
    )
    identity_adapters(m)  # level 0 only; the non-local blocks are the identity (BN starts at 0)
    s = torch.zeros(1, 2, 2, 2)
    s[0, 0, 0, 0] = -2.0
    tt = t([[[[1.0, -1.0], [1.0, -1.0]], [[-1.0, 1.0], [-1.0, 1.0]]]])
    feat = math.sqrt(10 * (P + 1) / 2 + 6 * (Q + 1) / 2)  # test_masked_feature_term_by_hand
    channel = 0.5  # mean_hw S = [-.5, 0], mean_hw T = [0, 0]
    spatial = 1.0  # mean_c S = [[-1, 0], [0, 0]], mean_c T = 0
    nonlocal_ = 4.0  # NL = identity: ||S - T|| = sqrt(10 + 3 * 2)
    out = m([s, s], [tt, tt], strides=[8, 16])
    assert list(out) == ['s8', 's16']
    expected = 0.5 * (1.0 * feat + 2.0 * channel + 3.0 * spatial + 5.0 * nonlocal_)
    assert out['s8'].item() == pytest.approx(expected, rel=1e-6)
    assert out['s16'].item() != pytest.approx(expected, rel=1e-3)  # level 1 keeps its random adapters


def test_defaults_are_the_authors_constants():
    m = FBKDLoss([4], [4])
    assert (m.loss_weight, m.spatial_T) == (1.0, 0.5)
    assert (m.mask_l2_weight, m.channel_weight, m.spatial_weight, m.nonlocal_weight) == (7e-5, 4e-3, 4e-3, 7e-5)


@pytest.mark.parametrize('cs', [4, 6])
def test_gradients_reach_student_and_learnable_parts_not_teacher(cs):
    torch.manual_seed(0)
    m = MODELS.build(dict(type='FBKDLoss', student_channels=[cs, cs], teacher_channels=[4, 4], loss_weight=0.5))
    assert 'FBKDLoss' in LOSS_TYPES and m.needs == {'strides'} and m.per_level is False
    s = [torch.randn(2, cs, 8, 8, requires_grad=True), torch.randn(2, cs, 4, 4, requires_grad=True)]
    tt = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 4, 4, 4, requires_grad=True)]
    out = m(s, tt, strides=[8, 16])
    total = sum(out.values())
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    total.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in tt)
    for name, p in m.named_parameters():
        assert p.grad is not None, name
    # BN starts at 0, so only its weight and bias learn at first; both non-local blocks do
    for blocks in (m.nonlocal_s, m.nonlocal_t):
        assert all(b.out[1].weight.grad.abs().sum() > 0 for b in blocks)
    assert all(a.weight.grad.abs().sum() > 0 for a in (*m.adapt, *m.channel_adapt, *m.spatial_adapt))
