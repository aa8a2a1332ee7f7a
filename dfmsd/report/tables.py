"""The table model: rows, groups, their statistics and the verdicts, from the loaded runs.

A *group* is one (student, pair). Its rows: the pair's two teachers (single runs), the
student's baseline, then every method of params.yaml in params order (``methods``,
``me_methods``, ``sal_methods``); rows with ``ablation_of`` set are ablations, shown in the
ablation table of the method they name rather than in the main table. Every student row is
compared with the baseline, paired by seed (:func:`dfmsd.report.stats.paired`).

The verdicts come in families, each Holm-adjusted as a whole (:func:`dfmsd.report.stats.holm`):
every row against the baseline; and, per SAL method (the paper's DFMSD), that method against
every other main method together with its ablations against it and the ablations' equal-budget
comparisons (:func:`equal_budget_pairs`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dfmsd.core.kinds import BASELINE, ROLES, TEACHER
from dfmsd.report.config import MethodSpec, ReportConfig
from dfmsd.report.loading import Run
from dfmsd.report.metrics import REPORTED_METRICS
from dfmsd.report.stats import holm, paired, resolution, summarize

BASELINE_ROW = 'baseline'
TEACHER_ROWS = {'weak': 'teacher_weak', 'strong': 'teacher_strong'}
COST_KEYS = ('iters', 'images_seen', 'views_seen', 'teacher_images')


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

    def seed_runs(self) -> list[tuple[Any, Run]]:
        """``[(seed, run)]`` by seed (a teacher's one run: ``[(None, run)]``)."""
        return sorted(self.runs.items(), key=lambda item: -1 if item[0] is None else item[0])

    def values(self, split: str, metric: str = 'mAP') -> dict[Any, float]:
        return {seed: run.metric(split, metric) for seed, run in self.seed_runs()}

    @property
    def fig_kind(self) -> str:
        if self.kind == 'method' and self.method.sal:
            return 'sal'
        return self.kind


@dataclass
class Group:
    student: str
    pair: str
    rows: list[Row]
    verdicts: list[dict] = field(default_factory=list)  # {'a', 'b', 'result', 'family'[, 'equal_budget']}
    #: family name -> {'label', 'verdicts', 'resolution'}: what the Holm adjustment runs over
    families: dict[str, dict] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f'{self.student}/{self.pair}'

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    @property
    def baseline(self) -> Row:
        return self.row(BASELINE_ROW)

    @property
    def main_rows(self) -> list[Row]:
        return [r for r in self.rows if r.kind != 'ablation']


def _row_stats(row: Row, config: ReportConfig) -> None:
    row.stats = {m: summarize(row.values(config.split, m).values(), config.confidence) for m in REPORTED_METRICS}
    for key in COST_KEYS:
        vals = [float(v) for r in row.runs.values() if (v := getattr(r.record, key)) is not None]
        row.cost[key] = sum(vals) / len(vals) if vals else None


def build_groups(runs: Mapping[tuple, Run], config: ReportConfig) -> list[Group]:
    """One :class:`Group` per (student, pair), rows in params order, with statistics and verdicts.
    ``runs`` by :attr:`~dfmsd.report.metrics.RunRecord.key`."""
    groups = []
    for student in config.students:
        for pair in config.pairs:
            rows = []
            for role in ROLES:
                row = Row(TEACHER_ROWS[role], f'Teacher ({role})', 'teacher')
                run = runs.get((TEACHER.name, pair, role))
                if run is not None:
                    row.runs[None] = run
                rows.append(row)
            base = Row(BASELINE_ROW, 'Student baseline', 'baseline')
            base.runs = {s: runs[k] for s in config.seeds if (k := (BASELINE.name, student, s)) in runs}
            rows.append(base)
            for m in config.methods.values():
                row = Row(m.name, m.label, 'ablation' if m.ablation_of else 'method', method=m)
                row.runs = {
                    s: runs[k] for s in config.seeds if (k := (m.kind.name, student, pair, m.name, m.group, s)) in runs
                }
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
            group.families = _families(group, config)
            groups.append(group)
    return groups


def _verdicts(group: Group, config: ReportConfig) -> list[dict]:
    """Every student row against the baseline; every SAL method against every other main method
    of the group; every ablation against its full method."""
    out = []
    methods = [r for r in group.rows if r.is_method and r.n]
    base = group.baseline
    if base.n:
        out += [{'a': r, 'b': base, 'result': r.gain, 'family': BASELINE_ROW} for r in methods]
    mains = [r for r in methods if r.kind == 'method']
    done = set()
    for r in mains:
        if not r.method.sal:
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
                    'family': r.name,
                }
            )
    for r in methods:
        if r.kind == 'ablation' and group.row(r.method.ablation_of).n:
            full = group.row(r.method.ablation_of)
            out.append({'a': r, 'b': full, 'result': r.vs_full, 'family': full.name})
    for a, b in equal_budget_pairs(group):
        if a.n and b.n:
            result = paired(a.values(config.split), b.values(config.split), config.confidence)
            out.append({'a': a, 'b': b, 'result': result, 'family': a.method.ablation_of, 'equal_budget': True})
    return out


def equal_budget_pairs(group: Group) -> list[tuple[Row, Row]]:
    """Ablations of one method that share a budget other than that method's, each pair once.

    Against the full method such a row also differs in cost, so it is compared with the other
    rows of the same cost: the paper's SAL protocol (each stage a full budget) against one stage
    trained as long. A SAL row comes first (``a``), then params order."""
    by_budget: dict[tuple[str, float], list[Row]] = defaultdict(list)
    for r in group.rows:
        if r.kind == 'ablation':
            full = group.row(r.method.ablation_of)
            if r.method.spec.budget != full.method.spec.budget:
                by_budget[(full.name, r.method.spec.budget)].append(r)
    pairs = []
    for rows in by_budget.values():
        rows = sorted(rows, key=lambda r: not r.method.sal)  # stable: params order otherwise
        pairs += [(a, b) for i, a in enumerate(rows) for b in rows[i + 1 :]]
    return pairs


def _families(group: Group, config: ReportConfig) -> dict[str, dict]:
    """The group's verdicts by family, each Holm-adjusted in place, with what it can resolve."""
    families: dict[str, dict] = {}
    for v in group.verdicts:
        name = v['family']
        label = group.baseline.label if name == BASELINE_ROW else group.row(name).label
        families.setdefault(name, {'label': label, 'verdicts': []})['verdicts'].append(v)
    for family in families.values():
        results = [v['result'] for v in family['verdicts']]
        holm(results, config.confidence)
        family['resolution'] = resolution(results, config.confidence)
    return families


def me_placement_sets(config: ReportConfig) -> list[list[str]]:
    """SAL methods that differ only in ``me_stages`` (and in ``aug_loss_weight`` where a variant
    has no ME stage, which forces it to 0): the paper's ME stage placement comparisons."""
    by_base: dict[str, list[MethodSpec]] = defaultdict(list)
    for m in config.methods.values():
        if m.sal:
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


def missing_notes(groups: list[Group], config: ReportConfig) -> list[str]:
    """A note for each row without a run of every seed (a teacher: without its run)."""
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
