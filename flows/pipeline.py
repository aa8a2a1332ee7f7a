"""The DVC pipeline as a Prefect flow: one Prefect task per DVC stage (``make repro``, ``make
flow``, ``python -m flows``: :mod:`flows.cli`; ``make serve``: :mod:`flows.serve`).

Prefect alone schedules the DAG, and Dask runs the heavy stages:

* the graph, the changed stages, each stage's ``meta`` and tags come from DVC
  (:class:`flows.stages.Pipeline`);
* every stage is a task run named after it, submitted on a ``ThreadPoolTaskRunner`` with its
  direct upstream stages' futures as ``wait_for`` (the UI draws those arrows; ``make ui``
  lists each once, :mod:`flows.ui`); a stage that is to run is tagged with its dvc.yaml group
  and matrix values (``distill``, ``method:mgd``, ``seed:0``);
* a task runs ``dvc repro --single-item <stage>``, here or on a Dask worker, and its state
  says what happened (:mod:`flows.stage_task`); a stage downstream of a failure does not
  run, independent branches go on;
* progress artifacts: each training's (``progress-<stage>``) and the run's
  (``run-progress-<preset or default>``: stages done of the total, trainings in flight);
* the run is named after the preset and what its stages did (``smoke · 48 restored · 2
  failed``) and tagged ``no-op`` or ``worked`` (:mod:`flows.run_display`); its artifacts and
  experiment: :mod:`flows.results`.

With ``preset``, the run happens in the preset's own git worktree (:func:`flows.presets.preset_run`).
The flow holds its workspace's lock for the whole run (:mod:`flows.guard`: a second run there
fails at once, naming the holder), and ``python -m flows`` ends every stage process on SIGINT
or SIGTERM and exits with 130 or 143.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.context import FlowRunContext
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from dfmsd.core.io import TEACHER_MEMO_DIR
from flows import engine, guard, stages
from flows.progress import RunProgress
from flows.results import SUMMARY_KEY, publish_reports, save_experiment, slug, summary_rows
from flows.run_display import end_not_ready, name_ended_run, name_run
from flows.stage_task import Run, dvc_stage, result_of
from flows.stages import PipelineError, StageResult, summary_table

__all__ = ['dvc_pipeline']

#: Stage tasks at once, at most (threads of the Prefect task runner).
MAX_TASK_THREADS = 256


@flow(name='dvc-pipeline')
def dvc_pipeline(
    repo_dir: str = '.',
    preset: str | None = None,
    targets: list[str] | None = None,
    jobs: int = 2,
    scheduler: str | None = None,
    shared_fs: bool = True,
    connect_timeout: float = engine.CONNECT_TIMEOUT_S,
    retries: int = 0,
    retry_delay_seconds: float = 10.0,
    force: bool = False,
    experiment: bool = True,
    check: bool = True,
) -> Any:
    """Bring the DVC pipeline up to date, one Prefect task per DVC stage.

    Args:
        repo_dir: The DVC repository.
        preset: A preset of the repository's presets/ (``presets/<name>.yaml`` merged over
            params.yaml), run in its own git worktree ``.presets/<name>``; empty: params.yaml.
        targets: Only these stages, or dvc.yaml groups such as ``distill``, and what they
            depend on; empty: every stage.
        jobs: Workers of the local Dask cluster: trainings at once.
        scheduler: The address of an existing Dask cluster (``tcp://host:8786``) to run the
            trainings on, instead of a local one.
        shared_fs: Whether that cluster's workers see this workspace; if not, each works in
            its own clone and they share the DVC remote.
        connect_timeout: Seconds to reach the scheduler and see a worker.
        retries: Times a failed stage is run again.
        retry_delay_seconds: Seconds before a retry.
        force: Rerun every selected stage, from scratch.
        experiment: Record a run in which something ran, and nothing failed, as a DVC experiment.
        check: Check the params (``python -m dfmsd.check``) before any stage runs.
    """
    if jobs < 1:
        raise ValueError('jobs must be at least 1')
    guard.reclaim_sigterm()  # SIGTERM ends the stage processes, as SIGINT does (flows.guard)
    logger = get_run_logger()
    root = Path(repo_dir).resolve()
    label = preset or 'default'
    with contextlib.ExitStack() as held:  # the workspace is this run's (flows.guard) until it ends
        if preset:
            from flows.presets import preset_run

            root = held.enter_context(preset_run(root, preset))
            logger.info("preset '%s': running in its git worktree %s", preset, root)
        else:
            held.enter_context(guard.workspace(root))
        try:
            pipeline = stages.Pipeline.read(root, targets or None)
            to_run = pipeline.to_run(force)
            name_run(f'{label} · {len(to_run)} of {pipeline.graph.number_of_nodes()} stages to run', [label])
            if check and to_run:
                check_params(Path(repo_dir).resolve(), preset)
            run = Run(root, force=force, need=_slots_per_stage(root))
            if any(_heavy(pipeline, s) for s in to_run):
                _connect(held, run, scheduler, jobs, shared_fs, connect_timeout)
        except (PipelineError, engine.ClusterError) as err:  # one line, no traceback (flows.cli prints it)
            logger.error('%s', err)
            return Failed(message=str(err), data=err)
        logger.info(
            'DVC pipeline in %s: %d stage(s), %d to bring up to date; heavy stages on %s',
            root,
            pipeline.graph.number_of_nodes(),
            len(to_run),
            scheduler or f'a local Dask cluster of {jobs} worker(s)',
        )
        run.progress = RunProgress(pipeline.graph.number_of_nodes(), key=f'run-progress-{slug(label)}')
        run.progress.start()
        results = _run_stages(pipeline, to_run, run, retries, retry_delay_seconds, slots=_task_slots(pipeline))
        if _changed_outputs(results):  # else dvc.lock is as it was
            stages.normalise_lock(root, pipeline.order)
        name_ended_run(label, results)
        return _finish(logger, root, preset, targets, pipeline, results, experiment)


def check_params(repo: Path, preset: str | None) -> None:
    """The params check (:func:`flows.stages.params_check`), its output in the flow's log;
    raises PipelineError with what it said."""
    if (cmd := stages.params_check(repo, preset)) is None:
        return
    code, lines = stages.stream(cmd, repo, get_run_logger().info)
    if code != 0:
        raise PipelineError('\n'.join(line for line in lines if line.strip()) or f'the params check exited with {code}')


def _changed_outputs(results: list[StageResult]) -> bool:
    """Whether a stage ran or was restored: the workspace's outputs and dvc.lock changed."""
    return any(r.outcome in ('ran', 'restored') for r in results)


def _connect(held: contextlib.ExitStack, run: Run, scheduler, jobs: int, shared_fs: bool, timeout: float) -> None:
    """The Dask client (closed with ``held``) and the workspace its workers use."""
    memo = _teacher_memo(held, run.root) if shared_fs else None  # removed once the cluster is gone
    run.client = held.enter_context(engine.cluster(scheduler, jobs, timeout, slots=run.need))
    engine.check_fits(run.client, run.need, scheduler or 'the local cluster')
    run.workspace = engine.Workspace(
        str(run.root) if shared_fs else None, _commit(run.root, shared_fs), teacher_memo=memo
    )
    if not shared_fs:  # what the workers' clones will pull: every output this workspace has
        code, out = stages.dvc(run.root, 'push', '--run-cache')
        if code != 0:
            raise engine.ClusterError(
                'without a shared filesystem the workers and this workspace share a DVC remote, but '
                f'`dvc push --run-cache` exited with {code}: {" ".join(out[-3:])} (docs/cluster.md)'
            )


def _teacher_memo(held: contextlib.ExitStack, root: Path) -> str:
    """The run's teacher-feature memo (dfmsd.models.teacher_memo): empty at the start (what a run
    cut short left), removed at the end."""
    memo = root / TEACHER_MEMO_DIR
    shutil.rmtree(memo, ignore_errors=True)
    held.callback(shutil.rmtree, memo, ignore_errors=True)
    return str(memo)


def _heavy(pipeline: stages.Pipeline, stage: str) -> bool:
    return pipeline.meta.get(stage, {}).get('engine') == 'dask'


def _slots_per_stage(root: Path) -> int:
    """``launch.nproc_per_node`` of params.yaml: the GPUs (Dask slots) a heavy stage takes."""
    import yaml

    from dfmsd.core.params import launch_settings

    path = root / 'params.yaml'  # a DVC project of another shape (flows.review) may have none
    params = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {}
    return launch_settings(params.get('launch')).nproc_per_node


def _commit(root: Path, shared_fs: bool) -> str | None:
    """The commit the workers' clones must be at (no shared filesystem): the workspace's, clean."""
    if shared_fs:
        return None
    status = subprocess.run(
        ['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root, capture_output=True, text=True
    )
    if status.stdout.strip():
        raise engine.ClusterError(
            f'{root} has uncommitted changes: without a shared filesystem the workers run the commit, so commit first'
        )
    return subprocess.run(
        ['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()


def _task_slots(pipeline: stages.Pipeline) -> int:
    """Stage tasks at once: one thread per stage (capped). Prefect waits for a task's upstream
    inside its thread, and a heavy stage's thread waits on Dask, which bounds the trainings:
    fewer threads would leave ready stages queued behind waiting ones."""
    return max(1, min(pipeline.graph.number_of_nodes(), MAX_TASK_THREADS))


def _run_stages(
    pipeline: stages.Pipeline, to_run: set[str], run: Run, retries: int, delay: float, slots: int
) -> list[StageResult]:
    order = pipeline.schedule()
    upstream_of = pipeline.direct_upstream()
    futures, started = {}, {}
    with ThreadPoolTaskRunner(max_workers=slots) as runner:
        try:
            for stage in order:
                must_run = stage in to_run
                options = dvc_stage.with_options(
                    name=stage,
                    task_run_name=stage.replace('{', '{{').replace('}', '}}'),  # a format string
                    retries=retries,
                    retry_delay_seconds=delay,
                    # a tag costs a call to the server's concurrency limits per task run (a 53-stage
                    # no-op run took 3x longer tagged): only a stage that is to run gets them
                    tags=pipeline.tags(stage) if must_run else [],
                )
                upstream = upstream_of[stage]
                started[stage] = time.monotonic()
                futures[stage] = runner.submit(
                    options,
                    parameters={
                        'stage': stage,
                        'run': quote(run),  # shared state: Prefect must not walk it for futures
                        'must_run': must_run,
                        'heavy': _heavy(pipeline, stage),
                    },
                    wait_for=[futures[u] for u in upstream],
                )
            for future in futures.values():
                while not _done(future, timeout=1.0):
                    guard.check()  # a signal whose exception was lost where it landed
            guard.check()
        except BaseException:  # a signal (flows.guard): the stage processes on workers end too
            if run.client is not None:
                engine.stop_workers(run.client, run.workspace)
                run.client.close()  # its futures end cancelled; a local cluster's workers go next
            raise
    try:
        end_not_ready(futures, run.progress)
    except Exception as exc:  # how the UI draws them: never fail a run over it
        get_run_logger().warning('could not give the NotReady stages a final state: %s', exc)
    return [result_of(stage, futures[stage], time.monotonic() - started[stage]) for stage in order]


def _done(future, timeout: float) -> bool:
    """Wait up to ``timeout`` s for a stage task (a ``PrefectConcurrentFuture``); whether it ended."""
    future.wait(timeout)
    return future.wrapped_future.done()


def _finish(logger, root: Path, preset, targets, pipeline, results: list[StageResult], experiment: bool) -> Any:
    all_ok = all(r.ok for r in results)
    markdown = summary_table(results)
    logger.info('summary:\n%s', markdown)

    exp_name = exp_error = None
    if all_ok and experiment and _changed_outputs(results):
        flow_run = FlowRunContext.get().flow_run
        name = f'{slug(preset) if preset else "flow"}-{str(flow_run.id)[:8]}'
        try:
            exp_name = save_experiment(
                root,
                name,
                targets=list(pipeline.graph.nodes) if targets else None,
                message=f'Prefect flow run {flow_run.name} ({flow_run.id})',
            )
        except PipelineError as err:
            exp_error = str(err)
            logger.error('the run could not be recorded as a DVC experiment: %s', err)
        else:
            logger.info('recorded as DVC experiment %s (dvc exp show, in %s)', exp_name, root)

    keys = [SUMMARY_KEY]
    create_table_artifact(
        table=summary_rows(results),
        key=SUMMARY_KEY,
        description=f'DVC stages of this run in `{root}`'
        + (f" (preset '{preset}')" if preset else '')
        + (f'; saved as DVC experiment `{exp_name}`' if exp_name else ''),
    )
    try:
        keys += publish_reports(root, preset, results, logger)
    except Exception as exc:  # artifacts are a report, not the pipeline: do not fail over them
        logger.warning('could not publish the report artifacts: %s', exc)

    summary = {
        'repo_dir': str(root),
        'preset': preset,
        'experiment': exp_name,
        'stages': summary_rows(results),
        'results': results,
        'artifacts': keys,
        'markdown': markdown,
    }
    if exp_error:
        return Failed(message=f'every stage completed, but `dvc exp save` failed: {exp_error}', data=summary)
    if not all_ok:
        failed = [r.stage for r in results if r.outcome in ('failed', 'cancelled')]
        not_run = [r.stage for r in results if r.outcome == 'not run']
        message = f'{len(failed)} DVC stage(s) failed: {", ".join(failed)}'
        if not_run:
            message += f'; not run: {", ".join(not_run)}'
        return Failed(message=message, data=summary)
    return summary
