"""Preloaded into each worker process of the flow's own local Dask cluster (:func:`flows.engine.cluster`).

Those processes share the flow's process group, so a SIGINT to the group (Ctrl-C, ``kill -INT
-- -PGID``) reaches them as well as the flow. The flow alone acts on it: it ends the stage
processes and closes the cluster (:mod:`flows.guard`). Left to itself, a worker's asyncio loop
turns the signal into a KeyboardInterrupt and prints its traceback while it shuts down.
"""

from __future__ import annotations

import signal


def dask_setup(worker) -> None:
    """Dask's preload hook, run in the worker process's main thread before the worker starts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
