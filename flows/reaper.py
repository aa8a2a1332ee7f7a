"""Run a command that dies with the process that started this one.

    python -m flows.reaper CMD [ARG ...]

A Dask worker that is killed (a node lost, ``kill -9``) takes no child with it: the DVC
command and the training it runs would go on writing the workspace while Dask reruns the
stage elsewhere. Started by the worker, this process asks Linux for SIGTERM when its parent
goes (``PR_SET_PDEATHSIG``), runs CMD, and on SIGTERM or SIGINT ends CMD's whole tree
(:func:`flows.guard.end_process_group`). Its exit status is CMD's (128 + signal when ended).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    from flows import guard

    parent = os.getppid()
    if sys.platform.startswith('linux'):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent went before the request: nothing will tell us
        return 128 + signal.SIGTERM
    child = subprocess.Popen(argv)

    def stop(signum: int, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        guard.end_process_group(child)
        sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    return child.wait()


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
