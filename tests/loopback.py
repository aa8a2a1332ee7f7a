"""A real Dask cluster on 127.0.0.1 for the tests: ``dask scheduler`` and ``dask worker``
processes (``--nthreads 1 --resources GPU=1``, no nanny: a killed worker stays dead, as a lost
node does), tracked by pid and ended by the test that started them.

Also :class:`TrainingWatch`, which samples the stage processes that train or predict while a
run goes on: how many at once, and under which worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from support import VENV_BIN, env

#: The stage commands of heavy stages (dvc.yaml ``meta: {engine: dask}``).
HEAVY_SCRIPTS = ('stages/teacher.py', 'stages/baseline.py', 'stages/distill.py', 'stages/evaluate.py',
                 'stages/teacher_boxes.py')  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str
    logs: Path
    scheduler: subprocess.Popen
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start_worker(self, name: str, *, cwd: Path | None = None, **extra_env: str) -> subprocess.Popen:
        cmd = [f'{VENV_BIN}/dask', 'worker', self.address, '--name', name, '--nthreads', '1']
        cmd += ['--resources', 'GPU=1', '--no-nanny', '--no-dashboard']
        with (self.logs / f'{name}.log').open('ab') as log:
            proc = subprocess.Popen(
                cmd, cwd=cwd or self.logs, env=env(**extra_env), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.workers[name] = proc
        return proc

    def wait_for_workers(self, n: int, timeout: float = 120) -> dict[str, str]:
        """Worker name -> address, once ``n`` workers have joined."""
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            client.wait_for_workers(n, timeout=timeout)
            return {w['name']: a for a, w in client.scheduler_info(n_workers=-1)['workers'].items()}

    def log(self, name: str) -> str:
        return (self.logs / f'{name}.log').read_text(errors='replace')


@contextlib.contextmanager
def cluster(logs: Path, workers: int = 0, **worker_env: str) -> Iterator[Cluster]:
    """A scheduler on a free loopback port and ``workers`` workers (``w0``, ``w1``...)."""
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with (logs / 'scheduler.log').open('ab') as log:
        scheduler = subprocess.Popen(
            [f'{VENV_BIN}/dask', 'scheduler', '--host', '127.0.0.1', '--port', str(port), '--no-dashboard'],
            cwd=logs, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    found = Cluster(f'tcp://127.0.0.1:{port}', logs, scheduler)
    try:
        for i in range(workers):
            found.start_worker(f'w{i}', **worker_env)
        if workers:
            found.wait_for_workers(workers)
        yield found
    finally:
        for proc in [*found.workers.values(), scheduler]:
            end(proc)


def end(proc: subprocess.Popen) -> None:
    """SIGTERM to the process's group (its session), SIGKILL after 20 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class TrainingWatch:
    """Samples, every ``interval`` s, the heavy stage commands running in ``root``: the most at
    once, and the worker pid (an ancestor) each ran under."""

    def __init__(self, root: Path, workers: dict[str, subprocess.Popen], interval: float = 0.25):
        self.root, self.workers, self.interval = str(root), workers, interval
        self.most = 0
        self.seen: dict[int, str] = {}  # stage process pid -> worker name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TrainingWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def running(self) -> dict[int, str]:
        by_pid = {p.pid: name for name, p in self.workers.items()}
        found = {}
        for p in psutil.process_iter(['cmdline', 'cwd']):
            try:
                cmdline = ' '.join(p.info['cmdline'] or [])
                if p.info['cwd'] != self.root or not any(s in cmdline for s in HEAVY_SCRIPTS):
                    continue
                if 'torch.distributed.run' in cmdline or p.parent() and 'stages/' in ' '.join(p.parent().cmdline()):
                    continue  # a process of a stage already counted (torchrun's workers, a shell's child)
                worker = next((by_pid[a.pid] for a in p.parents() if a.pid in by_pid), '')
                found[p.pid] = worker
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.running()
            self.most = max(self.most, len(now))
            self.seen.update(now)
            time.sleep(self.interval)
