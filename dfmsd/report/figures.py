"""The report's figures, from plain data (lists and dicts) prepared by :mod:`dfmsd.report.write`.

Deterministic: the same data give the same PNG bytes. Figures are drawn on a bare
:class:`matplotlib.figure.Figure` (no pyplot, no global backend switch), under fixed rc
settings, and saved without the ``Software`` metadata entry (Matplotlib writes no date into
a PNG; that entry is the only thing that varies with the installation).

* :func:`map_per_row`: per group, bars of mean mAP per row, one point per seed, the t
  interval as whiskers; teachers grey, the student baseline as a dashed line.
* :func:`paired_differences`: a forest plot of paired mAP differences with their intervals.
* :func:`training_loss`: total and detection-only training loss (log y), one line per row.
* :func:`me_area_ratio`: histograms of the ME size criterion r(I), with T and the op counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dfmsd.core.io import atomic_write

DPI = 120
RC = {
    'svg.hashsalt': 'dfmsd-report',
    'font.family': 'DejaVu Sans',
    'font.size': 9,
    'axes.titlesize': 10,
    'axes.labelsize': 9,
    'legend.fontsize': 8,
    'xtick.labelsize': 8,
    'ytick.labelsize': 8,
    'path.simplify': True,
    'figure.dpi': DPI,
    'savefig.dpi': DPI,
    'savefig.bbox': 'standard',
}
TEACHER_COLOR = '#9e9e9e'
BASELINE_COLOR = '#4d4d4d'
METHOD_COLOR = '#1f77b4'
SAL_COLOR = '#d62728'
ABLATION_COLOR = '#ff7f0e'
LINE_COLORS = (
    '#1f77b4',
    '#d62728',
    '#2ca02c',
    '#9467bd',
    '#8c564b',
    '#e377c2',
    '#17becf',
    '#bcbd22',
    '#ff7f0e',
    '#7f7f7f',
)
KIND_COLORS = {
    'teacher': TEACHER_COLOR,
    'baseline': BASELINE_COLOR,
    'method': METHOD_COLOR,
    'sal': SAL_COLOR,
    'ablation': ABLATION_COLOR,
}
KIND_NAMES = {
    'teacher': 'teacher (one run)',
    'baseline': 'student baseline',
    'method': 'single-stage method',
    'sal': 'SAL method',
    'ablation': 'ablation',
}


def _save(fig, path: str | Path) -> Path:
    return atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=DPI, metadata={'Software': None}))


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout='constrained')


def _rc():
    import matplotlib

    return matplotlib.rc_context(RC)


def _empty(fig, text: str) -> None:
    ax = fig.add_subplot()
    ax.axis('off')
    ax.text(0.5, 0.5, text, ha='center', va='center', fontsize=11, transform=ax.transAxes)


def map_per_row(
    groups: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    metric: str = 'mAP',
    split: str = 'test',
    confidence_label: str = '95%',
) -> Path:
    """``groups``: ``[{'title', 'rows': [{'label', 'kind', 'mean', 'ci', 'points'}], 'baseline': mean}]``;
    ``kind`` in teacher, baseline, method, sal, ablation; ``ci`` (lo, hi) or None; ``points``
    the per-seed values."""
    from matplotlib.patches import Patch

    with _rc():
        widest = max((len(g['rows']) for g in groups), default=1)
        fig = _figure(max(7.5, 0.75 * widest + 3.8), 3.6 * max(1, len(groups)))
        if not groups:
            _empty(fig, 'no measured rows')
            return _save(fig, path)
        axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
        for ax, group in zip(axes, groups):
            rows = group['rows']
            xs = list(range(len(rows)))
            means = [r['mean'] for r in rows]
            colors = [KIND_COLORS.get(r['kind'], METHOD_COLOR) for r in rows]
            ax.bar(xs, means, color=colors, width=0.65, alpha=0.85, zorder=2)
            for x, r in zip(xs, rows):
                pts = list(r.get('points') or [])
                if len(pts) > 1:  # fixed, evenly spread offsets: no random jitter
                    offsets = [(-0.18 + 0.36 * i / (len(pts) - 1)) for i in range(len(pts))]
                else:
                    offsets = [0.0] * len(pts)
                ax.scatter([x + o for o in offsets], pts, s=14, color='black', zorder=4, linewidths=0)
                if r.get('ci') is not None:
                    lo, hi = r['ci']
                    ax.errorbar(
                        [x],
                        [r['mean']],
                        yerr=[[r['mean'] - lo], [hi - r['mean']]],
                        fmt='none',
                        ecolor='black',
                        elinewidth=1.2,
                        capsize=4,
                        zorder=5,
                    )
            handles = [
                Patch(color=KIND_COLORS[k], label=KIND_NAMES[k])
                for k in KIND_COLORS
                if any(r['kind'] == k for r in rows)
            ]
            if group.get('baseline') is not None:
                handles.append(
                    ax.axhline(
                        group['baseline'],
                        color=BASELINE_COLOR,
                        lw=1.0,
                        ls='--',
                        zorder=3,
                        label='student baseline (mean)',
                    )
                )
            ax.legend(handles=handles, loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
            ax.set_xticks(xs, [f'{r["label"]}\n{r["mean"]:.1f}' for r in rows], rotation=25, ha='right')
            ax.set_ylabel(f'{metric} ({split}, %)')
            ax.set_title(f'{group["title"]}: mean over seeds, points = seeds, whiskers = {confidence_label} CI')
            ax.grid(axis='y', lw=0.4, alpha=0.5, zorder=0)
            top = max(
                [r['mean'] for r in rows]
                + [p for r in rows for p in (r.get('points') or [])]
                + [r['ci'][1] for r in rows if r.get('ci') is not None]
            )
            ax.set_ylim(0, top * 1.12 if top > 0 else 1)
        return _save(fig, path)


def paired_differences(
    groups: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    metric: str = 'mAP',
    split: str = 'test',
    confidence_label: str = '95%',
) -> Path:
    """Forest plot. ``groups``: ``[{'title', 'items': [{'label', 'reference', 'mean', 'ci', 'kind'}]}]``:
    one line per comparison ``label`` minus ``reference`` (paired by seed)."""
    with _rc():
        sizes = [max(1, len(g['items'])) for g in groups] or [1]
        fig = _figure(7.5, 0.9 + 0.38 * sum(sizes) + 0.6 * len(sizes))
        if not any(g['items'] for g in groups):
            _empty(fig, 'no paired comparison')
            return _save(fig, path)
        axes = fig.subplots(len(groups), 1, squeeze=False, height_ratios=sizes)[:, 0]
        for ax, group in zip(axes, groups):
            items = group['items']
            ys = list(range(len(items)))[::-1]
            for y, it in zip(ys, items):
                color = ABLATION_COLOR if it.get('kind') == 'ablation' else METHOD_COLOR
                marker = 'D' if it.get('kind') == 'ablation' else 'o'
                if it.get('ci') is not None:
                    lo, hi = it['ci']
                    ax.hlines(y, lo, hi, color=color, lw=2.0)
                ax.plot([it['mean']], [y], marker=marker, color=color, ms=6, ls='none')
            ax.axvline(0.0, color='black', lw=0.9)
            ax.set_yticks(ys, [f'{it["label"]} − {it["reference"]}' for it in items])
            ax.set_ylim(-0.7, len(items) - 0.3)
            ax.set_xlabel(f'paired {metric} difference ({split}, points; bars = {confidence_label} CI)')
            ax.set_title(group['title'])
            ax.grid(axis='x', lw=0.4, alpha=0.5)
            spans = [abs(v) for it in items for v in ([it['mean']] + list(it['ci'] or []))]
            lim = max(spans + [0.5]) * 1.15
            ax.set_xlim(-lim, lim)
        return _save(fig, path)


def training_loss(curves: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """``curves``: ``[{'label', 'iters', 'loss', 'det_loss', 'boundaries': [iter, ...]}]`` (means over
    seeds; SAL stages end to end; a boundary is drawn as a dotted vertical line)."""
    from matplotlib.ticker import FuncFormatter

    with _rc():
        drawn = [c for c in curves if c['iters']]
        fig = _figure(11.0, 4.2 + 0.2 * math.ceil(len(drawn) / 2))
        if not drawn:
            _empty(fig, 'no training loss logged')
            return _save(fig, path)
        ax_total, ax_det = fig.subplots(1, 2, sharex=True)
        for i, c in enumerate(drawn):
            color = LINE_COLORS[i % len(LINE_COLORS)]
            total = [v if v > 0 else math.nan for v in c['loss']]
            det = [v if v > 0 else math.nan for v in c['det_loss']]
            ax_total.plot(c['iters'], total, lw=1.0, color=color, label=c['label'])
            ax_det.plot(c['iters'], det, lw=1.0, color=color)
            for b in c.get('boundaries') or []:
                for ax in (ax_total, ax_det):
                    ax.axvline(b, color=color, lw=0.8, ls=':')
        plain = FuncFormatter(lambda v, _: f'{v:g}')
        for ax, title in ((ax_total, 'total loss (detection + distillation)'), (ax_det, 'detection loss only')):
            ax.set_yscale('log')
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.set_xlabel('iteration (SAL stages end to end; dotted: teacher switch)')
            ax.set_title(title)
            ax.grid(lw=0.4, alpha=0.5, which='both')
        ax_total.set_ylabel('training loss, mean over seeds')
        fig.legend(*ax_total.get_legend_handles_labels(), loc='outside lower center', ncol=2)
        return _save(fig, path)


def me_area_ratio(pairs: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """``pairs``: ``[{'pair', 'ratios': [r, ...], 'threshold': T, 'score_thr', 'counts': {seed: {op: n}}}]``."""
    from matplotlib.ticker import MaxNLocator

    with _rc():
        shown = [p for p in pairs if p['ratios']]
        lines = max([len(p['counts']) for p in shown] + [0])
        fig = _figure(7.0, (3.0 + 0.18 * lines) * max(1, len(shown)))
        if not shown:
            _empty(fig, 'no ME area ratios (data/me/<pair>/boxes/area_ratios.json)')
            return _save(fig, path)
        axes = fig.subplots(len(shown), 1, squeeze=False)[:, 0]
        for ax, p in zip(axes, shown):
            ratios = p['ratios']
            top = max(max(ratios), p['threshold'] or 0.0, 1e-6)
            ax.hist(ratios, bins=40, range=(0.0, top * 1.02), color=METHOD_COLOR)
            if p.get('threshold') is not None:
                ax.axvline(p['threshold'], color=SAL_COLOR, lw=1.5, label=f'T = {p["threshold"]:g}')
                ax.legend()
            counts = '\n'.join(
                f'seed {s}: {c.get("noise", 0)} noise / {c.get("crop", 0)} crop / {c.get("none", 0)} none'
                for s, c in sorted(p['counts'].items())
            )
            title = f'{p["pair"]}: r(I) of {len(ratios)} training images'
            if p.get('score_thr') is not None:
                title += f' (teacher boxes with score ≥ {p["score_thr"]:g})'
            ax.set_title(title + ('\n' + counts if counts else ''), fontsize=9)
            ax.set_xlabel('r(I) = summed teacher box area / image area')
            ax.set_ylabel('training images')
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        return _save(fig, path)
