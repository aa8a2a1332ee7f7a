"""The command line of the pipeline's Prefect flow (``make repro``, ``make flow``).

    python -m flows [--repo .] [--preset NAME] [--target STAGE]... [--jobs N]
                    [--scheduler tcp://HOST:PORT [--no-shared-fs] [--connect-timeout S]]
                    [--retries N] [--retry-delay S] [--force] [--no-experiment]

Runs :func:`flows.pipeline.dvc_pipeline`. With ``PREFECT_API_URL`` set (``make ui``), the run
is recorded in that server; without it, in Prefect's temporary server, started for the run.
A run with nothing to do and nowhere to be seen (no ``PREFECT_API_URL``, no preset, no
``--force``) stops after DVC's status: every stage up to date, no flow run, no server, so that
a no-op ``make repro`` costs about what a no-op ``dvc repro`` does. Otherwise the params are
checked (``python -m dfmsd.check``, what ``make check`` runs): here, before Prefect's temporary
server starts; with a server, by the flow, only if a stage is to run. Prefect is imported only
when a flow runs.

Holds the workspace's lock (:mod:`flows.guard`), ends every stage process on SIGINT or
SIGTERM and exits with 130 or 143; a bad target, a busy workspace or an unreachable cluster
is one ``error [flow]: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from dfmsd.core.errors import EXIT_CODE, DfmsdError
from flows import guard

#: Seconds the temporary Prefect server may take to answer (its migrations run at each start).
SERVER_START_S = 120


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m flows',
        description='Run the DVC pipeline as a Prefect flow (one task per DVC stage). Set PREFECT_API_URL '
        '(e.g. http://127.0.0.1:4200/api, `make ui`) to record the run in a running Prefect server.',
    )
    p.add_argument('--repo', default='.', help='DVC repository (default: .)')
    p.add_argument('--preset', help='run presets/PRESET.yaml in its own git worktree (.presets/PRESET)')
    p.add_argument(
        '--target',
        action='append',
        default=[],
        metavar='STAGE',
        help='only this stage (or foreach/matrix group) and its upstream; repeatable',
    )
    p.add_argument(
        '--jobs', type=int, default=2, help='workers of the local Dask cluster: trainings at once (default 2)'
    )
    p.add_argument('--scheduler', metavar='tcp://HOST:PORT', help='run the heavy stages on this Dask cluster instead')
    p.add_argument(
        '--no-shared-fs',
        action='store_true',
        help="the scheduler's workers do not see this workspace: each runs its own clone (DFMSD_WORKER_REPO) "
        'and they share the DVC remote (docs/cluster.md)',
    )
    p.add_argument(
        '--connect-timeout',
        type=float,
        help='seconds to reach the scheduler and see a worker (default: flows.engine.CONNECT_TIMEOUT_S)',
    )
    p.add_argument('--retries', type=int, default=0, help='retries of a failed stage (default 0)')
    p.add_argument('--retry-delay', type=float, default=10.0, help='seconds between retries (default 10)')
    p.add_argument('--force', action='store_true', help='rerun every selected stage')
    p.add_argument('--no-experiment', action='store_true', help='do not record the run as a DVC experiment')
    return p


def up_to_date(args: argparse.Namespace) -> int | None:
    """The number of stages, when a flow run would do nothing that anyone could see; else None."""
    if args.preset or args.force or _api_configured():
        return None
    from flows.stages import Pipeline

    try:
        pipeline = Pipeline.read(args.repo, args.target or None)
    except Exception:  # bad params or a bad target: said by the check, or by the flow, next
        return None
    return None if pipeline.to_run() else pipeline.graph.number_of_nodes()


def check_params(args: argparse.Namespace) -> int:
    """The params check (:func:`flows.stages.params_check`), its output on this terminal; its exit status."""
    from flows.stages import params_check

    cmd = params_check(args.repo, args.preset)
    return subprocess.run(cmd, cwd=args.repo).returncode if cmd else 0


def _api_configured() -> bool:
    return bool(os.environ.get('PREFECT_API_URL')) or _profile_api_url()


def _profile_api_url() -> bool:
    """Whether the active Prefect profile names an API (read without importing Prefect)."""
    import tomllib

    home = Path(os.environ.get('PREFECT_HOME') or Path.home() / '.prefect')
    try:
        profiles = tomllib.loads((home / 'profiles.toml').read_text())
    except (OSError, ValueError):
        return False
    active = os.environ.get('PREFECT_PROFILE') or profiles.get('active', 'ephemeral')
    return bool(profiles.get('profiles', {}).get(active, {}).get('PREFECT_API_URL'))


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """The Prefect API of a run: the configured one (``PREFECT_API_URL``), else Prefect's own
    temporary server, started here in a session of its own. Started by Prefect, it would share
    ``make``'s process group: a Ctrl-C to the group would end it first, and the flow would then
    hang reporting its end to it."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield
        return
    from unittest import mock

    from prefect.server.api.server import SubprocessASGIServer  # the server's app: seconds to import
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    server = SubprocessASGIServer()
    # Prefect's own wait (20 s) ran out once on a loaded 2-core machine (a fresh-clone make test)
    timeout = max(SERVER_START_S, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    with mock.patch.object(subprocess, 'Popen', functools.partial(subprocess.Popen, start_new_session=True)):
        server.start(timeout=timeout)  # the one process Prefect starts here: its server, stopped at exit (atexit)
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from flows.presets import preset_dir
    from flows.stages import PipelineError

    try:  # the lock is taken here too, for a one-line answer before Prefect starts
        workspace = preset_dir(args.repo, args.preset) if args.preset else args.repo
        with guard.on_signals(), guard.workspace(workspace):
            if (stages := up_to_date(args)) is not None:
                print(f'[flow] all {stages} stages up to date (dvc status): no flow run started', flush=True)
                return 0
            # Without an API the check runs before Prefect's temporary server starts; with one, the
            # flow checks, and only if a stage is to run (a no-op run stays within 2x `dvc repro`).
            checked = not _api_configured()
            if checked and (code := check_params(args)):
                return code
            with prefect_api():
                from flows.pipeline import dvc_pipeline

                state = dvc_pipeline(
                    repo_dir=args.repo,
                    preset=args.preset,
                    targets=args.target or None,
                    jobs=args.jobs,
                    scheduler=args.scheduler,
                    shared_fs=not args.no_shared_fs,
                    **({'connect_timeout': args.connect_timeout} if args.connect_timeout else {}),
                    retries=args.retries,
                    retry_delay_seconds=args.retry_delay,
                    force=args.force,
                    experiment=not args.no_experiment,
                    check=not checked,
                    return_state=True,
                )
                guard.check()  # a signal whose exception was lost, and the flow ended anyway
    except (DfmsdError, PipelineError) as err:
        print(f'error [flow]: {err}', file=sys.stderr, flush=True)
        return EXIT_CODE
    except guard.Interrupted as stop:
        print(f'flow run stopped: {stop}; stage processes ended, a rerun resumes from the last checkpoints')
        return stop.exit_code
    summary = state.result(raise_on_failure=False)
    if isinstance(summary, (DfmsdError, PipelineError)):  # no cluster, a bad target...: one line, as above
        print(f'error [flow]: {summary}', file=sys.stderr, flush=True)
        return EXIT_CODE
    if isinstance(summary, dict):
        print(summary['markdown'])
        if summary.get('experiment'):
            print(f'recorded as DVC experiment {summary["experiment"]} (dvc exp show, in {summary["repo_dir"]})')
    print(f'flow run {state.name}' + (f': {state.message}' if state.message else ''))
    return 0 if state.is_completed() else 1
