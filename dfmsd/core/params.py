"""params.yaml: one schema, validated once up front, read by each stage as declared.

    python -m dfmsd.core.params [params.yaml] [--preset NAME]   # validate; exit 2 with key paths

Two ways in:

* :func:`load_params` validates a whole params file (types, ranges, cross-references) with
  pydantic and returns a :class:`Params`. ``make repro`` and ``make flow`` run it before DVC
  touches any output; :func:`check_buildable` then checks what needs mmdet (loss types and
  their arguments, config files).
* :func:`stage_params` is how a stage command reads params: ``dvc.api.params_show`` with the
  stage's own name (``DVC_STAGE``, set by DVC and by ``flows.runner``), so a stage sees only
  the keys its ``params:`` list in dvc.yaml declares. Reading anything else fails.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                      PositiveInt, ValidationError, field_validator, model_validator)

from dfmsd.core.errors import ParamsError

DEFAULT_PARAMS = Path('params.yaml')
#: Run names become DVC stage names (``distill@<student>-<pair>-<method>-<seed>``) and paths.
NAME = re.compile(r'^[A-Za-z][A-Za-z0-9_]*$')
SPLITS = ('train', 'val', 'test')
ROLES = ('weak', 'strong')  # SAL: weak first; single-stage methods use strong
#: single-stage (strong teacher), single-stage with ME views, and SAL (weak, then strong)
METHOD_GROUPS = ('methods', 'me_methods', 'sal_methods')


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

    @model_validator(mode='after')
    def _splits(self) -> Data:
        missing = [s for s in SPLITS if s not in self.splits]
        if missing:
            raise ValueError(f"splits needs train, val and test; missing {', '.join(missing)}")
        if self.generate:
            uncounted = [s for s in SPLITS if self.splits[s].images is None]
            if uncounted:
                raise ValueError(f"generate: true needs splits.<split>.images for {', '.join(uncounted)}")
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

    @model_validator(mode='after')
    def _widths(self) -> Detector:
        given = [self.depth is not None, self.width is not None, self.fpn_channels is not None]
        if any(given) and not all(given):
            raise ValueError('depth, width and fpn_channels go together')
        return self


class TrainedTeacher(Detector):
    iters: PositiveInt


class ZooTeacher(Strict):
    zoo: str = Field(description="a model name of mmdet's model index")
    sha256: Annotated[str, Field(pattern=r'^[0-9a-f]{64}$')] | None = None


class LocalTeacher(Strict):
    config: str
    checkpoint: str
    sha256: Annotated[str, Field(pattern=r'^[0-9a-f]{64}$')]


Teacher = TrainedTeacher | ZooTeacher | LocalTeacher


def _teacher(value: Any) -> Any:
    """Pick the teacher kind by its keys, so that errors speak of one kind only."""
    if isinstance(value, dict):
        if 'zoo' in value:
            return ZooTeacher.model_validate(value)
        if 'checkpoint' in value:
            return LocalTeacher.model_validate(value)
        return TrainedTeacher.model_validate(value)
    return value


def teacher(value: Any, where: str) -> TrainedTeacher | ZooTeacher | LocalTeacher:
    """One teacher entry (``pairs.<pair>.<role>``), validated as the kind its keys name."""
    try:
        return _teacher(value)
    except ValidationError as err:
        raise ParamsError(format_errors(err, f'params.yaml: {where}').replace(': (top): ', ': ')) from None


class Pair(Strict):
    weak: Annotated[Teacher, Field(union_mode='left_to_right')]
    strong: Annotated[Teacher, Field(union_mode='left_to_right')]

    _kinds = field_validator('weak', 'strong', mode='before')(classmethod(lambda cls, v: _teacher(v)))


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
    """A registered loss: ``type`` plus its keyword arguments (checked by check_buildable)."""
    model_config = ConfigDict(extra='allow', frozen=True)
    type: str
    loss_weight: NonNegativeFloat | None = None


class Method(Strict):
    label: str
    losses: dict[str, Loss] = Field(min_length=1)
    aug_loss_weight: NonNegativeFloat = Field(0.0, description='beta of the ME loss (Eq. 8)')
    ablation_of: str | None = Field(None, description='the method whose ablation table lists this row')

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


class Report(Strict):
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    split: Literal['val', 'test'] = 'test'


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
                    raise ValueError(f'{group}.{name}: names must match {NAME.pattern} '
                                     f'(they become DVC stage names and paths)')
        names = [n for g in METHOD_GROUPS for n in getattr(self, g)]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise ValueError(f"method names must be unique across {', '.join(METHOD_GROUPS)}: {clash}")
        if not names:
            raise ValueError(f"no method: give at least one of {', '.join(METHOD_GROUPS)}")
        for group in METHOD_GROUPS:
            for name, method in getattr(self, group).items():
                if method.ablation_of is not None and method.ablation_of not in names:
                    raise ValueError(f'{group}.{name}.ablation_of: no method {method.ablation_of!r} '
                                     f"(known: {', '.join(sorted(names))})")
                has_views = group == 'me_methods' or (group == 'sal_methods' and method.me_stages)
                if bool(method.aug_loss_weight) != bool(has_views):
                    raise ValueError(f'{group}.{name}: ME views (me_methods, or me_stages of a SAL method) '
                                     f'and aug_loss_weight > 0 go together')
        return self

    def methods_of(self, group: str) -> dict[str, Method]:
        return getattr(self, group)


# ---------------------------------------------------------------- loading
def _location(loc: tuple) -> str:
    parts = [str(p) for p in loc if not str(p).startswith(('function-', 'tagged-union'))]
    # pydantic names union members (TrainedTeacher...) in the path; keep only keys
    return '.'.join(p for p in parts if p not in {'TrainedTeacher', 'ZooTeacher', 'LocalTeacher'}) or '(top)'


def format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        got = e.get('input')
        shown = '' if isinstance(got, (dict, list)) or got is None else f' (got {got!r})'
        lines.append(f'{source}: {_location(e["loc"])}: {e["msg"]}{shown}')
    return '\n'.join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f'{path}: params file not found')
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f'{path}: not valid YAML ({err})') from None
    if not isinstance(data, dict):
        raise ParamsError(f'{path}: expected a mapping at the top level')
    return data


def validate(data: dict[str, Any], source: str = 'params.yaml') -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(format_errors(err, source)) from None


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    return validate(read_yaml(path), str(path))


def section(model: type[BaseModel], data: Any, where: str) -> Any:
    """Validate one section of a stage's params (``section(Train, p['train'], 'train')``)."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ParamsError(format_errors(err, f'params.yaml: {where}').replace(': (top): ', ': ')) from None


def stage_name() -> str:
    name = os.environ.get('DVC_STAGE')
    if not name:
        raise ParamsError('this command reads its params as a DVC stage: run it with `dvc repro <stage>` '
                          '(or set DVC_STAGE to the stage name)')
    return name


def stage_params() -> dict[str, Any]:
    """The params declared by this stage in dvc.yaml, and nothing else."""
    import dvc.api
    return dvc.api.params_show(stages=stage_name())


def lookup(params: dict[str, Any], dotted: str) -> Any:
    """``lookup(p, 'methods.mgd')``, failing with the key the stage did not declare."""
    node: Any = params
    for i, part in enumerate(dotted.split('.')):
        if not isinstance(node, dict) or part not in node:
            where = '.'.join(dotted.split('.')[: i + 1])
            raise ParamsError(f"params.yaml: no key '{where}' among this stage's params "
                              f'(declare it in dvc.yaml, or add it to params.yaml)')
        node = node[part]
    return node


# ---------------------------------------------------------------- deep checks (mmdet)
def check_buildable(params: Params, source: str = 'params.yaml') -> None:
    """What the schema cannot see without mmdet: config files and loss types/arguments."""
    import inspect

    from dfmsd.engine.configs import resolve_config
    from dfmsd.models import losses  # noqa: F401  (registers them)
    from mmdet.registry import MODELS
    for pair_name, pair in params.pairs.items():
        for role in ROLES:
            teacher = getattr(pair, role)
            if not isinstance(teacher, ZooTeacher):
                resolve_config(teacher.config, f'pairs.{pair_name}.{role}.config')
    for name, student in params.students.items():
        resolve_config(student.config, f'students.{name}.config')
    for group in METHOD_GROUPS:
        for name, method in getattr(params, group).items():
            for loss_name, loss in method.losses.items():
                where = f'{source}: {group}.{name}.losses.{loss_name}'
                cls = MODELS.module_dict.get(loss.type)
                if cls is None or not getattr(cls, 'is_distill_loss', False):
                    from dfmsd.models.losses import LOSS_TYPES
                    raise ParamsError(f"{where}.type: unknown loss {loss.type!r} (known: {', '.join(LOSS_TYPES)})")
                accepted = set(inspect.signature(cls.__init__).parameters) - {'self', 'student_channels',
                                                                             'teacher_channels'}
                extra = sorted(set(loss.model_dump(exclude_none=True)) - {'type'} - accepted)
                if extra:
                    raise ParamsError(f"{where}: {loss.type} takes no {', '.join(extra)} "
                                      f"(it takes: {', '.join(sorted(accepted))})")
            if method.aug_loss_weight:
                from dfmsd.models.losses import MaskedReconstructionLoss
                if not any(issubclass(MODELS.module_dict[loss.type], MaskedReconstructionLoss)
                           for loss in method.losses.values()):
                    raise ParamsError(f'{source}: {group}.{name}.aug_loss_weight: the ME loss reuses a masked '
                                      f'reconstruction loss (DMKDLoss, MGDLoss, AMDLoss); this method has none')


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog='python -m dfmsd.core.params', description=__doc__.splitlines()[0])
    parser.add_argument('params', nargs='?', default=str(DEFAULT_PARAMS))
    parser.add_argument('--shallow', action='store_true', help='schema only (no mmdet import)')
    args = parser.parse_args(argv)
    from dfmsd.core.errors import EXIT_CODE, DfmsdError
    try:
        params = load_params(args.params)
        if not args.shallow:
            check_buildable(params, args.params)
    except DfmsdError as err:
        print(f'error [params]: {err}', file=sys.stderr)
        return EXIT_CODE
    methods = sum(len(getattr(params, g)) for g in METHOD_GROUPS)
    print(f'[params] {args.params}: valid ({len(params.seeds)} seeds, {len(params.pairs)} pair(s), '
          f'{len(params.students)} student(s), {methods} method(s))')
    return 0


if __name__ == '__main__':
    sys.exit(main())
