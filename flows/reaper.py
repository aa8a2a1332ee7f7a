"""Run a command that dies with the process that started this one.

    python flows/reaper.py CMD [ARG ...]

A Dask worker that is killed (a node lost, ``kill -9``) takes no child with it: the DVC
command and the training it runs would go on writing the workspace while Dask reruns the
stage elsewhere. Started by the worker, this process asks Linux for SIGTERM when its parent
goes (``PR_SET_PDEATHSIG``), runs CMD, and on SIGTERM or SIGINT ends CMD's whole tree
(SIGTERM, then SIGKILL after :data:`GRACE_S`). Its exit status is CMD's (128 + signal when
ended). It runs as a file, importing nothing of the project: a worker's stage may run in a
clone or worktree where this checkout's packages are not importable.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

import psutil

PR_SET_PDEATHSIG = 1
GRACE_S = 10.0


def end_descendants() -> None:
    """SIGTERM to every descendant of this process, SIGKILL to what is left after GRACE_S."""
    procs = psutil.Process().children(recursive=True)
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 5.0)):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, procs = psutil.wait_procs(procs, timeout=wait)
        if not procs:
            return


def main(argv: list[str]) -> int:
    parent = os.getppid()
    if sys.platform.startswith('linux'):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent went before the request: nothing will tell us
        return 128 + signal.SIGTERM

    def stop(signum: int, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        end_descendants()
        sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):  # before the child: no moment leaves it unguarded
        signal.signal(sig, stop)
    return subprocess.Popen(argv).wait()


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
