"""Training progress from mmengine log lines.

mmengine's ``LoggerHook`` prints, every ``interval`` iterations, lines such as::

    ... - mmengine - INFO - Epoch(train)  [3][ 50/118]  base_lr: 1.0e-02 ... eta: 0:21:07  time: 0.41 ...
    ... - mmengine - INFO - Iter(train) [ 2000/90000]  base_lr: 1.0e-02 ... eta: 1 day, 2:03:04 ...

An ``Iter(train) [i/n]`` line gives the fraction done directly. An epoch-based line does
not say how many epochs there are, but its ``eta`` covers the whole run, so the fraction
done is estimated as ``elapsed / (elapsed + eta)``; with no ``eta``, the fraction of the
current epoch is used. Validation and test lines (``Epoch(val)``...) are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ['TrainProgress', 'parse_eta', 'parse_train_line']

_EPOCH = re.compile(r'Epoch\(train\)\s*\[\s*(\d+)\s*\]\s*\[\s*(\d+)\s*/\s*(\d+)\s*\]')
_ITER = re.compile(r'Iter\(train\)\s*\[\s*(\d+)\s*/\s*(\d+)\s*\]')
_ETA = re.compile(r'eta:\s*(?:(\d+)\s+days?,\s*)?(\d+):(\d{1,2}):(\d{1,2})')


def parse_eta(line: str) -> float | None:
    """Seconds of an mmengine ``eta: [N day(s), ]H:MM:SS`` field, or None."""
    m = _ETA.search(line)
    if not m:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


@dataclass(frozen=True)
class TrainProgress:
    percent: float  #: 0..100
    description: str


def parse_train_line(line: str, elapsed_s: float | None = None) -> TrainProgress | None:
    """Progress a training log line reports, or None when it is no training log line.

    ``elapsed_s``: seconds the stage has been running, used with the line's ``eta`` to
    estimate the progress of epoch-based training.
    """
    m = _ITER.search(line)
    if m:
        done, total = int(m.group(1)), int(m.group(2))
        if total <= 0:
            return None
        pct = 100.0 * min(done, total) / total
        return TrainProgress(pct, f'iteration {done}/{total}')
    m = _EPOCH.search(line)
    if m:
        epoch, done, total = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if total <= 0:
            return None
        eta = parse_eta(line)
        where = f'epoch {epoch}, iteration {done}/{total}'
        if eta is not None and elapsed_s is not None and elapsed_s + eta > 0:
            pct = 100.0 * elapsed_s / (elapsed_s + eta)
            return TrainProgress(pct, f'{where}, eta {_fmt(eta)} (estimated from eta)')
        return TrainProgress(100.0 * min(done, total) / total, f'{where} (of this epoch)')
    return None


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    text = f'{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}'
    return f'{days}d {text}' if days else text
