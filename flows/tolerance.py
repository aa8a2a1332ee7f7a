"""How far rebuilt metrics are from the committed ones, where the bytes cannot match.

A rebuild on another CPU model, or with other versions of torch and its math libraries,
computes other floats in the last bits (dfmsd.core.numerics), and a training amplifies them:
a rebuild of the default with other code paths moved single runs' test mAP by up to about two
seed stds. So where a run's metrics file differs from the commit, ``make review`` measures the
difference of its reported mAP in units of seed std and names what differs between the
committed record's machine and this one (``run.json``'s ``machine``: CPU model, code-path
settings, torch).

Two yardsticks are printed: the run's **row std** (its row's committed runs, ddof = 1) and the
**pooled std** (the student rows' variances pooled, weighted by their degrees of freedom).
The verdict uses the pooled one: 3 seeds give a row's std 2 degrees of freedom, so it can be
several times too small by chance (DFMSD's was 0.20 mAP against a pooled 0.53, and a rebuild
with other code paths moved one of its runs by 6.5 row stds, 2.4 pooled ones).

**Within tolerance** means ``|Δ| <= band`` pooled stds, where the band is what a rebuild that
only changes the floats stays inside with 95% probability over the whole grid: such a rebuild
is another draw of each run, so ``Δ`` has a std of √2 seed stds, and with ``N`` runs compared
the band is ``√2 · z(1 - 0.05 / 2N)`` (Bonferroni; 4.3 for 20 runs).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass

from dfmsd.core.kinds import TEACHER

METRIC = 'mAP'
#: The family-wise probability that a float-only rebuild leaves some run outside the band.
ALPHA = 0.05


def band(runs: int) -> float:
    """The tolerance, in pooled seed stds, for ``runs`` compared runs."""
    return math.sqrt(2) * statistics.NormalDist().inv_cdf(1 - ALPHA / (2 * max(1, runs)))


def row_of(record: dict) -> tuple:
    """The row a run belongs to (its seed left out)."""
    if record.get('kind') == TEACHER.name:
        return (TEACHER.name, record.get('pair'), record.get('role'))
    return (record.get('kind'), record.get('student'), record.get('pair'), record.get('method'))


def _value(record: dict, split: str) -> float | None:
    try:
        return float(record[split][METRIC])
    except (KeyError, TypeError, ValueError):
        return None


def seed_stds(committed: dict[str, dict], split: str) -> tuple[dict[tuple, float], float | None]:
    """Each row's std over seeds of the committed runs (rows of at least two runs), and the
    student rows' pooled std (None without such a row)."""
    by_row: dict[tuple, list[float]] = {}
    for record in committed.values():
        value = _value(record, split)
        if value is not None:
            by_row.setdefault(row_of(record), []).append(value)
    rows = {row: values for row, values in by_row.items() if len(values) > 1}
    dof = sum(len(v) - 1 for v in rows.values())
    pooled = math.sqrt(sum(statistics.variance(v) * (len(v) - 1) for v in rows.values()) / dof) if dof else None
    return {row: statistics.stdev(values) for row, values in rows.items()}, pooled


def likely_cause(old: dict, new: dict) -> str:
    """What differs between the machines of the committed run and the rebuilt one."""
    a, b = old.get('machine'), new.get('machine')
    if not isinstance(a, dict):
        return 'unknown: the committed record names no machine (made before machine records)'
    if not isinstance(b, dict):
        return 'unknown: the rebuilt record names no machine'
    causes = []
    if a.get('cpu') != b.get('cpu'):
        causes.append(f'CPU model ({a.get("cpu")} -> {b.get("cpu")})')
    if a.get('numerics') != b.get('numerics') or a.get('settings') != b.get('settings'):
        causes.append(f'numeric code paths ({a.get("settings")} -> {b.get("settings")})')
    if a.get('torch') != b.get('torch'):
        causes.append(f'torch {a.get("torch")} -> {b.get("torch")}')
    return ', '.join(causes) or 'not the recorded machine (same CPU model, settings and torch): look at the code'


@dataclass
class Difference:
    path: str
    delta: float | None  # rebuilt - committed, in mAP points
    row_std: float | None
    pooled_std: float | None
    band: float  # the tolerance, in pooled stds
    cause: str

    @property
    def stds(self) -> float | None:
        """|delta| in pooled stds: what the verdict reads."""
        return abs(self.delta) / self.pooled_std if self.delta is not None and self.pooled_std else None

    @property
    def within(self) -> bool:
        return self.stds is not None and self.stds <= self.band

    def line(self) -> str:
        if self.delta is None:
            return f'{self.path}: differs, with no {METRIC} to judge it by'
        if self.stds is None:
            return f'{self.path}: {METRIC} {self.delta:+.2f}, no seed std to judge it by; likely cause: {self.cause}'
        row = f'{abs(self.delta) / self.row_std:.1f} row std, ' if self.row_std else ''
        verdict = 'within tolerance' if self.within else f'BEYOND the tolerance of {self.band:.1f}'
        return (
            f'{self.path}: {METRIC} {self.delta:+.2f} ({row}{self.stds:.1f} pooled std, {verdict}); '
            f'likely cause: {self.cause}'
        )


def compare(committed: dict[str, bytes], rebuilt: dict[str, bytes], split: str) -> list[Difference]:
    """One :class:`Difference` per run file (path -> bytes) whose bytes differ; ``committed`` holds
    every committed run file (for the stds and the band), ``rebuilt`` the files now on disk."""
    old = {path: json.loads(data) for path, data in committed.items()}
    stds, pooled = seed_stds(old, split)
    tolerance = band(len(committed))
    out = []
    for path in sorted(set(committed) & set(rebuilt)):
        if committed[path] == rebuilt[path]:
            continue
        before, after = old[path], json.loads(rebuilt[path])
        a, b = _value(before, split), _value(after, split)
        delta = None if a is None or b is None else b - a
        out.append(Difference(path, delta, stds.get(row_of(before)), pooled, tolerance, likely_cause(before, after)))
    return out
