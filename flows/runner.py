"""Run the DVC pipeline's stages, several at once, through DVC's public command line.

    python -m flows.runner [--repo .] [--jobs 2] [--target STAGE ...] [--force]

``dvc repro`` runs one stage at a time, holding the repository lock while a stage's
command runs. This runner keeps DVC's own bookkeeping (outputs removed before a run,
dvc.lock, cache, run-cache) and trains several stages at once outside that lock, with the
protocol of :mod:`dfmsd.core.runs`:

1. the stage graph comes from ``dvc dag --dot`` (read with networkx/pydot), the order from
   networkx; ``dvc status --json <stage>`` tells whether a stage changed;
2. a changed stage is run by ``dvc repro --single-item <stage>`` (``DFMSD_PHASE=commit``).
   DVC restores it from the run-cache, or runs its command; a training stage whose work is
   not done exits at once and records its command line;
3. the runner then runs that command itself (``DFMSD_PHASE=train``), up to ``jobs`` at a
   time, each with ``runtime.threads`` torch threads; then step 2 again, which only exports.

Only one DVC command runs at a time (a lock in this process), so DVC never waits on its own
lock. Every outcome comes from machine-readable output: ``dvc status --json``, exit codes,
and the run log the stage commands append to. Results do not depend on ``jobs``: each
training process uses the same fixed thread count (params ``runtime.threads``).

One run per workspace (:mod:`flows.guard`): a second runner on the same repository exits at
once with 2 and names the run that holds it. Every DVC command and training runs in a process
group of its own; SIGINT or SIGTERM to the runner ends them all (SIGTERM, then SIGKILL) and
it exits with 130 or 143. A rerun resumes the trainings from their last verified checkpoints.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from dfmsd.core import runs
from dfmsd.core.errors import EXIT_CODE, DfmsdError
from flows import guard

#: Lines of output kept for the message of a failed stage.
TAIL_LINES = 20


class RunnerError(RuntimeError):
    """A DVC command of the runner itself (not a stage) failed."""


@dataclass
class StageResult:
    stage: str
    outcome: str  # ran | restored | skipped | failed | not run
    seconds: float = 0.0
    message: str = ''
    output: list[str] = field(default_factory=list)
    exit_code: int | None = None  #: of the failed command (`dvc repro`, or the stage's own while training)

    @property
    def ok(self) -> bool:
        return self.outcome in ('ran', 'restored', 'skipped')


def subprocess_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of DVC and stage commands in ``root``: this interpreter's bin first on
    PATH, and ``root`` first on PYTHONPATH, so that a worktree runs its own copy of the
    package (not the one installed in editable mode from another checkout)."""
    env = dict(os.environ, DVC_NO_ANALYTICS='1', **extra)
    env['PATH'] = str(Path(sys.executable).parent) + os.pathsep + env.get('PATH', '')
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(root), env.get('PYTHONPATH')]))
    return env


class DvcRepo:
    """The DVC commands the runner needs, serialised by one lock."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.lock = threading.Lock()

    def dvc(
        self, *args: str, env: dict | None = None, check: bool = True, on_line: Callable[[str], None] | None = None
    ) -> tuple[int, list[str]]:
        cmd = [sys.executable, '-m', 'dvc', *args]
        with self.lock:
            return _stream(
                cmd, self.root, env or subprocess_env(self.root), on_line, check, what=f'dvc {" ".join(args)}'
            )

    def graph(self, targets: list[str] | None = None) -> nx.DiGraph:
        """Stages and edges (upstream -> downstream) of ``dvc dag --dot``; with ``targets``,
        those stages and everything upstream of them."""
        import networkx.drawing.nx_pydot as nx_pydot
        import pydot

        _, lines = self.dvc('dag', '--dot')
        with warnings.catch_warnings():  # pydot's parser uses pyparsing's deprecated names
            warnings.simplefilter('ignore', DeprecationWarning)
            dot = pydot.graph_from_dot_data('\n'.join(lines))[0]
        graph = nx.DiGraph(nx_pydot.from_pydot(dot))
        graph = nx.relabel_nodes(graph, {n: n.strip('"') for n in graph.nodes})
        if targets:
            keep = set()
            for target in targets:
                matched = [n for n in graph.nodes if n == target or n.startswith(f'{target}@')]
                if not matched:
                    raise RunnerError(f"no DVC stage named '{target}' (known: {', '.join(sorted(graph.nodes))})")
                for node in matched:
                    keep |= {node} | nx.ancestors(graph, node)
            graph = graph.subgraph(keep).copy()
        return graph

    def changed(self, stage: str) -> bool:
        _, lines = self.dvc('status', '--json', stage)
        text = '\n'.join(lines)
        start = text.find('{')
        if start < 0:
            raise RunnerError(f'`dvc status --json {stage}` printed no JSON:\n{text}')
        return bool(json.loads(text[start:]))


def _stream(cmd: list[str], cwd: Path, env: dict, on_line, check: bool, what: str) -> tuple[int, list[str]]:
    """Run ``cmd`` as a stage process (its own process group, :mod:`flows.guard`), its output
    line by line to ``on_line``; the process group is ended if this is cut short."""
    proc = guard.start_stage_process(
        cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    lines: list[str] = []
    try:
        for raw in iter(proc.stdout.readline, b''):
            parts = [p for p in raw.rstrip(b'\r\n').split(b'\r') if p.strip()]  # progress bars redraw
            if parts:
                line = parts[-1].decode('utf-8', errors='replace').rstrip()
                lines.append(line)
                if on_line:
                    on_line(line)
        code = proc.wait()
    finally:
        if proc.poll() is None:
            guard.end_process_group(proc)
            proc.wait()
        guard.forget(proc)
        proc.stdout.close()
    if check and code != 0:
        raise RunnerError(f'{what} exited with {code}:\n' + '\n'.join(lines[-TAIL_LINES:]))
    return code, lines


def run_stage(
    repo: DvcRepo, stage: str, *, force: bool = False, on_line: Callable[[str], None] | None = None
) -> StageResult:
    """Bring one stage up to date (see the module docstring); never raises for a stage failure."""
    start = time.monotonic()
    try:
        if not force and not repo.changed(stage):
            return StageResult(stage, 'skipped', time.monotonic() - start, 'up to date (dvc status)')
        log_file = Path(tempfile.mkstemp(prefix='dfmsd-runs-', suffix='.jsonl')[1])
        try:
            return _run_changed(repo, stage, force, log_file, on_line, start)
        finally:
            log_file.unlink(missing_ok=True)
    except RunnerError as err:
        return StageResult(
            stage, 'failed', time.monotonic() - start, str(err).splitlines()[0], str(err).splitlines()[1:]
        )


def _run_changed(repo: DvcRepo, stage: str, force: bool, log_file: Path, on_line, start: float) -> StageResult:
    env = subprocess_env(repo.root, **{runs.PHASE_ENV: 'commit', runs.RUN_LOG_ENV: str(log_file)})
    repro = ['repro', '--single-item', stage] + (['--force'] if force else [])
    if force:
        _clean_work_dirs(repo.root, stage)
    code, lines = repo.dvc(*repro, env=env, check=False)  # held back: see below
    records = runs.read_records(log_file)
    waiting = [r for r in records if r['status'] == 'needs-training']
    if on_line:  # a probe that only asked for training ends in DVC's 'failed to reproduce': not news
        for line in lines if not waiting else [f"{stage}: training outside DVC's lock, then export"]:
            on_line(line)
    if waiting:
        env_train = subprocess_env(
            repo.root,
            **{
                runs.PHASE_ENV: 'train',
                runs.RUN_LOG_ENV: str(log_file),
                'DVC_STAGE': stage,
                'DVC_ROOT': str(repo.root),
            },
        )
        argv = [sys.executable, *waiting[0]['argv']]  # the stage's own command line, as DVC ran it
        train_code, train_lines = _stream(argv, Path(waiting[0]['cwd']), env_train, on_line, check=False, what=stage)
        lines += train_lines
        if train_code != 0:
            return StageResult(
                stage,
                'failed',
                time.monotonic() - start,
                f'its command exited with {train_code} while training',
                lines[-TAIL_LINES:],
                exit_code=train_code,
            )
        code, more = repo.dvc(*repro, env=env, check=False, on_line=on_line)
        lines += more
        records = runs.read_records(log_file)
    if code != 0:
        return StageResult(
            stage,
            'failed',
            time.monotonic() - start,
            f'`dvc repro` exited with {code}',
            lines[-TAIL_LINES:],
            exit_code=code,
        )
    _clean_work_dirs(repo.root, stage)  # exported or restored: nothing left to resume
    ran = any(r['status'] == 'done' and r['phase'] == 'commit' for r in records)
    return StageResult(
        stage,
        'ran' if ran else 'restored',
        time.monotonic() - start,
        'ran' if ran else 'restored from the DVC run-cache',
        lines[-TAIL_LINES:],
    )


def _clean_work_dirs(root: Path, stage: str) -> None:
    for work_dir in (root / 'work_dirs').glob(f'{runs.work_dir_label(stage)}-*'):
        shutil.rmtree(work_dir, ignore_errors=True)


def schedule_order(graph: nx.DiGraph) -> list[str]:
    """Dependency order; among stages ready at the same time, the one with the most stages
    downstream first (then by name). The teachers, which most of the grid waits for, start
    before the baselines, which nothing waits for, so a job is not left idle at the end."""
    return list(nx.lexicographical_topological_sort(graph, key=lambda s: (-len(nx.descendants(graph, s)), s)))


def run_pipeline(
    repo_dir: str | Path | DvcRepo = '.',
    *,
    targets: list[str] | None = None,
    jobs: int = 2,
    force: bool = False,
    run: Callable[[str], StageResult] | None = None,
    on_result: Callable[[StageResult], None] | None = None,
    on_line: Callable[[str, str], None] | None = None,
    graph: nx.DiGraph | None = None,
) -> list[StageResult]:
    """Every stage (or ``targets`` and their upstream) in dependency order, ``jobs`` at a time.

    A stage whose upstream failed is 'not run'; independent branches go on. ``run`` replaces
    :func:`run_stage` (the Prefect flow wraps it in a task); ``on_result`` is called in the
    calling thread, as each stage settles; ``graph`` (from :meth:`DvcRepo.graph`) replaces
    the one read here.
    """
    repo = repo_dir if isinstance(repo_dir, DvcRepo) else DvcRepo(repo_dir)
    if graph is None:
        graph = repo.graph(targets)
    if run is None:

        def run(stage: str) -> StageResult:
            printer = (lambda line: on_line(stage, line)) if on_line else None
            return run_stage(repo, stage, force=force, on_line=printer)

    order = schedule_order(graph)
    results: dict[str, StageResult] = {}
    running: dict[concurrent.futures.Future, str] = {}

    def settle(result: StageResult) -> None:
        results[result.stage] = result
        if on_result:
            on_result(result)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool, _ending_stages_on_exit():
        while len(results) < len(order):
            for stage in order:
                if stage in results or stage in running.values():
                    continue
                ups = list(graph.predecessors(stage))
                bad = [u for u in ups if u in results and not results[u].ok]
                if bad:
                    settle(StageResult(stage, 'not run', message=f'upstream failed: {", ".join(bad)}'))
                elif all(u in results for u in ups) and len(running) < max(1, jobs):
                    running[pool.submit(run, stage)] = stage
            if not running:
                if len(results) < len(order):
                    raise RunnerError(f'no stage can start: {sorted(set(order) - set(results))}')
                break
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                running.pop(future)
                settle(future.result())
    normalise_lock(repo)
    return [results[s] for s in order]


@contextlib.contextmanager
def _ending_stages_on_exit():
    """Whatever cuts the scheduling short (a signal, Prefect's SIGTERM exception, a bug) ends
    the stage processes first: the pool then waits for its threads, not for their trainings."""
    try:
        yield
    except BaseException:
        guard.end_all()
        raise


def normalise_lock(repo: DvcRepo) -> None:
    """Put dvc.lock's stages in dvc.yaml's order: DVC appends an entry when a stage first
    completes, so with several jobs the order (not the content) would depend on timing."""
    from ruamel.yaml import YAML

    path = repo.root / 'dvc.lock'
    if not path.is_file():
        return
    yaml = YAML()  # round trip: DVC's own library and style
    lock = yaml.load(path.read_text())
    stages = lock.get('stages') or {}
    _, names = repo.dvc('stage', 'list', '--name-only')
    rank = {name: i for i, name in enumerate(names)}
    ordered = sorted(stages, key=lambda name: rank.get(name, len(rank)))
    if ordered == list(stages):
        return
    items = [(name, stages[name]) for name in ordered]
    for name in ordered:
        del stages[name]
    for name, entry in items:
        stages[name] = entry
    import io

    buf = io.StringIO()
    yaml.dump(lock, buf)
    from dfmsd.core.io import write_text

    write_text(path, buf.getvalue())


def summary_table(results: list[StageResult]) -> str:
    counts: dict[str, int] = {}
    lines = ['| stage | result | time | details |', '|---|---|---|---|']
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
        details = r.message.replace('|', '\\|')
        lines.append(f'| `{r.stage}` | {r.outcome} | {r.seconds:.1f} s | {details} |')
    lines += ['', ', '.join(f'{n} {k}' for k, n in counts.items())]
    return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m flows.runner', description=__doc__.splitlines()[0])
    parser.add_argument('--repo', default='.')
    parser.add_argument('--jobs', type=int, default=2, help='stages trained at the same time (default 2)')
    parser.add_argument(
        '--target',
        action='append',
        default=[],
        metavar='STAGE',
        help='only this stage (or matrix group) and its upstream; repeatable',
    )
    parser.add_argument('--force', action='store_true', help='rerun every selected stage')
    args = parser.parse_args(argv)

    def report(result: StageResult) -> None:
        print(
            f'[runner] {result.stage}: {result.outcome} ({result.seconds:.1f} s)'
            + (f' - {result.message}' if result.outcome in ('failed', 'not run') else ''),
            flush=True,
        )
        if result.outcome == 'failed':
            print('\n'.join(f'    {line}' for line in result.output), flush=True)

    start = time.monotonic()
    try:
        with guard.on_signals(), guard.workspace(args.repo):
            results = run_pipeline(
                args.repo,
                targets=args.target or None,
                jobs=args.jobs,
                force=args.force,
                on_result=report,
                on_line=lambda stage, line: print(f'  [{stage}] {line}', flush=True),
            )
    except DfmsdError as err:  # another run holds the workspace, or it is none
        print(f'error [runner]: {err}', file=sys.stderr, flush=True)
        return EXIT_CODE
    except guard.Interrupted as stop:
        print(f'[runner] {stop}: stage processes ended; a rerun resumes from the last checkpoints', flush=True)
        return stop.exit_code
    print(summary_table(results))
    print(f'[runner] {len(results)} stages in {time.monotonic() - start:.1f} s with {args.jobs} job(s)')
    return 0 if all(r.ok for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
