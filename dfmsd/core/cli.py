"""Entry point of every stage command: one clear error line, the project's exit code.

``run(main)`` turns a :class:`~dfmsd.core.errors.DfmsdError` into ``error [<stage>]: ...`` on
stderr and exit status 2, with no traceback (``DFMSD_TRACEBACK=1`` shows it).

With ``DFMSD_AUDIT=<dir>``, the command also records which files under the repository it
opened and which project modules it imported, in ``<dir>/<stage>.<pid>.json`` (a stage may
run as several processes: torchrun's workers); the test of dvc.yaml's declarations
(tests/test_pipeline.py) compares them with each stage's ``deps``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from dfmsd.core import numerics
from dfmsd.core.errors import EXIT_CODE, DfmsdError


def _stage_label() -> str:
    return os.environ.get('DVC_STAGE') or Path(sys.argv[0]).stem


def _start_audit(out_dir: str) -> Callable[[], None]:
    root = Path(os.environ.get('DVC_ROOT') or os.getcwd()).resolve()
    opened: set[str] = set()

    def hook(event: str, args: tuple) -> None:
        if event == 'open' and isinstance(args[0], (str, bytes, os.PathLike)):
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else 'r'
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            if any(c in mode for c in 'wax+') or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                return
            try:
                path = Path(os.fsdecode(args[0])).resolve()
            except (OSError, ValueError):
                return
            # a name opened relative to a directory descriptor (shutil.rmtree's dir_fd) resolves
            # against the cwd, to nothing or to an unrelated directory: only files are reads
            if path.is_relative_to(root) and path.is_file():
                opened.add(path.relative_to(root).as_posix())

    sys.addaudithook(hook)

    def finish() -> None:
        modules = set()
        for module in list(sys.modules.values()):
            file = getattr(module, '__file__', None)
            # only real files: torch's `torch.ops`/`torch.classes` name a bare '_ops.py'
            if file and os.path.isabs(file) and Path(file).resolve().is_relative_to(root):
                modules.add(Path(file).resolve().relative_to(root).as_posix())
        record = {'stage': _stage_label(), 'argv': sys.argv, 'opened': sorted(opened), 'modules': sorted(modules)}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        name = _stage_label().replace('/', '_').replace(':', '_')
        (Path(out_dir) / f'{name}.{os.getpid()}.json').write_text(json.dumps(record, indent=1))

    return finish


def run(main: Callable[[], object]) -> None:
    """Run a stage's ``main()``; a DfmsdError becomes one line and exit status 2."""
    numerics.pin()  # before the first tensor operation: each library reads its setting once
    audit = os.environ.get('DFMSD_AUDIT')
    finish = _start_audit(audit) if audit else None
    stage = _stage_label()
    try:
        main()
    except DfmsdError as err:
        if os.environ.get('DFMSD_TRACEBACK'):
            raise
        print(f'error [{stage}]: {err}', file=sys.stderr, flush=True)
        sys.exit(EXIT_CODE)
    finally:
        if finish:
            finish()
