"""Orchestration of the project's DVC pipeline (imports only ``dfmsd.core`` of the package).

- :mod:`flows.pipeline`: the ``dvc-pipeline`` Prefect flow, one task per DVC stage (``make
  repro``, ``make flow``); its command line is :mod:`flows.cli` (``python -m flows``).
- :mod:`flows.stage_task`: one DVC stage as a Prefect task (its states: Skipped, Restored, NotReady).
- :mod:`flows.stages`: the DVC side: the stage graph and what changed, ``dvc repro`` of one stage.
- :mod:`flows.engine`: the heavy stages on a Dask cluster (local, ``tcp://``, SLURM,
  Kubernetes: docs/cluster.md); :mod:`flows.reaper` ends a stage's processes with its worker.
- :mod:`flows.presets`: a preset run in its own git worktree (``make repro PRESET=...``).
- :mod:`flows.guard`: one run per workspace; SIGINT/SIGTERM end every stage process.
- :mod:`flows.serve`: the flow as a Prefect deployment, started from the UI (``make serve``).
- What the Prefect UI shows: :mod:`flows.run_display` (a run's name, tags, NotReady's final
  state), :mod:`flows.output` (log levels, a failure's cause), :mod:`flows.progress` (training and
  run progress), :mod:`flows.results` (summary, report artifacts, the DVC experiment),
  :mod:`flows.ui` (``make ui``).
- :mod:`flows.review` (with :mod:`flows.review_metrics`, :mod:`flows.review_remote`) and
  :mod:`flows.tolerance`: a reviewer's check of the checked-out commit (``make review``).
"""
