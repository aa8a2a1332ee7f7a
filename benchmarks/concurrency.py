"""Two independent trainings on this machine: one after the other with 2 torch threads each,
against both at once with 1 thread each (what `make repro` does with JOBS=2, runtime.threads 1).

    python benchmarks/concurrency.py [--iters 200] [--rounds 2]

Run in a project whose data stage has run (the default's synthetic set). Each training is the
default student's plain training (the baseline's config) for ``--iters`` iterations, started
as its own process, as the flow's Dask workers start stages. Wall clock is what this measures, so the
two modes are interleaved (serial, concurrent, serial, ...) and the ratio is printed per
round: serial wall time / concurrent wall time (> 1: running two at once is faster).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train(iters: int, threads: int, seed: int, work_root: str) -> None:
    """One plain training of the default student (a worker process)."""
    import dfmsd.models  # noqa: F401  (registers the loop, hooks and trackers the config names)
    from dfmsd.core.params import load_params
    from dfmsd.engine.configs import training_config
    from dfmsd.engine.training import run_training

    params = load_params('params.yaml')
    name, student = next(iter(params.students.items()))
    train_params = params.train.model_copy(update={'iters': iters, 'checkpoint_interval': iters})
    cfg = training_config(student, params.data, train_params, iters, seed, f'students.{name}')
    cfg.log_level = 'WARNING'
    run_training(cfg, threads=threads, work_root=Path(work_root))


def timed(commands: list[list[str]], together: bool) -> float:
    start = time.monotonic()
    if together:
        procs = [subprocess.Popen(c) for c in commands]
        codes = [p.wait() for p in procs]
    else:
        codes = [subprocess.run(c).returncode for c in commands]
    if any(codes):
        raise SystemExit(f'a training failed: exit codes {codes}')
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--iters', type=int, default=200)
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--worker', nargs=3, metavar=('THREADS', 'SEED', 'WORK_ROOT'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        threads, seed, work_root = args.worker
        return train(args.iters, int(threads), int(seed), work_root)

    def commands(threads: int) -> list[list[str]]:
        work = tempfile.mkdtemp(prefix='dfmsd-concurrency-')  # fresh work dirs: nothing to resume
        return [
            [sys.executable, __file__, '--iters', str(args.iters), '--worker', str(threads), str(seed), work]
            for seed in (0, 1)
        ]

    print(f'2 trainings of {args.iters} iterations each (default student, plain training); wall seconds')
    print('round  serial(2 threads each)  concurrent(1 thread each)  serial/concurrent')
    for round_ in range(args.rounds):
        serial = timed(commands(2), together=False)
        concurrent = timed(commands(1), together=True)
        print(f'{round_:5d}  {serial:22.1f}  {concurrent:25.1f}  {serial / concurrent:17.2f}', flush=True)


if __name__ == '__main__':
    main()
