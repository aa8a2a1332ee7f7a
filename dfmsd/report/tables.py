"""Result tables (markdown + CSV) and figures, from measured metrics and logs only."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from dfmsd.engine.evaluation import REPORTED_METRICS
from dfmsd.core.params import ParamsError

GAIN_COLUMNS = ('mAP', 'AR@100')  # shown with "(+x.x)" over the baseline, as in the paper


def run_iters(params: dict[str, Any], name: str) -> int:
    """Training iterations of one model named in params (teacher, student or distill run)."""
    distill = params.get('distill', {})
    for group in (params.get('teachers', {}), {'student': params.get('student', {})},
                  distill.get('runs', {}), distill.get('me_runs', {})):
        if name in group:
            return int(group[name].get('iters', 0))
    raise ParamsError(f"params.yaml: report budget names unknown model '{name}'")


def teacher_of(params: dict[str, Any], budget: list[str]) -> str:
    distill = params.get('distill', {})
    runs = {**distill.get('runs', {}), **distill.get('me_runs', {})}
    teachers = [runs[n]['teacher'] for n in budget if n in runs]
    return ' → '.join(teachers) if teachers else '—'


def build_rows(params: dict[str, Any], metrics_dir: str | Path = 'metrics') -> list[dict[str, Any]]:
    report = params['report']
    baseline = json.loads(Path(metrics_dir, f"{report['baseline']}.json").read_text())
    rows = []
    for name, spec in report['rows'].items():
        metrics = json.loads(Path(metrics_dir, f'{name}.json').read_text())
        row = {'name': name, 'method': spec['label'], 'teachers': teacher_of(params, spec['budget']),
               'iters': sum(run_iters(params, n) for n in spec['budget'])}
        row.update(metrics)
        row.update({f'{k} gain': round(metrics[k] - baseline[k], 2) for k in REPORTED_METRICS})
        row['is_baseline'] = name == report['baseline']
        rows.append(row)
    return rows


def _cell(row: dict[str, Any], key: str) -> str:
    text = f'{row[key]:.1f}'
    if key in GAIN_COLUMNS and not row['is_baseline'] and not row['name'].startswith('teacher'):
        text += f' ({row[key + " gain"]:+.1f})'
    return text


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ['Method', 'Teacher(s)', 'Iters'] + list(REPORTED_METRICS)
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        lines.append('| ' + ' | '.join([r['method'], r['teachers'], str(r['iters'])]
                                       + [_cell(r, k) for k in REPORTED_METRICS]) + ' |')
    return '\n'.join(lines)


def verdicts(rows: list[dict[str, Any]], method: str = 'dfmsd') -> list[str]:
    """Plain statements of who beats whom on mAP, true to the measured numbers."""
    students = [r for r in rows if not r['name'].startswith('teacher')]
    ours = [r for r in students if r['name'].startswith(method)]
    others = [r for r in students if r not in ours and not r['is_baseline']]
    out = []
    for i, o in enumerate(ours):  # a later row of ours (an ablation) is also set against the earlier
        for r in [r for r in students if r['is_baseline']] + others + ours[:i]:
            diff = o['mAP'] - r['mAP']
            word = 'beats' if diff > 0 else ('ties' if diff == 0 else 'does NOT beat')
            out.append(f"- {o['method']} {word} {r['method']}: {o['mAP']:.1f} vs {r['mAP']:.1f} mAP "
                       f'({diff:+.1f}).')
    return out


def write_tables(rows: list[dict[str, Any]], out_dir: str | Path, notes: list[str]) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = ['# Results', '', 'COCO-style box metrics on the validation split, in percent; '
          '(±x) = difference from the student baseline. Iters = total training iterations of '
          'the row (SAL rows add up their stages). Every number was measured by `dvc repro`.', '',
          markdown_table(rows), '', '## Verdicts', ''] + verdicts(rows) + [''] + notes
    (out_dir / 'results.md').write_text('\n'.join(md) + '\n')
    keys = ['name', 'method', 'teachers', 'iters'] + list(REPORTED_METRICS) + \
        [f'{k} gain' for k in REPORTED_METRICS]
    with (out_dir / 'results.csv').open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)


def read_loss_csv(path: str | Path) -> tuple[list[int], list[float], list[float]]:
    """(iterations, total loss, detection loss = total minus the loss_distill_* terms)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    total = [float(r['loss']) for r in rows]
    det = [t - sum(float(v) for k, v in r.items() if k.startswith('loss_distill_') and v)
           for t, r in zip(total, rows)]
    return [int(r['iter']) for r in rows], total, det


def plot_figures(rows: list[dict[str, Any]], params: dict[str, Any], out_dir: str | Path,
                 logs_dir: str | Path = 'logs',
                 area_ratios_file: str | Path = 'data/teacher_boxes/area_ratios.json') -> list[Path]:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = ['#9e9e9e' if r['name'].startswith('teacher') else
              '#1f77b4' if not r['name'].startswith('dfmsd') else '#d62728' for r in rows]
    bars = ax.bar([r['method'] for r in rows], [r['mAP'] for r in rows], color=colors)
    ax.bar_label(bars, fmt='%.1f', fontsize=8)
    base = next(r for r in rows if r['is_baseline'])
    ax.axhline(base['mAP'], color='k', lw=0.8, ls='--', label='student baseline')
    ax.set_ylabel('mAP (%)')
    ax.set_title('mAP per method (val)')
    ax.tick_params(axis='x', rotation=25, labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out_dir / 'map_per_method.png')
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, (ax_total, ax_det) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for r in rows:
        offset = 0
        budget = params['report']['rows'][r['name']]['budget']
        for stage, name in enumerate(budget):
            path = Path(logs_dir, f'{name}.csv')
            if not path.is_file():
                continue
            iters, total, det = read_loss_csv(path)
            if not iters:  # a downloaded teacher has no training log
                continue
            label = r['method'] if len(budget) == 1 else f"{r['method']} · stage {stage + 1}"
            line, = ax_total.plot([i + offset for i in iters], total, lw=1, label=label)
            ax_det.plot([i + offset for i in iters], det, lw=1, color=line.get_color())
            offset += run_iters(params, name)
    for ax, title in ((ax_total, 'total loss (detection + distillation)'),
                      (ax_det, 'detection loss only')):
        ax.set_xlabel('iteration (SAL stages placed end to end)')
        ax.set_yscale('log')
        ax.set_title(title, fontsize=10)
    ax_total.set_ylabel('training loss')
    ax_total.legend(fontsize=7, ncol=2)
    fig.suptitle('Training loss per run and SAL stage')
    fig.tight_layout()
    written.append(out_dir / 'training_loss.png')
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    if Path(area_ratios_file).is_file():
        ratios = list(json.loads(Path(area_ratios_file).read_text())['area_ratios'].values())
        threshold = float(params['augment']['threshold'])
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.hist(ratios, bins=40, color='#1f77b4')
        ax.axvline(threshold, color='#d62728', lw=1.5, label=f'T = {threshold:g}')
        below = sum(r < threshold for r in ratios)
        ax.set_title(f'ME area ratio r(I) from teacher boxes: {below} noise / '
                     f'{len(ratios) - below} crop candidates')
        ax.set_xlabel('r(I) = summed teacher box area / image area')
        ax.set_ylabel('training images')
        ax.legend()
        fig.tight_layout()
        written.append(out_dir / 'me_area_ratio.png')
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
