"""The report's params: the grid it tabulates and how (``report``, ``seeds``, ``pairs``,
``students``, the method groups and ``me.threshold``, the keys its dvc.yaml entry declares).

params.yaml is validated as a whole before any stage runs (``python -m dfmsd.check``:
:class:`dfmsd.core.params.Params`); like every stage, the report reads each section with its
params model and checks nothing again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dfmsd.core.kinds import METHOD_GROUPS, ROW_KIND_OF_GROUP, RunKind
from dfmsd.core.params import Method, Report, StageParams, lookup, section


@dataclass(frozen=True)
class MethodSpec:
    name: str
    group: str  # one of METHOD_GROUPS
    spec: Method  # its params entry (a SALMethod in sal_methods)

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def ablation_of(self) -> str | None:
        return self.spec.ablation_of

    @property
    def kind(self) -> RunKind:
        """The run whose metrics are this method's row."""
        return ROW_KIND_OF_GROUP[self.group]

    @property
    def sal(self) -> bool:
        return self.kind.sal_stage is not None


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
    """The report stage's params as a :class:`ReportConfig`."""
    stage = StageParams(dict(params))
    report = section(Report, params.get('report') or {}, 'report')
    return ReportConfig(
        confidence=report.confidence,
        split=report.split,
        seeds=tuple(lookup(params, 'seeds')),
        pairs=tuple(lookup(params, 'pairs')),
        students=tuple(lookup(params, 'students')),
        methods={
            name: MethodSpec(name, group, stage.method(group, name))
            for group in METHOD_GROUPS
            for name in params.get(group) or {}
        },
        me_threshold=stage.me.threshold if 'threshold' in (params.get('me') or {}) else None,
        preset=report.preset,
        note=report.note,
    )
