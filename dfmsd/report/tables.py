"""The report: result tables, verdicts, CSVs, DVC plot data and figures, from measured files only.

Entry point: :func:`write_report` (what ``stages/report.py`` calls). Everything takes plain
dicts and paths, so it runs without DVC, and nothing here imports torch or mmdet.

Inputs
------
* ``metrics/**/*.json``: one file per evaluated model. Each file says what it is (``kind``,
  ``student``, ``pair``, ``method``, ``group``, ``seed``, ``role``); the directory layout is not
  used. ``kind``: ``teacher``, ``baseline``, ``distill``, ``distill_me``, ``sal2`` (the final
  stage of a SAL row). Files of a student, pair, method or seed that params.yaml no longer
  names are **ignored with a warning** (:class:`ReportWarning`, also listed under "Notes" in
  results.md): DVC leaves the metrics of a removed grid point behind, and the tables only ever
  show the rows params.yaml declares. A file that contradicts params.yaml (a method in another
  group, a kind that does not match the method's group), a duplicate run, or a file that is
  malformed is a :class:`~dfmsd.core.errors.DfmsdError`.
* ``logs/``: training-loss CSVs at the paths dvc.yaml gives them
  (``students/<student>/seed<k>/baseline.csv``, ``students/<student>/seed<k>/<pair>/<method>.csv``
  and, for SAL rows, ``<method>.stage1.csv``); see :func:`log_paths`.
* ``data/me/<pair>/boxes/area_ratios.json`` and ``data/me/<pair>/seed<k>.json`` (ME decisions).

Rows and groups
---------------
A *group* is one (student, pair). Its rows: the pair's two teachers (single runs), the
student's baseline, then every method of params.yaml in params order (``methods``,
``me_methods``, ``sal_methods``); rows with ``ablation_of`` set are ablations, shown in the
ablation table of the method they name rather than in the main table. Every student row is
compared with the baseline, paired by seed (:func:`dfmsd.report.stats.paired`).
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfmsd.core.errors import DfmsdError, ParamsError
from dfmsd.core.io import atomic_directory, read_json, write_json, write_text
from dfmsd.report import figures
from dfmsd.report.metrics import PAPER_COLUMNS, REPORTED_METRICS
from dfmsd.report.stats import confidence_label, paired, summarize

ROLES = ('weak', 'strong')
BASELINE = 'baseline'
TEACHER_ROWS = {'weak': 'teacher_weak', 'strong': 'teacher_strong'}
#: the metrics ``kind`` that each method group's final run has
KIND_OF_GROUP = {'methods': 'distill', 'me_methods': 'distill_me', 'sal_methods': 'sal2'}
STUDENT_KINDS = ('baseline', *KIND_OF_GROUP.values())
KINDS = ('teacher', *STUDENT_KINDS, 'sal1')
COST_KEYS = ('iters', 'images_seen', 'views_seen', 'teacher_images')
RUN_KEYS = ('start_iter', 'batch_size', 'uses_me', 'config_digest', 'threads')
SPLITS = ('val', 'test')
DASH = '—'


class ReportWarning(UserWarning):
    """A measured file the report leaves out (it names something params.yaml does not have)."""


# ---------------------------------------------------------------- params
@dataclass(frozen=True)
class MethodSpec:
    name: str
    group: str  # methods | me_methods | sal_methods
    spec: Any  # dfmsd.core.params.Method or SALMethod

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def ablation_of(self) -> str | None:
        return self.spec.ablation_of


@dataclass(frozen=True)
class ReportConfig:
    confidence: float
    split: str
    seeds: tuple[int, ...]
    pairs: tuple[str, ...]
    students: tuple[str, ...]
    methods: dict[str, MethodSpec]  # params order: methods, me_methods, sal_methods
    me_threshold: float | None
    preset: str | None = None
    note: str | None = None


def report_config(params: Mapping[str, Any]) -> ReportConfig:
    """Validate the report stage's params (``report``, ``seeds``, ``pairs``, ``students``, the three
    method groups and ``me.threshold``) into a :class:`ReportConfig`."""
    from dfmsd.core.params import ME, METHOD_GROUPS, Method, Report, SALMethod, lookup, section

    report = section(Report, params.get('report') or {}, 'report')
    seeds = lookup(params, 'seeds')
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ParamsError(f'params.yaml: seeds: a non-empty list of distinct non-negative integers, got {seeds!r}')
    names = {}
    for key in ('pairs', 'students'):
        value = lookup(params, key)
        if not isinstance(value, dict) or not value:
            raise ParamsError(f'params.yaml: {key}: expected a non-empty mapping')
        names[key] = tuple(value)
    methods: dict[str, MethodSpec] = {}
    for group in METHOD_GROUPS:
        entries = params.get(group) or {}
        if not isinstance(entries, dict):
            raise ParamsError(f'params.yaml: {group}: expected a mapping of method names')
        for name, raw in entries.items():
            if name in methods:
                raise ParamsError(
                    f'params.yaml: {group}.{name}: method names must be unique across '
                    f'{", ".join(METHOD_GROUPS)} (also in {methods[name].group})'
                )
            model = SALMethod if group == 'sal_methods' else Method
            methods[name] = MethodSpec(name, group, section(model, raw, f'{group}.{name}'))
    for m in methods.values():
        if m.ablation_of is not None and m.ablation_of not in methods:
            raise ParamsError(f'params.yaml: {m.group}.{m.name}.ablation_of: no method {m.ablation_of!r}')
    me = params.get('me')
    threshold = section(ME, me, 'me').threshold if isinstance(me, dict) and 'threshold' in me else None
    return ReportConfig(
        confidence=report.confidence,
        split=report.split,
        seeds=tuple(seeds),
        pairs=names['pairs'],
        students=names['students'],
        methods=methods,
        me_threshold=threshold,
        preset=report.preset,
        note=report.note,
    )


# ---------------------------------------------------------------- measured runs
@dataclass
class Run:
    """One metrics file: its record (identity, cost, ``val``/``test`` metrics) and where it came from."""

    record: dict[str, Any]
    source: str

    @property
    def kind(self) -> str:
        return self.record['kind']

    @property
    def seed(self) -> int | None:
        return self.record.get('seed')

    def metric(self, split: str, name: str) -> float:
        return float(self.record[split][name])


def _need(record: dict, keys: tuple[str, ...], source: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise DfmsdError(f'{source}: a {record.get("kind")} metrics file needs {", ".join(missing)}')


def _check_split(record: dict, split: str, source: str, required: bool) -> None:
    values = record.get(split)
    if values is None and not required:
        return
    if not isinstance(values, dict):
        raise DfmsdError(
            f"{source}: no '{split}' metrics (the report's split)"
            if required
            else f"{source}: '{split}' must be a mapping of metrics"
        )
    missing = [m for m in REPORTED_METRICS if m not in values]
    if missing:
        raise DfmsdError(f"{source}: '{split}' lacks {', '.join(missing)}")
    bad = [m for m in REPORTED_METRICS if isinstance(values[m], bool) or not isinstance(values[m], (int, float))]
    if bad:
        raise DfmsdError(f"{source}: '{split}' has non-numeric {', '.join(bad)}")


def _ignore(notes: list[str], message: str) -> None:
    warnings.warn(message, ReportWarning, stacklevel=3)
    notes.append(message)


def run_key(record: dict) -> tuple:
    """What a run is, independent of its file: (kind-ish, names..., seed)."""
    kind = record['kind']
    if kind == 'teacher':
        return ('teacher', record['pair'], record['role'])
    if kind == 'baseline':
        return ('baseline', record['student'], record['seed'])
    return ('method', record['student'], record['pair'], record['method'], record['seed'])


def load_runs(metrics_dir: str | Path, config: ReportConfig) -> tuple[dict[tuple, Run], list[str]]:
    """Every metrics file under ``metrics_dir`` that belongs to params' grid, by :func:`run_key`,
    and the notes about files left out (each also raised as a :class:`ReportWarning`)."""
    metrics_dir = Path(metrics_dir)
    if not metrics_dir.is_dir():
        raise DfmsdError(f'{metrics_dir}: no metrics directory')
    runs: dict[tuple, Run] = {}
    notes: list[str] = []
    paths = sorted(metrics_dir.rglob('*.json'), key=lambda p: p.relative_to(metrics_dir).as_posix())
    for path in paths:
        source = (metrics_dir / path.relative_to(metrics_dir)).as_posix()
        try:
            record = read_json(path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DfmsdError(f'{source}: not a readable JSON metrics file ({err})') from None
        if not isinstance(record, dict):
            raise DfmsdError(f'{source}: expected a JSON object')
        kind = record.get('kind')
        if kind not in KINDS:  # e.g. a file of an older layout that DVC left behind
            _ignore(notes, f'{source}: not a run record (kind {kind!r}, expected one of {", ".join(KINDS)}); ignored')
            continue
        if kind == 'sal1':
            _ignore(notes, f'{source}: SAL stage 1 metrics are not a row (the row is its sal2 run); ignored')
            continue
        if kind == 'teacher':
            _need(record, ('pair', 'role'), source)
            if record['role'] not in ROLES:
                raise DfmsdError(f'{source}: role {record["role"]!r} is not weak or strong')
            if record['pair'] not in config.pairs:
                _ignore(notes, f'{source}: pair {record["pair"]!r} is not in params.yaml pairs; ignored')
                continue
        else:
            _need(
                record,
                ('student', 'seed') if kind == 'baseline' else ('student', 'pair', 'method', 'group', 'seed'),
                source,
            )
            if not isinstance(record['seed'], int) or isinstance(record['seed'], bool):
                raise DfmsdError(f'{source}: seed must be an integer, got {record["seed"]!r}')
            if record['student'] not in config.students:
                _ignore(notes, f'{source}: student {record["student"]!r} is not in params.yaml students; ignored')
                continue
            if record['seed'] not in config.seeds:
                _ignore(notes, f'{source}: seed {record["seed"]} is not in params.yaml seeds; ignored')
                continue
            if kind != 'baseline':
                if record['pair'] not in config.pairs:
                    _ignore(notes, f'{source}: pair {record["pair"]!r} is not in params.yaml pairs; ignored')
                    continue
                method = config.methods.get(record['method'])
                if method is None:
                    _ignore(
                        notes,
                        f'{source}: method {record["method"]!r} is in no method group of '
                        f'params.yaml (methods, me_methods, sal_methods); ignored',
                    )
                    continue
                if record['group'] != method.group:
                    raise DfmsdError(
                        f'{source}: method {method.name!r} is in {method.group} in params.yaml, '
                        f'but this file says group {record["group"]!r}: a stale metrics file?'
                    )
                if kind != KIND_OF_GROUP[method.group]:
                    raise DfmsdError(
                        f'{source}: kind {kind!r} does not match {method.group} '
                        f'(expected {KIND_OF_GROUP[method.group]!r})'
                    )
        _check_split(record, config.split, source, required=True)
        for split in SPLITS:
            _check_split(record, split, source, required=False)
        key = run_key(record)
        if key in runs:
            raise DfmsdError(f'{source} and {runs[key].source} describe the same run {key}')
        runs[key] = Run(record, source)
    if not runs:
        raise DfmsdError(f'{metrics_dir}: no metrics file of the grid params.yaml describes')
    return runs, notes


# ---------------------------------------------------------------- rows and groups
@dataclass
class Row:
    name: str
    label: str
    kind: str  # teacher | baseline | method | ablation
    method: MethodSpec | None = None
    runs: dict[Any, Run] = field(default_factory=dict)  # seed -> run (teachers: None -> run)
    stats: dict[str, dict] = field(default_factory=dict)  # metric -> summarize()
    cost: dict[str, float | None] = field(default_factory=dict)
    gain: dict | None = None  # paired() against the baseline
    vs_full: dict | None = None  # ablations: paired() against the full method

    @property
    def is_student(self) -> bool:
        return self.kind != 'teacher'

    @property
    def is_method(self) -> bool:
        return self.kind in ('method', 'ablation')

    @property
    def n(self) -> int:
        return len(self.runs)

    def values(self, split: str, metric: str = 'mAP') -> dict[Any, float]:
        return {seed: run.metric(split, metric) for seed, run in sorted(self.runs.items(), key=_seed_order)}

    @property
    def fig_kind(self) -> str:
        if self.kind == 'method' and self.method.group == 'sal_methods':
            return 'sal'
        return self.kind


def _seed_order(item):
    return -1 if item[0] is None else item[0]


@dataclass
class Group:
    student: str
    pair: str
    rows: list[Row]
    verdicts: list[dict] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f'{self.student}/{self.pair}'

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    @property
    def baseline(self) -> Row:
        return self.row(BASELINE)

    @property
    def main_rows(self) -> list[Row]:
        return [r for r in self.rows if r.kind != 'ablation']


def _row_stats(row: Row, config: ReportConfig) -> None:
    row.stats = {m: summarize(row.values(config.split, m).values(), config.confidence) for m in REPORTED_METRICS}
    for key in COST_KEYS:
        vals = [float(r.record[key]) for r in row.runs.values() if isinstance(r.record.get(key), (int, float))]
        row.cost[key] = sum(vals) / len(vals) if vals else None


def build_groups(runs: Mapping[tuple, Run], config: ReportConfig) -> list[Group]:
    """One :class:`Group` per (student, pair), rows in params order, with statistics and verdicts."""
    groups = []
    for student in config.students:
        for pair in config.pairs:
            rows = []
            for role in ROLES:
                row = Row(TEACHER_ROWS[role], f'Teacher ({role})', 'teacher')
                run = runs.get(('teacher', pair, role))
                if run is not None:
                    row.runs[None] = run
                rows.append(row)
            base = Row(BASELINE, 'Student baseline', 'baseline')
            base.runs = {s: runs[('baseline', student, s)] for s in config.seeds if ('baseline', student, s) in runs}
            rows.append(base)
            for m in config.methods.values():
                row = Row(m.name, m.label, 'ablation' if m.ablation_of else 'method', method=m)
                row.runs = {s: runs[k] for s in config.seeds if (k := ('method', student, pair, m.name, s)) in runs}
                rows.append(row)
            group = Group(student, pair, rows)
            for row in rows:
                _row_stats(row, config)
            base_values = base.values(config.split)
            for row in rows:
                if row.is_method:
                    row.gain = paired(row.values(config.split), base_values, config.confidence)
                    if row.kind == 'ablation':
                        full = group.row(row.method.ablation_of)
                        row.vs_full = paired(row.values(config.split), full.values(config.split), config.confidence)
            group.verdicts = _verdicts(group, config)
            groups.append(group)
    return groups


def _verdicts(group: Group, config: ReportConfig) -> list[dict]:
    """Every student row against the baseline; every SAL method against every other main method
    of the group; every ablation against its full method."""
    out = []
    methods = [r for r in group.rows if r.is_method and r.n]
    base = group.baseline
    if base.n:
        out += [{'a': r, 'b': base, 'result': r.gain} for r in methods]
    mains = [r for r in methods if r.kind == 'method']
    done = set()
    for r in mains:
        if r.method.group != 'sal_methods':
            continue
        for other in mains:
            if other is r or (other.name, r.name) in done:
                continue
            done.add((r.name, other.name))
            out.append(
                {
                    'a': r,
                    'b': other,
                    'result': paired(r.values(config.split), other.values(config.split), config.confidence),
                }
            )
    for r in methods:
        if r.kind == 'ablation' and group.row(r.method.ablation_of).n:
            out.append({'a': r, 'b': group.row(r.method.ablation_of), 'result': r.vs_full})
    return out


# ---------------------------------------------------------------- module columns (ablation tables)
def sal_cell(m: MethodSpec) -> str:
    return 'yes' if m.group == 'sal_methods' else 'no'


def me_cell(m: MethodSpec) -> str:
    """Which training gets ME views: ``all`` (me_methods), ``stage 2`` / ``stages 1, 2`` (SAL), ``-``."""
    if m.group == 'me_methods':
        return 'all'
    if m.group == 'sal_methods' and m.spec.me_stages:
        stages = sorted(set(m.spec.me_stages))
        return ('stage ' if len(stages) == 1 else 'stages ') + ', '.join(map(str, stages))
    return '-'


def sfa_cell(m: MethodSpec) -> str:
    return 'yes' if 'sfa' in m.spec.losses else 'no'


def me_placement_sets(config: ReportConfig) -> list[list[str]]:
    """SAL methods that differ only in ``me_stages`` (and in ``aug_loss_weight`` where a variant
    has no ME stage, which forces it to 0): the paper's ME stage placement comparisons."""
    sal = [m for m in config.methods.values() if m.group == 'sal_methods']
    by_base: dict[str, list[MethodSpec]] = defaultdict(list)
    for m in sal:
        base = m.spec.model_dump(mode='json', exclude={'label', 'ablation_of', 'me_stages', 'aug_loss_weight'})
        by_base[json.dumps(base, sort_keys=True)].append(m)
    out = []
    for members in by_base.values():
        weights = list(dict.fromkeys(m.spec.aug_loss_weight for m in members if m.spec.me_stages))
        for w in weights:
            chosen = [m for m in members if not m.spec.me_stages or m.spec.aug_loss_weight == w]
            if len({tuple(sorted(set(m.spec.me_stages))) for m in chosen}) >= 2:
                out.append([m.name for m in chosen])
    return out


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
        head = ['Row', 'SAL', 'ME', 'SFA', 'n', f'mAP ({cl} CI)', f'Δ mAP vs {full.label} ({cl} CI)']
        lines = [
            [
                r.label,
                sal_cell(r.method),
                me_cell(r.method),
                sfa_cell(r.method),
                str(r.n),
                fmt_mean_ci(r.stats['mAP']),
                DASH if r is full else fmt_diff(r.vs_full),
            ]
            for r in [full] + ablations
        ]
        out += ['', f'#### Ablations of {full.label}', ''] + _table(head, lines)
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
            if m.group != 'sal_methods':
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
    return (
        head + f'**{p["verdict"]}**: Δ mAP = {p["mean_diff"]:+.2f}, {cl} CI {fmt_ci(p["ci"], sign=True)}, '
        f'{fmt_p(p["p_value"])}, {p["n"]} paired seeds ({p["mean_a"]:.2f} vs {p["mean_b"]:.2f}).'
    )


def _strides_lines(groups: list[Group]) -> list[str]:
    by_strides: dict[str, list[str]] = {}
    for g in groups:
        for r in g.rows:
            if not r.is_method:
                continue
            for run in r.runs.values():
                s = run.record.get('strides')
                text = ', '.join(str(x) for x in s) if isinstance(s, list) and s else 'not recorded'
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


def _missing_notes(groups: list[Group], config: ReportConfig) -> list[str]:
    notes: list[str] = []
    for g in groups:
        for r in g.rows:
            if r.kind == 'teacher':
                if not r.n:
                    notes.append(f'{g.pair}: {r.label} not measured.')
                continue
            missing = [s for s in config.seeds if s not in r.runs]
            if missing:
                where = f'{g.student}' if r.kind == 'baseline' else g.key
                notes.append(
                    f'{where}: {r.label} ({r.name}) has no metrics for seed(s) {", ".join(map(str, missing))}.'
                )
    return list(dict.fromkeys(notes))


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


def _read(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DfmsdError(f'{path}: not a readable JSON file ({err})') from None


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


# ---------------------------------------------------------------- training loss
def log_paths(logs_dir: str | Path, record: Mapping[str, Any]) -> list[Path]:
    """The loss logs of a run in stage order, at the paths dvc.yaml writes them (SAL: stage 1 first)."""
    logs_dir = Path(logs_dir)
    kind = record['kind']
    if kind == 'teacher':
        return [logs_dir / 'teachers' / record['pair'] / f'{record["role"]}.csv']
    base = logs_dir / 'students' / record['student'] / f'seed{record["seed"]}'
    if kind == 'baseline':
        return [base / 'baseline.csv']
    stem = base / record['pair'] / record['method']
    final = stem.with_name(f'{record["method"]}.csv')
    if kind == 'sal2':
        return [stem.with_name(f'{record["method"]}.stage1.csv'), final]
    return [final]


def read_loss_log(path: str | Path) -> list[tuple[int, float, float]]:
    """``[(iter, loss, detection loss)]``; the detection loss is ``loss`` minus the ``loss_distill_*``
    terms. A header-only log (a downloaded teacher) gives ``[]``."""
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
            distill = sum(
                float(v) for k, v in row.items() if k and k.startswith('loss_distill_') and v not in ('', None)
            )
            out.append((int(float(row['iter'])), total, total - distill))
        except (TypeError, ValueError):
            raise DfmsdError(f'{path}:{line}: not a number in {row}') from None
    return out


def loss_curve(row: Row, logs_dir: str | Path) -> tuple[dict | None, list[str]]:
    """The row's loss, mean over its seeds at each logged iteration (SAL stages end to end)."""
    by_iter: dict[int, list[tuple[float, float]]] = defaultdict(list)
    notes, boundaries = [], set()
    for _seed, run in sorted(row.runs.items(), key=_seed_order):
        points: dict[int, tuple[float, float]] = {}
        paths = log_paths(logs_dir, run.record)
        for i, path in enumerate(paths):
            if not path.is_file():
                notes.append(f'{path}: loss log not found (left out of the loss plot).')
                continue
            for it, total, det in read_loss_log(path):
                points[it] = (total, det)
            if i < len(paths) - 1 and isinstance(run.record.get('start_iter'), int):
                boundaries.add(run.record['start_iter'])
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


# ---------------------------------------------------------------- machine-readable outputs
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


def row_id(group: Group, row: Row, several: bool) -> str:
    """The row's name in plots/*.csv: its name, prefixed by what it belongs to when there are
    several (student, pair) groups (teachers by pair, the baseline by student)."""
    if not several:
        return row.name
    if row.kind == 'teacher':
        return f'{group.pair}/{row.name}'
    if row.kind == 'baseline':
        return f'{group.student}/{row.name}'
    return f'{group.key}/{row.name}'


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
            for seed, run in sorted(r.runs.items(), key=_seed_order):
                if run.source in seen:
                    continue
                seen.add(run.source)
                rec = run.record
                strides = rec.get('strides')
                line = [
                    rec.get('student', ''),
                    rec.get('pair', ''),
                    r.name,
                    r.label,
                    rec['kind'],
                    r.method.group if r.method else '',
                    seed,
                    run.source,
                ]
                line += [
                    rec[split][m] if isinstance(rec.get(split), dict) else None
                    for split in SPLITS
                    for m in REPORTED_METRICS
                ]
                line += [rec.get(k) for k in (*COST_KEYS, *RUN_KEYS)]
                line.append(' '.join(map(str, strides)) if isinstance(strides, list) else '')
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


# ---------------------------------------------------------------- results.md
def results_markdown(groups: list[Group], config: ReportConfig, me: list[dict], notes: list[str]) -> str:
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
        f'Each verdict reads the {cl} CI of a paired mAP difference ({config.split}): **better** if it lies '
        f'entirely above 0, **worse** if entirely below 0, else *{"not distinguishable at " + cl}*. '
        f'{len(config.seeds)} seed{"s" if len(config.seeds) != 1 else ""} per row; {tests} paired t-test'
        f'{"s" if tests != 1 else ""} below, each at {cl}, with **no correction for multiple comparisons**.'
        + (
            ' A comparison with fewer than two common seeds is not tested: its difference is one run pair '
            'and establishes nothing.'
            if any(v['result']['ci'] is None for g in groups for v in g.verdicts)
            else ''
        ),
    ]
    for g in groups:
        md += ['', f'### {g.student} / {g.pair}', '']
        md += [verdict_line(v, config) for v in g.verdicts] or [
            'No comparison: the baseline or every method is unmeasured.'
        ]
    md += ['', '## Distilled FPN strides', ''] + _strides_lines(groups)
    md += ['', '## Masking enhancement decisions', ''] + me_lines(me, config)
    if notes:
        md += ['', '## Notes', ''] + [n if n.startswith('- ') else f'- {n}' for n in notes]
    return '\n'.join(md) + '\n'


# ---------------------------------------------------------------- entry point
def build_report(
    params: Mapping[str, Any], *, metrics_dir: str | Path, logs_dir: str | Path, me_dir: str | Path
) -> dict[str, Any]:
    """Everything the report writes, in memory: ``{'config', 'groups', 'me', 'notes', 'curves'}``."""
    config = report_config(params)
    runs, notes = load_runs(metrics_dir, config)
    groups = build_groups(runs, config)
    notes += _missing_notes(groups, config)
    several = len(groups) > 1
    curves, seen = [], set()
    for g in groups:
        for r in g.rows:
            rid = row_id(g, r, several)
            if not r.is_student or rid in seen or not r.n:
                continue
            seen.add(rid)
            curve, log_notes = loss_curve(r, logs_dir)
            notes += log_notes
            if curve is not None:
                curves.append((rid, curve, r.label if not several else f'{rid.rsplit("/", 1)[0]}: {r.label}'))
    return {'config': config, 'groups': groups, 'me': load_me(me_dir, config), 'notes': notes, 'curves': curves}


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
        write_text(out / 'results.md', results_markdown(groups, config, report['me'], report['notes'])),
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
