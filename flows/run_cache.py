"""``python -m flows.run_cache STAGE [--push]``, run in a DVC repository: the stage's run-cache
entry, which ``dvc repro`` skips for a stage with an uncached output that is not a metric or plot
(dvc/stage/__init__.py, ``Stage.run``), like an evaluation's metrics JSON. Without it a preset's
worktree, or a clone, ran every evaluation again. ``Stage.save`` records it, with copies of the
uncached outputs in the cache, which a restore checks out.

``--push``: the entry for any stage, and those copies to the default remote, which ``dvc push
--run-cache`` leaves out (a Dask worker without a shared filesystem, :mod:`flows.engine`).

A process of its own, in the repository: DVC resolves a stage's paths from the working
directory, which the flow's threads share.
"""

from __future__ import annotations

import argparse
import sys


def record(stage: str, push: bool = False) -> None:
    from dvc.repo import Repo

    with Repo(_wait_for_lock=True) as repo, repo.lock:
        (found,) = repo.stage.collect(stage)
        if push or any(not (out.use_cache or out.is_metric or out.is_plot) for out in found.outs):
            found.save()  # hashes of what the stage wrote (DVC's state: files not read again)
        if push and (uncached := {out.hash_info for out in found.outs if not out.use_cache}):
            repo.cloud.push(uncached)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m flows.run_cache', description=__doc__.split('\n\n')[0])
    parser.add_argument('stage', help='a stage of ./dvc.yaml, as `dvc repro` names it')
    parser.add_argument('--push', action='store_true', help='the uncached outputs to the default remote too')
    args = parser.parse_args(argv)
    from dvc.exceptions import DvcException

    try:
        record(args.stage, args.push)
    except DvcException as exc:  # a missing output, a remote not reached...: one line
        print(f'error [run_cache]: {args.stage}: {exc}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
