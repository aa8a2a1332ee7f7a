"""What a metrics file holds: the run's record (its ``run.json``: identity and cost) and its COCO
box metrics per split. :mod:`dfmsd.evaluation` checks each record with :class:`RunRecord` before
writing it, and the report reads every file through it (:mod:`dfmsd.report.loading`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    PlainValidator,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    model_validator,
)

from dfmsd.core.errors import DfmsdError
from dfmsd.core.kinds import TEACHER, Role, RunKind, run_kind
from dfmsd.core.params import format_errors

#: The COCO box metrics in pycocotools' COCOeval.stats order (percent).
METRIC_NAMES = ('mAP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR@1', 'AR@10', 'AR@100', 'ARs', 'ARm', 'ARl')
#: What each metrics file keeps, and the paper's table columns.
REPORTED_METRICS = ('mAP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR@100', 'ARs', 'ARm', 'ARl')
PAPER_COLUMNS = ('mAP', 'APs', 'APm', 'APl', 'AR@100', 'ARs', 'ARm', 'ARl')


def _reports_every_metric(values: dict[str, float]) -> dict[str, float]:
    missing = [m for m in REPORTED_METRICS if m not in values]
    if missing:
        raise ValueError(f'lacks {", ".join(missing)}')
    return values


#: One split's metrics, in percent (a bool or a string is not a number here).
SplitMetrics = Annotated[dict[str, StrictFloat], AfterValidator(_reports_every_metric)]


def _kind(value: Any) -> RunKind:
    if not isinstance(value, str):
        raise ValueError(f'expected the name of a run kind, got {value!r}')
    return run_kind(value)


def identity_keys(kind: RunKind) -> tuple[str, ...]:
    """The keys that say which run a record is: a teacher's (pair, role), a baseline's (student,
    seed), a distilled student's (student, pair, method, group, seed)."""
    if kind is TEACHER:
        return ('pair', 'role')
    return ('student', 'pair', 'method', 'group', 'seed') if kind.group else ('student', 'seed')


class RunRecord(BaseModel):
    """One metrics file. Besides these keys it keeps whatever else run.json says (``machine``; an
    imported teacher's ``source``)."""

    model_config = ConfigDict(extra='allow', frozen=True)

    kind: Annotated[RunKind, PlainValidator(_kind)]
    student: str | None = None
    pair: str | None = None
    role: Role | None = None
    method: str | None = None
    group: str | None = None
    seed: StrictInt | None = None
    uses_me: StrictBool | None = None
    # cost: the schedule's final iteration, and what went through the student and the teacher
    iters: StrictInt | None = None
    start_iter: StrictInt | None = None
    batch_size: StrictInt | None = None
    images_seen: StrictInt | None = None
    views_seen: StrictInt | None = None
    teacher_images: StrictInt | None = None
    config_digest: str | None = None
    threads: StrictInt | None = None
    strides: list[StrictInt] | None = None  # the FPN levels a distillation used
    val: SplitMetrics | None = None
    test: SplitMetrics | None = None

    @model_validator(mode='after')
    def _identity(self) -> RunRecord:
        missing = [k for k in identity_keys(self.kind) if getattr(self, k) is None]
        if missing:
            raise ValueError(f'a {self.kind} metrics file needs {", ".join(missing)}')
        return self

    @property
    def key(self) -> tuple:
        """Which run this is, whatever file it is in: ``(kind, *identity)``."""
        return (self.kind.name, *(getattr(self, k) for k in identity_keys(self.kind)))


def run_record(data: Any, source: str) -> RunRecord:
    """``data`` (a metrics file's JSON) as a :class:`RunRecord`, or a DfmsdError that names
    ``source`` and every problem."""
    try:
        return RunRecord.model_validate(data)
    except ValidationError as err:
        raise DfmsdError(format_errors(err, source)) from None
