"""What keeps a pipeline run to itself: one run per workspace, and no stage process left behind.

* :func:`workspace`: "this workspace is mine" for the whole run. A file lock (``filelock``,
  an OS ``flock``: released when the process ends, however it ends) in
  ``<repo>/.dvc/tmp/dfmsd-run.lock``, or ``.presets/<name>.lock`` beside a preset's worktree
  (so that it can be taken before the worktree is refreshed). A second run on the same
  workspace is refused at once with :class:`WorkspaceBusy`, naming the holder's pid and start
  time; the same process may take it again (a preset run calls the flow).
* :func:`start_stage_process`: a stage's process (``dvc repro``, a training command) in a
  session and process group of its own, remembered until it ends; :func:`end_process_group`
  ends such a group and everything it started (SIGTERM, then SIGKILL after a grace period),
  :func:`end_all` every one still running.
* :func:`on_signals`: SIGINT and SIGTERM end every stage process group (:func:`end_all`),
  then raise :class:`Interrupted` in the main thread; the entry point exits with 128 +
  signum (130, 143). Stage processes do not get a terminal's Ctrl-C themselves (their own
  session), and a run started in the background, whose SIGINT is ignored, still stops on it.
  :func:`deferred` holds a signal back while a block must not be cut in two, and
  :func:`check` raises it where a run waits, in case the exception was lost where it landed.

The checkpoints that a training process wrote before it was stopped are what the next run
resumes from (:mod:`dfmsd.engine.training`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dfmsd.core.errors import DfmsdError
from dfmsd.core.presets import WORKTREES

#: Seconds a stage process group gets to end after SIGTERM, before SIGKILL.
GRACE_S = 10.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class WorkspaceBusy(DfmsdError):
    """Another run holds the workspace's lock."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; every stage process group has been ended."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f'interrupted by {signal.Signals(signum).name}')

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# --------------------------------------------------------------------------- the workspace lock


def lock_path(workspace: str | Path) -> Path:
    """The lock file of ``workspace``: ``.presets/<name>.lock`` for a preset's worktree,
    ``.dvc/tmp/dfmsd-run.lock`` (git-ignored by DVC) in any other repository."""
    root = Path(workspace).resolve()
    if root.parent.name == WORKTREES.name:
        return root.parent / f'{root.name}.lock'
    return root / '.dvc' / 'tmp' / 'dfmsd-run.lock'


def _write_holder(fd: int) -> None:
    holder = {'pid': os.getpid(), 'started': time.strftime('%Y-%m-%d %H:%M:%S %z')}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode() + b'\n', 0)


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f'pid {holder["pid"]}, started {holder["started"]}'
    except (OSError, ValueError, KeyError, TypeError):  # written a moment after the lock is taken
        return 'pid unknown'


@contextmanager
def workspace(path: str | Path) -> Iterator[Path]:
    """Hold ``path``'s lock (:func:`lock_path`) for the block, or raise :class:`WorkspaceBusy`
    at once if another process holds it. Reentrant within a process."""
    from filelock import FileLock, Timeout

    root = Path(path).resolve()
    file = lock_path(root)
    if not file.parent.parent.is_dir():  # no .dvc/ (or no repository): not a workspace to create
        raise DfmsdError(f'{root} is not a DVC repository ({file.parent.parent} does not exist)')
    file.parent.mkdir(exist_ok=True)
    lock = FileLock(file, is_singleton=True, thread_local=False, on_acquired=_write_holder)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise WorkspaceBusy(f'another run holds {root} ({_holder(file)}): wait for it or stop it') from None
    try:
        yield root
    finally:
        lock.release()


# --------------------------------------------------------------------------- stage processes

#: Stage processes started by :func:`start_stage_process` and not ended yet.
_live: set[subprocess.Popen] = set()
#: The signal that stopped the run (no new stage process starts), or None.
_stopping: int | None = None
_deferring = 0
_pending: int | None = None


def start_stage_process(cmd: list[str], **popen) -> subprocess.Popen:
    """``subprocess.Popen(cmd, **popen)`` in a new session (its own process group), ended by
    :func:`end_all`; call :func:`forget` once it has been waited for. Raises
    :class:`Interrupted` once a signal has stopped the run."""
    if _stopping is not None:
        raise Interrupted(_stopping)
    proc = subprocess.Popen(cmd, start_new_session=True, **popen)
    _live.add(proc)
    if _stopping is not None:  # the signal came while it started: end_all may have missed it
        end_process_group(proc)
        proc.wait()
        forget(proc)
        raise Interrupted(_stopping)
    return proc


def forget(proc: subprocess.Popen) -> None:
    _live.discard(proc)


def end_process_group(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    """End the process group that ``proc`` leads and every descendant of ``proc`` (also those
    in sessions of their own, e.g. torchrun's workers): SIGTERM, up to ``grace`` seconds, then
    SIGKILL; returns once they are gone (or 5 s after SIGKILL)."""
    import psutil

    def members() -> list[psutil.Process]:  # the leader's tree, and its group's orphans
        found = {}
        if proc.poll() is None:
            try:
                leader = psutil.Process(proc.pid)
                found = {p.pid: p for p in [leader, *leader.children(recursive=True)]}
            except psutil.NoSuchProcess:
                pass
        for p in psutil.process_iter():
            try:
                if p.pid not in found and os.getpgid(p.pid) == proc.pid:
                    found[p.pid] = p
            except (ProcessLookupError, PermissionError):
                pass
        return list(found.values())

    def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
        proc.poll()  # reap the leader if no other thread is waiting on it
        out = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    def send(sig: int, procs: list[psutil.Process]) -> None:
        if proc.returncode is None:  # not reaped: the group id is still this run's
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def wait(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
        deadline = time.monotonic() + seconds
        while (procs := alive(procs)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return procs

    procs = members()
    send(signal.SIGTERM, procs)
    left = wait(procs, grace)
    if left or proc.poll() is None:
        send(signal.SIGKILL, left + members())
        wait(left + members(), 5.0)


def end_all(grace: float = GRACE_S) -> int:
    """End every stage process group still running (each its ``grace``); how many there were."""
    procs = list(_live)
    threads = [threading.Thread(target=end_process_group, args=(p, grace)) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(procs)


def _stop(signum: int, frame=None) -> None:
    global _stopping
    if _stopping is not None:  # already stopping (make forwards a SIGTERM its group also got)
        return
    _stopping = signum
    end_all()
    if not _in_finalizer(frame):  # else it would be printed and dropped: check() raises it next
        raise Interrupted(signum)


def _in_finalizer(frame) -> bool:
    """Whether the signal landed in a ``__del__`` (a garbage collection in the main thread), where
    an exception is printed as "Exception ignored" with its traceback, and dropped."""
    while frame is not None:
        if frame.f_code.co_name == '__del__':
            return True
        frame = frame.f_back
    return False


def check() -> None:
    """Raise :class:`Interrupted` if a signal has stopped the run. The handler raises it where the
    main thread is, but an exception raised there can be lost (in a finalizer, or caught by
    library code): the run's waits call this too."""
    if _stopping is not None:
        raise Interrupted(_stopping)


def _handler(signum: int, frame) -> None:
    global _pending
    if _deferring:
        _pending = _pending or signum
        return
    _stop(signum, frame)


def reclaim_sigterm() -> None:
    """Within :func:`on_signals`, SIGTERM back to this module. A Prefect flow run installs its own
    SIGTERM handler, which raises ``TerminationSignal`` where the main thread is and ends no stage
    process; one raised in a finalizer was dropped, and the run went on. Prefect restores ours
    when the flow run ends. Elsewhere (a deployment's flow run) Prefect's handler stays."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _handler:
        signal.signal(signal.SIGTERM, _handler)


@contextmanager
def on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM end every stage process group and raise
    :class:`Interrupted` (in the main thread; elsewhere this does nothing). The previous
    handlers come back afterwards."""
    global _stopping
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if previous[signal.SIGTERM] is not _handler:  # the outermost block: a later run starts afresh
            _stopping = None


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends (e.g. while files are moved)."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending is not None:
            signum, _pending = _pending, None
            _stop(signum)
