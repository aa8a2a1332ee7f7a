"""The report: result tables, verdicts, CSVs, DVC plot data and figures, from measured files only.

Entry point: :func:`write_report` (what ``stages/report.py`` calls). Everything takes plain
dicts and paths, so it runs without DVC, and nothing here imports torch or mmdet. The report
reads its params (:mod:`~dfmsd.report.config`) and the measured files
(:mod:`~dfmsd.report.loading`), builds the table model (:mod:`~dfmsd.report.tables`) and renders
it (:mod:`~dfmsd.report.markdown`, :mod:`~dfmsd.report.machine_readable`,
:mod:`~dfmsd.report.figures`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dfmsd.core.io import atomic_directory, write_json, write_text
from dfmsd.report import figures
from dfmsd.report.config import report_config
from dfmsd.report.loading import load_me, load_runs, loss_curve, start_ratios
from dfmsd.report.machine_readable import loss_csv, map_points_csv, results_csv, runs_csv, summary
from dfmsd.report.markdown import results_markdown
from dfmsd.report.stats import confidence_label
from dfmsd.report.tables import build_groups, missing_notes, row_id


def build_report(
    params: Mapping[str, Any], *, metrics_dir: str | Path, logs_dir: str | Path, me_dir: str | Path
) -> dict[str, Any]:
    """Everything the report writes, in memory: ``{'config', 'groups', 'me', 'notes', 'curves', 'starts'}``."""
    config = report_config(params)
    runs, notes = load_runs(metrics_dir, config)
    groups = build_groups(runs, config)
    notes += missing_notes(groups, config)
    several = len(groups) > 1
    curves, starts, seen = [], [], set()
    for g in groups:
        for r in g.rows:
            rid = row_id(g, r, several)
            if not r.is_student or rid in seen or not r.n:
                continue
            seen.add(rid)
            label = r.label if not several else f'{rid.rsplit("/", 1)[0]}: {r.label}'
            runs_of_row = [run for _, run in r.seed_runs()]
            curve, log_notes = loss_curve(runs_of_row, logs_dir)
            notes += log_notes
            if curve is not None:
                curves.append((rid, curve, label))
            if stages := start_ratios(runs_of_row, logs_dir):
                starts.append((label, stages))
    me = load_me(me_dir, config)
    return {'config': config, 'groups': groups, 'me': me, 'notes': notes, 'curves': curves, 'starts': starts}


def _figure_data(report: dict) -> dict[str, Any]:
    config, groups = report['config'], report['groups']
    maps, diffs = [], []
    for g in groups:
        rows = [r for r in g.rows if r.n]
        base = g.baseline
        maps.append(
            {
                'title': g.key,
                'baseline': base.stats['mAP']['mean'] if base.n else None,
                'rows': [
                    {
                        'label': r.label,
                        'kind': r.fig_kind,
                        'mean': r.stats['mAP']['mean'],
                        'ci': r.stats['mAP']['ci'],
                        'points': list(r.values(config.split).values()),
                    }
                    for r in rows
                ],
            }
        )
        items = []
        for r in rows:
            if r.is_method and r.gain and r.gain['n']:
                items.append(
                    {
                        'label': r.label,
                        'reference': base.label,
                        'mean': r.gain['mean_diff'],
                        'ci': r.gain['ci'],
                        'kind': 'method',
                    }
                )
        for r in rows:
            if r.kind == 'ablation' and r.vs_full and r.vs_full['n']:
                items.append(
                    {
                        'label': r.label,
                        'reference': g.row(r.method.ablation_of).label,
                        'mean': r.vs_full['mean_diff'],
                        'ci': r.vs_full['ci'],
                        'kind': 'ablation',
                    }
                )
        for v in g.verdicts:
            if v.get('equal_budget') and v['result']['n']:
                items.append(
                    {
                        'label': v['a'].label,
                        'reference': v['b'].label,
                        'mean': v['result']['mean_diff'],
                        'ci': v['result']['ci'],
                        'kind': 'ablation',
                    }
                )
        diffs.append({'title': f'{g.key}: paired by seed', 'items': items})
    return {'maps': maps, 'diffs': diffs}


def write_report(
    params: Mapping[str, Any], *, metrics_dir: str | Path, logs_dir: str | Path, me_dir: str | Path, out_dir: str | Path
) -> list[Path]:
    """Build the report and write it under ``out_dir``; returns the files written.

    ``results.md``, ``results.csv``, ``runs.csv``, ``summary.json``, ``plots/{map,loss}.csv`` and
    ``figures/{map_per_row,paired_differences,training_loss,me_area_ratio}.png``. Every file is
    written atomically; ``plots/`` and ``figures/`` are replaced as whole directories.
    """
    report = build_report(params, metrics_dir=metrics_dir, logs_dir=logs_dir, me_dir=me_dir)
    config, groups = report['config'], report['groups']
    out = Path(out_dir)
    written = [
        write_text(
            out / 'results.md', results_markdown(groups, config, report['me'], report['notes'], report['starts'])
        ),
        write_text(out / 'results.csv', results_csv(groups, config)),
        write_text(out / 'runs.csv', runs_csv(groups)),
        write_json(out / 'summary.json', summary(groups)),
    ]
    with atomic_directory(out / 'plots') as tmp:
        write_text(tmp / 'map.csv', map_points_csv(groups, config))
        write_text(tmp / 'loss.csv', loss_csv([(rid, c) for rid, c, _ in report['curves']]))
    written += [out / 'plots' / 'map.csv', out / 'plots' / 'loss.csv']
    data = _figure_data(report)
    cl = confidence_label(config.confidence)
    with atomic_directory(out / 'figures') as tmp:
        figures.map_per_row(data['maps'], tmp / 'map_per_row.png', split=config.split, confidence_label=cl)
        figures.paired_differences(
            data['diffs'], tmp / 'paired_differences.png', split=config.split, confidence_label=cl
        )
        figures.training_loss([{'label': label, **c} for _, c, label in report['curves']], tmp / 'training_loss.png')
        figures.me_area_ratio(report['me'], tmp / 'me_area_ratio.png')
    written += [
        out / 'figures' / f'{n}.png' for n in ('map_per_row', 'paired_differences', 'training_loss', 'me_area_ratio')
    ]
    return written
