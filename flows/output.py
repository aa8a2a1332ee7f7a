"""What a stage's output lines mean: the log level each goes out at, and why a failed stage failed.

A stage's output reaches the Prefect task log line by line (:func:`flows.stage_task.dvc_stage`).
:class:`LineLevels` gives each line a level, so that Prefect's level filter works:

* mmengine's own level (``... - mmengine - WARNING - ...``), and ``WARNING`` for a Python
  warning (``file.py:12: UserWarning: ...``, with the source line that follows it);
* ``DEBUG`` (not sent at Prefect's default level) for boilerplate: mmengine's per-parameter
  ``init_weights`` dump (three lines per parameter, 287 lines for one student), an mmengine
  record with no text, and DVC's advice to ``git add`` and ``dvc push`` after each stage;
* ``INFO`` for the rest, error lines included: the cause of a failure is logged once, at
  ``ERROR``, when the stage has ended (:func:`cause_of`).
"""

from __future__ import annotations

import logging
import re

__all__ = ['LineLevels', 'cause_of']

_MMENGINE = re.compile(r'^\d\d/\d\d \d\d:\d\d:\d\d - mmengine - (DEBUG|INFO|WARNING|ERROR|CRITICAL) - ?(.*)$')
_PARAM_INIT = re.compile(r'^[\w.]+ - torch\.Size\(\[[\d, ]*\]\):\s*$')  # followed by its init line
_PY_WARNING = re.compile(r'^\S+:\d+: \w*Warning: ')
_DVC_ADVICE = (
    'To track the changes with git, run:',
    'To enable auto staging, run:',
    'Use `dvc push` to send your updates to remote storage.',
)
_DVC_ADVICE_COMMANDS = re.compile(r'^\s+(git add |dvc config core\.autostage )')
_OUR_ERROR = re.compile(r'^error \[[^\]]*\]: ')  # dfmsd.core.cli.run
_DVC_ERROR = re.compile(r'^ERROR: ')
_EXCEPTION = re.compile(r'^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b(: .*)?$')


class LineLevels:
    """The level of each line of one stage's output, in order (a line may depend on the one before)."""

    def __init__(self) -> None:
        self._next: int | None = None  # the level the next line takes, for a two-line record

    def __call__(self, line: str) -> int:
        if self._next is not None:
            level, self._next = self._next, None
            if line.startswith((' ', '\t')) or level == logging.DEBUG:
                return level
        if m := _MMENGINE.match(line):
            return getattr(logging, m.group(1)) if m.group(2).strip() else logging.DEBUG
        if _PARAM_INIT.match(line):
            self._next = logging.DEBUG
            return logging.DEBUG
        if _PY_WARNING.match(line):
            self._next = logging.WARNING
            return logging.WARNING
        if line.strip() in _DVC_ADVICE or _DVC_ADVICE_COMMANDS.match(line):
            return logging.DEBUG
        return logging.INFO


def cause_of(lines: list[str]) -> str | None:
    """The line of a failed stage's output that says why: the stage's own ``error [stage]: ...``,
    else the last exception of a traceback, else DVC's ``ERROR: ...``; None if there is none."""
    for pattern in (_OUR_ERROR, _EXCEPTION, _DVC_ERROR):
        for line in reversed(lines):
            if pattern.match(line.strip()):
                return line.strip()
    return None
