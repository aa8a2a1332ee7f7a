"""Orchestration of the project's DVC pipeline (imports only ``dfmsd.core`` of the package).

- :mod:`flows.pipeline`: the ``dvc-pipeline`` Prefect flow, one task per DVC stage (``make
  repro``, ``make flow``); its command line is :mod:`flows.cli` (``python -m flows``).
- :mod:`flows.stages`: the DVC side: the stage graph and what changed, ``dvc repro`` of one stage.
- :mod:`flows.engine`: the heavy stages on a Dask cluster (local, ``tcp://``, SLURM,
  Kubernetes: docs/cluster.md); :mod:`flows.reaper` ends a stage's processes with its worker.
- :mod:`flows.presets`: a preset run in its own git worktree (``make repro PRESET=...``).
- :mod:`flows.guard`: one run per workspace; SIGINT/SIGTERM end every stage process.
- :mod:`flows.serve`: the flow as a Prefect deployment, started from the UI (``make serve``).
- :mod:`flows.progress`: mmengine training log lines as a progress fraction.
- :mod:`flows.review`, :mod:`flows.tolerance`: a reviewer's check of the checked-out commit (``make review``).
"""
