"""Orchestration of the project's DVC pipeline (imports only ``dfmsd.core`` of the package).

- :mod:`flows.runner`: the concurrent stage runner (``make repro``): the stage graph from
  ``dvc dag``, networkx's order, ``dvc status --json``, training outside DVC's lock
  (:mod:`dfmsd.core.runs`); ``python -m flows.runner``.
- :mod:`flows.presets`: a preset run in its own git worktree, saved as a DVC experiment
  (``make repro PRESET=...``); ``python -m flows.presets``.
- :mod:`flows.pipeline`: the ``dvc-pipeline`` Prefect flow, one task per DVC stage, on top of
  :mod:`flows.runner` (``make flow``); ``python -m flows.pipeline``.
- :mod:`flows.serve`: that flow as a Prefect deployment, started from the UI (``make serve``).
- :mod:`flows.progress`: mmengine training log lines as a progress fraction.
- :mod:`flows.review`: a reviewer's check of the checked-out commit (``make review``).

Nothing is imported here, so that ``import flows.runner`` stays free of Prefect.
"""
