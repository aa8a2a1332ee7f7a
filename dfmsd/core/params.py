"""params.yaml: one schema (dfmsd.core.schema), validated once up front, read by each stage as declared.

    python -m dfmsd.check [params.yaml] [--preset NAME]   # validate; exit 2 with key paths

Two ways in:

* :func:`load_params` validates a whole params file (types, ranges, cross-references) with
  pydantic and returns a :class:`Params`. ``make repro`` and ``make flow`` run it
  (``python -m dfmsd.check``, which also checks what needs mmdet) before DVC touches any output.
* :class:`StageParams` is how a stage command reads params: ``dvc.api.params_show`` with the
  stage's own name (``DVC_STAGE``, set by DVC), so a stage sees only the keys its ``params:``
  list in dvc.yaml declares. Reading anything else fails, naming the key.

The schema's models are imported from here (``from dfmsd.core.params import Train``).
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

import yaml
from pydantic import BaseModel, ValidationError

from dfmsd.core.errors import ParamsError
from dfmsd.core.kinds import METHOD_GROUPS  # noqa: F401  (imported with the schema)
from dfmsd.core.schema import (  # noqa: F401  (the models, imported from here)
    ME,
    SPLITS,
    Data,
    Detector,
    Distill,
    Evaluate,
    Figures,
    Launch,
    LocalTeacher,
    Method,
    Params,
    Report,
    Runtime,
    SALMethod,
    Teacher,
    Train,
    TrainedTeacher,
    ZooTeacher,
    pick_teacher,
)

DEFAULT_PARAMS = Path('params.yaml')
M = TypeVar('M', bound=BaseModel)


# ---------------------------------------------------------------- loading
def _location(loc: tuple) -> str:
    parts = [str(p) for p in loc if not str(p).startswith(('function-', 'tagged-union'))]
    # pydantic names union members (TrainedTeacher...) in the path; keep only keys
    return '.'.join(p for p in parts if p not in {'TrainedTeacher', 'ZooTeacher', 'LocalTeacher'}) or '(top)'


def format_errors(err: ValidationError, source: str, prefix: str = '') -> str:
    """One ``<source>: <key path>: <problem> (got <value>)`` line per error; ``prefix`` is the key
    path of the validated section (``train``, ``pairs.<pair>.weak``)."""
    lines = []
    for e in err.errors():
        got = e.get('input')
        shown = '' if isinstance(got, (dict, list)) or got is None or e['type'] == 'value_error' else f' (got {got!r})'
        loc = _location(e['loc'])
        where = '.'.join(part for part in (prefix, '' if loc == '(top)' else loc) if part)
        message = e['msg'].removeprefix('Value error, ')
        lines.append(f'{source}: {where}: {message}{shown}' if where else f'{source}: {message}{shown}')
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
        raise ParamsError(format_errors(err, 'params.yaml', where)) from None


def teacher(value: Any, where: str) -> Teacher:
    """One teacher entry (``pairs.<pair>.<role>``), validated as the kind its keys name."""
    try:
        return pick_teacher(value)
    except ValidationError as err:
        raise ParamsError(format_errors(err, 'params.yaml', where)) from None
    except ValueError as err:
        raise ParamsError(f'params.yaml: {where}: {err}') from None


# ---------------------------------------------------------------- a stage's params
#: ``DFMSD_LAUNCH_<KEY>`` overrides ``launch.<key>`` on one machine (e.g. the node rank).
LAUNCH_ENV_PREFIX = 'DFMSD_LAUNCH_'


def launch_settings(given: dict[str, Any] | Launch | None) -> Launch:
    """``params['launch']`` with ``DFMSD_LAUNCH_<KEY>`` overrides, validated (dfmsd.engine.launch
    starts the processes; the flow reads the GPUs a stage asks its Dask workers for)."""
    values = given.model_dump() if isinstance(given, Launch) else dict(given or {})
    for key in Launch.model_fields:
        env = os.environ.get(LAUNCH_ENV_PREFIX + key.upper())
        if env not in (None, ''):
            values[key] = env
    return section(Launch, values, 'launch')


def stage_name() -> str:
    name = os.environ.get('DVC_STAGE')
    if not name:
        raise ParamsError(
            'this command reads its params as a DVC stage: run it with `dvc repro <stage>` '
            '(or set DVC_STAGE to the stage name)'
        )
    return name


def stage_params() -> dict[str, Any]:
    """The params declared by this stage in dvc.yaml, and nothing else.

    Read under the repository lock, which ``dvc repro`` releases while a stage's command runs:
    DVC reads dvc.lock to load the stage, and a stage running beside this one (``dvc
    --wait-for-lock repro --single-item``) may be rewriting it (DVC writes it in place; a
    half-written dvc.lock failed the read in CI)."""
    import dvc.api
    from dvc.repo import Repo, lock_repo

    name = stage_name()
    with Repo(_wait_for_lock=True) as repo, lock_repo(repo):
        return dvc.api.params_show(stages=name, repo=repo.root_dir)


def lookup(params: dict[str, Any], dotted: str) -> Any:
    """``lookup(p, 'methods.mgd')``, failing with the key the stage did not declare."""
    node: Any = params
    for i, part in enumerate(dotted.split('.')):
        if not isinstance(node, dict) or part not in node:
            where = '.'.join(dotted.split('.')[: i + 1])
            raise ParamsError(
                f"params.yaml: no key '{where}' among this stage's params "
                f'(declare it in dvc.yaml, or add it to params.yaml)'
            )
        node = node[part]
    return node


class _Section(Generic[M]):
    """A section of a stage's params, validated when first read: ``train = _Section(Train)``."""

    def __init__(self, model: type[M]) -> None:
        self.model = model

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name

    @overload
    def __get__(self, params: None, owner: type | None = None) -> _Section[M]: ...
    @overload
    def __get__(self, params: StageParams, owner: type | None = None) -> M: ...
    def __get__(self, params: StageParams | None, owner: type | None = None) -> _Section[M] | M:
        if params is None:  # read on the class (help, inspect)
            return self
        # the value shadows this (non-data) descriptor from then on: each section is validated once
        params.__dict__[self.key] = value = params.read(self.model, self.key)
        return value


class StageParams:
    """The params this stage declares (:func:`stage_params`), each section validated when first
    read, its errors naming the key path (``students.<name>.depth``)::

        p = StageParams()
        train_baseline(p.student(args.student), p.data, p.train, p.runtime, p.launch, ...)
    """

    data = _Section(Data)
    train = _Section(Train)
    runtime = _Section(Runtime)
    distill = _Section(Distill)
    me = _Section(ME)
    evaluate = _Section(Evaluate)
    figures = _Section(Figures)

    def __init__(self, given: dict[str, Any] | None = None) -> None:
        self.given = stage_params() if given is None else given

    def read(self, model: type[M], key: str) -> M:
        """``key`` (dotted) as ``model``."""
        return section(model, lookup(self.given, key), key)

    @cached_property
    def launch(self) -> Launch:
        """``launch`` (absent: one process) with this machine's ``DFMSD_LAUNCH_<KEY>`` overrides."""
        return launch_settings(self.given.get('launch'))

    def student(self, name: str) -> Detector:
        return self.read(Detector, f'students.{name}')

    def method(self, group: str, name: str) -> Method:
        """``<group>.<name>``, as the model of its group's entries (SALMethod for sal_methods)."""
        return self.read(Params.method_model(group), f'{group}.{name}')

    def teacher(self, pair: str, role: str) -> Teacher:
        """``pairs.<pair>.<role>``, as the teacher kind its keys name."""
        where = f'pairs.{pair}.{role}'
        return teacher(lookup(self.given, where), where)
