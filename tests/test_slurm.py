"""flows.slurm's SLURMCluster recipe, checked through its job script (no SLURM needed: building
the script submits nothing, though the cluster does start its Dask scheduler in this process)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest
from support import REPO

from flows.slurm import _prologue, slurm_cluster

pytestmark = pytest.mark.fast


def test_job_script_is_one_single_thread_worker_holding_the_nodes_gpus():
    with slurm_cluster(gpus_per_node=4, queue='gpu', account='lab', worker_repo='/scratch/clone') as cluster:
        script = cluster.job_script()
    for line in ('#SBATCH --gres=gpu:4', '#SBATCH -p gpu', '#SBATCH -A lab', '#SBATCH --cpus-per-task=16'):
        assert line in script.splitlines(), (line, script)
    assert '--resources GPU=4' in script
    assert '--nthreads 1 ' in script and script.count('--nthreads') == 1  # one stage at a time
    assert 'export DFMSD_WORKER_REPO=/scratch/clone' in script
    assert 'cd /scratch/clone' in script  # the worker imports flows.engine from the clone
    assert '/scratch/clone/.venv/bin/python -m distributed.cli.dask_worker' in script


def test_shared_filesystem_workers_start_in_this_repository():
    with slurm_cluster(gpus_per_node=8) as cluster:
        script = cluster.job_script()
    assert f'cd {REPO}' in script
    assert 'DFMSD_WORKER_REPO' not in script
    assert f'{sys.executable} -m distributed.cli.dask_worker' in script


def test_cli_prints_the_job_script_and_exits():
    out = subprocess.run(
        [sys.executable, '-m', 'flows.slurm', '--gpus-per-node', '2', '--print-job-script'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert '#SBATCH --gres=gpu:2' in out.stdout.splitlines()
    assert '--resources GPU=2' in out.stdout


FAKE_SBATCH = """#!/bin/bash
# sbatch stand-in: keep the job script (the caller deletes it), run it in its own process group
cp "$1" "$FAKE_SLURM/script-$$.sh"
setsid bash "$FAKE_SLURM/script-$$.sh" > "$FAKE_SLURM/job-$$.log" 2>&1 &
echo $! >> "$FAKE_SLURM/jobs"
echo "Submitted batch job $!"
"""
FAKE_SCANCEL = """#!/bin/bash
for job in "$@"; do echo "$job" >> "$FAKE_SLURM/cancelled"; kill -- "-$job"; done
"""


def test_cli_submits_workers_that_join_and_cancels_them_on_sigterm(tmp_path):
    """sbatch and scancel are stand-ins that run the real job script here: its workers join the
    scheduler with one thread and GPU=2 each, run a task of ours, and SIGTERM to the CLI
    cancels both jobs."""
    from distributed import Client

    for name, text in (('sbatch', FAKE_SBATCH), ('scancel', FAKE_SCANCEL)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, 'PATH': f'{tmp_path}:{os.environ["PATH"]}', 'FAKE_SLURM': str(tmp_path)}
    cmd = [sys.executable, '-m', 'flows.slurm', '--gpus-per-node', '2', '--jobs', '2']
    cli = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        address = next(line.split()[3].rstrip(';') for line in cli.stdout if line.startswith('Dask scheduler at'))
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
            workers = client.scheduler_info(n_workers=-1)['workers'].values()
            assert sorted((w['nthreads'], w['resources']['GPU']) for w in workers) == [(1, 2), (1, 2)]
            # a task named by reference from flows (as flows.engine.on_worker is): the workers import it
            assert client.submit(_prologue, '/x', None, resources={'GPU': 2}).result(timeout=60) == ['cd /x']
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(timeout=60) == 0
        jobs = (tmp_path / 'jobs').read_text().split()
        assert sorted((tmp_path / 'cancelled').read_text().split()) == sorted(jobs)
    finally:
        cli.kill()
        for job in (tmp_path / 'jobs').read_text().split() if (tmp_path / 'jobs').exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(job), signal.SIGKILL)
