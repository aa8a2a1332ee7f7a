"""The machine-readable outputs: results.csv (a line per row), runs.csv (a line per measured run),
summary.json (the DVC metric) and the DVC plot data plots/{map,loss}.csv."""

from __future__ import annotations

import csv
import io
from typing import Any

from dfmsd.report.config import ReportConfig
from dfmsd.report.metrics import REPORTED_METRICS
from dfmsd.report.tables import COST_KEYS, Group, row_id

RUN_KEYS = ('start_iter', 'batch_size', 'uses_me', 'config_digest', 'threads')
SPLITS = ('val', 'test')


def _num(x: Any) -> str:
    if x is None:
        return ''
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return repr(round(x, 4) + 0.0)  # + 0.0: no '-0.0'
    return str(x)


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(header)
    writer.writerows([[_num(v) for v in r] for r in rows])
    return buf.getvalue()


def results_csv(groups: list[Group], config: ReportConfig) -> str:
    header = ['group', 'student', 'pair', 'row', 'label', 'kind', 'method_group', 'ablation_of', 'split', 'n']
    for m in REPORTED_METRICS:
        header += [f'{m}_mean', f'{m}_std']
    header += [
        'mAP_ci_low',
        'mAP_ci_high',
        'gain',
        'gain_ci_low',
        'gain_ci_high',
        'gain_p',
        'gain_p_holm',
        'gain_n',
        'verdict_vs_baseline',
        *(f'{k}_mean' for k in COST_KEYS),
    ]
    lines = []
    for g in groups:
        for r in g.rows:
            ci = r.stats['mAP']['ci'] or (None, None)
            gain = r.gain or {}
            gci = gain.get('ci') or (None, None)
            line = [
                g.key,
                g.student,
                g.pair,
                r.name,
                r.label,
                r.kind,
                r.method.group if r.method else '',
                (r.method.ablation_of or '') if r.method else '',
                config.split,
                r.n,
            ]
            for m in REPORTED_METRICS:
                line += [r.stats[m]['mean'], r.stats[m]['std']]
            line += [
                ci[0],
                ci[1],
                gain.get('mean_diff'),
                gci[0],
                gci[1],
                gain.get('p_value'),
                gain.get('p_holm'),
                gain.get('n'),
                gain.get('verdict', ''),
            ] + [r.cost[k] for k in COST_KEYS]
            lines.append(line)
    return _csv(header, lines)


def runs_csv(groups: list[Group]) -> str:
    """One line per measured run (a teacher once per pair, a baseline once per student and seed)."""
    header = ['student', 'pair', 'row', 'label', 'kind', 'method_group', 'seed', 'source']
    header += [f'{split}_{m}' for split in SPLITS for m in REPORTED_METRICS]
    header += [*COST_KEYS, *RUN_KEYS, 'strides']
    seen, lines = set(), []
    for g in groups:
        for r in g.rows:
            for seed, run in r.seed_runs():
                if run.source in seen:
                    continue
                seen.add(run.source)
                rec = run.record
                group = r.method.group if r.method else ''
                line = [rec.student, rec.pair, r.name, r.label, rec.kind.name, group, seed, run.source]
                for split in SPLITS:
                    metrics = getattr(rec, split) or {}
                    line += [metrics.get(m) for m in REPORTED_METRICS]
                line += [getattr(rec, k) for k in (*COST_KEYS, *RUN_KEYS)]
                line.append(' '.join(map(str, rec.strides)) if rec.strides is not None else '')
                lines.append(line)
    return _csv(header, lines)


def _r2(x: float | None) -> float | None:
    return None if x is None else round(float(x), 2)


def summary(groups: list[Group]) -> dict[str, Any]:
    """The DVC metric, kept to the headline so that `dvc metrics show` fits a terminal: each
    measured row's mean mAP on the reported split, ``{row: mAP}``; with several student/pair
    groups, ``{"<student>/<pair>": {row: mAP}}``. Intervals, gains and the other metrics are in
    results.csv."""
    by_group = {g.key: {r.name: _r2(r.stats['mAP']['mean']) for r in g.rows if r.n} for g in groups}
    return next(iter(by_group.values())) if len(by_group) == 1 else by_group


def map_points_csv(groups: list[Group], config: ReportConfig) -> str:
    several = len(groups) > 1
    seen, lines = set(), []
    for g in groups:
        for r in g.rows:
            rid = row_id(g, r, several)
            if rid in seen:
                continue
            seen.add(rid)
            for seed, value in r.values(config.split).items():
                lines.append([rid, seed, round(value, 4)])
    return _csv(['row', 'seed', 'mAP'], lines)


def loss_csv(curves: list[tuple[str, dict]]) -> str:
    lines = []
    for rid, c in curves:
        for it, total, det in zip(c['iters'], c['loss'], c['det_loss']):
            lines.append([rid, it, f'{total:.6g}', f'{det:.6g}'])
    return _csv(['row', 'iter', 'loss', 'det_loss'], lines)
