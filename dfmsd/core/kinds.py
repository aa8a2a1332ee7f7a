"""What a training run is: the one definition of each kind that stages, engine and report read.

A kind's ``name`` is what a run's ``run.json`` and metrics record (``kind``); its ``group`` is
the params.yaml group its method comes from. SAL is one schedule in two runs: ``sal1`` with the
weak teacher up to the boundary, then ``sal2`` with the strong one from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Role = Literal['weak', 'strong']
ROLES: tuple[Role, ...] = get_args(Role)  # SAL: weak first; single-stage methods use strong


@dataclass(frozen=True)
class RunKind:
    name: str
    group: str | None = None  # params group of the run's method; None: no method
    teacher: Role | None = None  # the teacher this run distils from
    sal_stage: int | None = None  # 1, 2: which SAL stage; None: not SAL
    me_views: bool = False  # adds ME views whatever the method says (distill_me)
    row: bool = False  # the run whose metrics are its method's table row

    def uses_me(self, method: object) -> bool:
        """Whether this run adds ME views: always for distill_me, per ``me_stages`` in SAL."""
        if self.me_views:
            return True
        return self.sal_stage is not None and self.sal_stage in getattr(method, 'me_stages', ())

    @property
    def keeps_state(self) -> bool:
        """SAL stage 1: stops at the boundary and keeps its training state for stage 2."""
        return self.sal_stage == 1

    @property
    def resumes(self) -> bool:
        """SAL stage 2: resumes stage 1's training state at the boundary."""
        return self.sal_stage == 2

    def __str__(self) -> str:
        return self.name


TEACHER = RunKind('teacher')
BASELINE = RunKind('baseline', row=True)
DISTILL = RunKind('distill', 'methods', 'strong', row=True)
DISTILL_ME = RunKind('distill_me', 'me_methods', 'strong', me_views=True, row=True)
SAL1 = RunKind('sal1', 'sal_methods', 'weak', sal_stage=1)
SAL2 = RunKind('sal2', 'sal_methods', 'strong', sal_stage=2, row=True)

KINDS: dict[str, RunKind] = {k.name: k for k in (TEACHER, BASELINE, DISTILL, DISTILL_ME, SAL1, SAL2)}
#: the runs a stages/distill.py command can be (the others have stages of their own)
DISTILL_KINDS: dict[str, RunKind] = {name: k for name, k in KINDS.items() if k.group}
#: single-stage (strong teacher), single-stage with ME views, and SAL (weak, then strong)
METHOD_GROUPS: tuple[str, ...] = tuple(dict.fromkeys(k.group for k in DISTILL_KINDS.values()))
#: each method group's row run: distill, distill_me, sal2
ROW_KIND_OF_GROUP: dict[str, RunKind] = {k.group: k for k in DISTILL_KINDS.values() if k.row}


def run_kind(name: str) -> RunKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f'no run kind {name!r}; one of: {", ".join(KINDS)}') from None
