"""flows.tolerance: a rebuilt run against the committed ones, in its row's seed std, with the cause."""

from __future__ import annotations

import json

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
    # mgd: 10, 11, 12 -> std 1.0; pkd: 20, 20, 22 -> std 1.1547
    runs = {f'mgd{k}.json': record(k, v) for k, v in enumerate((10.0, 11.0, 12.0))}
    runs |= {f'pkd{k}.json': record(k, v, method='pkd') for k, v in enumerate((20.0, 20.0, 22.0))}
    runs['teacher.json'] = json.dumps({'kind': 'teacher', 'pair': 'p', 'role': 'weak', 'test': {'mAP': 30.0}}).encode()
    return runs


def test_a_difference_is_measured_in_its_rows_seed_std_and_judged_against_the_tolerance():
    intel = dict(AMD, cpu='Intel Xeon')
    rebuilt = {
        'mgd0.json': record(0, 12.5, intel),  # +2.5 in a row of std 1.0: within 3 std
        'pkd2.json': record(2, 17.0, intel),  # -5.0 in a row of std 1.1547: 4.33 std, beyond
        'mgd1.json': committed()['mgd1.json'],  # byte-identical: not listed
    }
    diffs = {d.path: d for d in tolerance.compare(committed(), rebuilt, 'test')}
    assert set(diffs) == {'mgd0.json', 'pkd2.json'}
    assert diffs['mgd0.json'].delta == pytest.approx(2.5) and diffs['mgd0.json'].stds == pytest.approx(2.5)
    assert diffs['mgd0.json'].within
    assert diffs['pkd2.json'].stds == pytest.approx(5.0 / 1.1547, rel=1e-4) and not diffs['pkd2.json'].within
    assert 'CPU model (AMD EPYC -> Intel Xeon)' in diffs['pkd2.json'].line()
    assert 'BEYOND the tolerance of 3 std' in diffs['pkd2.json'].line()


def test_a_teacher_single_run_is_judged_by_the_mean_std_of_the_student_rows():
    rebuilt = {'teacher.json': json.dumps({'kind': 'teacher', 'pair': 'p', 'role': 'weak', 'test': {'mAP': 31.0}})}
    (diff,) = tolerance.compare(committed(), {k: v.encode() for k, v in rebuilt.items()}, 'test')
    assert diff.stds == pytest.approx(1.0 / ((1.0 + 1.1547005) / 2), rel=1e-6)


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
