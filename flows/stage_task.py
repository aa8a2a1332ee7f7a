"""One DVC stage as a Prefect task (:func:`dvc_stage`), as :mod:`flows.pipeline` submits it.

* a task runs ``dvc repro --single-item <stage>``: in the workspace for a light stage, on a
  Dask worker for a stage whose ``meta`` says ``engine: dask`` (:mod:`flows.engine`);
* its state says what happened: Completed named ``Skipped`` (up to date) or ``Restored``
  (from DVC's run-cache), Completed (ran), or Failed with the cause (retried ``retries``
  times). A stage downstream of a failure is Prefect's ``NotReady`` (Pending), made final
  (Cancelled-type, same name) once the run is over (:func:`flows.run_display.end_not_ready`);
* the stage's output streams into the task's log, each line at its level
  (:mod:`flows.output`); a failure's cause and last lines are one ERROR entry;
* each training's progress is an artifact (``progress-<stage>``), and each stage's end counts
  in the run's (:mod:`flows.progress`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.states import Cancelled, Completed, Failed, State

from flows import engine, stages
from flows.output import LineLevels
from flows.progress import RunProgress, StageProgress
from flows.results import slug
from flows.stages import StageResult

__all__ = ['NOT_READY', 'RESTORED', 'SKIPPED', 'Run', 'StageFailed', 'dvc_stage', 'result_of']

#: Name of the (Completed-type) state of a stage that was up to date and did not run.
SKIPPED = 'Skipped'
#: Name of the (Completed-type) state of a stage DVC restored from its run-cache.
RESTORED = 'Restored'
#: Name of the state of a stage whose upstream did not complete: Prefect's Pending, then
#: Cancelled-type (final) once the run is over.
NOT_READY = 'NotReady'


class StageFailed(RuntimeError):
    """A stage failed (:func:`flows.stages.repro` said so): raised for Prefect to retry it."""

    def __init__(self, result: StageResult):
        self.result = result
        super().__init__(f"DVC stage '{result.stage}' failed: {result.message}")

    def report(self) -> str:
        """The cause first, then the last lines of output (what the ERROR log entry says)."""
        r = self.result
        code = f' (exit code {r.exit_code})' if r.exit_code is not None else ''
        tail = '\n'.join(f'    {line}' for line in r.output) or '    (no output)'
        return f"DVC stage '{r.stage}' failed{code}: {r.message}\nLast {len(r.output)} lines of its output:\n{tail}"


@dataclass
class Run:
    """What the stage tasks of one flow run share: the workspace ``root``; for heavy stages, the
    Dask ``client`` with the ``workspace`` its workers use and the slots a stage asks for; the
    run's progress artifact, which each task reports its end to."""

    root: Path
    client: Any = None
    workspace: engine.Workspace | None = None
    need: int = 1
    force: bool = False
    progress: RunProgress | None = None


@task(name='dvc-stage', cache_policy=NO_CACHE, persist_result=False)
def dvc_stage(stage: str, run: Run, must_run: bool = True, heavy: bool = False) -> State:
    """Bring one DVC stage up to date; the returned state says what happened (Failed with the
    stage's error, no traceback), its data is the :class:`StageResult`. A failed stage with
    retries left raises :class:`StageFailed` instead, for Prefect to retry it."""
    logger = get_run_logger()
    result = None
    try:
        if not must_run:
            result = StageResult(stage, 'skipped', message='up to date (dvc status)')
            return Completed(name=SKIPPED, message=result.message, data=result)
        result = _bring_up_to_date(stage, run, heavy, logger)
        if result.outcome == 'cancelled':  # the run is being stopped: nothing to retry, no traceback
            return Cancelled(message=result.message, data=result)
        if result.outcome == 'failed':
            context = TaskRunContext.get()
            if context.task_run.run_count <= context.task.retries:  # Prefect retries on an exception only
                logger.warning('%s failed, to be retried: %s', stage, result.message)
                raise StageFailed(result)
            logger.error('%s', StageFailed(result).report())  # the cause, once, readable
            return Failed(message=result.message, data=result)
        name = {'skipped': SKIPPED, 'restored': RESTORED}.get(result.outcome, 'Completed')
        return Completed(name=name, message=result.message, data=result)
    finally:
        if result is not None and run.progress is not None:
            run.progress.done(stage, result.outcome)


def _bring_up_to_date(stage: str, run: Run, heavy: bool, logger) -> StageResult:
    """``dvc repro`` of the stage, here or on a Dask worker, its output into the task's log at
    each line's level (:class:`flows.output.LineLevels`) and its training into progress artifacts."""
    progress = StageProgress(stage, key=f'progress-{slug(stage)}', run=run.progress)
    level_of = LineLevels()

    def on_line(line: str) -> None:
        logger.log(level_of(line), line)
        try:
            progress.feed(line)
        except Exception as exc:  # progress is a nicety; never fail a stage over it
            logger.warning('could not update the progress artifact: %s', exc)

    if run.force:  # a forced run starts afresh, not from a checkpoint (once: a rerun after a lost worker resumes)
        stages.clear_work_dirs(run.root, stage)
    if heavy:
        result = engine.run_stage(run.client, stage, run.workspace, run.need, force=run.force, on_line=on_line)
        if result.ok and run.workspace.root is None:  # its outputs are in the remote's run-cache
            restored = stages.repro(run.root, stage, pull=True, on_line=on_line)
            result.outcome, result.message = restored.outcome, restored.message
            if restored.outcome == 'ran':
                logger.warning('%s: not in the run-cache the worker pushed, so it ran here', stage)
    else:
        result = stages.repro(run.root, stage, force=run.force, on_line=on_line)
        if result.ok and run.workspace is not None and run.workspace.root is None:  # for the workers
            code, out = stages.dvc(run.root, 'push', '--run-cache', stage, on_line=on_line)
            if code != 0:
                result = StageResult(stage, 'failed', result.seconds, f'`dvc push` exited with {code}', out, code)
    logger.info('%s: %s (%.1f s) %s %s', stage, result.outcome, result.seconds, result.where, result.message)
    try:
        progress.finish(ok=result.ok)
    except Exception as exc:
        logger.warning('could not update the progress artifact: %s', exc)
    return result


def result_of(stage: str, future, seconds: float) -> StageResult:
    """What a stage task's future says: its StageResult, or why it did not complete."""
    state = future.state
    value = future.result(raise_on_failure=False) if state.is_final() else None
    if isinstance(value, StageResult):
        return value
    if state.name == NOT_READY:
        return StageResult(stage, 'not run', message='an upstream stage did not complete')
    return StageResult(stage, 'failed', seconds, f'the task run ended {state.name}: {state.message}')
