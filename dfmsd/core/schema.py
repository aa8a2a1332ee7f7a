"""params.yaml's schema: every key, its type, range and default, and the cross-references
between sections, as pydantic models. dfmsd.core.params validates a file or a stage's
params with them (and is where the rest of the code imports them from).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from dfmsd.core.kinds import METHOD_GROUPS

#: Run names become DVC stage names (``distill@<student>-<pair>-<method>-<seed>``) and paths.
NAME = re.compile(r'^[A-Za-z][A-Za-z0-9_]*$')
SPLITS = ('train', 'val', 'test')


class Strict(BaseModel):
    model_config = ConfigDict(extra='forbid', frozen=True)


# ---------------------------------------------------------------- data
class Split(Strict):
    ann: str = Field(description='annotation file, relative to data.root')
    img: str = Field(description='image directory, relative to data.root')
    images: PositiveInt | None = Field(None, description='images to generate (synthetic data only)')


class Synthetic(Strict):
    small_image_fraction: Annotated[float, Field(ge=0, le=1)] = 0.5
    max_objects: PositiveInt = 6


class Data(Strict):
    root: str
    generate: bool = True
    seed: NonNegativeInt = 0
    image_size: Annotated[int, Field(ge=32)] | None = None
    splits: dict[Literal['train', 'val', 'test'], Split]
    synthetic: Synthetic = Synthetic()

    @field_validator('splits')
    @classmethod
    def _all_splits(cls, value):
        missing = [s for s in SPLITS if s not in value]
        if missing:
            raise ValueError(f'needs {", ".join(SPLITS)}; missing {", ".join(missing)}')
        return value

    @model_validator(mode='after')
    def _splits(self) -> Data:
        if self.generate:
            uncounted = [s for s in SPLITS if self.splits[s].images is None]
            if uncounted:
                raise ValueError(f'generate: true needs splits.<split>.images for {", ".join(uncounted)}')
            if self.image_size is None:
                raise ValueError('generate: true needs image_size')
        return self


# ---------------------------------------------------------------- models
class Detector(Strict):
    """A detector config (a path, or ``mmdet::<path>`` inside the installed mmdet), and for
    the small ResNet presets its backbone depth and widths."""

    config: str
    depth: Literal[18, 34, 50, 101, 152] | None = None
    width: PositiveInt | None = None
    fpn_channels: PositiveInt | None = None
    lr: PositiveFloat | None = Field(None, description="this model's learning rate (default: train.lr)")
    pretrained: bool = Field(
        True, description="false: no pretrained weights from the config's init_cfg (e.g. an offline machine)"
    )

    @model_validator(mode='after')
    def _widths(self) -> Detector:
        given = [self.depth is not None, self.width is not None, self.fpn_channels is not None]
        if any(given) and not all(given):
            raise ValueError('depth, width and fpn_channels go together')
        return self


class TrainedTeacher(Detector):
    iters: PositiveInt


def _quoted_hash(cls, value: Any) -> Any:
    """YAML reads an unquoted hash of only digits as an integer: say so, not 'not a string'."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError("a hash of only digits reads as a number in YAML: quote it (sha256: '<64 hex digits>')")
    return value


class ZooTeacher(Strict):
    zoo: str = Field(description="a model name of mmdet's model index")
    sha256: Annotated[str, Field(pattern=r'^[0-9a-f]{64}$')] | None = None

    _quoted = field_validator('sha256', mode='before')(classmethod(_quoted_hash))


class LocalTeacher(Strict):
    config: str
    checkpoint: str
    sha256: Annotated[str, Field(pattern=r'^[0-9a-f]{64}$')]

    _quoted = field_validator('sha256', mode='before')(classmethod(_quoted_hash))


Teacher = TrainedTeacher | ZooTeacher | LocalTeacher


TEACHER_KINDS = (
    'config + iters (trained here)',
    'zoo (an mmdet model-zoo name)',
    'config + checkpoint + sha256 (a local checkpoint)',
)


def pick_teacher(value: Any) -> Any:
    """Pick the teacher kind by its keys, so that errors speak of one kind only."""
    if isinstance(value, (TrainedTeacher, ZooTeacher, LocalTeacher)):
        return value
    if not isinstance(value, dict) or not {'zoo', 'checkpoint', 'config'} & set(value):
        got = f'keys {", ".join(map(str, value))}' if isinstance(value, dict) else repr(value)
        raise ValueError(f'no known teacher kind ({got}); give one of: {"; ".join(TEACHER_KINDS)}')
    if 'zoo' in value:
        return ZooTeacher.model_validate(value)
    if 'checkpoint' in value:
        return LocalTeacher.model_validate(value)
    return TrainedTeacher.model_validate(value)


class Pair(Strict):
    weak: Annotated[Teacher, Field(union_mode='left_to_right')]
    strong: Annotated[Teacher, Field(union_mode='left_to_right')]

    _kinds = field_validator('weak', 'strong', mode='before')(classmethod(lambda cls, v: pick_teacher(v)))


# ---------------------------------------------------------------- training
class Train(Strict):
    batch_size: PositiveInt = 8
    lr: PositiveFloat | None = None
    optimizer: dict[str, Any] | None = None
    warmup_iters: PositiveInt | None = None
    checkpoint_interval: PositiveInt = 200
    iters: PositiveInt = Field(description="every student row's budget in iterations")
    validate_every: NonNegativeInt = Field(0, description='validate on val every N iterations (0: never)')
    teacher_seed: NonNegativeInt = 0
    auto_scale_lr: bool = False
    base_batch_size: PositiveInt | None = None
    trackers: list[Literal['dvclive', 'tensorboard']] = Field(
        ['dvclive'], description="live training scalars in the run's work dir, besides mmengine's own"
    )

    @field_validator('optimizer')
    @classmethod
    def _optimizer(cls, value):
        if value is not None and 'type' not in value:
            raise ValueError("needs a 'type' (e.g. SGD, AdamW)")
        return value


class Runtime(Strict):
    threads: PositiveInt = Field(1, description='torch threads of each training process')


class Launch(Strict):
    nproc_per_node: PositiveInt = 1
    nnodes: PositiveInt = 1
    node_rank: NonNegativeInt = 0
    master_addr: str = '127.0.0.1'
    master_port: Annotated[int, Field(ge=1, le=65535)] = 29500
    backend: Literal['nccl', 'gloo'] = 'nccl'


# ---------------------------------------------------------------- methods
class Loss(BaseModel):
    """A registered loss: ``type`` plus its keyword arguments (checked by dfmsd.check)."""

    model_config = ConfigDict(extra='allow', frozen=True)
    type: str
    loss_weight: NonNegativeFloat | None = None


class Method(Strict):
    label: str
    losses: dict[str, Loss] = Field(min_length=1)
    aug_loss_weight: NonNegativeFloat = Field(0.0, description='beta of the ME loss (Eq. 8)')
    ablation_of: str | None = Field(None, description='the method whose ablation table lists this row')
    budget: PositiveFloat = Field(
        1.0, description="the row's iterations as a multiple of train.iters (an ablation's stated budget)"
    )

    def iters(self, train_iters: int) -> int:
        """This row's schedule: ``budget`` x train.iters."""
        return max(1, round(self.budget * train_iters))

    @field_validator('losses')
    @classmethod
    def _loss_names(cls, value):
        for name in value:
            if not NAME.match(name):
                raise ValueError(f'loss name {name!r} must match {NAME.pattern}')
        return value


class SALMethod(Method):
    me_stages: list[Literal[1, 2]] = Field([2], description='SAL stages that add ME views')
    split: Annotated[float, Field(gt=0, lt=1)] = Field(0.5, description="stage 1's share of the budget")
    reset_modules: bool = Field(False, description='re-initialise the loss modules at the teacher switch')
    stage1_losses: dict[str, Loss] | None = Field(
        None, description="stage 1's losses where their weights differ from stage 2's (the alpha-per-stage ablation)"
    )

    @model_validator(mode='after')
    def _stage1_losses_match(self):
        if self.stage1_losses is not None:
            types = {name: loss.type for name, loss in self.losses.items()}
            if {name: loss.type for name, loss in self.stage1_losses.items()} != types:
                raise ValueError(f'stage1_losses must name the same losses of the same types as losses ({types})')
        return self

    def at_stage(self, stage: int) -> SALMethod:
        """The method as SAL stage ``stage`` runs it: stage 1 with ``stage1_losses`` where given."""
        if stage == 1 and self.stage1_losses is not None:
            return self.model_copy(update={'losses': self.stage1_losses})
        return self


class Distill(Strict):
    min_cells: PositiveInt = Field(2, description='distil FPN levels with at least min_cells x min_cells cells')


class ME(Strict):
    teacher_score_thr: Annotated[float, Field(ge=0, le=1)] = 0.3
    threshold: NonNegativeFloat = 0.5
    noise_prob: Annotated[float, Field(ge=0, le=1)] = 0.5
    noise_sigma: NonNegativeFloat = 25.0
    crop_min: Annotated[float, Field(ge=0, lt=1)] = 0.1
    crop_max: Annotated[float, Field(ge=0, lt=1)] = 0.3

    @model_validator(mode='after')
    def _crop(self) -> ME:
        if self.crop_min > self.crop_max:
            raise ValueError(f'crop_min {self.crop_min} > crop_max {self.crop_max}')
        return self


class Evaluate(Strict):
    score_thr: Annotated[float, Field(ge=0, le=1)] = 0.05


class Figures(Strict):
    """Which run the method figures (stage `figures`) show: a SAL method's final student."""

    pair: str
    student: str
    method: str
    seed: NonNegativeInt = 0
    images: PositiveInt = 3


class Report(Strict):
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    split: Literal['val', 'test'] = 'test'
    preset: str | None = Field(None, description='the preset these params come from (set by flows.presets)')
    note: str | None = Field(None, description="a sentence at the top of the report (e.g. a preset's purpose)")


class Params(Strict):
    data: Data
    seeds: list[NonNegativeInt] = Field(min_length=1)
    runtime: Runtime = Runtime()
    launch: Launch = Launch()
    train: Train
    pairs: dict[str, Pair] = Field(min_length=1)
    students: dict[str, Detector] = Field(min_length=1)
    distill: Distill = Distill()
    methods: dict[str, Method] = {}
    me_methods: dict[str, Method] = {}
    sal_methods: dict[str, SALMethod] = {}
    me: ME = ME()
    evaluate: Evaluate = Evaluate()
    report: Report = Report()
    figures: Figures

    @field_validator('seeds')
    @classmethod
    def _unique(cls, value):
        if len(set(value)) != len(value):
            raise ValueError(f'seeds must be distinct, got {value}')
        return value

    @model_validator(mode='after')
    def _cross_references(self) -> Params:
        for group in ('pairs', 'students', *METHOD_GROUPS):
            for name in getattr(self, group):
                if not NAME.match(name):
                    raise ValueError(
                        f'{group}.{name}: names must match {NAME.pattern} (they become DVC stage names and paths)'
                    )
        f = self.figures
        if (
            f.pair not in self.pairs
            or f.student not in self.students
            or f.method not in self.sal_methods
            or f.seed not in self.seeds
        ):
            raise ValueError(
                f'figures: pair, student, seed and method must name a pair, a student, a seed and a '
                f'sal_methods entry of this grid (got {f.pair}, {f.student}, {f.seed}, {f.method})'
            )
        names = [n for g in METHOD_GROUPS for n in getattr(self, g)]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            paths = [f'{g}.{n}' for n in clash for g in METHOD_GROUPS if n in getattr(self, g)]
            raise ValueError(f'{", ".join(paths)}: method names must be unique across {", ".join(METHOD_GROUPS)}')
        if not names:
            raise ValueError(f'no method: give at least one of {", ".join(METHOD_GROUPS)}')
        for group in METHOD_GROUPS:
            for name, method in getattr(self, group).items():
                if method.ablation_of is not None and method.ablation_of not in names:
                    raise ValueError(
                        f'{group}.{name}.ablation_of: no method {method.ablation_of!r} '
                        f'(known: {", ".join(sorted(names))})'
                    )
                has_views = group == 'me_methods' or (group == 'sal_methods' and method.me_stages)
                if method.aug_loss_weight and not has_views:
                    views = 'me_stages is empty' if group == 'sal_methods' else f'{group} have none'
                    raise ValueError(
                        f'{group}.{name}.aug_loss_weight: {method.aug_loss_weight} > 0 weights the '
                        f'loss of ME views, but {views} (ME views: me_methods, or me_stages of '
                        f'a SAL method)'
                    )
                if has_views and not method.aug_loss_weight:
                    raise ValueError(
                        f'{group}.{name}.aug_loss_weight: {method.aug_loss_weight}, but this method '
                        f'makes ME views: give it a weight > 0 (or no ME views)'
                    )
        return self

    @classmethod
    def method_model(cls, group: str) -> type[Method]:
        """The model of a method group's entries, as declared above (SALMethod for sal_methods)."""
        return get_args(cls.model_fields[group].annotation)[1]
