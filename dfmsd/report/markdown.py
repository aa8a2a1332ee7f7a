"""results.md: the main and ablation tables, the verdicts, the distilled strides and the ME
decisions, from the table model (:mod:`dfmsd.report.tables`)."""

from __future__ import annotations

from dfmsd.core.kinds import ROLES
from dfmsd.report.config import MethodSpec, ReportConfig
from dfmsd.report.loading import LOG_WINDOW
from dfmsd.report.metrics import PAPER_COLUMNS
from dfmsd.report.stats import confidence_label, paired
from dfmsd.report.tables import TEACHER_ROWS, Group, me_placement_sets

DASH = '—'


# ---------------------------------------------------------------- module columns (ablation tables)
def sal_cell(m: MethodSpec) -> str:
    return 'yes' if m.sal else 'no'


def me_cell(m: MethodSpec) -> str:
    """Which training gets ME views: ``all`` (me_methods), ``stage 2`` / ``stages 1, 2`` (SAL), ``-``."""
    if m.kind.me_views:
        return 'all'
    if m.sal and m.spec.me_stages:
        stages = sorted(set(m.spec.me_stages))
        return ('stage ' if len(stages) == 1 else 'stages ') + ', '.join(map(str, stages))
    return '-'


def sfa_cell(m: MethodSpec) -> str:
    return 'yes' if 'sfa' in m.spec.losses else 'no'


# ---------------------------------------------------------------- formatting
def _f(x: float | None, digits: int = 1, sign: bool = False) -> str:
    if x is None:
        return DASH
    return f'{x:+.{digits}f}' if sign else f'{x:.{digits}f}'


def fmt_mean_std(s: dict) -> str:
    if not s['n']:
        return DASH
    if s['std'] is None:
        return f'{s["mean"]:.1f}'
    return f'{s["mean"]:.1f} ± {s["std"]:.1f}'


def fmt_ci(ci: tuple[float, float] | None, sign: bool = False) -> str:
    if ci is None:
        return DASH
    return f'[{_f(ci[0], 2, sign)}, {_f(ci[1], 2, sign)}]'


def fmt_mean_ci(s: dict) -> str:
    if not s['n']:
        return DASH
    return f'{s["mean"]:.2f} {fmt_ci(s["ci"])}' if s['ci'] is not None else f'{s["mean"]:.2f} (one run)'


def fmt_diff(p: dict | None) -> str:
    if p is None or not p['n']:
        return DASH
    if p['ci'] is None:
        return f'{p["mean_diff"]:+.2f} (one seed)'
    return f'{p["mean_diff"]:+.2f} {fmt_ci(p["ci"], sign=True)}'


def fmt_p(p: float | None) -> str:
    if p is None:
        return 'p n/a'
    return 'p < 0.001' if p < 0.001 else f'p = {p:.3f}'


def _cost(x: float | None) -> str:
    return DASH if x is None else f'{x:.0f}'


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ['| ' + ' | '.join(head) + ' |', '|' + '|'.join('---' for _ in head) + '|'] + [
        '| ' + ' | '.join(r) + ' |' for r in rows
    ]


def main_table(group: Group, config: ReportConfig) -> list[str]:
    cl = confidence_label(config.confidence)
    head = (
        ['Row', 'n']
        + list(PAPER_COLUMNS)
        + [f'mAP {cl} CI', f'mAP gain vs baseline ({cl} CI)', 'Iters', 'Images seen', 'Teacher images']
    )
    lines = []
    for r in group.main_rows:
        if not r.n:
            lines.append([r.label, '0'] + ['not measured'] + [DASH] * (len(head) - 3))
            continue
        lines.append(
            [r.label, str(r.n)]
            + [fmt_mean_std(r.stats[m]) for m in PAPER_COLUMNS]
            + [fmt_ci(r.stats['mAP']['ci']), fmt_diff(r.gain) if r.is_method else DASH]
            + [_cost(r.cost[k]) for k in ('iters', 'images_seen', 'teacher_images')]
        )
    return _table(head, lines)


def ablation_tables(group: Group, config: ReportConfig) -> list[str]:
    cl = confidence_label(config.confidence)
    out = []
    for m in config.methods.values():
        ablations = [r for r in group.rows if r.kind == 'ablation' and r.method.ablation_of == m.name]
        if not ablations:
            continue
        full = group.row(m.name)
        head = ['Row', 'SAL', 'ME', 'SFA', 'Iters', 'n', f'mAP ({cl} CI)', f'Δ mAP vs {full.label} ({cl} CI)']
        lines = [
            [
                r.label,
                sal_cell(r.method),
                me_cell(r.method),
                sfa_cell(r.method),
                _cost(r.cost['iters']),
                str(r.n),
                fmt_mean_ci(r.stats['mAP']),
                DASH if r is full else fmt_diff(r.vs_full),
            ]
            for r in [full] + ablations
        ]
        out += ['', f'#### Ablations of {full.label}', ''] + _table(head, lines)
        same_cost = [v for v in group.verdicts if v.get('equal_budget') and v['family'] == m.name]
        if same_cost:  # rows whose budget differs from the full method's, against each other
            head = ['Row', 'Against', 'Iters', f'Δ mAP ({cl} CI)']
            lines = [
                [v['a'].label, v['b'].label, _cost(v['a'].cost['iters']), fmt_diff(v['result'])] for v in same_cost
            ]
            out += ['', f'#### Ablations of {full.label} at equal budget', ''] + _table(head, lines)
    for names in me_placement_sets(config):
        rows = [group.row(n) for n in names]
        ref = next((r for r in rows if r.kind == 'method'), rows[0])
        head = ['Row', 'ME stages', 'n', f'mAP ({cl} CI)', f'Δ mAP vs {ref.label} ({cl} CI)']
        lines = []
        for r in rows:
            diff = (
                DASH
                if r is ref
                else fmt_diff(paired(r.values(config.split), ref.values(config.split), config.confidence))
            )
            lines.append([r.label, me_cell(r.method), str(r.n), fmt_mean_ci(r.stats['mAP']), diff])
        out += ['', f'#### ME stage placement: {ref.label}', ''] + _table(head, lines)
    return out


def teacher_sequence_tables(groups: list[Group], config: ReportConfig) -> list[str]:
    """With several pairs: each SAL method's mAP per teacher pair (weak -> strong), per student."""
    if len(config.pairs) < 2:
        return []
    cl = confidence_label(config.confidence)
    out = []
    for student in config.students:
        for m in config.methods.values():
            if not m.sal:
                continue
            lines = []
            for g in groups:
                if g.student != student:
                    continue
                r = g.row(m.name)
                weak, strong = (g.row(TEACHER_ROWS[role]) for role in ROLES)
                lines.append(
                    [
                        g.pair,
                        _f(weak.stats['mAP']['mean']),
                        _f(strong.stats['mAP']['mean']),
                        str(r.n),
                        fmt_mean_ci(r.stats['mAP']),
                        fmt_diff(r.gain),
                    ]
                )
            head = [
                'Pair (weak → strong)',
                'Weak teacher mAP',
                'Strong teacher mAP',
                'n',
                f'mAP ({cl} CI)',
                f'Gain vs baseline ({cl} CI)',
            ]
            out += ['', f'### Teacher sequence: {m.label} ({student})', ''] + _table(head, lines)
    return out


def verdict_line(v: dict, config: ReportConfig) -> str:
    a, b, p = v['a'], v['b'], v['result']
    head = f'- {a.label} vs {b.label}: '
    if not p['n']:
        return head + 'no common seed: not compared.'
    if p['ci'] is None:
        return (
            head + f'{p["verdict"]} (Δ mAP = {p["mean_diff"]:+.2f} on seed {p["seeds"][0]}; '
            f'{p["mean_a"]:.2f} vs {p["mean_b"]:.2f}).'
        )
    cl = confidence_label(config.confidence)
    adjusted = f', Holm {fmt_p(p["p_holm"])}' if 'p_holm' in p else ''
    changed = p.get('verdict_unadjusted', p['verdict']) != p['verdict']
    verdict = f'**{p["verdict"]}**' + (f' ({p["verdict_unadjusted"]} before the adjustment)' if changed else '')
    return (
        head + f'{verdict}: Δ mAP = {p["mean_diff"]:+.2f}, {cl} CI {fmt_ci(p["ci"], sign=True)}, '
        f'{fmt_p(p["p_value"])}{adjusted}, {p["n"]} paired seeds ({p["mean_a"]:.2f} vs {p["mean_b"]:.2f}).'
    )


def family_lines(family: dict, config: ReportConfig) -> list[str]:
    """A family's heading, its verdicts, and what it can resolve."""
    tested = sum(1 for v in family['verdicts'] if 'p_holm' in v['result'])
    out = [f'#### Against {family["label"]} ({tested} comparison{"s" if tested != 1 else ""} tested, Holm)', '']
    out += [verdict_line(v, config) for v in family['verdicts']]
    res = family['resolution']
    if res:
        cl = confidence_label(config.confidence)
        out += [
            '',
            f'Resolution: the paired differences have a pooled SD of {res["sd"]:.2f} mAP ({res["n"]} seeds, '
            f'{res["m"]} comparisons). At this spread one comparison at {cl} detects a mean difference of '
            f'{res["single"]:.2f} mAP or more; the first step of Holm over {res["m"]} needs '
            f'{res["holm_first"]:.2f}. A true difference of exactly that size is detected about half the time.',
        ]
    return out + ['']


def _strides_lines(groups: list[Group]) -> list[str]:
    by_strides: dict[str, list[str]] = {}
    for g in groups:
        for r in g.rows:
            if not r.is_method:
                continue
            for run in r.runs.values():
                s = run.record.strides
                text = ', '.join(str(x) for x in s) if s else 'not recorded'
                by_strides.setdefault(text, [])
                name = f'{g.key}/{r.name}'
                if name not in by_strides[text]:
                    by_strides[text].append(name)
    if not by_strides:
        return ['No distillation run measured.']
    if len(by_strides) == 1:
        text = next(iter(by_strides))
        return [f'Every distillation run: {text}' + ('.' if text == 'not recorded' else ' (stride in pixels).')]
    return [f'- {text}: {", ".join(names)}' for text, names in by_strides.items()]


def me_lines(me: list[dict], config: ReportConfig) -> list[str]:
    rows = []
    notes = []
    for entry in me:
        for seed, t in sorted(entry['tables'].items()):
            c = t['counts']
            total = sum(int(v) for v in c.values())
            rows.append(
                [
                    entry['pair'],
                    str(seed),
                    _g(t['threshold']),
                    str(c.get('noise', 0)),
                    str(c.get('crop', 0)),
                    str(c.get('none', 0)),
                    str(total),
                ]
            )
            if config.me_threshold is not None and t['threshold'] != config.me_threshold:
                notes.append(
                    f'- {entry["pair"]} seed {seed}: the table was made with T = {_g(t["threshold"])}, '
                    f'params.yaml now says T = {config.me_threshold:g} (stale table?).'
                )
    if not rows:
        return ['No ME decision table found.']
    lines = [
        f'Per training image: r(I) < T: Gaussian noise (or nothing, by a seeded draw); r(I) ≥ T: edge crop. '
        f'T in params.yaml: {_g(config.me_threshold)}.',
        '',
    ]
    return (
        lines + _table(['Pair', 'Seed', 'T', 'noise', 'crop', 'none', 'images'], rows) + ([''] + notes if notes else [])
    )


def _g(x) -> str:
    return DASH if x is None else f'{x:g}'


# ---------------------------------------------------------------- results.md
def start_lines(starts: list[tuple[str, list[dict]]]) -> list[str]:
    """Each distilled row's loss terms at the first logged iteration of each stage."""
    rows = []
    for label, stages in starts:
        for n, stage in enumerate(stages, start=1):
            terms = ', '.join(f'{k} {x:.2f}x' for k, x in stage['ratios'].items())
            rows.append([label, str(n) if len(stages) > 1 else DASH, str(stage['iter']), terms])
    return _table(['Row', 'SAL stage', 'Iter', 'Distillation terms / detection loss'], rows)


def results_markdown(
    groups: list[Group],
    config: ReportConfig,
    me: list[dict],
    notes: list[str],
    starts: list[tuple[str, list[dict]]] | None = None,
) -> str:
    cl = confidence_label(config.confidence)
    seeds = ', '.join(map(str, config.seeds))
    tests = sum(1 for g in groups for v in g.verdicts if v['result']['ci'] is not None)
    source = (
        f'preset **{config.preset}** (`presets/{config.preset}.yaml` over params.yaml)'
        if config.preset
        else '`params.yaml` (the embedded default)'
    )
    md = [
        '# Results',
        '',
        *([f'> {config.note}', ''] if config.note else []),
        f'Params: {source}.',
        '',
        f'Split reported: **{config.split}** (COCO box metrics, percent). The val split is for tuning only; '
        f'the tables report {config.split}.'
        if config.split == 'test'
        else f'Split reported: **{config.split}** (COCO box metrics, percent). Note: val is the tuning split; '
        f'these numbers are not held-out test results.',
        '',
        f'Seeds: {len(config.seeds)} ({seeds}); each sets the student initialisation, data order and random '
        f'draws, and every method runs with every seed. Student rows: mean ± std over seeds (ddof = 1); '
        f'{cl} CI: t interval of the mean. Gain and Δ: mean paired difference over the seeds both rows have '
        f'(same seed), with its {cl} t interval. Teachers are single runs (no CI). Cost: means over seeds of '
        f"the row's final run record: Iters = the schedule's final iteration (the row's budget; SAL: both "
        f'stages), Images seen = original training images, Teacher images = images through the teacher '
        f'(originals + ME views). Ablations (rows with `ablation_of`) are in the ablation tables.',
    ]
    for g in groups:
        md += ['', f'## {g.student} / {g.pair}', '', '### Main table', ''] + main_table(g, config)
        md += ablation_tables(g, config)
    md += teacher_sequence_tables(groups, config)
    md += [
        '',
        '## Verdicts',
        '',
        f'Each comparison is a paired t-test of the mAP difference ({config.split}) over the seeds both rows '
        f'have; {len(config.seeds)} seed{"s" if len(config.seeds) != 1 else ""} per row, {tests} test'
        f'{"s" if tests != 1 else ""} below. The verdicts are **Holm-adjusted** within each family (against '
        f'the baseline; against each SAL method, with its ablations and their equal-budget comparisons): '
        f'**better** or **worse** if the Holm p '
        f'is below {1 - config.confidence:.2g} (familywise), else *{"not distinguishable at " + cl}*. The raw p '
        f'and the {cl} CI beside each are per comparison, not adjusted.'
        + (
            ' A comparison with fewer than two common seeds is not tested: its difference is one run pair '
            'and establishes nothing.'
            if any(v['result']['ci'] is None for g in groups for v in g.verdicts)
            else ''
        ),
    ]
    for g in groups:
        md += ['', f'### {g.student} / {g.pair}', '']
        md += [line for family in g.families.values() for line in family_lines(family, config)] or [
            'No comparison: the baseline or every method is unmeasured.'
        ]
    md += ['', '## Distilled FPN strides', ''] + _strides_lines(groups)
    md += ['', '## Masking enhancement decisions', ''] + me_lines(me, config)
    if starts:
        md += [
            '',
            '## Loss terms at the start of each stage',
            '',
            'Each distillation term (weighted, summed over the distilled levels) over the detection loss at '
            'the first logged iteration of each stage, mean over the seeds: what the weights calibrated on val '
            'at the initialisation (benchmarks/loss_scale.py) gave in training. SAL stage 1 learns from the '
            f'weak teacher. A logged loss is the mean of the last {LOG_WINDOW} iterations, so SAL stage 2 is '
            'read at its first logged iteration that averages its own iterations only.',
            '',
        ] + start_lines(starts)
    if notes:
        md += ['', '## Notes', ''] + [n if n.startswith('- ') else f'- {n}' for n in notes]
    return '\n'.join(md) + '\n'
