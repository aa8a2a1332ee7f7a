"""The DVC pipeline as a Prefect flow: one Prefect task per DVC stage.

    python -m flows.pipeline [--repo .] [--preset NAME] [--target STAGE]... [--jobs N]
                             [--retries N] [--retry-delay S] [--force] [--no-experiment]

(what ``make flow`` runs; ``make serve`` serves the same flow as a deployment, see
:mod:`flows.serve`). With ``PREFECT_API_URL`` set (``make ui``), the run, its task runs,
logs and artifacts show in that server's UI; without it Prefect starts a temporary server.

The scheduling is :func:`flows.runner.run_pipeline`'s, the same as ``make repro``'s: the stage
graph from ``dvc dag``, networkx's order, at most ``jobs`` stages at a time, training outside
DVC's lock (:mod:`dfmsd.core.runs`). The flow only wraps each stage in a Prefect task:

* every stage is a task run named after the stage, started once its upstream stages are
  done (their task runs are its ``wait_for``, so the UI draws the DAG); it runs
  :func:`flows.runner.run_stage` and streams the stage's output into the task's log, and
  mmengine ``Iter(train) [i/n]`` lines into a progress artifact ``progress-<stage>``;
* its state says what happened, from machine-readable output only (``dvc status --json``,
  exit codes, the run log): Completed named ``Skipped`` (up to date) or ``Restored`` (from
  DVC's run-cache), Completed (ran), or Failed with the exit code and the last lines of
  output (retried ``retries`` times). A stage downstream of a failure never runs: its task
  run ends ``NotReady`` (Prefect's state for a task whose upstream did not complete), while
  independent branches go on;
* artifacts of the flow run: ``dvc-pipeline-summary`` (table: stage, outcome, seconds,
  details), ``report-results`` (``reports/results.md`` of the repository the flow ran in)
  and ``report-summary`` (``reports/summary.json`` as a table);
* a run whose stages all succeeded is recorded as a DVC experiment (``dvc exp save``) named
  ``<preset or "flow">-<flow run name>``, so ``dvc exp show`` lists it.

With ``preset``, the run happens in the preset's own git worktree (:func:`flows.presets.preset_worktree`,
as ``make repro PRESET=...``), and the experiment is saved there.

As with ``make repro`` (:mod:`flows.guard`), the flow holds its workspace's lock for the whole
run (a second run there fails at once, naming the holder), and ``python -m flows.pipeline``
ends every stage process on SIGINT or SIGTERM and exits with 130 or 143.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.states import Completed, Failed, State

from flows import guard
from flows.progress import parse_train_line
from flows.runner import DvcRepo, RunnerError, StageResult, run_pipeline, run_stage, summary_table

__all__ = [
    'RESTORED',
    'SKIPPED',
    'SUMMARY_KEY',
    'REPORT_KEY',
    'REPORT_SUMMARY_KEY',
    'StageFailed',
    'dvc_pipeline',
    'dvc_stage',
    'main',
    'save_experiment',
    'slug',
]

#: Name of the (Completed-type) state of a stage that was up to date and did not run.
SKIPPED = 'Skipped'
#: Name of the (Completed-type) state of a stage DVC restored from its run-cache.
RESTORED = 'Restored'
#: Keys of the flow run's artifacts.
SUMMARY_KEY = 'dvc-pipeline-summary'
REPORT_KEY = 'report-results'
REPORT_SUMMARY_KEY = 'report-summary'
REPORT_MD = Path('reports/results.md')
REPORT_JSON = Path('reports/summary.json')

_REPOS: dict[Path, DvcRepo] = {}
_REPOS_LOCK = threading.Lock()
#: What run_stage said, by task run id: handed to the flow outside Prefect's state data
#: (Prefect links a result's fields to its task by object identity, which strings share).
_RESULTS: dict[UUID, StageResult] = {}


def shared_repo(root: str | Path) -> DvcRepo:
    """One :class:`DvcRepo` (one lock serialising DVC commands) per repository and process."""
    root = Path(root).resolve()
    with _REPOS_LOCK:
        return _REPOS.setdefault(root, DvcRepo(root))


def slug(text: str) -> str:
    """An artifact key (or experiment name part): lowercase letters, digits and dashes only."""
    return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-') or 'x'


class StageFailed(RuntimeError):
    """A stage failed (:func:`flows.runner.run_stage` said so); its task run ends Failed."""

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


@task(name='dvc-stage', cache_policy=NO_CACHE, persist_result=False)
def dvc_stage(stage: str, repo_dir: str, force: bool = False) -> State:
    """Bring one DVC stage up to date with :func:`flows.runner.run_stage`; the returned
    state (or the raised :class:`StageFailed`) says what happened."""
    logger = get_run_logger()
    progress = _Progress(stage)

    def on_line(line: str) -> None:
        logger.info(line)
        try:
            progress.feed(line)
        except Exception as exc:  # progress is a nicety; never fail a stage over it
            logger.warning('could not update the progress artifact: %s', exc)

    result = run_stage(shared_repo(repo_dir), stage, force=force, on_line=on_line)
    logger.info('%s: %s (%.1f s) %s', stage, result.outcome, result.seconds, result.message)
    _RESULTS[TaskRunContext.get().task_run.id] = result
    if result.outcome == 'failed':
        raise StageFailed(result)
    try:
        progress.finish()
    except Exception as exc:
        logger.warning('could not update the progress artifact: %s', exc)
    name = {'skipped': SKIPPED, 'restored': RESTORED}.get(result.outcome, 'Completed')
    return Completed(name=name, message=result.message)


def _result_of(stage: str, state: State | None, seconds: float) -> StageResult:
    """The runner's view of a stage task's final state."""
    found = _RESULTS.pop(state.state_details.task_run_id, None) if state is not None else None
    if state is not None and state.is_completed():
        outcome = {SKIPPED: 'skipped', RESTORED: 'restored'}.get(state.name, 'ran')
        if found is not None:
            return StageResult(stage, outcome, seconds, found.message, found.output, found.exit_code)
        return StageResult(stage, outcome, seconds, state.message or '')
    if found is not None and found.outcome == 'failed':
        return StageResult(stage, 'failed', seconds, found.message, found.output, found.exit_code)
    what = f'{state.name}: {state.message}' if state is not None else 'no state'
    return StageResult(stage, 'failed', seconds, f'the task run ended {what}')


# --------------------------------------------------------------------------- artifacts


def _summary_rows(results: list[StageResult]) -> list[dict[str, Any]]:
    return [
        {
            'stage': r.stage,
            'outcome': r.outcome,
            'seconds': round(r.seconds, 1),
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


def save_experiment(repo: DvcRepo, name: str, stages: list[str] | None = None, message: str | None = None) -> str:
    """``dvc exp save``: the workspace of ``repo`` as DVC experiment ``name`` (replaced if it
    exists); ``stages`` limits what DVC commits (a run of some targets leaves the others'
    outputs absent). Untracked ``.gitignore`` files DVC wrote and ``reports/`` go with it.
    Returns the experiment's name."""
    untracked = subprocess.run(
        ['git', 'ls-files', '-z', '--others', '--exclude-standard'],
        cwd=repo.root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split('\0')
    include = sorted(p for p in untracked if p and (Path(p).name == '.gitignore' or p.startswith('reports/')))
    args = ['exp', 'save', '--json', '--force', '--name', name]
    args += [a for p in include for a in ('--include-untracked', p)]
    if message:
        args += ['--message', message]
    _, lines = repo.dvc(*args, *(stages or []))
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
    retries: int = 0,
    retry_delay_seconds: float = 10.0,
    force: bool = False,
    experiment: bool = True,
) -> Any:
    """Bring the DVC pipeline up to date, one Prefect task per stage (see :mod:`flows.pipeline`).

    repo_dir: the DVC repository; preset: run ``presets/<preset>.yaml`` in its own worktree;
    targets: only these stages (or foreach/matrix groups) and their upstream; jobs: stages
    trained at the same time; retries: of a failed stage; force: rerun every selected stage;
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
        return _run(logger, root, preset, targets, jobs, retries, retry_delay_seconds, force, experiment)


def _run(logger, root: Path, preset, targets, jobs, retries, retry_delay_seconds, force, experiment) -> Any:
    repo = shared_repo(root)
    graph = repo.graph(targets or None)
    logger.info('DVC pipeline in %s: %d stage(s), %d at a time', root, graph.number_of_nodes(), jobs)

    states: dict[str, State] = {}
    flow_context = contextvars.copy_context()  # the flow run's context, for the runner's threads

    def stage_task(stage: str):
        return dvc_stage.with_options(
            name=stage,
            task_run_name=stage.replace('{', '{{').replace('}', '}}'),  # a format string
            retries=retries,
            retry_delay_seconds=retry_delay_seconds,
        )

    def call(stage: str) -> State:
        upstream = [states[u] for u in graph.predecessors(stage) if u in states]
        return stage_task(stage)(stage, str(root), force, wait_for=upstream, return_state=True)

    def run(stage: str) -> StageResult:  # in a thread of the runner's pool
        start = time.monotonic()
        state = flow_context.copy().run(call, stage)
        states[stage] = state
        return _result_of(stage, state, time.monotonic() - start)

    def on_result(result: StageResult) -> None:  # in this thread
        if result.outcome == 'not run':  # a task run that never starts: NotReady, as its upstream failed
            states[result.stage] = call(result.stage)

    results = run_pipeline(repo, jobs=jobs, force=force, run=run, on_result=on_result, graph=graph)
    all_ok = all(r.ok for r in results)
    markdown = summary_table(results)
    logger.info('summary:\n%s', markdown)

    exp_name = exp_error = None
    if all_ok and experiment:
        flow_run = FlowRunContext.get().flow_run
        name = f'{slug(preset) if preset else "flow"}-{slug(flow_run.name)}'
        try:
            exp_name = save_experiment(
                repo,
                name,
                stages=list(graph.nodes) if targets else None,
                message=f'Prefect flow run {flow_run.name} ({flow_run.id})',
            )
        except RunnerError as err:
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
        'artifacts': keys,
        'markdown': markdown,
    }
    if exp_error:
        return Failed(message=f'every stage completed, but `dvc exp save` failed: {exp_error}', data=summary)
    if not all_ok:
        failed = [r.stage for r in results if r.outcome == 'failed']
        not_run = [r.stage for r in results if r.outcome == 'not run']
        message = f'{len(failed)} DVC stage(s) failed: {", ".join(failed)}'
        if not_run:
            message += f'; not run: {", ".join(not_run)}'
        return Failed(message=message, data=summary)
    return summary


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m flows.pipeline',
        description='Run the DVC pipeline as a Prefect flow (one task per DVC stage). Set PREFECT_API_URL '
        '(e.g. http://127.0.0.1:4200/api, `make ui`) to record the run in a running Prefect server.',
    )
    parser.add_argument('--repo', default='.', help='DVC repository (default: .)')
    parser.add_argument('--preset', help='run presets/PRESET.yaml in its own git worktree (.presets/PRESET)')
    parser.add_argument(
        '--target',
        action='append',
        default=[],
        metavar='STAGE',
        help='only this stage (or foreach/matrix group) and its upstream; repeatable',
    )
    parser.add_argument('--jobs', type=int, default=2, help='stages trained at the same time (default 2)')
    parser.add_argument('--retries', type=int, default=0, help='retries of a failed stage (default 0)')
    parser.add_argument('--retry-delay', type=float, default=10.0, help='seconds between retries (default 10)')
    parser.add_argument('--force', action='store_true', help='rerun every selected stage')
    parser.add_argument('--no-experiment', action='store_true', help='do not record the run as a DVC experiment')
    args = parser.parse_args(argv)
    from dfmsd.core.errors import EXIT_CODE, DfmsdError
    from flows.presets import preset_dir

    try:  # the lock is checked here too, for a one-line answer before Prefect starts
        workspace = preset_dir(args.repo, args.preset) if args.preset else args.repo
        with guard.on_signals(), guard.workspace(workspace):
            state = dvc_pipeline(
                repo_dir=args.repo,
                preset=args.preset,
                targets=args.target or None,
                jobs=args.jobs,
                retries=args.retries,
                retry_delay_seconds=args.retry_delay,
                force=args.force,
                experiment=not args.no_experiment,
                return_state=True,
            )
    except DfmsdError as err:
        print(f'error [flow]: {err}', file=sys.stderr, flush=True)
        return EXIT_CODE
    except guard.Interrupted as stop:
        print(f'flow run stopped: {stop}; stage processes ended, a rerun resumes from the last checkpoints')
        return stop.exit_code
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, dict):
        print(summary['markdown'])
        if summary.get('experiment'):
            print(f'recorded as DVC experiment {summary["experiment"]} (dvc exp show, in {summary["repo_dir"]})')
    print(f'flow run {state.name}' + (f': {state.message}' if state.message else ''))
    return 0 if state.is_completed() else 1


if __name__ == '__main__':
    sys.exit(main())
