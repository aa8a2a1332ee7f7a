"""Check params.yaml (or a preset) before DVC touches any output: what ``make repro`` and
``make flow`` run first.

    python -m dfmsd.check [params.yaml] [--preset NAME] [--shallow]

The schema (dfmsd.core.params) checks types, ranges and cross-references; this module adds
what needs mmdet: config files exist, loss types are registered and take the given
arguments. Every problem is one ``error [params]: <key path>: ...`` line, exit status 2.
"""

from __future__ import annotations

import sys

from dfmsd.core.errors import ParamsError
from dfmsd.core.params import DEFAULT_PARAMS, METHOD_GROUPS, ROLES, Params, ZooTeacher, load_params, validate


def check_buildable(params: Params, source: str = 'params.yaml') -> None:
    """What the schema cannot see without mmdet: config files and loss types/arguments."""
    import inspect

    from mmdet.registry import MODELS

    from dfmsd.engine.configs import resolve_config
    from dfmsd.models import losses  # noqa: F401  (registers them)

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


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog='python -m dfmsd.check', description=__doc__.splitlines()[0])
    parser.add_argument('params', nargs='?', default=str(DEFAULT_PARAMS))
    parser.add_argument('--preset', help='check params with presets/<name>.yaml merged over them')
    parser.add_argument('--shallow', action='store_true', help='schema only (no mmdet import)')
    args = parser.parse_args(argv)
    from dfmsd.core.errors import EXIT_CODE, DfmsdError

    try:
        if args.preset:
            from dfmsd.core.presets import preset_params

            source = f'{args.params} + presets/{args.preset}.yaml'
            params = validate(preset_params(args.preset, args.params), source)
        else:
            source = args.params
            params = load_params(args.params)
        if not args.shallow:
            check_buildable(params, source)
    except DfmsdError as err:
        for line in str(err).splitlines():  # one prefixed line per problem
            print(f'error [params]: {line}', file=sys.stderr)
        return EXIT_CODE
    methods = sum(len(getattr(params, g)) for g in METHOD_GROUPS)
    print(
        f'[params] {source}: valid ({len(params.seeds)} seeds, {len(params.pairs)} pair(s), '
        f'{len(params.students)} student(s), {methods} method(s))'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
