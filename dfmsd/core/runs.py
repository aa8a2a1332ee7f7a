"""How a stage command talks to ``flows.runner``, the concurrent stage runner.

The runner splits a training stage in two. It was built on the belief that ``dvc repro``
holds the repository lock while a stage's command runs; DVC 3.67 releases it around the
command, but running DVC commands at once lost a stage of the smoke DAG to a race in one
trial, so the runner still runs one DVC command at a time:

* ``DFMSD_PHASE=commit``: DVC runs the stage as usual (``dvc repro --single-item``). A stage
  whose heavy work is already done (a verified final checkpoint in its work dir) just writes
  its outputs. One whose work is not done exits with :data:`NEEDS_TRAINING` at once, after
  recording its own command line in the run log.
* ``DFMSD_PHASE=train``: the runner starts that command line itself, outside DVC and its
  lock, several at a time; the command trains into its work dir and writes no output.

Then the runner lets DVC run the stage again, which finds the finished work and exports.
Without ``DFMSD_PHASE`` (a plain ``dvc repro``), a stage does everything in one go.

Every stage command that completes appends one JSON line ``{stage, phase, status, argv}``
to ``DFMSD_RUN_LOG`` (when set): the runner's machine-readable record of what ran. A stage
that DVC restores from its run-cache never runs, so it leaves no line.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

PHASE_ENV = 'DFMSD_PHASE'
RUN_LOG_ENV = 'DFMSD_RUN_LOG'
#: Exit status of a stage, under DFMSD_PHASE=commit, whose training is not done yet.
NEEDS_TRAINING = 75  # EX_TEMPFAIL


class NeedsTraining(Exception):
    """Raised in the commit phase by a stage whose training has not been run yet."""


def phase() -> str | None:
    return os.environ.get(PHASE_ENV) or None


def work_dir_label(stage: str) -> str:
    """A stage's work-dir name stem (file-name-safe): ``work_dirs/<label>-<config digest>``."""
    return re.sub(r'[^A-Za-z0-9_.-]+', '-', stage)


def record(stage: str, status: str) -> None:
    path = os.environ.get(RUN_LOG_ENV)
    if not path:
        return
    line = json.dumps({'stage': stage, 'phase': phase(), 'status': status, 'argv': sys.argv, 'cwd': os.getcwd()})
    with open(path, 'a', encoding='utf-8') as f:  # one short line per write: appends do not interleave
        f.write(line + '\n')


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
