"""Interruptions and concurrent runs, through the real entry points (`make repro`,
`python -m flows`, `python -m flows --preset smoke`) on a copy of the smoke project.

* A signal to the pipeline ends every process it started (DVC, the stage command, its
  children, the local Dask cluster's workers), the flow exits with 128 + signum, and a rerun
  resumes the training from its last verified checkpoint and completes: SIGTERM to the flow's process alone, and SIGINT
  or SIGTERM to `make repro`'s process group while SIGINT is ignored (what a background job
  of a non-interactive shell inherits).
* A second run on a workspace that a run holds refuses at once with one `error [...]` line
  (exit 2, no traceback) naming the holder, and the first completes with its outputs intact:
  two `python -m flows` in one clone, two `python -m flows --preset smoke` in one clone.

Each test trains the smoke preset's weak teacher (`teacher@tiny-weak`, upstream: `data`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from support import copy_project, env, preset_params, run

pytestmark = pytest.mark.timeout(600)

STAGE = 'teacher@tiny-weak'
WORK_DIR = 'teacher-tiny-weak-*'  # dfmsd.core.io.work_dir_label(STAGE) + the config digest
MODEL = 'models/teachers/tiny/weak/model.pth'
#: Iterations of the interrupted teacher and its checkpoint interval: the signal comes once the
#: first checkpoint is verified, while there is still training left for the rerun to resume.
ITERS, INTERVAL = 120, 4
RUNNER = [sys.executable, '-m', 'flows', '--no-experiment', '--jobs', '1', '--target', STAGE]
#: Printed once `data` is done: the teacher's training (tens of seconds) comes next.
UNDER_WAY = "Task run 'data' - Finished in state Completed("
#: The flow's summary line of the trained stage.
RAN = f'| `{STAGE}` | ran |'


def project(tmp_path: Path, *, iters: int | None = None, interval: int | None = None) -> Path:
    params = preset_params('smoke')
    if iters:
        params['pairs']['tiny']['weak']['iters'] = iters
    if interval:
        params['train']['checkpoint_interval'] = interval
    return copy_project(tmp_path / 'project', params=params)


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _stop_what_a_test_left():
    """A test that fails half-way leaves no run behind: SIGTERM to its group, then SIGKILL."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def start(cmd: list[str], root: Path, log: Path) -> subprocess.Popen:
    """``cmd`` in ``root``, in a session of its own (as a shell starts a job), output to ``log``."""
    with log.open('wb') as out:
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=env(PYTHONPATH=str(root)),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _started.append(proc)
    return proc


def wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := ready():
            return found
        if proc.poll() is not None:
            pytest.fail(f'exited with {proc.returncode} before {what}:\n{log.read_text()[-4000:]}')
        time.sleep(0.1)
    pytest.fail(f'no {what} after {timeout} s:\n{log.read_text()[-4000:]}')


def verified_checkpoint(root: Path) -> str | None:
    """The name of the newest checkpoint with its hash recorded (what a rerun resumes from)."""
    found = [p.name.removesuffix('.sha256') for p in (root / 'work_dirs').glob(f'{WORK_DIR}/iter_*.pth.sha256')]
    return max(found, key=lambda name: int(name[5:-4]), default=None)


def training(root: Path) -> list[psutil.Process]:
    """The stage's training processes (``stages/teacher.py``, on a Dask worker of the flow)."""
    found = []
    for p in psutil.process_iter(['cmdline', 'cwd']):
        try:
            if p.info['cwd'] == str(root) and any('stages/teacher.py' in a for a in p.info['cmdline'] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def left_behind(root: Path, known: list[psutil.Process]) -> list[str]:
    """Processes of the run still alive: those seen before the signal, and any running in
    the project (its cwd inside it)."""
    alive = []
    for p in [*known, *psutil.process_iter()]:
        try:
            inside = p.cwd().startswith(str(root))
            if (p in known or inside) and p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f'{p.pid} {" ".join(p.cmdline())[:200]}')
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return sorted(set(alive))


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def interrupt(root: Path, log: Path, cmd: list[str], send) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """Start ``cmd``; once the training has written a verified checkpoint and still runs, call
    ``send(proc)``; return the process (ended) and every process the run had started."""
    proc = start(cmd, root, log)
    wait_for('verified checkpoint', lambda: verified_checkpoint(root), proc, log)
    trainers = wait_for('training process', lambda: training(root), proc, log, timeout=10)
    known = descendants(proc.pid)
    assert set(trainers) <= set(known), (trainers, known)
    send(proc)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f'still running 60 s after the signal:\n{log.read_text()[-4000:]}')
    return proc, known


def assert_nothing_left(root: Path, known: list[psutil.Process]) -> None:
    deadline = time.monotonic() + 5  # a process the flow ended may take a moment to be reaped by init
    while (alive := left_behind(root, known)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, alive


def assert_rerun_resumes(root: Path, checkpoint: str) -> None:
    res = run(RUNNER, root, timeout=600)
    logs = res.stdout + res.stderr  # the stages' lines come through Prefect's logger (stderr)
    assert f'resuming from {checkpoint}' in logs, logs[-4000:]  # dfmsd.engine.training
    assert RAN in res.stdout, res.stdout[-4000:]
    assert (root / MODEL).is_file()
    status = run([sys.executable, '-m', 'dvc', 'status', '--json', STAGE], root).stdout
    assert json.loads(status[status.find('{') :]) == {}, status


def test_sigterm_to_the_flow_ends_every_stage_process_and_a_rerun_resumes(tmp_path):
    """`kill <flow pid>`: the flow's process alone gets SIGTERM (its stage processes are in
    sessions of their own, so only the flow can end them)."""
    root = project(tmp_path, iters=ITERS, interval=INTERVAL)
    log = tmp_path / 'flow.log'
    proc, known = interrupt(root, log, RUNNER, lambda p: os.kill(p.pid, signal.SIGTERM))
    out = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, out[-4000:]
    assert 'flow run stopped: interrupted by SIGTERM' in out and 'Traceback' not in out, out[-4000:]
    assert_nothing_left(root, known)
    checkpoint = verified_checkpoint(root)
    assert checkpoint is not None
    assert_rerun_resumes(root, checkpoint)


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_a_signal_to_make_repro_s_process_group_ends_everything(tmp_path, sig):
    """A signal to `make repro`'s whole process group (Ctrl-C, `kill -- -PGID`, a job
    scheduler), make started by a non-interactive shell in the background, so SIGINT is
    ignored (`trap '' INT`). make forwards no SIGINT (and repeats SIGTERM): the flow stops
    the run itself. The rerun is checked after SIGINT only (the test above checks it after
    SIGTERM)."""
    root = project(tmp_path, iters=ITERS, interval=INTERVAL)
    log = tmp_path / 'make.log'
    make = f"make -o setup repro TARGETS='{STAGE}' JOBS=1 PY={sys.executable}"
    cmd = ['bash', '-c', f"trap '' INT; exec {make}"]
    proc, known = interrupt(root, log, cmd, lambda p: os.killpg(p.pid, sig))
    out = log.read_text()
    assert proc.returncode != 0, out[-4000:]
    assert f'flow run stopped: interrupted by {sig.name}' in out and 'Traceback' not in out, out[-4000:]
    assert f'Error {128 + sig}' in out, out[-4000:]  # make's word for the flow's exit status
    assert_nothing_left(root, known)
    if sig == signal.SIGINT:
        checkpoint = verified_checkpoint(root)
        assert checkpoint is not None
        assert_rerun_resumes(root, checkpoint)


def assert_refused(res, workspace: Path, holder: int, tag: str) -> None:
    """Exit 2, no traceback, one error line naming the workspace and the run that holds it."""
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-4000:]
    assert 'Traceback' not in out, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith('error [')]
    expected = (
        rf'error \[{tag}\]: another run holds {re.escape(str(workspace))} '
        rf'\(pid {holder}, started [^)]+\): wait for it or stop it'
    )
    assert len(errors) == 1 and re.fullmatch(expected, errors[0]), errors


def test_a_second_run_in_the_same_clone_refuses_and_the_first_completes(tmp_path):
    root = project(tmp_path)
    log = tmp_path / 'first.log'
    first = start(RUNNER, root, log)
    wait_for('the first run under way', lambda: UNDER_WAY in log.read_text(), first, log, timeout=120)
    second = run(RUNNER, root, check=False, timeout=120)
    assert first.poll() is None, 'the first run ended before the second was refused: no test'
    assert_refused(second, root, first.pid, 'flow')
    assert first.wait(timeout=600) == 0, log.read_text()[-4000:]
    assert (root / MODEL).is_file()
    status = run([sys.executable, '-m', 'dvc', 'status', '--json', STAGE], root).stdout
    assert json.loads(status[status.find('{') :]) == {}, status


def test_a_second_preset_run_in_the_same_clone_refuses_and_the_first_completes(tmp_path):
    """Two `make repro PRESET=smoke` at once: the second must not touch the worktree that the
    first refreshes and runs in (it used to crash in the refresh, the first then had to restore)."""
    root = project(tmp_path)
    cmd = [sys.executable, '-m', 'flows', '--preset', 'smoke', '--jobs', '1', '--target', STAGE]
    log = tmp_path / 'first.log'
    first = start(cmd, root, log)
    wait_for('the first run under way', lambda: UNDER_WAY in log.read_text(), first, log, timeout=120)
    second = run(cmd, root, check=False, timeout=120)
    assert first.poll() is None, 'the first run ended before the second was refused: no test'
    assert_refused(second, root / '.presets' / 'smoke', first.pid, 'flow')
    assert first.wait(timeout=600) == 0, log.read_text()[-4000:]
    out = log.read_text()
    assert RAN in out and 'restored' not in out, out[-4000:]
    tree = root / '.presets' / 'smoke'
    assert (tree / MODEL).is_file()
    status = run([sys.executable, '-m', 'dvc', 'status', '--json', STAGE], tree).stdout
    assert json.loads(status[status.find('{') :]) == {}, status
    assert yaml.safe_load((tree / 'dvc.lock').read_text())['stages'].keys() >= {'data', STAGE}


def sleeping(pid: int) -> set[str]:
    found = set()
    for p in descendants(pid):
        try:
            if p.name() == 'sleep':
                found.add(p.cmdline()[-1])
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.fast
def test_ending_a_stage_process_group_ends_its_whole_tree():
    """flows.guard, the mechanism under the entry points: a stage process that ignores SIGTERM,
    its child, and a grandchild in a session of its own (as torchrun starts its workers) all
    end: SIGTERM, then SIGKILL after the grace period."""
    from flows import guard

    script = "trap '' TERM; sleep 300 & setsid sleep 301 & echo started; wait"
    proc = guard.start_stage_process(['bash', '-c', script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b'started\n'
        deadline = time.monotonic() + 10
        while (sleeps := sleeping(proc.pid)) != {'300', '301'} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sleeps == {'300', '301'}
        tree = descendants(proc.pid)
        started = time.monotonic()
        guard.end_process_group(proc, grace=0.5)
        assert proc.wait(timeout=5) == -signal.SIGKILL  # it ignored SIGTERM
        assert time.monotonic() - started < 5
        assert_nothing_left(Path('/nonexistent'), tree)  # only the processes seen before
    finally:
        guard.end_process_group(proc, grace=0)  # at once, if an assertion stopped the test early
        proc.wait()
        guard.forget(proc)
        proc.stdout.close()


class _SignalledWhileCollected:
    """Sends this process SIGTERM from its finalizer: the handler runs inside ``__del__``, as when
    a garbage collection in the flow's main thread (an asyncio transport's) meets the signal."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs here, in the finalizer


@pytest.mark.fast
def test_a_signal_that_lands_in_a_finalizer_still_stops_the_run(monkeypatch):
    """An exception raised in a finalizer is printed ("Exception ignored", a traceback) and
    dropped: the stop must not depend on it. The stage processes end at once and the run's next
    wait raises."""
    from flows import guard

    dropped = []  # what Python prints as "Exception ignored in: ..."
    monkeypatch.setattr(sys, 'unraisablehook', dropped.append)
    proc = guard.start_stage_process(['sleep', '300'])
    with guard.on_signals():
        _SignalledWhileCollected()  # no reference kept: collected here
        assert proc.poll() == -signal.SIGTERM
        with pytest.raises(guard.Interrupted) as stop:
            guard.check()
    guard.forget(proc)
    assert stop.value.signum == signal.SIGTERM
    assert not dropped, [d.exc_value for d in dropped]


def test_within_a_prefect_flow_run_sigterm_ends_the_run_as_sigint_does(prefect_api, monkeypatch):
    """A Prefect flow run swaps in its own SIGTERM handler, which raises ``TerminationSignal``
    wherever the main thread is: raised in a finalizer it was dropped and the run went on (CI, and
    a preset run that needed a second SIGTERM). `dvc_pipeline` takes SIGTERM back first."""
    from prefect import flow

    from flows import guard

    dropped = []
    monkeypatch.setattr(sys, 'unraisablehook', dropped.append)

    @flow
    def stopped_while_collecting() -> str:
        guard.reclaim_sigterm()  # dvc_pipeline's first step
        _SignalledWhileCollected()
        guard.check()
        return 'went on'

    with guard.on_signals(), pytest.raises(guard.Interrupted):
        stopped_while_collecting()
    assert not dropped, [d.exc_value for d in dropped]
    assert signal.getsignal(signal.SIGTERM) is not guard._handler  # the previous handler is back
