"""Progress of a run: each training's, from its mmengine log lines, and the run's, in stages done.

:class:`StageProgress` keeps a training stage's progress artifact (``progress-<stage>``) in step
with its log lines; :class:`RunProgress` keeps one progress artifact for the flow run: stages
done of the total, and the trainings in flight with their percentage.

Training progress from mmengine log lines.

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
import threading
import time
from dataclasses import dataclass

__all__ = ['RunProgress', 'StageProgress', 'TrainProgress', 'parse_eta', 'parse_train_line']

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


# --------------------------------------------------------------------------- artifacts


def _artifacts():
    """Prefect's progress artifact calls, or None outside a flow or task run (nothing to show it in)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return None
    return create_progress_artifact, update_progress_artifact


class StageProgress:
    """A training stage's progress artifact, kept in step with its mmengine log lines; a stage
    that fails shows where it stopped."""

    MIN_STEP = 1.0  # percentage points between two updates
    MIN_INTERVAL_S = 2.0

    def __init__(self, stage: str, key: str, run: RunProgress | None = None):
        self.stage, self.key, self.run = stage, key, run
        self.artifact_id = None
        self.started = time.monotonic()
        self.seen: TrainProgress | None = None  # the latest line's
        self.sent: tuple[float, float] = (-1.0, 0.0)  # (percent, when) of the latest update

    def _describe(self, progress: TrainProgress, what: str = '') -> str:
        # the percentage first: an artifact card shows the description's start only
        return f'{progress.percent:.0f}% · {what}{progress.description} · training of DVC stage `{self.stage}`'

    def feed(self, line: str) -> None:
        now = time.monotonic()
        progress = parse_train_line(line, elapsed_s=now - self.started)
        if progress is None:
            return
        self.seen = progress = TrainProgress(max(0.0, min(100.0, progress.percent)), progress.description)
        if self.run is not None:
            self.run.training(self.stage, progress.percent)
        last_pct, last_time = self.sent
        if self.artifact_id is not None and not (
            progress.percent >= 100.0
            or (progress.percent - last_pct >= self.MIN_STEP and now - last_time >= self.MIN_INTERVAL_S)
        ):
            return
        self._send(progress, self._describe(progress))

    def _send(self, progress: TrainProgress, description: str) -> None:
        if (calls := _artifacts()) is None:
            return
        create, update = calls
        if self.artifact_id is None:
            self.artifact_id = create(progress=progress.percent, key=self.key, description=description)
        else:
            update(artifact_id=self.artifact_id, progress=progress.percent, description=description)
        self.sent = (progress.percent, time.monotonic())

    def finish(self, ok: bool) -> None:
        """The last state: done (100%), or where a failed training stopped."""
        if self.seen is None:
            return
        if ok:
            self._send(TrainProgress(100.0, 'done'), f'100% · done · training of DVC stage `{self.stage}`')
        else:
            self._send(self.seen, self._describe(self.seen, 'failed at '))


class RunProgress:
    """The flow run's progress artifact: stages done of the total and the trainings in flight,
    updated as stages end and (at most every ``MIN_INTERVAL_S``) as trainings advance."""

    MIN_INTERVAL_S = 5.0  # between two updates for a training's progress
    MIN_DONE_INTERVAL_S = 1.0  # between two updates for a stage that ended

    def __init__(self, total: int, key: str):
        self.total, self.key = total, key
        self.outcomes: dict[str, str] = {}
        self.in_flight: dict[str, float] = {}
        self.lock = threading.Lock()
        self.artifact_id = None
        self.last_time = 0.0

    def start(self) -> None:
        with self.lock:
            self._send()

    def training(self, stage: str, percent: float) -> None:
        with self.lock:
            self.in_flight[stage] = percent
            self._send(at_once=False)

    def done(self, stage: str, outcome: str) -> None:
        with self.lock:
            self.outcomes[stage] = outcome
            self.in_flight.pop(stage, None)
            self._send(at_once=len(self.outcomes) == self.total, interval=self.MIN_DONE_INTERVAL_S)

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        text = f'{self.percent():.0f}% · {len(self.outcomes)} of {self.total} stages done'
        if counts:
            text += ' (' + ', '.join(f'{n} {o}' for o, n in sorted(counts.items())) + ')'
        if self.in_flight:
            text += '; training: ' + ', '.join(f'`{s}` {p:.0f}%' for s, p in sorted(self.in_flight.items()))
        return text

    def percent(self) -> float:
        """Stages done, a training in flight counting for the fraction it has done."""
        done = len(self.outcomes) + sum(p / 100.0 for p in self.in_flight.values())
        return 100.0 * done / max(1, self.total)

    def _send(self, at_once: bool = True, interval: float | None = None) -> None:
        """Create or update the artifact; an update waits ``MIN_INTERVAL_S`` unless ``at_once``
        (an update is a write to the server's database: one per stage made a 53-stage no-op
        run 10x slower)."""
        wait = self.MIN_INTERVAL_S if interval is None else interval
        if (not at_once and time.monotonic() - self.last_time < wait) or (calls := _artifacts()) is None:
            return
        create, update = calls
        percent = self.percent()
        try:
            if self.artifact_id is None:
                self.artifact_id = create(progress=percent, key=self.key, description=self.describe())
            else:
                update(artifact_id=self.artifact_id, progress=percent, description=self.describe())
        except Exception:  # progress is a nicety: never fail a run over it
            return
        self.last_time = time.monotonic()
