"""A reviewer's check of the checked-out commit: pull its outputs, bring the pipeline up to
date, and compare every metrics file with the committed one.

    python -m flows.review [--repo .] [--rebuild] [--jobs 2] [--verbose]    (what `make review` runs)

1. ``dvc pull`` from the default DVC remote (models, predictions: everything DVC caches).
   First the remote is checked: a configured default, a directory that exists, or an SSH
   server that answers, whose host key is in ``~/.ssh/known_hosts`` (DVC's SSH remote does
   not check host keys itself) and that accepts the configured login. When there is no
   remote, or it cannot be reached, or the pull fails, the command says why, how to set one
   up (docs/reviewing.md), and offers the rebuild: ``--rebuild`` reruns the pipeline from the
   commit's code and params instead, which gives byte-identical results
   (:mod:`flows.review_remote`).
2. the Prefect flow (:mod:`flows.pipeline`) brings every stage up to date. After a pull nothing should run except the
   stages whose outputs DVC does not cache (``data``: the synthetic set regenerates
   byte-identically in seconds); the command lists what ran.
3. Every ``metrics/**/*.json`` and ``reports/summary.json`` is compared byte for byte with
   the commit's (``git show HEAD:<path>``, :mod:`flows.review_metrics`). Where the bytes
   differ (a rebuild on another CPU model or with other library versions), each run's
   reported mAP is compared in seed stds (its row's, and the student rows' pooled one, which
   the verdict reads) against a stated tolerance, with the likely cause (:mod:`flows.tolerance`).

Exit status: 0 reproduced (byte for byte, or within the tolerance); 1 not reproduced (a run
beyond the tolerance, a metrics file missing or new, or a stage failed); 2 nothing to pull (no
remote, unreachable, pull failed) without ``--rebuild``, or a set-up problem (not a git + DVC
checkout, invalid params).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from dfmsd.core.errors import EXIT_CODE
from flows import guard, tolerance
from flows.review_metrics import (
    METRICS_DIR,
    SUMMARY,
    ReviewError,
    committed_metrics,
    compare_metrics,
    describe_difference,
    git,
    reported_split,
)
from flows.review_remote import dvc_config, pull, remote_problem, uncached_stages
from flows.stages import PipelineError, StageResult, subprocess_env

REBUILD_HINT = 'python -m flows.review --rebuild   (make review REBUILD=1)'


def say(message: str = '') -> None:
    for line in message.splitlines() or ['']:
        print(f'[review] {line}' if line else '[review]', flush=True)


def check_params(root: Path) -> None:
    """This project's params schema, before any stage runs (skipped where there is none)."""
    if not (root / 'dfmsd' / 'core' / 'params.py').is_file() or not (root / 'params.yaml').is_file():
        return
    res = subprocess.run(
        [sys.executable, '-m', 'dfmsd.check'],
        cwd=root,
        env=subprocess_env(root),
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise ReviewError(f'params.yaml of this commit is not valid:\n{res.stderr.strip()}')


def run_pipeline(root: Path, jobs: int, verbose: bool) -> list[StageResult]:
    """The pipeline brought up to date by the Prefect flow (:mod:`flows.pipeline`), no experiment,
    as ``make repro`` runs it: a signal ends every stage process, Prefect's server in its own session."""
    from flows.cli import prefect_api
    from flows.pipeline import dvc_pipeline

    with guard.on_signals(), prefect_api():
        state = dvc_pipeline(repo_dir=str(root), jobs=jobs, experiment=False, return_state=True)
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, dict):
        raise PipelineError(str(summary))
    for result in summary['results']:
        if result.outcome != 'skipped' or verbose:
            extra = f' - {result.message}' if result.outcome in ('failed', 'not run') else ''
            say(f'  {result.stage}: {result.outcome} ({result.seconds:.1f} s){extra}')
        if result.outcome == 'failed':
            print('\n'.join(f'    {line}' for line in result.output), flush=True)
    return summary['results']


def judge_changes(root: Path, changed: dict[str, bytes]) -> bool:
    """Say how far each changed run is from the commit (flows.tolerance); True if all are within
    the tolerance."""
    runs = [p for p in committed_metrics(root) if p != SUMMARY]
    committed = {p: changed.get(p) or git(root, 'show', f'HEAD:{p}', text=False) for p in runs}
    rebuilt = {p: (root / p).read_bytes() for p in changed if p != SUMMARY}
    split = reported_split(root)
    differences = tolerance.compare(committed, rebuilt, split)
    say(
        f'{len(changed)} metrics files are not byte-identical; each run compared by its {split} '
        f'{tolerance.METRIC} in seed stds, within tolerance up to {tolerance.band(len(runs)):.1f} pooled stds '
        f'(flows/tolerance.py):'
    )
    for d in differences:
        detail = '' if d.delta is not None else f' ({describe_difference(changed[d.path], rebuilt[d.path])})'
        print(f'    {d.line()}{detail}', flush=True)
    if SUMMARY in changed:
        old, new = changed[SUMMARY], (root / SUMMARY).read_bytes()
        print(f'    {SUMMARY}: follows the runs ({describe_difference(old, new)})', flush=True)
    return all(d.within for d in differences)


def review(root: Path, *, rebuild: bool, jobs: int, verbose: bool) -> int:
    commit = git(root, 'rev-parse', '--short', 'HEAD').strip()
    committed = committed_metrics(root)
    if not committed:
        say(f'NOT reproduced: commit {commit} has no metrics files to compare ({METRICS_DIR}/**/*.json, {SUMMARY})')
        return 1
    say(f'commit {commit}: pull its outputs, bring the pipeline up to date, compare its {len(committed)} metrics files')
    dirty = [line[3:] for line in git(root, 'status', '--porcelain', '--untracked-files=no').splitlines()]
    if dirty:
        say(
            f'note: uncommitted changes in {", ".join(dirty[:5])}{" ..." if len(dirty) > 5 else ""}; '
            f'the comparison is with the commit'
        )
    check_params(root)

    name, problem = remote_problem(root, dvc_config(root))
    pulled = False
    if problem is None:
        say(f"dvc pull from DVC remote '{name}'")
        problem = pull(root, verbose)
        pulled = problem is None
    if problem:
        say(f'cannot pull: {problem}')
        if name is None:
            how = (
                'dvc remote add -d --local shared ssh://<host>/<path>\n'
                '    dvc remote modify --local shared user <user>   # and keyfile <path>, port <n>'
            )
        else:
            how = (
                f'dvc remote modify --local {name} url ssh://<host>/<path>   # where the commit was pushed\n'
                f'    dvc remote modify --local {name} user <user>   # and keyfile <path>, port <n>'
            )
        say(f'to pull, point DVC at a remote the commit was pushed to (docs/reviewing.md):\n    {how}')
        if not rebuild:
            say(
                "or rebuild every output from the commit's code and params (byte-identical on the CPU model "
                'it was built on, else judged by a tolerance; the embedded default takes about 50 min on 2 '
                'cores):\n'
                f'    {REBUILD_HINT}'
            )
            return EXIT_CODE
        say("rebuilding from the commit's code and params (--rebuild)")

    uncached = uncached_stages(root) if pulled else set()
    start = time.monotonic()
    try:
        results = run_pipeline(root, jobs, verbose)
    except PipelineError as err:
        say(f'NOT reproduced: the pipeline could not run: {err}')
        return 1
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    say(f'pipeline: {", ".join(f"{n} {k}" for k, n in counts.items())} in {time.monotonic() - start:.1f} s')
    ran = [r.stage for r in results if r.outcome in ('ran', 'restored')]
    if pulled and ran:
        expected = [s for s in ran if s in uncached]
        other = [s for s in ran if s not in uncached]
        if expected:
            say(f'reran after the pull: {", ".join(expected)} (outputs not cached by DVC: regenerated)')
        if other:
            say(f'note: ran although the pull should have provided them: {", ".join(other)}')
    failed = [r for r in results if not r.ok]
    if failed:
        say(
            f'NOT reproduced: {len(failed)} stage(s) did not complete: '
            + ', '.join(f'{r.stage} ({r.outcome})' for r in failed)
        )
        return 1

    same, absent, changed = compare_metrics(root)
    if absent:
        say(f'NOT reproduced: {len(absent)} metrics files are missing or new against commit {commit}:')
        for line in absent:
            print(f'    {line}', flush=True)
        return 1
    how = 'pulled' if pulled else 'rebuilt'
    if not changed:
        say(f'reproduced: {len(same)} metrics files identical to commit {commit} (outputs {how})')
        return 0
    if judge_changes(root, changed):
        say(
            f'reproduced within tolerance, not byte for byte: {len(same)} metrics files identical to commit '
            f'{commit}, {len(changed)} within the tolerance (outputs {how})'
        )
        return 0
    say(f'NOT reproduced: a run differs from commit {commit} beyond the tolerance, or cannot be judged (above)')
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m flows.review', description=__doc__.splitlines()[0])
    parser.add_argument('--repo', default='.', help='the checkout to review (default: .)')
    parser.add_argument(
        '--rebuild',
        action='store_true',
        help='when nothing can be pulled, rebuild every output from the code and params',
    )
    parser.add_argument('--jobs', type=int, default=2, help='stages run at the same time (default 2)')
    parser.add_argument('--verbose', action='store_true', help="stream each stage's output")
    args = parser.parse_args(argv)
    try:
        top = subprocess.run(['git', 'rev-parse', '--show-toplevel'], cwd=args.repo, capture_output=True, text=True)
        if top.returncode != 0:
            raise ReviewError(f'{Path(args.repo).resolve()} is not a git checkout')
        root = Path(top.stdout.strip()).resolve()
        if not (root / '.dvc').is_dir():
            raise ReviewError(f'{root} is not a DVC project (no .dvc/)')
        return review(root, rebuild=args.rebuild, jobs=args.jobs, verbose=args.verbose)
    except ReviewError as err:
        print(f'error [review]: {err}', file=sys.stderr, flush=True)
        return EXIT_CODE
    except guard.Interrupted as stop:
        print(f'[review] {stop}: stage processes ended', flush=True)
        return stop.exit_code


if __name__ == '__main__':
    sys.exit(main())
