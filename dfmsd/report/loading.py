"""What the report reads: the metrics records of params' grid, the ME decision tables and the
training-loss logs.

* ``metrics/**/*.json``: one :class:`~dfmsd.report.metrics.RunRecord` per evaluated model. Each
  file says what it is (``kind``, ``student``, ``pair``, ``method``, ``group``, ``seed``,
  ``role``); the directory layout is not used. Files of a student, pair, method or seed that
  params.yaml no longer names are **ignored with a warning** (:class:`ReportWarning`, also listed
  under "Notes" in results.md): DVC leaves the metrics of a removed grid point behind, and the
  tables only ever show the rows params.yaml declares; so are files of no run kind (an older
  layout) and SAL stage 1 runs. A file that contradicts params.yaml (a method in another group,
  a kind that does not match the method's group), a duplicate run, or a file that is malformed
  is a :class:`~dfmsd.core.errors.DfmsdError`.
* ``logs/``: training-loss CSVs at the paths dvc.yaml gives them (:func:`log_paths`).
* ``data/me/<pair>/boxes/area_ratios.json`` and ``data/me/<pair>/seed<k>.json`` (ME decisions).
"""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfmsd.core.errors import DfmsdError
from dfmsd.core.io import read_json
from dfmsd.core.kinds import BASELINE, KINDS, METHOD_GROUPS, SAL1, SAL2, TEACHER
from dfmsd.report.config import ReportConfig
from dfmsd.report.metrics import RunRecord, run_record


class ReportWarning(UserWarning):
    """A measured file the report leaves out (it names something params.yaml does not have)."""


@dataclass(frozen=True)
class Run:
    """One metrics file: its record and where it came from."""

    record: RunRecord
    source: str

    def metric(self, split: str, name: str) -> float:
        return float(getattr(self.record, split)[name])


def _read(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DfmsdError(f'{path}: not a readable JSON file ({err})') from None


def _ignore(notes: list[str], message: str) -> None:
    warnings.warn(message, ReportWarning, stacklevel=3)
    notes.append(message)


def _outside_grid(record: RunRecord, config: ReportConfig) -> str | None:
    """What of the record params.yaml does not name, if anything."""
    if record.kind is not TEACHER:
        if record.student not in config.students:
            return f'student {record.student!r} is not in params.yaml students'
        if record.seed not in config.seeds:
            return f'seed {record.seed} is not in params.yaml seeds'
    if record.kind is not BASELINE and record.pair not in config.pairs:
        return f'pair {record.pair!r} is not in params.yaml pairs'
    if record.kind.group and record.method not in config.methods:
        return f'method {record.method!r} is in no method group of params.yaml ({", ".join(METHOD_GROUPS)})'
    return None


def _check_against_params(record: RunRecord, config: ReportConfig, source: str) -> None:
    if record.kind.group:
        method = config.methods[record.method]
        if record.group != method.group:
            raise DfmsdError(
                f'{source}: method {method.name!r} is in {method.group} in params.yaml, '
                f'but this file says group {record.group!r}: a stale metrics file?'
            )
        if record.kind is not method.kind:
            raise DfmsdError(
                f'{source}: kind {record.kind.name!r} does not match {method.group} (expected {method.kind.name!r})'
            )
    if getattr(record, config.split) is None:
        raise DfmsdError(f"{source}: no '{config.split}' metrics (the report's split)")


def load_runs(metrics_dir: str | Path, config: ReportConfig) -> tuple[dict[tuple, Run], list[str]]:
    """Every metrics file under ``metrics_dir`` that belongs to params' grid, by
    :attr:`RunRecord.key`, and the notes about files left out (each also a :class:`ReportWarning`)."""
    metrics_dir = Path(metrics_dir)
    if not metrics_dir.is_dir():
        raise DfmsdError(f'{metrics_dir}: no metrics directory')
    runs: dict[tuple, Run] = {}
    notes: list[str] = []
    for path in sorted(metrics_dir.rglob('*.json'), key=lambda p: p.relative_to(metrics_dir).as_posix()):
        source = (metrics_dir / path.relative_to(metrics_dir)).as_posix()
        data = _read(path)
        if not isinstance(data, dict):
            raise DfmsdError(f'{source}: expected a JSON object')
        kind = data.get('kind')
        if not isinstance(kind, str) or kind not in KINDS:  # e.g. a file of an older layout that DVC left behind
            _ignore(notes, f'{source}: not a run record (kind {kind!r}, expected one of {", ".join(KINDS)}); ignored')
            continue
        if KINDS[kind] is SAL1:
            _ignore(notes, f'{source}: SAL stage 1 metrics are not a row (the row is its sal2 run); ignored')
            continue
        record = run_record(data, source)
        outside = _outside_grid(record, config)
        if outside:
            _ignore(notes, f'{source}: {outside}; ignored')
            continue
        _check_against_params(record, config, source)
        if record.key in runs:
            raise DfmsdError(f'{source} and {runs[record.key].source} describe the same run {record.key}')
        runs[record.key] = Run(record, source)
    if not runs:
        raise DfmsdError(f'{metrics_dir}: no metrics file of the grid params.yaml describes')
    return runs, notes


# ---------------------------------------------------------------- ME decisions
def load_me(me_dir: str | Path, config: ReportConfig) -> list[dict]:
    """Per pair: r(I) of every training image and the ME decision counts per seed."""
    me_dir = Path(me_dir)
    out = []
    for pair in config.pairs:
        entry: dict[str, Any] = {
            'pair': pair,
            'ratios': [],
            'score_thr': None,
            'threshold': config.me_threshold,
            'counts': {},
            'tables': {},
        }
        ratios_file = me_dir / pair / 'boxes' / 'area_ratios.json'
        if ratios_file.is_file():
            data = _read(ratios_file)
            ratios = data.get('area_ratios')
            if not isinstance(ratios, dict):
                raise DfmsdError(f"{ratios_file}: no 'area_ratios' mapping")
            entry['ratios'] = [float(ratios[k]) for k in sorted(ratios, key=_id_order)]
            entry['score_thr'] = data.get('score_thr')
        for seed in config.seeds:
            path = me_dir / pair / f'seed{seed}.json'
            if not path.is_file():
                continue
            table = _read(path)
            if table.get('seed') != seed or not isinstance(table.get('counts'), dict):
                raise DfmsdError(f"{path}: expected an ME decision table of seed {seed} with 'counts'")
            entry['tables'][seed] = {'threshold': table.get('threshold'), 'counts': table['counts']}
            entry['counts'][seed] = table['counts']
        out.append(entry)
    return out


def _id_order(key: str):
    return (0, int(key), '') if key.lstrip('-').isdigit() else (1, 0, key)


# ---------------------------------------------------------------- training loss
def log_paths(logs_dir: str | Path, record: RunRecord) -> list[Path]:
    """The loss logs of a run in stage order, at the paths dvc.yaml writes them (SAL: stage 1 first)."""
    logs_dir = Path(logs_dir)
    if record.kind is TEACHER:
        return [logs_dir / 'teachers' / record.pair / f'{record.role}.csv']
    base = logs_dir / 'students' / record.student / f'seed{record.seed}'
    if record.kind is BASELINE:
        return [base / 'baseline.csv']
    final = base / record.pair / f'{record.method}.csv'
    if record.kind is SAL2:
        return [final.with_name(f'{record.method}.stage1.csv'), final]
    return [final]


def distill_term(key: str) -> str | None:
    """The distillation term a logged loss key belongs to (``loss_distill_stage_s8`` -> ``stage``;
    levels are summed per term), or None for any other key (the detection losses, ``loss``)."""
    return _LEVEL.sub('', key[len('loss_distill_') :]) if key.startswith('loss_distill_') else None


#: a loss key's per-level suffix (``loss_distill_stage_s8``: the stage term at stride 8)
_LEVEL = re.compile(r'_s\d+$')


def read_loss_log(path: str | Path) -> list[tuple[int, float, float, dict[str, float]]]:
    """``[(iter, loss, detection loss, {distillation term: value})]``; the detection loss is
    ``loss`` minus the ``loss_distill_*`` columns. A header-only log (a downloaded teacher) gives ``[]``."""
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except OSError as err:
        raise DfmsdError(f'{path}: cannot read the loss log ({err})') from None
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        return []
    for col in ('iter', 'loss'):
        if col not in reader.fieldnames:
            raise DfmsdError(f"{path}: no '{col}' column (columns: {', '.join(reader.fieldnames)})")
    out = []
    for line, row in enumerate(reader, start=2):
        try:
            total = float(row['loss'])
            terms: dict[str, float] = defaultdict(float)
            for key, value in row.items():
                if key and (term := distill_term(key)) and value not in ('', None):
                    terms[term] += float(value)
            out.append((int(float(row['iter'])), total, total - sum(terms.values()), dict(terms)))
        except (TypeError, ValueError):
            raise DfmsdError(f'{path}:{line}: not a number in {row}') from None
    return out


#: Iterations each logged loss is the mean of (configs/_base_/runtime_iters.py, ``log_processor``).
LOG_WINDOW = 20


def first_row_of_stage(rows: list, begin: int) -> tuple | None:
    """The first logged row that averages iterations of the stage starting after ``begin`` only.
    A resumed stage inherits the logger's window: SAL stage 2's first row (``begin`` + 10) is the
    mean of 10 stage-1 and 10 stage-2 iterations, and its ME term of the 10 stage-2 ones alone,
    so the detection loss (the total minus the terms) came out at a quarter of itself in the
    default's run. A stage too short for a whole window gives its first row."""
    if begin > 0:
        clean = [row for row in rows if row[0] - LOG_WINDOW >= begin]
        return clean[0] if clean else (rows[0] if rows else None)
    return rows[0] if rows else None


def start_ratios(runs: list[Run], logs_dir: str | Path) -> list[dict]:
    """Each stage's distillation terms at its first logged iteration (of its own iterations only:
    :func:`first_row_of_stage`), as multiples of the detection loss there, mean over the runs (SAL:
    stage 1, then stage 2): ``[{'iter', 'ratios': {term: x}}]``. What a loss weight calibrated on
    val at the initialisation (benchmarks/loss_scale.py) became."""
    stages: dict[int, list[tuple[int, dict[str, float]]]] = defaultdict(list)
    for run in runs:
        for i, path in enumerate(log_paths(logs_dir, run.record)):
            begin = (run.record.start_iter or 0) if i > 0 else 0
            row = first_row_of_stage(read_loss_log(path) if path.is_file() else [], begin)
            if row and row[3] and row[2] > 0:
                it, _, det, terms = row
                stages[i].append((it, {k: v / det for k, v in terms.items()}))
    out = []
    for i in sorted(stages):
        seen = stages[i]
        names = sorted({k for _, ratios in seen for k in ratios})
        out.append(
            {
                'iter': min(it for it, _ in seen),
                'ratios': {k: sum(r.get(k, 0.0) for _, r in seen) / len(seen) for k in names},
            }
        )
    return out


def loss_curve(runs: list[Run], logs_dir: str | Path) -> tuple[dict | None, list[str]]:
    """The loss of a row's runs, mean over them at each logged iteration (SAL stages end to end)."""
    by_iter: dict[int, list[tuple[float, float]]] = defaultdict(list)
    notes, boundaries = [], set()
    for run in runs:
        points: dict[int, tuple[float, float]] = {}
        paths = log_paths(logs_dir, run.record)
        for i, path in enumerate(paths):
            if not path.is_file():
                notes.append(f'{path}: loss log not found (left out of the loss plot).')
                continue
            for it, total, det, _ in read_loss_log(path):
                points[it] = (total, det)
            if i < len(paths) - 1 and run.record.start_iter is not None:
                boundaries.add(run.record.start_iter)
        for it, value in points.items():
            by_iter[it].append(value)
    if not by_iter:
        return None, notes
    iters = sorted(by_iter)
    return {
        'iters': iters,
        'loss': [sum(v[0] for v in by_iter[i]) / len(by_iter[i]) for i in iters],
        'det_loss': [sum(v[1] for v in by_iter[i]) / len(by_iter[i]) for i in iters],
        'boundaries': sorted(boundaries),
    }, notes
