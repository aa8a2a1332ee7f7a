"""How far rebuilt metrics are from the committed ones, where the bytes cannot match.

A rebuild on another CPU model, or with other versions of torch and its math libraries,
computes other floats in the last bits (dfmsd.core.numerics), and a training amplifies them:
one such rebuild of the default moved per-seed test mAP by about one seed's spread. So where a
run's metrics file differs from the commit, ``make review`` measures the difference of its
reported mAP in units of its row's seed std (the committed runs of the same row, ddof = 1; a
teacher, a single run, takes the mean std of the student rows) and names what differs between
the committed record's machine and this one (``run.json``'s ``machine``: CPU model, code-path
settings, torch).

A run is **within tolerance** when ``|Δ mAP| <= TOLERANCE`` row stds. The difference of two
independent draws of one row has a std of √2 seed stds, so 3 stds is about a 97% band for a
rebuild that is just another draw; 3 seeds estimate a std roughly, which is one more reason not
to read more into a single run's difference than this.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

#: Largest |Δ mAP| of one run, in its row's seed stds, that a rebuild on another machine may show.
TOLERANCE = 3.0
METRIC = 'mAP'


def row_of(record: dict) -> tuple:
    """The row a run belongs to (its seed left out)."""
    if record.get('kind') == 'teacher':
        return ('teacher', record.get('pair'), record.get('role'))
    return (record.get('kind'), record.get('student'), record.get('pair'), record.get('method'))


def _value(record: dict, split: str) -> float | None:
    try:
        return float(record[split][METRIC])
    except (KeyError, TypeError, ValueError):
        return None


def seed_stds(committed: dict[str, dict], split: str) -> dict[tuple, float]:
    """Each row's std over seeds of the committed runs (rows of at least two runs)."""
    by_row: dict[tuple, list[float]] = {}
    for record in committed.values():
        value = _value(record, split)
        if value is not None:
            by_row.setdefault(row_of(record), []).append(value)
    return {row: statistics.stdev(values) for row, values in by_row.items() if len(values) > 1}


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
    stds: float | None  # |delta| in row stds
    cause: str

    @property
    def within(self) -> bool:
        return self.stds is not None and self.stds <= TOLERANCE

    def line(self) -> str:
        if self.delta is None:
            return f'{self.path}: differs, with no {METRIC} to judge it by'
        size = f'{self.stds:.1f} row std' if self.stds is not None else 'no seed std to judge it by'
        verdict = 'within tolerance' if self.within else f'BEYOND the tolerance of {TOLERANCE:g} std'
        return f'{self.path}: {METRIC} {self.delta:+.2f} ({size}, {verdict}); likely cause: {self.cause}'


def compare(committed: dict[str, bytes], rebuilt: dict[str, bytes], split: str) -> list[Difference]:
    """One :class:`Difference` per run file (path -> bytes) whose bytes differ; ``committed`` holds
    every committed run file (for the row stds), ``rebuilt`` the files now on disk."""
    old = {path: json.loads(data) for path, data in committed.items()}
    stds = seed_stds(old, split)
    pooled = statistics.fmean(stds.values()) if stds else None
    out = []
    for path in sorted(set(committed) & set(rebuilt)):
        if committed[path] == rebuilt[path]:
            continue
        before, after = old[path], json.loads(rebuilt[path])
        a, b = _value(before, split), _value(after, split)
        cause = likely_cause(before, after)
        if a is None or b is None:
            out.append(Difference(path, None, None, cause))
            continue
        std = stds.get(row_of(before), pooled if before.get('kind') == 'teacher' else None)
        delta = b - a
        out.append(Difference(path, delta, abs(delta) / std if std else None, cause))
    return out
