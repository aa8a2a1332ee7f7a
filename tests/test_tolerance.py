"""flows.tolerance: a rebuilt run against the committed ones, in seed stds, with the likely cause."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from flows import tolerance

pytestmark = pytest.mark.fast

AMD = {'cpu': 'AMD EPYC', 'numerics': 'pinned', 'settings': {'MKL_CBWR': 'AVX2,STRICT'}, 'torch': '2.14.1'}


def record(seed: int, mAP: float, machine: dict | None = AMD, method: str = 'mgd') -> bytes:
    rec = {'kind': 'distill', 'student': 's', 'pair': 'p', 'method': method, 'seed': seed, 'test': {'mAP': mAP}}
    if machine is not None:
        rec['machine'] = machine
    return json.dumps(rec).encode()


def committed() -> dict[str, bytes]:
    # mgd: 10, 11, 12 (variance 1); pkd: 20, 20, 22 (variance 4/3); a single-run teacher
    runs = {f'mgd{k}.json': record(k, v) for k, v in enumerate((10.0, 11.0, 12.0))}
    runs |= {f'pkd{k}.json': record(k, v, method='pkd') for k, v in enumerate((20.0, 20.0, 22.0))}
    runs['teacher.json'] = json.dumps({'kind': 'teacher', 'pair': 'p', 'role': 'weak', 'test': {'mAP': 30.0}}).encode()
    return runs


POOLED = math.sqrt((2 * 1.0 + 2 * 4 / 3) / 4)  # the two rows' variances, by their degrees of freedom


def test_the_band_is_a_family_wise_95_percent_band_of_a_float_only_rebuild():
    # Δ of two draws has std √2 σ; 7 runs compared: Bonferroni over 7 two-sided tests
    assert tolerance.band(7) == pytest.approx(math.sqrt(2) * statistics.NormalDist().inv_cdf(1 - 0.05 / 14))
    assert tolerance.band(20) == pytest.approx(4.28, abs=0.01)
    assert tolerance.band(1) < tolerance.band(20) < tolerance.band(100)


def test_a_difference_is_judged_in_pooled_stds_and_shown_in_row_stds_too():
    intel = dict(AMD, cpu='Intel Xeon')
    rebuilt = {
        'mgd0.json': record(0, 12.5, intel),  # +2.5: 2.5 row std, 2.31 pooled: within
        'pkd2.json': record(2, 16.0, intel),  # -6.0: 5.2 row std, 5.55 pooled: beyond
        'mgd1.json': committed()['mgd1.json'],  # byte-identical: not listed
        'teacher.json': json.dumps({'kind': 'teacher', 'pair': 'p', 'role': 'weak', 'test': {'mAP': 31.0}}).encode(),
    }
    diffs = {d.path: d for d in tolerance.compare(committed(), rebuilt, 'test')}
    assert set(diffs) == {'mgd0.json', 'pkd2.json', 'teacher.json'}
    mgd, pkd, teacher = diffs['mgd0.json'], diffs['pkd2.json'], diffs['teacher.json']
    assert mgd.pooled_std == pytest.approx(POOLED) and mgd.row_std == pytest.approx(1.0)
    assert mgd.stds == pytest.approx(2.5 / POOLED) and mgd.within
    assert '2.5 row std, 2.3 pooled std, within tolerance' in mgd.line()
    assert pkd.stds == pytest.approx(6.0 / POOLED) and not pkd.within
    assert (
        f'BEYOND the tolerance of {tolerance.band(7):.1f}' in pkd.line()
        and 'CPU model (AMD EPYC -> Intel Xeon)' in pkd.line()
    )
    assert teacher.row_std is None and teacher.stds == pytest.approx(1.0 / POOLED) and teacher.within


@pytest.mark.parametrize(
    ('old', 'new', 'cause'),
    [
        (AMD, dict(AMD, torch='2.15.0'), 'torch 2.14.1 -> 2.15.0'),
        (AMD, dict(AMD, numerics='native', settings={}), 'numeric code paths'),
        (None, AMD, 'the committed record names no machine'),
        (AMD, AMD, 'same CPU model, settings and torch'),
    ],
    ids=['torch', 'code-paths', 'no-record', 'same-machine'],
)
def test_the_likely_cause_names_what_differs_between_the_two_machines(old, new, cause):
    (diff,) = tolerance.compare({'mgd0.json': record(0, 10.0, old)}, {'mgd0.json': record(0, 10.4, new)}, 'test')
    assert cause in diff.cause
    assert 'no seed std to judge it by' in diff.line() and not diff.within  # one run: no std at all
