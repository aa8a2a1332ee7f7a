"""Shared entry point of the stage commands: one clear error line, non-zero exit."""
from __future__ import annotations

import os
import sys
from typing import Callable


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by bad input or set-up, reported without a traceback."""
    from dfmsd.params import ParamsError
    errors: list[type[BaseException]] = [ParamsError, FileNotFoundError]
    for module, name in (('dfmsd.data', 'DatasetError'), ('dfmsd.models.distiller', 'DistillError'),
                         ('dfmsd.download', 'DownloadError')):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def run(main: Callable[[], object]) -> None:
    """Run a stage's main(); known input errors become `error: ...` and exit status 2.

    DFMSD_TRACEBACK=1 shows the full traceback for those too.
    """
    stage = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    try:
        main()
    except expected_errors() as err:
        if os.environ.get('DFMSD_TRACEBACK'):
            raise
        print(f'error [{stage}]: {err}', file=sys.stderr, flush=True)
        sys.exit(2)
