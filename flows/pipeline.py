"""The DVC pipeline as a Prefect flow: one Prefect task per DVC stage (``make repro``, ``make
flow``, ``python -m flows``: :mod:`flows.cli`).

``make serve`` serves the same flow as a deployment (:mod:`flows.serve`). With
``PREFECT_API_URL`` set (``make ui``), the run, its task runs, logs and artifacts show in that
server's UI; without it Prefect runs ephemerally (no server to start).

Prefect alone schedules the DAG, and Dask runs the heavy stages:

* the graph, the changed stages and each stage's ``meta`` come from DVC (:class:`flows.stages.Pipeline`);
* every stage is a task run named after it, submitted with its upstream stages' futures as
  ``wait_for`` (the UI draws the DAG), so it starts when they have completed; a Prefect
  ``ThreadPoolTaskRunner`` runs the tasks;
* a task runs ``dvc repro --single-item <stage>``: in the workspace for a light stage, on a
  Dask worker for a stage whose ``meta`` says ``engine: dask`` (:mod:`flows.engine`: a local
  cluster of ``jobs`` workers, or ``scheduler``'s);
* its state says what happened: Completed named ``Skipped`` (up to date) or ``Restored``
  (from DVC's run-cache), Completed (ran), or Failed with the exit code and the last lines of
  output (retried ``retries`` times). A stage downstream of a failure ends ``NotReady``
  (Prefect's state for a task whose upstream did not complete); independent branches go on.
  The stage's output is streamed into the task's log, and mmengine ``Iter(train) [i/n]``
  lines into a progress artifact ``progress-<stage>``;
* artifacts of the flow run: ``dvc-pipeline-summary`` (stage, outcome, seconds, worker,
  details), ``report-results`` (``reports/results.md``) and ``report-summary``
  (``reports/summary.json`` as a table);
* with ``experiment``, a run whose stages all succeeded is recorded as a DVC experiment
  (``dvc exp save``) named ``<preset or "flow">-<flow run name>``.

With ``preset``, the run happens in the preset's own git worktree (:func:`flows.presets.preset_run`).
The flow holds its workspace's lock for the whole run (:mod:`flows.guard`: a second run there
fails at once, naming the holder), and ``python -m flows.pipeline`` ends every stage process
on SIGINT or SIGTERM and exits with 130 or 143.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.states import Cancelled, Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from flows import engine, guard, stages
from flows.progress import parse_train_line
from flows.stages import PipelineError, StageResult, summary_table

__all__ = [
    'RESTORED',
    'SKIPPED',
    'SUMMARY_KEY',
    'REPORT_KEY',
    'REPORT_SUMMARY_KEY',
    'StageFailed',
    'dvc_pipeline',
    'dvc_stage',
    'save_experiment',
    'slug',
]

#: Name of the (Completed-type) state of a stage that was up to date and did not run.
SKIPPED = 'Skipped'
#: Name of the (Completed-type) state of a stage DVC restored from its run-cache.
RESTORED = 'Restored'
#: Stage tasks at once, at most (threads of the Prefect task runner).
MAX_TASK_THREADS = 256
#: Keys of the flow run's artifacts.
SUMMARY_KEY = 'dvc-pipeline-summary'
REPORT_KEY = 'report-results'
REPORT_SUMMARY_KEY = 'report-summary'
REPORT_MD = Path('reports/results.md')
REPORT_JSON = Path('reports/summary.json')


def slug(text: str) -> str:
    """An artifact key (or experiment name part): lowercase letters, digits and dashes only."""
    return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-') or 'x'


class StageFailed(RuntimeError):
    """A stage failed (:func:`flows.stages.repro` said so); its task run ends Failed."""

    def __init__(self, result: StageResult):
        self.result = result
        code = f' (exit code {result.exit_code})' if result.exit_code is not None else ''
        tail = '\n'.join(result.output) or '(no output)'
        super().__init__(
            f"DVC stage '{result.stage}' failed{code}: {result.message}.\n"
            f'Last {len(result.output)} lines of output:\n{tail}'
        )


# --------------------------------------------------------------------------- the task


class _Progress:
    """A progress artifact of a training stage, kept in step with its mmengine log lines."""

    MIN_STEP = 1.0  # percentage points between two updates
    MIN_INTERVAL_S = 2.0

    def __init__(self, stage: str):
        self.stage = stage
        self.artifact_id = None
        self.started = time.monotonic()
        self.last_pct = -1.0
        self.last_time = 0.0

    def _describe(self, what: str) -> str:
        return f'Training progress of DVC stage `{self.stage}`: {what}'

    def feed(self, line: str) -> None:
        now = time.monotonic()
        progress = parse_train_line(line, elapsed_s=now - self.started)
        if progress is None:
            return
        pct = max(0.0, min(100.0, progress.percent))
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                progress=pct, key=f'progress-{slug(self.stage)}', description=self._describe(progress.description)
            )
        elif pct >= 100.0 or (pct - self.last_pct >= self.MIN_STEP and now - self.last_time >= self.MIN_INTERVAL_S):
            update_progress_artifact(
                artifact_id=self.artifact_id, progress=pct, description=self._describe(progress.description)
            )
        else:
            return
        self.last_pct, self.last_time = pct, now

    def finish(self) -> None:
        if self.artifact_id is not None and self.last_pct < 100.0:
            update_progress_artifact(artifact_id=self.artifact_id, progress=100.0, description=self._describe('done'))


@dataclass
class Where:
    """Where a stage task runs its stage: the workspace ``root`` and, for heavy stages, the
    Dask ``client`` with the ``workspace`` its workers use and the slots a stage asks for."""

    root: Path
    client: Any = None
    workspace: engine.Workspace | None = None
    need: int = 1
    force: bool = False


@task(name='dvc-stage', cache_policy=NO_CACHE, persist_result=False)
def dvc_stage(stage: str, where: Where, must_run: bool = True, heavy: bool = False) -> State:
    """Bring one DVC stage up to date; the returned state says what happened (Failed with the
    stage's error, no traceback), its data is the :class:`StageResult`. A failed stage with
    retries left raises :class:`StageFailed` instead, for Prefect to retry it."""
    if not must_run:
        result = StageResult(stage, 'skipped', message='up to date (dvc status)')
        return Completed(name=SKIPPED, message=result.message, data=result)
    logger = get_run_logger()
    progress = _Progress(stage)

    def on_line(line: str) -> None:
        logger.info(line)
        try:
            progress.feed(line)
        except Exception as exc:  # progress is a nicety; never fail a stage over it
            logger.warning('could not update the progress artifact: %s', exc)

    if where.force:  # a forced run starts afresh, not from a checkpoint (once: a rerun after a lost worker resumes)
        stages.clear_work_dirs(where.root, stage)
    if heavy:
        result = engine.run_stage(where.client, stage, where.workspace, where.need, force=where.force, on_line=on_line)
        if result.ok and where.workspace.root is None:  # its outputs are in the remote's run-cache
            restored = stages.repro(where.root, stage, pull=True, on_line=on_line)
            result.outcome, result.message = restored.outcome, restored.message
            if restored.outcome == 'ran':
                logger.warning('%s: not in the run-cache the worker pushed, so it ran here', stage)
    else:
        result = stages.repro(where.root, stage, force=where.force, on_line=on_line)
        if result.ok and where.workspace is not None and where.workspace.root is None:  # for the workers
            code, out = stages.dvc(where.root, 'push', '--run-cache', stage, on_line=on_line)
            if code != 0:
                result = StageResult(stage, 'failed', result.seconds, f'`dvc push` exited with {code}', out, code)
    logger.info('%s: %s (%.1f s) %s %s', stage, result.outcome, result.seconds, result.where, result.message)
    if result.outcome == 'cancelled':  # the run is being stopped: nothing to retry, no traceback
        return Cancelled(message=result.message, data=result)
    if result.outcome == 'failed':
        context = TaskRunContext.get()
        if context.task_run.run_count <= context.task.retries:  # Prefect retries on an exception only
            raise StageFailed(result)
        return Failed(message=str(StageFailed(result)), data=result)  # the stage's own error, no traceback
    try:
        progress.finish()
    except Exception as exc:
        logger.warning('could not update the progress artifact: %s', exc)
    name = {'skipped': SKIPPED, 'restored': RESTORED}.get(result.outcome, 'Completed')
    return Completed(name=name, message=result.message, data=result)


def _result_of(stage: str, future, seconds: float) -> StageResult:
    """What a stage task's future says: its StageResult, or why it did not complete."""
    state = future.state
    value = future.result(raise_on_failure=False) if state.is_final() else None
    if isinstance(value, StageResult):
        return value
    if state.name == 'NotReady':
        return StageResult(stage, 'not run', message='upstream failed')
    return StageResult(stage, 'failed', seconds, f'the task run ended {state.name}: {state.message}')


# --------------------------------------------------------------------------- artifacts


def _summary_rows(results: list[StageResult]) -> list[dict[str, Any]]:
    return [
        {
            'stage': r.stage,
            'outcome': r.outcome,
            'seconds': round(r.seconds, 1),
            'worker': r.where,
            'details': ' '.join(r.message.split())[:300],
        }
        for r in results
    ]


def _report_summary_rows(summary: Any) -> list[dict[str, Any]]:
    """``reports/summary.json`` as table rows: ``{row: mAP}``, or ``{group: {row: mAP}}`` for
    several student/pair groups (dfmsd.report.tables.summary); a row may hold several metrics."""
    if not isinstance(summary, dict):
        return [{'row': 'summary', 'mAP': json.dumps(summary)}]
    groups = summary if all(isinstance(v, dict) for v in summary.values()) else {None: summary}
    rows = []
    for group, entries in groups.items():
        for row, value in entries.items():
            cells = value if isinstance(value, dict) else {'mAP': value}
            rows.append({**({'group': group} if group else {}), 'row': row, **cells})
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [{c: r.get(c) for c in columns} for r in rows]


def _publish_reports(root: Path, all_ok: bool, logger) -> list[str]:
    """The repository's report (markdown) and its summary.json (table), when present."""
    keys = []
    state = 'this run completed' if all_ok else 'some stages of this run failed: it may be stale'
    md = root / REPORT_MD
    if md.is_file():
        create_markdown_artifact(markdown=md.read_text(), key=REPORT_KEY, description=f'`{md}` ({state})')
        keys.append(REPORT_KEY)
    summary = root / REPORT_JSON
    if summary.is_file():
        try:
            rows = _report_summary_rows(json.loads(summary.read_text()))
        except ValueError as exc:
            logger.warning('cannot read %s: %s', summary, exc)
        else:
            create_table_artifact(table=rows, key=REPORT_SUMMARY_KEY, description=f'`{summary}` ({state})')
            keys.append(REPORT_SUMMARY_KEY)
    return keys


# --------------------------------------------------------------------------- experiments


def save_experiment(root: Path, name: str, targets: list[str] | None = None, message: str | None = None) -> str:
    """``dvc exp save``: the workspace of ``repo`` as DVC experiment ``name`` (replaced if it
    exists); ``targets`` limits what DVC commits (a run of some targets leaves the others'
    outputs absent). Untracked ``.gitignore`` files DVC wrote and ``reports/`` go with it.
    Returns the experiment's name."""
    untracked = subprocess.run(
        ['git', 'ls-files', '-z', '--others', '--exclude-standard'],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split('\0')
    include = sorted(p for p in untracked if p and (Path(p).name == '.gitignore' or p.startswith('reports/')))
    args = ['exp', 'save', '--json', '--force', '--name', name]
    args += [a for p in include for a in ('--include-untracked', p)]
    if message:
        args += ['--message', message]
    code, lines = stages.dvc(root, *args, *(targets or []))
    if code != 0:
        raise PipelineError(f'`dvc exp save` exited with {code}:\n' + '\n'.join(lines[-stages.TAIL_LINES :]))
    text = '\n'.join(lines)
    start = text.find('{')
    saved = json.loads(text[start : text.rfind('}') + 1]) if start >= 0 else {}
    return saved.get('ref_info', {}).get('name') or saved.get('name') or name


# --------------------------------------------------------------------------- the flow


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
) -> Any:
    """Bring the DVC pipeline up to date, one Prefect task per stage (see :mod:`flows.pipeline`).

    repo_dir: the DVC repository; preset: run ``presets/<preset>.yaml`` in its own worktree;
    targets: only these stages (or foreach/matrix groups) and their upstream; jobs: workers of
    the local Dask cluster (trainings at once); scheduler: an existing Dask cluster's address
    instead; shared_fs: its workers see this workspace (else each has its own clone and they
    share the DVC remote); connect_timeout: seconds to reach the scheduler and see a worker;
    retries: of a failed stage; force: rerun every selected stage;
    experiment: record a successful run as a DVC experiment.
    """
    if jobs < 1:
        raise ValueError('jobs must be at least 1')
    logger = get_run_logger()
    root = Path(repo_dir).resolve()
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
            where = Where(root, force=force, need=_slots_per_stage(root))
            if any(_heavy(pipeline, s) for s in to_run):
                _connect(held, where, scheduler, jobs, shared_fs, connect_timeout)
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
        results = _run_stages(pipeline, to_run, where, retries, retry_delay_seconds, slots=_task_slots(pipeline))
        stages.normalise_lock(root, pipeline.order)
        return _finish(logger, root, preset, targets, pipeline, results, experiment)


def _connect(held: contextlib.ExitStack, where: Where, scheduler, jobs: int, shared_fs: bool, timeout: float) -> None:
    """The Dask client (closed with ``held``) and the workspace its workers use."""
    where.client = held.enter_context(engine.cluster(scheduler, jobs, timeout, slots=where.need))
    engine.check_fits(where.client, where.need, scheduler or 'the local cluster')
    where.workspace = engine.Workspace(str(where.root) if shared_fs else None, _commit(where.root, shared_fs))
    if not shared_fs:  # what the workers' clones will pull: every output this workspace has
        code, out = stages.dvc(where.root, 'push', '--run-cache')
        if code != 0:
            raise engine.ClusterError(
                'without a shared filesystem the workers and this workspace share a DVC remote, but '
                f'`dvc push --run-cache` exited with {code}: {" ".join(out[-3:])} (docs/cluster.md)'
            )


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
    pipeline: stages.Pipeline, to_run: set[str], where: Where, retries: int, delay: float, slots: int
) -> list[StageResult]:
    order = pipeline.schedule()
    futures, started = {}, {}
    with ThreadPoolTaskRunner(max_workers=slots) as runner:
        try:
            for stage in order:
                options = dvc_stage.with_options(
                    name=stage,
                    task_run_name=stage.replace('{', '{{').replace('}', '}}'),  # a format string
                    retries=retries,
                    retry_delay_seconds=delay,
                )
                upstream = [futures[u] for u in pipeline.graph.predecessors(stage)]
                started[stage] = time.monotonic()
                futures[stage] = runner.submit(
                    options,
                    parameters={
                        'stage': stage,
                        'where': where,
                        'must_run': stage in to_run,
                        'heavy': _heavy(pipeline, stage),
                    },
                    wait_for=upstream,
                )
            for future in futures.values():
                future.wait()
        except BaseException:  # a signal (flows.guard): the stage processes on workers end too
            if where.client is not None:
                engine.stop_workers(where.client, where.workspace)
                where.client.close()  # its futures end cancelled; a local cluster's workers go next
            raise
    return [_result_of(stage, futures[stage], time.monotonic() - started[stage]) for stage in order]


def _finish(logger, root: Path, preset, targets, pipeline, results: list[StageResult], experiment: bool) -> Any:
    all_ok = all(r.ok for r in results)
    markdown = summary_table(results)
    logger.info('summary:\n%s', markdown)

    exp_name = exp_error = None
    ran_any = any(r.outcome in ('ran', 'restored') for r in results)
    if all_ok and experiment and ran_any:
        flow_run = FlowRunContext.get().flow_run
        name = f'{slug(preset) if preset else "flow"}-{slug(flow_run.name)}'
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
        table=_summary_rows(results),
        key=SUMMARY_KEY,
        description=f'DVC stages of this run in `{root}`'
        + (f" (preset '{preset}')" if preset else '')
        + (f'; saved as DVC experiment `{exp_name}`' if exp_name else ''),
    )
    try:
        keys += _publish_reports(root, all_ok, logger)
    except Exception as exc:  # artifacts are a report, not the pipeline: do not fail over them
        logger.warning('could not publish the report artifacts: %s', exc)

    summary = {
        'repo_dir': str(root),
        'preset': preset,
        'experiment': exp_name,
        'stages': _summary_rows(results),
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
