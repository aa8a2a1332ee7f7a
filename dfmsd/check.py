"""Check params.yaml (or a preset) before DVC touches any output: what ``make repro`` and
``make flow`` run first.

    python -m dfmsd.check [params.yaml] [--preset NAME] [--shallow]

The schema (dfmsd.core.params) checks types, ranges and cross-references; this module adds
what needs mmdet or the disk: config files exist, zoo names resolve, loss types are registered
and take the given arguments, a local teacher's checkpoint is there, has its sha256 and loads,
and a dataset in place (``data.generate: false``) has valid, non-empty annotation files.
Every problem is one ``error [params]: <file>: <key path>: ...`` line, exit status 2; nothing
is written. ``--shallow``: the schema only.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from dfmsd.core.errors import DfmsdError, ParamsError
from dfmsd.core.kinds import METHOD_GROUPS, ROLES
from dfmsd.core.params import (
    DEFAULT_PARAMS,
    SPLITS,
    Data,
    LocalTeacher,
    Params,
    ZooTeacher,
    load_params,
    validate,
)
from dfmsd.core.presets import WORKTREES


def check_buildable(params: Params, source: str = 'params.yaml', inputs: Path | None = Path('.')) -> None:
    """What the schema cannot see without mmdet or the disk: config files, zoo names, loss
    types/arguments, and the user's own files (local teacher checkpoints; a dataset in place),
    read relative to ``inputs`` (None: not checked)."""
    for pair_name, pair in params.pairs.items():
        for role in ROLES:
            _check_teacher(getattr(pair, role), f'pairs.{pair_name}.{role}', source, inputs)
    from dfmsd.engine.configs import resolve_config

    for name, student in params.students.items():
        resolve_config(student.config, f'students.{name}.config')
    _check_losses(params, source)
    if inputs is not None and not params.data.generate:
        _check_dataset(params.data, source, inputs)


@contextlib.contextmanager
def _named(source: str):
    """The checks below name a key; their errors also name the params file (or preset) it is in."""
    try:
        yield
    except DfmsdError as err:
        raise ParamsError(f'{source}: {err}') from None


def _check_teacher(teacher, where: str, source: str, inputs: Path | None) -> None:
    from dfmsd.engine.checkpoint import load_verified
    from dfmsd.engine.configs import resolve_config
    from dfmsd.engine.zoo import find_teacher_model

    if isinstance(teacher, ZooTeacher):
        with _named(source):
            find_teacher_model(teacher.zoo, f'{where}.zoo')
        return
    resolve_config(teacher.config, f'{where}.config')
    if isinstance(teacher, LocalTeacher) and inputs is not None:
        with _named(source):  # exists, has its hash, unpickles: what the teacher stage will do
            load_verified(inputs / teacher.checkpoint, map_location='cpu', sha256=teacher.sha256, key=where)


def _check_dataset(data: Data, source: str, inputs: Path) -> None:
    """A dataset in place: each split's annotation file, without its images (the data stage
    decodes every image; this stays cheap)."""
    from dfmsd.data.coco import split_files, validate_split

    for split in SPLITS:
        ann, img = split_files(data, split)
        with _named(f'{source}: data.splits.{split}.ann'):
            validate_split(split, inputs / ann, inputs / img, check_images=False)


def _check_losses(params: Params, source: str) -> None:
    """Loss types are registered and take the given arguments; an ME loss has its reconstruction."""
    import inspect

    from mmdet.registry import MODELS

    from dfmsd.models import losses  # noqa: F401  (registers them)

    for group in METHOD_GROUPS:
        for name, method in getattr(params, group).items():
            for loss_name, loss in method.losses.items():
                where = f'{source}: {group}.{name}.losses.{loss_name}'
                cls = MODELS.module_dict.get(loss.type)
                if cls is None or not getattr(cls, 'is_distill_loss', False):
                    from dfmsd.models.losses import LOSS_TYPES

                    raise ParamsError(f'{where}.type: unknown loss {loss.type!r} (known: {", ".join(LOSS_TYPES)})')
                accepted = set(inspect.signature(cls.__init__).parameters) - {
                    'self',
                    'student_channels',
                    'teacher_channels',
                }
                extra = sorted(set(loss.model_dump(exclude_none=True)) - {'type'} - accepted)
                if extra:
                    raise ParamsError(
                        f'{where}: {loss.type} takes no {", ".join(extra)} (it takes: {", ".join(sorted(accepted))})'
                    )
            if method.aug_loss_weight:
                from dfmsd.models.losses import MaskedReconstructionLoss

                if not any(
                    issubclass(MODELS.module_dict[loss.type], MaskedReconstructionLoss)
                    for loss in method.losses.values()
                ):
                    raise ParamsError(
                        f'{source}: {group}.{name}.aug_loss_weight: the ME loss reuses a masked '
                        f'reconstruction loss (DMKDLoss, MGDLoss, AMDLoss); this method has none'
                    )


def inputs_dir(preset: str | None) -> Path | None:
    """Where the pipeline reads the files params name: here, or a preset's worktree; None while
    flows.presets has not made that worktree yet (then nothing of the user's can be in it)."""
    if not preset:
        return Path('.')
    return WORKTREES / preset if (WORKTREES / preset).is_dir() else None


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog='python -m dfmsd.check', description=__doc__.splitlines()[0])
    parser.add_argument('params', nargs='?', default=str(DEFAULT_PARAMS))
    parser.add_argument('--preset', help='check params with presets/<name>.yaml merged over them')
    parser.add_argument('--shallow', action='store_true', help='schema only (no mmdet import)')
    args = parser.parse_args(argv)
    from dfmsd.core.errors import EXIT_CODE

    try:
        if args.preset:
            from dfmsd.core.presets import preset_params

            source = f'{args.params} + presets/{args.preset}.yaml'
            params = validate(preset_params(args.preset, args.params), source)
        else:
            source = args.params
            params = load_params(args.params)
        inputs = inputs_dir(args.preset)
        if not args.shallow:
            check_buildable(params, source, inputs)
    except DfmsdError as err:
        for line in str(err).splitlines():  # one prefixed line per problem
            print(f'error [params]: {line}', file=sys.stderr)
        return EXIT_CODE
    methods = sum(len(getattr(params, g)) for g in METHOD_GROUPS)
    print(
        f'[params] {source}: valid ({len(params.seeds)} seeds, {len(params.pairs)} pair(s), '
        f'{len(params.students)} student(s), {methods} method(s))'
    )
    if not args.shallow and inputs is None:
        print(f'[params] files not checked: the preset reads them in {WORKTREES / args.preset}/, not made yet')
    return 0


if __name__ == '__main__':
    sys.exit(main())
