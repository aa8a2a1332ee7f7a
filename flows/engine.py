"""Where the heavy stages run: a Dask distributed cluster.

A stage whose dvc.yaml ``meta`` says ``engine: dask`` (trainings, predictions) is submitted
to Dask with the resource ``GPU=<launch.nproc_per_node>``; a worker runs it and Dask's
scheduler decides where and when. The cluster is

* by default a ``LocalCluster`` of ``jobs`` one-thread worker processes, each with ``GPU=1``
  (on a CPU, a slot for one training);
* ``scheduler='tcp://host:port'``: an existing cluster (``dask scheduler`` and ``dask worker
  --resources GPU=8``, dask-jobqueue's SLURMCluster, dask-kubernetes; docs/cluster.md).

What a worker runs is the stage as DVC sees it (:func:`on_worker`):

* shared filesystem (``Workspace.root`` set): ``dvc repro --single-item <stage>`` in the
  controller's workspace, as a stage run there would;
* no shared filesystem (``Workspace.root`` None): in the worker's own clone
  (``DFMSD_WORKER_REPO``, else the worker's working directory) at the controller's commit,
  ``dvc repro --pull <stage>`` (upstream restored from the DVC remote's run-cache), then
  ``dvc push --run-cache``; the controller then restores the stage from the run-cache.

A worker that dies mid-stage: Dask runs the task again on another worker; the stage resumes
from its last verified checkpoint in ``work_dirs/`` (shared filesystem). The stage's process
tree dies with its worker (:mod:`flows.reaper`), so two copies never write the same outputs.
The controller releases each Dask future as soon as it has its result, so a worker lost later
costs no recomputation. The stage's output reaches the controller line by line as Dask
events (``Worker.log_event``, ``Client.subscribe_topic``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dfmsd.core.errors import DfmsdError
from dfmsd.core.io import TEACHER_MEMO_ENV
from flows import stages

#: The Dask resource a heavy stage requests, ``launch.nproc_per_node`` of them.
SLOT = 'GPU'
#: Seconds to reach the scheduler and to see a worker, before the run fails.
CONNECT_TIMEOUT_S = 30.0
WORKER_REPO_ENV = 'DFMSD_WORKER_REPO'


class ClusterError(DfmsdError):
    """No scheduler, no worker, or no worker that can take a stage: said in one line."""


@dataclass(frozen=True)
class Workspace:
    """Where a worker runs a stage: the controller's ``root`` (a shared filesystem), or its
    own clone at ``commit`` (``root`` None) that shares only the DVC remote. ``stop``: the name
    of the run's Dask ``Event`` that tells workers to end its stage processes."""

    root: str | None
    commit: str | None = None
    stop: str = field(default_factory=lambda: f'dfmsd-stop-{uuid.uuid4().hex}')
    #: the run's teacher-feature memo (shared filesystem only; dfmsd.models.teacher_memo)
    teacher_memo: str | None = None

    def stage_env(self) -> dict[str, str] | None:
        """The environment of a stage run in ``root``: with the memo's directory, if any."""
        if self.root is None or self.teacher_memo is None:
            return None
        return stages.subprocess_env(Path(self.root), **{TEACHER_MEMO_ENV: self.teacher_memo})


#: Dask settings of the local cluster only (a cluster of the user's keeps its own). Its workers
#: wait on one stage process each while the trainings keep every core busy, so each periodic
#: check is CPU taken from them (benchmarks/cluster_idle.py): the statistical profiler samples
#: each worker's threads 100 times a second for a dashboard nobody opens here; the event loop's
#: health tick runs 50 times a second, the memory monitor 10 times, the system monitor twice, in
#: the scheduler, each nanny and each worker. A second is soon enough for any of them here.
LOCAL_CLUSTER_CONFIG = {
    'distributed.worker.profile.enabled': False,
    'distributed.admin.tick.interval': '1s',
    'distributed.admin.system-monitor.interval': '1s',
    'distributed.worker.memory.monitor-interval': '1s',
}


@contextlib.contextmanager
def cluster(scheduler: str | None, jobs: int, timeout: float = CONNECT_TIMEOUT_S, slots: int = 1) -> Iterator:
    """A ``distributed.Client``: to ``scheduler``, or to a new local cluster of ``jobs``
    one-thread workers with ``slots`` slots each (the GPUs of one stage). Raises
    :class:`ClusterError` (naming the address) when no scheduler answers or no worker joins
    within ``timeout`` seconds."""
    from distributed import Client, LocalCluster

    logging.getLogger('distributed').setLevel(logging.WARNING)  # its INFO lines would fill the stages' log
    if scheduler is None:
        import dask

        with (
            dask.config.set(LOCAL_CLUSTER_CONFIG),  # the nannies pass it on to their workers
            LocalCluster(
                n_workers=max(1, jobs),
                threads_per_worker=1,
                processes=True,
                resources={SLOT: slots},
                silence_logs=logging.WARNING,
                preload=['flows.local_worker'],  # the flow handles a SIGINT to its group, not the workers
            ) as local,
            Client(local) as client,
        ):
            yield client
        return
    try:
        client = Client(scheduler, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f'no Dask scheduler answers at {scheduler} within {timeout:.0f} s ({exc})') from None
    with client:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise ClusterError(
                f'the Dask scheduler at {scheduler} has no worker (waited {timeout:.0f} s): '
                f'start one with `dask worker {scheduler} --nthreads 1 --resources {SLOT}=1`'
            ) from None
        yield client


def check_fits(client, need: int, address: str) -> None:
    """A stage asking for more slots than any worker has would wait for ever: say so now."""
    workers = client.scheduler_info(n_workers=-1)['workers'].values()
    most = max((w.get('resources', {}).get(SLOT, 0) for w in workers), default=0)
    if most < need:
        raise ClusterError(
            f'a stage needs {SLOT}={need} (launch.nproc_per_node) but no worker of the Dask scheduler at '
            f'{address} has more than {SLOT}={most:g}: start workers with `--resources {SLOT}={need}`'
        )


def run_stage(
    client, stage: str, workspace: Workspace, need: int, *, force: bool = False, on_line: Callable[[str], None]
) -> stages.StageResult:
    """Run ``stage`` on a worker with ``need`` slots; its output lines go to ``on_line`` (in
    this thread) as they come."""
    topic = f'dfmsd-stage-{uuid.uuid4().hex}'
    lines: queue.Queue[str] = queue.Queue()
    client.subscribe_topic(topic, lambda event: lines.put(event[1]))
    future = client.submit(
        on_worker, stage, workspace, topic, force, key=f'{stage}-{uuid.uuid4().hex[:8]}', resources={SLOT: need}
    )
    try:
        while True:
            with contextlib.suppress(queue.Empty):
                on_line(lines.get(timeout=0.5))
                continue
            if future.done():
                break
        if future.cancelled():  # the run is being stopped (flows.guard), or the client went
            return stages.StageResult(stage, 'cancelled', message='its Dask task was cancelled')
        try:
            result = future.result()
        except Exception as exc:  # KilledWorker (its workers kept dying), a worker's own error
            result = stages.StageResult(stage, 'failed', message=f'on Dask: {type(exc).__name__}: {exc}')
        while not lines.empty():
            on_line(lines.get_nowait())
        return result
    finally:
        with contextlib.suppress(Exception):  # the client may be closed already (an interrupted run)
            future.release()  # no result kept on a worker: a worker lost later costs nothing
            client.unsubscribe_topic(topic)


def on_worker(stage: str, workspace: Workspace, topic: str, force: bool) -> stages.StageResult:
    """On a Dask worker: bring ``stage`` up to date (see the module docstring)."""
    from distributed import get_worker

    worker = get_worker()

    def emit(line: str) -> None:
        worker.log_event(topic, line)

    where = f'{socket.gethostname()} {worker.address}'
    emit(f'[flow] {stage} on Dask worker {where}')
    with _ending_on(workspace.stop):
        try:
            result = _run_here(stage, workspace, force, emit)
        except Exception as exc:  # a clone at another commit, git missing...: the stage's failure, said once
            result = stages.StageResult(stage, 'failed', message=f'{type(exc).__name__}: {exc}')
    result.where = where
    return result


def _run_here(stage: str, workspace: Workspace, force: bool, emit) -> stages.StageResult:
    if workspace.root is not None:
        return stages.repro(
            Path(workspace.root), stage, force=force, on_line=emit, start=_start_reaped, env=workspace.stage_env()
        )
    clone = Path(os.environ.get(WORKER_REPO_ENV) or os.getcwd())
    _check_clone(clone, workspace.commit)
    result = stages.repro(clone, stage, force=force, pull=True, upstream=True, on_line=emit, start=_start_reaped)
    if not result.ok:
        return result
    # what the controller restores the stage from: the entry with its uncached outputs' copies, then
    # the entries (no target: with one, DVC leaves out the run-cache's copies of uncached outputs)
    code, out = stages.record_run_cache(clone, stage, push=True, on_line=emit, start=_start_reaped)
    if code == 0:
        code, out = stages.dvc(clone, 'push', '--run-cache', on_line=emit, start=_start_reaped)
    if code != 0:
        return stages.StageResult(stage, 'failed', result.seconds, f'run-cache push exited with {code}', out, code)
    return result


@contextlib.contextmanager
def _ending_on(event_name: str) -> Iterator[None]:
    """While the block runs, a thread that ends this worker's stage processes once the run's
    stop event is set (Dask cannot stop a running task: the flow sets it when interrupted)."""
    from distributed import Event, get_client

    from flows import guard

    done = threading.Event()
    # The task's thread has the worker's context; the watcher's does not, and an Event made there
    # raises at once: the loop then spun at about 30% of a core per worker, and never saw the event.
    client = get_client()

    def watch() -> None:
        stop = Event(event_name, client=client)
        while not done.is_set():
            try:
                if stop.wait(timeout=1.0):
                    guard.end_all()
                    return
            except Exception:  # the scheduler gone for a moment: try again in a second, not at once
                done.wait(1.0)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def stop_workers(client, workspace: Workspace) -> None:
    """Tell every worker to end the stage processes of this run (see :func:`_ending_on`)."""
    from distributed import Event

    with contextlib.suppress(Exception):
        Event(workspace.stop, client=client).set()


def _check_clone(clone: Path, commit: str | None) -> None:
    def git(*args: str) -> str:
        return subprocess.run(['git', *args], cwd=clone, capture_output=True, text=True, check=True).stdout.strip()

    head = git('rev-parse', 'HEAD')
    if head != commit:
        raise ClusterError(f'the clone {clone} of worker {socket.gethostname()} is at {head}, the run at {commit}')
    # what defines the stages; dvc.lock and tracked outputs change with every stage run here
    if changed := git('status', '--porcelain', '--untracked-files=no', '--', 'dvc.yaml', 'params.yaml'):
        raise ClusterError(f'the clone {clone} of worker {socket.gethostname()} has changes: {changed}')


def _start_reaped(cmd: list[str], **popen) -> subprocess.Popen:
    """A stage process that dies with its worker: started under :mod:`flows.reaper`, which ends
    its whole tree when the worker's thread or process goes away (Linux: PR_SET_PDEATHSIG)."""
    from flows import guard

    return guard.start_stage_process([sys.executable, str(Path(__file__).with_name('reaper.py')), *cmd], **popen)
