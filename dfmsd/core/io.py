"""File helpers used by every stage: atomic writes, hashing and progress lines.

A stage that fails half-way must leave its previous output in place and no partial
file behind, so every output goes through a temporary sibling and one ``os.replace``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

CHUNK = 1 << 20


#: Where a stage keeps what it can resume from (checkpoints, predictions) until it exports.
WORK_ROOT = Path('work_dirs')
#: A flow run's teacher-feature memo (dfmsd.models.teacher_memo): the variable that names it to
#: the stages, and where the flow keeps it for the run (removed at its start and end).
TEACHER_MEMO_ENV = 'DFMSD_TEACHER_MEMO'
TEACHER_MEMO_DIR = WORK_ROOT / 'teacher-memo'


def work_dir_label(stage: str) -> str:
    """A stage's work-dir name stem (file-name-safe): ``work_dirs/<label>-<digest>``."""
    return re.sub(r'[^A-Za-z0-9_.-]+', '-', stage)


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    """Hex SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it onto ``path``.

    The temporary file's name never reaches ``write``: serialisers such as ``torch.save``
    would otherwise embed it and identical content would differ in bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """JSON with sorted-insertion order as given and a trailing newline (same dict, same bytes)."""
    separators = None if indent else (',', ':')
    return write_text(path, json.dumps(obj, indent=indent, separators=separators) + '\n')


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding='utf-8') as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh directory that replaces ``out_dir`` when the block succeeds.

    It sits beside ``out_dir`` (same filesystem, so the swap is a rename). On an
    exception it is deleted and ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.tmp-', dir=out_dir.parent))
    try:
        yield tmp_dir
        tmp_dir.chmod(0o755)
        _swap_in(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _swap_in(new_dir: Path, target: Path) -> None:
    """Move ``new_dir`` onto ``target``; an existing ``target`` is moved aside first and
    restored if the move fails."""
    if not (target.exists() or target.is_symlink()):
        new_dir.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f'.{target.name}.old-', dir=target.parent))
    old.rmdir()  # only the unique name is wanted
    target.rename(old)
    try:
        new_dir.rename(target)
    except OSError:
        old.rename(target)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


class Progress:
    """``label: done/total (rate/s)`` lines on stderr, about ``lines`` of them per run.

    Plain lines rather than a redrawn bar: stage output ends up in DVC and Prefect logs.
    """

    def __init__(self, total: int, label: str, *, unit: str = 'img', lines: int = 10, enabled: bool = True):
        self.total, self.label, self.unit = total, label, unit
        self.enabled = enabled and total > 0
        self.every = max(1, -(-total // max(1, lines)))
        self.done = 0
        self._start = time.perf_counter()

    def update(self, count: int = 1) -> None:
        before, self.done = self.done, self.done + count
        if self.enabled and (self.done >= self.total or self.done // self.every > before // self.every):
            rate = self.done / max(time.perf_counter() - self._start, 1e-9)
            print(f'{self.label}: {self.done}/{self.total} ({rate:.1f} {self.unit}/s)', file=sys.stderr, flush=True)
