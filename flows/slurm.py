"""A Dask cluster on SLURM for the heavy stages: one SLURM job = one node = one Dask worker.

    python -m flows.slurm --gpus-per-node 8 --jobs 2 [--queue gpu] [--account lab]
                          [--worker-repo /scratch/me/clone] [--print-job-script]

run on a host that every compute node can reach (a login node, or the controller itself),
starts a Dask scheduler in this process, submits ``--jobs`` worker jobs with ``sbatch``, prints
the scheduler's address and waits; in a second shell on the controller::

    make repro SCHEDULER=tcp://HOST:PORT            # the printed address; shared filesystem
    make repro SCHEDULER=tcp://HOST:PORT NO_SHARED_FS=1   # clones (--worker-repo)

Ctrl-C (or SIGTERM) closes the cluster, which cancels the jobs (``scancel``). The scheduler
lives in this process, which imports ``flows``: Dask's scheduler unpickles the task graph, and a
task names ``flows.engine.on_worker``, so a scheduler that cannot import it refuses the stage.
``--print-job-script`` prints the job script and exits: nothing is submitted, no SLURM needed.

Why one worker per job, holding all the node's GPUs: a heavy stage is one whole (multi-GPU)
training that asks Dask for ``GPU=launch.nproc_per_node``, and Dask only counts resources, it
does not set ``CUDA_VISIBLE_DEVICES``. SLURM's ``--gres=gpu:N`` does, per job; a worker alone
in its job with one thread runs one stage at a time on exactly that job's GPUs. So set
``launch.nproc_per_node`` (params) to ``--gpus-per-node``: a stage asking for more never fits
(the pipeline says so at once), one asking for fewer leaves the rest of the node idle.

In Python, :func:`slurm_cluster` returns the ``dask_jobqueue.SLURMCluster``; extra keyword
arguments go to it (``interface='ib0'``, ``log_directory=...``, ``job_script_prologue``
lines such as ``module load cuda``). docs/cluster.md has the whole picture.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path

from flows.engine import SLOT, WORKER_REPO_ENV

#: The repository this module lives in: the workers' working directory on a shared filesystem.
REPO = Path(__file__).resolve().parents[1]


def slurm_cluster(
    *,
    gpus_per_node: int = 8,
    cores: int = 16,
    memory: str = '128GiB',
    walltime: str = '24:00:00',
    queue: str | None = None,
    account: str | None = None,
    python: str | None = None,
    worker_repo: str | None = None,
    port: int = 0,
    **kwargs,
):
    """A ``SLURMCluster`` whose every job is one Dask worker with one thread and
    ``GPU=gpus_per_node``, on a node with ``--gres=gpu:<gpus_per_node>``, ``cores`` CPUs and
    ``memory``. ``worker_repo``: each node's own clone (no shared filesystem), exported as
    ``DFMSD_WORKER_REPO``; ``python`` defaults to that clone's ``.venv/bin/python``, else to
    this interpreter (the same path on a shared filesystem). ``port``: the scheduler's (0: any
    free one). No job is submitted until ``scale``."""
    from dask_jobqueue import SLURMCluster

    repo = worker_repo or str(REPO)
    if python is None:
        python = f'{worker_repo}/.venv/bin/python' if worker_repo else sys.executable
    return SLURMCluster(
        # dask-jobqueue derives the worker's threads from cores / processes (16 threads here);
        # one thread is what we want, since each task is a whole training. So Dask gets
        # cores=1 (--nthreads 1) and SLURM gets the node's CPUs through job_cpu
        # (--cpus-per-task), which the training's data loaders and torchrun processes use.
        cores=1,
        job_cpu=cores,
        processes=1,
        memory=memory,
        walltime=walltime,
        queue=queue,
        account=account,
        python=python,
        worker_extra_args=['--resources', f'{SLOT}={gpus_per_node}', *kwargs.pop('worker_extra_args', [])],
        job_extra_directives=[f'--gres=gpu:{gpus_per_node}', *kwargs.pop('job_extra_directives', [])],
        job_script_prologue=[*_prologue(repo, worker_repo), *kwargs.pop('job_script_prologue', [])],
        # The scheduler already listens on every interface and tells the workers this host's
        # address; every node must reach that port (and the workers each other's and the
        # controller's). On a host with several networks, pick one with interface='ib0'.
        scheduler_options={'port': port, **kwargs.pop('scheduler_options', {})},
        job_name=kwargs.pop('job_name', 'dfmsd-worker'),
        **kwargs,
    )


def _prologue(repo: str, worker_repo: str | None) -> list[str]:
    """Shell lines before the worker starts. The worker imports ``flows.engine`` (the task it
    runs) from its working directory, so it starts in the repository: the shared one, or the
    node's clone, which :func:`flows.engine.on_worker` also finds through DFMSD_WORKER_REPO.
    No ``DFMSD_LAUNCH_NPROC_PER_NODE`` here: ``launch.nproc_per_node`` is a DVC parameter (it
    sets the global batch), so a per-node override would make a stage compute something other
    than what its params record; the GPUs a stage uses come from params, as its request does."""
    lines = [f'cd {shlex.quote(repo)}']
    if worker_repo:
        lines.append(f'export {WORKER_REPO_ENV}={shlex.quote(worker_repo)}')
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m flows.slurm',
        description='Start a Dask scheduler here and SLURM jobs of one GPU worker each, for '
        '`make repro SCHEDULER=...` (docs/cluster.md). Ctrl-C cancels the jobs.',
    )
    parser.add_argument('--gpus-per-node', type=int, default=8, help='GPUs per job, = launch.nproc_per_node (8)')
    parser.add_argument('--jobs', type=int, default=1, help='SLURM jobs (nodes, workers) to start (1)')
    parser.add_argument('--cores', type=int, default=16, help='CPUs per job (16)')
    parser.add_argument('--memory', default='128GiB', help='memory per job (128GiB)')
    parser.add_argument('--walltime', default='24:00:00', help='per job (24:00:00)')
    parser.add_argument('--queue', help='SLURM partition (-p)')
    parser.add_argument('--account', help='SLURM account (-A)')
    parser.add_argument('--python', help="the workers' interpreter (default: see --worker-repo, else this one)")
    parser.add_argument(
        '--worker-repo', help="each node's own clone, for --no-shared-fs (default: this repository, shared)"
    )
    parser.add_argument('--interface', help='the network interface the scheduler and workers use, e.g. ib0')
    parser.add_argument('--port', type=int, default=0, help="the scheduler's port (default: any free one)")
    parser.add_argument('--print-job-script', action='store_true', help='print the job script and exit')
    args = parser.parse_args(argv)

    extra = {'interface': args.interface} if args.interface else {}
    with slurm_cluster(
        gpus_per_node=args.gpus_per_node,
        cores=args.cores,
        memory=args.memory,
        walltime=args.walltime,
        queue=args.queue,
        account=args.account,
        python=args.python,
        worker_repo=args.worker_repo,
        port=args.port,
        **extra,
    ) as cluster:
        if args.print_job_script:
            print(cluster.job_script())
            return 0
        return _serve(cluster, args.jobs, shared=args.worker_repo is None)


def _serve(cluster, jobs: int, *, shared: bool) -> int:
    """Submit the jobs, say how to use them, and hold the scheduler until SIGINT/SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # scale(jobs=N), not adapt(): adaptive scaling has retired idle workers while tasks with
    # resource restrictions waited, and not asked for new ones (dask/dask-jobqueue#230).
    cluster.scale(jobs=jobs)
    address = cluster.scheduler_address
    run = f'make repro SCHEDULER={address}' + ('' if shared else ' NO_SHARED_FS=1')
    print(f'Dask scheduler at {address}; {jobs} SLURM job(s) submitted (squeue --me).', flush=True)
    print(f'Run the pipeline against it from the controller:\n  {run}', flush=True)
    print('Ctrl-C here closes the cluster and cancels the jobs.', flush=True)
    while not stop.wait(1.0):  # a timed wait, so the signal handler surely runs
        pass
    print('closing the cluster (scancel)', flush=True)
    return 0  # leaving slurm_cluster's `with` closes it, which cancels the jobs


if __name__ == '__main__':
    sys.exit(main())
