"""A Prefect deployment of the ``dvc-pipeline`` flow, to start runs from the Prefect UI.

    python -m flows.serve [--repo .] [--name dfmsd]          (what ``make serve`` runs)

Serves :func:`flows.pipeline.dvc_pipeline` as the deployment ``dvc-pipeline/dfmsd``, against
the Prefect server of ``PREFECT_API_URL`` (``make ui`` starts one on 127.0.0.1:4200, the
default when the variable is unset). In the UI, *Deployments > dvc-pipeline/dfmsd > Run >
Custom run* starts the pipeline of ``--repo`` with the parameters ``preset`` (a name in
presets/, run in its own worktree; empty: params.yaml), ``targets`` (stages or foreach/matrix
groups; empty: all), ``jobs``, ``retries`` and ``force``; ``prefect deployment run
dvc-pipeline/dfmsd -p preset=smoke`` does the same from a shell. Runs execute in this
process's machine, one at a time (a deployment concurrency limit of 1, further runs
queue): they share the repository's DVC lock and cache. Stop serving with Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

#: Where ``make ui`` serves the Prefect API.
DEFAULT_API_URL = 'http://127.0.0.1:4200/api'
DEPLOYMENT = 'dfmsd'


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m flows.serve', description=__doc__.splitlines()[0])
    parser.add_argument('--repo', default='.', help='the DVC repository the runs work in (default: .)')
    parser.add_argument('--name', default=DEPLOYMENT, help=f'deployment name (default: {DEPLOYMENT})')
    parser.add_argument('--jobs', type=int, default=2, help='default of the jobs parameter (default 2)')
    args = parser.parse_args(argv)
    root = Path(args.repo).resolve()
    if not (root / 'dvc.yaml').is_file():
        print(f'error [serve]: {root} has no dvc.yaml', file=sys.stderr)
        return 2

    if not _api_url():  # no ephemeral server: the UI must see the deployment
        os.environ['PREFECT_API_URL'] = DEFAULT_API_URL
    import httpx
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = _api_url() or DEFAULT_API_URL
    try:
        healthy = httpx.get(f'{api.rstrip("/")}/health', timeout=10).status_code == 200
    except httpx.HTTPError:
        healthy = False
    if not healthy:
        print(
            f'error [serve]: no Prefect server answers at {api}; start one with `make ui` (or set PREFECT_API_URL)',
            file=sys.stderr,
        )
        return 1

    from prefect import serve

    print(f'[serve] deployment dvc-pipeline/{args.name} for {root} on {api.removesuffix("/api")}', flush=True)
    with temporary_settings(updates={PREFECT_API_URL: api}):
        serve(deployment(root, args.name, args.jobs), limit=1)
    return 0


def deployment(root: Path, name: str, jobs: int):
    """The flow as a deployment for ``root``: its presets offered as the choices of ``preset``,
    each parameter described (from the flow's docstring), one run at a time."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.pipeline import dvc_pipeline

    served = dvc_pipeline.to_deployment(
        name=name,
        parameters={'repo_dir': str(root), 'jobs': jobs},
        description=f'The DVC pipeline of `{root}`. In a custom run, pick a `preset` (run in its own '
        'worktree `.presets/NAME`; empty: params.yaml) and `targets` (stages or dvc.yaml groups; empty: all).',
        tags=['dvc', 'dfmsd'],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
    )
    presets = sorted(p.stem for p in (root / 'presets').glob('*.yaml'))
    preset = served._parameter_openapi_schema.properties['preset']
    preset['anyOf'] = [{'type': 'string', 'enum': presets}, {'type': 'null'}]  # a choice in the run form
    return served


if __name__ == '__main__':
    sys.exit(main())
