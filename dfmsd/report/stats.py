"""Statistics of the result tables: means with t confidence intervals, and paired comparisons.

Every run seed sets a student's initialisation, data order and random draws, and every method
runs with every seed, so two rows are compared **paired by seed** (the difference of the two
runs that share a seed), never as two independent samples.

* :func:`summarize`: n, mean, sample standard deviation (ddof=1) and the t interval of the
  mean (``scipy.stats.t.interval`` with the standard error ``scipy.stats.sem``).
* :func:`paired`: the mean paired difference ``a - b`` over the seeds both rows have, its t
  interval and two-sided p value (``scipy.stats.ttest_rel``), and a verdict read off the
  interval: ``better`` (entirely above 0), ``worse`` (entirely below 0), or ``not
  distinguishable at 95%`` (it contains 0). With fewer than two common seeds nothing is
  tested.
* :func:`holm`: a family of paired comparisons, Holm-adjusted (``statsmodels``'
  ``multipletests(method='holm')``): the verdicts then hold for the family at once.
* :func:`resolution`: the smallest mean paired difference the seeds detect at this spread.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

BETTER, WORSE = 'better', 'worse'
ONE_SEED = 'one seed: not tested'


def confidence_label(confidence: float) -> str:
    """``0.95`` -> ``'95%'``; ``0.9`` -> ``'90%'``; ``0.995`` -> ``'99.5%'``."""
    return f'{confidence * 100:.10g}%'


def not_distinguishable(confidence: float) -> str:
    """The verdict of an interval that contains 0: ``'not distinguishable at 95%'``."""
    return f'not distinguishable at {confidence_label(confidence)}'


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f'confidence must be in (0, 1), got {confidence}')


def _constant(values: np.ndarray) -> bool:
    """All values equal (up to float noise): the spread is 0 and a t interval is undefined."""
    return bool(np.ptp(values) <= 1e-9 * max(1.0, float(np.max(np.abs(values)))))


def summarize(values: Iterable[float], confidence: float = 0.95) -> dict[str, Any]:
    """``{'n', 'mean', 'std', 'ci': (lo, hi)}`` of the values (one per seed).

    ``std`` is the sample standard deviation (ddof=1); ``ci`` the ``confidence`` t interval of
    the mean, ``scipy.stats.t.interval(confidence, n - 1, loc=mean, scale=sem)``. One value
    gives std and ci None; none gives mean None as well. Identical values give std 0 and the
    zero-width interval (mean, mean).
    """
    _check_confidence(confidence)
    x = np.asarray([float(v) for v in values], dtype=float)
    n = int(x.size)
    if n == 0:
        return {'n': 0, 'mean': None, 'std': None, 'ci': None}
    mean = float(np.mean(x))
    if n == 1:
        return {'n': 1, 'mean': mean, 'std': None, 'ci': None}
    if _constant(x):
        return {'n': n, 'mean': mean, 'std': 0.0, 'ci': (mean, mean)}
    lo, hi = stats.t.interval(confidence, n - 1, loc=mean, scale=stats.sem(x))
    return {'n': n, 'mean': mean, 'std': float(np.std(x, ddof=1)), 'ci': (float(lo), float(hi))}


def verdict_of(ci: tuple[float, float] | None, confidence: float = 0.95) -> str:
    """``better`` if the interval of ``a - b`` lies above 0, ``worse`` below 0, else not
    distinguishable; no interval (fewer than two seeds): not tested."""
    if ci is None:
        return ONE_SEED
    lo, hi = ci
    if lo > 0:
        return BETTER
    if hi < 0:
        return WORSE
    return not_distinguishable(confidence)


def paired(a: Mapping[Any, float], b: Mapping[Any, float], confidence: float = 0.95) -> dict[str, Any]:
    """Row ``a`` against row ``b``, paired by seed (the keys of both mappings).

    Seeds present in only one row are dropped; the order of the mappings does not matter.
    Returns ``{'n', 'seeds', 'mean_a', 'mean_b', 'mean_diff', 'ci', 'p_value', 'verdict'}``
    where ``mean_diff`` is the mean of ``a[s] - b[s]``, ``ci`` its ``confidence`` interval and
    ``p_value`` the two-sided p value of ``scipy.stats.ttest_rel(a, b)``. Fewer than two common
    seeds: ci and p_value None, verdict ``'one seed: not tested'`` (no common seed: mean_diff
    None too). Identical differences on every seed (zero spread, where the t statistic is
    undefined) give the zero-width interval (d, d) and p_value None.
    """
    _check_confidence(confidence)
    seeds = sorted(set(a) & set(b))
    n = len(seeds)
    x = np.asarray([float(a[s]) for s in seeds], dtype=float)
    y = np.asarray([float(b[s]) for s in seeds], dtype=float)
    out: dict[str, Any] = {
        'n': n,
        'seeds': seeds,
        'mean_a': float(np.mean(x)) if n else None,
        'mean_b': float(np.mean(y)) if n else None,
        'mean_diff': float(np.mean(x - y)) if n else None,
        'sd_diff': float(np.std(x - y, ddof=1)) if n > 1 else None,
        'ci': None,
        'p_value': None,
    }
    if n < 2:
        out['verdict'] = ONE_SEED
        return out
    diff = x - y
    if _constant(diff):
        d = float(np.mean(diff))
        out['ci'] = (d, d)
    else:
        res = stats.ttest_rel(x, y)
        ci = res.confidence_interval(confidence)
        out['ci'] = (float(ci.low), float(ci.high))
        p = float(res.pvalue)
        out['p_value'] = p if math.isfinite(p) else None
    out['verdict'] = verdict_of(out['ci'], confidence)
    return out


def holm(family: Sequence[dict[str, Any]], confidence: float = 0.95) -> None:
    """Holm-adjust one family of :func:`paired` results in place, at familywise error
    ``1 - confidence``. Each result with a p value gets ``p_holm`` (``multipletests(method='holm')``),
    ``family_size`` (the tested comparisons) and a ``verdict`` read off ``p_holm``, with the
    direction of ``mean_diff``; its per-comparison verdict stays as ``verdict_unadjusted``.
    Results without a p value (one seed; zero spread) keep their verdict."""
    from statsmodels.stats.multitest import multipletests

    _check_confidence(confidence)
    tested = [r for r in family if r.get('p_value') is not None]
    if not tested:
        return
    reject, adjusted, _, _ = multipletests([r['p_value'] for r in tested], alpha=1 - confidence, method='holm')
    for r, rejected, p in zip(tested, reject, adjusted):
        r['verdict_unadjusted'] = r['verdict']
        r['p_holm'] = float(p)
        r['family_size'] = len(tested)
        r['verdict'] = (BETTER if r['mean_diff'] > 0 else WORSE) if rejected else not_distinguishable(confidence)


def resolution(family: Sequence[dict[str, Any]], confidence: float = 0.95) -> dict[str, Any] | None:
    """What a family of paired comparisons can resolve at its measured spread.

    ``sd``: the pooled (root mean square) standard deviation of the paired differences of the
    tested comparisons, all with ``n`` seeds; ``single``: the smallest mean difference whose
    ``confidence`` interval excludes 0, ``t(1 - a/2, n - 1) * sd / sqrt(n)`` with a = 1 - confidence;
    ``holm_first``: the same at Holm's first (strictest) step, a / m for m comparisons. A true
    difference of exactly this size is detected about half the time. None: nothing tested."""
    _check_confidence(confidence)
    tested = [r for r in family if r.get('sd_diff') is not None and r.get('ci') is not None]
    seeds = {r['n'] for r in tested}
    if not tested or len(seeds) != 1:
        return None
    n, m, a = seeds.pop(), len(tested), 1 - confidence
    sd = math.sqrt(sum(r['sd_diff'] ** 2 for r in tested) / m)
    width = sd / math.sqrt(n)
    return {
        'n': n,
        'm': m,
        'sd': sd,
        'single': float(stats.t.ppf(1 - a / 2, n - 1) * width),
        'holm_first': float(stats.t.ppf(1 - a / (2 * m), n - 1) * width),
    }
