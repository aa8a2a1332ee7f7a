"""dfmsd.report.stats against scipy called directly, and the verdict logic on constructed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dfmsd.report.stats import ONE_SEED, confidence_label, holm, paired, resolution, summarize, verdict_of

pytestmark = pytest.mark.fast

VALUES = [25.1, 24.3, 26.0, 25.4]


@pytest.mark.parametrize('confidence', [0.95, 0.9, 0.99])
def test_summarize_matches_scipy_t_interval(confidence):
    s = summarize(VALUES, confidence)
    x = np.array(VALUES)
    lo, hi = stats.t.interval(confidence, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert s['n'] == 4
    assert s['mean'] == pytest.approx(x.mean(), abs=1e-12)
    assert s['std'] == pytest.approx(x.std(ddof=1), abs=1e-12)
    assert s['ci'] == pytest.approx((lo, hi), abs=1e-12)
    assert s['ci'][0] < s['mean'] < s['ci'][1]


def test_summarize_edge_cases():
    assert summarize([17.5]) == {'n': 1, 'mean': 17.5, 'std': None, 'ci': None}
    assert summarize([]) == {'n': 0, 'mean': None, 'std': None, 'ci': None}
    two = summarize([1.0, 2.0])  # n = 2: one degree of freedom, a wide interval
    lo, hi = stats.t.interval(0.95, 1, loc=1.5, scale=stats.sem([1.0, 2.0]))
    assert two['ci'] == pytest.approx((lo, hi)) and hi - lo > 12
    assert summarize([3.0, 3.0, 3.0]) == {'n': 3, 'mean': 3.0, 'std': 0.0, 'ci': (3.0, 3.0)}
    with pytest.raises(ValueError):
        summarize(VALUES, 1.0)


def test_paired_matches_scipy_ttest_rel():
    a = {0: 25.1, 1: 24.3, 2: 26.0, 3: 25.4}
    b = {0: 24.0, 1: 24.1, 2: 24.9, 3: 24.2}
    p = paired(a, b, 0.95)
    x, y = np.array(list(a.values())), np.array(list(b.values()))
    res = stats.ttest_rel(x, y)
    ci = res.confidence_interval(0.95)
    assert p['n'] == 4 and p['seeds'] == [0, 1, 2, 3]
    assert p['mean_diff'] == pytest.approx(np.mean(x - y), abs=1e-12)
    assert p['ci'] == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert p['p_value'] == pytest.approx(res.pvalue, abs=1e-12)
    assert (p['mean_a'], p['mean_b']) == pytest.approx((x.mean(), y.mean()))
    ci90 = res.confidence_interval(0.9)
    assert paired(a, b, 0.9)['ci'] == pytest.approx((ci90.low, ci90.high), abs=1e-12)


def test_verdicts_on_constructed_cases():
    base = {0: 17.0, 1: 17.6, 2: 16.8}
    clearly_better = {s: v + d for (s, v), d in zip(base.items(), [8.0, 8.3, 7.9])}
    clearly_worse = {s: v - d for (s, v), d in zip(base.items(), [1.5, 1.8, 1.6])}
    overlapping = {s: v + d for (s, v), d in zip(base.items(), [0.3, -0.4, 0.2])}
    assert paired(clearly_better, base)['verdict'] == 'better'
    assert paired(clearly_worse, base)['verdict'] == 'worse'
    assert paired(base, clearly_worse)['verdict'] == 'better'
    over = paired(overlapping, base)
    assert over['verdict'] == 'not distinguishable at 95%'
    assert over['ci'][0] < 0 < over['ci'][1]
    # a difference that is large in the mean but inside the noise is still not distinguishable
    noisy = {s: v + d for (s, v), d in zip(base.items(), [6.0, -3.0, 0.5])}
    assert paired(noisy, base)['mean_diff'] > 1 and paired(noisy, base)['verdict'].startswith('not distinguishable')
    assert paired(overlapping, base, 0.9)['verdict'] == 'not distinguishable at 90%'
    # the interval decides, directly
    assert verdict_of((0.01, 2.0)) == 'better' and verdict_of((-2.0, -0.01)) == 'worse'
    assert verdict_of((-0.1, 2.0)) == 'not distinguishable at 95%' and verdict_of(None) == ONE_SEED
    assert confidence_label(0.995) == '99.5%'


def test_one_and_two_common_seeds():
    one = paired({0: 25.0, 1: 26.0}, {0: 20.0, 5: 21.0})
    assert one['n'] == 1 and one['ci'] is None and one['p_value'] is None
    assert one['verdict'] == 'one seed: not tested' and one['mean_diff'] == 5.0
    none = paired({0: 25.0}, {1: 20.0})
    assert none['n'] == 0 and none['mean_diff'] is None and none['verdict'] == ONE_SEED
    a, b = {0: 25.0, 1: 26.5}, {0: 20.0, 1: 20.9}
    two = paired(a, b)
    res = stats.ttest_rel([25.0, 26.5], [20.0, 20.9])
    ci = res.confidence_interval(0.95)
    assert two['n'] == 2 and two['ci'] == pytest.approx((ci.low, ci.high))
    assert two['verdict'] == 'better'  # 5.0 and 5.6: consistent enough even with one degree of freedom
    # identical differences on every seed: zero spread, a zero-width interval
    same = paired({0: 2.0, 1: 3.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert same['ci'] == pytest.approx((1.0, 1.0)) and same['verdict'] == 'better' and same['p_value'] is None
    assert paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})['verdict'] == 'not distinguishable at 95%'


def test_pairing_is_by_seed():
    a = {0: 25.1, 1: 24.3, 2: 26.0, 3: 25.4}
    b = {0: 24.0, 1: 24.1, 2: 24.9}  # seed 3 missing: dropped from both
    p = paired(a, b)
    res = stats.ttest_rel([25.1, 24.3, 26.0], [24.0, 24.1, 24.9])
    ci = res.confidence_interval(0.95)
    assert p['n'] == 3 and p['seeds'] == [0, 1, 2]
    assert p['ci'] == pytest.approx((ci.low, ci.high))
    assert p['mean_a'] == pytest.approx(np.mean([25.1, 24.3, 26.0]))
    # the insertion order of either mapping changes nothing
    reordered = paired(dict(reversed(list(a.items()))), {2: 24.9, 0: 24.0, 1: 24.1})
    assert reordered == p
    # but the pairing does: the same values matched to other seeds give another answer
    shuffled = paired(a, {0: 24.9, 1: 24.0, 2: 24.1})
    assert shuffled['mean_diff'] == pytest.approx(p['mean_diff'])
    assert shuffled['ci'] != pytest.approx(p['ci'])
    # unpaired (Welch) would be wider here: the pairing removes the seed-to-seed spread
    welch = stats.ttest_ind([25.1, 24.3, 26.0], [24.0, 24.1, 24.9], equal_var=False).confidence_interval(0.95)
    assert (p['ci'][1] - p['ci'][0]) != pytest.approx(welch.high - welch.low)


def test_holm_adjusts_a_family_by_hand():
    # sorted: 0.021 x 4 = 0.084, 0.04 x 3 = 0.12, 0.3 x 2 = 0.6, 0.5 x 1 = 0.5 -> 0.6 (monotone)
    family = [
        {'p_value': p, 'mean_diff': d, 'verdict': v}
        for p, d, v in [(0.021, -1.9, 'worse'), (0.3, 0.2, 'n.d.'), (0.5, 0.1, 'n.d.'), (0.04, 1.0, 'better')]
    ]
    family.append({'p_value': None, 'mean_diff': 0.4, 'verdict': 'one seed: not tested'})
    holm(family)
    assert [r.get('p_holm') for r in family] == pytest.approx([0.084, 0.6, 0.6, 0.12, None])
    assert {r['verdict'] for r in family[:4]} == {'not distinguishable at 95%'}
    assert family[0]['verdict_unadjusted'] == 'worse' and family[4]['verdict'] == 'one seed: not tested'
    assert family[0]['family_size'] == 4
    two = [
        {'p_value': 0.01, 'mean_diff': -2.0, 'verdict': 'worse'},
        {'p_value': 0.02, 'mean_diff': 1.0, 'verdict': 'x'},
    ]
    holm(two)  # 0.01 x 2 = 0.02, 0.02 x 1 = 0.02: both below 0.05
    assert [r['verdict'] for r in two] == ['worse', 'better']


def test_resolution_is_the_half_width_at_the_pooled_spread():
    a = {0: 10.0, 1: 11.0, 2: 12.5}
    b = {0: 9.0, 1: 10.5, 2: 11.0}  # differences 1.0, 0.5, 1.5: SD 0.5
    c = {0: 10.0, 1: 11.0, 2: 13.0}  # against a: 0, 0, -0.5: SD 0.288675...
    family = [paired(a, b), paired(a, c)]
    res = resolution(family)
    sd = ((0.5**2 + (0.5 / 3**0.5) ** 2) / 2) ** 0.5
    assert res['sd'] == pytest.approx(sd)
    assert res['single'] == pytest.approx(4.302653 * sd / 3**0.5, rel=1e-6)  # t(0.975, 2)
    assert res['holm_first'] == pytest.approx(6.205347 * sd / 3**0.5, rel=1e-6)  # t(1 - 0.05 / 4, 2)
    assert resolution([paired({0: 1.0}, {0: 2.0})]) is None
