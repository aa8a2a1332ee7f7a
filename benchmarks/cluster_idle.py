"""What the flow's own Dask cluster costs in CPU while its workers only wait on a stage process.

    python benchmarks/cluster_idle.py [--seconds 20] [--rounds 2]

In ``make repro`` two one-thread trainings keep both cores busy, so any CPU the cluster itself
uses is taken from them. This starts the cluster ``make repro`` starts (``flows.engine.cluster``,
2 workers), gives each worker a task that waits ``--seconds`` on a ``sleep`` process and prints
a line a second (as a stage's output reaches the flow), and measures process CPU time: the
workers' (psutil) and this process's (the scheduler, the nannies and the client live here).
It does that with the local cluster's settings (``flows.engine.LOCAL_CLUSTER_CONFIG``) and with
Dask's defaults instead, interleaved, and prints each as % of one core.
"""

from __future__ import annotations

import argparse
import subprocess
import time


def wait_on_process(seconds: int) -> None:
    """A worker's task: a child process printing a line a second, read line by line."""
    from distributed import get_worker

    worker = get_worker()
    cmd = ['bash', '-c', f'for i in $(seq {seconds}); do echo line $i; sleep 1; done']
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            worker.log_event('cluster-idle', line.rstrip())


def measure(seconds: int, config: dict) -> tuple[float, float]:
    """(workers', this process's) CPU seconds per second of waiting, as % of one core, on the
    cluster ``make repro`` starts with ``config`` as its Dask settings."""
    from flows import engine

    engine.LOCAL_CLUSTER_CONFIG, kept = config, engine.LOCAL_CLUSTER_CONFIG
    try:
        with engine.cluster(None, jobs=2) as client:
            return _measure(client, seconds)
    finally:
        engine.LOCAL_CLUSTER_CONFIG = kept


def _measure(client, seconds: int) -> tuple[float, float]:
    import psutil

    pids = client.run(lambda: __import__('os').getpid())  # worker address -> pid
    workers = [psutil.Process(p) for p in pids.values()]
    here = psutil.Process()
    client.subscribe_topic('cluster-idle', lambda event: None)

    def cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    w0, h0, t0 = sum(map(cpu, workers)), cpu(here), time.monotonic()
    client.gather([client.submit(wait_on_process, seconds, pure=False, workers=[a]) for a in pids])
    elapsed = time.monotonic() - t0
    return 100 * (sum(map(cpu, workers)) - w0) / elapsed, 100 * (cpu(here) - h0) / elapsed


def main() -> None:
    from flows.engine import LOCAL_CLUSTER_CONFIG as LOCAL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seconds', type=int, default=20)
    parser.add_argument('--rounds', type=int, default=2)
    args = parser.parse_args()
    print(f'2 workers, each waiting {args.seconds} s on a process; CPU as % of one core (sum of both workers)')
    print('round  variant                  workers  flow process')
    for r in range(args.rounds):
        for name, config in (('LOCAL_CLUSTER_CONFIG', LOCAL), ("Dask's defaults", {})):
            workers, here = measure(args.seconds, config)
            print(f'{r:5d}  {name:22s}  {workers:6.1f}%  {here:6.1f}%')


if __name__ == '__main__':
    main()
